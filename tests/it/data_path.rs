//! Unmodified async-nats agents through two proxies, with a raw observer on the bus proving that
//! only ciphertext crosses it.

use std::time::Duration;

use crate::support::*;
use async_nats::HeaderMap;
use bytes::Bytes;
use cipherbus::envelope::{self, MAGIC, OVERHEAD};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message arrives in time")
        .expect("subscription open")
}

fn plaintext(size: usize) -> Vec<u8> {
    // Readable, recognisable bytes, so a leak would show in the observer's copy.
    b"secret-plaintext-"
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect()
}

#[tokio::test]
async fn pub_sub_at_every_size_crosses_the_bus_sealed() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let publisher = agent(&pa).await;
    let subscriber = agent(&pb).await;
    let observer = observer(&server).await;

    let max = subscriber.server_info().max_payload;
    assert_eq!(
        max,
        observer.server_info().max_payload - OVERHEAD,
        "the agent is told the server's max_payload less the envelope"
    );

    let mut sub = subscriber.subscribe("sizes.test").await.unwrap();
    let mut raw = observer.subscribe("sizes.test").await.unwrap();
    sync(&subscriber).await;
    sync(&observer).await;

    for size in [0usize, 1, 1024, 64 * 1024, max] {
        let body = plaintext(size);
        publisher
            .publish("sizes.test", Bytes::from(body.clone()))
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        let got = next(&mut sub).await;
        assert_eq!(got.payload.len(), size, "size {size}");
        assert!(got.payload[..] == body[..], "size {size}: payload differs");

        let seen = next(&mut raw).await;
        if size == 0 {
            assert!(seen.payload.is_empty(), "empty payloads are never sealed");
        } else {
            assert_eq!(seen.payload.len(), size + OVERHEAD, "size {size}");
            assert_eq!(seen.payload[0], MAGIC);
            let header = envelope::Header::parse(&seen.payload).unwrap();
            assert_eq!(header.epoch, 1);
            assert!(
                !contains(&seen.payload, b"secret-plaintext"),
                "plaintext leaked at size {size}"
            );
        }
    }
    assert!(metric(&pa, "cipherbus_messages_sealed_total") >= 4.0);
    assert!(metric(&pb, "cipherbus_messages_opened_total") >= 4.0);
}

#[tokio::test]
async fn over_max_payload_is_refused_like_the_server() {
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let client = agent(&p).await;
    let max = client.server_info().max_payload;
    // async-nats checks max_payload itself; the proxy's own check is covered by the raw tests.
    let err = client
        .publish("too.big", Bytes::from(vec![b'x'; max + 1]))
        .await;
    assert!(
        err.is_err(),
        "a payload over the advertised max_payload is refused"
    );
}

