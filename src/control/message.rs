//! Control messages: what proxies and the key authority say to each other on the bus.
//!
//! This module owns the control-plane wire format and nothing else: a JSON body sealed in a
//! normal envelope under the control key (derived from the root key), with epoch
//! [`CONTROL_EPOCH`] and bound to the control subject it was published on. Only holders of the
//! root key can read or forge one, and a message moved to another control subject fails to
//! open. Each sender numbers its messages; [`ReplayGuard`] refuses any number it has seen.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::envelope::{self, DataKey, Header, Opener, Sealer};

/// The epoch field of control envelopes; data epochs start at 1, so a control envelope never
/// opens as data and a data envelope never opens as control.
pub const CONTROL_EPOCH: u32 = 0;

/// Senders remembered by a [`ReplayGuard`]; the oldest is forgotten past this.
const MAX_SENDERS: usize = 4096;

/// What a control message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Body {
    /// A new data key, wrapped under the root key: install it decrypt-only and persist it.
    Stage {
        epoch: u32,
        /// Base64 of the wrapped key.
        wrapped: String,
        fingerprint: String,
    },
    /// A proxy installed and persisted a staged epoch.
    Ack {
        epoch: u32,
    },
    /// Seal with this epoch from now on; the previous active epoch is retired.
    Activate {
        epoch: u32,
    },
    /// Destroy this epoch everywhere.
    Destroy {
        epoch: u32,
        reason: String,
    },
    /// A proxy's periodic report: its active epoch and what it has sealed under it.
    Heartbeat {
        active: u32,
        sealed_messages: u64,
        sealed_bytes: u64,
    },
    /// A proxy asks the authority for the whole keyring (on start and on reconnect).
    SyncRequest {},
    /// The authority's keyring: every epoch, with the wrapped key of those that still open.
    SyncReply {
        epochs: Vec<EpochInfo>,
    },
    /// An operator asks for the epochs and their states.
    KeysRequest {},
    KeysReply {
        epochs: Vec<EpochInfo>,
    },
    /// An operator asks to destroy an epoch everywhere now.
    RevokeRequest {
        epoch: u32,
        reason: String,
    },
    RevokeReply {
        /// The epoch that seals after the revocation.
        active: u32,
        error: Option<String>,
    },
    /// An authority announcing itself, so a second one stands by.
    AuthorityHello {
        active: u32,
        /// When this authority started (Unix ms): the earliest one keeps the role.
        since_ms: u64,
    },
    /// An authority that holds the lease asks every proxy for a heartbeat now, to learn who
    /// is live without waiting for their next one.
    RollCall {},
    /// One audit log entry (its JSON line, without the hash), for collectors.
    AuditEvent {
        entry: String,
    },
    /// An operator asks the authority to wrap every data key, and the deployment seed, again
    /// under the root's newest version.
    RewrapRequest {},
    RewrapReply {
        /// Data keys wrapped again.
        rewrapped: u32,
        /// Whether the deployment seed was (a file root has none).
        seed: bool,
        error: Option<String>,
    },
    /// A proxy's figures for `cipherbus status`, sent beside each heartbeat on a subject of
    /// its own (authorities that do not know it never subscribe to it).
    Report(Report),
    /// An operator asks the acting authority for the fleet's status.
    StatusRequest {},
    StatusReply(Status),
    /// An operator asks the authority to rotate now.
    RotateRequest {
        reason: String,
    },
    /// The authority's answer: the new active epoch and who acknowledged it, or why not.
    RotateReply {
        epoch: u32,
        acked: Vec<String>,
        laggards: Vec<String>,
        error: Option<String>,
    },
}

/// One epoch as the authority describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochInfo {
    pub epoch: u32,
    pub state: crate::keyring::KeyState,
    pub fingerprint: String,
    /// Unix seconds.
    pub created: u64,
    pub activated: Option<u64>,
    /// Base64 of the wrapped key, for epochs that still open (sync only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<String>,
    /// Messages sealed under it, summed over the proxies' latest heartbeats (active epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_messages: Option<u64>,
}

/// What a proxy reports about itself. Counts are totals since the proxy started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub host: String,
    pub version: String,
    /// The epoch it seals with in this scope.
    pub active: u32,
    pub connections: u64,
    pub sealed_messages: u64,
    pub opened_messages: u64,
    /// Payloads refused (open failures by reason, `deny_DIRECTION` for deny rules); non-zero only.
    pub refused: BTreeMap<String, u64>,
}

/// The fleet as the acting authority of one scope sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// The acting authority's node id and host.
    pub authority: String,
    pub host: String,
    /// When it started acting (Unix ms).
    pub acting_since_ms: u64,
    /// Other authorities heard recently: they stand by.
    pub standby: Vec<String>,
    pub active: u32,
    /// When the active epoch was activated (Unix seconds), where known.
    pub activated: Option<u64>,
    pub schedule: Schedule,
    pub proxies: Vec<ProxyStatus>,
}

