//! The root of trust: where the root key lives, and the keys a process holds because of it.
//!
//! This module owns the `--kek URI` schemes, the [`Kek`] backends that wrap and unwrap under a
//! root that never leaves its HSM or KMS, the deployment seed that such a root wraps, and the
//! [`Root`] every other module asks for the control, audit and epoch-1 keys and for wrapping
//! data keys. Nothing outside this module knows which backend is in use.
//!
//! The hierarchy (docs/KEYS.md):
//! - A `file:` root is the deployment seed itself, as before: every key derives from it.
//! - For a `pkcs11:`, `vault-transit:` or `aws-kms:` root, a random 32-byte deployment seed is
//!   wrapped under the root and kept in the keyring bucket. Each process unwraps it once at
//!   start, derives the control, audit and epoch-1 keys from it as a file root would, and
//!   forgets it. Data keys of later epochs are wrapped by the root itself, so each process's
//!   unwrap shows in the KMS's own audit log.

pub mod aws;
pub mod file;
mod http;
pub mod pkcs11;
pub mod seed;
pub mod vault;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use zeroize::Zeroizing;

use crate::envelope::{self, DataKey, EnvelopeError, RootKey, KEY_LEN};
use crate::kek::file::{KekFile, KeySourceError, RootKeySource};

/// What a wrapped key is for: bound into every wrap (AES-GCM AAD, or the KMS's encryption
/// context), so a wrapped key presented for another purpose, epoch or scope fails to unwrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapContext {
    /// `data-key`, `seed` or `check`.
    pub purpose: &'static str,
    pub epoch: u32,
    /// The deployment's control prefix: keys of one deployment never open in another that
    /// shares the same root.
    pub scope: String,
}

impl WrapContext {
    /// The bytes bound as AAD: a label, then each field length-prefixed.
    pub fn aad(&self) -> Vec<u8> {
        let mut aad = b"cipherbus-v1 kms-wrap".to_vec();
        for field in [self.purpose.as_bytes(), self.scope.as_bytes()] {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field);
        }
        aad.extend_from_slice(&self.epoch.to_be_bytes());
        aad
    }

    /// The same fields as an AWS encryption context.
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            ("cipherbus-purpose", self.purpose.to_owned()),
            ("cipherbus-epoch", self.epoch.to_string()),
            ("cipherbus-scope", self.scope.clone()),
        ]
    }
}

/// Why a root operation failed. Messages name the URI (never a secret).
#[derive(Debug, Clone, thiserror::Error)]
pub enum KekError {
    #[error("{uri}: {why}")]
    Config { uri: String, why: String },
    /// The KMS or device could not be reached or did not answer in time: worth retrying.
    #[error("{uri} is unavailable: {why}")]
    Unavailable { uri: String, why: String },
    #[error("{uri} refused the credentials: {why}")]
    Denied { uri: String, why: String },
    #[error("{uri}: no such key")]
    NotFound { uri: String },
    #[error("{uri} is not a usable root: {why}")]
    WrongKey { uri: String, why: String },
    /// The wrapped key is damaged, or was wrapped for another context or under another root.
    #[error("{uri} could not unwrap the key: {why}")]
    Unwrap { uri: String, why: String },
    #[error("{uri} already holds a root key; refusing to create another")]
    Exists { uri: String },
}

impl KekError {
    /// The KMS was not reached: the refusal reason is `kms_unavailable`.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KekError::Unavailable { .. })
    }
}

/// A root that stays inside an HSM or KMS: it wraps and unwraps 32-byte keys and nothing more.
///
/// Calls block (a device call or an HTTP request with a timeout); callers on the async runtime
/// go through [`blocking`].
pub trait Kek: Send + Sync + fmt::Debug {
    /// The URI without any secret, for messages and logs.
    fn describe(&self) -> &str;
    /// Scheme name, as the metrics and logs show it.
    fn kind(&self) -> &'static str;
    /// Proves the key exists, has the type the design needs, and may wrap and unwrap.
    fn check(&self) -> Result<(), KekError>;
    /// Creates the root key; refuses if one exists.
    fn create(&self) -> Result<(), KekError>;
    fn wrap(&self, ctx: &WrapContext, secret: &[u8; KEY_LEN]) -> Result<Vec<u8>, KekError>;
    fn unwrap(
        &self,
        ctx: &WrapContext,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError>;
}

/// A parsed `--kek` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekUri {
    File(PathBuf),
    Pkcs11(pkcs11::Pkcs11Uri),
    VaultTransit { key: String, mount: String },
    AwsKms { key: String },
}

