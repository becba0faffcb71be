//! The NATS client protocol, without I/O.
//!
//! This module owns the wire format spoken between an agent and the proxy (`ClientOp`) and between
//! the proxy and nats-server (`ServerOp`): incremental parsers over a caller-owned
//! [`bytes::BytesMut`], canonical encoders, and small helpers for the `NATS/1.0` header block.
//! It must not touch sockets, clocks, keys or policy: callers feed bytes in, take ops out, and
//! decide what to do with them.
//!
//! Parsing mirrors nats-server's own parser (`server/parser.go`, `server/client.go`):
//! - verbs are case-insensitive; arguments are split on runs of spaces and tabs;
//!   `CONNECT{...}` and `INFO{...}` parse without a space;
//! - a control line ends at `\n` with an optional `\r` before it, and its argument part may be at
//!   most [`MAX_CONTROL_LINE`] bytes (checked on partial lines too);
//! - sizes are 1 to 9 decimal digits; the declared size is checked against `max_payload` as soon as
//!   the control line is complete, before any payload byte is buffered;
//! - a payload must be followed by exactly `\r\n`.
//!
//! Encoding is canonical: uppercase verbs, single spaces, `\r\n`.

mod encode;
mod error;
mod headers;
mod op;
mod parse;

pub use encode::{
    encode_client_op, encode_server_op, put_err, put_hmsg_line, put_hpub_line, put_msg_line,
    put_pub_line,
};
pub use error::ProtoError;
pub use headers::{header_status, header_value, headers, HEADER_VERSION};
pub use op::{ClientOp, ServerOp};
pub use parse::{ClientParser, Parsed, ServerParser};

/// Control line limit for lines an agent sends: nats-server's default `max_control_line`.
///
/// As in the server, it bounds the argument part of a line (everything after the verb and the
/// blanks that follow it, without the line end).
pub const MAX_CONTROL_LINE: usize = 4096;

/// Control line limit for lines the server sends. `MSG`/`HMSG` lines carry subjects and replies
/// of any length the server accepted, so this is generous, but still bounded.
pub const MAX_SERVER_CONTROL_LINE: usize = 1 << 20;
