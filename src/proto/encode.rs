//! Canonical encoding: upper-case verbs, single spaces, `\r\n`.
//!
//! Numbers are written with `itoa`; nothing allocates beyond growing `out`. The `put_*_line`
//! writers emit only a control line, so a caller can write a sealed or opened payload straight
//! into `out` after it, followed by `\r\n`.
//!
//! Fields are written as given: subjects, replies, queues and sids must hold no blank, `\r` or
//! `\n`, and JSON or `-ERR` text no line end; ops from the parsers always satisfy this. An empty
//! optional field (`Some("")`) is written as absent.

use bytes::{BufMut, BytesMut};

use crate::proto::{ClientOp, ServerOp};

const CRLF: &[u8] = b"\r\n";

/// Writes `op` as canonical wire bytes.
pub fn encode_client_op<B: AsRef<[u8]>>(op: &ClientOp<B>, out: &mut BytesMut) {
    fn f<T: AsRef<[u8]>>(b: &T) -> &[u8] {
        b.as_ref()
    }
    match op {
        ClientOp::Connect(json) => put_json_line(out, b"CONNECT ", f(json), CRLF),
        ClientOp::Pub {
            subject,
            reply,
            payload,
        } => {
            let payload = f(payload);
            put_pub_line(out, f(subject), reply.as_ref().map(f), payload.len());
            put_payload(out, &[], payload);
        }
        ClientOp::Hpub {
            subject,
            reply,
            headers,
            payload,
        } => {
            let (headers, payload) = (f(headers), f(payload));
            let total = headers.len() + payload.len();
            put_hpub_line(out, f(subject), reply.as_ref().map(f), headers.len(), total);
            put_payload(out, headers, payload);
        }
        ClientOp::Sub {
            subject,
            queue,
            sid,
        } => {
            let (subject, sid) = (f(subject), f(sid));
            let queue = queue.as_ref().map(f).filter(|q| !q.is_empty());
            let queue_len = queue.map_or(0, |q| q.len() + 1);
            out.reserve(4 + subject.len() + queue_len + 1 + sid.len() + 2);
            out.put_slice(b"SUB ");
            out.put_slice(subject);
            if let Some(queue) = queue {
                out.put_u8(b' ');
                out.put_slice(queue);
            }
            out.put_u8(b' ');
            out.put_slice(sid);
            out.put_slice(CRLF);
        }
        ClientOp::Unsub { sid, max } => {
            let sid = f(sid);
            let max = max.as_ref().map(f).filter(|m| !m.is_empty());
            let max_len = max.map_or(0, |m| m.len() + 1);
            out.reserve(6 + sid.len() + max_len + 2);
            out.put_slice(b"UNSUB ");
            out.put_slice(sid);
            if let Some(max) = max {
                out.put_u8(b' ');
                out.put_slice(max);
            }
            out.put_slice(CRLF);
        }
        ClientOp::Ping => out.extend_from_slice(b"PING\r\n"),
        ClientOp::Pong => out.extend_from_slice(b"PONG\r\n"),
        ClientOp::Info(json) => put_json_line(out, b"INFO ", f(json), b" \r\n"),
        ClientOp::Ok => out.extend_from_slice(b"+OK\r\n"),
        ClientOp::Err(text) => put_err_bytes(out, f(text)),
    }
}

/// Writes `op` as canonical wire bytes.
pub fn encode_server_op<B: AsRef<[u8]>>(op: &ServerOp<B>, out: &mut BytesMut) {
    fn f<T: AsRef<[u8]>>(b: &T) -> &[u8] {
        b.as_ref()
    }
    match op {
        // nats-server writes `INFO {json} \r\n`, trailing blank included.
        ServerOp::Info(json) => put_json_line(out, b"INFO ", f(json), b" \r\n"),
        ServerOp::Msg {
            subject,
            sid,
            reply,
            payload,
        } => {
            let payload = f(payload);
            put_msg_line(
                out,
                f(subject),
                f(sid),
                reply.as_ref().map(f),
                payload.len(),
            );
            put_payload(out, &[], payload);
        }
        ServerOp::Hmsg {
            subject,
            sid,
            reply,
            headers,
            payload,
        } => {
            let (headers, payload) = (f(headers), f(payload));
            let total = headers.len() + payload.len();
            let (subject, sid, reply) = (f(subject), f(sid), reply.as_ref().map(f));
            put_hmsg_line(out, subject, sid, reply, headers.len(), total);
            put_payload(out, headers, payload);
        }
        ServerOp::Ping => out.extend_from_slice(b"PING\r\n"),
        ServerOp::Pong => out.extend_from_slice(b"PONG\r\n"),
        ServerOp::Ok => out.extend_from_slice(b"+OK\r\n"),
        ServerOp::Err(text) => put_err_bytes(out, f(text)),
    }
}