impl KekUri {
    /// Parses a `--kek` value. A bare path (no scheme) is refused, so a typo cannot silently
    /// read the wrong file.
    pub fn parse(text: &str) -> Result<Self, KekError> {
        let bad = |why: &str| KekError::Config {
            uri: redact(text),
            why: why.to_owned(),
        };
        let (scheme, rest) = text
            .split_once(':')
            .ok_or_else(|| bad("expected file:, pkcs11:, vault-transit: or aws-kms:"))?;
        match scheme {
            "file" if !rest.is_empty() => Ok(KekUri::File(PathBuf::from(rest))),
            "file" => Err(bad("file: needs a path")),
            "pkcs11" => pkcs11::Pkcs11Uri::parse(rest)
                .map(KekUri::Pkcs11)
                .map_err(|why| bad(&why)),
            "vault-transit" => {
                let (key, query) = rest.split_once('?').unwrap_or((rest, ""));
                let mut mount = "transit".to_owned();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    match pair.split_once('=') {
                        Some(("mount", m)) if valid_path_segment(m, true) => mount = m.to_owned(),
                        _ => return Err(bad(&format!("unknown or bad query attribute {pair:?}"))),
                    }
                }
                if !valid_path_segment(key, false) {
                    return Err(bad(
                        "vault-transit: needs a key name (letters, digits, - _ .)",
                    ));
                }
                Ok(KekUri::VaultTransit {
                    key: key.to_owned(),
                    mount,
                })
            }
            "aws-kms" if !rest.is_empty() => Ok(KekUri::AwsKms {
                key: rest.to_owned(),
            }),
            "aws-kms" => Err(bad("aws-kms: needs a key id, ARN or alias/NAME")),
            _ => Err(bad("expected file:, pkcs11:, vault-transit: or aws-kms:")),
        }
    }

    /// The URI as logs and errors may show it.
    pub fn describe(&self) -> String {
        match self {
            KekUri::File(p) => format!("file:{}", p.display()),
            KekUri::Pkcs11(u) => u.describe(),
            KekUri::VaultTransit { key, mount } => format!("vault-transit:{key}?mount={mount}"),
            KekUri::AwsKms { key } => format!("aws-kms:{key}"),
        }
    }

    pub fn is_file(&self) -> bool {
        matches!(self, KekUri::File(_))
    }

    /// Opens the backend of an HSM or KMS root (not a file root).
    pub fn open_kek(&self) -> Result<Arc<dyn Kek>, KekError> {
        match self {
            KekUri::File(_) => Err(KekError::Config {
                uri: self.describe(),
                why: "a file root is not a KMS".into(),
            }),
            KekUri::Pkcs11(u) => Ok(Arc::new(pkcs11::Pkcs11Kek::open(u.clone())?)),
            KekUri::VaultTransit { key, mount } => {
                Ok(Arc::new(vault::VaultKek::from_env(key, mount)?))
            }
            KekUri::AwsKms { key } => Ok(Arc::new(aws::AwsKek::from_env(key)?)),
        }
    }
}

/// A text that may hold a `pin-value`, cut before it for messages.
fn redact(text: &str) -> String {
    match text.find("pin-value") {
        Some(i) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

fn valid_path_segment(s: &str, slashes: bool) -> bool {
    !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (slashes && c == '/')
        })
        && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
}

