//! A root inside a PKCS#11 token: any HSM, cloud HSM, TPM or SoftHSM.
//!
//! This module owns the `pkcs11:` URI (RFC 7512) and the calls to the token. The root is a
//! non-extractable, sensitive AES-256 secret key; a data key is wrapped with `CKM_AES_GCM`
//! (random 96-bit IV, 128-bit tag) with the wrap context as AAD, as `iv || ciphertext || tag`.
//! The user PIN comes from `pin-source` (a file, or `env:NAME`), never from the URI itself.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::{Zeroize, Zeroizing};

use super::{Kek, KekError, WrapContext};
use crate::envelope::KEY_LEN;

const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// `iv || ciphertext || tag`.
pub const WRAPPED_LEN: usize = IV_LEN + KEY_LEN + TAG_LEN;

/// Where the user PIN is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    File(PathBuf),
    Env(String),
}

/// A parsed `pkcs11:` URI: which token, which object, which module, where the PIN is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub serial: Option<String>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub module: PathBuf,
    pub pin: PinSource,
}

/// RFC 7512 percent-decoding.
fn pct_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_text(s: &str) -> Result<String, String> {
    String::from_utf8(pct_decode(s)?).map_err(|_| format!("{s:?} is not UTF-8"))
}

impl Pkcs11Uri {
    /// Parses what follows `pkcs11:`.
    pub fn parse(rest: &str) -> Result<Self, String> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Pkcs11Uri {
            token: None,
            serial: None,
            object: None,
            id: None,
            module: PathBuf::new(),
            pin: PinSource::Env(String::new()),
        };
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| format!("path attribute {attr:?} has no value"))?;
            match k {
                "token" => uri.token = Some(pct_text(v)?),
                "serial" => uri.serial = Some(pct_text(v)?),
                "object" => uri.object = Some(pct_text(v)?),
                "id" => uri.id = Some(pct_decode(v)?),
                "type" if v == "secret-key" => {}
                "type" => return Err(format!("type={v}: the root is a secret-key")),
                // Describe the token or library further; the label and object suffice here.
                "manufacturer"
                | "model"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer" => {}
                _ => return Err(format!("unknown path attribute {k:?}")),
            }
        }
        let mut module = None;
        let mut pin = None;
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
            match k {
                "module-path" => module = Some(PathBuf::from(pct_text(v)?)),
                "pin-source" => {
                    let v = pct_text(v)?;
                    pin = Some(if let Some(name) = v.strip_prefix("env:") {
                        PinSource::Env(name.to_owned())
                    } else {
                        PinSource::File(PathBuf::from(v.strip_prefix("file:").unwrap_or(&v)))
                    });
                }
                "pin-value" => {
                    return Err(
                        "pin-value is refused, since a command line is not secret: use pin-source=file:PATH"
                            .into(),
                    )
                }
                _ => return Err(format!("unknown query attribute {k:?}")),
            }
        }
        uri.module = module.ok_or("module-path=... is required")?;
        uri.pin = pin.ok_or("pin-source=file:PATH (or env:NAME) is required")?;
        if uri.token.is_none() && uri.serial.is_none() {
            return Err("token=LABEL (or serial=...) is required".into());
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err("object=LABEL (or id=...) is required".into());
        }
        Ok(uri)
    }

    /// The URI without the query's PIN source, for messages.
    pub fn describe(&self) -> String {
        let mut s = "pkcs11:".to_owned();
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("token={t}"));
        }
        if let Some(t) = &self.serial {
            parts.push(format!("serial={t}"));
        }
        if let Some(o) = &self.object {
            parts.push(format!("object={o}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", hex::encode(id)));
        }
        s.push_str(&parts.join(";"));
        s
    }
}