/// What rotates the active epoch next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// The next rotation (Unix seconds), where one is due by time or expected by usage.
    pub next: Option<u64>,
    /// Why it comes then: `time`, or `usage` (a limit reached at the current sealing rate).
    pub why: Option<String>,
    pub rotate_every_s: Option<u64>,
    /// Sealed under the active epoch, summed over the proxies' latest heartbeats.
    pub sealed_messages: u64,
    pub sealed_bytes: u64,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// One proxy in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyStatus {
    pub node: String,
    /// Empty until its first report.
    pub host: String,
    pub version: String,
    pub active: u32,
    /// How long ago it was last heard (ms).
    pub last_seen_ms: u64,
    /// Silent for longer than the authority waits for a live proxy.
    pub silent: bool,
    /// Sealing with another epoch than the active one, or silent.
    pub lagging: bool,
    pub connections: u64,
    pub sealed_messages: u64,
    pub opened_messages: u64,
    pub refused: BTreeMap<String, u64>,
    /// The span between its last two reports (ms; 0 before two), and what changed over it.
    pub interval_ms: u64,
    pub sealed_in_interval: u64,
    pub opened_in_interval: u64,
    pub refused_in_interval: BTreeMap<String, u64>,
}

/// A control message with its sender and sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlMessage {
    /// The sender's node id.
    pub from: String,
    /// Strictly increasing per sender, across restarts (it starts at the clock).
    pub seq: u64,
    /// Unix milliseconds when sent.
    pub time_ms: u64,
    pub body: Body,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("not a sealed control message")]
    NotSealed,
    #[error("sealed under a data epoch, not the control key")]
    WrongEpoch,
    #[error("does not open under this root key's control key")]
    Forged,
    #[error("the body is not a control message")]
    Malformed,
    #[error("replayed or out-of-order sequence number")]
    Replayed,
    #[error("cannot seal: {0}")]
    Seal(&'static str),
}