/// Runs a blocking root call off the async workers' backs when there is a multi-threaded
/// runtime to hand the other tasks to, else inline.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Labels of `cipherbus_kms_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsLabel {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// KMS call counters, process-wide: the root is opened before any proxy's registry exists.
pub struct KmsMetrics {
    pub requests: Family<KmsLabel, Counter>,
    pub latency: Histogram,
}

pub static KMS_METRICS: LazyLock<KmsMetrics> = LazyLock::new(|| KmsMetrics {
    requests: Family::default(),
    latency: Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ]),
});

/// Times and counts one KMS call.
fn measured<T>(op: &'static str, f: impl FnOnce() -> Result<T, KekError>) -> Result<T, KekError> {
    let start = Instant::now();
    let r = f();
    KMS_METRICS.latency.observe(start.elapsed().as_secs_f64());
    let outcome = match &r {
        Ok(_) => "ok",
        Err(KekError::Unavailable { .. }) => "unavailable",
        Err(KekError::Denied { .. }) => "denied",
        Err(KekError::Unwrap { .. }) => "unwrap_failed",
        Err(_) => "error",
    };
    KMS_METRICS
        .requests
        .get_or_create(&KmsLabel { op, outcome })
        .inc();
    r
}

/// Format byte of a data key wrapped by an HSM or KMS root: `0x02 || backend ciphertext`.
/// Format 1 (`envelope::wrap_key`) is the file root's.
pub const WRAP_FORMAT_KMS: u8 = 0x02;
/// Longest backend ciphertext accepted (AWS blobs are about 180 bytes, Vault's text ~90).
pub const MAX_WRAPPED: usize = 1024;

enum Backend {
    /// A file root: data keys are wrapped under a key derived from it (format 1).
    File { wrap: envelope::WrapKey },
    Kms {
        kek: Arc<dyn Kek>,
        /// A deployment migrated from a file root keeps opening format-1 wraps (docs/KEYS.md).
        legacy: Option<envelope::WrapKey>,
    },
}

/// What a process holds because of its root: the keys the control channel, the audit trail
/// and epoch 1 need, and a way to wrap and unwrap data keys. Never the root itself, unless the
/// root is a file.
pub struct Root {
    backend: Backend,
    uri: String,
    scope: String,
    control: DataKey,
    audit: DataKey,
    epoch1: DataKey,
    fingerprint: String,
}

