//! Configuration: the TOML file, command-line overrides, and validation into typed values.
//!
//! This module owns parsing and checking settings ("parse, don't validate"): [`FileConfig`] is
//! what serde reads, [`Config`] is what the rest of the proxy runs on. It never opens sockets
//! and never reads key material; it only names the files that hold it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::envelope::AeadBackend;
use crate::policy::{Policy, PolicyError, RuleConfig, DEFAULT_CONTROL_PREFIX};
use crate::tls::{AgentTlsMode, ServerFiles, UpstreamFiles};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4333";
pub const DEFAULT_UPSTREAM: &str = "nats://127.0.0.1:4222";
/// Default cap on concurrent agent connections, well below common file-descriptor limits.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Client libraries give up after about 2 s, so the upstream dial and INFO must fit in less.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Retired epochs kept unwrapped in memory; older ones are unwrapped again from the state dir.
pub const DEFAULT_RETIRED_CACHE: usize = 64;

/// The config file as written. Every section rejects unknown keys, so a typo fails loudly.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub upstream: Option<UpstreamSection>,
    /// Where the root key is: `file:PATH`, `pkcs11:...`, `vault-transit:NAME` or
    /// `aws-kms:KEY` (docs/KEYS.md).
    pub kek: Option<String>,
    /// Same as `kek = "file:PATH"`.
    pub kek_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub admin: Option<String>,
    pub control_prefix: Option<String>,
    pub max_connections: Option<usize>,
    pub upstream_connect_timeout: Option<String>,
    /// `audited` (the default) or `batched`; see [`AeadBackend`].
    pub aead: Option<String>,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub keyring: KeyringSection,
    #[serde(default)]
    pub rotation: RotationSection,
    /// Where the key authority appends its audit trail [default: STATE_DIR/audit.jsonl].
    pub audit_log: Option<PathBuf>,
    #[serde(default)]
    pub policy: Vec<RuleConfig>,
    /// Key scopes (`[[scope]]`), in order: the first whose subjects match takes the subject.
    #[serde(default)]
    pub scope: Vec<ScopeSection>,
}

/// `[[scope]]`: subjects sealed under a root of their own, with their own epochs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeSection {
    pub name: String,
    pub subjects: Vec<String>,
    /// The scope's root, any `--kek` URI.
    pub kek: Option<String>,
    /// Same as `kek = "file:PATH"`.
    pub kek_file: Option<PathBuf>,
    /// Overrides the top-level `[rotation]` settings it names.
    #[serde(default)]
    pub rotation: RotationSection,
}

/// Longest scope name.
pub const MAX_SCOPE_NAME: usize = 32;

/// A validated key scope.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Letters, digits, `-` and `_`; a metric label and part of the control prefix.
    pub name: &'static str,
    /// What version-2 envelopes carry.
    pub id: crate::envelope::ScopeId,
    pub subjects: Vec<String>,
    pub kek: crate::kek::KekUri,
    pub rotation: Rotation,
}

impl Scope {
    /// The control prefix of the scope's own control plane: announcements, keyring bucket,
    /// lease and audit stream.
    pub fn control_prefix(&self, prefix: &str) -> String {
        format!("{prefix}.scope.{}", self.name)
    }

    /// Where the scope's keyring lives inside the state directory.
    pub fn state_dir(&self, state_dir: &Path) -> PathBuf {
        state_dir.join("scopes").join(self.name)
    }

    /// The scope's audit log beside the default scope's: `audit.jsonl` → `audit.NAME.jsonl`.
    pub fn audit_log(&self, audit_log: &Path) -> PathBuf {
        let stem = audit_log
            .file_stem()
            .map_or_else(|| "audit".into(), |s| s.to_string_lossy().into_owned());
        let ext = audit_log
            .extension()
            .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
        audit_log.with_file_name(format!("{stem}.{}{ext}", self.name))
    }
}
/// `upstream`: a list of URLs, or a table with the list and `[upstream.tls]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UpstreamSection {
    Urls(Vec<String>),
    Table(UpstreamTable),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTable {
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default)]
    pub tls: UpstreamTlsSection,
}

/// `[upstream.tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub handshake_first: bool,
    pub server_name: Option<String>,
}

/// `[tls]`: the agent listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub mode: Option<AgentTlsMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringSection {
    pub retired_cache: Option<usize>,
}

