//! The `cipherbus` binary as an operator meets it: `keygen`, startup errors that exit with code 2
//! and one sentence, `--check-config`, riding out an upstream that is not there yet, and the
//! admin endpoint.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");
const WAIT: Duration = Duration::from_secs(10);

/// The binary (or a server) as a child process, with its stdout kept for reading.
fn spawn(cmd: &mut Command) -> Spawned {
    Spawned::spawn(cmd.env("CIPHERBUS_LOG", "info").stdout(Stdio::piped()))
}

fn cipherbus(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    cmd
}

/// A valid root key file, as `keygen` would write it.
fn kek_file(dir: &Path) -> PathBuf {
    let path = dir.join("kek");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    writeln!(f, "{}", "42".repeat(32)).unwrap();
    path
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A bare nats-server on a port chosen by the test, killed on drop.
fn nats_server_on(port: u16) -> Spawned {
    let server = spawn(
        Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p"])
            .arg(port.to_string()),
    );
    let start = Instant::now();
    loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                return server;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "nats-server did not come up on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw agent through the proxy at `addr`: subscribes, publishes to itself, and reads the
/// message back opened, with PING/PONG as the barrier.
fn raw_round_trip(addr: &str) {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("INFO {"),
        "the proxy greets with INFO, got {line:?}"
    );
    s.write_all(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n\
          SUB cli.check 7\r\nPING\r\n",
    )
    .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG\r\n");
    s.write_all(b"PUB cli.check 11\r\nhello world\r\nPING\r\n")
        .unwrap();
    let mut got = String::new();
    while !got.ends_with("PONG\r\n") {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "connection closed; got {got:?}"
        );
        // The server follows the first PONG with an INFO (`connect_info`); skip it.
        if !line.starts_with("INFO ") {
            got.push_str(&line);
        }
    }
    assert_eq!(got, "MSG cli.check 7 11\r\nhello world\r\nPONG\r\n");
}

#[test]
fn keygen_writes_a_private_hex_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("root.kek");

    let mut keygen = spawn(&mut cipherbus(&["keygen", "--out", path_str(&out)]));
    let status = keygen.wait_exit(WAIT).expect("keygen exits");
    assert!(status.success(), "keygen failed: {}", keygen.stderr());

    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.len(), 65, "64 hex digits and a newline: {text:?}");
    assert!(text.ends_with('\n'));
    assert!(
        text[..64].bytes().all(|b| b.is_ascii_hexdigit()),
        "{text:?}"
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "readable by its owner only, got {mode:o}");

    let mut again = spawn(&mut cipherbus(&["keygen", "--out", path_str(&out)]));
    let status = again.wait_exit(WAIT).expect("second keygen exits");
    assert!(!status.success(), "keygen refuses an existing file");
    assert!(
        again.stderr().contains("refusing to overwrite"),
        "says why: {:?}",
        again.stderr()
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        text,
        "the existing key is untouched"
    );

    let mut other = spawn(&mut cipherbus(&[
        "keygen",
        "--out",
        path_str(&dir.path().join("second.kek")),
    ]));
    assert!(other.wait_exit(WAIT).expect("keygen exits").success());
    assert_ne!(
        std::fs::read_to_string(dir.path().join("second.kek")).unwrap(),
        text,
        "every key is fresh"
    );
}

#[test]
fn bad_startup_settings_exit_with_code_2_and_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let kek = kek_file(dir.path());
    let malformed = dir.path().join("malformed.kek");
    std::fs::write(&malformed, "abcd\n").unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "lisen = \"127.0.0.1:4333\"\n").unwrap();
    let missing_kek = dir.path().join("no-such.kek");
    let missing_config = dir.path().join("no-such.toml");
    // Valid everywhere but in the setting under test; the upstream is never dialled.
    let listen = local(free_port());
    let good = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["run", "--upstream", "nats://127.0.0.1:1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !extra.contains(&"--listen") {
            args.extend(["--listen".into(), listen.clone()]);
        }
        if !extra.contains(&"--kek-file") {
            args.extend(["--kek-file".into(), path_str(&kek).into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing key file",
            good(&["--kek-file", path_str(&missing_kek)]),
            "no-such.kek",
        ),
        (
            "malformed key file",
            good(&["--kek-file", path_str(&malformed)]),
            "malformed",
        ),
        (
            "unreadable config",
            good(&["--config", path_str(&missing_config)]),
            "no-such.toml",
        ),
        (
            "unknown config key",
            good(&["--config", path_str(&typo)]),
            "lisen",
        ),
        (
            "bad listen address",
            good(&["--listen", "nowhere"]),
            "nowhere",
        ),
        (
            "bad upstream URL",
            good(&["--upstream", "http://127.0.0.1:4222"]),
            "http://127.0.0.1:4222",
        ),
        (
            "bad upstream host",
            good(&["--upstream", "nats://no host!:4222"]),
            "neither an IP address nor a DNS name",
        ),
        (
            "unknown AEAD backend",
            good(&["--aead", "fast"]),
            "\"fast\"",
        ),
    ];
    for (what, args, mention) in cases {
        let mut p = spawn(Command::new(BIN).args(&args));
        let Some(status) = p.wait_exit(WAIT) else {
            panic!("{what}: cipherbus started anyway; stderr: {}", p.stderr());
        };
        // The reader thread may still be collecting the last bytes.
        let _ = p.wait_log(Duration::from_secs(2), |l| l.contains(mention));
        let stderr = p.stderr();
        assert_eq!(
            status.code(),
            Some(2),
            "{what}: exit code; stderr: {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: one line on stderr, got {stderr:?}");
        assert!(
            lines[0].starts_with("cipherbus: ") && lines[0].contains(mention),
            "{what}: the sentence names {mention:?}: {:?}",
            lines[0]
        );
    }
}

