//! The key authority: the single writer of epochs.
//!
//! This module owns deciding when to rotate and carrying a rotation out across the proxies:
//! it tracks live proxies from their heartbeats, rotates on a schedule, on usage (messages or
//! bytes sealed under the active epoch, summed over heartbeats) and on command, and runs each
//! rotation in two phases: STAGE the wrapped key until every live proxy acknowledges it (or
//! the stage timeout passes, and the silent ones are recorded as laggards), then ACTIVATE.
//! It re-announces the active epoch on every heartbeat interval so a proxy that missed an
//! announcement catches up, and writes every key event to the audit log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use tokio::sync::watch;

use super::member::Subjects;
use super::message::{self, Body, ControlError, ControlSealer, ReplayGuard};
use crate::audit::stream::AuditStream;
use crate::audit::{AuditLog, Event, EventKind};
use crate::config::Rotation;
use crate::envelope::{DataKey, Opener};
use crate::keyring::{KeyState, Keyring};
use crate::metrics::{Metrics, ReasonLabel, ScopeLabel};

/// A proxy is live while its last heartbeat is younger than this many intervals.
const LIVE_INTERVALS: u32 = 3;
/// How long an authority holding the lease listens for answers to its roll call at start.
const ROLL_CALL_WINDOW: Duration = Duration::from_millis(500);
/// How often a staged key is announced again while acknowledgements are missing.
const RESTAGE_EVERY: Duration = Duration::from_millis(250);
/// An operator's request heard while standing by.
struct HeldRequest {
    at: Instant,
    /// The lease revision when it arrived.
    revision: Option<u64>,
    msg: async_nats::Message,
}

/// How long a standby keeps an operator's request for in case it takes office.
const HOLD_REQUESTS_FOR: Duration = Duration::from_secs(10);
const MAX_HELD_REQUESTS: usize = 16;

/// The subject operators send rotation requests to.
pub fn rotate_subject(prefix: &str) -> String {
    format!("{prefix}.cmd.rotate")
}

/// Where operators ask for every key to be wrapped again (`cipherbus rewrap`).
pub fn rewrap_subject(prefix: &str) -> String {
    format!("{prefix}.cmd.rewrap")
}

pub fn keys_subject(prefix: &str) -> String {
    format!("{prefix}.cmd.keys")
}

pub fn revoke_subject(prefix: &str) -> String {
    format!("{prefix}.cmd.revoke")
}

/// Where proxies ask for the whole keyring.
pub fn sync_subject(prefix: &str) -> String {
    format!("{prefix}.sync")
}

/// The JetStream KV bucket that holds the keyring as the authority last wrote it, sealed.
pub fn keyring_bucket(prefix: &str) -> String {
    let mut name = crate::audit::stream::stream_name(prefix);
    name.truncate(name.len() - "_AUDIT".len());
    name.push_str("_KEYRING");
    name
}

/// The bucket key that holds the keyring, and the subject its value is sealed for.
pub const KEYRING_KEY: &str = "keyring";

/// The bucket key that holds the key authority's lease: its value is the holder's node id. It
/// sits in the keyring's bucket so that every keyring write can be conditioned on it.
pub const LEADER_KEY: &str = "leader";

/// The control bucket: the keyring as the authority last committed it, and beside it the lease
/// every keyring write is fenced by. The server checks a keyring write against the lease's
/// revision, so an authority that lost the lease cannot write, whatever its clock says.
struct ControlBucket {
    kv: async_nats::jetstream::kv::Store,
    js: async_nats::jetstream::Context,
    ttl: Duration,
    /// While held: the revision of this authority's last lease write, and when it was sent.
    held: Option<(u64, Instant)>,
    /// While another holds it: the revision last read, and when this authority first saw it.
    /// The lease is taken once that revision has not changed for `ttl` on this clock, so no
    /// two clocks are compared.
    seen: Option<(u64, Instant)>,
    /// Whether standing by was already logged and audited.
    told: bool,
}

impl ControlBucket {
    fn subject(&self, key: &str) -> String {
        format!(
            "{}{key}",
            self.kv.put_prefix.as_ref().unwrap_or(&self.kv.prefix)
        )
    }
}

pub fn keyring_subject(prefix: &str) -> String {
    format!("{prefix}.keyring")
}

/// Where audit events are published for collectors.
pub fn audit_subject(prefix: &str) -> String {
    format!("{prefix}.audit")
}

/// Where proxies send their figures for `cipherbus status`.
pub fn report_subject(prefix: &str) -> String {
    Subjects::new(prefix).report
}

/// Where operators ask the acting authority for the fleet's status.
pub fn status_subject(prefix: &str) -> String {
    format!("{prefix}.cmd.status")
}

/// Proxies (and other authorities) remembered; past this, new ones are not tracked.
const MAX_PROXIES: usize = 4096;

/// A proxy silent this long, and not sealing under the active epoch, is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Where authorities announce themselves.
pub fn hello_subject(prefix: &str) -> String {
    format!("{prefix}.authority")
}

/// A keyring change, committed to the bucket before it is made.
enum Change<'a> {
    None,
    /// A new epoch, its key and the key as the root wrapped it.
    Stage(u32, &'a DataKey, &'a [u8]),
    Activate(u32),
    Destroy(u32),
}

/// Destroyed epochs announced again with each re-announcement, for proxies that missed one.
const REANNOUNCE_DESTROYED: usize = 16;

#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    pub prefix: String,
    pub rotation: Rotation,
    pub node: String,
    pub tls: crate::tls::UpstreamFiles,
    /// The key scope it rules (its metrics label).
    pub scope: &'static str,
}

#[derive(Debug)]
struct Proxy {
    last_seen: Instant,
    /// The epoch the proxy seals with, and what it has sealed under it.
    active: u32,
    sealed_messages: u64,
    sealed_bytes: u64,
    /// Messages and bytes per second sealed under `active`, from its last two heartbeats.
    rate: (f64, f64),
    /// When its last heartbeat came (reports also refresh `last_seen`).
    beat_at: Option<Instant>,
    /// Its last two reports, newest first, with when they came.
    report: Option<(Instant, message::Report)>,
    previous: Option<(Instant, message::Report)>,
}

impl Proxy {
    fn new(active: u32) -> Self {
        Proxy {
            last_seen: Instant::now(),
            active,
            sealed_messages: 0,
            sealed_bytes: 0,
            rate: (0.0, 0.0),
            beat_at: None,
            report: None,
            previous: None,
        }
    }
}

/// What a finished rotation reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub epoch: u32,
    pub acked: Vec<String>,
    pub laggards: Vec<String>,
}

struct Authority {
    keyring: Arc<Keyring>,
    metrics: Arc<Metrics>,
    client: async_nats::Client,
    cfg: AuthorityConfig,
    subjects: Subjects,
    control_key: DataKey,
    sealer: ControlSealer,
    opener: Opener,
    /// One per subject: a sender's messages on different subjects arrive through different
    /// subscriptions, in no set order, and the subject is sealed into each (no cross-subject
    /// replay), so numbers only need to rise per sender and subject.
    guards: HashMap<String, ReplayGuard>,
    audit: Option<Arc<AuditLog>>,
    /// The audit trail's copy on the bus, where the bus has JetStream.
    audit_stream: Option<AuditStream>,
    /// Where the bus has JetStream: the keyring for proxies to follow, and the lease that
    /// decides who acts. Without it (allowed only by `require_jetstream = false`), hellos decide.
    control: Option<ControlBucket>,
    /// Whether the file is tied to the stream as it is now: not after standing by, while
    /// another authority wrote it.
    audit_attached: bool,
    /// Audit entries written but not yet published for collectors.
    unpublished: Vec<crate::audit::Entry>,
    proxies: HashMap<String, Proxy>,
    /// Messages sealed under each retired epoch, as last reported (kept in memory only).
    retired_usage: HashMap<u32, u64>,
    activated: Instant,
    since_ms: u64,
    /// Another authority that holds the role: its node id and when it was last heard.
    standing_by_for: Option<(String, Instant)>,
    /// Every other authority heard, and when (bounded like the proxies).
    others: HashMap<String, Instant>,
    /// When this authority last started acting (Unix ms).
    acting_since_ms: u64,
    /// Operators' requests heard while standing by, served if this one takes office soon.
    held_requests: std::collections::VecDeque<HeldRequest>,
    /// The lease revision this authority took over, when it took the lease from a holder.
    taken_over: Option<u64>,
}

