//! What one run measures through each path: throughput and latency with async-nats clients in
//! this process, rotations under load, and the proxies' KMS calls from their admin endpoints.

use super::*;

pub(super) async fn connect(url: &str) -> Result<async_nats::Client, BenchError> {
    let at = url.to_owned();
    async_nats::ConnectOptions::new()
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let line = format!("{at}: {event}");
            async move {
                if let Ok(mut events) = CLIENT_EVENTS.lock() {
                    if events.len() < CLIENT_EVENTS_KEPT {
                        events.push(line);
                    }
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| err(format!("cannot connect to {url}: {e}")))
}

/// A round trip through the server: when it returns, every earlier SUB of `c` is in place.
pub(super) async fn round_trip(c: &async_nats::Client) -> Result<(), BenchError> {
    match c.request("_bench.sync", Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(err(format!("round trip failed: {e}"))),
    }
}

/// A client on `url` subscribed to `subject`, with the SUB known to be in place.
pub(super) async fn subscriber(
    url: &str,
    subject: &str,
) -> Result<(async_nats::Client, async_nats::Subscriber), BenchError> {
    let c = connect(url).await?;
    let sub = c
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| err(format!("subscribe failed: {e}")))?;
    round_trip(&c).await?;
    Ok((c, sub))
}

pub(super) fn unique_subject(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench.{tag}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One throughput run's result.
#[derive(Debug, Clone)]
pub(super) struct Throughput {
    pub(super) messages: u64,
    pub(super) seconds: f64,
    /// CPU seconds of each hop during the run.
    pub(super) cpu: [f64; 2],
    /// RSS of each hop in KiB, sampled once a second.
    pub(super) rss: Vec<[u64; 2]>,
    /// Calls each proxy made to the root's KMS over its life (start, rotations); `None` for
    /// paths without proxies.
    pub(super) kms: Option<[u64; 2]>,
}

impl Throughput {
    pub(super) fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

pub(super) async fn throughput(
    params: &Params,
    hops: &Hops,
    size: usize,
    stop_rotating: &AtomicBool,
) -> Result<Throughput, BenchError> {
    let subject = unique_subject("tp");
    let mut received = Vec::new();
    let mut sub_clients = Vec::new();
    // Dropped with the run, which ends the subscriptions: a counting task left behind would
    // keep its connection redialling a hop that is gone.
    let mut counters = tokio::task::JoinSet::new();
    for _ in 0..params.subs {
        let (c, mut sub) = subscriber(&hops.sub_url, &subject).await?;
        let n = Arc::new(AtomicU64::new(0));
        let counter = n.clone();
        counters.spawn(async move {
            while sub.next().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        received.push(n);
        sub_clients.push(c);
    }
    let mut pub_clients = Vec::new();
    for _ in 0..params.pubs {
        pub_clients.push(connect(&hops.pub_url).await?);
    }
    let payload = Bytes::from(pattern(size));
    let window = (WINDOW_BYTES / size as u64).clamp(64, WINDOW_MESSAGES);
    let published = Arc::new(AtomicU64::new(0));
    let received = Arc::new(received);
    let per_pub = params.count.map(|c| c.div_ceil(params.pubs as u64));
    let cpu0: Vec<f64> = hops.procs.iter().map(Proc::cpu_seconds).collect();
    let pids: Vec<u32> = hops.procs.iter().map(Proc::pid).collect();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let sampling = sampling.clone();
        async move {
            let mut rss = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                let mut row = [0u64; 2];
                for (i, pid) in pids.iter().enumerate().take(2) {
                    row[i] = status_kib(*pid, "VmRSS");
                }
                rss.push(row);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            rss
        }
    });
    let start = Instant::now();
    let deadline = start + params.duration;
    let mut tasks = Vec::new();
    for c in pub_clients {
        let (subject, payload) = (subject.clone(), payload.clone());
        let (published, received) = (published.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0u64;
            loop {
                if per_pub.map_or(Instant::now() >= deadline, |n| mine >= n) {
                    break;
                }
                if mine.is_multiple_of(64) {
                    // Keep the slowest subscriber within the window.
                    loop {
                        let slowest = received
                            .iter()
                            .map(|r| r.load(Ordering::Relaxed))
                            .min()
                            .unwrap_or(0);
                        if published.load(Ordering::Relaxed) < slowest + window {
                            break;
                        }
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                if c.publish(subject.clone(), payload.clone()).await.is_err() {
                    return Err(err("publish failed"));
                }
                mine += 1;
                published.fetch_add(1, Ordering::Relaxed);
            }
            c.flush()
                .await
                .map_err(|e| err(format!("flush failed: {e}")))?;
            Ok(c)
        }));
    }
    let mut publishers = Vec::new();
    for t in tasks {
        // Kept open until the subscribers have everything: `flush` only hands the bytes to the
        // socket, and a client that closes with something unread (the server's first PING
        // comes about two seconds in) resets its connection, discarding what it had not sent.
        publishers.push(t.await.map_err(|e| err(e.to_string()))??);
    }
    let total = published.load(Ordering::Relaxed);
    let mut last = (0u64, Instant::now());
    loop {
        let slowest = received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if slowest >= total {
            break;
        }
        if slowest != last.0 {
            last = (slowest, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(err(format!(
                "subscribers stalled at {slowest} of {total} messages"
            )));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(publishers);
    stop_rotating.store(true, Ordering::Relaxed);
    let mut cpu = [0.0; 2];
    for (i, p) in hops.procs.iter().enumerate().take(2) {
        cpu[i] = p.cpu_seconds() - cpu0[i];
    }
    sampling.store(false, Ordering::Relaxed);
    let rss = sampler.await.unwrap_or_default();
    Ok(Throughput {
        messages: total,
        seconds,
        cpu,
        rss,
        kms: None,
    })
}

/// How often each proxy of a pair has called the root's KMS so far: the sum of its
/// `cipherbus_kms_requests_total` series, read from its admin endpoint. `None` for a path
/// without proxies.
pub(super) async fn kms_requests(hops: &Hops) -> Result<Option<[u64; 2]>, BenchError> {
    if hops.procs.is_empty() {
        return Ok(None);
    }
    let mut out = [0u64; 2];
    for (i, p) in hops.procs.iter().enumerate().take(2) {
        let Some(admin) = p.admin else {
            return Ok(None);
        };
        let text = tokio::time::timeout(Duration::from_secs(5), get_metrics(admin))
            .await
            .map_err(|_| err(format!("{} did not answer on {admin}", p.name)))?
            .map_err(|e| {
                err(format!(
                    "cannot read the metrics of {} on {admin}: {e}",
                    p.name
                ))
            })?;
        out[i] = sum_series(&text, "cipherbus_kms_requests_total");
    }
    Ok(Some(out))
}

pub(super) async fn get_metrics(admin: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            text.lines().next().unwrap_or("no answer").to_owned(),
        ));
    }
    Ok(text)
}

/// The sum of every series of `metric` (any labels) in Prometheus text.
pub(super) fn sum_series(text: &str, metric: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

pub(super) fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 + 7) as u8).collect()
}

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Latency {
    pub(super) rate: u64,
    pub(super) samples: usize,
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
}

