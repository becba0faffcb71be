//! The audit trail: an authenticated, hash-chained JSON-lines log of key events, kept in a
//! local file and, where the bus has JetStream, in a stream that refuses deletes and purges.
//!
//! This module owns the entry format, appending to the file, and verifying a log. Each line is
//! one JSON object, written as `BODY` with `,"mac":"<hex>"}` spliced in before its closing
//! brace, where `mac = HMAC-SHA256(audit key, BODY)` over the exact bytes of `BODY`. The audit
//! key is derived from the root key (`envelope::derive_audit_key`), so only a holder of the
//! root can write an entry that verifies. `BODY` carries `prev`, the MAC of the line before
//! (64 zeros for the first), and `deployment`, the root key's fingerprint. Changing, removing,
//! reordering or inserting a line breaks the chain at that line, and recomputing the chain
//! needs the root. Cutting lines off the end of a file leaves a valid shorter chain: the
//! stream copy ([`stream`]) is what shows that. Entries carry epochs and key fingerprints,
//! never key bytes.

pub mod stream;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};

use crate::envelope::RootKey;

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lines written to the file but not yet confirmed by the stream, at most; past this the
/// oldest are dropped from the queue (they stay in the file) and the copies are told apart
/// at the next start.
const MAX_PENDING: usize = 100_000;

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Generated,
    Staged,
    Activated,
    Retired,
    Destroyed,
    Revoked,
    Laggard,
    Refused,
    /// Every key wrapped again under the root's newest version.
    Rewrapped,
}

/// One event, as the caller describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub epoch: Option<u32>,
    pub fingerprint: Option<String>,
    pub actor: String,
    pub reason: String,
}

/// One line of the log, without its MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub epoch: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fingerprint: Option<String>,
    pub actor: String,
    pub reason: String,
    /// The root key's fingerprint: which deployment wrote the entry.
    pub deployment: String,
    pub prev: String,
}

/// The key that authenticates entries, and the deployment it belongs to.
pub struct AuditKey {
    key: hmac::Key,
    deployment: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("deployment", &self.deployment)
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    pub fn new(root: &RootKey) -> Self {
        Self::from_root(&crate::kek::Root::from_key(root))
    }

    /// The audit key of a root from any source.
    pub fn from_root(root: &crate::kek::Root) -> Self {
        // aws-lc keeps its own copy of the key, cleansed when the HMAC key is freed.
        AuditKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, root.audit_key().bytes()),
            deployment: root.fingerprint().to_owned(),
        }
    }

    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    fn mac(&self, body: &[u8]) -> String {
        hex::encode(hmac::sign(&self.key, body))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {source_name}, entry {line}: {why}")]
    Broken {
        source_name: String,
        line: u64,
        why: String,
    },
    #[error("audit stream {stream}: {why}")]
    Stream { stream: String, why: String },
    #[error("{0}")]
    Mismatch(String),
}

/// An open, append-only audit log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    key: AuditKey,
    inner: Mutex<Tail>,
}

#[derive(Debug)]
struct Tail {
    file: File,
    seq: u64,
    mac: String,
    /// The highest epoch a `generated` entry of this file or its stream names.
    max_generated: u32,
    /// With a stream attached: lines not yet confirmed by it, oldest first.
    pending: Option<VecDeque<(u64, String)>>,
}

