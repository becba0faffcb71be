//! Roots in an HSM or a KMS, against the real components: SoftHSM2 through PKCS#11 and
//! OpenBao's Transit engine, each started by the test. The proxies run as the real binary,
//! with `--kek URI`, on a real nats-server with JetStream.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::kms::{
    carries_traffic_rotates_and_opens_history, cipherbus, output, proxy, Bao, RootUnderTest,
    SoftHsm,
};
use crate::support::*;
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");

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

/// The policy a proxy's own Vault token holds: read its key's metadata (for the start's
/// check), encrypt and decrypt with it, nothing else.
const PROXY_POLICY: &str = r#"
path "transit/keys/cipherbus" { capabilities = ["read"] }
path "transit/encrypt/cipherbus" { capabilities = ["update"] }
path "transit/decrypt/cipherbus" { capabilities = ["update"] }
"#;

/// A Vault root for one process: the shared address, a token of its own in a file.
fn vault_root(bao: &Bao, dir: &Path, token: &str) -> RootUnderTest {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    RootUnderTest {
        uri: "vault-transit:cipherbus".into(),
        env: vec![
            ("VAULT_ADDR".into(), bao.addr.clone()),
            ("VAULT_TOKEN_FILE".into(), file.display().to_string()),
        ],
    }
}

/// Publishes `n` numbered messages on `orders.history` and returns them.
async fn publish_orders(client: &async_nats::Client, tag: &str, n: usize) -> Vec<String> {
    let mut sent = Vec::new();
    for i in 0..n {
        let body = format!("order {tag} {i}");
        client
            .publish("orders.history", body.clone().into())
            .await
            .unwrap();
        sent.push(body);
    }
    client.flush().await.unwrap();
    sent
}

