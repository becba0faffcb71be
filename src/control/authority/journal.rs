//! Writing it down: every key event audited (file, then stream) before it takes effect, and
//! the keyring committed to the control bucket, fenced on the lease.

use super::*;

impl Authority {
    /// Writes an event to the file; the stream gets it at the next flush. For events that
    /// are only reported (refusals, laggards); key events go through [`Authority::audit_now`].
    pub(super) fn audit(&mut self, event: Event) {
        if let Err(e) = self.append_audit(event) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    pub(super) fn append_audit(&mut self, event: Event) -> Result<(), String> {
        let Some(log) = &self.audit else {
            return Ok(());
        };
        match log.append(event) {
            Ok(entry) => {
                self.unpublished.push(entry);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .audit_failures
                    .get_or_create(&ReasonLabel { reason: "file" })
                    .inc();
                Err(e.to_string())
            }
        }
    }

    /// Writes a key event to the file and the stream, and returns only once both hold it: a
    /// key event that cannot be audited does not happen.
    pub(super) async fn audit_now(&mut self, event: Event) -> Result<(), String> {
        // Tied first, so the entry follows the stream's chain.
        self.ensure_attached().await?;
        self.append_audit(event)?;
        self.flush_audit().await
    }

    /// Ties the file to the stream again after standing by or after a failed append, when
    /// another authority may have written it meanwhile.
    pub(super) async fn ensure_attached(&mut self) -> Result<(), String> {
        let (Some(log), Some(stream)) = (&self.audit, &self.audit_stream) else {
            return Ok(());
        };
        if self.audit_attached || self.standing_by() {
            return Ok(());
        }
        if let Err(e) = attach(stream, log).await {
            self.metrics
                .audit_failures
                .get_or_create(&ReasonLabel { reason: "stream" })
                .inc();
            return Err(e.to_string());
        }
        self.audit_attached = true;
        Ok(())
    }

    /// Sends the stream every entry the file holds that it has not confirmed, oldest first.
    /// Only the authority holding the role writes the stream; one that stood by ties its file
    /// to the stream again first.
    pub(super) async fn flush_audit(&mut self) -> Result<(), String> {
        let (Some(log), Some(_)) = (&self.audit, &self.audit_stream) else {
            return Ok(());
        };
        if self.standing_by() {
            if self.audit_attached {
                log.detach();
                self.audit_attached = false;
            }
            return Ok(());
        }
        self.ensure_attached().await?;
        let (Some(log), Some(stream)) = (&self.audit, &self.audit_stream) else {
            return Ok(());
        };
        while let Some((seq, line)) = log.next_pending() {
            if let Err(e) = stream.append(seq, &line).await {
                self.metrics
                    .audit_failures
                    .get_or_create(&ReasonLabel { reason: "stream" })
                    .inc();
                // Read the stream again before the next attempt: another authority may have
                // written the entry this one tried to.
                self.audit_attached = false;
                return Err(e.to_string());
            }
            log.confirmed(seq);
        }
        Ok(())
    }

    /// Commits the keyring with `change` applied, sealed, to the bucket proxies follow. The
    /// server stores it only while this authority's lease revision is still the last one, so
    /// the write fails once another authority took the lease. Every change is committed here
    /// before it is made locally or announced: whatever a proxy is ever told, the bucket held
    /// first, under the lease.
    pub(super) async fn commit_keyring(&mut self, change: Change<'_>) -> Result<(), String> {
        use async_nats::jetstream::context::PublishErrorKind;
        let epochs = self.epochs_with(true, &change);
        let Some(c) = &self.control else {
            return Ok(());
        };
        let Some((lease, _)) = c.held else {
            return Err("this authority does not hold the lease".to_owned());
        };
        let subject = keyring_subject(&self.cfg.prefix);
        let sealed = self
            .sealer
            .seal(&subject, Body::SyncReply { epochs })
            .map_err(|e| format!("cannot seal the keyring ({e})"))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            lease.to_string().as_str(),
        );
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            format!("{}{LEADER_KEY}", c.kv.prefix).as_str(),
        );
        let stored = match c
            .js
            .publish_with_headers(c.subject(KEYRING_KEY), headers, sealed.into())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                if let Some(c) = &mut self.control {
                    c.held = None;
                    c.told = false;
                }
                tracing::warn!(
                    "another key authority took the lease; this one's keyring write was refused"
                );
                Err("another key authority took the lease".to_owned())
            }
            Err(e) => Err(format!("the keyring bucket did not store it ({e})")),
        }
    }

    /// A key event refused because it could not be audited: counted, logged, and the
    /// sentence the operator gets.
    pub(super) fn refuse_unaudited(&self, what: &str, why: &str) -> String {
        self.metrics
            .rotations_refused
            .get_or_create(&ReasonLabel { reason: "audit" })
            .inc();
        let sentence = format!("{what} refused: the audit trail cannot record it ({why})");
        tracing::error!(reason = "audit", "{sentence}");
        sentence
    }

    /// Publishes audit entries, sealed, on `<prefix>.audit` for collectors.
    pub(super) async fn publish_audit(&mut self) {
        let subject = audit_subject(&self.cfg.prefix);
        for entry in std::mem::take(&mut self.unpublished) {
            let Ok(json) = serde_json::to_string(&entry) else {
                continue;
            };
            if let Ok(sealed) = self.sealer.seal(&subject, Body::AuditEvent { entry: json }) {
                let _ = self.client.publish(subject.clone(), sealed.into()).await;
            }
        }
    }

    pub(super) fn event(
        &self,
        kind: EventKind,
        epoch: u32,
        fingerprint: Option<String>,
        reason: &str,
    ) -> Event {
        Event {
            kind,
            epoch: Some(epoch),
            fingerprint,
            actor: self.cfg.node.clone(),
            reason: reason.to_owned(),
        }
    }
}
