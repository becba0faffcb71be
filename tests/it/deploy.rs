//! The files in `deploy/`: the systemd unit is hardened, `systemd-analyze verify` accepts it,
//! and the command line it runs is one the proxy accepts.

use std::process::Command;

use crate::support::*;

/// Debian 12's systemd (pinned in `tests/it/support/debian-pins`), which ships `systemd-analyze`.
fn systemd_analyze() -> &'static str {
    clients::debian_install(&["systemd"]);
    "/usr/bin/systemd-analyze"
}

const UNIT: &str = include_str!("../../deploy/systemd/cipherbus.service");

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let settings: Vec<(&str, &str)> = UNIT
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let value = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect()
    };
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("User", "cipherbus"),
        ("StateDirectory", "cipherbus"),
        ("StateDirectoryMode", "0700"),
        ("CapabilityBoundingSet", ""),
        ("RestartPreventExitStatus", "2"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert_eq!(value(key), [want], "{key}");
    }
    let exec = value("ExecStart");
    assert_eq!(exec.len(), 1);
    let exec = exec[0];
    for secret in ["--kek", "pin", "token", "VAULT_TOKEN="] {
        assert!(
            !exec.contains(secret),
            "a secret on the command line: {exec}"
        );
    }

    // The unit as installed, with the binary under test in place of /usr/local/bin/cipherbus:
    // verify checks that the command exists and every setting is known.
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_cipherbus");
    let unit = dir.path().join("cipherbus.service");
    std::fs::write(&unit, UNIT.replace("/usr/local/bin/cipherbus", bin)).unwrap();
    let out = Command::new(systemd_analyze())
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("run systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("cipherbus.service"),
        "warnings about the unit: {text}"
    );

    // Its command line, with the config and state directory moved here, passes --check-config.
    let kek = write_kek(dir.path(), TEST_KEK);
    let config = dir.path().join("cipherbus.toml");
    std::fs::write(
        &config,
        format!("kek_file = {:?}\n", kek.display().to_string()),
    )
    .unwrap();
    let state = dir.path().join("state");
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|a| {
            a.replace("/etc/cipherbus/cipherbus.toml", config.to_str().unwrap())
                .replace("/var/lib/cipherbus", state.to_str().unwrap())
        })
        .collect();
    let out = Command::new(bin)
        .args(&args)
        .arg("--check-config")
        .output()
        .expect("run cipherbus");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("config ok"));
}
