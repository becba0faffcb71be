//! Incremental parsers for both directions of the client protocol.
//!
//! Both parsers share one framer: it finds the control line (scanning each byte once, even when
//! the line arrives in pieces), recognises the verb as soon as its bytes arrive, enforces the
//! control line limit on partial lines, and then waits for `size + 2` payload bytes without
//! rescanning them. A direction only says which verbs it accepts and how it reads their
//! arguments.
//!
//! Buffer contract: the parsers lend. `parse` reads the bytes the caller has not consumed yet
//! and returns an op whose fields borrow them, with the number of bytes it took; the caller
//! consumes those (typically every op of one read, then one `advance`), so no field is copied or
//! reference counted. While an op is incomplete the caller passes the same bytes again, with
//! more appended: the parser remembers its progress, and once a `PUB`/`HPUB`/`MSG`/`HMSG` line
//! is complete it keeps the line's arguments as offsets and only counts payload bytes;
//! [`ClientParser::needed`] says how many more are due. Nothing is ever reserved from a
//! declared size.

use std::ops::Range;

use crate::proto::{ClientOp, ProtoError, ServerOp, MAX_CONTROL_LINE, MAX_SERVER_CONTROL_LINE};

/// Bytes a control line may hold beyond its argument limit, for the verb and the blanks after
/// it. nats-server skips any number of blanks there without buffering them; a bounded parser
/// cannot, so a line whose blank run is absurdly long is refused as over the limit.
const LINE_SLACK: usize = 64;

/// `HMSG subject sid reply hdr total` has the most arguments.
const MAX_ARGS: usize = 5;

/// nats-server's `parseSize` reads at most 9 digits ("999M").
const MAX_SIZE_DIGITS: usize = 9;

/// What a parser returns: an op and how many bytes it took, `None` until more bytes arrive, or
/// the error that ends the connection.
pub type Parsed<Op> = Result<Option<(Op, usize)>, ProtoError>;

/// Parser for what an agent sends. See the [module docs](self) for the buffer contract.
#[derive(Debug, Default)]
pub struct ClientParser(Framer<ClientDialect>);

impl ClientParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `HPUB` is accepted: nats-server closes a client that sends it without having
    /// said `"headers":true` (and protocol 1) in its CONNECT, before it even reads the
    /// arguments. A new parser accepts it; the session sets this from the agent's CONNECT.
    pub fn allow_headers(&mut self, allow: bool) {
        self.0.headers = allow;
    }

    /// Parses the next op from the front of `buf`, the bytes not consumed yet.
    ///
    /// `Ok(Some((op, len)))`: the op is the first `len` bytes of `buf` and its fields borrow
    /// them; the next call gets the bytes after them. `Ok(None)` needs more bytes: call again
    /// with the same bytes and more appended (progress is kept). `Err` means the connection
    /// must be closed, and every later call returns the same error.
    ///
    /// `max_payload` is the limit currently advertised to the agent. It is checked against the
    /// declared size (the total, headers included, for `HPUB`) as soon as the control line is
    /// complete, before any payload byte is needed. The control line limit
    /// ([`MAX_CONTROL_LINE`]) is enforced even when no `\n` has arrived yet.
    pub fn parse<'b>(&mut self, buf: &'b [u8], max_payload: usize) -> Parsed<ClientOp<&'b [u8]>> {
        self.0.parse(buf, max_payload)
    }

    /// How many more bytes the current op needs, when known: only while waiting for a payload,
    /// counted against the length of `buf` at the end of the last [`parse`](Self::parse) call.
    pub fn needed(&self) -> Option<usize> {
        self.0.needed()
    }
}

/// Parser for what the server sends. Same contract as [`ClientParser`]; the control line limit
/// is [`MAX_SERVER_CONTROL_LINE`], and `max_payload` bounds `MSG`/`HMSG` totals (pass the
/// upstream max_payload plus whatever slack the caller allows).
#[derive(Debug, Default)]
pub struct ServerParser(Framer<ServerDialect>);

impl ServerParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`ClientParser::parse`].
    pub fn parse<'b>(&mut self, buf: &'b [u8], max_payload: usize) -> Parsed<ServerOp<&'b [u8]>> {
        self.0.parse(buf, max_payload)
    }

    /// See [`ClientParser::needed`].
    pub fn needed(&self) -> Option<usize> {
        self.0.needed()
    }
}

// ---------------------------------------------------------------------------------------------
// Verbs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Connect,
    Pub,
    Hpub,
    Sub,
    Unsub,
    Msg,
    Hmsg,
    Ping,
    Pong,
    Info,
    Ok,
    Err,
}

/// What may follow a verb, as in nats-server's state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sep {
    /// A space or tab must follow (`PUB`, `SUB`, `-ERR`, ...).
    Blank,
    /// The argument may follow directly (`CONNECT{...}`, `INFO{...}`).
    Any,
    /// Anything up to the `\n` is ignored (`PING`, `PONG`, `+OK`).
    Ignore,
}

#[derive(Debug)]
struct VerbSpec {
    /// Upper case.
    name: &'static [u8],
    verb: Verb,
    sep: Sep,
}

const fn spec(name: &'static [u8], verb: Verb, sep: Sep) -> VerbSpec {
    VerbSpec { name, verb, sep }
}

/// What nats-server accepts from a client. `MSG`/`HMSG` are absent: the server answers them
/// with "Unknown Protocol Operation".
const CLIENT_VERBS: &[VerbSpec] = &[
    spec(b"PUB", Verb::Pub, Sep::Blank),
    spec(b"HPUB", Verb::Hpub, Sep::Blank),
    spec(b"SUB", Verb::Sub, Sep::Blank),
    spec(b"UNSUB", Verb::Unsub, Sep::Blank),
    spec(b"PING", Verb::Ping, Sep::Ignore),
    spec(b"PONG", Verb::Pong, Sep::Ignore),
    spec(b"CONNECT", Verb::Connect, Sep::Any),
    spec(b"INFO", Verb::Info, Sep::Any),
    spec(b"+OK", Verb::Ok, Sep::Ignore),
    spec(b"-ERR", Verb::Err, Sep::Blank),
];

/// What a server sends to a client.
const SERVER_VERBS: &[VerbSpec] = &[
    spec(b"MSG", Verb::Msg, Sep::Blank),
    spec(b"HMSG", Verb::Hmsg, Sep::Blank),
    spec(b"PING", Verb::Ping, Sep::Ignore),
    spec(b"PONG", Verb::Pong, Sep::Ignore),
    spec(b"INFO", Verb::Info, Sep::Any),
    spec(b"+OK", Verb::Ok, Sep::Ignore),
    spec(b"-ERR", Verb::Err, Sep::Blank),
];

enum VerbMatch {
    Found(&'static VerbSpec),
    /// Every byte so far is the start of some verb.
    Partial,
    Unknown,
}

/// Matches the start of `input` (the line so far, `\n` included if it arrived) against `verbs`,
/// ASCII case-insensitively, deciding as early as nats-server does.
fn match_verb(verbs: &'static [VerbSpec], input: &[u8]) -> VerbMatch {
    let mut partial = false;
    for spec in verbs {
        let n = spec.name.len();
        let k = n.min(input.len());
        let prefix_ok = input[..k]
            .iter()
            .zip(&spec.name[..k])
            .all(|(a, b)| a.to_ascii_uppercase() == *b);
        if !prefix_ok {
            continue;
        }
        match input.get(n) {
            None if input.len() < n || spec.sep == Sep::Blank => partial = true,
            None => return VerbMatch::Found(spec),
            Some(&b) if spec.sep != Sep::Blank || is_blank(b) => return VerbMatch::Found(spec),
            Some(_) => {}
        }
    }
    if partial {
        VerbMatch::Partial
    } else {
        VerbMatch::Unknown
    }
}

// ---------------------------------------------------------------------------------------------
// The shared framer

/// One direction of the protocol.
trait Dialect {
    type Op<'b>;
    /// What a complete control line leaves for its payload: offsets into the argument part.
    type Pending: std::fmt::Debug + Copy;
    const VERBS: &'static [VerbSpec];
    /// Limit on the argument part of a control line.
    const LINE_LIMIT: usize;

    /// Reads a complete control line. `args` is the argument part: after the verb and its
    /// blanks, without the line end.
    fn line(
        verb: Verb,
        args: &[u8],
        max_payload: usize,
        headers: bool,
    ) -> Result<Step<Self::Op<'_>, Self::Pending>, ProtoError>;

