//! The cipher primitive: XChaCha20-Poly1305 computed as HChaCha20 plus IETF
//! ChaCha20-Poly1305.
//!
//! XChaCha20-Poly1305 with a 24-byte nonce `N` under key `K` is, by
//! definition (draft-irtf-cfrg-xchacha-03, section 2.3), IETF
//! ChaCha20-Poly1305 under the subkey `HChaCha20(K, N[0..16])` with the
//! 12-byte nonce `00000000 || N[16..24]`. [`PrefixCipher`] caches that subkey
//! for one 16-byte prefix so each message costs only the IETF AEAD. The
//! subkey comes from RustCrypto `chacha20::hchacha`. The IETF AEAD is
//! dispatched by size, because neither backend is fastest at both ends:
//! aws-lc-rs has the lowest fixed cost per call (short messages), OpenSSL's
//! AVX-512 code the highest throughput (long messages, from [`LARGE_FROM`]
//! bytes). Both compute the same RFC 8439 AEAD, so the bytes are identical
//! whichever runs; the tests check both sides of the threshold against the
//! draft's vector and RustCrypto. This file owns no key storage policy and
//! does no I/O.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use chacha20::cipher::consts::U10;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use zeroize::{Zeroize, Zeroizing};

use super::{EnvelopeError, TAG_LEN};

/// Length of the XChaCha20 nonce.
pub(crate) const NONCE_LEN: usize = 24;
/// Length of the part of the nonce that goes into HChaCha20.
pub(crate) const PREFIX_LEN: usize = 16;

/// The longest message IETF ChaCha20-Poly1305 can protect under one nonce:
/// 2^32 - 1 blocks of 64 bytes after the Poly1305 key block (RFC 8439,
/// section 2.8). Longer input would wrap the 32-bit block counter.
const MAX_MESSAGE_LEN: u64 = (1u64 << 38) - 64;

/// Bytes handed to the backend per update call. The backend takes an `int`
/// length, so longer buffers go in several calls; the AEAD is streaming, so
/// the result is the same as one call.
const CHUNK_LEN: usize = 1 << 30;

/// IETF ChaCha20-Poly1305 keyed with `HChaCha20(key, prefix)`.
///
/// Seals and opens every XChaCha20-Poly1305 nonce that starts with `prefix`.
///
/// Each backend is keyed once; each message only sets its 12-byte nonce, so
/// sealing or opening allocates nothing. The OpenSSL context is made on the
/// first long message, so connections that only see short ones never pay
/// for it.
pub(crate) struct PrefixCipher {
    small: LessSafeKey,
    /// Kept to key the long-message context when it is first needed.
    subkey: Zeroizing<[u8; 32]>,
    large: Option<CipherCtx>,
    /// Names this subkey in a [`super::multi::Batch`].
    id: u64,
}

/// Messages at least this long go to OpenSSL, shorter ones to aws-lc.
const LARGE_FROM: usize = 4096;

impl PrefixCipher {
    /// Derives the subkey for `prefix` under `key` and sets up the AEAD.
    ///
    /// Zeroization: the subkey's bytes live in a zeroizing box here, in
    /// aws-lc's key (cleansed when freed) and in OpenSSL's cipher context,
    /// whose `EVP_CIPHER_CTX_free` frees the key schedule with
    /// `OPENSSL_clear_free`. All of it is wiped when this value is dropped.
    pub(crate) fn new(key: &[u8; 32], prefix: &[u8; PREFIX_LEN]) -> Result<Self, EnvelopeError> {
        let mut raw = chacha20::hchacha::<U10>(key.into(), prefix.into());
        let mut subkey = Zeroizing::new([0u8; 32]);
        subkey.copy_from_slice(&raw);
        raw.as_mut_slice().zeroize();
        let unbound =
            UnboundKey::new(&CHACHA20_POLY1305, &subkey[..]).map_err(|_| EnvelopeError::Backend)?;
        Ok(PrefixCipher {
            small: LessSafeKey::new(unbound),
            subkey,
            large: None,
            id: super::multi::next_key_id(),
        })
    }

    /// The subkey's process-unique name, for [`super::multi::Batch`].
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The short-message key, for a [`super::multi::Batch`] small enough to go one by one.
    pub(crate) fn small_key(&self) -> &LessSafeKey {
        &self.small
    }

