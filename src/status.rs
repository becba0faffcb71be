//! `cipherbus status`: the fleet at a glance, as the acting key authority of one scope sees it.
//!
//! This module owns asking for the status and showing it, as a table or as JSON; the authority
//! builds the answer (`control::authority`). When no authority answers, it shows the reports
//! the proxies themselves sent meanwhile, so the fleet stays visible while the authority is out.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::control::authority::{ask, report_subject, status_subject};
use crate::control::message::{self, Body, ControlSealer, ProxyStatus, Status};
use crate::envelope::{DataKey, Opener};

/// One look at the fleet.
#[derive(Debug)]
pub struct Look {
    pub status: Option<Status>,
    /// Why there is no status, as one sentence.
    pub error: Option<String>,
    /// Without a status: the proxies heard directly, from their reports.
    pub heard: Vec<ProxyStatus>,
}

/// Asks the acting authority under `prefix`, waiting up to `wait`. Without an answer, listens
/// to the proxies' reports for the rest of `wait`.
pub async fn look(
    client: &async_nats::Client,
    sealer: &mut ControlSealer,
    control_key: &DataKey,
    prefix: &str,
    wait: Duration,
) -> Look {
    let until = tokio::time::Instant::now() + wait;
    let mut reports = match client.subscribe(report_subject(prefix)).await {
        Ok(s) => s,
        Err(e) => {
            return Look {
                status: None,
                error: Some(format!("cannot listen on the bus: {e}")),
                heard: Vec::new(),
            }
        }
    };
    let asked = tokio::time::timeout_at(
        until,
        ask(
            client,
            sealer,
            control_key,
            status_subject(prefix),
            Body::StatusRequest {},
        ),
    )
    .await;
    let error = match asked {
        Ok(Ok(Body::StatusReply(status))) => {
            return Look {
                status: Some(status),
                error: None,
                heard: Vec::new(),
            }
        }
        Ok(Ok(_)) => "the key authority answered with something else".to_owned(),
        // Nobody listens for status requests: no authority, or one older than `status`.
        Ok(Err(e)) if e.starts_with("no key authority is running") => format!(
            "no key authority answered on {prefix} (none is running, or it is a version without `status`)"
        ),
        Ok(Err(e)) => e,
        Err(_) => format!(
            "no key authority answered on {prefix} within {wait:?} (none is running, or the one running stands by)"
        ),
    };
    let mut opener = Opener::new();
    let subject = report_subject(prefix);
    let mut latest: HashMap<String, (Instant, message::Report)> = HashMap::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(until, reports.next()).await {
        if let Ok(msg) = message::open(&mut opener, control_key, &subject, &m.payload) {
            if let Body::Report(r) = msg.body {
                latest.insert(msg.from, (Instant::now(), r));
            }
        }
    }
    let newest = latest.values().map(|(_, r)| r.active).max().unwrap_or(0);
    let mut heard: Vec<ProxyStatus> = latest
        .into_iter()
        .map(|(node, (at, r))| ProxyStatus {
            node,
            host: r.host,
            version: r.version,
            active: r.active,
            last_seen_ms: at.elapsed().as_millis() as u64,
            silent: false,
            lagging: r.active < newest,
            connections: r.connections,
            sealed_messages: r.sealed_messages,
            opened_messages: r.opened_messages,
            refused: r.refused,
            interval_ms: 0,
            sealed_in_interval: 0,
            opened_in_interval: 0,
            refused_in_interval: Default::default(),
        })
        .collect();
    heard.sort_by(|a, b| a.node.cmp(&b.node));
    Look {
        status: None,
        error: Some(error),
        heard,
    }
}

/// The look as one JSON object: the authority's status with `scope` and `prefix` added, or,
/// without one, `authority: null`, the `error` and the proxies heard.
pub fn json(scope: &str, prefix: &str, look: &Look) -> serde_json::Value {
    match &look.status {
        Some(status) => {
            let mut v = serde_json::to_value(status).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("scope".into(), scope.into());
                o.insert("prefix".into(), prefix.into());
            }
            v
        }
        None => serde_json::json!({
            "scope": scope,
            "prefix": prefix,
            "authority": null,
            "error": look.error,
            "proxies": look.heard,
        }),
    }
}

fn time(secs: u64) -> String {
    crate::audit::rfc3339(secs, 0)
}