    /// Builds the op once its `size` payload bytes (and the `\r\n` after them) have arrived.
    /// `args` is the argument part `pending` came from.
    fn payload<'b>(
        pending: Self::Pending,
        args: &'b [u8],
        payload: &'b [u8],
    ) -> Result<Self::Op<'b>, ProtoError>;
}

enum Step<Op, P> {
    Op(Op),
    Payload { pending: P, size: usize },
}

#[derive(Debug)]
struct Framer<D: Dialect> {
    state: State<D::Pending>,
    /// Sticky: once failed, always failed.
    failed: Option<ProtoError>,
    /// `buf.len()` when the last `parse` returned.
    have: usize,
    /// Whether header ops are allowed (see [`ClientParser::allow_headers`]).
    headers: bool,
}

impl<D: Dialect> Default for Framer<D> {
    fn default() -> Self {
        Self {
            state: State::Line(LineScan::default()),
            failed: None,
            have: 0,
            headers: true,
        }
    }
}

#[derive(Debug)]
enum State<P> {
    Line(LineScan),
    /// The control line is complete and still at the front of the buffer: its argument part
    /// is at `args`, and `size` payload bytes and `\r\n` are due from `body` on.
    Payload {
        pending: P,
        args: (usize, usize),
        body: usize,
        size: usize,
    },
}

/// Progress on a control line that has not ended yet, so no byte is scanned twice.
#[derive(Debug, Default, Clone, Copy)]
struct LineScan {
    /// Bytes already searched for `\n`.
    scanned: usize,
    /// The verb, once recognised: (verb, what follows it, name length).
    verb: Option<(Verb, Sep, usize)>,
    /// End of the blanks after the verb seen so far.
    arg_probe: usize,
}

struct LineFound {
    verb: Verb,
    /// Bytes of the whole line, `\n` included.
    len: usize,
    /// The argument part within the line.
    args: Range<usize>,
}

impl<D: Dialect> Framer<D> {
    fn parse<'b>(&mut self, buf: &'b [u8], max_payload: usize) -> Parsed<D::Op<'b>> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let res = self.step(buf, max_payload);
        match &res {
            Err(err) => self.failed = Some(*err),
            Ok(Some((_, len))) => self.have = buf.len() - len,
            Ok(None) => self.have = buf.len(),
        }
        res
    }

    fn needed(&self) -> Option<usize> {
        match &self.state {
            State::Payload { body, size, .. } => Some((body + size + 2).saturating_sub(self.have)),
            State::Line(_) => None,
        }
    }

    fn step<'b>(&mut self, buf: &'b [u8], max_payload: usize) -> Parsed<D::Op<'b>> {
        if let State::Line(scan) = &mut self.state {
            let Some(found) = scan_line(D::VERBS, D::LINE_LIMIT, buf, scan)? else {
                return Ok(None);
            };
            self.state = State::Line(LineScan::default());
            match D::line(
                found.verb,
                &buf[found.args.clone()],
                max_payload,
                self.headers,
            )? {
                Step::Op(op) => return Ok(Some((op, found.len))),
                Step::Payload { pending, size } => {
                    self.state = State::Payload {
                        pending,
                        args: (found.args.start, found.args.end),
                        body: found.len,
                        size,
                    }
                }
            }
        }

        let State::Payload {
            pending,
            args,
            body,
            size,
        } = self.state
        else {
            return Ok(None);
        };
        // The line is bounded and `size` has at most 9 digits: no overflow.
        let end = body + size;
        if buf.len() < end + 2 {
            // Fail as early as nats-server does: at the first wrong terminator byte.
            if buf.len() > end && buf[end] != b'\r' {
                return Err(ProtoError::BadTerminator);
            }
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtoError::BadTerminator);
        }
        self.state = State::Line(LineScan::default());
        let op = D::payload(pending, &buf[args.0..args.1], &buf[body..end])?;
        Ok(Some((op, end + 2)))
    }
}

/// Looks for a complete control line at the front of `buf`, checking the verb and the limits on
/// whatever has arrived. `Ok(None)`: incomplete, `scan` remembers the progress.
fn scan_line(
    verbs: &'static [VerbSpec],
    limit: usize,
    buf: &[u8],
    scan: &mut LineScan,
) -> Result<Option<LineFound>, ProtoError> {
    let from = scan.scanned.min(buf.len());
    let mut nl = memchr::memchr(b'\n', &buf[from..]).map(|i| from + i);
    if let (Some(n), Some((verb, sep, name_len))) = (nl, scan.verb) {
        if takes_lf_as_argument(buf, n, verb, sep, name_len) {
            nl = memchr::memchr(b'\n', &buf[n + 1..]).map(|i| n + 1 + i);
        }
    }

    let (verb, sep, name_len) = match scan.verb {
        Some(v) => v,
        None => {
            let input = nl.map_or(buf, |n| &buf[..=n]);
            match match_verb(verbs, input) {
                VerbMatch::Found(spec) => {
                    let v = (spec.verb, spec.sep, spec.name.len());
                    scan.verb = Some(v);
                    if let Some(n) = nl {
                        if takes_lf_as_argument(buf, n, spec.verb, spec.sep, spec.name.len()) {
                            nl = memchr::memchr(b'\n', &buf[n + 1..]).map(|i| n + 1 + i);
                        }
                    }
                    v
                }
                VerbMatch::Partial if nl.is_none() => {
                    scan.scanned = buf.len();
                    return Ok(None);
                }
                VerbMatch::Partial | VerbMatch::Unknown => return Err(ProtoError::UnknownOp),
            }
        }
    };
    let line = &buf[..nl.unwrap_or(buf.len())];

    // The line without its end; a lone trailing '\r' on a partial line is not counted either,
    // so a partial line never fails where the complete one would pass.
    let content = match line.last() {
        Some(b'\r') => line.len() - 1,
        _ => line.len(),
    };
    if content > limit + LINE_SLACK {
        return Err(ProtoError::MaxControlLine);
    }
    let mut args = content..content;
    if sep != Sep::Ignore {
        let mut p = scan.arg_probe.max(name_len);
        while p < line.len() && is_blank(line[p]) {
            p += 1;
        }
        scan.arg_probe = p;
        // nats-server measures the argument part only.
        if content.saturating_sub(p) > limit {
            return Err(ProtoError::MaxControlLine);
        }
        args = p.min(content)..content;
    }

    match nl {
        None => {
            scan.scanned = buf.len();
            Ok(None)
        }
        Some(n) => Ok(Some(LineFound {
            verb,
            len: n + 1,
            args,
        })),
    }
}

/// Whether the `\n` at `n` is the first byte of the arguments rather than the line's end:
/// nats-server, once past a verb and the blanks after it (none needed for `CONNECT{` and
/// `INFO{`), takes whatever byte comes next as the start of the arguments, a `\n` included
/// (`PUB \nfoo 5` publishes to `\nfoo`). Verbs that ignore the rest of their line end there,
/// and so does `-ERR`: its text is written back quoted, and a line that held its `\n` would not
/// read back the same.
fn takes_lf_as_argument(buf: &[u8], n: usize, verb: Verb, sep: Sep, name_len: usize) -> bool {
    if verb == Verb::Err {
        return false;
    }
    let blanks = buf.get(name_len..n).unwrap_or_default();
    match sep {
        Sep::Ignore => false,
        Sep::Blank => !blanks.is_empty() && blanks.iter().all(|&b| is_blank(b)),
        Sep::Any => n >= name_len && blanks.iter().all(|&b| is_blank(b)),
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `PUB`/`HPUB` split on blanks only (client.go `processPub`), so a subject may hold a `\r`;
/// the server then delivers it in its `MSG`/`HMSG` line, which it builds with single spaces.
/// Those lines split on blanks only too, and the subject reaches the agent as the server sent
/// it, for the agent's own library to read.
fn is_pub_sep(b: u8) -> bool {
    is_blank(b)
}

/// `SUB`/`UNSUB` (client.go `splitArg`) also split on `\r` and `\n` (which a line holds only
/// right after its verb: see [`takes_lf_as_argument`]).
fn is_arg_sep(b: u8) -> bool {
    is_blank(b) || b == b'\r' || b == b'\n'
}

/// Where one argument sits in the argument part of its line.
type Span = (usize, usize);

/// Up to [`MAX_ARGS`] arguments as spans of one line, without allocating.
struct Args {
    spans: [Span; MAX_ARGS],
    /// `MAX_ARGS + 1` means "more than `MAX_ARGS`".
    len: usize,
}

impl Args {
    fn split(s: &[u8], is_sep: fn(u8) -> bool) -> Self {
        let mut args = Args {
            spans: [(0, 0); MAX_ARGS],
            len: 0,
        };
        let mut i = 0;
        while i < s.len() {
            while i < s.len() && is_sep(s[i]) {
                i += 1;
            }
            if i == s.len() {
                break;
            }
            let start = i;
            while i < s.len() && !is_sep(s[i]) {
                i += 1;
            }
            if args.len == MAX_ARGS {
                args.len = MAX_ARGS + 1;
                break;
            }
            args.spans[args.len] = (start, i);
            args.len += 1;
        }
        args
    }

    fn raw<'l>(&self, line: &'l [u8], i: usize) -> &'l [u8] {
        at(line, self.spans[i])
    }

    fn size(&self, line: &[u8], i: usize, what: &'static str) -> Result<usize, ProtoError> {
        parse_size(self.raw(line, i)).ok_or(ProtoError::BadArgs(what))
    }
}