/// `PUB <subject> [reply] <payload_len>\r\n`
pub fn put_pub_line(out: &mut BytesMut, subject: &[u8], reply: Option<&[u8]>, payload_len: usize) {
    put_line(out, b"PUB ", subject, None, reply, None, payload_len);
}

/// `HPUB <subject> [reply] <headers_len> <total_len>\r\n`
pub fn put_hpub_line(
    out: &mut BytesMut,
    subject: &[u8],
    reply: Option<&[u8]>,
    headers_len: usize,
    total_len: usize,
) {
    put_line(
        out,
        b"HPUB ",
        subject,
        None,
        reply,
        Some(headers_len),
        total_len,
    );
}

/// `MSG <subject> <sid> [reply] <payload_len>\r\n`
pub fn put_msg_line(
    out: &mut BytesMut,
    subject: &[u8],
    sid: &[u8],
    reply: Option<&[u8]>,
    payload_len: usize,
) {
    put_line(out, b"MSG ", subject, Some(sid), reply, None, payload_len);
}

/// `HMSG <subject> <sid> [reply] <headers_len> <total_len>\r\n`
pub fn put_hmsg_line(
    out: &mut BytesMut,
    subject: &[u8],
    sid: &[u8],
    reply: Option<&[u8]>,
    headers_len: usize,
    total_len: usize,
) {
    put_line(
        out,
        b"HMSG ",
        subject,
        Some(sid),
        reply,
        Some(headers_len),
        total_len,
    );
}

/// `-ERR '<text>'\r\n`, the form nats-server uses.
pub fn put_err(out: &mut BytesMut, text: &str) {
    put_err_bytes(out, text.as_bytes());
}

fn put_err_bytes(out: &mut BytesMut, text: &[u8]) {
    out.reserve(6 + text.len() + 3);
    out.put_slice(b"-ERR '");
    out.put_slice(text);
    out.put_slice(b"'\r\n");
}

fn put_json_line(out: &mut BytesMut, verb: &[u8], json: &[u8], end: &[u8]) {
    out.reserve(verb.len() + json.len() + end.len());
    out.put_slice(verb);
    out.put_slice(json);
    out.put_slice(end);
}

fn put_payload(out: &mut BytesMut, headers: &[u8], payload: &[u8]) {
    out.reserve(headers.len() + payload.len() + 2);
    out.put_slice(headers);
    out.put_slice(payload);
    out.put_slice(CRLF);
}

