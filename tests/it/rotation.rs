//! Live key rotation driven by sealed announcements on the control subject: proxies stage,
//! acknowledge and activate new epochs while traffic flows, lose nothing, and refuse forged,
//! replayed and backwards announcements.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;
use base64::Engine;
use cipherbus::control::member::Subjects;
use cipherbus::control::message::{self, Body, ControlSealer};
use cipherbus::envelope::{self, DataKey, Header, Opener, RootKey};
use cipherbus::server::ProxyHandle;
use futures::StreamExt;

const PREFIX: &str = "cipherbus.ctl";

/// A stand-in key authority speaking the control protocol straight to the server.
struct Authority {
    client: async_nats::Client,
    sealer: ControlSealer,
    root: RootKey,
    subjects: Subjects,
}

impl Authority {
    async fn new(server: &NatsServer, root: [u8; 32], node: &str) -> Self {
        let root = RootKey::from_bytes(root);
        let sealer = ControlSealer::new(node, &envelope::derive_control_key(&root)).unwrap();
        Authority {
            client: observer(server).await,
            sealer,
            root,
            subjects: Subjects::new(PREFIX),
        }
    }

    async fn announce(&mut self, body: Body) -> Vec<u8> {
        let sealed = self.sealer.seal(&self.subjects.announce, body).unwrap();
        self.client
            .publish(self.subjects.announce.clone(), sealed.clone().into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        sealed
    }

    /// Stages `epoch` until `proxies` distinct proxies acknowledge it, then activates it.
    async fn rotate(&mut self, epoch: u32, proxies: usize) {
        let key = DataKey::generate().unwrap();
        let wrapped = envelope::wrap_key(&self.root, epoch, &key).unwrap();
        let stage = Body::Stage {
            epoch,
            wrapped: base64::engine::general_purpose::STANDARD.encode(wrapped),
            fingerprint: key.fingerprint(),
        };
        let mut acks = self
            .client
            .subscribe(self.subjects.ack.clone())
            .await
            .unwrap();
        sync(&self.client).await;
        let control_key = envelope::derive_control_key(&self.root);
        let mut opener = Opener::new();
        let mut acked = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while acked.len() < proxies {
            assert!(
                tokio::time::Instant::now() < deadline,
                "acks for epoch {epoch}: {acked:?}"
            );
            // Re-announced until everyone answers: core NATS delivers at most once.
            self.announce(stage.clone()).await;
            let wait = tokio::time::sleep(Duration::from_millis(200));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    Some(m) = acks.next() => {
                        let msg = message::open(&mut opener, &control_key, &self.subjects.ack, &m.payload).unwrap();
                        if msg.body == (Body::Ack { epoch }) {
                            acked.insert(msg.from);
                        }
                    }
                    _ = &mut wait => break,
                }
            }
        }
        self.announce(Body::Activate { epoch }).await;
    }
}