async fn create_orders_stream(server: &NatsServer) {
    let js = async_nats::jetstream::new(observer(server).await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn history(p: &ProxyProcess) -> Vec<String> {
    let reader = async_nats::connect(p.url()).await.unwrap();
    replay_stream(&reader, "ORDERS")
        .await
        .into_iter()
        .filter(|m| m.starts_with("order "))
        .collect()
}

/// Every wrapped key file in a state directory.
fn key_files(state: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(state.join("keys")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".key") {
            out.push(std::fs::read(e.path()).unwrap());
        }
    }
    out
}

async fn cli(root: &RootUnderTest, args: &[&str]) -> (bool, String) {
    let cmd = cipherbus(root, args);
    let (ok, _, text) = tokio::task::spawn_blocking(move || output(cmd))
        .await
        .unwrap();
    (ok, text)
}

/// After the KMS rotates its key, `rewrap` moves every wrapped data key and the seed to the
/// new version, in the authority's state and in every proxy's; then raising
/// `min_decryption_version` leaves all history readable. Without the rewrap, the same raise
/// stops a restarting proxy. Each process has a token of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_after_a_kms_key_rotation_keeps_history_readable_past_min_decryption_version() {
    let bao = Bao::dev();
    bao.enable_transit();
    let server = NatsServer::start();
    create_orders_stream(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tokens: Vec<String> = (0..3)
        .map(|_| bao.create_policy_token("cipherbus-proxy", PROXY_POLICY))
        .collect();
    assert!(tokens[0] != tokens[1] && tokens[1] != tokens[2]);
    let ra = vault_root(&bao, &d.join("ta"), &tokens[0]);
    let rb = vault_root(&bao, &d.join("tb"), &tokens[1]);
    let operator = vault_root(&bao, &d.join("to"), &tokens[2]);
    let admin = vault_root(&bao, &d.join("root"), bao.token());
    let (ok, text) = cli(&admin, &["keygen", "--kek", &admin.uri]).await;
    assert!(ok, "{text}");

    // The KMS's own audit log names each caller's token accessor.
    let audit_log = bao.audit_log();
    let accessor = |token: &str| {
        let (_, text) = bao.api_as(token, "GET", "/v1/auth/token/lookup-self", None);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["data"]["accessor"].as_str().unwrap().to_owned()
    };
    let (acc_a, acc_b) = (accessor(&tokens[0]), accessor(&tokens[1]));

    let a = proxy(&ra, &server, &d.join("a"), true);
    let mut b = proxy(&rb, &server, &d.join("b"), false);
    let publisher = async_nats::connect(a.url()).await.unwrap();
    let mut sent = publish_orders(&publisher, "e1", 3).await;
    let url = server.url();
    let rotate = [
        "rotate",
        "--kek",
        "vault-transit:cipherbus",
        "--upstream",
        &url,
    ];
    for tag in ["e2", "e3"] {
        let (ok, text) = cli(&operator, &rotate).await;
        assert!(ok, "{text}");
        sent.extend(publish_orders(&publisher, tag, 3).await);
    }
    let v1 = |files: Vec<Vec<u8>>| files.iter().all(|f| contains(f, b"vault:v1:"));
    assert!(v1(key_files(&d.join("b"))) && key_files(&d.join("b")).len() == 2);

    bao.rotate_key("cipherbus");
    // Raised before the rewrap: a proxy that restarts cannot unwrap its seed.
    bao.set_min_decryption_version("cipherbus", 2);
    b.kill();
    let mut cmd = cipherbus(
        &rb,
        &[
            "run",
            "--kek",
            &rb.uri,
            "--upstream",
            &url,
            "--state-dir",
            d.join("b").to_str().unwrap(),
        ],
    );
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()));
    let mut refused = Spawned::spawn(&mut cmd);
    let status = refused.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "{}",
        refused.stderr()
    );
    assert!(
        refused.stderr().contains("disallowed by policy"),
        "{}",
        refused.stderr()
    );
    bao.set_min_decryption_version("cipherbus", 1);
    let b = proxy(&rb, &server, &d.join("b"), false);

    let (ok, text) = cli(
        &operator,
        &[
            "rewrap",
            "--kek",
            "vault-transit:cipherbus",
            "--upstream",
            &url,
        ],
    )
    .await;
    assert!(ok, "{text}");
    assert!(
        text.contains("2 data keys and the deployment seed wrapped again"),
        "{text}"
    );
    let v2 = |files: Vec<Vec<u8>>| {
        !files.is_empty()
            && files
                .iter()
                .all(|f| contains(f, b"vault:v2:") && !contains(f, b"vault:v1:"))
    };
    assert!(v2(key_files(&d.join("a"))), "the authority's state");
    assert!(
        eventually(Duration::from_secs(10), || v2(key_files(&d.join("b")))).await,
        "the proxy's state"
    );

    bao.set_min_decryption_version("cipherbus", 2);
    drop(b);
    let b = proxy(&rb, &server, &d.join("b"), false);
    assert_eq!(history(&b).await, sent);
    // And the deployment goes on rotating under the new version.
    let (ok, text) = cli(&operator, &rotate).await;
    assert!(ok, "{text}");
    assert!(text.contains("epoch 4 is active"), "{text}");

    // Each proxy's calls are its own in the KMS's audit log: the authority wrapped, the proxy
    // unwrapped, each under its own token (each also wraps once at start, in its check).
    let calls: Vec<(String, String)> = std::fs::read_to_string(&audit_log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "request")
        .map(|v| {
            let path = v["request"]["path"].as_str().unwrap_or_default().to_owned();
            let who = v["auth"]["accessor"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (path, who)
        })
        .collect();
    let did = |path: &str, who: &str| calls.iter().any(|(p, w)| p == path && w == who);
    assert!(did("transit/encrypt/cipherbus", &acc_a), "{calls:?}");
    assert!(did("transit/decrypt/cipherbus", &acc_b), "{calls:?}");
    drop(a);
}