pub(super) async fn latency(
    hops: &Hops,
    size: usize,
    rate: u64,
    duration: Duration,
    base: Instant,
) -> Result<Latency, BenchError> {
    let subject = unique_subject("lat");
    let (_sub_client, mut sub) = subscriber(&hops.sub_url, &subject).await?;
    let pub_client = connect(&hops.pub_url).await?;
    let total = ((rate as f64 * duration.as_secs_f64()) as u64).max(100);
    let collector = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        while let Some(m) = sub.next().await {
            let now = base.elapsed().as_nanos() as u64;
            let sent = m
                .payload
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .unwrap_or(now);
            samples.push(now.saturating_sub(sent));
            if samples.len() as u64 >= total {
                break;
            }
        }
        samples
    });
    // Paced from a plain thread: its sleeps are finer than the runtime's 1 ms timer.
    let handle = tokio::runtime::Handle::current();
    let payload = pattern(size.max(8));
    let pacer = tokio::task::spawn_blocking(move || {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        let mut buf = payload;
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let ts = base.elapsed().as_nanos() as u64;
            buf[..8].copy_from_slice(&ts.to_le_bytes());
            let msg = Bytes::copy_from_slice(&buf);
            if handle
                .block_on(pub_client.publish(subject.clone(), msg))
                .is_err()
            {
                return Err(err("publish failed"));
            }
        }
        handle
            .block_on(pub_client.flush())
            .map_err(|e| err(format!("flush failed: {e}")))?;
        Ok(pub_client)
    });
    // Open until every message has arrived, as in the throughput runs.
    let pub_client = pacer.await.map_err(|e| err(e.to_string()))??;
    let mut samples = tokio::time::timeout(STALL, collector)
        .await
        .map_err(|_| err("latency run: not every message arrived"))?
        .map_err(|e| err(e.to_string()))?;
    drop(pub_client);
    let skip = (samples.len() as f64 * LATENCY_WARMUP) as usize;
    samples.drain(..skip);
    samples.sort_unstable();
    let pct = |q: f64| -> f64 {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    Ok(Latency {
        rate,
        samples: samples.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
    })
}

/// How long one rotation may take before the run is called failed.
pub(super) const ROTATION_ANSWER: Duration = Duration::from_secs(30);

/// Asks the authority in the publishing proxy to rotate, again and again, until told to stop.
pub(super) async fn keep_rotating(
    url: String,
    root: Arc<cipherbus::kek::Root>,
    prefix: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Result<u64, BenchError> {
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let asked = cipherbus::control::authority::request_rotation(
            vec![url.clone()],
            &root,
            &prefix,
            "bench",
        );
        tokio::time::timeout(ROTATION_ANSWER, asked)
            .await
            .map_err(|_| err("rotation failed: no answer from the key authority"))?
            .map_err(|e| err(format!("rotation failed: {e}")))?;
        done += 1;
    }
    Ok(done)
}
