//! The proxy process: the agent listener, the connection cap, the admin endpoint, shutdown.
//!
//! This module owns accepting agents and the lifetime of their sessions. It hands each accepted
//! connection to [`crate::session`] and knows nothing of what flows through it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::kek::Root;
use crate::keyring::{Keyring, KeyringError};
use crate::metrics::{Metrics, ReasonLabel};
use crate::process::node_id;
use crate::session::{self, Shared};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("cannot open the audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A scope's root could not be opened: the sentence names the scope and the URI.
    #[error("{0}")]
    Root(String),
}

fn open_audit(
    audit_log: Option<&std::path::Path>,
    root: &Root,
) -> Result<Option<Arc<crate::audit::AuditLog>>, StartError> {
    Ok(audit_log
        .map(|path| crate::audit::AuditLog::open(path, crate::audit::AuditKey::from_root(root)))
        .transpose()?
        .map(Arc::new))
}

/// Where one scope's control plane and files are.
struct ScopeSettings {
    prefix: String,
    rotation: crate::config::Rotation,
    state_dir: Option<std::path::PathBuf>,
    audit_log: Option<std::path::PathBuf>,
}

/// Scope `index`'s settings: 0 is the default scope, `i + 1` the `i`-th `[[scope]]`.
fn scope_settings(config: &Config, index: usize) -> ScopeSettings {
    let prefix = config.policy.control_prefix();
    match index.checked_sub(1).and_then(|i| config.scopes.get(i)) {
        None => ScopeSettings {
            prefix: prefix.to_owned(),
            rotation: config.rotation.clone(),
            state_dir: config.state_dir.clone(),
            audit_log: config.audit_log.clone(),
        },
        Some(scope) => ScopeSettings {
            prefix: scope.control_prefix(prefix),
            rotation: scope.rotation.clone(),
            state_dir: config.state_dir.as_deref().map(|d| scope.state_dir(d)),
            audit_log: config.audit_log.as_deref().map(|a| scope.audit_log(a)),
        },
    }
}

/// Opens a root: a file is read; an HSM or KMS root is checked, and its deployment seed read
/// from the bus under `prefix` (created there when `create` and it has none yet).
pub async fn open_root(
    config: &Config,
    kek: &crate::kek::KekUri,
    prefix: &str,
    create: bool,
) -> Result<Arc<Root>, String> {
    if kek.is_file() {
        return crate::kek::seed::open_root(kek, None, "", create).await;
    }
    crate::tls::install_default_provider();
    let opts = config
        .upstream_tls
        .apply(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?;
    let connect = opts.name("cipherbus-root").connect(upstream_urls(config));
    let client = match tokio::time::timeout(crate::kek::seed::START_RETRY, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("cannot reach the bus for the deployment seed: {e}")),
        Err(_) => return Err("cannot reach the bus for the deployment seed in time".into()),
    };
    crate::kek::seed::open_root(kek, Some(&client), prefix, create).await
}

/// Opens the root of every configured scope, in order. One that cannot be opened stops the
/// start with a sentence naming the scope.
pub async fn open_scope_roots(config: &Config, create: bool) -> Result<Vec<Arc<Root>>, String> {
    let mut roots = Vec::with_capacity(config.scopes.len());
    for scope in &config.scopes {
        let prefix = scope.control_prefix(config.policy.control_prefix());
        let root = open_root(config, &scope.kek, &prefix, create)
            .await
            .map_err(|e| format!("scope {:?}: {e}", scope.name))?;
        roots.push(root);
    }
    Ok(roots)
}