async fn active_epoch(p: &ProxyHandle, want: u32) -> bool {
    eventually(Duration::from_secs(10), || {
        p.keyring.snapshot().active.epoch == want
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_traffic_lose_nothing_and_the_bus_sees_epochs_advance() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let publisher = agent(&pa).await;
    let subscriber = agent(&pb).await;
    let observer = observer(&server).await;
    let mut inbox = subscriber.subscribe("stream.data").await.unwrap();
    let mut tap = observer.subscribe("stream.data").await.unwrap();
    sync(&subscriber).await;
    sync(&observer).await;

    const TOTAL: u32 = 6000;
    let sending = tokio::spawn(async move {
        for i in 0..TOTAL {
            publisher
                .publish("stream.data", i.to_be_bytes().to_vec().into())
                .await
                .unwrap();
            if i % 100 == 99 {
                publisher.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        publisher.flush().await.unwrap();
    });

    let mut authority = Authority::new(&server, TEST_KEK, "test-authority").await;
    for epoch in 2..=4 {
        authority.rotate(epoch, 2).await;
        assert!(
            active_epoch(&pa, epoch).await,
            "proxy A activates epoch {epoch}"
        );
        assert!(
            active_epoch(&pb, epoch).await,
            "proxy B activates epoch {epoch}"
        );
    }
    sending.await.unwrap();

    for want in 0..TOTAL {
        let m = tokio::time::timeout(Duration::from_secs(10), inbox.next())
            .await
            .unwrap_or_else(|_| panic!("message {want} lost"))
            .unwrap();
        assert_eq!(m.payload[..], want.to_be_bytes(), "in order, nothing lost");
    }
    let mut epochs = BTreeSet::new();
    for _ in 0..TOTAL {
        let m = tokio::time::timeout(Duration::from_secs(10), tap.next())
            .await
            .unwrap()
            .unwrap();
        epochs.insert(Header::parse(&m.payload).unwrap().epoch);
    }
    assert!(
        epochs.len() >= 2,
        "the observer sees the epoch advance: {epochs:?}"
    );
    assert_eq!(pb.metrics.open_failures_for("unknown_epoch"), 0);
    assert_eq!(pb.metrics.open_failures_for("auth"), 0);
    // Per-epoch counts on the sealing side add up to the total, over several epochs.
    let per_epoch: Vec<u64> = (1..=4)
        .map(|epoch| {
            pa.metrics
                .epoch_sealed
                .get_or_create(&cipherbus::metrics::EpochLabel {
                    scope: "default",
                    epoch,
                })
                .get()
        })
        .collect();
    assert_eq!(
        per_epoch.iter().sum::<u64>(),
        u64::from(TOTAL),
        "{per_epoch:?}"
    );
    assert!(
        per_epoch.iter().filter(|n| **n > 0).count() >= 2,
        "{per_epoch:?}"
    );
}

#[tokio::test]
async fn forged_replayed_and_backwards_announcements_are_refused() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let p = proxy_full(&server, "", TEST_KEK, Some(state.path()), false).await;
    let mut authority = Authority::new(&server, TEST_KEK, "test-authority").await;
    authority.rotate(2, 1).await;
    assert!(active_epoch(&p, 2).await);
    let refused = |reason: &'static str| {
        p.metrics
            .control_refused
            .get_or_create(&cipherbus::metrics::ReasonLabel { reason })
            .get()
    };

    // Replaying the genuine ACTIVATE of epoch 2 after epoch 3 is active.
    authority.rotate(3, 1).await;
    assert!(active_epoch(&p, 3).await);
    let old_activate = {
        let body = Body::Activate { epoch: 2 };
        authority.announce(body).await
    };
    assert!(eventually(Duration::from_secs(5), || refused("stale_epoch") >= 1).await);
    authority
        .client
        .publish(authority.subjects.announce.clone(), old_activate.into())
        .await
        .unwrap();
    authority.client.flush().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || refused("replayed") >= 1).await);

    // An authority with another root key.
    let mut forger = Authority::new(&server, [0x13; 32], "forger").await;
    forger.announce(Body::Activate { epoch: 9 }).await;
    forger
        .client
        .publish(forger.subjects.announce.clone(), "plain text".into())
        .await
        .unwrap();
    forger.client.flush().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || refused("forged") >= 1).await);
    assert!(eventually(Duration::from_secs(5), || refused("not_sealed") >= 1).await);
    assert_eq!(
        p.keyring.snapshot().active.epoch,
        3,
        "nothing moved the active epoch"
    );
}

