//! What happens to each op on its way through: policy, sealing, opening, canonical encoding.
//!
//! This module owns the per-op decisions of one session, in both directions, and does no I/O:
//! ops come in, bytes for the other side are appended to an output buffer, and anything the
//! agent must be told (a permissions `-ERR`) is queued for the caller. The pumps in
//! [`super`] move the bytes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};

use crate::envelope::{self, AeadBackend, Batch, Header, Opener, Sealer, OVERHEAD, OVERHEAD_V2};
use crate::keyring::KeyMiss;
use crate::metrics::Metrics;
use crate::policy::{Decision, Mode, Policy};
use crate::proto::{self, ClientOp, ServerOp};
use crate::scope::Keys;

/// Reply subjects remembered per session, to tell server replies from injected plaintext.
const MAX_TRACKED_REPLIES: usize = 64;
/// Direct-get and message-get requests remembered per session.
const MAX_TRACKED_GETS: usize = 256;
/// An epoch this far beyond the newest known is not waited for: epochs grow by one per
/// rotation, so a larger jump is a forged header, and holding delivery for it would let
/// anyone on the bus stall agents.
const MAX_EPOCH_LEAD: u32 = 16;
/// After a wait for an epoch came to nothing, it is refused at once for this long.
const UNAVAILABLE_FOR: Duration = Duration::from_secs(30);

/// Subjects longer than this are not kept in the one-entry policy cache.
const MAX_CACHED_SUBJECT: usize = 256;

/// Requests whose replies carry stored messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoredGet {
    /// Direct get: the stored payload as is, the original subject in `Nats-Subject`.
    Direct,
    /// `STREAM.MSG.GET`: JSON with the stored payload in base64 at `message.data`.
    Json,
}

fn stored_get(subject: &[u8]) -> Option<StoredGet> {
    let rest = api_suffix(subject)?;
    if rest.starts_with(b"DIRECT.GET.") {
        Some(StoredGet::Direct)
    } else if rest.starts_with(b"STREAM.MSG.GET.") {
        Some(StoredGet::Json)
    } else {
        None
    }
}

/// `$JS.API.<rest>` or `$JS.<domain>.API.<rest>` → `<rest>`.
fn api_suffix(subject: &[u8]) -> Option<&[u8]> {
    let rest = subject.strip_prefix(b"$JS.")?;
    if let Some(r) = rest.strip_prefix(b"API.") {
        return Some(r);
    }
    let dot = memchr::memchr(b'.', rest)?;
    rest[dot + 1..].strip_prefix(b"API.")
}

/// The reply prefix of an inbox subject: everything up to and including its last dot.
fn reply_prefix(subject: &[u8]) -> &[u8] {
    match memchr::memrchr(b'.', subject) {
        Some(i) => &subject[..=i],
        None => subject,
    }
}

/// Replies this agent asked for. Shared by the two pumps of one session.
#[derive(Debug, Default)]
pub struct Replies {
    inner: Mutex<RepliesInner>,
}

#[derive(Debug, Default)]
struct RepliesInner {
    /// Reply prefixes (`_INBOX.abc.`) of the agent's own requests.
    prefixes: VecDeque<Box<[u8]>>,
    /// Exact reply subjects of direct-get requests.
    gets: VecDeque<Box<[u8]>>,
    /// Exact reply subjects of `STREAM.MSG.GET` requests.
    json_gets: VecDeque<Box<[u8]>>,
}

fn remember(queue: &mut VecDeque<Box<[u8]>>, item: &[u8], cap: usize) {
    if queue.iter().rev().any(|p| **p == *item) {
        return;
    }
    if queue.len() == cap {
        queue.pop_front();
    }
    queue.push_back(item.into());
}

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, RepliesInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, request_subject: &[u8], reply: &[u8]) {
        let mut inner = self.lock();
        let prefix = reply_prefix(reply);
        if inner.prefixes.back().is_none_or(|p| **p != *prefix) {
            remember(&mut inner.prefixes, prefix, MAX_TRACKED_REPLIES);
        }
        match stored_get(request_subject) {
            Some(StoredGet::Direct) => remember(&mut inner.gets, reply, MAX_TRACKED_GETS),
            Some(StoredGet::Json) => remember(&mut inner.json_gets, reply, MAX_TRACKED_GETS),
            None => {}
        }
    }

    /// Whether `subject` is a reply to one of this agent's requests.
    pub fn is_reply(&self, subject: &[u8]) -> bool {
        let prefix = reply_prefix(subject);
        self.lock().prefixes.iter().any(|p| **p == *prefix)
    }

    /// Whether `subject` answers one of this agent's direct-get requests.
    pub fn is_direct_get_reply(&self, subject: &[u8]) -> bool {
        self.lock().gets.iter().any(|p| **p == *subject)
    }

    /// Whether `subject` answers one of this agent's `STREAM.MSG.GET` requests.
    pub fn is_json_get_reply(&self, subject: &[u8]) -> bool {
        self.lock().json_gets.iter().any(|p| **p == *subject)
    }
}