/// A deployment on a file root moves to an HSM root without downtime and without losing its
/// stored history: `migrate` makes the file's key the seed, the proxies restart one by one
/// with `--kek` (each still reading what the others seal), then the controller, then
/// `rewrap`; after that the file is gone and everything still opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_root_migrates_to_softhsm_without_losing_history() {
    let server = NatsServer::start();
    create_orders_stream(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kek = d.join("kek");
    let (ok, _, text) = output({
        let mut c = Command::new(BIN);
        c.args(["keygen", "--out", kek.to_str().unwrap()]);
        c
    });
    assert!(ok, "{text}");
    let file_root = RootUnderTest {
        uri: format!("file:{}", kek.display()),
        env: vec![],
    };
    let hsm = SoftHsm::new("cipherbus");
    let hsm_root = softhsm_root(&hsm, "root");
    let url = server.url();

    let mut a = proxy(&file_root, &server, &d.join("a"), true);
    let mut b = proxy(&file_root, &server, &d.join("b"), false);
    let pa = async_nats::connect(a.url()).await.unwrap();
    let mut sent = publish_orders(&pa, "file-e1", 2).await;
    let rotate = |root: &RootUnderTest| {
        let args = [
            "rotate".to_owned(),
            "--kek".to_owned(),
            root.uri.clone(),
            "--upstream".to_owned(),
            url.clone(),
        ];
        let cmd = cipherbus(root, &args.iter().map(String::as_str).collect::<Vec<_>>());
        async move {
            let (ok, _, text) = tokio::task::spawn_blocking(move || output(cmd))
                .await
                .unwrap();
            assert!(ok, "{text}");
        }
    };
    rotate(&file_root).await;
    sent.extend(publish_orders(&pa, "file-e2", 2).await);

    let (ok, text) = cli(&hsm_root, &["keygen", "--kek", &hsm_root.uri]).await;
    assert!(ok, "{text}");
    let mut args = vec!["migrate", "--from-kek-file", kek.to_str().unwrap()];
    args.extend(["--kek", &hsm_root.uri, "--upstream", &url]);
    let (ok, text) = cli(&hsm_root, &args).await;
    assert!(ok, "{text}");
    // A second migration is refused: the deployment has its seed.
    let (ok, text) = cli(&hsm_root, &args).await;
    assert!(!ok && text.contains("has a seed already"), "{text}");

    // The proxy first: on the HSM root, beside an authority still on the file.
    b.kill();
    let b = proxy(&hsm_root, &server, &d.join("b"), false);
    let pb = async_nats::connect(b.url()).await.unwrap();
    let mut from_a = pb.subscribe("orders.live").await.unwrap();
    sync(&pb).await;
    assert!(round_trip(&pa, "orders.live", &mut from_a).await);
    let mut from_b = pa.subscribe("orders.back").await.unwrap();
    sync(&pa).await;
    assert!(round_trip(&pb, "orders.back", &mut from_b).await);
    rotate(&file_root).await;
    sent.extend(publish_orders(&pb, "mixed-e3", 2).await);

    // Then the controller.
    drop(pa);
    a.kill();
    let a = proxy(&hsm_root, &server, &d.join("a"), true);
    rotate(&hsm_root).await;
    let pa = async_nats::connect(a.url()).await.unwrap();
    sent.extend(publish_orders(&pa, "hsm-e4", 2).await);

    let (ok, text) = cli(
        &hsm_root,
        &["rewrap", "--kek", &hsm_root.uri, "--upstream", &url],
    )
    .await;
    assert!(ok, "{text}");
    let all_hsm = |files: Vec<Vec<u8>>| files.len() >= 3 && files.iter().all(|f| f[0] == 0x02);
    assert!(all_hsm(key_files(&d.join("a"))), "the authority's state");
    assert!(
        eventually(Duration::from_secs(10), || all_hsm(key_files(&d.join("b")))).await,
        "the proxy's state"
    );

    // The file root is gone; the whole history still opens, through a restarted proxy.
    std::fs::remove_file(&kek).unwrap();
    drop(pb);
    drop(b);
    let b = proxy(&hsm_root, &server, &d.join("b"), false);
    assert_eq!(history(&b).await, sent);
    drop(a);
}

/// A plain TCP forwarder (`cipherbus forward`) in front of the KMS, for one process's path to
/// it only: killed, that process alone loses its KMS.
fn forwarder(listen: u16, to: &str) -> Spawned {
    let to = to.trim_start_matches("http://").to_owned();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "forward",
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--upstream",
        &to,
    ]);
    let f = Spawned::spawn(&mut cmd);
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "forwarder did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    f
}

