//! The README's first command: the demo runs to the end within 90 s and shows what it promises.
//! The epoch advances across a rotation with nothing lost, a read of what JetStream stored under
//! a revoked epoch is refused, counted and audited, and both audit logs verify.
//!
//! `cargo test` builds the example beside the test binaries; this runs that binary.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const TIMEOUT: Duration = Duration::from_secs(90);

/// `target/<profile>/examples/demo`, next to `target/<profile>/deps/<this test>`.
fn demo_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    profile.join("examples").join("demo")
}

/// The newest modification time of the files the demo is built from.
fn newest_source() -> SystemTime {
    fn walk(path: &Path, newest: &mut SystemTime) {
        if let Ok(dir) = std::fs::read_dir(path) {
            for entry in dir.flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(modified) = std::fs::metadata(path).and_then(|m| m.modified()) {
            *newest = (*newest).max(modified);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest = SystemTime::UNIX_EPOCH;
    for part in [
        "src",
        "examples/demo.rs",
        "tests/it/support",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        walk(&root.join(part), &mut newest);
    }
    newest
}

/// Runs the demo; its exit status and stdout (stderr is passed through).
fn run_demo() -> (std::process::ExitStatus, String) {
    let bin = demo_bin();
    let built = std::fs::metadata(&bin).and_then(|m| m.modified());
    // `cargo test --test it` alone does not build examples: a missing or older binary would
    // test something other than the code here.
    assert!(
        built.as_ref().is_ok_and(|t| *t >= newest_source()),
        "the demo example at {} is missing or older than its sources: build it with \
         `cargo build --example demo` (plain `cargo test` builds it too)",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .env_remove("CIPHERBUS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let mut pipe = child.stdout.take().expect("stdout piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = pipe.read_to_string(&mut out);
        out
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let out = reader.join().unwrap_or_default();
            panic!("the demo did not finish within {TIMEOUT:?}; it printed:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().expect("read the demo's output"))
}

/// The first line of `out` containing `part`.
fn line<'a>(out: &'a str, part: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(part))
        .unwrap_or_else(|| panic!("no line with {part:?} in the demo's output:\n{out}"))
}

/// The numbers in `text`, in order.
fn numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[test]
fn the_demo_rotates_without_loss_shreds_on_revoke_and_verifies_its_audit() {
    let (status, out) = run_demo();
    assert!(status.success(), "the demo failed ({status}):\n{out}");

    let advanced = line(&out, "epoch advanced");
    let (_, arrow) = advanced.split_once("epoch advanced").unwrap();
    let epochs = numbers(arrow);
    assert!(
        epochs.len() == 2 && epochs[1] > epochs[0],
        "the observer sees the epoch advance: {advanced}"
    );
    let lost = numbers(line(&out, "nothing lost:"));
    assert!(
        lost.len() == 2 && lost[0] > 0 && lost[0] == lost[1],
        "published equals received across the rotation: {lost:?}\n{out}"
    );

    let revoked = numbers(line(&out, "destroyed everywhere"))[0];
    let refused = line(&out, "read through B     refused");
    assert!(refused.contains("cannot open it"), "{refused}");
    assert!(
        line(&out, "proxy B counted")
            .ends_with("cipherbus_open_failures_total{reason=\"destroyed\"} 1"),
        "{out}"
    );
    let audited = line(&out, "proxy B audited");
    assert!(
        audited.contains(&format!("refused, epoch {revoked}:"))
            && audited.contains(&format!("read refused: epoch {revoked} is destroyed")),
        "{audited}"
    );

    assert!(
        line(&out, "proxy A (key authority)").contains("authenticated and chained"),
        "{out}"
    );
    for event in ["revoked", "destroyed"] {
        let listed = out.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.get(1) == Some(&event) && words.get(3) == Some(&revoked.to_string().as_str())
        });
        assert!(
            listed,
            "the authority's audit lists {event} epoch {revoked}:\n{out}"
        );
    }
    assert!(
        line(&out, "audit verify:").contains("both logs intact"),
        "{out}"
    );
}
