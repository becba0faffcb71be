//! The `cipherbus` binary: everything lives in the library's [`cipherbus::cli`].

fn main() -> std::process::ExitCode {
    cipherbus::cli::main()
}
