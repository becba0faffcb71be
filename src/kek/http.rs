//! What the HTTP roots (`vault-transit:`, `aws-kms:`) share, and the start-up round trip every
//! root's `check` ends with.
//!
//! This module owns the blocking ureq agent (rustls on aws-lc-rs, timeouts, no redirects),
//! the checks of a `SCHEME://HOST[:PORT]` address, the trust roots read from a PEM CA file,
//! the error of a request that got no answer, and the handling of secrets on the wire: request
//! bodies built in one zeroizing buffer, answers read into one. Each backend keeps its
//! configuration, its requests and the meaning of its answers.

use std::borrow::Cow;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use zeroize::{Zeroize, Zeroizing};

use super::{Kek, KekError, WrapContext};
use crate::envelope::KEY_LEN;

/// Connect timeout, and the budget for a whole request (connect, send, answer, body).
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A variable of the environment, unset when empty.
pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Wraps a random key under `kek` and unwraps it again, under a `check` context: proves the
/// credentials may do both with the key and the backend does what it claims.
pub(crate) fn probe(kek: &dyn Kek) -> Result<(), KekError> {
    let ctx = WrapContext {
        purpose: "check",
        epoch: 0,
        scope: String::new(),
    };
    let mut probe = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::getrandom(&mut probe[..]).map_err(|_| KekError::Config {
        uri: kek.describe().to_owned(),
        why: "no randomness available".into(),
    })?;
    let back = kek.unwrap(&ctx, &kek.wrap(&ctx, &probe)?)?;
    if *back != *probe {
        return Err(KekError::WrongKey {
            uri: kek.describe().to_owned(),
            why: "a wrap did not unwrap to the same bytes".into(),
        });
    }
    Ok(())
}

/// An agent that trusts `roots` only, gives up after [`TIMEOUT`] and follows no redirect, so
/// the credentials never go anywhere but the configured address. Every answer comes back,
/// whatever its status: the backend says what it means.
pub(crate) fn agent(roots: Vec<ureq::tls::Certificate<'static>>) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(TIMEOUT))
        .timeout_global(Some(TIMEOUT))
        .user_agent(concat!("cipherbus/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .new_agent()
}

/// Checks that `addr` (no trailing slash) is `http://` or `https://HOST[:PORT]`, without a
/// path or user: whether it is `https`, and the parsed address. `what` names it in refusals
/// (`VAULT_ADDR`, `the KMS endpoint`), which show it as [`show_addr`] does with `limit`.
pub(crate) fn base_address(
    addr: &str,
    what: &str,
    limit: usize,
) -> Result<(bool, ureq::http::Uri), String> {
    let (https, rest) = if let Some(rest) = addr.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = addr.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!(
            "{what} {} is not an http:// or https:// address",
            show_addr(addr, limit)
        ));
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!(
            "{what} {} must be SCHEME://HOST[:PORT], without a path or user",
            show_addr(addr, limit)
        ));
    }
    match addr.parse::<ureq::http::Uri>() {
        Ok(parsed) => Ok((https, parsed)),
        Err(_) => Err(format!(
            "{what} {} is not a valid address",
            show_addr(addr, limit)
        )),
    }
}

/// An address for messages: any `user:password@` cut out. One without a scheme is cut to 64
/// characters, one without a user to `limit`.
pub(crate) fn show_addr(addr: &str, limit: usize) -> String {
    match addr.split_once("://") {
        Some((scheme, rest)) => {
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}://…@{}", &rest[at + 1..]),
                None => addr.chars().take(limit).collect(),
            }
        }
        None => addr.chars().take(64).collect(),
    }
}

/// The CA certificates of a PEM file, each checked to be a usable trust anchor. `var` is the
/// variable that names the file, for messages.
pub(crate) fn ca_roots(
    path: &Path,
    var: &str,
) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read {var} {}: {e}", path.display()))?;
    let mut store = rustls::RootCertStore::empty();
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            format!(
                "{var} {} is not a PEM certificate file: {e}",
                path.display()
            )
        })?;
        store.add(cert.clone()).map_err(|e| {
            format!(
                "{var} {} holds a certificate that cannot be a root: {e}",
                path.display()
            )
        })?;
        out.push(ureq::tls::Certificate::from_der(cert.as_ref()).to_owned());
    }
    if out.is_empty() {
        return Err(format!("{var} {} holds no PEM certificate", path.display()));
    }
    Ok(out)
}

/// The error of a request that got no answer. `at` says where and what (`ADDR (OPERATION)`);
/// `scrub` cuts the backend's secrets out of ureq's words, should they ever carry one.
pub(crate) fn transport(
    uri: &str,
    at: &str,
    e: &ureq::Error,
    scrub: impl Fn(&str) -> String,
) -> KekError {
    match e {
        ureq::Error::Timeout(t) => KekError::Unavailable {
            uri: uri.to_owned(),
            why: format!("{at} did not answer within {TIMEOUT:?} ({t})"),
        },
        ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl | ureq::Error::Http(_) => {
            KekError::Config {
                uri: uri.to_owned(),
                why: format!("cannot send a request to {at}: {}", scrub(&e.to_string())),
            }
        }
        other => KekError::Unavailable {
            uri: uri.to_owned(),
            why: format!("cannot reach {at}: {}", scrub(&other.to_string())),
        },
    }
}