/// The KMS goes away while traffic flows. Traffic under keys already unwrapped keeps flowing
/// through a restart of the KMS itself. An authority that cannot reach the KMS refuses to
/// rotate with `kms_unavailable` (counted, logged, audited) and rotates once it is back,
/// without a restart. A proxy that alone cannot reach the KMS does not acknowledge a new key
/// and becomes a laggard; messages under that key are refused there, not opened with anything
/// else; when its KMS is back it catches up by itself and the stream's history opens in full.
/// A proxy that starts while its KMS is away retries for a bounded time, then stops with one
/// sentence. Each process's path to the KMS goes through a forwarder of its own, so one can
/// be cut while the operator's command still reaches the KMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_outage_keeps_traffic_flowing_refuses_rotation_and_catches_up() {
    let mut bao = Bao::raft();
    bao.enable_transit();
    let server = NatsServer::start();
    create_orders_stream(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server.url();
    let root = vault_root(&bao, &d.join("t"), bao.token());
    let (ok, text) = cli(&root, &["keygen", "--kek", &root.uri]).await;
    assert!(ok, "{text}");
    let through = |name: &str, port: u16| {
        let mut r = vault_root(&bao, &d.join(name), bao.token());
        r.env[0].1 = format!("http://127.0.0.1:{port}");
        r
    };
    let (port_a, port_c) = (free_port(), free_port());
    let mut cut_a = forwarder(port_a, &bao.addr);
    let mut cut_c = forwarder(port_c, &bao.addr);
    let a_root = through("ta", port_a);
    let c_root = through("tc", port_c);

    let a = proxy(&a_root, &server, &d.join("a"), true);
    let b = proxy(&root, &server, &d.join("b"), false);
    let c = proxy(&c_root, &server, &d.join("c"), false);
    let pa = async_nats::connect(a.url()).await.unwrap();
    let pb = async_nats::connect(b.url()).await.unwrap();
    let mut at_b = pb.subscribe("orders.live").await.unwrap();
    sync(&pb).await;
    let rotate = [
        "rotate",
        "--kek",
        "vault-transit:cipherbus",
        "--upstream",
        &url,
    ];

    // The KMS itself stops and comes back (raft storage): traffic flows throughout.
    bao.stop();
    assert!(round_trip(&pa, "orders.live", &mut at_b).await);
    bao.restart();
    assert!(round_trip(&pa, "orders.live", &mut at_b).await);

    // The authority's KMS is gone: traffic flows, rotation is refused.
    cut_a.kill();
    let (ok, text) = cli(&root, &rotate).await;
    assert!(!ok, "{text}");
    assert!(text.contains("kms_unavailable"), "{text}");
    assert_eq!(
        a.metric("cipherbus_rotations_refused_total{reason=\"kms_unavailable\"}"),
        Some(1.0)
    );
    assert!(a.stderr().contains("rotation refused (kms_unavailable)"));
    let audit = std::fs::read_to_string(d.join("a/audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"refused\"") && audit.contains("kms_unavailable"),
        "{audit}"
    );
    assert!(round_trip(&pa, "orders.live", &mut at_b).await);

    // A proxy starting without its KMS waits a bounded time, then stops with one sentence.
    let mut cmd = cipherbus(
        &a_root,
        &["run", "--kek", &a_root.uri, "--upstream", &url, "--listen"],
    );
    cmd.arg(format!("127.0.0.1:{}", free_port()));
    let mut late = Spawned::spawn(&mut cmd);
    let status = late.wait_exit(Duration::from_secs(40));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", late.stderr());
    let said = late.stderr();
    let last = said.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("cipherbus: ") && last.contains("is unavailable"),
        "{said}"
    );
    assert!(said.contains("retrying"), "{said}");

    // The authority's KMS is back: rotation works without any restart.
    cut_a = forwarder(port_a, &bao.addr);
    let (ok, text) = cli(&root, &rotate).await;
    assert!(ok, "{text}");
    assert!(text.contains("epoch 2 is active"), "{text}");
    assert!(!text.contains("did not acknowledge"), "{text}");

    // C alone loses its KMS: it does not acknowledge epoch 3 and lags.
    cut_c.kill();
    let (ok, text) = cli(&root, &rotate).await;
    assert!(ok, "{text}");
    assert!(
        text.contains("epoch 3 is active") && text.contains("did not acknowledge in time"),
        "{text}"
    );
    let pc = async_nats::connect(c.url()).await.unwrap();
    let mut at_c = pc.subscribe("orders.history").await.unwrap();
    sync(&pc).await;
    let sent = publish_orders(&pa, "e3", 3).await;
    let early = tokio::time::timeout(Duration::from_millis(1500), at_c.next()).await;
    assert!(
        early.is_err(),
        "C opened a key it never unwrapped: {early:?}"
    );
    assert_eq!(
        c.metric(r#"cipherbus_active_epoch{scope="default"}"#),
        Some(2.0)
    );

    // Its KMS is back: it catches up by itself, and the stream opens in full through it.
    cut_c = forwarder(port_c, &bao.addr);
    assert!(
        eventually(Duration::from_secs(15), || c
            .metric(r#"cipherbus_active_epoch{scope="default"}"#)
            == Some(3.0))
        .await,
        "C did not catch up: {}",
        c.stderr()
    );
    assert_eq!(history(&c).await, sent);
    assert!(c.stderr().contains("kms_unavailable"));
    drop((a, b, cut_a, cut_c));
}

/// Two proxies whose roots are the same AES key imported into two different tokens (two
/// SoftHSM token directories, as two HSMs would be): each unwraps the one deployment seed and
/// every data key, so they read each other's messages, across a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_on_the_same_key_in_two_tokens_read_each_other() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).unwrap();
    let (one, two) = (SoftHsm::new("site-a"), SoftHsm::new("site-b"));
    one.import_aes_key("root", &key);
    two.import_aes_key("root", &key);
    let (r1, r2) = (softhsm_root(&one, "root"), softhsm_root(&two, "root"));
    let a = proxy(&r1, &server, &d.join("a"), true);
    let b = proxy(&r2, &server, &d.join("b"), false);
    let pa = async_nats::connect(a.url()).await.unwrap();
    let pb = async_nats::connect(b.url()).await.unwrap();
    let mut at_b = pb.subscribe("cross.a").await.unwrap();
    let mut at_a = pa.subscribe("cross.b").await.unwrap();
    sync(&pb).await;
    sync(&pa).await;
    assert!(round_trip(&pa, "cross.a", &mut at_b).await);
    assert!(round_trip(&pb, "cross.b", &mut at_a).await);
    let url = server.url();
    let (ok, text) = cli(&r1, &["rotate", "--kek", &r1.uri, "--upstream", &url]).await;
    assert!(ok && text.contains("epoch 2 is active"), "{text}");
    // A seals under epoch 2 now: B opens it only with the key its own token unwrapped.
    assert!(
        eventually(Duration::from_secs(10), || b
            .metric(r#"cipherbus_active_epoch{scope="default"}"#)
            == Some(2.0))
        .await
    );
    assert!(round_trip(&pa, "cross.a", &mut at_b).await);
    assert!(round_trip(&pb, "cross.b", &mut at_a).await);
    // Each token did its own unwraps: the seed, and epoch 2 (the authority wrapped it).
    assert!(
        b.metric("cipherbus_kms_requests_total{op=\"unwrap\",outcome=\"ok\"}")
            .unwrap_or(0.0)
            >= 2.0
    );
    // A third token with another key cannot join: its seed does not unwrap.
    let other = SoftHsm::new("site-c");
    other.create_aes_key("root");
    let r3 = softhsm_root(&other, "root");
    let mut cmd = cipherbus(
        &r3,
        &["run", "--kek", &r3.uri, "--upstream", &url, "--listen"],
    );
    cmd.arg(format!("127.0.0.1:{}", free_port()));
    let mut stranger = Spawned::spawn(&mut cmd);
    let status = stranger.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "{}",
        stranger.stderr()
    );
    assert!(
        stranger.stderr().contains("could not unwrap"),
        "{}",
        stranger.stderr()
    );
}

