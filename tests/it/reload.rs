//! Live reload on SIGHUP and `cipherbus reload --pid`: a connected agent gets the new subject
//! policy at its next message; a raised connection cap admits more agents and a lowered one
//! keeps those connected; a key authority follows a new rotation schedule; a broken file and a
//! change that takes a restart are refused with the old config left in force; SIGHUP never ends
//! the process.

use std::time::Duration;

use crate::support::*;
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");

fn reloads(p: &ProxyProcess, outcome: &str) -> f64 {
    p.metric(&format!("cipherbus_reloads_total{{outcome=\"{outcome}\"}}"))
        .unwrap_or(-1.0)
}

fn denied_publishes(p: &ProxyProcess) -> f64 {
    p.metric(r#"cipherbus_denied_total{direction="publish"}"#)
        .unwrap_or(-1.0)
}

async fn reload(p: &ProxyProcess) {
    let out = cipherbus_cli(
        BIN,
        vec!["reload".into(), "--pid".into(), p.pid().to_string().into()],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Publishes `x.secret` from `publisher` and says whether `sub` received it.
async fn goes_through(
    publisher: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    text: &str,
) -> bool {
    publisher
        .publish("x.secret", text.to_owned().into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    match tokio::time::timeout(Duration::from_millis(800), sub.next()).await {
        Ok(Some(m)) => {
            assert_eq!(&m.payload[..], text.as_bytes());
            true
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_applies_the_new_policy_to_connected_agents_and_refuses_bad_files() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let config = dir.path().join("cipherbus.toml");
    let write = |policy: &str, extra: &str| {
        std::fs::write(
            &config,
            format!(
                "kek_file = {:?}\n{extra}\n[[policy]]\nsubject = \"x.secret\"\nmode = {policy:?}\n",
                kek.display().to_string()
            ),
        )
        .unwrap();
    };
    write("encrypt", "");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args([
        "run",
        "--config",
        config.to_str().unwrap(),
        "--upstream",
        &server.url(),
    ]);
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut proxy = ProxyProcess::start(cmd, listen);

    let client = async_nats::connect(proxy.url()).await.unwrap();
    let mut sub = client.subscribe("x.secret").await.unwrap();
    sync(&client).await;
    assert!(goes_through(&client, &mut sub, "before").await);

    // encrypt → deny, by `cipherbus reload --pid`: the same connection is refused now.
    write("deny", "");
    reload(&proxy).await;
    assert!(eventually(Duration::from_secs(5), || reloads(&proxy, "ok") == 1.0).await);
    let denied = denied_publishes(&proxy);
    assert!(!goes_through(&client, &mut sub, "after the reload").await);
    assert_eq!(denied_publishes(&proxy), denied + 1.0);

    // A file that does not parse: refused, counted, logged; the deny rule stays.
    std::fs::write(&config, "this is = = not toml").unwrap();
    reload(&proxy).await;
    assert!(eventually(Duration::from_secs(5), || reloads(&proxy, "invalid") == 1.0).await);
    assert!(!goes_through(&client, &mut sub, "after a broken file").await);

    // A change that takes a restart (the heartbeat interval), with the policy back to encrypt:
    // the whole file is refused, so the deny rule stays.
    write("encrypt", "[rotation]\nheartbeat_every = \"1s\"");
    reload(&proxy).await;
    assert!(
        eventually(Duration::from_secs(5), || reloads(
            &proxy,
            "restart_required"
        ) == 1.0)
        .await
    );
    assert!(!goes_through(&client, &mut sub, "after a restart-only change").await);
    let log = proxy
        .wait_log(Duration::from_secs(5), |l| l.contains("takes a restart"))
        .expect("the refusal is logged");
    assert!(log.contains("rotation.heartbeat_every"), "{log}");

    // A plain SIGHUP with a good file: encrypt again, on the same connection. The process
    // lives through every signal.
    write("encrypt", "");
    signal(proxy.pid(), "HUP");
    assert!(eventually(Duration::from_secs(5), || reloads(&proxy, "ok") == 2.0).await);
    assert!(goes_through(&client, &mut sub, "encrypted again").await);
    assert!(
        proxy.wait_exit(Duration::from_millis(200)).is_none(),
        "the proxy lives through SIGHUP"
    );
}

/// Whether an agent can connect now (a refused one gets the server's maximum-connections error).
async fn admitted(p: &ProxyProcess) -> bool {
    match tokio::time::timeout(Duration::from_secs(3), async_nats::connect(p.url())).await {
        Ok(Ok(c)) => {
            let ok = tokio::time::timeout(Duration::from_secs(2), c.flush())
                .await
                .is_ok_and(|r| r.is_ok());
            drop(c);
            ok
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_connection_cap_and_the_rotation_schedule() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let config = dir.path().join("cipherbus.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "kek_file = {:?}\n{extra}\n[rotation]\nheartbeat_every = \"300ms\"\nstage_timeout = \"2s\"\n",
                kek.display().to_string()
            ),
        )
        .unwrap();
    };
    write("max_connections = 2");
    let mut cmd = run_command(BIN, &kek, &[server.url()], Some(&dir.path().join("state")));
    cmd.arg("--config").arg(&config).arg("--controller");
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = ProxyProcess::start(cmd, listen);
    let cap = || proxy.metric("cipherbus_max_connections").unwrap_or(-1.0);
    assert_eq!(cap(), 2.0);

    let a = async_nats::connect(proxy.url()).await.unwrap();
    let b = async_nats::connect(proxy.url()).await.unwrap();
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert!(!admitted(&proxy).await, "a third agent is over the cap");

    // Raised: a third agent gets in.
    write("max_connections = 3");
    reload(&proxy).await;
    assert!(eventually(Duration::from_secs(5), || cap() == 3.0).await);
    let c = async_nats::connect(proxy.url()).await.unwrap();
    c.flush().await.unwrap();

    // Lowered below what is connected: nobody is dropped, nobody new gets in, and the cap takes
    // the permits back as agents leave.
    write("max_connections = 1");
    reload(&proxy).await;
    assert!(eventually(Duration::from_secs(5), || cap() == 1.0).await);
    for agent in [&a, &b, &c] {
        agent
            .flush()
            .await
            .expect("a connected agent stays connected");
    }
    assert!(!admitted(&proxy).await);
    drop(b);
    drop(c);
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .metric("cipherbus_connections")
            .is_some_and(|n| n == 1.0))
        .await
    );
    assert!(
        !admitted(&proxy).await,
        "two left, and the cap of one is full"
    );
    drop(a);
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .metric("cipherbus_connections")
            .is_some_and(|n| n == 0.0))
        .await
    );
    assert!(admitted(&proxy).await);

    // The authority in this process follows a schedule it did not have.
    let epoch = || {
        proxy
            .metric("cipherbus_active_epoch{scope=\"default\"}")
            .unwrap_or(0.0)
    };
    let before = epoch();
    // No time schedule reads 0.
    assert_eq!(
        proxy.metric("cipherbus_rotation_interval_seconds{scope=\"default\"}"),
        Some(0.0)
    );
    std::fs::write(
        &config,
        format!(
            "kek_file = {:?}\nmax_connections = 1\n[rotation]\nheartbeat_every = \"300ms\"\nstage_timeout = \"2s\"\nrotate_every = \"1s\"\n",
            kek.display().to_string()
        ),
    )
    .unwrap();
    reload(&proxy).await;
    assert!(
        eventually(Duration::from_secs(15), || epoch() >= before + 1.0).await,
        "no scheduled rotation after the reload: {}",
        proxy.stderr()
    );
    assert_eq!(
        proxy.metric("cipherbus_rotation_interval_seconds{scope=\"default\"}"),
        Some(1.0)
    );
    assert_eq!(reloads(&proxy, "ok"), 3.0);
}
