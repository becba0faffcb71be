//! The security review, each item checked against the real binary: no key or plaintext in any
//! log line at the most verbose level, private files whatever the umask, and constant-time
//! comparison of every secret-derived value outside the AEAD. docs/SECURITY.md lists them.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");
const WAIT: Duration = Duration::from_secs(15);
const FAST: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"3s\"\n";

/// A `cipherbus` process whose stderr goes to a file; stopped with SIGTERM (so its shutdown
/// path logs too), then killed, on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Daemon {
    fn spawn(args: &[&str], log: PathBuf, level: &str, umask: Option<&str>) -> Daemon {
        Self::spawn_with(args, log, level, umask, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables (where a KMS root is reached).
    fn spawn_with(
        args: &[&str],
        log: PathBuf,
        level: &str,
        umask: Option<&str>,
        env: &[(String, String)],
    ) -> Daemon {
        let mut cmd = match umask {
            // `sh` sets the umask for the binary it then becomes.
            Some(mask) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {mask}; exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("CIPHERBUS_LOG", level)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(log.with_extension("out")).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn cipherbus");
        Daemon {
            child,
            log,
            stopped: false,
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                start.elapsed() < WAIT,
                "{} never logged {needle:?}:\n{}",
                self.log.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn wait_listening(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < WAIT, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Runs an operator command against the authority and returns its stdout; it must succeed.
fn operator(args: &[&str], upstream: &str, kek: &Path) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args([
            "--upstream",
            upstream,
            "--kek-file",
            s(kek),
            "--timeout",
            "20s",
        ])
        .env("CIPHERBUS_LOG", "trace")
        .output()
        .expect("run cipherbus");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cipherbus {args:?} failed: {text}");
    text
}

/// `HKDF-SHA256(root, "cipherbus-v1 hkdf salt", info)`, as docs/ENVELOPE.md defines it.
fn derive(root: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"cipherbus-v1 hkdf salt"), root);
    let mut out = [0u8; 32];
    hk.expand(info, &mut out).unwrap();
    out
}

/// Unwraps a format-1 wrapped key file, as docs/ENVELOPE.md defines it.
fn unwrap(root: &[u8; 32], epoch: u32, wrapped: &[u8]) -> [u8; 32] {
    assert_eq!(wrapped.len(), 73);
    let wrap = derive(root, b"cipherbus-v1 wrap-key");
    let mut aad = b"cipherbus-v1 wrapped-key".to_vec();
    aad.push(1);
    aad.extend_from_slice(&epoch.to_be_bytes());
    let key = XChaCha20Poly1305::new((&wrap).into())
        .decrypt(
            wrapped[1..25].into(),
            Payload {
                msg: &wrapped[25..],
                aad: &aad,
            },
        )
        .expect("the key file unwraps under the root key");
    key.try_into().unwrap()
}

/// Every data key in a state directory, by epoch.
fn data_keys(root: &[u8; 32], state: &Path) -> Vec<(u32, [u8; 32])> {
    let mut keys = vec![(1, derive(root, b"cipherbus-v1 data-key epoch 1"))];
    for entry in std::fs::read_dir(state.join("keys")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let Some(epoch) = name
            .strip_prefix("epoch-")
            .and_then(|n| n.strip_suffix(".key"))
        else {
            continue;
        };
        let epoch: u32 = epoch.parse().unwrap();
        keys.push((epoch, unwrap(root, epoch, &std::fs::read(&path).unwrap())));
    }
    keys
}

/// The ways a secret could show up in a log line: raw, hex (either case), base64 (either
/// alphabet), a Rust byte-array `Debug`, and any 8-byte run of it in hex.
fn spellings(secret: &[u8]) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut out = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        b64.encode(secret).into_bytes(),
        b64url.encode(secret).into_bytes(),
        format!("{:?}", &secret[..8]).trim_end_matches(']').into(),
    ];
    for w in secret.windows(8) {
        out.push(hex::encode(w).into_bytes());
    }
    // Base64 of a suffix, at each of the three alignments, first 16 characters.
    for off in 0..3 {
        out.push(b64.encode(&secret[off..]).as_bytes()[..16].to_vec());
    }
    out
}

/// An authority and two proxies, run as the real binary at trace level, through traffic, two
/// rotations and a revoke: no key in any spelling and no payload shows up in their logs, in the
/// CLI's output, or in the clear in any state directory file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_plaintext_in_any_log_line_at_the_most_verbose_level() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kek = d.join("kek");
    let keygen = Command::new(BIN)
        .args(["keygen", "--out", s(&kek)])
        .env("CIPHERBUS_LOG", "trace")
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let mut cli_output = String::from_utf8_lossy(&keygen.stdout).into_owned();
    cli_output += &String::from_utf8_lossy(&keygen.stderr);
    let root: [u8; 32] = hex::decode(std::fs::read_to_string(&kek).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let config = d.join("cipherbus.toml");
    std::fs::write(&config, FAST).unwrap();
    let url = server.url();

    let authority_state = d.join("authority");
    let authority = Daemon::spawn(
        &[
            "controller",
            "--config",
            s(&config),
            "--upstream",
            &url,
            "--kek-file",
            s(&kek),
            "--state-dir",
            s(&authority_state),
        ],
        d.join("authority.log"),
        "trace",
        None,
    );
    authority.wait_log("key authority running");
    let mut proxies = Vec::new();
    let mut ports = Vec::new();
    for name in ["proxy-a", "proxy-b"] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let state = d.join(name);
        // One proxy logs JSON lines: the same guarantee holds for them.
        let format = if name == "proxy-b" { "json" } else { "text" };
        proxies.push(Daemon::spawn_with(
            &[
                "run",
                "--config",
                s(&config),
                "--listen",
                &listen,
                "--upstream",
                &url,
                "--kek-file",
                s(&kek),
                "--state-dir",
                s(&state),
            ],
            d.join(format!("{name}.log")),
            "trace",
            None,
            &[("CIPHERBUS_LOG_FORMAT".into(), format.into())],
        ));
        wait_listening(port);
        ports.push(port);
    }

    let a = async_nats::connect(format!("127.0.0.1:{}", ports[0]))
        .await
        .unwrap();
    let b = async_nats::connect(format!("127.0.0.1:{}", ports[1]))
        .await
        .unwrap();
    let watcher = observer(&server).await;
    let mut sub = b.subscribe("ledger.>").await.unwrap();
    let mut raw = watcher.subscribe("ledger.>").await.unwrap();
    let mut service = a.subscribe("svc.balance").await.unwrap();
    sync(&b).await;
    sync(&watcher).await;
    sync(&a).await;

    let token = hex::encode(random16());
    let mut plaintexts = Vec::new();
    let mut seen_epochs = std::collections::BTreeSet::new();
    let mut subs = Subs {
        sub: &mut sub,
        raw: &mut raw,
        service: &mut service,
    };
    for i in 0..3 {
        seen_epochs.insert(exchange(&a, &b, &mut subs, &token, i, &mut plaintexts).await);
    }
    cli_output += &tokio::task::spawn_blocking({
        let (url, kek) = (url.clone(), kek.clone());
        move || operator(&["rotate"], &url, &kek) + &operator(&["rotate"], &url, &kek)
    })
    .await
    .unwrap();
    for i in 3..6 {
        seen_epochs.insert(exchange(&a, &b, &mut subs, &token, i, &mut plaintexts).await);
    }
    // Every data key while its wrapped copy still exists; then one is revoked (destroyed).
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("root key".into(), root.to_vec()),
        (
            "control key".into(),
            derive(&root, b"cipherbus-v1 control-key").to_vec(),
        ),
        (
            "wrap key".into(),
            derive(&root, b"cipherbus-v1 wrap-key").to_vec(),
        ),
    ];
    for state in [&authority_state, &d.join("proxy-a"), &d.join("proxy-b")] {
        for (epoch, key) in data_keys(&root, state) {
            secrets.push((format!("data key of epoch {epoch}"), key.to_vec()));
        }
    }
    assert!(
        secrets.iter().any(|(n, _)| n == "data key of epoch 3"),
        "two rotations happened"
    );
    cli_output += &tokio::task::spawn_blocking({
        let (url, kek) = (url.clone(), kek.clone());
        move || operator(&["revoke", "2"], &url, &kek) + &operator(&["keys"], &url, &kek)
    })
    .await
    .unwrap();
    for i in 6..8 {
        seen_epochs.insert(exchange(&a, &b, &mut subs, &token, i, &mut plaintexts).await);
    }
    assert!(
        seen_epochs.len() >= 2,
        "traffic was sealed under more than one epoch: {seen_epochs:?}"
    );
    // Hostile input is refused and logged without its payload: plaintext injected on the bus,
    // and an agent whose PUB payload is not followed by CRLF.
    let injected = format!("injected-canary-{token}");
    plaintexts.push(injected.clone());
    watcher
        .publish("ledger.injected", injected.into())
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    let malformed = format!("malformed-canary-{token}");
    plaintexts.push(malformed.clone());
    let port = ports[0];
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let pub_line = format!("PUB ledger.bad {}\r\n{malformed}XY", malformed.len());
        s.write_all(format!("CONNECT {{}}\r\n{pub_line}").as_bytes())
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(contains(&answer, b"-ERR 'Unknown Protocol Operation'"));
    })
    .await
    .unwrap();
    let b_log = &proxies[1];
    b_log.wait_log("ledger.injected");
    drop((a, b, watcher));

    let mut logs = vec![("cli output".to_owned(), cli_output)];
    for mut p in proxies.into_iter().chain([authority]) {
        p.stop();
        logs.push((p.log.display().to_string(), p.log()));
    }
    for (name, log) in &logs[1..] {
        if name.ends_with("proxy-b.log") {
            // One JSON object per line, with the event's fields at the top level.
            let mut levels = std::collections::BTreeSet::new();
            for line in log.lines() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line}"));
                assert!(
                    v["timestamp"].is_string() && v["target"].is_string(),
                    "{line}"
                );
                levels.insert(v["level"].as_str().unwrap_or_default().to_owned());
            }
            assert!(
                ["TRACE", "DEBUG", "INFO", "WARN"]
                    .iter()
                    .all(|l| levels.contains(*l)),
                "{name} logged at every level: {levels:?}"
            );
            assert!(
                log.lines().any(|l| l
                    .contains(r#""message":"refused a delivery on an encrypt subject""#)
                    && l.contains(r#""subject":"ledger.injected""#)),
                "{name}: the refusal as JSON"
            );
            continue;
        }
        assert!(
            log.contains(" TRACE ") && log.contains(" DEBUG ") && log.contains(" INFO "),
            "{name} logged at every level:\n{log}"
        );
    }
    assert!(
        logs.iter()
            .any(|(_, l)| l.contains("staged a new data key") && l.contains("destroyed")),
        "the rotation and the revocation were logged"
    );

    // The keys searched for are the ones the processes used: their fingerprints are logged.
    let all_logs: String = logs.iter().map(|(_, l)| l.as_str()).collect();
    for (what, key) in secrets.iter().filter(|(n, _)| n.starts_with("data key")) {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"cipherbus-v1 fingerprint data-key");
        h.update(key);
        let fp = hex::encode(&h.finalize()[..8]);
        assert!(
            all_logs.contains(&fp),
            "the {what} ({fp}) is the one in use"
        );
    }

    let mut leaks = Vec::new();
    for (name, log) in &logs {
        let bytes = log.as_bytes();
        for (what, secret) in &secrets {
            for form in spellings(secret) {
                if contains(bytes, &form) {
                    leaks.push(format!(
                        "{name}: {what} as {:?}",
                        String::from_utf8_lossy(&form)
                    ));
                }
            }
        }
        for text in &plaintexts {
            let b64 = base64::engine::general_purpose::STANDARD.encode(text);
            for form in [
                text.as_bytes().to_vec(),
                hex::encode(text).into_bytes(),
                b64.into_bytes(),
            ] {
                if contains(bytes, &form) {
                    leaks.push(format!("{name}: a plaintext payload ({text})"));
                }
            }
        }
        // The token alone would show a payload even if it were cut or escaped.
        assert!(
            !contains(bytes, token.as_bytes()),
            "{name} logged a payload's bytes"
        );
    }
    // Nor does any file in a state directory hold a key in the clear (keys are only wrapped).
    for state in [&authority_state, &d.join("proxy-a"), &d.join("proxy-b")] {
        let mut dirs = vec![state.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                for (what, secret) in &secrets {
                    if spellings(secret).iter().any(|f| contains(&bytes, f)) {
                        leaks.push(format!("{}: {what}", path.display()));
                    }
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets in the logs: {leaks:#?}");
}

/// A log format other than text or json stops every command with one sentence.
#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(BIN)
        .args(["keygen", "--out", "/nonexistent/kek"])
        .env("CIPHERBUS_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("CIPHERBUS_LOG_FORMAT \"yaml\""), "{err}");
}

/// Random bytes for a canary that cannot occur by chance.
fn random16() -> [u8; 16] {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).unwrap();
    b
}

