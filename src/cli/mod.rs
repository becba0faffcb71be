//! The command line: `keygen`, `run`, `controller`, `rotate`, `keys`, `revoke`, `audit` and
//! `bench`.
//!
//! This module owns argument parsing, logging setup and exit codes. Startup errors (bad config,
//! bad key file, bad address) print one sentence and exit with code 2. It lives in the binary,
//! above the library, and reaches the proxy only through the library's public API.
//!
//! - `args`: the grammar (commands and flags);
//! - `proxy`: `keygen`, `run`, `controller`, `reload`;
//! - `operator`: `rotate`, `keys`, `status`, `rewrap`, `migrate`, `revoke`;
//! - `audit`: `audit verify`, `audit tail`;
//! - `bench`: `bench` and `forward`, handed to the harness in `crate::bench`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use cipherbus::config::{Config, FileConfig, Overrides};
use cipherbus::kek::file::write_new_kek;
use cipherbus::kek::{KekUri, Root};

mod args;
mod proxy;
mod operator;
mod audit;
mod bench;

use args::*;
use audit::*;
use bench::*;
use operator::*;
use proxy::*;

/// Exit code for anything wrong with how cipherbus was started.
pub const EXIT_USAGE: u8 = 2;

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

/// Reads the config file, applies the flags and validates.
fn load(config: Option<&Path>, flags: Overrides) -> Result<Config, ExitCode> {
    let file = match config {
        Some(path) => FileConfig::load(path).map_err(|e| fail(&e))?,
        None => FileConfig::default(),
    };
    file.resolve(flags).map_err(|e| fail(&e))
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(&format!("cannot start the runtime: {e}")))
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
