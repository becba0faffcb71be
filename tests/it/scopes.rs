//! Key scopes against a real nats-server with JetStream: each proxy opens exactly the scopes it
//! holds the root of and refuses the rest; rotation, revocation and usage limits stay inside
//! their scope; a relabelled envelope fails; a subject moved between scopes keeps its history.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use cipherbus::envelope::{Header, ScopeId, VERSION_1, VERSION_2};
use cipherbus::server::ProxyHandle;
use futures::StreamExt;

const ROOT_A: [u8; 32] = [0xa1; 32];
const ROOT_B: [u8; 32] = [0xb2; 32];
const FAST: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"5s\"\n";

/// A root key file named `name` in `dir`, as `cipherbus keygen` writes one.
fn root_file(dir: &Path, name: &str, key: [u8; 32]) -> PathBuf {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    write_kek(&sub, key)
}

/// A `[[scope]]` block.
fn scope(name: &str, subjects: &[&str], kek: &Path, extra: &str) -> String {
    let subjects: Vec<String> = subjects.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[[scope]]\nname = {name:?}\nsubjects = [{}]\nkek = \"file:{}\"\n{extra}",
        subjects.join(", "),
        kek.display()
    )
}

/// The active epoch of scope `name` in proxy `p`.
fn epoch_of(p: &ProxyHandle, name: &str) -> u32 {
    p.scopes
        .iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("scope {name} is held"))
        .keyring
        .snapshot()
        .active
        .epoch
}

fn refusals(p: &ProxyHandle, reason: &str) -> f64 {
    metric(
        p,
        &format!("cipherbus_open_failures_total{{reason=\"{reason}\"}}"),
    )
}

/// Publishes markers on `marker` (a default-scope subject) through `via` until every one of
/// `subs` (subscribed to `>`, so the usual request round trip cannot be used) has received one.
async fn settle(via: &async_nats::Client, subs: &mut [&mut async_nats::Subscriber], marker: &str) {
    for sub in subs.iter_mut() {
        let mut seen = false;
        for _ in 0..50 {
            via.publish(marker.to_owned(), "marker".into())
                .await
                .unwrap();
            via.flush().await.unwrap();
            // The raw bus never goes quiet (heartbeats): stop at the marker.
            while let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(100), sub.next()).await
            {
                if m.subject.as_str() == marker {
                    seen = true;
                    break;
                }
            }
            if seen {
                break;
            }
        }
        assert!(seen, "no marker arrived on {marker}");
    }
}

