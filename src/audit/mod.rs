//! The audit trail: a hash-chained JSON-lines log of key events.
//!
//! This module owns the log's format, appending to it, and verifying it. Each line is one JSON
//! object, written as `BODY` with `,"hash":"<hex>"}` spliced in before its closing brace, where
//! `hash = SHA-256(BODY)` over the exact bytes of `BODY`, and `BODY` carries `prev`, the hash
//! of the line before (64 zeros for the first). Changing, removing, reordering or inserting a
//! line breaks the chain at that line. Entries carry epochs and key fingerprints, never key
//! bytes.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

/// One line of the log, without its hash.
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
    pub prev: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {path}, line {line}: {why}")]
    Broken {
        path: PathBuf,
        line: u64,
        why: &'static str,
    },
}

/// An open, append-only audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<Tail>,
}

#[derive(Debug)]
struct Tail {
    file: File,
    seq: u64,
    hash: String,
}

impl AuditLog {
    /// Opens (or creates) the log, sets it to mode 0600, and verifies the chain so far, so a
    /// damaged log is reported instead of extended.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
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
        let (seq, hash) = match verify(path)? {
            Verified { entries: 0, .. } => (0, GENESIS.to_owned()),
            Verified { entries, last_hash } => (entries, last_hash),
        };
        Ok(AuditLog {
            path: path.to_owned(),
            inner: Mutex::new(Tail { file, seq, hash }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event and syncs it to disk.
    pub fn append(&self, event: Event) -> Result<Entry, AuditError> {
        let mut tail = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = Entry {
            seq: tail.seq + 1,
            time: rfc3339_now(),
            event: event.kind,
            epoch: event.epoch,
            fingerprint: event.fingerprint,
            actor: event.actor,
            reason: event.reason,
            prev: tail.hash.clone(),
        };
        let (line, hash) = seal_line(&entry);
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        tail.file.write_all(line.as_bytes()).map_err(io)?;
        tail.file.sync_data().map_err(io)?;
        tail.seq = entry.seq;
        tail.hash = hash;
        Ok(entry)
    }
}

/// The line for an entry (with its newline) and its hash.
fn seal_line(entry: &Entry) -> (String, String) {
    // A struct of strings and integers always serializes.
    let body = serde_json::to_string(entry).expect("audit entry serializes");
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let open = &body[..body.len() - 1];
    (format!("{open},\"hash\":\"{hash}\"}}\n"), hash)
}

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub last_hash: String,
}

/// Checks every line's hash, its link to the line before, and the sequence numbers. The error
/// names the first bad line (1-based).
pub fn verify(path: &Path) -> Result<Verified, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut prev = GENESIS.to_owned();
    let mut count = 0u64;
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line_no = i as u64 + 1;
        let broken = |why| AuditError::Broken {
            path: path.to_owned(),
            line: line_no,
            why,
        };
        let line = line.map_err(|source| AuditError::Io {
            path: path.to_owned(),
            source,
        })?;
        const SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;
        if line.len() < SUFFIX_LEN + 2 {
            return Err(broken("not an audit entry"));
        }
        let (head, suffix) = line.split_at(line.len() - SUFFIX_LEN);
        let stated = suffix
            .strip_prefix(b",\"hash\":\"")
            .and_then(|s| s.strip_suffix(b"\"}"))
            .ok_or_else(|| broken("no hash at the end of the line"))?;
        let mut body = head.to_vec();
        body.push(b'}');
        let actual = hex::encode(Sha256::digest(&body));
        if !crate::ct::eq(actual.as_bytes(), stated) {
            return Err(broken("hash does not match the line's contents"));
        }
        let entry: Entry =
            serde_json::from_slice(&body).map_err(|_| broken("not an audit entry"))?;
        if !crate::ct::eq_str(&entry.prev, &prev) {
            return Err(broken(
                "does not follow the line before it (prev hash differs)",
            ));
        }
        if entry.seq != count + 1 {
            return Err(broken("sequence number out of order"));
        }
        prev = actual;
        count += 1;
    }
    Ok(Verified {
        entries: count,
        last_hash: prev,
    })
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
        let log = AuditLog::open(path).unwrap();
        for e in 1..=n {
            log.append(event(EventKind::Staged, e)).unwrap();
        }
    }

    #[test]
    fn appends_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 3);
        // Reopening continues the chain.
        let log = AuditLog::open(&path).unwrap();
        let e = log.append(event(EventKind::Activated, 3)).unwrap();
        assert_eq!(e.seq, 4);
        assert_eq!(verify(&path).unwrap().entries, 4);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_existing_log_readable_by_others_is_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        AuditLog::open(&path).unwrap();
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
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");

        let mut dropped = lines.clone();
        dropped.remove(1);
        std::fs::write(&path, dropped.join("\n") + "\n").unwrap();
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");

        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        std::fs::write(&path, swapped.join("\n") + "\n").unwrap();
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");

        std::fs::write(&path, lines[..4].join("\n") + "\n").unwrap();
        assert_eq!(
            verify(&path).unwrap().entries,
            4,
            "a truncated tail still verifies"
        );
        assert!(AuditLog::open(&path).is_ok());

        std::fs::write(&path, "garbage\n").unwrap();
        assert!(
            AuditLog::open(&path).is_err(),
            "a damaged log is not extended"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_696_496, 999), "2026-11-26T12:34:56.999Z");
    }
}
