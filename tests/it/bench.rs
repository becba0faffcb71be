//! `cipherbus bench`: a short real run of all three paths, its JSON, and its argument errors;
//! the same with the root in OpenBao's transit engine. What the numbers are is for
//! docs/PERFORMANCE.md; here only that they are measured.

use std::path::Path;
use std::process::Command;

use crate::support::kms::Bao;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");

/// `cipherbus` with no KMS settings inherited from whoever runs the tests.
fn cipherbus() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "VAULT_ADDR",
        "VAULT_TOKEN",
        "VAULT_TOKEN_FILE",
        "SOFTHSM2_CONF",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn bench(args: &[&str]) -> std::process::Output {
    bench_with(cipherbus(), args)
}

fn bench_with(mut cmd: Command, args: &[&str]) -> std::process::Output {
    cmd.arg("bench")
        .args(args)
        .arg("--nats-server")
        .arg(crate::support::nats_server_bin())
        .output()
        .expect("run cipherbus bench")
}

/// `cipherbus` reaching `bao` with a token file, as a deployment would.
fn with_bao(bao: &Bao, token_file: &Path) -> Command {
    let mut cmd = cipherbus();
    cmd.env("VAULT_ADDR", &bao.addr)
        .env("VAULT_TOKEN_FILE", token_file);
    cmd
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let pointer: String = path.iter().map(|p| format!("/{p}")).collect();
    v.pointer(&pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn a_short_run_measures_every_path_and_prints_json() {
    let out = bench(&[
        "--sizes",
        "128,4KiB",
        "--duration",
        "300ms",
        "--rounds",
        "1",
        "--rate",
        "2000",
        "--latency-duration",
        "500ms",
        "--rotate-every",
        "100ms",
        "--idle-connections",
        "20",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let sizes = v["sizes"].as_array().expect("sizes");
    assert_eq!(sizes.len(), 2);
    for (s, want) in sizes.iter().zip([128.0, 4096.0]) {
        assert_eq!(num(s, &["size"]), want);
        for path in ["direct", "forwarder", "cipherbus", "cipherbus+rotation"] {
            let p = &s["paths"][path];
            assert!(num(p, &["msgs_per_sec"]) > 0.0, "{path}: {p}");
            let run = &p["runs"][0];
            // Every published message was counted at the subscriber.
            assert!(num(run, &["messages"]) > 0.0, "{path}: {p}");
            if path != "cipherbus+rotation" {
                assert!(num(p, &["latency_us", "samples"]) >= 900.0, "{path}: {p}");
                let (p50, p999) = (
                    num(p, &["latency_us", "p50"]),
                    num(p, &["latency_us", "p99_9"]),
                );
                assert!(p50 > 0.0 && p50 <= p999, "{path}: {p}");
            }
            if path != "direct" {
                assert!(num(p, &["peak_rss_kib", "0"]) > 1000.0, "{path}: {p}");
                let cpu = num(p, &["cpu_seconds_per_million", "total"]);
                // CPU time comes in 10 ms clock ticks: the forwarders of a 300 ms run can
                // stay under one, the proxies, which seal and open, do not.
                if path == "forwarder" {
                    assert!(cpu >= 0.0 && cpu.is_finite(), "{path}: {p}");
                } else {
                    assert!(cpu > 0.0, "{path}: {p}");
                }
            }
        }
        assert!(num(&s["paths"]["cipherbus+rotation"], &["rotations"]) >= 1.0);
        for r in [
            "cipherbus_over_forwarder",
            "cipherbus_over_direct",
            "rotating_over_cipherbus",
        ] {
            let x = num(&s["ratios"], &[r]);
            assert!(x.is_finite() && x > 0.0, "{r} = {x}");
        }
    }
    // The root was the key file made for the run: no KMS, no JetStream, no KMS calls.
    assert_eq!(v["root"]["kind"], "file", "{}", v["root"]);
    assert_eq!(v["root"]["jetstream"], false);
    for path in ["cipherbus", "cipherbus+rotation"] {
        let p = &sizes[0]["paths"][path];
        assert_eq!(
            p["runs"][0]["kms_requests"],
            serde_json::json!([0, 0]),
            "{path}: {p}"
        );
    }
    assert!(sizes[0]["paths"]["forwarder"]["runs"][0]
        .get("kms_requests")
        .is_none());
    let idle = &v["idle_connections"];
    assert_eq!(num(idle, &["connections"]), 20.0);
    assert!(num(idle, &["idle_rss_kib"]) > 1000.0, "{idle}");
    assert!(v["nats_server"].as_str().unwrap_or("").contains("2.15.1"));
}

#[test]
fn table_output_names_the_paths_and_ratios() {
    let out = bench(&[
        "--sizes", "256", "--count", "2000", "--rounds", "1", "--rate", "0",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "root key: file (a key file made for this run)",
        "== 256 B payloads",
        "direct",
        "forwarder",
        "cipherbus",
        "cipherbus/forwarder",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
}

#[test]
fn bad_arguments_are_refused_with_exit_2() {
    for (args, needle) in [
        (&["--sizes", "3"][..], "--sizes"),
        (&["--sizes", "12parsecs"][..], "--sizes"),
        (&["--duration", "soon"][..], "--duration"),
        (&["--pubs", "0"][..], "at least 1"),
        (&["--kek", "/etc/kek"][..], "--kek"),
        (&["--kek", "gcp-kms:x"][..], "--kek"),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = Command::new(BIN)
        .args(["bench", "--nats-server", "/nonexistent/nats-server"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start nats-server"));
}

/// Calls a proxy makes to the KMS when it starts: the check, the seed's unwrap, and the seed's
/// wrap by the first proxy of a deployment. Kept loose: the point is that it is a constant.
const START_CALLS: u64 = 4;
/// Messages per run in the KMS test: far more than any count of calls at start.
const MESSAGES: u64 = 10_000;

/// With the root in OpenBao's transit engine the bench runs the same paths: its server with
/// JetStream for the deployment seeds, its proxies on `--kek vault-transit:`, reaching OpenBao
/// through the environment they inherit. Each proxy calls the KMS when it starts (and the
/// rotating pair a few times per rotation), never per message: the calls, read from each
/// proxy's own `cipherbus_kms_requests_total`, are the same few whatever the message count.
#[test]
fn a_vault_transit_root_is_called_at_start_and_rotation_never_per_message() {
    let bao = Bao::dev();
    bao.enable_transit();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = bao.write_token_file(dir.path());
    let out = with_bao(&bao, &token)
        .args(["keygen", "--kek", "vault-transit:cipherbus"])
        .output()
        .expect("run keygen");
    assert!(
        out.status.success(),
        "keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let count = MESSAGES.to_string();
    let out = bench_with(
        with_bao(&bao, &token),
        &[
            "--kek",
            "vault-transit:cipherbus",
            "--sizes",
            "1KiB",
            "--count",
            &count,
            "--rounds",
            "1",
            "--rate",
            "0",
            "--rotate-every",
            "50ms",
            "--json",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let root = &v["root"];
    assert_eq!(root["kind"], "vault-transit", "{root}");
    assert_eq!(
        root["uri"], "vault-transit:cipherbus?mount=transit",
        "{root}"
    );
    assert_eq!(root["jetstream"], true, "{root}");
    let size = &v["sizes"][0];
    assert!(
        num(&size["ratios"], &["cipherbus_over_forwarder"]) > 0.0,
        "{size}"
    );
    for path in ["cipherbus", "cipherbus+rotation"] {
        let p = &size["paths"][path];
        assert!(num(p, &["msgs_per_sec"]) > 0.0, "{path}: {p}");
        let run = &p["runs"][0];
        assert_eq!(num(run, &["messages"]), MESSAGES as f64, "{path}: {p}");
        let (publisher, subscriber) = (
            num(run, &["kms_requests", "0"]) as u64,
            num(run, &["kms_requests", "1"]) as u64,
        );
        // Both proxies opened the root through the KMS.
        assert!(publisher >= 1 && subscriber >= 1, "{path}: {p}");
        let rotations = if path == "cipherbus" {
            0
        } else {
            // One more may have been under way when the run ended.
            num(p, &["rotations"]) as u64 + 1
        };
        let bound = 2 * START_CALLS + 4 * rotations;
        assert!(
            publisher + subscriber <= bound,
            "{path}: {publisher}+{subscriber} KMS calls for {MESSAGES} messages \
             (at most {bound} expected): {p}"
        );
    }

    // The tables name the root and the calls.
    let out = bench_with(
        with_bao(&bao, &token),
        &[
            "--kek",
            "vault-transit:cipherbus",
            "--sizes",
            "256",
            "--count",
            "2000",
            "--rounds",
            "1",
            "--rate",
            "0",
            "--paths",
            "forwarder,cipherbus",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "root key: vault-transit (vault-transit:cipherbus?mount=transit)",
        "cipherbus/forwarder",
        "vault-transit calls by the proxies (start and rotation only): cipherbus ",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }

    // A root that is not there stops the bench before anything starts, in one sentence.
    let out = bench_with(
        with_bao(&bao, &token),
        &["--kek", "vault-transit:missing", "--sizes", "128"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the root is not usable") && stderr.contains("no such key"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
