//! The client matrix: every real client library, unmodified, through two proxies.
//!
//! For each client a program in `tests/clients/<lang>/` runs the same scenarios (see
//! `tests/clients/README.md`): its publishing connection goes through one proxy and its
//! subscribing connection through another, so every payload is sealed by one proxy and opened by
//! the other. Meanwhile a raw observer on the bus records everything the server carries. The
//! test then checks that every scenario passed, that every payload on the client's subjects was
//! an envelope on the bus, that no plaintext marker ever crossed the bus, and that the stored
//! copies in JetStream and KV are envelopes too.

#[path = "../clients/rust/matrix.rs"]
mod rust_matrix;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::clients;
use crate::support::*;
use cipherbus::config::{FileConfig, Overrides};
use cipherbus::envelope::{Header, RootKey, MAGIC};
use cipherbus::server::ProxyHandle;
use cipherbus::tls::AgentTlsMode;
use futures::StreamExt;

/// Every scenario each client runs, by the name it reports.
const SCENARIOS: &[&str] = &[
    "pubsub_0",
    "pubsub_1",
    "pubsub_1k",
    "pubsub_64k",
    "pubsub_max",
    "order",
    "headers_payload",
    "headers_empty",
    "request_reply",
    "no_responders",
    "queue_group",
    "js_publish",
    "js_publish_options",
    "js_dedup",
    "js_pull_fetch_ack",
    "kv_put_get",
    "kv_delete",
    "kv_watch",
];

/// Every client program puts this in each payload of more than a few bytes; it must never be
/// seen on the bus.
const MARKER: &[u8] = b"cbmx";

/// The subject spaces the observer records: the programs' own, KV's, and inboxes (replies,
/// pull fetches, direct gets).
const OBSERVED: &[&str] = &["mx.>", "$KV.>", "_INBOX.>"];

/// How long one client program may run, its start-up included.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(180);

/// What the observer saw: subject and payload of every message on the bus.
type Seen = Arc<Mutex<Vec<(String, bytes::Bytes)>>>;

/// One bus for one client: a server with JetStream, two plain proxies, two proxies whose agent
/// listener requires TLS, and a raw observer subscribed to everything.
struct Bus {
    // Kept so the server lives as long as the bus.
    _server: NatsServer,
    pa: ProxyHandle,
    pb: ProxyHandle,
    ta: ProxyHandle,
    tb: ProxyHandle,
    pki: Pki,
    observer: async_nats::Client,
    seen: Seen,
}

impl Bus {
    async fn start() -> Self {
        let server = NatsServer::start();
        let (pa, pb) = (proxy(&server).await, proxy(&server).await);
        let pki = Pki::new();
        let (ta, tb) = (
            tls_required_proxy(&server, &pki, 1).await,
            tls_required_proxy(&server, &pki, 2).await,
        );
        let observer = observer(&server).await;
        let seen: Seen = Arc::default();
        // Not `>`: a subscription is interest, and interest in every subject would stop the
        // server answering no-responders. The programs keep to these spaces, except for the
        // one subject nobody serves (`CB_NOBODY`).
        for space in OBSERVED {
            let mut all = observer.subscribe(*space).await.unwrap();
            let sink = seen.clone();
            tokio::spawn(async move {
                while let Some(m) = all.next().await {
                    sink.lock()
                        .unwrap()
                        .push((m.subject.to_string(), m.payload));
                }
            });
        }
        settle(&observer, &seen).await;
        Bus {
            _server: server,
            pa,
            pb,
            ta,
            tb,
            pki,
            observer,
            seen,
        }
    }

    /// The environment every client program reads (tests/clients/README.md).
    fn env(&self, lang: &str) -> Vec<(String, String)> {
        let tls = |p: &ProxyHandle| format!("tls://localhost:{}", p.local_addr.port());
        vec![
            ("CB_PUB_URL".into(), proxy_url(&self.pa)),
            ("CB_SUB_URL".into(), proxy_url(&self.pb)),
            ("CB_TLS_PUB_URL".into(), tls(&self.ta)),
            ("CB_TLS_SUB_URL".into(), tls(&self.tb)),
            ("CB_CA".into(), self.pki.ca_file().display().to_string()),
            ("CB_PREFIX".into(), prefix(lang)),
            ("CB_STREAM".into(), stream(lang)),
            ("CB_BUCKET".into(), bucket(lang)),
            ("CB_NOBODY".into(), format!("nobody.{lang}")),
        ]
    }

