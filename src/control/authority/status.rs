//! What `cipherbus status` gets from the acting authority: a row per process and the schedule.

use super::*;

impl Authority {
    /// The fleet as this authority sees it, for `cipherbus status`.
    pub(super) fn status(&self) -> message::Status {
        let snap = self.keyring.snapshot();
        let active = snap.active.epoch;
        drop(snap);
        let horizon = self.cfg.rotation.heartbeat_every * LIVE_INTERVALS;
        let mut proxies: Vec<message::ProxyStatus> = self
            .proxies
            .iter()
            .map(|(node, p)| {
                let silent = p.last_seen.elapsed() > horizon;
                let (report, interval) = match (&p.report, &p.previous) {
                    (Some((at, r)), Some((before, b))) => {
                        (Some(r), Some((at.duration_since(*before), b)))
                    }
                    (Some((_, r)), None) => (Some(r), None),
                    _ => (None, None),
                };
                let mut row = message::ProxyStatus {
                    node: node.clone(),
                    host: String::new(),
                    version: String::new(),
                    active: p.active,
                    last_seen_ms: p.last_seen.elapsed().as_millis() as u64,
                    silent,
                    lagging: silent || p.active != active,
                    connections: 0,
                    sealed_messages: 0,
                    opened_messages: 0,
                    refused: Default::default(),
                    interval_ms: 0,
                    sealed_in_interval: 0,
                    opened_in_interval: 0,
                    refused_in_interval: Default::default(),
                };
                if let Some(r) = report {
                    row.host.clone_from(&r.host);
                    row.version.clone_from(&r.version);
                    row.connections = r.connections;
                    row.sealed_messages = r.sealed_messages;
                    row.opened_messages = r.opened_messages;
                    row.refused.clone_from(&r.refused);
                    if let Some((span, b)) = interval {
                        row.interval_ms = span.as_millis() as u64;
                        row.sealed_in_interval =
                            r.sealed_messages.saturating_sub(b.sealed_messages);
                        row.opened_in_interval =
                            r.opened_messages.saturating_sub(b.opened_messages);
                        row.refused_in_interval = r
                            .refused
                            .iter()
                            .map(|(k, n)| {
                                (
                                    k.clone(),
                                    n.saturating_sub(b.refused.get(k).copied().unwrap_or(0)),
                                )
                            })
                            .filter(|(_, n)| *n > 0)
                            .collect();
                    }
                }
                row
            })
            .collect();
        proxies.sort_by(|a, b| a.node.cmp(&b.node));
        let mut standby: Vec<String> = self
            .others
            .iter()
            .filter(|(_, at)| at.elapsed() <= horizon)
            .map(|(n, _)| n.clone())
            .collect();
        standby.sort();
        message::Status {
            authority: self.cfg.node.clone(),
            host: crate::process::host_name(),
            acting_since_ms: self.acting_since_ms,
            standby,
            active,
            activated: self
                .keyring
                .records()
                .into_iter()
                .find(|r| r.epoch == active)
                .and_then(|r| r.activated),
            schedule: self.schedule(active),
            proxies,
        }
    }

    /// When the next rotation comes, and why: the time schedule, or a usage limit reached at
    /// the rate the proxies now seal.
    pub(super) fn schedule(&self, active: u32) -> message::Schedule {
        let r = &self.cfg.rotation;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let current = self.proxies.values().filter(|p| p.active == active);
        let (msgs, bytes, rate_m, rate_b) = current.fold((0u64, 0u64, 0f64, 0f64), |a, p| {
            (
                a.0 + p.sealed_messages,
                a.1 + p.sealed_bytes,
                a.2 + p.rate.0,
                a.3 + p.rate.1,
            )
        });
        let by_time = r
            .rotate_every
            .map(|every| (now + every.saturating_sub(self.activated.elapsed())).as_secs());
        let eta = |used: u64, max: Option<u64>, rate: f64| {
            let max = max?;
            let left = max.saturating_sub(used) as f64;
            (rate > 0.0).then(|| now.as_secs() + (left / rate).ceil() as u64)
        };
        let by_usage = [
            eta(msgs, r.max_messages_per_epoch, rate_m),
            eta(bytes, r.max_bytes_per_epoch, rate_b),
        ]
        .into_iter()
        .flatten()
        .min();
        let (next, why) = match (by_time, by_usage) {
            (Some(t), Some(u)) if u < t => (Some(u), Some("usage")),
            (Some(t), _) => (Some(t), Some("time")),
            (None, Some(u)) => (Some(u), Some("usage")),
            (None, None) => (None, None),
        };
        message::Schedule {
            next,
            why: why.map(str::to_owned),
            rotate_every_s: r.rotate_every.map(|d| d.as_secs()),
            sealed_messages: msgs,
            sealed_bytes: bytes,
            max_messages: r.max_messages_per_epoch,
            max_bytes: r.max_bytes_per_epoch,
        }
    }
}
