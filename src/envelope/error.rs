//! The one error type of the envelope module.
//!
//! Every variant is cheap to build (no allocation), carries no key or
//! plaintext bytes, and maps to a short `reason()` label for metrics.

/// Why an envelope could not be parsed, sealed or opened, or a key could not
/// be made or unwrapped.
///
/// All variants except [`EnvelopeError::Random`], [`EnvelopeError::Backend`]
/// and [`EnvelopeError::NonceExhausted`] describe a fault in the input (for
/// inbound traffic, the publisher's or the bus's fault); those three are ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The payload does not start with the envelope magic byte.
    #[error("payload is not a cipherbus envelope")]
    NotEnvelope,
    /// The payload is shorter than the fixed overhead of its version.
    #[error("envelope is truncated")]
    Truncated,
    /// The version byte names a layout this build cannot read.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// The cipher-suite byte names a suite this build cannot use.
    #[error("unsupported envelope cipher suite {0}")]
    UnsupportedSuite(u8),
    /// The flags byte has bits set that this version does not define.
    #[error("unknown envelope flags {0:#04x}")]
    UnknownFlags(u8),
    /// The envelope is not bound to its subject and the caller requires binding.
    #[error("envelope is not bound to its subject")]
    Unbound,
    /// The header passed to `open_into` is not the header of the envelope.
    #[error("header does not match the envelope")]
    HeaderMismatch,
    /// Authentication failed: wrong key, wrong subject, or the bytes were changed.
    #[error("envelope failed authentication")]
    Auth,
    /// A wrapped key has the wrong length or an unknown format byte.
    #[error("wrapped key is malformed")]
    WrappedFormat,
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// A sealer used up its 2^64 - 1 nonces; make a new one.
    #[error("sealer nonce counter exhausted")]
    NonceExhausted,
    /// The message is longer than the cipher can seal in one call.
    #[error("message too large to seal")]
    TooLarge,
    /// The cipher backend refused an operation that cannot fail on valid input.
    #[error("cipher backend failure")]
    Backend,
}

impl EnvelopeError {
    /// A short, stable, snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::NotEnvelope => "not_envelope",
            EnvelopeError::Truncated => "truncated",
            EnvelopeError::UnsupportedVersion(_) => "version",
            EnvelopeError::UnsupportedSuite(_) => "suite",
            EnvelopeError::UnknownFlags(_) => "flags",
            EnvelopeError::Unbound => "unbound",
            EnvelopeError::HeaderMismatch => "header_mismatch",
            EnvelopeError::Auth => "auth",
            EnvelopeError::WrappedFormat => "wrapped_format",
            EnvelopeError::Random => "random",
            EnvelopeError::NonceExhausted => "nonce_exhausted",
            EnvelopeError::TooLarge => "too_large",
            EnvelopeError::Backend => "backend",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_snake_case() {
        let all = [
            EnvelopeError::NotEnvelope,
            EnvelopeError::Truncated,
            EnvelopeError::UnsupportedVersion(9),
            EnvelopeError::UnsupportedSuite(9),
            EnvelopeError::UnknownFlags(0x80),
            EnvelopeError::Unbound,
            EnvelopeError::HeaderMismatch,
            EnvelopeError::Auth,
            EnvelopeError::WrappedFormat,
            EnvelopeError::Random,
            EnvelopeError::NonceExhausted,
            EnvelopeError::TooLarge,
            EnvelopeError::Backend,
        ];
        let mut seen = std::collections::HashSet::new();
        for e in all {
            let r = e.reason();
            assert!(seen.insert(r), "duplicate reason {r}");
            assert!(r.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r}");
        }
    }
}
