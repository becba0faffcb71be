//! TLS on both sides, with rustls: the agent listener and the upstream connection.
//!
//! This module owns loading and checking certificates and keys, the rustls configurations, and
//! their hot reload. It does no NATS protocol work: the session decides when to upgrade (after
//! INFO, first, or on a sniffed ClientHello) and calls in here for the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::sync::watch;

/// How agents reach the listener over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentTlsMode {
    /// INFO says `tls_required`, then the agent upgrades.
    Required,
    /// INFO says `tls_available`; a ClientHello as first byte upgrades, plaintext still works.
    Optional,
    /// The TLS handshake comes before INFO.
    First,
    /// Wait briefly for a ClientHello (TLS first); otherwise INFO with `tls_required`.
    Auto,
}

impl std::str::FromStr for AgentTlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(Self::Required),
            "optional" => Ok(Self::Optional),
            "first" => Ok(Self::First),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "TLS mode {other:?} is not one of required, optional, first, auto"
            )),
        }
    }
}

/// How long `auto` mode waits for a ClientHello before sending plaintext INFO.
pub const AUTO_WAIT: Duration = Duration::from_millis(50);
/// How often certificate files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no valid PEM {expected}")]
    BadPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the key {key} does not match the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate {path} expired on {not_after}")]
    Expired { path: PathBuf, not_after: String },
    #[error("the certificate {path} is not valid before {not_before}")]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("the CA file {path} holds no usable CA certificate: {why}")]
    BadCa { path: PathBuf, why: String },
    #[error("TLS setup: {0}")]
    Rustls(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::BadPem {
            what,
            path: path.to_owned(),
            expected: "certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            what,
            path: path.to_owned(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::BadPem {
        what: "key file",
        path: path.to_owned(),
        expected: "private key",
    })
}

/// Refuses a leaf certificate outside its validity period.
fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| TlsError::BadPem {
            what: "certificate file",
            path: path.to_owned(),
            expected: "X.509 certificate",
        })?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: validity.not_after.to_string(),
        });
    }
    if validity.not_before > now {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
        });
    }
    Ok(())
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs("CA file", path)? {
        store.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

/// Makes aws-lc-rs the process-wide rustls provider. Libraries that build their own rustls
/// configurations (the NATS client of the control plane) need one, and two are compiled in.
pub fn install_default_provider() {
    // Already installed (by an earlier call) is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The listener's certificate, key and optional client CA, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    /// Loads and checks the files into a rustls server configuration.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certs("certificate file", &self.cert)?;
        check_validity(&self.cert, &chain[0])?;
        let key = key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                    .build()
                    .map_err(|e| TlsError::BadCa {
                        path: ca.clone(),
                        why: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) | rustls::Error::General(_) => {
                TlsError::KeyMismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                }
            }
            other => TlsError::Rustls(other.to_string()),
        })?;
        Ok(Arc::new(config))
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// The agent listener's TLS: its mode and a configuration that can be swapped while running.
#[derive(Debug)]
pub struct AgentTls {
    pub mode: AgentTlsMode,
    pub verify_clients: bool,
    files: ServerFiles,
    current: ArcSwap<ServerConfig>,
}

impl AgentTls {
    pub fn new(mode: AgentTlsMode, files: ServerFiles) -> Result<Self, TlsError> {
        let config = files.load()?;
        Ok(AgentTls {
            mode,
            verify_clients: files.client_ca.is_some(),
            files,
            current: ArcSwap::new(config),
        })
    }

    /// The acceptor for a new handshake, with the configuration in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Loads the files again; a broken set is refused and the old one stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.files.load()?;
        self.current.store(config);
        Ok(())
    }

    /// Reloads on SIGHUP and when a file changes, until shutdown.
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<()>) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut stamps = self.files.stamps();
        let mut poll = tokio::time::interval(RELOAD_POLL);
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = poll.tick() => false,
                _ = hangup => true,
                _ = shutdown.changed() => return,
            };
            let now = self.files.stamps();
            if !forced && now == stamps {
                continue;
            }
            stamps = now;
            match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new TLS files refused; the old certificate stays in use")
                }
            }
        }
    }
}

/// TLS towards the upstream servers.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    /// Overrides the name verified; otherwise the configured host.
    pub server_name: Option<String>,
    /// Handshake before the server's INFO (servers with `handshake_first`).
    pub first: bool,
}

/// What `[upstream.tls]` and the `--upstream-*` flags configure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub first: bool,
    pub server_name: Option<String>,
}

impl UpstreamFiles {
    /// Whether anything asks for TLS to the upstream up front.
    pub fn configured(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.first
    }

    pub fn load(&self) -> Result<UpstreamTls, TlsError> {
        Ok(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(self.client_config()?)),
            server_name: self.server_name.clone(),
            first: self.first,
        })
    }

    /// The rustls client configuration for every connection to the upstream: sessions, the
    /// control plane and the operator commands.
    fn client_config(&self) -> Result<ClientConfig, TlsError> {
        // No built-in roots: the operator names the CA that signs the upstream's certificate.
        let roots = match &self.ca {
            Some(ca) => roots(ca)?,
            None => Arc::new(RootCertStore::empty()),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match &self.server_name {
            // Clients that derive the verified name from the URL (the NATS client of the
            // control plane) are held to the configured name by the verifier itself. Without
            // roots every handshake fails anyway, and the verifier cannot be built.
            Some(name) if !roots.is_empty() => {
                let name = ServerName::try_from(name.clone()).map_err(|_| {
                    TlsError::Rustls(format!("{name:?} is not a valid TLS server name"))
                })?;
                let inner =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| TlsError::Rustls(e.to_string()))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
            }
            _ => builder.with_root_certificates(roots),
        };
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key_path)) => {
                let chain = certs("upstream certificate file", cert)?;
                check_validity(cert, &chain[0])?;
                builder
                    .with_client_auth_cert(chain, key(key_path)?)
                    .map_err(|_| TlsError::KeyMismatch {
                        cert: cert.clone(),
                        key: key_path.clone(),
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Rustls(
                    "--upstream-cert and --upstream-key go together".into(),
                ))
            }
        };
        Ok(config)
    }
}

/// Verifies the upstream's certificate for the configured `server_name`, whatever name the
/// client asked for; everything else is the standard WebPKI verification.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _asked_for: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("first", &self.first)
            .finish_non_exhaustive()
    }
}

impl UpstreamFiles {
    /// The same settings for an async-nats client (the control plane and the operator
    /// commands): the same rustls configuration as the sessions, so no system root is trusted
    /// and `server_name` is the name verified, and TLS is required whenever anything is
    /// configured, as it is for sessions.
    pub fn apply(
        &self,
        mut opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, TlsError> {
        opts = opts.tls_client_config(self.client_config()?);
        if self.configured() {
            opts = opts.require_tls(true);
        }
        if self.first {
            opts = opts.tls_first();
        }
        Ok(opts)
    }
}

impl UpstreamTls {
    /// Runs the client handshake on `tcp`, verifying `host` (or the configured name).
    pub async fn connect(
        &self,
        host: &str,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_owned()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name:?} is not a valid TLS server name"),
            )
        })?;
        self.connector.connect(name, tcp).await
    }
}
