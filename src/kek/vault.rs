//! `vault-transit:KEY?mount=MOUNT`: a root key in HashiCorp Vault's or OpenBao's Transit
//! secrets engine. The key never leaves Vault; each wrap and unwrap is one blocking HTTP
//! request (`encrypt/KEY`, `decrypt/KEY`) with the [`WrapContext`] bound as the AEAD's
//! associated data, so the key must be an AEAD: `aes256-gcm96` or `chacha20-poly1305`, not
//! derived.
//!
//! Configured as the Vault CLI is, from the environment:
//! - `VAULT_ADDR` (required): `http://HOST:PORT` or `https://HOST:PORT`.
//! - `VAULT_TOKEN`, or else `VAULT_TOKEN_FILE` (a file holding the token).
//! - `VAULT_CACERT`: a PEM file of the CA certificates that may sign Vault's certificate.
//!   These are the only roots trusted: no system or built-in roots are, so an `https` address
//!   needs `VAULT_CACERT` (refused at start without it). `VAULT_CAPATH` and
//!   `VAULT_SKIP_VERIFY` are not read.
//! - `VAULT_NAMESPACE`: sent as `X-Vault-Namespace`.
//!
//! `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` apply as for other HTTP clients.
//! Redirects (a standby node pointing at the active one) are not followed, so the token and
//! the key never go anywhere but `VAULT_ADDR`.
//!
//! The token needs `update` on `MOUNT/encrypt/KEY` and `MOUNT/decrypt/KEY`, and `read` on
//! `MOUNT/keys/KEY` for the start-up check; `create` also needs `create` on that path.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::http::{self, B64};
use super::{read_secret_file, Kek, KekError, WrapContext, MAX_WRAPPED};
use crate::envelope::KEY_LEN;

/// Longest answer read for encrypt and decrypt (Vault's are a few hundred bytes).
const SMALL_ANSWER: usize = 16 * 1024;
/// Longest answer read for a key's description (one entry per key version).
const KEY_ANSWER: usize = 1024 * 1024;
/// Key types that take associated data.
const AEAD_TYPES: [&str; 2] = ["aes256-gcm96", "chacha20-poly1305"];
/// Messages show an address whole (but for a user and password).
const SHOWN: usize = usize::MAX;

/// A Transit key as a root. `Debug` shows where it is, never the token.
pub struct VaultKek {
    /// `vault-transit:KEY?mount=MOUNT`, as `--kek` takes it.
    uri: String,
    /// `VAULT_ADDR` without a trailing slash.
    addr: String,
    key: String,
    mount: String,
    token: Zeroizing<String>,
    namespace: Option<String>,
    cacert: Option<PathBuf>,
    agent: ureq::Agent,
}

impl fmt::Debug for VaultKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultKek")
            .field("uri", &self.uri)
            .field("addr", &self.addr)
            .field("namespace", &self.namespace)
            .field("cacert", &self.cacert)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The Transit request a call makes: names the path in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    ReadKey,
    CreateKey,
    Encrypt,
    Decrypt,
}

impl Op {
    fn segment(self) -> &'static str {
        match self {
            Op::ReadKey | Op::CreateKey => "keys",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
        }
    }

    /// The policy capability the path needs.
    fn capability(self) -> &'static str {
        match self {
            Op::ReadKey => "read",
            Op::CreateKey => "create",
            Op::Encrypt | Op::Decrypt => "update",
        }
    }
}

/// An answer: its status and body (zeroized when dropped, as it may hold a plaintext).
struct Answer {
    status: u16,
    location: Option<String>,
    body: Zeroizing<Vec<u8>>,
}

#[derive(Deserialize)]
struct Data<T> {
    data: Option<T>,
}

#[derive(Deserialize)]
struct Errors {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct Encrypted {
    ciphertext: String,
}

#[derive(Deserialize)]
struct Decrypted<'a> {
    #[serde(borrow)]
    plaintext: Cow<'a, str>,
}

#[derive(Deserialize)]
struct KeyInfo {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    supports_encryption: bool,
    #[serde(default)]
    supports_decryption: bool,
    #[serde(default)]
    derived: bool,
    #[serde(default)]
    soft_deleted: bool,
}