/// Publishes `secret on SUBJECT` on each subject.
async fn publish_orders(publisher: &async_nats::Client, subjects: &[&str]) {
    for subject in subjects {
        publisher
            .publish(subject.to_string(), format!("secret on {subject}").into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
}

/// An operator command, repeated while the scope's authority is still starting.
async fn operator(bin: &str, args: &[&str], kek: &Path) -> std::process::Output {
    for _ in 0..40 {
        let out = operator_cli(bin, args, kek).await;
        if !String::from_utf8_lossy(&out.stderr).contains("no key authority is running") {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    operator_cli(bin, args, kek).await
}

/// Everything `sub` receives until `quiet` passes without a message, as (subject, payload).
async fn drain(sub: &mut async_nats::Subscriber, quiet: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(quiet, sub.next()).await {
        got.push((
            m.subject.to_string(),
            String::from_utf8_lossy(&m.payload).into_owned(),
        ));
    }
    got.sort();
    got
}

struct Fleet {
    server: NatsServer,
    _dir: tempfile::TempDir,
    state: tempfile::TempDir,
    kek_a: PathBuf,
    kek_b: PathBuf,
    /// Holds scope `a` (and the default scope).
    pa: ProxyHandle,
    /// Holds scope `b`.
    pb: ProxyHandle,
    /// Holds both, and hosts the key authority of every scope.
    pab: ProxyHandle,
}

impl Fleet {
    /// `top` goes into the top-level `[rotation]`, `extra_a` after scope a's block.
    async fn start(top: &str, extra_a: &str) -> Self {
        let server = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let kek_a = root_file(dir.path(), "a", ROOT_A);
        let kek_b = root_file(dir.path(), "b", ROOT_B);
        let a = scope("a", &["a.>"], &kek_a, extra_a);
        let b = scope("b", &["b.>"], &kek_b, "");
        let fast = format!("{FAST}{top}");
        let pab = proxy_full(
            &server,
            &format!("{fast}\n{a}\n{b}"),
            TEST_KEK,
            Some(state.path()),
            true,
        )
        .await;
        let pa = proxy_full(&server, &format!("{fast}\n{a}"), TEST_KEK, None, false).await;
        let pb = proxy_full(&server, &format!("{fast}\n{b}"), TEST_KEK, None, false).await;
        Fleet {
            server,
            _dir: dir,
            state,
            kek_a,
            kek_b,
            pa,
            pb,
            pab,
        }
    }

    fn audit(&self, scope: Option<&str>) -> String {
        let name = scope.map_or_else(|| "audit.jsonl".to_owned(), |s| format!("audit.{s}.jsonl"));
        std::fs::read_to_string(self.state.path().join(name)).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_opens_exactly_the_scopes_it_holds_and_refuses_the_rest() {
    let f = Fleet::start("", "").await;
    let mut inboxes = Vec::new();
    for p in [&f.pa, &f.pb, &f.pab] {
        let client = agent(p).await;
        let sub = client.subscribe(">").await.unwrap();
        inboxes.push((client, sub));
    }
    let observer = observer(&f.server).await;
    let mut tap = observer.subscribe(">").await.unwrap();
    let publisher = agent(&f.pab).await;
    // A version-2 envelope adds 56 bytes: the limit agents are told leaves room for them.
    assert_eq!(
        publisher.server_info().max_payload,
        observer.server_info().max_payload - 56
    );
    {
        let [(_, s0), (_, s1), (_, s2)] = &mut inboxes[..] else {
            unreachable!()
        };
        settle(&publisher, &mut [s0, s1, s2, &mut tap], "c.marker").await;
    }

    publish_orders(&publisher, &["a.orders", "b.orders", "c.orders"]).await;

    let quiet = Duration::from_millis(700);
    let seen = |got: &[(String, String)]| -> Vec<String> {
        got.iter()
            .filter(|(s, _)| s.ends_with(".orders"))
            .map(|(s, p)| format!("{s}={p}"))
            .collect()
    };
    let pa_got = seen(&drain(&mut inboxes[0].1, quiet).await);
    let pb_got = seen(&drain(&mut inboxes[1].1, quiet).await);
    let pab_got = seen(&drain(&mut inboxes[2].1, quiet).await);
    assert_eq!(
        pa_got,
        ["a.orders=secret on a.orders", "c.orders=secret on c.orders"]
    );
    assert_eq!(
        pb_got,
        ["b.orders=secret on b.orders", "c.orders=secret on c.orders"]
    );
    assert_eq!(
        pab_got,
        [
            "a.orders=secret on a.orders",
            "b.orders=secret on b.orders",
            "c.orders=secret on c.orders"
        ]
    );
    assert_eq!(refusals(&f.pa, "scope_unavailable"), 1.0, "b.orders");
    assert_eq!(refusals(&f.pb, "scope_unavailable"), 1.0, "a.orders");
    assert_eq!(refusals(&f.pab, "scope_unavailable"), 0.0);

    // On the bus: named scopes travel as version 2 with their id, the default one as version 1.
    let mut on_bus = std::collections::BTreeMap::new();
    while on_bus.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), tap.next())
            .await
            .expect("every message crossed the bus")
            .unwrap();
        if ["a.orders", "b.orders", "c.orders"].contains(&m.subject.as_str()) {
            assert!(!contains(&m.payload, b"secret"), "plaintext on the bus");
            let h = Header::parse(&m.payload).expect("an envelope");
            on_bus.insert(m.subject.to_string(), (h.version, h.scope));
        }
    }
    assert_eq!(on_bus["a.orders"], (VERSION_2, Some(ScopeId::of("a"))));
    assert_eq!(on_bus["b.orders"], (VERSION_2, Some(ScopeId::of("b"))));
    assert_eq!(on_bus["c.orders"], (VERSION_1, None));

    // Stored copies in scope b cannot be read through pa, and can through pb.
    for (client, mut sub) in inboxes {
        sub.unsubscribe().await.unwrap();
        client.flush().await.unwrap();
    }
    tap.unsubscribe().await.unwrap();
    // Once no `>` subscription is left anywhere, a request finds no responders.
    let mut cleared = false;
    for _ in 0..40 {
        let request = async_nats::Request::new()
            .payload(bytes::Bytes::new())
            .timeout(Some(Duration::from_millis(250)));
        let answer = observer.send_request("scopes.cleared", request).await;
        if answer.is_err_and(|e| e.kind() == async_nats::RequestErrorKind::NoResponders) {
            cleared = true;
            break;
        }
    }
    assert!(cleared, "the `>` subscriptions are gone");
    let js = async_nats::jetstream::new(agent(&f.pab).await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "B".into(),
        subjects: vec!["b.stored".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..3 {
        js.publish("b.stored", format!("kept {i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let before = refusals(&f.pa, "scope_unavailable");
    let through_pa = replay_stream(&agent(&f.pa).await, "B").await;
    assert!(through_pa.is_empty(), "pa read scope b: {through_pa:?}");
    assert_eq!(refusals(&f.pa, "scope_unavailable"), before + 3.0);
    let through_pb = replay_stream(&agent(&f.pb).await, "B").await;
    assert_eq!(through_pb, ["kept 0", "kept 1", "kept 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_and_revoking_in_one_scope_leaves_the_others_alone() {
    let f = Fleet::start("", "").await;
    let bin = env!("CARGO_BIN_EXE_cipherbus");
    let url = f.server.url();
    let out = operator(
        bin,
        &[
            "rotate",
            "--scope",
            "a",
            "--upstream",
            &url,
            "--reason",
            "drill",
        ],
        &f.kek_a,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch 2 is active"));
    for p in [&f.pa, &f.pab] {
        assert!(eventually(Duration::from_secs(10), || epoch_of(p, "a") == 2).await);
    }
    assert_eq!(epoch_of(&f.pb, "b"), 1);
    assert_eq!(epoch_of(&f.pab, "b"), 1);
    for p in [&f.pa, &f.pb, &f.pab] {
        assert_eq!(epoch_of(p, "default"), 1);
    }
    // The scope's root is needed: the default root cannot ask scope a's authority.
    let dir = tempfile::tempdir().unwrap();
    let default_kek = write_kek(dir.path(), TEST_KEK);
    let wrong = operator(
        bin,
        &[
            "rotate",
            "--scope",
            "a",
            "--upstream",
            &url,
            "--timeout",
            "3s",
        ],
        &default_kek,
    )
    .await;
    assert!(
        !wrong.status.success(),
        "rotated scope a with the default root"
    );
    assert_eq!(epoch_of(&f.pab, "a"), 2);

    // Traffic in both scopes still flows between the proxies holding them.
    for (from, to, subject) in [(&f.pa, &f.pab, "a.x"), (&f.pb, &f.pab, "b.x")] {
        let sub_client = agent(to).await;
        let mut sub = sub_client.subscribe(subject).await.unwrap();
        sync(&sub_client).await;
        let pub_client = agent(from).await;
        pub_client.publish(subject, "after".into()).await.unwrap();
        sync(&pub_client).await;
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("delivered")
            .unwrap();
        assert_eq!(&m.payload[..], b"after");
    }

    // Revoking epoch 1 of scope a shreds it there alone.
    let out = operator(
        bin,
        &["revoke", "1", "--scope", "a", "--upstream", &url],
        &f.kek_a,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            f.pa.scopes
                .iter()
                .find(|h| h.name == "a")
                .unwrap()
                .keyring
                .snapshot()
                .state(1)
                == Some(cipherbus::keyring::KeyState::Destroyed)
        })
        .await
    );
    for p in [&f.pb, &f.pab] {
        let b = p.scopes.iter().find(|h| h.name == "b").unwrap();
        assert_eq!(
            b.keyring.snapshot().state(1),
            Some(cipherbus::keyring::KeyState::Active)
        );
    }
    assert_eq!(
        f.pab.keyring.snapshot().state(1),
        Some(cipherbus::keyring::KeyState::Active),
        "the default scope's epoch 1"
    );

    // `keys --scope` lists the scope's own epochs.
    let keys = operator(bin, &["keys", "--scope", "b", "--upstream", &url], &f.kek_b).await;
    let listing = String::from_utf8_lossy(&keys.stdout);
    assert!(
        keys.status.success(),
        "{}",
        String::from_utf8_lossy(&keys.stderr)
    );
    assert!(!listing.contains("destroyed"), "{listing}");

    // `keys --config` lists every scope the config holds, each under its own root.
    let config = dir.path().join("cipherbus.toml");
    std::fs::write(
        &config,
        format!(
            "kek = \"file:{}\"\n{}\n{}",
            default_kek.display(),
            scope("a", &["a.>"], &f.kek_a, ""),
            scope("b", &["b.>"], &f.kek_b, "")
        ),
    )
    .unwrap();
    let all = cipherbus_cli(
        bin,
        [
            "keys",
            "--config",
            config.to_str().unwrap(),
            "--upstream",
            &url,
        ]
        .iter()
        .map(Into::into)
        .collect(),
    )
    .await;
    let listing = String::from_utf8_lossy(&all.stdout).into_owned();
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    let section = |name: &str| -> String {
        let start = listing.find(&format!("scope {name}\n")).expect(name);
        let rest = &listing[start + 1..];
        rest[..rest.find("\nscope ").unwrap_or(rest.len())].to_owned()
    };
    let row = |text: &str, epoch: u32| -> String {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(&epoch.to_string()))
            .unwrap_or_default()
            .to_owned()
    };
    let a = section("a");
    assert!(row(&a, 1).contains("destroyed"), "{listing}");
    assert!(row(&a, 2).contains("active"), "{listing}");
    for other in [section("default"), section("b")] {
        assert!(row(&other, 1).contains("active"), "{listing}");
        assert!(row(&other, 2).is_empty(), "{listing}");
    }

    // Each scope's audit trail has its own entries.
    let audit_a = f.audit(Some("a"));
    let audit_b = f.audit(Some("b"));
    let audit_default = f.audit(None);
    assert!(
        audit_a.contains("\"event\":\"activated\",\"epoch\":2"),
        "{audit_a}"
    );
    assert!(audit_a.contains("\"event\":\"revoked\""), "{audit_a}");
    for other in [&audit_b, &audit_default] {
        assert!(!other.contains("\"epoch\":2"), "{other}");
        assert!(!other.contains("\"event\":\"revoked\""), "{other}");
    }
    // Every trail verifies under its own scope's key.
    let state = f.state.path().to_owned();
    for (file, kek) in [("audit.a.jsonl", &f.kek_a), ("audit.b.jsonl", &f.kek_b)] {
        let path = state.join(file);
        let out = operator(bin, &["audit", "verify", path.to_str().unwrap()], kek).await;
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_relabelled_into_another_scope_fails_to_open() {
    let f = Fleet::start("", "").await;
    let observer = observer(&f.server).await;
    let mut tap = observer.subscribe("a.relabel").await.unwrap();
    sync(&observer).await;
    let receiver = agent(&f.pab).await;
    let mut inbox = receiver.subscribe("a.relabel").await.unwrap();
    sync(&receiver).await;

    let publisher = agent(&f.pa).await;
    publisher
        .publish("a.relabel", "genuine".into())
        .await
        .unwrap();
    sync(&publisher).await;
    let sealed = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .unwrap()
        .unwrap()
        .payload;
    let got = tokio::time::timeout(Duration::from_secs(5), inbox.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], b"genuine");

    // The same envelope, its scope id changed to b's, which pab also holds.
    let mut relabelled = sealed.to_vec();
    relabelled[32..40].copy_from_slice(&ScopeId::of("b").0);
    let auth_before = refusals(&f.pab, "auth");
    observer
        .publish("a.relabel", relabelled.into())
        .await
        .unwrap();
    sync(&observer).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(700), inbox.next())
            .await
            .is_err(),
        "the relabelled envelope was delivered"
    );
    assert!(
        eventually(Duration::from_secs(5), || refusals(&f.pab, "auth")
            == auth_before + 1.0)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_limits_rotate_their_own_scope_alone() {
    // Every scope has a limit of 100 messages per epoch; scope a overrides it with 50.
    let f = Fleet::start(
        "max_messages_per_epoch = 100\n",
        "[scope.rotation]\nmax_messages_per_epoch = 50\n",
    )
    .await;
    let client = agent(&f.pa).await;
    for i in 0..80u32 {
        client
            .publish("a.usage", i.to_be_bytes().to_vec().into())
            .await
            .unwrap();
    }
    // Under the limit in the default scope and in scope b: with the 80 of scope a counted in,
    // they would be over it.
    let other = agent(&f.pab).await;
    for i in 0..60u32 {
        other
            .publish("default.usage", i.to_be_bytes().to_vec().into())
            .await
            .unwrap();
        other
            .publish("b.usage", i.to_be_bytes().to_vec().into())
            .await
            .unwrap();
    }
    sync(&client).await;
    sync(&other).await;
    assert!(
        eventually(Duration::from_secs(15), || epoch_of(&f.pab, "a") >= 2).await,
        "scope a's max_messages_per_epoch rotates scope a"
    );
    // Several heartbeats later, the other scopes have not moved.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(epoch_of(&f.pab, "b"), 1);
    assert_eq!(epoch_of(&f.pab, "default"), 1);
    assert_eq!(epoch_of(&f.pa, "default"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_moved_between_scopes_keeps_its_history_readable() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let kek_a = root_file(dir.path(), "a", ROOT_A);
    let kek_b = root_file(dir.path(), "b", ROOT_B);
    let before = format!(
        "{FAST}\n{}\n{}",
        scope("a", &["a.>", "moved.>"], &kek_a, ""),
        scope("b", &["b.>"], &kek_b, "")
    );
    let after = format!(
        "{FAST}\n{}\n{}",
        scope("a", &["a.>"], &kek_a, ""),
        scope("b", &["b.>", "moved.>"], &kek_b, "")
    );
    let plain = proxy(&server).await;
    async_nats::jetstream::new(agent(&plain).await)
        .create_stream(async_nats::jetstream::stream::Config {
            name: "MOVED".into(),
            subjects: vec!["moved.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    let old = proxy_full(&server, &before, TEST_KEK, Some(state.path()), true).await;
    let js = async_nats::jetstream::new(agent(&old).await);
    js.publish("moved.x", "under a".into())
        .await
        .unwrap()
        .await
        .unwrap();
    old.shutdown().await;

    let new = proxy_full(&server, &after, TEST_KEK, Some(state.path()), true).await;
    let js = async_nats::jetstream::new(agent(&new).await);
    js.publish("moved.x", "under b".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Stored: the first copy names scope a, the second scope b.
    let raw = async_nats::jetstream::new(observer(&server).await);
    let stream = raw.get_stream("MOVED").await.unwrap();
    let first = stream.get_raw_message(1).await.unwrap();
    let second = stream.get_raw_message(2).await.unwrap();
    assert_eq!(
        Header::parse(&first.payload).unwrap().scope,
        Some(ScopeId::of("a"))
    );
    assert_eq!(
        Header::parse(&second.payload).unwrap().scope,
        Some(ScopeId::of("b"))
    );
    // The new proxy still holds scope a: both open through it.
    assert_eq!(
        replay_stream(&agent(&new).await, "MOVED").await,
        ["under a", "under b"]
    );
    // A proxy holding only b opens the new one and refuses the old.
    let only_b = proxy_full(
        &server,
        &format!("{FAST}\n{}", scope("b", &["b.>", "moved.>"], &kek_b, "")),
        TEST_KEK,
        None,
        false,
    )
    .await;
    assert_eq!(
        replay_stream(&agent(&only_b).await, "MOVED").await,
        ["under b"]
    );
    assert_eq!(refusals(&only_b, "scope_unavailable"), 1.0);
}

/// A Transit policy for one tenant's proxies: their own key, nothing else.
fn tenant_policy(key: &str) -> String {
    format!(
        r#"path "transit/keys/{key}" {{ capabilities = ["read"] }}
path "transit/encrypt/{key}" {{ capabilities = ["update"] }}
path "transit/decrypt/{key}" {{ capabilities = ["update"] }}
"#
    )
}

/// Scopes whose roots are Transit keys in OpenBao, each tenant's proxy with a token that may use
/// its own key only: each sees the other's traffic as refusals, and a scope whose root its
/// token cannot use stops the start with one sentence naming the scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_on_openbao_roots_with_a_token_per_tenant() {
    use crate::support::kms::{cipherbus, output, Bao, RootUnderTest};
    let bao = Bao::dev();
    bao.enable_transit();
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let default_kek = write_kek(d, TEST_KEK);
    let token_file = |name: &str, token: &str| {
        let path = d.join(format!("{name}.token"));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        path
    };
    let env = |token: &Path| RootUnderTest {
        uri: String::new(),
        env: vec![
            ("VAULT_ADDR".into(), bao.addr.clone()),
            ("VAULT_TOKEN_FILE".into(), token.display().to_string()),
        ],
    };
    let admin = env(&token_file("admin", bao.token()));
    for key in ["tenant-a", "tenant-b"] {
        let (ok, _, text) = output(cipherbus(
            &admin,
            &["keygen", "--kek", &format!("vault-transit:{key}")],
        ));
        assert!(ok, "{text}");
    }
    let a = env(&token_file(
        "a",
        &bao.create_policy_token("tenant-a", &tenant_policy("tenant-a")),
    ));
    let b = env(&token_file(
        "b",
        &bao.create_policy_token("tenant-b", &tenant_policy("tenant-b")),
    ));
    let vault_scope = |name: &str, subjects: &str, key: &str| {
        format!("[[scope]]\nname = {name:?}\nsubjects = [{subjects:?}]\nkek = \"vault-transit:{key}\"\n")
    };
    let config = |name: &str, scopes: &[String]| {
        let path = d.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "kek = \"file:{}\"\n{FAST}\n{}",
                default_kek.display(),
                scopes.concat()
            ),
        )
        .unwrap();
        path
    };
    let scope_a = vault_scope("a", "a.>", "tenant-a");
    let scope_b = vault_scope("b", "b.>", "tenant-b");
    let start = |root: &RootUnderTest, name: &str, scopes: &[String], controller: bool| {
        let config = config(name, scopes);
        let state = d.join(format!("{name}-state"));
        let mut args = vec![
            "run".to_owned(),
            "--config".into(),
            config.display().to_string(),
            "--upstream".into(),
            server.url(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        if controller {
            args.push("--controller".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        ProxyProcess::start(cipherbus(root, &args), listen)
    };
    // The operator's controller holds both scopes (and creates their seeds on the bus).
    let pab = start(&admin, "pab", &[scope_a.clone(), scope_b.clone()], true);
    let pa = start(&a, "pa", std::slice::from_ref(&scope_a), false);
    let pb = start(&b, "pb", std::slice::from_ref(&scope_b), false);

    let mut subs = Vec::new();
    for p in [&pa, &pb] {
        let client = async_nats::connect(p.url()).await.unwrap();
        let sub = client.subscribe(">").await.unwrap();
        subs.push((client, sub));
    }
    let publisher = async_nats::connect(pab.url()).await.unwrap();
    {
        let [(_, s0), (_, s1)] = &mut subs[..] else {
            unreachable!()
        };
        settle(&publisher, &mut [s0, s1], "c.marker").await;
    }
    publish_orders(&publisher, &["a.orders", "b.orders"]).await;
    let quiet = Duration::from_millis(700);
    let orders = |got: Vec<(String, String)>| -> Vec<String> {
        got.into_iter()
            .filter(|(s, _)| s.ends_with(".orders"))
            .map(|(s, p)| format!("{s}={p}"))
            .collect()
    };
    assert_eq!(
        orders(drain(&mut subs[0].1, quiet).await),
        ["a.orders=secret on a.orders"]
    );
    assert_eq!(
        orders(drain(&mut subs[1].1, quiet).await),
        ["b.orders=secret on b.orders"]
    );
    let refused =
        |p: &ProxyProcess| p.metric(r#"cipherbus_open_failures_total{reason="scope_unavailable"}"#);
    assert_eq!(refused(&pa), Some(1.0));
    assert_eq!(refused(&pb), Some(1.0));

    // Tenant A's token cannot use tenant B's key: a proxy configured with scope b on it stops.
    let config = config("wrong", &[scope_a.clone(), scope_b.clone()]);
    let check = cipherbus(
        &a,
        &[
            "run",
            "--check-config",
            "--config",
            config.to_str().unwrap(),
            "--upstream",
            &server.url(),
        ],
    );
    let (ok, code, text) = output(check);
    assert!(!ok && code == Some(2), "{text}");
    assert!(
        text.contains("scope \"b\"") && text.contains("vault-transit:tenant-b"),
        "{text}"
    );
    // The roots checked before it are listed; the refusal is one line.
    assert_eq!(
        text.lines().filter(|l| l.starts_with("cipherbus:")).count(),
        1,
        "{text}"
    );
    assert!(!text.contains(bao.token()));
    // `run` itself stops likewise, before it listens.
    let run = cipherbus(
        &a,
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--upstream",
            &server.url(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let (ok, code, text) = output(run);
    assert!(!ok && code == Some(2), "{text}");
    assert!(text.contains("scope \"b\""), "{text}");
}