/// Fast heartbeats, so membership and re-announcements settle within a test.
const FAST: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"5s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_command_runs_two_phase_rotations_under_load() {
    let server = NatsServer::start();
    let state_a = tempfile::tempdir().unwrap();
    let pa = proxy_full(&server, FAST, TEST_KEK, Some(state_a.path()), true).await;
    let pb = proxy_with(&server, FAST, TEST_KEK).await;
    let pc = proxy_with(&server, FAST, TEST_KEK).await;
    let publisher = agent(&pa).await;
    let (sub_b, sub_c) = (agent(&pb).await, agent(&pc).await);
    let mut in_b = sub_b.subscribe("load.>").await.unwrap();
    let mut in_c = sub_c.subscribe("load.>").await.unwrap();
    let observer = observer(&server).await;
    let mut tap = observer.subscribe("load.>").await.unwrap();
    sync(&sub_b).await;
    sync(&sub_c).await;
    sync(&observer).await;
    // Let every proxy's heartbeat reach the authority, so all three are expected to ack.
    tokio::time::sleep(Duration::from_millis(700)).await;

    // A sustained stream at a fixed rate of 25k msgs/s, running until the rotations are done.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = stop.clone();
    let sending = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut sent = 0u32;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !stopper.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            for _ in 0..250 {
                publisher
                    .publish("load.x", sent.to_be_bytes().to_vec().into())
                    .await
                    .unwrap();
                sent += 1;
            }
            publisher.flush().await.unwrap();
        }
        (sent, started.elapsed())
    });
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    for want in 2..=6u32 {
        let args = ["rotate", "--timeout", "20s", "--upstream", &server.url()];
        let out = operator_cli(env!("CARGO_BIN_EXE_cipherbus"), &args, &kek).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("epoch {want} is active")),
            "{stdout}"
        );
        assert!(stdout.contains("acknowledged by 3 proxies"), "{stdout}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (total, elapsed) = sending.await.unwrap();
    let rate = f64::from(total) / elapsed.as_secs_f64();
    assert!(rate >= 20_000.0, "the stream ran at {rate:.0} msgs/s");
    for inbox in [&mut in_b, &mut in_c] {
        for want in 0..total {
            let m = tokio::time::timeout(Duration::from_secs(10), inbox.next())
                .await
                .unwrap_or_else(|_| panic!("message {want} of {total} lost"))
                .unwrap();
            assert_eq!(m.payload[..], want.to_be_bytes(), "in order, nothing lost");
        }
    }
    let mut epochs = BTreeSet::new();
    for _ in 0..total {
        let m = tokio::time::timeout(Duration::from_secs(10), tap.next())
            .await
            .unwrap()
            .unwrap();
        epochs.insert(Header::parse(&m.payload).unwrap().epoch);
    }
    assert!(
        epochs.len() >= 3,
        "the observer sees the epoch advance: {epochs:?}"
    );
    for p in [&pa, &pb, &pc] {
        assert!(active_epoch(p, 6).await);
        for reason in cipherbus::metrics::OPEN_FAILURE_REASONS {
            assert_eq!(
                p.metrics.open_failures_for(reason),
                0,
                "open failures: {reason}"
            );
        }
    }
    assert_eq!(pa.metrics.rotations.get(), 5);
    let audit = state_a.path().join("audit.jsonl");
    let verified = cipherbus::audit::verify(&audit, &test_audit_key()).unwrap();
    assert!(
        verified.entries >= 5 * 4,
        "generated, staged, activated, retired per rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_and_usage_trigger_rotations_by_themselves() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let timed = proxy_full(
        &server,
        &format!("{FAST}rotate_every = \"1s\"\n"),
        TEST_KEK,
        Some(state.path()),
        true,
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || timed
            .keyring
            .snapshot()
            .active
            .epoch
            >= 3)
        .await,
        "rotate_every rotates on its own"
    );
    drop(timed);

    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let counted = proxy_full(
        &server,
        &format!("{FAST}max_messages_per_epoch = 100\n"),
        TEST_KEK,
        Some(state.path()),
        true,
    )
    .await;
    let client = agent(&counted).await;
    for i in 0..250u32 {
        client
            .publish("usage.x", i.to_be_bytes().to_vec().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || counted
            .keyring
            .snapshot()
            .active
            .epoch
            >= 2)
        .await,
        "max_messages_per_epoch rotates on its own"
    );
}

#[tokio::test]
async fn rotate_without_an_authority_fails_with_a_sentence() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let args = ["rotate", "--timeout", "3s", "--upstream", &server.url()];
    let out = operator_cli(env!("CARGO_BIN_EXE_cipherbus"), &args, &kek).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no key authority"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_missed_the_announcements_fetches_the_key_and_delivers() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let subscriber = agent(&pb).await;
    let mut inbox = subscriber.subscribe("late.news").await.unwrap();
    sync(&subscriber).await;

    // Epoch 2 exists on proxy A only, as if B had missed both announcements.
    let root = RootKey::from_bytes(TEST_KEK);
    let key = DataKey::generate().unwrap();
    let info = |epoch: u32, state, key: &DataKey| message::EpochInfo {
        epoch,
        state,
        fingerprint: key.fingerprint(),
        created: 0,
        activated: None,
        wrapped: Some(
            base64::engine::general_purpose::STANDARD
                .encode(envelope::wrap_key(&root, epoch, key).unwrap()),
        ),
        sealed_messages: None,
    };
    let epochs = vec![
        info(
            1,
            cipherbus::keyring::KeyState::Retired,
            &envelope::derive_epoch1(&root),
        ),
        info(2, cipherbus::keyring::KeyState::Active, &key),
    ];
    pa.keyring.stage(2, key.clone()).unwrap();
    pa.keyring.activate(2).unwrap();

    // A stand-in authority that only answers keyring syncs.
    let mut authority = Authority::new(&server, TEST_KEK, "sync-only").await;
    let mut syncs = authority
        .client
        .subscribe(cipherbus::control::authority::sync_subject(PREFIX))
        .await
        .unwrap();
    sync(&authority.client).await;
    let answering = tokio::spawn(async move {
        let mut answered = 0;
        while let Some(m) = syncs.next().await {
            let reply = m.reply.unwrap();
            let body = Body::SyncReply {
                epochs: epochs.clone(),
            };
            let sealed = authority.sealer.seal(reply.as_str(), body).unwrap();
            authority
                .client
                .publish(reply, sealed.into())
                .await
                .unwrap();
            authority.client.flush().await.unwrap();
            answered += 1;
        }
        answered
    });

    let publisher = agent(&pa).await;
    publisher
        .publish("late.news", "sealed under epoch 2".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .expect("held and delivered, not dropped")
        .unwrap();
    assert_eq!(&m.payload[..], b"sealed under epoch 2");
    assert_eq!(
        pb.keyring.snapshot().active.epoch,
        2,
        "B synced and activated epoch 2"
    );
    assert_eq!(pb.metrics.open_failures_for("unknown_epoch"), 0);

    // An implausible epoch is refused at once instead of stalling the connection.
    let raw = observer(&server).await;
    let mut sealed = Vec::new();
    {
        let mut tap = raw.subscribe("late.news").await.unwrap();
        sync(&raw).await;
        publisher.publish("late.news", "x".into()).await.unwrap();
        publisher.flush().await.unwrap();
        sealed.extend_from_slice(&tap.next().await.unwrap().payload);
        let _ = inbox.next().await;
    }
    sealed[4..8].copy_from_slice(&1000u32.to_be_bytes());
    raw.publish("late.news", sealed.into()).await.unwrap();
    raw.flush().await.unwrap();
    publisher
        .publish("late.news", "after".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let started = std::time::Instant::now();
    let m = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"after");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "no hold for epoch 1000"
    );
    assert_eq!(pb.metrics.open_failures_for("unknown_epoch"), 1);
    answering.abort();
}