impl VaultKek {
    /// Opens `vault-transit:KEY?mount=MOUNT` with the `VAULT_*` variables of the environment.
    /// Nothing is sent to Vault until the first call.
    pub fn from_env(key: &str, mount: &str) -> Result<VaultKek, KekError> {
        VaultKek::from_vars(key, mount, http::env)
    }

    /// [`VaultKek::from_env`] with the variables from `var` (unset or empty: `None`).
    fn from_vars(
        key: &str,
        mount: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<VaultKek, KekError> {
        let uri = describe(key, mount);
        let addr = var("VAULT_ADDR").ok_or_else(|| KekError::Config {
            uri: uri.clone(),
            why: "VAULT_ADDR is not set (the address of Vault, e.g. https://vault:8200)".into(),
        })?;
        let token = match (
            var("VAULT_TOKEN").map(Zeroizing::new),
            var("VAULT_TOKEN_FILE"),
        ) {
            (Some(t), _) => t,
            (None, Some(path)) => read_secret_file(Path::new(&path), "VAULT_TOKEN_FILE", &uri)?,
            (None, None) => {
                return Err(KekError::Config {
                    uri,
                    why: "set VAULT_TOKEN or VAULT_TOKEN_FILE".into(),
                })
            }
        };
        let cacert = var("VAULT_CACERT").map(PathBuf::from);
        VaultKek::new(
            &addr,
            token,
            key,
            mount,
            cacert.as_deref(),
            var("VAULT_NAMESPACE"),
        )
    }

    /// A Transit key at `addr` (`http://` or `https://`; `https` needs `cacert`, the PEM file
    /// of the CAs trusted to sign Vault's certificate).
    pub fn new(
        addr: &str,
        token: Zeroizing<String>,
        key: &str,
        mount: &str,
        cacert: Option<&Path>,
        namespace: Option<String>,
    ) -> Result<VaultKek, KekError> {
        let uri = describe(key, mount);
        let bad = |why: String| KekError::Config {
            uri: uri.clone(),
            why,
        };
        if !super::valid_path_segment(key, false) || !super::valid_path_segment(mount, true) {
            return Err(bad(
                "the key and mount names are letters, digits, - _ . (and / in a mount)".into(),
            ));
        }
        let addr = addr.trim_end_matches('/');
        let (https, _) = http::base_address(addr, "VAULT_ADDR", SHOWN).map_err(&bad)?;
        // Visible ASCII only: a header carries it, and no byte of it may end up in a message.
        let token = Zeroizing::new(token.trim().to_owned());
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the Vault token is empty or holds characters other than visible ASCII".into(),
            ));
        }
        if let Some(ns) = &namespace {
            if !ns.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(format!(
                    "VAULT_NAMESPACE {ns:?} is not a namespace path"
                )));
            }
        }
        let roots = match cacert {
            Some(path) => http::ca_roots(path, "VAULT_CACERT").map_err(&bad)?,
            None if https => {
                return Err(bad(format!(
                    "VAULT_ADDR {addr} is https and VAULT_CACERT is not set: no system roots are \
                     trusted, name the PEM file of the CA that signs Vault's certificate"
                )))
            }
            None => Vec::new(),
        };
        let agent = http::agent(roots);
        Ok(VaultKek {
            uri,
            addr: addr.to_owned(),
            key: key.to_owned(),
            mount: mount.to_owned(),
            token,
            namespace,
            cacert: cacert.map(Path::to_owned),
            agent,
        })
    }

    /// `MOUNT/SEGMENT/KEY`, as policies name it.
    fn path(&self, op: Op) -> String {
        format!("{}/{}/{}", self.mount, op.segment(), self.key)
    }

    /// One request; `body` is JSON. Any answer comes back, whatever its status.
    fn call(&self, op: Op, post: Option<&[u8]>, limit: usize) -> Result<Answer, KekError> {
        let url = format!("{}/v1/{}", self.addr, self.path(op));
        let result = match post {
            Some(body) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("X-Vault-Token", self.token.as_str())
                    .header("X-Vault-Request", "true")
                    .content_type("application/json");
                if let Some(ns) = &self.namespace {
                    req = req.header("X-Vault-Namespace", ns.as_str());
                }
                req.send(body)
            }
            None => {
                let mut req = self
                    .agent
                    .get(&url)
                    .header("X-Vault-Token", self.token.as_str())
                    .header("X-Vault-Request", "true");
                if let Some(ns) = &self.namespace {
                    req = req.header("X-Vault-Namespace", ns.as_str());
                }
                req.call()
            }
        };
        let mut response = result.map_err(|e| {
            let at = format!("{} ({})", self.addr, self.path(op));
            http::transport(&self.uri, &at, &e, |text| self.scrub(text))
        })?;
        let got = http::receive(&mut response, "location", limit).map_err(|why| {
            KekError::Unavailable {
                uri: self.uri.clone(),
                why: format!("{} {}: {why}", self.addr, self.path(op)),
            }
        })?;
        Ok(Answer {
            status: got.status,
            location: got.header,
            body: got.body,
        })
    }

    /// The error an answer other than success means.
    fn refusal(&self, op: Op, answer: &Answer) -> KekError {
        let said = self.scrub(&vault_errors(&answer.body));
        let uri = self.uri.clone();
        let path = self.path(op);
        let lower = said.to_ascii_lowercase();
        let vault_json = serde_json::from_slice::<Errors>(&answer.body).is_ok();
        let target = answer
            .location
            .as_deref()
            .map_or("nowhere".into(), |a| http::show_addr(a, SHOWN));
        let said_or = |none: &str| {
            if said.is_empty() {
                none.to_owned()
            } else {
                said.clone()
            }
        };
        match answer.status {
            300..=399 => KekError::Unavailable {
                uri,
                why: format!(
                    "{} answered {} with a redirect to {} (a standby node?); redirects are not \
                     followed: set VAULT_ADDR to the active node or its load balancer",
                    self.addr, answer.status, target
                ),
            },
            401 | 403 => KekError::Denied {
                uri,
                why: format!(
                    "{} on {path} (a wrong or expired token, or a policy without {} on {path})",
                    said_or("permission denied"),
                    op.capability(),
                ),
            },
            404 if lower.contains("no handler for route") => KekError::Config {
                uri,
                why: format!(
                    "no Transit engine is mounted at {}/ on {}: {said}",
                    self.mount, self.addr
                ),
            },
            404 if lower.contains("namespace") => KekError::Config {
                uri,
                why: format!("VAULT_NAMESPACE: {said}"),
            },
            400..=499 if !vault_json && !matches!(answer.status, 412 | 429) => KekError::Config {
                uri,
                why: format!(
                    "{} answered {} on {path} without Vault's JSON ({}): is VAULT_ADDR Vault's \
                     address?",
                    self.addr,
                    answer.status,
                    said_or("no reason given")
                ),
            },
            404 => KekError::NotFound { uri },
            400 if lower.contains("key not found") => KekError::NotFound { uri },
            400 if lower.contains("non-aead")
                || lower.contains("key derivation")
                || lower.contains("does not support") =>
            {
                KekError::WrongKey {
                    uri,
                    why: format!("{said}; create the key with type aes256-gcm96"),
                }
            }
            400 if op == Op::Decrypt => KekError::Unwrap {
                uri,
                why: said_or("Vault refused the ciphertext"),
            },
            400 if op == Op::CreateKey => KekError::Config {
                uri,
                why: format!("cannot create {path}: {}", said_or("bad request")),
            },
            400 => KekError::WrongKey {
                uri,
                why: format!("{path}: {}", said_or("bad request")),
            },
            412 | 429 | 500..=599 => KekError::Unavailable {
                uri,
                why: format!(
                    "{} answered {} on {path}: {}",
                    self.addr,
                    answer.status,
                    said_or("no reason given")
                ),
            },
            other => KekError::Config {
                uri,
                why: format!(
                    "{} answered {other} on {path}: {}",
                    self.addr,
                    said_or("no reason given")
                ),
            },
        }
    }

    /// Parses a successful answer's `data`.
    fn data<'a, T: Deserialize<'a>>(&self, op: Op, body: &'a [u8]) -> Result<T, KekError> {
        serde_json::from_slice::<Data<T>>(body)
            .ok()
            .and_then(|d| d.data)
            .ok_or_else(|| KekError::Config {
                uri: self.uri.clone(),
                why: format!(
                    "{} answered {} with something other than Vault's JSON: is VAULT_ADDR \
                     Vault's address?",
                    self.addr,
                    self.path(op)
                ),
            })
    }

    /// The key's description; `None` when there is no such key.
    fn read_key(&self) -> Result<Option<KeyInfo>, KekError> {
        let answer = self.call(Op::ReadKey, None, KEY_ANSWER)?;
        match answer.status {
            200 => self.data(Op::ReadKey, &answer.body).map(Some),
            404 => match self.refusal(Op::ReadKey, &answer) {
                KekError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
            _ => Err(self.refusal(Op::ReadKey, &answer)),
        }
    }

    fn wrong(&self, why: String) -> KekError {
        KekError::WrongKey {
            uri: self.uri.clone(),
            why,
        }
    }

    /// `text` with the token cut out, should a server ever echo it.
    fn scrub(&self, text: &str) -> String {
        text.replace(self.token.as_str(), "<token>")
    }
}