impl fmt::Debug for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Root")
            .field("uri", &self.uri)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Root {
    /// A root whose seed is in hand: a file root, or a test's.
    pub fn from_key(key: &RootKey) -> Root {
        Root::derived(
            key,
            Backend::File {
                wrap: envelope::WrapKey::derive(key),
            },
            "file:".to_owned(),
            String::new(),
        )
    }

    /// Loads a `file:` root.
    pub fn from_file(path: &Path) -> Result<Root, KeySourceError> {
        let key = KekFile(path.to_owned()).load()?;
        let mut root = Root::from_key(&key);
        root.uri = format!("file:{}", path.display());
        Ok(root)
    }

    /// A root in an HSM or KMS, with the deployment seed it wrapped.
    pub fn from_seed(
        kek: Arc<dyn Kek>,
        seed: &seed::WrappedSeed,
        scope: &str,
    ) -> Result<Root, KekError> {
        let key = seed.unwrap(&*kek, scope)?;
        let legacy = seed.migrated.then(|| envelope::WrapKey::derive(&key));
        let uri = kek.describe().to_owned();
        Ok(Root::derived(
            &key,
            Backend::Kms { kek, legacy },
            uri,
            scope.to_owned(),
        ))
    }

    fn derived(key: &RootKey, backend: Backend, uri: String, scope: String) -> Root {
        Root {
            backend,
            uri,
            scope,
            control: envelope::derive_control_key(key),
            audit: envelope::derive_audit_key(key),
            epoch1: envelope::derive_epoch1(key),
            fingerprint: key.fingerprint(),
        }
    }

    /// The HSM or KMS behind this root; `None` for a file root.
    pub fn kek(&self) -> Option<&Arc<dyn Kek>> {
        match &self.backend {
            Backend::File { .. } => None,
            Backend::Kms { kek, .. } => Some(kek),
        }
    }

    /// What wraps are bound to besides purpose and epoch: the control prefix.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The URI, without secrets.
    pub fn describe(&self) -> &str {
        &self.uri
    }

    /// `file`, `pkcs11`, `vault-transit` or `aws-kms`.
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::File { .. } => "file",
            Backend::Kms { kek, .. } => kek.kind(),
        }
    }

    /// The deployment's identity, as the audit trail records it: the seed's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn control_key(&self) -> &DataKey {
        &self.control
    }

    pub fn audit_key(&self) -> &DataKey {
        &self.audit
    }

    pub fn epoch1(&self) -> &DataKey {
        &self.epoch1
    }

    fn context(&self, epoch: u32) -> WrapContext {
        WrapContext {
            purpose: "data-key",
            epoch,
            scope: self.scope.clone(),
        }
    }

    /// Wraps the data key of `epoch`. With an HSM or KMS root this is one call to it.
    pub fn wrap(&self, epoch: u32, key: &DataKey) -> Result<Vec<u8>, RootError> {
        match &self.backend {
            Backend::File { wrap } => Ok(wrap.wrap(epoch, key)?),
            Backend::Kms { kek, .. } => {
                let ctx = self.context(epoch);
                let blob = blocking(|| measured("wrap", || kek.wrap(&ctx, key.bytes())))?;
                let mut out = Vec::with_capacity(1 + blob.len());
                out.push(WRAP_FORMAT_KMS);
                out.extend_from_slice(&blob);
                Ok(out)
            }
        }
    }

    /// Unwraps the data key of `epoch`. With an HSM or KMS root this is one call to it.
    pub fn unwrap(&self, epoch: u32, wrapped: &[u8]) -> Result<DataKey, RootError> {
        match (&self.backend, wrapped.first()) {
            (Backend::File { wrap }, _) => Ok(wrap.unwrap(epoch, wrapped)?),
            (
                Backend::Kms {
                    legacy: Some(w), ..
                },
                Some(&envelope::WRAP_FORMAT_1),
            ) => Ok(w.unwrap(epoch, wrapped)?),
            (Backend::Kms { kek, .. }, Some(&WRAP_FORMAT_KMS))
                if wrapped.len() <= 1 + MAX_WRAPPED =>
            {
                let ctx = self.context(epoch);
                let bytes = blocking(|| measured("unwrap", || kek.unwrap(&ctx, &wrapped[1..])))?;
                Ok(DataKey::from_bytes(*bytes))
            }
            _ => Err(RootError::Envelope(EnvelopeError::WrappedFormat)),
        }
    }

    /// Whether `wrapped` is in the form this root writes now; `rewrap` replaces the others.
    pub fn is_current_format(&self, wrapped: &[u8]) -> bool {
        let want = match &self.backend {
            Backend::File { .. } => envelope::WRAP_FORMAT_1,
            Backend::Kms { .. } => WRAP_FORMAT_KMS,
        };
        wrapped.first() == Some(&want)
    }

    /// Re-proves that the root answers and is usable (`--check-config`).
    pub fn check(&self) -> Result<(), KekError> {
        match &self.backend {
            Backend::File { .. } => Ok(()),
            Backend::Kms { kek, .. } => blocking(|| measured("check", || kek.check())),
        }
    }
}

impl From<RootKey> for Arc<Root> {
    fn from(key: RootKey) -> Self {
        Arc::new(Root::from_key(&key))
    }
}

/// Why a data key could not be wrapped or unwrapped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RootError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Kek(#[from] KekError),
}

impl RootError {
    /// The refusal reason for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            RootError::Kek(e) if e.is_unavailable() => "kms_unavailable",
            RootError::Kek(_) => "kms_error",
            RootError::Envelope(_) => "unwrap_failed",
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, RootError::Kek(e) if e.is_unavailable())
    }
}

