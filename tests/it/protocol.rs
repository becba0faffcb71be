//! The wire as a raw agent sees it through the proxy, with a real server behind: the INFO it is
//! told, lenient input answered in canonical form, the server's own `-ERR` and close for
//! malformed input, the control prefix closed to agents, and the agent's connection closed when
//! its upstream goes away.
//!
//! The raw agents use blocking sockets in the test body; the in-process proxies run on the
//! runtime's worker threads, so every test here uses the multi-threaded runtime.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use cipherbus::config::{FileConfig, Overrides};
use cipherbus::envelope::{RootKey, OVERHEAD};
use cipherbus::proto::ProtoError;
use cipherbus::server::ProxyHandle;
use serde_json::{Map, Value};

const WAIT: Duration = Duration::from_secs(10);

/// A raw NATS connection, to the proxy or straight to the server.
struct Raw {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The INFO that greeted the connection.
    info: Map<String, Value>,
}

impl Raw {
    /// Connects and reads the greeting INFO; sends nothing.
    fn open(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).expect("read the greeting");
        let info = parse_info(&line);
        Raw {
            stream,
            reader,
            info,
        }
    }

    /// Connects, sends CONNECT (non-verbose, protocol 1) and `subs`, and waits for the PONG.
    fn connect(addr: SocketAddr, subs: &str) -> Raw {
        Raw::connect_with(addr, "", subs)
    }

    /// [`Raw::connect`] with `headers:true`, as clients that send `HPUB` say.
    fn connect_headers(addr: SocketAddr, subs: &str) -> Raw {
        Raw::connect_with(addr, ",\"headers\":true", subs)
    }

    fn connect_with(addr: SocketAddr, more: &str, subs: &str) -> Raw {
        let mut raw = Raw::open(addr);
        raw.send(
            format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1{more}}}\r\n{subs}PING\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(
            raw.until_pong(),
            "",
            "nothing but PONG answers a clean CONNECT"
        );
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a line");
        assert!(n > 0, "connection closed while a line was expected");
        line
    }

    /// The next line that is not an INFO (the server sends one after the first PONG).
    fn reply(&mut self) -> String {
        loop {
            let line = self.line();
            if !line.starts_with("INFO ") {
                return line;
            }
        }
    }

    /// Everything before the next PONG, with INFO lines left out.
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

    /// The next INFO, skipping anything else.
    fn next_info(&mut self) -> Map<String, Value> {
        loop {
            let line = self.line();
            if line.starts_with("INFO ") {
                return parse_info(&line);
            }
        }
    }

    /// Reads until the peer closes. Returns what arrived, less INFO and PING lines (the server's
    /// keepalive may come at any time), and whether the close came within `WAIT`.
    fn until_closed(&mut self) -> (String, bool) {
        let mut bytes = Vec::new();
        let closed = loop {
            let mut chunk = [0u8; 4096];
            match self.reader.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let kept = text
            .split_inclusive("\r\n")
            .filter(|l| *l != "PING\r\n" && !l.starts_with("INFO "))
            .collect();
        (kept, closed)
    }
}

fn parse_info(line: &str) -> Map<String, Value> {
    let json = line
        .strip_prefix("INFO ")
        .unwrap_or_else(|| panic!("expected an INFO line, got {line:?}"));
    serde_json::from_str(json.trim()).expect("INFO carries a JSON object")
}

/// An in-process proxy in front of any NATS URL, with the shared test root key.
async fn proxy_to(url: &str) -> ProxyHandle {
    let config = FileConfig::default()
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![url.to_owned()],
            kek_file: Some("unused-in-process".into()),
            admin: Some("127.0.0.1:0".into()),
            ..Default::default()
        })
        .expect("test config is valid");
    cipherbus::server::start(config, RootKey::from_bytes(TEST_KEK))
        .await
        .expect("proxy starts")
}

/// A bare nats-server (no JetStream) started with command-line flags, killed on drop (by
/// [`Spawned`]).
struct Node {
    _process: Spawned,
    port: u16,
}

