//! The client matrix's scenarios for async-nats; see tests/clients/README.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, message::PublishMessage as Publish, stream};
use async_nats::{Client, HeaderMap, Message, RequestErrorKind, Subscriber};
use bytes::Bytes;
use futures::StreamExt;

type Outcome = Result<(), String>;

/// How long any single wait for the bus may take.
const WAIT: Duration = Duration::from_secs(5);

/// How long one whole scenario may take.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs every scenario with the settings in `env` and returns the report, one line each.
pub async fn run(env: &HashMap<String, String>) -> String {
    let names = [
        "pubsub_0",
        "pubsub_1",
        "pubsub_1k",
        "pubsub_64k",
        "pubsub_max",
        "order",
        "headers_payload",
        "headers_empty",
        "request_reply",
        "no_responders",
        "queue_group",
        "js_publish",
        "js_publish_options",
        "js_dedup",
        "js_pull_fetch_ack",
        "kv_put_get",
        "kv_delete",
        "kv_watch",
        "tls",
    ];
    let cx = match Cx::connect(env).await {
        Ok(cx) => cx,
        Err(why) => {
            return names
                .iter()
                .map(|n| format!("fail {n}: {why}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let mut lines = Vec::new();
    for name in names {
        let outcome = match tokio::time::timeout(SCENARIO_TIMEOUT, cx.scenario(name)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("timed out after {SCENARIO_TIMEOUT:?}")),
        };
        let line = match outcome {
            Ok(()) => format!("ok {name}"),
            // One line per scenario, whatever the error text holds.
            Err(why) => format!("fail {name}: {}", why.replace('\n', " ")),
        };
        eprintln!("{line}");
        lines.push(line);
    }
    lines.join("\n")
}

/// The two connections and the names the scenarios use.
struct Cx {
    env: HashMap<String, String>,
    publisher: Client,
    subscriber: Client,
    prefix: String,
    /// The subject nobody serves; outside what the bus observer subscribes to.
    nobody: String,
    stream: String,
    bucket: String,
}

fn var(env: &HashMap<String, String>, name: &str) -> Result<String, String> {
    env.get(name)
        .cloned()
        .ok_or_else(|| format!("{name} is not set"))
}

/// Turns any error into the scenario's failure text, saying what was being done.
trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn ensure(cond: bool, why: impl FnOnce() -> String) -> Outcome {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}

/// Awaits `fut` for at most `WAIT`.
async fn within<T, F: Future<Output = T>>(what: &str, fut: F) -> Result<T, String> {
    tokio::time::timeout(WAIT, fut)
        .await
        .map_err(|_| format!("{what}: nothing within {WAIT:?}"))
}

/// The next message on `sub`, within `WAIT`.
async fn next(sub: &mut Subscriber, what: &str) -> Result<Message, String> {
    within(what, sub.next())
        .await?
        .ok_or_else(|| format!("{what}: the subscription ended"))
}

/// Fails if anything more arrives on `sub` within a short while.
async fn nothing_more(sub: &mut Subscriber) -> Outcome {
    match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        Ok(Some(m)) => Err(format!(
            "an extra message arrived: {} bytes on {}",
            m.payload.len(),
            m.subject
        )),
        _ => Ok(()),
    }
}

/// `len` bytes carrying the marker, every byte position distinct enough to catch corruption.
fn payload(len: usize) -> Bytes {
    let mut p: Vec<u8> = b"cbmx".iter().copied().cycle().take(len.min(4)).collect();
    p.extend((4..len).map(|i| (i % 251) as u8));
    Bytes::from(p)
}

fn describe(got: &[u8], want: &[u8]) -> String {
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    format!(
        "got {} bytes, want {} (first difference at {first:?})",
        got.len(),
        want.len()
    )
}

/// Every header name with its values, in the order each name's values were added.
fn header_table(h: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    h.iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.iter().map(|v| v.as_str().to_owned()).collect(),
            )
        })
        .collect()
}

