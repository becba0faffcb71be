//! Membership: the proxies' sealed heartbeats and reports, which are live, which departed,
//! and the usage that triggers a rotation.

use super::*;

impl Authority {
    pub(super) fn open(&mut self, subject: &str, payload: &[u8]) -> Result<Body, ControlError> {
        self.open_msg(subject, payload).map(|m| m.body)
    }

    /// Opens and replay-checks a control message; refusals are counted and audited.
    pub(super) fn open_msg(
        &mut self,
        subject: &str,
        payload: &[u8],
    ) -> Result<message::ControlMessage, ControlError> {
        let msg =
            message::open(&mut self.opener, &self.control_key, subject, payload).and_then(|m| {
                // Subjects are this authority's own few, so the map stays small.
                let guard = match self.guards.get_mut(subject) {
                    Some(g) => g,
                    None => self.guards.entry(subject.to_owned()).or_default(),
                };
                guard.check(&m).map(|()| m)
            });
        match msg {
            Ok(m) => Ok(m),
            Err(e) => {
                self.metrics.control_refused(e.reason());
                self.audit(Event {
                    kind: EventKind::Refused,
                    epoch: None,
                    fingerprint: None,
                    actor: self.cfg.node.clone(),
                    reason: format!("control message on {subject}: {e}"),
                });
                Err(e)
            }
        }
    }

    pub(super) fn on_heartbeat(&mut self, payload: &[u8]) {
        let subject = self.subjects.heartbeat.clone();
        let Ok(msg) = self.open_msg(&subject, payload) else {
            return;
        };
        let Body::Heartbeat {
            active,
            sealed_messages,
            sealed_bytes,
        } = msg.body
        else {
            return;
        };
        let Some(p) = self.proxy(msg.from, active) else {
            return;
        };
        let secs = p.beat_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
        p.rate = if p.active == active && secs > 0.0 && sealed_messages >= p.sealed_messages {
            (
                sealed_messages.saturating_sub(p.sealed_messages) as f64 / secs,
                sealed_bytes.saturating_sub(p.sealed_bytes) as f64 / secs,
            )
        } else {
            (0.0, 0.0)
        };
        p.last_seen = Instant::now();
        p.beat_at = Some(p.last_seen);
        p.active = active;
        p.sealed_messages = sealed_messages;
        p.sealed_bytes = sealed_bytes;
    }

    /// An acknowledgement outside a rotation's stage: one for the active epoch is a proxy
    /// saying it activated it, which its row shows at once (`cipherbus status`) instead of at
    /// its next heartbeat.
    pub(super) fn on_ack(&mut self, payload: &[u8]) {
        let subject = self.subjects.ack.clone();
        let Ok(msg) = self.open_msg(&subject, payload) else {
            return;
        };
        if let Body::Ack { epoch } = msg.body {
            self.on_activated(msg.from, epoch);
        }
    }

    /// Proxy `node` seals with `epoch`, the active one. Its counts start again, as those a
    /// heartbeat brings are per active epoch.
    pub(super) fn on_activated(&mut self, node: String, epoch: u32) {
        if epoch != self.keyring.snapshot().active.epoch {
            return;
        }
        if let Some(p) = self.proxies.get_mut(&node) {
            p.last_seen = Instant::now();
            if p.active != epoch {
                p.active = epoch;
                p.sealed_messages = 0;
                p.sealed_bytes = 0;
                p.rate = (0.0, 0.0);
            }
        }
    }

    /// The entry of proxy `node`, new ones joining as sealing with `active`; `None` for a new
    /// one past [`MAX_PROXIES`].
    pub(super) fn proxy(&mut self, node: String, active: u32) -> Option<&mut Proxy> {
        if self.proxies.len() >= MAX_PROXIES && !self.proxies.contains_key(&node) {
            return None;
        }
        Some(
            self.proxies
                .entry(node)
                .or_insert_with(|| Proxy::new(active)),
        )
    }

    /// Keeps a proxy's report; one not yet heard in a heartbeat joins the proxies, as a beat.
    pub(super) fn on_report(&mut self, payload: &[u8]) {
        let subject = self.subjects.report.clone();
        let Ok(msg) = self.open_msg(&subject, payload) else {
            return;
        };
        let Body::Report(report) = msg.body else {
            return;
        };
        let Some(p) = self.proxy(msg.from, report.active) else {
            return;
        };
        p.last_seen = Instant::now();
        p.previous = p.report.replace((Instant::now(), report));
    }

    /// Forgets proxies long silent, except those whose usage still counts for the active epoch.
    pub(super) fn forget_departed(&mut self) {
        let active = self.keyring.snapshot().active.epoch;
        self.proxies
            .retain(|_, p| p.active == active || p.last_seen.elapsed() < FORGET_AFTER);
        self.others.retain(|_, at| at.elapsed() < FORGET_AFTER);
    }

    pub(super) fn live(&self) -> Vec<String> {
        let horizon = self.cfg.rotation.heartbeat_every * LIVE_INTERVALS;
        let mut live: Vec<String> = self
            .proxies
            .iter()
            .filter(|(_, p)| p.last_seen.elapsed() <= horizon)
            .map(|(n, _)| n.clone())
            .collect();
        live.sort();
        live
    }

    /// Whether the messages or bytes sealed under the active epoch, summed over the proxies'
    /// latest heartbeats, reached a configured limit.
    pub(super) fn usage_exceeded(&self) -> bool {
        let active = self.keyring.snapshot().active.epoch;
        let (msgs, bytes) = self
            .proxies
            .values()
            .filter(|p| p.active == active)
            .fold((0u64, 0u64), |(m, b), p| {
                (m + p.sealed_messages, b + p.sealed_bytes)
            });
        self.cfg
            .rotation
            .max_messages_per_epoch
            .is_some_and(|max| msgs >= max)
            || self
                .cfg
                .rotation
                .max_bytes_per_epoch
                .is_some_and(|max| bytes >= max)
    }
}
