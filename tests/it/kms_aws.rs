//! The `aws-kms:` root against moto, an AWS KMS emulator, not AWS itself: moto's server speaks
//! KMS's JSON API on a loopback port, and the proxies reach it through `AWS_ENDPOINT_URL_KMS`
//! with signed requests, as they would reach AWS. moto checks no signature or credential, and
//! a few of its errors differ from KMS's (see `crate::support::kms::Moto`), so what these tests show
//! is the client's side: configuration, the requests, the encryption context, the answers'
//! handling, and the secrets kept out of logs. The proxies run as the real binary, with
//! `--kek aws-kms:KEY`, on a real nats-server with JetStream.

use std::time::{Duration, Instant};

use crate::support::kms::{
    carries_traffic_rotates_and_opens_history, cipherbus, output, rotate, run_args, Moto,
    RootUnderTest,
};
use crate::support::*;

/// A root on moto's key `key`, with moto's environment plus `extra` (which wins).
fn moto_root(moto: &Moto, key: &str, extra: &[(&str, &str)]) -> RootUnderTest {
    let mut env = moto.env();
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    RootUnderTest {
        uri: format!("aws-kms:{key}"),
        env,
    }
}

/// moto, an AWS KMS emulator, not AWS itself: `keygen --kek aws-kms:alias/cipherbus` creates
/// a symmetric encryption key and names it (a second keygen exits 2); then a controller proxy
/// and a member proxy on that root carry traffic, rotate and open history after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_root_made_by_keygen_carries_traffic_rotates_and_opens_history() {
    let moto = Moto::start();
    let root = moto_root(&moto, "alias/cipherbus", &[]);
    assert!(moto.describe_key("alias/cipherbus").is_none());
    let (ok, _, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(ok, "{text}");
    assert!(
        text.contains("created the root key aws-kms:alias/cipherbus (aws-kms)"),
        "{text}"
    );
    let meta = moto
        .describe_key("alias/cipherbus")
        .expect("keygen made the alias");
    assert_eq!(meta["KeySpec"], "SYMMETRIC_DEFAULT", "{meta}");
    assert_eq!(meta["KeyUsage"], "ENCRYPT_DECRYPT", "{meta}");
    assert_eq!(meta["KeyState"], "Enabled", "{meta}");
    assert_eq!(meta["Description"], "cipherbus root", "{meta}");

    let (ok, code, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(!ok && code == Some(2), "{text}");
    assert!(text.contains("already holds a root key"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one sentence: {text}");
    // A key id cannot be created, only an alias.
    let id = meta["KeyId"].as_str().unwrap().to_owned();
    let by_id = moto_root(&moto, &id, &[]);
    let (ok, code, text) = output(cipherbus(&by_id, &["keygen", "--kek", &by_id.uri]));
    assert!(!ok && code == Some(2), "{text}");
    assert!(
        text.contains("name an alias/NAME to create a key"),
        "{text}"
    );

    carries_traffic_rotates_and_opens_history(root).await;
}

/// moto, an AWS KMS emulator, not AWS itself: a key of the wrong kind (RSA, HMAC), a disabled
/// key, a missing alias, and no credentials or no region each stop `--check-config` and `run`
/// with exit 2 and one sentence naming the URI, never the secret key. The key id, its ARN and
/// credentials from a profile in the shared files all reach a usable key.
#[test]
fn a_wrong_disabled_or_missing_key_stops_the_start_with_one_sentence() {
    let server = NatsServer::start();
    let moto = Moto::start();
    let rsa = moto.create_key("RSA_2048", "SIGN_VERIFY");
    moto.create_alias("alias/rsa", &rsa);
    let hmac = moto.create_key("HMAC_256", "GENERATE_VERIFY_MAC");
    moto.create_alias("alias/hmac", &hmac);
    let disabled = moto.create_key("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT");
    moto.create_alias("alias/disabled", &disabled);
    moto.disable_key(&disabled);
    let good = moto.create_key("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT");
    moto.create_alias("alias/good", &good);
    let dir = tempfile::tempdir().unwrap();
    let secret = "SECRETkey-for-check-config-0123456789";

    let cases: Vec<(RootUnderTest, &str)> = vec![
        (moto_root(&moto, "alias/rsa", &[]), "is of KeySpec RSA_2048"),
        (moto_root(&moto, &rsa, &[]), "is of KeySpec RSA_2048"),
        (
            moto_root(&moto, "alias/hmac", &[]),
            "is of KeySpec HMAC_256",
        ),
        (moto_root(&moto, "alias/disabled", &[]), "is Disabled"),
        (moto_root(&moto, "alias/absent", &[]), "no such key"),
        (
            moto_root(
                &moto,
                "alias/good",
                &[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")],
            ),
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        (
            moto_root(
                &moto,
                "alias/good",
                &[("AWS_REGION", ""), ("AWS_SECRET_ACCESS_KEY", secret)],
            ),
            "no AWS region: set AWS_REGION",
        ),
        (
            moto_root(
                &moto,
                "arn:aws:kms:eu-west-1:123456789012:alias/good",
                &[("AWS_SECRET_ACCESS_KEY", secret)],
            ),
            "set AWS_REGION to eu-west-1",
        ),
    ];
    for (root, says) in &cases {
        for args in [
            vec!["run", "--check-config"],
            vec!["run", "--controller", "--state-dir"],
        ] {
            let mut args: Vec<String> = args.into_iter().map(String::from).collect();
            if args.last().map(String::as_str) == Some("--state-dir") {
                args.push(dir.path().join("state").display().to_string());
                args.extend(["--listen".into(), format!("127.0.0.1:{}", free_port())]);
            }
            args.extend([
                "--kek".into(),
                root.uri.clone(),
                "--upstream".into(),
                server.url(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, code, text) = output(cipherbus(root, &args));
            assert!(!ok && code == Some(2), "{args:?}: {text}");
            assert!(text.contains(says), "{args:?}: {text}");
            assert!(text.contains(&root.uri), "names the URI: {text}");
            assert!(!text.contains(secret), "the secret key leaked: {text}");
            assert_eq!(text.trim().lines().count(), 1, "one sentence: {text}");
        }
    }

    // Usable: by alias, key id and key ARN from the environment, and by alias with the region
    // and credentials of a profile in the shared files.
    let arn = moto.describe_key(&good).unwrap()["Arn"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(
        dir.path().join("config"),
        "[default]\nregion = eu-west-1\n[profile cb]\nregion = us-east-1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("credentials"),
        format!("[cb]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    let config = dir.path().join("config").display().to_string();
    let credentials = dir.path().join("credentials").display().to_string();
    let usable = [
        moto_root(&moto, "alias/good", &[]),
        moto_root(&moto, &good, &[]),
        moto_root(&moto, &arn, &[]),
        moto_root(
            &moto,
            "alias/good",
            &[
                ("AWS_ACCESS_KEY_ID", ""),
                ("AWS_SECRET_ACCESS_KEY", ""),
                ("AWS_REGION", ""),
                ("AWS_PROFILE", "cb"),
                ("AWS_CONFIG_FILE", &config),
                ("AWS_SHARED_CREDENTIALS_FILE", &credentials),
            ],
        ),
    ];
    for root in &usable {
        let (ok, _, text) = output(cipherbus(
            root,
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
        assert!(ok, "{}: {text}", root.uri);
        assert!(
            text.contains("answers, wraps and unwraps; no deployment seed yet"),
            "{text}"
        );
    }
}

/// moto, an AWS KMS emulator, not AWS itself: with every log at `trace`, neither the secret
/// access key nor the session token shows in any line that keygen, the proxy or rotate
/// writes, nor in the running proxy's `/proc/<pid>/cmdline`; the proxy still uses the root
/// (moto accepts any credentials, so these distinctive ones work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_key_in_any_log_line_or_the_command_line() {
    let moto = Moto::start();
    let server = NatsServer::start();
    let secret = format!("cbSECRET{}", std::process::id()) + "wJalrXUtnFEMIK7MDENGbPxRfiCY";
    let token = format!("cbTOKEN{}", std::process::id()) + "FwoGZXIvYXdzEXAMPLEtoken";
    let root = moto_root(
        &moto,
        "alias/traced",
        &[
            ("AWS_SECRET_ACCESS_KEY", &secret),
            ("AWS_SESSION_TOKEN", &token),
            ("CIPHERBUS_LOG", "trace"),
        ],
    );
    let leaks = |what: &str, text: &str| {
        assert!(
            !text.contains(&secret),
            "{what} shows the secret key: {text}"
        );
        assert!(
            !text.contains(&token),
            "{what} shows the session token: {text}"
        );
        // Nor any long piece of them.
        for piece in [&secret[..16], &secret[secret.len() - 16..], &token[..16]] {
            assert!(
                !text.contains(piece),
                "{what} shows part of a secret: {text}"
            );
        }
    };
    let (ok, _, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(ok, "{text}");
    leaks("keygen", &text);

    let dir = tempfile::tempdir().unwrap();
    let args = run_args(&root, &server, &dir.path().join("a"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = cipherbus(&root, &args);
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    cmd.arg("--controller")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .stdout(std::process::Stdio::null());
    let proxy = Spawned::spawn(&mut cmd);
    let start = Instant::now();
    while http_get(admin, "/healthz").is_none_or(|b| !b.contains("ok")) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the proxy did not start: {}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", proxy.pid())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("aws-kms:alias/traced"), "{cmdline}");
    leaks("/proc/<pid>/cmdline", &cmdline);

    // Traffic, and a rotation: the authority wraps a data key through the root.
    let client = async_nats::connect(format!("nats://{listen}"))
        .await
        .unwrap();
    let mut inbox = client.subscribe("traced").await.unwrap();
    sync(&client).await;
    assert!(round_trip(&client, "traced", &mut inbox).await);
    let said = rotate(&root, &server).await;
    assert!(said.contains("epoch 2 is active"), "{said}");
    leaks("rotate", &said);
    assert!(round_trip(&client, "traced", &mut inbox).await);
    let wraps = http_get(admin, "/metrics")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("cipherbus_kms_requests_total{op=\"wrap\",outcome=\"ok\"}"));
    assert!(wraps, "the authority wrapped through the root");

    let logs = proxy.stderr();
    assert!(
        logs.lines().filter(|l| l.contains("TRACE")).count() > 10,
        "the proxy logs at trace: {logs}"
    );
    leaks("the proxy's log", &logs);
    drop(proxy);
}

/// A policy allowing every KMS action.
const KMS_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"}]}"#;
/// A policy allowing what the start's check needs but `kms:Decrypt`.
const KMS_NO_DECRYPT: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["kms:DescribeKey","kms:Encrypt"],"Resource":"*"}]}"#;

/// moto, an AWS KMS emulator, not AWS itself, with its IAM authentication on: it verifies each
/// request's SigV4 signature against the access keys it issued and evaluates the user's
/// policy, as AWS does. `keygen` and `--check-config` pass with the right secret key (every
/// request they make is verified); a wrong secret key, an unknown access key, and a user
/// without `kms:Decrypt` each stop the start with exit 2 and one sentence that says the
/// credentials were refused, never the secret.
#[test]
fn moto_verifies_the_signatures_and_the_permissions() {
    let server = NatsServer::start();
    let (moto, users) = Moto::with_iam(&[KMS_ALL, KMS_NO_DECRYPT]);
    let (all, no_decrypt) = (&users[0], &users[1]);
    let as_user = |id: &str, secret: &str| {
        moto_root(
            &moto,
            "alias/verified",
            &[("AWS_ACCESS_KEY_ID", id), ("AWS_SECRET_ACCESS_KEY", secret)],
        )
    };
    let root = as_user(&all.access_key_id, &all.secret_access_key);
    let (ok, _, text) = output(cipherbus(&root, &["keygen", "--kek", &root.uri]));
    assert!(ok, "{text}\n{}", moto.log_tail());
    let check = |root: &RootUnderTest| {
        output(cipherbus(
            root,
            &[
                "run",
                "--check-config",
                "--kek",
                &root.uri,
                "--upstream",
                &server.url(),
            ],
        ))
    };
    let (ok, _, text) = check(&root);
    assert!(ok, "{text}");
    assert!(
        text.contains("answers, wraps and unwraps; no deployment seed yet"),
        "{text}"
    );

    let mut wrong = all.secret_access_key.clone();
    wrong.replace_range(..4, "XXXX");
    let cases = [
        (
            as_user(&all.access_key_id, &wrong),
            vec!["SignatureDoesNotMatch", "kms:DescribeKey"],
            wrong.as_str(),
        ),
        (
            as_user("AKIAUNKNOWN0000000000", &all.secret_access_key),
            vec!["InvalidClientTokenId"],
            all.secret_access_key.as_str(),
        ),
        (
            as_user(&no_decrypt.access_key_id, &no_decrypt.secret_access_key),
            vec!["AccessDenied", "kms:Decrypt"],
            no_decrypt.secret_access_key.as_str(),
        ),
    ];
    for (root, says, secret) in &cases {
        let (ok, code, text) = check(root);
        assert!(!ok && code == Some(2), "{text}");
        assert!(
            text.contains("aws-kms:alias/verified refused the credentials"),
            "{text}"
        );
        for s in says {
            assert!(text.contains(s), "{s}: {text}");
        }
        assert!(!text.contains(secret), "the secret key leaked: {text}");
        assert_eq!(text.trim().lines().count(), 1, "one sentence: {text}");
    }
}
