//! Faults with real processes: the upstream dies mid-stream, the proxy crashes and comes back,
//! the state directory is damaged, full or read-only, and a thousand agents share one proxy.
//! The proxy runs as a `cipherbus run` child process wherever what is checked belongs to a
//! process: its file descriptors, its memory, its exit code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use async_nats::jetstream::{self, stream};
use base64::Engine;
use cipherbus::control::member::Subjects;
use cipherbus::control::message::{Body, ControlSealer};
use cipherbus::envelope::{DataKey, Header, RootKey};
use cipherbus::keyring::{KeyState, Keyring};
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");
const FAST: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"2s\"\n";

fn local_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Reads a metric of a proxy process off the test's runtime.
async fn metric_of(p: &ProxyProcess, series: &str) -> Option<f64> {
    tokio::task::block_in_place(|| p.metric(series))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_death_mid_stream_reconnects_agents_loses_no_acked_message_and_leaks_nothing() {
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let proxy = ProxyProcess::start(run_command(BIN, &kek, &[server.url()], None), local_addr());
    // The baseline: the proxy idle with its control connection up and no agent.
    let (probe, _) = watched_agent(&proxy.url(), "probe").await;
    sync(&probe).await;
    drop(probe);
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric("cipherbus_connections")
            == Some(0.0))
        .await
    );
    let fds_before = proxy.fds();
    let tasks_before = metric_of(&proxy, "cipherbus_runtime_tasks").await.unwrap();
    assert!(fds_before > 0 && tasks_before > 0.0);

    let (publisher, pub_events) = watched_agent(&proxy.url(), "publisher").await;
    let (subscriber, sub_events) = watched_agent(&proxy.url(), "subscriber").await;
    jetstream::new(publisher.clone())
        .create_stream(stream::Config {
            name: "FAULTS".into(),
            subjects: vec!["faults.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut inbox = subscriber.subscribe("core.x").await.unwrap();
    sync(&subscriber).await;
    assert!(round_trip(&publisher, "core.x", &mut inbox).await);

    // Publish with acks, without pause, while the server is killed and restarted.
    let acked = Arc::new(Mutex::new(Vec::<u32>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let js = jetstream::new(publisher.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let ack = async {
                    js.publish(format!("faults.{n}"), format!("m{n}").into())
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())
                };
                let result = tokio::time::timeout(Duration::from_secs(3), ack).await;
                match result {
                    Ok(Ok(_)) => acked.lock().unwrap().push(n),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    };
    let acked_count = || acked.lock().unwrap().len();
    assert!(eventually(Duration::from_secs(20), || acked_count() >= 200).await);

    server.kill();
    assert!(
        eventually(Duration::from_secs(10), || pub_events.count("disconnected")
            >= 1
            && sub_events.count("disconnected") >= 1)
        .await,
        "agents see a normal disconnect"
    );
    let acked_before_restart = acked_count();
    tokio::task::block_in_place(|| server.restart());
    assert!(
        eventually(Duration::from_secs(20), || acked_count()
            >= acked_before_restart + 200)
        .await,
        "publishing resumes through the proxy after the server restarts"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sending.await.unwrap();
    assert!(pub_events.count("connected") >= 2 && sub_events.count("connected") >= 2);
    assert!(
        round_trip(&publisher, "core.x", &mut inbox).await,
        "the subscription came back through the proxy"
    );

    // Every acknowledged message is in the stream, and opens.
    let stored: BTreeSet<String> = replay_stream(&subscriber, "FAULTS")
        .await
        .into_iter()
        .collect();
    let lost: Vec<u32> = acked
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|n| !stored.contains(&format!("m{n}")))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");

    // Nothing crashed, and once the agents leave, nothing of them remains.
    let mut proxy = proxy;
    assert!(proxy.wait_exit(Duration::ZERO).is_none(), "the proxy runs");
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
    drop((publisher, subscriber, inbox));
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric("cipherbus_connections")
            == Some(0.0))
        .await
    );
    let settled = eventually(Duration::from_secs(15), || {
        proxy.fds() <= fds_before
            && proxy
                .metric("cipherbus_runtime_tasks")
                .is_some_and(|t| t <= tasks_before)
    })
    .await;
    assert!(
        settled,
        "file descriptors {} (before {fds_before}), tasks {:?} (before {tasks_before})",
        proxy.fds(),
        proxy.metric("cipherbus_runtime_tasks")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_proxy_comes_back_with_its_keys_and_takes_its_agents_back() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let state = dir.path().join("state");
    let listen = local_addr();
    let command = || {
        let mut cmd = run_command(BIN, &kek, &[server.url()], Some(&state));
        cmd.arg("--controller");
        cmd
    };
    let mut proxy = ProxyProcess::start(command(), listen);
    let (agent, events) = watched_agent(&proxy.url(), "survivor").await;
    let js = jetstream::new(agent.clone());
    js.create_stream(stream::Config {
        name: "HIST".into(),
        subjects: vec!["hist.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Authority startup listens for a rival for two heartbeats (10 s by default) first.
    let rotate = || async {
        let args = ["rotate", "--timeout", "30s", "--upstream", &server.url()];
        let out = operator_cli(BIN, &args, &kek).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for epoch in 1..=3u32 {
        if epoch > 1 {
            rotate().await;
        }
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .metric(r#"cipherbus_active_epoch{scope="default"}"#)
                == Some(f64::from(epoch)))
            .await
        );
        js.publish(format!("hist.{epoch}"), format!("e{epoch}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    proxy.kill();
    assert!(
        eventually(Duration::from_secs(10), || events.count("disconnected")
            >= 1)
        .await
    );
    let proxy = ProxyProcess::start(command(), listen);
    assert_eq!(
        metric_of(&proxy, r#"cipherbus_active_epoch{scope="default"}"#).await,
        Some(3.0),
        "the active epoch comes from the state directory at start"
    );
    assert!(
        eventually(Duration::from_secs(10), || events.count("connected") >= 2).await,
        "the same agent reconnects to the restarted proxy"
    );
    assert_eq!(
        replay_stream(&agent, "HIST").await,
        ["e1", "e2", "e3"],
        "history sealed under every epoch opens after the restart"
    );
    let mut inbox = agent.subscribe("after.restart").await.unwrap();
    sync(&agent).await;
    assert!(round_trip(&agent, "after.restart", &mut inbox).await);
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
}

/// A state directory with epochs 1 and 2 retired and 3 active, as a proxy leaves it; the
/// keys of epochs 2 and 3.
fn three_epochs(dir: &Path) -> [DataKey; 2] {
    let ring = Keyring::open(RootKey::from_bytes(TEST_KEK), Some(dir), 4).unwrap();
    let keys = [DataKey::generate().unwrap(), DataKey::generate().unwrap()];
    for (epoch, key) in (2..=3).zip(keys.iter()) {
        ring.stage(epoch, key.clone()).unwrap();
        ring.activate(epoch).unwrap();
    }
    keys
}

/// A retired key is unwrapped on its first use, not at start: a damaged one does not stop
/// the start. The proxy serves new traffic; the first message under the damaged epoch is
/// refused, the log names the file, and the refusal is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_retired_key_is_refused_on_first_use_naming_the_file_and_audited() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let state = tempfile::tempdir().unwrap();
    let [retired, _] = three_epochs(state.path());
    let damaged = key_path(state.path(), 2);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&damaged, bytes).unwrap();

    let cmd = run_command(BIN, &kek, &[server.url()], Some(state.path()));
    let proxy = ProxyProcess::start(cmd, local_addr());
    let agent = async_nats::connect(proxy.url()).await.unwrap();
    let mut inbox = agent.subscribe("history").await.unwrap();
    sync(&agent).await;
    let mut fresh = agent.subscribe("after.start").await.unwrap();
    sync(&agent).await;
    assert!(
        round_trip(&agent, "after.start", &mut fresh).await,
        "new traffic flows: {}",
        proxy.stderr()
    );

    // A message stored under epoch 2 before, delivered now.
    let mut sealer = cipherbus::envelope::Sealer::new(2, &retired).unwrap();
    let mut envelope = bytes::BytesMut::new();
    sealer
        .seal_into(Some(b"history"), b"from epoch 2", &mut envelope)
        .unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    raw.publish("history", envelope.freeze()).await.unwrap();
    raw.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), inbox.next())
            .await
            .is_err(),
        "nothing is delivered under a damaged key"
    );
    let refused = "cipherbus_open_failures_total{reason=\"key_unavailable\"}";
    assert!(
        eventually(Duration::from_secs(5), || proxy.metric(refused)
            == Some(1.0))
        .await,
        "{}",
        proxy.stderr()
    );
    assert!(
        proxy.stderr().contains(&damaged.display().to_string()),
        "the log names the file: {}",
        proxy.stderr()
    );
    let audit = state.path().join("audit.jsonl");
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains("\"event\":\"refused\"")
            && l.contains("\"epoch\":2")
            && l.contains(&damaged.display().to_string())),
        "audited: {log}"
    );
    cipherbus::audit::verify(&audit, &test_audit_key()).unwrap();
}

fn key_path(state: &Path, epoch: u32) -> PathBuf {
    state.join("keys").join(format!("epoch-{epoch:010}.key"))
}

/// Every file under `dir` (but the audit log) with its bytes, to show nothing was rewritten.
fn snapshot_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != "audit.jsonl") {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_directory_stops_the_start_naming_the_file_and_is_audited() {
    type Damage = fn(&Path) -> PathBuf;
    let cases: [(&str, Damage); 5] = [
        ("truncated active key", |s| {
            let p = key_path(s, 3);
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            p
        }),
        ("corrupted active key", |s| {
            let p = key_path(s, 3);
            let mut bytes = std::fs::read(&p).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x01;
            std::fs::write(&p, bytes).unwrap();
            p
        }),
        ("missing active key", |s| {
            let p = key_path(s, 3);
            std::fs::remove_file(&p).unwrap();
            p
        }),
        ("truncated state", |s| {
            let p = s.join("state.json");
            std::fs::write(&p, b"").unwrap();
            p
        }),
        ("missing state beside key files", |s| {
            let p = s.join("state.json");
            std::fs::remove_file(&p).unwrap();
            p
        }),
    ];
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    for (case, damage) in cases {
        let state = tempfile::tempdir().unwrap();
        three_epochs(state.path());
        let damaged = damage(state.path());
        let files = snapshot_files(state.path());
        let mut cmd = run_command(
            BIN,
            &kek,
            std::slice::from_ref(&nowhere),
            Some(state.path()),
        );
        cmd.args(["--listen", &local_addr().to_string()]);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{case}: {stderr}");
        assert!(
            stderr.contains(&damaged.display().to_string()),
            "{case}: the message names the file: {stderr}"
        );
        assert!(!stderr.contains("listening"), "{case}: {stderr}");
        assert_eq!(
            snapshot_files(state.path()),
            files,
            "{case}: no key or state was written instead"
        );
        let audit = state.path().join("audit.jsonl");
        let log = std::fs::read_to_string(&audit).unwrap_or_default();
        let line = log.lines().last().unwrap_or_default();
        assert!(
            line.contains("\"event\":\"refused\"") && line.contains(&damaged.display().to_string()),
            "{case}: audited: {log}"
        );
        cipherbus::audit::verify(&audit, &test_audit_key()).unwrap();
    }
}

/// The epochs in a state directory's `state.json`.
fn persisted_epochs(state: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(state.join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_full_disk_cannot_hold_is_not_activated_and_says_why() {
    let server = NatsServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true).await;
    let pb = proxy_full(&server, FAST, TEST_KEK, Some(dir_b.path()), false).await;
    // Proxy B's next key file is written through a temporary file that sits on a full disk.
    let tmp = key_path(dir_b.path(), 2).with_extension("tmp");
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await; // heartbeats reach the authority

    let root = cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK));
    let rotated = cipherbus::control::authority::request_rotation(
        vec![server.url()],
        &root,
        "cipherbus.ctl",
        "disk full test",
    )
    .await
    .expect("the rotation completes without the full proxy");
    assert_eq!(rotated.epoch, 2);
    assert_eq!(
        (rotated.acked.len(), rotated.laggards.len()),
        (1, 1),
        "{rotated:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || pa
            .keyring
            .snapshot()
            .active
            .epoch
            == 2)
        .await
    );
    let refused = r#"cipherbus_control_refused_total{reason="persist"}"#;
    assert!(eventually(Duration::from_secs(5), || metric(&pb, refused) >= 4.0).await);
    let snap = pb.keyring.snapshot();
    assert_eq!(
        snap.active.epoch, 1,
        "not activated without its key on disk"
    );
    assert_eq!(snap.state(2), None, "not even staged");
    drop(snap);
    assert_eq!(persisted_epochs(dir_b.path()), [1]);
    let audit = std::fs::read_to_string(dir_b.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("No space left on device") && audit.contains("not applied"),
        "{audit}"
    );
    assert!(
        audit.contains("\"event\":\"refused\",\"epoch\":2"),
        "{audit}"
    );
    let refusals = audit.lines().filter(|l| l.contains("\"refused\"")).count();
    assert!(
        (1..=2).contains(&refusals),
        "the stage and the activation refused once each, not every re-announcement: {audit}"
    );

    // Traffic goes on meanwhile: B seals under epoch 1, which A still opens.
    let (from_b, to_a) = (agent(&pb).await, agent(&pa).await);
    let mut inbox = to_a.subscribe("during.full").await.unwrap();
    sync(&to_a).await;
    assert!(round_trip(&from_b, "during.full", &mut inbox).await);

    // Space comes back: the next re-announcement stages and activates the epoch.
    std::fs::remove_file(&tmp).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || pb
            .keyring
            .snapshot()
            .active
            .epoch
            == 2)
        .await
    );
    assert_eq!(persisted_epochs(dir_b.path()), [1, 2]);
    assert!(key_path(dir_b.path(), 2).exists());
    cipherbus::audit::verify(&dir_b.path().join("audit.jsonl"), &test_audit_key()).unwrap();

    // The authority's own disk is full: it refuses to rotate rather than announce a key it
    // could lose, and says so to the operator and in its audit log.
    std::os::unix::fs::symlink("/dev/full", key_path(dir_a.path(), 3).with_extension("tmp"))
        .unwrap();
    let err = cipherbus::control::authority::request_rotation(
        vec![server.url()],
        &root,
        "cipherbus.ctl",
        "disk full test",
    )
    .await
    .expect_err("no rotation onto a full disk");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(pa.keyring.snapshot().active.epoch, 2);
    // Long enough for B to have applied a commit from the keyring bucket, had there been one.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        pb.keyring.snapshot().state(3),
        None,
        "nothing was announced"
    );
    assert_eq!(persisted_epochs(dir_a.path()), [1, 2]);
    let audit = std::fs::read_to_string(dir_a.path().join("audit.jsonl")).unwrap();
    let last = audit.lines().last().unwrap();
    assert!(
        last.contains("\"event\":\"refused\"") && last.contains("No space left on device"),
        "{last}"
    );
    cipherbus::audit::verify(&dir_a.path().join("audit.jsonl"), &test_audit_key()).unwrap();
}

