//! The key plane with many proxies: hundreds of members, each the real member code on its own
//! NATS connection, in this process, in front of one key authority (a controller process).

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use cipherbus::control::member::{self, MemberConfig};
use cipherbus::envelope::RootKey;
use cipherbus::keyring::Keyring;
use cipherbus::metrics::Metrics;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");
const MEMBERS: usize = 200;

/// 200 members acknowledge a rotation within a stage timeout of 2 s: none is left a laggard,
/// and every one seals with the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_members_acknowledge_a_rotation_within_a_two_second_stage() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let config = write_config(
        dir.path(),
        &kek,
        "[rotation]\nheartbeat_every = \"1s\"\nstage_timeout = \"2s\"\n",
    );
    let (authority, admin) = spawn_controller(BIN, &config, &server, &dir.path().join("authority"));
    assert!(
        eventually(Duration::from_secs(15), || leads(admin)).await,
        "the authority never acted: {}",
        authority.stderr()
    );

    let (stop, stopped) = tokio::sync::watch::channel(());
    let mut keyrings = Vec::new();
    for i in 0..MEMBERS {
        let state = dir.path().join(format!("member-{i:03}"));
        let keyring =
            Arc::new(Keyring::open(RootKey::from_bytes(TEST_KEK), Some(&state), 4).unwrap());
        keyrings.push(keyring.clone());
        let cfg = MemberConfig {
            upstreams: vec![server.url()],
            prefix: "cipherbus.ctl".into(),
            node: format!("proxy-member-{i:03}"),
            heartbeat_every: Duration::from_secs(1),
            tls: Default::default(),
            scope: "default",
        };
        tokio::spawn(member::run(
            keyring,
            Arc::new(Metrics::new()),
            cfg,
            None,
            stopped.clone(),
        ));
    }

    // Every member is known to the authority before the rotation.
    let started = std::time::Instant::now();
    loop {
        let out = operator_cli(
            BIN,
            &["status", "--json", "--upstream", &server.url()],
            &kek,
        )
        .await;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let known = v["proxies"].as_array().map_or(0, |rows| {
            rows.iter()
                .filter(|r| {
                    r["node"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("proxy-member-"))
                })
                .count()
        });
        if known == MEMBERS {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the authority knows {known} of {MEMBERS} members"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let rotated = operator_cli(BIN, &["rotate", "--upstream", &server.url()], &kek).await;
    let text = String::from_utf8_lossy(&rotated.stdout).into_owned();
    assert!(rotated.status.success(), "{rotated:?}");
    let acked = text
        .lines()
        .find(|l| l.starts_with("acknowledged by"))
        .unwrap_or_else(|| panic!("{text}"));
    let missing: Vec<String> = (0..MEMBERS)
        .map(|i| format!("proxy-member-{i:03}"))
        .filter(|n| !acked.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "not acknowledged: {missing:?}\n{text}");
    assert!(!text.contains("did not acknowledge"), "{text}");
    assert!(
        eventually(Duration::from_secs(5), || keyrings.iter().all(|k| k
            .snapshot()
            .active
            .epoch
            == 2))
        .await,
        "every member seals with epoch 2"
    );
    let _ = stop.send(());
}
