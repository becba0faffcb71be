//! Roots in an HSM or a KMS, against the real components: SoftHSM2 through PKCS#11 and
//! OpenBao's Transit engine, each started by the test. The proxies run as the real binary,
//! with `--kek URI`, on a real nats-server with JetStream.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use support::kms::{Bao, SoftHsm};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");

/// Where a test's root lives, and what a process needs in its environment to reach it.
struct RootUnderTest {
    uri: String,
    env: Vec<(String, String)>,
}

/// A `cipherbus` command with the root's environment and nothing inherited that names a KMS.
fn cipherbus(root: &RootUnderTest, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for var in [
        "VAULT_ADDR",
        "VAULT_TOKEN",
        "VAULT_TOKEN_FILE",
        "SOFTHSM2_CONF",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(root.env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn output(mut cmd: Command) -> (bool, Option<i32>, String) {
    let out = cmd.output().expect("run cipherbus");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), out.status.code(), text)
}

/// `cipherbus run` on a free port, with the root, a state directory and a fast rotation config.
fn proxy(
    root: &RootUnderTest,
    server: &NatsServer,
    state: &Path,
    controller: bool,
) -> ProxyProcess {
    let config = state.with_extension("toml");
    std::fs::write(
        &config,
        "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"3s\"\n",
    )
    .unwrap();
    let mut cmd = cipherbus(
        root,
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--kek",
            &root.uri,
            "--upstream",
            &server.url(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    if controller {
        cmd.arg("--controller");
    }
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    ProxyProcess::start(cmd, listen)
}

async fn rotate(root: &RootUnderTest, server: &NatsServer) -> String {
    let cmd = cipherbus(
        root,
        &["rotate", "--kek", &root.uri, "--upstream", &server.url()],
    );
    let (ok, _, text) = tokio::task::spawn_blocking(move || output(cmd))
        .await
        .unwrap();
    assert!(ok, "rotate failed: {text}");
    text
}

/// Traffic from a proxy that hosts the authority to one that does not, both on `root`; a
/// JetStream stream written under epoch 1, then 2 after a rotation, then replayed in full
/// through the second proxy after it restarted (so retired keys come back from its state
/// directory through the root). The bus sees only envelopes.
async fn carries_traffic_rotates_and_opens_history(root: RootUnderTest) {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = proxy(&root, &server, &dir.path().join("a"), true);
    let mut b = proxy(&root, &server, &dir.path().join("b"), false);

    let watcher = observer(&server).await;
    let js = async_nats::jetstream::new(watcher.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut raw = watcher.subscribe("orders.>").await.unwrap();
    let publisher = async_nats::connect(a.url()).await.unwrap();
    let reader = async_nats::connect(b.url()).await.unwrap();
    let mut inbox = reader.subscribe("orders.live").await.unwrap();
    sync(&reader).await;
    sync(&watcher).await;
    assert!(round_trip(&publisher, "orders.live", &mut inbox).await);

    let mut sent = Vec::new();
    for i in 0..3 {
        let body = format!("order {i} under epoch 1");
        publisher
            .publish("orders.history", body.clone().into())
            .await
            .unwrap();
        sent.push(body);
    }
    publisher.flush().await.unwrap();
    let said = rotate(&root, &server).await;
    assert!(said.contains("epoch 2 is active"), "{said}");
    for i in 3..6 {
        let body = format!("order {i} under epoch 2");
        publisher
            .publish("orders.history", body.clone().into())
            .await
            .unwrap();
        sent.push(body);
    }
    publisher.flush().await.unwrap();

    // The bus saw envelopes only, under both epochs.
    let mut epochs = std::collections::BTreeSet::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), raw.next()).await {
        assert_eq!(m.payload.first(), Some(&0xC1), "plaintext on the bus");
        epochs.insert(u32::from_be_bytes(m.payload[4..8].try_into().unwrap()));
        for s in &sent {
            assert!(!contains(&m.payload, s.as_bytes()));
        }
    }
    assert!(epochs.contains(&1) && epochs.contains(&2), "{epochs:?}");

    // B restarted: its keys come back from its state directory, unwrapped by the root.
    drop(reader);
    b.kill();
    let b = proxy(&root, &server, &dir.path().join("b"), false);
    let reader = async_nats::connect(b.url()).await.unwrap();
    let history: Vec<String> = replay_stream(&reader, "ORDERS")
        .await
        .into_iter()
        .filter(|m| m.starts_with("order "))
        .collect();
    assert_eq!(history, sent);

    // The root was used where the design says: the authority wrapped epoch 2, B unwrapped the
    // seed and epoch 2; nothing failed.
    let wraps = a
        .metric("cipherbus_kms_requests_total{op=\"wrap\",outcome=\"ok\"}")
        .unwrap_or(0.0);
    assert!(wraps >= 1.0, "authority wraps: {wraps}");
    let unwraps = b
        .metric("cipherbus_kms_requests_total{op=\"unwrap\",outcome=\"ok\"}")
        .unwrap_or(0.0);
    assert!(unwraps >= 2.0, "proxy unwraps: {unwraps}");
    let text = http_get(b.admin, "/metrics").unwrap();
    assert!(
        text.contains("cipherbus_kms_request_duration_seconds_count"),
        "{text}"
    );
    assert!(!text.contains("outcome=\"unwrap_failed\""), "{text}");
}

fn softhsm_root(hsm: &SoftHsm, object: &str) -> RootUnderTest {
    RootUnderTest {
        uri: hsm.uri(object),
        env: hsm.env(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_softhsm_root_carries_traffic_rotates_and_opens_history() {
    let hsm = SoftHsm::new("cipherbus");
    let root = softhsm_root(&hsm, "root");
    let (ok, _, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(ok, "{text}");
    let objects = hsm.list_objects();
    assert!(
        objects.contains("AES length 32") && objects.contains("never extractable"),
        "{objects}"
    );
    let (ok, code, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(!ok && code == Some(2), "{text}");
    assert!(text.contains("already holds a root key"), "{text}");
    carries_traffic_rotates_and_opens_history(root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openbao_root_carries_traffic_rotates_and_opens_history() {
    let bao = Bao::dev();
    bao.enable_transit();
    let dir = tempfile::tempdir().unwrap();
    let token = bao.write_token_file(dir.path());
    let root = RootUnderTest {
        uri: "vault-transit:cipherbus".into(),
        env: vec![
            ("VAULT_ADDR".into(), bao.addr.clone()),
            ("VAULT_TOKEN_FILE".into(), token.display().to_string()),
        ],
    };
    let (ok, _, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(ok, "{text}");
    let (ok, code, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(!ok && code == Some(2), "{text}");
    carries_traffic_rotates_and_opens_history(root).await;
}

/// A wrong PIN, a missing key, a key that is not AES, and a token that does not exist: each
/// stops `--check-config` and `run` with exit 2 and one sentence naming the URI, never the PIN.
#[test]
fn a_wrong_pin_a_missing_key_or_a_non_aes_key_stops_the_start_with_one_sentence() {
    let server = NatsServer::start();
    let hsm = SoftHsm::new("cipherbus");
    hsm.create_aes_key("root");
    hsm.create_generic_secret("hmac");
    let wrong_pin = hsm.dir.path().join("wrong-pin");
    std::fs::write(&wrong_pin, "000000\n").unwrap();
    let good = hsm.uri("root");
    let cases = [
        (
            good.replace(
                &format!("pin-source=file:{}", hsm.pin_file.display()),
                &format!("pin-source=file:{}", wrong_pin.display()),
            ),
            "refused the credentials",
        ),
        (hsm.uri("absent"), "no such key"),
        (hsm.uri("hmac"), "must be AES-256"),
        (
            good.replace("token=cipherbus", "token=elsewhere"),
            "no token with that label",
        ),
    ];
    for (uri, says) in cases {
        let root = RootUnderTest {
            uri: uri.clone(),
            env: hsm.env(),
        };
        for args in [
            vec!["run", "--check-config"],
            vec!["run", "--controller", "--state-dir"],
        ] {
            let mut args: Vec<String> = args.into_iter().map(String::from).collect();
            if args.last().map(String::as_str) == Some("--state-dir") {
                args.push(hsm.dir.path().join("state").display().to_string());
            }
            args.extend([
                "--kek".into(),
                uri.clone(),
                "--upstream".into(),
                server.url(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, code, text) = output(cipherbus(&root, &args));
            assert!(!ok && code == Some(2), "{args:?}: {text}");
            assert!(text.contains(says), "{args:?}: {text}");
            assert!(text.contains("pkcs11:token="), "names the URI: {text}");
            assert!(!text.contains(hsm.pin()), "the PIN leaked: {text}");
            assert_eq!(text.trim().lines().count(), 1, "one sentence: {text}");
        }
    }
    // The same key, right PIN: usable.
    let root = softhsm_root(&hsm, "root");
    let (ok, _, text) = output(cipherbus(
        &root,
        &[
            "run",
            "--check-config",
            "--kek",
            &root.uri,
            "--upstream",
            &server.url(),
        ],
    ));
    // No process has created the deployment seed yet: the root is usable, the seed absent.
    assert!(ok, "{text}");
    assert!(
        text.contains("answers, wraps and unwraps; no deployment seed yet"),
        "{text}"
    );
}