/// One library per path per process: PKCS#11 modules are initialized once.
fn library(uri: &Pkcs11Uri, describe: &str) -> Result<Arc<Pkcs11>, KekError> {
    static LIBS: Mutex<Option<HashMap<PathBuf, Arc<Pkcs11>>>> = Mutex::new(None);
    let mut libs = LIBS.lock().unwrap_or_else(|p| p.into_inner());
    let libs = libs.get_or_insert_with(HashMap::new);
    if let Some(l) = libs.get(&uri.module) {
        return Ok(l.clone());
    }
    let config = |why: String| KekError::Config {
        uri: describe.to_owned(),
        why,
    };
    let lib = Pkcs11::new(&uri.module)
        .map_err(|e| config(format!("cannot load module {}: {e}", uri.module.display())))?;
    match lib.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(config(format!("cannot initialize the module: {e}"))),
    }
    let lib = Arc::new(lib);
    libs.insert(uri.module.clone(), lib.clone());
    Ok(lib)
}

/// A root key in a PKCS#11 token.
pub struct Pkcs11Kek {
    uri: Pkcs11Uri,
    describe: String,
    lib: Arc<Pkcs11>,
    slot: Slot,
    /// The logged-in session, opened again after a device error.
    session: Mutex<Option<Session>>,
}

impl fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Kek")
            .field("uri", &self.describe)
            .finish()
    }
}

impl Pkcs11Kek {
    /// Loads the module and finds the token; the PIN is read and used at the first call.
    pub fn open(uri: Pkcs11Uri) -> Result<Self, KekError> {
        let describe = uri.describe();
        let lib = library(&uri, &describe)?;
        let slot = find_slot(&lib, &uri, &describe)?;
        Ok(Pkcs11Kek {
            uri,
            describe,
            lib,
            slot,
            session: Mutex::new(None),
        })
    }

    fn err(&self, e: CkError, what: &str) -> KekError {
        let uri = self.describe.clone();
        match e {
            CkError::Pkcs11(rv, _) => match rv {
                RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinExpired
                | RvError::PinLocked
                | RvError::UserPinNotInitialized => KekError::Denied {
                    uri,
                    why: format!("{what}: the token refused the user PIN ({rv})"),
                },
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::DataInvalid => KekError::Unwrap {
                    uri,
                    why: format!("{what}: {rv}"),
                },
                RvError::KeyTypeInconsistent
                | RvError::KeyFunctionNotPermitted
                | RvError::MechanismInvalid
                | RvError::KeyHandleInvalid => KekError::WrongKey {
                    uri,
                    why: format!("{what}: {rv}"),
                },
                _ => KekError::Unavailable {
                    uri,
                    why: format!("{what}: {rv}"),
                },
            },
            other => KekError::Unavailable {
                uri,
                why: format!("{what}: {other}"),
            },
        }
    }

    fn pin(&self) -> Result<AuthPin, KekError> {
        let pin: Zeroizing<String> = match &self.uri.pin {
            PinSource::File(path) => super::read_secret_file(path, "PIN", &self.describe)?,
            PinSource::Env(name) => {
                Zeroizing::new(std::env::var(name).map_err(|_| KekError::Config {
                    uri: self.describe.clone(),
                    why: format!("pin-source names the variable {name}, which is not set"),
                })?)
            }
        };
        Ok(AuthPin::from(pin.as_str()))
    }

    /// Runs `f` on the logged-in session, logging in first if needed. A device error drops the
    /// session so the next call starts over: a token that came back works without a restart.
    fn with_session<T>(
        &self,
        rw: bool,
        what: &str,
        f: impl FnOnce(&Session) -> Result<T, KekError>,
    ) -> Result<T, KekError> {
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if rw {
            // Creating needs a read-write session; it is used once and closed.
            let session = self
                .lib
                .open_rw_session(self.slot)
                .map_err(|e| self.err(e, "open a session"))?;
            self.login(&session)?;
            return f(&session);
        }
        if guard.is_none() {
            let session = self
                .lib
                .open_ro_session(self.slot)
                .map_err(|e| self.err(e, "open a session"))?;
            self.login(&session)?;
            *guard = Some(session);
        }
        let Some(session) = guard.as_ref() else {
            unreachable!("set above")
        };
        let r = f(session);
        if matches!(r, Err(KekError::Unavailable { .. })) {
            *guard = None;
        }
        let _ = what;
        r
    }