impl ControlError {
    /// Label of `cipherbus_control_refused_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            ControlError::NotSealed => "not_sealed",
            ControlError::WrongEpoch => "wrong_epoch",
            ControlError::Forged => "forged",
            ControlError::Malformed => "malformed",
            ControlError::Replayed => "replayed",
            ControlError::Seal(_) => "seal",
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seals control messages for one sender.
pub struct ControlSealer {
    node: String,
    seq: u64,
    sealer: Sealer,
}

impl std::fmt::Debug for ControlSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSealer")
            .field("node", &self.node)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl ControlSealer {
    pub fn new(node: impl Into<String>, control_key: &DataKey) -> Result<Self, ControlError> {
        let sealer =
            Sealer::new(CONTROL_EPOCH, control_key).map_err(|e| ControlError::Seal(e.reason()))?;
        // Microseconds since the epoch: a restarted sender keeps counting upwards.
        let seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Ok(ControlSealer {
            node: node.into(),
            seq,
            sealer,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Seals `body` for publication on `subject`.
    pub fn seal(&mut self, subject: &str, body: Body) -> Result<Vec<u8>, ControlError> {
        self.seq += 1;
        let msg = ControlMessage {
            from: self.node.clone(),
            seq: self.seq,
            time_ms: now_ms(),
            body,
        };
        seal_message(&mut self.sealer, subject, &msg)
    }
}

/// Seals an already numbered message with a sealer for [`CONTROL_EPOCH`] under the control key.
///
/// [`ControlSealer::seal`] is the way to send; this is public so the fuzz targets can seal
/// messages with chosen senders and sequence numbers.
#[doc(hidden)]
pub fn seal_message(
    sealer: &mut Sealer,
    subject: &str,
    msg: &ControlMessage,
) -> Result<Vec<u8>, ControlError> {
    // Plain data with string keys always serializes.
    let json = serde_json::to_vec(msg).expect("control message serializes");
    let mut out = BytesMut::with_capacity(json.len() + envelope::OVERHEAD);
    sealer
        .seal_into(Some(subject.as_bytes()), &json, &mut out)
        .map_err(|e| ControlError::Seal(e.reason()))?;
    Ok(out.to_vec())
}

/// Opens control messages received on `subject`, without the replay check.
pub fn open(
    opener: &mut Opener,
    control_key: &DataKey,
    subject: &str,
    payload: &[u8],
) -> Result<ControlMessage, ControlError> {
    if !envelope::is_envelope(payload) {
        return Err(ControlError::NotSealed);
    }
    let header = Header::parse(payload).map_err(|_| ControlError::NotSealed)?;
    if header.epoch != CONTROL_EPOCH {
        return Err(ControlError::WrongEpoch);
    }
    let mut json = BytesMut::with_capacity(payload.len());
    opener
        .open_into(
            control_key,
            &header,
            payload,
            subject.as_bytes(),
            false,
            &mut json,
        )
        .map_err(|_| ControlError::Forged)?;
    serde_json::from_slice(&json).map_err(|_| ControlError::Malformed)
}

/// Refuses a control message whose sender already used its sequence number (or a later one).
#[derive(Debug, Default)]
pub struct ReplayGuard {
    last: HashMap<String, (u64, u64)>,
    tick: u64,
}

impl ReplayGuard {
    pub fn check(&mut self, msg: &ControlMessage) -> Result<(), ControlError> {
        self.tick += 1;
        if let Some((seq, used)) = self.last.get_mut(&msg.from) {
            if msg.seq <= *seq {
                return Err(ControlError::Replayed);
            }
            *seq = msg.seq;
            *used = self.tick;
            return Ok(());
        }
        if self.last.len() >= MAX_SENDERS {
            if let Some(oldest) = self
                .last
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                self.last.remove(&oldest);
            }
        }
        self.last.insert(msg.from.clone(), (msg.seq, self.tick));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{derive_control_key, RootKey};

    const SUBJECT: &str = "cipherbus.ctl.announce";

    #[test]
    fn round_trip_and_refusals() {
        let key = derive_control_key(&RootKey::from_bytes([1; 32]));
        let mut sealer = ControlSealer::new("node-a", &key).unwrap();
        let mut opener = Opener::new();
        let mut guard = ReplayGuard::default();
        let body = Body::Activate { epoch: 7 };
        let sealed = sealer.seal(SUBJECT, body.clone()).unwrap();

        let msg = open(&mut opener, &key, SUBJECT, &sealed).unwrap();
        assert_eq!(msg.body, body);
        assert_eq!(msg.from, "node-a");
        assert_eq!(guard.check(&msg), Ok(()));
        assert_eq!(
            guard.check(&msg),
            Err(ControlError::Replayed),
            "a replay is refused"
        );

        let newer = open(
            &mut opener,
            &key,
            SUBJECT,
            &sealer.seal(SUBJECT, body.clone()).unwrap(),
        )
        .unwrap();
        assert!(newer.seq > msg.seq);
        assert_eq!(guard.check(&newer), Ok(()));

        let other_root = derive_control_key(&RootKey::from_bytes([2; 32]));
        assert_eq!(
            open(&mut Opener::new(), &other_root, SUBJECT, &sealed),
            Err(ControlError::Forged),
            "a different root key cannot read it"
        );
        assert_eq!(
            open(&mut opener, &key, "cipherbus.ctl.other", &sealed),
            Err(ControlError::Forged),
            "moved to another subject"
        );
        assert_eq!(
            open(
                &mut opener,
                &key,
                SUBJECT,
                br#"{"type":"activate","epoch":9}"#
            ),
            Err(ControlError::NotSealed)
        );
        let mut data_epoch = sealed.clone();
        data_epoch[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            open(&mut opener, &key, SUBJECT, &data_epoch),
            Err(ControlError::WrongEpoch)
        );
    }

    #[test]
    fn a_restarted_sender_keeps_counting_up() {
        let key = derive_control_key(&RootKey::from_bytes([1; 32]));
        let mut guard = ReplayGuard::default();
        let mut first = ControlSealer::new("node-a", &key).unwrap();
        let m1 = open(
            &mut Opener::new(),
            &key,
            SUBJECT,
            &first.seal(SUBJECT, Body::Ack { epoch: 2 }).unwrap(),
        )
        .unwrap();
        guard.check(&m1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut restarted = ControlSealer::new("node-a", &key).unwrap();
        let m2 = open(
            &mut Opener::new(),
            &key,
            SUBJECT,
            &restarted.seal(SUBJECT, Body::Ack { epoch: 2 }).unwrap(),
        )
        .unwrap();
        assert_eq!(guard.check(&m2), Ok(()));
    }

    #[test]
    fn reports_and_status_round_trip() {
        let report = Body::Report(Report {
            host: "h".into(),
            version: "1".into(),
            active: 3,
            connections: 2,
            sealed_messages: 5,
            opened_messages: 4,
            refused: [("auth".to_owned(), 1)].into(),
        });
        let status = Body::StatusReply(Status {
            authority: "a".into(),
            host: "h".into(),
            acting_since_ms: 1,
            standby: vec![],
            active: 3,
            activated: None,
            schedule: Schedule {
                next: None,
                why: None,
                rotate_every_s: None,
                sealed_messages: 0,
                sealed_bytes: 0,
                max_messages: None,
                max_bytes: None,
            },
            proxies: vec![],
        });
        for body in [report, status, Body::StatusRequest {}] {
            let json = serde_json::to_string(&body).unwrap();
            assert_eq!(serde_json::from_str::<Body>(&json).unwrap(), body, "{json}");
        }
        // Unknown fields stay refused inside the new bodies too.
        let extra = r#"{"type":"status_request","x":1}"#;
        assert!(serde_json::from_str::<Body>(extra).is_err());
    }

    #[test]
    fn the_guard_is_bounded() {
        let mut guard = ReplayGuard::default();
        for i in 0..(MAX_SENDERS + 10) {
            let msg = ControlMessage {
                from: format!("n{i}"),
                seq: 1,
                time_ms: 0,
                body: Body::Ack { epoch: 1 },
            };
            guard.check(&msg).unwrap();
        }
        assert!(guard.last.len() <= MAX_SENDERS);
    }
}
