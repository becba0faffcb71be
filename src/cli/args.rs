//! The command line's grammar: every command, its flags and their help, as clap reads them.

use super::*;

#[derive(Debug, Parser)]
#[command(
    name = "cipherbus",
    version,
    about = "Transparent encrypting proxy for NATS"
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
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
pub(super) struct BenchArgs {
    /// Payload sizes (examples: 128, 1KiB, 16KiB).
    #[arg(long, value_delimiter = ',', default_value = "128,1KiB,16KiB,256KiB")]
    pub(super) sizes: Vec<String>,
    /// Publishing agents (all behind the publisher-side proxy).
    #[arg(long, default_value_t = 1)]
    pub(super) pubs: usize,
    /// Subscribing agents (all behind the subscriber-side proxy); each gets every message.
    #[arg(long, default_value_t = 1)]
    pub(super) subs: usize,
    /// Messages per throughput run, instead of --duration.
    #[arg(long)]
    pub(super) count: Option<u64>,
    /// How long each throughput run publishes.
    #[arg(long, value_name = "DUR", default_value = "3s")]
    pub(super) duration: String,
    /// Throughput runs per path and size; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub(super) rounds: usize,
    /// Messages per second in the latency runs (capped at half the slowest path's
    /// throughput); 0 skips them.
    #[arg(long, default_value_t = 10_000)]
    pub(super) rate: u64,
    /// How long each latency run lasts.
    #[arg(long, value_name = "DUR", default_value = "3s")]
    pub(super) latency_duration: String,
    /// Which paths to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,forwarder,cipherbus"
    )]
    pub(super) paths: Vec<crate::bench::PathKind>,
    /// Also measure the proxy's memory with this many idle agent connections.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(super) idle_connections: usize,
    /// Also measure cipherbus while its key authority rotates at this interval (example: 1s).
    #[arg(long, value_name = "DUR")]
    pub(super) rotate_every: Option<String>,
    /// The proxies' root key: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH
    /// [default: a key file made for the run]. An HSM or KMS root must exist (`keygen --kek`);
    /// the proxies inherit this environment (VAULT_*, SOFTHSM2_CONF, AWS_*), and the bench's
    /// nats-server then runs with JetStream for the deployment seed.
    #[arg(long, value_name = "URI")]
    pub(super) kek: Option<String>,
    /// The nats-server binary [default: $CIPHERBUS_NATS_SERVER, PATH, or target/tools].
    #[arg(long, value_name = "FILE")]
    pub(super) nats_server: Option<PathBuf>,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
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
pub(super) struct RunArgs {
    /// TOML config file; flags override its settings.
    #[arg(long, value_name = "FILE")]
    pub(super) config: Option<PathBuf>,
    /// Address agents connect to [default: 127.0.0.1:4333].
    #[arg(long, value_name = "ADDR")]
    pub(super) listen: Option<String>,
    /// Upstream NATS server; repeat it or give a comma list for a cluster
    /// [default: nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    pub(super) upstream: Vec<String>,
    /// Where the root key is: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH.
    #[arg(long, value_name = "URI")]
    pub(super) kek: Option<String>,
    /// Same as --kek file:FILE.
    #[arg(long, value_name = "FILE")]
    pub(super) kek_file: Option<PathBuf>,
    /// Directory for wrapped data keys and keyring state.
    #[arg(long, value_name = "DIR")]
    pub(super) state_dir: Option<PathBuf>,
    /// Serve /metrics and /healthz on this address.
    #[arg(long, value_name = "ADDR")]
    pub(super) admin: Option<String>,
    /// Host the key authority in this proxy (needs --state-dir).
    #[arg(long)]
    pub(super) controller: bool,
    #[command(flatten)]
    pub(super) tls: TlsArgs,
    #[command(flatten)]
    pub(super) upstream_tls: UpstreamTlsArgs,
    /// AEAD code for envelopes under 4 KiB: audited (aws-lc-rs) or batched (hand-written
    /// AVX-512, opt-in) [default: audited].
    #[arg(long, value_name = "BACKEND")]
    pub(super) aead: Option<String>,
    /// Check the config and the root key, print a summary, and exit.
    #[arg(long)]
    pub(super) check_config: bool,
}

