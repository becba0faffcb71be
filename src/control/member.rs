//! The proxy side of the control plane: follow key announcements and apply them live.
//!
//! This module owns one proxy's control connection (its own async-nats client to the
//! upstream, not an agent's) and turns authenticated announcements into keyring changes:
//! STAGE installs and persists a decrypt-only key and acknowledges it, ACTIVATE swaps the
//! sealing epoch, DESTROY shreds an epoch. The sessions pick up each change at their next
//! read batch through the keyring snapshot, so nothing restarts and nothing is dropped.

use std::sync::Arc;

use base64::Engine;
use futures::StreamExt;
use tokio::sync::watch;

use super::message::{self, Body, ControlError, ControlSealer, ReplayGuard};
use crate::envelope::{DataKey, Opener};
use crate::keyring::{KeyState, Keyring};
use crate::metrics::Metrics;

/// Control subjects under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    pub announce: String,
    pub ack: String,
    pub heartbeat: String,
    /// Proxies' figures for `cipherbus status`.
    pub report: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Subjects {
            announce: format!("{prefix}.announce"),
            ack: format!("{prefix}.ack"),
            heartbeat: format!("{prefix}.heartbeat"),
            report: format!("{prefix}.report"),
        }
    }
}

/// Why an announcement was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error("epoch {epoch}: the wrapped key does not unwrap under this root: {why}")]
    Unwrap {
        epoch: u32,
        why: String,
        /// The root's KMS did not answer: not acknowledged now, tried again later.
        unavailable: bool,
    },
    #[error("epoch {epoch}: the key's fingerprint does not match the announcement")]
    Fingerprint { epoch: u32 },
    #[error(
        "epoch {epoch}: the change could not be persisted, so it is not applied here: {source}"
    )]
    Persist {
        epoch: u32,
        #[source]
        source: crate::keyring::KeyringError,
    },
    #[error("{0}")]
    Keyring(#[from] crate::keyring::KeyringError),
}

/// Tells a state directory that cannot be written from a refused change.
fn persisting(epoch: u32) -> impl Fn(crate::keyring::KeyringError) -> ApplyError {
    use crate::keyring::KeyringError;
    move |e| match e {
        KeyringError::Io { .. } | KeyringError::Corrupt { .. } => {
            ApplyError::Persist { epoch, source: e }
        }
        e => ApplyError::Keyring(e),
    }
}

impl ApplyError {
    /// The epoch the refused change was about, where known.
    pub fn epoch(&self) -> Option<u32> {
        match self {
            ApplyError::Unwrap { epoch, .. }
            | ApplyError::Fingerprint { epoch }
            | ApplyError::Persist { epoch, .. } => Some(*epoch),
            ApplyError::Control(_) | ApplyError::Keyring(_) => None,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApplyError::Control(e) => e.reason(),
            ApplyError::Unwrap {
                unavailable: true, ..
            } => "kms_unavailable",
            ApplyError::Unwrap { .. } => "unwrap",
            ApplyError::Fingerprint { .. } => "fingerprint",
            ApplyError::Persist { .. } => "persist",
            ApplyError::Keyring(e) => e.reason(),
        }
    }
}

/// Applies control messages to a keyring. I/O-free, so it can be driven from tests.
pub struct Member {
    keyring: Arc<Keyring>,
    control_key: DataKey,
    opener: Opener,
    guard: ReplayGuard,
    subjects: Subjects,
    keyring_subject: String,
    /// The newest activation acknowledged, so each is acknowledged once, however it arrived
    /// (the announcement, a re-announcement, or the bucket first).
    activation_acked: u32,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("subjects", &self.subjects)
            .finish_non_exhaustive()
    }
}

/// What the caller should publish after applying a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    None,
    Ack(u32),
    /// Send a heartbeat now (a roll call).
    Beat,
}

impl Member {
    pub fn new(keyring: Arc<Keyring>, prefix: &str) -> Self {
        let control_key = keyring.root().control_key().clone();
        Member {
            keyring,
            control_key,
            opener: Opener::new(),
            guard: ReplayGuard::default(),
            subjects: Subjects::new(prefix),
            keyring_subject: super::authority::keyring_subject(prefix),
            activation_acked: 0,
        }
    }