/// Opens the keyring of every scope: the default one under `root`, each configured scope under
/// its own root from `scope_roots`.
fn open_scopes(
    config: &Config,
    root: Arc<Root>,
    scope_roots: Vec<Arc<Root>>,
    role: &str,
) -> Result<crate::scope::Scopes, StartError> {
    if scope_roots.len() != config.scopes.len() {
        return Err(StartError::Root(
            "every configured scope needs its root opened".into(),
        ));
    }
    let mut scopes = crate::scope::Scopes::new(Arc::new(open_keyring(
        config,
        &scope_settings(config, 0),
        root,
        role,
    )?));
    for (i, (scope, root)) in config.scopes.iter().zip(scope_roots).enumerate() {
        let keyring = open_keyring(config, &scope_settings(config, i + 1), root, role)?;
        scopes.push(scope.name, scope.id, Arc::new(keyring));
    }
    Ok(scopes)
}

/// A running proxy. Dropping it stops the listener and closes every session.
#[derive(Debug)]
pub struct ProxyHandle {
    pub local_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// The default scope's keyring.
    pub keyring: Arc<Keyring>,
    /// Every scope's keyring, the default one first.
    pub scopes: Arc<crate::scope::Scopes>,
    /// What every agent session shares (a proxy's; none for a controller alone).
    shared: Option<Arc<Shared>>,
    /// The config in force: what a reload is compared with.
    running: std::sync::Mutex<Config>,
    /// Each held scope's rotation settings, for its authority (default scope first).
    rotation: Vec<watch::Sender<crate::config::Rotation>>,
    /// The permits that cap agent connections, and the cap they enforce (a proxy's).
    limit: Option<(Arc<Semaphore>, std::sync::atomic::AtomicUsize)>,
    shutdown: Option<watch::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// Set once, with one sentence, when a part the process cannot run without stopped.
    fatal: watch::Receiver<Option<String>>,
}