/// A one-entry cache in front of the policy: agents tend to repeat subjects.
#[derive(Debug, Default)]
struct PolicyCache {
    subject: Vec<u8>,
    decision: Option<Decision>,
    /// The policy revision the decision came from: a reload makes it stale.
    revision: u64,
}

impl PolicyCache {
    fn decide(&mut self, policy: &Policy, subject: &[u8]) -> Decision {
        if let Some(d) = self.decision {
            if self.revision == policy.revision() && self.subject == subject {
                return d;
            }
        }
        let d = policy.decide(subject);
        if subject.len() <= MAX_CACHED_SUBJECT {
            self.subject.clear();
            self.subject.extend_from_slice(subject);
            self.decision = Some(d);
            self.revision = policy.revision();
        }
        d
    }
}

/// Counters kept locally and added to the shared metrics once per batch.
#[derive(Debug, Default)]
struct Tally {
    msgs: u64,
    bytes: u64,
}

/// The sealer of one key scope, made at the scope's first message.
#[derive(Default)]
struct Slot {
    sealer: Option<Sealer>,
    /// The scope's keyring generation the sealer was checked against.
    generation: u64,
    scope: &'static str,
    tally: Tally,
}

/// Agent → upstream.
pub struct Outbound {
    cache: PolicyCache,
    /// Indexed by scope; the default scope's first.
    slots: Vec<Slot>,
    /// The scope of the last message sealed: its sealer's subkey finishes a small batch.
    last: usize,
    /// Envelopes of this read batch waiting for their AEAD; see [`Outbound::finish`].
    batch: Batch,
    /// `-ERR` texts for the agent, drained by the caller.
    pub notices: Vec<String>,
}

impl Default for Outbound {
    fn default() -> Self {
        Self::new(AeadBackend::default())
    }
}

impl Outbound {
    pub fn new(aead: AeadBackend) -> Self {
        Outbound {
            cache: PolicyCache::default(),
            slots: Vec::new(),
            last: 0,
            batch: Batch::new(aead),
            notices: Vec::new(),
        }
    }

    /// Drops the cached sealers (their subkeys are zeroized); the next message derives a new
    /// one under a fresh nonce prefix. Called when the session goes quiet, so a subkey of a key
    /// destroyed meanwhile does not stay in memory while no message comes to replace it.
    pub fn forget_keys(&mut self) {
        for slot in &mut self.slots {
            slot.sealer = None;
        }
        self.batch.release();
    }