    /// The subkey itself, for [`super::multi::Batch`], which zeroizes its copy.
    pub(crate) fn subkey(&self) -> &[u8; 32] {
        &self.subkey
    }

    /// The long-message context, keyed on first use.
    fn large(&mut self) -> Result<&mut CipherCtx, EnvelopeError> {
        if self.large.is_none() {
            let mut ctx = CipherCtx::new().map_err(|_| EnvelopeError::Backend)?;
            ctx.encrypt_init(
                Some(Cipher::chacha20_poly1305()),
                Some(&self.subkey[..]),
                None,
            )
            .map_err(|_| EnvelopeError::Backend)?;
            self.large = Some(ctx);
        }
        // Set just above.
        Ok(self.large.as_mut().expect("context present"))
    }

    /// Encrypts `buf` in place and returns the tag. `tail` is `nonce[16..24]`.
    pub(crate) fn seal_in_place(
        &mut self,
        tail: [u8; 8],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], EnvelopeError> {
        if buf.len() < LARGE_FROM {
            let tag = self
                .small
                .seal_in_place_separate_tag(aws_nonce(tail), Aad::from(aad), buf)
                .map_err(|_| EnvelopeError::TooLarge)?;
            let mut out = [0u8; TAG_LEN];
            let tag = tag.as_ref();
            if tag.len() != TAG_LEN {
                return Err(EnvelopeError::Backend);
            }
            out.copy_from_slice(tag);
            return Ok(out);
        }
        if buf.len() as u64 > MAX_MESSAGE_LEN {
            return Err(EnvelopeError::TooLarge);
        }
        let ctx = self.large()?;
        // Only the nonce changes: the key set in `new` stays in the context.
        ctx.encrypt_init(None, None, Some(&ietf_nonce(tail)))
            .map_err(|_| EnvelopeError::Backend)?;
        update_aad(ctx, aad)?;
        update_in_place(ctx, buf)?;
        ctx.cipher_final(&mut [])
            .map_err(|_| EnvelopeError::Backend)?;
        let mut tag = [0u8; TAG_LEN];
        ctx.tag(&mut tag).map_err(|_| EnvelopeError::Backend)?;
        Ok(tag)
    }

    /// Verifies `tag` and decrypts `buf` in place. On failure `buf` is zeroed,
    /// so no unauthenticated plaintext is left behind.
    pub(crate) fn open_in_place(
        &mut self,
        tail: [u8; 8],
        aad: &[u8],
        tag: &[u8],
        buf: &mut [u8],
    ) -> Result<(), EnvelopeError> {
        match self.try_open(tail, aad, tag, buf) {
            Ok(()) => Ok(()),
            Err(()) => {
                buf.zeroize();
                Err(EnvelopeError::Auth)
            }
        }
    }

    /// [`PrefixCipher::open_in_place`] without the cleanup on failure.
    fn try_open(
        &mut self,
        tail: [u8; 8],
        aad: &[u8],
        tag: &[u8],
        buf: &mut [u8],
    ) -> Result<(), ()> {
        // The backend would accept a shorter tag and compare only its bytes,
        // so insist on the full 16 before handing it over.
        if tag.len() != TAG_LEN || buf.len() as u64 > MAX_MESSAGE_LEN {
            return Err(());
        }
        if buf.len() < LARGE_FROM {
            return self
                .small
                .open_in_place_separate_tag(aws_nonce(tail), Aad::from(aad), tag, buf)
                .map(drop)
                .map_err(drop);
        }
        let ctx = self.large().map_err(drop)?;
        ctx.decrypt_init(None, None, Some(&ietf_nonce(tail)))
            .map_err(drop)?;
        ctx.set_tag(tag).map_err(drop)?;
        update_aad(ctx, aad).map_err(drop)?;
        update_in_place(ctx, buf).map_err(drop)?;
        // Checks the tag (in constant time); fails on a mismatch.
        ctx.cipher_final(&mut []).map_err(drop)?;
        Ok(())
    }
}

/// Feeds `aad` to the AEAD as additional data.
fn update_aad(ctx: &mut CipherCtx, aad: &[u8]) -> Result<(), EnvelopeError> {
    for chunk in aad.chunks(CHUNK_LEN) {
        ctx.cipher_update(chunk, None)
            .map_err(|_| EnvelopeError::Backend)?;
    }
    Ok(())
}