    fn login(&self, session: &Session) -> Result<(), KekError> {
        let pin = self.pin()?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => Err(self.err(e, "log in")),
        }
    }

    fn template(&self) -> Vec<Attribute> {
        let mut t = vec![Attribute::Class(ObjectClass::SECRET_KEY)];
        if let Some(o) = &self.uri.object {
            t.push(Attribute::Label(o.as_bytes().to_vec()));
        }
        if let Some(id) = &self.uri.id {
            t.push(Attribute::Id(id.clone()));
        }
        t
    }

    fn find_key(&self, session: &Session) -> Result<ObjectHandle, KekError> {
        let found = session
            .find_objects(&self.template())
            .map_err(|e| self.err(e, "find the key"))?;
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(KekError::NotFound {
                uri: self.describe.clone(),
            }),
            more => Err(KekError::WrongKey {
                uri: self.describe.clone(),
                why: format!("{} secret keys match; name one with id=", more.len()),
            }),
        }
    }
}

fn find_slot(lib: &Pkcs11, uri: &Pkcs11Uri, describe: &str) -> Result<Slot, KekError> {
    let slots = lib
        .get_slots_with_token()
        .map_err(|e| KekError::Unavailable {
            uri: describe.to_owned(),
            why: format!("cannot list the slots: {e}"),
        })?;
    for slot in slots {
        let Ok(info) = lib.get_token_info(slot) else {
            continue;
        };
        let label_ok = uri.token.as_deref().is_none_or(|t| info.label() == t);
        let serial_ok = uri
            .serial
            .as_deref()
            .is_none_or(|s| info.serial_number() == s);
        if label_ok && serial_ok {
            return Ok(slot);
        }
    }
    Err(KekError::Config {
        uri: describe.to_owned(),
        why: "no token with that label or serial is present".into(),
    })
}

impl Kek for Pkcs11Kek {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn check(&self) -> Result<(), KekError> {
        self.with_session(false, "check", |s| {
            let key = self.find_key(s)?;
            let attrs = s
                .get_attributes(
                    key,
                    &[
                        AttributeType::KeyType,
                        AttributeType::ValueLen,
                        AttributeType::Encrypt,
                        AttributeType::Decrypt,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                    ],
                )
                .map_err(|e| self.err(e, "read the key's attributes"))?;
            let wrong = |why: String| KekError::WrongKey {
                uri: self.describe.clone(),
                why,
            };
            for a in attrs {
                match a {
                    Attribute::KeyType(t) if t != KeyType::AES => {
                        return Err(wrong(format!(
                            "it is a {t} key; the root must be AES-256 (create it with `cipherbus keygen --kek URI`)"
                        )))
                    }
                    Attribute::ValueLen(n) if u64::from(n) != KEY_LEN as u64 => {
                        return Err(wrong(format!(
                            "it is {} bytes long; the root must be AES-256",
                            u64::from(n)
                        )))
                    }
                    Attribute::Encrypt(false) | Attribute::Decrypt(false) => {
                        return Err(wrong("it may not encrypt and decrypt".into()))
                    }
                    Attribute::Sensitive(false) => {
                        return Err(wrong("it is not sensitive (CKA_SENSITIVE)".into()))
                    }
                    Attribute::Extractable(true) => {
                        return Err(wrong("it is extractable (CKA_EXTRACTABLE)".into()))
                    }
                    _ => {}
                }
            }
            Ok(())
        })?;
        // A round trip proves the mechanism is allowed and the token does AES-GCM.
        super::http::probe(self)
    }