struct Subs<'a> {
    /// Agent B's subscription to what agent A publishes.
    sub: &'a mut async_nats::Subscriber,
    /// The raw bus observer's copy of the same.
    raw: &'a mut async_nats::Subscriber,
    /// Agent A answering requests.
    service: &'a mut async_nats::Subscriber,
}

/// Agent A publishes a canary to B, and B asks A, which answers with another canary; every
/// payload crosses both proxies. Returns the epoch the published envelope was sealed under.
async fn exchange(
    a: &async_nats::Client,
    b: &async_nats::Client,
    subs: &mut Subs<'_>,
    token: &str,
    i: usize,
    plaintexts: &mut Vec<String>,
) -> u32 {
    let text = format!("plaintext-canary-{token}-{i}");
    let reply = format!("reply-canary-{token}-{i}");
    plaintexts.push(text.clone());
    plaintexts.push(reply.clone());
    a.publish(format!("ledger.{i}"), text.clone().into())
        .await
        .unwrap();
    a.flush().await.unwrap();
    let got = tokio::time::timeout(WAIT, subs.sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload, text.as_bytes());
    let sealed = tokio::time::timeout(WAIT, subs.raw.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!contains(&sealed.payload, text.as_bytes()));
    let epoch = u32::from_be_bytes(sealed.payload[4..8].try_into().unwrap());
    let request = b.request("svc.balance", text.clone().into());
    let service = &mut *subs.service;
    let answer = async {
        let m = tokio::time::timeout(WAIT, service.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload, text.as_bytes());
        a.publish(m.reply.unwrap(), reply.clone().into())
            .await
            .unwrap();
        a.flush().await.unwrap();
    };
    let (got, ()) = tokio::join!(request, answer);
    assert_eq!(got.unwrap().payload, reply.as_bytes());
    epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_state_directory_and_audit_log_are_private_whatever_the_umask() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kek = d.join("kek");
    let keygen = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(["keygen", "--out", s(&kek)])
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    assert_eq!(mode(&kek), 0o600, "keygen under umask 000");

    // An audit log left readable by someone else is tightened too.
    let state = d.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let audit = state.join("audit.jsonl");
    std::fs::write(&audit, b"").unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o666)).unwrap();
    let config = d.join("cipherbus.toml");
    std::fs::write(&config, FAST).unwrap();
    let url = server.url();
    let authority = Daemon::spawn(
        &[
            "controller",
            "--config",
            s(&config),
            "--upstream",
            &url,
            "--kek-file",
            s(&kek),
            "--state-dir",
            s(&state),
        ],
        d.join("authority.log"),
        "info",
        Some("000"),
    );
    authority.wait_log("key authority running");
    let rotated = tokio::task::spawn_blocking({
        let (url, kek) = (url.clone(), kek.clone());
        move || operator(&["rotate"], &url, &kek)
    })
    .await
    .unwrap();
    assert!(rotated.contains("epoch 2 is active"), "{rotated}");

    assert_eq!(mode(&state), 0o700, "state directory");
    assert_eq!(mode(&state.join("keys")), 0o700, "keys directory");
    assert_eq!(mode(&state.join("state.json")), 0o600, "state.json");
    assert_eq!(
        mode(&state.join("keys/epoch-0000000002.key")),
        0o600,
        "wrapped key file"
    );
    assert_eq!(mode(&audit), 0o600, "audit log");
    assert!(std::fs::read_to_string(&audit)
        .unwrap()
        .contains("\"activated\""));
    let names: Vec<String> = std::fs::read_dir(state.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| n.ends_with(".key")),
        "no temporary file is left behind: {names:?}"
    );
}

