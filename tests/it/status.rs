//! `cipherbus status` against a real fleet: three proxy processes, an acting key authority and
//! a standby, on a JetStream server. The rows, their epochs and traffic, a proxy made to lag by
//! pausing it (SIGSTOP) across a rotation, and the sentence when no authority answers.

use std::time::Duration;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");

/// `cipherbus status --json`: the exit status and the parsed object.
async fn status(kek: &std::path::Path, server: &NatsServer) -> (bool, serde_json::Value, String) {
    let out = cipherbus_cli(
        BIN,
        vec![
            "status".into(),
            "--json".into(),
            "--kek-file".into(),
            kek.into(),
            "--upstream".into(),
            server.url().into(),
            "--timeout".into(),
            "3s".into(),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"));
    (out.status.success(), v, stderr)
}

/// The rows of agent-facing proxies (the controllers' own followers have rows too).
fn proxy_rows(v: &serde_json::Value) -> Vec<&serde_json::Value> {
    v["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["node"].as_str().unwrap().starts_with("proxy-"))
        .collect()
}

/// The node id a proxy process logged at start.
fn node_of(p: &ProxyProcess) -> String {
    let line = p
        .wait_log(Duration::from_secs(10), |l| l.contains("node=proxy-"))
        .unwrap_or_else(|| panic!("no node id logged: {}", p.stderr()));
    let at = line.find("node=proxy-").unwrap() + "node=".len();
    line[at..]
        .split(|c: char| c.is_whitespace() || c == '"')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_every_proxy_the_authority_its_standby_and_a_lagging_proxy() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let config = write_config(
        dir.path(),
        &kek,
        "[rotation]\nheartbeat_every = \"300ms\"\nstage_timeout = \"2s\"\nrotate_every = \"1h\"\nlease_ttl = \"2s\"\n[[policy]]\nsubject = \"fleet.>\"\nmode = \"encrypt\"\n",
    );
    let controller = |name: &str| spawn_controller(BIN, &config, &server, &dir.path().join(name));
    let (mut leader, leader_admin) = controller("authority-a");
    assert!(
        eventually(Duration::from_secs(15), || leads(leader_admin)).await,
        "the authority never acted: {}",
        leader.stderr()
    );
    let (mut standby, standby_admin) = controller("authority-b");

    let mut proxies = Vec::new();
    for i in 0..3 {
        let mut cmd = run_command(
            BIN,
            &kek,
            &[server.url()],
            Some(&dir.path().join(format!("proxy-{i}"))),
        );
        cmd.arg("--config").arg(&config);
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        proxies.push(ProxyProcess::start(cmd, listen));
    }
    let nodes: Vec<String> = proxies.iter().map(node_of).collect();
    assert!(
        http_get(standby_admin, "/metrics")
            .is_some_and(|m| m.contains("cipherbus_authority_leader{scope=\"default\"} 0")),
        "the second authority stands by"
    );

    // Traffic: proxy 0 publishes, proxy 1 delivers; a plaintext injected straight on the bus
    // is refused by proxy 1.
    let publisher = async_nats::connect(proxies[0].url()).await.unwrap();
    let subscriber = async_nats::connect(proxies[1].url()).await.unwrap();
    let mut inbox = subscriber.subscribe("fleet.orders").await.unwrap();
    subscriber.flush().await.unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let traffic = tokio::spawn(async move {
        loop {
            let _ = publisher.publish("fleet.orders", "order".into()).await;
            let _ = raw.publish("fleet.orders", "injected".into()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let drain = tokio::spawn(async move {
        use futures::StreamExt;
        while inbox.next().await.is_some() {}
    });

    // Every proxy reports, with figures from two reports.
    let mut v = serde_json::Value::Null;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let (ok, look, stderr) = status(&kek, &server).await;
        assert!(ok, "{stderr}");
        v = look;
        let rows = proxy_rows(&v);
        if rows.len() == 3
            && rows.iter().all(|r| r["interval_ms"].as_u64() > Some(0))
            && rows
                .iter()
                .any(|r| r["refused_in_interval"]["plaintext"].as_u64() > Some(0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rows = proxy_rows(&v);
    assert_eq!(rows.len(), 3, "{v:#}");
    let epoch = v["active"].as_u64().unwrap();
    assert_eq!(v["prefix"], "cipherbus.ctl");
    assert_eq!(v["standby"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["schedule"]["why"], "time", "{v:#}");
    assert!(
        v["schedule"]["next"].as_u64().unwrap() > v["acting_since_ms"].as_u64().unwrap() / 1000
    );
    for (i, node) in nodes.iter().enumerate() {
        let r = rows.iter().find(|r| r["node"] == node.as_str()).unwrap();
        assert_eq!(r["active"].as_u64(), Some(epoch), "{r}");
        assert_eq!(r["lagging"], false, "{r}");
        assert_eq!(r["connections"].as_u64(), Some(u64::from(i < 2)), "{r}");
        assert!(!r["host"].as_str().unwrap().is_empty());
        assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
    }
    let by = |i: usize| {
        rows.iter()
            .find(|r| r["node"] == nodes[i].as_str())
            .unwrap()
    };
    assert!(by(0)["sealed_in_interval"].as_u64() > Some(0), "{v:#}");
    assert!(by(1)["opened_in_interval"].as_u64() > Some(0), "{v:#}");
    assert!(
        by(1)["refused_in_interval"]["plaintext"].as_u64() > Some(0),
        "{v:#}"
    );

    // Pause proxy 2 and rotate: it cannot follow, so it lags.
    signal(proxies[2].pid(), "STOP");
    let rotated = operator_cli(BIN, &["rotate", "--upstream", &server.url()], &kek).await;
    assert!(rotated.status.success(), "{rotated:?}");
    // The authority catches up with the heartbeats queued while it waited for acks.
    let expected = |v: &serde_json::Value| {
        nodes.iter().enumerate().all(|(i, node)| {
            let paused = i == 2;
            let expect = if paused { epoch } else { epoch + 1 };
            v["proxies"].as_array().unwrap().iter().any(|r| {
                r["node"] == node.as_str()
                    && r["lagging"] == paused
                    && r["silent"] == paused
                    && r["active"].as_u64() == Some(expect)
            })
        })
    };
    let mut v = serde_json::Value::Null;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let (ok, look, stderr) = status(&kek, &server).await;
        assert!(ok, "{stderr}");
        v = look;
        if expected(&v) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(v["active"].as_u64(), Some(epoch + 1), "{v:#}");
    assert!(expected(&v), "proxy 2 ({}) alone lags: {v:#}", nodes[2]);

    // Heartbeats and reports come on two subscriptions, in either order: neither is refused
    // as a replay of the other.
    let replayed = http_get(leader_admin, "/metrics")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("cipherbus_control_refused_total{reason=\"replayed\"} "))
        .map_or(0.0, |v| v.trim().parse::<f64>().unwrap());
    assert_eq!(replayed, 0.0, "{}", leader.stderr());

    // No authority: the sentence, a failing exit, and the proxies that still report.
    standby.kill();
    signal(leader.pid(), "TERM");
    assert!(leader.wait_exit(Duration::from_secs(10)).is_some());
    let (ok, v, stderr) = status(&kek, &server).await;
    assert!(!ok);
    assert!(stderr.contains("no key authority"), "{stderr}");
    assert!(v["authority"].is_null(), "{v:#}");
    let heard: Vec<&str> = v["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert!(heard.contains(&nodes[0].as_str()) && heard.contains(&nodes[1].as_str()));
    assert!(
        !heard.contains(&nodes[2].as_str()),
        "a paused proxy sends nothing"
    );

    signal(proxies[2].pid(), "CONT");
    traffic.abort();
    drain.abort();
    // Each proxy heard the acting authority.
    for p in &proxies[..2] {
        let seen = p
            .metric("cipherbus_authority_last_seen_timestamp_seconds{scope=\"default\"}")
            .unwrap();
        // Heard at every re-announcement, not once: recent until the authorities stopped.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(now - seen < 30.0, "last heard {seen}, now {now}");
        assert!(p.metric("cipherbus_max_connections").unwrap() > 0.0);
    }
}

/// Proxies acknowledge an activation, and the authority updates their rows from it: `status`
/// taken right after `rotate` returns shows every acknowledging proxy at the new epoch, none
/// lagging, although their next heartbeat is seconds away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_right_after_rotate_shows_every_acknowledging_proxy_at_the_new_epoch() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    // The default heartbeat interval: the rows must not wait for it.
    let config = write_config(
        dir.path(),
        &kek,
        "[rotation]\nheartbeat_every = \"5s\"\nstage_timeout = \"5s\"\n",
    );
    let mut proxies = Vec::new();
    for i in 0..3 {
        let mut cmd = run_command(
            BIN,
            &kek,
            &[server.url()],
            Some(&dir.path().join(format!("proxy-{i}"))),
        );
        cmd.arg("--config").arg(&config);
        if i == 0 {
            cmd.arg("--controller");
        }
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        proxies.push(ProxyProcess::start(cmd, listen));
    }
    let nodes: Vec<String> = proxies.iter().map(node_of).collect();
    // Every proxy is known to the authority (from its first heartbeat) before the rotation.
    let started = std::time::Instant::now();
    loop {
        let (ok, v, _) = status(&kek, &server).await;
        if ok && proxy_rows(&v).len() == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the proxies never showed: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for round in 0..2 {
        let rotated = operator_cli(BIN, &["rotate", "--upstream", &server.url()], &kek).await;
        assert!(rotated.status.success(), "{rotated:?}");
        let (ok, v, stderr) = status(&kek, &server).await;
        assert!(ok, "{stderr}");
        let epoch = v["active"].as_u64().unwrap();
        assert_eq!(epoch, 2 + round, "{v:#}");
        let rows = proxy_rows(&v);
        for node in &nodes {
            let r = rows
                .iter()
                .find(|r| r["node"] == node.as_str())
                .unwrap_or_else(|| panic!("no row for {node}: {v:#}"));
            assert_eq!(r["active"].as_u64(), Some(epoch), "round {round}: {r}");
            assert_eq!(r["lagging"], false, "round {round}: {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_with_a_config_file_shows_every_scope_with_its_own_epoch() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    let tenant_dir = dir.path().join("tenant");
    std::fs::create_dir(&tenant_dir).unwrap();
    let tenant_kek = write_kek(&tenant_dir, [7; 32]);
    let config = dir.path().join("cipherbus.toml");
    std::fs::write(
        &config,
        format!(
            "kek_file = {:?}\n[rotation]\nheartbeat_every = \"300ms\"\nstage_timeout = \"2s\"\n[[scope]]\nname = \"tenant\"\nsubjects = [\"tenant.>\"]\nkek = \"file:{}\"\n",
            kek.display().to_string(),
            tenant_kek.display()
        ),
    )
    .unwrap();
    let mut cmd = run_command(BIN, &kek, &[server.url()], Some(&dir.path().join("state")));
    cmd.arg("--config").arg(&config).arg("--controller");
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = ProxyProcess::start(cmd, listen);
    let node = node_of(&proxy);
    assert!(
        eventually(Duration::from_secs(15), || proxy
            .metric("cipherbus_authority_leader{scope=\"tenant\"}")
            == Some(1.0))
        .await,
        "the tenant's authority never acted: {}",
        proxy.stderr()
    );

    // Rotate the tenant scope only: its epoch moves, the default one stays.
    let rotated = cipherbus_cli(
        BIN,
        vec![
            "rotate".into(),
            "--scope".into(),
            "tenant".into(),
            "--kek-file".into(),
            tenant_kek.clone().into(),
            "--upstream".into(),
            server.url().into(),
        ],
    )
    .await;
    assert!(rotated.status.success(), "{rotated:?}");

    let look = || async {
        let out = cipherbus_cli(
            BIN,
            vec![
                "status".into(),
                "--json".into(),
                "--config".into(),
                config.clone().into(),
                "--upstream".into(),
                server.url().into(),
            ],
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        (out.status.success(), lines, text)
    };
    let mut seen = (false, Vec::new(), String::new());
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        seen = look().await;
        let (ok, lines, _) = &seen;
        let on =
            |scope: &str, epoch: u64| {
                lines.iter().any(|v| {
                    v["scope"] == scope
                        && v["active"].as_u64() == Some(epoch)
                        && v["proxies"].as_array().unwrap().iter().any(|r| {
                            r["node"] == node.as_str() && r["active"].as_u64() == Some(epoch)
                        })
                })
            };
        if *ok && lines.len() == 2 && on("default", 1) && on("tenant", 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ok, lines, text) = seen;
    assert!(ok, "{text}");
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["scope"], "default", "{text}");
    assert_eq!(lines[0]["active"].as_u64(), Some(1), "{text}");
    assert_eq!(lines[1]["scope"], "tenant", "{text}");
    assert_eq!(lines[1]["prefix"], "cipherbus.ctl.scope.tenant", "{text}");
    assert_eq!(lines[1]["active"].as_u64(), Some(2), "{text}");
    let row = lines[1]["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node.as_str())
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(row["active"].as_u64(), Some(2), "{text}");
}