    fn create(&self) -> Result<(), KekError> {
        self.with_session(true, "create", |s| {
            match self.find_key(s) {
                Err(KekError::NotFound { .. }) => {}
                Ok(_) | Err(KekError::WrongKey { .. }) => {
                    return Err(KekError::Exists {
                        uri: self.describe.clone(),
                    })
                }
                Err(e) => return Err(e),
            }
            let mut t = self.template();
            t.extend([
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen((KEY_LEN as u64).into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
            ]);
            s.generate_key(&Mechanism::AesKeyGen, &t)
                .map(|_| ())
                .map_err(|e| self.err(e, "generate the key"))
        })
    }

    fn wrap(&self, ctx: &WrapContext, secret: &[u8; KEY_LEN]) -> Result<Vec<u8>, KekError> {
        let aad = ctx.aad();
        let mut iv = [0u8; IV_LEN];
        getrandom::getrandom(&mut iv).map_err(|_| KekError::Config {
            uri: self.describe.clone(),
            why: "no randomness available".into(),
        })?;
        let ct = self.with_session(false, "wrap", |s| {
            let key = self.find_key(s)?;
            let mut iv_param = iv;
            let params = GcmParams::new(&mut iv_param, &aad, (TAG_LEN as u64 * 8).into())
                .map_err(|e| self.err(e, "set up AES-GCM"))?;
            s.encrypt(&Mechanism::AesGcm(params), key, secret)
                .map_err(|e| self.err(e, "wrap"))
        })?;
        if ct.len() != KEY_LEN + TAG_LEN {
            return Err(KekError::WrongKey {
                uri: self.describe.clone(),
                why: format!("AES-GCM gave {} bytes", ct.len()),
            });
        }
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap(
        &self,
        ctx: &WrapContext,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(KekError::Unwrap {
                uri: self.describe.clone(),
                why: format!(
                    "a wrapped key is {WRAPPED_LEN} bytes, not {}",
                    wrapped.len()
                ),
            });
        }
        let aad = ctx.aad();
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&wrapped[..IV_LEN]);
        let mut plain = self.with_session(false, "unwrap", |s| {
            let key = self.find_key(s)?;
            let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())
                .map_err(|e| self.err(e, "set up AES-GCM"))?;
            s.decrypt(&Mechanism::AesGcm(params), key, &wrapped[IV_LEN..])
                .map_err(|e| match e {
                    // SoftHSM reports a failed GCM tag as a general error: for a decryption
                    // it means the wrapped key was not made by this key for this context.
                    CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _) => {
                        KekError::Unwrap {
                            uri: self.describe.clone(),
                            why: "the token could not authenticate it (another key, another context, or damaged)".into(),
                        }
                    }
                    e => self.err(e, "unwrap"),
                })
        })?;
        let out = if plain.len() == KEY_LEN {
            let mut k = Zeroizing::new([0u8; KEY_LEN]);
            k.copy_from_slice(&plain);
            Ok(k)
        } else {
            Err(KekError::Unwrap {
                uri: self.describe.clone(),
                why: "the unwrapped key has the wrong length".into(),
            })
        };
        plain.zeroize();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7512_uris_parse() {
        let u = Pkcs11Uri::parse(
            "token=cipher%20bus;object=root;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("cipher bus"));
        assert_eq!(u.object.as_deref(), Some("root"));
        assert_eq!(u.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(u.pin, PinSource::File("/run/pin".into()));
        assert_eq!(u.describe(), "pkcs11:token=cipher bus;object=root");
        let u = Pkcs11Uri::parse("token=t;id=%01%02?module-path=/m.so&pin-source=env:PIN").unwrap();
        assert_eq!(u.id, Some(vec![1, 2]));
        assert_eq!(u.pin, PinSource::Env("PIN".into()));
    }

    #[test]
    fn bad_uris_say_why_and_never_echo_a_pin() {
        for (bad, says) in [
            ("token=t;object=o?module-path=/m.so", "pin-source"),
            ("token=t;object=o?pin-source=file:/p", "module-path"),
            ("object=o?module-path=/m.so&pin-source=file:/p", "token"),
            ("token=t?module-path=/m.so&pin-source=file:/p", "object"),
            (
                "token=t;object=o;type=private?module-path=/m&pin-source=file:/p",
                "secret-key",
            ),
            (
                "token=t;objekt=o?module-path=/m&pin-source=file:/p",
                "objekt",
            ),
            (
                "token=t;object=%zz?module-path=/m&pin-source=file:/p",
                "percent",
            ),
            (
                "token=t;object=o?module-path=/m&pin-value=123456",
                "pin-source",
            ),
        ] {
            let e = Pkcs11Uri::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("123456"), "{e}");
        }
    }
}
