//! Hostile input from both sides. Whatever an attacker with bus access injects on an encrypt
//! subject is refused, counted, and never delivered. Whatever a hostile agent sends (malformed
//! and oversized ops, slowloris connections, a connection flood) gets the answer nats-server
//! gives, and other agents carry on. docs/HOSTILE.md is the catalogue; the last test here keeps
//! it in step with these tests.
//!
//! The raw agents use blocking sockets in the test body; the in-process proxies run on the
//! runtime's worker threads, so those tests use the multi-threaded runtime.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use cipherbus::envelope::{Header, MAGIC};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message arrives in time")
        .expect("subscription open")
}

fn failures(p: &cipherbus::server::ProxyHandle, reason: &'static str) -> u64 {
    p.metrics.open_failures_for(reason)
}

#[tokio::test]
async fn forged_injected_moved_and_unknown_epoch_payloads_are_refused() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let publisher = agent(&pa).await;
    let subscriber = agent(&pb).await;
    let attacker = observer(&server).await;

    let mut sub = subscriber.subscribe("acct.*").await.unwrap();
    let mut raw = attacker.subscribe("acct.a").await.unwrap();
    sync(&subscriber).await;
    sync(&attacker).await;

    publisher.publish("acct.a", "legit-1".into()).await.unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"legit-1");
    let sealed = next(&mut raw).await.payload;
    assert_eq!(sealed[0], MAGIC);

    // 1. A flipped bit anywhere: in the header, the ciphertext, the tag.
    for at in [1usize, 5, 20, 33, sealed.len() - 1] {
        let mut forged = sealed.to_vec();
        forged[at] ^= 0x01;
        attacker.publish("acct.a", forged.into()).await.unwrap();
    }
    // 2. Injected plaintext, including text that looks like JSON.
    attacker
        .publish("acct.a", "wire 1000 to mallory".into())
        .await
        .unwrap();
    attacker
        .publish("acct.a", r#"{"amount":1000}"#.into())
        .await
        .unwrap();
    // 3. A genuine envelope replayed onto another subject.
    attacker.publish("acct.b", sealed.clone()).await.unwrap();
    // 4. An envelope claiming an epoch nobody has.
    let mut future_epoch = sealed.to_vec();
    future_epoch[4..8].copy_from_slice(&99u32.to_be_bytes());
    attacker
        .publish("acct.a", future_epoch.into())
        .await
        .unwrap();
    // 5. A truncated envelope.
    attacker
        .publish("acct.a", sealed.slice(..20))
        .await
        .unwrap();
    sync(&attacker).await;

    publisher.publish("acct.a", "legit-2".into()).await.unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(
        &next(&mut sub).await.payload[..],
        b"legit-2",
        "nothing injected was delivered in between"
    );

    assert!(
        eventually(WAIT, || failures(&pb, "plaintext") == 2).await,
        "plaintext refusals counted"
    );
    // Flips in the version, suite or flags bytes are refused before the AEAD runs.
    let header_or_auth = failures(&pb, "auth")
        + failures(&pb, "version")
        + failures(&pb, "suite")
        + failures(&pb, "flags")
        + failures(&pb, "unknown_epoch");
    assert_eq!(
        header_or_auth, 7,
        "five forgeries, one move, one unknown epoch"
    );
    assert_eq!(
        failures(&pb, "unknown_epoch"),
        2,
        "epoch 99, and the flipped epoch byte"
    );
    assert_eq!(failures(&pb, "truncated"), 1);
    assert!(Header::parse(&sealed).is_ok());
}

#[tokio::test]
async fn garbage_on_the_listener_is_refused_and_others_carry_on() {
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let a = agent(&p).await;
    let b = agent(&p).await;
    let mut sub = b.subscribe("steady").await.unwrap();
    sync(&b).await;

    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x00\x00\x00\xff\xfe\r\n",
        b"PUB x -5\r\n",
    ] {
        let mut raw = tokio::net::TcpStream::connect(p.local_addr).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, raw.read_to_end(&mut got))
            .await
            .expect("the proxy closes the connection")
            .expect("read");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("INFO "), "INFO first: {text}");
        // The connection is closed (read_to_end returned), with or without an -ERR, like the server.
    }

    for i in 0..10 {
        a.publish("steady", format!("m{i}").into()).await.unwrap();
    }
    a.flush().await.unwrap();
    for i in 0..10 {
        assert_eq!(next(&mut sub).await.payload, Bytes::from(format!("m{i}")));
    }
    assert!(
        p.metrics
            .protocol_errors
            .get_or_create(&cipherbus::metrics::ReasonLabel {
                reason: "unknown_op"
            })
            .get()
            >= 1
    );
}