/// What [`receive`] read of an answer.
pub(crate) struct Received {
    pub(crate) status: u16,
    /// The one header the backend asked for.
    pub(crate) header: Option<String>,
    /// Zeroized when dropped, as it may hold a plaintext.
    pub(crate) body: Zeroizing<Vec<u8>>,
}

/// An answer's status, its header `name` and at most `limit` bytes of its body. `Err` says
/// why the body could not be read.
pub(crate) fn receive(
    response: &mut ureq::http::Response<ureq::Body>,
    name: &str,
    limit: usize,
) -> Result<Received, String> {
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = read_body(response.body_mut(), limit)?;
    Ok(Received {
        status,
        header,
        body,
    })
}

/// Reads at most `limit` bytes of a body into one buffer allocated up front, so no copy of a
/// plaintext is left behind by a reallocation; the buffer is zeroized when dropped.
fn read_body(body: &mut ureq::Body, limit: usize) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut buf = Zeroizing::new(vec![0u8; limit]);
    let mut reader = body.with_config().limit(limit as u64 + 1).reader();
    let mut n = 0;
    loop {
        if n == limit {
            let mut more = [0u8; 1];
            match reader.read(&mut more) {
                Ok(0) => break,
                Ok(_) | Err(_) => return Err(format!("the answer is longer than {limit} bytes")),
            }
        }
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("the answer was cut off: {e}")),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// `head`, the base64 of `secret`, then `tail`: a JSON body built in one zeroized buffer of the
/// final size, so no copy of the secret is left behind by a reallocation.
pub(crate) fn secret_json(head: &str, secret: &[u8; KEY_LEN], tail: &str) -> Zeroizing<Vec<u8>> {
    let len = head.len() + base64::encoded_len(KEY_LEN, true).unwrap_or(64) + tail.len();
    let mut body = Zeroizing::new(String::with_capacity(len));
    body.push_str(head);
    B64.encode_string(secret, &mut body);
    body.push_str(tail);
    debug_assert_eq!(body.len(), len, "no reallocation");
    Zeroizing::new(std::mem::take(&mut *body).into_bytes())
}

/// The key in an answer's base64 `plaintext`, decoded through a zeroized scratch buffer; the
/// text is zeroized too when the JSON parser had to copy it. `who` names the server in
/// refusals (`Vault returned 16 bytes, …`).
pub(crate) fn decode_key(
    plaintext: &mut Cow<'_, str>,
    who: &str,
) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let mut scratch = Zeroizing::new([0u8; 2 * KEY_LEN]);
    let decoded = B64.decode_slice(plaintext.as_bytes(), &mut scratch[..]);
    if let Cow::Owned(s) = plaintext {
        s.zeroize();
    }
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    match decoded {
        Ok(KEY_LEN) => out.copy_from_slice(&scratch[..KEY_LEN]),
        Ok(n) => {
            return Err(format!(
                "{who} returned {n} bytes, not a {KEY_LEN}-byte key"
            ))
        }
        Err(_) => {
            return Err(format!(
                "{who} returned more than {} bytes or no base64, not a {KEY_LEN}-byte key",
                2 * KEY_LEN
            ))
        }
    }
    Ok(out)
}

/// A test's environment for a backend's `from_vars`: `pairs`, read as [`env`] reads the real
/// one (unset when empty).
#[cfg(test)]
pub(crate) fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoded_key_is_exactly_key_len_bytes() {
        let mut text = Cow::Owned(B64.encode([7u8; KEY_LEN]));
        assert_eq!(*decode_key(&mut text, "X").unwrap(), [7u8; KEY_LEN]);
        // The copy the parser made is wiped.
        assert!(text.bytes().all(|b| b == 0));
        for (bad, want) in [
            (
                B64.encode([1u8; 16]),
                "X returned 16 bytes, not a 32-byte key",
            ),
            (
                B64.encode([1u8; 65]),
                "X returned more than 64 bytes or no base64",
            ),
            ("not base64!".to_owned(), "or no base64"),
        ] {
            let e = decode_key(&mut Cow::Borrowed(&bad), "X").unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_secret_body_is_head_key_tail() {
        let body = secret_json("{\"k\":\"", &[7u8; KEY_LEN], "\"}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["k"], B64.encode([7u8; KEY_LEN]));
    }

    #[test]
    fn addresses_are_shown_without_a_user() {
        assert_eq!(show_addr("http://u:pw@h:1", 200), "http://…@h:1");
        assert_eq!(
            show_addr(&format!("http://{}", "h".repeat(300)), 200).len(),
            200
        );
        assert_eq!(show_addr(&"h".repeat(300), usize::MAX).len(), 64);
        let e = base_address("http://u:pw@h", "VAULT_ADDR", 200).unwrap_err();
        assert!(!e.contains("pw"), "{e}");
        assert!(base_address("https://h:8200", "X", 200).unwrap().0);
    }
}