/// TLS for agents connecting to the proxy.
#[derive(Debug, Args)]
pub(super) struct TlsArgs {
    /// PEM certificate chain the listener presents.
    #[arg(long, value_name = "FILE")]
    pub(super) tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, value_name = "FILE")]
    pub(super) tls_key: Option<PathBuf>,
    /// Require agents to present a certificate signed by this CA (mTLS).
    #[arg(long, value_name = "FILE")]
    pub(super) tls_client_ca: Option<PathBuf>,
    /// required | optional | first | auto [default: required].
    #[arg(long, value_name = "MODE")]
    pub(super) tls_mode: Option<cipherbus::tls::AgentTlsMode>,
}

/// TLS towards the upstream servers.
#[derive(Debug, Clone, Args)]
pub(super) struct UpstreamTlsArgs {
    /// CA that signs the upstream servers' certificates.
    #[arg(long, value_name = "FILE")]
    pub(super) upstream_ca: Option<PathBuf>,
    /// Client certificate for servers with `verify`.
    #[arg(long, value_name = "FILE")]
    pub(super) upstream_cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, value_name = "FILE")]
    pub(super) upstream_key: Option<PathBuf>,
    /// Handshake before the server's INFO (servers with `handshake_first`).
    #[arg(long)]
    pub(super) upstream_tls_first: bool,
    /// The name to verify in the server's certificate [default: the upstream URL's host].
    #[arg(long, value_name = "NAME")]
    pub(super) upstream_server_name: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct ControllerArgs {
    /// TOML config file; flags override its settings.
    #[arg(long, value_name = "FILE")]
    pub(super) config: Option<PathBuf>,
    /// Upstream NATS server; repeat it or give a comma list.
    #[arg(long, value_name = "URL")]
    pub(super) upstream: Vec<String>,
    /// Where the root key is: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH.
    #[arg(long, value_name = "URI")]
    pub(super) kek: Option<String>,
    /// Same as --kek file:FILE.
    #[arg(long, value_name = "FILE")]
    pub(super) kek_file: Option<PathBuf>,
    /// Directory for wrapped data keys, keyring state and the audit log.
    #[arg(long, value_name = "DIR")]
    pub(super) state_dir: Option<PathBuf>,
    /// Serve /metrics and /healthz on this address.
    #[arg(long, value_name = "ADDR")]
    pub(super) admin: Option<String>,
    #[command(flatten)]
    pub(super) upstream_tls: UpstreamTlsArgs,
}

/// How to reach the key authority.
#[derive(Debug, Clone, Args)]
pub(super) struct AuthorityArgs {
    /// A NATS server of the bus the authority is on [default: nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    pub(super) upstream: Vec<String>,
    /// Where the root key is: pkcs11:..., vault-transit:NAME, aws-kms:KEY or file:PATH.
    #[arg(long, value_name = "URI", conflicts_with = "kek_file")]
    pub(super) kek: Option<String>,
    /// Same as --kek file:FILE.
    #[arg(long, value_name = "FILE")]
    pub(super) kek_file: Option<PathBuf>,
    /// A root and control prefix taken from a config file rather than the flags.
    #[arg(skip)]
    pub(super) resolved: Option<(KekUri, String)>,
    /// Prefix of the control subjects.
    #[arg(long, value_name = "P", default_value = cipherbus::policy::DEFAULT_CONTROL_PREFIX)]
    pub(super) control_prefix: String,
    /// The key scope, a `[[scope]]` name; --kek is then that scope's root [default: the default
    /// scope, whose root is the top-level kek].
    #[arg(long, value_name = "NAME")]
    pub(super) scope: Option<String>,
    /// How long to wait for the authority (examples: 10s, 2m).
    #[arg(long, value_name = "DUR", default_value = "30s")]
    pub(super) timeout: String,
    #[command(flatten)]
    pub(super) tls: UpstreamTlsArgs,
}

#[derive(Debug, Args)]
pub(super) struct RotateArgs {
    #[command(flatten)]
    pub(super) authority: AuthorityArgs,
    /// Why, for the audit log.
    #[arg(long, default_value = "operator request")]
    pub(super) reason: String,
}
