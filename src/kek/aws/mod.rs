//! `aws-kms:KEY`: a root key in AWS KMS. The key never leaves KMS; each wrap is one `Encrypt`
//! and each unwrap one `Decrypt` (the KMS JSON API, one blocking HTTPS request signed with
//! SigV4 by AWS's own `aws-sigv4` crate), with the [`WrapContext`] as the encryption context,
//! so a wrapped key opens only for the purpose, epoch and scope it was wrapped for. The key
//! must be a symmetric encryption key: `KeySpec` `SYMMETRIC_DEFAULT`, `KeyUsage`
//! `ENCRYPT_DECRYPT`.
//!
//! KEY is a key id (`1234abcd-…` or `mrk-…`), a key ARN (`arn:aws:kms:REGION:ACCOUNT:key/ID`),
//! an alias (`alias/NAME`) or an alias ARN. `Decrypt` names KEY too, so a wrap made under
//! another key is refused rather than opened. KMS's automatic key rotation keeps every wrap
//! opening (same key, new material); pointing an alias at another key does not: `rewrap`
//! before moving it is impossible through this URI, so rotate inside the key instead.
//!
//! Configured from the standard AWS sources, and only these:
//! - Region: `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `region` in the profile of the
//!   shared config file. The region of a key or alias ARN must match it.
//! - Profile: `AWS_PROFILE`, else `default`. The shared config file is `AWS_CONFIG_FILE`, else
//!   `~/.aws/config`, with sections `[default]` and `[profile NAME]`; the shared credentials
//!   file is `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`, with sections `[NAME]`.
//! - Credentials: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`),
//!   else `aws_access_key_id`, `aws_secret_access_key` (and `aws_session_token`) of the
//!   profile in the credentials file, else in the config file. Only such static keys: role
//!   assumption, SSO, `credential_process`, web identity, container and instance-metadata
//!   credentials are not supported, and the credentials are read once, at start, so temporary
//!   credentials last as long as the process may.
//! - Endpoint: `AWS_ENDPOINT_URL_KMS`, else `AWS_ENDPOINT_URL`, else
//!   `https://kms.REGION.amazonaws.com` (`amazonaws.com.cn` in the China regions). An endpoint
//!   is `http://` or `https://HOST[:PORT]`, without a path.
//! - TLS: `AWS_CA_BUNDLE`, a PEM file of the CA certificates trusted to sign the endpoint's
//!   certificate; when it is unset, the platform's trusted roots (as `rustls-native-certs`
//!   finds them, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`).
//!
//! `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` apply as for other HTTP clients.
//! Redirects are not followed. Each request has five seconds to complete.
//!
//! The credentials need `kms:Encrypt`, `kms:Decrypt` and `kms:DescribeKey` on the key (the
//! last for the start-up check). `keygen` on `alias/NAME` also needs `kms:CreateKey` and
//! `kms:CreateAlias` (on the alias and the new key).
//!
//! Reading those settings (credentials, profile files, key references, regions) is the room
//! `settings`; this file holds the key itself and the calls to KMS.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::http::{self, B64};
use super::{Kek, KekError, WrapContext, MAX_WRAPPED};
use crate::envelope::KEY_LEN;

mod settings;

pub use settings::AwsCredentials;
use settings::*;

/// Longest answer read (KMS's are a few hundred bytes, a key's description a few KiB).
const ANSWER_LIMIT: usize = 64 * 1024;
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// The service name in the signature's scope.
const SERVICE: &str = "kms";
/// What a root key is, in KMS's words.
const ROOT_SPEC: &str = "SYMMETRIC_DEFAULT";
const ROOT_USAGE: &str = "ENCRYPT_DECRYPT";
/// How a key made by `keygen` is described in KMS.
const DESCRIPTION: &str = "cipherbus root";
/// How long an endpoint without a user may get in a message.
const SHOWN: usize = 200;

/// A KMS key as a root. `Debug` shows where it is and whose credentials, never a secret.
pub struct AwsKek {
    /// `aws-kms:KEY`, as `--kek` takes it.
    uri: String,
    key: String,
    target: KeyRef,
    region: String,
    /// `scheme://host[:port]`, without a trailing slash.
    endpoint: String,
    /// The `Host` header, as it is signed.
    host: String,
    credentials: AwsCredentials,
    ca_bundle: Option<PathBuf>,
    agent: ureq::Agent,
}

impl fmt::Debug for AwsKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKek")
            .field("uri", &self.uri)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .field("ca_bundle", &self.ca_bundle)
            .finish_non_exhaustive()
    }
}
/// The KMS operation a request calls: names it in errors and in the permission it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    DescribeKey,
    Encrypt,
    Decrypt,
    CreateKey,
    CreateAlias,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::DescribeKey => "DescribeKey",
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
            Op::CreateKey => "CreateKey",
            Op::CreateAlias => "CreateAlias",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Op::DescribeKey => "TrentService.DescribeKey",
            Op::Encrypt => "TrentService.Encrypt",
            Op::Decrypt => "TrentService.Decrypt",
            Op::CreateKey => "TrentService.CreateKey",
            Op::CreateAlias => "TrentService.CreateAlias",
        }
    }
}

/// An answer: its status, `X-Amzn-ErrorType` and body (zeroized when dropped, as it may hold
/// a plaintext).
struct Answer {
    status: u16,
    error_type: Option<String>,
    body: Zeroizing<Vec<u8>>,
}

