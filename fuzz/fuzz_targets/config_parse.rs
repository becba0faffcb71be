//! The config file: any text parses to a config or to a one-line error, never a panic; an
//! accepted config keeps the promises of validation; and written back out as a canonical file
//! it resolves to the same config again.
//!
//! Listen and admin addresses that are not IP literals are dropped before resolving, because
//! resolving a name would ask DNS on every run.

#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cipherbus::config::{Config, ConfigError, FileConfig, Overrides};
use cipherbus::policy::RuleConfig;
use libfuzzer_sys::fuzz_target;

fn file_path() -> &'static Path {
    Path::new("cipherbus.toml")
}

fn flags() -> Overrides {
    Overrides {
        kek_file: Some("kek".into()),
        ..Overrides::default()
    }
}

/// An error an operator reads: one line, saying something.
fn check_error(e: &ConfigError) {
    let text = e.to_string();
    assert!(!text.trim().is_empty());
    assert!(!text.contains('\n'), "error spans lines: {text:?}");
}

fn literal_only(addr: Option<String>) -> Option<String> {
    addr.filter(|a| a.parse::<SocketAddr>().is_ok())
}

/// A TOML basic string. Written here rather than by `toml`'s serializer, whose writer counts
/// runs of quotes in a `u8` and overflows on 256 in a row (toml_write 0.1.2).
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() && c != '\t' => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn qp(p: &Path) -> String {
    q(p.to_str().expect("paths read from TOML are UTF-8"))
}

fn dur(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("\"{}s\"", d.as_secs())
    } else {
        format!("\"{}ms\"", d.as_millis())
    }
}

/// What validation promises about every config it accepts.
fn check_invariants(c: &Config) {
    assert!(!c.upstreams.is_empty());
    for u in &c.upstreams {
        assert!(!u.host.is_empty() && u.port != 0, "{u:?}");
    }
    assert!(c.max_connections >= 1);
    assert!(c.retired_cache >= 1);
    assert!(
        !c.upstream_connect_timeout.is_zero(),
        "zero connect timeout"
    );
    let r = &c.rotation;
    assert!(!r.stage_timeout.is_zero() && !r.heartbeat_every.is_zero());
    assert!(r.rotate_every.is_none_or(|d| !d.is_zero()));
    assert!(r.retain_retired.is_none_or(|d| !d.is_zero()));
    assert!(r.max_messages_per_epoch.is_none_or(|n| n > 0));
    assert!(r.max_bytes_per_epoch.is_none_or(|n| n > 0));
    assert_eq!(c.upstream_tls.cert.is_some(), c.upstream_tls.key.is_some());
    if c.controller {
        assert!(c.state_dir.is_some());
    }
}