#[tokio::test]
async fn headers_wildcards_and_queue_groups() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let publisher = agent(&pa).await;
    let subscriber = agent(&pb).await;
    let observer = observer(&server).await;

    let mut star = subscriber.subscribe("fleet.*.status").await.unwrap();
    let mut rest = subscriber.subscribe("fleet.>").await.unwrap();
    let mut q1 = subscriber
        .queue_subscribe("work.items", "workers".into())
        .await
        .unwrap();
    let other = agent(&pb).await;
    let mut q2 = other
        .queue_subscribe("work.items", "workers".into())
        .await
        .unwrap();
    let mut raw = observer.subscribe("fleet.>").await.unwrap();
    sync(&subscriber).await;
    sync(&other).await;
    sync(&observer).await;

    let mut headers = HeaderMap::new();
    headers.insert("Trace-Id", "abc-123");
    headers.insert("X-Mixed-Case", "Value");
    publisher
        .publish_with_headers("fleet.truck7.status", headers, "on the road".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();

    for m in [next(&mut star).await, next(&mut rest).await] {
        assert_eq!(&m.payload[..], b"on the road");
        let h = m.headers.expect("headers kept");
        assert_eq!(h.get("Trace-Id").map(|v| v.as_str()), Some("abc-123"));
        assert_eq!(h.get("X-Mixed-Case").map(|v| v.as_str()), Some("Value"));
    }
    let seen = next(&mut raw).await;
    assert_eq!(
        seen.headers.unwrap().get("Trace-Id").map(|v| v.as_str()),
        Some("abc-123"),
        "headers are never encrypted"
    );
    assert!(!contains(&seen.payload, b"on the road"));

    for i in 0..100 {
        publisher
            .publish("work.items", format!("job {i}").into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while count < 100 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(m) = q1.next() => { assert!(m.payload.starts_with(b"job ")); count += 1; }
            Some(m) = q2.next() => { assert!(m.payload.starts_with(b"job ")); count += 1; }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    assert_eq!(count, 100, "each queued message is delivered exactly once");
}

#[tokio::test]
async fn request_reply_and_no_responders() {
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    // The requester's inboxes get their own prefix so the observer can watch them without
    // also catching other clients' no-responders statuses, which the server hands to any
    // matching subscription.
    let requester = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_REQ")
        .connect(proxy_url(&pa))
        .await
        .unwrap();
    let responder = agent(&pb).await;
    let observer = observer(&server).await;
    let mut raw = observer.subscribe("_REQ.>").await.unwrap();
    sync(&observer).await;

    let mut service = responder.subscribe("svc.echo").await.unwrap();
    sync(&responder).await;
    let serving = tokio::spawn(async move {
        while let Some(req) = service.next().await {
            let mut answer = b"echo: ".to_vec();
            answer.extend_from_slice(&req.payload);
            responder
                .publish(req.reply.unwrap(), answer.into())
                .await
                .unwrap();
            responder.flush().await.unwrap();
        }
    });

    let reply = tokio::time::timeout(WAIT, requester.request("svc.echo", "ping-body".into()))
        .await
        .expect("answered in time")
        .expect("the responder answers");
    assert_eq!(&reply.payload[..], b"echo: ping-body");
    let seen = next(&mut raw).await;
    assert_eq!(seen.payload[0], MAGIC, "replies on inboxes are sealed too");
    assert!(!contains(&seen.payload, b"echo: ping-body"));
    raw.unsubscribe().await.unwrap();
    sync(&observer).await;

    let err = requester
        .request("svc.nobody.home", "hello".into())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "the server's 503 status passes the proxy"
    );
    serving.abort();
}

#[tokio::test]
async fn jetstream_publish_pull_consume_and_ack_with_sealed_storage() {
    use async_nats::jetstream::{self, consumer::pull, stream};
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let js_a = jetstream::new(agent(&pa).await);
    let js_b = jetstream::new(agent(&pb).await);

    js_a.create_stream(stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..10 {
        let ack = js_a
            .publish(format!("orders.{i}"), format!("order number {i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.stream, "ORDERS");
    }

    let stream = js_b.get_stream("ORDERS").await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("reader".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.fetch().max_messages(10).messages().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = tokio::time::timeout(WAIT, messages.next()).await.unwrap() {
        let m = m.unwrap();
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        m.ack().await.unwrap();
        if got.len() == 10 {
            break;
        }
    }
    let want: Vec<String> = (0..10).map(|i| format!("order number {i}")).collect();
    assert_eq!(got, want);

    // The stored copy, read straight from the server, is sealed.
    let raw = jetstream::new(observer(&server).await);
    let stored = raw
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_raw_message(3)
        .await
        .unwrap();
    assert_eq!(stored.payload[0], MAGIC);
    assert!(!contains(&stored.payload, b"order number"));
    assert_eq!(stored.payload.len(), "order number 2".len() + OVERHEAD);

    // Through a proxy, the stored message embedded in the STREAM.MSG.GET answer is opened.
    let via_proxy = stream.get_raw_message(3).await.unwrap();
    assert_eq!(&via_proxy.payload[..], b"order number 2");
    assert_eq!(via_proxy.subject.as_str(), "orders.2");
}

#[tokio::test]
async fn key_value_put_get_delete_and_watch() {
    use async_nats::jetstream::{self, kv};
    let server = NatsServer::start();
    let (pa, pb) = (proxy(&server).await, proxy(&server).await);
    let js_a = jetstream::new(agent(&pa).await);
    let js_b = jetstream::new(agent(&pb).await);

    let writer = js_a
        .create_key_value(kv::Config {
            bucket: "settings".into(),
            history: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    let reader = js_b.get_key_value("settings").await.unwrap();
    let mut watch = reader.watch("app.>").await.unwrap();

    writer.put("app.color", "deep blue".into()).await.unwrap();
    assert_eq!(
        reader.get("app.color").await.unwrap().as_deref(),
        Some(&b"deep blue"[..])
    );
    let entry = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entry.key, "app.color");
    assert_eq!(&entry.value[..], b"deep blue");

    writer.delete("app.color").await.unwrap();
    assert_eq!(reader.get("app.color").await.unwrap(), None);
    let entry = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entry.operation, kv::Operation::Delete);

    // The value at rest is sealed.
    let raw = jetstream::new(observer(&server).await);
    let stored = raw
        .get_stream("KV_settings")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(stored.payload[0], MAGIC);
    assert!(!contains(&stored.payload, b"deep blue"));
}

#[tokio::test]
async fn status_messages_pass_untouched_idle_heartbeats() {
    use async_nats::jetstream::{self, consumer::push, stream};
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let client = agent(&p).await;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "HB".into(),
        subjects: vec!["hb.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // A plain core subscription on the deliver subject sees what the server sends as is.
    let mut deliver = client.subscribe("deliver.hb").await.unwrap();
    sync(&client).await;
    js.get_stream("HB")
        .await
        .unwrap()
        .create_consumer(push::Config {
            deliver_subject: "deliver.hb".into(),
            idle_heartbeat: Duration::from_millis(200),
            flow_control: true,
            ..Default::default()
        })
        .await
        .unwrap();
    js.publish("hb.one", "stored payload".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut saw_payload = false;
    let mut saw_heartbeat = false;
    while !(saw_payload && saw_heartbeat) {
        let m = next(&mut deliver).await;
        match m.status {
            Some(s) if s == async_nats::StatusCode::IDLE_HEARTBEAT => {
                assert!(m.payload.is_empty());
                saw_heartbeat = true;
            }
            None => {
                assert_eq!(&m.payload[..], b"stored payload");
                saw_payload = true;
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(p.metrics.open_failures_for("plaintext"), 0);
}

/// Messages in the bursts of the two tests below.
const BURST: usize = 20_000;

/// The setting of the two tests below: a watcher on the bus subscribed to `out`, and a raw
/// agent through the proxy, subscribed to `in_` with deliveries it has not read yet filling
/// its socket and then the proxy's, so the proxy's upstream socket holds unread data.
async fn behind_on_deliveries(
    server: &NatsServer,
    p: &cipherbus::server::ProxyHandle,
    out: &str,
    in_: &str,
) -> (
    async_nats::Client,
    async_nats::Subscriber,
    std::net::TcpStream,
) {
    use std::io::{BufRead, BufReader, Write};
    let watcher = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 16)
        .connect(server.url())
        .await
        .expect("observer connects");
    let sub = watcher.subscribe(out.to_string()).await.unwrap();
    sync(&watcher).await;

    // A well-behaved agent on a plain socket: it reads everything in the end, so its own
    // close is never a reset.
    let addr = p.local_addr;
    let connect =
        format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {in_} 1\r\nPING\r\n");
    let s = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("agent connects");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).expect("INFO");
        assert!(line.starts_with("INFO "), "{line}");
        s.write_all(connect.as_bytes()).unwrap();
        line.clear();
        r.read_line(&mut line).expect("PONG");
        assert_eq!(line, "PONG\r\n");
        s
    })
    .await
    .unwrap();
    let feeder = agent(p).await;
    let big = Bytes::from(plaintext(16 * 1024));
    for _ in 0..1_000 {
        feeder.publish(in_.to_string(), big.clone()).await.unwrap();
    }
    sync(&feeder).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (watcher, sub, s)
}

/// [`BURST`] `PUB`s of 128 bytes to `subject`, as one agent's writes.
fn burst(subject: &str) -> Vec<u8> {
    let mut burst = Vec::new();
    for _ in 0..BURST {
        burst.extend_from_slice(format!("PUB {subject} 128\r\n").as_bytes());
        burst.extend_from_slice(&plaintext(128));
        burst.extend_from_slice(b"\r\n");
    }
    burst
}

/// How many of the burst the watcher sees, waiting up to 5 s for each.
async fn seen_of_burst(sub: &mut async_nats::Subscriber) -> usize {
    let mut seen = 0;
    while seen < BURST {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(_)) => seen += 1,
            _ => break,
        }
    }
    seen
}

/// An agent that publishes and then closes loses nothing, even when the server is behind
/// reading and still sending to it. Here the server is paused while the agent's burst sits in
/// the proxy's upstream socket, and deliveries the agent has not read yet sit in the proxy. A
/// proxy that simply dropped the upstream connection then would reset it (there is unread data
/// on it), and the reset would discard the part of the burst the server had not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_publishes_and_closes_loses_nothing() {
    use std::io::{Read, Write};
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let (_watcher, mut sub, mut s) =
        behind_on_deliveries(&server, &p, "close.out", "close.in").await;

    signal(server.pid(), "STOP");
    let burst = burst("close.out");
    let writer = tokio::task::spawn_blocking(move || {
        s.write_all(&burst).expect("the proxy takes the burst");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(server.pid(), "CONT");
    let mut s = writer.await.unwrap();
    // Let the proxy finish with the connection before the agent reads the rest.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut sink = [0u8; 64 * 1024];
        while let Ok(1..) = s.read(&mut sink) {}
    })
    .await
    .unwrap();

    let seen = seen_of_burst(&mut sub).await;
    assert_eq!(
        seen, BURST,
        "the bus saw {seen} of the {BURST} messages published"
    );
}

/// The same for an agent that breaks the protocol after its burst: the proxy tells it -ERR
/// and closes, and what it published before the bad op still reaches the bus, as it would
/// with the server itself. The proxy waits for the server's answers to what came before the
/// bad op, but only for 2 s: the agent has its -ERR and its close while the server is still
/// paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_breaks_the_protocol_after_a_burst_loses_nothing_before_it() {
    use std::io::{Read, Write};
    let server = NatsServer::start();
    let p = proxy(&server).await;
    let (_watcher, mut sub, mut s) =
        behind_on_deliveries(&server, &p, "fatal.out", "fatal.in").await;

    signal(server.pid(), "STOP");
    let mut burst = burst("fatal.out");
    burst.extend_from_slice(b"BOGUS\r\n");
    let agent_side = tokio::task::spawn_blocking(move || {
        s.write_all(&burst).expect("the proxy takes the burst");
        // Read to the end: the deliveries, the -ERR, then the proxy's close.
        let mut tail = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        let closed = loop {
            match s.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    tail.extend_from_slice(&chunk[..n]);
                    let keep = tail.len().saturating_sub(256);
                    tail.drain(..keep);
                }
                Err(_) => break false,
            }
        };
        (closed, tail)
    });
    let (closed, tail) = agent_side.await.unwrap();
    signal(server.pid(), "CONT");
    assert!(
        closed,
        "the proxy closes the agent while the server is paused"
    );
    let tail = String::from_utf8_lossy(&tail);
    assert!(
        tail.ends_with("-ERR 'Unknown Protocol Operation'\r\n"),
        "the agent's last bytes: {tail:?}"
    );

    let seen = seen_of_burst(&mut sub).await;
    assert_eq!(
        seen, BURST,
        "the bus saw {seen} of the {BURST} messages published before the bad op"
    );
}

