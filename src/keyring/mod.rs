//! The keyring: data keys by epoch, their states, and the snapshot the hot path reads.
//!
//! This module owns which key seals (the single `active` epoch), which keys open (`staged`,
//! `active`, `retired`), and which are gone (`destroyed`). It does not speak to the bus: the
//! control plane decides *when* to stage, activate or destroy, and calls in here.
//!
//! - The hot path reads an immutable [`Snapshot`] through an `ArcSwap`, with no lock.
//!   Every change builds the next snapshot off the hot path and swaps it in; its `generation`
//!   tells sessions to drop cached subkeys.
//! - Retired keys live in a bounded LRU on a `DashMap` (`retired.rs`). A start unwraps none
//!   of them: a miss unwraps the key from the state directory on its first use, once however
//!   many sessions ask (epoch 1 is derived from the root key instead).
//! - Epochs only move forward. Staging an epoch at or below one already known is refused, and a
//!   destroyed epoch never comes back, not even after a restart.

mod retired;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::envelope::{self, DataKey};
use crate::kek::Root;
use store::{EpochRecord, StateFile, Store, STATE_VERSION};

/// Key states, after NIST SP 800-57.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Opens, does not seal yet.
    Staged,
    /// The one key that seals.
    Active,
    /// Opens until retention ends.
    Retired,
    /// Zeroized and shredded; its ciphertext can no longer be opened.
    Destroyed,
}

/// A data key and its epoch.
pub struct EpochKey {
    pub epoch: u32,
    pub key: DataKey,
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey")
            .field("epoch", &self.epoch)
            .field("fingerprint", &self.key.fingerprint())
            .finish()
    }
}

/// What the hot path reads: immutable, swapped whole.
#[derive(Debug)]
pub struct Snapshot {
    /// Changes on every keyring change; sessions compare it to drop cached subkeys.
    pub generation: u64,
    pub active: Arc<EpochKey>,
    staged: Vec<Arc<EpochKey>>,
    /// Keys announced while the state directory could not hold them: kept in memory to open
    /// what other proxies seal under them, never to seal, and not among `states` (they are
    /// not staged here). At most [`MAX_UNSAVED`]; gone at restart or once persisted.
    unsaved: Vec<Arc<EpochKey>>,
    /// Every epoch and its state (retired keys themselves are in the LRU or on disk).
    states: Arc<BTreeMap<u32, KeyState>>,
}

impl Snapshot {
    pub fn state(&self, epoch: u32) -> Option<KeyState> {
        self.states.get(&epoch).copied()
    }

    /// The highest epoch known here, in any state.
    pub fn newest(&self) -> u32 {
        self.states
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.active.epoch)
    }

    pub fn epochs(&self) -> impl Iterator<Item = (u32, KeyState)> + '_ {
        self.states.iter().map(|(e, s)| (*e, *s))
    }

    /// Epochs held in memory to open only, because they could not be persisted.
    pub fn unsaved(&self) -> impl Iterator<Item = u32> + '_ {
        self.unsaved.iter().map(|k| k.epoch)
    }

    /// The unsaved keys other than `epoch`'s.
    fn unsaved_except(&self, epoch: u32) -> Vec<Arc<EpochKey>> {
        let keep = self.unsaved.iter().filter(|k| k.epoch != epoch);
        keep.cloned().collect()
    }

    /// The next snapshot: this one with other unsaved keys.
    fn with_unsaved(&self, unsaved: Vec<Arc<EpochKey>>) -> Snapshot {
        Snapshot {
            generation: self.generation + 1,
            active: self.active.clone(),
            staged: self.staged.clone(),
            unsaved,
            states: self.states.clone(),
        }
    }
}

/// Keys held unsaved at most: a disk that stays full through more rotations than this keeps
/// only the newest, which are the ones other proxies seal under.
pub const MAX_UNSAVED: usize = 4;

/// Why no key could be found for an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMiss {
    /// Never seen here (a newer epoch not yet announced, or a forged header).
    Unknown,
    /// Destroyed: crypto-shredded.
    Destroyed,
    /// Known, but its wrapped copy could not be read or unwrapped.
    Unavailable,
}

impl KeyMiss {
    pub fn reason(self) -> &'static str {
        match self {
            KeyMiss::Unknown => "unknown_epoch",
            KeyMiss::Destroyed => "destroyed",
            KeyMiss::Unavailable => "key_unavailable",
        }
    }
}

/// A key found by [`Keyring::lookup`]: borrowed from the snapshot when it is there.
pub enum KeyHandle<'a> {
    Borrowed(&'a EpochKey),
    Owned(Arc<EpochKey>),
}