/// The config as a file that states every setting explicitly, except `max_connections` when it
/// was left to its default (whether it was set is part of the config: it decides how a cap
/// lowered to fit the open-files limit is logged).
fn render(c: &Config, rules: &[RuleConfig]) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!("listen = {}", q(&c.listen.to_string())));
    if let Some(a) = c.admin {
        line(format!("admin = {}", q(&a.to_string())));
    }
    // The root comes from the flags (`flags()`), which override the file's.
    if let Some(d) = &c.state_dir {
        line(format!("state_dir = {}", qp(d)));
    }
    if let Some(a) = &c.audit_log {
        line(format!("audit_log = {}", qp(a)));
    }
    line(format!("control_prefix = {}", q(c.policy.control_prefix())));
    if c.max_connections_set {
        line(format!("max_connections = {}", c.max_connections));
    }
    line(format!(
        "upstream_connect_timeout = {}",
        dur(c.upstream_connect_timeout)
    ));
    line(format!("aead = {}", q(c.aead.name())));

    line("[upstream]".into());
    let servers: Vec<String> = c
        .upstreams
        .iter()
        .map(|u| q(&format!("{}://{u}", if u.tls { "tls" } else { "nats" })))
        .collect();
    line(format!("servers = [{}]", servers.join(", ")));
    line("[upstream.tls]".into());
    let t = &c.upstream_tls;
    for (name, p) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
        if let Some(p) = p {
            line(format!("{name} = {}", qp(p)));
        }
    }
    line(format!("handshake_first = {}", t.first));
    if let Some(n) = &t.server_name {
        line(format!("server_name = {}", q(n)));
    }

    if let Some((mode, files)) = &c.agent_tls {
        line("[tls]".into());
        line(format!("mode = {}", q(&format!("{mode:?}").to_lowercase())));
        line(format!("cert = {}", qp(&files.cert)));
        line(format!("key = {}", qp(&files.key)));
        if let Some(ca) = &files.client_ca {
            line(format!("client_ca = {}", qp(ca)));
        }
    }

    line("[keyring]".into());
    line(format!("retired_cache = {}", c.retired_cache));

    line("[rotation]".into());
    rotation(&mut line, &c.rotation);

    for rule in rules {
        line("[[policy]]".into());
        line(format!("subject = {}", q(&rule.subject)));
        line(format!(
            "mode = {}",
            q(&format!("{:?}", rule.mode).to_lowercase())
        ));
        line(format!("bind_subject = {}", rule.bind_subject));
    }
    for scope in &c.scopes {
        line("[[scope]]".into());
        line(format!("name = {}", q(scope.name)));
        let subjects: Vec<String> = scope.subjects.iter().map(|p| q(p)).collect();
        line(format!("subjects = [{}]", subjects.join(", ")));
        line(format!("kek = {}", q(&scope.kek.describe())));
        line("[scope.rotation]".into());
        rotation(&mut line, &scope.rotation);
    }
    s
}

/// Every rotation setting, explicitly.
fn rotation(line: &mut impl FnMut(String), r: &cipherbus::config::Rotation) {
    if let Some(d) = r.rotate_every {
        line(format!("rotate_every = {}", dur(d)));
    }
    if let Some(n) = r.max_messages_per_epoch {
        line(format!("max_messages_per_epoch = {n}"));
    }
    if let Some(n) = r.max_bytes_per_epoch {
        line(format!("max_bytes_per_epoch = {n}"));
    }
    line(format!("stage_timeout = {}", dur(r.stage_timeout)));
    line(format!("heartbeat_every = {}", dur(r.heartbeat_every)));
    line(format!(
        "retain_retired = {}",
        r.retain_retired.map_or_else(|| q("forever"), dur)
    ));
    line(format!("lease_ttl = {}", dur(r.lease_ttl)));
    line(format!("require_jetstream = {}", r.require_jetstream));
}

fn resolve(text: &str) -> Option<(Config, Vec<RuleConfig>)> {
    let mut file = match FileConfig::from_toml(text, file_path()) {
        Ok(f) => f,
        Err(e) => {
            assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
            check_error(&e);
            return None;
        }
    };
    file.listen = literal_only(file.listen.take());
    file.admin = literal_only(file.admin.take());
    // A PKCS#11 URI is shown without its query (module path, PIN source), so it is not written
    // back out whole: scopes with one are left out.
    file.scope
        .retain(|s| !s.kek.as_deref().is_some_and(|k| k.starts_with("pkcs11:")));
    let rules = file.policy.clone();
    match file.resolve(flags()) {
        Ok(c) => Some((c, rules)),
        Err(e) => {
            check_error(&e);
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The loader reads files as UTF-8 and refuses anything else before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((config, rules)) = resolve(text) else {
        return;
    };
    check_invariants(&config);

    let canonical = render(&config, &rules);
    let Some((again, _)) = resolve(&canonical) else {
        panic!("the canonical form of an accepted config is refused:\n{canonical}");
    };
    assert_eq!(
        format!("{again:?}"),
        format!("{config:?}"),
        "canonical form:\n{canonical}"
    );
});