impl ProxyHandle {
    /// Waits until a part the process cannot run without stops (the key authority on a bus
    /// that cannot host it safely), and returns the sentence to stop with.
    pub async fn failed(&mut self) -> String {
        loop {
            if let Some(why) = self.fatal.borrow_and_update().clone() {
                return why;
            }
            if self.fatal.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The sentence a part the process cannot run without stopped with, if one did.
    pub fn failure(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    /// Puts what `new` changes of the subject policy (and each key scope's subjects), the
    /// connection cap and the rotation schedules in force: sessions use the policy from their
    /// next message on, connections above a lowered cap stay open, and each authority follows
    /// its new schedule at its next tick. Refused whole, with the running config left in force,
    /// when `new` changes a setting that needs a restart; the error names them.
    pub fn reload(&self, new: &Config) -> Result<(), String> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let changed = restart_settings(&running)
            .into_iter()
            .zip(restart_settings(new))
            .filter(|(old, new)| old.1 != new.1)
            .map(|(old, _)| old.0)
            .collect::<Vec<_>>();
        if !changed.is_empty() {
            self.metrics.reload("restart_required");
            return Err(format!(
                "{} changed, which takes a restart; the running config stays in force",
                changed.join(", ")
            ));
        }
        if let Some(shared) = &self.shared {
            let revision = shared.policy.load().revision() + 1;
            shared
                .policy
                .store(Arc::new(new.policy.clone().with_revision(revision)));
        }
        if let Some((limit, cap)) = &self.limit {
            let to = connection_cap(
                new.max_connections,
                new.max_connections_set,
                std::fs::read_to_string("/proc/self/limits")
                    .ok()
                    .as_deref()
                    .and_then(crate::process::open_files_limit),
            );
            let from = cap.swap(to, std::sync::atomic::Ordering::Relaxed);
            resize(limit, from, to);
            self.metrics
                .max_connections
                .set(i64::try_from(to).unwrap_or(i64::MAX));
        }
        for (index, (tx, held)) in self.rotation.iter().zip(self.scopes.iter()).enumerate() {
            let rotation = scope_settings(new, index).rotation;
            let label = crate::metrics::ScopeLabel { scope: held.name };
            self.metrics
                .rotation_interval
                .get_or_create(&label)
                .set(schedule_seconds(rotation.rotate_every));
            tx.send_if_modified(|r| {
                let changed = *r != rotation;
                *r = rotation;
                changed
            });
        }
        *running = new.clone();
        self.metrics.reload("ok");
        Ok(())
    }

    /// Counts a reload refused before it reached [`ProxyHandle::reload`] (an unreadable or
    /// invalid config file).
    pub fn reload_invalid(&self) {
        self.metrics.reload("invalid");
    }

    /// Stops accepting, closes every session, and waits for the listener tasks to end.
    pub async fn shutdown(mut self) {
        self.shutdown.take();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown.take();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens a scope's keyring from its state directory. A damaged one stops the start, and the
/// refusal goes to the audit log beside the key events (best effort: the log may be on the same
/// disk).
fn open_keyring(
    config: &Config,
    at: &ScopeSettings,
    root: Arc<Root>,
    role: &str,
) -> Result<Keyring, StartError> {
    let audit_key = crate::audit::AuditKey::from_root(&root);
    Keyring::open(root, at.state_dir.as_deref(), config.retired_cache).map_err(|e| {
        if let Some(path) = at.audit_log.as_deref() {
            let event = crate::audit::Event {
                kind: crate::audit::EventKind::Refused,
                epoch: None,
                fingerprint: None,
                actor: node_id(role),
                reason: format!("keyring not opened, not starting: {e}"),
            };
            let logged = crate::audit::AuditLog::open(path, audit_key)
                .map_err(|e| e.to_string())
                .and_then(|log| log.append(event).map_err(|e| e.to_string()));
            if let Err(why) = logged {
                tracing::error!(error = %why, "cannot audit the refusal");
            }
        }
        StartError::Keyring(e)
    })
}

/// Opens the keyrings and starts a proxy with the given root key; the roots of the configured
/// scopes are opened here.
pub async fn start(config: Config, root: impl Into<Arc<Root>>) -> Result<ProxyHandle, StartError> {
    crate::tls::install_default_provider();
    let scope_roots = open_scope_roots(&config, true)
        .await
        .map_err(StartError::Root)?;
    let scopes = Arc::new(open_scopes(&config, root.into(), scope_roots, "proxy")?);
    start_with_scopes(config, scopes).await
}

/// Starts the key authority alone: its keyrings, the admin endpoint, no agent listener. It is
/// the authority of every scope it is configured with.
pub async fn start_controller(
    config: Config,
    root: impl Into<Arc<Root>>,
) -> Result<ProxyHandle, StartError> {
    crate::tls::install_default_provider();
    let scope_roots = open_scope_roots(&config, true)
        .await
        .map_err(StartError::Root)?;
    let scopes = Arc::new(open_scopes(&config, root.into(), scope_roots, "authority")?);
    // It follows the announcements like a proxy, so that if it is standing by it holds the
    // current keyring when it takes the role over.
    let base = Base::start(&config, &scopes, "authority-follower", true).await?;
    Ok(base.into_handle(config.listen, scopes))
}

/// What every process runs: metrics, the admin endpoint, the control connection that follows
/// announcements, and the key authority where configured.
struct Base {
    metrics: Arc<Metrics>,
    admin_addr: Option<SocketAddr>,
    shutdown_tx: watch::Sender<()>,
    shutdown_rx: watch::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    fatal: watch::Receiver<Option<String>>,
    /// This process's id on the control plane (as `cipherbus status` shows it).
    node: String,
    /// The config the process started with.
    config: Config,
    /// Each held scope's rotation settings, as its authority follows them (default first).
    rotation: Vec<watch::Sender<crate::config::Rotation>>,
}

impl Base {
    async fn start(
        config: &Config,
        scopes: &Arc<crate::scope::Scopes>,
        role: &str,
        controller: bool,
    ) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let mut tasks = Vec::new();
        let mut admin_addr = None;
        if let Some(addr) = config.admin {
            let admin = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen { addr, source })?;
            admin_addr = admin.local_addr().ok();
            tasks.push(tokio::spawn(crate::admin::serve(
                admin,
                metrics.clone(),
                scopes.clone(),
                shutdown_rx.clone(),
            )));
        }
        let (fatal_tx, fatal) = watch::channel(None);
        let node = node_id(role);
        let mut rotation = Vec::new();
        for (index, held) in scopes.iter().enumerate() {
            let at = scope_settings(config, index);
            let keyring = &held.keyring;
            let audit = open_audit(at.audit_log.as_deref(), keyring.root())?;
            if let Some(log) = &audit {
                keyring.set_audit(log.clone(), node.clone());
            }
            metrics.set_active_epoch(held.name, keyring.snapshot().active.epoch);
            let label = crate::metrics::ScopeLabel { scope: held.name };
            // Present from the start, so "never heard" (0) is visible to alerts.
            let _ = metrics.authority_last_seen.get_or_create(&label);
            metrics
                .rotation_interval
                .get_or_create(&label)
                .set(schedule_seconds(at.rotation.rotate_every));
            tasks.push(tokio::spawn(crate::control::member::run(
                keyring.clone(),
                metrics.clone(),
                crate::control::member::MemberConfig {
                    upstreams: upstream_urls(config),
                    prefix: at.prefix.clone(),
                    node: node.clone(),
                    heartbeat_every: at.rotation.heartbeat_every,
                    tls: config.upstream_tls.clone(),
                    scope: held.name,
                },
                // Beside an authority, the authority records every key event itself; this proxy
                // may apply a commit first, from the bucket, and must not record it twice.
                if controller { None } else { audit.clone() },
                shutdown_rx.clone(),
            )));
            let (rotation_tx, rotation_rx) = watch::channel(at.rotation.clone());
            rotation.push(rotation_tx);
            if controller {
                let authority = crate::control::authority::run(
                    keyring.clone(),
                    metrics.clone(),
                    upstream_urls(config),
                    crate::control::authority::AuthorityConfig {
                        prefix: at.prefix,
                        rotation: at.rotation,
                        node: node_id("authority"),
                        tls: config.upstream_tls.clone(),
                        scope: held.name,
                    },
                    audit,
                    rotation_rx,
                    shutdown_rx.clone(),
                );
                let fatal_tx = fatal_tx.clone();
                let name = held.name;
                let named = index > 0;
                tasks.push(tokio::spawn(async move {
                    if let Err(why) = authority.await {
                        let why = if named {
                            format!("scope {name:?}: {why}")
                        } else {
                            why
                        };
                        let _ = fatal_tx.send(Some(why));
                    }
                }));
            }
        }
        Ok(Base {
            node,
            config: config.clone(),
            rotation,
            fatal,
            metrics,
            admin_addr,
            shutdown_tx,
            shutdown_rx,
            tasks,
        })
    }

    fn into_handle(self, local_addr: SocketAddr, scopes: Arc<crate::scope::Scopes>) -> ProxyHandle {
        ProxyHandle {
            local_addr,
            admin_addr: self.admin_addr,
            metrics: self.metrics,
            keyring: scopes.default_keyring().clone(),
            scopes,
            shared: None,
            running: std::sync::Mutex::new(self.config),
            rotation: self.rotation,
            limit: None,
            shutdown: Some(self.shutdown_tx),
            tasks: self.tasks,
            fatal: self.fatal,
        }
    }
}

/// Starts a proxy on open keyrings.
pub async fn start_with_scopes(
    config: Config,
    scopes: Arc<crate::scope::Scopes>,
) -> Result<ProxyHandle, StartError> {
    crate::tls::install_default_provider();
    // Certificates are checked before anything listens, so a bad file fails the start.
    let agent_tls = match &config.agent_tls {
        Some((mode, files)) => Some(Arc::new(crate::tls::AgentTls::new(*mode, files.clone())?)),
        None => None,
    };
    let upstream_tls = config.upstream_tls.load()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let mut base = Base::start(&config, &scopes, "proxy", config.controller).await?;
    let shutdown_rx = base.shutdown_rx.clone();
    let metrics = base.metrics.clone();
    metrics.set_aead_backend(config.aead.effective().0);

    let upstreams: Vec<String> = config.upstreams.iter().map(ToString::to_string).collect();
    tracing::info!(
        listen = %local_addr,
        node = %base.node,
        upstream = %upstreams.join(","),
        active_epoch = scopes.default_keyring().snapshot().active.epoch,
        scopes = scopes.iter().count(),
        aead = %config.aead.describe(),
        "cipherbus proxy listening"
    );
    base.tasks.push(tokio::spawn(probe_upstream(
        config.clone(),
        shutdown_rx.clone(),
    )));
    if let Some(t) = &agent_tls {
        base.tasks
            .push(tokio::spawn(t.clone().watch(shutdown_rx.clone())));
    }
    let cap = connection_cap(
        config.max_connections,
        config.max_connections_set,
        std::fs::read_to_string("/proc/self/limits")
            .ok()
            .as_deref()
            .and_then(crate::process::open_files_limit),
    );
    metrics
        .max_connections
        .set(i64::try_from(cap).unwrap_or(i64::MAX));
    let limit = Arc::new(Semaphore::new(cap));
    let shared = Arc::new(Shared::new(
        config,
        scopes.clone(),
        metrics,
        local_addr,
        agent_tls,
        upstream_tls,
    ));
    let limit_kept = limit.clone();
    base.tasks.push(tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        limit,
        shutdown_rx,
    )));
    let mut handle = base.into_handle(local_addr, scopes);
    handle.shared = Some(shared);
    handle.limit = Some((limit_kept, std::sync::atomic::AtomicUsize::new(cap)));
    Ok(handle)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<()>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared
                .metrics
                .connections_refused
                .get_or_create(&ReasonLabel {
                    reason: "max_connections",
                })
                .inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        shared.metrics.connections_accepted.inc();
        shared.metrics.connections.inc();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let metrics = shared.metrics.clone();
            session::run(shared, stream, peer, shutdown).await;
            metrics.connections.dec();
            drop(permit);
        });
    }
}

