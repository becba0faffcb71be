//! The ops of the NATS client protocol, one enum per direction.
//!
//! Every field is a [`Bytes`] slice of the buffer it was parsed from: nothing is copied.

use bytes::Bytes;

/// An op an agent sends (agent -> proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    /// `CONNECT {json}`: the JSON text as sent, without surrounding blanks.
    Connect(Bytes),
    /// `PUB <subject> [reply] <#bytes>`.
    Pub {
        subject: Bytes,
        reply: Option<Bytes>,
        payload: Bytes,
    },
    /// `HPUB <subject> [reply] <#hdr> <#total>`. `headers` is the whole header block, from
    /// `NATS/1.0` up to and including the blank line; `payload` is the rest.
    Hpub {
        subject: Bytes,
        reply: Option<Bytes>,
        headers: Bytes,
        payload: Bytes,
    },
    /// `SUB <subject> [queue] <sid>`.
    Sub {
        subject: Bytes,
        queue: Option<Bytes>,
        sid: Bytes,
    },
    /// `UNSUB <sid> [max]`. `max` is kept raw: nats-server does not reject a malformed one (it
    /// unsubscribes at once).
    Unsub {
        sid: Bytes,
        max: Option<Bytes>,
    },
    Ping,
    Pong,
    /// `INFO {json}` from an agent: nats-server parses and ignores it for clients.
    Info(Bytes),
    /// `+OK` from an agent: ignored by nats-server.
    Ok,
    /// `-ERR ...` from an agent: nats-server logs it and closes. The text without quotes.
    Err(Bytes),
}

/// An op the server sends (server -> proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// `INFO {json}`: the JSON text, without surrounding blanks.
    Info(Bytes),
    /// `MSG <subject> <sid> [reply] <#bytes>`.
    Msg {
        subject: Bytes,
        sid: Bytes,
        reply: Option<Bytes>,
        payload: Bytes,
    },
    /// `HMSG <subject> <sid> [reply] <#hdr> <#total>`, split like [`ClientOp::Hpub`].
    Hmsg {
        subject: Bytes,
        sid: Bytes,
        reply: Option<Bytes>,
        headers: Bytes,
        payload: Bytes,
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR 'text'`: the text without the quotes.
    Err(Bytes),
}

impl ClientOp {
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

impl ServerOp {
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