    /// Seals every envelope [`Outbound::handle`] queued in `out` since the last call, all
    /// at once. Until this returns `Ok`, `out` holds plaintext where ciphertext goes: on an
    /// error it must not be sent.
    pub fn finish(&mut self, out: &mut BytesMut) -> Result<(), envelope::EnvelopeError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        match self.slots.get(self.last).and_then(|s| s.sealer.as_ref()) {
            Some(sealer) => self.batch.seal_with(&mut out[..], sealer),
            None => self.batch.seal(&mut out[..]),
        }
    }

    /// Seals `payload` (queued in `self.batch`) under the active epoch of scope `scope`.
    fn seal(
        &mut self,
        keys: &Keys<'_>,
        scope: usize,
        bind: Option<&[u8]>,
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), envelope::EnvelopeError> {
        // Every configured scope is held: a missing one is a bug, and nothing is sent.
        let (held, snap) = keys.get(scope).ok_or(envelope::EnvelopeError::Backend)?;
        if self.slots.len() <= scope {
            self.slots.resize_with(scope + 1, Slot::default);
        }
        let slot = &mut self.slots[scope];
        let stale = slot.generation != snap.generation
            && slot
                .sealer
                .as_ref()
                .is_none_or(|s| s.epoch() != snap.active.epoch);
        if stale || slot.sealer.is_none() {
            slot.sealer = Some(Sealer::scoped(
                snap.active.epoch,
                &snap.active.key,
                held.id,
            )?);
            slot.scope = held.name;
        }
        slot.generation = snap.generation;
        let Some(sealer) = slot.sealer.as_mut() else {
            // Set just above.
            return Err(envelope::EnvelopeError::Backend);
        };
        sealer.seal_deferred(bind, payload, out, &mut self.batch)?;
        slot.tally.msgs += 1;
        slot.tally.bytes += payload.len() as u64;
        self.last = scope;
        Ok(())
    }

    /// Handles one op from the agent, appending what goes upstream to `out`. Payloads are
    /// sealed by the next [`Outbound::finish`], which must run before `out` is sent.
    pub fn handle(
        &mut self,
        op: ClientOp<&[u8]>,
        policy: &Policy,
        keys: &Keys<'_>,
        replies: &Replies,
        metrics: &Metrics,
        out: &mut BytesMut,
    ) -> Result<(), envelope::EnvelopeError> {
        match op {
            ClientOp::Pub {
                subject,
                reply,
                payload,
            } => {
                let Some(d) = self.admit_publish(policy, subject, reply, replies, metrics) else {
                    return Ok(());
                };
                if d.mode == Mode::Plaintext || payload.is_empty() {
                    proto::put_pub_line(out, subject, reply, payload.len());
                    out.extend_from_slice(payload);
                } else {
                    let overhead = scope_overhead(d);
                    proto::put_pub_line(out, subject, reply, payload.len() + overhead);
                    let bind = d.bind_subject.then_some(subject);
                    self.seal(keys, usize::from(d.scope), bind, payload, out)?;
                }
                out.put_slice(b"\r\n");
            }
            ClientOp::Hpub {
                subject,
                reply,
                headers,
                payload,
            } => {
                let Some(d) = self.admit_publish(policy, subject, reply, replies, metrics) else {
                    return Ok(());
                };
                if d.mode == Mode::Plaintext || payload.is_empty() {
                    let total = headers.len() + payload.len();
                    proto::put_hpub_line(out, subject, reply, headers.len(), total);
                    out.extend_from_slice(headers);
                    out.extend_from_slice(payload);
                } else {
                    let total = headers.len() + payload.len() + scope_overhead(d);
                    proto::put_hpub_line(out, subject, reply, headers.len(), total);
                    out.extend_from_slice(headers);
                    let bind = d.bind_subject.then_some(subject);
                    self.seal(keys, usize::from(d.scope), bind, payload, out)?;
                }
                out.put_slice(b"\r\n");
            }
            ClientOp::Sub { subject, queue, .. } if policy.sub_denied(subject) => {
                metrics.deny("subscribe");
                let subject = String::from_utf8_lossy(subject);
                self.notices.push(match queue {
                    Some(q) => format!(
                        "Permissions Violation for Subscription to \"{subject}\" using queue \"{}\"",
                        String::from_utf8_lossy(q)
                    ),
                    None => format!("Permissions Violation for Subscription to \"{subject}\""),
                });
            }
            other => proto::encode_client_op(&other, out),
        }
        Ok(())
    }

    fn admit_publish(
        &mut self,
        policy: &Policy,
        subject: &[u8],
        reply: Option<&[u8]>,
        replies: &Replies,
        metrics: &Metrics,
    ) -> Option<Decision> {
        let d = self.cache.decide(policy, subject);
        if d.mode == Mode::Deny {
            metrics.deny("publish");
            self.notices.push(format!(
                "Permissions Violation for Publish to \"{}\"",
                String::from_utf8_lossy(subject)
            ));
            return None;
        }
        if let Some(reply) = reply {
            replies.record(subject, reply);
        }
        Some(d)
    }

    /// Adds the batch's counts to the shared metrics.
    pub fn flush_metrics(&mut self, metrics: &Metrics) {
        for slot in &mut self.slots {
            if slot.tally.msgs == 0 {
                continue;
            }
            let tally = std::mem::take(&mut slot.tally);
            metrics.messages_sealed.inc_by(tally.msgs);
            metrics.bytes_sealed.inc_by(tally.bytes);
            metrics.scope_sealed(slot.scope, tally.msgs, tally.bytes);
            if let Some(s) = &slot.sealer {
                // One batch seals a scope under one epoch: sealers are replaced between batches.
                metrics
                    .epoch_sealed
                    .get_or_create(&crate::metrics::EpochLabel {
                        scope: slot.scope,
                        epoch: s.epoch(),
                    })
                    .inc_by(tally.msgs);
            }
        }
    }
}

/// What sealing adds on a subject: a named scope's envelopes carry its id.
fn scope_overhead(d: Decision) -> usize {
    if d.scope == 0 {
        OVERHEAD
    } else {
        OVERHEAD_V2
    }
}

/// Why a delivery was refused; the label of `cipherbus_open_failures_total`.
pub type Refusal = &'static str;

/// Upstream → agent.
pub struct Inbound {
    cache: PolicyCache,
    opener: Opener,
    /// Deliveries of this read batch waiting for their AEAD; see [`Inbound::finish`].
    batch: Batch,
    /// Where each of them sits in the output, in the order queued.
    queued: Vec<Queued>,
    generation: u64,
    tally: Tally,
    limiter: RateLimit,
    /// The last scope and epoch waited for in vain, and when.
    unavailable: Option<(usize, u32, Instant)>,
}

impl Default for Inbound {
    fn default() -> Self {
        Self::new(AeadBackend::default())
    }
}

impl Inbound {
    pub fn new(aead: AeadBackend) -> Self {
        Inbound {
            cache: PolicyCache::default(),
            opener: Opener::new(),
            batch: Batch::new(aead),
            queued: Vec::new(),
            generation: u64::MAX,
            tally: Tally::default(),
            limiter: RateLimit::new(Duration::from_secs(1)),
            unavailable: None,
        }
    }

