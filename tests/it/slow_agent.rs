//! A stuck agent must stay the server's problem: the proxy keeps bounded buffers per direction,
//! so when an agent stops reading, the proxy stops reading its upstream connection, the server
//! sees a slow consumer and drops it, and the proxy's memory stays flat while hundreds of MiB
//! flow past.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);
const PAYLOAD: usize = 64 * 1024;
/// Four times the server's default `max_pending` (64 MB): far more than any buffer on the path
/// may hold, so a proxy that queued for the stuck agent could not stay under the bound below.
const FLOOD_BYTES: u64 = 256 << 20;
/// Publishing stops here even if the machine is too slow to push all of `FLOOD_BYTES`.
const FLOOD_TIME: Duration = Duration::from_secs(15);
/// Peak resident memory allowed to the proxy process. A debug build idles at around 10-20 MiB;
/// the sessions here add a read buffer and one op per direction (64 KiB payloads, at most one
/// max_payload op of 1 MiB) plus allocator slack. 64 MiB leaves generous room for that, yet it
/// is a quarter of the flood and equals the server's own per-client `max_pending`: a proxy that
/// buffered the stuck agent's backlog instead of pushing back would cross it long before the
/// server gave up on the connection.
const MAX_RSS: u64 = 64 << 20;

/// A raw agent: CONNECT sent and acknowledged by a PONG.
struct Raw {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: std::net::SocketAddr, subs: &str) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect to the proxy");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        };
        let info = raw.line();
        assert!(info.starts_with("INFO {"), "{info:?}");
        raw.send(
            format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\n{subs}PING\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(raw.until_pong(), "", "nothing before the first PONG");
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the proxy");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("read from the proxy");
        assert!(n > 0, "the proxy closed the connection");
        line
    }

    /// Everything up to the next PONG, INFO lines left out.
    fn until_pong(&mut self) -> String {
        let mut got = String::new();
        loop {
            let line = self.line();
            if line == "PONG\r\n" {
                return got;
            }
            if !line.starts_with("INFO ") {
                got.push_str(&line);
            }
        }
    }
}

/// The server's `slow_consumers` total from `varz`, read as text.
fn slow_consumers(server: &NatsServer) -> u64 {
    let varz = server.monitor("varz");
    varz.split("\"slow_consumers\":")
        .nth(1)
        .and_then(|rest| {
            let digits: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .unwrap_or(0)
}

#[test]
fn a_stuck_agent_becomes_the_servers_slow_consumer_and_proxy_memory_stays_bounded() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let proxy = ProxyProcess::start(
        run_command(env!("CARGO_BIN_EXE_cipherbus"), &kek, &[server.url()], None),
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
    );

    let mut stuck = Raw::connect(proxy.listen, "SUB flood 1\r\n");
    // From here on the stuck agent reads nothing until the flood is over.
    let mut publisher = Raw::connect(proxy.listen, "");
    // The publisher's own socket is drained on the side, so only the stuck agent pushes back.
    let mut drain = publisher.reader.get_ref().try_clone().unwrap();
    let pongs = Arc::new(AtomicU64::new(0));
    let drained = {
        let pongs = pongs.clone();
        std::thread::spawn(move || {
            drain.set_read_timeout(None).unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = drain.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&chunk[..n]);
                let count = seen.windows(6).filter(|w| w == b"PONG\r\n").count();
                pongs.store(count as u64, Ordering::Relaxed);
            }
            String::from_utf8_lossy(&seen).into_owned()
        })
    };

    let baseline = proxy.rss();
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        let pid = proxy.pid();
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // Sixteen messages per write, as fast as the proxy takes them.
    let mut batch = Vec::with_capacity(16 * (PAYLOAD + 32));
    for _ in 0..16 {
        batch.extend_from_slice(format!("PUB flood {PAYLOAD}\r\n").as_bytes());
        batch.extend(std::iter::repeat_n(b'x', PAYLOAD));
        batch.extend_from_slice(b"\r\n");
    }
    let started = Instant::now();
    let mut published = 0u64;
    while published < FLOOD_BYTES && started.elapsed() < FLOOD_TIME {
        publisher.send(&batch);
        published += 16 * PAYLOAD as u64;
    }
    // A PING behind the flood: its PONG means every PUB went through the proxy to the server.
    publisher.send(b"PING\r\n");
    let start = Instant::now();
    while pongs.load(Ordering::Relaxed) < 1 {
        assert!(start.elapsed() < WAIT, "the publisher's PING is answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();

    let start = Instant::now();
    while slow_consumers(&server) == 0 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "published {} MiB in {elapsed:?}; proxy RSS baseline {} KiB, peak {} KiB",
        published >> 20,
        baseline >> 10,
        peak >> 10
    );

    assert!(
        published >= 128 << 20,
        "the flood must outgrow every buffer on the path; only {} MiB went out",
        published >> 20
    );
    assert!(baseline > 0, "VmRSS of the proxy is readable");
    assert!(
        peak < MAX_RSS,
        "proxy RSS peaked at {} MiB (baseline {} MiB) while an agent was stuck",
        peak >> 20,
        baseline >> 20
    );
    assert!(
        slow_consumers(&server) > 0,
        "the server saw the stuck agent's upstream connection as a slow consumer"
    );

    // The stuck agent, reading again, finds a bounded backlog and then the proxy's close.
    stuck.stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut backlog = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    let closed = loop {
        match stuck.reader.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => backlog += n as u64,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the proxy closes the stuck agent once the server dropped its upstream connection"
    );
    assert!(
        backlog < 64 << 20,
        "the stuck agent's backlog is bounded by socket buffers, got {} MiB",
        backlog >> 20
    );

    // The proxy is healthy: the publisher still works, and a new agent can pub/sub.
    publisher.send(b"PING\r\n");
    let start = Instant::now();
    while pongs.load(Ordering::Relaxed) < 2 {
        assert!(
            start.elapsed() < WAIT,
            "the publisher's connection survives"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut fresh = Raw::connect(proxy.listen, "SUB after.flood 5\r\n");
    fresh.send(b"PUB after.flood 7\r\nhealthy\r\nPING\r\n");
    assert_eq!(fresh.until_pong(), "MSG after.flood 5 7\r\nhealthy\r\n");

    // The drain thread holds a clone of the socket: shut it down to end that thread.
    let _ = publisher.stream.shutdown(std::net::Shutdown::Both);
    let publisher_saw = drained.join().unwrap();
    assert!(
        !publisher_saw.contains("-ERR"),
        "the publisher was never told off: {publisher_saw:?}"
    );
}