/// `[rotation]`: when the key authority rotates, and how proxies report to it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationSection {
    pub rotate_every: Option<String>,
    pub max_messages_per_epoch: Option<u64>,
    pub max_bytes_per_epoch: Option<u64>,
    pub stage_timeout: Option<String>,
    pub heartbeat_every: Option<String>,
    /// How long a retired epoch still opens: a duration, or "forever".
    pub retain_retired: Option<String>,
    /// How long the key authority's lease outlives its last renewal.
    pub lease_ttl: Option<String>,
    /// Whether the key authority refuses a bus without JetStream (the default).
    pub require_jetstream: Option<bool>,
}

/// Default interval between proxy heartbeats on the control plane.
pub const DEFAULT_HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Default time the authority waits for every live proxy to acknowledge a staged key.
pub const DEFAULT_STAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default lease: a standby takes over within about 1.5 times this after the holder dies.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);
/// Below this, a busy machine's scheduling delays would make the lease change hands.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

/// Validated rotation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub rotate_every: Option<Duration>,
    pub max_messages_per_epoch: Option<u64>,
    pub max_bytes_per_epoch: Option<u64>,
    pub stage_timeout: Duration,
    pub heartbeat_every: Duration,
    /// `None`: retired epochs are kept forever.
    pub retain_retired: Option<Duration>,
    pub lease_ttl: Duration,
    /// Without JetStream there is no lease and no fencing, so two authorities can both write.
    pub require_jetstream: bool,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            rotate_every: None,
            max_messages_per_epoch: None,
            max_bytes_per_epoch: None,
            stage_timeout: DEFAULT_STAGE_TIMEOUT,
            heartbeat_every: DEFAULT_HEARTBEAT_EVERY,
            retain_retired: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            require_jetstream: true,
        }
    }
}

impl RotationSection {
    /// These settings, with those `over` names replacing them.
    fn overridden_by(&self, over: RotationSection) -> RotationSection {
        let base = self.clone();
        RotationSection {
            rotate_every: over.rotate_every.or(base.rotate_every),
            max_messages_per_epoch: over.max_messages_per_epoch.or(base.max_messages_per_epoch),
            max_bytes_per_epoch: over.max_bytes_per_epoch.or(base.max_bytes_per_epoch),
            stage_timeout: over.stage_timeout.or(base.stage_timeout),
            heartbeat_every: over.heartbeat_every.or(base.heartbeat_every),
            retain_retired: over.retain_retired.or(base.retain_retired),
            lease_ttl: over.lease_ttl.or(base.lease_ttl),
            require_jetstream: over.require_jetstream.or(base.require_jetstream),
        }
    }

    fn resolve(self) -> Result<Rotation, ConfigError> {
        let dur = |what: &'static str, v: Option<String>, default: Option<Duration>| match v {
            Some(s) => parse_duration(&s)
                .filter(|d| !d.is_zero())
                .map(Some)
                .ok_or(ConfigError::Duration { what, value: s }),
            None => Ok(default),
        };
        let positive = |what: &'static str, v: Option<u64>| match v {
            Some(0) => Err(ConfigError::TooSmall { what, min: 1 }),
            other => Ok(other),
        };
        let retain_retired = match self.retain_retired.as_deref() {
            None | Some("forever") => None,
            Some(_) => dur("rotation.retain_retired", self.retain_retired, None)?,
        };
        let lease_ttl = dur(
            "rotation.lease_ttl",
            self.lease_ttl,
            Some(DEFAULT_LEASE_TTL),
        )?
        .unwrap_or(DEFAULT_LEASE_TTL);
        if lease_ttl < MIN_LEASE_TTL {
            return Err(ConfigError::LeaseTooShort);
        }
        Ok(Rotation {
            retain_retired,
            lease_ttl,
            require_jetstream: self.require_jetstream.unwrap_or(true),
            rotate_every: dur("rotation.rotate_every", self.rotate_every, None)?,
            max_messages_per_epoch: positive(
                "rotation.max_messages_per_epoch",
                self.max_messages_per_epoch,
            )?,
            max_bytes_per_epoch: positive(
                "rotation.max_bytes_per_epoch",
                self.max_bytes_per_epoch,
            )?,
            stage_timeout: dur(
                "rotation.stage_timeout",
                self.stage_timeout,
                Some(DEFAULT_STAGE_TIMEOUT),
            )?
            .unwrap_or(DEFAULT_STAGE_TIMEOUT),
            heartbeat_every: dur(
                "rotation.heartbeat_every",
                self.heartbeat_every,
                Some(DEFAULT_HEARTBEAT_EVERY),
            )?
            .unwrap_or(DEFAULT_HEARTBEAT_EVERY),
        })
    }
}

