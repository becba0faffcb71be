//! Retired keys: the lookup the hot path makes, the bounded LRU of retired keys held
//! unwrapped, and loading one on its first use (single flight, checked against its recorded
//! fingerprint, failures refused and audited once), and history adopted still wrapped.

use super::*;

impl Keyring {
    /// The key for `epoch`, if it may still open.
    pub fn lookup<'a>(&self, snap: &'a Snapshot, epoch: u32) -> Result<KeyHandle<'a>, KeyMiss> {
        if snap.active.epoch == epoch {
            return Ok(KeyHandle::Borrowed(&snap.active));
        }
        if let Some(k) = snap.staged.iter().find(|k| k.epoch == epoch) {
            return Ok(KeyHandle::Borrowed(k));
        }
        if let Some(k) = snap.unsaved.iter().find(|k| k.epoch == epoch) {
            return Ok(KeyHandle::Borrowed(k));
        }
        match snap.state(epoch) {
            None => return Err(KeyMiss::Unknown),
            Some(KeyState::Destroyed) => return Err(KeyMiss::Destroyed),
            Some(_) => {}
        }
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let cached = || {
            self.retired.get(&epoch).map(|slot| {
                slot.last_used.store(tick, Ordering::Relaxed);
                KeyHandle::Owned(slot.key.clone())
            })
        };
        if let Some(key) = cached() {
            return Ok(key);
        }
        // Single flight: one load per epoch, however many sessions miss it at once.
        let gate = self
            .loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(epoch)
            .or_default()
            .clone();
        let _loading = gate.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = cached() {
            return Ok(key);
        }
        let loaded = self.load_retired(epoch);
        self.loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&epoch);
        let key = Arc::new(EpochKey {
            epoch,
            key: loaded?,
        });
        self.cache_retired(key.clone(), tick);
        Ok(KeyHandle::Owned(key))
    }

    /// Retired keys unwrapped on first use since start (after the LRU let them go, again).
    pub fn retired_loads(&self) -> u64 {
        self.retired_loads.load(Ordering::Relaxed)
    }

    /// A retired key from the state directory, unless it failed to load less than
    /// [`UNAVAILABLE_RETRY`] ago. A failure is logged once per attempt and audited once.
    pub(super) fn load_retired(&self, epoch: u32) -> Result<DataKey, KeyMiss> {
        let lock = || self.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        if lock()
            .get(&epoch)
            .is_some_and(|u| u.since.elapsed() < UNAVAILABLE_RETRY)
        {
            return Err(KeyMiss::Unavailable);
        }
        let e = match self
            .load_key(epoch)
            .and_then(|key| self.check_fingerprint(epoch, key))
        {
            Ok(key) => {
                lock().remove(&epoch);
                self.retired_loads.fetch_add(1, Ordering::Relaxed);
                return Ok(key);
            }
            Err(e) => e,
        };
        tracing::warn!(
            epoch,
            error = %e,
            retry_in = ?UNAVAILABLE_RETRY,
            "retired key could not be loaded; messages under it are refused"
        );
        let first = {
            let mut map = lock();
            let entry = map.entry(epoch).or_insert(Unavailable {
                since: Instant::now(),
                audited: false,
            });
            entry.since = Instant::now();
            !std::mem::replace(&mut entry.audited, true)
        };
        if let (true, Some((log, actor))) = (first, self.audit.get()) {
            let event = crate::audit::Event {
                kind: crate::audit::EventKind::Refused,
                epoch: Some(epoch),
                fingerprint: None,
                actor: actor.clone(),
                reason: format!("retired key could not be loaded; its messages are refused: {e}"),
            };
            if let Err(why) = log.append(event) {
                tracing::error!(error = %why, "cannot audit an unavailable key");
            }
        }
        Err(KeyMiss::Unavailable)
    }

    /// `key`, if it is the one `state.json` records for `epoch`: a retired key is checked
    /// here, on first use, as the start checks the active one.
    pub(super) fn check_fingerprint(
        &self,
        epoch: u32,
        key: DataKey,
    ) -> Result<DataKey, KeyringError> {
        let recorded = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .epochs
            .iter()
            .find(|r| r.epoch == epoch)
            .map(|r| r.fingerprint.clone());
        match recorded {
            Some(f) if !crate::ct::eq_str(&key.fingerprint(), &f) => Err(KeyringError::Corrupt {
                path: self
                    .store
                    .as_ref()
                    .map(|s| s.key_path(epoch))
                    .unwrap_or_default(),
                why: format!(
                    "its key does not match the fingerprint state.json records for epoch {epoch}"
                ),
            }),
            _ => Ok(key),
        }
    }

    /// Number of retired keys held unwrapped in memory.
    pub fn retired_cached(&self) -> usize {
        self.retired.len()
    }

    pub(super) fn cache_retired(&self, key: Arc<EpochKey>, tick: u64) {
        while self.retired.len() >= self.retired_cap {
            let oldest = self
                .retired
                .iter()
                .min_by_key(|e| e.value().last_used.load(Ordering::Relaxed))
                .map(|e| *e.key());
            match oldest {
                Some(e) => {
                    self.retired.remove(&e);
                }
                None => break,
            }
        }
        self.retired.insert(
            key.epoch,
            RetiredSlot {
                key,
                last_used: AtomicU64::new(tick),
            },
        );
    }

    pub(super) fn load_key(&self, epoch: u32) -> Result<DataKey, KeyringError> {
        if epoch == 1 {
            return Ok(self.root.epoch1().clone());
        }
        // The state directory's copy; without one, the copy adopted into memory.
        let (wrapped, path) = match &self.store {
            Some(store) => (
                store
                    .load_wrapped(epoch)?
                    .ok_or_else(|| KeyringError::Corrupt {
                        path: store.key_path(epoch),
                        why: format!("the wrapped key of epoch {epoch} is missing"),
                    })?,
                store.key_path(epoch),
            ),
            None => (
                self.wrapped_cached(epoch)
                    .ok_or(KeyringError::Refused {
                        epoch,
                        why: "no state directory holds its wrapped key",
                        reason: "not_stored",
                    })?
                    .to_vec(),
                PathBuf::new(),
            ),
        };
        match self.root.unwrap(epoch, &wrapped) {
            Ok(key) => {
                self.remember_wrapped(epoch, &wrapped);
                Ok(key)
            }
            // The KMS not answering is not damage: the key is refused for now, and tried again.
            Err(e) if e.is_unavailable() => Err(KeyringError::Refused {
                epoch,
                why: "the root's KMS is unavailable",
                reason: "kms_unavailable",
            }),
            Err(e) => Err(KeyringError::Corrupt {
                path,
                why: format!("cannot unwrap: {e}"),
            }),
        }
    }

    /// Records retired epochs this keyring lacks from their wrapped keys alone, with one write
    /// of the state for them all: each is unwrapped on its first use and checked then against
    /// the fingerprint given here. Catching up on history so costs no call to the root.
    /// Epochs already known here are left as they are.
    pub fn adopt_retired_wrapped(
        &self,
        epochs: &[(u32, String, Vec<u8>)],
    ) -> Result<usize, KeyringError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let known: std::collections::HashSet<u32> =
            records.epochs.iter().map(|r| r.epoch).collect();
        let fresh: Vec<&(u32, String, Vec<u8>)> = epochs
            .iter()
            .filter(|(epoch, _, _)| *epoch > 1 && !known.contains(epoch))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let mut next = records.clone();
        for (epoch, fingerprint, wrapped) in &fresh {
            if let Some(s) = &self.store {
                s.save_wrapped(*epoch, wrapped)?;
            }
            next.epochs.push(EpochRecord {
                epoch: *epoch,
                state: KeyState::Retired,
                fingerprint: fingerprint.clone(),
                created: now_secs(),
                activated: None,
            });
        }
        next.epochs.sort_by_key(|r| r.epoch);
        if let Some(s) = &self.store {
            s.save_state(&next)?;
        }
        for (epoch, _, wrapped) in &fresh {
            self.remember_wrapped(*epoch, wrapped);
        }
        let prev = self.current.load();
        let mut states = (*prev.states).clone();
        for (epoch, _, _) in &fresh {
            states.insert(*epoch, KeyState::Retired);
        }
        self.current.store(Arc::new(Snapshot {
            generation: prev.generation + 1,
            active: prev.active.clone(),
            staged: prev.staged.clone(),
            unsaved: prev
                .unsaved
                .iter()
                .filter(|k| !fresh.iter().any(|(e, _, _)| *e == k.epoch))
                .cloned()
                .collect(),
            states: Arc::new(states),
        }));
        *records = next;
        Ok(fresh.len())
    }
}