/// Every setting a reload cannot change, by name, as text to compare: everything but the
/// subject rules and the subjects of each key scope.
fn restart_settings(c: &Config) -> Vec<(&'static str, String)> {
    // The schedule and limits of rotation reload; the intervals the control plane runs on do not.
    let intervals = |r: &crate::config::Rotation| {
        format!(
            "heartbeat_every {:?}, lease_ttl {:?}, require_jetstream {}",
            r.heartbeat_every, r.lease_ttl, r.require_jetstream
        )
    };
    let scopes: Vec<String> = c
        .scopes
        .iter()
        .map(|s| format!("{} {:?} {}", s.name, s.kek, intervals(&s.rotation)))
        .collect();
    vec![
        ("listen", c.listen.to_string()),
        ("upstream", format!("{:?}", c.upstreams)),
        ("kek", format!("{:?}", c.kek)),
        ("state_dir", format!("{:?}", c.state_dir)),
        ("admin", format!("{:?}", c.admin)),
        ("control_prefix", c.policy.control_prefix().to_owned()),
        (
            "upstream_connect_timeout",
            format!("{:?}", c.upstream_connect_timeout),
        ),
        ("keyring", c.retired_cache.to_string()),
        (
            "rotation.heartbeat_every, lease_ttl or require_jetstream",
            intervals(&c.rotation),
        ),
        ("controller", c.controller.to_string()),
        ("audit_log", format!("{:?}", c.audit_log)),
        ("tls", format!("{:?}", c.agent_tls)),
        ("upstream tls", format!("{:?}", c.upstream_tls)),
        ("aead", format!("{:?}", c.aead)),
        (
            "the key scopes (names, roots, rotation intervals)",
            scopes.join("; "),
        ),
    ]
}