async fn connect(url: &str, ca: Option<&str>) -> Result<Client, String> {
    let mut opts = async_nats::ConnectOptions::new().connection_timeout(WAIT);
    if let Some(ca) = ca {
        opts = opts.add_root_certificates(ca.into()).require_tls(true);
    }
    within(&format!("connect to {url}"), opts.connect(url))
        .await?
        .ctx(&format!("connect to {url}"))
}

impl Cx {
    async fn connect(env: &HashMap<String, String>) -> Result<Self, String> {
        Ok(Cx {
            env: env.clone(),
            publisher: connect(&var(env, "CB_PUB_URL")?, None).await?,
            subscriber: connect(&var(env, "CB_SUB_URL")?, None).await?,
            prefix: var(env, "CB_PREFIX")?,
            nobody: var(env, "CB_NOBODY")?,
            stream: var(env, "CB_STREAM")?,
            bucket: var(env, "CB_BUCKET")?,
        })
    }

    async fn scenario(&self, name: &str) -> Outcome {
        match name {
            "pubsub_0" => self.pubsub("pubsub_0", 0).await,
            "pubsub_1" => self.pubsub("pubsub_1", 1).await,
            "pubsub_1k" => self.pubsub("pubsub_1k", 1024).await,
            "pubsub_64k" => self.pubsub("pubsub_64k", 65536).await,
            "pubsub_max" => {
                let max = self.publisher.server_info().max_payload;
                ensure(max > 0, || "INFO told no max_payload".into())?;
                self.pubsub("pubsub_max", max).await
            }
            "order" => self.order().await,
            "headers_payload" => self.headers_payload().await,
            "headers_empty" => self.headers_empty().await,
            "request_reply" => {
                request_reply(&self.publisher, &self.subscriber, &self.prefix, "svc.rr").await
            }
            "no_responders" => self.no_responders().await,
            "queue_group" => self.queue_group().await,
            "js_publish" => self.js_publish().await,
            "js_publish_options" => self.js_publish_options().await,
            "js_dedup" => self.js_dedup().await,
            "js_pull_fetch_ack" => self.js_pull_fetch_ack().await,
            "kv_put_get" => self.kv_put_get().await,
            "kv_delete" => self.kv_delete().await,
            "kv_watch" => self.kv_watch().await,
            "tls" => self.tls().await,
            other => Err(format!("no such scenario {other}")),
        }
    }

    fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    async fn pubsub(&self, name: &str, len: usize) -> Outcome {
        pubsub(
            &self.publisher,
            &self.subscriber,
            &self.prefix,
            &format!("ps.{name}"),
            len,
        )
        .await
    }

    async fn order(&self) -> Outcome {
        const N: usize = 1000;
        let subject = self.subject("core.order");
        let mut sub = subscribe(&self.subscriber, &subject, &self.prefix).await?;
        for i in 0..N {
            self.publisher
                .publish(subject.clone(), format!("cbmx-{i:04}").into())
                .await
                .ctx("publish")?;
        }
        self.publisher.flush().await.ctx("flush")?;
        for i in 0..N {
            let m = next(&mut sub, &format!("message {i} of {N}")).await?;
            let want = format!("cbmx-{i:04}");
            ensure(m.payload == want.as_bytes(), || {
                format!(
                    "message {i} was {:?}, want {want}",
                    String::from_utf8_lossy(&m.payload)
                )
            })?;
        }
        nothing_more(&mut sub).await
    }

    async fn headers_payload(&self) -> Outcome {
        let subject = self.subject("hdr.payload");
        let mut headers = HeaderMap::new();
        headers.append("Cb-Multi", "first");
        headers.append("Cb-Multi", "second");
        headers.insert("Nats-Msg-Id", "mx-hdr-1");
        let body = Bytes::from_static(b"cbmx headers and a payload");
        self.headers_round_trip(&subject, headers, body).await
    }

    async fn headers_empty(&self) -> Outcome {
        let subject = self.subject("hdr.empty");
        let mut headers = HeaderMap::new();
        headers.insert("Cb-Only", "headers");
        self.headers_round_trip(&subject, headers, Bytes::new())
            .await
    }