/// Messages of every length around the block edges up to past the batching limit, with and
/// without headers, written by a raw agent in one burst so that each read of the proxy holds
/// many of them.
fn mixed_burst(subject: &str) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut wire = Vec::new();
    let mut sent = Vec::new();
    for i in 0..600usize {
        let len = match i % 4 {
            0 => i % 130,
            1 => 1000 + i,
            2 => 4090 + i % 12,
            _ => 128,
        };
        let body: Vec<u8> = plaintext(len + 17)[17..].to_vec();
        if i % 3 == 0 {
            let hdr = format!("NATS/1.0\r\nN: {i}\r\n\r\n");
            let total = hdr.len() + body.len();
            wire.extend_from_slice(format!("HPUB {subject} {} {total}\r\n", hdr.len()).as_bytes());
            wire.extend_from_slice(hdr.as_bytes());
        } else {
            wire.extend_from_slice(format!("PUB {subject} {}\r\n", body.len()).as_bytes());
        }
        wire.extend_from_slice(&body);
        wire.extend_from_slice(b"\r\n");
        sent.push(body);
    }
    wire.extend_from_slice(b"PING\r\n");
    (wire, sent)
}

/// The opt-in batched backend end to end, both ways against the default one: a burst sealed
/// by a batched proxy opens behind an audited one and the other way round, in order and byte
/// for byte, and only envelopes cross the bus. Each proxy's metric names its backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batched_backend_and_the_audited_one_read_each_other() {
    use std::io::{BufRead, BufReader, Write};
    let server = NatsServer::start();
    let batched = proxy_with(&server, "aead = \"batched\"", TEST_KEK).await;
    let audited = proxy(&server).await;
    let want_batched = if std::arch::is_x86_feature_detected!("avx512f") {
        "batched"
    } else {
        "audited"
    };
    assert_eq!(
        metric(
            &batched,
            &format!("cipherbus_aead_backend{{backend=\"{want_batched}\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(&audited, "cipherbus_aead_backend{backend=\"audited\"}"),
        1.0
    );
    assert_eq!(
        metric(&audited, "cipherbus_aead_backend{backend=\"batched\"}"),
        0.0
    );
    let observer = observer(&server).await;
    for (from, to, subject) in [
        (&batched, &audited, "mix.batched"),
        (&audited, &batched, "mix.audited"),
    ] {
        let receiver = async_nats::ConnectOptions::new()
            .subscription_capacity(4096)
            .connect(proxy_url(to))
            .await
            .unwrap();
        let mut sub = receiver.subscribe(subject.to_string()).await.unwrap();
        let mut raw = observer.subscribe(subject.to_string()).await.unwrap();
        sync(&receiver).await;
        sync(&observer).await;

        let (wire, sent) = mixed_burst(subject);
        let addr = from.local_addr;
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("agent connects");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).expect("INFO");
            s.write_all(b"CONNECT {\"verbose\":false,\"headers\":true}\r\n")
                .unwrap();
            s.write_all(&wire).unwrap();
            line.clear();
            r.read_line(&mut line).expect("PONG");
            assert_eq!(line, "PONG\r\n");
        })
        .await
        .unwrap();

        for (i, body) in sent.iter().enumerate() {
            let got = next(&mut sub).await;
            assert!(
                got.payload[..] == body[..],
                "{subject}: message {i} differs"
            );
            if i % 3 == 0 {
                let n = got.headers.as_ref().and_then(|h| h.get("N"));
                assert_eq!(
                    n.map(|v| v.as_str()),
                    Some(&*i.to_string()),
                    "{subject}: {i}"
                );
            }
            let seen = next(&mut raw).await;
            if body.is_empty() {
                assert!(seen.payload.is_empty());
            } else {
                assert_eq!(seen.payload[0], MAGIC, "{subject}: message {i} sealed");
                assert!(!contains(&seen.payload, b"plaintext-"), "{subject}: {i}");
            }
        }
    }
    assert_eq!(
        metric(&audited, "cipherbus_open_failures_total{reason=\"auth\"}"),
        0.0
    );
    assert_eq!(
        metric(&batched, "cipherbus_open_failures_total{reason=\"auth\"}"),
        0.0
    );
}