/// The last identifier of an operand: `key.fingerprint()` gives `fingerprint`, `tag.len()`
/// gives `len`.
fn operand_name(operand: &str) -> Option<&str> {
    operand
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .rfind(|id| {
            id.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        })
}

/// Whether an identifier names a secret-derived value (and not, say, its length).
fn names_a_secret(id: &str) -> bool {
    let parts: Vec<String> = id.split('_').map(str::to_lowercase).collect();
    let secret = [
        "fingerprint",
        "hash",
        "prev",
        "tag",
        "mac",
        "digest",
        "key",
        "secret",
    ];
    let public = [
        "len", "count", "epoch", "label", "id", "state", "path", "format",
    ];
    parts.iter().any(|p| secret.contains(&p.as_str()))
        && !parts.iter().any(|p| public.contains(&p.as_str()))
}

/// Operands of `==` and `!=` in `src/` (outside unit tests) that name a fingerprint, hash, tag,
/// MAC or key. Key types compare through `ConstantTimeEq`; everything else goes through
/// `cipherbus::ct`.
#[test]
fn secret_derived_values_are_compared_in_constant_time() {
    let operand = |c: char| c.is_ascii_alphanumeric() || "_.()[]&*:".contains(c);
    let mut offenders = Vec::new();
    let mut files = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests compare freely; they hold no one else's secrets.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or_default();
            for op in ["==", "!="] {
                for (at, _) in line.match_indices(op) {
                    let left = line[..at].trim_end();
                    let left = &left
                        [left.len() - left.chars().rev().take_while(|c| operand(*c)).count()..];
                    let right = line[at + 2..].trim_start();
                    let right = &right[..right.chars().take_while(|c| operand(*c)).count()];
                    if [left, right]
                        .iter()
                        .filter_map(|o| operand_name(o))
                        .any(names_a_secret)
                    {
                        offenders.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "use cipherbus::ct::eq for these: {offenders:#?}"
    );
    // The scanner finds what it is meant to find.
    for bad in [
        "if key.fingerprint() != info.fingerprint {",
        "if entry.prev != prev {",
        "if computed_hash == stated {",
    ] {
        let (l, r) = bad
            .split_once(if bad.contains("!=") { "!=" } else { "==" })
            .unwrap();
        assert!(
            [l, r]
                .iter()
                .filter_map(|o| operand_name(o))
                .any(names_a_secret),
            "{bad}"
        );
    }
    assert!(!names_a_secret("tag_len") && !names_a_secret("epoch"));
    // The helper itself: equal, unequal at any byte, and different lengths.
    assert!(cipherbus::ct::eq_str(
        "0123456789abcdef",
        "0123456789abcdef"
    ));
    assert!(!cipherbus::ct::eq_str(
        "0123456789abcdef",
        "0123456789abcdeg"
    ));
    assert!(!cipherbus::ct::eq_str(
        "0123456789abcdef",
        "1123456789abcdef"
    ));
    assert!(!cipherbus::ct::eq(b"abc", b"abcd"));
}

/// Every `path::test` that docs/SECURITY.md names exists, so the review cannot point at a test
/// that was renamed or removed.
#[test]
fn every_test_named_in_the_security_review_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/SECURITY.md")).unwrap();
    let mut named = 0;
    for quoted in doc.split('`').skip(1).step_by(2) {
        let Some((file, name)) = quoted.split_once(".rs::") else {
            continue;
        };
        let text = std::fs::read_to_string(root.join(format!("{file}.rs")))
            .unwrap_or_else(|_| panic!("docs/SECURITY.md names {file}.rs, which does not exist"));
        assert!(
            text.contains(&format!("fn {name}(")),
            "docs/SECURITY.md names {quoted}, which does not exist"
        );
        named += 1;
    }
    assert!(named >= 15, "the review names its tests ({named} found)");
}

/// Runs an operator command with `env` at trace level; it must succeed. Returns its output.
fn operator_with(args: &[&str], env: &[(String, String)]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("CIPHERBUS_LOG", "trace")
        .output()
        .expect("run cipherbus");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cipherbus {args:?} failed: {text}");
    text
}

/// A PKCS#11 root (SoftHSM, PIN in a file) and a Vault root (OpenBao, a token in a file for
/// each process), each with an authority and a proxy at trace level, through keygen, traffic,
/// a rotation and a rewrap: no PIN or token, in any spelling, shows up in any log line, in the
/// CLI's output, or in any process's `/proc/<pid>/cmdline` or `/proc/<pid>/environ`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pin_or_token_in_any_log_line_or_command_line() {
    use crate::support::kms::{Bao, SoftHsm};
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server.url();
    let hsm = SoftHsm::new("cipherbus");
    let bao = Bao::dev();
    bao.enable_transit();
    let policy = r#"
        path "transit/keys/cipherbus" { capabilities = ["read"] }
        path "transit/encrypt/cipherbus" { capabilities = ["update"] }
        path "transit/decrypt/cipherbus" { capabilities = ["update"] }
    "#;
    let proxy_token = bao.create_policy_token("cipherbus-proxy", policy);
    let token_file = |name: &str, token: &str| {
        let path = d.join(name);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.display().to_string()
    };
    let vault_env = |file: String| {
        vec![
            ("VAULT_ADDR".to_owned(), bao.addr.clone()),
            ("VAULT_TOKEN_FILE".to_owned(), file),
        ]
    };
    let admin_env = vault_env(token_file("admin-token", bao.token()));
    let proxy_env = vault_env(token_file("proxy-token", &proxy_token));
    // (name, URI, control prefix, authority's env, proxy's env)
    let deployments = [
        ("hsm", hsm.uri("root"), "hsm.ctl", hsm.env(), hsm.env()),
        (
            "vault",
            "vault-transit:cipherbus".to_owned(),
            "vault.ctl",
            admin_env.clone(),
            proxy_env.clone(),
        ),
    ];
    let mut cli_output = String::new();
    let mut daemons = Vec::new();
    let mut proc_text = String::new();
    for (name, uri, prefix, authority_env, member_env) in &deployments {
        let config = d.join(format!("{name}.toml"));
        std::fs::write(&config, format!("control_prefix = \"{prefix}\"\n{FAST}")).unwrap();
        cli_output += &operator_with(&["keygen", "--kek", uri], authority_env);
        let authority = Daemon::spawn_with(
            &[
                "controller",
                "--config",
                s(&config),
                "--upstream",
                &url,
                "--kek",
                uri,
                "--state-dir",
                s(&d.join(format!("{name}-authority"))),
            ],
            d.join(format!("{name}-authority.log")),
            "trace",
            None,
            authority_env,
        );
        authority.wait_log("key authority running");
        let port = free_port();
        let proxy = Daemon::spawn_with(
            &[
                "run",
                "--config",
                s(&config),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                &url,
                "--kek",
                uri,
                "--state-dir",
                s(&d.join(format!("{name}-proxy"))),
            ],
            d.join(format!("{name}-proxy.log")),
            "trace",
            None,
            member_env,
        );
        wait_listening(port);
        let agent = async_nats::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        let mut sub = agent.subscribe("kms.check").await.unwrap();
        sync(&agent).await;
        assert!(round_trip(&agent, "kms.check", &mut sub).await);
        let bus = ["--upstream", url.as_str(), "--control-prefix", prefix];
        let mut rotate = vec!["rotate", "--kek", uri.as_str()];
        rotate.extend(bus);
        let mut rewrap = vec!["rewrap", "--kek", uri.as_str()];
        rewrap.extend(bus);
        cli_output += &tokio::task::spawn_blocking({
            let env = authority_env.clone();
            let (rotate, rewrap): (Vec<String>, Vec<String>) = (
                rotate.iter().map(|a| a.to_string()).collect(),
                rewrap.iter().map(|a| a.to_string()).collect(),
            );
            move || {
                let rotate: Vec<&str> = rotate.iter().map(String::as_str).collect();
                let rewrap: Vec<&str> = rewrap.iter().map(String::as_str).collect();
                operator_with(&rotate, &env) + &operator_with(&rewrap, &env)
            }
        })
        .await
        .unwrap();
        assert!(round_trip(&agent, "kms.check", &mut sub).await);
        for p in [&authority, &proxy] {
            let pid = p.child.id();
            for what in ["cmdline", "environ"] {
                let bytes = std::fs::read(format!("/proc/{pid}/{what}")).unwrap();
                proc_text += &String::from_utf8_lossy(&bytes);
            }
        }
        daemons.push(authority);
        daemons.push(proxy);
    }
    assert!(proc_text.contains("VAULT_TOKEN_FILE"), "environ was read");
    let mut logs = vec![
        ("cli output".to_owned(), cli_output),
        ("/proc cmdline and environ".to_owned(), proc_text),
    ];
    for mut p in daemons {
        p.stop();
        logs.push((p.log.display().to_string(), p.log()));
    }
    for (name, log) in &logs[2..] {
        assert!(
            log.contains(" TRACE ") && log.contains(" DEBUG "),
            "{name} logged at every level:\n{log}"
        );
    }
    let all: String = logs.iter().map(|(_, l)| l.as_str()).collect();
    assert!(all.contains("rewrapped") || all.contains("wrapped again"));
    let secrets = [
        ("the user PIN", hsm.pin().to_owned()),
        ("the admin token", bao.token().to_owned()),
        ("the proxy's token", proxy_token.clone()),
    ];
    let mut leaks = Vec::new();
    for (name, log) in &logs {
        for (what, secret) in &secrets {
            for form in spellings(secret.as_bytes()) {
                if contains(log.as_bytes(), &form) {
                    leaks.push(format!("{what} in {name}"));
                    break;
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked: {leaks:?}");
}
