//! Opening: one [`Opener`] per connection.
//!
//! The opener keeps a small most-recently-used list of HChaCha20 subkeys,
//! keyed by (data-key identity, epoch, nonce prefix), so a stream of messages
//! from one sealer pays for HChaCha20 once. Evicted and cleared entries free
//! the backend key context, which cleanses the subkey; the raw subkey bytes
//! only ever sit in zeroized temporaries.

use std::fmt;

use bytes::BytesMut;

use super::aead::{split_nonce, PrefixCipher, PREFIX_LEN};
use super::keys::DataKey;
use super::multi::{Batch, BATCH_BELOW};
use super::{EnvelopeError, Header, HEADER_LEN, TAG_LEN};

/// Subkeys an [`Opener`] keeps by default: enough for a connection that
/// hears a handful of publishers per epoch.
pub const DEFAULT_OPENER_CACHE: usize = 16;

struct Entry {
    key_id: u64,
    epoch: u32,
    prefix: [u8; PREFIX_LEN],
    cipher: PrefixCipher,
}

/// Verifies and decrypts envelopes. Not shared between connections.
pub struct Opener {
    /// Most recently used first; never longer than `capacity`.
    cache: Vec<Entry>,
    capacity: usize,
    aad: Vec<u8>,
}

impl Default for Opener {
    fn default() -> Self {
        Opener::new()
    }
}

impl Opener {
    /// An opener with room for [`DEFAULT_OPENER_CACHE`] subkeys.
    pub fn new() -> Self {
        Opener::with_capacity(DEFAULT_OPENER_CACHE)
    }

