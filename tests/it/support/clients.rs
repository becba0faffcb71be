//! The pinned NATS clients of other languages, installed on first use and shared by the test
//! binaries: nats.js from npm, nats.c and nats.go from Debian, nats-py from PyPI (see
//! [`super::nats_py_path`]). Each one's test program lives in `tests/clients/<lang>/`.
//!
//! Everything a client needs goes under `target/tools/`, except the Debian packages, which
//! `apt-get` installs at the upstream versions pinned in `tests/it/support/debian-pins` (the tests
//! run as root, as CI does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `@nats-io/transport-node`, `@nats-io/jetstream` and `@nats-io/kv`, as pinned in
/// `tests/clients/js/package-lock.json`.
pub const NATS_JS_VERSION: &str = "3.4.0";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn tools() -> PathBuf {
    root().join("target/tools")
}

/// Runs `f` once across every test process: the first to take the lock directory `name` does
/// the work, the others wait until `done()` holds.
pub(crate) fn once_across_processes(name: &str, done: impl Fn() -> bool, f: impl FnOnce()) {
    if done() {
        return;
    }
    std::fs::create_dir_all(tools()).expect("create target/tools");
    let lock = tools().join(format!("{name}.lock"));
    let start = Instant::now();
    while std::fs::create_dir(&lock).is_err() {
        if done() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "timed out waiting for another test to finish {name} ({} exists)",
            lock.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Released even if `f` panics, so a failed install does not stall the other tests.
    struct Unlock(PathBuf);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unlock = Unlock(lock);
    if !done() {
        f();
    }
}

pub(crate) fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs Debian packages at the upstream versions pinned in `tests/it/support/debian-pins`,
/// whatever build of each the archive carries now, once, serialised across test processes
/// because apt takes one lock for the whole system. `tests/it/support/debian.py` refreshes the
/// package lists first when they are over an hour old, checks the installed upstream versions
/// and prints the exact builds into the test output.
pub(crate) fn debian_install(packages: &[&str]) {
    let script = root().join("tests/it/support/debian.py");
    let debian = |verb: &str| {
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg(verb).args(packages);
        cmd
    };
    let installed = || {
        debian("installed")
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    once_across_processes("apt", installed, || {
        let out = debian("install")
            .output()
            .expect("run tests/it/support/debian.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    });
    // Its stderr is the process's own, so the builds show in the test output uncaptured.
    let out = debian("installed")
        .status()
        .expect("run tests/it/support/debian.py");
    assert!(
        out.success(),
        "{packages:?} installed but not at their pins"
    );
}

/// A copy of `tests/clients/<lang>` under `target/tools/clients-<lang>`, refreshed when a
/// source file changed, so builds and `node_modules` stay out of the source tree.
fn workdir(lang: &str) -> PathBuf {
    let src = root().join("tests/clients").join(lang);
    let dst = tools().join(format!("clients-{lang}"));
    std::fs::create_dir_all(&dst).expect("create the client's work directory");
    for entry in std::fs::read_dir(&src).expect("tests/clients/<lang> exists") {
        let entry = entry.expect("read tests/clients/<lang>");
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let to = dst.join(entry.file_name());
        let new = std::fs::read(entry.path()).expect("read a client source file");
        if std::fs::read(&to).ok().as_deref() != Some(&new[..]) {
            // Written whole under a temporary name, so a reader never sees half a file.
            let tmp = dst.join(format!(".{}.tmp", std::process::id()));
            std::fs::write(&tmp, &new).expect("copy a client source file");
            std::fs::rename(&tmp, &to).expect("copy a client source file");
        }
    }
    dst
}

/// The nats.js test program, ready to run with `node`: its directory, with `node_modules`
/// installed from the committed lock file.
pub fn nats_js() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = workdir("js");
        let lock = std::fs::read(dir.join("package-lock.json")).expect("package-lock.json");
        let stamp = dir.join("node_modules/.installed-lock");
        once_across_processes(
            "clients-js",
            || std::fs::read(&stamp).ok().as_deref() == Some(&lock[..]),
            || {
                run(
                    Command::new("npm")
                        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                        .current_dir(&dir),
                    "npm ci (nats.js)",
                );
                std::fs::write(&stamp, &lock).expect("stamp node_modules");
            },
        );
        dir
    })
    .clone()
}

/// The nats.c test program, built against Debian's libnats.
pub fn nats_c() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let header = Path::new("/usr/include/nats/nats.h");
        debian_install(&["libnats-dev", "pkg-config", "gcc"]);
        assert!(
            header.exists(),
            "libnats-dev installed without {}",
            header.display()
        );
        let dir = workdir("c");
        let bin = dir.join("matrix");
        let source = dir.join("matrix.c");
        once_across_processes(
            "clients-c",
            || newer(&bin, &source),
            || {
                let tmp = dir.join(format!("matrix.{}", std::process::id()));
                run(
                    Command::new("gcc")
                        .args(["-O1", "-Wall", "-Werror", "-o"])
                        .arg(&tmp)
                        .arg(&source)
                        .args(["-lnats", "-lpthread"]),
                    "gcc (nats.c)",
                );
                std::fs::rename(&tmp, &bin).expect("install the nats.c program");
            },
        );
        bin
    })
    .clone()
}

/// The nats.go test program, built offline in GOPATH mode against Debian's Go sources.
pub fn nats_go() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        debian_install(&["golang-go", "golang-github-nats-io-go-nats-dev"]);
        let src = workdir("go");
        let gopath = tools().join("gopath");
        let pkg = gopath.join("src/cbmatrix");
        let bin = tools().join("clients-go/matrix");
        once_across_processes(
            "clients-go",
            || newer(&bin, &src.join("main.go")),
            || {
                std::fs::create_dir_all(&pkg).expect("create the GOPATH package");
                std::fs::copy(src.join("main.go"), pkg.join("main.go")).expect("copy main.go");
                let tmp = src.join(format!("matrix.{}", std::process::id()));
                run(
                    Command::new("go")
                        .args(["build", "-o"])
                        .arg(&tmp)
                        .arg("cbmatrix")
                        .env("GO111MODULE", "off")
                        .env("GOFLAGS", "")
                        .env("GOPROXY", "off")
                        .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
                        .env("GOCACHE", tools().join("gocache")),
                    "go build (nats.go)",
                );
                std::fs::rename(&tmp, &bin).expect("install the nats.go program");
            },
        );
        bin
    })
    .clone()
}

/// Whether `built` exists and is at least as new as `source`.
fn newer(built: &Path, source: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(built), modified(source)), (Some(b), Some(s)) if b >= s)
}
