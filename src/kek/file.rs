//! Where the root key (KEK) comes from.
//!
//! This module owns reading and writing the root key file. Other sources (a KMS) plug in
//! behind [`RootKeySource`]; nothing else in the proxy knows where the root came from.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::envelope::RootKey;

/// A source of the root key.
pub trait RootKeySource {
    fn load(&self) -> Result<RootKey, KeySourceError>;
}

#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    #[error("cannot read root key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root key file {path} is malformed: expected 64 hex digits (as written by `cipherbus keygen`)")]
    Malformed { path: PathBuf },
    #[error("{path} already exists; refusing to overwrite a root key")]
    Exists { path: PathBuf },
    #[error("cannot write root key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no randomness available to generate a key")]
    Random,
}

/// A root key kept as 64 hex digits in a file readable only by its owner.
#[derive(Debug, Clone)]
pub struct KekFile(pub PathBuf);

impl RootKeySource for KekFile {
    fn load(&self) -> Result<RootKey, KeySourceError> {
        let path = &self.0;
        let text = Zeroizing::new(std::fs::read(path).map_err(|source| KeySourceError::Read {
            path: path.clone(),
            source,
        })?);
        let malformed = || KeySourceError::Malformed { path: path.clone() };
        let hex_digits = text.trim_ascii();
        if hex_digits.len() != 64 {
            return Err(malformed());
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_digits, &mut bytes[..]).map_err(|_| malformed())?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "root key file is readable by group or others; chmod 600 it");
            }
        }
        Ok(RootKey::from_bytes(*bytes))
    }
}

/// Writes a new random root key to `path` with mode 0600; never overwrites.
pub fn write_new_kek(path: &Path) -> Result<RootKey, KeySourceError> {
    let key = RootKey::generate().map_err(|_| KeySourceError::Random)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeySourceError::Exists {
                path: path.to_owned(),
            },
            _ => KeySourceError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    // Not left to the umask: the key is written only once the file is 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|source| KeySourceError::Write {
            path: path.to_owned(),
            source,
        })?;
    let mut text = Zeroizing::new(hex::encode(key.expose()));
    text.push('\n');
    let write = |source| KeySourceError::Write {
        path: path.to_owned(),
        source,
    };
    file.write_all(text.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let key = write_new_kek(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = KekFile(path.clone()).load().unwrap();
        assert_eq!(loaded.fingerprint(), key.fingerprint());
        assert!(matches!(
            write_new_kek(&path),
            Err(KeySourceError::Exists { .. })
        ));
        assert_eq!(
            KekFile(path).load().unwrap().fingerprint(),
            key.fingerprint()
        );
    }

    #[test]
    fn malformed_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        assert!(matches!(
            KekFile(path.clone()).load(),
            Err(KeySourceError::Read { .. })
        ));
        for bad in ["", "abcd", &"zz".repeat(32), &"ab".repeat(33)] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(
                    KekFile(path.clone()).load(),
                    Err(KeySourceError::Malformed { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