/// Runs the authority until shutdown. An error is the one sentence the process stops with:
/// an authority that cannot act safely does not run at all.
pub async fn run(
    keyring: Arc<Keyring>,
    metrics: Arc<Metrics>,
    upstreams: Vec<String>,
    cfg: AuthorityConfig,
    audit: Option<Arc<AuditLog>>,
    rotation: watch::Receiver<crate::config::Rotation>,
    mut shutdown: watch::Receiver<()>,
) -> Result<(), String> {
    let stopped = |e: &dyn std::fmt::Display| format!("the key authority cannot start: {e}");
    let control_key = keyring.root().control_key().clone();
    let sealer = ControlSealer::new(cfg.node.clone(), &control_key).map_err(|e| stopped(&e))?;
    let opts = cfg
        .tls
        .apply(async_nats::ConnectOptions::new())
        .map_err(|e| stopped(&e))?;
    let client = tokio::select! {
        c = opts
            .name("cipherbus-authority")
            .retry_on_initial_connect()
            .connect(upstreams) => c,
        _ = shutdown.changed() => return Ok(()),
    };
    let client = client.map_err(|e| stopped(&format!("cannot reach the bus ({e})")))?;
    // The bus may not be up yet (the client retries): what it offers is known once connected.
    tokio::select! {
        _ = client.flush() => {}
        _ = shutdown.changed() => return Ok(()),
    }
    let jetstream = client.server_info().jetstream;
    if !jetstream && cfg.rotation.require_jetstream {
        return Err("the key authority needs JetStream on the bus for its lease and keyring (start nats-server with -js), or set require_jetstream = false under [rotation] to run with no fencing between authorities".to_owned());
    }
    let audit_stream = match &audit {
        Some(log) => match attach_audit_stream(&client, &cfg.prefix, log).await {
            Ok(s) => s,
            Err(e) => {
                metrics
                    .audit_failures
                    .get_or_create(&ReasonLabel { reason: "stream" })
                    .inc();
                return Err(stopped(&format!(
                    "its audit trail cannot be tied to the audit stream ({e})"
                )));
            }
        },
        None => None,
    };
    let control = if jetstream {
        let kv = open_bucket(&client, keyring_bucket(&cfg.prefix), true)
            .await
            .map_err(|e| stopped(&e))?;
        Some(ControlBucket {
            kv,
            js: async_nats::jetstream::new(client.clone()),
            ttl: cfg.rotation.lease_ttl,
            held: None,
            seen: None,
            told: false,
        })
    } else {
        tracing::warn!("the bus has no JetStream: no lease and no fencing, so hellos decide which authority acts, and two can both write after a partition");
        None
    };
    let subjects = Subjects::new(&cfg.prefix);
    let mut authority = Authority {
        keyring,
        metrics,
        client,
        subjects,
        control_key,
        sealer,
        opener: Opener::new(),
        guards: HashMap::new(),
        audit,
        audit_attached: audit_stream.is_some(),
        audit_stream,
        control,
        unpublished: Vec::new(),
        proxies: HashMap::new(),
        retired_usage: HashMap::new(),
        activated: Instant::now(),
        since_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        standing_by_for: None,
        others: HashMap::new(),
        acting_since_ms: message::now_ms(),
        held_requests: std::collections::VecDeque::new(),
        taken_over: None,
        cfg,
    };
    if let Err(e) = authority.serve(rotation, &mut shutdown).await {
        tracing::error!(error = %e, "key authority stopped");
    }
    Ok(())
}

/// Opens (or, with `create`, creates) the control bucket, replicated on up to three servers
/// where the bus is a cluster. Entries never expire: the lease lapses by its holder's silence,
/// not by age.
pub(crate) async fn open_bucket(
    client: &async_nats::Client,
    bucket: String,
    create: bool,
) -> Result<async_nats::jetstream::kv::Store, String> {
    use async_nats::jetstream::{kv, stream::StorageType};
    let js = async_nats::jetstream::new(client.clone());
    let first = match js.get_key_value(&bucket).await {
        Ok(kv) => return Ok(kv),
        Err(e) => e.to_string(),
    };
    if !create {
        return Err(format!("cannot open the control bucket {bucket} ({first})"));
    }
    let mut last = String::new();
    for replicas in [3, 1] {
        match js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                history: 1,
                num_replicas: replicas,
                storage: StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(kv) => return Ok(kv),
            // A lone server refuses three replicas; a cluster may have been faster to create it.
            Err(e) => {
                if let Ok(kv) = js.get_key_value(&bucket).await {
                    return Ok(kv);
                }
                last = e.to_string();
            }
        }
    }
    Err(format!(
        "cannot create the control bucket {bucket} ({last})"
    ))
}

/// Opens (or creates) the audit stream and ties the file to it; `None` on a bus without
/// JetStream, where the file is the only copy.
async fn attach_audit_stream(
    client: &async_nats::Client,
    prefix: &str,
    log: &AuditLog,
) -> Result<Option<AuditStream>, crate::audit::AuditError> {
    let Some(stream) = AuditStream::open(client, prefix).await? else {
        tracing::warn!(
            file = %log.path().display(),
            "the bus has no JetStream: the audit trail is kept in the local file only, where a cut tail cannot be detected"
        );
        return Ok(None);
    };
    attach(&stream, log).await?;
    Ok(Some(stream))
}

/// Ties the file to the stream as it is now (see [`AuditLog::attach`]).
async fn attach(stream: &AuditStream, log: &AuditLog) -> Result<(), crate::audit::AuditError> {
    let name = format!("stream {}", stream.name());
    let remote = crate::audit::verify_lines(log.key(), &name, stream.lines().await?)?;
    if let Some(aside) = log.attach(&remote)? {
        tracing::warn!(
            kept = %aside.display(),
            stream = stream.name(),
            "this authority's audit file parted ways with the audit stream (another authority wrote it); the file is kept aside and rebuilt from the stream"
        );
    }
    tracing::info!(
        stream = stream.name(),
        entries = remote.entries,
        "audit stream attached"
    );
    Ok(())
}