    async fn headers_round_trip(&self, subject: &str, headers: HeaderMap, body: Bytes) -> Outcome {
        let mut sub = subscribe(&self.subscriber, subject, &self.prefix).await?;
        self.publisher
            .publish_with_headers(subject.to_owned(), headers.clone(), body.clone())
            .await
            .ctx("publish")?;
        self.publisher.flush().await.ctx("flush")?;
        let m = next(&mut sub, "the message").await?;
        let got = m
            .headers
            .as_ref()
            .ok_or("the message arrived without headers")?;
        let (got, want) = (header_table(got), header_table(&headers));
        ensure(got == want, || {
            format!("headers arrived as {got:?}, sent {want:?}")
        })?;
        ensure(m.payload == body, || describe(&m.payload, &body))?;
        nothing_more(&mut sub).await
    }

    async fn no_responders(&self) -> Outcome {
        let subject = self.nobody.clone();
        let started = tokio::time::Instant::now();
        let got = tokio::time::timeout(
            Duration::from_secs(2),
            self.publisher.request(subject, "cbmx-anyone".into()),
        )
        .await
        .map_err(|_| "no error within 2 s".to_string())?;
        match got {
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(format!(
                "failed with {:?} after {:?}: {e}",
                e.kind(),
                started.elapsed()
            )),
            Ok(m) => Err(format!("got a reply of {} bytes", m.payload.len())),
        }
    }