#[test]
fn check_config_validates_and_exits_0_without_dialling() {
    let dir = tempfile::tempdir().unwrap();
    let kek = kek_file(dir.path());
    let config = dir.path().join("cipherbus.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:4999\"\nupstream = [\"nats://127.0.0.1:1\"]\n\n\
         [[policy]]\nsubject = \"public.>\"\nmode = \"plaintext\"\n",
    )
    .unwrap();
    let check = || {
        let mut p = spawn(&mut cipherbus(&[
            "run",
            "--check-config",
            "--config",
            path_str(&config),
            "--kek-file",
            path_str(&kek),
        ]));
        let status = p.wait_exit(WAIT).expect("--check-config exits");
        assert_eq!(status.code(), Some(0), "stderr: {}", p.stderr());
        p.stdout()
    };
    let stdout = check();
    assert!(stdout.contains("config ok"), "{stdout:?}");
    assert!(
        stdout.contains("127.0.0.1:4999"),
        "the summary shows the listen address: {stdout:?}"
    );
    assert!(
        stdout.contains("aead audited: aws-lc-rs below 4 KiB, OpenSSL from 4 KiB"),
        "the summary names the default AEAD backend: {stdout:?}"
    );

    // The opt-in, from the file: named as such, or as the fallback and why on a CPU without
    // AVX-512F.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.insert_str(0, "aead = \"batched\"\n");
    std::fs::write(&config, text).unwrap();
    let stdout = check();
    let want = if std::arch::is_x86_feature_detected!("avx512f") {
        "aead batched (opt-in, hand-written): AVX-512 ChaCha20"
    } else {
        "aead audited (batched was asked for, but this CPU lacks AVX-512F"
    };
    assert!(stdout.contains(want), "{stdout:?}");
}

#[test]
fn an_unreachable_upstream_is_a_warning_not_an_exit() {
    let dir = tempfile::tempdir().unwrap();
    let kek = kek_file(dir.path());
    let upstream_port = free_port();
    let upstream = local(upstream_port);
    let listen = local(free_port());
    let mut proxy = spawn(&mut cipherbus(&[
        "run",
        "--listen",
        &listen,
        "--upstream",
        &format!("nats://{upstream}"),
        "--kek-file",
        path_str(&kek),
    ]));

    let warning = proxy.wait_log(WAIT, |l| l.contains("WARN"));
    assert!(
        warning.is_some(),
        "a dead upstream is logged as a warning; stderr: {}",
        proxy.stderr()
    );
    // Staying up is the behaviour under test, so here a pause is the assertion itself.
    assert!(
        proxy.wait_exit(Duration::from_millis(1500)).is_none(),
        "cipherbus keeps running without its upstream; stderr: {}",
        proxy.stderr()
    );

    let _server = nats_server_on(upstream_port);
    raw_round_trip(&listen);
    assert!(proxy.wait_exit(Duration::ZERO).is_none(), "still running");

    assert!(
        proxy
            .wait_log(Duration::ZERO, |l| l.contains("WARN")
                && l.contains(&upstream))
            .is_some(),
        "the warning names the upstream {upstream}; stderr: {}",
        proxy.stderr()
    );
}

#[test]
fn admin_endpoint_serves_health_and_metrics() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = kek_file(dir.path());
    let listen = local(free_port());
    let admin: SocketAddr = local(free_port()).parse().unwrap();
    let _proxy = spawn(&mut cipherbus(&[
        "run",
        "--listen",
        &listen,
        "--upstream",
        &server.url(),
        "--kek-file",
        path_str(&kek),
        "--admin",
        &admin.to_string(),
    ]));

    let start = Instant::now();
    let health = loop {
        if let Some(body) = http_get(admin, "/healthz") {
            break body;
        }
        assert!(start.elapsed() < WAIT, "the admin endpoint comes up");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(health.trim(), "ok");

    // One agent stays connected while the metrics are read; another sealed a message.
    raw_round_trip(&listen);
    let mut connected = TcpStream::connect(&listen).unwrap();
    connected.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(connected.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    connected
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG\r\n");

    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    };
    let mut text = String::new();
    let settled = (0..250).any(|_| {
        text = http_get(admin, "/metrics").unwrap_or_default();
        // The first agent's session ends asynchronously after it hung up.
        if value(&text, "cipherbus_connections") == Some(1.0) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
        false
    });
    assert!(
        settled,
        "cipherbus_connections shows the one open agent:\n{text}"
    );
    assert!(
        value(&text, "cipherbus_messages_sealed_total").is_some_and(|v| v >= 1.0),
        "the sealed message is counted:\n{text}"
    );
    assert!(
        value(&text, "cipherbus_messages_opened_total").is_some_and(|v| v >= 1.0),
        "the opened message is counted:\n{text}"
    );
    assert!(
        !http_get(admin, "/nope")
            .unwrap_or_default()
            .contains("cipherbus_"),
        "unknown paths serve no metrics"
    );
}
