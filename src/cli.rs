//! The command line: `keygen`, `run`, `controller`, `rotate`, `keys`, `revoke`, `audit` and
//! `bench`.
//!
//! This module owns argument parsing, logging setup and exit codes. Startup errors (bad config,
//! bad key file, bad address) print one sentence and exit with code 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use std::sync::Arc;

use crate::config::{Config, FileConfig, Overrides};
use crate::kek::{KekUri, Root};
use crate::keyring::source::write_new_kek;

/// Exit code for anything wrong with how cipherbus was started.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "cipherbus",
    version,
    about = "Transparent encrypting proxy for NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new 256-bit root key (KEK): in an HSM or KMS, or in a file with mode 0600.
    /// An existing key is never overwritten.
    Keygen {
        /// Where to create it: pkcs11:..., vault-transit:NAME, aws-kms:alias/NAME, or file:PATH.
        #[arg(
            long,
            value_name = "URI",
            conflicts_with = "out",
            required_unless_present = "out"
        )]
        kek: Option<String>,
        /// Same as --kek file:FILE.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Run the proxy.
    Run(RunArgs),
    /// Make a running proxy or controller re-read its config file and apply its subject policy,
    /// connection cap and rotation schedule (what SIGHUP does, as `nats-server --signal reload`).
    Reload {
        /// The process id of `cipherbus run` or `cipherbus controller`.
        #[arg(long, value_name = "PID")]
        pid: i32,
    },
    /// Run the key authority alone, without a proxy listener.
    Controller(ControllerArgs),
    /// Ask the key authority to rotate now; waits until the new epoch is active.
    Rotate(RotateArgs),
    /// The fleet at a glance: every proxy with its epoch, traffic and refusals, the
    /// authority and its standby, and the next rotation.
    Status {
        #[command(flatten)]
        authority: AuthorityArgs,
        /// One JSON object per look, for scripts.
        #[arg(long)]
        json: bool,
        /// Look again every 2 s (in place on a terminal) until interrupted.
        #[arg(long)]
        watch: bool,
        /// A config file: show the default scope and every `[[scope]]` in it, each under its
        /// own root (instead of --kek and --scope).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["kek", "kek_file", "scope"])]
        config: Option<PathBuf>,
    },
    /// List the epochs the key authority knows and their states.
    Keys {
        #[command(flatten)]
        authority: AuthorityArgs,
        /// A config file: list the default scope and every `[[scope]]` in it, each under its
        /// own root (instead of --kek and --scope).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["kek", "kek_file", "scope"])]
        config: Option<PathBuf>,
    },
    /// Wrap every data key and the deployment seed again under the root's newest version
    /// (after the KMS rotated its key, or after `migrate`); online, through the authority.
    Rewrap(AuthorityArgs),
    /// Move a deployment from a file root to an HSM or KMS root: the file's key becomes the
    /// deployment seed, wrapped under the new root, so every derived key stays as it is.
    Migrate {
        /// The file root the deployment runs on now.
        #[arg(long, value_name = "FILE")]
        from_kek_file: PathBuf,
        #[command(flatten)]
        bus: AuthorityArgs,
    },
    /// Destroy a compromised epoch everywhere now (the active one is replaced first).
    Revoke {
        /// The epoch to destroy.
        epoch: u32,
        #[command(flatten)]
        authority: AuthorityArgs,
        /// Why, for the audit log.
        #[arg(long, default_value = "operator request")]
        reason: String,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Measure direct NATS, a plain TCP forwarder and cipherbus side by side.
    Bench(BenchArgs),
    /// A plain TCP forwarder, the baseline `bench` compares against.
    #[command(hide = true)]
    Forward {
        #[arg(long, value_name = "ADDR")]
        listen: String,
        #[arg(long, value_name = "ADDR")]
        upstream: String,
    },
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Payload sizes (examples: 128, 1KiB, 16KiB).
    #[arg(long, value_delimiter = ',', default_value = "128,1KiB,16KiB,256KiB")]
    sizes: Vec<String>,
    /// Publishing agents (all behind the publisher-side proxy).
    #[arg(long, default_value_t = 1)]
    pubs: usize,
    /// Subscribing agents (all behind the subscriber-side proxy); each gets every message.
    #[arg(long, default_value_t = 1)]
    subs: usize,
    /// Messages per throughput run, instead of --duration.
    #[arg(long)]
    count: Option<u64>,
    /// How long each throughput run publishes.
    #[arg(long, value_name = "DUR", default_value = "3s")]
    duration: String,
    /// Throughput runs per path and size; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Messages per second in the latency runs (capped at half the slowest path's
    /// throughput); 0 skips them.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long each latency run lasts.
    #[arg(long, value_name = "DUR", default_value = "3s")]
    latency_duration: String,
    /// Which paths to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,forwarder,cipherbus"
    )]
    paths: Vec<crate::bench::PathKind>,
    /// Also measure the proxy's memory with this many idle agent connections.
    #[arg(long, value_name = "N", default_value_t = 0)]
    idle_connections: usize,
    /// Also measure cipherbus while its key authority rotates at this interval (example: 1s).
    #[arg(long, value_name = "DUR")]
    rotate_every: Option<String>,
    /// The proxies' root key: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH
    /// [default: a key file made for the run]. An HSM or KMS root must exist (`keygen --kek`);
    /// the proxies inherit this environment (VAULT_*, SOFTHSM2_CONF, AWS_*), and the bench's
    /// nats-server then runs with JetStream for the deployment seed.
    #[arg(long, value_name = "URI")]
    kek: Option<String>,
    /// The nats-server binary [default: $CIPHERBUS_NATS_SERVER, PATH, or target/tools].
    #[arg(long, value_name = "FILE")]
    nats_server: Option<PathBuf>,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check an audit log file, the deployment's audit stream, or both against each other;
    /// names the first bad entry.
    Verify {
        /// The audit log file (JSON lines).
        file: Option<PathBuf>,
        /// Also read the audit stream from the bus (and compare it with FILE).
        #[arg(long)]
        stream: bool,
        #[command(flatten)]
        bus: AuthorityArgs,
    },
    /// Print the audit stream's entries, checked as they come, and follow it.
    Tail {
        /// The first entry to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Stop after the entries already there instead of following.
        #[arg(long)]
        no_follow: bool,
        #[command(flatten)]
        bus: AuthorityArgs,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML config file; flags override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address agents connect to [default: 127.0.0.1:4333].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Upstream NATS server; repeat it or give a comma list for a cluster
    /// [default: nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    upstream: Vec<String>,
    /// Where the root key is: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH.
    #[arg(long, value_name = "URI")]
    kek: Option<String>,
    /// Same as --kek file:FILE.
    #[arg(long, value_name = "FILE")]
    kek_file: Option<PathBuf>,
    /// Directory for wrapped data keys and keyring state.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Serve /metrics and /healthz on this address.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Host the key authority in this proxy (needs --state-dir).
    #[arg(long)]
    controller: bool,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    upstream_tls: UpstreamTlsArgs,
    /// AEAD code for envelopes under 4 KiB: audited (aws-lc-rs) or batched (hand-written
    /// AVX-512, opt-in) [default: audited].
    #[arg(long, value_name = "BACKEND")]
    aead: Option<String>,
    /// Check the config and the root key, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
}