/// A raw agent with a blocking socket, to the proxy or straight to the server.
struct Raw {
    stream: TcpStream,
    /// Bytes read and not yet looked at.
    pending: Vec<u8>,
}

impl Raw {
    /// Connects and reads the greeting up to the end of its first line.
    fn open(addr: SocketAddr) -> (Raw, String) {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = Raw {
            stream,
            pending: Vec::new(),
        };
        let first = raw.line();
        (raw, first)
    }

    /// Connects, sends CONNECT and waits for the PONG, so the server has processed it.
    fn connect(addr: SocketAddr) -> Raw {
        let (mut raw, info) = Raw::open(addr);
        assert!(info.starts_with("INFO "), "{info}");
        raw.send(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\nPING\r\n");
        while raw.line() != "PONG\r\n" {}
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read: {e}"),
        }
    }

    fn line(&mut self) -> String {
        loop {
            if let Some(at) = memchr_crlf(&self.pending) {
                let line: Vec<u8> = self.pending.drain(..at + 2).collect();
                return String::from_utf8_lossy(&line).into_owned();
            }
            assert!(self.fill(), "closed while a line was expected");
        }
    }

    /// Everything up to the close, and how long the close took. INFO lines are left out.
    fn until_closed(&mut self, within: Duration) -> (String, Duration) {
        let start = Instant::now();
        self.stream.set_read_timeout(Some(within)).unwrap();
        while self.fill() {}
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
        let kept = text
            .split_inclusive("\r\n")
            .filter(|l| !l.starts_with("INFO "))
            .collect();
        (kept, start.elapsed())
    }
}

fn memchr_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// One hostile input from an agent, after a clean CONNECT, and what it gets.
#[derive(Clone, Copy)]
struct Case {
    /// The name of its row in docs/HOSTILE.md.
    name: &'static str,
    input: &'static [u8],
    /// Exactly what the agent reads before the close (INFO lines left out), or, for input that
    /// is let through, before the PONG that follows it.
    answer: &'static str,
    closes: bool,
    /// Where the proxy is stricter than nats-server, what the server does instead.
    server_differs: Option<&'static str>,
}

const UNKNOWN: &str = "-ERR 'Unknown Protocol Operation'\r\n";