/// Encrypts or decrypts `buf` in place, whichever the context was set up for.
fn update_in_place(ctx: &mut CipherCtx, buf: &mut [u8]) -> Result<(), EnvelopeError> {
    for chunk in buf.chunks_mut(CHUNK_LEN) {
        let len = chunk.len();
        let done = ctx
            .cipher_update_inplace(chunk, len)
            .map_err(|_| EnvelopeError::Backend)?;
        if done != len {
            return Err(EnvelopeError::Backend);
        }
    }
    Ok(())
}

/// The IETF nonce for an XChaCha nonce tail: four zero bytes then the tail.
fn ietf_nonce(tail: [u8; 8]) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&tail);
    n
}

fn aws_nonce(tail: [u8; 8]) -> Nonce {
    Nonce::assume_unique_for_key(ietf_nonce(tail))
}

/// Splits a 24-byte XChaCha nonce into its HChaCha prefix and IETF tail.
pub(crate) fn split_nonce(nonce: &[u8; NONCE_LEN]) -> ([u8; PREFIX_LEN], [u8; 8]) {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut tail = [0u8; 8];
    prefix.copy_from_slice(&nonce[..PREFIX_LEN]);
    tail.copy_from_slice(&nonce[PREFIX_LEN..]);
    (prefix, tail)
}

/// One-shot XChaCha20-Poly1305 seal with a detached tag.
pub(crate) fn xchacha_seal(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], EnvelopeError> {
    let (prefix, tail) = split_nonce(nonce);
    PrefixCipher::new(key, &prefix)?.seal_in_place(tail, aad, buf)
}

/// One-shot XChaCha20-Poly1305 open with a detached tag.
pub(crate) fn xchacha_open(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    tag: &[u8],
    buf: &mut [u8],
) -> Result<(), EnvelopeError> {
    let (prefix, tail) = split_nonce(nonce);
    PrefixCipher::new(key, &prefix)?.open_in_place(tail, aad, tag, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A31_PLAINTEXT: &[u8] = b"Ladies and Gentlemen of the class of '99: If I could offer you \
only one tip for the future, sunscreen would be it.";
    const A31_CIPHERTEXT: &str = "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb\
731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e\
3f3fac2bc369488f76b2383565d3fff921f9664c97637da9768812f615c68b13b52e";
    const A31_TAG: &str = "c0875924c1c7987947deafd8780acf49";

    fn a31_inputs() -> ([u8; 32], [u8; 24], Vec<u8>) {
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = 0x80 + i as u8;
        }
        let mut nonce = [0u8; 24];
        for (i, b) in nonce.iter_mut().enumerate() {
            *b = 0x40 + i as u8;
        }
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        (key, nonce, aad)
    }

    /// draft-irtf-cfrg-xchacha-03, Appendix A.3.1.
    #[test]
    fn draft_xchacha_a31_seal() {
        let (key, nonce, aad) = a31_inputs();
        let mut buf = A31_PLAINTEXT.to_vec();
        let tag = xchacha_seal(&key, &nonce, &aad, &mut buf).unwrap();
        assert_eq!(hex::encode(&buf), A31_CIPHERTEXT);
        assert_eq!(hex::encode(tag), A31_TAG);
    }

    #[test]
    fn draft_xchacha_a31_open() {
        let (key, nonce, aad) = a31_inputs();
        let mut buf = hex::decode(A31_CIPHERTEXT).unwrap();
        let tag = hex::decode(A31_TAG).unwrap();
        xchacha_open(&key, &nonce, &aad, &tag, &mut buf).unwrap();
        assert_eq!(buf, A31_PLAINTEXT);

        let mut bad = tag.clone();
        bad[0] ^= 1;
        let mut buf = hex::decode(A31_CIPHERTEXT).unwrap();
        assert_eq!(
            xchacha_open(&key, &nonce, &aad, &bad, &mut buf),
            Err(EnvelopeError::Auth)
        );
        assert!(
            buf.iter().all(|&b| b == 0),
            "failed open must zero the buffer"
        );
    }

    /// draft-irtf-cfrg-xchacha-03, section 2.2.1: the HChaCha20 test vector.
    #[test]
    fn draft_hchacha_vector() {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let input = hex::decode("000000090000004a0000000031415927").unwrap();
        let out = chacha20::hchacha::<U10>((&key).into(), input.as_slice().into());
        assert_eq!(
            hex::encode(out),
            "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
        );
    }
}