/// Settings given on the command line; each one present overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Vec<String>,
    pub kek: Option<String>,
    pub kek_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub admin: Option<String>,
    /// Host the key authority in this process.
    pub controller: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub tls_mode: Option<AgentTlsMode>,
    pub upstream_ca: Option<PathBuf>,
    pub upstream_cert: Option<PathBuf>,
    pub upstream_key: Option<PathBuf>,
    pub upstream_tls_first: bool,
    pub upstream_server_name: Option<String>,
    pub aead: Option<String>,
}

/// One upstream server, as `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// Given as `tls://`: TLS is required to this server.
    pub tls: bool,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The validated configuration the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstreams: Vec<Upstream>,
    /// Where the root key is.
    pub kek: crate::kek::KekUri,
    pub state_dir: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
    pub policy: Policy,
    pub max_connections: usize,
    /// Whether `max_connections` was written in the file; a default that does not fit the
    /// open-files limit is lowered without a warning.
    pub max_connections_set: bool,
    pub upstream_connect_timeout: Duration,
    pub retired_cache: usize,
    pub rotation: Rotation,
    pub controller: bool,
    pub audit_log: Option<PathBuf>,
    /// TLS on the agent listener, if any.
    pub agent_tls: Option<(AgentTlsMode, ServerFiles)>,
    pub upstream_tls: UpstreamFiles,
    /// The AEAD backend asked for; what runs is [`AeadBackend::effective`].
    pub aead: AeadBackend,
    /// Key scopes beside the default one, in the order subjects are matched against them.
    pub scopes: Vec<Scope>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{what} {value:?} is not a valid address (expected HOST:PORT)")]
    Address { what: &'static str, value: String },
    #[error("upstream {value:?} is not valid: {why}")]
    UpstreamUrl { value: String, why: &'static str },
    #[error("no root key: pass --kek URI (or --kek-file FILE), or set kek in the config (create one with `cipherbus keygen --kek URI`)")]
    NoKek,
    #[error("give the root key once: {0}")]
    TwoKeks(&'static str),
    #[error("{0}")]
    Kek(#[from] crate::kek::KekError),
    #[error("{what} {value:?} is not a valid duration (examples: 500ms, 2s, 1m)")]
    Duration { what: &'static str, value: String },
    #[error("{what} must be at least {min}")]
    TooSmall { what: &'static str, min: usize },
    #[error("rotation.lease_ttl must be at least 1s: shorter leases change hands whenever the machine is busy")]
    LeaseTooShort,
    #[error(
        "the key authority needs a state directory (--state-dir) to persist the keys it creates"
    )]
    ControllerNeedsStateDir,
    #[error("TLS: {0}")]
    Tls(&'static str),
    #[error("subject policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("aead {0:?} is not a backend (expected \"audited\" or \"batched\")")]
    Aead(String),
    #[error("scope {name:?}: {why}")]
    Scope { name: String, why: String },
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's message spans lines; keep it to one sentence for the operator.
            message: e.message().trim().replace('\n', " "),
        })
    }

    /// Applies the command-line overrides and validates everything.
    pub fn resolve(self, flags: Overrides) -> Result<Config, ConfigError> {
        let listen = flags
            .listen
            .or(self.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = parse_addr("listen address", &listen)?;
        let admin = flags
            .admin
            .or(self.admin)
            .map(|a| parse_addr("admin address", &a))
            .transpose()?;

        let (file_urls, file_up_tls) = match self.upstream {
            Some(UpstreamSection::Urls(urls)) => (urls, UpstreamTlsSection::default()),
            Some(UpstreamSection::Table(t)) => (t.servers, t.tls),
            None => (Vec::new(), UpstreamTlsSection::default()),
        };
        let raw_upstreams = if !flags.upstream.is_empty() {
            flags.upstream
        } else if !file_urls.is_empty() {
            file_urls
        } else {
            vec![DEFAULT_UPSTREAM.to_owned()]
        };
        let mut upstreams = Vec::new();
        for entry in &raw_upstreams {
            for url in entry.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                upstreams.push(parse_upstream(url)?);
            }
        }
        if upstreams.is_empty() {
            return Err(ConfigError::UpstreamUrl {
                value: raw_upstreams.join(","),
                why: "no upstream server given",
            });
        }

        let kek = match (flags.kek, flags.kek_file, self.kek, self.kek_file) {
            (Some(_), Some(_), _, _) => return Err(ConfigError::TwoKeks("--kek or --kek-file")),
            (None, None, Some(_), Some(_)) => {
                return Err(ConfigError::TwoKeks("kek or kek_file in the config"))
            }
            (Some(uri), None, _, _) | (None, None, Some(uri), None) => {
                crate::kek::KekUri::parse(&uri)?
            }
            (None, Some(path), _, _) | (None, None, None, Some(path)) => {
                crate::kek::KekUri::File(path)
            }
            (None, None, None, None) => return Err(ConfigError::NoKek),
        };
        let state_dir = flags.state_dir.or(self.state_dir);
        let control_prefix = self
            .control_prefix
            .unwrap_or_else(|| DEFAULT_CONTROL_PREFIX.to_owned());
        let policy = Policy::new(&self.policy, &control_prefix)?;
        let rotation_section = self.rotation.clone();
        let mut scopes: Vec<Scope> = Vec::with_capacity(self.scope.len());
        for section in self.scope {
            scopes.push(resolve_scope(section, &rotation_section, &kek, &scopes)?);
        }
        let policy = policy.with_scopes(
            &scopes
                .iter()
                .map(|s| (s.name.to_owned(), s.subjects.clone()))
                .collect::<Vec<_>>(),
        )?;

        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ConfigError::TooSmall {
                what: "max_connections",
                min: 1,
            });
        }
        let upstream_connect_timeout = match self.upstream_connect_timeout {
            // Zero would refuse every agent: no dial can finish inside it.
            Some(s) => {
                parse_duration(&s)
                    .filter(|d| !d.is_zero())
                    .ok_or(ConfigError::Duration {
                        what: "upstream_connect_timeout",
                        value: s,
                    })?
            }
            None => DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        };
        let retired_cache = self.keyring.retired_cache.unwrap_or(DEFAULT_RETIRED_CACHE);
        if retired_cache == 0 {
            return Err(ConfigError::TooSmall {
                what: "keyring.retired_cache",
                min: 1,
            });
        }

        let upstream_tls = UpstreamFiles {
            ca: flags.upstream_ca.or(file_up_tls.ca),
            cert: flags.upstream_cert.or(file_up_tls.cert),
            key: flags.upstream_key.or(file_up_tls.key),
            first: flags.upstream_tls_first || file_up_tls.handshake_first,
            server_name: flags.upstream_server_name.or(file_up_tls.server_name),
        };
        if upstream_tls.cert.is_some() != upstream_tls.key.is_some() {
            return Err(ConfigError::Tls(
                "an upstream client certificate needs its key, and a key its certificate",
            ));
        }
        let cert = flags.tls_cert.or(self.tls.cert);
        let key = flags.tls_key.or(self.tls.key);
        let client_ca = flags.tls_client_ca.or(self.tls.client_ca);
        let mode = flags.tls_mode.or(self.tls.mode);
        let agent_tls = match (cert, key) {
            (Some(cert), Some(key)) => Some((
                mode.unwrap_or(AgentTlsMode::Required),
                ServerFiles {
                    cert,
                    key,
                    client_ca,
                },
            )),
            (None, None) if mode.is_none() && client_ca.is_none() => None,
            (None, None) => {
                return Err(ConfigError::Tls(
                    "a TLS mode or client CA needs --tls-cert and --tls-key",
                ))
            }
            _ => return Err(ConfigError::Tls("--tls-cert and --tls-key go together")),
        };
        let aead = match flags.aead.or(self.aead).as_deref() {
            None | Some("audited") => AeadBackend::Audited,
            Some("batched") => AeadBackend::Batched,
            Some(other) => return Err(ConfigError::Aead(other.to_owned())),
        };
        let rotation = self.rotation.resolve()?;
        if flags.controller && state_dir.is_none() {
            return Err(ConfigError::ControllerNeedsStateDir);
        }
        let audit_log = self
            .audit_log
            .or_else(|| state_dir.as_ref().map(|d| d.join("audit.jsonl")));
        Ok(Config {
            aead,
            agent_tls,
            upstream_tls,
            rotation,
            controller: flags.controller,
            audit_log,
            listen,
            upstreams,
            kek,
            state_dir,
            admin,
            policy,
            max_connections,
            max_connections_set: self.max_connections.is_some(),
            upstream_connect_timeout,
            retired_cache,
            scopes,
        })
    }
}