    /// Replaces this proxy's wrapped copy of a key it holds with the authority's, if they
    /// differ and the new one unwraps to the same key.
    fn refresh_wrapped(&self, info: &message::EpochInfo, wrapped: &str) -> Result<(), ApplyError> {
        let epoch = info.epoch;
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(wrapped) else {
            return Err(ApplyError::Unwrap {
                epoch,
                why: "not base64".into(),
                unavailable: false,
            });
        };
        if self.keyring.wrapped_cached(epoch).as_deref() == Some(&bytes[..]) {
            return Ok(());
        }
        let (key, bytes) = self.unwrap(epoch, wrapped)?;
        if !crate::ct::eq_str(&key.fingerprint(), &info.fingerprint) {
            return Err(ApplyError::Fingerprint { epoch });
        }
        self.keyring
            .replace_wrapped(epoch, &bytes)
            .map_err(persisting(epoch))?;
        tracing::info!(epoch, "stored the key as the authority wrapped it again");
        Ok(())
    }

    /// Decodes and unwraps an announced key (one call to an HSM or KMS root).
    fn unwrap(&self, epoch: u32, wrapped: &str) -> Result<(DataKey, Vec<u8>), ApplyError> {
        let wrapped = base64::engine::general_purpose::STANDARD
            .decode(wrapped)
            .map_err(|_| ApplyError::Unwrap {
                epoch,
                why: "not base64".into(),
                unavailable: false,
            })?;
        match self.keyring.root().unwrap(epoch, &wrapped) {
            Ok(key) => Ok((key, wrapped)),
            Err(e) => Err(ApplyError::Unwrap {
                epoch,
                why: e.to_string(),
                unavailable: e.is_unavailable(),
            }),
        }
    }

    /// The active epoch, once, when it is newer than the last activation acknowledged: the
    /// authority then shows this proxy at it at once (`cipherbus status`), not at its next
    /// heartbeat. However the activation arrived (announcement, re-announcement or the
    /// bucket), it is acknowledged once.
    pub fn activation_to_ack(&mut self) -> Option<u32> {
        let active = self.keyring.snapshot().active.epoch;
        (active > self.activation_acked).then(|| {
            self.activation_acked = active;
            active
        })
    }

