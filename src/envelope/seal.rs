//! Sealing: one [`Sealer`] per connection and epoch.
//!
//! A sealer picks a random 16-byte nonce prefix once, computes the HChaCha20
//! subkey for it once, then seals each message with the IETF AEAD under that
//! subkey and the next value of an 8-byte counter. No locks, no system calls
//! and no allocation per message once the output and AAD buffers have grown.

use std::fmt;

use bytes::BytesMut;

use super::aead::{PrefixCipher, PREFIX_LEN};
use super::keys::DataKey;
use super::multi::{Batch, BATCH_BELOW};
use super::{
    EncodedHeader, EnvelopeError, Header, ScopeId, FLAG_SUBJECT_BOUND, HEADER_LEN,
    SUITE_XCHACHA20_POLY1305, TAG_LEN, VERSION_1, VERSION_2,
};

/// Seals payloads under one data key with nonces `prefix || counter`.
pub struct Sealer {
    epoch: u32,
    /// `Some` seals version-2 envelopes naming this scope; `None`, version 1.
    scope: Option<ScopeId>,
    prefix: [u8; PREFIX_LEN],
    counter: u64,
    cipher: PrefixCipher,
    aad: Vec<u8>,
}

impl Sealer {
    /// A sealer with a fresh random nonce prefix, starting at counter 0.
    pub fn new(epoch: u32, key: &DataKey) -> Result<Self, EnvelopeError> {
        Self::scoped(epoch, key, None)
    }

    /// A sealer for the key scope `scope` (version-2 envelopes), or for the default scope
    /// (version 1) when it is `None`.
    pub fn scoped(
        epoch: u32,
        key: &DataKey,
        scope: Option<ScopeId>,
    ) -> Result<Self, EnvelopeError> {
        let mut prefix = [0u8; PREFIX_LEN];
        getrandom::getrandom(&mut prefix).map_err(|_| EnvelopeError::Random)?;
        let mut s = Self::build(epoch, key, prefix, 0)?;
        s.scope = scope;
        Ok(s)
    }

    /// [`Sealer::with_prefix`] for a key scope, for test vectors.
    pub fn scoped_with_prefix(
        epoch: u32,
        key: &DataKey,
        scope: Option<ScopeId>,
        prefix: [u8; PREFIX_LEN],
        counter: u64,
    ) -> Self {
        let mut s = Self::with_prefix(epoch, key, prefix, counter);
        s.scope = scope;
        s
    }

    /// A sealer with a caller-chosen prefix and counter, for test vectors.
    ///
    /// Never use this for real traffic: reusing a prefix under one key
    /// repeats nonces.
    pub fn with_prefix(epoch: u32, key: &DataKey, prefix: [u8; PREFIX_LEN], counter: u64) -> Self {
        // Invariant: the backend only rejects keys of the wrong length, and
        // the subkey is always 32 bytes.
        Self::build(epoch, key, prefix, counter)
            .expect("ChaCha20-Poly1305 accepts every 32-byte key")
    }

    fn build(
        epoch: u32,
        key: &DataKey,
        prefix: [u8; PREFIX_LEN],
        counter: u64,
    ) -> Result<Self, EnvelopeError> {
        Ok(Sealer {
            epoch,
            scope: None,
            prefix,
            counter,
            cipher: PrefixCipher::new(key.bytes(), &prefix)?,
            aad: Vec::with_capacity(HEADER_LEN + 64),
        })
    }

    /// The epoch written into every envelope this sealer makes.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The scope named in every envelope this sealer makes (`None`: version 1).
    pub fn scope(&self) -> Option<ScopeId> {
        self.scope
    }

    /// Bytes each envelope this sealer makes adds to its plaintext.
    pub fn overhead(&self) -> usize {
        HEADER_LEN
            + TAG_LEN
            + if self.scope.is_some() {
                super::SCOPE_ID_LEN
            } else {
                0
            }
    }

    /// The aws-lc key of subkey `id`, if it is this sealer's.
    pub(crate) fn cached_key(&self, id: u64) -> Option<&aws_lc_rs::aead::LessSafeKey> {
        (self.cipher.id() == id).then(|| self.cipher.small_key())
    }

