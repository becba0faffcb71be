//! Wrapping data keys under the root key, for storage and announcement.
//!
//! Format 1, 73 bytes: `format(1) = 0x01 || nonce(24) || ciphertext(32) || tag(16)`.
//! The cipher is XChaCha20-Poly1305 under the wrap key
//! (`HKDF-SHA256(root, WRAP_INFO)`), with a random nonce and
//! `AAD = "cipherbus-v1 wrapped-key" || format(1) || epoch(u32 BE)`, so a
//! wrapped key cannot be replayed as the key of another epoch.

use zeroize::Zeroizing;

use super::aead::{xchacha_open, xchacha_seal, NONCE_LEN};
use super::kdf::derive_wrap_key;
use super::keys::{DataKey, RootKey, KEY_LEN};
use super::{EnvelopeError, TAG_LEN};

/// Format byte of the only wrapped-key layout so far.
pub const WRAP_FORMAT_1: u8 = 0x01;
/// Length of a format-1 wrapped key.
pub const WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;
/// Label at the start of the wrapped-key AAD.
pub const WRAP_AAD_LABEL: &[u8] = b"cipherbus-v1 wrapped-key";

const AAD_LEN: usize = WRAP_AAD_LABEL.len() + 1 + 4;

fn wrap_aad(epoch: u32) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    aad[..WRAP_AAD_LABEL.len()].copy_from_slice(WRAP_AAD_LABEL);
    aad[WRAP_AAD_LABEL.len()] = WRAP_FORMAT_1;
    aad[WRAP_AAD_LABEL.len() + 1..].copy_from_slice(&epoch.to_be_bytes());
    aad
}

/// The key that wraps data keys under a file root (`HKDF-SHA256(root, WRAP_INFO)`), held
/// instead of the root itself.
pub struct WrapKey(DataKey);

impl WrapKey {
    pub fn derive(root: &RootKey) -> Self {
        WrapKey(derive_wrap_key(root))
    }

    /// [`wrap_key`] under this key.
    pub fn wrap(&self, epoch: u32, key: &DataKey) -> Result<Vec<u8>, EnvelopeError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| EnvelopeError::Random)?;
        seal_wrapped(&self.0, epoch, key, &nonce)
    }

    /// [`unwrap_key`] under this key.
    pub fn unwrap(&self, epoch: u32, wrapped: &[u8]) -> Result<DataKey, EnvelopeError> {
        open_wrapped(&self.0, epoch, wrapped)
    }
}

/// Wraps `key` as the data key of `epoch`, under a key derived from `root`.
pub fn wrap_key(root: &RootKey, epoch: u32, key: &DataKey) -> Result<Vec<u8>, EnvelopeError> {
    WrapKey::derive(root).wrap(epoch, key)
}

/// [`wrap_key`] with a caller-chosen nonce, for test vectors only.
#[cfg(test)]
pub(crate) fn wrap_key_with_nonce(
    root: &RootKey,
    epoch: u32,
    key: &DataKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, EnvelopeError> {
    seal_wrapped(&derive_wrap_key(root), epoch, key, nonce)
}

fn seal_wrapped(
    wrap: &DataKey,
    epoch: u32,
    key: &DataKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, EnvelopeError> {
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(WRAP_FORMAT_1);
    out.extend_from_slice(nonce);
    out.extend_from_slice(key.bytes());
    let tag = xchacha_seal(
        wrap.bytes(),
        nonce,
        &wrap_aad(epoch),
        &mut out[1 + NONCE_LEN..],
    )?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Unwraps a key made by [`wrap_key`] for the same root and epoch.
///
/// A wrong root, a wrong epoch or any changed byte gives [`EnvelopeError::Auth`];
/// a wrong length or format byte gives [`EnvelopeError::WrappedFormat`].
pub fn unwrap_key(root: &RootKey, epoch: u32, wrapped: &[u8]) -> Result<DataKey, EnvelopeError> {
    open_wrapped(&derive_wrap_key(root), epoch, wrapped)
}

fn open_wrapped(wrap: &DataKey, epoch: u32, wrapped: &[u8]) -> Result<DataKey, EnvelopeError> {
    if wrapped.len() != WRAPPED_LEN || wrapped[0] != WRAP_FORMAT_1 {
        return Err(EnvelopeError::WrappedFormat);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&wrapped[1..1 + NONCE_LEN]);
    let ct = &wrapped[1 + NONCE_LEN..1 + NONCE_LEN + KEY_LEN];
    let tag = &wrapped[1 + NONCE_LEN + KEY_LEN..];
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    bytes.copy_from_slice(ct);
    xchacha_open(wrap.bytes(), &nonce, &wrap_aad(epoch), tag, &mut bytes[..])?;
    Ok(DataKey::from_bytes(*bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let root = RootKey::generate().unwrap();
        let key = DataKey::generate().unwrap();
        let w = wrap_key(&root, 7, &key).unwrap();
        assert_eq!(w.len(), WRAPPED_LEN);
        assert_eq!(w[0], WRAP_FORMAT_1);
        assert_eq!(unwrap_key(&root, 7, &w).unwrap(), key);
        assert_ne!(
            wrap_key(&root, 7, &key).unwrap(),
            w,
            "random nonce per wrap"
        );
    }

    #[test]
    fn wrong_epoch_or_root_fails() {
        let root = RootKey::generate().unwrap();
        let key = DataKey::generate().unwrap();
        let w = wrap_key(&root, 7, &key).unwrap();
        assert_eq!(unwrap_key(&root, 8, &w), Err(EnvelopeError::Auth));
        let other = RootKey::generate().unwrap();
        assert_eq!(unwrap_key(&other, 7, &w), Err(EnvelopeError::Auth));
    }

    #[test]
    fn malformed_fails_without_panic() {
        let root = RootKey::generate().unwrap();
        let key = DataKey::generate().unwrap();
        let w = wrap_key(&root, 3, &key).unwrap();
        for n in 0..w.len() {
            assert_eq!(
                unwrap_key(&root, 3, &w[..n]),
                Err(EnvelopeError::WrappedFormat)
            );
        }
        let mut long = w.clone();
        long.push(0);
        assert_eq!(
            unwrap_key(&root, 3, &long),
            Err(EnvelopeError::WrappedFormat)
        );
        let mut bad = w.clone();
        bad[0] = 2;
        assert_eq!(
            unwrap_key(&root, 3, &bad),
            Err(EnvelopeError::WrappedFormat)
        );
        for i in 1..w.len() {
            for bit in 0..8 {
                let mut bad = w.clone();
                bad[i] ^= 1 << bit;
                assert_eq!(
                    unwrap_key(&root, 3, &bad),
                    Err(EnvelopeError::Auth),
                    "byte {i}"
                );
            }
        }
    }
}
