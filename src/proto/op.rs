//! The ops of the NATS client protocol, one enum per direction.
//!
//! An op is generic over how it holds its fields. The parsers lend them: every field of a
//! parsed op is a `&[u8]` into the read buffer, so nothing is copied or reference counted.
//! Ops that must outlive the buffer are [`map`](ClientOp::map)ped to an owned type, [`Bytes`]
//! by default.

use bytes::Bytes;

/// An op an agent sends (agent -> proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp<B = Bytes> {
    /// `CONNECT {json}`: the JSON text as sent, without surrounding blanks.
    Connect(B),
    /// `PUB <subject> [reply] <#bytes>`.
    Pub {
        subject: B,
        reply: Option<B>,
        payload: B,
    },
    /// `HPUB <subject> [reply] <#hdr> <#total>`. `headers` is the whole header block, from
    /// `NATS/1.0` up to and including the blank line; `payload` is the rest.
    Hpub {
        subject: B,
        reply: Option<B>,
        headers: B,
        payload: B,
    },
    /// `SUB <subject> [queue] <sid>`.
    Sub {
        subject: B,
        queue: Option<B>,
        sid: B,
    },
    /// `UNSUB <sid> [max]`. `max` is kept raw: nats-server does not reject a malformed one (it
    /// unsubscribes at once).
    Unsub {
        sid: B,
        max: Option<B>,
    },
    Ping,
    Pong,
    /// `INFO {json}` from an agent: nats-server parses and ignores it for clients.
    Info(B),
    /// `+OK` from an agent: ignored by nats-server.
    Ok,
    /// `-ERR ...` from an agent: nats-server logs it and closes. The text without quotes.
    Err(B),
}

/// An op the server sends (server -> proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp<B = Bytes> {
    /// `INFO {json}`: the JSON text, without surrounding blanks.
    Info(B),
    /// `MSG <subject> <sid> [reply] <#bytes>`.
    Msg {
        subject: B,
        sid: B,
        reply: Option<B>,
        payload: B,
    },
    /// `HMSG <subject> <sid> [reply] <#hdr> <#total>`, split like [`ClientOp::Hpub`].
    Hmsg {
        subject: B,
        sid: B,
        reply: Option<B>,
        headers: B,
        payload: B,
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR 'text'`: the text without the quotes.
    Err(B),
}

impl<B> ClientOp<B> {
    /// The same op with every field passed through `f`, e.g. `Bytes::copy_from_slice` to keep
    /// a parsed op beyond its read buffer.
    pub fn map<C>(self, mut f: impl FnMut(B) -> C) -> ClientOp<C> {
        match self {
            ClientOp::Connect(json) => ClientOp::Connect(f(json)),
            ClientOp::Pub {
                subject,
                reply,
                payload,
            } => ClientOp::Pub {
                subject: f(subject),
                reply: reply.map(&mut f),
                payload: f(payload),
            },
            ClientOp::Hpub {
                subject,
                reply,
                headers,
                payload,
            } => ClientOp::Hpub {
                subject: f(subject),
                reply: reply.map(&mut f),
                headers: f(headers),
                payload: f(payload),
            },
            ClientOp::Sub {
                subject,
                queue,
                sid,
            } => ClientOp::Sub {
                subject: f(subject),
                queue: queue.map(&mut f),
                sid: f(sid),
            },
            ClientOp::Unsub { sid, max } => ClientOp::Unsub {
                sid: f(sid),
                max: max.map(&mut f),
            },
            ClientOp::Ping => ClientOp::Ping,
            ClientOp::Pong => ClientOp::Pong,
            ClientOp::Info(json) => ClientOp::Info(f(json)),
            ClientOp::Ok => ClientOp::Ok,
            ClientOp::Err(text) => ClientOp::Err(f(text)),
        }
    }

    /// The upper-case verb, for logs and metrics labels.
    pub fn verb(&self) -> &'static str {
        match self {
            ClientOp::Connect(_) => "CONNECT",
            ClientOp::Pub { .. } => "PUB",
            ClientOp::Hpub { .. } => "HPUB",
            ClientOp::Sub { .. } => "SUB",
            ClientOp::Unsub { .. } => "UNSUB",
            ClientOp::Ping => "PING",
            ClientOp::Pong => "PONG",
            ClientOp::Info(_) => "INFO",
            ClientOp::Ok => "+OK",
            ClientOp::Err(_) => "-ERR",
        }
    }
}

impl<B> ServerOp<B> {
    /// The same op with every field passed through `f`; see [`ClientOp::map`].
    pub fn map<C>(self, mut f: impl FnMut(B) -> C) -> ServerOp<C> {
        match self {
            ServerOp::Info(json) => ServerOp::Info(f(json)),
            ServerOp::Msg {
                subject,
                sid,
                reply,
                payload,
            } => ServerOp::Msg {
                subject: f(subject),
                sid: f(sid),
                reply: reply.map(&mut f),
                payload: f(payload),
            },
            ServerOp::Hmsg {
                subject,
                sid,
                reply,
                headers,
                payload,
            } => ServerOp::Hmsg {
                subject: f(subject),
                sid: f(sid),
                reply: reply.map(&mut f),
                headers: f(headers),
                payload: f(payload),
            },
            ServerOp::Ping => ServerOp::Ping,
            ServerOp::Pong => ServerOp::Pong,
            ServerOp::Ok => ServerOp::Ok,
            ServerOp::Err(text) => ServerOp::Err(f(text)),
        }
    }

    /// The upper-case verb, for logs and metrics labels.
    pub fn verb(&self) -> &'static str {
        match self {
            ServerOp::Info(_) => "INFO",
            ServerOp::Msg { .. } => "MSG",
            ServerOp::Hmsg { .. } => "HMSG",
            ServerOp::Ping => "PING",
            ServerOp::Pong => "PONG",
            ServerOp::Ok => "+OK",
            ServerOp::Err(_) => "-ERR",
        }
    }
}
