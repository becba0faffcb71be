//! Whatever an attacker with bus access injects on an encrypt subject is refused, counted, and
//! never delivered, and other agents carry on.

mod support;

use std::time::Duration;

use bytes::Bytes;
use cipherbus::envelope::{Header, MAGIC};
use futures::StreamExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message arrives in time")
        .expect("subscription open")
}

fn failures(p: &cipherbus::server::ProxyHandle, reason: &'static str) -> u64 {
    p.metrics.open_failures_for(reason)
}

#[tokio::test]
async fn forged_injected_moved_and_unknown_epoch_payloads_are_refused() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let publisher = agent(&pa).await;
    let subscriber = agent(&pb).await;
    let attacker = observer(&server).await;

    let mut sub = subscriber.subscribe("acct.*").await.unwrap();
    let mut raw = attacker.subscribe("acct.a").await.unwrap();
    sync(&subscriber).await;
    sync(&attacker).await;

    publisher.publish("acct.a", "legit-1".into()).await.unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"legit-1");
    let sealed = next(&mut raw).await.payload;
    assert_eq!(sealed[0], MAGIC);

    // 1. A flipped bit anywhere: in the header, the ciphertext, the tag.
    for at in [1usize, 5, 20, 33, sealed.len() - 1] {
        let mut forged = sealed.to_vec();
        forged[at] ^= 0x01;
        attacker.publish("acct.a", forged.into()).await.unwrap();
    }
    // 2. Injected plaintext, including text that looks like JSON.
    attacker
        .publish("acct.a", "wire 1000 to mallory".into())
        .await
        .unwrap();
    attacker
        .publish("acct.a", r#"{"amount":1000}"#.into())
        .await
        .unwrap();
    // 3. A genuine envelope replayed onto another subject.
    attacker.publish("acct.b", sealed.clone()).await.unwrap();
    // 4. An envelope claiming an epoch nobody has.
    let mut future_epoch = sealed.to_vec();
    future_epoch[4..8].copy_from_slice(&99u32.to_be_bytes());
    attacker
        .publish("acct.a", future_epoch.into())
        .await
        .unwrap();
    // 5. A truncated envelope.
    attacker
        .publish("acct.a", sealed.slice(..20))
        .await
        .unwrap();
    sync(&attacker).await;

    publisher.publish("acct.a", "legit-2".into()).await.unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(
        &next(&mut sub).await.payload[..],
        b"legit-2",
        "nothing injected was delivered in between"
    );

    assert!(
        eventually(WAIT, || failures(&pb, "plaintext") == 2).await,
        "plaintext refusals counted"
    );
    // Flips in the version, suite or flags bytes are refused before the AEAD runs.
    let header_or_auth = failures(&pb, "auth")
        + failures(&pb, "version")
        + failures(&pb, "suite")
        + failures(&pb, "flags")
        + failures(&pb, "unknown_epoch");
    assert_eq!(
        header_or_auth, 7,
        "five forgeries, one move, one unknown epoch"
    );
    assert_eq!(
        failures(&pb, "unknown_epoch"),
        2,
        "epoch 99, and the flipped epoch byte"
    );
    assert_eq!(failures(&pb, "truncated"), 1);
    assert!(Header::parse(&sealed).is_ok());
}

#[tokio::test]
async fn garbage_on_the_listener_is_refused_and_others_carry_on() {
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let a = agent(&p).await;
    let b = agent(&p).await;
    let mut sub = b.subscribe("steady").await.unwrap();
    sync(&b).await;

    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x00\x00\x00\xff\xfe\r\n",
        b"PUB x -5\r\n",
    ] {
        let mut raw = tokio::net::TcpStream::connect(p.local_addr).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, raw.read_to_end(&mut got))
            .await
            .expect("the proxy closes the connection")
            .expect("read");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("INFO "), "INFO first: {text}");
        // The connection is closed (read_to_end returned), with or without an -ERR, like the server.
    }

    for i in 0..10 {
        a.publish("steady", format!("m{i}").into()).await.unwrap();
    }
    a.flush().await.unwrap();
    for i in 0..10 {
        assert_eq!(next(&mut sub).await.payload, Bytes::from(format!("m{i}")));
    }
    assert!(
        p.metrics
            .protocol_errors
            .get_or_create(&cipherbus::metrics::ReasonLabel {
                reason: "unknown_op"
            })
            .get()
            >= 1
    );
}
