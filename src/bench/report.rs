//! The results: medians over rounds, ratios between the paths, and the printed table and JSON.

use super::*;

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[derive(Debug, Default)]
pub(super) struct PathResult {
    pub(super) runs: Vec<Throughput>,
    pub(super) latency: Option<Latency>,
    pub(super) idle_rss_kib: u64,
    pub(super) peak_rss_kib: [u64; 2],
    pub(super) rotations: u64,
}

impl PathResult {
    pub(super) fn rate(&self) -> f64 {
        median(self.runs.iter().map(Throughput::rate).collect())
    }

    /// KMS calls of the proxies over every throughput run, and the messages they carried.
    pub(super) fn kms_totals(&self) -> Option<(u64, u64)> {
        self.runs
            .iter()
            .try_fold((0, 0), |(calls, messages), r| {
                r.kms.map(|k| (calls + k[0] + k[1], messages + r.messages))
            })
            .filter(|_| !self.runs.is_empty())
    }

    /// Proxy CPU seconds per million messages, each hop, median over the runs.
    pub(super) fn cpu_per_million(&self, hop: usize) -> f64 {
        median(
            self.runs
                .iter()
                .map(|r| r.cpu[hop] / r.messages as f64 * 1e6)
                .collect(),
        )
    }

    pub(super) fn to_json(&self, kind: &str, size: usize, hops: bool) -> Value {
        let rate = self.rate();
        let mut v = json!({
            "msgs_per_sec": rate.round(),
            "mb_per_sec": rate * size as f64 / 1e6,
            "runs": self.runs.iter().map(|r| {
                let mut run = json!({
                    "messages": r.messages, "seconds": r.seconds, "msgs_per_sec": r.rate().round(),
                    "cpu_seconds": r.cpu, "rss_kib_each_second": r.rss,
                });
                if let Some(k) = r.kms {
                    run["kms_requests"] = json!(k);
                }
                run
            }).collect::<Vec<_>>(),
        });
        if let Some((calls, messages)) = self.kms_totals() {
            v["kms_requests"] = json!({
                "total": calls,
                "messages": messages,
                "max_per_run": self.runs.iter().filter_map(|r| r.kms).map(|k| k[0] + k[1]).max(),
            });
        }
        if let Some(l) = self.latency {
            v["latency_us"] = json!({"rate": l.rate, "samples": l.samples, "p50": l.p50, "p99": l.p99, "p99_9": l.p999});
        }
        if hops {
            v["cpu_seconds_per_million"] = json!({
                "publisher_side": self.cpu_per_million(0),
                "subscriber_side": self.cpu_per_million(1),
                "total": self.cpu_per_million(0) + self.cpu_per_million(1),
            });
            v["peak_rss_kib"] = json!(self.peak_rss_kib);
            v["idle_rss_kib"] = json!(self.idle_rss_kib);
        }
        if kind == "cipherbus+rotation" {
            v["rotations"] = json!(self.rotations);
        }
        v
    }
}

pub(super) fn human_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

pub(super) fn human_size(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

pub(super) fn print_size(size: usize, results: &[(String, PathResult)], root: &BenchRoot) {
    println!("\n== {} payloads", human_size(size));
    println!(
        "{:<19} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14} {:>17}",
        "path", "msgs/s", "MB/s", "p50", "p99", "p99.9", "CPU s/M msgs", "peak RSS MiB"
    );
    for (name, r) in results {
        let rate = r.rate();
        let (p50, p99, p999) = r.latency.map_or(("-".into(), "-".into(), "-".into()), |l| {
            (
                format!("{:.0}µs", l.p50),
                format!("{:.0}µs", l.p99),
                format!("{:.0}µs", l.p999),
            )
        });
        let (cpu, rss) = if name == "direct" {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{:.2}+{:.2}", r.cpu_per_million(0), r.cpu_per_million(1)),
                format!(
                    "{:.1} / {:.1}",
                    r.peak_rss_kib[0] as f64 / 1024.0,
                    r.peak_rss_kib[1] as f64 / 1024.0
                ),
            )
        };
        println!(
            "{:<19} {:>9} {:>9.1} {:>9} {:>9} {:>9} {:>14} {:>17}",
            name,
            human_rate(rate),
            rate * size as f64 / 1e6,
            p50,
            p99,
            p999,
            cpu,
            rss
        );
    }
    for line in ratio_lines(results) {
        println!("{line}");
    }
    if root.is_kms() {
        let calls: Vec<String> = results
            .iter()
            .filter_map(|(name, r)| {
                let (calls, messages) = r.kms_totals()?;
                Some(format!(
                    "{name} {calls} over {} messages",
                    human_rate(messages as f64)
                ))
            })
            .collect();
        if !calls.is_empty() {
            println!(
                "{} calls by the proxies (start and rotation only): {}",
                root.kind(),
                calls.join(", ")
            );
        }
    }
    for (name, r) in results {
        for run in r.runs.iter().filter(|run| run.rss.len() >= 20) {
            let (first, last) = drift(&run.rss);
            println!(
                "{name}: RSS over a {:.0} s run, first tenth -> last tenth (MiB): publisher side {:.1} -> {:.1}, subscriber side {:.1} -> {:.1}",
                run.seconds,
                first[0] as f64 / 1024.0,
                last[0] as f64 / 1024.0,
                first[1] as f64 / 1024.0,
                last[1] as f64 / 1024.0,
            );
        }
    }
    if let Some(r) = find(results, "cipherbus+rotation") {
        println!(
            "cipherbus+rotation: {} completed rotations over {} run(s)",
            r.rotations,
            r.runs.len()
        );
    }
}