#[derive(Deserialize)]
struct AwsError {
    #[serde(rename = "__type")]
    kind: Option<String>,
    message: Option<String>,
    #[serde(rename = "Message")]
    message_upper: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Encrypted {
    ciphertext_blob: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Decrypted<'a> {
    #[serde(borrow)]
    plaintext: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Described {
    key_metadata: KeyMetadata,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyMetadata {
    key_id: String,
    key_spec: Option<String>,
    /// The older name of `KeySpec`.
    customer_master_key_spec: Option<String>,
    key_usage: Option<String>,
    key_state: Option<String>,
    #[serde(default)]
    enabled: bool,
}
impl AwsKek {
    /// Opens `aws-kms:KEY` with the standard AWS variables and files (see the module doc).
    /// Nothing is sent to KMS until the first call.
    pub fn from_env(key: &str) -> Result<AwsKek, KekError> {
        AwsKek::from_vars(key, http::env)
    }

    /// [`AwsKek::from_env`] with the variables from `var` (unset or empty: `None`); the files
    /// are the ones they name, or under `var("HOME")`.
    fn from_vars(key: &str, var: impl Fn(&str) -> Option<String>) -> Result<AwsKek, KekError> {
        let uri = describe(key);
        let bad = |why: String| KekError::Config {
            uri: uri.clone(),
            why,
        };
        let home = var("HOME");
        let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let config = ProfileFile::read(var("AWS_CONFIG_FILE"), home.as_deref(), ".aws/config")
            .map_err(|e| bad(format!("AWS_CONFIG_FILE: {e}")))?;
        let shared = ProfileFile::read(
            var("AWS_SHARED_CREDENTIALS_FILE"),
            home.as_deref(),
            ".aws/credentials",
        )
        .map_err(|e| bad(format!("AWS_SHARED_CREDENTIALS_FILE: {e}")))?;
        let config_profile = config.profile(&profile, true);
        let shared_profile = shared.profile(&profile, false);

        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| {
                config_profile
                    .as_deref()
                    .and_then(|p| prop(p, "region"))
                    .map(str::to_owned)
            })
            .ok_or_else(|| {
                bad(format!(
                    "no AWS region: set AWS_REGION, or region in profile {profile} of {}",
                    config.shown()
                ))
            })?;

        let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => AwsCredentials::new(
                &id,
                Zeroizing::new(secret),
                var("AWS_SESSION_TOKEN").map(Zeroizing::new),
                "the environment".into(),
            )
            .map_err(bad)?,
            (Some(_), None) | (None, Some(_)) => {
                return Err(bad(
                    "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither".into(),
                ))
            }
            (None, None) => {
                let from = |props: &[(&str, &str)], file: &ProfileFile| {
                    let id = prop(props, "aws_access_key_id")?;
                    let secret = Zeroizing::new(prop(props, "aws_secret_access_key")?.to_owned());
                    let token = prop(props, "aws_session_token").map(|t| Zeroizing::new(t.into()));
                    Some(AwsCredentials::new(
                        id,
                        secret,
                        token,
                        format!("profile {profile} of {}", file.shown()),
                    ))
                };
                let found = shared_profile
                    .as_deref()
                    .and_then(|p| from(p, &shared))
                    .or_else(|| config_profile.as_deref().and_then(|p| from(p, &config)));
                match found {
                    Some(c) => c.map_err(bad)?,
                    None => {
                        let unsupported = [&shared_profile, &config_profile]
                            .into_iter()
                            .flatten()
                            .flat_map(|p| p.iter())
                            .map(|(k, _)| k.to_ascii_lowercase())
                            .find(|k| {
                                matches!(
                                    k.as_str(),
                                    "role_arn"
                                        | "credential_process"
                                        | "sso_session"
                                        | "sso_start_url"
                                        | "web_identity_token_file"
                                        | "credential_source"
                                        | "source_profile"
                                )
                            });
                        let why = match unsupported {
                            Some(k) => format!(
                                "profile {profile} gets its credentials through {k}, which \
                                 cipherbus does not support: set AWS_ACCESS_KEY_ID and \
                                 AWS_SECRET_ACCESS_KEY, or static keys in {}",
                                shared.shown()
                            ),
                            None => format!(
                                "no AWS credentials: set AWS_ACCESS_KEY_ID and \
                                 AWS_SECRET_ACCESS_KEY, or aws_access_key_id and \
                                 aws_secret_access_key in profile {profile} of {}",
                                shared.shown()
                            ),
                        };
                        return Err(bad(why));
                    }
                }
            }
        };
        let endpoint = var("AWS_ENDPOINT_URL_KMS").or_else(|| var("AWS_ENDPOINT_URL"));
        let ca_bundle = var("AWS_CA_BUNDLE").map(PathBuf::from);
        AwsKek::new(
            key,
            &region,
            endpoint.as_deref(),
            credentials,
            ca_bundle.as_deref(),
        )
    }

    /// The key `key` in `region`, at `endpoint` (else KMS's public endpoint of the region),
    /// signing with `credentials`. An `https` endpoint trusts the CAs of the PEM file
    /// `ca_bundle`, else the platform's.
    pub fn new(
        key: &str,
        region: &str,
        endpoint: Option<&str>,
        credentials: AwsCredentials,
        ca_bundle: Option<&Path>,
    ) -> Result<AwsKek, KekError> {
        let uri = describe(key);
        let bad = |why: String| KekError::Config {
            uri: uri.clone(),
            why,
        };
        let target = KeyRef::parse(key).map_err(&bad)?;
        if !valid_region(region) {
            return Err(bad(format!(
                "the region {:?} is not a region name (such as eu-west-1)",
                region.chars().take(64).collect::<String>()
            )));
        }
        if let Some(in_arn) = target.region() {
            if in_arn != region {
                return Err(bad(format!(
                    "the key's ARN is in {in_arn} but the region is {region}: set AWS_REGION \
                     to {in_arn}"
                )));
            }
        }
        let endpoint = match endpoint {
            Some(e) => e.trim_end_matches('/').to_owned(),
            None if region.starts_with("cn-") => format!("https://kms.{region}.amazonaws.com.cn"),
            None => format!("https://kms.{region}.amazonaws.com"),
        };
        let (https, parsed) =
            http::base_address(&endpoint, "the KMS endpoint", SHOWN).map_err(&bad)?;
        // `http://:80` parses; the signature needs a host.
        if parsed.host().is_none_or(str::is_empty) {
            return Err(bad(format!(
                "the KMS endpoint {} is not a valid address",
                http::show_addr(&endpoint, SHOWN)
            )));
        }
        // As the signer computes it: the port only when it is not the scheme's default.
        let host = match parsed.port_u16() {
            Some(443) if https => parsed.host().unwrap_or_default().to_owned(),
            Some(80) if !https => parsed.host().unwrap_or_default().to_owned(),
            Some(p) => format!("{}:{p}", parsed.host().unwrap_or_default()),
            None => parsed.host().unwrap_or_default().to_owned(),
        };
        let roots = match (ca_bundle, https) {
            (Some(path), _) => http::ca_roots(path, "AWS_CA_BUNDLE").map_err(&bad)?,
            (None, true) => native_roots().map_err(&bad)?,
            (None, false) => Vec::new(),
        };
        let agent = http::agent(roots);
        Ok(AwsKek {
            uri,
            key: key.to_owned(),
            target,
            region: region.to_owned(),
            endpoint,
            host,
            credentials,
            ca_bundle: ca_bundle.map(Path::to_owned),
            agent,
        })
    }

    /// The SigV4 headers for a request of `op` with `body`, signed at `time`: `X-Amz-Date`,
    /// `Authorization` and, with a session token, `X-Amz-Security-Token`.
    fn sign(
        &self,
        op: Op,
        body: &[u8],
        time: SystemTime,
    ) -> Result<Vec<(&'static str, String)>, KekError> {
        let failed = |e: &dyn fmt::Display| KekError::Config {
            uri: self.uri.clone(),
            why: format!("cannot sign the {} request: {e}", op.name()),
        };
        let c = &self.credentials;
        // Copies that zeroize when the signer drops them.
        let identity = aws_credential_types::Credentials::new(
            c.access_key_id.as_str(),
            String::from(c.secret_access_key.as_str()),
            c.session_token.as_ref().map(|t| String::from(t.as_str())),
            None,
            "cipherbus",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(SERVICE)
            .time(time)
            .settings(aws_sigv4::http_request::SigningSettings::default())
            .build()
            .map_err(|e| failed(&e))?
            .into();
        let url = format!("{}/", self.endpoint);
        let headers = [
            ("content-type", CONTENT_TYPE),
            ("host", self.host.as_str()),
            ("x-amz-target", op.target()),
        ];
        let request = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            url.as_str(),
            headers.into_iter(),
            aws_sigv4::http_request::SignableBody::Bytes(body),
        )
        .map_err(|e| failed(&e))?;
        // The signer traces its canonical request, which carries the session token, and with
        // LOG_SIGNABLE_BODY set the body, which carries the key being wrapped: it signs with
        // no subscriber listening, whatever the log level.
        let signed = tracing::dispatcher::with_default(&tracing::Dispatch::none(), || {
            aws_sigv4::http_request::sign(request, &params)
        })
        .map_err(|e| failed(&e))?;
        let (instructions, _signature) = signed.into_parts();
        let (headers, _params) = instructions.into_parts();
        Ok(headers
            .into_iter()
            .map(|h| (h.name(), h.value().to_owned()))
            .collect())
    }

    /// One signed request; `body` is JSON. Any answer comes back, whatever its status.
    fn call(&self, op: Op, body: &[u8]) -> Result<Answer, KekError> {
        let signed = self.sign(op, body, SystemTime::now())?;
        let mut req = self
            .agent
            .post(format!("{}/", self.endpoint))
            .header("Host", self.host.as_str())
            .header("Content-Type", CONTENT_TYPE)
            .header("X-Amz-Target", op.target());
        for (name, value) in &signed {
            req = req.header(*name, value.as_str());
        }
        let at = format!("{} ({})", self.endpoint, op.name());
        let mut response = req
            .send(body)
            .map_err(|e| http::transport(&self.uri, &at, &e, |text| self.scrub(text)))?;
        let got =
            http::receive(&mut response, "x-amzn-errortype", ANSWER_LIMIT).map_err(|why| {
                KekError::Unavailable {
                    uri: self.uri.clone(),
                    why: format!("{at}: {why}"),
                }
            })?;
        Ok(Answer {
            status: got.status,
            error_type: got.header,
            body: got.body,
        })
    }

    /// The error an answer other than success means.
    fn refusal(&self, op: Op, answer: &Answer) -> KekError {
        let (kind, said) = aws_error(answer);
        let said = self.scrub(&said);
        let uri = self.uri.clone();
        let what = match (kind.is_empty(), said.is_empty()) {
            (true, true) => "no reason given".to_owned(),
            (true, false) => said.clone(),
            (false, true) => kind.clone(),
            (false, false) => format!("{kind}: {said}"),
        };
        let status = answer.status;
        let answered = format!("{} answered {status} to {}", self.endpoint, op.name());
        match kind.as_str() {
            _ if (500..=599).contains(&status) || status == 429 => KekError::Unavailable {
                uri,
                why: format!("{answered}: {what}"),
            },
            "ThrottlingException"
            | "KMSInternalException"
            | "DependencyTimeoutException"
            | "KeyUnavailableException" => KekError::Unavailable {
                uri,
                why: format!("{answered}: {what}"),
            },
            "AccessDeniedException"
            | "AccessDenied"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "IncompleteSignatureException"
            | "MissingAuthenticationTokenException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch" => KekError::Denied {
                uri,
                why: format!(
                    "{what} (the credentials from {} need kms:{} on {})",
                    self.credentials.source,
                    op.name(),
                    self.key
                ),
            },
            "NotFoundException" => KekError::NotFound { uri },
            "DisabledException" | "KMSInvalidStateException" | "InvalidKeyUsageException" => {
                KekError::WrongKey {
                    uri,
                    why: format!(
                        "{what}; a root is an enabled key of KeySpec {ROOT_SPEC} and KeyUsage \
                         {ROOT_USAGE}"
                    ),
                }
            }
            "InvalidCiphertextException" | "IncorrectKeyException" => {
                KekError::Unwrap { uri, why: what }
            }
            "AlreadyExistsException" => KekError::Exists { uri },
            _ if matches!(status, 401 | 403) => KekError::Denied {
                uri,
                why: format!(
                    "{answered}: {what} (the credentials from {} need kms:{} on {})",
                    self.credentials.source,
                    op.name(),
                    self.key
                ),
            },
            "" if (300..=399).contains(&status) => KekError::Config {
                uri,
                why: format!(
                    "{answered} with a redirect, which is not followed: set AWS_ENDPOINT_URL_KMS \
                     to the endpoint itself"
                ),
            },
            "" => KekError::Config {
                uri,
                why: format!(
                    "{answered} without KMS's JSON ({what}): is the endpoint \
                     (AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL) a KMS endpoint?"
                ),
            },
            _ => KekError::Config {
                uri,
                why: format!("{answered}: {what}"),
            },
        }
    }

    /// Parses a successful answer.
    fn parse<'a, T: Deserialize<'a>>(&self, op: Op, body: &'a [u8]) -> Result<T, KekError> {
        serde_json::from_slice::<T>(body).map_err(|_| KekError::Config {
            uri: self.uri.clone(),
            why: format!(
                "{} answered {} with something other than KMS's JSON: is the endpoint a KMS \
                 endpoint?",
                self.endpoint,
                op.name()
            ),
        })
    }

    /// `call`, then the refusal unless the answer is a success.
    fn call_ok(&self, op: Op, body: &[u8]) -> Result<Answer, KekError> {
        let answer = self.call(op, body)?;
        if (200..=299).contains(&answer.status) {
            Ok(answer)
        } else {
            Err(self.refusal(op, &answer))
        }
    }

    /// The key's description; `None` when there is no such key.
    fn describe_key(&self) -> Result<Option<KeyMetadata>, KekError> {
        let body = serde_json::json!({ "KeyId": self.key }).to_string();
        match self.call_ok(Op::DescribeKey, body.as_bytes()) {
            Ok(answer) => self
                .parse::<Described>(Op::DescribeKey, &answer.body)
                .map(|d| Some(d.key_metadata)),
            Err(KekError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn wrong(&self, why: String) -> KekError {
        KekError::WrongKey {
            uri: self.uri.clone(),
            why,
        }
    }

    /// `text` with the secret key and session token cut out, should a server ever echo them.
    fn scrub(&self, text: &str) -> String {
        let mut out = text.replace(self.credentials.secret_access_key.as_str(), "<secret>");
        if let Some(t) = &self.credentials.session_token {
            out = out.replace(t.as_str(), "<session token>");
        }
        out
    }
}

/// The URI, as `--kek` takes it and [`super::KekUri::describe`] shows it.
fn describe(key: &str) -> String {
    format!("aws-kms:{key}")
}

/// The error type of an answer (`__type` without its `namespace#`, else `X-Amzn-ErrorType`
/// without its `:…` tail) and its message on one line; or an excerpt of a body that is not
/// JSON.
fn aws_error(answer: &Answer) -> (String, String) {
    let one_line = |text: &str| -> String {
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(300)
            .collect();
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let short = |kind: &str| -> String {
        let kind = kind.rsplit('#').next().unwrap_or(kind);
        let kind = kind.split(':').next().unwrap_or(kind);
        one_line(kind)
    };
    match serde_json::from_slice::<AwsError>(&answer.body) {
        Ok(e) => {
            let kind = e
                .kind
                .as_deref()
                .or(answer.error_type.as_deref())
                .map(short)
                .unwrap_or_default();
            let said = e
                .message
                .or(e.message_upper)
                .map(|m| one_line(&m))
                .unwrap_or_default();
            (kind, said)
        }
        Err(_) => {
            // AWS's XML errors (`<Error><Code>…</Code><Message>…</Message>`), as some front
            // ends and emulators answer an authentication failure.
            let text = String::from_utf8_lossy(&answer.body);
            let element = |name: &str| {
                let open = format!("<{name}>");
                let start = text.find(&open)? + open.len();
                let len = text[start..].find(&format!("</{name}>"))?;
                Some(one_line(&text[start..start + len]))
            };
            match element("Code") {
                Some(code) => (short(&code), element("Message").unwrap_or_default()),
                None => (
                    answer.error_type.as_deref().map(short).unwrap_or_default(),
                    one_line(&text),
                ),
            }
        }
    }
}

/// The platform's trusted roots, those rustls can use.
fn native_roots() -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = rustls::RootCertStore::empty();
    let mut out = Vec::new();
    for cert in found.certs {
        if store.add(cert.clone()).is_ok() {
            out.push(ureq::tls::Certificate::from_der(cert.as_ref()).to_owned());
        }
    }
    if out.is_empty() {
        let why = found
            .errors
            .first()
            .map_or("none found".to_owned(), |e| e.to_string());
        return Err(format!(
            "no trusted CA certificates on this machine ({why}): set AWS_CA_BUNDLE to the PEM \
             file of the CAs that sign the KMS endpoint's certificate"
        ));
    }
    Ok(out)
}

/// The encryption context of a wrap, as a JSON object.
fn context_json(ctx: &WrapContext) -> serde_json::Value {
    serde_json::Value::Object(
        ctx.pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
            .collect(),
    )
}

/// `{"KeyId":…,"EncryptionContext":{…},"Plaintext":"…"}`, built in one zeroized buffer.
fn encrypt_body(key: &str, ctx: &WrapContext, secret: &[u8; KEY_LEN]) -> Zeroizing<Vec<u8>> {
    let head = format!(
        r#"{{"KeyId":{},"EncryptionContext":{},"Plaintext":""#,
        serde_json::Value::String(key.to_owned()),
        context_json(ctx)
    );
    http::secret_json(&head, secret, r#""}"#)
}

impl Kek for AwsKek {
    fn describe(&self) -> &str {
        &self.uri
    }

    fn kind(&self) -> &'static str {
        "aws-kms"
    }

    fn check(&self) -> Result<(), KekError> {
        let meta = self.describe_key()?.ok_or_else(|| KekError::NotFound {
            uri: self.uri.clone(),
        })?;
        let spec = meta
            .key_spec
            .as_deref()
            .or(meta.customer_master_key_spec.as_deref())
            .unwrap_or("unknown");
        if spec != ROOT_SPEC {
            return Err(self.wrong(format!(
                "key {} is of KeySpec {spec}; a root is a symmetric encryption key (KeySpec \
                 {ROOT_SPEC}, KeyUsage {ROOT_USAGE})",
                meta.key_id
            )));
        }
        let usage = meta.key_usage.as_deref().unwrap_or("unknown");
        if usage != ROOT_USAGE {
            return Err(self.wrong(format!(
                "key {} has KeyUsage {usage}; a root needs KeyUsage {ROOT_USAGE}",
                meta.key_id
            )));
        }
        let state = meta.key_state.as_deref().unwrap_or("unknown");
        if state != "Enabled" || !meta.enabled {
            return Err(self.wrong(format!("key {} is {state}, not Enabled", meta.key_id)));
        }
        // A round trip proves the credentials may encrypt and decrypt with it.
        http::probe(self)
    }

    fn create(&self) -> Result<(), KekError> {
        if self.target != KeyRef::Alias {
            return Err(KekError::Config {
                uri: self.uri.clone(),
                why: "name an alias/NAME to create a key".into(),
            });
        }
        if self.key.starts_with("alias/aws/") {
            return Err(KekError::Config {
                uri: self.uri.clone(),
                why: "aliases under alias/aws/ are reserved for AWS's own keys".into(),
            });
        }
        if self.describe_key()?.is_some() {
            return Err(KekError::Exists {
                uri: self.uri.clone(),
            });
        }
        let body = serde_json::json!({
            "KeySpec": ROOT_SPEC,
            "KeyUsage": ROOT_USAGE,
            "Description": DESCRIPTION,
        })
        .to_string();
        let answer = self.call_ok(Op::CreateKey, body.as_bytes())?;
        let made = self
            .parse::<Described>(Op::CreateKey, &answer.body)?
            .key_metadata;
        let body =
            serde_json::json!({ "AliasName": self.key, "TargetKeyId": made.key_id }).to_string();
        self.call_ok(Op::CreateAlias, body.as_bytes())
            .map(drop)
            .map_err(|e| {
                // The key exists without its name: say which, so it can be named or deleted.
                let orphan = format!(
                    "created key {} but could not name it {}; name it by hand or schedule its \
                     deletion",
                    made.key_id, self.key
                );
                tracing::warn!(uri = %self.uri, key_id = %made.key_id, error = %e, "{orphan}");
                match e {
                    KekError::Denied { uri, why } => KekError::Denied {
                        uri,
                        why: format!("{why}; {orphan}"),
                    },
                    KekError::Unavailable { uri, why } => KekError::Unavailable {
                        uri,
                        why: format!("{why}; {orphan}"),
                    },
                    KekError::Config { uri, why } => KekError::Config {
                        uri,
                        why: format!("{why}; {orphan}"),
                    },
                    other => other,
                }
            })
    }

    fn wrap(&self, ctx: &WrapContext, secret: &[u8; KEY_LEN]) -> Result<Vec<u8>, KekError> {
        let body = encrypt_body(&self.key, ctx, secret);
        let answer = self.call_ok(Op::Encrypt, &body)?;
        drop(body);
        let data: Encrypted = self.parse(Op::Encrypt, &answer.body)?;
        match B64.decode(data.ciphertext_blob.as_bytes()) {
            Ok(blob) if !blob.is_empty() && blob.len() <= MAX_WRAPPED => Ok(blob),
            _ => Err(self.wrong(format!(
                "Encrypt did not return a base64 ciphertext of 1 to {MAX_WRAPPED} bytes"
            ))),
        }
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
        if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED {
            return Err(fail(format!(
                "a KMS ciphertext is 1 to {MAX_WRAPPED} bytes, not {}",
                wrapped.len()
            )));
        }
        let body = serde_json::json!({
            "CiphertextBlob": B64.encode(wrapped),
            "KeyId": self.key,
            "EncryptionContext": context_json(ctx),
        })
        .to_string();
        let answer = self.call_ok(Op::Decrypt, body.as_bytes())?;
        let mut data: Decrypted<'_> = self.parse(Op::Decrypt, &answer.body)?;
        http::decode_key(&mut data.plaintext, "KMS").map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::http::vars;
    use std::time::Duration;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/SECRET/bPxRfiCYEXAMPLEKEY";
    const TOKEN: &str = "FwoGZXIvYXdzEXAMPLE/SESSION/TOKEN+abc==";
    const KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

    fn creds(token: Option<&str>) -> AwsCredentials {
        AwsCredentials::new(
            "AKIDEXAMPLE",
            Zeroizing::new(SECRET.into()),
            token.map(|t| Zeroizing::new(t.into())),
            "the environment".into(),
        )
        .unwrap()
    }

    fn kek(key: &str, endpoint: Option<&str>) -> AwsKek {
        AwsKek::new(key, "us-east-1", endpoint, creds(Some(TOKEN)), None).unwrap()
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            error_type: None,
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    fn ctx() -> WrapContext {
        WrapContext {
            purpose: "data-key",
            epoch: 7,
            scope: "cb.ctl".into(),
        }
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let k = kek("alias/cipherbus", Some("http://127.0.0.1:4566"));
        let shown = format!("{k:?} {k:#?} {:?}", k.credentials);
        for secret in [SECRET, TOKEN, "SECRET", "SESSION"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(shown.contains("http://127.0.0.1:4566"), "{shown}");
        assert!(shown.contains("the environment"), "{shown}");
        assert_eq!(k.describe(), "aws-kms:alias/cipherbus");
        assert_eq!(
            k.describe(),
            super::super::KekUri::parse(k.describe())
                .unwrap()
                .describe()
        );
        assert_eq!(k.kind(), "aws-kms");
    }

    #[test]
    fn region_and_endpoint_come_from_the_standard_variables_in_order() {
        let base = [
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("HOME", "/nonexistent-home"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            AwsKek::from_vars("alias/cb", vars(&all))
        };
        let k = with(&[
            ("AWS_REGION", "eu-west-1"),
            ("AWS_DEFAULT_REGION", "us-west-2"),
        ])
        .unwrap();
        assert_eq!(k.region, "eu-west-1");
        assert_eq!(k.endpoint, "https://kms.eu-west-1.amazonaws.com");
        assert_eq!(k.host, "kms.eu-west-1.amazonaws.com");
        let k = with(&[("AWS_DEFAULT_REGION", "us-west-2")]).unwrap();
        assert_eq!(k.region, "us-west-2");
        let k = with(&[("AWS_REGION", "cn-north-1")]).unwrap();
        assert_eq!(k.endpoint, "https://kms.cn-north-1.amazonaws.com.cn");

        let k = with(&[
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:4566/"),
            ("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:5000"),
        ])
        .unwrap();
        assert_eq!(k.endpoint, "http://127.0.0.1:5000");
        assert_eq!(k.host, "127.0.0.1:5000");
        let k = with(&[
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", "http://localhost:80/"),
        ])
        .unwrap();
        assert_eq!(k.endpoint, "http://localhost:80");
        assert_eq!(k.host, "localhost");

        let e = with(&[]).unwrap_err();
        assert!(matches!(e, KekError::Config { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("aws-kms:alias/cb: no AWS region: set AWS_REGION"),
            "{text}"
        );
        assert!(text.contains("/nonexistent-home/.aws/config"), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }

    #[test]
    fn credentials_come_from_the_environment_or_a_profile() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap().to_owned();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "# comment\n[default]\nregion = us-west-2\n\n[profile team]\nregion=eu-central-1\n\
             s3 =\n  max_concurrent_requests = 20\n[profile assumed]\nrole_arn = \
             arn:aws:iam::123456789012:role/x\nsource_profile = default\nregion = us-east-1\n\
             [profile inline]\nregion = ap-south-1\naws_access_key_id = AKIDCONFIG\n\
             aws_secret_access_key = config-secret\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            format!(
                "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = {SECRET}\n\n\
                 [team]\n; comment\naws_access_key_id=AKIDTEAM\naws_secret_access_key=team-secret\n\
                 aws_session_token = {TOKEN}\n"
            ),
        )
        .unwrap();
        let open = |extra: &[(&str, &str)]| {
            let mut all = vec![("HOME", home.as_str())];
            all.extend_from_slice(extra);
            AwsKek::from_vars(KEY_ID, vars(&all))
        };

        let k = open(&[]).unwrap();
        assert_eq!(k.region, "us-west-2");
        assert_eq!(k.credentials.access_key_id, "AKIDDEFAULT");
        assert_eq!(k.credentials.secret_access_key.as_str(), SECRET);
        assert!(k.credentials.session_token.is_none());
        assert!(k.credentials.source.starts_with("profile default of "));

        let k = open(&[("AWS_PROFILE", "team")]).unwrap();
        assert_eq!(k.region, "eu-central-1");
        assert_eq!(k.credentials.access_key_id, "AKIDTEAM");
        assert_eq!(k.credentials.secret_access_key.as_str(), "team-secret");
        assert_eq!(
            k.credentials.session_token.as_deref().map(String::as_str),
            Some(TOKEN)
        );

        // Keys in the config file count when the credentials file has none.
        let k = open(&[("AWS_PROFILE", "inline")]).unwrap();
        assert_eq!(k.region, "ap-south-1");
        assert_eq!(k.credentials.access_key_id, "AKIDCONFIG");

        // The environment wins over the files, for credentials and region alike.
        let k = open(&[
            ("AWS_PROFILE", "team"),
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
            ("AWS_SESSION_TOKEN", "env-token"),
            ("AWS_REGION", "sa-east-1"),
        ])
        .unwrap();
        assert_eq!(k.region, "sa-east-1");
        assert_eq!(k.credentials.access_key_id, "AKIDENV");
        assert_eq!(k.credentials.secret_access_key.as_str(), "env-secret");
        assert_eq!(k.credentials.source, "the environment");

        // Explicit file variables.
        let other = dir.path().join("creds");
        std::fs::write(
            &other,
            "[default]\naws_access_key_id = AKIDOTHER\naws_secret_access_key = other\n",
        )
        .unwrap();
        let k = open(&[("AWS_SHARED_CREDENTIALS_FILE", other.to_str().unwrap())]).unwrap();
        assert_eq!(k.credentials.access_key_id, "AKIDOTHER");

        let e = open(&[("AWS_PROFILE", "assumed")]).unwrap_err();
        assert!(matches!(e, KekError::Config { .. }), "{e}");
        assert!(e.to_string().contains("role_arn"), "{e}");
        assert!(e.to_string().contains("does not support"), "{e}");

        let e = open(&[("AWS_PROFILE", "absent"), ("AWS_REGION", "us-east-1")]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "{text}"
        );
        assert!(text.contains("profile absent of "), "{text}");
        assert!(text.contains(".aws/credentials"), "{text}");

        let e = open(&[("AWS_ACCESS_KEY_ID", "AKIDENV")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "{e}"
        );
        let e = open(&[("AWS_SECRET_ACCESS_KEY", SECRET)]).unwrap_err();
        assert!(!e.to_string().contains(SECRET), "{e}");

        // No HOME and no variables: nothing to read, and the message says what to set.
        let e = AwsKek::from_vars(KEY_ID, vars(&[("AWS_REGION", "us-east-1")])).unwrap_err();
        assert!(e.to_string().contains("set AWS_ACCESS_KEY_ID"), "{e}");
    }

    #[test]
    fn keys_name_ids_arns_and_aliases() {
        for (key, want) in [
            (KEY_ID, KeyRef::KeyId),
            ("mrk-1234abcd12ab34cd56ef1234567890ab", KeyRef::KeyId),
            ("alias/cipherbus", KeyRef::Alias),
            ("alias/team/cipher_bus-1", KeyRef::Alias),
            (
                "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                KeyRef::KeyArn {
                    region: "us-east-1".into(),
                },
            ),
            (
                "arn:aws-us-gov:kms:us-gov-west-1:111122223333:alias/cb",
                KeyRef::AliasArn {
                    region: "us-gov-west-1".into(),
                },
            ),
        ] {
            assert_eq!(KeyRef::parse(key), Ok(want), "{key}");
        }
        for bad in [
            "",
            "alias/",
            "alias/a b",
            "alias/\"x",
            "key/1234",
            "1234 abcd",
            "arn:aws:s3:us-east-1:111122223333:key/x",
            "arn:aws:kms:us-east-1:1111:key/x",
            "arn:aws:kms:us-east-1:111122223333:grant/x",
            "arn:aws:kms::111122223333:key/x",
            "arn:aws:kms:us-east-1:111122223333",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
        let e = AwsKek::new("a b", "us-east-1", None, creds(None), None).unwrap_err();
        assert!(matches!(e, KekError::Config { .. }), "{e}");
        // An ARN in another region than the configured one would never be found.
        let e = AwsKek::new(
            "arn:aws:kms:eu-west-1:111122223333:key/abcd",
            "us-east-1",
            Some("http://127.0.0.1:9"),
            creds(None),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("set AWS_REGION to eu-west-1"), "{e}");
        let e = AwsKek::new(KEY_ID, "us east", None, creds(None), None).unwrap_err();
        assert!(e.to_string().contains("not a region name"), "{e}");
    }

    #[test]
    fn only_an_alias_can_be_created() {
        for key in [
            KEY_ID,
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd",
            "arn:aws:kms:us-east-1:111122223333:alias/cb",
        ] {
            // Nothing listens on port 9: a call would be Unavailable.
            let e = kek(key, Some("http://127.0.0.1:9")).create().unwrap_err();
            assert!(matches!(e, KekError::Config { .. }), "{e}");
            assert!(
                e.to_string()
                    .ends_with("name an alias/NAME to create a key"),
                "{e}"
            );
        }
        let e = kek("alias/aws/cb", Some("http://127.0.0.1:9"))
            .create()
            .unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let e = kek("alias/cb", Some("http://127.0.0.1:9"))
            .create()
            .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
    }

    #[test]
    fn bad_endpoints_and_credentials_are_refused_without_showing_secrets() {
        for endpoint in [
            "kms.example:443",
            "ftp://kms.example",
            "http://",
            "https://kms.example/path",
            "http://user:pw@kms.example",
            "http://kms.example?x=1",
        ] {
            let e =
                AwsKek::new(KEY_ID, "us-east-1", Some(endpoint), creds(None), None).unwrap_err();
            assert!(matches!(e, KekError::Config { .. }), "{endpoint}: {e}");
            assert!(!e.to_string().contains("pw@"), "{e}");
        }
        let source = || "the environment".to_owned();
        let e = AwsCredentials::new(
            "AKID",
            Zeroizing::new("bad secret\x01".into()),
            None,
            source(),
        )
        .unwrap_err();
        assert!(!e.contains("bad secret"), "{e}");
        assert!(AwsCredentials::new("", Zeroizing::new(SECRET.into()), None, source()).is_err());
        assert!(AwsCredentials::new("AKID", Zeroizing::new(" ".into()), None, source()).is_err());
        let e = AwsCredentials::new(
            "AKID",
            Zeroizing::new(SECRET.into()),
            Some(Zeroizing::new("tok en".into())),
            source(),
        )
        .unwrap_err();
        assert!(!e.contains("tok en"), "{e}");
        let c = AwsCredentials::new(
            " AKID\n",
            Zeroizing::new(format!("{SECRET}\n")),
            Some(Zeroizing::new(String::new())),
            source(),
        )
        .unwrap();
        assert_eq!(c.access_key_id, "AKID");
        assert_eq!(c.secret_access_key.as_str(), SECRET);
        assert!(c.session_token.is_none());
    }

    #[test]
    fn aws_ca_bundle_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["kms.example".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        let k = AwsKek::new(
            KEY_ID,
            "us-east-1",
            Some("https://kms.example"),
            creds(None),
            Some(&good),
        )
        .unwrap();
        assert_eq!(k.ca_bundle.as_deref(), Some(good.as_path()));
        assert_eq!(k.host, "kms.example");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem\n").unwrap();
        for path in [empty.as_path(), Path::new("/nonexistent/ca.pem")] {
            let e = AwsKek::new(
                KEY_ID,
                "us-east-1",
                Some("https://kms.example"),
                creds(None),
                Some(path),
            )
            .unwrap_err();
            assert!(matches!(e, KekError::Config { .. }), "{e}");
            assert!(e.to_string().contains("AWS_CA_BUNDLE"), "{e}");
        }
    }

    #[test]
    fn requests_are_signed_for_kms_in_the_region() {
        let k = kek("alias/cb", Some("http://127.0.0.1:4566"));
        // 2015-08-30T12:36:00Z, as in AWS's own SigV4 examples.
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let headers = k.sign(Op::Encrypt, b"{}", time).unwrap();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("x-amz-date").as_deref(), Some("20150830T123600Z"));
        assert_eq!(get("x-amz-security-token").as_deref(), Some(TOKEN));
        let auth = get("authorization").unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/kms/aws4_request, "
            ),
            "{auth}"
        );
        assert!(
            auth.contains(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target,"
            ),
            "{auth}"
        );
        assert!(!auth.contains(SECRET), "{auth}");
        // The same request, another body or operation: another signature.
        let again = k.sign(Op::Encrypt, b"{}", time).unwrap();
        assert_eq!(headers, again);
        assert_ne!(headers, k.sign(Op::Encrypt, b"{ }", time).unwrap());
        assert_ne!(headers, k.sign(Op::Decrypt, b"{}", time).unwrap());
    }

    #[test]
    fn the_encrypt_body_is_json_with_the_key_context_and_plaintext() {
        let secret = [7u8; KEY_LEN];
        let body = encrypt_body("alias/c\"b", &ctx(), &secret);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Plaintext"], B64.encode(secret));
        assert_eq!(v["KeyId"], "alias/c\"b");
        assert_eq!(
            v["EncryptionContext"],
            serde_json::json!({
                "cipherbus-purpose": "data-key",
                "cipherbus-epoch": "7",
                "cipherbus-scope": "cb.ctl",
            })
        );
        assert_eq!(v.as_object().unwrap().len(), 3);
    }

    #[test]
    fn a_blob_of_the_wrong_size_fails_without_calling_kms() {
        let k = kek(KEY_ID, Some("http://127.0.0.1:9"));
        for blob in [Vec::new(), vec![1u8; MAX_WRAPPED + 1]] {
            let e = k.unwrap(&ctx(), &blob).unwrap_err();
            assert!(matches!(e, KekError::Unwrap { .. }), "{e}");
        }
        // And a reachable-looking call that is not answered is Unavailable.
        let e = k.unwrap(&ctx(), &[1, 2, 3]).unwrap_err();
        assert!(e.is_unavailable(), "{e}");
    }

    #[test]
    fn answers_map_to_errors() {
        let k = kek("alias/cb", Some("http://127.0.0.1:4566"));
        let kind = |op, status, body: &str| {
            let e = k.refusal(op, &answer(status, body));
            let text = e.to_string();
            assert!(!text.contains(SECRET) && !text.contains(TOKEN), "{text}");
            assert!(text.starts_with("aws-kms:alias/cb"), "{text}");
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
        let err = |t: &str| format!(r#"{{"__type":"{t}","message":"said {t}"}}"#);
        for (t, want) in [
            ("ThrottlingException", "unavailable"),
            ("KMSInternalException", "unavailable"),
            ("DependencyTimeoutException", "unavailable"),
            ("AccessDeniedException", "denied"),
            ("UnrecognizedClientException", "denied"),
            ("InvalidSignatureException", "denied"),
            ("ExpiredTokenException", "denied"),
            ("NotFoundException", "not-found"),
            ("DisabledException", "wrong-key"),
            ("KMSInvalidStateException", "wrong-key"),
            ("InvalidKeyUsageException", "wrong-key"),
            ("InvalidCiphertextException", "unwrap"),
            ("IncorrectKeyException", "unwrap"),
            ("AlreadyExistsException", "exists"),
            ("ValidationException", "config"),
            ("com.amazonaws.kms#NotFoundException", "not-found"),
            (
                "com.amazon.coral.service#UnrecognizedClientException",
                "denied",
            ),
        ] {
            assert_eq!(kind(Op::Decrypt, 400, &err(t)), want, "{t}");
        }
        assert_eq!(
            kind(Op::Encrypt, 500, &err("ValidationException")),
            "unavailable"
        );
        assert_eq!(kind(Op::Encrypt, 503, "<html>busy</html>"), "unavailable");
        assert_eq!(kind(Op::Encrypt, 429, ""), "unavailable");
        assert_eq!(kind(Op::Encrypt, 404, "<html>Not Found</html>"), "config");
        assert_eq!(kind(Op::Encrypt, 301, ""), "config");
        assert_eq!(kind(Op::Encrypt, 403, "<html>Forbidden</html>"), "denied");
        let xml = |code: &str| {
            format!(
                "<?xml version=\"1.0\"?><ErrorResponse><Errors><Error><Code>{code}</Code>\
                 <Message>said {code}</Message></Error></Errors></ErrorResponse>"
            )
        };
        assert_eq!(
            kind(Op::Decrypt, 403, &xml("SignatureDoesNotMatch")),
            "denied"
        );
        assert_eq!(
            kind(Op::Decrypt, 403, &xml("InvalidClientTokenId")),
            "denied"
        );
        assert_eq!(kind(Op::Decrypt, 403, &xml("AccessDenied")), "denied");
        assert_eq!(
            kind(Op::Decrypt, 400, &xml("ThrottlingException")),
            "unavailable"
        );
        let e = k.refusal(Op::Decrypt, &answer(403, &xml("AccessDenied")));
        assert!(
            e.to_string()
                .contains("AccessDenied: said AccessDenied (the credentials"),
            "{e}"
        );
        assert!(!e.to_string().contains("<Code>"), "{e}");
        // `Message`, capitalised, and the header's type when the body has none.
        let e = k.refusal(
            Op::Encrypt,
            &Answer {
                status: 400,
                error_type: Some(
                    "AccessDeniedException:http://internal.amazon.com/coral/com.amazon.coral/"
                        .into(),
                ),
                body: Zeroizing::new(br#"{"Message":"not\nallowed"}"#.to_vec()),
            },
        );
        assert!(matches!(e, KekError::Denied { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("AccessDeniedException: not allowed"),
            "{text}"
        );
        assert!(text.contains("need kms:Encrypt on alias/cb"), "{text}");
        assert!(text.contains("from the environment"), "{text}");
        assert!(!text.contains("coral"), "{text}");
        // A server that echoes a secret never gets it into a message.
        let e = k.refusal(
            Op::Encrypt,
            &answer(
                400,
                &format!(r#"{{"__type":"X","message":"{SECRET} {TOKEN}"}}"#),
            ),
        );
        assert!(!e.to_string().contains(SECRET), "{e}");
        assert!(!e.to_string().contains(TOKEN), "{e}");
    }

    #[test]
    fn profile_sections_are_found_as_the_aws_cli_finds_them() {
        let file = ProfileFile {
            path: None,
            text: Zeroizing::new(
                "[default]\nregion = a\n[profile default]\nregion = b\n[profiles]\nregion = c\n\
                 [profile  x ]\nregion = d\nREGION = e\n[x]\nregion = f\n"
                    .into(),
            ),
        };
        assert_eq!(
            prop(&file.profile("default", true).unwrap(), "region"),
            Some("b")
        );
        assert_eq!(prop(&file.profile("x", true).unwrap(), "region"), Some("e"));
        assert_eq!(
            prop(&file.profile("x", false).unwrap(), "region"),
            Some("f")
        );
        assert!(file.profile("s", true).is_none());
        assert_eq!(
            prop(&file.profile("profiles", false).unwrap(), "region"),
            Some("c")
        );
        assert!(file.profile("absent", false).is_none());
    }
}