/// A scope name that lives as long as the process, as metric labels need: each distinct name
/// is kept once, however often a config is read again.
fn intern(name: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock, PoisonError};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// Checks one `[[scope]]` against the default root and the scopes before it.
fn resolve_scope(
    section: ScopeSection,
    rotation: &RotationSection,
    default_kek: &crate::kek::KekUri,
    earlier: &[Scope],
) -> Result<Scope, ConfigError> {
    let name = section.name;
    let bad = |why: String| ConfigError::Scope {
        name: name.clone(),
        why,
    };
    let valid = !name.is_empty()
        && name.len() <= MAX_SCOPE_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(bad(format!(
            "a scope name is 1 to {MAX_SCOPE_NAME} letters, digits, `-` or `_`, starting with a letter or digit"
        )));
    }
    if name.eq_ignore_ascii_case("default") {
        return Err(bad(
            "\"default\" is the scope of the top-level kek; name this one otherwise".into(),
        ));
    }
    // Bucket and stream names fold case and turn `-` into `_`: two such names would share them.
    let folded = |n: &str| n.to_ascii_lowercase().replace('-', "_");
    if let Some(other) = earlier.iter().find(|s| folded(s.name) == folded(&name)) {
        return Err(if other.name == name {
            bad("two scopes have this name".into())
        } else {
            bad(format!(
                "too close to scope {:?}: names must differ other than in case and `-`/`_`",
                other.name
            ))
        });
    }
    if section.subjects.is_empty() {
        return Err(bad("list its subjects (subjects = [\"payments.>\"])".into()));
    }
    let kek = match (section.kek, section.kek_file) {
        (Some(_), Some(_)) => return Err(bad("give its root once: kek or kek_file".into())),
        (Some(uri), None) => crate::kek::KekUri::parse(&uri).map_err(|e| bad(e.to_string()))?,
        (None, Some(path)) => crate::kek::KekUri::File(path),
        (None, None) => {
            return Err(bad(
                "each scope has a root of its own: set kek = \"URI\" in its [[scope]]".into(),
            ))
        }
    };
    if kek == *default_kek {
        return Err(bad(
            "its root is the top-level kek; each scope needs a root of its own".into(),
        ));
    }
    if let Some(other) = earlier.iter().find(|s| s.kek == kek) {
        return Err(bad(format!(
            "its root is also scope {:?}'s; each scope needs a root of its own",
            other.name
        )));
    }
    let rotation = rotation
        .overridden_by(section.rotation)
        .resolve()
        .map_err(|e| bad(e.to_string()))?;
    Ok(Scope {
        name: intern(&name),
        id: crate::envelope::ScopeId::of(&name),
        subjects: section.subjects,
        kek,
        rotation,
    })
}