impl AuditLog {
    /// Opens (or creates) the log, sets it to mode 0600, and verifies it so far, so a damaged
    /// log, or one another deployment wrote, is reported instead of extended.
    pub fn open(path: &Path, key: AuditKey) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        // Set explicitly: `mode` is masked by the umask and ignored for an existing file.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        let verified = verify(path, &key)?;
        Ok(AuditLog {
            path: path.to_owned(),
            key,
            inner: Mutex::new(Tail {
                file,
                seq: verified.entries,
                mac: verified.last_mac().to_owned(),
                max_generated: verified.max_generated,
                pending: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one event and syncs it to disk.
    pub fn append(&self, event: Event) -> Result<Entry, AuditError> {
        let mut tail = self.tail();
        let entry = Entry {
            seq: tail.seq + 1,
            time: rfc3339_now(),
            event: event.kind,
            epoch: event.epoch,
            fingerprint: event.fingerprint,
            actor: event.actor,
            reason: event.reason,
            deployment: self.key.deployment.clone(),
            prev: tail.mac.clone(),
        };
        let (line, mac) = seal_line(&self.key, &entry);
        self.write_line(&mut tail, &line)?;
        tail.seq = entry.seq;
        tail.mac = mac;
        if entry.event == EventKind::Generated {
            tail.max_generated = tail.max_generated.max(entry.epoch.unwrap_or(0));
        }
        if let Some(pending) = &mut tail.pending {
            if pending.len() >= MAX_PENDING {
                pending.pop_front();
            }
            pending.push_back((entry.seq, line));
        }
        Ok(entry)
    }

    fn write_line(&self, tail: &mut Tail, line: &str) -> Result<(), AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        tail.file.write_all(line.as_bytes()).map_err(io)?;
        tail.file.write_all(b"\n").map_err(io)?;
        tail.file.sync_data().map_err(io)
    }

    /// The number of entries, and the MAC of the last.
    pub fn head(&self) -> (u64, String) {
        let tail = self.tail();
        (tail.seq, tail.mac.clone())
    }

    /// Ties this file to the stream copy `remote` (verified). Entries only the stream has are
    /// appended here; entries only this file has, and every entry appended from now on, are
    /// queued for the stream ([`AuditLog::next_pending`]). Where the two part ways (another
    /// authority wrote the stream while this one stood by), this file is kept aside as
    /// `<file>.diverged-<unix time>`, still verifiable on its own, and rebuilt from the
    /// stream; returns the name it was kept under.
    pub fn attach(&self, remote: &Verified) -> Result<Option<PathBuf>, AuditError> {
        let mut tail = self.tail();
        let local = verify(&self.path, &self.key)?;
        let common = local.lines.len().min(remote.lines.len());
        let diverged =
            (0..common).any(|i| !crate::ct::eq_str(&local.lines[i].2, &remote.lines[i].2));
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let mut kept = None;
        let from = if diverged {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = PathBuf::from(format!("{}.diverged-{secs}", self.path.display()));
            std::fs::rename(&self.path, &aside).map_err(io)?;
            tail.file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .map_err(io)?;
            tail.seq = 0;
            tail.mac = GENESIS.to_owned();
            kept = Some(aside);
            0
        } else {
            common
        };
        for (seq, line, mac) in &remote.lines[from..] {
            self.write_line(&mut tail, line)?;
            tail.seq = *seq;
            tail.mac = mac.clone();
        }
        let pending: VecDeque<(u64, String)> = if diverged {
            VecDeque::new()
        } else {
            local.lines[common..]
                .iter()
                .map(|(seq, line, _)| (*seq, line.clone()))
                .collect()
        };
        tail.pending = Some(pending);
        // The file's own entries count too, kept aside or not: an epoch number is never
        // handed out twice, even one whose generation was refused.
        tail.max_generated = tail
            .max_generated
            .max(local.max_generated)
            .max(remote.max_generated);
        Ok(kept)
    }

    /// The highest epoch any `generated` entry seen here names: the next rotation takes a
    /// higher one.
    pub fn max_generated(&self) -> u32 {
        self.tail().max_generated
    }

    /// Stops queueing lines for the stream (another authority writes it now).
    pub fn detach(&self) {
        self.tail().pending = None;
    }

    /// The oldest line the stream has not confirmed.
    pub fn next_pending(&self) -> Option<(u64, String)> {
        self.tail().pending.as_ref()?.front().cloned()
    }

    /// The stream confirmed line `seq`.
    pub fn confirmed(&self, seq: u64) {
        if let Some(pending) = &mut self.tail().pending {
            if pending.front().is_some_and(|(s, _)| *s == seq) {
                pending.pop_front();
            }
        }
    }
}

/// The line for an entry (without a newline) and its MAC.
fn seal_line(key: &AuditKey, entry: &Entry) -> (String, String) {
    // A struct of strings and integers always serializes.
    let body = serde_json::to_string(entry).expect("audit entry serializes");
    let mac = key.mac(body.as_bytes());
    let open = &body[..body.len() - 1];
    (format!("{open},\"mac\":\"{mac}\"}}"), mac)
}

/// A log read and checked entry by entry.
#[derive(Debug)]
pub struct Chain<'k> {
    key: &'k AuditKey,
    source_name: String,
    prev: String,
    count: u64,
}

impl<'k> Chain<'k> {
    pub fn new(key: &'k AuditKey, source_name: impl Into<String>) -> Self {
        Chain {
            key,
            source_name: source_name.into(),
            prev: GENESIS.to_owned(),
            count: 0,
        }
    }

    /// Checks the next line: its MAC, its deployment, its link to the line before and its
    /// sequence number. Returns the entry and its MAC.
    pub fn check(&mut self, line: &[u8]) -> Result<(Entry, String), AuditError> {
        let broken = |why: &str| AuditError::Broken {
            source_name: self.source_name.clone(),
            line: self.count + 1,
            why: why.to_owned(),
        };
        const SUFFIX_LEN: usize = ",\"mac\":\"\"}".len() + 64;
        if line.len() < SUFFIX_LEN + 2 {
            return Err(broken("not an audit entry"));
        }
        let (head, suffix) = line.split_at(line.len() - SUFFIX_LEN);
        let Some(stated) = suffix
            .strip_prefix(b",\"mac\":\"")
            .and_then(|s| s.strip_suffix(b"\"}"))
        else {
            return Err(broken(
                "no MAC at the end of the line (an unauthenticated entry, or one from before \
                 version 2 of the format)",
            ));
        };
        let mut body = head.to_vec();
        body.push(b'}');
        let stated_bytes = hex::decode(stated).map_err(|_| broken("the MAC is not hex"))?;
        let entry: Option<Entry> = serde_json::from_slice(&body).ok();
        if let Some(e) = &entry {
            if e.deployment != self.key.deployment {
                return Err(broken(&format!(
                    "written by another deployment (root key {}, not {})",
                    e.deployment, self.key.deployment
                )));
            }
        }
        if hmac::verify(&self.key.key, &body, &stated_bytes).is_err() {
            return Err(broken(
                "MAC does not match the line's contents (edited, or not written with this root key)",
            ));
        }
        let entry = entry.ok_or_else(|| broken("not an audit entry"))?;
        if !crate::ct::eq_str(&entry.prev, &self.prev) {
            return Err(broken(
                "does not follow the entry before it (prev differs): an entry was removed, \
                 inserted or moved",
            ));
        }
        if entry.seq != self.count + 1 {
            return Err(broken("sequence number out of order"));
        }
        // `stated` verified, so it is 64 hex digits.
        let mac = String::from_utf8_lossy(stated).into_owned();
        self.prev = mac.clone();
        self.count += 1;
        Ok((entry, mac))
    }

    pub fn entries(&self) -> u64 {
        self.count
    }
}

/// What a successful verification found: every entry's line and MAC, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verified {
    pub entries: u64,
    /// `(seq, line, mac)` of every entry.
    pub lines: Vec<(u64, String, String)>,
    /// The highest epoch a `generated` entry names (0 if none).
    pub max_generated: u32,
}

impl Verified {
    /// The MAC of the last entry, or [`GENESIS`].
    pub fn last_mac(&self) -> &str {
        self.lines.last().map_or(GENESIS, |(_, _, m)| m.as_str())
    }
}

/// Checks a sequence of lines from `source_name`; the error names the first bad entry.
pub fn verify_lines(
    key: &AuditKey,
    source_name: &str,
    lines: impl IntoIterator<Item = Vec<u8>>,
) -> Result<Verified, AuditError> {
    let mut chain = Chain::new(key, source_name);
    let mut out = Verified::default();
    for line in lines {
        let (entry, mac) = chain.check(&line)?;
        if entry.event == EventKind::Generated {
            out.max_generated = out.max_generated.max(entry.epoch.unwrap_or(0));
        }
        out.lines
            .push((entry.seq, String::from_utf8_lossy(&line).into_owned(), mac));
    }
    out.entries = chain.entries();
    Ok(out)
}

/// Checks every line of the file at `path`; the error names the first bad line (1-based).
pub fn verify(path: &Path, key: &AuditKey) -> Result<Verified, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut lines = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        lines.push(line.map_err(io)?);
    }
    verify_lines(key, &path.display().to_string(), lines)
}