/// The Vault root's refusals, each one sentence naming the URI (never the token) and exit 2:
/// a token whose policy does not allow decryption, a token Vault does not know, a key of a type
/// that cannot wrap with associated data, and a key that does not exist.
#[test]
fn a_vault_token_without_permission_or_a_wrong_key_stops_the_start_with_one_sentence() {
    let server = NatsServer::start();
    let bao = Bao::dev();
    bao.enable_transit();
    bao.create_key("cipherbus", "aes256-gcm96");
    bao.create_key("signing", "rsa-2048");
    let dir = tempfile::tempdir().unwrap();
    let read_only = bao.create_policy_token(
        "read-only",
        r#"path "transit/keys/cipherbus" { capabilities = ["read"] }
           path "transit/encrypt/cipherbus" { capabilities = ["update"] }"#,
    );
    let unknown = "s.0000000000000000000000";
    let cases = [
        (
            "tr",
            read_only.as_str(),
            "cipherbus",
            "refused the credentials",
        ),
        ("tu", unknown, "cipherbus", "refused the credentials"),
        ("tk", bao.token(), "signing", "not a usable root"),
        ("tm", bao.token(), "absent", "no such key"),
    ];
    for (name, token, key, says) in cases {
        let mut root = vault_root(&bao, &dir.path().join(name), token);
        root.uri = format!("vault-transit:{key}");
        let (ok, code, text) = output(cipherbus(
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
        assert!(!ok && code == Some(2), "{name}: {text}");
        assert!(text.contains(says), "{name}: {text}");
        assert!(text.contains("vault-transit:"), "names the URI: {text}");
        assert!(!text.contains(token), "the token leaked: {text}");
        assert_eq!(text.trim().lines().count(), 1, "one sentence: {text}");
    }
}

/// Epochs of history written under an OpenBao root before the proxy starts.
const HISTORY: u32 = 300;

/// A proxy's start unwraps the deployment seed and the key that seals, not the history: with
/// 300 epochs under an OpenBao root it makes as few Transit calls as with one. A retired
/// key is unwrapped on its first use, once however often it is then used, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openbao_root_starts_without_unwrapping_history_and_unwraps_a_retired_key_on_first_use()
{
    use cipherbus::kek::{vault::VaultKek, Kek, Root};
    use std::sync::Arc;

    let server = NatsServer::start();
    let bao = Bao::dev();
    bao.enable_transit();
    bao.create_key("cipherbus", "aes256-gcm96");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    // The history, written here as a proxy would have kept it: epochs 2 to HISTORY, each
    // wrapped by Transit, HISTORY active.
    let kek: Arc<dyn Kek> = Arc::new(
        VaultKek::new(
            &bao.addr,
            zeroize::Zeroizing::new(bao.token().to_owned()),
            "cipherbus",
            "transit",
            None,
            None,
        )
        .unwrap(),
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    let seed = cipherbus::kek::seed::load_or_create(&client, "cipherbus.ctl", &*kek, true)
        .await
        .unwrap();
    let keys = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let root = Root::from_seed(kek, &seed, "cipherbus.ctl").unwrap();
            let ring = cipherbus::keyring::Keyring::open(root, Some(&state), 4).unwrap();
            let mut keys = vec![ring.snapshot().active.key.clone()];
            for epoch in 2..=HISTORY {
                let key = cipherbus::envelope::DataKey::generate().unwrap();
                keys.push(key.clone());
                ring.stage(epoch, key).unwrap();
                ring.activate(epoch).unwrap();
            }
            keys
        })
        .await
        .unwrap()
    };

    let token = bao.write_token_file(dir.path());
    let root = RootUnderTest {
        uri: "vault-transit:cipherbus".into(),
        env: vec![
            ("VAULT_ADDR".into(), bao.addr.clone()),
            ("VAULT_TOKEN_FILE".into(), token.display().to_string()),
        ],
    };
    let p = proxy(&root, &server, &state, false);
    let unwraps = || {
        p.metric("cipherbus_kms_requests_total{op=\"unwrap\",outcome=\"ok\"}")
            .unwrap_or(0.0)
    };
    let loads = || {
        p.metric("cipherbus_retired_key_loads_total{scope=\"default\"}")
            .unwrap_or(-1.0)
    };
    let at_start = unwraps();
    // The seed, and the active key (checked against its fingerprint, then held).
    assert!(
        at_start <= 3.0,
        "{at_start} Transit unwraps at start for {HISTORY} epochs"
    );
    assert_eq!(loads(), 0.0);

    // Stored history under epoch 17 reaches an agent: one unwrap, then none.
    let agent = async_nats::connect(p.url()).await.unwrap();
    let mut inbox = agent.subscribe("history").await.unwrap();
    sync(&agent).await;
    let mut sealer = cipherbus::envelope::Sealer::new(17, &keys[16]).unwrap();
    for i in 0..3 {
        let mut envelope = bytes::BytesMut::new();
        sealer
            .seal_into(
                Some(b"history"),
                format!("old {i}").as_bytes(),
                &mut envelope,
            )
            .unwrap();
        client.publish("history", envelope.freeze()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), inbox.next())
            .await
            .unwrap_or_else(|_| panic!("not delivered: {}", p.stderr()))
            .unwrap();
        assert_eq!(got.payload, format!("old {i}").as_bytes());
    }
    assert_eq!(unwraps(), at_start + 1.0, "{}", p.stderr());
    assert_eq!(loads(), 1.0);
}