/// Seals `body` as a key authority would and publishes it on the announce subject.
async fn announce(client: &async_nats::Client, sealer: &mut ControlSealer, body: Body) {
    let subject = Subjects::new("cipherbus.ctl").announce;
    let sealed = sealer.seal(&subject, body).unwrap();
    client.publish(subject, sealed.into()).await.unwrap();
    client.flush().await.unwrap();
}

/// The state `state.json` records for `epoch`.
fn persisted_state(state: &Path, epoch: u64) -> Option<String> {
    let text = std::fs::read_to_string(state.join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["epoch"] == epoch)
        .map(|e| e["state"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_key_whose_activation_cannot_be_persisted_is_not_activated() {
    let server = NatsServer::start_core("");
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_full(&server, "", TEST_KEK, Some(dir.path()), false).await;
    // A stand-in key authority on the bus.
    let root = RootKey::from_bytes(TEST_KEK);
    let bus = observer(&server).await;
    let mut sealer =
        ControlSealer::new("stand-in", &cipherbus::envelope::derive_control_key(&root)).unwrap();
    let key = DataKey::generate().unwrap();
    let wrapped = cipherbus::envelope::wrap_key(&root, 2, &key).unwrap();
    let stage = Body::Stage {
        epoch: 2,
        wrapped: base64::engine::general_purpose::STANDARD.encode(wrapped),
        fingerprint: key.fingerprint(),
    };
    let staged = || p.keyring.snapshot().state(2) == Some(KeyState::Staged);
    for _ in 0..50 {
        announce(&bus, &mut sealer, stage.clone()).await;
        if eventually(Duration::from_millis(200), staged).await {
            break;
        }
    }
    assert!(staged());
    assert_eq!(persisted_state(dir.path(), 2).as_deref(), Some("staged"));

    // The disk fills before the activation: state.json cannot be rewritten.
    let tmp = dir.path().join("state.tmp");
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    let refused = r#"cipherbus_control_refused_total{reason="persist"}"#;
    for _ in 0..50 {
        announce(&bus, &mut sealer, Body::Activate { epoch: 2 }).await;
        if eventually(Duration::from_millis(200), || metric(&p, refused) >= 1.0).await {
            break;
        }
    }
    assert!(metric(&p, refused) >= 1.0);
    assert_eq!(
        p.keyring.snapshot().active.epoch,
        1,
        "not activated in memory"
    );
    assert!(staged(), "still staged: it opens, it does not seal");
    assert_eq!(persisted_state(dir.path(), 1).as_deref(), Some("active"));
    assert_eq!(persisted_state(dir.path(), 2).as_deref(), Some("staged"));
    // What the agent publishes meanwhile is sealed under the persisted active epoch.
    let mut tap = bus.subscribe("still.one").await.unwrap();
    sync(&bus).await;
    let agent = agent(&p).await;
    agent.publish("still.one", "m".into()).await.unwrap();
    agent.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Header::parse(&m.payload).unwrap().epoch, 1);

    std::fs::remove_file(&tmp).unwrap();
    for _ in 0..50 {
        announce(&bus, &mut sealer, Body::Activate { epoch: 2 }).await;
        if eventually(Duration::from_millis(200), || {
            p.keyring.snapshot().active.epoch == 2
        })
        .await
        {
            break;
        }
    }
    assert_eq!(p.keyring.snapshot().active.epoch, 2);
    assert_eq!(persisted_state(dir.path(), 2).as_deref(), Some("active"));
}

/// The uid of this process, from /proc (no libc call needed).
fn euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_into_a_read_only_state_directory_is_not_activated_and_says_why() {
    use std::os::unix::process::CommandExt;
    let server = NatsServer::start();
    let dir_a = tempfile::tempdir().unwrap();
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true).await;

    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let state = dir.path().join("state");
    std::fs::write(dir.path().join("proxy.toml"), FAST).unwrap();
    // Permissions do not stop root: run the proxy as an unprivileged user then, owning its
    // files as a deployment would. Its binary is linked (or copied) next to them, since the
    // build directory may not be open to that user.
    let as_root = euid() == 0;
    const NOBODY: u32 = 65534;
    let bin = if as_root {
        let bin = dir.path().join("cipherbus");
        std::fs::hard_link(BIN, &bin)
            .or_else(|_| std::fs::copy(BIN, &bin).map(drop))
            .unwrap();
        std::fs::create_dir(&state).unwrap();
        for p in [dir.path(), &kek, &state, &dir.path().join("proxy.toml")] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        bin
    } else {
        PathBuf::from(BIN)
    };
    let mut cmd = run_command(bin.to_str().unwrap(), &kek, &[server.url()], Some(&state));
    cmd.arg("--config").arg(dir.path().join("proxy.toml"));
    if as_root {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    let proxy = ProxyProcess::start(cmd, local_addr());
    tokio::time::sleep(Duration::from_millis(700)).await; // heartbeats reach the authority
    chmod(&state.join("keys"), 0o500);
    chmod(&state, 0o500);

    let root = cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK));
    let rotated = cipherbus::control::authority::request_rotation(
        vec![server.url()],
        &root,
        "cipherbus.ctl",
        "read-only test",
    )
    .await
    .expect("the rotation completes without the read-only proxy");
    assert_eq!(
        (rotated.epoch, rotated.laggards.len()),
        (2, 1),
        "{rotated:?}"
    );
    let refused = r#"cipherbus_control_refused_total{reason="persist"}"#;
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .metric(refused)
            .is_some_and(|n| n >= 2.0))
        .await,
        "{}",
        proxy.stderr()
    );
    assert_eq!(
        metric_of(&proxy, r#"cipherbus_active_epoch{scope="default"}"#).await,
        Some(1.0),
        "not activated without its key on disk"
    );
    assert_eq!(
        metric_of(
            &proxy,
            r#"cipherbus_epochs{scope="default",state="staged"}"#
        )
        .await,
        Some(0.0)
    );
    // The authority's proxy seals under epoch 2 now. This one holds the key it could not
    // persist, to open only, so what arrives under it is still delivered.
    assert_eq!(pa.keyring.snapshot().active.epoch, 2);
    assert_eq!(
        metric_of(
            &proxy,
            r#"cipherbus_epochs{scope="default",state="unsaved"}"#
        )
        .await,
        Some(1.0)
    );
    let behind_read_only = async_nats::connect(proxy.url()).await.unwrap();
    let mut inbox = behind_read_only
        .subscribe("during.read_only")
        .await
        .unwrap();
    sync(&behind_read_only).await;
    assert!(
        round_trip(&agent(&pa).await, "during.read_only", &mut inbox).await,
        "epoch 2 opens behind the read-only proxy: {}",
        proxy.stderr()
    );
    let stderr = proxy.stderr();
    assert!(
        stderr.contains("Permission denied") && stderr.contains("not applied"),
        "{stderr}"
    );
    let audit = std::fs::read_to_string(state.join("audit.jsonl")).unwrap();
    assert!(audit.contains("Permission denied"), "{audit}");

    chmod(&state, 0o700);
    chmod(&state.join("keys"), 0o700);
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric(r#"cipherbus_active_epoch{scope="default"}"#)
            == Some(2.0))
        .await,
        "writable again: the re-announced epoch is staged and activated"
    );
    assert_eq!(persisted_epochs(&state), [1, 2]);
    assert_eq!(
        metric_of(
            &proxy,
            r#"cipherbus_epochs{scope="default",state="unsaved"}"#
        )
        .await,
        Some(0.0)
    );
    drop(pa);
}