    /// Drops every cached opening subkey; see [`Outbound::forget_keys`].
    pub fn forget_keys(&mut self) {
        self.opener.clear();
        self.batch.release();
        self.queued = Vec::new();
    }

    /// Verifies and decrypts every delivery [`Inbound::handle`] queued in `out` since the
    /// last call, all at once. A delivery whose tag does not verify is cut out of `out`
    /// whole and counted, as a refused delivery is. Must run before `out` is sent: until
    /// then the queued deliveries hold ciphertext.
    pub fn finish(&mut self, out: &mut BytesMut, metrics: &Metrics) {
        if self.batch.is_empty() {
            self.queued.clear();
            return;
        }
        let mut failed = Vec::new();
        self.batch
            .open_with(&mut out[..], &self.opener, |i| failed.push(i));
        if !failed.is_empty() {
            // Rare (a forged or corrupted delivery), so one copy of the batch's output is fine.
            let mut keep_from = 0;
            let mut kept = Vec::with_capacity(out.len());
            for &i in &failed {
                let Some(q) = self.queued.get(i).copied() else {
                    continue;
                };
                let subject = delivery_subject(&out[q.mark..q.end]).to_vec();
                self.refuse("auth", &subject, metrics);
                self.tally.msgs = self.tally.msgs.saturating_sub(1);
                self.tally.bytes = self.tally.bytes.saturating_sub(q.bytes);
                kept.extend_from_slice(&out[keep_from..q.mark]);
                keep_from = q.end;
            }
            if keep_from > 0 {
                kept.extend_from_slice(&out[keep_from..]);
                out.clear();
                out.extend_from_slice(&kept);
            }
        }
        self.queued.clear();
    }

    /// The epoch to wait for before handling `op`: a sealed delivery on an encrypt subject
    /// under an epoch newer than any known here, not implausibly far ahead, and not one
    /// already waited for in vain. The caller asks for a keyring sync, waits briefly, then
    /// hands the op to [`Inbound::handle`] as usual.
    /// Returns the scope's index and the epoch.
    pub fn pending_epoch(
        &mut self,
        op: &ServerOp<&[u8]>,
        policy: &Policy,
        keys: &Keys<'_>,
    ) -> Option<(usize, u32)> {
        let (subject, payload) = match op {
            ServerOp::Msg {
                subject, payload, ..
            }
            | ServerOp::Hmsg {
                subject, payload, ..
            } => (subject, payload),
            _ => return None,
        };
        if !envelope::is_envelope(payload) || payload.len() < envelope::overhead_of(payload) {
            return None;
        }
        let scope = keys.index_of(envelope::scope_of(payload))?;
        let (_, snap) = keys.get(scope)?;
        let epoch = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        if epoch == snap.active.epoch {
            return None;
        }
        let newest = snap.newest();
        if epoch <= newest || epoch > newest.saturating_add(MAX_EPOCH_LEAD) {
            return None;
        }
        if self
            .unavailable
            .is_some_and(|(s, e, at)| s == scope && e == epoch && at.elapsed() < UNAVAILABLE_FOR)
        {
            return None;
        }
        if self.cache.decide(policy, subject).mode != Mode::Encrypt {
            return None;
        }
        Some((scope, epoch))
    }

    /// Records that waiting for `epoch` of scope `scope` did not bring its key.
    pub fn epoch_unavailable(&mut self, scope: usize, epoch: u32) {
        self.unavailable = Some((scope, epoch, Instant::now()));
    }

