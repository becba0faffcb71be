//! The audit trail against a real nats-server with JetStream: the key authority keeps every
//! entry in its file and in a stream that refuses deletes and purges, `audit verify` reports a
//! cut tail or an older copy of the file against the stream, a lost file comes back from the
//! stream, and a key event the stream cannot record does not happen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use cipherbus::envelope::RootKey;

const PREFIX: &str = "cipherbus.ctl";
const FAST: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"5s\"\n";

async fn rotate(server: &NatsServer, reason: &str) -> Result<u32, String> {
    cipherbus::control::authority::request_rotation(
        vec![server.url()],
        &cipherbus::kek::Root::from_key(&RootKey::from_bytes(TEST_KEK)),
        PREFIX,
        reason,
    )
    .await
    .map(|r| r.epoch)
}

/// `cipherbus audit ARGS --kek-file KEK --upstream URL`: (success, stdout, stderr).
fn audit_cli(server: &NatsServer, kek: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cipherbus"))
        .arg("audit")
        .args(args)
        .arg("--kek-file")
        .arg(kek)
        .args(["--upstream", &server.url(), "--timeout", "5s"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Deployment {
    server: NatsServer,
    state: tempfile::TempDir,
    kek: PathBuf,
    authority: Option<cipherbus::server::ProxyHandle>,
}

impl Deployment {
    async fn start() -> Self {
        let server = NatsServer::start();
        let state = tempfile::tempdir().unwrap();
        let kek = write_kek(state.path(), TEST_KEK);
        let authority = proxy_full(&server, FAST, TEST_KEK, Some(state.path()), true).await;
        let d = Deployment {
            server,
            state,
            kek,
            authority: Some(authority),
        };
        // The authority listens for others for two heartbeats before it serves.
        tokio::time::sleep(Duration::from_millis(700)).await;
        d
    }

    fn file(&self) -> PathBuf {
        self.state.path().join("audit.jsonl")
    }

    async fn restart_authority(&mut self) {
        if let Some(a) = self.authority.take() {
            a.shutdown().await;
        }
        let a = proxy_full(&self.server, FAST, TEST_KEK, Some(self.state.path()), true).await;
        self.authority = Some(a);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    fn metric(&self, series: &str) -> f64 {
        metric(self.authority.as_ref().unwrap(), series)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_event_is_in_the_stream_which_keeps_it_and_vouches_for_the_file() {
    let d = Deployment::start().await;
    assert_eq!(rotate(&d.server, "first").await, Ok(2));
    let after_one = lines(&d.file());
    assert_eq!(rotate(&d.server, "second").await, Ok(3));
    let file = d.file();
    let full = lines(&file);
    assert!(
        full.len() >= 8,
        "generated, staged, activated, retired twice: {full:?}"
    );

    // The file and the stream agree, entry for entry.
    let (ok, stdout, stderr) =
        audit_cli(&d.server, &d.kek, &["verify", path_str(&file), "--stream"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("the file and the stream hold the same entries"),
        "{stdout}"
    );
    let (ok, tail, stderr) = audit_cli(&d.server, &d.kek, &["tail", "--no-follow"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        tail.lines().collect::<Vec<_>>(),
        full,
        "tail prints the stream as stored"
    );

    // The server refuses to remove anything from the stream.
    let observer = observer(&d.server).await;
    let js = async_nats::jetstream::new(observer);
    let mut stream = js
        .get_stream(cipherbus::audit::stream::stream_name(PREFIX))
        .await
        .unwrap();
    assert!(
        stream.delete_message(1).await.is_err(),
        "deletes are denied"
    );
    assert!(stream.purge().await.is_err(), "purges are denied");
    let info = stream.info().await.unwrap();
    assert!(info.config.deny_delete && info.config.deny_purge);
    assert_eq!(info.state.messages, full.len() as u64);

    // A cut tail verifies on its own (a shorter chain), but not against the stream.
    write_lines(&file, &full[..full.len() - 2]);
    let (ok, _, stderr) = audit_cli(&d.server, &d.kek, &["verify", path_str(&file)]);
    assert!(ok, "the file alone cannot show a cut tail: {stderr}");
    let (ok, _, stderr) = audit_cli(&d.server, &d.kek, &["verify", path_str(&file), "--stream"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "ends at entry {} but stream {} goes on to entry {}",
            full.len() - 2,
            cipherbus::audit::stream::stream_name(PREFIX),
            full.len()
        )),
        "{stderr}"
    );

    // A replayed older copy of the file: the same.
    write_lines(&file, &after_one);
    let (ok, _, stderr) = audit_cli(&d.server, &d.kek, &["verify", path_str(&file), "--stream"]);
    assert!(!ok);
    assert!(
        stderr.contains("its tail was cut, or it is an older copy"),
        "{stderr}"
    );

    // A rewritten entry, even one re-chained: reported at that entry.
    let mut edited = full.clone();
    edited[2] = edited[2].replacen("\"reason\":\"", "\"reason\":\"x", 1);
    write_lines(&file, &edited);
    let (ok, _, stderr) = audit_cli(&d.server, &d.kek, &["verify", path_str(&file), "--stream"]);
    assert!(!ok);
    assert!(stderr.contains("entry 3: MAC does not match"), "{stderr}");
    write_lines(&file, &full);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_audit_file_comes_back_from_the_stream_when_the_authority_restarts() {
    let mut d = Deployment::start().await;
    assert_eq!(rotate(&d.server, "before the loss").await, Ok(2));
    let before = lines(&d.file());
    std::fs::remove_file(d.file()).unwrap();
    d.restart_authority().await;
    assert_eq!(
        lines(&d.file()),
        before,
        "the file is restored from the stream"
    );
    assert_eq!(rotate(&d.server, "after the loss").await, Ok(3));
    let (ok, stdout, stderr) = audit_cli(
        &d.server,
        &d.kek,
        &["verify", path_str(&d.file()), "--stream"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("the same entries"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_the_audit_stream_cannot_record_does_not_happen() {
    let d = Deployment::start().await;
    let proxy = proxy_with(&d.server, FAST, TEST_KEK).await;
    assert_eq!(rotate(&d.server, "while the stream is there").await, Ok(2));
    let before = lines(&d.file());

    // The stream goes away (an operator deletes it): the next key event cannot be recorded.
    let js = async_nats::jetstream::new(observer(&d.server).await);
    js.delete_stream(cipherbus::audit::stream::stream_name(PREFIX))
        .await
        .unwrap();
    let err = rotate(&d.server, "without a stream")
        .await
        .expect_err("refused");
    assert!(
        err.contains("rotation refused: the audit trail cannot record it"),
        "{err}"
    );
    assert_eq!(
        d.metric("cipherbus_rotations_refused_total{reason=\"audit\"}"),
        1.0
    );
    assert!(d.metric("cipherbus_audit_failures_total{reason=\"stream\"}") >= 1.0);
    // Nothing moved: epoch 2 still seals everywhere, and no epoch 3 was staged anywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in [d.authority.as_ref().unwrap(), &proxy] {
        let snap = p.keyring.snapshot();
        assert_eq!(snap.active.epoch, 2);
        assert_eq!(snap.state(3), None, "epoch 3 was never staged");
    }
    // The refused attempt is in the file, first, as `generated`: recorded, and not carried out.
    let after = lines(&d.file());
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    assert!(after[before.len()].contains("\"event\":\"generated\""));
}

/// Sends the stream what `log` holds that it has not confirmed, as the authority does.
async fn flush(
    stream: &cipherbus::audit::stream::AuditStream,
    log: &cipherbus::audit::AuditLog,
) -> Result<(), cipherbus::audit::AuditError> {
    while let Some((seq, line)) = log.next_pending() {
        stream.append(seq, &line).await?;
        log.confirmed(seq);
    }
    Ok(())
}

/// The fencing the audit stream gives: two authorities that both believe they hold the role
/// (a split) each read the stream, then record `generated` for the next epoch. The server takes
/// only the first (it checks the last sequence); the second, reading the stream again, sees
/// that epoch taken and would generate the one after it. So no epoch is generated twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorities_cannot_both_generate_one_epoch() {
    use cipherbus::audit::stream::AuditStream;
    use cipherbus::audit::{verify_lines, AuditLog, Event, EventKind};
    let server = NatsServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let client = observer(&server).await;
    let stream = AuditStream::open(&client, PREFIX).await.unwrap().unwrap();
    let open = |dir: &Path| AuditLog::open(&dir.join("audit.jsonl"), test_audit_key()).unwrap();
    let (a, b) = (open(dir_a.path()), open(dir_b.path()));
    let read = || async {
        verify_lines(&test_audit_key(), "stream", stream.lines().await.unwrap()).unwrap()
    };
    // Both read the stream as it is: empty.
    a.attach(&read().await).unwrap();
    b.attach(&read().await).unwrap();
    let generated = |who: &str, epoch: u32| Event {
        kind: EventKind::Generated,
        epoch: Some(epoch),
        fingerprint: Some(format!("{who}-key")),
        actor: who.into(),
        reason: "split".into(),
    };
    let next_epoch = |log: &AuditLog| log.max_generated().max(1) + 1;
    assert_eq!((next_epoch(&a), next_epoch(&b)), (2, 2));
    a.append(generated("a", next_epoch(&a))).unwrap();
    b.append(generated("b", next_epoch(&b))).unwrap();
    flush(&stream, &a).await.expect("the first one lands");
    let err = flush(&stream, &b)
        .await
        .expect_err("the second one is refused");
    assert!(err.to_string().contains("wrong last sequence"), "{err}");

    // B reads the stream again: its own entry is kept aside, and epoch 2 is taken.
    let kept = b.attach(&read().await).unwrap();
    assert!(kept.is_some(), "b's file parted ways and is kept aside");
    assert_eq!(next_epoch(&b), 3);
    b.append(generated("b", 3)).unwrap();
    flush(&stream, &b)
        .await
        .expect("b's next epoch lands after a's");
    let all = read().await;
    let epochs: Vec<&str> = all
        .lines
        .iter()
        .map(|(_, l, _)| {
            l.split("\"epoch\":")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, ["2", "3"], "each epoch generated once");
    assert!(all.lines[0].1.contains("a-key") && all.lines[1].1.contains("b-key"));
}
