//! The lease: hello and roll call between authorities, holding and renewing the lease in the
//! control bucket, taking office (adopting what was committed) and standing by.

use super::*;

impl Authority {
    pub(super) async fn say_hello(&mut self) {
        let body = Body::AuthorityHello {
            active: self.keyring.snapshot().active.epoch,
            since_ms: self.since_ms,
        };
        let subject = hello_subject(&self.cfg.prefix);
        if let Ok(sealed) = self.sealer.seal(&subject, body) {
            let _ = self.client.publish(subject, sealed.into()).await;
        }
    }

    /// Renews the lease, or takes it where it is free, released, or its holder has not renewed
    /// it for the lease's TTL; returns whether this authority holds it.
    pub(super) async fn hold_lease(&mut self) -> bool {
        use async_nats::jetstream::kv::Operation;
        let node = self.cfg.node.clone();
        let Some(c) = &mut self.control else {
            return true;
        };
        if let Some((rev, _)) = c.held {
            let sent = Instant::now();
            match c.kv.update(LEADER_KEY, node.clone().into(), rev).await {
                Ok(r) => {
                    c.held = Some((r, sent));
                    return true;
                }
                Err(e) => {
                    c.held = None;
                    tracing::warn!(error = %e, "lost the key authority lease");
                }
            }
        }
        let sent = Instant::now();
        let mut holder = None;
        let mut taken_from = None;
        let taken = match c.kv.entry(LEADER_KEY).await {
            Ok(None) => c.kv.create(LEADER_KEY, node.clone().into()).await.ok(),
            // Released, or this authority's own write whose answer was lost.
            Ok(Some(e)) if e.operation != Operation::Put || e.value == node.as_bytes() => {
                taken_from = Some(e.revision);
                c.kv.update(LEADER_KEY, node.clone().into(), e.revision)
                    .await
                    .ok()
            }
            Ok(Some(e)) => {
                holder = Some(String::from_utf8_lossy(&e.value).into_owned());
                match c.seen {
                    Some((rev, since)) if rev == e.revision && since.elapsed() >= c.ttl => {
                        taken_from = Some(e.revision);
                        c.kv.update(LEADER_KEY, node.clone().into(), e.revision)
                            .await
                            .ok()
                    }
                    Some((rev, _)) if rev == e.revision => None,
                    _ => {
                        c.seen = Some((e.revision, Instant::now()));
                        None
                    }
                }
            }
            Err(_) => None,
        };
        if let Some(r) = taken {
            c.held = Some((r, sent));
            c.seen = None;
            self.taken_over = taken_from;
            c.told = false;
            match holder {
                Some(h) => {
                    tracing::warn!(silent = %h, "took the key authority lease over from a holder that stopped renewing it")
                }
                None => tracing::info!("holding the key authority lease"),
            }
            return true;
        }
        if !c.told {
            c.told = true;
            let holder = holder.unwrap_or_else(|| "another authority".to_owned());
            tracing::warn!(holder = %holder, "another key authority holds the lease; standing by");
            self.audit(Event {
                kind: EventKind::Refused,
                epoch: None,
                fingerprint: None,
                actor: self.cfg.node.clone(),
                reason: format!("standing by: authority {holder} holds the lease"),
            });
        }
        false
    }

    /// Taking the role, at start or from a holder that went away: first the keyring as the
    /// bucket holds it, so no epoch the last holder committed is lost or generated again; then
    /// a roll call, so the first rotation waits for every live proxy and for none that left
    /// with the last holder. Returns false on shutdown.
    pub(super) async fn take_office(
        &mut self,
        heartbeats: &mut async_nats::Subscriber,
        shutdown: &mut watch::Receiver<()>,
    ) -> bool {
        if let Err(e) = self.adopt_committed().await {
            // Acting on a keyring older than the bucket's could generate an epoch twice.
            tracing::warn!(error = %e, "cannot read the committed keyring; not acting yet");
            if let Some(c) = &mut self.control {
                c.held = None;
                c.told = false;
            }
            return true;
        }
        self.proxies.clear();
        self.announce(Body::RollCall {}).await;
        let until =
            tokio::time::Instant::now() + self.cfg.rotation.heartbeat_every.min(ROLL_CALL_WINDOW);
        loop {
            tokio::select! {
                Some(m) = heartbeats.next() => self.on_heartbeat(&m.payload),
                _ = tokio::time::sleep_until(until) => break,
                _ = shutdown.changed() => return false,
            }
        }
        if let Err(e) = self.commit_keyring(Change::None).await {
            tracing::warn!(error = %e, "cannot write the keyring bucket");
        }
        self.acting_since_ms = message::now_ms();
        self.reannounce().await;
        tracing::info!(
            live_proxies = self.live().len(),
            active_epoch = self.keyring.snapshot().active.epoch,
            "key authority acting"
        );
        true
    }