/// The largest RSS of each hop in the first and in the last tenth of a run's samples.
pub(super) fn drift(rss: &[[u64; 2]]) -> ([u64; 2], [u64; 2]) {
    let tenth = (rss.len() / 10).max(1);
    let max = |rows: &[[u64; 2]]| {
        rows.iter()
            .fold([0, 0], |m, r| [m[0].max(r[0]), m[1].max(r[1])])
    };
    // The first sample is taken before any traffic.
    let from = 1.min(rss.len());
    (
        max(&rss[from..(from + tenth).min(rss.len())]),
        max(&rss[rss.len() - tenth..]),
    )
}

pub(super) fn find<'a>(results: &'a [(String, PathResult)], name: &str) -> Option<&'a PathResult> {
    results.iter().find(|(n, _)| n == name).map(|(_, r)| r)
}

pub(super) fn ratios(results: &[(String, PathResult)]) -> Value {
    let rate = |n: &str| find(results, n).map(PathResult::rate);
    let mut v = json!({});
    if let (Some(c), Some(f)) = (rate("cipherbus"), rate("forwarder")) {
        v["cipherbus_over_forwarder"] = json!(c / f);
    }
    if let (Some(c), Some(d)) = (rate("cipherbus"), rate("direct")) {
        v["cipherbus_over_direct"] = json!(c / d);
    }
    if let (Some(f), Some(d)) = (rate("forwarder"), rate("direct")) {
        v["forwarder_over_direct"] = json!(f / d);
    }
    if let (Some(r), Some(c)) = (rate("cipherbus+rotation"), rate("cipherbus")) {
        v["rotating_over_cipherbus"] = json!(r / c);
    }
    if let (Some(b), Some(f)) = (rate("cipherbus-batched"), rate("forwarder")) {
        v["batched_over_forwarder"] = json!(b / f);
    }
    if let (Some(b), Some(c)) = (rate("cipherbus-batched"), rate("cipherbus")) {
        v["batched_over_cipherbus"] = json!(b / c);
    }
    let p99 = |n: &str| find(results, n).and_then(|r| r.latency).map(|l| l.p99);
    if let (Some(c), Some(d)) = (p99("cipherbus"), p99("direct")) {
        v["cipherbus_p99_added_us"] = json!(c - d);
    }
    if let (Some(f), Some(d)) = (p99("forwarder"), p99("direct")) {
        v["forwarder_p99_added_us"] = json!(f - d);
    }
    if let (Some(b), Some(d)) = (p99("cipherbus-batched"), p99("direct")) {
        v["batched_p99_added_us"] = json!(b - d);
    }
    v
}

pub(super) fn ratio_lines(results: &[(String, PathResult)]) -> Vec<String> {
    let r = ratios(results);
    let mut out = Vec::new();
    let get = |k: &str| r.get(k).and_then(Value::as_f64);
    let mut parts = Vec::new();
    for (k, label) in [
        ("cipherbus_over_forwarder", "cipherbus/forwarder"),
        ("cipherbus_over_direct", "cipherbus/direct"),
        ("forwarder_over_direct", "forwarder/direct"),
        ("rotating_over_cipherbus", "rotating/steady"),
        ("batched_over_forwarder", "cipherbus-batched/forwarder"),
        ("batched_over_cipherbus", "batched/audited"),
    ] {
        if let Some(x) = get(k) {
            parts.push(format!("{label} {x:.2}"));
        }
    }
    if !parts.is_empty() {
        out.push(format!("throughput ratios: {}", parts.join(", ")));
    }
    if let Some(x) = get("cipherbus_p99_added_us") {
        let f = get("forwarder_p99_added_us")
            .map(|f| format!(" (forwarder {f:+.0}µs)"))
            .unwrap_or_default();
        let b = get("batched_p99_added_us")
            .map(|b| format!(", cipherbus-batched {b:+.0}µs"))
            .unwrap_or_default();
        out.push(format!("p99 added over direct: cipherbus {x:+.0}µs{b}{f}"));
    }
    out
}

pub(super) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({"cpu": cpu, "cores": cores, "os": std::env::consts::OS, "arch": std::env::consts::ARCH})
}
