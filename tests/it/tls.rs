//! TLS on both sides: every agent mode against every upstream mode, with certificates made at
//! test time, plus mTLS, exact INFO flags, hot reload and startup errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use cipherbus::config::{FileConfig, Overrides};
use cipherbus::envelope::{RootKey, MAGIC};
use cipherbus::server::ProxyHandle;
use cipherbus::tls::AgentTlsMode;
use futures::StreamExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Plain,
    Tls,
    Verify,
    First,
}

fn server_tls_block(pki: &Pki, mode: Upstream) -> String {
    if mode == Upstream::Plain {
        return String::new();
    }
    let (cert, key) = pki.issue("nats", 100, false, false);
    let mut block = format!(
        "tls {{\n cert_file: {:?}\n key_file: {:?}\n ca_file: {:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        pki.ca_file().display().to_string()
    );
    if mode == Upstream::Verify {
        block.push_str(" verify: true\n");
    }
    if mode == Upstream::First {
        block.push_str(" handshake_first: true\n");
    }
    block.push_str("}\n");
    block
}

async fn tls_proxy(
    server: &NatsServer,
    pki: &Pki,
    mode: AgentTlsMode,
    upstream: Upstream,
    client_ca: bool,
) -> ProxyHandle {
    init_logs();
    let (cert, key) = pki.issue("proxy", 7, false, false);
    let (up_cert, up_key) = pki.issue("proxy-client", 8, true, false);
    let file = FileConfig::default();
    let config = file
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![format!("nats://localhost:{}", server.port)],
            kek_file: Some("unused".into()),
            admin: Some("127.0.0.1:0".into()),
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_client_ca: client_ca.then(|| pki.ca_file()),
            tls_mode: Some(mode),
            upstream_ca: (upstream != Upstream::Plain).then(|| pki.ca_file()),
            upstream_cert: (upstream == Upstream::Verify).then_some(up_cert),
            upstream_key: (upstream == Upstream::Verify).then_some(up_key),
            upstream_tls_first: upstream == Upstream::First,
            ..Default::default()
        })
        .unwrap();
    cipherbus::server::start(config, RootKey::from_bytes(TEST_KEK))
        .await
        .expect("TLS proxy starts")
}

/// How a test agent speaks TLS to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    Plain,
    Classic,
    First,
}

async fn tls_agent(
    p: &ProxyHandle,
    pki: &Pki,
    how: Agent,
    cert: Option<(PathBuf, PathBuf)>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
    if how != Agent::Plain {
        opts = opts.add_root_certificates(pki.ca_file()).require_tls(true);
    }
    if how == Agent::First {
        opts = opts.tls_first();
    }
    if let Some((c, k)) = cert {
        opts = opts.add_client_certificate(c, k);
    }
    opts.connect(format!("nats://127.0.0.1:{}", p.local_addr.port()))
        .await
}

/// Pub/sub and request/reply through the proxy; the bus sees only envelopes.
async fn exercise(
    p: &ProxyHandle,
    pki: &Pki,
    how: Agent,
    server: &NatsServer,
    upstream: Upstream,
    label: &str,
) {
    let a = tls_agent(p, pki, how, None)
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let b = tls_agent(p, pki, how, None).await.unwrap();
    let mut sub = b.subscribe("tls.data").await.unwrap();
    let mut svc = b.subscribe("tls.svc").await.unwrap();
    sync(&b).await;
    let observer = raw_observer(server, pki, upstream).await;
    let mut tap = observer.subscribe("tls.data").await.unwrap();
    sync(&observer).await;
    let responder = tokio::spawn(async move {
        if let Some(m) = svc.next().await {
            b.publish(m.reply.unwrap(), "pong".into()).await.unwrap();
            b.flush().await.unwrap();
        }
    });
    a.publish("tls.data", "secret over tls".into())
        .await
        .unwrap();
    a.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], b"secret over tls", "{label}");
    let seen = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.payload[0], MAGIC, "{label}: sealed on the bus");
    let reply = tokio::time::timeout(Duration::from_secs(5), a.request("tls.svc", "ping".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply.payload[..], b"pong", "{label}");
    responder.await.unwrap();
}

async fn raw_observer(server: &NatsServer, pki: &Pki, upstream: Upstream) -> async_nats::Client {
    let mut opts = async_nats::ConnectOptions::new();
    if upstream != Upstream::Plain {
        opts = opts.add_root_certificates(pki.ca_file()).require_tls(true);
    }
    if upstream == Upstream::Verify {
        let (c, k) = pki.issue("observer", 9, true, false);
        opts = opts.add_client_certificate(c, k);
    }
    if upstream == Upstream::First {
        opts = opts.tls_first();
    }
    opts.connect(format!("nats://localhost:{}", server.port))
        .await
        .unwrap()
}