    /// Handles one op from the server, appending what the agent gets to `out`. An INFO is not
    /// handled here (the caller rewrites it).
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        op: ServerOp<&[u8]>,
        policy: &Policy,
        keys: &Keys<'_>,
        replies: &Replies,
        metrics: &Metrics,
        out: &mut BytesMut,
    ) {
        let generation = keys.generation();
        if self.generation != generation {
            // Subkeys of retired or destroyed keys must not outlive the keyring change.
            self.opener.clear();
            self.generation = generation;
        }
        match op {
            ServerOp::Msg {
                subject,
                sid,
                reply,
                payload,
            } => {
                let d = self.cache.decide(policy, subject);
                let admit = self.admit(d, subject, None, payload, replies, metrics);
                let msg = Delivery {
                    subject,
                    sid,
                    reply,
                    headers: None,
                };
                self.deliver(admit, msg, d, payload, keys, policy, metrics, out);
            }
            ServerOp::Hmsg {
                subject,
                sid,
                reply,
                headers,
                payload,
            } => {
                let d = self.cache.decide(policy, subject);
                let status = proto::header_status(headers).is_some();
                let admit = if status && payload.is_empty() {
                    // Status messages (503, 100, 404, 408, 409 …) come from the server itself.
                    if d.mode == Mode::Deny {
                        Admit::Drop
                    } else {
                        Admit::Pass
                    }
                } else {
                    let nats_subject = if replies.is_direct_get_reply(subject) {
                        proto::header_value(headers, "Nats-Subject")
                    } else {
                        None
                    };
                    self.admit(d, subject, nats_subject, payload, replies, metrics)
                };
                let msg = Delivery {
                    subject,
                    sid,
                    reply,
                    headers: Some(headers),
                };
                self.deliver(admit, msg, d, payload, keys, policy, metrics, out);
            }
            other => proto::encode_server_op(&other, out),
        }
    }

    /// Writes one delivery as admitted: as is, opened, or not at all.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        admit: Admit<'_>,
        msg: Delivery<'_>,
        d: Decision,
        payload: &[u8],
        keys: &Keys<'_>,
        policy: &Policy,
        metrics: &Metrics,
        out: &mut BytesMut,
    ) {
        let mut queued_at = None;
        let result = match admit {
            Admit::Pass => {
                msg.put_line(out, payload.len());
                out.extend_from_slice(payload);
                Ok(())
            }
            Admit::Open { bind_to } => {
                let mark = out.len();
                msg.put_line(out, payload.len() - envelope::overhead_of(payload));
                let bind = bind_to.unwrap_or(msg.subject);
                let queued = self.batch.len();
                let opened = self
                    .open_with(keys, d, bind, payload, out, true)
                    .inspect_err(|_| out.truncate(mark));
                if opened.is_ok() && self.batch.len() > queued {
                    queued_at = Some(mark);
                }
                opened
            }
            Admit::Embedded => self.open_embedded(keys, policy, payload).map(|json| {
                msg.put_line(out, json.len());
                out.extend_from_slice(&json);
            }),
            Admit::Refuse(reason) => Err(reason),
            Admit::Drop => return,
        };
        match result {
            Ok(()) => {
                out.put_slice(b"\r\n");
                if let Some(mark) = queued_at {
                    self.queued.push(Queued {
                        mark,
                        end: out.len(),
                        bytes: (payload.len() - envelope::overhead_of(payload)) as u64,
                    });
                }
            }
            Err(reason) => self.refuse(reason, msg.subject, metrics),
        }
    }

    fn admit<'a>(
        &self,
        d: Decision,
        subject: &[u8],
        nats_subject: Option<&'a [u8]>,
        payload: &[u8],
        replies: &Replies,
        metrics: &Metrics,
    ) -> Admit<'a> {
        match d.mode {
            Mode::Deny => {
                metrics.deny("deliver");
                Admit::Drop
            }
            Mode::Plaintext => Admit::Pass,
            Mode::Encrypt if payload.is_empty() => Admit::Pass,
            Mode::Encrypt if envelope::is_envelope(payload) => {
                if payload.len() < envelope::overhead_of(payload) {
                    Admit::Refuse("truncated")
                } else {
                    Admit::Open {
                        bind_to: nats_subject,
                    }
                }
            }
            Mode::Encrypt if replies.is_json_get_reply(subject) => Admit::Embedded,
            // Server answers (PubAck, API responses) land in plaintext on the agent's inboxes.
            Mode::Encrypt if replies.is_reply(subject) => Admit::Pass,
            Mode::Encrypt => Admit::Refuse("plaintext"),
        }
    }

    fn open(
        &mut self,
        keys: &Keys<'_>,
        d: Decision,
        subject: &[u8],
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Refusal> {
        self.open_with(keys, d, subject, payload, out, false)
    }

    /// Opens `payload` into `out`; with `queue`, the AEAD is left to `self.batch` for
    /// [`Inbound::finish`] (large payloads are opened at once either way).
    /// An envelope of a scope this process holds no root for is refused unopened.
    fn open_with(
        &mut self,
        keys: &Keys<'_>,
        d: Decision,
        subject: &[u8],
        payload: &[u8],
        out: &mut BytesMut,
        queue: bool,
    ) -> Result<(), Refusal> {
        let header = Header::parse(payload).map_err(|e| e.reason())?;
        let (held, snap) = keys
            .index_of(header.scope)
            .and_then(|i| keys.get(i))
            .ok_or("scope_unavailable")?;
        let key = held.keyring.lookup(snap, header.epoch).map_err(|miss| {
            if miss == KeyMiss::Destroyed {
                held.keyring.refused_destroyed(header.epoch);
            }
            miss.reason()
        })?;
        let (key, unbound) = (&key.key, !d.bind_subject);
        let opened = if queue {
            let batch = &mut self.batch;
            self.opener
                .open_deferred(key, &header, payload, subject, unbound, out, batch)
        } else {
            self.opener
                .open_into(key, &header, payload, subject, unbound, out)
        };
        opened.map_err(|e| e.reason())?;
        self.tally.msgs += 1;
        self.tally.bytes += (payload.len() - header.overhead()) as u64;
        Ok(())
    }

    /// Opens the stored payload inside a `STREAM.MSG.GET` JSON answer, bound to the subject the
    /// JSON says it was stored under. Answers without a sealed payload (errors, plaintext
    /// subjects, empty payloads) pass unchanged.
    fn open_embedded(
        &mut self,
        keys: &Keys<'_>,
        policy: &Policy,
        payload: &[u8],
    ) -> Result<Vec<u8>, Refusal> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return Err("embedded");
        };
        let Some(message) = doc.get_mut("message").and_then(|m| m.as_object_mut()) else {
            return Ok(payload.to_vec());
        };
        let stored_subject = message
            .get("subject")
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_owned();
        let d = policy.decide(stored_subject.as_bytes());
        let Some(data) = message.get("data").and_then(|d| d.as_str()) else {
            return Ok(payload.to_vec());
        };
        let sealed = b64.decode(data).map_err(|_| "embedded")?;
        if d.mode != Mode::Encrypt || sealed.is_empty() {
            return Ok(payload.to_vec());
        }
        if !envelope::is_envelope(&sealed) {
            return Err("plaintext");
        }
        let overhead = envelope::overhead_of(&sealed);
        if sealed.len() < overhead {
            return Err("truncated");
        }
        let mut plain = BytesMut::with_capacity(sealed.len() - overhead);
        self.open(keys, d, stored_subject.as_bytes(), &sealed, &mut plain)?;
        message.insert("data".into(), serde_json::Value::from(b64.encode(&plain)));
        serde_json::to_vec(&doc).map_err(|_| "embedded")
    }

    fn refuse(&mut self, reason: Refusal, subject: &[u8], metrics: &Metrics) {
        metrics.open_failure(reason);
        if let Some(suppressed) = self.limiter.allow(Instant::now()) {
            // The subject is metadata the bus already sees; the payload is never logged.
            tracing::warn!(
                reason,
                subject = %String::from_utf8_lossy(subject),
                suppressed,
                "refused a delivery on an encrypt subject"
            );
        }
    }

    pub fn flush_metrics(&mut self, metrics: &Metrics) {
        if self.tally.msgs > 0 {
            metrics.messages_opened.inc_by(self.tally.msgs);
            metrics.bytes_opened.inc_by(self.tally.bytes);
            self.tally = Tally::default();
        }
    }
}

