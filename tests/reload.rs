//! Live reload of the subject policy on SIGHUP and `cipherbus reload --pid`: a connected agent
//! gets the new rules at its next message, a broken file and a change that takes a restart are
//! refused with the old policy left in force, and SIGHUP never ends the process.

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::*;

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

    // A change that takes a restart (the connection cap), with the policy back to encrypt: the
    // whole file is refused, so the deny rule stays.
    write("encrypt", "max_connections = 5");
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
    assert!(log.contains("max_connections changed"), "{log}");

    // A plain SIGHUP with a good file: encrypt again, on the same connection. The process
    // lives through every signal.
    write("encrypt", "");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(eventually(Duration::from_secs(5), || reloads(&proxy, "ok") == 2.0).await);
    assert!(goes_through(&client, &mut sub, "encrypted again").await);
    assert!(
        proxy.wait_exit(Duration::from_millis(200)).is_none(),
        "the proxy lives through SIGHUP"
    );
}
