//! One agent connection: its upstream connection, the INFO handshake, and the two pumps.
//!
//! This module owns the I/O of a session. It dials the upstream (with failover over the
//! configured servers), waits for the server's INFO before saying anything to the agent (the
//! nonce is needed), then runs two pumps until either side closes:
//! - agent → upstream: parse client ops, apply [`transform::Outbound`], write upstream;
//! - upstream → agent: parse server ops, rewrite INFO, apply [`transform::Inbound`], write to
//!   the agent.
//!
//! Each pump writes what it parsed from one read before it reads again, so memory per
//! direction is bounded by one read buffer and its output: a slow agent stalls the upstream
//! read, and the server sees a slow consumer, as it would without the proxy.

pub mod info;
pub mod transform;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout_at, Instant};
use tracing::Instrument;

use crate::config::{Config, Upstream};
use crate::envelope::OVERHEAD;
use crate::keyring::Keyring;
use crate::metrics::Metrics;
use crate::proto::{self, ClientOp, ClientParser, ProtoError, ServerOp, ServerParser};
use crate::tls::{AgentTls, AgentTlsMode, UpstreamTls, AUTO_WAIT};
use info::{InfoRewrite, ListenerTls};
use transform::{Inbound, Outbound, Replies};

/// Bytes asked of the kernel per read; the buffer grows only for a larger op.
const READ_CHUNK: usize = 32 * 1024;
/// Buffers larger than this are released once empty, so idle connections stay small.
const KEEP_CAPACITY: usize = 128 * 1024;
/// A pump whose reads have been quiet this long gives back its buffers.
const IDLE_AFTER: Duration = Duration::from_secs(1);
/// Bytes asked of the kernel by a connection's first read, and the first after a quiet spell;
/// the ask doubles while reads fill it, up to [`READ_CHUNK`].
const FIRST_CHUNK: usize = 2 * 1024;
/// Room above the upstream's max_payload for an MSG's headers and envelope from other senders.
const SERVER_PAYLOAD_SLACK: usize = 64 * 1024;
/// `-ERR` notices waiting for the agent; a full queue slows the agent's own reads.
const NOTICE_QUEUE: usize = 64;
/// How long a server in lame-duck mode is tried last for new upstream connections: the
/// server's default lame-duck duration, after which it has shut down or come back.
const LAME_DUCK_AVOID: Duration = Duration::from_secs(120);
/// How long a session whose agent has gone waits for the server to close the upstream
/// connection, after telling it no more is coming. Dropping the connection while the server
/// still has something to say would reset it, and a reset discards whatever the server has not
/// read yet: the agent's last messages.
const UPSTREAM_DRAIN: Duration = Duration::from_secs(10);
/// How long an agent that broke the protocol waits for the server to answer what it sent
/// before the bad op, before it is told `-ERR` and closed anyway.
const FENCE_WAIT: Duration = Duration::from_secs(2);

/// State shared by every session of one proxy.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    /// Every key scope this proxy holds, the default one first.
    pub scopes: Arc<crate::scope::Scopes>,
    /// The subject policy in force: `config.policy` until a reload replaces it. Sessions read
    /// it once per batch of ops, so a reload reaches connected agents at their next message.
    pub policy: arc_swap::ArcSwap<crate::policy::Policy>,
    pub metrics: Arc<Metrics>,
    pub rewrite: InfoRewrite,
    /// TLS on the agent listener.
    pub agent_tls: Option<Arc<AgentTls>>,
    /// TLS towards the upstream, when configured or asked for by a server's INFO.
    pub upstream_tls: UpstreamTls,
    /// Index of the upstream tried first; moves on when a server fails.
    preferred: AtomicUsize,
    /// Per upstream: until when (milliseconds since `born`) it is draining in lame-duck mode.
    draining: Vec<AtomicU64>,
    born: Instant,
}

impl Shared {
    pub fn new(
        config: Config,
        scopes: Arc<crate::scope::Scopes>,
        metrics: Arc<Metrics>,
        listen: SocketAddr,
        agent_tls: Option<Arc<AgentTls>>,
        upstream_tls: UpstreamTls,
    ) -> Self {
        let tls = match agent_tls.as_deref() {
            None => ListenerTls::default(),
            Some(t) => ListenerTls {
                required: t.mode != AgentTlsMode::Optional,
                available: t.mode == AgentTlsMode::Optional,
                verify: t.verify_clients,
            },
        };
        let config_upstreams = config.upstreams.len();
        let rewrite = InfoRewrite {
            host: listen.ip().to_string(),
            port: listen.port(),
            tls,
            // With named scopes, some envelopes carry a scope id.
            overhead: if scopes.named() {
                crate::envelope::MAX_OVERHEAD
            } else {
                OVERHEAD
            },
        };
        Shared {
            policy: arc_swap::ArcSwap::from_pointee(config.policy.clone()),
            config,
            scopes,
            metrics,
            rewrite,
            agent_tls,
            upstream_tls,
            preferred: AtomicUsize::new(0),
            draining: (0..config_upstreams).map(|_| AtomicU64::new(0)).collect(),
            born: Instant::now(),
        }
    }