    /// How many nonces this sealer has used (its next counter value).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Appends `HEADER || ciphertext || tag` to `out`, exactly
    /// `plaintext.len() + self.overhead()` bytes.
    ///
    /// `subject = Some(s)` sets [`FLAG_SUBJECT_BOUND`] and uses
    /// `AAD = header || s`; `None` leaves the flag clear and uses
    /// `AAD = header`. On error `out` is left as it was.
    pub fn seal_into(
        &mut self,
        subject: Option<&[u8]>,
        plaintext: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), EnvelopeError> {
        let (tail, header) = self.next_header(subject)?;
        self.aad.clear();
        self.aad.extend_from_slice(&header);
        if let Some(s) = subject {
            self.aad.extend_from_slice(s);
        }

        let start = out.len();
        out.reserve(plaintext.len() + self.overhead());
        out.extend_from_slice(&header);
        out.extend_from_slice(plaintext);
        match self
            .cipher
            .seal_in_place(tail, &self.aad, &mut out[start + header.len()..])
        {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                self.counter += 1;
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// [`Sealer::seal_into`] with the AEAD left to `batch`: appends the envelope with the
    /// plaintext where the ciphertext goes and room for the tag, and queues it.
    /// [`Batch::seal`] over `out` then finishes every queued envelope at once; until it has,
    /// `out` holds plaintext and must not be sent. Payloads of [`BATCH_BELOW`] bytes or
    /// more are sealed at once, as by `seal_into`, and so is every payload when the batch
    /// does not defer (the default, audited backend).
    pub fn seal_deferred(
        &mut self,
        subject: Option<&[u8]>,
        plaintext: &[u8],
        out: &mut BytesMut,
        batch: &mut Batch,
    ) -> Result<(), EnvelopeError> {
        if plaintext.len() >= BATCH_BELOW || !batch.defers() {
            return self.seal_into(subject, plaintext, out);
        }
        let (tail, header) = self.next_header(subject)?;
        let start = out.len() + header.len();
        out.reserve(plaintext.len() + self.overhead());
        out.extend_from_slice(&header);
        out.extend_from_slice(plaintext);
        out.extend_from_slice(&[0; TAG_LEN]);
        let text = start..start + plaintext.len();
        let aad = [&header[..], subject.unwrap_or_default()];
        let tag_at = text.end;
        batch.push_seal(
            self.cipher.id(),
            self.cipher.subkey(),
            tail,
            aad,
            text,
            tag_at,
        );
        self.counter += 1;
        Ok(())
    }

    /// The nonce tail and header for the next message; does not advance the counter.
    fn next_header(
        &self,
        subject: Option<&[u8]>,
    ) -> Result<([u8; 8], EncodedHeader), EnvelopeError> {
        // The last counter value is never used, so `counter + 1` cannot wrap.
        if self.counter == u64::MAX {
            return Err(EnvelopeError::NonceExhausted);
        }
        let tail = self.counter.to_be_bytes();
        let mut nonce = [0u8; 24];
        nonce[..PREFIX_LEN].copy_from_slice(&self.prefix);
        nonce[PREFIX_LEN..].copy_from_slice(&tail);
        let header = Header {
            version: if self.scope.is_some() {
                VERSION_2
            } else {
                VERSION_1
            },
            suite: SUITE_XCHACHA20_POLY1305,
            flags: if subject.is_some() {
                FLAG_SUBJECT_BOUND
            } else {
                0
            },
            epoch: self.epoch,
            nonce,
            scope: self.scope,
        }
        .encode();
        Ok((tail, header))
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("epoch", &self.epoch)
            .field("scope", &self.scope.map(|s| s.to_string()))
            .field("prefix", &hex::encode(self.prefix))
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::envelope::OVERHEAD;

    #[test]
    fn output_length_and_header() {
        let key = DataKey::from_bytes([3; 32]);
        let mut s = Sealer::new(9, &key).unwrap();
        assert_eq!(s.epoch(), 9);
        let mut out = BytesMut::from(&b"prefix"[..]);
        s.seal_into(Some(b"a.b"), b"hello", &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        let env = &out[6..];
        assert_eq!(env.len(), 5 + OVERHEAD);
        let h = Header::parse(env).unwrap();
        assert_eq!(h.epoch, 9);
        assert!(h.subject_bound());
        assert_eq!(h.counter(), 0);
        s.seal_into(None, b"", &mut out).unwrap();
        let env2 = &out[6 + 5 + OVERHEAD..];
        assert_eq!(env2.len(), OVERHEAD);
        let h2 = Header::parse(env2).unwrap();
        assert!(!h2.subject_bound());
        assert_eq!(h2.counter(), 1);
        assert_eq!(h2.nonce_prefix(), h.nonce_prefix());
    }

    #[test]
    fn nonces_never_repeat_within_a_sealer() {
        let key = DataKey::from_bytes([3; 32]);
        let mut s = Sealer::new(1, &key).unwrap();
        let mut seen = HashSet::new();
        let mut out = BytesMut::new();
        for _ in 0..10_000 {
            out.clear();
            s.seal_into(Some(b"x"), b"m", &mut out).unwrap();
            assert!(seen.insert(Header::parse(&out).unwrap().nonce));
        }
        assert_eq!(s.counter(), 10_000);
    }

    #[test]
    fn sealers_have_distinct_prefixes() {
        let key = DataKey::from_bytes([3; 32]);
        let mut prefixes = HashSet::new();
        for _ in 0..256 {
            let mut s = Sealer::new(1, &key).unwrap();
            let mut out = BytesMut::new();
            s.seal_into(None, b"m", &mut out).unwrap();
            assert!(prefixes.insert(Header::parse(&out).unwrap().nonce_prefix()));
        }
    }

    #[test]
    fn counter_exhaustion_is_an_error_not_a_wrap() {
        let key = DataKey::from_bytes([3; 32]);
        let mut s = Sealer::with_prefix(1, &key, [0; 16], u64::MAX - 1);
        let mut out = BytesMut::new();
        s.seal_into(None, b"m", &mut out).unwrap();
        let len = out.len();
        assert_eq!(
            s.seal_into(None, b"m", &mut out),
            Err(EnvelopeError::NonceExhausted)
        );
        assert_eq!(out.len(), len, "failed seal leaves out untouched");
    }

    #[test]
    fn debug_has_no_key() {
        let key = DataKey::from_bytes([0x5a; 32]);
        let s = Sealer::with_prefix(4, &key, [0x11; 16], 2);
        let d = format!("{s:?}");
        assert!(d.contains("epoch: 4"), "{d}");
        assert!(!d.contains("5a5a"), "{d}");
    }

    #[test]
    fn sealer_is_send() {
        fn is_send<T: Send>() {}
        is_send::<Sealer>();
    }
}
