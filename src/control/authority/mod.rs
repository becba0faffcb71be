//! The key authority: the single writer of epochs.
//!
//! This module owns deciding when to rotate and carrying a rotation out across the proxies:
//! it tracks live proxies from their heartbeats, rotates on a schedule, on usage (messages or
//! bytes sealed under the active epoch, summed over heartbeats) and on command, and runs each
//! rotation in two phases: STAGE the wrapped key until every live proxy acknowledges it (or
//! the stage timeout passes, and the silent ones are recorded as laggards), then ACTIVATE.
//! It re-announces the active epoch on every heartbeat interval so a proxy that missed an
//! announcement catches up, and writes every key event to the audit log.
//!
//! This file holds the authority's state and its main loop; each part of the work has a room:
//! - `lease`: hello, roll call, the lease in the control bucket, taking office, standing by;
//! - `membership`: heartbeats and reports, live and departed proxies, usage;
//! - `rotation`: stage, activate, retire, destroy, revoke, retention, re-announcing;
//! - `journal`: the audit log and stream, and the fenced keyring commit;
//! - `requests`: operators' requests, served or held, and the client side the CLI uses;
//! - `status`: what `cipherbus status` shows.

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
use crate::bus::{keyring_bucket, open_bucket, KEYRING_KEY, LEADER_KEY};
use crate::config::Rotation;
use crate::envelope::{DataKey, Opener};
use crate::keyring::{KeyState, Keyring};
use crate::metrics::{Metrics, ReasonLabel, ScopeLabel};

mod requests;
mod lease;
mod rotation;
mod membership;
mod status;
mod journal;

pub use requests::{ask, request, request_rotation};

/// A proxy is live while its last heartbeat is younger than this many intervals.
const LIVE_INTERVALS: u32 = 3;
/// How long an authority holding the lease listens for answers to its roll call at start.
const ROLL_CALL_WINDOW: Duration = Duration::from_millis(500);
/// How often a staged key is announced again while acknowledgements are missing.
const RESTAGE_EVERY: Duration = Duration::from_millis(250);
/// How long a rotation waits, once the activation is announced, for the proxies that staged
/// the key to say they seal with it, so `status` right after `rotate` shows them there.
/// Proxies that predate these acknowledgements never send one: the rotation ends at this bound.
const ACTIVATION_WAIT: Duration = Duration::from_secs(1);
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
                Some(m) = acks.next() => self.on_ack(&m.payload),
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
}