    /// Upstream `i` announced lame-duck mode: new connections try it last for a while.
    fn lame_duck(&self, i: usize) {
        let until = (self.born.elapsed() + LAME_DUCK_AVOID).as_millis() as u64;
        if let Some(d) = self.draining.get(i) {
            d.store(until, Ordering::Relaxed);
        }
        let n = self.draining.len().max(1);
        let _ =
            self.preferred
                .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn is_draining(&self, i: usize) -> bool {
        let now = self.born.elapsed().as_millis() as u64;
        self.draining
            .get(i)
            .is_some_and(|d| now < d.load(Ordering::Relaxed))
    }
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

fn split_tcp(s: TcpStream) -> (Reader, Writer) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(w))
}

fn split_any<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

/// The first byte of a TLS ClientHello record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Waits up to `wait` for the agent's first byte and tells whether it starts a TLS handshake.
async fn sniff_tls(tcp: &TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, tcp.peek(&mut b)).await,
        Ok(Ok(1)) if b[0] == TLS_HANDSHAKE
    )
}

/// Why a session ended early; logged once, at debug or warn.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no upstream server answered within {0:?}")]
    NoUpstream(Duration),
    #[error("upstream {upstream} sent no INFO: {why}")]
    Handshake { upstream: String, why: String },
    #[error("TLS handshake with {side}: {source}")]
    Tls {
        side: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o with {side}: {source}")]
    Io {
        side: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs one agent connection to its end.
pub async fn run(
    shared: Arc<Shared>,
    agent: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<()>,
) {
    let span = tracing::info_span!("session", %peer, upstream = tracing::field::Empty);
    async move {
        match serve(&shared, agent, shutdown).await {
            Ok(()) => tracing::debug!("session closed"),
            Err(e @ SessionError::NoUpstream(_)) => {
                shared
                    .metrics
                    .connections_refused
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: "no_upstream",
                    })
                    .inc();
                tracing::warn!(error = %e, "agent turned away")
            }
            Err(e) => tracing::debug!(error = %e, "session ended"),
        }
    }
    .instrument(span)
    .await
}