impl Authority {
    async fn serve(
        &mut self,
        mut rotation: watch::Receiver<crate::config::Rotation>,
        shutdown: &mut watch::Receiver<()>,
    ) -> Result<(), async_nats::SubscribeError> {
        let mut heartbeats = self
            .client
            .subscribe(self.subjects.heartbeat.clone())
            .await?;
        let mut commands = self
            .client
            .subscribe(rotate_subject(&self.cfg.prefix))
            .await?;
        let mut acks = self.client.subscribe(self.subjects.ack.clone()).await?;
        let prefix = self.cfg.prefix.clone();
        let mut keys_cmds = self.client.subscribe(keys_subject(&prefix)).await?;
        let mut revoke_cmds = self.client.subscribe(revoke_subject(&prefix)).await?;
        let mut rewrap_cmds = self.client.subscribe(rewrap_subject(&prefix)).await?;
        let mut syncs = self.client.subscribe(sync_subject(&prefix)).await?;
        let mut hellos = self.client.subscribe(hello_subject(&prefix)).await?;
        let mut reports = self.client.subscribe(report_subject(&prefix)).await?;
        let mut status_cmds = self.client.subscribe(status_subject(&prefix)).await?;
        self.say_hello().await;
        if self.control.is_some() {
            if self.hold_lease().await && !self.take_office(&mut heartbeats, shutdown).await {
                return Ok(());
            }
        } else {
            // No lease: listen before acting, so a running authority is heard before this one
            // writes, and every proxy (which beats at least once in two intervals) is known
            // before the first rotation counts acknowledgements. Requests wait meanwhile.
            let listen_until = tokio::time::Instant::now() + self.cfg.rotation.heartbeat_every * 2;
            loop {
                tokio::select! {
                    Some(m) = hellos.next() => self.on_hello(&m.payload),
                    Some(m) = heartbeats.next() => self.on_heartbeat(&m.payload),
                    _ = tokio::time::sleep_until(listen_until) => break,
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            self.acting_since_ms = message::now_ms();
        }
        let mut tick = tokio::time::interval(self.cfg.rotation.heartbeat_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The holder renews four times per TTL; a standby looks as often, so it takes over
        // within 1.25 TTL of the holder's last renewal.
        let lease_every = self
            .control
            .as_ref()
            .map_or(self.cfg.rotation.heartbeat_every, |c| c.ttl / 4);
        let mut lease_tick = tokio::time::interval(lease_every);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            node = %self.cfg.node,
            active_epoch = self.keyring.snapshot().active.epoch,
            standing_by = self.standing_by(),
            "key authority running"
        );
        loop {
            self.show_role();
            tokio::select! {
                Ok(()) = rotation.changed() => {
                    let new = rotation.borrow_and_update().clone();
                    self.follow_schedule(new);
                }
                Some(m) = hellos.next() => self.on_hello(&m.payload),
                Some(m) = heartbeats.next() => {
                    self.on_heartbeat(&m.payload);
                    if !self.standing_by() && self.usage_exceeded() {
                        if let Err(e) = self.rotate("usage limit reached", &mut acks).await {
                            tracing::error!(error = %e, "usage-triggered rotation failed");
                        }
                    }
                }
                Some(m) = reports.next() => self.on_report(&m.payload),
                Some(m) = status_cmds.next() => {
                    // A standing-by authority drops requests; the CLI says none answered.
                    if self.standing_by() {
                        continue;
                    }
                    let subject = status_subject(&self.cfg.prefix);
                    if let (Ok(Body::StatusRequest {}), Some(reply)) = (self.open(&subject, &m.payload), m.reply) {
                        let body = Body::StatusReply(self.status());
                        self.reply(reply, body).await;
                    }
                }
                Some(m) = syncs.next() => {
                    // A standing-by authority drops requests; they are not kept for later.
                    if self.standing_by() {
                        continue;
                    }
                    let subject = sync_subject(&self.cfg.prefix);
                    if let (Ok(Body::SyncRequest {}), Some(reply)) = (self.open(&subject, &m.payload), m.reply) {
                        let body = Body::SyncReply { epochs: self.epochs(true) };
                        self.reply(reply, body).await;
                    }
                }
                Some(m) = keys_cmds.next() => {
                    // A standing-by authority drops requests; they are not kept for later.
                    if self.standing_by() {
                        continue;
                    }
                    let subject = keys_subject(&self.cfg.prefix);
                    if let (Ok(Body::KeysRequest {}), Some(reply)) = (self.open(&subject, &m.payload), m.reply) {
                        let body = Body::KeysReply { epochs: self.epochs(false) };
                        self.reply(reply, body).await;
                    }
                }
                Some(m) = revoke_cmds.next() => {
                    if self.standing_by() {
                        self.hold_request(m).await;
                        continue;
                    }
                    self.serve_revoke(m, &mut acks).await;
                }
                Some(m) = rewrap_cmds.next() => {
                    // A standing-by authority drops requests; the CLI's timeout tells the
                    // operator, and a rewrap is safe to ask again.
                    if self.standing_by() {
                        continue;
                    }
                    self.serve_rewrap(m).await;
                }
                Some(m) = commands.next() => {
                    if self.standing_by() {
                        self.hold_request(m).await;
                        continue;
                    }
                    self.serve_rotate(m, &mut acks).await;
                }
                Some(_) = acks.next() => {} // Late acks outside a rotation carry no news.
                _ = lease_tick.tick(), if self.control.is_some() => {
                    let held = !self.standing_by();
                    if self.hold_lease().await && !held {
                        if !self.take_office(&mut heartbeats, shutdown).await {
                            return Ok(());
                        }
                        self.serve_held(&mut acks).await;
                    }
                }
                _ = tick.tick() => {
                    self.say_hello().await;
                    if self.standing_by() {
                        continue;
                    }
                    self.serve_held(&mut acks).await;
                    self.forget_departed();
                    self.enforce_retention().await;
                    self.reannounce().await;
                    if self.cfg.rotation.rotate_every.is_some_and(|every| self.activated.elapsed() >= every) {
                        if let Err(e) = self.rotate("scheduled", &mut acks).await {
                            tracing::error!(error = %e, "scheduled rotation failed");
                        }
                    }
                }
                _ = shutdown.changed() => {
                    self.release_lease().await;
                    self.metrics
                        .authority_leader
                        .get_or_create(&ScopeLabel { scope: self.cfg.scope })
                        .set(0);
                    return Ok(());
                }
            }
            if !self.unpublished.is_empty() {
                if let Err(e) = self.flush_audit().await {
                    tracing::warn!(error = %e, "audit entries wait for the audit stream");
                }
                self.publish_audit().await;
            }
        }
    }

    async fn serve_rotate(&mut self, m: async_nats::Message, acks: &mut async_nats::Subscriber) {
        let reply = m.reply.clone();
        let subject = rotate_subject(&self.cfg.prefix);
        let result = match self.open(&subject, &m.payload) {
            Ok(Body::RotateRequest { reason }) => {
                self.rotate(&format!("requested: {reason}"), acks).await
            }
            Ok(_) => Err("not a rotate request".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        if let Some(reply) = reply {
            let body = match result {
                Ok(r) => Body::RotateReply {
                    epoch: r.epoch,
                    acked: r.acked,
                    laggards: r.laggards,
                    error: None,
                },
                Err(e) => Body::RotateReply {
                    epoch: 0,
                    acked: vec![],
                    laggards: vec![],
                    error: Some(e),
                },
            };
            self.reply(reply, body).await;
        }
    }

    async fn serve_rewrap(&mut self, m: async_nats::Message) {
        let subject = rewrap_subject(&self.cfg.prefix);
        let body = match self.open(&subject, &m.payload) {
            Ok(Body::RewrapRequest {}) => match self.rewrap().await {
                Ok((rewrapped, seed)) => Body::RewrapReply {
                    rewrapped,
                    seed,
                    error: None,
                },
                Err(e) => Body::RewrapReply {
                    rewrapped: 0,
                    seed: false,
                    error: Some(e),
                },
            },
            Ok(_) => return,
            Err(e) => Body::RewrapReply {
                rewrapped: 0,
                seed: false,
                error: Some(e.to_string()),
            },
        };
        if let Some(reply) = m.reply {
            self.reply(reply, body).await;
        }
    }

    /// Wraps every data key that still opens, and the deployment seed, again under the root's
    /// newest version (after a KMS key rotation, or a migration from a file root), commits the
    /// keyring so every proxy stores the new wraps, and audits it. The keys do not change.
    async fn rewrap(&mut self) -> Result<(u32, bool), String> {
        let refuse = |this: &mut Self, reason: &'static str, why: String| {
            this.metrics
                .rotations_refused
                .get_or_create(&ReasonLabel { reason })
                .inc();
            let why = format!("rewrap refused ({reason}): {why}");
            tracing::error!(reason, "{why}");
            this.audit(Event {
                kind: EventKind::Refused,
                epoch: None,
                fingerprint: None,
                actor: this.cfg.node.clone(),
                reason: why.clone(),
            });
            why
        };
        let snap = self.keyring.snapshot();
        let mut rewrapped = 0;
        for r in self.keyring.records() {
            if r.epoch == 1 || r.state == KeyState::Destroyed {
                continue;
            }
            let key = match self.keyring.lookup(&snap, r.epoch) {
                Ok(k) => k.key.clone(),
                Err(e) => {
                    let why = format!("epoch {} cannot be read: {}", r.epoch, e.reason());
                    return Err(refuse(self, "kms_unavailable", why));
                }
            };
            let wrapped = match self.keyring.root().wrap(r.epoch, &key) {
                Ok(w) => w,
                Err(e) => return Err(refuse(self, e.reason(), e.to_string())),
            };
            if let Err(e) = self.keyring.replace_wrapped(r.epoch, &wrapped) {
                return Err(refuse(self, "persist", e.to_string()));
            }
            rewrapped += 1;
        }
        drop(snap);
        let mut seed = false;
        if let Some(kek) = self.keyring.root().kek().cloned() {
            let scope = self.keyring.root().scope().to_owned();
            let stored = crate::kek::seed::read(&self.client, &self.cfg.prefix).await;
            let (old, revision) = match stored {
                Ok(Some(x)) => x,
                Ok(None) => return Err(refuse(self, "seed", "no deployment seed".into())),
                Err(e) => return Err(refuse(self, "seed", e)),
            };
            let again = crate::kek::blocking(|| {
                let key = old.unwrap(&*kek, &scope)?;
                crate::kek::seed::WrappedSeed::wrap(&*kek, &key, old.migrated, &scope)
            });
            let again = match again {
                Ok(s) => s,
                Err(e) => {
                    let reason = if e.is_unavailable() {
                        "kms_unavailable"
                    } else {
                        "kms_error"
                    };
                    return Err(refuse(self, reason, e.to_string()));
                }
            };
            let stored =
                crate::kek::seed::store(&self.client, &self.cfg.prefix, &again, Some(revision))
                    .await;
            if let Err(e) = stored {
                return Err(refuse(self, "seed", e));
            }
            seed = true;
        }
        if let Err(e) = self.commit_keyring(Change::None).await {
            return Err(refuse(self, "commit", e));
        }
        let reason = format!(
            "{rewrapped} data keys{} wrapped again under {}",
            if seed { " and the deployment seed" } else { "" },
            self.keyring.root().describe()
        );
        self.audit(Event {
            kind: EventKind::Rewrapped,
            epoch: None,
            fingerprint: None,
            actor: self.cfg.node.clone(),
            reason: reason.clone(),
        });
        tracing::info!(rewrapped, seed, "{reason}");
        Ok((rewrapped, seed))
    }

    async fn serve_revoke(&mut self, m: async_nats::Message, acks: &mut async_nats::Subscriber) {
        let subject = revoke_subject(&self.cfg.prefix);
        let body = match self.open(&subject, &m.payload) {
            Ok(Body::RevokeRequest { epoch, reason }) => {
                match self.revoke(epoch, &reason, acks).await {
                    Ok(active) => Body::RevokeReply {
                        active,
                        error: None,
                    },
                    Err(e) => Body::RevokeReply {
                        active: 0,
                        error: Some(e),
                    },
                }
            }
            Ok(_) => Body::RevokeReply {
                active: 0,
                error: Some("not a revoke request".into()),
            },
            Err(e) => Body::RevokeReply {
                active: 0,
                error: Some(e.to_string()),
            },
        };
        if let Some(reply) = m.reply {
            self.reply(reply, body).await;
        }
    }

    /// Keeps an operator's request that arrived while standing by, with the lease revision
    /// current when it arrived. A request sent just after the holder died would otherwise go
    /// unanswered: the standby serves it on taking office if the holder never renewed after
    /// it arrived. A holder that renewed later was alive, and answered it.
    async fn hold_request(&mut self, m: async_nats::Message) {
        if m.reply.is_none() {
            return;
        }
        let revision = match &self.control {
            Some(c) => {
                c.kv.entry(LEADER_KEY)
                    .await
                    .ok()
                    .flatten()
                    .map(|e| e.revision)
            }
            None => None,
        };
        while self.held_requests.len() >= MAX_HELD_REQUESTS {
            self.held_requests.pop_front();
        }
        self.held_requests.push_back(HeldRequest {
            at: Instant::now(),
            revision,
            msg: m,
        });
    }

    /// Serves the requests held while standing by that the last holder cannot have answered,
    /// oldest first.
    async fn serve_held(&mut self, acks: &mut async_nats::Subscriber) {
        let rotate = rotate_subject(&self.cfg.prefix);
        let heard = self.standing_by_for.as_ref().map(|(_, at)| *at);
        while let Some(held) = self.held_requests.pop_front() {
            let unanswered = match (&self.control, self.taken_over) {
                // The lease moved on from the revision the request saw only by this takeover.
                (Some(_), Some(taken)) => held.revision.is_none_or(|r| r == taken),
                // Absent when taken: no holder ever answered.
                (Some(_), None) => held.revision.is_none(),
                (None, _) => heard.is_none_or(|h| held.at > h),
            };
            if held.at.elapsed() > HOLD_REQUESTS_FOR || !unanswered {
                continue;
            }
            if held.msg.subject.as_str() == rotate {
                self.serve_rotate(held.msg, acks).await;
            } else {
                self.serve_revoke(held.msg, acks).await;
            }
        }
    }

    async fn reply(&mut self, reply: async_nats::Subject, body: Body) {
        if let Ok(sealed) = self.sealer.seal(reply.as_str(), body) {
            let _ = self.client.publish(reply, sealed.into()).await;
        }
    }

    async fn say_hello(&mut self) {
        let body = Body::AuthorityHello {
            active: self.keyring.snapshot().active.epoch,
            since_ms: self.since_ms,
        };
        let subject = hello_subject(&self.cfg.prefix);
        if let Ok(sealed) = self.sealer.seal(&subject, body) {
            let _ = self.client.publish(subject, sealed.into()).await;
        }
    }

    /// Renews the lease, or takes it where it is free, released, or its holder has not renewed
    /// it for the lease's TTL; returns whether this authority holds it.
    async fn hold_lease(&mut self) -> bool {
        use async_nats::jetstream::kv::Operation;
        let node = self.cfg.node.clone();
        let Some(c) = &mut self.control else {
            return true;
        };
        if let Some((rev, _)) = c.held {
            let sent = Instant::now();
            match c.kv.update(LEADER_KEY, node.clone().into(), rev).await {
                Ok(r) => {
                    c.held = Some((r, sent));
                    return true;
                }
                Err(e) => {
                    c.held = None;
                    tracing::warn!(error = %e, "lost the key authority lease");
                }
            }
        }
        let sent = Instant::now();
        let mut holder = None;
        let mut taken_from = None;
        let taken = match c.kv.entry(LEADER_KEY).await {
            Ok(None) => c.kv.create(LEADER_KEY, node.clone().into()).await.ok(),
            // Released, or this authority's own write whose answer was lost.
            Ok(Some(e)) if e.operation != Operation::Put || e.value == node.as_bytes() => {
                taken_from = Some(e.revision);
                c.kv.update(LEADER_KEY, node.clone().into(), e.revision)
                    .await
                    .ok()
            }
            Ok(Some(e)) => {
                holder = Some(String::from_utf8_lossy(&e.value).into_owned());
                match c.seen {
                    Some((rev, since)) if rev == e.revision && since.elapsed() >= c.ttl => {
                        taken_from = Some(e.revision);
                        c.kv.update(LEADER_KEY, node.clone().into(), e.revision)
                            .await
                            .ok()
                    }
                    Some((rev, _)) if rev == e.revision => None,
                    _ => {
                        c.seen = Some((e.revision, Instant::now()));
                        None
                    }
                }
            }
            Err(_) => None,
        };
        if let Some(r) = taken {
            c.held = Some((r, sent));
            c.seen = None;
            self.taken_over = taken_from;
            c.told = false;
            match holder {
                Some(h) => {
                    tracing::warn!(silent = %h, "took the key authority lease over from a holder that stopped renewing it")
                }
                None => tracing::info!("holding the key authority lease"),
            }
            return true;
        }
        if !c.told {
            c.told = true;
            let holder = holder.unwrap_or_else(|| "another authority".to_owned());
            tracing::warn!(holder = %holder, "another key authority holds the lease; standing by");
            self.audit(Event {
                kind: EventKind::Refused,
                epoch: None,
                fingerprint: None,
                actor: self.cfg.node.clone(),
                reason: format!("standing by: authority {holder} holds the lease"),
            });
        }
        false
    }

    /// Taking the role, at start or from a holder that went away: first the keyring as the
    /// bucket holds it, so no epoch the last holder committed is lost or generated again; then
    /// a roll call, so the first rotation waits for every live proxy and for none that left
    /// with the last holder. Returns false on shutdown.
    async fn take_office(
        &mut self,
        heartbeats: &mut async_nats::Subscriber,
        shutdown: &mut watch::Receiver<()>,
    ) -> bool {
        if let Err(e) = self.adopt_committed().await {
            // Acting on a keyring older than the bucket's could generate an epoch twice.
            tracing::warn!(error = %e, "cannot read the committed keyring; not acting yet");
            if let Some(c) = &mut self.control {
                c.held = None;
                c.told = false;
            }
            return true;
        }
        self.proxies.clear();
        self.announce(Body::RollCall {}).await;
        let until =
            tokio::time::Instant::now() + self.cfg.rotation.heartbeat_every.min(ROLL_CALL_WINDOW);
        loop {
            tokio::select! {
                Some(m) = heartbeats.next() => self.on_heartbeat(&m.payload),
                _ = tokio::time::sleep_until(until) => break,
                _ = shutdown.changed() => return false,
            }
        }
        if let Err(e) = self.commit_keyring(Change::None).await {
            tracing::warn!(error = %e, "cannot write the keyring bucket");
        }
        self.acting_since_ms = message::now_ms();
        self.reannounce().await;
        tracing::info!(
            live_proxies = self.live().len(),
            active_epoch = self.keyring.snapshot().active.epoch,
            "key authority acting"
        );
        true
    }

    /// Brings this authority's keyring in line with the one committed to the bucket.
    async fn adopt_committed(&mut self) -> Result<(), String> {
        use async_nats::jetstream::kv::Operation;
        let Some(c) = &self.control else {
            return Ok(());
        };
        let entry =
            c.kv.entry(KEYRING_KEY)
                .await
                .map_err(|e| format!("the keyring bucket did not answer ({e})"))?;
        let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
            return Ok(());
        };
        let subject = keyring_subject(&self.cfg.prefix);
        let msg = message::open(
            &mut Opener::new(),
            &self.control_key,
            &subject,
            &entry.value,
        )
        .map_err(|e| format!("the committed keyring was refused ({e})"))?;
        let Body::SyncReply { epochs } = msg.body else {
            return Err("the keyring bucket holds something else".to_owned());
        };
        super::member::Member::new(self.keyring.clone(), &self.cfg.prefix)
            .apply_sync(&epochs)
            .map_err(|e| format!("the committed keyring cannot be applied ({e})"))
    }

    /// Gives the lease back on a clean stop, so a restarted or standby authority takes it at
    /// once instead of after it lapses. Only the revision this authority wrote is deleted.
    async fn release_lease(&mut self) {
        if let Some(ControlBucket {
            kv,
            held: Some((rev, _)),
            ..
        }) = &mut self.control
        {
            if kv
                .delete_expect_revision(LEADER_KEY, Some(*rev))
                .await
                .is_ok()
            {
                tracing::info!("gave the key authority lease back");
            }
        }
    }

    /// Another authority that started earlier (ties: the smaller node id) keeps the role.
    /// Only where there is no lease.
    fn on_hello(&mut self, payload: &[u8]) {
        let subject = hello_subject(&self.cfg.prefix);
        let Ok(msg) = self.open_msg(&subject, payload) else {
            return;
        };
        let Body::AuthorityHello { since_ms, .. } = msg.body else {
            return;
        };
        if msg.from == self.cfg.node {
            return;
        }
        if self.others.len() < MAX_PROXIES || self.others.contains_key(&msg.from) {
            self.others.insert(msg.from.clone(), Instant::now());
        }
        if self.control.is_some() {
            return;
        }
        let theirs_first = (since_ms, msg.from.as_str()) < (self.since_ms, self.cfg.node.as_str());
        if theirs_first {
            if self.standing_by_for.is_none() {
                tracing::warn!(other = %msg.from, "another key authority is running; standing by");
                self.audit(Event {
                    kind: EventKind::Refused,
                    epoch: None,
                    fingerprint: None,
                    actor: self.cfg.node.clone(),
                    reason: format!("standing by: authority {} holds the role", msg.from),
                });
            }
            self.standing_by_for = Some((msg.from, Instant::now()));
        }
    }

    /// Standing by while another authority holds the lease or, with no lease, while the
    /// authority holding the role has been heard recently.
    fn standing_by(&self) -> bool {
        if let Some(c) = &self.control {
            return c.held.is_none();
        }
        let horizon = self.cfg.rotation.heartbeat_every * LIVE_INTERVALS;
        self.standing_by_for
            .as_ref()
            .is_some_and(|(_, seen)| seen.elapsed() <= horizon)
    }

    /// A reloaded config's schedule and limits; the intervals it runs on stay (they take a
    /// restart, and a reload that changes them is refused before it gets here).
    fn follow_schedule(&mut self, new: crate::config::Rotation) {
        let r = &mut self.cfg.rotation;
        r.rotate_every = new.rotate_every;
        r.max_messages_per_epoch = new.max_messages_per_epoch;
        r.max_bytes_per_epoch = new.max_bytes_per_epoch;
        r.stage_timeout = new.stage_timeout;
        r.retain_retired = new.retain_retired;
        tracing::info!(
            rotate_every = ?r.rotate_every,
            max_messages_per_epoch = ?r.max_messages_per_epoch,
            max_bytes_per_epoch = ?r.max_bytes_per_epoch,
            "key authority follows the reloaded rotation settings"
        );
    }

    /// `cipherbus_authority_leader{scope}`: whether this authority acts now.
    fn show_role(&self) {
        self.metrics
            .authority_leader
            .get_or_create(&ScopeLabel {
                scope: self.cfg.scope,
            })
            .set(i64::from(!self.standing_by()));
    }

    /// The keyring as the authority describes it; with `wrapped`, for proxies to install.
    fn epochs(&self, wrapped: bool) -> Vec<message::EpochInfo> {
        self.epochs_with(wrapped, &Change::None)
    }

    /// The keyring as it will be once `change` is made.
    fn epochs_with(&self, wrapped: bool, change: &Change<'_>) -> Vec<message::EpochInfo> {
        let snap = self.keyring.snapshot();
        let active_usage: u64 = self
            .proxies
            .values()
            .filter(|p| p.active == snap.active.epoch)
            .map(|p| p.sealed_messages)
            .sum();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let wrap = |epoch: u32, key: &DataKey| {
            self.keyring
                .wrapped(epoch, key)
                .ok()
                .map(|w| base64::engine::general_purpose::STANDARD.encode(w))
        };
        let mut epochs: Vec<message::EpochInfo> = self
            .keyring
            .records()
            .into_iter()
            .map(|r| {
                // Wrapped once and kept: a commit never calls the root, nor reads a retired
                // key back from disk, for a key it already wrapped.
                let wrapped = (wrapped && r.state != KeyState::Destroyed)
                    .then(|| match self.keyring.wrapped_cached(r.epoch) {
                        Some(w) => Some(base64::engine::general_purpose::STANDARD.encode(w)),
                        None => self
                            .keyring
                            .lookup(&snap, r.epoch)
                            .ok()
                            .and_then(|k| wrap(r.epoch, &k.key)),
                    })
                    .flatten();
                message::EpochInfo {
                    epoch: r.epoch,
                    state: r.state,
                    sealed_messages: match r.state {
                        KeyState::Active => Some(active_usage),
                        _ => self.retired_usage.get(&r.epoch).copied(),
                    },
                    fingerprint: r.fingerprint,
                    created: r.created,
                    activated: r.activated,
                    wrapped,
                }
            })
            .collect();
        match change {
            Change::None => {}
            Change::Stage(epoch, key, wrapped_key) => epochs.push(message::EpochInfo {
                epoch: *epoch,
                state: KeyState::Staged,
                sealed_messages: None,
                fingerprint: key.fingerprint(),
                created: now,
                activated: None,
                wrapped: wrapped
                    .then(|| base64::engine::general_purpose::STANDARD.encode(wrapped_key)),
            }),
            Change::Activate(epoch) => {
                for e in &mut epochs {
                    if e.state == KeyState::Active {
                        e.state = KeyState::Retired;
                    } else if e.epoch == *epoch {
                        e.state = KeyState::Active;
                        e.activated = Some(now);
                        e.sealed_messages = Some(0);
                    }
                }
            }
            Change::Destroy(epoch) => {
                for e in epochs.iter_mut().filter(|e| e.epoch == *epoch) {
                    e.state = KeyState::Destroyed;
                    e.wrapped = None;
                }
            }
        }
        epochs
    }

    /// Destroys an epoch everywhere; the active one is first replaced by a new epoch.
    async fn revoke(
        &mut self,
        epoch: u32,
        reason: &str,
        acks: &mut async_nats::Subscriber,
    ) -> Result<u32, String> {
        let state = self.keyring.snapshot().state(epoch);
        match state {
            None => return Err(format!("epoch {epoch} is unknown")),
            Some(KeyState::Destroyed) => return Ok(self.keyring.snapshot().active.epoch),
            Some(KeyState::Active) => {
                self.rotate(&format!("epoch {epoch} revoked: {reason}"), acks)
                    .await?;
            }
            Some(_) => {}
        }
        let revoked = self.event(EventKind::Revoked, epoch, None, reason);
        if let Err(e) = self.audit_now(revoked).await {
            return Err(self.refuse_unaudited("revocation", &e));
        }
        self.destroy(epoch, &format!("revoked: {reason}")).await?;
        Ok(self.keyring.snapshot().active.epoch)
    }

    async fn destroy(&mut self, epoch: u32, reason: &str) -> Result<(), String> {
        let destroyed = self.event(EventKind::Destroyed, epoch, None, reason);
        if let Err(e) = self.audit_now(destroyed).await {
            return Err(self.refuse_unaudited("destruction", &e));
        }
        if let Err(e) = self.commit_keyring(Change::Destroy(epoch)).await {
            let why = format!("recorded as destroyed, but not destroyed: {e}");
            self.audit(self.event(EventKind::Refused, epoch, None, &why));
            return Err(why);
        }
        if let Err(e) = self.keyring.destroy(epoch) {
            let why = format!("recorded as destroyed, but not destroyed: {e}");
            self.audit(self.event(EventKind::Refused, epoch, None, &why));
            return Err(why);
        }
        self.retired_usage.remove(&epoch);
        self.announce(Body::Destroy {
            epoch,
            reason: reason.to_owned(),
        })
        .await;
        tracing::warn!(epoch, reason, "destroyed a data key");
        Ok(())
    }

    /// Destroys retired epochs whose retention has run out. An epoch retires when the next
    /// one is activated.
    async fn enforce_retention(&mut self) {
        let Some(retain) = self.cfg.rotation.retain_retired else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let records = self.keyring.records();
        let expired: Vec<u32> = records
            .iter()
            .filter(|r| r.state == KeyState::Retired)
            .filter(|r| {
                let retired_at = records
                    .iter()
                    .filter(|n| n.epoch > r.epoch)
                    .filter_map(|n| n.activated)
                    .min();
                retired_at.is_some_and(|t| now.saturating_sub(t) >= retain.as_secs())
            })
            .map(|r| r.epoch)
            .collect();
        for epoch in expired {
            if let Err(e) = self.destroy(epoch, "retention ended").await {
                tracing::error!(epoch, error = %e, "cannot destroy an expired epoch");
            }
        }
    }

    fn open(&mut self, subject: &str, payload: &[u8]) -> Result<Body, ControlError> {
        self.open_msg(subject, payload).map(|m| m.body)
    }

    /// Opens and replay-checks a control message; refusals are counted and audited.
    fn open_msg(
        &mut self,
        subject: &str,
        payload: &[u8],
    ) -> Result<message::ControlMessage, ControlError> {
        let msg =
            message::open(&mut self.opener, &self.control_key, subject, payload).and_then(|m| {
                // Subjects are this authority's own few, so the map stays small.
                let guard = match self.guards.get_mut(subject) {
                    Some(g) => g,
                    None => self.guards.entry(subject.to_owned()).or_default(),
                };
                guard.check(&m).map(|()| m)
            });
        match msg {
            Ok(m) => Ok(m),
            Err(e) => {
                self.metrics.control_refused(e.reason());
                self.audit(Event {
                    kind: EventKind::Refused,
                    epoch: None,
                    fingerprint: None,
                    actor: self.cfg.node.clone(),
                    reason: format!("control message on {subject}: {e}"),
                });
                Err(e)
            }
        }
    }

    fn on_heartbeat(&mut self, payload: &[u8]) {
        let subject = self.subjects.heartbeat.clone();
        let Ok(msg) = self.open_msg(&subject, payload) else {
            return;
        };
        let Body::Heartbeat {
            active,
            sealed_messages,
            sealed_bytes,
        } = msg.body
        else {
            return;
        };
        let Some(p) = self.proxy(msg.from, active) else {
            return;
        };
        let secs = p.beat_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
        p.rate = if p.active == active && secs > 0.0 && sealed_messages >= p.sealed_messages {
            (
                sealed_messages.saturating_sub(p.sealed_messages) as f64 / secs,
                sealed_bytes.saturating_sub(p.sealed_bytes) as f64 / secs,
            )
        } else {
            (0.0, 0.0)
        };
        p.last_seen = Instant::now();
        p.beat_at = Some(p.last_seen);
        p.active = active;
        p.sealed_messages = sealed_messages;
        p.sealed_bytes = sealed_bytes;
    }

    /// The entry of proxy `node`, new ones joining as sealing with `active`; `None` for a new
    /// one past [`MAX_PROXIES`].
    fn proxy(&mut self, node: String, active: u32) -> Option<&mut Proxy> {
        if self.proxies.len() >= MAX_PROXIES && !self.proxies.contains_key(&node) {
            return None;
        }
        Some(
            self.proxies
                .entry(node)
                .or_insert_with(|| Proxy::new(active)),
        )
    }

    /// Keeps a proxy's report; one not yet heard in a heartbeat joins the proxies, as a beat.
    fn on_report(&mut self, payload: &[u8]) {
        let subject = self.subjects.report.clone();
        let Ok(msg) = self.open_msg(&subject, payload) else {
            return;
        };
        let Body::Report(report) = msg.body else {
            return;
        };
        let Some(p) = self.proxy(msg.from, report.active) else {
            return;
        };
        p.last_seen = Instant::now();
        p.previous = p.report.replace((Instant::now(), report));
    }

    /// Forgets proxies long silent, except those whose usage still counts for the active epoch.
    fn forget_departed(&mut self) {
        let active = self.keyring.snapshot().active.epoch;
        self.proxies
            .retain(|_, p| p.active == active || p.last_seen.elapsed() < FORGET_AFTER);
        self.others.retain(|_, at| at.elapsed() < FORGET_AFTER);
    }

    /// The fleet as this authority sees it, for `cipherbus status`.
    fn status(&self) -> message::Status {
        let snap = self.keyring.snapshot();
        let active = snap.active.epoch;
        drop(snap);
        let horizon = self.cfg.rotation.heartbeat_every * LIVE_INTERVALS;
        let mut proxies: Vec<message::ProxyStatus> = self
            .proxies
            .iter()
            .map(|(node, p)| {
                let silent = p.last_seen.elapsed() > horizon;
                let (report, interval) = match (&p.report, &p.previous) {
                    (Some((at, r)), Some((before, b))) => {
                        (Some(r), Some((at.duration_since(*before), b)))
                    }
                    (Some((_, r)), None) => (Some(r), None),
                    _ => (None, None),
                };
                let mut row = message::ProxyStatus {
                    node: node.clone(),
                    host: String::new(),
                    version: String::new(),
                    active: p.active,
                    last_seen_ms: p.last_seen.elapsed().as_millis() as u64,
                    silent,
                    lagging: silent || p.active != active,
                    connections: 0,
                    sealed_messages: 0,
                    opened_messages: 0,
                    refused: Default::default(),
                    interval_ms: 0,
                    sealed_in_interval: 0,
                    opened_in_interval: 0,
                    refused_in_interval: Default::default(),
                };
                if let Some(r) = report {
                    row.host.clone_from(&r.host);
                    row.version.clone_from(&r.version);
                    row.connections = r.connections;
                    row.sealed_messages = r.sealed_messages;
                    row.opened_messages = r.opened_messages;
                    row.refused.clone_from(&r.refused);
                    if let Some((span, b)) = interval {
                        row.interval_ms = span.as_millis() as u64;
                        row.sealed_in_interval =
                            r.sealed_messages.saturating_sub(b.sealed_messages);
                        row.opened_in_interval =
                            r.opened_messages.saturating_sub(b.opened_messages);
                        row.refused_in_interval = r
                            .refused
                            .iter()
                            .map(|(k, n)| {
                                (
                                    k.clone(),
                                    n.saturating_sub(b.refused.get(k).copied().unwrap_or(0)),
                                )
                            })
                            .filter(|(_, n)| *n > 0)
                            .collect();
                    }
                }
                row
            })
            .collect();
        proxies.sort_by(|a, b| a.node.cmp(&b.node));
        let mut standby: Vec<String> = self
            .others
            .iter()
            .filter(|(_, at)| at.elapsed() <= horizon)
            .map(|(n, _)| n.clone())
            .collect();
        standby.sort();
        message::Status {
            authority: self.cfg.node.clone(),
            host: crate::server::host_name(),
            acting_since_ms: self.acting_since_ms,
            standby,
            active,
            activated: self
                .keyring
                .records()
                .into_iter()
                .find(|r| r.epoch == active)
                .and_then(|r| r.activated),
            schedule: self.schedule(active),
            proxies,
        }
    }

    /// When the next rotation comes, and why: the time schedule, or a usage limit reached at
    /// the rate the proxies now seal.
    fn schedule(&self, active: u32) -> message::Schedule {
        let r = &self.cfg.rotation;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let current = self.proxies.values().filter(|p| p.active == active);
        let (msgs, bytes, rate_m, rate_b) = current.fold((0u64, 0u64, 0f64, 0f64), |a, p| {
            (
                a.0 + p.sealed_messages,
                a.1 + p.sealed_bytes,
                a.2 + p.rate.0,
                a.3 + p.rate.1,
            )
        });
        let by_time = r
            .rotate_every
            .map(|every| (now + every.saturating_sub(self.activated.elapsed())).as_secs());
        let eta = |used: u64, max: Option<u64>, rate: f64| {
            let max = max?;
            let left = max.saturating_sub(used) as f64;
            (rate > 0.0).then(|| now.as_secs() + (left / rate).ceil() as u64)
        };
        let by_usage = [
            eta(msgs, r.max_messages_per_epoch, rate_m),
            eta(bytes, r.max_bytes_per_epoch, rate_b),
        ]
        .into_iter()
        .flatten()
        .min();
        let (next, why) = match (by_time, by_usage) {
            (Some(t), Some(u)) if u < t => (Some(u), Some("usage")),
            (Some(t), _) => (Some(t), Some("time")),
            (None, Some(u)) => (Some(u), Some("usage")),
            (None, None) => (None, None),
        };
        message::Schedule {
            next,
            why: why.map(str::to_owned),
            rotate_every_s: r.rotate_every.map(|d| d.as_secs()),
            sealed_messages: msgs,
            sealed_bytes: bytes,
            max_messages: r.max_messages_per_epoch,
            max_bytes: r.max_bytes_per_epoch,
        }
    }

    fn live(&self) -> Vec<String> {
        let horizon = self.cfg.rotation.heartbeat_every * LIVE_INTERVALS;
        let mut live: Vec<String> = self
            .proxies
            .iter()
            .filter(|(_, p)| p.last_seen.elapsed() <= horizon)
            .map(|(n, _)| n.clone())
            .collect();
        live.sort();
        live
    }

    /// Whether the messages or bytes sealed under the active epoch, summed over the proxies'
    /// latest heartbeats, reached a configured limit.
    fn usage_exceeded(&self) -> bool {
        let active = self.keyring.snapshot().active.epoch;
        let (msgs, bytes) = self
            .proxies
            .values()
            .filter(|p| p.active == active)
            .fold((0u64, 0u64), |(m, b), p| {
                (m + p.sealed_messages, b + p.sealed_bytes)
            });
        self.cfg
            .rotation
            .max_messages_per_epoch
            .is_some_and(|max| msgs >= max)
            || self
                .cfg
                .rotation
                .max_bytes_per_epoch
                .is_some_and(|max| bytes >= max)
    }

    /// Writes an event to the file; the stream gets it at the next flush. For events that
    /// are only reported (refusals, laggards); key events go through [`Authority::audit_now`].
    fn audit(&mut self, event: Event) {
        if let Err(e) = self.append_audit(event) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    fn append_audit(&mut self, event: Event) -> Result<(), String> {
        let Some(log) = &self.audit else {
            return Ok(());
        };
        match log.append(event) {
            Ok(entry) => {
                self.unpublished.push(entry);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .audit_failures
                    .get_or_create(&ReasonLabel { reason: "file" })
                    .inc();
                Err(e.to_string())
            }
        }
    }

    /// Writes a key event to the file and the stream, and returns only once both hold it: a
    /// key event that cannot be audited does not happen.
    async fn audit_now(&mut self, event: Event) -> Result<(), String> {
        // Tied first, so the entry follows the stream's chain.
        self.ensure_attached().await?;
        self.append_audit(event)?;
        self.flush_audit().await
    }

    /// Ties the file to the stream again after standing by or after a failed append, when
    /// another authority may have written it meanwhile.
    async fn ensure_attached(&mut self) -> Result<(), String> {
        let (Some(log), Some(stream)) = (&self.audit, &self.audit_stream) else {
            return Ok(());
        };
        if self.audit_attached || self.standing_by() {
            return Ok(());
        }
        if let Err(e) = attach(stream, log).await {
            self.metrics
                .audit_failures
                .get_or_create(&ReasonLabel { reason: "stream" })
                .inc();
            return Err(e.to_string());
        }
        self.audit_attached = true;
        Ok(())
    }

    /// Sends the stream every entry the file holds that it has not confirmed, oldest first.
    /// Only the authority holding the role writes the stream; one that stood by ties its file
    /// to the stream again first.
    async fn flush_audit(&mut self) -> Result<(), String> {
        let (Some(log), Some(_)) = (&self.audit, &self.audit_stream) else {
            return Ok(());
        };
        if self.standing_by() {
            if self.audit_attached {
                log.detach();
                self.audit_attached = false;
            }
            return Ok(());
        }
        self.ensure_attached().await?;
        let (Some(log), Some(stream)) = (&self.audit, &self.audit_stream) else {
            return Ok(());
        };
        while let Some((seq, line)) = log.next_pending() {
            if let Err(e) = stream.append(seq, &line).await {
                self.metrics
                    .audit_failures
                    .get_or_create(&ReasonLabel { reason: "stream" })
                    .inc();
                // Read the stream again before the next attempt: another authority may have
                // written the entry this one tried to.
                self.audit_attached = false;
                return Err(e.to_string());
            }
            log.confirmed(seq);
        }
        Ok(())
    }

    /// Commits the keyring with `change` applied, sealed, to the bucket proxies follow. The
    /// server stores it only while this authority's lease revision is still the last one, so
    /// the write fails once another authority took the lease. Every change is committed here
    /// before it is made locally or announced: whatever a proxy is ever told, the bucket held
    /// first, under the lease.
    async fn commit_keyring(&mut self, change: Change<'_>) -> Result<(), String> {
        use async_nats::jetstream::context::PublishErrorKind;
        let epochs = self.epochs_with(true, &change);
        let Some(c) = &self.control else {
            return Ok(());
        };
        let Some((lease, _)) = c.held else {
            return Err("this authority does not hold the lease".to_owned());
        };
        let subject = keyring_subject(&self.cfg.prefix);
        let sealed = self
            .sealer
            .seal(&subject, Body::SyncReply { epochs })
            .map_err(|e| format!("cannot seal the keyring ({e})"))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            lease.to_string().as_str(),
        );
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            format!("{}{LEADER_KEY}", c.kv.prefix).as_str(),
        );
        let stored = match c
            .js
            .publish_with_headers(c.subject(KEYRING_KEY), headers, sealed.into())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                if let Some(c) = &mut self.control {
                    c.held = None;
                    c.told = false;
                }
                tracing::warn!(
                    "another key authority took the lease; this one's keyring write was refused"
                );
                Err("another key authority took the lease".to_owned())
            }
            Err(e) => Err(format!("the keyring bucket did not store it ({e})")),
        }
    }

    /// A key event refused because it could not be audited: counted, logged, and the
    /// sentence the operator gets.
    fn refuse_unaudited(&self, what: &str, why: &str) -> String {
        self.metrics
            .rotations_refused
            .get_or_create(&ReasonLabel { reason: "audit" })
            .inc();
        let sentence = format!("{what} refused: the audit trail cannot record it ({why})");
        tracing::error!(reason = "audit", "{sentence}");
        sentence
    }

    /// Publishes audit entries, sealed, on `<prefix>.audit` for collectors.
    async fn publish_audit(&mut self) {
        let subject = audit_subject(&self.cfg.prefix);
        for entry in std::mem::take(&mut self.unpublished) {
            let Ok(json) = serde_json::to_string(&entry) else {
                continue;
            };
            if let Ok(sealed) = self.sealer.seal(&subject, Body::AuditEvent { entry: json }) {
                let _ = self.client.publish(subject.clone(), sealed.into()).await;
            }
        }
    }

    fn event(
        &self,
        kind: EventKind,
        epoch: u32,
        fingerprint: Option<String>,
        reason: &str,
    ) -> Event {
        Event {
            kind,
            epoch: Some(epoch),
            fingerprint,
            actor: self.cfg.node.clone(),
            reason: reason.to_owned(),
        }
    }

    async fn announce(&mut self, body: Body) {
        match self.sealer.seal(&self.subjects.announce, body) {
            Ok(sealed) => {
                let _ = self
                    .client
                    .publish(self.subjects.announce.clone(), sealed.into())
                    .await;
            }
            Err(e) => tracing::error!(error = %e, "cannot seal an announcement"),
        }
    }

    fn stage_body(&self, epoch: u32) -> Option<Body> {
        let snap = self.keyring.snapshot();
        let key = self.keyring.lookup(&snap, epoch).ok()?;
        let wrapped = self.keyring.wrapped(epoch, &key.key).ok()?;
        Some(Body::Stage {
            epoch,
            wrapped: base64::engine::general_purpose::STANDARD.encode(wrapped),
            fingerprint: key.key.fingerprint(),
        })
    }

    /// Announces the staged and active epochs again, for proxies that missed them.
    async fn reannounce(&mut self) {
        let snap = self.keyring.snapshot();
        let epochs: Vec<(u32, KeyState)> = snap
            .epochs()
            .filter(|(_, s)| matches!(s, KeyState::Staged | KeyState::Active))
            .collect();
        let destroyed: Vec<u32> = snap
            .epochs()
            .filter(|(_, s)| *s == KeyState::Destroyed)
            .map(|(e, _)| e)
            .collect();
        let active = snap.active.epoch;
        drop(snap);
        for epoch in destroyed.iter().rev().take(REANNOUNCE_DESTROYED) {
            self.announce(Body::Destroy {
                epoch: *epoch,
                reason: "destroyed".into(),
            })
            .await;
        }
        for (epoch, _) in epochs {
            if epoch == 1 {
                continue; // Derived from the root key: every proxy has it.
            }
            if let Some(stage) = self.stage_body(epoch) {
                self.announce(stage).await;
            }
        }
        self.announce(Body::Activate { epoch: active }).await;
    }

    /// Stages a new epoch, waits for the live proxies, activates it.
    async fn rotate(
        &mut self,
        reason: &str,
        acks: &mut async_nats::Subscriber,
    ) -> Result<Rotated, String> {
        // The stream as it is now first: with it, the epoch number below is above every one
        // another authority generated, and the `generated` entry lands only if no other
        // entry landed since (the server checks the last sequence), so no epoch number is
        // ever generated twice.
        if let Err(e) = self.ensure_attached().await {
            return Err(self.refuse_unaudited("rotation", &e));
        }
        let recorded = self.audit.as_ref().map_or(0, |log| log.max_generated());
        let epoch = self
            .keyring
            .records()
            .iter()
            .map(|r| r.epoch)
            .max()
            .unwrap_or(1)
            .max(recorded)
            .checked_add(1)
            .ok_or("no epochs left")?;
        let key = DataKey::generate().map_err(|e| e.to_string())?;
        let fingerprint = key.fingerprint();
        // Wrapped first: a root that cannot wrap refuses the rotation before any epoch is
        // spent, and the active key goes on sealing.
        let wrapped = match self.keyring.root().wrap(epoch, &key) {
            Ok(w) => w,
            Err(e) => {
                let reason = e.reason();
                self.metrics
                    .rotations_refused
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                let why =
                    format!("rotation refused ({reason}): the root cannot wrap a new key: {e}");
                tracing::error!(reason, "{why}");
                self.audit(self.event(EventKind::Refused, epoch, None, &why));
                return Err(why);
            }
        };
        let generated = self.event(
            EventKind::Generated,
            epoch,
            Some(fingerprint.clone()),
            reason,
        );
        if let Err(e) = self.audit_now(generated).await {
            return Err(self.refuse_unaudited("rotation", &e));
        }
        // Recorded before it happens, like every key event.
        let staged = self.event(EventKind::Staged, epoch, Some(fingerprint.clone()), reason);
        if let Err(e) = self.audit_now(staged).await {
            return Err(self.refuse_unaudited("rotation", &e));
        }
        // On this disk before the commit makes the epoch known: the bucket's followers stage
        // what is committed, so a key this authority could not persist is never committed.
        if let Err(e) = self.keyring.prepare_wrapped(epoch, &wrapped) {
            let why = format!("not staged, so not announced: {e}");
            self.audit(self.event(EventKind::Refused, epoch, Some(fingerprint), &why));
            return Err(why);
        }
        // Committed under the lease before anyone is told: a deposed authority stops here, and
        // no epoch can be committed with two keys.
        if let Err(e) = self
            .commit_keyring(Change::Stage(epoch, &key, &wrapped))
            .await
        {
            self.keyring.discard_prepared(epoch);
            let why = format!("not staged, so not announced: {e}");
            self.audit(self.event(EventKind::Refused, epoch, Some(fingerprint), &why));
            return Err(why);
        }
        // Persisted before anyone is told, so the authority never announces a key it could lose.
        // This process's own proxy may have applied the commit already, from the bucket.
        if let Err(e) = self.keyring.stage_wrapped(epoch, key, &wrapped) {
            if self.keyring.snapshot().state(epoch) != Some(KeyState::Staged) {
                let why = format!("not staged, so not announced: {e}");
                self.audit(self.event(EventKind::Refused, epoch, Some(fingerprint), &why));
                return Err(why);
            }
        }
        let stage = self
            .stage_body(epoch)
            .ok_or("the staged key cannot be wrapped")?;

        let expected = self.live();
        let mut acked: Vec<String> = Vec::new();
        let deadline = Instant::now() + self.cfg.rotation.stage_timeout;
        'stage: while expected.iter().any(|n| !acked.contains(n)) && Instant::now() < deadline {
            // Renewed while waiting, so a long wait does not let the lease lapse; lost to
            // another authority, the rotation stops short of activating.
            if !self.hold_lease().await {
                return Err(format!(
                    "lost the key authority lease while staging epoch {epoch}; not activated"
                ));
            }
            self.announce(stage.clone()).await;
            let until = tokio::time::Instant::now() + RESTAGE_EVERY;
            loop {
                let m = match tokio::time::timeout_at(until, acks.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break 'stage,
                    Err(_) => break,
                };
                let subject = self.subjects.ack.clone();
                if let Ok(msg) = self.open_msg(&subject, &m.payload) {
                    if msg.body == (Body::Ack { epoch }) && !acked.contains(&msg.from) {
                        acked.push(msg.from);
                    }
                }
                if expected.iter().all(|n| acked.contains(n)) {
                    break 'stage;
                }
            }
        }
        let laggards: Vec<String> = expected
            .iter()
            .filter(|n| !acked.contains(n))
            .cloned()
            .collect();
        for node in &laggards {
            self.audit(self.event(
                EventKind::Laggard,
                epoch,
                Some(fingerprint.clone()),
                &format!("{node} did not acknowledge within the stage timeout"),
            ));
        }

        let old = self.keyring.snapshot().active.epoch;
        let old_usage: u64 = self
            .proxies
            .values()
            .filter(|p| p.active == old)
            .map(|p| p.sealed_messages)
            .sum();
        if !self.hold_lease().await {
            return Err(format!(
                "lost the key authority lease while staging epoch {epoch}; not activated"
            ));
        }
        // Recorded before it happens, so an activation the trail cannot hold does not happen.
        let activated = self.event(
            EventKind::Activated,
            epoch,
            Some(fingerprint.clone()),
            reason,
        );
        if let Err(e) = self.audit_now(activated).await {
            return Err(self.refuse_unaudited("activation", &e));
        }
        let retired = self.event(
            EventKind::Retired,
            old,
            None,
            &format!("superseded by epoch {epoch}"),
        );
        if let Err(e) = self.audit_now(retired).await {
            return Err(self.refuse_unaudited("activation", &e));
        }
        if let Err(e) = self.commit_keyring(Change::Activate(epoch)).await {
            let why = format!("staged but not activated: {e}");
            self.audit(self.event(EventKind::Refused, epoch, Some(fingerprint), &why));
            return Err(why);
        }
        if let Err(e) = self.keyring.activate(epoch) {
            if self.keyring.snapshot().active.epoch != epoch {
                let why = format!("staged but not activated: {e}");
                self.audit(self.event(EventKind::Refused, epoch, Some(fingerprint), &why));
                return Err(why);
            }
        }
        self.retired_usage.insert(old, old_usage);
        // Heard once by everyone in the common case; the periodic re-announcement covers loss.
        self.announce(Body::Activate { epoch }).await;
        self.activated = Instant::now();
        self.metrics.rotations.inc();
        tracing::info!(
            epoch,
            acked = acked.len(),
            laggards = laggards.len(),
            reason,
            "rotated"
        );
        acked.sort();
        Ok(Rotated {
            epoch,
            acked,
            laggards,
        })
    }
}