/// Agents in the crowd test; each one subscribes and publishes.
const CROWD: usize = 1000;
/// Messages each agent publishes to the next one.
const PER_AGENT: usize = 50;
/// Resident memory allowed to the proxy with the whole crowd connected and talking. A debug
/// build idles at 10-20 MiB; each session holds a read buffer per direction (32 KiB asked of
/// the allocator, touched only as far as reads fill it) and its small state, so a thousand
/// sessions fit in about 50 MiB. The traffic itself must not grow it.
const CROWD_RSS: u64 = 96 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_agents_through_one_proxy_each_publish_and_subscribe() {
    // Our clients, the proxy's sessions and its upstream connections: three per agent here.
    let limit = raise_fd_limit(4 * CROWD as u64 + 512);
    assert!(
        limit >= 3 * CROWD as u64 + 256,
        "open-files limit {limit} is too low for {CROWD} agents (prlimit could not raise it)"
    );
    let server = NatsServer::start_core("");
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let proxy = ProxyProcess::start(run_command(BIN, &kek, &[server.url()], None), local_addr());
    let url = proxy.url();

    let started = Instant::now();
    let mut agents = Vec::with_capacity(CROWD);
    let mut inboxes = Vec::with_capacity(CROWD);
    for batch in (0..CROWD).collect::<Vec<_>>().chunks(100) {
        let connected = futures::future::join_all(batch.iter().map(|&i| {
            let url = url.clone();
            async move {
                let client = async_nats::ConnectOptions::new()
                    .name(format!("crowd-{i}"))
                    .connect(url)
                    .await
                    .unwrap_or_else(|e| panic!("agent {i} connects: {e}"));
                let inbox = client.subscribe(format!("crowd.{i}")).await.unwrap();
                sync(&client).await;
                (client, inbox)
            }
        }))
        .await;
        for (client, inbox) in connected {
            agents.push(client);
            inboxes.push(inbox);
        }
    }
    let connect_time = started.elapsed();
    assert_eq!(
        metric_of(&proxy, "cipherbus_connections").await,
        Some(CROWD as f64)
    );
    let rss_idle = proxy.rss();

    // Agent i sends to agent i+1; every agent checks it got all of its predecessor's, in order.
    let receivers: Vec<_> = inboxes
        .into_iter()
        .enumerate()
        .map(|(i, mut inbox)| {
            tokio::spawn(async move {
                let from = (i + CROWD - 1) % CROWD;
                for k in 0..PER_AGENT {
                    let m = tokio::time::timeout(Duration::from_secs(60), inbox.next())
                        .await
                        .unwrap_or_else(|_| panic!("agent {i} waits for message {k}"))
                        .unwrap();
                    assert_eq!(m.payload, format!("{from}:{k}").as_bytes(), "agent {i}");
                }
            })
        })
        .collect();
    let senders: Vec<_> = agents
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(async move {
                let to = format!("crowd.{}", (i + 1) % CROWD);
                for k in 0..PER_AGENT {
                    client
                        .publish(to.clone(), format!("{i}:{k}").into())
                        .await
                        .unwrap();
                }
                client.flush().await.unwrap();
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    for r in receivers {
        r.await.unwrap();
    }
    let rss_busy = proxy.rss();
    let sealed = metric_of(&proxy, "cipherbus_messages_sealed_total")
        .await
        .unwrap();
    let opened = metric_of(&proxy, "cipherbus_messages_opened_total")
        .await
        .unwrap();
    assert_eq!(sealed, (CROWD * PER_AGENT) as f64);
    // The sync round trips' no-responder statuses are not sealed payloads; every message is.
    assert_eq!(opened, (CROWD * PER_AGENT) as f64);
    eprintln!(
        "{CROWD} agents: connected in {connect_time:?}, proxy RSS idle {} MiB, after traffic {} MiB, total {:?}",
        rss_idle >> 20,
        rss_busy >> 20,
        started.elapsed()
    );
    assert!(
        rss_idle.max(rss_busy) < CROWD_RSS,
        "proxy memory: {} MiB idle, {} MiB after traffic",
        rss_idle >> 20,
        rss_busy >> 20
    );
    drop(agents);
    assert!(
        eventually(Duration::from_secs(20), || proxy
            .metric("cipherbus_connections")
            == Some(0.0))
        .await
    );
}

/// Two `cipherbus run --controller` processes with the default settings: the one holding the
/// lease is killed (SIGKILL) while an agent streams through the other. The standby leads within
/// 5 s, the next rotation works, and every message of the stream arrives, core and JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_five_seconds_and_the_stream_loses_nothing() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let spawn = |name: &str| {
        let mut cmd = run_command(BIN, &kek, &[server.url()], Some(&dir.path().join(name)));
        cmd.arg("--controller");
        ProxyProcess::start(cmd, local_addr())
    };
    let mut leader = spawn("leader");
    assert!(
        leader
            .wait_log(Duration::from_secs(10), |l| l
                .contains("key authority acting"))
            .is_some(),
        "{}",
        leader.stderr()
    );
    let standby = spawn("standby");
    assert!(
        standby
            .wait_log(Duration::from_secs(10), |l| l.contains("standing by"))
            .is_some(),
        "{}",
        standby.stderr()
    );
    let rotate = || async {
        let args = ["rotate", "--timeout", "20s", "--upstream", &server.url()];
        operator_cli(BIN, &args, &kek).await
    };
    let out = rotate().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (agent, _) = watched_agent(&standby.url(), "streamer").await;
    let js = jetstream::new(agent.clone());
    js.create_stream(stream::Config {
        name: "KEPT".into(),
        subjects: vec!["kept.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut live = agent.subscribe("live.x").await.unwrap();
    sync(&agent).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = tokio::spawn({
        let (stop, agent, js) = (stop.clone(), agent.clone(), js.clone());
        async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                agent.publish("live.x", n.to_string().into()).await.unwrap();
                js.publish("kept.x", n.to_string().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    leader.kill();
    let killed = Instant::now();
    let took = standby.wait_log(Duration::from_secs(5), |l| {
        l.contains("key authority acting")
    });
    let after = killed.elapsed();
    assert!(
        took.is_some(),
        "the standby did not lead within 5 s: {}",
        standby.stderr()
    );
    eprintln!("the standby led {after:?} after the leader was killed");
    let out = rotate().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || standby
            .metric(r#"cipherbus_active_epoch{scope="default"}"#)
            == Some(3.0))
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = writing.await.unwrap();
    sync(&agent).await;

    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), live.next()).await {
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
        if got.len() == sent as usize {
            break;
        }
    }
    let expected: Vec<String> = (1..=sent).map(|n| n.to_string()).collect();
    assert_eq!(got, expected, "every core message, in order");
    assert_eq!(
        replay_stream(&agent, "KEPT").await,
        expected,
        "every stored message opens"
    );
}

/// An authority needs JetStream for its lease and keyring: against a bus without it,
/// `cipherbus controller` stops at once with one sentence and exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_on_a_bus_without_jetstream_stops_with_one_sentence() {
    let server = NatsServer::start_core("");
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let state = dir.path().join("state");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["controller", "--upstream", &server.url(), "--kek-file"])
        .arg(&kek)
        .arg("--state-dir")
        .arg(&state)
        .stdout(std::process::Stdio::null());
    let mut p = Spawned::spawn(&mut cmd);
    let status = p
        .wait_exit(Duration::from_secs(15))
        .expect("it stops by itself");
    assert_eq!(status.code(), Some(2), "{}", p.stderr());
    let last = p.stderr().lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("cipherbus: ") && last.contains("needs JetStream") && last.contains("-js"),
        "{}",
        p.stderr()
    );
}