/// The URI, as `--kek` takes it and [`super::KekUri::describe`] shows it.
fn describe(key: &str, mount: &str) -> String {
    format!("vault-transit:{key}?mount={mount}")
}

/// Vault's `errors`, one line, its multi-error decoration removed; or a short excerpt of a
/// body that is not Vault's JSON.
fn vault_errors(body: &[u8]) -> String {
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) => e
            .errors
            .iter()
            .flat_map(|e| e.lines())
            .map(|l| l.trim().trim_start_matches("* ").trim())
            .filter(|l| {
                let decoration = l.ends_with("occurred:") && l.contains("error");
                !l.is_empty() && !decoration
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(200)
                .collect();
            text.trim().to_owned()
        }
    }
}

/// Whether `blob` is a Transit ciphertext: `vault:v<N>:<base64>`.
fn is_transit_ciphertext(blob: &[u8]) -> bool {
    let Some(rest) = blob.strip_prefix(b"vault:v") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let Some(b64) = rest[digits..].strip_prefix(b":") else {
        return false;
    };
    (1..=10).contains(&digits)
        && !b64.is_empty()
        && blob.len() <= MAX_WRAPPED
        && b64
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// `{"plaintext":"…","associated_data":"…"}`, built in one zeroized buffer.
fn encrypt_body(secret: &[u8; KEY_LEN], aad: &[u8]) -> Zeroizing<Vec<u8>> {
    let tail = format!(r#"","associated_data":"{}"}}"#, B64.encode(aad));
    http::secret_json(r#"{"plaintext":""#, secret, &tail)
}

impl Kek for VaultKek {
    fn describe(&self) -> &str {
        &self.uri
    }

    fn kind(&self) -> &'static str {
        "vault-transit"
    }

    fn check(&self) -> Result<(), KekError> {
        let info = self.read_key()?.ok_or_else(|| KekError::NotFound {
            uri: self.uri.clone(),
        })?;
        if !AEAD_TYPES.contains(&info.kind.as_str()) {
            return Err(self.wrong(format!(
                "key type {} cannot wrap with associated data; create it with type aes256-gcm96",
                info.kind
            )));
        }
        if info.derived {
            return Err(self.wrong(
                "the key is derived (every request would need a context); create it without \
                 derived=true"
                    .into(),
            ));
        }
        if info.soft_deleted {
            return Err(self.wrong("the key is soft-deleted".into()));
        }
        if !info.supports_encryption || !info.supports_decryption {
            return Err(
                self.wrong("the key does not support both encryption and decryption".into())
            );
        }
        // A round trip proves the token may encrypt and decrypt with it.
        http::probe(self)
    }

    fn create(&self) -> Result<(), KekError> {
        // Vault answers a create of an existing key with success, and changes nothing.
        if self.read_key()?.is_some() {
            return Err(KekError::Exists {
                uri: self.uri.clone(),
            });
        }
        let body = br#"{"type":"aes256-gcm96","exportable":false,"allow_plaintext_backup":false}"#;
        let answer = self.call(Op::CreateKey, Some(&body[..]), KEY_ANSWER)?;
        match answer.status {
            200..=299 => Ok(()),
            _ => Err(self.refusal(Op::CreateKey, &answer)),
        }
    }

    fn wrap(&self, ctx: &WrapContext, secret: &[u8; KEY_LEN]) -> Result<Vec<u8>, KekError> {
        let body = encrypt_body(secret, &ctx.aad());
        let answer = self.call(Op::Encrypt, Some(&body[..]), SMALL_ANSWER)?;
        drop(body);
        if !(200..=299).contains(&answer.status) {
            return Err(self.refusal(Op::Encrypt, &answer));
        }
        let data: Encrypted = self.data(Op::Encrypt, &answer.body)?;
        let blob = data.ciphertext.into_bytes();
        if !is_transit_ciphertext(&blob) {
            return Err(self.wrong(format!(
                "{} did not return a Transit ciphertext (vault:vN:…) of at most {MAX_WRAPPED} bytes",
                self.path(Op::Encrypt)
            )));
        }
        Ok(blob)
    }

    fn unwrap(
        &self,
        ctx: &WrapContext,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
        let fail = |why: String| KekError::Unwrap {
            uri: self.uri.clone(),
            why,
        };
        if !is_transit_ciphertext(wrapped) {
            return Err(fail("not a Vault Transit ciphertext (vault:vN:…)".into()));
        }
        // Checked above: ASCII.
        let ciphertext = std::str::from_utf8(wrapped).unwrap_or_default();
        let body = serde_json::json!({
            "ciphertext": ciphertext,
            "associated_data": B64.encode(ctx.aad()),
        })
        .to_string();
        let answer = self.call(Op::Decrypt, Some(body.as_bytes()), SMALL_ANSWER)?;
        if !(200..=299).contains(&answer.status) {
            return Err(self.refusal(Op::Decrypt, &answer));
        }
        let mut data: Decrypted<'_> = self.data(Op::Decrypt, &answer.body)?;
        http::decode_key(&mut data.plaintext, "Vault").map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::http::vars;

    const TOKEN: &str = "hvs.SECRET-token-1234";

    fn kek(addr: &str) -> VaultKek {
        VaultKek::new(
            addr,
            Zeroizing::new(TOKEN.into()),
            "cb",
            "transit",
            None,
            None,
        )
        .unwrap()
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            location: Some("http://other:8200/v1/x".into()),
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let k = kek("http://127.0.0.1:8200/");
        let shown = format!("{k:?} {k:#?}");
        assert!(!shown.contains(TOKEN), "{shown}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("http://127.0.0.1:8200"), "{shown}");
        assert_eq!(k.describe(), "vault-transit:cb?mount=transit");
        assert_eq!(
            k.describe(),
            super::super::KekUri::parse(k.describe())
                .unwrap()
                .describe()
        );
        assert_eq!(k.kind(), "vault-transit");
    }

    #[test]
    fn the_environment_must_name_an_address_and_a_token() {
        let e = VaultKek::from_vars("cb", "transit", vars(&[("VAULT_TOKEN", TOKEN)])).unwrap_err();
        assert!(matches!(e, KekError::Config { .. }), "{e}");
        assert!(e.to_string().contains("VAULT_ADDR"), "{e}");
        assert!(!e.to_string().contains(TOKEN), "{e}");

        let e = VaultKek::from_vars("cb", "transit", vars(&[("VAULT_ADDR", "http://v:8200")]))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("set VAULT_TOKEN or VAULT_TOKEN_FILE"),
            "{e}"
        );
        let e = VaultKek::from_vars(
            "cb",
            "transit",
            vars(&[("VAULT_ADDR", "http://v:8200"), ("VAULT_TOKEN", "")]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("set VAULT_TOKEN or VAULT_TOKEN_FILE"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        let k = VaultKek::from_vars(
            "cb",
            "team/transit",
            vars(&[
                ("VAULT_ADDR", "http://v:8200"),
                ("VAULT_TOKEN_FILE", file.to_str().unwrap()),
                ("VAULT_NAMESPACE", "team"),
            ]),
        )
        .unwrap();
        assert_eq!(k.token.as_str(), TOKEN);
        assert_eq!(k.namespace.as_deref(), Some("team"));
        assert_eq!(k.describe(), "vault-transit:cb?mount=team/transit");
        // VAULT_TOKEN wins over the file.
        let k = VaultKek::from_vars(
            "cb",
            "transit",
            vars(&[
                ("VAULT_ADDR", "http://v:8200"),
                ("VAULT_TOKEN", "other"),
                ("VAULT_TOKEN_FILE", file.to_str().unwrap()),
            ]),
        )
        .unwrap();
        assert_eq!(k.token.as_str(), "other");

        let e = VaultKek::from_vars(
            "cb",
            "transit",
            vars(&[
                ("VAULT_ADDR", "http://v:8200"),
                ("VAULT_TOKEN_FILE", "/nonexistent/token"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/token"), "{e}");
    }

    #[test]
    fn bad_addresses_and_tokens_are_refused_without_showing_secrets() {
        let new = |addr: &str, token: &str| {
            VaultKek::new(
                addr,
                Zeroizing::new(token.into()),
                "cb",
                "transit",
                None,
                None,
            )
        };
        for addr in [
            "vault:8200",
            "ftp://vault",
            "http://",
            "http://vault:8200/v1",
            "http://user:pw@vault:8200",
        ] {
            let e = new(addr, TOKEN).unwrap_err();
            assert!(matches!(e, KekError::Config { .. }), "{addr}: {e}");
            assert!(!e.to_string().contains("pw@"), "{e}");
        }
        let e = new("https://vault:8200", TOKEN).unwrap_err();
        assert!(e.to_string().contains("VAULT_CACERT"), "{e}");
        let e = new("http://vault:8200", "bad token\x01").unwrap_err();
        assert!(!e.to_string().contains("bad token"), "{e}");
        assert!(new("http://vault:8200", "  ").is_err());
        assert_eq!(
            new("http://vault:8200", " tok\n").unwrap().token.as_str(),
            "tok"
        );
        assert!(VaultKek::new(
            "http://v",
            Zeroizing::new(TOKEN.into()),
            "a/b",
            "transit",
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn vault_cacert_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["vault".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        let k = VaultKek::new(
            "https://vault:8200",
            Zeroizing::new(TOKEN.into()),
            "cb",
            "transit",
            Some(&good),
            None,
        )
        .unwrap();
        assert_eq!(k.cacert.as_deref(), Some(good.as_path()));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem\n").unwrap();
        for path in [empty.as_path(), Path::new("/nonexistent/ca.pem")] {
            let e = VaultKek::new(
                "https://vault:8200",
                Zeroizing::new(TOKEN.into()),
                "cb",
                "transit",
                Some(path),
                None,
            )
            .unwrap_err();
            assert!(matches!(e, KekError::Config { .. }), "{e}");
            assert!(e.to_string().contains("VAULT_CACERT"), "{e}");
        }
    }

    #[test]
    fn ciphertexts_are_recognised() {
        for good in ["vault:v1:abc=", "vault:v12:a+b/c==", "vault:v1234567890:x"] {
            assert!(is_transit_ciphertext(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "vault:v1:",
            "vault:v:abc",
            "vault:vx:abc",
            "vault:v1abc",
            "vault:v12345678901:abc",
            "vault:v1:ab c",
            "vault:v1:ab\"c",
            "VAULT:v1:abc",
            "vault:v1:é",
        ] {
            assert!(!is_transit_ciphertext(bad.as_bytes()), "{bad}");
        }
        let long = format!("vault:v1:{}", "A".repeat(MAX_WRAPPED));
        assert!(!is_transit_ciphertext(long.as_bytes()));
    }

    #[test]
    fn a_blob_that_is_not_a_ciphertext_fails_without_calling_vault() {
        // Nothing listens on port 9 of 127.0.0.1: a call would be Unavailable, not Unwrap.
        let k = kek("http://127.0.0.1:9");
        let ctx = WrapContext {
            purpose: "data-key",
            epoch: 1,
            scope: "S".into(),
        };
        let e = k.unwrap(&ctx, b"\x01\x02garbage").unwrap_err();
        assert!(matches!(e, KekError::Unwrap { .. }), "{e}");
    }

    #[test]
    fn the_encrypt_body_is_json_with_both_fields() {
        let secret = [7u8; KEY_LEN];
        let aad = b"cipherbus aad";
        let body = encrypt_body(&secret, aad);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["plaintext"], B64.encode(secret));
        assert_eq!(v["associated_data"], B64.encode(aad));
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn vault_errors_are_one_line() {
        assert_eq!(
            vault_errors(br#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#),
            "permission denied"
        );
        assert_eq!(
            vault_errors(br#"{"errors":["2 errors occurred:\n\t* a\n\t* b\n\n"]}"#),
            "a; b"
        );
        assert_eq!(vault_errors(br#"{"errors":[]}"#), "");
        assert_eq!(
            vault_errors(b"<html>\nBad\tGateway</html>"),
            "<html> Bad Gateway</html>"
        );
    }

    #[test]
    fn answers_map_to_errors() {
        let k = kek("http://127.0.0.1:8200");
        let kind = |op, status, body: &str| {
            let e = k.refusal(op, &answer(status, body));
            assert!(!e.to_string().contains(TOKEN), "{e}");
            match e {
                KekError::Config { .. } => "config",
                KekError::Unavailable { .. } => "unavailable",
                KekError::Denied { .. } => "denied",
                KekError::NotFound { .. } => "not-found",
                KekError::WrongKey { .. } => "wrong-key",
                KekError::Unwrap { .. } => "unwrap",
                KekError::Exists { .. } => "exists",
            }
        };
        let errs = |s: &str| format!(r#"{{"errors":["{s}"]}}"#);
        assert_eq!(
            kind(Op::Encrypt, 503, &errs("Vault is sealed")),
            "unavailable"
        );
        assert_eq!(kind(Op::Encrypt, 500, "oops"), "unavailable");
        assert_eq!(kind(Op::Encrypt, 429, ""), "unavailable");
        assert_eq!(kind(Op::Encrypt, 307, ""), "unavailable");
        assert_eq!(kind(Op::Encrypt, 403, &errs("permission denied")), "denied");
        assert_eq!(kind(Op::ReadKey, 403, &errs("permission denied")), "denied");
        assert_eq!(kind(Op::ReadKey, 404, r#"{"errors":[]}"#), "not-found");
        assert_eq!(kind(Op::ReadKey, 404, ""), "config");
        assert_eq!(kind(Op::ReadKey, 404, "<html>Not Found</html>"), "config");
        assert_eq!(
            kind(
                Op::ReadKey,
                404,
                &errs("no handler for route \\\"x/keys/cb\\\". route entry not found.")
            ),
            "config"
        );
        assert_eq!(
            kind(Op::ReadKey, 404, &errs("namespace not found")),
            "config"
        );
        assert_eq!(
            kind(Op::Decrypt, 400, &errs("encryption key not found")),
            "not-found"
        );
        assert_eq!(kind(Op::Encrypt, 400, &errs("key not found")), "not-found");
        for unwrap in [
            "cipher: message authentication failed",
            "invalid ciphertext length",
            "invalid ciphertext: version is too new",
            "ciphertext or signature version is disallowed by policy (too old)",
        ] {
            assert_eq!(kind(Op::Decrypt, 400, &errs(unwrap)), "unwrap", "{unwrap}");
        }
        assert_eq!(
            kind(
                Op::Encrypt,
                400,
                &errs("'[0].associated_data' provided for non-AEAD cipher suite rsa-2048")
            ),
            "wrong-key"
        );
        assert_eq!(
            kind(
                Op::Decrypt,
                400,
                &errs("missing 'context' for key derivation; ...")
            ),
            "wrong-key"
        );
        assert_eq!(
            kind(Op::CreateKey, 400, &errs("unknown key type")),
            "config"
        );
        assert_eq!(kind(Op::Encrypt, 418, ""), "config");
        assert_eq!(
            kind(
                Op::ReadKey,
                400,
                "Client sent an HTTP request to an HTTPS server."
            ),
            "config"
        );

        let e = k.refusal(Op::Decrypt, &answer(403, &errs("permission denied")));
        assert!(e.to_string().contains("transit/decrypt/cb"), "{e}");
        assert!(e.to_string().contains("update"), "{e}");
        // A server that echoes the token never gets it into a message.
        let e = k.refusal(Op::Encrypt, &answer(400, &format!("token was {TOKEN}")));
        assert!(!e.to_string().contains(TOKEN), "{e}");
    }
}
