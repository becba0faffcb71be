//! Keys over time: late joiners and restarted proxies open stored history, retention and
//! revocation crypto-shred epochs everywhere, and a second authority stands by.

use std::path::Path;
use std::time::Duration;

use crate::support::*;
use async_nats::jetstream::{self, stream};
use cipherbus::envelope::RootKey;
use cipherbus::server::ProxyHandle;
use futures::StreamExt;

const PREFIX: &str = "cipherbus.ctl";
const FAST: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"3s\"\n";

async fn rotate(server: &NatsServer) -> u32 {
    let root = cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK));
    let asked =
        cipherbus::control::authority::request_rotation(vec![server.url()], &root, PREFIX, "test");
    tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .expect("an answer within 30 s")
        .expect("rotation succeeds")
        .epoch
}

async fn create_history_stream(p: &ProxyHandle) {
    jetstream::new(agent(p).await)
        .create_stream(stream::Config {
            name: "HIST".into(),
            subjects: vec!["hist.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Stores one message under the active epoch of `p`.
async fn store(p: &ProxyHandle, text: &str) {
    jetstream::new(agent(p).await)
        .publish(format!("hist.{text}"), text.to_owned().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Replays the whole stream through `p` and returns the payloads it delivered.
async fn history(p: &ProxyHandle) -> Vec<String> {
    replay_stream(&agent(p).await, "HIST").await
}

fn key_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("keys"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// An authority (state in `dir_a`) and a proxy (`dir_b`), and one stored message `eN` under each
/// epoch from 1 to `last`.
async fn history_over_rotations(
    server: &NatsServer,
    dir_a: &Path,
    dir_b: &Path,
    last: u32,
) -> (ProxyHandle, ProxyHandle) {
    let pa = proxy_full(server, FAST, TEST_KEK, Some(dir_a), true).await;
    let pb = proxy_full(server, FAST, TEST_KEK, Some(dir_b), false).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    create_history_stream(&pa).await;
    store(&pa, "e1").await;
    for epoch in 2..=last {
        assert_eq!(rotate(server).await, epoch);
        store(&pa, &format!("e{epoch}")).await;
    }
    (pa, pb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_and_restarted_proxies_open_stored_history() {
    let server = NatsServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pa, pb) = history_over_rotations(&server, dir_a.path(), dir_b.path(), 4).await;
    let want: Vec<String> = (1..=4).map(|e| format!("e{e}")).collect();
    assert_eq!(
        history(&pb).await,
        want,
        "a proxy that followed the rotations"
    );

    // A proxy that joins after three rotations syncs the keyring from the authority.
    let late_dir = tempfile::tempdir().unwrap();
    let late = proxy_full(&server, FAST, TEST_KEK, Some(late_dir.path()), false).await;
    assert!(
        eventually(Duration::from_secs(10), || late
            .keyring
            .snapshot()
            .active
            .epoch
            == 4)
        .await
    );
    assert_eq!(
        history(&late).await,
        want,
        "the late joiner opens all of history"
    );
    assert_eq!(
        key_files(late_dir.path()).len(),
        3,
        "epochs 2..4 persisted wrapped"
    );

    // Every proxy restarts, the authority's too; one with a retired-key cache smaller than the
    // number of epochs opens history from its state directory alone.
    drop(pa);
    drop(pb);
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true).await;
    assert_eq!(pa.keyring.snapshot().active.epoch, 4);
    assert_eq!(history(&pa).await, want, "the restarted authority's proxy");
    let restarted = proxy_full(
        &server,
        &format!("{FAST}[keyring]\nretired_cache = 1\n"),
        TEST_KEK,
        Some(dir_b.path()),
        false,
    )
    .await;
    assert_eq!(
        restarted.keyring.snapshot().active.epoch,
        4,
        "state recovered at once"
    );
    assert_eq!(history(&restarted).await, want);
    assert!(restarted.keyring.retired_cached() <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_active_epoch_keeps_traffic_flowing_and_shreds_it_everywhere() {
    let server = NatsServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true).await;
    let pb = proxy_full(&server, FAST, TEST_KEK, Some(dir_b.path()), false).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    create_history_stream(&pa).await;
    let collector = observer(&server).await;
    let mut events = collector
        .subscribe(cipherbus::control::authority::audit_subject(PREFIX))
        .await
        .unwrap();
    sync(&collector).await;
    assert_eq!(rotate(&server).await, 2);
    store(&pa, "under2").await;
    assert!(key_files(dir_b.path()).contains(&"epoch-0000000002.key".to_owned()));

    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let args = [
        "revoke",
        "2",
        "--timeout",
        "20s",
        "--upstream",
        &server.url(),
    ];
    let out = operator_cli(env!("CARGO_BIN_EXE_cipherbus"), &args, &kek).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch 3 is active"));

    for p in [&pa, &pb] {
        assert!(
            eventually(Duration::from_secs(10), || p.keyring.snapshot().state(2)
                == Some(cipherbus::keyring::KeyState::Destroyed))
            .await
        );
        assert_eq!(p.keyring.snapshot().active.epoch, 3);
    }
    for dir in [dir_a.path(), dir_b.path()] {
        assert!(
            !key_files(dir).contains(&"epoch-0000000002.key".to_owned()),
            "the wrapped key is gone from {}",
            dir.display()
        );
    }
    store(&pa, "under3").await;
    assert_eq!(history(&pb).await, vec!["under3".to_owned()]);
    assert_eq!(
        pb.metrics.open_failures_for("destroyed"),
        1,
        "counted, never delivered"
    );
    let audit = std::fs::read_to_string(dir_a.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"event\":\"revoked\""));
    assert!(audit.contains("\"event\":\"destroyed\""));
    // The proxy that refused the read audits it too, in its own log (written off the data
    // path, so it may land a moment later).
    let refused_read = || {
        std::fs::read_to_string(dir_b.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.contains("\"event\":\"refused\"")
                    && l.contains("\"epoch\":2")
                    && l.contains("read refused: epoch 2 is destroyed")
            })
    };
    assert!(
        eventually(Duration::from_secs(5), refused_read).await,
        "proxy B audits the refused read"
    );
    cipherbus::audit::verify(&dir_b.path().join("audit.jsonl"), &test_audit_key()).unwrap();

    // Collectors on the control prefix get the same events, sealed.
    let control_key = cipherbus::envelope::derive_control_key(&RootKey::from_bytes(TEST_KEK));
    let mut opener = cipherbus::envelope::Opener::new();
    let subject = cipherbus::control::authority::audit_subject(PREFIX);
    let mut seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        let msg =
            cipherbus::control::message::open(&mut opener, &control_key, &subject, &m.payload)
                .expect("audit events are sealed under the control key");
        if let cipherbus::control::message::Body::AuditEvent { entry } = msg.body {
            seen.push(entry);
        }
    }
    assert!(
        seen.iter().any(|e| e.contains("\"event\":\"revoked\"")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| e.contains("\"event\":\"activated\"")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_destroys_retired_epochs_on_every_proxy() {
    let server = NatsServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let conf = format!("{FAST}retain_retired = \"1s\"\n");
    let pa = proxy_full(&server, &conf, TEST_KEK, Some(dir_a.path()), true).await;
    let pb = proxy_full(&server, FAST, TEST_KEK, Some(dir_b.path()), false).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    create_history_stream(&pa).await;
    assert_eq!(rotate(&server).await, 2);
    store(&pa, "old").await;
    assert_eq!(rotate(&server).await, 3);
    store(&pa, "new").await;
    for p in [&pa, &pb] {
        assert!(
            eventually(Duration::from_secs(10), || p.keyring.snapshot().state(2)
                == Some(cipherbus::keyring::KeyState::Destroyed))
            .await,
            "retention ended for epoch 2"
        );
    }
    assert!(!key_files(dir_b.path()).contains(&"epoch-0000000002.key".to_owned()));
    assert_eq!(history(&pb).await, vec!["new".to_owned()]);
    assert_eq!(pb.metrics.open_failures_for("destroyed"), 1);
}

/// The authority and every proxy restart at once, and the authority stays down. A brand-new
/// proxy with an empty state directory reads the keyring from the bus's KV bucket, where the
/// authority last wrote it (sealed), and opens new traffic and all stored history within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_proxy_catches_up_from_the_keyring_bucket_with_no_authority_running() {
    let server = NatsServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pa, pb) = history_over_rotations(&server, dir_a.path(), dir_b.path(), 3).await;
    pa.shutdown().await;
    pb.shutdown().await;
    let pb = proxy_full(&server, FAST, TEST_KEK, Some(dir_b.path()), false).await;

    let dir_c = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let pc = proxy_full(&server, FAST, TEST_KEK, Some(dir_c.path()), false).await;
    assert!(
        eventually(Duration::from_secs(2), || pc
            .keyring
            .snapshot()
            .active
            .epoch
            == 3)
        .await,
        "the new proxy has the keyring within 2 s"
    );
    let want: Vec<String> = (1..=3).map(|e| format!("e{e}")).collect();
    assert_eq!(history(&pc).await, want, "all stored history opens");
    let (publisher, receiver) = (agent(&pb).await, agent(&pc).await);
    let mut inbox = receiver.subscribe("fresh.traffic").await.unwrap();
    sync(&receiver).await;
    assert!(round_trip(&publisher, "fresh.traffic", &mut inbox).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "new traffic and history within 2 s: {:?}",
        started.elapsed()
    );
    for reason in ["unknown_epoch", "key_unavailable", "auth"] {
        assert_eq!(pc.metrics.open_failures_for(reason), 0, "{reason}");
    }
}

/// Both keyrings reach `active` as their active epoch, and hold the same epochs with the same
/// key fingerprints: no epoch has two keys.
async fn assert_converge(a: &ProxyHandle, b: &ProxyHandle, active: u32) {
    assert!(
        eventually(Duration::from_secs(5), || {
            a.keyring.snapshot().active.epoch == active
                && b.keyring.snapshot().active.epoch == active
        })
        .await,
        "both reach epoch {active}"
    );
    let fingerprints = |p: &ProxyHandle| -> Vec<(u32, String)> {
        p.keyring
            .records()
            .into_iter()
            .map(|r| (r.epoch, r.fingerprint))
            .collect()
    };
    assert_eq!(fingerprints(a), fingerprints(b), "one key per epoch");
}

/// Two authorities started at the same instant: the lease (created only if absent) goes to
/// one, and only that one writes epochs; across both state directories no epoch has two keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorities_started_at_once_one_writes() {
    let server = NatsServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pa, pb) = tokio::join!(
        proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true),
        proxy_full(&server, FAST, TEST_KEK, Some(dir_b.path()), true),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    for epoch in 2..=3 {
        assert_eq!(rotate(&server).await, epoch);
    }
    let counts = (pa.metrics.rotations.get(), pb.metrics.rotations.get());
    assert!(
        counts == (2, 0) || counts == (0, 2),
        "exactly one writes: {counts:?}"
    );
    assert_converge(&pa, &pb, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_authority_stands_by() {
    let server = NatsServer::start();
    let dir_a = tempfile::tempdir().unwrap();
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir_c = tempfile::tempdir().unwrap();
    let second = proxy_full(&server, FAST, TEST_KEK, Some(dir_c.path()), true).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rotate(&server).await, 2);
    assert_eq!(rotate(&server).await, 3);
    assert_eq!(pa.metrics.rotations.get(), 2);
    assert_eq!(
        second.metrics.rotations.get(),
        0,
        "the second authority never wrote an epoch"
    );
    assert!(
        eventually(Duration::from_secs(5), || second
            .keyring
            .snapshot()
            .active
            .epoch
            == 3)
        .await,
        "it follows the first as a proxy"
    );
    let audit = std::fs::read_to_string(dir_c.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("standing by"), "{audit}");

    // When the first one goes away, the second takes the role over from the current keyring.
    drop(pa);
    // Its lease lapses (2 s at the least) and the standby takes it at its next heartbeat.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(rotate(&server).await, 4);
    assert_eq!(second.metrics.rotations.get(), 1);

    // Only the authority holding the role wrote the audit stream. The second's file, which
    // recorded its standing by, was kept aside when it took over, and its file now continues
    // the stream's chain.
    let key = test_audit_key();
    let client = observer(&server).await;
    let stream = cipherbus::audit::stream::AuditStream::existing(&client, PREFIX)
        .await
        .unwrap();
    let remote =
        cipherbus::audit::verify_lines(&key, "stream", stream.lines().await.unwrap()).unwrap();
    let file = cipherbus::audit::verify(&dir_c.path().join("audit.jsonl"), &key).unwrap();
    assert_eq!(
        cipherbus::audit::compare("file", &file, "stream", &remote),
        None
    );
    assert!(remote
        .lines
        .iter()
        .all(|(_, l, _)| !l.contains("standing by")));
    assert!(
        remote
            .lines
            .iter()
            .any(|(_, l, _)| l.contains("\"event\":\"retired\",\"epoch\":3")),
        "the second's rotation is in the stream"
    );
    let aside: Vec<_> = std::fs::read_dir(dir_c.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".diverged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the standing-by file is kept");
    let kept = std::fs::read_to_string(aside[0].path()).unwrap();
    assert!(kept.contains("standing by"));
}

/// A TCP relay in front of the server that can be cut and restored, to cut one proxy off.
struct Relay {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    target: std::net::SocketAddr,
}

impl Relay {
    fn start(target: std::net::SocketAddr) -> Self {
        let mut relay = Relay {
            port: free_port(),
            task: None,
            target,
        };
        relay.restore();
        relay
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every relayed connection and stops listening.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    fn restore(&mut self) {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                pipes.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_during_rotations_catches_up_when_it_returns() {
    let server = NatsServer::start();
    let dir_a = tempfile::tempdir().unwrap();
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true).await;
    let mut relay = Relay::start(server.addr());
    let dir_c = tempfile::tempdir().unwrap();
    let file: cipherbus::config::FileConfig = toml::from_str(FAST).unwrap();
    let config = file
        .resolve(cipherbus::config::Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![relay.url()],
            kek_file: Some("unused".into()),
            state_dir: Some(dir_c.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap();
    let pc = cipherbus::server::start(config, RootKey::from_bytes(TEST_KEK))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    create_history_stream(&pa).await;
    store(&pa, "e1").await;

    relay.cut();
    for epoch in 2..=3 {
        assert_eq!(
            rotate(&server).await,
            epoch,
            "rotations go on without the cut-off proxy"
        );
        store(&pa, &format!("e{epoch}")).await;
    }
    assert_eq!(
        pc.keyring.snapshot().active.epoch,
        1,
        "it really missed them"
    );

    relay.restore();
    assert!(
        eventually(Duration::from_secs(15), || pc
            .keyring
            .snapshot()
            .active
            .epoch
            == 3)
        .await,
        "it syncs when its control connection comes back"
    );
    let want: Vec<String> = (1..=3).map(|e| format!("e{e}")).collect();
    assert_eq!(history(&pc).await, want, "stored history opens");
    let publisher = agent(&pa).await;
    let subscriber = agent(&pc).await;
    let mut inbox = subscriber.subscribe("after.cut").await.unwrap();
    sync(&subscriber).await;
    publisher
        .publish("after.cut", "new traffic".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"new traffic");
}

#[test]
fn audit_verify_names_the_first_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let kek = write_kek(dir.path(), TEST_KEK);
    let log = cipherbus::audit::AuditLog::open(&path, test_audit_key()).unwrap();
    for epoch in 1..=3 {
        log.append(cipherbus::audit::Event {
            kind: cipherbus::audit::EventKind::Activated,
            epoch: Some(epoch),
            fingerprint: None,
            actor: "test".into(),
            reason: "test".into(),
        })
        .unwrap();
    }
    let verify = |kek: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cipherbus"))
            .args(["audit", "verify"])
            .arg(&path)
            .arg("--kek-file")
            .arg(kek)
            .output()
            .unwrap()
    };
    let ok = verify(&kek);
    assert!(ok.status.success(), "{ok:?}");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains("3 entries, authenticated and chained"),
        "{stdout}"
    );

    // Another deployment's root key: every entry is foreign.
    let other_dir = tempfile::tempdir().unwrap();
    let other = write_kek(other_dir.path(), [0x17; 32]);
    let foreign = verify(&other);
    assert!(!foreign.status.success());
    let stderr = String::from_utf8_lossy(&foreign.stderr);
    assert!(
        stderr.contains("entry 1: written by another deployment"),
        "{stderr}"
    );

    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"epoch\":2", "\"epoch\":7", 1)).unwrap();
    let bad = verify(&kek);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("entry 2: MAC does not match"), "{stderr}");
}

/// An authority cut off from the bus loses the lease to the standby; restored, it finds the
/// lease held and stands by, instead of taking the role back (with hellos alone, the earlier
/// start would win again). No epoch ever has two keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_cut_off_and_restored_does_not_take_the_role_back() {
    init_logs();
    let server = NatsServer::start();
    let mut relay = Relay::start(server.addr());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pb = proxy_upstreams(vec![relay.url()], FAST, TEST_KEK, Some(dir_b.path()), true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(dir_a.path()), true).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(rotate(&server).await, 2);
    assert_eq!(
        pb.metrics.rotations.get(),
        1,
        "the first started holds the role"
    );

    relay.cut();
    // Its lease lapses (2 s at the least) and the standby takes it.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(rotate(&server).await, 3);
    assert_eq!(pa.metrics.rotations.get(), 1, "the standby took over");

    relay.restore();
    assert!(
        eventually(Duration::from_secs(15), || pb
            .keyring
            .snapshot()
            .active
            .epoch
            == 3)
        .await,
        "the restored authority catches up as a proxy"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    for epoch in 4..=5 {
        assert_eq!(rotate(&server).await, epoch);
    }
    assert_eq!(
        (pa.metrics.rotations.get(), pb.metrics.rotations.get()),
        (3, 1),
        "the restored authority stands by"
    );
    assert_converge(&pa, &pb, 5).await;
}

/// Fencing at the server: the lease is taken from under a running authority (a write to the
/// `leader` key it does not know of, as a new holder's takeover is). Its next keyring write is
/// refused by the server, so the rotation it was asked for stops before any proxy is told, and
/// the keyring in the bucket stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_authority_cannot_write_the_keyring() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // A long lease: the authority does not renew (and notice) before it tries to write.
    let slow = format!("{FAST}lease_ttl = \"60s\"\n");
    let p = proxy_full(&server, &slow, TEST_KEK, Some(dir.path()), true).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(rotate(&server).await, 2);

    let bus = observer(&server).await;
    let kv = jetstream::new(bus)
        .get_key_value("CIPHERBUS_CTL_KEYRING")
        .await
        .unwrap();
    let before = kv.entry("keyring").await.unwrap().unwrap();
    kv.put("leader", "another-authority".into()).await.unwrap();

    let root = cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK));
    let asked =
        cipherbus::control::authority::request_rotation(vec![server.url()], &root, PREFIX, "test");
    let refused = tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .expect("an answer within 30 s")
        .expect_err("a deposed authority does not rotate");
    assert!(refused.contains("took the lease"), "{refused}");
    let after = kv.entry("keyring").await.unwrap().unwrap();
    assert_eq!(
        after.revision, before.revision,
        "the keyring was not written"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(p.keyring.snapshot().active.epoch, 2);
    assert_eq!(
        p.keyring.snapshot().state(3),
        None,
        "epoch 3 was never staged"
    );
    assert_eq!(p.metrics.rotations.get(), 1);
}