/// Built at run time for the inputs too long to write out.
fn cases() -> Vec<Case> {
    let long_pub: &'static [u8] = format!("PUB foo {}", "a".repeat(5000)).leak().as_bytes();
    let long_sub: &'static [u8] = format!("SUB {} 1\r\n", "a".repeat(5000)).leak().as_bytes();
    vec![
        Case {
            name: "unknown operation",
            input: b"FOO bar\r\n",
            answer: UNKNOWN,
            closes: true,
            server_differs: None,
        },
        Case {
            name: "binary garbage",
            input: b"\x00\x01\x02\xff\r\n",
            answer: UNKNOWN,
            closes: true,
            server_differs: None,
        },
        Case {
            name: "MSG sent by an agent",
            input: b"MSG foo 1 2\r\nhi\r\n",
            answer: UNKNOWN,
            closes: true,
            server_differs: None,
        },
        Case {
            name: "control line over 4096 bytes, no newline yet",
            input: long_pub,
            answer: "-ERR 'maximum control line exceeded'\r\n",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "complete control line over 4096 bytes",
            input: long_sub,
            answer: "-ERR 'maximum control line exceeded'\r\n",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "declared size over max_payload, no payload sent",
            input: b"PUB foo 999999999\r\n",
            answer: "-ERR 'Maximum Payload Violation'\r\n",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "declared size of ten or more digits",
            input: b"PUB foo 99999999999\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "HPUB total size over max_payload",
            input: b"HPUB foo 12 999999999\r\n",
            answer: "-ERR 'Maximum Payload Violation'\r\n",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "negative size",
            input: b"PUB foo -1\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "non-numeric size",
            input: b"PUB foo 1x\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "missing size",
            input: b"PUB foo\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "too many PUB arguments",
            input: b"PUB a b c d 2\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "payload not followed by CRLF",
            input: b"PUB foo 3\r\nabcXY",
            answer: UNKNOWN,
            closes: true,
            server_differs: None,
        },
        Case {
            name: "HPUB header size over total size",
            input: b"HPUB foo 10 5\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "HPUB non-numeric header size",
            input: b"HPUB foo x 5\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "HPUB with a header block of length 0",
            input: b"HPUB foo 0 5\r\nhello\r\nHPUB foo _INBOX.x.y 0 5\r\nhello\r\nHPUB foo 0 0\r\n\r\nPING\r\n",
            answer: "",
            closes: false,
            server_differs: None,
        },
        Case {
            name: "HPUB header block without NATS/1.0",
            input: b"HPUB foo 7 7\r\nhello\r\n\r\nPING\r\n",
            answer: "",
            closes: false,
            server_differs: None,
        },
        Case {
            name: "HPUB header block not ended by a blank line",
            input: b"HPUB foo 12 12\r\nNATS/1.0\r\nab\r\nPING\r\n",
            answer: "",
            closes: false,
            server_differs: None,
        },
        Case {
            name: "CONNECT that is not JSON",
            input: b"CONNECT {not json\r\n",
            answer: "",
            closes: true,
            server_differs: None,
        },
        Case {
            name: "invalid UTF-8 in a PUB subject",
            input: b"PUB \xff\xfe.x 2\r\nhi\r\nPING\r\n",
            answer: "",
            closes: false,
            server_differs: None,
        },
        Case {
            name: "invalid UTF-8 in a SUB subject",
            input: b"SUB \xc3\x28.> 9\r\nPING\r\n",
            answer: "",
            closes: false,
            server_differs: None,
        },
    ]
}

