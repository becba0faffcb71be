//! The monitoring files in `deploy/`: the alert rules pass `promtool check rules` and their
//! unit tests, which fail when any alert's expression is broken; every metric the dashboard and
//! the rules name is one the proxy exports; and a real Prometheus, scraping two proxy processes
//! (one hosting the key authority) while agents talk through them, answers every dashboard
//! query with data, loads every rule healthy, and has no alert to raise.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");
const DASHBOARD: &str = include_str!("../../deploy/grafana/cipherbus.json");
const RULES: &str = include_str!("../../deploy/prometheus/cipherbus.rules.yml");
const RULE_TESTS: &str = include_str!("../../deploy/prometheus/cipherbus.rules.test.yml");
const OPERATIONS: &str = include_str!("../../docs/OPERATIONS.md");

/// Debian 12's Prometheus (pinned in `tests/it/support/debian-pins`), which ships `promtool`.
fn prometheus_bin() -> (&'static str, &'static str) {
    clients::debian_install(&["prometheus"]);
    ("/usr/bin/prometheus", "/usr/bin/promtool")
}

fn rules_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/cipherbus.rules.yml")
}

/// One `- alert:` entry of the rules file, by line numbers.
struct Alert {
    name: String,
    /// The lines of its `expr: |` block (after the `expr:` line itself).
    expr: std::ops::Range<usize>,
    /// The `expr:` line's indentation.
    indent: usize,
    runbook: Option<String>,
    summary: bool,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The alerts of a rules file written as ours is: each expression a `|` block.
fn alerts(rules: &str) -> Vec<Alert> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.trim().strip_prefix("- alert:") else {
            continue;
        };
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.trim_start().starts_with("- alert:"))
            .map_or(lines.len(), |n| i + 1 + n);
        let expr_at = (i..end)
            .find(|&n| lines[n].trim() == "expr: |")
            .unwrap_or_else(|| panic!("alert {name}: no `expr: |` block"));
        let indent = indent_of(lines[expr_at]);
        let expr_end = (expr_at + 1..end)
            .find(|&n| !lines[n].trim().is_empty() && indent_of(lines[n]) <= indent)
            .unwrap_or(end);
        let field = |key: &str| {
            lines[i..end]
                .iter()
                .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
        };
        out.push(Alert {
            name: name.trim().to_owned(),
            expr: expr_at + 1..expr_end,
            indent,
            runbook: field("runbook:"),
            summary: field("summary:").is_some_and(|s| s.len() > 2),
        });
    }
    out
}