/// `<verb><subject>[ sid][ reply][ hdr] <size>\r\n`; `verb` includes its trailing blank.
fn put_line(
    out: &mut BytesMut,
    verb: &[u8],
    subject: &[u8],
    sid: Option<&[u8]>,
    reply: Option<&[u8]>,
    hdr: Option<usize>,
    size: usize,
) {
    let reply = reply.filter(|r| !r.is_empty());
    let mut hdr_buf = itoa::Buffer::new();
    let hdr = hdr.map(|h| hdr_buf.format(h).as_bytes());
    let mut size_buf = itoa::Buffer::new();
    let size = size_buf.format(size).as_bytes();
    let opt_len = |o: Option<&[u8]>| o.map_or(0, |s| s.len() + 1);
    out.reserve(
        verb.len()
            + subject.len()
            + opt_len(sid)
            + opt_len(reply)
            + opt_len(hdr)
            + 1
            + size.len()
            + 2,
    );
    out.put_slice(verb);
    out.put_slice(subject);
    for part in [sid, reply, hdr].into_iter().flatten() {
        out.put_u8(b' ');
        out.put_slice(part);
    }
    out.put_u8(b' ');
    out.put_slice(size);
    out.put_slice(CRLF);
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn client(op: ClientOp) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_client_op(&op, &mut out);
        out.to_vec()
    }

    fn server(op: ServerOp) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_server_op(&op, &mut out);
        out.to_vec()
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn client_ops_are_canonical() {
        assert_eq!(client(ClientOp::Connect(b("{}"))), b"CONNECT {}\r\n");
        assert_eq!(
            client(ClientOp::Pub {
                subject: b("a.b"),
                reply: None,
                payload: b("hello"),
            }),
            b"PUB a.b 5\r\nhello\r\n"
        );
        assert_eq!(
            client(ClientOp::Pub {
                subject: b("a"),
                reply: Some(b("_INBOX.1")),
                payload: Bytes::new(),
            }),
            b"PUB a _INBOX.1 0\r\n\r\n"
        );
        assert_eq!(
            client(ClientOp::Hpub {
                subject: b("a"),
                reply: Some(b("r")),
                headers: b("NATS/1.0\r\nA: b\r\n\r\n"),
                payload: b("xy"),
            }),
            b"HPUB a r 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nxy\r\n"
        );
        assert_eq!(
            client(ClientOp::Sub {
                subject: b("s.>"),
                queue: Some(b("q")),
                sid: b("12"),
            }),
            b"SUB s.> q 12\r\n"
        );
        assert_eq!(
            client(ClientOp::Sub {
                subject: b("s"),
                queue: None,
                sid: b("1"),
            }),
            b"SUB s 1\r\n"
        );
        assert_eq!(
            client(ClientOp::Unsub {
                sid: b("1"),
                max: Some(b("5")),
            }),
            b"UNSUB 1 5\r\n"
        );
        assert_eq!(
            client(ClientOp::Unsub {
                sid: b("1"),
                max: None,
            }),
            b"UNSUB 1\r\n"
        );
        assert_eq!(client(ClientOp::Ping), b"PING\r\n");
        assert_eq!(client(ClientOp::Pong), b"PONG\r\n");
        assert_eq!(client(ClientOp::Ok), b"+OK\r\n");
        assert_eq!(client(ClientOp::Info(b("{}"))), b"INFO {} \r\n");
        assert_eq!(client(ClientOp::Err(b("x"))), b"-ERR 'x'\r\n");
    }

    #[test]
    fn server_ops_are_canonical() {
        assert_eq!(
            server(ServerOp::Info(b("{\"a\":1}"))),
            b"INFO {\"a\":1} \r\n"
        );
        assert_eq!(
            server(ServerOp::Msg {
                subject: b("a"),
                sid: b("9"),
                reply: None,
                payload: b("hi"),
            }),
            b"MSG a 9 2\r\nhi\r\n"
        );
        assert_eq!(
            server(ServerOp::Msg {
                subject: b("a"),
                sid: b("9"),
                reply: Some(b("r")),
                payload: Bytes::new(),
            }),
            b"MSG a 9 r 0\r\n\r\n"
        );
        assert_eq!(
            server(ServerOp::Hmsg {
                subject: b("_INBOX.x"),
                sid: b("1"),
                reply: None,
                headers: b("NATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n"),
                payload: Bytes::new(),
            }),
            b"HMSG _INBOX.x 1 38 38\r\nNATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n\r\n"
        );
        assert_eq!(server(ServerOp::Ping), b"PING\r\n");
        assert_eq!(server(ServerOp::Pong), b"PONG\r\n");
        assert_eq!(server(ServerOp::Ok), b"+OK\r\n");
        assert_eq!(
            server(ServerOp::Err(b("Maximum Payload Violation"))),
            b"-ERR 'Maximum Payload Violation'\r\n"
        );
    }

    #[test]
    fn empty_optional_fields_are_absent() {
        assert_eq!(
            client(ClientOp::Sub {
                subject: b("s"),
                queue: Some(Bytes::new()),
                sid: b("1"),
            }),
            b"SUB s 1\r\n"
        );
        assert_eq!(
            client(ClientOp::Unsub {
                sid: b("1"),
                max: Some(Bytes::new()),
            }),
            b"UNSUB 1\r\n"
        );
        assert_eq!(
            server(ServerOp::Msg {
                subject: b("s"),
                sid: b("1"),
                reply: Some(Bytes::new()),
                payload: Bytes::new(),
            }),
            b"MSG s 1 0\r\n\r\n"
        );
    }

    #[test]
    fn line_writers_leave_room_for_the_payload() {
        let mut out = BytesMut::new();
        put_pub_line(&mut out, b"s", Some(b"r"), 1_000_000);
        put_hpub_line(&mut out, b"s", None, 12, 999_999_999);
        put_msg_line(&mut out, b"s", b"7", None, 0);
        put_hmsg_line(&mut out, b"s", b"7", Some(b"r"), 12, 40);
        put_err(&mut out, "Unknown Protocol Operation");
        put_pub_line(&mut out, b"s", Some(b""), 2);
        assert_eq!(
            &out[..],
            &b"PUB s r 1000000\r\nHPUB s 12 999999999\r\nMSG s 7 0\r\nHMSG s 7 r 12 40\r\n\
               -ERR 'Unknown Protocol Operation'\r\nPUB s 2\r\n"[..]
        );
    }
}