/// The first rotation after an authority starts counts every live proxy: membership is
/// learned from the heartbeats heard while the authority listens before it serves, not from
/// whichever heartbeat happens to be read before the request. Proxies started first beat once
/// before the authority listens (lost) and once while it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_rotation_after_a_start_waits_for_every_live_proxy() {
    const BEAT: &str = "[rotation]\nheartbeat_every = \"1s\"\nstage_timeout = \"5s\"\n";
    let server = NatsServer::start();
    let pb = proxy_with(&server, BEAT, TEST_KEK).await;
    let pc = proxy_with(&server, BEAT, TEST_KEK).await;
    let state = tempfile::tempdir().unwrap();
    let pa = proxy_full(&server, BEAT, TEST_KEK, Some(state.path()), true).await;
    // Asked as soon as the authority listens (until then nothing answers the request): it
    // waits until the authority serves.
    let started = std::time::Instant::now();
    let rotated = loop {
        let r = cipherbus::control::authority::request_rotation(
            vec![server.url()],
            &cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK)),
            PREFIX,
            "right after the start",
        )
        .await;
        match r {
            Err(e)
                if e.contains("no key authority")
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => break r.expect("rotation succeeds"),
        }
    };
    assert_eq!(rotated.epoch, 2);
    assert_eq!(
        (rotated.acked.len(), rotated.laggards.len()),
        (3, 0),
        "every proxy acknowledged before the activation: {rotated:?}"
    );
    for p in [&pa, &pb, &pc] {
        assert_eq!(p.metrics.open_failures_for("unknown_epoch"), 0);
        assert!(active_epoch(p, 2).await);
    }
}

/// A cold start of the authority and three proxies at the default heartbeat (5 s): a rotation
/// asked 1 s later completes within 2 s, acknowledged by every proxy. The authority holds the
/// lease, so it calls the roll instead of listening for two heartbeat intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_one_second_after_a_cold_start_completes_within_two_seconds() {
    let server = NatsServer::start();
    let state = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (pa, pb, pc, pd) = tokio::join!(
        proxy_full(&server, "", TEST_KEK, Some(state.path()), true),
        proxy_with(&server, "", TEST_KEK),
        proxy_with(&server, "", TEST_KEK),
        proxy_with(&server, "", TEST_KEK),
    );
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    let asked = std::time::Instant::now();
    let rotated = cipherbus::control::authority::request_rotation(
        vec![server.url()],
        &cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK)),
        PREFIX,
        "one second after a cold start",
    )
    .await
    .expect("rotation succeeds");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    assert_eq!(
        (rotated.epoch, rotated.acked.len(), rotated.laggards.len()),
        (2, 4, 0),
        "the three proxies and the authority's own: {rotated:?}"
    );
    for p in [&pa, &pb, &pc, &pd] {
        assert!(active_epoch(p, 2).await);
    }
}