async fn matrix(upstream: Upstream) {
    let pki = Pki::new();
    let server = NatsServer::start_core(&server_tls_block(&pki, upstream));
    for (mode, agents) in [
        (AgentTlsMode::Required, vec![Agent::Classic]),
        (AgentTlsMode::Optional, vec![Agent::Plain, Agent::Classic]),
        (AgentTlsMode::First, vec![Agent::First]),
        (AgentTlsMode::Auto, vec![Agent::First, Agent::Classic]),
    ] {
        let p = tls_proxy(&server, &pki, mode, upstream, false).await;
        for how in agents {
            let label = format!("agent {mode:?}/{how:?}, upstream {upstream:?}");
            exercise(&p, &pki, how, &server, upstream, &label).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_mode_with_a_plain_upstream() {
    matrix(Upstream::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_mode_with_a_tls_upstream() {
    matrix(Upstream::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_mode_with_a_verifying_upstream() {
    matrix(Upstream::Verify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_mode_with_a_tls_first_upstream() {
    matrix(Upstream::First).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_advertises_exactly_what_the_listener_serves() {
    let pki = Pki::new();
    let server = NatsServer::start_core("");
    let required = tls_proxy(
        &server,
        &pki,
        AgentTlsMode::Required,
        Upstream::Plain,
        false,
    )
    .await;
    let optional = tls_proxy(&server, &pki, AgentTlsMode::Optional, Upstream::Plain, true).await;
    let plain = proxy(&server).await;
    let auto = tls_proxy(&server, &pki, AgentTlsMode::Auto, Upstream::Plain, false).await;
    let first = tls_proxy(&server, &pki, AgentTlsMode::First, Upstream::Plain, false).await;
    let (r, o, n) = (
        tokio::task::spawn_blocking({
            let p = required.local_addr;
            move || info_at(p)
        }),
        tokio::task::spawn_blocking({
            let p = optional.local_addr;
            move || info_at(p)
        }),
        tokio::task::spawn_blocking({
            let p = plain.local_addr;
            move || info_at(p)
        }),
    );
    let (r, o, n) = (r.await.unwrap(), o.await.unwrap(), n.await.unwrap());
    // `auto` without a ClientHello falls back to plaintext INFO that requires the upgrade.
    let a = tokio::task::spawn_blocking({
        let p = auto.local_addr;
        move || info_at(p)
    });
    let a = a.await.unwrap();
    assert_eq!(a.get("tls_required"), Some(&serde_json::Value::Bool(true)));
    assert_eq!(a.get("tls_available"), None);
    // `first` sends INFO only inside TLS.
    let f = tokio::task::spawn_blocking({
        let p = first.local_addr;
        let ca = pki.ca_file();
        move || info_over_tls_first(p, &ca)
    });
    let f = f.await.unwrap();
    assert_eq!(f.get("tls_required"), Some(&serde_json::Value::Bool(true)));
    assert_eq!(f.get("tls_available"), None);
    assert_eq!(r.get("tls_required"), Some(&serde_json::Value::Bool(true)));
    assert_eq!(r.get("tls_available"), None);
    assert_eq!(o.get("tls_available"), Some(&serde_json::Value::Bool(true)));
    assert_eq!(o.get("tls_required"), None);
    assert_eq!(o.get("tls_verify"), Some(&serde_json::Value::Bool(true)));
    for key in ["tls_required", "tls_available", "tls_verify"] {
        assert_eq!(n.get(key), None, "plain listener advertises no {key}");
    }
}

fn tls_client_config(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

fn info_over_tls_first(addr: std::net::SocketAddr, ca: &Path) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(tls_client_config(ca), name).unwrap();
    let stream = rustls::Stream::new(&mut conn, &mut tcp);
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(line.strip_prefix("INFO ").expect("INFO over TLS").trim()).unwrap()
}

fn info_at(addr: std::net::SocketAddr) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(line.strip_prefix("INFO ").expect("plaintext INFO").trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_agents_without_a_good_certificate() {
    let pki = Pki::new();
    let other = Pki::new();
    let server = NatsServer::start_core("");
    let p = tls_proxy(&server, &pki, AgentTlsMode::Required, Upstream::Plain, true).await;
    assert!(
        tls_agent(&p, &pki, Agent::Classic, None).await.is_err(),
        "no certificate"
    );
    let wrong = other.issue("stranger", 3, true, false);
    assert!(
        tls_agent(&p, &pki, Agent::Classic, Some(wrong))
            .await
            .is_err(),
        "wrong CA"
    );
    let good = pki.issue("agent", 4, true, false);
    let client = tls_agent(&p, &pki, Agent::Classic, Some(good))
        .await
        .expect("good certificate");
    sync(&client).await;
}

fn peer_serial(addr: std::net::SocketAddr, ca: &Path) -> Vec<u8> {
    // A raw rustls client: read INFO, upgrade, and report the server certificate's serial.
    use std::io::{BufRead, BufReader, Read, Write};
    let config = tls_client_config(ca);
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(&mut tcp).read_line(&mut line).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    stream.write_all(b"PING\r\n").unwrap();
    let mut buf = [0u8; 64];
    let _ = stream.read(&mut buf);
    let cert = conn.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    parsed.raw_serial().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_a_restart() {
    let pki = Pki::new();
    let server = NatsServer::start_core("");
    let p = tls_proxy(
        &server,
        &pki,
        AgentTlsMode::Required,
        Upstream::Plain,
        false,
    )
    .await;
    let old = tls_agent(&p, &pki, Agent::Classic, None).await.unwrap();
    let addr = p.local_addr;
    let ca = pki.ca_file();
    let before = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || peer_serial(addr, &ca)
    })
    .await
    .unwrap();
    assert_eq!(before, vec![7]);

    // Swap the files for a certificate with serial 42 (same paths the proxy was given).
    let (cert, key) = pki.issue("next", 42, false, false);
    std::fs::copy(&cert, pki.path("proxy.pem")).unwrap();
    std::fs::copy(&key, pki.path("proxy-key.pem")).unwrap();
    let swapped = eventually(Duration::from_secs(10), || {
        peer_serial(addr, &ca) == vec![42]
    })
    .await;
    assert!(swapped, "new handshakes use the new certificate");
    sync(&old).await;

    // A broken file is refused and the last good certificate stays in use.
    std::fs::write(pki.path("proxy.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = tokio::task::spawn_blocking(move || peer_serial(addr, &ca))
        .await
        .unwrap();
    assert_eq!(after, vec![42]);
}

fn run_with(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cipherbus"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_certificates_fail_at_startup_with_one_sentence() {
    let pki = Pki::new();
    let other = Pki::new();
    let kek = write_kek(pki.dir.path(), TEST_KEK);
    let (cert, key) = pki.issue("good", 1, false, false);
    let (expired, expired_key) = pki.issue("old", 2, false, true);
    let (_, other_key) = other.issue("x", 3, false, false);
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--tls-cert".into(),
                s(&garbage),
                "--tls-key".into(),
                s(&key),
            ],
            "no valid PEM",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&cert),
                "--tls-key".into(),
                s(&other_key),
            ],
            "does not match",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&expired),
                "--tls-key".into(),
                s(&expired_key),
            ],
            "expired",
        ),
        (
            vec![
                "--tls-cert".into(),
                s(&cert),
                "--tls-key".into(),
                s(&key),
                "--tls-client-ca".into(),
                s(&garbage),
            ],
            "no valid PEM",
        ),
        (vec!["--upstream-ca".into(), s(&garbage)], "no valid PEM"),
        (
            vec![
                "--upstream-ca".into(),
                s(&pki.ca_file()),
                "--upstream-server-name".into(),
                "not a name".into(),
            ],
            "not a valid TLS server name",
        ),
    ];
    for (args, needle) in cases {
        let mut full: Vec<String> = vec!["run".into(), "--listen".into(), "127.0.0.1:0".into()];
        full.push("--kek-file".into());
        full.push(s(&kek));
        full.extend(args.iter().cloned());
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = run_with(&refs);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

/// nats-py decides TLS differently from async-nats; it must work in `required` and `first`.
/// Its waits are generous because a loaded machine can take seconds to start Python.
const PY_AGENT: &str = r#"
import asyncio, ssl, sys
import nats

async def main(url, ca, first):
    ctx = ssl.create_default_context(cafile=ca)
    opts = dict(servers=[url], tls=ctx, connect_timeout=20, allow_reconnect=False)
    if first:
        opts["tls_handshake_first"] = True
    a = await nats.connect(**opts)
    b = await nats.connect(**opts)
    got = asyncio.get_running_loop().create_future()
    async def on_data(msg):
        if not got.done():
            got.set_result(msg.data)
    async def on_svc(msg):
        await msg.respond(b"pong:" + msg.data)
    await b.subscribe("py.data", cb=on_data)
    await b.subscribe("py.svc", cb=on_svc)
    # nats-py's flush() writes its PING at once, ahead of a SUB still in its buffer: wait for
    # the buffer to empty first, or the PONG can come back before the server has the SUBs.
    while b.pending_data_size > 0:
        await asyncio.sleep(0.01)
    await b.flush()
    await a.publish("py.data", b"hello from python")
    data = await asyncio.wait_for(got, 20)
    reply = await a.request("py.svc", b"ping", timeout=20)
    assert data == b"hello from python", data
    assert reply.data == b"pong:ping", reply.data
    await a.close()
    await b.close()
    print("ok")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "first"))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_works_in_required_and_first_mode() {
    let pki = Pki::new();
    let server = NatsServer::start_core("");
    let script = pki.path("agent.py");
    std::fs::write(&script, PY_AGENT).unwrap();
    let py_path = tokio::task::spawn_blocking(nats_py_path).await.unwrap();
    for (mode, arg) in [
        (AgentTlsMode::Required, "classic"),
        (AgentTlsMode::First, "first"),
    ] {
        let p = tls_proxy(&server, &pki, mode, Upstream::Plain, false).await;
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(&script)
            .arg(format!("tls://127.0.0.1:{}", p.local_addr.port()))
            .arg(pki.ca_file())
            .arg(arg)
            .env("PYTHONPATH", &py_path);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "{mode:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            p.metrics.messages_sealed.get() >= 2,
            "{mode:?}: sealed through the proxy"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_works_with_tls_on_both_sides() {
    let pki = Pki::new();
    let server = NatsServer::start_core(&server_tls_block(&pki, Upstream::Verify));
    let state = tempfile::tempdir().unwrap();
    let (cert, key) = pki.issue("authority-proxy", 11, false, false);
    let (up_cert, up_key) = pki.issue("authority-client", 12, true, false);
    let file: FileConfig =
        toml::from_str(
            "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"5s\"\nrequire_jetstream = false\n",
        )
            .unwrap();
    let config = file
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![format!("nats://localhost:{}", server.port)],
            kek_file: Some("unused".into()),
            state_dir: Some(state.path().to_path_buf()),
            controller: true,
            tls_cert: Some(cert),
            tls_key: Some(key),
            upstream_ca: Some(pki.ca_file()),
            upstream_cert: Some(up_cert),
            upstream_key: Some(up_key),
            ..Default::default()
        })
        .unwrap();
    let pa = cipherbus::server::start(config, RootKey::from_bytes(TEST_KEK))
        .await
        .unwrap();
    let pb = tls_proxy(
        &server,
        &pki,
        AgentTlsMode::Required,
        Upstream::Verify,
        false,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The operator's CLI reaches the authority through the TLS-only server.
    let observer = raw_observer(&server, &pki, Upstream::Verify).await;
    let kek = write_kek(state.path(), TEST_KEK);
    let (cli_cert, cli_key) = pki.issue("operator", 13, true, false);
    let url = format!("nats://localhost:{}", server.port);
    let args: Vec<std::ffi::OsString> = vec![
        "rotate".into(),
        "--timeout".into(),
        "20s".into(),
        "--upstream".into(),
        url.into(),
        "--kek-file".into(),
        kek.into(),
        "--upstream-ca".into(),
        pki.ca_file().into(),
        "--upstream-cert".into(),
        cli_cert.into(),
        "--upstream-key".into(),
        cli_key.into(),
    ];
    assert_rotated_to(
        2,
        &cipherbus_cli(env!("CARGO_BIN_EXE_cipherbus"), args).await,
    );
    assert!(
        eventually(Duration::from_secs(10), || pa
            .keyring
            .snapshot()
            .active
            .epoch
            == 2
            && pb.keyring.snapshot().active.epoch == 2)
        .await
    );

    let a = tls_agent(&pa, &pki, Agent::Classic, None).await.unwrap();
    let b = tls_agent(&pb, &pki, Agent::Classic, None).await.unwrap();
    let mut sub = b.subscribe("after.rotation").await.unwrap();
    let mut tap = observer.subscribe("after.rotation").await.unwrap();
    sync(&b).await;
    sync(&observer).await;
    a.publish("after.rotation", "still private".into())
        .await
        .unwrap();
    a.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], b"still private");
    let seen = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        cipherbus::envelope::Header::parse(&seen.payload)
            .unwrap()
            .epoch,
        2
    );
}

/// Connects, optionally reads the plaintext INFO, sends `bytes`, and returns how long the proxy
/// took to close the connection (`None` if it stayed open for 15 s).
fn stall(addr: std::net::SocketAddr, read_info: bool, bytes: &'static [u8]) -> Option<Duration> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let start = std::time::Instant::now();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    if read_info {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("INFO "), "{line}");
    }
    s.write_all(bytes).unwrap();
    let mut sink = Vec::new();
    match reader.read_to_end(&mut sink) {
        Ok(_) => Some(start.elapsed()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(start.elapsed()),
        Err(_) => None,
    }
}

/// A TLS record header that promises a 512-byte ClientHello which never comes.
const PARTIAL_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_closed() {
    let pki = Pki::new();
    let server = NatsServer::start_core("");
    let required = tls_proxy(
        &server,
        &pki,
        AgentTlsMode::Required,
        Upstream::Plain,
        false,
    )
    .await;
    let first = tls_proxy(&server, &pki, AgentTlsMode::First, Upstream::Plain, false).await;
    let (r, f) = (required.local_addr, first.local_addr);
    // All four at once, each on its own thread: the bounds are seconds long.
    let cases: Vec<(&str, std::thread::JoinHandle<Option<Duration>>, Duration)> = vec![
        (
            "required: nothing after INFO",
            std::thread::spawn(move || stall(r, true, b"")),
            Duration::from_secs(5),
        ),
        (
            "required: half a ClientHello after INFO",
            std::thread::spawn(move || stall(r, true, PARTIAL_HELLO)),
            Duration::from_secs(5),
        ),
        (
            "first: nothing",
            std::thread::spawn(move || stall(f, false, b"")),
            Duration::from_millis(1500),
        ),
        (
            "first: half a ClientHello",
            std::thread::spawn(move || stall(f, false, PARTIAL_HELLO)),
            Duration::from_millis(1500),
        ),
    ];
    for (what, thread, bound) in cases {
        let took = thread.join().unwrap();
        assert!(
            took.is_some_and(|t| t >= bound.mul_f32(0.8) && t < bound + Duration::from_secs(3)),
            "{what}: closed after {took:?}, bound {bound:?}"
        );
    }
}

/// `cipherbus rotate` succeeded and reported `epoch` active.
fn assert_rotated_to(epoch: u32, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("epoch {epoch} is active")),
        "{stdout}"
    );
}

/// The control plane (the authority's and each proxy's connection, and the operator's commands)
/// verifies the upstream exactly as sessions do: against the configured CA only, and for
/// `--upstream-server-name` when one is set, not the host in the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_verifies_the_configured_server_name() {
    let pki = Pki::new();
    let (cert, key) = pki.issue_for(&["nats.internal"], "named-nats", 200, false, false);
    let server = NatsServer::start_core(&format!(
        "tls {{\n cert_file: {:?}\n key_file: {:?}\n}}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    let url = format!("nats://127.0.0.1:{}", server.port);
    let state = tempfile::tempdir().unwrap();
    let file: FileConfig =
        toml::from_str(
            "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"5s\"\nrequire_jetstream = false\n",
        )
            .unwrap();
    let config = file
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![url.clone()],
            kek_file: Some("unused".into()),
            state_dir: Some(state.path().to_path_buf()),
            controller: true,
            upstream_ca: Some(pki.ca_file()),
            upstream_server_name: Some("nats.internal".into()),
            ..Default::default()
        })
        .unwrap();
    init_logs();
    let p = cipherbus::server::start(config, RootKey::from_bytes(TEST_KEK))
        .await
        .unwrap();
    let kek = write_kek(state.path(), TEST_KEK);
    let rotate = |name: Option<&str>| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "rotate".into(),
            "--timeout".into(),
            "20s".into(),
            "--upstream".into(),
            url.clone().into(),
            "--kek-file".into(),
            kek.clone().into(),
            "--upstream-ca".into(),
            pki.ca_file().into(),
        ];
        if let Some(name) = name {
            args.extend(["--upstream-server-name".into(), name.into()]);
        }
        cipherbus_cli(env!("CARGO_BIN_EXE_cipherbus"), args)
    };

    // The URL's host is not in the certificate: without the name the command cannot connect.
    let out = rotate(None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot reach the bus"), "{stderr}");
    assert_eq!(p.keyring.snapshot().active.epoch, 1);

    // With it, the command reaches the authority, whose own control connection (and the
    // proxy's) verified the same name, and the rotation completes.
    assert_rotated_to(2, &rotate(Some("nats.internal")).await);
    assert!(
        eventually(Duration::from_secs(10), || p
            .keyring
            .snapshot()
            .active
            .epoch
            == 2)
        .await
    );
}
