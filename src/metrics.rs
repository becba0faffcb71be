//! Prometheus metrics for the data path.
//!
//! This module owns the metric registry and the names, help texts and label sets of the
//! proxy's metrics. Hot-path counters are plain atomics; pumps add to them once per read batch,
//! not once per message. Rendering happens only when `/metrics` is scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// Reasons a payload on an `encrypt` subject was refused. Pre-created so they read 0, not absent.
pub const OPEN_FAILURE_REASONS: &[&str] = &[
    "plaintext",
    "scope_unavailable",
    "auth",
    "unknown_epoch",
    "destroyed",
    "unbound",
    "truncated",
    "version",
    "suite",
    "flags",
    "embedded",
    "key_unavailable",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EpochLabel {
    pub scope: &'static str,
    pub epoch: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub scope: &'static str,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// The standard `process_*` metrics (no `cipherbus_` prefix), read from `/proc` when scraped,
/// so a dashboard needs no node exporter for the proxy's CPU and memory.
#[derive(Debug, Default)]
struct ProcessMetrics {
    registry: Registry,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// The CPU seconds already added to `cpu_seconds`.
    cpu_counted: std::sync::Mutex<f64>,
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    fn new() -> Self {
        let mut p = ProcessMetrics::default();
        let mut registry = Registry::default();
        registry.register_with_unit(
            "process_cpu",
            "Total user and system CPU time spent",
            Unit::Seconds,
            p.cpu_seconds.clone(),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            p.resident_memory.clone(),
        );
        registry.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            p.virtual_memory.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            p.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "The open file descriptor limit",
            p.max_fds.clone(),
        );
        registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            p.start_time.clone(),
        );
        p.registry = registry;
        p
    }

    /// Reads this process's figures from `/proc/self`.
    fn refresh(&self) {
        let ticks = rustix::param::clock_ticks_per_second().max(1) as f64;
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n).and_then(|v| v.parse::<u64>().ok());
        // Numbered as in proc(5) from the state (field 3): utime 14, stime 15, starttime 22,
        // vsize 23, rss 24 (pages).
        if let (Some(utime), Some(stime)) = (field(14 - 3), field(15 - 3)) {
            let total = (utime + stime) as f64 / ticks;
            let mut counted = self
                .cpu_counted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if total > *counted {
                self.cpu_seconds.inc_by(total - *counted);
                *counted = total;
            }
        }
        if let Some(vsize) = field(23 - 3) {
            self.virtual_memory.set(vsize as i64);
        }
        if let Some(pages) = field(24 - 3) {
            self.resident_memory
                .set((pages * rustix::param::page_size() as u64) as i64);
        }
        if let Some(start) = field(22 - 3) {
            let boot = std::fs::read_to_string("/proc/stat")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(boot) = boot {
                self.start_time
                    .set((boot + (start as f64 / ticks) as u64) as i64);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        let limit = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .as_deref()
            .and_then(crate::process::open_files_limit);
        if let Some(limit) = limit {
            self.max_fds.set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
    }
}

/// All metrics of one proxy process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    process: ProcessMetrics,
    pub messages_sealed: Counter,
    pub messages_opened: Counter,
    pub bytes_sealed: Counter,
    pub bytes_opened: Counter,
    pub open_failures: Family<ReasonLabel, Counter>,
    pub denied: Family<DirectionLabel, Counter>,
    pub protocol_errors: Family<ReasonLabel, Counter>,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub connections_refused: Family<ReasonLabel, Counter>,
    pub upstream_connect_failures: Counter,
    pub active_epoch: Family<ScopeLabel, Gauge>,
    pub control_refused: Family<ReasonLabel, Counter>,
    pub rotations: Counter,
    pub epoch_sealed: Family<EpochLabel, Counter>,
    pub epochs: Family<StateLabel, Gauge>,
    pub key_age: Family<ScopeLabel, Gauge>,
    /// Per scope, what its members report to its authority for usage-based rotation.
    pub scope_sealed_messages: Family<ScopeLabel, Counter>,
    pub scope_sealed_bytes: Family<ScopeLabel, Counter>,
    pub runtime_tasks: Gauge,
    pub aead_backend: Family<BackendLabel, Gauge>,
    pub audit_failures: Family<ReasonLabel, Counter>,
    pub rotations_refused: Family<ReasonLabel, Counter>,
    pub reloads: Family<OutcomeLabel, Counter>,
    pub max_connections: Gauge,
    pub rotation_interval: Family<ScopeLabel, Gauge>,
    pub retired_loads: Family<ScopeLabel, Counter>,
    pub authority_leader: Family<ScopeLabel, Gauge>,
    pub authority_last_seen: Family<ScopeLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cipherbus");
        let m = Metrics {
            messages_sealed: Counter::default(),
            messages_opened: Counter::default(),
            bytes_sealed: Counter::default(),
            bytes_opened: Counter::default(),
            open_failures: Family::default(),
            denied: Family::default(),
            protocol_errors: Family::default(),
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Family::default(),
            upstream_connect_failures: Counter::default(),
            active_epoch: Family::default(),
            control_refused: Family::default(),
            rotations: Counter::default(),
            epoch_sealed: Family::default(),
            epochs: Family::default(),
            key_age: Family::default(),
            scope_sealed_messages: Family::default(),
            scope_sealed_bytes: Family::default(),
            runtime_tasks: Gauge::default(),
            aead_backend: Family::default(),
            audit_failures: Family::default(),
            rotations_refused: Family::default(),
            reloads: Family::default(),
            max_connections: Gauge::default(),
            rotation_interval: Family::default(),
            retired_loads: Family::default(),
            authority_leader: Family::default(),
            authority_last_seen: Family::default(),
            registry: Registry::default(),
            process: ProcessMetrics::new(),
        };
        // Process-wide: the root is opened, and the KMS first called, before this registry exists.
        registry.register(
            "kms_requests",
            "Calls to the root's HSM or KMS, by operation (wrap, unwrap, check) and outcome",
            crate::kek::KMS_METRICS.requests.clone(),
        );
        registry.register_with_unit(
            "kms_request_duration",
            "Latency of calls to the root's HSM or KMS",
            Unit::Seconds,
            crate::kek::KMS_METRICS.latency.clone(),
        );
        registry.register(
            "messages_sealed",
            "Payloads sealed on their way from agents to the bus",
            m.messages_sealed.clone(),
        );
        registry.register(
            "messages_opened",
            "Payloads opened on their way from the bus to agents",
            m.messages_opened.clone(),
        );
        registry.register_with_unit(
            "sealed",
            "Plaintext bytes sealed",
            Unit::Bytes,
            m.bytes_sealed.clone(),
        );
        registry.register_with_unit(
            "opened",
            "Plaintext bytes delivered after opening",
            Unit::Bytes,
            m.bytes_opened.clone(),
        );
        registry.register(
            "open_failures",
            "Payloads on encrypt subjects refused and not delivered, by reason",
            m.open_failures.clone(),
        );
        registry.register(
            "denied",
            "Publishes, subscriptions and deliveries refused by a deny rule, by direction",
            m.denied.clone(),
        );
        registry.register(
            "protocol_errors",
            "Agent or upstream connections closed for a protocol violation, by reason",
            m.protocol_errors.clone(),
        );
        registry.register(
            "connections",
            "Agent connections currently open",
            m.connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "Agent connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Agent connections refused, by reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed attempts to reach an upstream NATS server",
            m.upstream_connect_failures.clone(),
        );
        registry.register(
            "active_epoch",
            "Epoch of the data key that seals new messages, by key scope",
            m.active_epoch.clone(),
        );
        registry.register(
            "scope_sealed_messages",
            "Payloads sealed, by key scope",
            m.scope_sealed_messages.clone(),
        );
        registry.register_with_unit(
            "scope_sealed",
            "Plaintext bytes sealed, by key scope",
            Unit::Bytes,
            m.scope_sealed_bytes.clone(),
        );
        registry.register(
            "control_refused",
            "Control messages refused: forged, replayed, stale epochs, by reason",
            m.control_refused.clone(),
        );
        registry.register(
            "rotations",
            "Rotations this process carried out as the key authority",
            m.rotations.clone(),
        );
        registry.register(
            "epoch_sealed_messages",
            "Payloads this proxy sealed, by key scope and epoch (destroyed epochs are dropped)",
            m.epoch_sealed.clone(),
        );
        registry.register(
            "epochs",
            "Epochs known to this proxy's keyrings, by key scope and state",
            m.epochs.clone(),
        );
        registry.register_with_unit(
            "key_age",
            "Time since the active epoch was activated, by key scope",
            Unit::Seconds,
            m.key_age.clone(),
        );
        registry.register(
            "runtime_tasks",
            "Tasks alive in the proxy's async runtime (sessions, control plane, admin), for leak checks",
            m.runtime_tasks.clone(),
        );
        registry.register(
            "aead_backend",
            "The AEAD code sealing and opening envelopes under 4 KiB: 1 for the backend in use",
            m.aead_backend.clone(),
        );
        registry.register(
            "audit_failures",
            "Audit entries that could not be written, by where: the local file or the audit stream",
            m.audit_failures.clone(),
        );
        registry.register(
            "rotations_refused",
            "Rotations, revocations and destructions the key authority refused, by reason",
            m.rotations_refused.clone(),
        );
        registry.register(
            "reloads",
            "Config reloads (SIGHUP), by outcome: ok, invalid (the file did not validate) or restart_required",
            m.reloads.clone(),
        );
        registry.register(
            "max_connections",
            "The agent connection cap in force (max_connections, lowered to fit the open-files limit)",
            m.max_connections.clone(),
        );
        registry.register(
            "retired_key_loads",
            "Retired keys unwrapped on their first use (again after the retired LRU let them go), one call to the root each; a start unwraps only the active and staged keys",
            m.retired_loads.clone(),
        );
        registry.register_with_unit(
            "rotation_interval",
            "The configured rotate_every of each key scope; 0 for a scope with no time schedule",
            Unit::Seconds,
            m.rotation_interval.clone(),
        );
        registry.register(
            "authority_leader",
            "1 while this process's key authority acts for the scope, 0 while it stands by",
            m.authority_leader.clone(),
        );
        registry.register_with_unit(
            "authority_last_seen_timestamp",
            "When this proxy last heard the acting key authority of the scope (Unix time; 0 before it has)",
            Unit::Seconds,
            m.authority_last_seen.clone(),
        );
        for outcome in ["ok", "invalid", "restart_required"] {
            let _ = m.reloads.get_or_create(&OutcomeLabel { outcome });
        }
        for reason in ["file", "stream"] {
            let _ = m.audit_failures.get_or_create(&ReasonLabel { reason });
        }
        let _ = m
            .rotations_refused
            .get_or_create(&ReasonLabel { reason: "audit" });
        for backend in ["audited", "batched"] {
            let _ = m.aead_backend.get_or_create(&BackendLabel { backend });
        }
        for reason in OPEN_FAILURE_REASONS {
            let _ = m.open_failures.get_or_create(&ReasonLabel { reason });
        }
        for direction in ["publish", "subscribe", "deliver"] {
            let _ = m.denied.get_or_create(&DirectionLabel { direction });
        }
        for reason in ["max_connections", "no_upstream"] {
            let _ = m.connections_refused.get_or_create(&ReasonLabel { reason });
        }
        Metrics { registry, ..m }
    }

    pub fn open_failure(&self, reason: &'static str) {
        self.open_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn reload(&self, outcome: &'static str) {
        self.reloads.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn deny(&self, direction: &'static str) {
        self.denied
            .get_or_create(&DirectionLabel { direction })
            .inc();
    }

    pub fn control_refused(&self, reason: &'static str) {
        self.control_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn protocol_error(&self, reason: &'static str) {
        self.protocol_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The current value of `cipherbus_open_failures_total{reason}`.
    pub fn open_failures_for(&self, reason: &'static str) -> u64 {
        self.open_failures
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Counts what a session sealed in scope `scope`.
    pub fn scope_sealed(&self, scope: &'static str, messages: u64, bytes: u64) {
        let label = ScopeLabel { scope };
        self.scope_sealed_messages
            .get_or_create(&label)
            .inc_by(messages);
        self.scope_sealed_bytes.get_or_create(&label).inc_by(bytes);
    }

    /// Messages and bytes sealed in scope `scope` so far.
    pub fn scope_sealed_totals(&self, scope: &'static str) -> (u64, u64) {
        let label = ScopeLabel { scope };
        (
            self.scope_sealed_messages.get_or_create(&label).get(),
            self.scope_sealed_bytes.get_or_create(&label).get(),
        )
    }

    /// Sets scope `scope`'s active epoch.
    pub fn set_active_epoch(&self, scope: &'static str, epoch: u32) {
        self.active_epoch
            .get_or_create(&ScopeLabel { scope })
            .set(i64::from(epoch));
    }

    /// Records that scope `scope`'s acting authority was just heard.
    pub fn authority_heard(&self, scope: &'static str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.authority_last_seen
            .get_or_create(&ScopeLabel { scope })
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Payloads refused so far, by reason (open failures, and `deny_DIRECTION` for deny
    /// rules), non-zero only: what a proxy reports for `cipherbus status`.
    pub fn refusal_totals(&self) -> std::collections::BTreeMap<String, u64> {
        let failures = OPEN_FAILURE_REASONS.iter().map(|&reason| {
            let n = self
                .open_failures
                .get_or_create(&ReasonLabel { reason })
                .get();
            (reason.to_owned(), n)
        });
        let denies = ["publish", "subscribe", "deliver"].map(|direction| {
            let n = self
                .denied
                .get_or_create(&DirectionLabel { direction })
                .get();
            (format!("deny_{direction}"), n)
        });
        failures.chain(denies).filter(|(_, n)| *n > 0).collect()
    }

    /// The active epoch last set for scope `scope`.
    pub fn active_epoch_of(&self, scope: &'static str) -> i64 {
        self.active_epoch.get_or_create(&ScopeLabel { scope }).get()
    }

    /// Brings scope `scope`'s keyring gauges up to date; called when metrics are scraped.
    pub fn refresh_keys(&self, scope: &'static str, keyring: &crate::keyring::Keyring) {
        use crate::keyring::KeyState;
        let snap = keyring.snapshot();
        self.set_active_epoch(scope, snap.active.epoch);
        let loads = self.retired_loads.get_or_create(&ScopeLabel { scope });
        loads.inc_by(keyring.retired_loads().saturating_sub(loads.get()));
        let mut counts = [0i64; 4];
        for (epoch, state) in snap.epochs() {
            let i = match state {
                KeyState::Staged => 0,
                KeyState::Active => 1,
                KeyState::Retired => 2,
                KeyState::Destroyed => {
                    self.epoch_sealed.remove(&EpochLabel { scope, epoch });
                    3
                }
            };
            counts[i] += 1;
        }
        let unsaved = i64::try_from(snap.unsaved().count()).unwrap_or(i64::MAX);
        for (state, n) in ["staged", "active", "retired", "destroyed", "unsaved"]
            .into_iter()
            .zip(counts.into_iter().chain([unsaved]))
        {
            self.epochs
                .get_or_create(&StateLabel { scope, state })
                .set(n);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let activated = keyring
            .records()
            .iter()
            .find(|r| r.epoch == snap.active.epoch)
            .and_then(|r| r.activated);
        self.key_age
            .get_or_create(&ScopeLabel { scope })
            .set(activated.map_or(0, |t| now.saturating_sub(t)) as i64);
    }

    /// Marks `backend` as the one in use.
    pub fn set_aead_backend(&self, backend: crate::envelope::AeadBackend) {
        for b in [
            crate::envelope::AeadBackend::Audited,
            crate::envelope::AeadBackend::Batched,
        ] {
            let label = BackendLabel { backend: b.name() };
            self.aead_backend
                .get_or_create(&label)
                .set(i64::from(b == backend));
        }
    }

    /// Counts the runtime's live tasks; called when metrics are scraped.
    pub fn refresh_runtime(&self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks
                .set(rt.metrics().num_alive_tasks() as i64);
        }
    }

    /// Renders the registry in the Prometheus/OpenMetrics text format, the `process_*`
    /// metrics (read now) among them.
    pub fn render(&self) -> String {
        self.process.refresh();
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        let mut process = String::with_capacity(1024);
        let _ = prometheus_client::encoding::text::encode(&mut process, &self.process.registry);
        // One exposition, one `# EOF` at its end.
        let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_owned();
        body + &process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_with_prefix_and_reasons() {
        let m = Metrics::new();
        m.messages_sealed.inc_by(3);
        m.open_failure("auth");
        m.set_active_epoch("default", 7);
        m.scope_sealed("payments", 2, 10);
        let text = m.render();
        assert!(text.contains("cipherbus_messages_sealed_total 3"), "{text}");
        assert!(text.contains("cipherbus_open_failures_total{reason=\"auth\"} 1"));
        assert!(text.contains("cipherbus_open_failures_total{reason=\"plaintext\"} 0"));
        assert!(
            text.contains("cipherbus_active_epoch{scope=\"default\"} 7"),
            "{text}"
        );
        assert!(text.contains("cipherbus_scope_sealed_messages_total{scope=\"payments\"} 2"));
        assert!(text.contains("cipherbus_scope_sealed_bytes_total{scope=\"payments\"} 10"));
        assert!(text.contains("cipherbus_sealed_bytes_total"));
        assert!(text.contains("cipherbus_aead_backend{backend=\"batched\"} 0"));
        m.set_aead_backend(crate::envelope::AeadBackend::Audited);
        let text = m.render();
        assert!(
            text.contains("cipherbus_aead_backend{backend=\"audited\"} 1"),
            "{text}"
        );
        assert!(text.contains("cipherbus_aead_backend{backend=\"batched\"} 0"));
        assert_eq!(m.open_failures_for("auth"), 1);
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let m = Metrics::new();
        // Burn a little CPU so the counter has something to show.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let text = m.render();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing: {text}"))
        };
        assert!(value("process_cpu_seconds_total") > 0.0);
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        // 0 when the limit is unlimited.
        let max = value("process_max_fds");
        assert!(max == 0.0 || max >= value("process_open_fds"), "{max}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start > now - 86_400.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