/// TLS for agents connecting to the proxy.
#[derive(Debug, Args)]
struct TlsArgs {
    /// PEM certificate chain the listener presents.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require agents to present a certificate signed by this CA (mTLS).
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// required | optional | first | auto [default: required].
    #[arg(long, value_name = "MODE")]
    tls_mode: Option<crate::tls::AgentTlsMode>,
}

/// TLS towards the upstream servers.
#[derive(Debug, Clone, Args)]
struct UpstreamTlsArgs {
    /// CA that signs the upstream servers' certificates.
    #[arg(long, value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Client certificate for servers with `verify`.
    #[arg(long, value_name = "FILE")]
    upstream_cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, value_name = "FILE")]
    upstream_key: Option<PathBuf>,
    /// Handshake before the server's INFO (servers with `handshake_first`).
    #[arg(long)]
    upstream_tls_first: bool,
    /// The name to verify in the server's certificate [default: the upstream URL's host].
    #[arg(long, value_name = "NAME")]
    upstream_server_name: Option<String>,
}

#[derive(Debug, Args)]
struct ControllerArgs {
    /// TOML config file; flags override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Upstream NATS server; repeat it or give a comma list.
    #[arg(long, value_name = "URL")]
    upstream: Vec<String>,
    /// Where the root key is: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH.
    #[arg(long, value_name = "URI")]
    kek: Option<String>,
    /// Same as --kek file:FILE.
    #[arg(long, value_name = "FILE")]
    kek_file: Option<PathBuf>,
    /// Directory for wrapped data keys, keyring state and the audit log.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Serve /metrics and /healthz on this address.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    #[command(flatten)]
    upstream_tls: UpstreamTlsArgs,
}

/// How to reach the key authority.
#[derive(Debug, Clone, Args)]
struct AuthorityArgs {
    /// A NATS server of the bus the authority is on [default: nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    upstream: Vec<String>,
    /// Where the root key is: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH.
    #[arg(long, value_name = "URI", conflicts_with = "kek_file")]
    kek: Option<String>,
    /// Same as --kek file:FILE.
    #[arg(long, value_name = "FILE")]
    kek_file: Option<PathBuf>,
    /// A root and control prefix taken from a config file rather than the flags.
    #[arg(skip)]
    resolved: Option<(KekUri, String)>,
    /// Prefix of the control subjects.
    #[arg(long, value_name = "P", default_value = crate::policy::DEFAULT_CONTROL_PREFIX)]
    control_prefix: String,
    /// The key scope, a `[[scope]]` name; --kek is then that scope's root [default: the default
    /// scope, whose root is the top-level kek].
    #[arg(long, value_name = "NAME")]
    scope: Option<String>,
    /// How long to wait for the authority (examples: 10s, 2m).
    #[arg(long, value_name = "DUR", default_value = "30s")]
    timeout: String,
    #[command(flatten)]
    tls: UpstreamTlsArgs,
}