    /// An opener with room for `capacity` subkeys (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Opener {
            cache: Vec::with_capacity(capacity),
            capacity,
            aad: Vec::with_capacity(HEADER_LEN + 64),
        }
    }

    /// Drops every cached subkey. Call when the keyring changes so subkeys of
    /// a destroyed key do not linger.
    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// The aws-lc key of subkey `id`, if it is one of the cached ones.
    pub(crate) fn cached_key(&self, id: u64) -> Option<&aws_lc_rs::aead::LessSafeKey> {
        self.cache
            .iter()
            .find(|e| e.cipher.id() == id)
            .map(|e| e.cipher.small_key())
    }

    /// Number of cached subkeys.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Verifies `envelope` and appends its plaintext to `out`.
    ///
    /// `header` must be [`Header::parse`] of `envelope` (the caller used its
    /// epoch to pick `key`); a header that does not match the envelope's
    /// bytes is refused. If the envelope is subject-bound, `AAD = header ||
    /// subject`. If it is not bound and `allow_unbound` is false, the result
    /// is [`EnvelopeError::Unbound`]. On any error nothing is appended to
    /// `out`.
    pub fn open_into(
        &mut self,
        key: &DataKey,
        header: &Header,
        envelope: &[u8],
        subject: &[u8],
        allow_unbound: bool,
        out: &mut BytesMut,
    ) -> Result<(), EnvelopeError> {
        let bound = Self::check(header, envelope, allow_unbound)?;
        let header_len = header.header_len();
        self.aad.clear();
        self.aad.extend_from_slice(&envelope[..header_len]);
        if bound {
            self.aad.extend_from_slice(subject);
        }

        let (prefix, tail) = split_nonce(&header.nonce);
        self.promote(key, header.epoch, &prefix)?;
        let cipher = &mut self.cache[0].cipher;

        let tag_at = envelope.len() - TAG_LEN;
        let start = out.len();
        out.extend_from_slice(&envelope[header_len..tag_at]);
        match cipher.open_in_place(tail, &self.aad, &envelope[tag_at..], &mut out[start..]) {
            Ok(()) => Ok(()),
            Err(e) => {
                // `open_in_place` already zeroed the unauthenticated bytes.
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// [`Opener::open_into`] with the AEAD left to `batch`: every check but the tag is
    /// made here, the ciphertext is appended to `out` where the plaintext goes, and the
    /// message is queued. [`Batch::open`] over `out` then verifies and decrypts every queued
    /// message at once, and names those that fail (their bytes zeroed); until it has, `out`
    /// holds ciphertext. Envelopes of [`BATCH_BELOW`] bytes of plaintext or more are opened
    /// at once, as by `open_into`, and so is every envelope when the batch does not defer
    /// (the default, audited backend).
    #[allow(clippy::too_many_arguments)]
    pub fn open_deferred(
        &mut self,
        key: &DataKey,
        header: &Header,
        envelope: &[u8],
        subject: &[u8],
        allow_unbound: bool,
        out: &mut BytesMut,
        batch: &mut Batch,
    ) -> Result<(), EnvelopeError> {
        if envelope.len() >= BATCH_BELOW + header.overhead() || !batch.defers() {
            return self.open_into(key, header, envelope, subject, allow_unbound, out);
        }
        let bound = Self::check(header, envelope, allow_unbound)?;
        let (prefix, tail) = split_nonce(&header.nonce);
        self.promote(key, header.epoch, &prefix)?;
        let cipher = &self.cache[0].cipher;
        let tag_at = envelope.len() - TAG_LEN;
        let mut expected = [0u8; TAG_LEN];
        expected.copy_from_slice(&envelope[tag_at..]);
        let header_len = header.header_len();
        let start = out.len();
        out.extend_from_slice(&envelope[header_len..tag_at]);
        let aad = [&envelope[..header_len], if bound { subject } else { &[] }];
        batch.push_open(
            cipher.id(),
            cipher.subkey(),
            tail,
            aad,
            start..out.len(),
            expected,
        );
        Ok(())
    }

    /// The checks before the AEAD; returns whether the subject is in the AAD.
    fn check(header: &Header, envelope: &[u8], allow_unbound: bool) -> Result<bool, EnvelopeError> {
        header.validate()?;
        if envelope.len() < header.overhead() {
            return Err(EnvelopeError::Truncated);
        }
        if header.encode()[..] != envelope[..header.header_len()] {
            return Err(EnvelopeError::HeaderMismatch);
        }
        let bound = header.subject_bound();
        if !bound && !allow_unbound {
            return Err(EnvelopeError::Unbound);
        }
        Ok(bound)
    }

    /// Puts the cipher for (key, epoch, prefix) at the front of the cache,
    /// computing it on a miss. On success `self.cache[0]` is that cipher.
    fn promote(
        &mut self,
        key: &DataKey,
        epoch: u32,
        prefix: &[u8; PREFIX_LEN],
    ) -> Result<(), EnvelopeError> {
        let key_id = key.id();
        let hit = self
            .cache
            .iter()
            .position(|e| e.key_id == key_id && e.epoch == epoch && e.prefix == *prefix);
        match hit {
            Some(i) => {
                // Move to front; rotating at most `capacity` small entries.
                self.cache[..=i].rotate_right(1);
            }
            None => {
                let cipher = PrefixCipher::new(key.bytes(), prefix)?;
                if self.cache.len() == self.capacity {
                    // Dropping the entry frees (and so cleanses) its key context.
                    self.cache.pop();
                }
                self.cache.insert(
                    0,
                    Entry {
                        key_id,
                        epoch,
                        prefix: *prefix,
                        cipher,
                    },
                );
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("cached", &self.cache.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::super::Sealer;
    use super::*;

    fn seal(s: &mut Sealer, subject: Option<&[u8]>, pt: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        s.seal_into(subject, pt, &mut out).unwrap();
        out.to_vec()
    }

    #[test]
    fn cache_hits_evicts_and_clears() {
        let key = DataKey::from_bytes([1; 32]);
        let mut o = Opener::with_capacity(2);
        let mut sealers: Vec<Sealer> = (0..3).map(|_| Sealer::new(1, &key).unwrap()).collect();
        let mut out = BytesMut::new();
        for round in 0..3 {
            for (i, s) in sealers.iter_mut().enumerate() {
                let env = seal(s, Some(b"s"), &[i as u8; 10]);
                let h = Header::parse(&env).unwrap();
                out.clear();
                o.open_into(&key, &h, &env, b"s", false, &mut out).unwrap();
                assert_eq!(&out[..], &[i as u8; 10], "round {round}");
                assert!(o.cached() <= 2);
            }
        }
        assert_eq!(o.cached(), 2);
        o.clear();
        assert_eq!(o.cached(), 0);
    }

    #[test]
    fn same_prefix_different_key_is_not_a_cache_hit() {
        let k1 = DataKey::from_bytes([1; 32]);
        let k2 = DataKey::from_bytes([2; 32]);
        let mut s1 = Sealer::with_prefix(1, &k1, [9; 16], 0);
        let mut s2 = Sealer::with_prefix(1, &k2, [9; 16], 0);
        let mut o = Opener::new();
        let mut out = BytesMut::new();
        let e1 = seal(&mut s1, Some(b"s"), b"one");
        let e2 = seal(&mut s2, Some(b"s"), b"two");
        let h1 = Header::parse(&e1).unwrap();
        let h2 = Header::parse(&e2).unwrap();
        o.open_into(&k1, &h1, &e1, b"s", false, &mut out).unwrap();
        assert_eq!(
            o.open_into(&k1, &h2, &e2, b"s", false, &mut out),
            Err(EnvelopeError::Auth)
        );
        o.open_into(&k2, &h2, &e2, b"s", false, &mut out).unwrap();
        assert_eq!(&out[..], b"onetwo");
    }

    #[test]
    fn mismatched_header_is_refused() {
        let key = DataKey::from_bytes([1; 32]);
        let mut s = Sealer::new(1, &key).unwrap();
        let a = seal(&mut s, Some(b"s"), b"a");
        let b = seal(&mut s, Some(b"s"), b"b");
        let hb = Header::parse(&b).unwrap();
        let mut out = BytesMut::from(&b"keep"[..]);
        assert_eq!(
            Opener::new().open_into(&key, &hb, &a, b"s", false, &mut out),
            Err(EnvelopeError::HeaderMismatch)
        );
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn unbound_needs_permission() {
        let key = DataKey::from_bytes([1; 32]);
        let mut s = Sealer::new(1, &key).unwrap();
        let env = seal(&mut s, None, b"hi");
        let h = Header::parse(&env).unwrap();
        let mut o = Opener::new();
        let mut out = BytesMut::new();
        assert_eq!(
            o.open_into(&key, &h, &env, b"any", false, &mut out),
            Err(EnvelopeError::Unbound)
        );
        assert!(out.is_empty());
        o.open_into(&key, &h, &env, b"any", true, &mut out).unwrap();
        assert_eq!(&out[..], b"hi");
    }

    #[test]
    fn opener_is_send() {
        fn is_send<T: Send>() {}
        is_send::<Opener>();
    }
}