/// The rules file with one alert's expression replaced by `f(its lines)`.
fn with_expr(rules: &str, alert: &Alert, f: impl Fn(&[&str], &str) -> Vec<String>) -> String {
    let lines: Vec<&str> = rules.lines().collect();
    let pad = " ".repeat(alert.indent + 2);
    let mut out: Vec<String> = lines[..alert.expr.start]
        .iter()
        .map(|l| l.to_string())
        .collect();
    out.extend(f(&lines[alert.expr.clone()], &pad));
    out.extend(lines[alert.expr.end..].iter().map(|l| l.to_string()));
    out.join("\n") + "\n"
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// `promtool test rules` on a copy of the rules (as `rules`) and of their tests in `dir`.
fn promtool_test(promtool: &str, dir: &Path, rules: &str) -> std::process::Output {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cipherbus.rules.yml"), rules).unwrap();
    std::fs::write(dir.join("cipherbus.rules.test.yml"), RULE_TESTS).unwrap();
    Command::new(promtool)
        .args(["test", "rules"])
        .arg(dir.join("cipherbus.rules.test.yml"))
        .output()
        .expect("run promtool")
}

#[test]
fn the_alert_rules_check_and_their_unit_tests_catch_a_broken_expression() {
    let (_, promtool) = prometheus_bin();
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(rules_path())
        .output()
        .expect("run promtool");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let alerts = alerts(RULES);
    let names: Vec<&str> = alerts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "CipherbusKeyTooOld",
            "CipherbusProxyLagging",
            "CipherbusNoAuthority",
            "CipherbusForgedOrPlaintextMessages",
            "CipherbusKmsErrors",
            "CipherbusAuditFailures",
            "CipherbusConnectionCap",
        ]
    );
    assert!(
        text.contains(&format!("{} rules found", alerts.len())),
        "{text}"
    );

    // Each alert has a one-line summary and a runbook: a section of docs/OPERATIONS.md.
    let headings: BTreeSet<String> = OPERATIONS
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| anchor(h.trim_start_matches('#')))
        .collect();
    for a in &alerts {
        assert!(a.summary, "{}: no summary", a.name);
        let runbook = a.runbook.as_deref().unwrap_or_default();
        let section = runbook
            .strip_prefix("docs/OPERATIONS.md#")
            .unwrap_or_else(|| panic!("{}: runbook {runbook:?}", a.name));
        assert!(
            headings.contains(section),
            "{}: no section #{section} in docs/OPERATIONS.md",
            a.name
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let out = promtool_test(promtool, &dir.path().join("as-is"), RULES);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Each alert broken two ways must fail the unit tests: an expression that never fires
    // (its firing test fails), and one that fires whenever the real one is quiet (its quiet
    // test fails).
    let never = |_: &[&str], pad: &str| vec![format!("{pad}absent(vector(1))")];
    let always = |body: &[&str], pad: &str| {
        let mut v = vec![format!("{pad}(")];
        v.extend(body.iter().map(|l| format!("  {l}")));
        v.push(format!("{pad}) or on () vector(1)"));
        v
    };
    let survivors: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = alerts
            .iter()
            .flat_map(|a| {
                [
                    (a, "never", with_expr(RULES, a, never)),
                    (a, "always", with_expr(RULES, a, always)),
                ]
            })
            .map(|(a, how, rules)| {
                let dir = dir.path().join(format!("{}-{how}", a.name));
                s.spawn(move || {
                    let out = promtool_test(promtool, &dir, &rules);
                    let caught = !out.status.success()
                        && String::from_utf8_lossy(&out.stderr).contains("FAILED");
                    (!caught).then(|| format!("{} ({how})", a.name))
                })
            })
            .collect();
        runs.into_iter().filter_map(|r| r.join().unwrap()).collect()
    });
    assert!(
        survivors.is_empty(),
        "broken expressions the unit tests let pass: {survivors:?}"
    );
}

/// Every `expr` in the dashboard JSON, annotations included.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("the dashboard is JSON")
}