    /// Checks what crossed the bus and what JetStream stored, for the client `lang`.
    async fn check_the_bus(&self, lang: &str) {
        settle(&self.observer, &self.seen).await;
        let prefix = format!("{}.", prefix(lang));
        let kv = format!("$KV.{}.", bucket(lang));
        let seen = self.seen.lock().unwrap().clone();
        let mut sealed = 0;
        for (subject, payload) in &seen {
            assert!(
                !contains(payload, MARKER),
                "{lang}: plaintext crossed the bus on {subject}"
            );
            let ours = subject.starts_with(&prefix) || subject.starts_with(&kv);
            if ours && !payload.is_empty() {
                assert_envelope(lang, subject, payload);
                sealed += 1;
            }
        }
        assert!(
            sealed >= 20,
            "{lang}: the observer saw only {sealed} envelopes on the client's subjects"
        );

        let js = async_nats::jetstream::new(self.observer.clone());
        for name in [stream(lang), format!("KV_{}", bucket(lang))] {
            let mut s = js
                .get_stream(&name)
                .await
                .unwrap_or_else(|e| panic!("{lang}: the program made no stream {name}: {e}"));
            let last = s.info().await.unwrap().state.last_sequence;
            let mut stored = 0;
            for seq in 1..=last {
                // Deleted sequences (a KV history limit, a purge) are gaps, not failures.
                let Ok(m) = s.get_raw_message(seq).await else {
                    continue;
                };
                assert!(
                    !contains(&m.payload, MARKER),
                    "{lang}: {name} stores plaintext at {seq}"
                );
                if !m.payload.is_empty() {
                    assert_envelope(lang, &format!("{name} seq {seq}"), &m.payload);
                    stored += 1;
                }
            }
            assert!(stored > 0, "{lang}: {name} stores no sealed message");
        }
    }
}

/// Returns once a token the observer publishes has come back on its own subscription: its
/// subscriptions are in force, and everything the server routed before has been recorded.
async fn settle(observer: &async_nats::Client, seen: &Seen) {
    let token = bytes::Bytes::from(observer.new_inbox());
    observer
        .publish("mx.observer.settle", token.clone())
        .await
        .unwrap();
    observer.flush().await.unwrap();
    let back = eventually(Duration::from_secs(10), || {
        seen.lock().unwrap().iter().any(|(_, p)| *p == token)
    })
    .await;
    assert!(back, "the observer's own token did not come back");
}

impl Bus {
    /// No proxy closed a connection of the client's for a protocol fault.
    fn assert_no_protocol_errors(&self, lang: &str) {
        for p in [&self.pa, &self.pb, &self.ta, &self.tb] {
            let text = p.metrics.render();
            let errors: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("cipherbus_protocol_errors_total{"))
                .collect();
            assert!(errors.is_empty(), "{lang}: {errors:?}");
        }
    }
}

fn prefix(lang: &str) -> String {
    format!("mx.{lang}")
}

fn stream(lang: &str) -> String {
    format!("MX_{}", lang.to_uppercase())
}

fn bucket(lang: &str) -> String {
    format!("mx_{lang}")
}

fn assert_envelope(lang: &str, what: &str, payload: &[u8]) {
    assert_eq!(payload[0], MAGIC, "{lang}: {what} is not an envelope");
    assert!(
        Header::parse(payload).is_ok(),
        "{lang}: {what} has a bad envelope header"
    );
}

/// A proxy whose agent listener requires TLS, with a certificate for `localhost` from `pki`.
async fn tls_required_proxy(server: &NatsServer, pki: &Pki, n: u64) -> ProxyHandle {
    init_logs();
    let (cert, key) = pki.issue(&format!("proxy-{n}"), n, false, false);
    let config = FileConfig::default()
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![server.url()],
            kek_file: Some("unused-in-process".into()),
            admin: Some("127.0.0.1:0".into()),
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_mode: Some(AgentTlsMode::Required),
            ..Default::default()
        })
        .expect("TLS proxy config");
    cipherbus::server::start(config, RootKey::from_bytes(TEST_KEK))
        .await
        .expect("TLS proxy starts")
}