/// Moves the connection cap from `from` to `to` permits. Permits held by open connections are
/// not taken back: a lowered cap takes the rest as those connections close.
fn resize(limit: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        limit.add_permits(to - from);
        return;
    }
    let owed = from - to - limit.forget_permits(from - to);
    if owed > 0 {
        let limit = limit.clone();
        let owed = u32::try_from(owed).unwrap_or(u32::MAX);
        // Released permits go to this waiter before any new connection.
        tokio::spawn(async move {
            if let Ok(p) = limit.acquire_many_owned(owed).await {
                p.forget();
            }
        });
    }
}

/// Descriptors kept back from agent sessions: the listeners, control connections, the state
/// directory, the audit log, certificate reloads.
const RESERVED_FDS: u64 = 64;

/// The connection cap that fits the process's descriptor limit. Each session holds two
/// descriptors (agent and upstream); a cap above what the limit allows would let a flood end in
/// failed accepts instead of the clear refusal, so it is lowered: with a warning when the
/// operator asked for that cap, as a plain notice when it is the default.
fn connection_cap(configured: usize, set: bool, open_files: Option<u64>) -> usize {
    let Some(limit) = open_files else {
        return configured;
    };
    let fits = usize::try_from(limit.saturating_sub(RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if fits < configured {
        if set {
            tracing::warn!(
                max_connections = configured,
                open_files_limit = limit,
                lowered_to = fits,
                "max_connections does not fit the open-files limit (two per agent); lowering it (raise `ulimit -n` to keep it)"
            );
        } else {
            tracing::info!(
                open_files_limit = limit,
                lowered_to = fits,
                "the default max_connections does not fit the open-files limit (two per agent); lowering it"
            );
        }
        fits
    } else {
        configured
    }
}

/// A scope's `rotate_every` as `cipherbus_rotation_interval_seconds` shows it: 0 for a scope
/// with no time schedule, so the series is there either way (dashboards show "no schedule").
fn schedule_seconds(every: Option<Duration>) -> i64 {
    every.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub fn upstream_urls(config: &Config) -> Vec<String> {
    config
        .upstreams
        .iter()
        .map(|u| {
            let scheme = if u.tls { "tls" } else { "nats" };
            format!("{scheme}://{u}")
        })
        .collect()
}

/// Tells an agent over the cap what the server would say, then closes.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream
            .write_all(b"-ERR 'maximum connections exceeded'\r\n")
            .await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Logs whether the upstream is reachable, retrying with backoff, so an operator sees a dead
/// upstream before any agent does. Sessions dial on their own; this never blocks them.
async fn probe_upstream(config: Config, mut shutdown: watch::Receiver<()>) {
    let all: Vec<String> = config.upstreams.iter().map(ToString::to_string).collect();
    let all = all.join(",");
    let mut backoff = Duration::from_millis(500);
    let mut failures = 0u32;
    loop {
        let mut reached = None;
        for up in &config.upstreams {
            let dial = TcpStream::connect((up.host.as_str(), up.port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), dial).await {
                reached = Some(up.to_string());
                break;
            }
        }
        match reached {
            Some(up) => {
                if failures > 0 {
                    tracing::info!(upstream = %up, after = failures, "upstream reachable again");
                } else {
                    tracing::debug!(upstream = %up, "upstream reachable");
                }
                return;
            }
            None => {
                failures += 1;
                tracing::warn!(
                    upstream = %all,
                    retry_in = ?backoff,
                    attempts = failures,
                    "no upstream NATS server reachable; agents are turned away until one is"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_lowered_to_what_the_descriptors_allow() {
        assert_eq!(connection_cap(10_000, true, Some(1024)), 480);
        assert_eq!(connection_cap(100, true, Some(1024)), 100);
        assert_eq!(connection_cap(10_000, false, None), 10_000);
        assert_eq!(connection_cap(10, true, Some(3)), 1, "never zero");
    }
}