    async fn queue_group(&self) -> Outcome {
        const N: usize = 100;
        let subject = self.subject("core.queue");
        let mut a = self
            .subscriber
            .queue_subscribe(subject.clone(), "cbq".into())
            .await
            .ctx("queue subscribe")?;
        let mut b = self
            .subscriber
            .queue_subscribe(subject.clone(), "cbq".into())
            .await
            .ctx("queue subscribe")?;
        sync(&self.subscriber, &self.prefix).await?;
        for i in 0..N {
            self.publisher
                .publish(subject.clone(), format!("cbmx-q-{i}").into())
                .await
                .ctx("publish")?;
        }
        self.publisher.flush().await.ctx("flush")?;
        let mut seen = HashSet::new();
        let (mut count_a, mut count_b) = (0, 0);
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < N {
            let m = tokio::select! {
                Some(m) = a.next() => { count_a += 1; m }
                Some(m) = b.next() => { count_b += 1; m }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("only {} of {N} messages arrived", got.len()));
                }
            };
            got.push(m.payload);
        }
        // Anything late would be a duplicate: give it the chance to show.
        nothing_more(&mut a).await?;
        nothing_more(&mut b).await?;
        for p in &got {
            let text = String::from_utf8_lossy(p).into_owned();
            ensure(seen.insert(text.clone()), || {
                format!("{text} arrived twice")
            })?;
        }
        for i in 0..N {
            let want = format!("cbmx-q-{i}");
            ensure(seen.contains(&want), || format!("{want} was lost"))?;
        }
        eprintln!("queue_group: {count_a} + {count_b}");
        Ok(())
    }

    /// The stream of the JetStream scenarios, created on first use.
    async fn stream(&self) -> Result<stream::Stream, String> {
        jetstream::new(self.publisher.clone())
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject("js.>")],
                ..Default::default()
            })
            .await
            .ctx("create the stream")
    }

    async fn last_sequence(&self) -> Result<u64, String> {
        let mut s = self.stream().await?;
        Ok(s.info().await.ctx("stream info")?.state.last_sequence)
    }

    async fn js_publish(&self) -> Outcome {
        let last = self.last_sequence().await?;
        let js = jetstream::new(self.publisher.clone());
        let ack = js
            .publish(self.subject("js.plain"), "cbmx js publish".into())
            .await
            .ctx("publish")?
            .await
            .ctx("ack")?;
        ensure(ack.stream == self.stream, || {
            format!("acked by stream {}, want {}", ack.stream, self.stream)
        })?;
        ensure(ack.sequence == last + 1, || {
            format!("acked at sequence {}, want {}", ack.sequence, last + 1)
        })?;
        ensure(!ack.duplicate, || "acked as a duplicate".into())
    }

    async fn js_publish_options(&self) -> Outcome {
        let last = self.last_sequence().await?;
        let js = jetstream::new(self.publisher.clone());
        let subject = self.subject("js.options");
        let ack = js
            .send_publish(
                subject.clone(),
                Publish::build()
                    .payload("cbmx js publish with options".into())
                    .expected_stream(&self.stream)
                    .expected_last_sequence(last)
                    .message_id("mx-options-1"),
            )
            .await
            .ctx("publish")?
            .await
            .ctx("ack")?;
        ensure(
            ack.stream == self.stream && ack.sequence == last + 1,
            || {
                format!(
                    "acked by {} at {}, want {} at {}",
                    ack.stream,
                    ack.sequence,
                    self.stream,
                    last + 1
                )
            },
        )?;
        ensure(!ack.duplicate, || "acked as a duplicate".into())?;
        // The options reached the server: a stale expected sequence is refused.
        let stale = js
            .send_publish(
                subject,
                Publish::build()
                    .payload("cbmx js publish, stale".into())
                    .expected_last_sequence(last),
            )
            .await
            .ctx("publish")?
            .await;
        ensure(stale.is_err(), || {
            format!("a stale expected last sequence was accepted: {stale:?}")
        })
    }

    async fn js_dedup(&self) -> Outcome {
        let mut s = self.stream().await?;
        let count = s.info().await.ctx("stream info")?.state.messages;
        let js = jetstream::new(self.publisher.clone());
        let mut acks = Vec::new();
        for _ in 0..2 {
            let ack = js
                .send_publish(
                    self.subject("js.dedup"),
                    Publish::build()
                        .payload("cbmx js dedup".into())
                        .message_id("mx-dedup-1"),
                )
                .await
                .ctx("publish")?
                .await
                .ctx("ack")?;
            acks.push(ack);
        }
        ensure(!acks[0].duplicate, || {
            "the first publish was a duplicate".into()
        })?;
        ensure(acks[1].duplicate, || {
            "the second ack does not say duplicate".into()
        })?;
        ensure(acks[1].sequence == acks[0].sequence, || {
            format!(
                "the duplicate was acked at {}, the original at {}",
                acks[1].sequence, acks[0].sequence
            )
        })?;
        let after = s.info().await.ctx("stream info")?.state.messages;
        ensure(after == count + 1, || {
            format!("the stream went from {count} to {after} messages, want one more")
        })
    }

    async fn js_pull_fetch_ack(&self) -> Outcome {
        const N: usize = 5;
        self.stream().await?;
        let subject = self.subject("js.pull");
        let stream = jetstream::new(self.subscriber.clone())
            .get_stream(&self.stream)
            .await
            .ctx("get the stream from the subscribing side")?;
        let mut pull: consumer::PullConsumer = stream
            .get_or_create_consumer(
                "cb_pull",
                consumer::pull::Config {
                    durable_name: Some("cb_pull".into()),
                    filter_subject: subject.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .ctx("create the consumer")?;
        let js = jetstream::new(self.publisher.clone());
        let mut sequences = Vec::new();
        for i in 0..N {
            let ack = js
                .publish(subject.clone(), format!("cbmx-pull-{i}").into())
                .await
                .ctx("publish")?
                .await
                .ctx("ack")?;
            sequences.push(ack.sequence);
        }
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < N && tokio::time::Instant::now() < deadline {
            let mut batch = pull
                .fetch()
                .max_messages(N - got.len())
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .ctx("fetch")?;
            while let Some(m) = within("fetch", batch.next()).await? {
                got.push(m.ctx("fetched message")?);
            }
        }
        ensure(got.len() == N, || format!("fetched {} of {N}", got.len()))?;
        for (i, m) in got.iter().enumerate() {
            let want = format!("cbmx-pull-{i}");
            ensure(m.payload == want.as_bytes(), || {
                format!(
                    "fetched {:?} at {i}, want {want}",
                    String::from_utf8_lossy(&m.payload)
                )
            })?;
            let seq = m.info().ctx("message info")?.stream_sequence;
            ensure(seq == sequences[i], || {
                format!("fetched sequence {seq} at {i}, want {}", sequences[i])
            })?;
            within("ack", m.double_ack()).await?.ctx("ack")?;
        }
        let info = pull.info().await.ctx("consumer info")?;
        ensure(info.num_ack_pending == 0 && info.num_pending == 0, || {
            format!(
                "after the acks the consumer has {} unacked, {} pending",
                info.num_ack_pending, info.num_pending
            )
        })?;
        ensure(info.ack_floor.stream_sequence == sequences[N - 1], || {
            format!(
                "ack floor {}, want {}",
                info.ack_floor.stream_sequence,
                sequences[N - 1]
            )
        })
    }

    /// The bucket seen from `client`, created from the publishing side on first use.
    async fn bucket(&self, client: &Client) -> Result<kv::Store, String> {
        let js = jetstream::new(self.publisher.clone());
        if js.get_key_value(&self.bucket).await.is_err() {
            js.create_key_value(kv::Config {
                bucket: self.bucket.clone(),
                history: 5,
                ..Default::default()
            })
            .await
            .ctx("create the bucket")?;
        }
        jetstream::new(client.clone())
            .get_key_value(&self.bucket)
            .await
            .ctx("get the bucket")
    }

    async fn kv_put_get(&self) -> Outcome {
        let put = self.bucket(&self.publisher).await?;
        let get = self.bucket(&self.subscriber).await?;
        let value = Bytes::from_static(b"cbmx kv value");
        let revision = put.put("greeting", value.clone()).await.ctx("put")?;
        let entry = get
            .entry("greeting")
            .await
            .ctx("get")?
            .ok_or("the key is missing")?;
        ensure(entry.value == value, || describe(&entry.value, &value))?;
        ensure(entry.revision == revision, || {
            format!("got revision {}, put made {revision}", entry.revision)
        })?;
        ensure(entry.operation == kv::Operation::Put, || {
            format!("the entry is a {:?}", entry.operation)
        })
    }

    async fn kv_delete(&self) -> Outcome {
        let put = self.bucket(&self.publisher).await?;
        let get = self.bucket(&self.subscriber).await?;
        let value = Bytes::from_static(b"cbmx soon gone");
        let revision = put.put("doomed", value.clone()).await.ctx("put")?;
        let before = get.get("doomed").await.ctx("get before the delete")?;
        ensure(before.as_ref() == Some(&value), || {
            format!("before the delete the key held {before:?}")
        })?;
        put.delete("doomed").await.ctx("delete")?;
        let after = get.get("doomed").await.ctx("get after the delete")?;
        ensure(after.is_none(), || {
            format!("after the delete the key holds {after:?}")
        })?;
        // async-nats hands back the tombstone: a Delete right after the put, with no value.
        let entry = get.entry("doomed").await.ctx("entry after the delete")?;
        ensure(
            entry.as_ref().is_none_or(|e| {
                e.operation == kv::Operation::Delete
                    && e.value.is_empty()
                    && e.revision == revision + 1
            }),
            || {
                format!(
                    "after the delete at {} the entry is {entry:?}",
                    revision + 1
                )
            },
        )
    }

    async fn kv_watch(&self) -> Outcome {
        let put = self.bucket(&self.publisher).await?;
        let watcher = self.bucket(&self.subscriber).await?;
        let mut watch = watcher.watch("w.>").await.ctx("watch")?;
        let mut revisions = Vec::new();
        let keys = ["w.a", "w.b", "w.a", "w.c"];
        for (i, key) in keys.iter().enumerate() {
            let r = put
                .put(*key, format!("cbmx-watch-{i}").into())
                .await
                .ctx("put")?;
            revisions.push(r);
        }
        for (i, key) in keys.iter().enumerate() {
            let e = within("watch", watch.next())
                .await?
                .ok_or("the watch ended")?
                .ctx("watch entry")?;
            let want = format!("cbmx-watch-{i}");
            ensure(
                e.key == *key
                    && e.value == want.as_bytes()
                    && e.revision == revisions[i]
                    && e.operation == kv::Operation::Put,
                || {
                    format!(
                        "entry {i} is {} = {:?} at {} ({:?}), want {key} = {want} at {}",
                        e.key,
                        String::from_utf8_lossy(&e.value),
                        e.revision,
                        e.operation,
                        revisions[i]
                    )
                },
            )?;
        }
        Ok(())
    }

    async fn tls(&self) -> Outcome {
        let ca = var(&self.env, "CB_CA")?;
        let publisher = connect(&var(&self.env, "CB_TLS_PUB_URL")?, Some(&ca)).await?;
        let subscriber = connect(&var(&self.env, "CB_TLS_SUB_URL")?, Some(&ca)).await?;
        pubsub(&publisher, &subscriber, &self.prefix, "tls.data", 1024)
            .await
            .map_err(|e| format!("pubsub_1k over TLS: {e}"))?;
        request_reply(&publisher, &subscriber, &self.prefix, "tls.rr")
            .await
            .map_err(|e| format!("request_reply over TLS: {e}"))
    }
}

/// A round trip through the server from `client`: once its own probe comes back, everything it
/// sent before (its SUBs above all) has been processed. `flush` only empties the socket buffer.
/// A no-responders request would do too, but only while nobody else listens on the subject.
async fn sync(client: &Client, prefix: &str) -> Outcome {
    let subject = format!("{prefix}.sync.{}", client.new_inbox().replace('.', "_"));
    let mut probe = client.subscribe(subject.clone()).await.ctx("subscribe")?;
    client
        .publish(subject, "cbmx sync".into())
        .await
        .ctx("publish")?;
    client.flush().await.ctx("flush")?;
    let m = next(&mut probe, "sync").await?;
    ensure(&m.payload[..] == b"cbmx sync", || {
        describe(&m.payload, b"cbmx sync")
    })
}

async fn subscribe(client: &Client, subject: &str, prefix: &str) -> Result<Subscriber, String> {
    let sub = client
        .subscribe(subject.to_owned())
        .await
        .ctx("subscribe")?;
    sync(client, prefix).await?;
    Ok(sub)
}

async fn pubsub(
    publisher: &Client,
    subscriber: &Client,
    prefix: &str,
    name: &str,
    len: usize,
) -> Outcome {
    let subject = &format!("{prefix}.{name}");
    let mut sub = subscribe(subscriber, subject, prefix).await?;
    let body = payload(len);
    publisher
        .publish(subject.to_owned(), body.clone())
        .await
        .ctx("publish")?;
    publisher.flush().await.ctx("flush")?;
    let m = next(&mut sub, "the message").await?;
    ensure(m.payload == body, || describe(&m.payload, &body))?;
    ensure(m.headers.as_ref().is_none_or(|h| h.is_empty()), || {
        format!("headers appeared: {:?}", m.headers)
    })?;
    nothing_more(&mut sub).await
}

async fn request_reply(
    publisher: &Client,
    subscriber: &Client,
    prefix: &str,
    name: &str,
) -> Outcome {
    let subject = format!("{prefix}.{name}");
    let mut svc = subscribe(subscriber, &subject, prefix).await?;
    let responder_client = subscriber.clone();
    let responder = tokio::spawn(async move {
        let m = next(&mut svc, "the request").await?;
        let reply = m.reply.ok_or("the request has no reply subject")?;
        let mut answer = b"cbmx reply to ".to_vec();
        answer.extend_from_slice(&m.payload);
        responder_client
            .publish(reply, answer.into())
            .await
            .ctx("reply")?;
        responder_client.flush().await.ctx("flush")
    });
    let reply = within("the reply", publisher.request(subject, "cbmx ping".into()))
        .await?
        .ctx("request")?;
    responder.await.map_err(|e| format!("responder: {e}"))??;
    let want = b"cbmx reply to cbmx ping";
    ensure(&reply.payload[..] == want, || {
        describe(&reply.payload, want)
    })
}