fn ago(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn per_second(n: u64, interval_ms: u64) -> String {
    if interval_ms == 0 {
        return "-".to_owned();
    }
    format!("{:.1}", n as f64 * 1000.0 / interval_ms as f64)
}

fn reasons(refused: &std::collections::BTreeMap<String, u64>) -> String {
    if refused.is_empty() {
        return "-".to_owned();
    }
    refused
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The look as a table for a terminal.
pub fn table(scope: &str, prefix: &str, look: &Look) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "scope      {scope} (control prefix {prefix})");
    let rows = match &look.status {
        Some(s) => {
            let standby = if s.standby.is_empty() {
                "none".to_owned()
            } else {
                s.standby.join(", ")
            };
            let _ = writeln!(
                out,
                "authority  {} on {} (acting since {}); standby: {standby}",
                s.authority,
                if s.host.is_empty() { "?" } else { &s.host },
                crate::audit::rfc3339(s.acting_since_ms / 1000, 0),
            );
            let _ = writeln!(
                out,
                "epoch      {} active{}",
                s.active,
                s.activated
                    .map(|t| format!(" since {}", time(t)))
                    .unwrap_or_default()
            );
            let sch = &s.schedule;
            let next = match (sch.next, sch.why.as_deref()) {
                (Some(t), Some("usage")) => {
                    format!(
                        "{} (usage: a limit is reached at the current rate)",
                        time(t)
                    )
                }
                (Some(t), _) => format!(
                    "{} (time: every {}s)",
                    time(t),
                    sch.rotate_every_s.unwrap_or_default()
                ),
                (None, _) => "on command only (no schedule and no usage limit met yet)".into(),
            };
            let _ = writeln!(out, "next       rotation {next}");
            let mut usage = format!(
                "{} messages, {} bytes sealed under epoch {}",
                sch.sealed_messages, sch.sealed_bytes, s.active
            );
            if let Some(m) = sch.max_messages {
                let _ = write!(usage, "; rotates at {m} messages");
            }
            if let Some(b) = sch.max_bytes {
                let _ = write!(usage, "; rotates at {b} bytes");
            }
            let _ = writeln!(out, "usage      {usage}");
            &s.proxies
        }
        None => {
            let _ = writeln!(
                out,
                "authority  none: {}",
                look.error.as_deref().unwrap_or("no answer")
            );
            let _ = writeln!(out, "proxies heard on {prefix} meanwhile:");
            &look.heard
        }
    };
    let _ = writeln!(
        out,
        "\n{:<20} {:<16} {:<8} {:>5} {:>5} {:<8} {:>6} {:>9} {:>9}  REFUSED",
        "NODE", "HOST", "VERSION", "EPOCH", "SEEN", "STATE", "CONNS", "SEALED/s", "OPENED/s"
    );
    for p in rows {
        let state = match (p.silent, p.lagging) {
            (true, _) => "silent",
            (false, true) => "lagging",
            _ => "ok",
        };
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<8} {:>5} {:>5} {:<8} {:>6} {:>9} {:>9}  {}",
            p.node,
            if p.host.is_empty() { "?" } else { &p.host },
            if p.version.is_empty() {
                "?"
            } else {
                &p.version
            },
            p.active,
            ago(p.last_seen_ms),
            state,
            p.connections,
            per_second(p.sealed_in_interval, p.interval_ms),
            per_second(p.opened_in_interval, p.interval_ms),
            reasons(&p.refused_in_interval),
        );
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no proxy heard)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(node: &str, active: u32, lagging: bool) -> ProxyStatus {
        ProxyStatus {
            node: node.into(),
            host: "h".into(),
            version: "0.1.0".into(),
            active,
            last_seen_ms: 1500,
            silent: false,
            lagging,
            connections: 3,
            sealed_messages: 10,
            opened_messages: 9,
            refused: [("auth".to_owned(), 2)].into(),
            interval_ms: 5000,
            sealed_in_interval: 50,
            opened_in_interval: 25,
            refused_in_interval: [("auth".to_owned(), 2)].into(),
        }
    }

    #[test]
    fn the_table_shows_rates_states_and_refusals() {
        let look = Look {
            status: Some(Status {
                authority: "authority-1".into(),
                host: "h".into(),
                acting_since_ms: 0,
                standby: vec!["authority-2".into()],
                active: 4,
                activated: Some(0),
                schedule: message::Schedule {
                    next: Some(3600),
                    why: Some("time".into()),
                    rotate_every_s: Some(3600),
                    sealed_messages: 7,
                    sealed_bytes: 70,
                    max_messages: None,
                    max_bytes: None,
                },
                proxies: vec![row("proxy-a", 4, false), row("proxy-b", 3, true)],
            }),
            error: None,
            heard: vec![],
        };
        let t = table("default", "cipherbus", &look);
        assert!(t.contains("standby: authority-2"), "{t}");
        assert!(
            t.contains("1970-01-01T01:00:00.000Z (time: every 3600s)"),
            "{t}"
        );
        let b = t.lines().find(|l| l.starts_with("proxy-b")).unwrap();
        assert!(b.contains("lagging") && b.contains("10.0") && b.contains("5.0"));
        assert!(b.ends_with("auth=2"), "{b}");
        let v = json("default", "cipherbus", &look);
        assert_eq!(v["scope"], "default");
        assert_eq!(v["prefix"], "cipherbus");
        assert_eq!(v["proxies"][1]["lagging"], true);
    }

    #[test]
    fn without_an_authority_the_sentence_and_the_heard_proxies_show() {
        let look = Look {
            status: None,
            error: Some("no key authority answered".into()),
            heard: vec![row("proxy-a", 2, false)],
        };
        let t = table("a", "p", &look);
        assert!(
            t.starts_with("scope      a (control prefix p)\nauthority  none: no key authority"),
            "{t}"
        );
        assert!(t.contains("proxy-a"));
        let v = json("a", "p", &look);
        assert!(v["authority"].is_null());
        assert_eq!(v["proxies"][0]["node"], "proxy-a");
    }
}
