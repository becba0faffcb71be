//! Protocol faults found while parsing, each mapped to what nats-server answers for it.

/// A protocol fault. Every variant means the connection must be closed.
///
/// The parsers cannot tell whose fault it is; the caller knows which side it was reading.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// The line does not start with a verb known in this direction.
    #[error("unknown protocol operation")]
    UnknownOp,
    /// The control line is over the limit (checked before the `\n` arrives too).
    #[error("maximum control line exceeded")]
    MaxControlLine,
    /// The declared payload size is over `max_payload`.
    #[error("maximum payload exceeded")]
    MaxPayload,
    /// The payload is not followed by exactly `\r\n`.
    #[error("payload not followed by CRLF")]
    BadTerminator,
    /// The arguments of a control line are malformed (count, size digits, `hdr > total`, ...).
    #[error("bad arguments: {0}")]
    BadArgs(&'static str),
}

impl ProtoError {
    /// The exact text nats-server sends as `-ERR '<text>'` before it closes a client connection
    /// for this fault, or `None` where it closes without a message.
    pub fn server_err(&self) -> Option<&'static str> {
        match self {
            // parser.go `parseErr` label; also the MSG_END_R / MSG_END_N states.
            ProtoError::UnknownOp | ProtoError::BadTerminator => Some("Unknown Protocol Operation"),
            // `ErrMaxControlLine` wrapped in an errCtx whose Error() is the bare text.
            ProtoError::MaxControlLine => Some("maximum control line exceeded"),
            // client.go `maxPayloadViolation`.
            ProtoError::MaxPayload => Some("Maximum Payload Violation"),
            // processPub / processHeaderPub / parseSub return plain errors: the read loop closes
            // with ProtocolViolation and sends nothing.
            ProtoError::BadArgs(_) => None,
        }
    }

    /// A snake_case label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProtoError::UnknownOp => "unknown_op",
            ProtoError::MaxControlLine => "max_control_line",
            ProtoError::MaxPayload => "max_payload",
            ProtoError::BadTerminator => "bad_terminator",
            ProtoError::BadArgs(_) => "bad_args",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_texts_match_nats_server() {
        assert_eq!(
            ProtoError::UnknownOp.server_err(),
            Some("Unknown Protocol Operation")
        );
        assert_eq!(
            ProtoError::BadTerminator.server_err(),
            Some("Unknown Protocol Operation")
        );
        assert_eq!(
            ProtoError::MaxControlLine.server_err(),
            Some("maximum control line exceeded")
        );
        assert_eq!(
            ProtoError::MaxPayload.server_err(),
            Some("Maximum Payload Violation")
        );
        assert_eq!(ProtoError::BadArgs("pub").server_err(), None);
    }

    #[test]
    fn reasons_are_distinct_snake_case() {
        let all = [
            ProtoError::UnknownOp,
            ProtoError::MaxControlLine,
            ProtoError::MaxPayload,
            ProtoError::BadTerminator,
            ProtoError::BadArgs("a"),
        ];
        let mut seen = std::collections::HashSet::new();
        for e in all {
            let r = e.reason();
            assert!(
                r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{r}"
            );
            assert!(seen.insert(r), "duplicate reason {r}");
        }
    }
}