fn parse_addr(what: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    let err = || ConfigError::Address {
        what,
        value: value.to_owned(),
    };
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    // Names such as localhost:4333 resolve once, at startup.
    value
        .to_socket_addrs()
        .map_err(|_| err())?
        .next()
        .ok_or_else(err)
}

/// Accepts `nats://host:port`, `host:port` and `host` (port 4222).
pub fn parse_upstream(url: &str) -> Result<Upstream, ConfigError> {
    let bad = |why| ConfigError::UpstreamUrl {
        value: url.to_owned(),
        why,
    };
    let (tls, rest) = match url.split_once("://") {
        Some(("nats", rest)) => (false, rest),
        Some(("tls", rest)) => (true, rest),
        Some(_) => return Err(bad("the scheme must be nats:// or tls://")),
        None => (false, url),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err(bad(
            "credentials do not belong in the upstream URL; agents authenticate themselves",
        ));
    }
    if rest.contains('/') || rest.is_empty() {
        return Err(bad("expected HOST:PORT"));
    }
    let port_of = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| bad("the port is not a number from 1 to 65535"))
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        // A bracketed IPv6 literal keeps its colons; the port after it is optional.
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address needs its closing `]`"))?;
        // Only an IPv6 address (with an optional `%zone`) goes in brackets; anything else
        // would be written back in a form that no longer parses.
        let address = host.split_once('%').map_or(host, |(a, _)| a);
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("brackets hold an IPv6 address only"));
        }
        match after {
            "" => (host, 4222),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None => return Err(bad("expected HOST:PORT")),
            },
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !h.contains(':') => (h, port_of(p)?),
            Some(_) => return Err(bad("expected HOST:PORT (an IPv6 address goes in brackets)")),
            None => (rest, 4222),
        }
    };
    if port == 0 || host.is_empty() {
        return Err(bad("expected HOST:PORT"));
    }
    if !rest.starts_with('[') && host.parse::<std::net::Ipv4Addr>().is_err() && !is_dns_name(host) {
        return Err(bad(
            "the host is neither an IP address nor a DNS name (letters, digits, `-` and `_` in dot-separated labels)",
        ));
    }
    Ok(Upstream {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// A host name the resolver can look up: dot-separated labels of at most 63 letters, digits,
/// `-` or `_`, 253 characters in all. Anything else would only fail later, at the first dial.
fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses `500ms`, `2s`, `1m`, `3h`, `7d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_with_kek() -> Overrides {
        Overrides {
            kek_file: Some("kek".into()),
            ..Default::default()
        }
    }

    fn with_scopes(scopes: &str) -> Result<Config, ConfigError> {
        FileConfig::from_toml(&format!("kek = \"file:/k\"\n{scopes}"), Path::new("t.toml"))
            .unwrap()
            .resolve(Overrides::default())
    }

    #[test]
    fn scopes_are_resolved_with_their_own_rotation() {
        let c = with_scopes(
            "[rotation]\nrotate_every = \"1h\"\nmax_messages_per_epoch = 10\n\
             [[scope]]\nname = \"tenant-a\"\nsubjects = [\"a.>\"]\nkek = \"file:/a\"\n\
             [scope.rotation]\nmax_messages_per_epoch = 5\n\
             [[scope]]\nname = \"b\"\nsubjects = [\"b.>\"]\nkek_file = \"/b\"\n",
        )
        .unwrap();
        assert_eq!(c.scopes.len(), 2);
        let a = &c.scopes[0];
        assert_eq!(a.name, "tenant-a");
        assert_eq!(a.id, crate::envelope::ScopeId::of("tenant-a"));
        assert_eq!(a.rotation.max_messages_per_epoch, Some(5));
        assert_eq!(a.rotation.rotate_every, Some(Duration::from_secs(3600)));
        assert_eq!(c.scopes[1].rotation.max_messages_per_epoch, Some(10));
        assert_eq!(
            a.control_prefix("cipherbus.ctl"),
            "cipherbus.ctl.scope.tenant-a"
        );
        assert_eq!(
            a.audit_log(Path::new("/s/audit.jsonl")),
            Path::new("/s/audit.tenant-a.jsonl")
        );
        assert_eq!(c.policy.decide(b"b.x").scope, 2);
    }

    #[test]
    fn bad_scopes_stop_the_start_with_one_sentence() {
        let scope = |name: &str, subjects: &str, kek: &str| {
            format!("[[scope]]\nname = {name:?}\nsubjects = {subjects}\nkek = {kek:?}\n")
        };
        let cases = [
            (
                scope("a", "[\"a.>\"]", "file:/a") + &scope("a", "[\"b.>\"]", "file:/b"),
                "two scopes have this name",
            ),
            (
                scope("a-b", "[\"a.>\"]", "file:/a") + &scope("A_b", "[\"b.>\"]", "file:/b"),
                "too close to scope \"a-b\"",
            ),
            (
                scope("a", "[\"t.>\"]", "file:/a") + &scope("b", "[\"t.b.>\"]", "file:/b"),
                "\"t.b.>\" can never match",
            ),
            (
                scope("a", "[\"a.>\"]", "file:/k"),
                "its root is the top-level kek",
            ),
            (
                scope("a", "[\"a.>\"]", "file:/a") + &scope("b", "[\"b.>\"]", "file:/a"),
                "its root is also scope \"a\"'s",
            ),
            (scope("a", "[]", "file:/a"), "list its subjects"),
            (
                scope("default", "[\"a.>\"]", "file:/a"),
                "\"default\" is the scope",
            ),
            (scope("a.b", "[\"a.>\"]", "file:/a"), "a scope name is"),
            (scope("a", "[\"a..b\"]", "file:/a"), "empty token"),
            (
                "[[scope]]\nname = \"a\"\nsubjects = [\"a.>\"]\n".to_owned(),
                "each scope has a root of its own",
            ),
            (scope("a", "[\"a.>\"]", "vault:x"), "scope \"a\""),
        ];
        for (text, want) in cases {
            let err = with_scopes(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "{text}\n=> {err}");
            assert!(!err.contains('\n'), "one sentence: {err}");
        }
    }

    #[test]
    fn defaults() {
        let c = FileConfig::default().resolve(flags_with_kek()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:4333".parse().unwrap());
        assert_eq!(
            c.upstreams,
            vec![Upstream {
                host: "127.0.0.1".into(),
                port: 4222,
                tls: false,
            }]
        );
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn flags_override_file_and_comma_lists_split() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:1"
            upstream = ["nats://10.0.0.1:4222"]
            kek_file = "file-kek"
            "#,
        )
        .unwrap();
        let c = file
            .resolve(Overrides {
                listen: Some("127.0.0.1:2".into()),
                upstream: vec!["nats://a:1,b:2".into(), "c".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.kek, crate::kek::KekUri::File("file-kek".into()));
        let ups: Vec<String> = c.upstreams.iter().map(ToString::to_string).collect();
        assert_eq!(ups, ["a:1", "b:2", "c:4222"]);
    }

    #[test]
    fn unknown_keys_fail() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
        assert!(toml::from_str::<FileConfig>("[keyring]\nretired = 1").is_err());
        assert!(toml::from_str::<FileConfig>(
            "[[policy]]\nsubject = \"a\"\nmode = \"encrypt\"\nbind = false"
        )
        .is_err());
        assert!(
            toml::from_str::<FileConfig>("[[policy]]\nsubject = \"a\"\nmode = \"open\"").is_err()
        );
    }

    #[test]
    fn bad_values_fail() {
        let bad_listen = Overrides {
            listen: Some("nowhere".into()),
            ..flags_with_kek()
        };
        assert!(matches!(
            FileConfig::default().resolve(bad_listen),
            Err(ConfigError::Address { .. })
        ));
        assert!(matches!(
            FileConfig::default().resolve(Overrides::default()),
            Err(ConfigError::NoKek)
        ));
        for url in [
            "http://x:1",
            "nats://u:p@x:1",
            "x:99999",
            "x:",
            "a:b:c",
            "::1",
            "[::1",
            "[::1]5",
            "[::1]:",
            "[]:5",
            ":5",
            "[[r]",
            "[r]:5",
            "[127.0.0.1]:5",
            "r!x'(m",
            "a..b:5",
            "a b:5",
            "ex\u{e4}mple.org",
        ] {
            assert!(parse_upstream(url).is_err(), "{url}");
        }
        assert!(parse_upstream("tls://x:1").unwrap().tls);
        for (url, port) in [("[::1]:5", 5), ("tls://[::1]", 4222), ("[::1]/", 4222)] {
            let up = parse_upstream(url).unwrap();
            assert_eq!((up.host.as_str(), up.port), ("::1", port), "{url}");
            assert_eq!(up.to_string(), format!("[::1]:{port}"));
        }
        assert_eq!(parse_upstream("nats://x").unwrap().port, 4222);
        let zoned = parse_upstream("[fe80::1%eth0]:5").unwrap();
        assert_eq!(zoned.host, "fe80::1%eth0");
        let again = parse_upstream(&zoned.to_string()).unwrap();
        assert_eq!((again.host, again.port), (zoned.host, 5));
    }

    #[test]
    fn upstream_table_with_tls_and_agent_tls() {
        let file: FileConfig = toml::from_str(
            r#"
            [upstream]
            servers = ["nats://a:1", "tls://b:2"]
            [upstream.tls]
            ca = "ca.pem"
            handshake_first = true
            server_name = "nats.internal"
            [tls]
            cert = "c.pem"
            key = "k.pem"
            mode = "optional"
            "#,
        )
        .unwrap();
        let c = file.resolve(flags_with_kek()).unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert!(c.upstreams[1].tls && !c.upstreams[0].tls);
        assert_eq!(c.upstream_tls.ca, Some(PathBuf::from("ca.pem")));
        assert!(c.upstream_tls.first);
        assert_eq!(c.upstream_tls.server_name.as_deref(), Some("nats.internal"));
        assert_eq!(c.agent_tls.unwrap().0, AgentTlsMode::Optional);
        assert!(toml::from_str::<FileConfig>("[tls]\nmode = \"sometimes\"").is_err());
        assert!(toml::from_str::<FileConfig>("[upstream.tls]\ncafile = \"x\"").is_err());
        let half: FileConfig = toml::from_str("[tls]\ncert = \"c.pem\"").unwrap();
        assert!(matches!(
            half.resolve(flags_with_kek()),
            Err(ConfigError::Tls(_))
        ));
    }

    #[test]
    fn rotation_section() {
        let file: FileConfig = toml::from_str(
            "[rotation]\nrotate_every = \"1h\"\nmax_messages_per_epoch = 1000\nstage_timeout = \"3s\"",
        )
        .unwrap();
        let c = file.resolve(flags_with_kek()).unwrap();
        assert_eq!(c.rotation.rotate_every, Some(Duration::from_secs(3600)));
        assert_eq!(c.rotation.max_messages_per_epoch, Some(1000));
        assert_eq!(c.rotation.stage_timeout, Duration::from_secs(3));
        assert_eq!(c.rotation.heartbeat_every, DEFAULT_HEARTBEAT_EVERY);
        assert_eq!(c.rotation.retain_retired, None, "forever by default");
        let kept: FileConfig = toml::from_str("[rotation]\nretain_retired = \"7d\"").unwrap();
        let kept = kept.resolve(flags_with_kek()).unwrap();
        assert_eq!(
            kept.rotation.retain_retired,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert!(toml::from_str::<FileConfig>("[rotation]\nrotate = \"1h\"").is_err());
        let zero: FileConfig = toml::from_str("[rotation]\nmax_messages_per_epoch = 0").unwrap();
        assert!(zero.resolve(flags_with_kek()).is_err());
        let bad: FileConfig = toml::from_str("[rotation]\nrotate_every = \"soon\"").unwrap();
        assert!(bad.resolve(flags_with_kek()).is_err());
        let needs_dir = FileConfig::default().resolve(Overrides {
            controller: true,
            ..flags_with_kek()
        });
        assert!(matches!(
            needs_dir,
            Err(ConfigError::ControllerNeedsStateDir)
        ));
    }

    #[test]
    fn lease_settings() {
        let c = FileConfig::default().resolve(flags_with_kek()).unwrap();
        assert_eq!(c.rotation.lease_ttl, DEFAULT_LEASE_TTL);
        assert!(
            c.rotation.require_jetstream,
            "JetStream is required by default"
        );
        let set: FileConfig =
            toml::from_str("[rotation]\nlease_ttl = \"5s\"\nrequire_jetstream = false").unwrap();
        let set = set.resolve(flags_with_kek()).unwrap();
        assert_eq!(set.rotation.lease_ttl, Duration::from_secs(5));
        assert!(!set.rotation.require_jetstream);
        let short: FileConfig = toml::from_str("[rotation]\nlease_ttl = \"500ms\"").unwrap();
        assert!(matches!(
            short.resolve(flags_with_kek()),
            Err(ConfigError::LeaseTooShort)
        ));
    }

    /// Found by the config_parse fuzz target: "0s" was accepted and then refused every agent.
    #[test]
    fn zero_connect_timeout_is_refused() {
        let file: FileConfig = toml::from_str("upstream_connect_timeout = \"0s\"").unwrap();
        assert!(matches!(
            file.resolve(flags_with_kek()),
            Err(ConfigError::Duration {
                what: "upstream_connect_timeout",
                ..
            })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("2 fortnights"), None);
    }
}