async fn serve(
    shared: &Shared,
    agent: TcpStream,
    mut shutdown: watch::Receiver<()>,
) -> Result<(), SessionError> {
    let _ = agent.set_nodelay(true);
    let deadline = Instant::now() + shared.config.upstream_connect_timeout;
    let tls = shared.agent_tls.as_deref();
    let tls_err = |source| SessionError::Tls {
        side: "agent",
        source,
    };

    // TLS before INFO: always in `first` mode, and in `auto` mode when a ClientHello comes.
    let mut agent = Some(agent);
    let mut agent_halves: Option<(Reader, Writer)> = None;
    if let Some(t) = tls {
        let early = match t.mode {
            AgentTlsMode::First => true,
            AgentTlsMode::Auto => {
                sniff_tls(agent.as_ref().expect("not taken yet"), AUTO_WAIT).await
            }
            _ => false,
        };
        if early {
            let tcp = agent.take().expect("not taken yet");
            let stream = timeout_at(deadline, t.acceptor().accept(tcp))
                .await
                .map_err(|_| tls_err(std::io::ErrorKind::TimedOut.into()))?
                .map_err(tls_err)?;
            agent_halves = Some(split_any(stream));
        }
    }

    let (upstream, index, which) = dial(shared, deadline).await?;
    tracing::Span::current().record("upstream", tracing::field::display(&which));
    let (info, up_buf, server_parser, (mut up_r, mut up_w)) =
        timeout_at(deadline, upstream_handshake(shared, upstream, &which))
            .await
            .map_err(|_| SessionError::Handshake {
                upstream: which.to_string(),
                why: "timed out".into(),
            })??;
    let rewritten = shared
        .rewrite
        .apply(&info)
        .map_err(|e| SessionError::Handshake {
            upstream: which.to_string(),
            why: e.to_string(),
        })?;
    let max_payload = AtomicUsize::new(rewritten.max_payload);
    let upstream_headers = rewritten.headers;
    let mut out = BytesMut::with_capacity(rewritten.json.len() + 8);
    put_info(&mut out, &rewritten.json);

    // The first INFO must reach the agent before anything else, nonce intact.
    let (mut agent_r, mut agent_w) = match (agent_halves, agent) {
        (Some((r, mut w)), _) => {
            w.write_all(&out).await.map_err(io("agent"))?;
            (r, w)
        }
        (None, Some(mut tcp)) => {
            tcp.write_all(&out).await.map_err(io("agent"))?;
            let upgrade = match tls.map(|t| t.mode) {
                None => false,
                // `auto` without an early ClientHello falls back to the classic upgrade.
                Some(AgentTlsMode::Required | AgentTlsMode::Auto | AgentTlsMode::First) => true,
                Some(AgentTlsMode::Optional) => sniff_tls(&tcp, OPTIONAL_SNIFF).await,
            };
            match (upgrade, tls) {
                (true, Some(t)) => {
                    let stream = tokio::time::timeout(TLS_UPGRADE, t.acceptor().accept(tcp))
                        .await
                        .map_err(|_| tls_err(std::io::ErrorKind::TimedOut.into()))?
                        .map_err(tls_err)?;
                    split_any(stream)
                }
                _ => split_tcp(tcp),
            }
        }
        (None, None) => unreachable!("the agent stream is either upgraded or still here"),
    };

    let replies = Replies::default();
    let fence = Fence::default();
    let (notice_tx, notice_rx) = mpsc::channel::<Notice>(NOTICE_QUEUE);
    let (fatal, drain) = {
        let c2s = agent_to_upstream(
            shared,
            &mut agent_r,
            &mut up_w,
            &max_payload,
            upstream_headers,
            &replies,
            &fence,
            notice_tx,
        );
        let s2c = upstream_to_agent(
            shared,
            &mut up_r,
            &mut agent_w,
            up_buf,
            server_parser,
            index,
            &max_payload,
            &replies,
            &fence,
            notice_rx,
        );
        tokio::pin!(c2s, s2c);
        tokio::select! {
            end = &mut s2c => {
                tracing::debug!(?end, "upstream side ended");
                // Unless the server closed, it may still be reading what the agent sent.
                let drain = !matches!(end, End::Closed);
                (false, drain.then(|| Instant::now() + UPSTREAM_DRAIN))
            }
            end = &mut c2s => {
                tracing::debug!(?end, "agent side ended");
                if matches!(end, End::Fatal) {
                    // The upstream pump forwards the server's answers up to the fence, writes the
                    // -ERR, then stops. Whatever else the server has not read yet is drained, as
                    // for a close, so dropping the connection cannot reset it away.
                    let end = tokio::time::timeout(FENCE_WAIT + Duration::from_secs(1), &mut s2c)
                        .await;
                    let drain = !matches!(end, Ok(End::Closed));
                    (true, drain.then(|| Instant::now() + UPSTREAM_DRAIN))
                } else {
                    // The agent is done and the server has been told. Deliver what the server
                    // still sends until it closes, which it does once it has read everything.
                    let until = Instant::now() + UPSTREAM_DRAIN;
                    tokio::select! {
                        end = timeout_at(until, &mut s2c) => match end {
                            // The agent cannot be written to: discard the rest until then.
                            Ok(End::Io(_) | End::Fatal) => (false, Some(until)),
                            Ok(End::Closed) | Err(_) => (false, None),
                        },
                        _ = shutdown.changed() => (false, None),
                    }
                }
            }
            _ = shutdown.changed() => (false, None),
        }
    };
    // The two sides close together: an agent told -ERR does not wait for the server.
    let upstream = async {
        if let Some(until) = drain {
            // Nobody left to deliver to: read and discard until the server closes.
            let _ = up_w.shutdown().await;
            let mut sink = [0u8; 4096];
            let discard = async { while matches!(up_r.read(&mut sink).await, Ok(n) if n > 0) {} };
            tokio::select! {
                _ = timeout_at(until, discard) => {}
                _ = shutdown.changed() => {}
            }
        }
    };
    let agent = async {
        let _ = agent_w.shutdown().await;
        if fatal {
            // Read what the agent still sends for a moment, so closing with unread data does
            // not reset the connection before the agent reads our -ERR.
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_millis(250), async {
                while matches!(agent_r.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
    };
    tokio::join!(upstream, agent);
    Ok(())
}

fn io(side: &'static str) -> impl Fn(std::io::Error) -> SessionError {
    move |source| SessionError::Io { side, source }
}

/// Connects to the first upstream that answers, trying the preferred one first and servers in
/// lame-duck mode last, with backoff between rounds until `deadline`. Returns the server's index.
async fn dial(
    shared: &Shared,
    deadline: Instant,
) -> Result<(TcpStream, usize, Upstream), SessionError> {
    let ups = &shared.config.upstreams;
    let mut backoff = Duration::from_millis(25);
    loop {
        let first = shared.preferred.load(Ordering::Relaxed) % ups.len();
        let mut order: Vec<usize> = (0..ups.len()).map(|k| (first + k) % ups.len()).collect();
        // A stable sort: the rotation order stays, draining servers move to the end.
        order.sort_by_key(|&i| shared.is_draining(i));
        for i in order {
            let up = &ups[i];
            match timeout_at(deadline, TcpStream::connect((up.host.as_str(), up.port))).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    if i != first && !shared.is_draining(i) {
                        shared.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok((s, i, up.clone()));
                }
                Ok(Err(e)) => {
                    shared.metrics.upstream_connect_failures.inc();
                    tracing::debug!(upstream = %up, error = %e, "upstream connect failed");
                }
                Err(_) => {
                    return Err(SessionError::NoUpstream(
                        shared.config.upstream_connect_timeout,
                    ))
                }
            }
        }
        if Instant::now() + backoff >= deadline {
            return Err(SessionError::NoUpstream(
                shared.config.upstream_connect_timeout,
            ));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(400));
    }
}

/// How long `optional` mode waits for the agent's first byte before going on in plaintext.
const OPTIONAL_SNIFF: Duration = Duration::from_secs(2);
/// How long an agent has for the TLS handshake after INFO.
const TLS_UPGRADE: Duration = Duration::from_secs(5);

/// Reads the server's INFO, with TLS first, after INFO, or not at all: as configured, as the
/// URL says (`tls://`), or as the server's INFO demands (`tls_required`).
async fn upstream_handshake(
    shared: &Shared,
    tcp: TcpStream,
    which: &Upstream,
) -> Result<(bytes::Bytes, BytesMut, ServerParser, (Reader, Writer)), SessionError> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut parser = ServerParser::new();
    let tls = &shared.upstream_tls;
    let tls_err = |source| SessionError::Tls {
        side: "upstream",
        source,
    };
    if tls.first {
        let mut stream = tls.connect(&which.host, tcp).await.map_err(tls_err)?;
        let info = first_info(&mut stream, &mut buf, &mut parser).await?;
        return Ok((info, buf, parser, split_any(stream)));
    }
    let mut tcp = tcp;
    let info = first_info(&mut tcp, &mut buf, &mut parser).await?;
    let required = serde_json::from_slice::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v.get("tls_required").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    if required || which.tls || shared.config.upstream_tls.configured() {
        if !buf.is_empty() {
            return Err(SessionError::Handshake {
                upstream: which.to_string(),
                why: "data after INFO before the TLS upgrade".into(),
            });
        }
        let stream = tls.connect(&which.host, tcp).await.map_err(tls_err)?;
        return Ok((info, buf, parser, split_any(stream)));
    }
    Ok((info, buf, parser, split_tcp(tcp)))
}

async fn first_info<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    parser: &mut ServerParser,
) -> Result<bytes::Bytes, SessionError> {
    loop {
        match parser.parse(buf, 1 << 20) {
            Ok(Some((ServerOp::Info(json), len))) => {
                let json = bytes::Bytes::copy_from_slice(json);
                buf.advance(len);
                return Ok(json);
            }
            Ok(Some(_)) => {
                return Err(SessionError::Handshake {
                    upstream: String::new(),
                    why: "the first op was not INFO".into(),
                })
            }
            Ok(None) => {}
            Err(e) => {
                return Err(SessionError::Handshake {
                    upstream: String::new(),
                    why: e.to_string(),
                })
            }
        }
        buf.reserve(4096);
        if r.read_buf(buf).await.map_err(io("upstream"))? == 0 {
            return Err(SessionError::Handshake {
                upstream: String::new(),
                why: "connection closed".into(),
            });
        }
    }
}