/// Parses a client program's report: one `ok <scenario>` or `fail <scenario>: <why>` line per
/// scenario, anything else ignored. Returns the scenarios that passed, and the failures.
fn read_report(stdout: &str) -> (Vec<String>, Vec<String>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("ok ") {
            ok.push(name.trim().to_owned());
        } else if line.starts_with("fail ") {
            failed.push(line.to_owned());
        }
    }
    (ok, failed)
}

/// Checks a report against the scenarios every client must pass, plus `extra`.
fn assert_report(lang: &str, stdout: &str, stderr: &str, extra: &[&str]) {
    let (ok, failed) = read_report(stdout);
    let missing: Vec<&&str> = SCENARIOS
        .iter()
        .chain(extra)
        .filter(|s| !ok.iter().any(|o| o == **s))
        .collect();
    assert!(
        failed.is_empty() && missing.is_empty(),
        "{lang}: failed {failed:#?}, not reported {missing:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

/// Runs a client program with the bus's environment and returns (stdout, stderr).
async fn run_program(bus: &Bus, lang: &str, mut cmd: Command) -> (String, String) {
    cmd.envs(bus.env(lang));
    let child = tokio::task::spawn_blocking(move || {
        let mut child = Spawned::spawn(cmd.stdout(std::process::Stdio::piped()));
        let status = child.wait_exit(PROGRAM_TIMEOUT);
        let stdout = child.stdout();
        (status, stdout, child.stderr())
    });
    let (status, stdout, stderr) = child.await.expect("join the client program");
    assert!(
        status.is_some(),
        "{lang}: the program ran past {PROGRAM_TIMEOUT:?}\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

async fn matrix(lang: &str, cmd: Command, extra: &[&str]) {
    let bus = Bus::start().await;
    let (stdout, stderr) = run_program(&bus, lang, cmd).await;
    assert_report(lang, &stdout, &stderr, extra);
    bus.check_the_bus(lang).await;
    bus.assert_no_protocol_errors(lang);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_nats_passes_every_scenario() {
    let bus = Bus::start().await;
    let env: std::collections::HashMap<String, String> = bus.env("rust").into_iter().collect();
    let report = rust_matrix::run(&env).await;
    assert_report("rust", &report, "", &["tls"]);
    bus.check_the_bus("rust").await;
    bus.assert_no_protocol_errors("rust");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_js_passes_every_scenario() {
    let dir = tokio::task::spawn_blocking(clients::nats_js).await.unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("matrix.mjs")).current_dir(&dir);
    matrix("js", cmd, &["tls"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_passes_every_scenario() {
    let path: PathBuf = tokio::task::spawn_blocking(nats_py_path).await.unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/py/matrix.py"))
        .env("PYTHONPATH", path);
    matrix("py", cmd, &["tls"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_c_passes_every_scenario() {
    let bin = tokio::task::spawn_blocking(clients::nats_c).await.unwrap();
    matrix("c", Command::new(bin), &["tls"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_go_passes_every_scenario() {
    let bin = tokio::task::spawn_blocking(clients::nats_go).await.unwrap();
    matrix("go", Command::new(bin), &["tls"]).await;
}

#[test]
fn a_report_with_a_failure_or_a_missing_scenario_fails() {
    let all: String = SCENARIOS.iter().map(|s| format!("ok {s}\n")).collect();
    assert_report("x", &all, "", &[]);
    let partial: String = SCENARIOS[1..].iter().map(|s| format!("ok {s}\n")).collect();
    assert!(std::panic::catch_unwind(|| assert_report("x", &partial, "", &[])).is_err());
    let failing = format!("{all}fail order: out of order\n");
    assert!(std::panic::catch_unwind(|| assert_report("x", &failing, "", &[])).is_err());
    assert!(std::panic::catch_unwind(|| assert_report("x", &all, "", &["tls"])).is_err());
}
