//! The state directory: wrapped data keys and the keyring's state, on disk.
//!
//! This module owns the files under the state directory and nothing else. Keys are written only
//! wrapped under the root key; the plain key never touches the disk. Every write goes to a
//! temporary file that is synced and renamed, so a crash leaves the old or the new state, never
//! half of one. Files are created 0600 and the directory 0700.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{KeyState, KeyringError};

/// What `state.json` holds: every epoch ever known and its state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub version: u32,
    pub epochs: Vec<EpochRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    pub epoch: u32,
    pub state: KeyState,
    pub fingerprint: String,
    /// Unix seconds.
    pub created: u64,
    pub activated: Option<u64>,
}

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens or creates the state directory, tightening it and `keys/` to 0700.
    pub fn open(dir: &Path) -> Result<Self, KeyringError> {
        let io = |source| KeyringError::Io {
            path: dir.to_owned(),
            source,
        };
        let keys = dir.join("keys");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&keys)
            .map_err(io)?;
        // Set explicitly: the umask and a directory made earlier by someone else do not count.
        for d in [dir, keys.as_path()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(Store {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn key_path(&self, epoch: u32) -> PathBuf {
        self.dir.join("keys").join(format!("epoch-{epoch:010}.key"))
    }

    /// Reads `state.json`; a missing file is an empty state, a damaged one is an error.
    pub fn load_state(&self) -> Result<StateFile, KeyringError> {
        let path = self.state_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Starting over at epoch 1 beside wrapped keys of later epochs would seal with
                // a key the others may have retired or destroyed.
                if let Some(key) = self.any_key_file() {
                    return Err(KeyringError::Corrupt {
                        path,
                        why: format!(
                            "it is missing, but {} is there; refusing to start over at epoch 1",
                            key.display()
                        ),
                    });
                }
                return Ok(StateFile::default());
            }
            Err(source) => return Err(KeyringError::Io { path, source }),
        };
        let state: StateFile = serde_json::from_str(&text).map_err(|e| KeyringError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(KeyringError::Corrupt {
                path,
                why: format!("unsupported state version {}", state.version),
            });
        }
        Ok(state)
    }

    fn any_key_file(&self) -> Option<PathBuf> {
        fs::read_dir(self.dir.join("keys"))
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "key"))
    }

    pub fn save_state(&self, state: &StateFile) -> Result<(), KeyringError> {
        // Serializing plain data with string keys cannot fail.
        let text = serde_json::to_vec_pretty(state).expect("state serializes");
        write_atomic(&self.state_path(), &text)
    }

    pub fn save_wrapped(&self, epoch: u32, wrapped: &[u8]) -> Result<(), KeyringError> {
        write_atomic(&self.key_path(epoch), wrapped)
    }

    pub fn load_wrapped(&self, epoch: u32) -> Result<Option<Vec<u8>>, KeyringError> {
        let path = self.key_path(epoch);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KeyringError::Io { path, source }),
        }
    }

    /// Overwrites the wrapped key with zeros, syncs, then unlinks it.
    pub fn shred(&self, epoch: u32) -> Result<(), KeyringError> {
        let path = self.key_path(epoch);
        let io = |source| KeyringError::Io {
            path: path.clone(),
            source,
        };
        match fs::metadata(&path) {
            Ok(meta) => {
                let mut f = OpenOptions::new().write(true).open(&path).map_err(io)?;
                f.write_all(&vec![0u8; meta.len() as usize]).map_err(io)?;
                f.sync_all().map_err(io)?;
                drop(f);
                fs::remove_file(&path).map_err(io)?;
                sync_dir(path.parent().unwrap_or(&self.dir));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e)),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KeyringError> {
    let tmp = path.with_extension("tmp");
    let io = |source| KeyringError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    // `mode` applies only when the file is new and is masked by the umask; a stale temporary
    // file keeps its old mode. Set it on the open file before any byte is written.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Makes a rename durable. Best effort: some filesystems refuse to sync a directory.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn loose_modes_left_by_others_are_tightened() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("state");
        fs::create_dir_all(dir.join("keys")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.join("keys"), fs::Permissions::from_mode(0o777)).unwrap();
        // A temporary file left behind by a crash, readable by everyone.
        let stale = dir.join("keys/epoch-0000000002.tmp");
        fs::write(&stale, b"old").unwrap();
        fs::set_permissions(&stale, fs::Permissions::from_mode(0o644)).unwrap();

        let store = Store::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("keys")), 0o700);
        store.save_wrapped(2, &[1u8; 73]).unwrap();
        store.save_state(&StateFile::default()).unwrap();
        assert_eq!(mode(&store.key_path(2)), 0o600);
        assert_eq!(mode(&dir.join("state.json")), 0o600);
        assert!(!stale.exists(), "renamed into place");
    }

    #[test]
    fn a_new_state_directory_is_private_from_the_start() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b/state");
        Store::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("keys")), 0o700);
    }
}