fn put_info(out: &mut BytesMut, json: &[u8]) {
    out.extend_from_slice(b"INFO ");
    out.extend_from_slice(json);
    out.extend_from_slice(b" \r\n");
}

/// Something the agent pump asks the upstream pump to tell the agent.
#[derive(Debug)]
enum Notice {
    /// A `-ERR` after which the connection goes on (permissions).
    Err(String),
    /// The agent broke the protocol; the [`Fence`] says what to tell it, and when.
    Fatal,
}

/// The end of a session whose agent broke the protocol.
///
/// nats-server answers every op before the bad one (`PONG`, `+OK`, `-ERR 'Invalid Publish
/// Subject'`, deliveries to the agent's own subscriptions) before it sends its `-ERR` and closes.
/// So the agent pump, after writing the last good op upstream, sends a `PING` of its own: the
/// upstream pump forwards everything until that PING's `PONG`, swallows it, and only then tells
/// the agent `-ERR`. If the server closes first (it refused something earlier, such as the
/// CONNECT or, with auth, any op before it), the agent gets the server's answer and its close
/// instead, as it would without the proxy.
#[derive(Debug, Default)]
struct Fence {
    /// Which `PONG` from the server answers the fence's PING, counting from 1; 0 until the
    /// agent pump sets it, which it does before the PING is written.
    pong: AtomicU64,
    /// The `-ERR` text for the agent; `None` closes silently.
    text: OnceLock<Option<&'static str>>,
}