/// One delivery in the output waiting for [`Inbound::finish`]: its bytes from the control
/// line to the closing CRLF, and its plaintext length.
#[derive(Debug, Clone, Copy)]
struct Queued {
    mark: usize,
    end: usize,
    bytes: u64,
}

/// The subject of a MSG or HMSG as this module writes it: the second field of the line.
fn delivery_subject(msg: &[u8]) -> &[u8] {
    // Up to the line's `\n`: a subject may hold a `\r`.
    let line = msg.split(|&b| b == b'\n').next().unwrap_or_default();
    line.split(|&b| b == b' ').nth(1).unwrap_or_default()
}

/// The parts of a MSG or HMSG that are written back unchanged.
struct Delivery<'a> {
    subject: &'a [u8],
    sid: &'a [u8],
    reply: Option<&'a [u8]>,
    /// `Some` for HMSG: the header block, written unchanged.
    headers: Option<&'a [u8]>,
}

impl Delivery<'_> {
    /// Writes the control line and any header block, for a payload of `payload_len` bytes.
    fn put_line(&self, out: &mut BytesMut, payload_len: usize) {
        match self.headers {
            None => proto::put_msg_line(out, self.subject, self.sid, self.reply, payload_len),
            Some(h) => {
                let total = h.len() + payload_len;
                proto::put_hmsg_line(out, self.subject, self.sid, self.reply, h.len(), total);
                out.extend_from_slice(h);
            }
        }
    }
}

enum Admit<'a> {
    Pass,
    /// A `STREAM.MSG.GET` answer: open the envelope inside its JSON.
    Embedded,
    Open {
        bind_to: Option<&'a [u8]>,
    },
    Refuse(Refusal),
    Drop,
}