/// Sends `case.input` after a clean CONNECT and returns what came back and whether it closed.
fn try_case(addr: SocketAddr, case: &Case) -> (String, bool) {
    let mut raw = Raw::connect(addr);
    raw.send(case.input);
    if case.closes {
        let (got, took) = raw.until_closed(WAIT);
        (got, took < WAIT)
    } else {
        // Let through: the PING after it is answered and the connection stays open.
        let mut got = String::new();
        loop {
            let line = raw.line();
            if line == "PONG\r\n" {
                break;
            }
            if !line.starts_with("INFO ") && line != "PING\r\n" {
                got.push_str(&line);
            }
        }
        raw.send(b"PING\r\n");
        while raw.line() != "PONG\r\n" {}
        (got, false)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_input_gets_the_servers_answer_and_a_close() {
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let bystander = agent(&p).await;
    let mut steady = bystander.subscribe("steady").await.unwrap();
    sync(&bystander).await;
    let mut failures = Vec::new();
    for (i, case) in cases().iter().enumerate() {
        let through_proxy = try_case(p.local_addr, case);
        let want = (case.answer.to_owned(), case.closes);
        if through_proxy != want {
            failures.push(format!(
                "{}: proxy answered {through_proxy:?}, catalogue says {want:?}",
                case.name
            ));
        }
        match case.server_differs {
            None => {
                let direct = try_case(server.addr(), case);
                if direct != want {
                    failures.push(format!(
                        "{}: nats-server answered {direct:?}, not {want:?}",
                        case.name
                    ));
                }
            }
            // The server lets this through: the PING after it is answered.
            Some(_) => {
                let mut input = case.input.to_vec();
                input.extend_from_slice(b"PING\r\n");
                let passes = Case {
                    input: input.leak(),
                    answer: "",
                    closes: false,
                    ..*case
                };
                if try_case(server.addr(), &passes) != (String::new(), false) {
                    failures.push(format!(
                        "{}: nats-server no longer lets it through; update the catalogue",
                        case.name
                    ));
                }
            }
        }
        // Another agent on the same proxy is unaffected.
        bystander
            .publish("steady", format!("{i}").into())
            .await
            .unwrap();
        assert_eq!(next(&mut steady).await.payload, Bytes::from(format!("{i}")));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// What a slowloris agent gets from `addr`: it connects and then sends only `input`, forever.
fn slowloris(
    addr: SocketAddr,
    connect: bool,
    input: &[u8],
    within: Duration,
) -> (String, Duration) {
    let (mut raw, info) = Raw::open(addr);
    assert!(info.starts_with("INFO "), "{info}");
    if connect {
        raw.send(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"user\":\"a\",\"pass\":\"b\"}\r\n",
        );
    }
    raw.send(input);
    raw.until_closed(within)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_agents_time_out_as_the_server_times_them_out() {
    // With auth, the server's auth timeout (1 s here, 2 s by default) closes an agent that has
    // not finished its CONNECT; the proxy dialled the upstream when the agent connected, so the
    // same timer runs for the agent and its -ERR is forwarded.
    let server = NatsServer::start_core("authorization { user: a, password: b, timeout: 1 }");
    let p = proxy(&server).await;
    for (what, input) in [
        ("sends nothing", &b""[..]),
        (
            "stops in the middle of CONNECT",
            &b"CONNECT {\"user\":\"a\","[..],
        ),
    ] {
        for (side, addr) in [("proxy", p.local_addr), ("nats-server", server.addr())] {
            let (got, took) = slowloris(addr, false, input, WAIT);
            assert_eq!(
                got, "-ERR 'Authentication Timeout'\r\n",
                "{side}: an agent that {what}"
            );
            assert!(
                took >= Duration::from_millis(800) && took < Duration::from_secs(4),
                "{side}: an agent that {what} was closed after {took:?}"
            );
        }
    }

    // Without auth there is no auth timer: the server's keepalive PINGs go unanswered and it
    // closes the connection as stale. The proxy forwards the PINGs and never answers them.
    let server = NatsServer::start_core("ping_interval: \"300ms\"\nping_max: 2");
    let p = proxy(&server).await;
    for (what, connect, input) in [
        ("sends nothing", false, &b""[..]),
        (
            "stops in the middle of a PUB payload",
            true,
            &b"PUB foo 5\r\nhe"[..],
        ),
        (
            "stops in the middle of a control line",
            true,
            &b"SUB fo"[..],
        ),
    ] {
        for (side, addr) in [("proxy", p.local_addr), ("nats-server", server.addr())] {
            let (got, took) = slowloris(addr, connect, input, WAIT);
            let pings = got.strip_suffix("-ERR 'Stale Connection'\r\n");
            assert!(
                pings.is_some_and(|p| p.split_inclusive("\r\n").all(|l| l == "PING\r\n")),
                "{side}: an agent that {what} got {got:?}"
            );
            assert!(
                took < Duration::from_secs(4),
                "{side}: an agent that {what} was closed after {took:?}"
            );
        }
    }
    assert_eq!(
        p.metrics.connections.get(),
        0,
        "every slowloris session ended"
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_over_the_cap_is_refused_and_holds_no_descriptors() {
    const CAP: usize = 4;
    const FLOOD: usize = 200;
    let server = NatsServer::start();
    let p = proxy_with(&server, &format!("max_connections = {CAP}"), TEST_KEK).await;
    let held: Vec<Raw> = (0..CAP).map(|_| Raw::connect(p.local_addr)).collect();
    let baseline = open_fds();

    let mut refused = 0;
    for _ in 0..FLOOD {
        let stream = TcpStream::connect(p.local_addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = Raw {
            stream,
            pending: Vec::new(),
        };
        let (got, took) = raw.until_closed(WAIT);
        assert_eq!(got, "-ERR 'maximum connections exceeded'\r\n");
        assert!(took < WAIT);
        refused += 1;
    }
    assert_eq!(refused, FLOOD);
    let counted = || {
        p.metrics
            .connections_refused
            .get_or_create(&cipherbus::metrics::ReasonLabel {
                reason: "max_connections",
            })
            .get()
    };
    assert!(eventually(WAIT, || counted() == FLOOD as u64).await);
    // Refused sockets are closed at once: the process holds no more descriptors than before.
    assert!(
        eventually(WAIT, || open_fds() <= baseline).await,
        "{} descriptors open, {baseline} before the flood",
        open_fds()
    );
    assert_eq!(p.metrics.connections.get(), CAP as i64);

    // A slot that frees up is usable again, and the held agents still work.
    drop(held);
    assert!(eventually(WAIT, || p.metrics.connections.get() == 0).await);
    let a = agent(&p).await;
    let mut sub = a.subscribe("after.flood").await.unwrap();
    sync(&a).await;
    a.publish("after.flood", "ok".into()).await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_above_the_descriptor_limit_is_lowered_so_a_flood_still_gets_the_refusal() {
    let server = NatsServer::start_core("");
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let port = free_port();
    // 200 descriptors fit (200 - 64 reserved) / 2 = 68 sessions, far below the default cap.
    let proxy = Spawned::spawn(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 200; exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_cipherbus"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &server.url(), "--kek-file"])
            .arg(&kek)
            .env("CIPHERBUS_LOG", "info")
            .stdout(std::process::Stdio::null()),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(start.elapsed() < WAIT, "the proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lowered = proxy.wait_log(WAIT, |l| l.contains("lowered_to=68"));
    assert!(
        lowered.as_deref().is_some_and(|l| l.contains("INFO")),
        "the lowered default cap is logged, as a notice rather than a warning: {}",
        proxy.stderr()
    );
    // The probe connection above took a slot for a moment; wait until it is free again.
    std::thread::sleep(Duration::from_millis(300));

    let mut held: Vec<Raw> = (0..68).map(|_| Raw::connect(addr)).collect();
    for i in 0..100 {
        let stream = TcpStream::connect(addr).unwrap();
        let mut raw = Raw {
            stream,
            pending: Vec::new(),
        };
        let (got, _) = raw.until_closed(WAIT);
        assert_eq!(
            got, "-ERR 'maximum connections exceeded'\r\n",
            "connection {i} over the cap"
        );
    }
    for agent in held.iter_mut().step_by(17) {
        agent.send(b"PING\r\n");
        assert_eq!(agent.line(), "PONG\r\n", "held agents still work");
    }
    assert!(
        !proxy.stderr().contains("accept failed"),
        "{}",
        proxy.stderr()
    );
}

/// Every row of docs/HOSTILE.md names a test that exists, and every case tried above has a row
/// that states its answer.
#[test]
fn the_catalogue_in_docs_lists_every_case_and_names_real_tests() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/HOSTILE.md")).expect("docs/HOSTILE.md");
    let rows: Vec<Vec<String>> = doc
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("| ---") && !l.starts_with("|---"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .filter(|cells: &Vec<String>| cells.first().is_some_and(|c| c != "input"))
        .collect();
    assert!(rows.len() >= 20, "the catalogue has its tables");
    for row in &rows {
        let test = row.last().unwrap();
        let (file, name) = test
            .trim_matches('`')
            .split_once("::")
            .unwrap_or_else(|| panic!("row {row:?}: last cell is `path::test_name`"));
        let text = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|_| panic!("row {row:?}: no file {file}"));
        assert!(
            text.contains(&format!("fn {name}(")),
            "row {row:?}: no test {name} in {file}"
        );
    }
    for case in cases() {
        let row = rows
            .iter()
            .find(|r| r[0] == case.name)
            .unwrap_or_else(|| panic!("no row for {:?}", case.name));
        let answer = row[1].as_str();
        let stated = match (case.answer.trim_end(), case.closes) {
            ("", true) => answer.contains("close, no message"),
            (err, true) => answer.contains(&format!("`{err}`")) && answer.contains("close"),
            (_, false) => answer.contains("passes"),
        };
        assert!(stated, "row {row:?} does not state {:?}", case.answer);
        if let Some(server) = case.server_differs {
            assert!(
                row[2].contains(server),
                "row {row:?} says the server {server}"
            );
        }
    }
}