impl Fence {
    fn is_ours(&self, pong: u64) -> bool {
        let at = self.pong.load(Ordering::SeqCst);
        at != 0 && at == pong
    }

    fn text(&self) -> Option<&'static str> {
        self.text.get().copied().flatten()
    }
}

#[derive(Debug)]
enum End {
    /// The peer closed its side.
    Closed,
    /// A protocol violation; the agent is told and the session closes.
    Fatal,
    /// Reading or writing failed.
    Io(#[allow(dead_code)] std::io::Error),
}

/// How long one connection's delivery is held for a newer epoch's key.
const EPOCH_HOLD: Duration = Duration::from_secs(2);

/// Asks for a keyring sync and waits until `epoch` is known here, or [`EPOCH_HOLD`] passes.
async fn wait_for_epoch(keyring: &Keyring, epoch: u32) -> bool {
    keyring.want_sync();
    let deadline = Instant::now() + EPOCH_HOLD;
    loop {
        if keyring.snapshot().state(epoch).is_some() {
            return true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(epoch, "no key arrived for a newer epoch");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reserves room for the next read: a chunk, or the rest of a payload under way.
///
/// A declared size is a claim, not bytes: the room reserved for a payload is at most what has
/// already arrived (or [`KEEP_CAPACITY`]), so a peer that declares max_payload and then sends
/// one byte costs a small buffer, and a real large payload grows it by doubling.
fn prepare_read(buf: &mut BytesMut, needed: Option<usize>, chunk: usize) {
    if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
        *buf = BytesMut::new();
    }
    let want = needed.map_or(chunk, |n| {
        n.min(buf.len().max(KEEP_CAPACITY)).max(READ_CHUNK)
    });
    buf.reserve(want);
}

/// Sizes a pump's reads: small while the connection is quiet, growing while reads come back
/// full; and notices when reads go quiet, so an idle connection holds no large buffers.
///
/// The timer is re-armed only when it fires, not on every read, so a busy pump pays one clock
/// read per read.
struct Idle {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    last_read: Instant,
    chunk: usize,
    /// Buffers were given back; the timer rests until data flows again.
    quiet: bool,
}

impl Idle {
    fn new() -> Self {
        let now = Instant::now();
        Idle {
            timer: Box::pin(tokio::time::sleep_until(now + IDLE_AFTER)),
            last_read: now,
            chunk: FIRST_CHUNK,
            quiet: false,
        }
    }

    fn chunk(&self) -> usize {
        self.chunk
    }

    /// A read of `n` bytes into a buffer that had `room` bytes free. A read of a whole
    /// [`READ_CHUNK`] counts as full even with more room: a buffer grown for payloads has far
    /// more room than a read fills, and a streaming connection judged by it looked idle and
    /// gave its output buffer back after every write.
    fn read(&mut self, n: usize, room: usize) {
        self.last_read = Instant::now();
        let full = room.min(READ_CHUNK);
        if n >= full {
            self.chunk = (self.chunk * 2).min(READ_CHUNK);
        } else if n < full / 2 {
            self.chunk = (self.chunk / 2).max(FIRST_CHUNK);
        }
        if self.quiet {
            self.quiet = false;
            self.timer.as_mut().reset(self.last_read + IDLE_AFTER);
        }
    }

    /// After a read's output is written: a connection that is not streaming keeps no more
    /// buffer than its reads need, so one large message does not stay allocated.
    fn settle(&self, buf: &mut BytesMut, out: &mut BytesMut) {
        let keep = (4 * self.chunk).min(KEEP_CAPACITY);
        if buf.is_empty() && buf.capacity() > keep {
            *buf = BytesMut::new();
        }
        if out.capacity() > keep {
            *out = BytesMut::new();
        } else {
            out.clear();
        }
    }

    /// The timer fired: gives back the buffers if no read came for [`IDLE_AFTER`]. True when
    /// the pump has just gone quiet, so the caller drops its cached subkeys too.
    fn fired(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> bool {
        if self.last_read.elapsed() < IDLE_AFTER {
            self.timer.as_mut().reset(self.last_read + IDLE_AFTER);
            return false;
        }
        self.quiet = true;
        self.chunk = FIRST_CHUNK;
        if buf.is_empty() {
            *buf = BytesMut::new();
        }
        if out.is_empty() {
            *out = BytesMut::new();
        }
        true
    }
}

fn release(out: &mut BytesMut) {
    if out.capacity() > KEEP_CAPACITY {
        *out = BytesMut::new();
    } else {
        out.clear();
    }
}

#[allow(clippy::too_many_arguments)]
async fn agent_to_upstream<R, W>(
    shared: &Shared,
    agent_r: &mut R,
    up_w: &mut W,
    max_payload: &AtomicUsize,
    upstream_headers: bool,
    replies: &Replies,
    fence: &Fence,
    notices: mpsc::Sender<Notice>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut parser = ClientParser::new();
    // As on the server: no header ops until a CONNECT enables them.
    parser.allow_headers(false);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut outbound = Outbound::new(shared.config.aead);
    let mut idle = Idle::new();
    let metrics = &shared.metrics;
    // PINGs forwarded upstream: the server answers each with one PONG, in order.
    let mut pings: u64 = 0;
    loop {
        prepare_read(&mut buf, parser.needed(), idle.chunk());
        let room = buf.capacity() - buf.len();
        tokio::select! {
            biased;
            read = agent_r.read_buf(&mut buf) => match read {
                Ok(0) => {
                    // Everything read has been written: let the server read it to the end.
                    let _ = up_w.shutdown().await;
                    return End::Closed;
                }
                Ok(n) => idle.read(n, room),
                Err(e) => {
                    let _ = up_w.shutdown().await;
                    return End::Io(e);
                }
            },
            () = idle.timer.as_mut(), if !idle.quiet => {
                if idle.fired(&mut buf, &mut out) {
                    outbound.forget_keys();
                }
                continue;
            }
        }
        let keys = shared.scopes.keys();
        let policy_now = shared.policy.load_full();
        let policy: &crate::policy::Policy = &policy_now;
        let limit = max_payload.load(Ordering::Relaxed);
        let mut failure: Option<ProtoError> = None;
        // Ops borrow `buf`; what they took is consumed once they are all handled.
        let mut used = 0;
        loop {
            match parser.parse(&buf[used..], limit) {
                Ok(Some((op, len))) => {
                    if used == 0 {
                        // Sealing adds OVERHEAD per message, under half again at small
                        // payloads: one allocation for the output instead of a chain of
                        // reallocations that copy it. Only once an op is complete, so a
                        // payload still arriving costs no output buffer.
                        out.reserve(buf.len() + (buf.len() / 2).min(READ_CHUNK));
                    }
                    used += len;
                    match op {
                        ClientOp::Ping => pings += 1,
                        ClientOp::Connect(json) => {
                            if let Some(on) = info::connect_headers(json) {
                                parser.allow_headers(upstream_headers && on);
                            }
                        }
                        _ => {}
                    }
                    if let Err(e) = outbound.handle(op, policy, &keys, replies, metrics, &mut out) {
                        // Sealing fails only if randomness is unavailable: fail closed.
                        tracing::error!(error = %e, "cannot seal; closing the session");
                        return End::Fatal;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        buf.advance(used);
        drop((keys, policy_now));
        if let Err(e) = outbound.finish(&mut out) {
            // `out` holds plaintext where ciphertext goes: it is never sent.
            tracing::error!(error = %e, "cannot seal; closing the session");
            return End::Fatal;
        }
        outbound.flush_metrics(metrics);
        if !out.is_empty() {
            if let Err(e) = up_w.write_all(&out).await {
                return End::Io(e);
            }
            idle.settle(&mut buf, &mut out);
        }
        for text in outbound.notices.drain(..) {
            if notices.send(Notice::Err(text)).await.is_err() {
                return End::Closed;
            }
        }
        if let Some(e) = failure {
            metrics.protocol_error(e.reason());
            tracing::debug!(error = %e, "agent protocol violation");
            let _ = fence.text.set(e.server_err());
            // Set before the PING is written, so its PONG is never taken for the agent's.
            fence.pong.store(pings + 1, Ordering::SeqCst);
            if let Err(e) = up_w.write_all(b"PING\r\n").await {
                return End::Io(e);
            }
            let _ = notices.send(Notice::Fatal).await;
            return End::Fatal;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn upstream_to_agent<R, W>(
    shared: &Shared,
    up_r: &mut R,
    agent_w: &mut W,
    mut buf: BytesMut,
    mut parser: ServerParser,
    upstream: usize,
    max_payload: &AtomicUsize,
    replies: &Replies,
    fence: &Fence,
    mut notices: mpsc::Receiver<Notice>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    let mut inbound = Inbound::new(shared.config.aead);
    let mut idle = Idle::new();
    let metrics = &shared.metrics;
    let mut notices_open = true;
    // PONGs seen from the server, to find the fence's; and once the agent has broken the
    // protocol, how long the server is waited for.
    let mut pongs: u64 = 0;
    let mut fence_until: Option<Instant> = None;
    loop {
        // Ops already buffered (after the first INFO) are handled before reading again.
        let mut closed = false;
        let mut failure = false;
        let mut fenced = false;
        {
            let mut keys = shared.scopes.keys();
            let policy_now = shared.policy.load_full();
            let policy: &crate::policy::Policy = &policy_now;
            let limit = max_payload.load(Ordering::Relaxed)
                + crate::envelope::MAX_OVERHEAD
                + SERVER_PAYLOAD_SLACK;
            // Ops borrow `buf`; what they took is consumed once they are all handled.
            let mut used = 0;
            loop {
                let op = parser.parse(&buf[used..], limit);
                if let Ok(Some((op, len))) = &op {
                    if used == 0 {
                        // Opening shrinks every message: the output fits in what was read.
                        out.reserve(buf.len());
                    }
                    used += len;
                    if let Some((scope, epoch)) = inbound.pending_epoch(op, policy, &keys) {
                        // A newer epoch than any known: its announcement may still be on its
                        // way. Hold this connection's delivery briefly instead of dropping.
                        drop(keys);
                        inbound.finish(&mut out, metrics);
                        if !out.is_empty() {
                            if let Err(e) = agent_w.write_all(&out).await {
                                return End::Io(e);
                            }
                            release(&mut out);
                        }
                        let waited = match shared.scopes.get(scope) {
                            Some(held) => wait_for_epoch(&held.keyring, epoch).await,
                            None => false,
                        };
                        if !waited {
                            inbound.epoch_unavailable(scope, epoch);
                        }
                        keys = shared.scopes.keys();
                    }
                }
                match op {
                    Ok(Some((ServerOp::Info(json), _))) => {
                        match shared.rewrite.apply(json) {
                            Ok(rw) => {
                                max_payload.store(rw.max_payload, Ordering::Relaxed);
                                if rw.lame_duck {
                                    // Passed on to the agent (`ldm` is kept), as the server does.
                                    tracing::info!("upstream entered lame duck mode; new connections go elsewhere");
                                    shared.lame_duck(upstream);
                                }
                                put_info(&mut out, &rw.json);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "upstream sent a bad INFO; closing");
                                failure = true;
                                break;
                            }
                        }
                    }
                    Ok(Some((ServerOp::Pong, _))) => {
                        pongs += 1;
                        if fence.is_ours(pongs) {
                            // The server has answered everything before the agent's bad op.
                            fenced = true;
                            break;
                        }
                        proto::encode_server_op(&ServerOp::<&[u8]>::Pong, &mut out);
                    }
                    Ok(Some((op, _))) => {
                        inbound.handle(op, policy, &keys, replies, metrics, &mut out)
                    }
                    Ok(None) => break,
                    Err(e) => {
                        metrics.protocol_error(e.reason());
                        tracing::warn!(error = %e, "upstream protocol violation; closing");
                        failure = true;
                        break;
                    }
                }
            }
            buf.advance(used);
        }
        inbound.finish(&mut out, metrics);
        inbound.flush_metrics(metrics);
        if fenced {
            if let Some(text) = fence.text() {
                proto::put_err(&mut out, text);
            }
            let _ = agent_w.write_all(&out).await;
            return End::Fatal;
        }
        if !out.is_empty() {
            if let Err(e) = agent_w.write_all(&out).await {
                return End::Io(e);
            }
            idle.settle(&mut buf, &mut out);
        }
        if failure {
            return End::Fatal;
        }
        prepare_read(&mut buf, parser.needed(), idle.chunk());
        let room = buf.capacity() - buf.len();
        tokio::select! {
            biased;
            notice = notices.recv(), if notices_open => match notice {
                Some(Notice::Err(text)) => {
                    proto::put_err(&mut out, &text);
                }
                Some(Notice::Fatal) => {
                    fence_until = Some(Instant::now() + FENCE_WAIT);
                    notices_open = false;
                }
                None => notices_open = false,
            },
            () = tokio::time::sleep_until(fence_until.unwrap_or_else(Instant::now)),
                if fence_until.is_some() =>
            {
                // The server did not answer in time: tell the agent anyway.
                if let Some(text) = fence.text() {
                    proto::put_err(&mut out, text);
                }
                let _ = agent_w.write_all(&out).await;
                return End::Fatal;
            }
            read = up_r.read_buf(&mut buf) => match read {
                Ok(0) => closed = true,
                Ok(n) => idle.read(n, room),
                Err(e) => return End::Io(e),
            },
            () = idle.timer.as_mut(), if !idle.quiet => {
                if idle.fired(&mut buf, &mut out) {
                    inbound.forget_keys();
                }
            }
        }
        if closed {
            // Whatever the server said last (a final -ERR) was forwarded above.
            return End::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_size_is_not_reserved_before_its_bytes_arrive() {
        let declared = 8 << 20;
        let mut buf = BytesMut::new();
        prepare_read(&mut buf, Some(declared), READ_CHUNK);
        assert!(buf.capacity() <= 2 * KEEP_CAPACITY, "{}", buf.capacity());
        // As bytes arrive the room grows with them, at most doubling each time.
        while buf.len() < declared {
            let room = buf.capacity() - buf.len();
            buf.resize(buf.len() + room, 0);
            let needed = (declared + 2).saturating_sub(buf.len());
            prepare_read(&mut buf, Some(needed), READ_CHUNK);
            assert!(buf.capacity() <= 2 * buf.len().max(KEEP_CAPACITY) + READ_CHUNK);
        }
        let mut small = BytesMut::new();
        prepare_read(&mut small, Some(100), READ_CHUNK);
        assert!(
            small.capacity() >= READ_CHUNK,
            "a short payload reads in one chunk"
        );
    }

    #[tokio::test]
    async fn reads_grow_while_full_and_shrink_when_not() {
        let mut idle = Idle::new();
        assert_eq!(idle.chunk(), FIRST_CHUNK);
        for _ in 0..10 {
            let c = idle.chunk();
            idle.read(c, c);
        }
        assert_eq!(
            idle.chunk(),
            READ_CHUNK,
            "full reads grow to the cap and no further"
        );
        idle.read(100, READ_CHUNK);
        assert_eq!(idle.chunk(), READ_CHUNK / 2);
        for _ in 0..10 {
            idle.read(100, idle.chunk());
        }
        assert_eq!(idle.chunk(), FIRST_CHUNK);
    }

    #[tokio::test]
    async fn a_connection_that_is_not_streaming_keeps_no_large_buffer() {
        let mut idle = Idle::new();
        idle.read(100, FIRST_CHUNK);
        // One 16 KiB message went through: both buffers grew for it.
        let mut buf = BytesMut::with_capacity(32 * 1024);
        let mut out = BytesMut::with_capacity(17 * 1024);
        out.extend_from_slice(&[1; 100]);
        idle.settle(&mut buf, &mut out);
        assert_eq!((buf.capacity(), out.capacity()), (0, 0));
        // A streaming connection keeps its buffers between reads.
        for _ in 0..5 {
            let c = idle.chunk();
            idle.read(c, c);
        }
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = BytesMut::with_capacity(READ_CHUNK + 1024);
        idle.settle(&mut buf, &mut out);
        assert!(buf.capacity() >= READ_CHUNK && out.capacity() > READ_CHUNK);
        assert!(out.is_empty());
    }

    /// Reads of 64 KiB into a read buffer grown for payloads to four times that: the pump is
    /// streaming, so it keeps its output buffer between writes instead of growing a new one
    /// every time.
    #[tokio::test]
    async fn a_streaming_pump_keeps_its_output_buffer_when_its_read_buffer_grew() {
        let mut idle = Idle::new();
        for _ in 0..10 {
            idle.read(2 * READ_CHUNK, 8 * READ_CHUNK);
        }
        assert_eq!(idle.chunk(), READ_CHUNK);
        let mut buf = BytesMut::with_capacity(8 * READ_CHUNK);
        buf.extend_from_slice(b"PUB a 16384\r\n");
        let mut out = BytesMut::with_capacity(3 * READ_CHUNK);
        out.extend_from_slice(&[1; 2 * READ_CHUNK]);
        idle.settle(&mut buf, &mut out);
        assert!(out.is_empty() && out.capacity() >= 3 * READ_CHUNK);
        assert_eq!(&buf[..], b"PUB a 16384\r\n");
    }

    #[tokio::test]
    async fn a_quiet_pump_gives_back_its_buffers_and_reads_small_again() {
        let mut idle = Idle::new();
        for _ in 0..5 {
            let c = idle.chunk();
            idle.read(c, c);
        }
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = BytesMut::with_capacity(READ_CHUNK);
        // The timer fired but a read came less than IDLE_AFTER ago: keep everything.
        assert!(!idle.fired(&mut buf, &mut out));
        assert!(!idle.quiet && buf.capacity() >= READ_CHUNK);
        idle.last_read = Instant::now() - IDLE_AFTER;
        assert!(
            idle.fired(&mut buf, &mut out),
            "gone quiet: keys are dropped too"
        );
        assert!(idle.quiet);
        assert_eq!((buf.capacity(), out.capacity()), (0, 0));
        assert_eq!(idle.chunk(), FIRST_CHUNK);
        // Half an op waiting for its rest is never dropped.
        let mut partial = BytesMut::from(&b"PUB a 5\r\nab"[..]);
        idle.fired(&mut partial, &mut out);
        assert_eq!(&partial[..], b"PUB a 5\r\nab");
        idle.read(10, FIRST_CHUNK);
        assert!(!idle.quiet, "data wakes the pump");
    }
}
