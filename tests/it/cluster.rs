//! A three-node NATS cluster on loopback, with proxies that know every node: a killed node's
//! agents recover through another one; a node in lame duck gets no new upstream connections,
//! its agents are told and recover elsewhere when it evicts them; and rotations reach proxies
//! attached to different nodes.

use std::time::Duration;

use crate::support::*;
use cipherbus::envelope::{Header, RootKey};
use futures::StreamExt;

const FAST: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"3s\"\n";

/// The cluster's URLs starting with node `first`: the order a proxy tries them in.
fn from_node(cluster: &NatsCluster, first: usize) -> Vec<String> {
    let urls = cluster.urls();
    (0..urls.len())
        .map(|k| urls[(first + k) % urls.len()].clone())
        .collect()
}

/// Which node holds the upstream connection of the agent called `name`.
fn node_of(cluster: &NatsCluster, name: &str) -> Option<usize> {
    cluster
        .nodes
        .iter()
        .position(|n| n.client_names().iter().any(|c| c == name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_a_proxy_uses_moves_its_agents_to_another_node() {
    let mut cluster = tokio::task::block_in_place(|| NatsCluster::start(3));
    let pa = proxy_upstreams(from_node(&cluster, 0), "", TEST_KEK, None, false).await;
    let pb = proxy_upstreams(from_node(&cluster, 1), "", TEST_KEK, None, false).await;
    let (a, a_events) = watched_agent(&proxy_url(&pa), "agent-a").await;
    let (b, _) = watched_agent(&proxy_url(&pb), "agent-b").await;
    sync(&a).await;
    sync(&b).await;
    assert_eq!(node_of(&cluster, "agent-a"), Some(0));
    assert_eq!(node_of(&cluster, "agent-b"), Some(1));
    let mut at_b = b.subscribe("cluster.to-b").await.unwrap();
    let mut at_a = a.subscribe("cluster.to-a").await.unwrap();
    sync(&b).await;
    assert!(round_trip(&a, "cluster.to-b", &mut at_b).await);

    cluster.nodes[0].kill();
    assert!(
        eventually(Duration::from_secs(15), || {
            a_events.count("disconnected") > 0 && node_of(&cluster, "agent-a").is_some()
        })
        .await,
        "agent A reconnects through its proxy to a surviving node"
    );
    assert_ne!(node_of(&cluster, "agent-a"), Some(0));
    assert!(round_trip(&a, "cluster.to-b", &mut at_b).await, "A → B");
    assert!(
        round_trip(&b, "cluster.to-a", &mut at_a).await,
        "B → A: A's subscription came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_moves_new_upstream_connections_away_and_tells_the_agents() {
    let cluster = tokio::task::block_in_place(|| NatsCluster::start(3));
    let p = proxy_upstreams(from_node(&cluster, 0), "", TEST_KEK, None, false).await;
    let (first, events) = watched_agent(&proxy_url(&p), "before-ldm").await;
    sync(&first).await;
    assert_eq!(node_of(&cluster, "before-ldm"), Some(0));

    tokio::task::block_in_place(|| cluster.nodes[0].lame_duck());
    assert!(
        eventually(Duration::from_secs(10), || events.seen("lame duck")).await,
        "the agent hears of lame duck mode through the proxy: {events:?}"
    );

    // New agents go to another node at once: the draining one is not even tried.
    let failures = metric(&p, "cipherbus_upstream_connect_failures_total");
    let (second, _) = watched_agent(&proxy_url(&p), "after-ldm").await;
    sync(&second).await;
    assert_eq!(node_of(&cluster, "after-ldm"), Some(1));
    assert_eq!(
        metric(&p, "cipherbus_upstream_connect_failures_total"),
        failures,
        "no dial went to the draining node"
    );

    // After its 1 s grace the draining node closes its clients; the first agent reconnects
    // through the proxy and lands on a live node too, and the two still talk.
    assert!(
        eventually(Duration::from_secs(15), || {
            events.count("disconnected") > 0 && node_of(&cluster, "before-ldm") == Some(1)
        })
        .await,
        "the evicted agent comes back through another node: {events:?}"
    );
    assert_eq!(
        metric(&p, "cipherbus_upstream_connect_failures_total"),
        failures
    );
    let mut inbox = second.subscribe("ldm.x").await.unwrap();
    sync(&second).await;
    assert!(round_trip(&first, "ldm.x", &mut inbox).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_reach_proxies_attached_to_different_nodes() {
    let cluster = tokio::task::block_in_place(|| NatsCluster::start(3));
    let state = tempfile::tempdir().unwrap();
    let mut proxies = Vec::new();
    for i in 0..3 {
        let dir = (i == 0).then(|| state.path());
        proxies.push(proxy_upstreams(from_node(&cluster, i), FAST, TEST_KEK, dir, i == 0).await);
    }
    let mut agents = Vec::new();
    for (i, p) in proxies.iter().enumerate() {
        let (client, _) = watched_agent(&proxy_url(p), &format!("agent-{i}")).await;
        sync(&client).await;
        assert_eq!(node_of(&cluster, &format!("agent-{i}")), Some(i));
        agents.push(client);
    }
    let observer = async_nats::connect(cluster.nodes[2].url()).await.unwrap();
    let mut tap = observer.subscribe("spread.>").await.unwrap();
    let mut inboxes = Vec::new();
    for a in &agents[1..] {
        inboxes.push(a.subscribe("spread.x").await.unwrap());
        sync(a).await;
    }
    sync(&observer).await;
    tokio::time::sleep(Duration::from_millis(700)).await; // heartbeats reach the authority

    let root = cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK));
    for want in 2..=3u32 {
        let rotated = cipherbus::control::authority::request_rotation(
            vec![cluster.nodes[1].url()],
            &root,
            "cipherbus.ctl",
            "cluster test",
        )
        .await
        .expect("rotation succeeds");
        assert_eq!(rotated.epoch, want);
        assert_eq!(
            rotated.acked.len(),
            3,
            "every proxy acknowledged: {rotated:?}"
        );
    }
    for p in &proxies {
        assert!(
            eventually(Duration::from_secs(5), || p.keyring.snapshot().active.epoch
                == 3)
            .await
        );
    }
    for inbox in &mut inboxes {
        assert!(round_trip(&agents[0], "spread.x", inbox).await);
    }
    // Drain what the retries left, then one more: sealed under epoch 3 on the wire.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), tap.next()).await {}
    agents[0].publish("spread.x", "last".into()).await.unwrap();
    agents[0].flush().await.unwrap();
    let sealed = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Header::parse(&sealed.payload).unwrap().epoch, 3);
    for inbox in &mut inboxes {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), inbox.next())
                .await
                .unwrap()
                .unwrap();
            if &m.payload[..] == b"last" {
                break;
            }
        }
    }
}