/// The argument at `span` of `line`. Spans come from [`Args::split`] of the same bytes.
fn at(line: &[u8], (a, b): Span) -> &[u8] {
    line.get(a..b).unwrap_or_default()
}

/// nats-server's `parseSize`: 1 to 9 ASCII digits. Signs, blanks, other bytes or a tenth digit
/// fail (the server then closes without a message).
fn parse_size(d: &[u8]) -> Option<usize> {
    if d.is_empty() || d.len() > MAX_SIZE_DIGITS || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(d.iter().fold(0, |n, &c| n * 10 + usize::from(c - b'0')))
}

/// The argument of `CONNECT`/`INFO`: the JSON text without trailing blanks; empty fails (the
/// server's JSON decoder fails on it and closes without a message).
fn json_arg<'b>(args: &'b [u8], what: &'static str) -> Result<&'b [u8], ProtoError> {
    let json = trim_end(args);
    if json.is_empty() {
        return Err(ProtoError::BadArgs(what));
    }
    Ok(json)
}

/// The text of `-ERR`: trailing blanks and one pair of enclosing single quotes removed.
fn err_text(args: &[u8]) -> &[u8] {
    let text = trim_end(args);
    if text.len() >= 2 && text[0] == b'\'' && text[text.len() - 1] == b'\'' {
        return &text[1..text.len() - 1];
    }
    text
}

fn trim_end(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| !is_blank(c)).map_or(0, |i| i + 1);
    &b[..end]
}

/// Splits a complete `HPUB`/`HMSG` body into its header block and payload.
///
/// The block is not checked: nats-server accepts any bytes there, a length of 0 included (nats.js
/// 3.x sends `HPUB <subject> 0 <total>` for a JetStream publish without options), and delivers
/// them unchanged, so the proxy does too.
fn split_headers(body: &[u8], hdr: usize) -> Result<(&[u8], &[u8]), ProtoError> {
    if hdr > body.len() {
        // Checked on the control line already (`hdr <= total`); kept so this can never panic.
        return Err(ProtoError::BadArgs("header size larger than total size"));
    }
    Ok(body.split_at(hdr))
}

/// The shape of one message verb's arguments, and its errors in its own words.
struct SizedVerb {
    /// The arguments before the optional reply: the subject (`PUB`), or subject and sid (`MSG`).
    fixed: usize,
    headers: bool,
    arity: &'static str,
    size: &'static str,
    hdr: &'static str,
    hdr_larger: &'static str,
}

const PUB: SizedVerb = SizedVerb {
    fixed: 1,
    headers: false,
    arity: "PUB: wrong number of arguments",
    size: "PUB: bad or missing size",
    hdr: "",
    hdr_larger: "",
};
const HPUB: SizedVerb = SizedVerb {
    fixed: 1,
    headers: true,
    arity: "HPUB: wrong number of arguments",
    size: "HPUB: bad or missing total size",
    hdr: "HPUB: bad or missing header size",
    hdr_larger: "HPUB: header size larger than total size",
};
const MSG: SizedVerb = SizedVerb {
    fixed: 2,
    headers: false,
    arity: "MSG: wrong number of arguments",
    size: "MSG: bad or missing size",
    hdr: "",
    hdr_larger: "",
};
const HMSG: SizedVerb = SizedVerb {
    fixed: 2,
    headers: true,
    arity: "HMSG: wrong number of arguments",
    size: "HMSG: bad or missing total size",
    hdr: "HMSG: bad or missing header size",
    hdr_larger: "HMSG: header size larger than total size",
};

/// The arguments every message verb shares, checked in the server's order (`processPub`,
/// `processHeaderPub`, `processMsgArgs`, `processHeaderMsgArgs`): arity, the header size, the
/// total size, `hdr <= total`, then `max_payload`.
fn sized_args(
    args: &[u8],
    verb: &SizedVerb,
    max_payload: usize,
) -> Result<(Args, Option<Span>, Option<usize>, usize), ProtoError> {
    let a = Args::split(args, is_pub_sep);
    let base = verb.fixed + 1 + usize::from(verb.headers);
    let reply = if a.len == base {
        None
    } else if a.len == base + 1 {
        Some(a.spans[verb.fixed])
    } else {
        return Err(ProtoError::BadArgs(verb.arity));
    };
    let last = a.len - 1;
    let hdr = if verb.headers {
        Some(a.size(args, last - 1, verb.hdr)?)
    } else {
        None
    };
    let size = a.size(args, last, verb.size)?;
    if hdr.is_some_and(|hdr| hdr > size) {
        return Err(ProtoError::BadArgs(verb.hdr_larger));
    }
    if size > max_payload {
        return Err(ProtoError::MaxPayload);
    }
    Ok((a, reply, hdr, size))
}

// ---------------------------------------------------------------------------------------------
// Agent -> proxy

#[derive(Debug)]
struct ClientDialect;

#[derive(Debug, Clone, Copy)]
struct ClientPending {
    subject: Span,
    reply: Option<Span>,
    /// `Some` for `HPUB`.
    hdr: Option<usize>,
}

impl Dialect for ClientDialect {
    type Op<'b> = ClientOp<&'b [u8]>;
    type Pending = ClientPending;
    const VERBS: &'static [VerbSpec] = CLIENT_VERBS;
    const LINE_LIMIT: usize = MAX_CONTROL_LINE;

    fn line(
        verb: Verb,
        args: &[u8],
        max_payload: usize,
        headers: bool,
    ) -> Result<Step<ClientOp<&[u8]>, ClientPending>, ProtoError> {
        let op = match verb {
            Verb::Pub | Verb::Hpub => {
                if verb == Verb::Hpub && !headers {
                    return Err(ProtoError::BadArgs("HPUB: headers not enabled in CONNECT"));
                }
                let spec = if verb == Verb::Hpub { &HPUB } else { &PUB };
                let (a, reply, hdr, size) = sized_args(args, spec, max_payload)?;
                let pending = ClientPending {
                    subject: a.spans[0],
                    reply,
                    hdr,
                };
                return Ok(Step::Payload { pending, size });
            }
            Verb::Sub => {
                let a = Args::split(args, is_arg_sep);
                let (queue, sid_at) = match a.len {
                    2 => (None, 1),
                    3 => (Some(a.raw(args, 1)), 2),
                    _ => return Err(ProtoError::BadArgs("SUB: wrong number of arguments")),
                };
                ClientOp::Sub {
                    subject: a.raw(args, 0),
                    queue,
                    sid: a.raw(args, sid_at),
                }
            }
            Verb::Unsub => {
                let a = Args::split(args, is_arg_sep);
                let max = match a.len {
                    1 => None,
                    2 => Some(a.raw(args, 1)),
                    _ => return Err(ProtoError::BadArgs("UNSUB: wrong number of arguments")),
                };
                ClientOp::Unsub {
                    sid: a.raw(args, 0),
                    max,
                }
            }
            Verb::Connect => ClientOp::Connect(json_arg(args, "CONNECT: missing JSON")?),
            Verb::Info => ClientOp::Info(json_arg(args, "INFO: missing JSON")?),
            Verb::Ping => ClientOp::Ping,
            Verb::Pong => ClientOp::Pong,
            Verb::Ok => ClientOp::Ok,
            Verb::Err => ClientOp::Err(err_text(args)),
            Verb::Msg | Verb::Hmsg => return Err(ProtoError::UnknownOp),
        };
        Ok(Step::Op(op))
    }