/// Retries `f` while the KMS is unavailable, for at most `budget`: a KMS that is still starting
/// is waited for, one that stays away stops the start.
pub fn with_retry<T>(
    budget: Duration,
    mut f: impl FnMut() -> Result<T, KekError>,
) -> Result<T, KekError> {
    let deadline = Instant::now() + budget;
    let mut pause = Duration::from_millis(200);
    loop {
        match f() {
            Err(e) if e.is_unavailable() && Instant::now() + pause < deadline => {
                tracing::warn!(error = %e, retry_in = ?pause, "the root's KMS did not answer; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// Reads a secret (PIN or token) from a file, without its trailing newline.
pub fn read_secret_file(path: &Path, what: &str, uri: &str) -> Result<Zeroizing<String>, KekError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| KekError::Config {
        uri: uri.to_owned(),
        why: format!("cannot read the {what} file {}: {e}", path.display()),
    })?);
    let text = std::str::from_utf8(&bytes).map_err(|_| KekError::Config {
        uri: uri.to_owned(),
        why: format!("the {what} file {} is not UTF-8", path.display()),
    })?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(KekError::Config {
            uri: uri.to_owned(),
            why: format!("the {what} file {} is empty", path.display()),
        });
    }
    Ok(Zeroizing::new(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_bad_ones_say_why() {
        assert_eq!(
            KekUri::parse("file:/etc/kek").unwrap(),
            KekUri::File("/etc/kek".into())
        );
        assert_eq!(
            KekUri::parse("vault-transit:cb").unwrap(),
            KekUri::VaultTransit {
                key: "cb".into(),
                mount: "transit".into()
            }
        );
        assert_eq!(
            KekUri::parse("vault-transit:cb?mount=team/transit").unwrap(),
            KekUri::VaultTransit {
                key: "cb".into(),
                mount: "team/transit".into()
            }
        );
        assert_eq!(
            KekUri::parse("aws-kms:alias/cipherbus").unwrap(),
            KekUri::AwsKms {
                key: "alias/cipherbus".into()
            }
        );
        for bad in [
            "/etc/kek",
            "file:",
            "vault-transit:",
            "vault-transit:a/b",
            "vault-transit:cb?mount=../x",
            "vault-transit:cb?token=x",
            "aws-kms:",
            "gcp-kms:x",
        ] {
            assert!(KekUri::parse(bad).is_err(), "{bad}");
        }
        let e = KekUri::parse("pkcs11:token=a;object=b?pin-value=1234").unwrap_err();
        assert!(!e.to_string().contains("1234"), "{e}");
    }

    #[test]
    fn contexts_differ_in_every_field() {
        let a = WrapContext {
            purpose: "data-key",
            epoch: 2,
            scope: "S".into(),
        };
        let mut b = a.clone();
        b.epoch = 3;
        let mut c = a.clone();
        c.scope = "T".into();
        let mut d = a.clone();
        d.purpose = "seed";
        let aads = [a.aad(), b.aad(), c.aad(), d.aad()];
        for i in 0..aads.len() {
            for j in i + 1..aads.len() {
                assert_ne!(aads[i], aads[j]);
            }
        }
        // Length prefixes: moving bytes between fields changes the AAD.
        let e = WrapContext {
            purpose: "data-key",
            epoch: 2,
            scope: "".into(),
        };
        assert_ne!(a.aad(), e.aad());
    }

    #[test]
    fn a_file_root_wraps_as_before() {
        let key = RootKey::from_bytes([7; 32]);
        let root = Root::from_key(&key);
        let dk = DataKey::from_bytes([9; 32]);
        let w = root.wrap(5, &dk).unwrap();
        assert_eq!(envelope::unwrap_key(&key, 5, &w).unwrap(), dk);
        assert_eq!(root.unwrap(5, &w).unwrap(), dk);
        assert!(root.unwrap(6, &w).is_err());
        assert_eq!(root.control_key(), &envelope::derive_control_key(&key));
        assert_eq!(root.epoch1(), &envelope::derive_epoch1(&key));
        assert_eq!(root.fingerprint(), key.fingerprint());
    }
}
