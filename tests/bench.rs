//! `cipherbus bench`: a short real run of all three paths, its JSON, and its argument errors.
//! What the numbers are is for docs/PERFORMANCE.md; here only that they are measured.

mod support;

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cipherbus");

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--nats-server")
        .arg(support::nats_server_bin())
        .output()
        .expect("run cipherbus bench")
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