    /// Brings this authority's keyring in line with the one committed to the bucket.
    pub(super) async fn adopt_committed(&mut self) -> Result<(), String> {
        use async_nats::jetstream::kv::Operation;
        let Some(c) = &self.control else {
            return Ok(());
        };
        let entry =
            c.kv.entry(KEYRING_KEY)
                .await
                .map_err(|e| format!("the keyring bucket did not answer ({e})"))?;
        let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
            return Ok(());
        };
        let subject = keyring_subject(&self.cfg.prefix);
        let msg = message::open(
            &mut Opener::new(),
            &self.control_key,
            &subject,
            &entry.value,
        )
        .map_err(|e| format!("the committed keyring was refused ({e})"))?;
        let Body::SyncReply { epochs } = msg.body else {
            return Err("the keyring bucket holds something else".to_owned());
        };
        crate::control::member::Member::new(self.keyring.clone(), &self.cfg.prefix)
            .apply_sync(&epochs)
            .map_err(|e| format!("the committed keyring cannot be applied ({e})"))
    }

    /// Gives the lease back on a clean stop, so a restarted or standby authority takes it at
    /// once instead of after it lapses. Only the revision this authority wrote is deleted.
    pub(super) async fn release_lease(&mut self) {
        if let Some(ControlBucket {
            kv,
            held: Some((rev, _)),
            ..
        }) = &mut self.control
        {
            if kv
                .delete_expect_revision(LEADER_KEY, Some(*rev))
                .await
                .is_ok()
            {
                tracing::info!("gave the key authority lease back");
            }
        }
    }

    /// Another authority that started earlier (ties: the smaller node id) keeps the role.
    /// Only where there is no lease.
    pub(super) fn on_hello(&mut self, payload: &[u8]) {
        let subject = hello_subject(&self.cfg.prefix);
        let Ok(msg) = self.open_msg(&subject, payload) else {
            return;
        };
        let Body::AuthorityHello { since_ms, .. } = msg.body else {
            return;
        };
        if msg.from == self.cfg.node {
            return;
        }
        if self.others.len() < MAX_PROXIES || self.others.contains_key(&msg.from) {
            self.others.insert(msg.from.clone(), Instant::now());
        }
        if self.control.is_some() {
            return;
        }
        let theirs_first = (since_ms, msg.from.as_str()) < (self.since_ms, self.cfg.node.as_str());
        if theirs_first {
            if self.standing_by_for.is_none() {
                tracing::warn!(other = %msg.from, "another key authority is running; standing by");
                self.audit(Event {
                    kind: EventKind::Refused,
                    epoch: None,
                    fingerprint: None,
                    actor: self.cfg.node.clone(),
                    reason: format!("standing by: authority {} holds the role", msg.from),
                });
            }
            self.standing_by_for = Some((msg.from, Instant::now()));
        }
    }

    /// Standing by while another authority holds the lease or, with no lease, while the
    /// authority holding the role has been heard recently.
    pub(super) fn standing_by(&self) -> bool {
        if let Some(c) = &self.control {
            return c.held.is_none();
        }
        let horizon = self.cfg.rotation.heartbeat_every * LIVE_INTERVALS;
        self.standing_by_for
            .as_ref()
            .is_some_and(|(_, seen)| seen.elapsed() <= horizon)
    }

    /// `cipherbus_authority_leader{scope}`: whether this authority acts now.
    pub(super) fn show_role(&self) {
        self.metrics
            .authority_leader
            .get_or_create(&ScopeLabel {
                scope: self.cfg.scope,
            })
            .set(i64::from(!self.standing_by()));
    }
}
