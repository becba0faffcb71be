//! Reading the `NATS/1.0` header block of `HPUB`/`HMSG` without allocating.
//!
//! Layout: `NATS/1.0[ SSS[ description]]\r\n(Name: value\r\n)*\r\n`. Names keep their case and
//! may repeat. These helpers only read; they never rewrite a block, and they never reject one:
//! nats-server stores and forwards whatever bytes a client declares as its header block (it
//! only looks values up, `sliceHeader` in client.go), so the proxy passes every block through
//! unchanged and a block of another shape simply has no status and no values here.

/// The version token every header block starts with.
pub const HEADER_VERSION: &[u8] = b"NATS/1.0";

/// The status code of a header block, as in `NATS/1.0 503` or `NATS/1.0 100 Idle Heartbeat`.
///
/// `None` when the first line carries no status or the status is not three digits.
pub fn header_status(headers: &[u8]) -> Option<u16> {
    let rest = headers.strip_prefix(HEADER_VERSION)?;
    let first = &rest[..line_len(rest)];
    let first = trim_start(first);
    let code = match first.iter().position(|&b| is_blank(b)) {
        Some(end) => &first[..end],
        None => first,
    };
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(code.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0')))
}

/// The value of the first header named `name` (ASCII case-insensitive), without the blanks
/// around it.
///
/// nats-server's own lookups match names case-sensitively; agents' libraries differ, so this is
/// lenient. Callers that must see what the server sees should compare the name themselves via
/// [`headers`].
pub fn header_value<'a>(headers: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let name = name.as_bytes();
    self::headers(headers)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// Iterates over the `(name, value)` pairs of a header block, skipping the version line. A line
/// without a `:` is skipped. Values are trimmed of blanks.
pub fn headers(headers: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let body = match headers.iter().position(|&b| b == b'\n') {
        Some(i) => &headers[i + 1..],
        None => &[][..],
    };
    body.split(|&b| b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        Some((name, trim_end(trim_start(value))))
    })
}

fn line_len(s: &[u8]) -> usize {
    let end = s.iter().position(|&b| b == b'\n').unwrap_or(s.len());
    if end > 0 && s[end - 1] == b'\r' {
        end - 1
    } else {
        end
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_blank(b)).unwrap_or(s.len());
    &s[start..]
}

fn trim_end(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&b| !is_blank(b)).map_or(0, |i| i + 1);
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_RESPONDERS: &[u8] = b"NATS/1.0 503\r\nNats-Subject: nobody\r\n\r\n";
    const HEARTBEAT: &[u8] =
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\nNats-Last-Stream: 42\r\n\r\n";
    const FLOW: &[u8] = b"NATS/1.0 100 FlowControl Request\r\n\r\n";
    const PLAIN: &[u8] = b"NATS/1.0\r\nNats-Msg-Id: abc\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n";

    #[test]
    fn status_codes() {
        assert_eq!(header_status(NO_RESPONDERS), Some(503));
        assert_eq!(header_status(HEARTBEAT), Some(100));
        assert_eq!(header_status(FLOW), Some(100));
        assert_eq!(
            header_status(b"NATS/1.0 404 No Messages\r\n\r\n"),
            Some(404)
        );
        assert_eq!(
            header_status(b"NATS/1.0 408 Request Timeout\r\n\r\n"),
            Some(408)
        );
        assert_eq!(header_status(PLAIN), None);
        assert_eq!(header_status(b"NATS/1.0 50\r\n\r\n"), None);
        assert_eq!(header_status(b"NATS/1.0 5033\r\n\r\n"), None);
        assert_eq!(header_status(b"NATS/1.0 abc\r\n\r\n"), None);
        assert_eq!(header_status(b"HTTP/1.1 503\r\n\r\n"), None);
        assert_eq!(header_status(b""), None);
        assert_eq!(header_status(b"NATS/1.0"), None);
        assert_eq!(header_status(b"NATS/1.0 204"), Some(204));
    }

    #[test]
    fn value_lookup() {
        assert_eq!(
            header_value(NO_RESPONDERS, "Nats-Subject"),
            Some(&b"nobody"[..])
        );
        assert_eq!(
            header_value(NO_RESPONDERS, "nats-subject"),
            Some(&b"nobody"[..])
        );
        assert_eq!(
            header_value(HEARTBEAT, "Nats-Last-Stream"),
            Some(&b"42"[..])
        );
        assert_eq!(header_value(PLAIN, "Nats-Msg-Id"), Some(&b"abc"[..]));
        // First occurrence wins, whatever the case of the stored name.
        assert_eq!(header_value(PLAIN, "X-DUP"), Some(&b"1"[..]));
        assert_eq!(header_value(PLAIN, "Nats-Subject"), None);
        // The version line is never taken for a header, even if it has a colon.
        assert_eq!(
            header_value(b"NATS/1.0 503 a:b\r\n\r\n", "NATS/1.0 503 a"),
            None
        );
        // A prefix of a name is not the name.
        assert_eq!(header_value(PLAIN, "Nats-Msg"), None);
        assert_eq!(
            header_value(b"NATS/1.0\r\nK:\t v \t\r\n\r\n", "k"),
            Some(&b"v"[..])
        );
        assert_eq!(header_value(b"NATS/1.0\r\nK:\r\n\r\n", "k"), Some(&b""[..]));
    }

    #[test]
    fn iterates_pairs_in_order() {
        let all: Vec<_> = headers(PLAIN).collect();
        assert_eq!(
            all,
            vec![
                (&b"Nats-Msg-Id"[..], &b"abc"[..]),
                (&b"X-Dup"[..], &b"1"[..]),
                (&b"x-dup"[..], &b"2"[..]),
            ]
        );
        assert_eq!(headers(b"").count(), 0);
        assert_eq!(headers(FLOW).count(), 0);
    }

    #[test]
    fn blocks_of_any_shape_are_read_without_failing() {
        for odd in [
            &b""[..],
            b"hello\r\n",
            b"NATS/1.0\r\nab\r\n",
            b"nats/1.0 503\r\n\r\n",
            b"\r\n\r\n",
            b"NATS/1.0",
            b"\xff\xfe:\x00",
        ] {
            assert_eq!(header_status(odd), None, "{odd:?}");
            assert_eq!(header_value(odd, "Nats-Subject"), None, "{odd:?}");
        }
        // A block without the version line still has its values found, as the server finds
        // them (`sliceHeader` looks for `\r\nName:`).
        assert_eq!(
            header_value(b"X/1\r\nNats-Subject: a\r\n", "Nats-Subject"),
            Some(&b"a"[..])
        );
    }
}