/// Sends one sealed request to the authority and opens its sealed answer (the CLI's
/// `rotate`, `keys` and `revoke`).
pub async fn request(
    upstreams: Vec<String>,
    root: &crate::kek::Root,
    tls: &crate::tls::UpstreamFiles,
    subject: String,
    body: Body,
) -> Result<Body, String> {
    crate::tls::install_default_provider();
    let client = tls
        .apply(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?
        .name("cipherbus-cli")
        .connect(upstreams)
        .await
        .map_err(|e| format!("cannot reach the bus: {e}"))?;
    let control_key = root.control_key();
    let mut sealer = ControlSealer::new(crate::server::node_id("cli"), control_key)
        .map_err(|e| e.to_string())?;
    ask(&client, &mut sealer, control_key, subject, body).await
}

/// Sends one sealed request on an open connection and opens the sealed answer. A caller that
/// asks repeatedly keeps one sealer, so the authority remembers one sender, not one per request.
pub async fn ask(
    client: &async_nats::Client,
    sealer: &mut ControlSealer,
    control_key: &DataKey,
    subject: String,
    body: Body,
) -> Result<Body, String> {
    let sealed = sealer.seal(&subject, body).map_err(|e| e.to_string())?;
    // A rotation waits for acknowledgements, so the caller bounds the wait instead.
    let request = async_nats::Request::new()
        .payload(sealed.into())
        .timeout(None);
    let reply = client
        .send_request(subject, request)
        .await
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                "no key authority is running on this bus".to_owned()
            }
            _ => format!("the request failed: {e}"),
        })?;
    message::open(
        &mut Opener::new(),
        control_key,
        reply.subject.as_str(),
        &reply.payload,
    )
    .map(|m| m.body)
    .map_err(|e| format!("the answer was refused: {e}"))
}

/// Asks the authority on the bus to rotate and waits for its answer.
pub async fn request_rotation(
    upstreams: Vec<String>,
    root: &crate::kek::Root,
    prefix: &str,
    reason: &str,
) -> Result<Rotated, String> {
    let body = Body::RotateRequest {
        reason: reason.to_owned(),
    };
    let plain = crate::tls::UpstreamFiles::default();
    match request(upstreams, root, &plain, rotate_subject(prefix), body).await? {
        Body::RotateReply { error: Some(e), .. } => Err(e),
        Body::RotateReply {
            epoch,
            acked,
            laggards,
            error: None,
        } => Ok(Rotated {
            epoch,
            acked,
            laggards,
        }),
        _ => Err("the authority answered with something else".to_owned()),
    }
}
