//! The rotation steps: stage until every live proxy acknowledges, activate, retire, destroy
//! and revoke, retention, and announcing the keyring again for proxies that missed it.

use futures::FutureExt;

use super::*;

impl Authority {
    /// A reloaded config's schedule and limits; the intervals it runs on stay (they take a
    /// restart, and a reload that changes them is refused before it gets here).
    pub(super) fn follow_schedule(&mut self, new: crate::config::Rotation) {
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

    /// The keyring as the authority describes it; with `wrapped`, for proxies to install.
    pub(super) fn epochs(&self, wrapped: bool) -> Vec<message::EpochInfo> {
        self.epochs_with(wrapped, &Change::None)
    }

    /// The keyring as it will be once `change` is made.
    pub(super) fn epochs_with(
        &self,
        wrapped: bool,
        change: &Change<'_>,
    ) -> Vec<message::EpochInfo> {
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
    pub(super) async fn revoke(
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

    pub(super) async fn destroy(&mut self, epoch: u32, reason: &str) -> Result<(), String> {
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
    pub(super) async fn enforce_retention(&mut self) {
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

    pub(super) async fn announce(&mut self, body: Body) {
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

    pub(super) fn stage_body(&self, epoch: u32) -> Option<Body> {
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
    pub(super) async fn reannounce(&mut self) {
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
    pub(super) async fn rotate(
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
        // Acknowledgements still queued are of the stage; from the commit on, an Ack for this
        // epoch says a proxy seals with it (it may read the commit before the announcement).
        while let Some(Some(_)) = acks.next().now_or_never() {}
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
        let until = tokio::time::Instant::now() + ACTIVATION_WAIT;
        let mut activated: Vec<String> = Vec::new();
        while acked.iter().any(|n| !activated.contains(n)) {
            let Ok(Some(m)) = tokio::time::timeout_at(until, acks.next()).await else {
                break;
            };
            let subject = self.subjects.ack.clone();
            if let Ok(msg) = self.open_msg(&subject, &m.payload) {
                if msg.body == (Body::Ack { epoch }) {
                    activated.push(msg.from.clone());
                    self.on_activated(msg.from, epoch);
                }
            }
        }
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