impl Deref for KeyHandle<'_> {
    type Target = EpochKey;
    fn deref(&self) -> &EpochKey {
        match self {
            KeyHandle::Borrowed(k) => k,
            KeyHandle::Owned(k) => k,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("state directory file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory file {path} is damaged: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("epoch {epoch}: {why}")]
    Refused {
        epoch: u32,
        why: &'static str,
        /// The metrics label: `stale_epoch`, `not_staged`, `unknown_epoch`, `not_stored` or
        /// `active_epoch`.
        reason: &'static str,
    },
    #[error("key material: {0}")]
    Envelope(#[from] envelope::EnvelopeError),
    #[error("{0}")]
    Root(#[from] crate::kek::RootError),
}

impl KeyringError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyringError::Io { .. } | KeyringError::Corrupt { .. } => "persist",
            KeyringError::Refused { reason, .. } => reason,
            KeyringError::Envelope(_) => "key_material",
            KeyringError::Root(e) => e.reason(),
        }
    }
}

struct RetiredSlot {
    key: Arc<EpochKey>,
    last_used: AtomicU64,
}

/// The process-wide keyring.
pub struct Keyring {
    root: Arc<Root>,
    /// Each epoch's key as it was wrapped (announced, or wrapped here once), so the authority
    /// never calls the root again for a key it already wrapped. Ciphertext only.
    wrapped: Mutex<HashMap<u32, Arc<[u8]>>>,
    current: ArcSwap<Snapshot>,
    retired: DashMap<u32, RetiredSlot>,
    retired_cap: usize,
    clock: AtomicU64,
    store: Option<Store>,
    /// Serializes changes. The hot path takes it only on a retired key's first use, to check
    /// the key against its recorded fingerprint.
    records: Mutex<StateFile>,
    /// Raised by sessions that saw an epoch newer than any known; the control plane answers
    /// with one sync, however many sessions asked.
    sync_wanted: tokio::sync::Notify,
    /// Retired epochs whose key could not be loaded, and when it was last tried: not tried
    /// again (nor logged) for [`UNAVAILABLE_RETRY`], so a stream of messages under a damaged
    /// epoch costs no disk read each. Touched only on a cache miss.
    unavailable: Mutex<HashMap<u32, Unavailable>>,
    /// One gate per retired epoch being loaded, so sessions that miss the same epoch at once
    /// cost one call to the root: the first loads, the others wait and take it from the cache.
    loading: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// Retired keys loaded (unwrapped) on first use since start.
    retired_loads: AtomicU64,
    /// Destroyed epochs a delivery was refused under, and when that was last audited.
    /// Touched only on such a refusal; holds destroyed epochs only.
    destroyed_reads: Mutex<HashMap<u32, Instant>>,
    /// Where a key that cannot be loaded, or a read under a destroyed one, is recorded, and
    /// as whom.
    audit: OnceLock<(Arc<crate::audit::AuditLog>, String)>,
}

/// How long a retired key that could not be loaded is refused before the next attempt.
pub const UNAVAILABLE_RETRY: Duration = Duration::from_secs(30);

/// Reads refused under one destroyed epoch are audited at most this often: a flood of them
/// is counted in metrics, not written to disk one by one.
pub const DESTROYED_READ_AUDIT_EVERY: Duration = Duration::from_secs(60);

struct Unavailable {
    since: Instant,
    /// Audited already: once per epoch and process, however often it is retried.
    audited: bool,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.current.load().active.epoch)
            .field("retired_cached", &self.retired.len())
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Keyring {
    /// Opens the keyring. With no state yet, epoch 1 (derived from the root key) is active.
    /// With a state directory, the persisted epochs come back; a damaged file is an error,
    /// never a silent fallback to another key.
    pub fn open(
        root: impl Into<Arc<Root>>,
        state_dir: Option<&Path>,
        retired_cap: usize,
    ) -> Result<Self, KeyringError> {
        let root = root.into();
        let store = state_dir.map(Store::open).transpose()?;
        let mut records = match &store {
            Some(s) => s.load_state()?,
            None => StateFile::default(),
        };
        if records.epochs.is_empty() {
            let key = root.epoch1().clone();
            let now = now_secs();
            records = StateFile {
                version: STATE_VERSION,
                epochs: vec![EpochRecord {
                    epoch: 1,
                    state: KeyState::Active,
                    fingerprint: key.fingerprint(),
                    created: now,
                    activated: Some(now),
                }],
            };
            if let Some(s) = &store {
                s.save_state(&records)?;
            }
        }
        let ring = Keyring {
            current: ArcSwap::from_pointee(Snapshot {
                generation: 0,
                // Placeholder until `rebuild` below; never read before it.
                active: Arc::new(EpochKey {
                    epoch: 0,
                    key: DataKey::from_bytes([0; 32]),
                }),
                staged: Vec::new(),
                unsaved: Vec::new(),
                states: Arc::new(BTreeMap::new()),
            }),
            root,
            wrapped: Mutex::new(HashMap::new()),
            retired: DashMap::new(),
            retired_cap: retired_cap.max(1),
            clock: AtomicU64::new(0),
            store,
            records: Mutex::new(records),
            sync_wanted: tokio::sync::Notify::new(),
            unavailable: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            retired_loads: AtomicU64::new(0),
            destroyed_reads: Mutex::new(HashMap::new()),
            audit: OnceLock::new(),
        };
        {
            let records = ring.records.lock().unwrap_or_else(|p| p.into_inner());
            ring.check_root(&records)?;
            ring.check_key_files(&records)?;
            ring.rebuild(&records, 1)?;
        }
        Ok(ring)
    }

    /// Unwraps the keys that seal or are about to (active and staged) and compares their
    /// fingerprints, so a truncated or corrupted one fails the start, naming the file. Retired
    /// keys are only looked for: each is unwrapped and checked on its first use (through the
    /// LRU), so the start costs the same however many epochs history holds, one root call
    /// each at most. A retired epoch's missing file is only a warning: `destroy` shreds the
    /// file before it records the state, and a crash between the two leaves exactly that.
    fn check_key_files(&self, records: &StateFile) -> Result<(), KeyringError> {
        use subtle::ConstantTimeEq;
        let Some(store) = &self.store else {
            return Ok(());
        };
        for r in records.epochs.iter().filter(|r| r.epoch != 1) {
            let path = store.key_path(r.epoch);
            let key = match (r.state, store.load_wrapped(r.epoch)?) {
                (KeyState::Destroyed, _) => continue,
                (KeyState::Retired, None) => {
                    tracing::warn!(epoch = r.epoch, path = %path.display(), "the wrapped key of a retired epoch is missing; it can no longer open");
                    continue;
                }
                (KeyState::Retired, Some(_)) => continue,
                _ => self.load_key(r.epoch)?,
            };
            if !bool::from(key.fingerprint().as_bytes().ct_eq(r.fingerprint.as_bytes())) {
                return Err(KeyringError::Corrupt {
                    path,
                    why: format!(
                        "its key does not match the fingerprint state.json records for epoch {}",
                        r.epoch
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses a root key that is not the one this state directory was written with. Epoch 1
    /// is derived, not unwrapped, so without this check a wrong root would silently seal with a
    /// key no other proxy has.
    fn check_root(&self, records: &StateFile) -> Result<(), KeyringError> {
        let Some(r) = records
            .epochs
            .iter()
            .find(|r| r.epoch == 1 && r.state != KeyState::Destroyed)
        else {
            return Ok(());
        };
        let derived = self.root.epoch1().fingerprint();
        if crate::ct::eq_str(&derived, &r.fingerprint) {
            Ok(())
        } else {
            Err(KeyringError::Corrupt {
                path: self
                    .state_dir()
                    .map(|d| d.join("state.json"))
                    .unwrap_or_default(),
                why: "it was written under a different root key".into(),
            })
        }
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The wrapped key of `epoch` under this process's root: as announced or stored, else
    /// wrapped now (one root call) and kept. Epoch 1 is derived, never wrapped.
    pub fn wrapped(&self, epoch: u32, key: &DataKey) -> Result<Arc<[u8]>, crate::kek::RootError> {
        let lock = || self.wrapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = lock().get(&epoch) {
            return Ok(w.clone());
        }
        let w: Arc<[u8]> = self.root.wrap(epoch, key)?.into();
        lock().insert(epoch, w.clone());
        Ok(w)
    }

    /// The wrapped key of `epoch`, if this process has it at hand (no root call, no disk).
    pub fn wrapped_cached(&self, epoch: u32) -> Option<Arc<[u8]>> {
        let map = self.wrapped.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&epoch).cloned()
    }

    /// Writes the wrapped key of a new `epoch` to the state directory before anyone is told of
    /// it, so a disk that cannot hold it refuses the rotation while nobody knows the epoch.
    /// [`Keyring::stage_wrapped`] then records it; [`Keyring::discard_prepared`] takes it back.
    pub fn prepare_wrapped(&self, epoch: u32, wrapped: &[u8]) -> Result<(), KeyringError> {
        let _changes = self.records.lock().unwrap_or_else(|p| p.into_inner());
        match &self.store {
            Some(s) => s.save_wrapped(epoch, wrapped),
            None => Ok(()),
        }
    }

    /// Shreds a key file [`Keyring::prepare_wrapped`] wrote for an epoch that was never staged.
    pub fn discard_prepared(&self, epoch: u32) {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.epochs.iter().any(|r| r.epoch == epoch) {
            return;
        }
        if let Some(Err(e)) = self.store.as_ref().map(|s| s.shred(epoch)) {
            tracing::warn!(epoch, error = %e, "cannot remove the key file of an epoch never staged");
        }
    }

    /// Replaces the stored wrapped key of `epoch` with `wrapped` (the same key, wrapped again):
    /// written whole to the state directory first, so a crash leaves one or the other.
    pub fn replace_wrapped(&self, epoch: u32, wrapped: &[u8]) -> Result<(), KeyringError> {
        let _changes = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = &self.store {
            s.save_wrapped(epoch, wrapped)?;
        }
        self.remember_wrapped(epoch, wrapped);
        Ok(())
    }

    fn remember_wrapped(&self, epoch: u32, wrapped: &[u8]) {
        let mut map = self.wrapped.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(epoch, wrapped.into());
    }

    fn forget_wrapped(&self, epoch: u32) {
        let mut map = self.wrapped.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&epoch);
    }

    pub fn state_dir(&self) -> Option<&Path> {
        self.store.as_ref().map(Store::dir)
    }

    /// Asks the control plane to sync the keyring from the authority (coalesced).
    pub fn want_sync(&self) {
        self.sync_wanted.notify_one();
    }

    /// Resolves when a sync was asked for.
    pub async fn sync_wanted(&self) {
        self.sync_wanted.notified().await;
    }

    /// The current snapshot. Cheap; take it once per batch of messages.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Records key load failures and reads refused under destroyed epochs in `log` from now
    /// on, as `actor`. Set once; later calls are ignored.
    pub fn set_audit(&self, log: Arc<crate::audit::AuditLog>, actor: String) {
        let _ = self.audit.set((log, actor));
    }

    /// Audits that a delivery sealed under the destroyed `epoch` was refused, at most once per
    /// epoch every [`DESTROYED_READ_AUDIT_EVERY`]. Inside a runtime the append (a write and a
    /// sync) runs on a blocking thread, so the session that refused never waits for the disk.
    pub fn refused_destroyed(&self, epoch: u32) {
        let Some((log, actor)) = self.audit.get() else {
            return;
        };
        // Only epochs really destroyed are remembered, so the map stays as small as they are.
        if self.current.load().state(epoch) != Some(KeyState::Destroyed) {
            return;
        }
        {
            let mut last = self
                .destroyed_reads
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if last
                .get(&epoch)
                .is_some_and(|t| now.duration_since(*t) < DESTROYED_READ_AUDIT_EVERY)
            {
                return;
            }
            last.insert(epoch, now);
        }
        let event = crate::audit::Event {
            kind: crate::audit::EventKind::Refused,
            epoch: Some(epoch),
            fingerprint: None,
            actor: actor.clone(),
            reason: format!("read refused: epoch {epoch} is destroyed"),
        };
        let log = log.clone();
        let append = move || {
            if let Err(why) = log.append(event) {
                tracing::error!(error = %why, "cannot audit a read under a destroyed epoch");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(append)),
            Err(_) => append(),
        }
    }

    /// Rebuilds the snapshot from the records and swaps it in.
    fn rebuild(&self, records: &StateFile, generation: u64) -> Result<(), KeyringError> {
        let prev = self.current.load();
        let reuse = |epoch: u32| -> Result<Arc<EpochKey>, KeyringError> {
            if prev.active.epoch == epoch {
                return Ok(prev.active.clone());
            }
            if let Some(k) = prev.staged.iter().find(|k| k.epoch == epoch) {
                return Ok(k.clone());
            }
            if let Some(slot) = self.retired.get(&epoch) {
                return Ok(slot.key.clone());
            }
            Ok(Arc::new(EpochKey {
                epoch,
                key: self.load_key(epoch)?,
            }))
        };
        let mut active = None;
        let mut staged = Vec::new();
        let mut states = BTreeMap::new();
        for r in &records.epochs {
            states.insert(r.epoch, r.state);
            match r.state {
                KeyState::Active => active = Some(reuse(r.epoch)?),
                KeyState::Staged => staged.push(reuse(r.epoch)?),
                KeyState::Retired | KeyState::Destroyed => {}
            }
        }
        let active = active.ok_or_else(|| KeyringError::Corrupt {
            path: self
                .state_dir()
                .map(|d| d.join("state.json"))
                .unwrap_or_default(),
            why: "no active epoch".into(),
        })?;
        for (epoch, state) in &states {
            if *state == KeyState::Destroyed {
                self.retired.remove(epoch);
            }
        }
        let unsaved = prev
            .unsaved
            .iter()
            .filter(|k| !states.contains_key(&k.epoch))
            .cloned()
            .collect();
        self.current.store(Arc::new(Snapshot {
            generation,
            active,
            staged,
            unsaved,
            states: Arc::new(states),
        }));
        Ok(())
    }

    fn commit(&self, records: &StateFile) -> Result<(), KeyringError> {
        if let Some(s) = &self.store {
            s.save_state(records)?;
        }
        let generation = self.current.load().generation + 1;
        self.rebuild(records, generation)
    }

    /// Installs a new epoch as decrypt-only and persists it (wrapped) first.
    pub fn stage(&self, epoch: u32, key: DataKey) -> Result<(), KeyringError> {
        self.insert(epoch, key, KeyState::Staged, true, None)
    }

    /// [`Keyring::stage`] with the key as it was announced wrapped (and unwrapped to `key`
    /// here), so it is stored without another call to the root.
    pub fn stage_wrapped(
        &self,
        epoch: u32,
        key: DataKey,
        wrapped: &[u8],
    ) -> Result<(), KeyringError> {
        self.insert(epoch, key, KeyState::Staged, true, Some(wrapped))
    }

    /// Installs an epoch learned from the key authority's sync (a proxy that joined late or
    /// missed announcements): unknown epochs only, as `staged` or `retired`, persisted first.
    /// Older epochs are allowed here, because the authority is the one writer of epochs.
    pub fn adopt(
        &self,
        epoch: u32,
        key: DataKey,
        state: KeyState,
        wrapped: Option<&[u8]>,
    ) -> Result<(), KeyringError> {
        if !matches!(state, KeyState::Staged | KeyState::Retired) {
            return Err(KeyringError::Refused {
                epoch,
                why: "only staged or retired epochs can be adopted",
                reason: "stale_epoch",
            });
        }
        self.insert(epoch, key, state, false, wrapped)
    }

    fn insert(
        &self,
        epoch: u32,
        key: DataKey,
        state: KeyState,
        forward_only: bool,
        wrapped: Option<&[u8]>,
    ) -> Result<(), KeyringError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let newest = records.epochs.iter().map(|r| r.epoch).max().unwrap_or(0);
        if epoch == 0 || (forward_only && epoch <= newest) {
            return Err(KeyringError::Refused {
                epoch,
                why: "epochs only move forward",
                reason: "stale_epoch",
            });
        }
        if records.epochs.iter().any(|r| r.epoch == epoch) {
            return Err(KeyringError::Refused {
                epoch,
                why: "already known here",
                reason: "stale_epoch",
            });
        }
        let mut next = records.clone();
        next.epochs.push(EpochRecord {
            epoch,
            state,
            fingerprint: key.fingerprint(),
            created: now_secs(),
            activated: None,
        });
        next.epochs.sort_by_key(|r| r.epoch);
        let wrapped: Arc<[u8]> = match wrapped {
            Some(w) => w.into(),
            None => self.root.wrap(epoch, &key)?.into(),
        };
        // The new key is handed over directly, not re-read from disk.
        let key = Arc::new(EpochKey { epoch, key });
        if let Some(s) = &self.store {
            if let Err(e) = s
                .save_wrapped(epoch, &wrapped)
                .and_then(|()| s.save_state(&next))
            {
                self.hold_unsaved(key);
                return Err(e);
            }
        }
        self.remember_wrapped(epoch, &wrapped);
        let prev = self.current.load();
        let mut staged = prev.staged.clone();
        if state == KeyState::Staged {
            staged.push(key);
        } else {
            self.cache_retired(key, self.clock.fetch_add(1, Ordering::Relaxed));
        }
        let mut states = (*prev.states).clone();
        states.insert(epoch, state);
        self.current.store(Arc::new(Snapshot {
            generation: prev.generation + 1,
            active: prev.active.clone(),
            staged,
            unsaved: prev.unsaved_except(epoch),
            states: Arc::new(states),
        }));
        *records = next;
        Ok(())
    }

    /// Keeps a key that could not be persisted, to open only: other proxies may already seal
    /// under it (the authority activates without a proxy that never acknowledged), and their
    /// messages are not lost here for a full disk. It never seals here, since it is not staged.
    /// Called with the records lock held.
    fn hold_unsaved(&self, key: Arc<EpochKey>) {
        let prev = self.current.load();
        if prev.unsaved.iter().any(|k| k.epoch == key.epoch) {
            return;
        }
        let mut unsaved = prev.unsaved.clone();
        tracing::warn!(
            epoch = key.epoch,
            "a key that could not be persisted is held in memory to open only until it can be"
        );
        unsaved.push(key);
        unsaved.sort_by_key(|k| k.epoch);
        if unsaved.len() > MAX_UNSAVED {
            unsaved.drain(..unsaved.len() - MAX_UNSAVED);
        }
        self.current.store(Arc::new(prev.with_unsaved(unsaved)));
    }

    /// Makes a staged epoch the one that seals; the old active epoch becomes retired.
    pub fn activate(&self, epoch: u32) -> Result<(), KeyringError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = records.clone();
        let active = next
            .epochs
            .iter()
            .find(|r| r.state == KeyState::Active)
            .map_or(0, |r| r.epoch);
        let target =
            next.epochs
                .iter()
                .position(|r| r.epoch == epoch)
                .ok_or(KeyringError::Refused {
                    epoch,
                    why: "not staged here",
                    reason: "not_staged",
                })?;
        if epoch <= active || next.epochs[target].state != KeyState::Staged {
            return Err(KeyringError::Refused {
                epoch,
                why: "only a staged epoch newer than the active one can be activated",
                reason: "stale_epoch",
            });
        }
        let prev = self.current.load();
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        self.cache_retired(prev.active.clone(), tick);
        for r in &mut next.epochs {
            if r.state == KeyState::Active {
                r.state = KeyState::Retired;
            }
        }
        next.epochs[target].state = KeyState::Active;
        next.epochs[target].activated = Some(now_secs());
        self.commit(&next)?;
        *records = next;
        Ok(())
    }

    /// Destroys an epoch: drops it from memory (zeroized on drop) and shreds its wrapped copy.
    /// The active epoch cannot be destroyed; activate another one first.
    pub fn destroy(&self, epoch: u32) -> Result<(), KeyringError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        // An unsaved key is never among the records: dropping it from memory is the whole job,
        // but its wrapped copy may have been written before the state file failed.
        let prev = self.current.load();
        if prev.unsaved.iter().any(|k| k.epoch == epoch) {
            self.forget_wrapped(epoch);
            self.current
                .store(Arc::new(prev.with_unsaved(prev.unsaved_except(epoch))));
            if let Some(s) = &self.store {
                s.shred(epoch)?;
            }
            return Ok(());
        }
        drop(prev);
        let mut next = records.clone();
        let r = next
            .epochs
            .iter_mut()
            .find(|r| r.epoch == epoch)
            .ok_or(KeyringError::Refused {
                epoch,
                why: "unknown epoch",
                reason: "unknown_epoch",
            })?;
        match r.state {
            KeyState::Active => {
                return Err(KeyringError::Refused {
                    epoch,
                    why: "the active epoch cannot be destroyed before another is activated",
                    reason: "active_epoch",
                })
            }
            KeyState::Destroyed => return Ok(()),
            _ => r.state = KeyState::Destroyed,
        }
        self.retired.remove(&epoch);
        self.forget_wrapped(epoch);
        if let Some(s) = &self.store {
            s.shred(epoch)?;
        }
        self.commit(&next)?;
        *records = next;
        Ok(())
    }

    /// The persisted records, for listing.
    pub fn records(&self) -> Vec<EpochRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .epochs
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::RootKey;

    fn root() -> RootKey {
        RootKey::from_bytes([7; 32])
    }

    /// A state directory with epochs 2 to `newest` made here, `newest` active; their keys.
    fn history(dir: &Path, newest: u32) -> Vec<DataKey> {
        let ring = Keyring::open(root(), Some(dir), 4).unwrap();
        let mut keys = vec![ring.snapshot().active.key.clone()];
        for epoch in 2..=newest {
            let key = DataKey::generate().unwrap();
            keys.push(key.clone());
            ring.stage(epoch, key).unwrap();
            ring.activate(epoch).unwrap();
        }
        keys
    }

    #[test]
    fn a_start_unwraps_no_retired_key_and_each_loads_once_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let keys = history(dir.path(), 40);
        let ring = Arc::new(Keyring::open(root(), Some(dir.path()), 64).unwrap());
        assert_eq!(ring.retired_loads(), 0, "the start left history alone");
        assert_eq!(ring.retired_cached(), 0);
        let snap = ring.snapshot();
        assert_eq!(snap.active.epoch, 40);

        // Sixteen sessions miss epoch 17 at once: one load, and all get its key.
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (ring, barrier) = (ring.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let snap = ring.snapshot();
                    barrier.wait();
                    match ring.lookup(&snap, 17) {
                        Ok(k) => k.key.fingerprint(),
                        Err(e) => panic!("{e:?}"),
                    }
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), keys[16].fingerprint());
        }
        assert_eq!(ring.retired_loads(), 1, "single flight");
        assert!(ring.lookup(&snap, 17).is_ok());
        assert!(ring.lookup(&snap, 3).is_ok());
        assert_eq!(ring.retired_loads(), 2, "once each, then from memory");
    }

    #[test]
    fn history_adopted_wrapped_is_written_once_and_unwrapped_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        let keys: Vec<DataKey> = (0..3).map(|_| DataKey::generate().unwrap()).collect();
        let mut history: Vec<(u32, String, Vec<u8>)> = keys
            .iter()
            .zip(2u32..)
            .map(|(k, e)| (e, k.fingerprint(), ring.root().wrap(e, k).unwrap()))
            .collect();
        // Epoch 4 arrives with another epoch's fingerprint: adopted, refused on use.
        history[2].1 = keys[0].fingerprint();
        assert_eq!(ring.adopt_retired_wrapped(&history).unwrap(), 3);
        assert_eq!(
            ring.adopt_retired_wrapped(&history).unwrap(),
            0,
            "known already"
        );
        assert_eq!(ring.retired_loads(), 0);
        let snap = ring.snapshot();
        assert_eq!(snap.state(3), Some(KeyState::Retired));
        let k = ring.lookup(&snap, 3).ok().unwrap();
        assert_eq!(k.key.fingerprint(), keys[1].fingerprint());
        assert_eq!(ring.lookup(&snap, 4).err(), Some(KeyMiss::Unavailable));
        assert_eq!(ring.retired_loads(), 1);
        drop(snap);
        // And they are in the state directory: a restart knows them.
        let again = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        assert_eq!(again.snapshot().state(2), Some(KeyState::Retired));
        assert!(again.lookup(&again.snapshot(), 2).is_ok());
    }

    #[test]
    fn a_retired_key_file_from_another_epoch_is_refused_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        history(dir.path(), 4);
        // Epoch 3's file replaced by epoch 2's: a valid wrap, of the wrong key. The start
        // does not look at retired keys; the first use checks the fingerprint.
        let keys = dir.path().join("keys");
        let name = |e: u32| keys.join(format!("epoch-{e:010}.key"));
        std::fs::copy(name(2), name(3)).unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        let snap = ring.snapshot();
        assert_eq!(ring.lookup(&snap, 3).err(), Some(KeyMiss::Unavailable));
        assert!(ring.lookup(&snap, 2).is_ok());
        assert_eq!(ring.retired_loads(), 1);
    }

    #[test]
    fn a_damaged_retired_key_is_refused_audited_once_and_not_reread_each_message() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 1).unwrap();
        let audit_path = dir.path().join("audit.log");
        let log = Arc::new(
            crate::audit::AuditLog::open(&audit_path, crate::audit::AuditKey::new(&root()))
                .unwrap(),
        );
        ring.set_audit(log, "proxy-test".into());
        for epoch in 2..=4 {
            ring.stage(epoch, DataKey::generate().unwrap()).unwrap();
            ring.activate(epoch).unwrap();
        }
        // Epochs 1 to 3 are retired and only 3 is held in memory: 2 comes from its file.
        let key_file = ring.store.as_ref().unwrap().key_path(2);
        let good = std::fs::read(&key_file).unwrap();
        std::fs::write(&key_file, b"damaged").unwrap();
        let snap = ring.snapshot();
        let entries = || {
            std::fs::read_to_string(&audit_path)
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(ring.lookup(&snap, 2).err(), Some(KeyMiss::Unavailable));
        assert_eq!(entries(), 1, "the failure is audited");
        let line = std::fs::read_to_string(&audit_path).unwrap();
        assert!(
            line.contains("\"refused\"") && line.contains("\"epoch\":2"),
            "{line}"
        );

        // Repaired, but within the retry interval the file is not read again.
        std::fs::write(&key_file, &good).unwrap();
        for _ in 0..100 {
            assert_eq!(ring.lookup(&snap, 2).err(), Some(KeyMiss::Unavailable));
        }
        assert_eq!(entries(), 1, "audited once, not once per message");
        crate::audit::verify(&audit_path, &crate::audit::AuditKey::new(&root())).unwrap();

        // Once the interval has passed it is tried again, and a good file opens.
        ring.unavailable.lock().unwrap().get_mut(&2).unwrap().since -= UNAVAILABLE_RETRY;
        assert!(ring.lookup(&snap, 2).is_ok());
        assert!(ring.unavailable.lock().unwrap().is_empty());
    }

    #[test]
    fn reads_under_a_destroyed_epoch_are_audited_once_per_epoch_and_interval() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        let audit_path = dir.path().join("audit.log");
        let log = Arc::new(
            crate::audit::AuditLog::open(&audit_path, crate::audit::AuditKey::new(&root()))
                .unwrap(),
        );
        ring.set_audit(log, "proxy-test".into());
        for epoch in 2..=3 {
            ring.stage(epoch, DataKey::generate().unwrap()).unwrap();
            ring.activate(epoch).unwrap();
        }
        ring.destroy(2).unwrap();
        let lines = || {
            std::fs::read_to_string(&audit_path)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        for _ in 0..100 {
            ring.refused_destroyed(2);
        }
        let written = lines();
        assert_eq!(written.len(), 1, "a flood is audited once: {written:?}");
        assert!(
            written[0].contains("\"refused\"")
                && written[0].contains("\"epoch\":2")
                && written[0].contains("read refused: epoch 2 is destroyed"),
            "{}",
            written[0]
        );

        // Epochs that are not destroyed are not the keyring's to report.
        ring.refused_destroyed(3);
        ring.refused_destroyed(9);
        assert_eq!(lines().len(), 1);

        // Each destroyed epoch has its own interval; past it, the next refusal is audited.
        ring.destroy(1).unwrap();
        ring.refused_destroyed(1);
        assert_eq!(lines().len(), 2);
        *ring.destroyed_reads.lock().unwrap().get_mut(&2).unwrap() -= DESTROYED_READ_AUDIT_EVERY;
        ring.refused_destroyed(2);
        ring.refused_destroyed(2);
        assert_eq!(lines().len(), 3);
        crate::audit::verify(&audit_path, &crate::audit::AuditKey::new(&root())).unwrap();
    }

    #[test]
    fn a_key_the_disk_cannot_take_opens_but_never_seals_and_goes_on_destroy() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        let store = ring.store.as_ref().unwrap();
        let full = |epoch: u32| {
            let tmp = store.key_path(epoch).with_extension("tmp");
            std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
            tmp
        };
        let key = DataKey::generate().unwrap();
        let fingerprint = key.fingerprint();
        let tmp = full(2);
        let err = ring.stage(2, key).unwrap_err();
        assert_eq!(err.reason(), "persist", "{err}");
        let snap = ring.snapshot();
        assert_eq!(snap.state(2), None, "not staged");
        assert_eq!(snap.unsaved().collect::<Vec<_>>(), [2]);
        let held = ring.lookup(&snap, 2).unwrap();
        assert_eq!(held.key.fingerprint(), fingerprint, "it opens");
        assert_eq!(
            ring.activate(2).unwrap_err().reason(),
            "not_staged",
            "it never seals"
        );
        assert_eq!(ring.snapshot().active.epoch, 1);

        // Space comes back: the next announcement stages it for real.
        std::fs::remove_file(&tmp).unwrap();
        let again = held.key.clone();
        drop(held);
        ring.stage(2, again).unwrap();
        let snap = ring.snapshot();
        assert_eq!(snap.state(2), Some(KeyState::Staged));
        assert_eq!(snap.unsaved().count(), 0);
        assert_eq!(
            ring.lookup(&snap, 2).unwrap().key.fingerprint(),
            fingerprint
        );

        // Held keys are bounded, newest kept, and destroy drops one from memory.
        for epoch in 3..=8 {
            full(epoch);
            assert!(ring.stage(epoch, DataKey::generate().unwrap()).is_err());
        }
        let snap = ring.snapshot();
        assert_eq!(snap.unsaved().collect::<Vec<_>>(), [5, 6, 7, 8]);
        assert_eq!(ring.lookup(&snap, 4).err(), Some(KeyMiss::Unknown));
        ring.destroy(8).unwrap();
        let snap = ring.snapshot();
        assert_eq!(snap.unsaved().collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(ring.lookup(&snap, 8).err(), Some(KeyMiss::Unknown));
        assert_eq!(persisted(dir.path()), [1, 2], "nothing unsaved is recorded");
    }

    fn persisted(dir: &Path) -> Vec<u32> {
        Keyring::open(root(), Some(dir), 1)
            .unwrap()
            .records()
            .iter()
            .map(|r| r.epoch)
            .collect()
    }

    #[test]
    fn refusals_say_why_in_their_metrics_label() {
        let ring = Keyring::open(root(), None, 4).unwrap();
        let reason = |r: Result<(), KeyringError>| r.map_err(|e| e.reason()).err();
        assert_eq!(reason(ring.activate(9)), Some("not_staged"));
        assert_eq!(reason(ring.destroy(1)), Some("active_epoch"));
        assert_eq!(reason(ring.destroy(9)), Some("unknown_epoch"));
        ring.stage(2, DataKey::generate().unwrap()).unwrap();
        assert_eq!(
            reason(ring.stage(2, DataKey::generate().unwrap())),
            Some("stale_epoch")
        );
        ring.activate(2).unwrap();
        assert_eq!(reason(ring.activate(1)), Some("stale_epoch"));
        assert_eq!(reason(ring.activate(2)), Some("stale_epoch"));
    }

    #[test]
    fn epoch1_is_derived_and_active() {
        let ring = Keyring::open(root(), None, 4).unwrap();
        let snap = ring.snapshot();
        assert_eq!(snap.active.epoch, 1);
        let other = Keyring::open(root(), None, 4).unwrap();
        assert_eq!(
            snap.active.key.fingerprint(),
            other.snapshot().active.key.fingerprint(),
            "proxies sharing a root agree on epoch 1"
        );
        assert_eq!(ring.lookup(&snap, 2).err(), Some(KeyMiss::Unknown));
    }

    #[test]
    fn rotation_retires_into_a_bounded_lru_and_reloads_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 2).unwrap();
        let mut fps = vec![ring.snapshot().active.key.fingerprint()];
        for epoch in 2..=6 {
            let key = DataKey::generate().unwrap();
            fps.push(key.fingerprint());
            ring.stage(epoch, key).unwrap();
            ring.activate(epoch).unwrap();
        }
        assert!(ring.retired_cached() <= 2);
        let snap = ring.snapshot();
        assert_eq!(snap.active.epoch, 6);
        for epoch in 1..=6u32 {
            let k = ring.lookup(&snap, epoch).unwrap();
            assert_eq!(k.key.fingerprint(), fps[epoch as usize - 1]);
            assert!(ring.retired_cached() <= 2);
        }
        // A restarted keyring finds the same keys and the same active epoch.
        drop(snap);
        drop(ring);
        let ring = Keyring::open(root(), Some(dir.path()), 2).unwrap();
        let snap = ring.snapshot();
        assert_eq!(snap.active.epoch, 6);
        assert_eq!(ring.lookup(&snap, 3).unwrap().key.fingerprint(), fps[2]);
    }

    #[test]
    fn epochs_never_move_backwards_and_destroy_shreds() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        ring.stage(3, DataKey::generate().unwrap()).unwrap();
        assert!(ring.stage(2, DataKey::generate().unwrap()).is_err());
        assert!(ring.stage(3, DataKey::generate().unwrap()).is_err());
        ring.activate(3).unwrap();
        assert!(ring.activate(1).is_err(), "re-activating an old epoch");
        assert!(ring.destroy(3).is_err(), "active epoch");
        ring.stage(4, DataKey::generate().unwrap()).unwrap();
        ring.activate(4).unwrap();
        ring.destroy(3).unwrap();
        assert!(!dir.path().join("keys/epoch-0000000003.key").exists());
        let snap = ring.snapshot();
        assert_eq!(ring.lookup(&snap, 3).err(), Some(KeyMiss::Destroyed));
        ring.destroy(1).unwrap();
        drop(snap);
        drop(ring);
        let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        let snap = ring.snapshot();
        assert_eq!(ring.lookup(&snap, 1).err(), Some(KeyMiss::Destroyed));
        assert_eq!(ring.lookup(&snap, 3).err(), Some(KeyMiss::Destroyed));
        assert!(ring.lookup(&snap, 4).is_ok());
    }

    #[test]
    fn destroy_drops_the_key_from_memory_and_zeroes_its_file_before_unlinking() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
        ring.stage(2, DataKey::generate().unwrap()).unwrap();
        ring.activate(2).unwrap();
        ring.stage(3, DataKey::generate().unwrap()).unwrap();
        ring.activate(3).unwrap();
        let file = dir.path().join("keys/epoch-0000000002.key");
        // A second name for the same inode shows what the shredder did to the bytes.
        let witness = dir.path().join("witness");
        std::fs::hard_link(&file, &witness).unwrap();
        assert!(std::fs::read(&witness).unwrap().iter().any(|b| *b != 0));

        let weak = {
            let snap = ring.snapshot();
            let KeyHandle::Owned(key) = ring.lookup(&snap, 2).unwrap() else {
                panic!("a retired key comes from the LRU");
            };
            Arc::downgrade(&key)
        };
        assert!(weak.upgrade().is_some(), "cached while retired");
        ring.destroy(2).unwrap();
        assert!(
            weak.upgrade().is_none(),
            "no reference left: the key was dropped, and so zeroized"
        );
        assert!(!file.exists());
        let shredded = std::fs::read(&witness).unwrap();
        assert!(!shredded.is_empty() && shredded.iter().all(|b| *b == 0));
        let snap = ring.snapshot();
        assert_eq!(ring.lookup(&snap, 2).err(), Some(KeyMiss::Destroyed));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("keys"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["epoch-0000000003.key"]);
    }

    #[test]
    fn damaged_state_is_an_error_not_a_fallback() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
            ring.stage(2, DataKey::generate().unwrap()).unwrap();
            ring.activate(2).unwrap();
        }
        std::fs::write(dir.path().join("keys/epoch-0000000002.key"), b"junk").unwrap();
        let err = Keyring::open(root(), Some(dir.path()), 4).unwrap_err();
        assert!(err.to_string().contains("epoch-0000000002.key"), "{err}");
        std::fs::write(dir.path().join("state.json"), b"{").unwrap();
        let err = Keyring::open(root(), Some(dir.path()), 4).unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
    }

    #[test]
    fn wrong_root_key_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ring = Keyring::open(root(), Some(dir.path()), 4).unwrap();
            ring.stage(2, DataKey::generate().unwrap()).unwrap();
            ring.activate(2).unwrap();
        }
        assert!(Keyring::open(RootKey::from_bytes([8; 32]), Some(dir.path()), 4).is_err());
    }
}