/// At most one event per interval; reports how many were held back since the last one.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed)` when the event may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Buf, Bytes};

    use super::*;

    #[test]
    fn a_refused_delivery_is_named_by_its_whole_subject() {
        assert_eq!(delivery_subject(b"MSG a.b 1 5\r\nhello\r\n"), b"a.b");
        assert_eq!(
            delivery_subject(b"HMSG a\rb 1 r 12 14\r\nNATS/1.0..."),
            b"a\rb"
        );
        assert_eq!(delivery_subject(b""), b"");
    }

    /// With the default backend, a session seals and opens each message as it handles it:
    /// nothing waits in its batch for the hand-written kernels; with `batched`, it does.
    #[test]
    fn the_default_backend_leaves_nothing_for_the_batch() {
        let keyring =
            crate::keyring::Keyring::open(crate::envelope::RootKey::from_bytes([7; 32]), None, 4)
                .expect("in-memory keyring");
        let scopes = crate::scope::Scopes::new(std::sync::Arc::new(keyring));
        let keys = scopes.keys();
        let (policy, metrics, replies) = (Policy::default(), Metrics::new(), Replies::default());
        for (aead, queues) in [
            (AeadBackend::Audited, false),
            (
                AeadBackend::Batched,
                crate::envelope::BatchPath::Radix26.available(),
            ),
        ] {
            let mut outbound = Outbound::new(aead);
            let mut wire = BytesMut::new();
            for _ in 0..4 {
                let op = ClientOp::Pub {
                    subject: &b"orders"[..],
                    reply: None,
                    payload: &b"secret"[..],
                };
                outbound
                    .handle(op, &policy, &keys, &replies, &metrics, &mut wire)
                    .expect("handled");
            }
            assert_eq!(!outbound.batch.is_empty(), queues, "{aead:?} outbound");
            outbound.finish(&mut wire).expect("sealed");
            let mut payloads = Vec::new();
            let mut parser = proto::ClientParser::new();
            while let Some((ClientOp::Pub { payload, .. }, len)) =
                parser.parse(&wire, 1 << 20).expect("well-formed")
            {
                payloads.push(Bytes::copy_from_slice(payload));
                wire.advance(len);
            }
            let mut inbound = Inbound::new(aead);
            let mut out = BytesMut::new();
            for payload in &payloads {
                let op = ServerOp::Msg {
                    subject: &b"orders"[..],
                    sid: &b"1"[..],
                    reply: None,
                    payload: &payload[..],
                };
                inbound.handle(op, &policy, &keys, &replies, &metrics, &mut out);
            }
            assert_eq!(!inbound.batch.is_empty(), queues, "{aead:?} inbound");
            inbound.finish(&mut out, &metrics);
            assert_eq!(String::from_utf8_lossy(&out).matches("secret").count(), 4);
        }
    }

    #[test]
    fn forgotten_keys_are_gone_and_come_back_with_the_next_message() {
        let keyring =
            crate::keyring::Keyring::open(crate::envelope::RootKey::from_bytes([7; 32]), None, 4)
                .expect("in-memory keyring");
        let scopes = crate::scope::Scopes::new(std::sync::Arc::new(keyring));
        let keys = scopes.keys();
        let (policy, metrics, replies) = (Policy::default(), Metrics::new(), Replies::default());
        let publish = |out: &mut Outbound, wire: &mut BytesMut| {
            let op = ClientOp::Pub {
                subject: &b"orders"[..],
                reply: None,
                payload: &b"secret"[..],
            };
            out.handle(op, &policy, &keys, &replies, &metrics, wire)
                .expect("queued");
            out.finish(wire).expect("sealed");
        };
        let sealed = |wire: &mut BytesMut| match proto::ClientParser::new()
            .parse(wire, 1 << 20)
            .expect("well-formed")
        {
            Some((ClientOp::Pub { payload, .. }, len)) => {
                let payload = Bytes::copy_from_slice(payload);
                wire.advance(len);
                payload
            }
            other => panic!("expected a PUB, got {other:?}"),
        };

        let mut outbound = Outbound::new(AeadBackend::Batched);
        let mut wire = BytesMut::new();
        publish(&mut outbound, &mut wire);
        let first = sealed(&mut wire);
        outbound.forget_keys();
        assert!(
            outbound.slots.iter().all(|s| s.sealer.is_none()),
            "the sealer and its subkey are dropped"
        );
        publish(&mut outbound, &mut wire);
        let second = sealed(&mut wire);
        let prefix = |e: &Bytes| Header::parse(e).expect("header").nonce[..16].to_vec();
        assert_ne!(
            prefix(&first),
            prefix(&second),
            "a new sealer, with a new nonce prefix"
        );

        let mut inbound = Inbound::default();
        let mut delivered = BytesMut::new();
        for payload in [first, second] {
            let op = ServerOp::Msg {
                subject: &b"orders"[..],
                sid: &b"1"[..],
                reply: None,
                payload: &payload[..],
            };
            inbound.handle(op, &policy, &keys, &replies, &metrics, &mut delivered);
        }
        inbound.finish(&mut delivered, &metrics);
        assert_eq!(inbound.opener.cached(), 2, "one subkey per sender prefix");
        assert_eq!(
            delivered.windows(6).filter(|w| w == b"secret").count(),
            2,
            "both opened"
        );
        inbound.forget_keys();
        assert_eq!(inbound.opener.cached(), 0);
    }

    /// A batch of deliveries with one forged among them: the forged one is cut out whole and
    /// counted, the others arrive opened, in order, byte for byte as the one-by-one path
    /// writes them.
    #[test]
    fn a_forged_delivery_in_a_batch_is_cut_out_and_the_rest_arrive_in_order() {
        let keyring =
            crate::keyring::Keyring::open(crate::envelope::RootKey::from_bytes([7; 32]), None, 4)
                .expect("in-memory keyring");
        let scopes = crate::scope::Scopes::new(std::sync::Arc::new(keyring));
        let keys = scopes.keys();
        let (policy, metrics, replies) = (Policy::default(), Metrics::new(), Replies::default());
        let mut outbound = Outbound::new(AeadBackend::Batched);
        let mut wire = BytesMut::new();
        for i in 0..6u8 {
            let payload = vec![b'a' + i; 100 + usize::from(i)];
            let op = ClientOp::Pub {
                subject: &b"orders"[..],
                reply: None,
                payload: &payload[..],
            };
            outbound
                .handle(op, &policy, &keys, &replies, &metrics, &mut wire)
                .expect("queued");
        }
        outbound.finish(&mut wire).expect("sealed");
        let mut parser = proto::ClientParser::new();
        let mut sealed = Vec::new();
        while let Some((ClientOp::Pub { payload, .. }, len)) = parser.parse(&wire, 1 << 20).unwrap()
        {
            sealed.push(Bytes::copy_from_slice(payload));
            wire.advance(len);
        }
        assert_eq!(sealed.len(), 6);
        let mut forged = sealed[3].to_vec();
        forged[40] ^= 1;
        sealed[3] = Bytes::from(forged);

        let deliver = |inbound: &mut Inbound, out: &mut BytesMut, payload: &Bytes| {
            let op = ServerOp::Hmsg {
                subject: &b"orders"[..],
                sid: &b"9"[..],
                reply: None,
                headers: &b"NATS/1.0\r\nK: v\r\n\r\n"[..],
                payload: &payload[..],
            };
            inbound.handle(op, &policy, &keys, &replies, &metrics, out);
        };
        let mut batched = BytesMut::new();
        let mut inbound = Inbound::new(AeadBackend::Batched);
        for payload in &sealed {
            deliver(&mut inbound, &mut batched, payload);
        }
        inbound.finish(&mut batched, &metrics);
        inbound.flush_metrics(&metrics);

        let mut one_by_one = BytesMut::new();
        let mut inbound = Inbound::new(AeadBackend::Audited);
        for (i, payload) in sealed.iter().enumerate() {
            if i != 3 {
                deliver(&mut inbound, &mut one_by_one, payload);
                inbound.finish(&mut one_by_one, &metrics);
            }
        }
        assert_eq!(batched, one_by_one);
        let text = String::from_utf8_lossy(&batched);
        assert_eq!(text.matches("HMSG orders 9").count(), 5, "{text}");
        assert!(!text.contains("ddd"), "the forged delivery is gone");
        assert!(text.contains(&"f".repeat(105)), "the ones after it arrive");
        let auth = metrics
            .open_failures
            .get_or_create(&crate::metrics::ReasonLabel { reason: "auth" })
            .get();
        assert_eq!(auth, 1);
        assert_eq!(
            metrics.messages_opened.get(),
            5,
            "the refused one is not counted as opened"
        );
    }

    #[test]
    fn api_suffix_and_stored_gets() {
        let direct = Some(StoredGet::Direct);
        assert_eq!(stored_get(b"$JS.API.DIRECT.GET.KV_cfg.$KV.cfg.k"), direct);
        assert_eq!(stored_get(b"$JS.hub.API.DIRECT.GET.S"), direct);
        assert_eq!(
            stored_get(b"$JS.API.STREAM.MSG.GET.S"),
            Some(StoredGet::Json)
        );
        assert_eq!(stored_get(b"$JS.API.STREAM.INFO.S"), None);
        assert_eq!(stored_get(b"orders.DIRECT.GET.x"), None);
    }

    #[test]
    fn replies_are_tracked_by_prefix_and_bounded() {
        let r = Replies::default();
        r.record(b"svc", b"_INBOX.abc.1");
        assert!(r.is_reply(b"_INBOX.abc.2"));
        assert!(!r.is_reply(b"_INBOX.abd.2"));
        assert!(!r.is_reply(b"orders.new"));
        for i in 0..1000 {
            r.record(b"svc", format!("_INBOX.n{i}.1").as_bytes());
        }
        assert!(r.lock().prefixes.len() <= MAX_TRACKED_REPLIES);
        assert!(!r.is_reply(b"_INBOX.abc.2"), "oldest evicted");
        r.record(b"$JS.API.DIRECT.GET.S", b"_INBOX.x.7");
        assert!(r.is_direct_get_reply(b"_INBOX.x.7"));
        assert!(!r.is_direct_get_reply(b"_INBOX.x.8"));
    }

    #[test]
    fn rate_limit() {
        let mut l = RateLimit::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t + Duration::from_secs(2)), Some(2));
    }
}
