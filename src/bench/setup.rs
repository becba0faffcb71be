//! The processes of one run: nats-server, and the forwarders and proxies as children of this
//! binary (their CPU time and peak RSS read from `/proc`), with their scratch directories and
//! the proxies' root.

use super::*;

pub(super) fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| err(format!("no free port: {e}")))
}

/// A child process, killed on drop.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) child: Child,
    pub(super) log: PathBuf,
    /// A proxy's admin endpoint (`/metrics`).
    pub(super) admin: Option<SocketAddr>,
}

impl Proc {
    pub(super) fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc, BenchError> {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections, failing early if the process exits.
    pub(super) fn wait_listening(&mut self, addr: SocketAddr) -> Result<(), BenchError> {
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
    pub(super) fn cpu_seconds(&self) -> f64 {
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
    pub(super) fn mem_kib(&self, field: &str) -> u64 {
        status_kib(self.pid(), field)
    }
}

pub(super) fn status_kib(pid: u32, field: &str) -> u64 {
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
pub(super) struct Scratch {
    pub(super) dir: PathBuf,
    pub(super) keep: AtomicBool,
}

impl Scratch {
    /// A directory of its own, readable by this user only (it holds a root key). Named by
    /// process id and a random tag: a kept directory of an earlier failed run can carry the
    /// same process id, since ids are reused.
    pub(super) fn new() -> Result<Scratch, BenchError> {
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
pub(super) static CLIENT_EVENTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
/// Events kept; a flapping connection must not grow the list without bound.
pub(super) const CLIENT_EVENTS_KEPT: usize = 32;

pub(super) fn client_events() -> String {
    let events = CLIENT_EVENTS.lock().map(|e| e.clone()).unwrap_or_default();
    if events.is_empty() {
        "none".to_owned()
    } else {
        events.join("; ")
    }
}

/// Where the proxies' root key is.
pub(super) enum BenchRoot {
    /// A key file: made for the run, or the one `--kek file:PATH` names.
    File { path: PathBuf, generated: bool },
    /// An HSM or KMS root, reached with this process's environment (which the proxies inherit).
    Kms {
        uri: cipherbus::kek::KekUri,
        kind: &'static str,
    },
}

impl BenchRoot {
    /// `file`, `pkcs11`, `vault-transit` or `aws-kms`.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            BenchRoot::File { .. } => "file",
            BenchRoot::Kms { kind, .. } => kind,
        }
    }

    /// The URI as output may show it (no secrets); `None` for the key file made for the run.
    pub(super) fn uri(&self) -> Option<String> {
        match self {
            BenchRoot::File {
                generated: true, ..
            } => None,
            BenchRoot::File { path, .. } => Some(format!("file:{}", path.display())),
            BenchRoot::Kms { uri, .. } => Some(uri.describe()),
        }
    }

    pub(super) fn is_kms(&self) -> bool {
        matches!(self, BenchRoot::Kms { .. })
    }

    /// The `--kek` value the proxies get.
    pub(super) fn arg(&self) -> String {
        match self {
            BenchRoot::File { path, .. } => format!("file:{}", path.display()),
            BenchRoot::Kms { uri, .. } => uri.describe(),
        }
    }

    /// Proves an HSM or KMS root answers and may wrap and unwrap before anything starts, so a
    /// missing key or token is one sentence here rather than a proxy that did not start.
    pub(super) fn open(
        kek: Option<cipherbus::kek::KekUri>,
        scratch: &Scratch,
    ) -> Result<BenchRoot, BenchError> {
        use cipherbus::kek::KekUri;
        match kek {
            None => {
                let path = scratch.dir.join("kek");
                cipherbus::kek::file::write_new_kek(&path).map_err(|e| err(e.to_string()))?;
                Ok(BenchRoot::File {
                    path,
                    generated: true,
                })
            }
            Some(KekUri::File(path)) => {
                cipherbus::kek::Root::from_file(&path).map_err(|e| err(e.to_string()))?;
                Ok(BenchRoot::File {
                    path,
                    generated: false,
                })
            }
            Some(uri) => {
                let retry = cipherbus::kek::seed::START_RETRY;
                let kek = cipherbus::kek::with_retry(retry, || uri.open_kek())
                    .and_then(|kek| cipherbus::kek::with_retry(retry, || kek.check()).map(|()| kek))
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
pub(super) struct Bench {
    pub(super) params: Params,
    pub(super) exe: PathBuf,
    pub(super) scratch: Scratch,
    pub(super) root: BenchRoot,
    /// Held so the server lives as long as the bench.
    pub(super) _server: Proc,
    pub(super) server_addr: SocketAddr,
    pub(super) spawned: AtomicU64,
    /// Deployments made so far (pairs of proxies on an HSM or KMS root).
    pub(super) deployments: AtomicU64,
}

/// The two hops of one path (none for `direct`).
pub(super) struct Hops {
    pub(super) procs: Vec<Proc>,
    pub(super) pub_url: String,
    pub(super) sub_url: String,
    /// The control prefix of the pair's deployment.
    pub(super) prefix: String,
}

impl Bench {
    pub(super) fn start(params: Params) -> Result<Bench, BenchError> {
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
    pub(super) fn new_prefix(&self) -> String {
        if self.root.is_kms() {
            let n = self.deployments.fetch_add(1, Ordering::Relaxed);
            format!("cipherbus.bench{n}")
        } else {
            cipherbus::policy::DEFAULT_CONTROL_PREFIX.to_owned()
        }
    }

    /// The root as the bench itself holds it, to ask a pair's authority to rotate: a file is
    /// read; an HSM or KMS root's seed is read from the pair's bucket, where its first proxy
    /// put it.
    pub(super) async fn open_root(
        &self,
        prefix: &str,
    ) -> Result<Arc<cipherbus::kek::Root>, BenchError> {
        match &self.root {
            BenchRoot::File { path, .. } => cipherbus::kek::Root::from_file(path)
                .map(Arc::new)
                .map_err(|e| err(e.to_string())),
            BenchRoot::Kms { uri, .. } => {
                let client = async_nats::connect(self.server_url())
                    .await
                    .map_err(|e| err(format!("cannot connect to {}: {e}", self.server_url())))?;
                cipherbus::kek::seed::open_root(uri, Some(&client), prefix, false)
                    .await
                    .map_err(err)
            }
        }
    }

    pub(super) fn server_url(&self) -> String {
        format!("nats://{}", self.server_addr)
    }

    /// Starts one hop and waits until it listens. A proxy listens only once its root is open,
    /// so with an HSM or KMS root the first proxy of a pair has created the pair's deployment
    /// seed before the second starts (which would otherwise race to create it, and lose to the
    /// first one's: the bucket's create is atomic).
    pub(super) fn spawn_hop(
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
                if prefix != cipherbus::policy::DEFAULT_CONTROL_PREFIX {
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
    pub(super) fn hops(&self, kind: PathKind, rotate: bool) -> Result<Hops, BenchError> {
        if kind == PathKind::Direct {
            return Ok(Hops {
                procs: Vec::new(),
                pub_url: self.server_url(),
                sub_url: self.server_url(),
                prefix: cipherbus::policy::DEFAULT_CONTROL_PREFIX.to_owned(),
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