/// The control plane on a three-node JetStream cluster: the authority sits behind node 1, the
/// other proxies behind nodes 2 and 3, and node 2 is killed while a rotation runs. The keyring
/// bucket is replicated, so the rotation completes or is refused whole; the next ones work;
/// every proxy, including the one whose node died, ends with the same key for every epoch;
/// and every message the stream acknowledged opens through another proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_a_rotation_loses_no_key_and_no_message() {
    use async_nats::jetstream::{self, stream};
    let mut cluster = tokio::task::block_in_place(|| NatsCluster::start(3));
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut proxies = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let p = proxy_upstreams(
            from_node(&cluster, i),
            FAST,
            TEST_KEK,
            Some(dir.path()),
            i == 0,
        );
        proxies.push(p.await);
    }
    let (writer, _) = watched_agent(&proxy_url(&proxies[0]), "writer").await;
    let (reader, _) = watched_agent(&proxy_url(&proxies[2]), "reader").await;
    let js = jetstream::new(writer.clone());
    js.create_stream(stream::Config {
        name: "SPREAD".into(),
        subjects: vec!["kept.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();

    // A writer that keeps publishing through the whole test; it records what was acknowledged.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut acked = Vec::new();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let text = format!("m{n}");
                let sent = tokio::time::timeout(Duration::from_secs(5), async {
                    js.publish("kept.x", text.clone().into()).await?.await
                })
                .await;
                if matches!(sent, Ok(Ok(_))) {
                    acked.push(text);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;

    let urls = from_node(&cluster, 0);
    let ask = |urls: Vec<String>| {
        let root = cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK));
        async move {
            let asked = cipherbus::control::authority::request_rotation(
                urls,
                &root,
                "cipherbus.ctl",
                "test",
            );
            tokio::time::timeout(Duration::from_secs(30), asked)
                .await
                .unwrap_or_else(|_| Err("no answer within 30 s".into()))
        }
    };
    let during = tokio::spawn(ask(urls.clone()));
    tokio::time::sleep(Duration::from_millis(30)).await;
    cluster.nodes[1].kill();
    let during = during.await.unwrap();
    // Whole or not at all: a refused rotation names why; a completed one is epoch 2.
    if let Ok(r) = &during {
        assert_eq!(r.epoch, 2, "{during:?}");
    }
    let mut last = during.as_ref().map_or(1, |r| r.epoch);
    for _ in 0..2 {
        let start = std::time::Instant::now();
        let r = loop {
            match ask(urls.clone()).await {
                Ok(r) => break r,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(20), "{e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        assert!(r.epoch > last, "{r:?} after {last}");
        last = r.epoch;
    }
    assert!(
        eventually(Duration::from_secs(15), || proxies.iter().all(|p| p
            .keyring
            .snapshot()
            .active
            .epoch
            == last))
        .await,
        "every proxy reaches epoch {last}, the one whose node died too: {:?}",
        proxies
            .iter()
            .map(|p| p.keyring.snapshot().active.epoch)
            .collect::<Vec<_>>()
    );
    let fingerprints = |p: &cipherbus::server::ProxyHandle| -> Vec<(u32, String)> {
        p.keyring
            .records()
            .into_iter()
            .map(|r| (r.epoch, r.fingerprint))
            .collect()
    };
    for p in &proxies[1..] {
        assert_eq!(
            fingerprints(&proxies[0]),
            fingerprints(p),
            "one key per epoch"
        );
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writing.await.unwrap();
    assert!(acked.len() > 20, "the writer kept going: {}", acked.len());
    // The stream's leader may have been on the dead node: wait until it answers again.
    let started = std::time::Instant::now();
    while jetstream::new(reader.clone())
        .get_stream("SPREAD")
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the stream never answered again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let replayed = replay_stream(&reader, "SPREAD").await;
    for text in &acked {
        assert!(
            replayed.contains(text),
            "{text} was acknowledged but does not open through another proxy"
        );
    }
}