impl Node {
    fn start(args: &[String]) -> Node {
        let port = free_port();
        let process = Spawned::spawn(
            Command::new(nats_server_bin())
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .args(args)
                .stdout(Stdio::null()),
        );
        let node = Node {
            _process: process,
            port,
        };
        let start = Instant::now();
        while TcpStream::connect(node.addr()).is_err() {
            assert!(start.elapsed() < WAIT, "nats-server listens on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// The proxy's rewrite rules, checked on one INFO the agent received.
fn assert_rewritten(info: &Map<String, Value>, server: &Map<String, Value>, proxy: SocketAddr) {
    let server_max = server["max_payload"].as_u64().unwrap();
    assert_eq!(
        info["max_payload"].as_u64(),
        Some(server_max - OVERHEAD as u64),
        "max_payload is the server's less the envelope: {info:?}"
    );
    assert_eq!(info["host"], proxy.ip().to_string(), "host is the proxy's");
    assert_eq!(info["port"], proxy.port(), "port is the proxy's");
    for field in [
        "connect_urls",
        "ws_connect_urls",
        "tls_required",
        "tls_available",
        "tls_verify",
    ] {
        assert!(
            !info.contains_key(field),
            "{field} is not passed on: {info:?}"
        );
    }
    for field in ["server_id", "version", "proto", "headers"] {
        assert_eq!(
            info.get(field),
            server.get(field),
            "{field} passes unchanged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_describes_the_proxy_and_keeps_the_servers_identity() {
    let cluster_port = free_port();
    let a = Node::start(&[
        "--cluster_name".into(),
        "cb".into(),
        "--cluster".into(),
        format!("nats://127.0.0.1:{cluster_port}"),
    ]);
    let p = proxy_to(&format!("nats://{}", a.addr())).await;
    let direct = Raw::open(a.addr()).info;

    // On accept.
    let mut agent = Raw::open(p.local_addr);
    assert_rewritten(&agent.info, &direct, p.local_addr);

    // After CONNECT and the first PING (`connect_info`).
    agent.send(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\nPING\r\n");
    let mut after_connect = None;
    while after_connect.is_none() {
        let line = agent.line();
        if line.starts_with("INFO ") {
            after_connect = Some(parse_info(&line));
        } else {
            assert_eq!(line, "PONG\r\n");
        }
    }
    assert_rewritten(&after_connect.unwrap(), &direct, p.local_addr);

    // Async, when a second server joins and the first starts advertising connect_urls.
    let _b = Node::start(&[
        "--cluster_name".into(),
        "cb".into(),
        "--cluster".into(),
        format!("nats://127.0.0.1:{}", free_port()),
        "--routes".into(),
        format!("nats://127.0.0.1:{cluster_port}"),
    ]);
    let async_info = agent.next_info();
    let now = Raw::open(a.addr()).info;
    assert!(
        now.contains_key("connect_urls"),
        "precondition: the server now advertises its cluster: {now:?}"
    );
    assert_rewritten(&async_info, &now, p.local_addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_input_is_answered_in_canonical_form() {
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let input: &[u8] = b"connect {\"verbose\":true}\r\nsub\tfoo  1\npub foo 5\nhello\r\nPING\n";
    // Verbose mode: +OK for CONNECT, SUB and PUB, each forwarded from the server.
    let want = "+OK\r\n+OK\r\n+OK\r\nMSG foo 1 5\r\nhello\r\n";

    let mut agent = Raw::open(p.local_addr);
    agent.send(input);
    assert_eq!(
        agent.until_pong(),
        want,
        "canonical, and the payload opened back"
    );

    let mut direct = Raw::open(server.addr());
    direct.send(input);
    assert_eq!(
        direct.until_pong(),
        want,
        "exactly what the server itself answers"
    );
}

/// nats.js 3.x publishes to JetStream and KV with `HPUB <subject> [reply] 0 <total>`: a header
/// block of length 0. The server takes it as a message without headers; so must the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_of_length_0_is_a_message_without_headers() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let bus = observer(&server).await;
    let js = async_nats::jetstream::new(bus.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ZZ".into(),
        subjects: vec!["zz.>".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let input: &[u8] = b"HPUB zz.a 0 5\r\nhello\r\nHPUB zz.a _INBOX.x.y 0 5\r\nhello\r\n\
        HPUB zz.a 0 0\r\n\r\nPING\r\n";
    // What the server delivers for it: plain MSGs, the reply kept, the empty payload empty.
    let want = "MSG zz.a 1 5\r\nhello\r\nMSG zz.a 1 _INBOX.x.y 5\r\nhello\r\nMSG zz.a 1 0\r\n\r\n";

    let mut direct_sub = Raw::connect_headers(server.addr(), "SUB zz.a 1\r\n");
    let mut direct = Raw::connect_headers(server.addr(), "");
    direct.send(input);
    assert_eq!(direct.until_pong(), "");
    direct_sub.send(b"PING\r\n");
    assert_eq!(direct_sub.until_pong(), want, "nats-server itself");

    let mut sub = Raw::connect_headers(pb.local_addr, "SUB zz.a 1\r\n");
    let mut agent = Raw::connect_headers(pa.local_addr, "");
    let mut raw_bus = bus.subscribe("zz.a").await.unwrap();
    sync(&bus).await;
    agent.send(input);
    assert_eq!(agent.until_pong(), "", "no -ERR, no close");
    sub.send(b"PING\r\n");
    assert_eq!(sub.until_pong(), want, "opened by the other proxy");

    // On the bus and in the stream: envelopes, and the empty payload as it was.
    for want_len in [5 + OVERHEAD, 5 + OVERHEAD, 0] {
        use futures::StreamExt;
        let seen = tokio::time::timeout(WAIT, raw_bus.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen.payload.len(), want_len, "{seen:?}");
        assert!(seen.headers.is_none());
        assert!(!contains(&seen.payload, b"hello"));
    }
    // Sequences 1 to 3 are the direct run's plaintext.
    let stream = js.get_stream("ZZ").await.unwrap();
    for seq in 4..=5 {
        let stored = stream.direct_get(seq).await.unwrap();
        assert_eq!(stored.payload.len(), 5 + OVERHEAD);
        assert_eq!(stored.payload[0], cipherbus::envelope::MAGIC);
    }
    assert!(stream.direct_get(6).await.unwrap().payload.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_the_servers_err_and_a_close_while_others_carry_on() {
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let mut bystander = Raw::connect(p.local_addr, "SUB bystander 1\r\n");
    let mut round_trip = |when: &str| {
        bystander.send(b"PUB bystander 2\r\nok\r\nPING\r\n");
        assert_eq!(
            bystander.until_pong(),
            "MSG bystander 1 2\r\nok\r\n",
            "another agent on the proxy keeps working {when}"
        );
    };

    let proxy_max = {
        let agent = Raw::open(p.local_addr);
        agent.info["max_payload"].as_u64().unwrap()
    };
    let long_line = format!("PUB foo {}", "a".repeat(5000));
    let long_sub = format!("SUB {} 1\r\n", "a".repeat(5000));
    let unknown = "-ERR 'Unknown Protocol Operation'\r\n";
    let control = format!(
        "-ERR '{}'\r\n",
        ProtoError::MaxControlLine.server_err().unwrap()
    );
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("an unknown op", b"FOO\r\n".to_vec(), unknown.into()),
        (
            "a control line over 4096 bytes, no newline yet",
            long_line.into_bytes(),
            control.clone(),
        ),
        (
            "a complete control line over 4096 bytes",
            long_sub.into_bytes(),
            control,
        ),
        (
            // Within the server's limit but over the one the proxy advertised.
            "a payload over the advertised max_payload",
            format!("PUB foo {}\r\n", proxy_max + 1).into_bytes(),
            "-ERR 'Maximum Payload Violation'\r\n".into(),
        ),
        (
            "a payload not followed by CRLF",
            b"PUB foo 3\r\nabcXY".to_vec(),
            unknown.into(),
        ),
        (
            "MSG sent by a client",
            b"MSG foo 1 2\r\nhi\r\n".to_vec(),
            unknown.into(),
        ),
        (
            // The server closes without a word for bad PUB arguments.
            "a PUB size that is not a number",
            b"PUB foo bar\r\n".to_vec(),
            String::new(),
        ),
    ];
    for (what, bad, want) in cases {
        let mut agent = Raw::connect(p.local_addr, "");
        agent.send(&bad);
        round_trip(&format!("while {what} is handled"));
        let (got, closed) = agent.until_closed();
        assert_eq!(
            got, want,
            "{what}: the agent is told what the server would say"
        );
        assert!(closed, "{what}: the connection is closed");
        round_trip(&format!("after {what}"));
    }

    // The server answers the same input the same way (against its own, larger, limit).
    for (bad, want) in [
        (b"FOO\r\n".to_vec(), unknown.to_owned()),
        (
            format!("PUB foo {}", "a".repeat(5000)).into_bytes(),
            "-ERR 'maximum control line exceeded'\r\n".into(),
        ),
        (b"PUB foo 3\r\nabcXY".to_vec(), unknown.to_owned()),
        (b"PUB foo bar\r\n".to_vec(), String::new()),
    ] {
        let mut direct = Raw::connect(server.addr(), "");
        direct.send(&bad);
        assert_eq!(direct.until_closed(), (want, true), "nats-server itself");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_prefix_is_closed_to_agents() {
    let server = NatsServer::start();
    let p = proxy(&server).await;

    let mut agent = Raw::connect(p.local_addr, "SUB mine 3\r\n");
    agent.send(b"PUB cipherbus.ctl.x 5\r\nforge\r\n");
    assert_eq!(
        agent.reply(),
        "-ERR 'Permissions Violation for Publish to \"cipherbus.ctl.x\"'\r\n"
    );
    agent.send(b"SUB cipherbus.ctl.> 2\r\n");
    assert_eq!(
        agent.reply(),
        "-ERR 'Permissions Violation for Subscription to \"cipherbus.ctl.>\"'\r\n"
    );
    agent.send(b"PUB mine 2\r\nok\r\nPING\r\n");
    assert_eq!(
        agent.until_pong(),
        "MSG mine 3 2\r\nok\r\n",
        "the connection stays usable after a permissions violation"
    );
    // The proxy's own control connection subscribes under the prefix; the agent's wildcard
    // must not appear (Go's JSON writes '>' as \u003e).
    let connz = server.monitor("connz?subs=1");
    assert!(
        !connz.contains("cipherbus.ctl.\\u003e") && !connz.contains("cipherbus.ctl.>"),
        "the denied subscription never reached the server"
    );

    // A wildcard agent is never handed control traffic from the bus.
    let mut wildcard = Raw::connect(p.local_addr, "SUB > 9\r\n");
    let mut bus = Raw::connect(server.addr(), "");
    bus.send(b"PUB cipherbus.ctl.announce 7\r\nepoch 2\r\nPING\r\n");
    assert_eq!(bus.until_pong(), "");
    // The server has queued the announcement for the wildcard agent before this marker, so
    // once the marker arrives, anything delivered for the announcement would have come first.
    wildcard.send(b"PUB marker 2\r\nok\r\n");
    let mut seen = String::new();
    loop {
        let line = wildcard.reply();
        if line.starts_with("MSG marker 9 2") {
            break;
        }
        seen.push_str(&line);
    }
    assert!(
        !seen.contains("cipherbus.ctl"),
        "control traffic leaked to an agent: {seen:?}"
    );
    assert!(
        metric(&p, "cipherbus_denied_total{direction=\"deliver\"}") >= 1.0,
        "the proxy dropped the announcement itself:\n{}",
        metrics_text(&p)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_closed_when_its_upstream_goes_away() {
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let mut agent = Raw::connect(p.local_addr, "SUB anything 1\r\n");
    agent
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    drop(server);
    let (got, closed) = agent.until_closed();
    assert!(
        closed,
        "the proxy closes the agent within 5 s of losing the upstream"
    );
    assert!(!got.contains("MSG"), "nothing but the close: {got:?}");
}