/// The metric names (ours and the standard `process_*`) an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !word(bytes[j]))
                .unwrap_or(bytes.len());
            let w = &expr[i..end];
            if w.starts_with("cipherbus_") || w.starts_with("process_") {
                names.insert(w.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every series name a proxy can export, with each family that appears only once something
/// happens (a refusal, a KMS call, an authority) given one series.
fn exported_names() -> BTreeSet<String> {
    use cipherbus::metrics::{Metrics, ReasonLabel, ScopeLabel};
    let m = Metrics::new();
    let reason = ReasonLabel { reason: "any" };
    let scope = ScopeLabel { scope: "default" };
    m.set_active_epoch("default", 1);
    m.scope_sealed("default", 1, 1);
    m.key_age.get_or_create(&scope).set(1);
    m.epochs
        .get_or_create(&cipherbus::metrics::StateLabel {
            scope: "default",
            state: "active",
        })
        .set(1);
    m.connections_refused.get_or_create(&reason).inc();
    m.control_refused("any");
    m.protocol_error("any");
    m.rotation_interval.get_or_create(&scope).set(1);
    m.authority_leader.get_or_create(&scope).set(1);
    m.authority_heard("default");
    m.epoch_sealed
        .get_or_create(&cipherbus::metrics::EpochLabel {
            scope: "default",
            epoch: 1,
        })
        .inc();
    cipherbus::kek::KMS_METRICS
        .requests
        .get_or_create(&cipherbus::kek::KmsLabel {
            op: "unwrap",
            outcome: "ok",
        })
        .inc();
    m.render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

fn unknown_names(exprs: &[String], exported: &BTreeSet<String>) -> Vec<String> {
    exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|n| !exported.contains(n))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[test]
fn every_metric_the_dashboard_and_the_rules_name_is_one_the_proxy_exports() {
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    let rules: Vec<String> = alerts(RULES)
        .iter()
        .map(|a| RULES.lines().collect::<Vec<_>>()[a.expr.clone()].join("\n"))
        .collect();
    assert!(exprs.len() > 30 && rules.len() == 7);
    let exported = exported_names();
    assert!(
        exported.contains("cipherbus_kms_requests_total"),
        "{exported:?}"
    );
    assert_eq!(
        unknown_names(&exprs, &exported),
        Vec::<String>::new(),
        "dashboard"
    );
    assert_eq!(
        unknown_names(&rules, &exported),
        Vec::<String>::new(),
        "rules"
    );
    // What each row is for: traffic, refusals, keys, KMS calls, the cap, the processes.
    let all: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for needed in [
        "cipherbus_messages_sealed_total",
        "cipherbus_opened_bytes_total",
        "cipherbus_open_failures_total",
        "cipherbus_denied_total",
        "cipherbus_connections_refused_total",
        "cipherbus_active_epoch",
        "cipherbus_key_age_seconds",
        "cipherbus_kms_requests_total",
        "cipherbus_kms_request_duration_seconds_bucket",
        "cipherbus_max_connections",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(all.contains(needed), "no panel reads {needed}");
    }

    // Importable: a data source variable every query uses, job and instance variables, and
    // panels that fit Grafana's 24-column grid with ids of their own.
    let d = dashboard();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance"]);
    assert_eq!(d["templating"]["list"][0]["type"], "datasource");
    assert_eq!(d["templating"]["list"][0]["query"], "prometheus");
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "panel id twice");
        let g = &p["gridPos"];
        assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24);
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            }
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus process on a free port, killed on drop.
struct Prometheus {
    process: Spawned,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second as job `cipherbus`, with the rules
    /// file loaded. Does not wait for it.
    fn spawn(bin: &str, targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: cipherbus\n    static_configs:\n      - targets: [{}]\n",
            rules_path().display(),
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let process = Spawned::spawn(
            Command::new(bin)
                .arg("--config.file")
                .arg(dir.path().join("prometheus.yml"))
                .arg("--storage.tsdb.path")
                .arg(dir.path().join("data"))
                .arg("--web.listen-address")
                .arg(addr.to_string())
                .stdout(std::process::Stdio::null()),
        );
        Prometheus {
            process,
            addr,
            _dir: dir,
        }
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while http_get(self.addr, "/-/ready").is_none_or(|b| !b.contains("Ready")) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "Prometheus did not start: {}",
                self.process.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /api/v1/<path>`'s `data`.
    fn api(&self, path: &str) -> Value {
        let body = http_get(self.addr, &format!("/api/v1/{path}"))
            .unwrap_or_else(|| panic!("no answer to {path}"));
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's samples.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api(&format!("query?query={}", encode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `f` until it holds; otherwise fails with what `f` last reported.
    fn until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Result<(), String>) {
        let start = Instant::now();
        loop {
            match f() {
                Ok(()) => return,
                Err(e) if start.elapsed() > timeout => panic!("{what}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// Whether a sample's value is a number (`histogram_quantile` of no calls is NaN, which a
/// panel cannot draw).
fn finite(sample: &Value) -> bool {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(f64::is_finite)
}

/// Replaces Grafana's variables as a dashboard with these selections would.
fn substitute(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut e = expr.to_owned();
    // Longest names first, so `$__rate_interval` is not read as `$__rate` or the like.
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in vars {
        e = e.replace(&format!("${{{name}}}"), value);
        e = e.replace(&format!("${name}"), value);
    }
    assert!(!e.contains('$'), "a variable the test does not know: {e}");
    e
}

#[test]
fn a_real_prometheus_scraping_two_proxies_answers_every_dashboard_query_and_no_alert_fires() {
    let (prometheus, _) = prometheus_bin();
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path(), TEST_KEK);
    std::fs::create_dir(dir.path().join("tenant-a")).unwrap();
    let tenant_kek = write_kek(&dir.path().join("tenant-a"), [0x17; 32]);
    // A fast heartbeat, and a named scope beside the default one. The named scope rotates on
    // a schedule (so key age has something to be compared with); the default one has none,
    // and every panel must still show it.
    let config = dir.path().join("cipherbus.toml");
    std::fs::write(
        &config,
        format!(
            "[rotation]\nheartbeat_every = \"1s\"\n\n\
             [[scope]]\nname = \"tenant-a\"\nsubjects = [\"tenant-a.>\"]\nkek = \"file:{}\"\n\
             [scope.rotation]\nrotate_every = \"1h\"\n",
            tenant_kek.display()
        ),
    )
    .unwrap();
    let proxy = |name: &str, controller: bool| {
        let mut cmd = run_command(BIN, &kek, &[server.url()], Some(&dir.path().join(name)));
        cmd.arg("--config").arg(&config);
        if controller {
            cmd.arg("--controller");
        }
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        ProxyProcess::spawn(cmd, listen)
    };
    let a = proxy("a", true);
    let b = proxy("b", false);
    let prom = Prometheus::spawn(prometheus, &[a.admin, b.admin]);
    let heard = |p: &ProxyProcess| {
        ["default", "tenant-a"].iter().all(|s| {
            p.metric(&format!(
                "cipherbus_authority_last_seen_timestamp_seconds{{scope=\"{s}\"}}"
            ))
            .is_some_and(|t| t > 0.0)
        })
    };
    let start = Instant::now();
    while !(heard(&a) && heard(&b)) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the proxies never heard their authority: {}\n{}",
            a.stderr(),
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Agents on both sides publish and subscribe, in both scopes, until the test ends; one
    // publishes on the control prefix, which the deny rule refuses.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (on_a, on_b) = rt.block_on(async {
        let on_a = async_nats::connect(a.url()).await.unwrap();
        let on_b = async_nats::connect(b.url()).await.unwrap();
        (on_a, on_b)
    });
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for (publisher, subscriber) in [(on_a.clone(), on_b.clone()), (on_b.clone(), on_a.clone())] {
        let received = received.clone();
        rt.block_on(async {
            use futures::StreamExt;
            let inbox = format!("obs.{}", publisher.new_inbox().replace('.', "_"));
            let mut subs = futures::stream::select(
                subscriber.subscribe(format!("{inbox}.>")).await.unwrap(),
                subscriber
                    .subscribe(format!("tenant-a.{inbox}"))
                    .await
                    .unwrap(),
            );
            sync(&subscriber).await;
            tokio::spawn(async move {
                while subs.next().await.is_some() {
                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            tokio::spawn(async move {
                loop {
                    for subject in [format!("{inbox}.x"), format!("tenant-a.{inbox}")] {
                        if publisher.publish(subject, "payload".into()).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        });
    }
    rt.block_on(async {
        on_a.publish("cipherbus.ctl.x", "no".into()).await.unwrap();
        on_a.flush().await.unwrap();
    });
    prom.wait_ready();

    // A rotation once Prometheus has seen epoch 1 on both proxies, for the annotations.
    prom.until(
        "both proxies scraped twice",
        Duration::from_secs(20),
        || {
            let n =
                prom.query("count_over_time(cipherbus_active_epoch{scope=\"default\"}[1m]) >= 2");
            (n.len() == 2).then_some(()).ok_or(format!("{n:?}"))
        },
    );
    let out = Command::new(BIN)
        .args([
            "rotate",
            "--timeout",
            "20s",
            "--upstream",
            &server.url(),
            "--kek-file",
        ])
        .arg(&kek)
        .output()
        .expect("run cipherbus rotate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    prom.until(
        "epoch 2 scraped from both proxies",
        Duration::from_secs(10),
        || {
            let n = prom.query("cipherbus_active_epoch{scope=\"default\"} == 2");
            (n.len() == 2).then_some(()).ok_or(format!("{n:?}"))
        },
    );
    assert!(received.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // Every dashboard query, with the variables set as a dashboard showing both proxies
    // would set them, returns numbers while traffic flows.
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    assert_eq!(
        unknown_names(&exprs, &exported_names()),
        Vec::<String>::new(),
        "the dashboard reads metrics no proxy exports"
    );
    let instances = format!("{}|{}", a.admin, b.admin);
    let vars = [
        ("datasource", "unused"),
        ("job", "cipherbus"),
        ("instance", instances.as_str()),
        ("__rate_interval", "30s"),
        ("__interval", "15s"),
    ];
    prom.until(
        "every dashboard query has data",
        Duration::from_secs(15),
        || {
            let empty: Vec<&String> = exprs
                .iter()
                .filter(|e| !prom.query(&substitute(e, &vars)).iter().any(finite))
                .collect();
            empty
                .is_empty()
                .then_some(())
                .ok_or(format!("no data for {empty:#?}"))
        },
    );
    // Every scope has its schedule on the key-age panel: the named scope's rotate_every, and
    // 0 (shown as "no schedule") for the default scope, which has none.
    let schedule = exprs
        .iter()
        .find(|e| e.contains("cipherbus_rotation_interval_seconds"))
        .expect("the key-age panel reads rotate_every");
    let by_scope: BTreeSet<(String, String)> = prom
        .query(&substitute(schedule, &vars))
        .iter()
        .map(|r| {
            (
                r["metric"]["scope"].as_str().unwrap_or_default().to_owned(),
                r["value"][1].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        by_scope,
        BTreeSet::from([
            ("default".to_owned(), "0".to_owned()),
            ("tenant-a".to_owned(), "3600".to_owned())
        ]),
        "{schedule}"
    );
    let mapped = serde_json::to_string(&dashboard()).unwrap();
    assert!(
        mapped.contains("\"no schedule\""),
        "the dashboard names the 0"
    );

    // The template variables' own queries list both proxies.
    for var in dashboard()["templating"]["list"].as_array().unwrap() {
        let Some(def) = var["definition"].as_str() else {
            continue;
        };
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{def}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector = substitute(selector.trim(), &vars);
        let values = prom.api(&format!(
            "label/{}/values?match[]={}",
            label.trim(),
            encode(&selector)
        ));
        let n = values.as_array().map_or(0, Vec::len);
        let want = if label.trim() == "instance" { 2 } else { 1 };
        assert_eq!(n, want, "{def}: {values}");
    }

    // Every rule loaded, evaluated and healthy; in this steady state none has anything to
    // say: each expression is empty and no alert is pending or firing.
    let want: BTreeSet<String> = alerts(RULES).into_iter().map(|a| a.name).collect();
    prom.until(
        "every rule healthy and quiet",
        Duration::from_secs(15),
        || {
            let groups = prom.api("rules?type=alert");
            let rules: Vec<Value> = groups["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let names: BTreeSet<String> = rules
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(names, want);
            let mut problems = Vec::new();
            for r in &rules {
                let name = r["name"].as_str().unwrap();
                if r["health"] != "ok" {
                    problems.push(format!("{name}: {} {}", r["health"], r["lastError"]));
                }
                if r["state"] != "inactive" {
                    problems.push(format!("{name} is {}: {}", r["state"], r["alerts"]));
                }
                let result = prom.query(r["query"].as_str().unwrap());
                if !result.is_empty() {
                    problems.push(format!("{name} has {result:?}"));
                }
            }
            problems
                .is_empty()
                .then_some(())
                .ok_or(format!("{problems:#?}"))
        },
    );
    assert_eq!(prom.api("alerts")["alerts"], Value::Array(vec![]));
    drop(rt);
}