    fn payload<'b>(
        pending: ClientPending,
        args: &'b [u8],
        payload: &'b [u8],
    ) -> Result<ClientOp<&'b [u8]>, ProtoError> {
        let ClientPending {
            subject,
            reply,
            hdr,
        } = pending;
        let (subject, reply) = (at(args, subject), reply.map(|r| at(args, r)));
        Ok(match hdr {
            None => ClientOp::Pub {
                subject,
                reply,
                payload,
            },
            Some(hdr) => {
                let (headers, payload) = split_headers(payload, hdr)?;
                ClientOp::Hpub {
                    subject,
                    reply,
                    headers,
                    payload,
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Server -> proxy

#[derive(Debug)]
struct ServerDialect;

#[derive(Debug, Clone, Copy)]
struct ServerPending {
    subject: Span,
    sid: Span,
    reply: Option<Span>,
    /// `Some` for `HMSG`.
    hdr: Option<usize>,
}

impl Dialect for ServerDialect {
    type Op<'b> = ServerOp<&'b [u8]>;
    type Pending = ServerPending;
    const VERBS: &'static [VerbSpec] = SERVER_VERBS;
    const LINE_LIMIT: usize = MAX_SERVER_CONTROL_LINE;

    fn line(
        verb: Verb,
        args: &[u8],
        max_payload: usize,
        _headers: bool,
    ) -> Result<Step<ServerOp<&[u8]>, ServerPending>, ProtoError> {
        let op = match verb {
            Verb::Msg | Verb::Hmsg => {
                let spec = if verb == Verb::Hmsg { &HMSG } else { &MSG };
                let (a, reply, hdr, size) = sized_args(args, spec, max_payload)?;
                let pending = ServerPending {
                    subject: a.spans[0],
                    sid: a.spans[1],
                    reply,
                    hdr,
                };
                return Ok(Step::Payload { pending, size });
            }
            Verb::Info => ServerOp::Info(json_arg(args, "INFO: missing JSON")?),
            Verb::Ping => ServerOp::Ping,
            Verb::Pong => ServerOp::Pong,
            Verb::Ok => ServerOp::Ok,
            Verb::Err => ServerOp::Err(err_text(args)),
            Verb::Connect | Verb::Pub | Verb::Hpub | Verb::Sub | Verb::Unsub => {
                return Err(ProtoError::UnknownOp)
            }
        };
        Ok(Step::Op(op))
    }

    fn payload<'b>(
        pending: ServerPending,
        args: &'b [u8],
        payload: &'b [u8],
    ) -> Result<ServerOp<&'b [u8]>, ProtoError> {
        let ServerPending {
            subject,
            sid,
            reply,
            hdr,
        } = pending;
        let (subject, sid, reply) = (at(args, subject), at(args, sid), reply.map(|r| at(args, r)));
        Ok(match hdr {
            None => ServerOp::Msg {
                subject,
                sid,
                reply,
                payload,
            },
            Some(hdr) => {
                let (headers, payload) = split_headers(payload, hdr)?;
                ServerOp::Hmsg {
                    subject,
                    sid,
                    reply,
                    headers,
                    payload,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use bytes::{Buf, Bytes, BytesMut};

    use super::*;
    use crate::proto::{encode_client_op, encode_server_op};

    /// One direction's parser, as the session drives it: parse the next op, keep it beyond
    /// the buffer, consume its bytes; and the encoder that writes it back.
    trait Side: Default {
        type Op: std::fmt::Debug + PartialEq;
        fn next(&mut self, buf: &mut BytesMut, max: usize) -> Result<Option<Self::Op>, ProtoError>;
        fn encode(op: &Self::Op, out: &mut BytesMut);
    }

    impl Side for ClientParser {
        type Op = ClientOp;
        fn next(&mut self, buf: &mut BytesMut, max: usize) -> Result<Option<ClientOp>, ProtoError> {
            let Some((op, len)) = self.parse(buf, max)? else {
                return Ok(None);
            };
            let op = op.map(Bytes::copy_from_slice);
            buf.advance(len);
            Ok(Some(op))
        }
        fn encode(op: &ClientOp, out: &mut BytesMut) {
            encode_client_op(op, out);
        }
    }

    impl Side for ServerParser {
        type Op = ServerOp;
        fn next(&mut self, buf: &mut BytesMut, max: usize) -> Result<Option<ServerOp>, ProtoError> {
            let Some((op, len)) = self.parse(buf, max)? else {
                return Ok(None);
            };
            let op = op.map(Bytes::copy_from_slice);
            buf.advance(len);
            Ok(Some(op))
        }
        fn encode(op: &ServerOp, out: &mut BytesMut) {
            encode_server_op(op, out);
        }
    }

    const BIG: usize = 1 << 20;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// Feeds `chunks` one after the other, parsing all it can after each; returns the ops and
    /// the error that stopped it, if any.
    fn chunks<P: Side>(chunks: &[&[u8]], max: usize) -> (Vec<P::Op>, Option<ProtoError>) {
        let mut p = P::default();
        let mut buf = BytesMut::new();
        let mut ops = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match p.next(&mut buf, max) {
                    Ok(Some(op)) => ops.push(op),
                    Ok(None) => break,
                    Err(e) => return (ops, Some(e)),
                }
            }
        }
        (ops, None)
    }

    /// Parses every complete op in `input`.
    fn all<P: Side>(input: &[u8], max: usize) -> (Vec<P::Op>, Option<ProtoError>) {
        chunks::<P>(&[input], max)
    }

    fn one<P: Side>(input: &str) -> P::Op {
        let (ops, err) = all::<P>(input.as_bytes(), BIG);
        assert_eq!(err, None, "{input:?}");
        assert_eq!(ops.len(), 1, "{input:?}: {ops:?}");
        ops.into_iter().next().unwrap()
    }

    fn err<P: Side>(input: &[u8], max: usize) -> ProtoError {
        match all::<P>(input, max) {
            (_, Some(e)) => e,
            (ops, None) => panic!("{:?} parsed to {ops:?}", String::from_utf8_lossy(input)),
        }
    }

    fn encode<P: Side>(ops: &[P::Op]) -> BytesMut {
        let mut out = BytesMut::new();
        for op in ops {
            P::encode(op, &mut out);
        }
        out
    }

    fn client_all(input: &[u8], max: usize) -> (Vec<ClientOp>, Option<ProtoError>) {
        all::<ClientParser>(input, max)
    }
    fn client_chunks(input: &[&[u8]], max: usize) -> (Vec<ClientOp>, Option<ProtoError>) {
        chunks::<ClientParser>(input, max)
    }
    fn server_all(input: &[u8], max: usize) -> (Vec<ServerOp>, Option<ProtoError>) {
        all::<ServerParser>(input, max)
    }
    fn server_chunks(input: &[&[u8]], max: usize) -> (Vec<ServerOp>, Option<ProtoError>) {
        chunks::<ServerParser>(input, max)
    }
    fn one_client(input: &str) -> ClientOp {
        one::<ClientParser>(input)
    }
    fn one_server(input: &str) -> ServerOp {
        one::<ServerParser>(input)
    }
    fn client_err(input: &[u8], max: usize) -> ProtoError {
        err::<ClientParser>(input, max)
    }
    fn server_err(input: &[u8], max: usize) -> ProtoError {
        err::<ServerParser>(input, max)
    }

    /// Encoding `ops` and parsing them back gives `ops`, whole or cut in two at `cut`.
    fn round_trips<P: Side>(ops: Vec<P::Op>, cut: prop::sample::Index) -> Result<(), TestCaseError>
    where
        P::Op: Clone,
    {
        let wire = encode::<P>(&ops);
        let (got, err) = all::<P>(&wire, BIG);
        prop_assert_eq!(err, None);
        prop_assert_eq!(&got, &ops);
        let (a, b) = wire.split_at(cut.index(wire.len() + 1));
        prop_assert_eq!(chunks::<P>(&[a, b], BIG), (ops, None));
        Ok(())
    }

    /// What any input parses to encodes canonically and parses back the same, and cutting the
    /// input in two never changes the outcome, errors included.
    fn reparses_stably<P: Side>(
        input: &[u8],
        cut: prop::sample::Index,
    ) -> Result<(), TestCaseError> {
        let (ops, err) = all::<P>(input, BIG);
        let wire = encode::<P>(&ops);
        let (again, err2) = all::<P>(&wire, BIG);
        prop_assert_eq!(err2, None);
        prop_assert_eq!(&again, &ops);
        prop_assert_eq!(&encode::<P>(&again), &wire);
        let (a, b) = input.split_at(cut.index(input.len() + 1));
        prop_assert_eq!(chunks::<P>(&[a, b], BIG), (ops, err));
        Ok(())
    }

    // ---- lenient input forms ----------------------------------------------------------------

    #[test]
    fn client_lenient_forms_parse_like_canonical() {
        let cases: &[(&str, &[&str])] = &[
            (
                "CONNECT {\"verbose\":false}\r\n",
                &[
                    "connect {\"verbose\":false}\r\n",
                    "CONNECT{\"verbose\":false}\r\n",
                    "Connect \t {\"verbose\":false} \t\n",
                ],
            ),
            (
                "PUB foo 5\r\nhello\r\n",
                &[
                    "pub foo 5\r\nhello\r\n",
                    "PUB foo 5\nhello\r\n",
                    "PuB\tfoo\t5\r\nhello\r\n",
                    "PUB   foo \t  5  \r\nhello\r\n",
                ],
            ),
            (
                "PUB foo _INBOX.1 5\r\nhello\r\n",
                &["pub\t\tfoo  _INBOX.1\t5\nhello\r\n"],
            ),
            (
                "HPUB foo 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
                &[
                    "hpub foo 12 14\nNATS/1.0\r\n\r\nhi\r\n",
                    "HPUB\t foo\t12   14\t\r\nNATS/1.0\r\n\r\nhi\r\n",
                ],
            ),
            (
                "HPUB foo r 12 12\r\nNATS/1.0\r\n\r\n\r\n",
                &["hPuB foo  r 12 12\nNATS/1.0\r\n\r\n\r\n"],
            ),
            (
                "SUB foo 1\r\n",
                &["sub foo 1\n", "SUB\tfoo\t1\t\r\n", "SUB  foo   1 \n"],
            ),
            ("SUB foo q 1\r\n", &["sub foo\tq  1\n"]),
            ("UNSUB 1\r\n", &["unsub 1\n", "UNSUB\t1  \r\n"]),
            ("UNSUB 1 10\r\n", &["UnSuB  1\t10\n"]),
            (
                "PING\r\n",
                &["ping\r\n", "PING\n", "pInG\n", "PING junk after\r\n"],
            ),
            ("PONG\r\n", &["pong\n", "PONG \r\n"]),
            ("INFO {} \r\n", &["info {}\n", "INFO{}\r\n", "INFO  {}  \n"]),
            ("+OK\r\n", &["+ok\n", "+OK\r\n"]),
            (
                "-ERR 'Unknown Protocol Operation'\r\n",
                &[
                    "-err 'Unknown Protocol Operation'\n",
                    "-ERR\t 'Unknown Protocol Operation' \r\n",
                    "-ERR Unknown Protocol Operation\r\n",
                ],
            ),
        ];
        for (canonical, lenient) in cases {
            let want = one_client(canonical);
            // Canonical input re-encodes to itself.
            assert_eq!(
                &encode::<ClientParser>(std::slice::from_ref(&want))[..],
                canonical.as_bytes(),
                "{canonical:?}"
            );
            for input in *lenient {
                assert_eq!(one_client(input), want, "{input:?} vs {canonical:?}");
            }
        }
    }

    #[test]
    fn client_ops_have_expected_fields() {
        assert_eq!(
            one_client("PUB foo bar 5\r\nhello\r\n"),
            ClientOp::Pub {
                subject: b("foo"),
                reply: Some(b("bar")),
                payload: b("hello"),
            }
        );
        assert_eq!(
            one_client("HPUB foo 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nhi\r\n"),
            ClientOp::Hpub {
                subject: b("foo"),
                reply: None,
                headers: b("NATS/1.0\r\nA: b\r\n\r\n"),
                payload: b("hi"),
            }
        );
        assert_eq!(
            one_client("SUB foo q 7\r\n"),
            ClientOp::Sub {
                subject: b("foo"),
                queue: Some(b("q")),
                sid: b("7"),
            }
        );
        // UNSUB max is raw: nats-server does not reject a bad one.
        assert_eq!(
            one_client("UNSUB 7 x\r\n"),
            ClientOp::Unsub {
                sid: b("7"),
                max: Some(b("x")),
            }
        );
        assert_eq!(one_client("CONNECT {} \r\n"), ClientOp::Connect(b("{}")));
        assert_eq!(one_client("-ERR 'a b'\r\n"), ClientOp::Err(b("a b")));
        // A payload may hold anything, CRLFs and verbs included.
        assert_eq!(
            one_client("PUB a 11\r\nPING\r\nPUB\r\n\r\n"),
            ClientOp::Pub {
                subject: b("a"),
                reply: None,
                payload: b("PING\r\nPUB\r\n"),
            }
        );
    }

    #[test]
    fn server_lenient_forms_parse_like_canonical() {
        let cases: &[(&str, &[&str])] = &[
            (
                "INFO {\"server_id\":\"x\"} \r\n",
                &[
                    "info{\"server_id\":\"x\"}\n",
                    "INFO \t{\"server_id\":\"x\"}\r\n",
                ],
            ),
            (
                "MSG foo 1 5\r\nhello\r\n",
                &["msg foo 1 5\nhello\r\n", "MSG\tfoo  1\t 5 \r\nhello\r\n"],
            ),
            (
                "MSG foo 1 _INBOX.a 0\r\n\r\n",
                &["Msg foo 1 _INBOX.a 0\n\r\n"],
            ),
            (
                "HMSG _INBOX.x 1 38 38\r\nNATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n\r\n",
                &["hmsg _INBOX.x\t1 38  38\nNATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n\r\n"],
            ),
            (
                "HMSG a 2 r 12 15\r\nNATS/1.0\r\n\r\nabc\r\n",
                &["HMSG a 2 r 12 15\nNATS/1.0\r\n\r\nabc\r\n"],
            ),
            ("PING\r\n", &["ping\n"]),
            ("PONG\r\n", &["pong\n"]),
            ("+OK\r\n", &["+ok\n"]),
            (
                "-ERR 'Authorization Violation'\r\n",
                &["-err\t'Authorization Violation'\n"],
            ),
        ];
        for (canonical, lenient) in cases {
            let want = one_server(canonical);
            assert_eq!(
                &encode::<ServerParser>(std::slice::from_ref(&want))[..],
                canonical.as_bytes(),
                "{canonical:?}"
            );
            for input in *lenient {
                assert_eq!(one_server(input), want, "{input:?} vs {canonical:?}");
            }
        }
        assert_eq!(
            one_server("HMSG _INBOX.x 1 38 38\r\nNATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n\r\n"),
            ServerOp::Hmsg {
                subject: b("_INBOX.x"),
                sid: b("1"),
                reply: None,
                headers: b("NATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n"),
                payload: Bytes::new(),
            }
        );
        assert_eq!(
            one_server("MSG a 9 r 2\r\nhi\r\n"),
            ServerOp::Msg {
                subject: b("a"),
                sid: b("9"),
                reply: Some(b("r")),
                payload: b("hi"),
            }
        );
    }

    // ---- fragmentation -----------------------------------------------------------------------

    const CLIENT_STREAM: &[u8] = b"CONNECT {\"verbose\":false,\"headers\":true}\r\n\
        PING\r\nsub foo 1\r\nSUB bar q 2\r\n\
        PUB foo 5\r\nhello\r\npub foo _INBOX.a 0\r\n\r\n\
        HPUB foo r 24 27\r\nNATS/1.0\r\nK: v\r\nX: y\r\n\r\nabc\r\n\
        PUB big 44\r\n0123456789\r\n0123456789\r\n0123456789\r\n01234567\r\n\
        unsub 1 5\nUNSUB 2\r\npong\r\n+OK\r\n-ERR 'x'\r\nINFO {} \r\n";

    const SERVER_STREAM: &[u8] = b"INFO {\"server_id\":\"S\",\"max_payload\":1048576} \r\n\
        PING\r\n+OK\r\nMSG foo 1 5\r\nhello\r\nMSG foo 2 _INBOX.a 0\r\n\r\n\
        HMSG _INBOX.x 1 38 38\r\nNATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n\r\n\
        HMSG a 3 r 24 27\r\nNATS/1.0\r\nK: v\r\nX: y\r\n\r\nabc\r\n\
        PONG\r\n-ERR 'Stale Connection'\r\n";

    #[test]
    fn client_stream_split_anywhere_gives_same_ops() {
        let (whole, err) = client_all(CLIENT_STREAM, BIG);
        assert_eq!(err, None);
        assert_eq!(whole.len(), 14);
        for i in 0..=CLIENT_STREAM.len() {
            let (a, b) = CLIENT_STREAM.split_at(i);
            assert_eq!(
                client_chunks(&[a, b], BIG),
                (whole.clone(), None),
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = CLIENT_STREAM.chunks(1).collect();
        assert_eq!(client_chunks(&bytes, BIG), (whole.clone(), None));
        let threes: Vec<&[u8]> = CLIENT_STREAM.chunks(3).collect();
        assert_eq!(client_chunks(&threes, BIG), (whole, None));
    }

    #[test]
    fn server_stream_split_anywhere_gives_same_ops() {
        let (whole, err) = server_all(SERVER_STREAM, BIG);
        assert_eq!(err, None);
        assert_eq!(whole.len(), 9);
        for i in 0..=SERVER_STREAM.len() {
            let (a, b) = SERVER_STREAM.split_at(i);
            assert_eq!(
                server_chunks(&[a, b], BIG),
                (whole.clone(), None),
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = SERVER_STREAM.chunks(1).collect();
        assert_eq!(server_chunks(&bytes, BIG), (whole, None));
    }

    #[test]
    fn incomplete_line_leaves_buffer_untouched_and_payload_is_not_rescanned() {
        let mut p = ClientParser::new();
        let mut buf = BytesMut::from(&b"PUB foo 1"[..]);
        assert_eq!(p.next(&mut buf, BIG), Ok(None));
        assert_eq!(&buf[..], b"PUB foo 1");
        assert_eq!(p.needed(), None);
        buf.extend_from_slice(b"0\r\nabc");
        assert_eq!(p.next(&mut buf, BIG), Ok(None));
        // The line stays until its payload is complete: 10 payload bytes + CRLF are due, 3
        // arrived.
        assert_eq!(&buf[..], b"PUB foo 10\r\nabc");
        assert_eq!(p.needed(), Some(9));
        buf.extend_from_slice(b"defghij\r");
        assert_eq!(p.next(&mut buf, BIG), Ok(None));
        assert_eq!(p.needed(), Some(1));
        buf.extend_from_slice(b"\nPING\r\n");
        assert_eq!(
            p.next(&mut buf, BIG),
            Ok(Some(ClientOp::Pub {
                subject: b("foo"),
                reply: None,
                payload: b("abcdefghij"),
            }))
        );
        assert_eq!(p.needed(), None);
        assert_eq!(p.next(&mut buf, BIG), Ok(Some(ClientOp::Ping)));
        assert!(buf.is_empty());
        assert_eq!(p.next(&mut buf, BIG), Ok(None));
    }

    #[test]
    fn nothing_is_reserved_from_a_declared_size() {
        let mut p = ServerParser::new();
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(b"MSG a 1 999999999\r\nxy");
        let cap = buf.capacity();
        assert_eq!(p.next(&mut buf, usize::MAX), Ok(None));
        assert!(buf.capacity() <= cap);
        assert_eq!(p.needed(), Some(999_999_999 + 2 - 2));
    }

    #[test]
    fn payload_is_a_view_of_the_read_buffer() {
        let mut p = ClientParser::new();
        let buf = BytesMut::from(&b"PUB foo 5\r\nhello\r\n"[..]);
        let base = buf.as_ptr() as usize;
        let Ok(Some((ClientOp::Pub { payload, .. }, 18))) = p.parse(&buf, BIG) else {
            panic!("no pub");
        };
        assert_eq!(payload.as_ptr() as usize, base + 11);
    }

    // ---- errors ------------------------------------------------------------------------------

    #[test]
    fn unknown_ops() {
        for input in [
            &b"FOO bar\r\n"[..],
            b"\r\n",
            b" PING\r\n",
            b"PUB\r\n",
            b"PUBX foo 1\r\n",
            b"SUBfoo 1\r\n",
            b"-ERR\r\n",
            b"+KO\r\n",
            b"CONNEC {}\r\n",
            // Routes' and leafnodes' ops are not for clients.
            b"RS+ foo 1\r\n",
            b"LMSG foo 1\r\n",
        ] {
            let e = client_err(input, BIG);
            assert_eq!(
                e,
                ProtoError::UnknownOp,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(e.server_err(), Some("Unknown Protocol Operation"));
        }
        // Known as soon as the first wrong byte arrives, before any '\n'.
        assert_eq!(client_err(b"X", BIG), ProtoError::UnknownOp);
        assert_eq!(client_err(b"PUX", BIG), ProtoError::UnknownOp);
        assert_eq!(client_err(b"PUB\r", BIG), ProtoError::UnknownOp);
        // A prefix of a verb is just incomplete.
        assert_eq!(client_all(b"UNSU", BIG), (vec![], None));
        assert_eq!(client_all(b"PUB", BIG), (vec![], None));
    }

    #[test]
    fn msg_and_hmsg_from_a_client_are_unknown() {
        for input in [
            &b"MSG foo 1 2\r\nhi\r\n"[..],
            b"msg foo 1 2\r\n",
            b"HMSG foo 1 12 12\r\nNATS/1.0\r\n\r\n\r\n",
            b"M",
        ] {
            let e = client_err(input, BIG);
            assert_eq!(e, ProtoError::UnknownOp);
            assert_eq!(e.server_err(), Some("Unknown Protocol Operation"));
        }
        // And client-only ops from the server.
        for input in [
            &b"PUB foo 1\r\nx\r\n"[..],
            b"SUB foo 1\r\n",
            b"CONNECT {}\r\n",
        ] {
            assert_eq!(server_err(input, BIG), ProtoError::UnknownOp);
        }
    }

    #[test]
    fn control_line_limit() {
        let arg = |n: usize| format!("SUB {} 1", "a".repeat(n - 2));
        // Exactly at the limit passes; the argument part is what counts, as in nats-server.
        let at = format!("{}\r\n", arg(MAX_CONTROL_LINE));
        assert!(matches!(one_client(&at), ClientOp::Sub { .. }));
        let over = format!("{}\r\n", arg(MAX_CONTROL_LINE + 1));
        let e = client_err(over.as_bytes(), BIG);
        assert_eq!(e, ProtoError::MaxControlLine);
        assert_eq!(e.server_err(), Some("maximum control line exceeded"));

        // Without any '\n': refused as soon as too many bytes are buffered.
        let partial = arg(MAX_CONTROL_LINE + 1);
        assert_eq!(
            client_err(partial.as_bytes(), BIG),
            ProtoError::MaxControlLine
        );
        let partial_ok = arg(MAX_CONTROL_LINE);
        assert_eq!(client_all(partial_ok.as_bytes(), BIG), (vec![], None));
        // A trailing '\r' waiting for its '\n' does not count.
        let partial_cr = format!("{}\r", arg(MAX_CONTROL_LINE));
        assert_eq!(client_all(partial_cr.as_bytes(), BIG), (vec![], None));
        // Fed in pieces, the same.
        let chunks: Vec<&[u8]> = over.as_bytes().chunks(100).collect();
        assert_eq!(
            client_chunks(&chunks, BIG).1,
            Some(ProtoError::MaxControlLine)
        );

        // Ops without arguments and runs of blanks are bounded too.
        let junk = format!("PING{}", " ".repeat(MAX_CONTROL_LINE + LINE_SLACK));
        assert_eq!(client_err(junk.as_bytes(), BIG), ProtoError::MaxControlLine);
        let blanks = format!("PUB{}", " ".repeat(MAX_CONTROL_LINE + LINE_SLACK));
        assert_eq!(
            client_err(blanks.as_bytes(), BIG),
            ProtoError::MaxControlLine
        );
    }

    #[test]
    fn server_control_line_limit_is_generous_but_bounded() {
        let long = format!("MSG {} 1 0\r\n\r\n", "s".repeat(100_000));
        assert_eq!(server_all(long.as_bytes(), BIG).0.len(), 1);
        let too_long = format!("MSG {}", "s".repeat(MAX_SERVER_CONTROL_LINE + 1));
        assert_eq!(
            server_err(too_long.as_bytes(), BIG),
            ProtoError::MaxControlLine
        );
    }

    #[test]
    fn max_payload_is_checked_from_the_control_line() {
        // Only the control line has arrived: no payload byte is needed to refuse it.
        let e = client_err(b"PUB foo 1025\r\n", 1024);
        assert_eq!(e, ProtoError::MaxPayload);
        assert_eq!(e.server_err(), Some("Maximum Payload Violation"));
        // HPUB counts headers + payload.
        assert_eq!(
            client_err(b"HPUB foo 12 1025\r\n", 1024),
            ProtoError::MaxPayload
        );
        // At the limit is fine.
        let (_, err) = client_all(b"PUB foo 1024\r\n", 1024);
        assert_eq!(err, None);
        assert_eq!(
            server_err(b"MSG foo 1 1025\r\n", 1024),
            ProtoError::MaxPayload
        );
        assert_eq!(
            server_err(b"HMSG foo 1 12 1025\r\n", 1024),
            ProtoError::MaxPayload
        );
        // Bad arguments are reported before the size is compared, as processPub does.
        assert!(matches!(
            client_err(b"PUB foo bar baz 99999\r\n", 10),
            ProtoError::BadArgs(_)
        ));
    }

    #[test]
    fn bad_terminator() {
        for input in [
            &b"PUB foo 5\r\nhelloX\r\n"[..],
            b"PUB foo 5\r\nhello\n",
            b"PUB foo 5\r\nhello\rX",
            b"PUB foo 5\r\nhello\n\r",
            b"PUB foo 4\r\nhello\r\n",
            // Detected at the first wrong byte, before the rest arrives.
            b"PUB foo 5\r\nhelloX",
            b"HPUB foo 12 12\r\nNATS/1.0\r\n\r\nX",
        ] {
            let e = client_err(input, BIG);
            assert_eq!(
                e,
                ProtoError::BadTerminator,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(e.server_err(), Some("Unknown Protocol Operation"));
        }
        assert_eq!(
            server_err(b"MSG foo 1 5\r\nhello!\r\n", BIG),
            ProtoError::BadTerminator
        );
    }

    #[test]
    fn bad_arguments_close_silently() {
        for input in [
            &b"PUB foo\r\n"[..],
            b"PUB a b c 5\r\n",
            b"PUB foo -5\r\n",
            b"PUB foo +5\r\n",
            b"PUB foo abc\r\n",
            b"PUB foo 5x\r\n",
            b"PUB foo 0x10\r\n",
            // nats-server's parseSize takes at most 9 digits.
            b"PUB foo 1234567890\r\n",
            b"PUB foo 0000000001\r\n",
            b"HPUB foo 5\r\n",
            b"HPUB foo -1 5\r\n",
            b"HPUB foo 5 -1\r\n",
            b"HPUB foo x 5\r\n",
            b"HPUB foo 20 10\r\n",
            b"HPUB a b c 1 2\r\n",
            b"SUB foo\r\n",
            b"SUB a b c d\r\n",
            b"UNSUB \r\n",
            b"UNSUB 1 2 3\r\n",
            b"CONNECT\r\n",
            b"CONNECT \t \r\n",
            b"INFO \r\n",
        ] {
            let e = client_err(input, BIG);
            assert!(
                matches!(e, ProtoError::BadArgs(_)),
                "{:?}: {e:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(e.server_err(), None);
            assert_eq!(e.reason(), "bad_args");
        }
        for input in [
            &b"MSG foo 1\r\n"[..],
            b"MSG a 1 r x 5\r\n",
            b"MSG foo 1 -1\r\n",
            b"HMSG foo 1 5\r\n",
            b"HMSG foo 1 20 10\r\n",
            b"HMSG foo 1 r x 1 2\r\n",
        ] {
            assert!(matches!(server_err(input, BIG), ProtoError::BadArgs(_)));
        }
    }

    #[test]
    fn header_blocks_of_any_shape_are_taken_as_the_server_takes_them() {
        for (input, headers, payload) in [
            // nats.js 3.x: a JetStream publish without options, and every KV put.
            (&b"HPUB foo 0 5\r\nhello\r\n"[..], &b""[..], &b"hello"[..]),
            (b"HPUB foo 0 0\r\n\r\n", b"", b""),
            (b"HPUB foo 5 7\r\nHELLOxy\r\n", b"HELLO", b"xy"),
            // A block not ended by a blank line: the terminator after it is the op's own CRLF.
            (
                b"HPUB foo 12 12\r\nNATS/1.0\r\nA:\r\n",
                b"NATS/1.0\r\nA:",
                b"",
            ),
            (
                b"HPUB foo 12 13\r\nnats/1.0\r\n\r\nx\r\n",
                b"nats/1.0\r\n\r\n",
                b"x",
            ),
        ] {
            let mut p = ClientParser::new();
            let mut buf = BytesMut::from(input);
            let op = p.next(&mut buf, BIG).expect("accepted").expect("complete");
            let ClientOp::Hpub {
                headers: h,
                payload: b,
                ..
            } = op
            else {
                panic!("{op:?}");
            };
            assert_eq!((&h[..], &b[..]), (headers, payload), "{input:?}");
            assert!(buf.is_empty());
        }
        let mut p = ServerParser::new();
        let mut buf = BytesMut::from(&b"HMSG foo 1 5 5\r\nNATS/\r\n"[..]);
        let Some(ServerOp::Hmsg {
            headers, payload, ..
        }) = p.next(&mut buf, BIG).unwrap()
        else {
            panic!("an HMSG");
        };
        assert_eq!((&headers[..], &payload[..]), (&b"NATS/"[..], &b""[..]));
    }

    #[test]
    fn hpub_is_refused_when_the_connect_did_not_enable_headers() {
        let mut p = ClientParser::new();
        p.allow_headers(false);
        // Refused before its arguments are read, as nats-server does: even a bad size gives
        // the same silent close.
        for input in [
            &b"HPUB foo 0 5\r\nhello\r\n"[..],
            b"HPUB foo 12 99999999999\r\n",
        ] {
            let mut q = ClientParser::new();
            q.allow_headers(false);
            let mut buf = BytesMut::from(input);
            let e = q.next(&mut buf, BIG).expect_err("refused");
            assert_eq!(
                e,
                ProtoError::BadArgs("HPUB: headers not enabled in CONNECT")
            );
            assert_eq!(e.server_err(), None);
        }
        let mut buf = BytesMut::from(&b"PUB foo 2\r\nhi\r\n"[..]);
        assert!(
            p.next(&mut buf, BIG).unwrap().is_some(),
            "PUB is unaffected"
        );
        p.allow_headers(true);
        let mut buf = BytesMut::from(&b"HPUB foo 0 2\r\nhi\r\n"[..]);
        assert!(p.next(&mut buf, BIG).unwrap().is_some());
    }

    #[test]
    fn a_delivered_subject_keeps_a_carriage_return() {
        // `PUB a\rb 2` is accepted by the server (a `\r` inside the line is kept), which then
        // delivers `MSG a\rb 1 2`.
        let mut c = ClientParser::new();
        let mut buf = BytesMut::from(&b"PUB a\rb 2\r\nhi\r\n"[..]);
        let Some(ClientOp::Pub { subject, .. }) = c.next(&mut buf, BIG).unwrap() else {
            panic!("a PUB");
        };
        assert_eq!(&subject[..], b"a\rb");
        let mut p = ServerParser::new();
        let mut buf = BytesMut::from(&b"MSG a\rb 1 2\r\nhi\r\nHMSG a\rb 1 r\r 0 2\r\nhi\r\n"[..]);
        let Some(ServerOp::Msg { subject, sid, .. }) = p.next(&mut buf, BIG).unwrap() else {
            panic!("an MSG");
        };
        assert_eq!((&subject[..], &sid[..]), (&b"a\rb"[..], &b"1"[..]));
        let Some(ServerOp::Hmsg { reply, .. }) = p.next(&mut buf, BIG).unwrap() else {
            panic!("an HMSG");
        };
        assert_eq!(reply.as_deref(), Some(&b"r\r"[..]));
    }

    #[test]
    fn a_line_feed_right_after_the_verb_starts_the_arguments() {
        // As nats-server reads them, whole or split at any byte.
        let input: &[u8] = b"PUB \nfoo 5\r\nhello\r\nSUB \nbar 1\r\nCONNECT\n{}\r\nPING\r\n";
        for cut in 0..=input.len() {
            let (ops, err) = client_chunks(&[&input[..cut], &input[cut..]], BIG);
            assert_eq!(err, None, "split at {cut}");
            assert_eq!(ops.len(), 4, "split at {cut}: {ops:?}");
            let ClientOp::Pub { subject, .. } = &ops[0] else {
                panic!("{ops:?}")
            };
            assert_eq!(&subject[..], b"\nfoo");
            // SUB splits on the line feed, as the server's splitArg does.
            let ClientOp::Sub { subject, sid, .. } = &ops[1] else {
                panic!("{ops:?}")
            };
            assert_eq!((&subject[..], &sid[..]), (&b"bar"[..], &b"1"[..]));
            assert!(matches!(&ops[2], ClientOp::Connect(j) if &j[..] == b"\n{}"));
        }
        // The server sends the subject back as it took it.
        let (ops, err) = server_all(b"MSG \nfoo 1 5\r\nhello\r\n", BIG);
        assert_eq!(err, None);
        assert!(matches!(&ops[0], ServerOp::Msg { subject, .. } if &subject[..] == b"\nfoo"));
        // Without a blank after the verb it is still no verb; a second line feed ends the line.
        assert_eq!(
            client_all(b"PUB\nfoo 5\r\n", BIG).1,
            Some(ProtoError::UnknownOp)
        );
        assert!(matches!(
            client_all(b"PUB \n\n", BIG).1,
            Some(ProtoError::BadArgs(_))
        ));
        // Verbs that ignore the rest of their line still end at it, and so does -ERR.
        assert_eq!(client_all(b"PING \nPONG\r\n", BIG).0.len(), 2);
        assert_eq!(server_all(b"-ERR \nPING\r\n", BIG).0.len(), 2);
    }

    #[test]
    fn errors_are_sticky() {
        let mut p = ClientParser::new();
        let mut buf = BytesMut::from(&b"XPING\r\n"[..]);
        assert_eq!(p.next(&mut buf, BIG), Err(ProtoError::UnknownOp));
        buf.clear();
        buf.extend_from_slice(b"PING\r\n");
        assert_eq!(p.next(&mut buf, BIG), Err(ProtoError::UnknownOp));
    }

    #[test]
    fn a_shrunken_buffer_does_not_panic() {
        let mut p = ClientParser::new();
        let mut buf = BytesMut::from(&b"SUB foo"[..]);
        assert_eq!(p.next(&mut buf, BIG), Ok(None));
        buf.clear();
        buf.extend_from_slice(b"S");
        let _ = p.next(&mut buf, BIG);
        let mut p = ClientParser::new();
        let mut buf = BytesMut::from(&b"PUB foo 5\r\nhel"[..]);
        assert_eq!(p.next(&mut buf, BIG), Ok(None));
        buf.clear();
        assert_eq!(p.next(&mut buf, BIG), Ok(None));
    }

    // ---- properties --------------------------------------------------------------------------

    fn token() -> impl Strategy<Value = Bytes> {
        "[A-Za-z0-9_.$*>-]{1,16}".prop_map(|s| Bytes::from(s.into_bytes()))
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from)
    }

    fn header_block() -> impl Strategy<Value = Bytes> {
        (
            prop::option::of("[0-9]{3}( [A-Za-z ]{0,12})?"),
            prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,10}", "[ -~]{0,12}"), 0..4),
        )
            .prop_map(|(status, fields)| {
                let mut s = String::from("NATS/1.0");
                if let Some(status) = status {
                    s.push(' ');
                    s.push_str(&status);
                }
                s.push_str("\r\n");
                for (k, v) in fields {
                    s.push_str(&format!("{k}: {v}\r\n"));
                }
                s.push_str("\r\n");
                Bytes::from(s.into_bytes())
            })
    }

    fn json() -> impl Strategy<Value = Bytes> {
        "\\{[ -~]{0,30}\\}".prop_map(|s| Bytes::from(s.into_bytes()))
    }

    fn err_text() -> impl Strategy<Value = Bytes> {
        "[ -~]{0,30}".prop_map(|s| Bytes::from(s.into_bytes()))
    }

    fn client_op() -> impl Strategy<Value = ClientOp> {
        prop_oneof![
            json().prop_map(ClientOp::Connect),
            (token(), prop::option::of(token()), payload()).prop_map(
                |(subject, reply, payload)| {
                    ClientOp::Pub {
                        subject,
                        reply,
                        payload,
                    }
                }
            ),
            (
                token(),
                prop::option::of(token()),
                header_block(),
                payload()
            )
                .prop_map(|(subject, reply, headers, payload)| ClientOp::Hpub {
                    subject,
                    reply,
                    headers,
                    payload,
                }),
            (token(), prop::option::of(token()), token()).prop_map(|(subject, queue, sid)| {
                ClientOp::Sub {
                    subject,
                    queue,
                    sid,
                }
            }),
            (token(), prop::option::of("[0-9]{1,5}")).prop_map(|(sid, max)| ClientOp::Unsub {
                sid,
                max: max.map(|m| Bytes::from(m.into_bytes())),
            }),
            Just(ClientOp::Ping),
            Just(ClientOp::Pong),
            json().prop_map(ClientOp::Info),
            Just(ClientOp::Ok),
            err_text().prop_map(ClientOp::Err),
        ]
    }

    fn server_op() -> impl Strategy<Value = ServerOp> {
        prop_oneof![
            json().prop_map(ServerOp::Info),
            (token(), token(), prop::option::of(token()), payload()).prop_map(
                |(subject, sid, reply, payload)| ServerOp::Msg {
                    subject,
                    sid,
                    reply,
                    payload,
                }
            ),
            (
                token(),
                token(),
                prop::option::of(token()),
                header_block(),
                payload()
            )
                .prop_map(|(subject, sid, reply, headers, payload)| ServerOp::Hmsg {
                    subject,
                    sid,
                    reply,
                    headers,
                    payload,
                }),
            Just(ServerOp::Ping),
            Just(ServerOp::Pong),
            Just(ServerOp::Ok),
            err_text().prop_map(ServerOp::Err),
        ]
    }

    /// Realistic fragments, lenient forms and noise, to be glued together at random.
    const FRAGMENTS: &[&[u8]] = &[
        b"PUB foo 5\r\nhello\r\n",
        b"pub\tfoo  r 0\n\r\n",
        b"HPUB foo 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
        b"hpub x r 22 22\nNATS/1.0 503\r\nA: b\r\n\r\n\r\n",
        b"SUB foo q 1\r\n",
        b"sub\tfoo 2\n",
        b"UNSUB 1 3\r\n",
        b"PING\r\n",
        b"pong junk\n",
        b"CONNECT{\"a\":1} \r\n",
        b"INFO {}\r\n",
        b"+OK\r\n",
        b"-ERR 'x y'\r\n",
        b"-err z'\n",
        b"MSG a 1 2\r\nhi\r\n",
        b"hmsg a 1 r 12 12\nNATS/1.0\r\n\r\n\r\n",
        b"\r\n",
        b" ",
        b"\t",
        b"'",
    ];

    fn noisy_stream() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                4 => prop::sample::select(FRAGMENTS).prop_map(|f| f.to_vec()),
                1 => prop::collection::vec(any::<u8>(), 0..6),
            ],
            0..10,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn client_ops_round_trip(ops in prop::collection::vec(client_op(), 0..12), cut in any::<prop::sample::Index>()) {
            round_trips::<ClientParser>(ops, cut)?;
        }

        #[test]
        fn server_ops_round_trip(ops in prop::collection::vec(server_op(), 0..12), cut in any::<prop::sample::Index>()) {
            round_trips::<ServerParser>(ops, cut)?;
        }

        #[test]
        fn client_reparse_is_stable(input in noisy_stream(), cut in any::<prop::sample::Index>()) {
            reparses_stably::<ClientParser>(&input, cut)?;
        }

        #[test]
        fn server_reparse_is_stable(input in noisy_stream(), cut in any::<prop::sample::Index>()) {
            reparses_stably::<ServerParser>(&input, cut)?;
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..256), max in 0usize..64) {
            let _ = client_all(&input, max);
            let _ = server_all(&input, max);
        }
    }
}