/// Where two verified copies of one log part ways, as a sentence, or `None` if they hold the
/// same entries. `a` is the copy being checked (a file), `b` the reference (the stream).
pub fn compare(a_name: &str, a: &Verified, b_name: &str, b: &Verified) -> Option<String> {
    let common = a.lines.len().min(b.lines.len());
    if let Some(i) = (0..common).find(|&i| !crate::ct::eq_str(&a.lines[i].2, &b.lines[i].2)) {
        return Some(format!(
            "{a_name} and {b_name} differ at entry {}: one of them was rewritten",
            i + 1
        ));
    }
    match a.lines.len().cmp(&b.lines.len()) {
        std::cmp::Ordering::Less => Some(format!(
            "{a_name} ends at entry {} but {b_name} goes on to entry {}: its tail was cut, or it \
             is an older copy",
            a.entries, b.entries
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "{b_name} ends at entry {} but {a_name} goes on to entry {}: entries {} to {} are \
             missing from {b_name}",
            b.entries,
            a.entries,
            b.entries + 1,
            a.entries
        )),
        std::cmp::Ordering::Equal => None,
    }
}

fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_millis())
}

/// Formats Unix seconds as `YYYY-MM-DDThh:mm:ss.mmmZ` (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey::new(&RootKey::from_bytes([5; 32]))
    }

    fn event(kind: EventKind, epoch: u32) -> Event {
        Event {
            kind,
            epoch: Some(epoch),
            fingerprint: Some("0123456789abcdef".into()),
            actor: "controller test".into(),
            reason: "scheduled".into(),
        }
    }

    fn write_log(path: &Path, n: u32) {
        let log = AuditLog::open(path, key()).unwrap();
        for e in 1..=n {
            log.append(event(EventKind::Staged, e)).unwrap();
        }
    }

    fn err_of(path: &Path) -> String {
        verify(path, &key()).unwrap_err().to_string()
    }

    #[test]
    fn appends_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 3);
        // Reopening continues the chain.
        let log = AuditLog::open(&path, key()).unwrap();
        let e = log.append(event(EventKind::Activated, 3)).unwrap();
        assert_eq!(e.seq, 4);
        assert_eq!(e.deployment, RootKey::from_bytes([5; 32]).fingerprint());
        assert_eq!(verify(&path, &key()).unwrap().entries, 4);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_existing_log_readable_by_others_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        AuditLog::open(&path, key()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn names_the_first_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 5);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replacen("\"epoch\":3", "\"epoch\":9", 1);
        std::fs::write(&path, edited).unwrap();
        assert!(err_of(&path).contains("entry 3: MAC does not match"));

        let mut dropped = lines.clone();
        dropped.remove(1);
        std::fs::write(&path, dropped.join("\n") + "\n").unwrap();
        assert!(err_of(&path).contains("entry 2: does not follow"));

        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        std::fs::write(&path, swapped.join("\n") + "\n").unwrap();
        assert!(err_of(&path).contains("entry 4"));

        std::fs::write(&path, "garbage\n").unwrap();
        assert!(
            AuditLog::open(&path, key()).is_err(),
            "a damaged log is not extended"
        );
    }

    /// What the unkeyed chain allowed: edit an entry and recompute everything after it. With
    /// the MAC, that needs the root key; SHA-256 recomputed over the edit does not verify.
    #[test]
    fn an_edit_with_its_hashes_recomputed_is_reported() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 3);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut out = String::new();
        let mut prev = GENESIS.to_owned();
        for line in text.lines() {
            let (body, _) = line.rsplit_once(",\"mac\":").unwrap();
            let mut entry: Entry = serde_json::from_str(&format!("{body}}}")).unwrap();
            entry.reason = "nothing to see".into();
            entry.prev = prev.clone();
            let body = serde_json::to_string(&entry).unwrap();
            prev = hex::encode(Sha256::digest(body.as_bytes()));
            out.push_str(&format!(
                "{},\"mac\":\"{prev}\"}}\n",
                &body[..body.len() - 1]
            ));
        }
        std::fs::write(&path, out).unwrap();
        assert!(
            err_of(&path).contains("entry 1: MAC does not match"),
            "{}",
            err_of(&path)
        );
    }

    #[test]
    fn a_log_of_another_deployment_or_an_old_format_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 2);
        let other = AuditKey::new(&RootKey::from_bytes([6; 32]));
        let err = verify(&path, &other).unwrap_err().to_string();
        assert!(
            err.contains("entry 1: written by another deployment"),
            "{err}"
        );
        assert!(AuditLog::open(&path, other).is_err());

        std::fs::write(
            &path,
            "{\"seq\":1,\"time\":\"t\",\"event\":\"staged\",\"actor\":\"a\",\"reason\":\"r\",\
             \"prev\":\"0000000000000000000000000000000000000000000000000000000000000000\",\
             \"hash\":\"0000000000000000000000000000000000000000000000000000000000000000\"}\n",
        )
        .unwrap();
        assert!(err_of(&path).contains("no MAC"), "{}", err_of(&path));
    }

    #[test]
    fn copies_are_compared_entry_by_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 4);
        let full = verify(&path, &key()).unwrap();
        let mut short = full.clone();
        short.lines.truncate(2);
        short.entries = 2;
        assert_eq!(compare("file", &full, "stream", &full), None);
        let cut = compare("file", &short, "stream", &full).unwrap();
        assert!(
            cut.contains("file ends at entry 2 but stream goes on to entry 4"),
            "{cut}"
        );
        let missing = compare("file", &full, "stream", &short).unwrap();
        assert!(
            missing.contains("entries 3 to 4 are missing from stream"),
            "{missing}"
        );
        let mut other = full.clone();
        other.lines[1].2 = GENESIS.to_owned();
        let differ = compare("file", &other, "stream", &full).unwrap();
        assert!(differ.contains("differ at entry 2"), "{differ}");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_696_496, 999), "2026-11-26T12:34:56.999Z");
    }
}
