//! The `cipherbus` binary: the command line and the benchmark harness, on top of the library.
//!
//! Both live here rather than in the library so that no module of the proxy can reach them:
//! `bench` is below `cli`, and the layer test holds these two to that order as it holds the
//! library's modules to theirs.

mod bench;
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