#[derive(Debug, Args)]
struct RotateArgs {
    #[command(flatten)]
    authority: AuthorityArgs,
    /// Why, for the audit log.
    #[arg(long, default_value = "operator request")]
    reason: String,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(code) = init_logging() {
        return code;
    }
    match cli.command {
        Command::Keygen { kek, out } => keygen(kek, out),
        Command::Run(args) => run(args),
        Command::Reload { pid } => reload(pid),
        Command::Controller(args) => controller(args),
        Command::Rotate(args) => rotate(args),
        Command::Keys { authority, config } => match config {
            Some(file) => keys_of_every_scope(authority, &file),
            None => keys(authority),
        },
        Command::Status {
            authority,
            json,
            watch,
            config,
        } => status(authority, config.as_deref(), json, watch),
        Command::Rewrap(args) => rewrap(args),
        Command::Migrate { from_kek_file, bus } => migrate(from_kek_file, bus),
        Command::Revoke {
            epoch,
            authority,
            reason,
        } => revoke(epoch, authority, reason),
        Command::Audit {
            command: AuditCommand::Verify { file, stream, bus },
        } => audit_verify(file, stream, bus),
        Command::Audit {
            command:
                AuditCommand::Tail {
                    from,
                    no_follow,
                    bus,
                },
        } => audit_tail(from, !no_follow, bus),
        Command::Bench(args) => bench(args),
        Command::Forward { listen, upstream } => match crate::bench::forward(&listen, &upstream) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

fn bench(a: BenchArgs) -> ExitCode {
    let dur = |flag: &str, v: &str| {
        crate::config::parse_duration(v)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                fail(&format!(
                    "{flag} {v:?} is not a valid duration (examples: 3s, 500ms)"
                ))
            })
    };
    let mut sizes = Vec::new();
    for s in &a.sizes {
        match crate::bench::parse_size(s) {
            Some(n) if (16..=64 << 20).contains(&n) => sizes.push(n),
            _ => {
                return fail(&format!(
                    "--sizes: {s:?} is not a size from 16 B to 64 MiB (examples: 128, 1KiB)"
                ))
            }
        }
    }
    if a.pubs == 0 || a.subs == 0 || a.rounds == 0 || a.count == Some(0) {
        return fail(&"--pubs, --subs, --rounds and --count must be at least 1");
    }
    let kek = match a.kek.as_deref().map(KekUri::parse).transpose() {
        Ok(k) => k,
        Err(e) => return fail(&format!("--kek: {e}")),
    };
    let parsed = (|| {
        Ok::<_, ExitCode>((
            dur("--duration", &a.duration)?,
            dur("--latency-duration", &a.latency_duration)?,
            a.rotate_every
                .as_deref()
                .map(|v| dur("--rotate-every", v))
                .transpose()?,
            crate::bench::find_nats_server(a.nats_server).map_err(|e| fail(&e))?,
        ))
    })();
    let (duration, latency_duration, rotate_every, nats_server) = match parsed {
        Ok(x) => x,
        Err(code) => return code,
    };
    raise_fd_limit();
    let params = crate::bench::Params {
        sizes,
        pubs: a.pubs,
        subs: a.subs,
        count: a.count,
        duration,
        rounds: a.rounds,
        rate: a.rate,
        latency_duration,
        paths: a.paths,
        idle_connections: a.idle_connections,
        rotate_every,
        kek,
        nats_server,
        json: a.json,
    };
    match crate::bench::run(params) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::bench::report(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("cipherbus: {e}");
    ExitCode::from(EXIT_USAGE)
}

/// Logs go to stderr: text, or with `CIPHERBUS_LOG_FORMAT=json` one JSON object per line (the
/// same events and fields). Any other format is refused before anything runs.
fn init_logging() -> Result<(), ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CIPHERBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    use std::io::IsTerminal;
    let format = std::env::var("CIPHERBUS_LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.as_str() {
        "" | "text" => {
            let _ = builder
                .with_ansi(std::io::stderr().is_terminal())
                .try_init();
        }
        "json" => {
            let _ = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .try_init();
        }
        other => {
            return Err(fail(&format!(
                "CIPHERBUS_LOG_FORMAT {other:?} is not a log format (expected \"text\" or \"json\")"
            )))
        }
    }
    Ok(())
}

fn upstream_overrides(a: UpstreamTlsArgs) -> Overrides {
    Overrides {
        upstream_ca: a.upstream_ca,
        upstream_cert: a.upstream_cert,
        upstream_key: a.upstream_key,
        upstream_tls_first: a.upstream_tls_first,
        upstream_server_name: a.upstream_server_name,
        ..Overrides::default()
    }
}