    pub fn control_key(&self) -> &DataKey {
        &self.control_key
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Opens, checks and applies one announcement.
    pub fn apply(&mut self, payload: &[u8]) -> Result<Reply, ApplyError> {
        let msg = message::open(
            &mut self.opener,
            &self.control_key,
            &self.subjects.announce,
            payload,
        )?;
        self.guard.check(&msg)?;
        let snap = self.keyring.snapshot();
        match msg.body {
            Body::Stage {
                epoch,
                wrapped,
                fingerprint,
            } => {
                // A re-announcement of an epoch already here is acknowledged again, without
                // another call to the root.
                if snap.state(epoch).is_none() {
                    let (key, wrapped) = self.unwrap(epoch, &wrapped)?;
                    if !crate::ct::eq_str(&key.fingerprint(), &fingerprint) {
                        return Err(ApplyError::Fingerprint { epoch });
                    }
                    self.keyring
                        .stage_wrapped(epoch, key, &wrapped)
                        .map_err(persisting(epoch))?;
                    tracing::info!(epoch, fingerprint = %fingerprint, "staged a new data key");
                }
                if snap.state(epoch) == Some(KeyState::Destroyed) {
                    return Ok(Reply::None);
                }
                Ok(Reply::Ack(epoch))
            }
            Body::Activate { epoch } => {
                if snap.active.epoch != epoch {
                    self.keyring.activate(epoch).map_err(persisting(epoch))?;
                    tracing::info!(epoch, "activated a new data key");
                }
                Ok(self.activation_to_ack().map_or(Reply::None, Reply::Ack))
            }
            Body::Destroy { epoch, reason } => {
                if snap.state(epoch) != Some(KeyState::Destroyed) {
                    self.keyring.destroy(epoch).map_err(persisting(epoch))?;
                    tracing::warn!(epoch, reason = %reason, "destroyed a data key");
                }
                Ok(Reply::None)
            }
            Body::RollCall {} => Ok(Reply::Beat),
            _ => Ok(Reply::None),
        }
    }
}

impl Member {
    /// Brings the keyring in line with the authority's: installs the epochs it lacks (as staged
    /// or retired), destroys what the authority destroyed, and activates the authority's active
    /// epoch if it is newer.
    pub fn apply_sync(&mut self, epochs: &[message::EpochInfo]) -> Result<(), ApplyError> {
        let snap = self.keyring.snapshot();
        // Retired epochs this proxy lacks are kept wrapped, unwrapped on first use: catching
        // up on history costs no call to the root, and one write of the state.
        let mut retired = Vec::new();
        for info in epochs {
            let local = snap.state(info.epoch);
            match info.state {
                KeyState::Destroyed
                    if (local.is_some_and(|s| s != KeyState::Destroyed)
                        || snap.unsaved().any(|e| e == info.epoch))
                        && snap.active.epoch != info.epoch =>
                {
                    self.keyring
                        .destroy(info.epoch)
                        .map_err(persisting(info.epoch))?;
                    tracing::warn!(epoch = info.epoch, "destroyed a data key");
                }
                KeyState::Destroyed => {}
                KeyState::Retired if local.is_none() && info.epoch != 1 => {
                    let wrapped = base64::engine::general_purpose::STANDARD
                        .decode(info.wrapped.as_deref().unwrap_or_default())
                        .map_err(|_| ApplyError::Unwrap {
                            epoch: info.epoch,
                            why: "not base64".into(),
                            unavailable: false,
                        })?;
                    retired.push((info.epoch, info.fingerprint.clone(), wrapped));
                }
                state if local.is_none() => {
                    let epoch = info.epoch;
                    let (key, wrapped) =
                        self.unwrap(epoch, info.wrapped.as_deref().unwrap_or_default())?;
                    if !crate::ct::eq_str(&key.fingerprint(), &info.fingerprint) {
                        return Err(ApplyError::Fingerprint { epoch });
                    }
                    let as_state = if state == KeyState::Retired {
                        KeyState::Retired
                    } else {
                        KeyState::Staged
                    };
                    // An authority in this process may have installed it meanwhile.
                    match self.keyring.adopt(epoch, key, as_state, Some(&wrapped)) {
                        Ok(()) if as_state == KeyState::Staged => {
                            tracing::info!(epoch, fingerprint = %info.fingerprint, "staged a new data key");
                        }
                        Ok(()) => {
                            tracing::info!(epoch, fingerprint = %info.fingerprint, "installed a retired data key");
                        }
                        Err(e) if self.keyring.snapshot().state(epoch).is_none() => {
                            return Err(persisting(epoch)(e));
                        }
                        Err(_) => {}
                    }
                }
                // Wrapped again (a rewrap, or a migration to another root): stored as the
                // authority wrapped it, once it is proven to hold the same key.
                _ if info.epoch != 1 && local.is_some_and(|s| s != KeyState::Destroyed) => {
                    if let Some(w) = info.wrapped.as_deref() {
                        self.refresh_wrapped(info, w)?;
                    }
                }
                _ => {}
            }
        }
        drop(snap);
        if let Some(&(first, _, _)) = retired.first() {
            let adopted = self
                .keyring
                .adopt_retired_wrapped(&retired)
                .map_err(persisting(first))?;
            if adopted > 0 {
                tracing::info!(
                    epochs = adopted,
                    "installed retired data keys, to unwrap on first use"
                );
            }
        }
        if let Some(active) = epochs.iter().find(|i| i.state == KeyState::Active) {
            if active.epoch > self.keyring.snapshot().active.epoch {
                match self.keyring.activate(active.epoch) {
                    Ok(()) => tracing::info!(epoch = active.epoch, "activated a new data key"),
                    Err(e) if self.keyring.snapshot().active.epoch < active.epoch => {
                        return Err(persisting(active.epoch)(e));
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }
}

/// Distinct keyring refusals audited per active epoch; beyond it they are only logged.
const MAX_AUDITED_REPEATS: usize = 64;

/// How a proxy's control connection is set up.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub upstreams: Vec<String>,
    pub prefix: String,
    /// This proxy's id on the control plane.
    pub node: String,
    pub heartbeat_every: std::time::Duration,
    /// TLS towards the upstream, as for agent sessions.
    pub tls: crate::tls::UpstreamFiles,
    /// The key scope this member follows (its metrics label).
    pub scope: &'static str,
}

/// Asks the authority for its keyring and applies it. No authority yet is not an error. A key
/// the root's KMS could not unwrap is tried again at the next sync: the authority re-announces
/// staged and active keys, and a session that meets an unknown epoch asks for one.
async fn sync(
    client: &async_nats::Client,
    member: &mut Member,
    sealer: &mut ControlSealer,
    prefix: &str,
    metrics: &Metrics,
) {
    let subject = super::authority::sync_subject(prefix);
    let Ok(sealed) = sealer.seal(&subject, Body::SyncRequest {}) else {
        return;
    };
    let request = async_nats::Request::new()
        .payload(sealed.into())
        .timeout(Some(std::time::Duration::from_secs(5)));
    let (from, sealed_for, payload) = match client.send_request(subject, request).await {
        Ok(r) => ("the key authority", r.subject.to_string(), r.payload),
        Err(e) => {
            tracing::debug!(error = %e, "no keyring sync from an authority; trying the keyring bucket");
            match keyring_from_bucket(client, prefix).await {
                Some(value) => (
                    "the keyring bucket",
                    super::authority::keyring_subject(prefix),
                    value,
                ),
                None => return,
            }
        }
    };
    let control_key = member.control_key().clone();
    let opened = message::open(&mut Opener::new(), &control_key, &sealed_for, &payload);
    match opened {
        Ok(message::ControlMessage {
            body: Body::SyncReply { epochs },
            ..
        }) => match member.apply_sync(&epochs) {
            Ok(()) => tracing::info!(
                active_epoch = member.keyring.snapshot().active.epoch,
                from,
                "keyring synced"
            ),
            Err(e) => {
                metrics.control_refused(e.reason());
                tracing::warn!(error = %e, "keyring sync refused");
            }
        },
        Ok(_) => metrics.control_refused("malformed"),
        Err(e) => metrics.control_refused(e.reason()),
    }
}

/// The keyring bucket, if the bus has JetStream and an authority created it.
async fn keyring_bucket(
    client: &async_nats::Client,
    prefix: &str,
) -> Option<async_nats::jetstream::kv::Store> {
    if !client.server_info().jetstream {
        return None;
    }
    async_nats::jetstream::new(client.clone())
        .get_key_value(crate::bus::keyring_bucket(prefix))
        .await
        .ok()
}

/// The keyring as the authority last wrote it to the bucket (sealed), if the bus has one.
async fn keyring_from_bucket(client: &async_nats::Client, prefix: &str) -> Option<bytes::Bytes> {
    let kv = keyring_bucket(client, prefix).await?;
    kv.get(crate::bus::KEYRING_KEY).await.ok().flatten()
}

/// Opens a watch on the keyring bucket, starting at the value the authority last committed,
/// if the bus has JetStream and the bucket exists yet.
async fn follow_bucket(
    client: &async_nats::Client,
    prefix: &str,
) -> Option<async_nats::jetstream::kv::Watch> {
    let kv = keyring_bucket(client, prefix).await?;
    match kv.watch_with_history(crate::bus::KEYRING_KEY).await {
        Ok(w) => {
            tracing::debug!("following the keyring bucket");
            Some(w)
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot follow the keyring bucket yet");
            None
        }
    }
}

/// The next change in the keyring bucket; pending forever while there is no watch.
async fn next_commit(
    watch: &mut Option<async_nats::jetstream::kv::Watch>,
) -> Option<async_nats::jetstream::kv::Entry> {
    let Some(w) = watch.as_mut() else {
        return std::future::pending().await;
    };
    match w.next().await {
        Some(Ok(entry)) => Some(entry),
        Some(Err(e)) => {
            tracing::debug!(error = %e, "the keyring bucket watch failed; reopening it");
            *watch = None;
            None
        }
        None => {
            *watch = None;
            None
        }
    }
}

impl Member {
    /// Applies a keyring the authority committed to the bucket, and returns the staged epochs
    /// this proxy now holds, to acknowledge.
    pub fn apply_commit(&mut self, sealed: &[u8]) -> Result<Vec<u32>, ApplyError> {
        let msg = message::open(
            &mut Opener::new(),
            &self.control_key,
            &self.keyring_subject,
            sealed,
        )?;
        let Body::SyncReply { epochs } = msg.body else {
            return Err(ControlError::Malformed.into());
        };
        self.apply_sync(&epochs)?;
        let snap = self.keyring.snapshot();
        Ok(epochs
            .iter()
            .filter(|i| {
                i.state == KeyState::Staged && snap.state(i.epoch) == Some(KeyState::Staged)
            })
            .map(|i| i.epoch)
            .collect())
    }
}

/// Follows announcements on `upstream` until shutdown, acknowledging staged keys. Syncs the
/// whole keyring from the authority on start and after every reconnect.
pub async fn run(
    keyring: Arc<Keyring>,
    metrics: Arc<Metrics>,
    cfg: MemberConfig,
    audit: Option<Arc<crate::audit::AuditLog>>,
    mut shutdown: watch::Receiver<()>,
) {
    let MemberConfig {
        upstreams,
        prefix,
        node,
        heartbeat_every,
        tls,
        scope,
    } = cfg;
    let record = |kind, epoch: Option<u32>, reason: String| {
        if let Some(log) = &audit {
            let event = crate::audit::Event {
                kind,
                epoch,
                fingerprint: None,
                actor: node.clone(),
                reason,
            };
            if let Err(e) = log.append(event) {
                tracing::error!(error = %e, "cannot write the audit log");
            }
        }
    };
    // A fault that lasts (a state directory that cannot be written) refuses every
    // re-announcement: each such refusal is audited once per active epoch, not every heartbeat.
    let mut keyring_refusals = std::collections::HashSet::new();
    let mut member = Member::new(keyring, &prefix);
    let mut sealer = match ControlSealer::new(node.clone(), member.control_key()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "control plane disabled");
            return;
        }
    };
    let opts = match tls.apply(async_nats::ConnectOptions::new()) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "control plane disabled");
            return;
        }
    };
    let (reconnected_tx, mut reconnected) = tokio::sync::mpsc::channel::<()>(1);
    let client = tokio::select! {
        c = opts
            .name("cipherbus-control")
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let tx = reconnected_tx.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        let _ = tx.try_send(());
                    }
                }
            })
            .connect(upstreams.clone()) => c,
        _ = shutdown.changed() => return,
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "control connection failed; keys stay as they are");
            return;
        }
    };
    let mut announcements = match client.subscribe(member.subjects().announce.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow key announcements");
            return;
        }
    };
    // Counts at the moment this proxy started sealing under its current epoch, so heartbeats
    // report usage per epoch. Until the first change, everything sealed since start counts.
    let mut epoch_seen = member.keyring.snapshot().active.epoch;
    let mut base = (0u64, 0u64);
    sync(&client, &mut member, &mut sealer, &prefix, &metrics).await;
    // The bucket carries every committed change in order, including those announced while this
    // proxy was away; announcements stay for buses without JetStream.
    let mut commits = follow_bucket(&client, &prefix).await;
    let host = crate::process::host_name();
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let before = member.keyring.snapshot().active.epoch;
        let msg = tokio::select! {
            entry = next_commit(&mut commits) => {
                let Some(entry) = entry else { continue };
                if entry.operation != async_nats::jetstream::kv::Operation::Put {
                    continue;
                }
                match member.apply_commit(&entry.value) {
                    Ok(staged) => {
                        let activated = (member.keyring.snapshot().active.epoch != before)
                            .then(|| member.activation_to_ack())
                            .flatten();
                        for epoch in staged.into_iter().chain(activated) {
                            let ack = sealer.seal(&member.subjects().ack, Body::Ack { epoch });
                            if let Ok(ack) = ack {
                                let _ = client
                                    .publish(member.subjects().ack.clone(), ack.into())
                                    .await;
                            }
                        }
                    }
                    Err(e) => {
                        metrics.control_refused(e.reason());
                        tracing::warn!(reason = e.reason(), error = %e, "refused the committed keyring");
                    }
                }
                None
            }
            m = announcements.next() => match m {
                Some(m) => Some(m),
                None => return,
            },
            () = member.keyring.sync_wanted() => {
                sync(&client, &mut member, &mut sealer, &prefix, &metrics).await;
                continue;
            }
            Some(()) = reconnected.recv() => {
                sync(&client, &mut member, &mut sealer, &prefix, &metrics).await;
                continue;
            }
            _ = heartbeat.tick() => {
                if commits.is_none() {
                    commits = follow_bucket(&client, &prefix).await;
                }
                let active = member.keyring.snapshot().active.epoch;
                let totals = metrics.scope_sealed_totals(scope);
                if active != epoch_seen {
                    epoch_seen = active;
                    base = totals;
                }
                let body = Body::Heartbeat {
                    active,
                    sealed_messages: totals.0 - base.0,
                    sealed_bytes: totals.1 - base.1,
                };
                if let Ok(sealed) = sealer.seal(&member.subjects().heartbeat, body) {
                    let _ = client.publish(member.subjects().heartbeat.clone(), sealed.into()).await;
                }
                let report = Body::Report(message::Report {
                    host: host.clone(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    active,
                    connections: u64::try_from(metrics.connections.get()).unwrap_or(0),
                    sealed_messages: metrics.messages_sealed.get(),
                    opened_messages: metrics.messages_opened.get(),
                    refused: metrics.refusal_totals(),
                });
                if let Ok(sealed) = sealer.seal(&member.subjects().report, report) {
                    let _ = client.publish(member.subjects().report.clone(), sealed.into()).await;
                }
                continue;
            }
            _ = shutdown.changed() => return,
        };
        let heard = msg.is_some();
        let result = match msg {
            Some(msg) => member.apply(&msg.payload),
            None => Ok(Reply::None),
        };
        if heard && result.is_ok() {
            metrics.authority_heard(scope);
        }
        match result {
            Ok(Reply::Ack(epoch)) => {
                let ack = sealer.seal(&member.subjects().ack, Body::Ack { epoch });
                if let Ok(ack) = ack {
                    let _ = client
                        .publish(member.subjects().ack.clone(), ack.into())
                        .await;
                }
            }
            Ok(Reply::Beat) => heartbeat.reset_immediately(),
            Ok(Reply::None) => {}
            Err(e) => {
                metrics.control_refused(e.reason());
                tracing::warn!(reason = e.reason(), error = %e, "refused a control message");
                let text = format!("control message refused ({}): {e}", e.reason());
                let repeats = matches!(e, ApplyError::Persist { .. } | ApplyError::Keyring(_));
                if !repeats
                    || (keyring_refusals.len() < MAX_AUDITED_REPEATS
                        && keyring_refusals.insert(text.clone()))
                {
                    record(crate::audit::EventKind::Refused, e.epoch(), text);
                }
            }
        }
        let after = member.keyring.snapshot().active.epoch;
        if after != before {
            keyring_refusals.clear();
            record(
                crate::audit::EventKind::Activated,
                Some(after),
                format!("announced by the key authority; epoch {before} retired"),
            );
        }
        let active = member.keyring.snapshot().active.epoch;
        if active != epoch_seen {
            epoch_seen = active;
            base = metrics.scope_sealed_totals(scope);
        }
        metrics.set_active_epoch(scope, active);
    }
}