fn keygen(kek: Option<String>, out: Option<PathBuf>) -> ExitCode {
    let uri = match (kek, out) {
        (Some(k), _) => match KekUri::parse(&k) {
            Ok(u) => u,
            Err(e) => return fail(&e),
        },
        (None, Some(out)) => KekUri::File(out),
        (None, None) => return fail(&"keygen needs --kek URI (or --out FILE)"),
    };
    if let KekUri::File(out) = &uri {
        return match write_new_kek(out) {
            Ok(key) => {
                println!(
                    "wrote a new root key to {} (fingerprint {})",
                    out.display(),
                    key.fingerprint()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    let made = uri.open_kek().and_then(|kek| {
        kek.create()?;
        kek.check()?;
        Ok(kek)
    });
    match made {
        Ok(kek) => {
            println!(
                "created the root key {} ({}); the first controller started with it creates the deployment seed",
                kek.describe(),
                kek.kind()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Reads the config file, applies the flags and validates.
fn load(config: Option<&Path>, flags: Overrides) -> Result<Config, ExitCode> {
    let file = match config {
        Some(path) => FileConfig::load(path).map_err(|e| fail(&e))?,
        None => FileConfig::default(),
    };
    file.resolve(flags).map_err(|e| fail(&e))
}

/// Opens the root the config names. An HSM or KMS root is checked, and its deployment seed is
/// read from the bus (created there by a controller, if it has none yet).
async fn open_root(config: &Config, create: bool) -> Result<Arc<Root>, String> {
    crate::server::open_root(config, &config.kek, config.policy.control_prefix(), create).await
}

fn run(args: RunArgs) -> ExitCode {
    let flags = Overrides {
        listen: args.listen,
        upstream: args.upstream,
        kek: args.kek,
        kek_file: args.kek_file,
        state_dir: args.state_dir,
        admin: args.admin,
        controller: args.controller,
        tls_cert: args.tls.tls_cert,
        tls_key: args.tls.tls_key,
        tls_client_ca: args.tls.tls_client_ca,
        tls_mode: args.tls.tls_mode,
        aead: args.aead,
        ..upstream_overrides(args.upstream_tls)
    };
    let config = match load(args.config.as_deref(), flags.clone()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let config_file = args.config.clone();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if args.check_config {
        return runtime.block_on(check_config(&config));
    }
    raise_fd_limit();
    runtime.block_on(async move {
        let root = match open_root(&config, true).await {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let mut handle = match crate::server::start(config, root).await {
            Ok(h) => h,
            Err(e) => return fail(&e),
        };
        let code = serve(&mut handle, |h| {
            reload_from(h, config_file.as_deref(), &flags)
        })
        .await;
        handle.shutdown().await;
        code
    })
}

/// Runs until SIGTERM or Ctrl-C (success) or until a part the process cannot run without
/// stops (one sentence, exit 2). SIGHUP calls `on_hangup` and goes on: its default action
/// would end the process.
async fn serve(
    handle: &mut crate::server::ProxyHandle,
    on_hangup: impl Fn(&crate::server::ProxyHandle),
) -> ExitCode {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait_for_signal() => {
                tracing::info!("shutting down");
                return ExitCode::SUCCESS;
            }
            why = handle.failed() => return fail(&why),
            Some(()) = hup => on_hangup(handle),
        }
    }
}

/// SIGHUP: reads the config file again and applies what can change live (the subject policy,
/// the connection cap, the rotation schedules). A file that does not
/// validate, or that changes what takes a restart, is refused and logged; the running config
/// stays in force.
fn reload_from(handle: &crate::server::ProxyHandle, file: Option<&Path>, flags: &Overrides) {
    let Some(file) = file else {
        tracing::info!("SIGHUP: no config file to reload (started without --config)");
        return;
    };
    let loaded = FileConfig::load(file).and_then(|f| f.resolve(flags.clone()));
    match loaded {
        Err(e) => {
            handle.reload_invalid();
            tracing::error!(error = %e, "reload refused: the config does not validate; the running one stays in force");
        }
        Ok(config) => match handle.reload(&config) {
            Ok(()) => tracing::info!(file = %file.display(), "reloaded the config"),
            Err(why) => tracing::error!(error = %why, "reload refused"),
        },
    }
}

/// `cipherbus reload --pid PID`: SIGHUP to a running proxy.
fn reload(pid: i32) -> ExitCode {
    let Some(target) = rustix::process::Pid::from_raw(pid) else {
        return fail(&format!("--pid {pid} is not a process id"));
    };
    match rustix::process::kill_process(target, rustix::process::Signal::HUP) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot signal process {pid}: {e}")),
    }
}

/// Raises the soft open-file limit to the hard one: each agent costs two descriptors, and the
/// common soft default of 1024 would turn agents away long before `max_connections`.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// `--check-config`: the config, and every root (the default one and each scope's): a file is
/// read; an HSM or KMS is asked, its key's type and permissions checked with a wrap and unwrap,
/// and the deployment seed unwrapped if there is one yet.
async fn check_config(config: &Config) -> ExitCode {
    let ups: Vec<String> = config.upstreams.iter().map(ToString::to_string).collect();
    let root = match check_root(config, &config.kek, config.policy.control_prefix()).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    println!(
        "config ok: listen {}, upstream {}, root {root}, aead {}",
        config.listen,
        ups.join(","),
        config.aead.describe()
    );
    for scope in &config.scopes {
        let prefix = scope.control_prefix(config.policy.control_prefix());
        match check_root(config, &scope.kek, &prefix).await {
            Ok(r) => println!(
                "scope {}: subjects {}, root {r}",
                scope.name,
                scope.subjects.join(" ")
            ),
            Err(e) => return fail(&format!("scope {:?}: {e}", scope.name)),
        }
    }
    ExitCode::SUCCESS
}

/// Proves one root usable, and describes it.
async fn check_root(config: &Config, kek: &KekUri, prefix: &str) -> Result<String, String> {
    if kek.is_file() {
        let root = crate::server::open_root(config, kek, prefix, false).await?;
        return Ok(format!(
            "{} (fingerprint {})",
            root.describe(),
            root.fingerprint()
        ));
    }
    let uri = kek.clone();
    let kek = crate::kek::blocking(|| {
        let kek = uri.open_kek()?;
        crate::kek::with_retry(crate::kek::seed::START_RETRY, || kek.check())?;
        Ok::<_, crate::kek::KekError>(kek)
    })
    .map_err(|e| e.to_string())?;
    match crate::server::open_root(config, &uri, prefix, false).await {
        Ok(root) => Ok(format!(
            "{} ({}) answers, wraps and unwraps; deployment fingerprint {}",
            root.describe(),
            root.kind(),
            root.fingerprint()
        )),
        Err(e) if e.contains(crate::kek::seed::NO_SEED) => Ok(format!(
            "{} ({}) answers, wraps and unwraps; no deployment seed yet (the first proxy or controller started with it creates one)",
            kek.describe(),
            kek.kind()
        )),
        Err(e) => Err(e),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(&format!("cannot start the runtime: {e}")))
}

fn controller(args: ControllerArgs) -> ExitCode {
    let flags = Overrides {
        listen: None,
        upstream: args.upstream,
        kek: args.kek,
        kek_file: args.kek_file,
        state_dir: args.state_dir,
        admin: args.admin,
        controller: true,
        ..upstream_overrides(args.upstream_tls)
    };
    let config_file = args.config.clone();
    let config = match load(args.config.as_deref(), flags.clone()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let root = match open_root(&config, true).await {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let mut handle = match crate::server::start_controller(config, root).await {
            Ok(h) => h,
            Err(e) => return fail(&e),
        };
        let code = serve(&mut handle, |h| {
            reload_from(h, config_file.as_deref(), &flags)
        })
        .await;
        handle.shutdown().await;
        code
    })
}

fn rotate(args: RotateArgs) -> ExitCode {
    use crate::control::message::Body;
    let body = match ask_authority(
        args.authority,
        crate::control::authority::rotate_subject,
        Body::RotateRequest {
            reason: args.reason,
        },
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match body {
        Body::RotateReply {
            epoch,
            acked,
            laggards,
            error: None,
        } => {
            println!("epoch {epoch} is active");
            println!(
                "acknowledged by {} proxies: {}",
                acked.len(),
                acked.join(", ")
            );
            if !laggards.is_empty() {
                println!("did not acknowledge in time: {}", laggards.join(", "));
            }
            ExitCode::SUCCESS
        }
        Body::RotateReply { error: Some(e), .. } => {
            eprintln!("cipherbus: rotation failed: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("cipherbus: the authority answered with something else");
            ExitCode::FAILURE
        }
    }
}

/// A connection for the operator commands, within `timeout`.
async fn connect(
    tls: &crate::tls::UpstreamFiles,
    upstreams: &[String],
    timeout: std::time::Duration,
) -> Result<async_nats::Client, String> {
    crate::tls::install_default_provider();
    let opts = tls
        .apply(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?;
    let connect = opts.name("cipherbus-cli").connect(upstreams.to_vec());
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("cannot reach the bus: {e}")),
        Err(_) => Err("cannot reach the bus in time".to_owned()),
    }
}

/// What the operator commands need to reach the bus.
struct Bus {
    timeout: std::time::Duration,
    upstreams: Vec<String>,
    root: Arc<Root>,
    tls: crate::tls::UpstreamFiles,
    prefix: String,
}

impl Bus {
    fn from_args(args: AuthorityArgs) -> Result<Self, ExitCode> {
        let timeout = crate::config::parse_duration(&args.timeout).ok_or_else(|| {
            fail(&format!(
                "--timeout {:?} is not a valid duration (examples: 30s, 2m)",
                args.timeout
            ))
        })?;
        let mut upstreams = Vec::new();
        let raw = if args.upstream.is_empty() {
            vec![crate::config::DEFAULT_UPSTREAM.to_owned()]
        } else {
            args.upstream
        };
        for entry in &raw {
            for url in entry.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let u = crate::config::parse_upstream(url).map_err(|e| fail(&e))?;
                let scheme = if u.tls { "tls" } else { "nats" };
                upstreams.push(format!("{scheme}://{u}"));
            }
        }
        let (uri, resolved_prefix) = match (args.resolved, args.kek, args.kek_file) {
            (Some((uri, prefix)), _, _) => (uri, Some(prefix)),
            (None, Some(k), _) => (KekUri::parse(&k).map_err(|e| fail(&e))?, None),
            (None, None, Some(f)) => (KekUri::File(f), None),
            (None, None, None) => return Err(fail(&"give --kek URI or --kek-file FILE")),
        };
        let t = args.tls;
        let tls = crate::tls::UpstreamFiles {
            ca: t.upstream_ca,
            cert: t.upstream_cert,
            key: t.upstream_key,
            first: t.upstream_tls_first,
            server_name: t.upstream_server_name,
        };
        let prefix = match &args.scope {
            _ if resolved_prefix.is_some() => resolved_prefix.unwrap_or_default(),
            None => args.control_prefix,
            Some(name) if name == crate::scope::DEFAULT_SCOPE => args.control_prefix,
            Some(name) => {
                let valid = !name.is_empty()
                    && name.len() <= crate::config::MAX_SCOPE_NAME
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !valid {
                    return Err(fail(&format!("--scope {name:?} is not a scope name")));
                }
                format!("{}.scope.{name}", args.control_prefix)
            }
        };
        // An HSM or KMS root needs the bus for its deployment seed.
        let root = runtime()?
            .block_on(async {
                if uri.is_file() {
                    return crate::kek::seed::open_root(&uri, None, "", false).await;
                }
                let client = connect(&tls, &upstreams, timeout).await?;
                crate::kek::seed::open_root(&uri, Some(&client), &prefix, false).await
            })
            .map_err(|e| fail(&e))?;
        Ok(Bus {
            timeout,
            upstreams,
            root,
            tls,
            prefix,
        })
    }

    async fn connect(&self) -> Result<async_nats::Client, String> {
        connect(&self.tls, &self.upstreams, self.timeout).await
    }

    /// The deployment's audit stream, verified.
    async fn audit_stream(&self) -> Result<crate::audit::Verified, String> {
        let client = self.connect().await?;
        let stream = crate::audit::stream::AuditStream::existing(&client, &self.prefix)
            .await
            .map_err(|e| e.to_string())?;
        let lines = stream.lines().await.map_err(|e| e.to_string())?;
        let key = crate::audit::AuditKey::from_root(&self.root);
        crate::audit::verify_lines(&key, &format!("stream {}", stream.name()), lines)
            .map_err(|e| e.to_string())
    }
}

fn audit_verify(file: Option<PathBuf>, stream: bool, args: AuthorityArgs) -> ExitCode {
    if file.is_none() && !stream {
        return fail(&"audit verify needs a FILE, --stream, or both");
    }
    let bus = match Bus::from_args(args) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let key = crate::audit::AuditKey::from_root(&bus.root);
    let from_file = match &file {
        Some(f) => match crate::audit::verify(f, &key) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("cipherbus: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let from_stream = if stream {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        match rt.block_on(bus.audit_stream()) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("cipherbus: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let stream_name = crate::audit::stream::stream_name(&bus.prefix);
    if let (Some(f), Some(s), Some(path)) = (&from_file, &from_stream, &file) {
        let file_name = path.display().to_string();
        let stream_name = format!("stream {stream_name}");
        if let Some(why) = crate::audit::compare(&file_name, f, &stream_name, s) {
            eprintln!("cipherbus: {why}");
            return ExitCode::FAILURE;
        }
    }
    if let (Some(v), Some(path)) = (&from_file, &file) {
        println!(
            "{}: {} entries, authenticated and chained (deployment {})",
            path.display(),
            v.entries,
            key.deployment()
        );
    }
    if let Some(v) = &from_stream {
        println!(
            "stream {stream_name}: {} entries, authenticated and chained (deployment {})",
            v.entries,
            key.deployment()
        );
    }
    if from_file.is_some() && from_stream.is_some() {
        println!("the file and the stream hold the same entries");
    }
    ExitCode::SUCCESS
}

fn audit_tail(from: u64, follow: bool, args: AuthorityArgs) -> ExitCode {
    use futures::StreamExt;
    let bus = match Bus::from_args(args) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result: Result<(), String> = rt.block_on(async {
        let client = bus.connect().await?;
        let stream = crate::audit::stream::AuditStream::existing(&client, &bus.prefix)
            .await
            .map_err(|e| e.to_string())?;
        let key = crate::audit::AuditKey::from_root(&bus.root);
        let name = format!("stream {}", stream.name());
        let mut chain = crate::audit::Chain::new(&key, name);
        // Checked from the first entry, so every printed line is known to follow its chain.
        let existing = stream.lines().await.map_err(|e| e.to_string())?;
        let mut next = 1u64;
        for line in existing {
            chain.check(&line).map_err(|e| e.to_string())?;
            if next >= from {
                println!("{}", String::from_utf8_lossy(&line));
            }
            next += 1;
        }
        if !follow {
            return Ok(());
        }
        let mut live = stream.follow(next).await.map_err(|e| e.to_string())?;
        while let Some(item) = live.next().await {
            let (seq, line) = item.map_err(|e| e.to_string())?;
            if seq != next {
                return Err(format!("expected entry {next}, the stream sent {seq}"));
            }
            chain.check(&line).map_err(|e| e.to_string())?;
            if seq >= from {
                println!("{}", String::from_utf8_lossy(&line));
            }
            next += 1;
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cipherbus: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ask_authority(
    args: AuthorityArgs,
    subject: impl FnOnce(&str) -> String,
    body: crate::control::message::Body,
) -> Result<crate::control::message::Body, ExitCode> {
    let Bus {
        timeout,
        upstreams,
        root,
        tls,
        prefix,
    } = Bus::from_args(args)?;
    let rt = runtime()?;
    let subject = subject(&prefix);
    let answer = rt.block_on(async {
        tokio::time::timeout(
            timeout,
            crate::control::authority::request(upstreams, &root, &tls, subject, body),
        )
        .await
    });
    match answer {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => {
            eprintln!("cipherbus: {e}");
            Err(ExitCode::FAILURE)
        }
        Err(_) => {
            eprintln!(
                "cipherbus: no answer from the key authority within {timeout:?}; is `cipherbus controller` or `run --controller` running on this bus?"
            );
            Err(ExitCode::FAILURE)
        }
    }
}

/// How long `status` waits for the authority (less with a shorter --timeout).
const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn status(args: AuthorityArgs, config: Option<&Path>, json: bool, watch: bool) -> ExitCode {
    use std::io::IsTerminal;
    // Each scope asked of its own authority under its own root.
    let mut scopes = Vec::new();
    match config {
        Some(file) => match every_scope(&args, file) {
            Ok(every) => {
                for (name, one) in every {
                    match Bus::from_args(one) {
                        Ok(b) => scopes.push((name.to_owned(), b)),
                        Err(code) => return code,
                    }
                }
            }
            Err(code) => return code,
        },
        None => {
            let name = args
                .scope
                .clone()
                .unwrap_or_else(|| crate::scope::DEFAULT_SCOPE.to_owned());
            match Bus::from_args(args) {
                Ok(b) => scopes.push((name, b)),
                Err(code) => return code,
            }
        }
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let terminal = std::io::stdout().is_terminal();
    rt.block_on(async {
        // Every scope is on the same bus: one connection asks them all.
        let client = match scopes[0].1.connect().await {
            Ok(c) => c,
            Err(e) => return fail(&e),
        };
        let mut sealers = Vec::new();
        for (_, bus) in &scopes {
            match crate::control::message::ControlSealer::new(
                crate::server::node_id("cli"),
                bus.root.control_key(),
            ) {
                Ok(s) => sealers.push(s),
                Err(e) => return fail(&e),
            }
        }
        loop {
            if watch && terminal && !json {
                // Home and clear: this look replaces the last one.
                print!("\x1b[H\x1b[2J");
            }
            let mut failed = false;
            for (i, ((name, bus), sealer)) in scopes.iter().zip(&mut sealers).enumerate() {
                let wait = bus.timeout.min(STATUS_WAIT);
                let control_key = bus.root.control_key();
                let look =
                    crate::status::look(&client, sealer, control_key, &bus.prefix, wait).await;
                if json {
                    println!("{}", crate::status::json(name, &bus.prefix, &look));
                } else {
                    if i > 0 {
                        println!();
                    }
                    print!("{}", crate::status::table(name, &bus.prefix, &look));
                }
                if let Some(e) = &look.error {
                    failed = true;
                    if !watch {
                        eprintln!("cipherbus: scope {name}: {e}");
                    }
                }
            }
            if !watch {
                return if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                };
            }
            if !json {
                println!();
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                _ = wait_for_signal() => return ExitCode::SUCCESS,
            }
        }
    })
}

fn rewrap(args: AuthorityArgs) -> ExitCode {
    use crate::control::message::Body;
    let body = match ask_authority(
        args,
        crate::control::authority::rewrap_subject,
        Body::RewrapRequest {},
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match body {
        Body::RewrapReply {
            rewrapped,
            seed,
            error: None,
        } => {
            println!(
                "{rewrapped} data keys{} wrapped again under the root's newest version; every proxy stores them as it applies the commit",
                if seed { " and the deployment seed" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Body::RewrapReply { error: Some(e), .. } => {
            eprintln!("cipherbus: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("cipherbus: the authority answered with something else");
            ExitCode::FAILURE
        }
    }
}

/// `migrate`: writes the file root's key, wrapped under the HSM or KMS root, as the
/// deployment seed. Refused where the deployment has a seed already.
fn migrate(from: PathBuf, args: AuthorityArgs) -> ExitCode {
    let Some(kek) = args.kek.clone() else {
        return fail(&"migrate needs --kek URI: the HSM or KMS root to move to");
    };
    let uri = match KekUri::parse(&kek) {
        Ok(KekUri::File(_)) => return fail(&"--kek must name an HSM or KMS root, not a file"),
        Ok(u) => u,
        Err(e) => return fail(&e),
    };
    use crate::keyring::source::RootKeySource;
    let old = match crate::keyring::source::KekFile(from.clone()).load() {
        Ok(k) => k,
        Err(e) => return fail(&e),
    };
    // The operator commands' plumbing, with the file root to reach the bus.
    let bus = match Bus::from_args(AuthorityArgs {
        kek: None,
        kek_file: Some(from),
        ..args
    }) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let done: Result<String, String> = rt.block_on(async {
        let kek = crate::kek::blocking(|| {
            let kek = uri.open_kek()?;
            kek.check()?;
            Ok::<_, crate::kek::KekError>(kek)
        })
        .map_err(|e| e.to_string())?;
        let seed = crate::kek::blocking(|| {
            crate::kek::seed::WrappedSeed::wrap(&*kek, &old, true, &bus.prefix)
        })
        .map_err(|e| e.to_string())?;
        let client = bus.connect().await?;
        if let Some((existing, _)) = crate::kek::seed::read(&client, &bus.prefix)
            .await
            .unwrap_or(None)
        {
            return Err(format!(
                "the deployment has a seed already (fingerprint {}); nothing to migrate",
                existing.fingerprint
            ));
        }
        crate::kek::seed::store(&client, &bus.prefix, &seed, None).await?;
        Ok(seed.fingerprint)
    });
    match done {
        Ok(fingerprint) => {
            println!(
                "the file root (fingerprint {fingerprint}) is now the deployment seed, wrapped under {}; restart the proxies with --kek, then the controller, then run `cipherbus rewrap`",
                uri.describe()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn keys(args: AuthorityArgs) -> ExitCode {
    use crate::control::message::Body;
    let body = match ask_authority(
        args,
        crate::control::authority::keys_subject,
        Body::KeysRequest {},
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let Body::KeysReply { epochs } = body else {
        eprintln!("cipherbus: the authority answered with something else");
        return ExitCode::FAILURE;
    };
    println!(
        "{:>6}  {:<9}  {:<16}  {:<24}  {:<24}  {:>10}",
        "EPOCH", "STATE", "FINGERPRINT", "CREATED", "ACTIVATED", "SEALED"
    );
    for e in epochs {
        let state = serde_json::to_value(e.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "{:>6}  {:<9}  {:<16}  {:<24}  {:<24}  {:>10}",
            e.epoch,
            state,
            e.fingerprint,
            crate::audit::rfc3339(e.created, 0),
            e.activated
                .map(|t| crate::audit::rfc3339(t, 0))
                .unwrap_or_else(|| "-".into()),
            e.sealed_messages
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    ExitCode::SUCCESS
}

/// The default scope and every `[[scope]]` of a config file, each with the arguments that
/// reach its own authority under its own root.
fn every_scope(
    args: &AuthorityArgs,
    file: &Path,
) -> Result<Vec<(&'static str, AuthorityArgs)>, ExitCode> {
    let flags = Overrides {
        upstream: args.upstream.clone(),
        ..Default::default()
    };
    let config = load(Some(file), flags)?;
    let prefix = config.policy.control_prefix().to_owned();
    let mut every = vec![(
        crate::scope::DEFAULT_SCOPE,
        config.kek.clone(),
        prefix.clone(),
    )];
    for scope in &config.scopes {
        every.push((scope.name, scope.kek.clone(), scope.control_prefix(&prefix)));
    }
    Ok(every
        .into_iter()
        .map(|(name, kek, prefix)| {
            let one = AuthorityArgs {
                resolved: Some((kek, prefix)),
                ..args.clone()
            };
            (name, one)
        })
        .collect())
}

/// `keys --config FILE`: the epochs of the default scope and of every `[[scope]]` in the file,
/// each asked of its own authority under its own root.
fn keys_of_every_scope(args: AuthorityArgs, file: &Path) -> ExitCode {
    let every = match every_scope(&args, file) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let mut code = ExitCode::SUCCESS;
    for (i, (name, one)) in every.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("scope {name}");
        if keys(one) != ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    code
}

fn revoke(epoch: u32, args: AuthorityArgs, reason: String) -> ExitCode {
    use crate::control::message::Body;
    let body = match ask_authority(
        args,
        crate::control::authority::revoke_subject,
        Body::RevokeRequest { epoch, reason },
    ) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match body {
        Body::RevokeReply {
            active,
            error: None,
        } => {
            println!("epoch {epoch} is destroyed everywhere; epoch {active} is active");
            ExitCode::SUCCESS
        }
        Body::RevokeReply { error: Some(e), .. } => {
            eprintln!("cipherbus: revoke failed: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("cipherbus: the authority answered with something else");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
