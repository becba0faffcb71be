//! Key types: the root key (KEK) and data keys.
//!
//! Both hold their 32 bytes on the heap (so moving the handle never copies
//! the secret), zeroize them on drop, compare in constant time, and print only
//! a fingerprint. This file does not decide where keys come from or how long
//! they live; that is the keyring's job.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::EnvelopeError;

/// Length of every key in this module.
pub const KEY_LEN: usize = 32;

/// Label hashed in front of a root key to make its fingerprint.
pub const ROOT_FINGERPRINT_LABEL: &[u8] = b"cipherbus-v1 fingerprint root-key";
/// Label hashed in front of a data key to make its fingerprint.
pub const DATA_FINGERPRINT_LABEL: &[u8] = b"cipherbus-v1 fingerprint data-key";
/// Number of SHA-256 bytes shown in a fingerprint (hex doubles it).
pub const FINGERPRINT_BYTES: usize = 8;

/// Source of [`DataKey`] identities for the opener's subkey cache.
static NEXT_KEY_ID: AtomicU64 = AtomicU64::new(1);

/// `hex(SHA-256(label || key)[..FINGERPRINT_BYTES])`.
fn fingerprint(label: &[u8], key: &[u8; KEY_LEN]) -> String {
    let mut h = Sha256::new();
    h.update(label);
    h.update(key);
    hex::encode(&h.finalize()[..FINGERPRINT_BYTES])
}

/// The root key (key-encryption key). It derives the epoch-1 data key, the
/// control key and the wrap key, and never travels on the bus.
pub struct RootKey {
    bytes: Box<[u8; KEY_LEN]>,
}

impl RootKey {
    /// Takes ownership of raw key bytes. The argument's copy is wiped.
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        let key = RootKey {
            bytes: Box::new(bytes),
        };
        bytes.zeroize();
        key
    }

    /// A fresh random root key from the operating system.
    pub fn generate() -> Result<Self, EnvelopeError> {
        let mut key = RootKey::from_bytes([0u8; KEY_LEN]);
        getrandom::getrandom(&mut key.bytes[..]).map_err(|_| EnvelopeError::Random)?;
        Ok(key)
    }

    /// The raw key bytes, for writing the key file. Never log them.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// Short public identifier: `hex(SHA-256("cipherbus-v1 fingerprint root-key" || key)[..8])`.
    pub fn fingerprint(&self) -> String {
        fingerprint(ROOT_FINGERPRINT_LABEL, &self.bytes)
    }
}

impl Zeroize for RootKey {
    fn zeroize(&mut self) {
        self.bytes.zeroize();
    }
}

impl Drop for RootKey {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for RootKey {}

impl ConstantTimeEq for RootKey {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.bytes[..].ct_eq(&other.bytes[..])
    }
}

impl PartialEq for RootKey {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for RootKey {}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootKey(fp={})", self.fingerprint())
    }
}

/// A 256-bit data key for one epoch.
///
/// Each value gets a process-unique identity when it is made; a clone keeps
/// it. The [`Opener`](super::Opener) uses the identity to cache subkeys, so
/// it never has to hash or compare key bytes per message.
pub struct DataKey {
    bytes: Box<[u8; KEY_LEN]>,
    id: u64,
}

impl DataKey {
    /// Takes ownership of raw key bytes. The argument's copy is wiped.
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        let key = DataKey {
            bytes: Box::new(bytes),
            id: NEXT_KEY_ID.fetch_add(1, Ordering::Relaxed),
        };
        bytes.zeroize();
        key
    }

    /// A fresh random data key from the operating system.
    pub fn generate() -> Result<Self, EnvelopeError> {
        let mut key = DataKey::from_bytes([0u8; KEY_LEN]);
        getrandom::getrandom(&mut key.bytes[..]).map_err(|_| EnvelopeError::Random)?;
        Ok(key)
    }

    /// Short public identifier: `hex(SHA-256("cipherbus-v1 fingerprint data-key" || key)[..8])`.
    pub fn fingerprint(&self) -> String {
        fingerprint(DATA_FINGERPRINT_LABEL, &self.bytes)
    }

    /// The key bytes, for the cipher code in this module only.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// Writable key bytes, for derivation in this module only.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8; KEY_LEN] {
        &mut self.bytes
    }

    /// Process-unique identity of this key value (shared by its clones).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Clone for DataKey {
    fn clone(&self) -> Self {
        DataKey {
            bytes: self.bytes.clone(),
            id: self.id,
        }
    }
}

impl Zeroize for DataKey {
    fn zeroize(&mut self) {
        self.bytes.zeroize();
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for DataKey {}

impl ConstantTimeEq for DataKey {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.bytes[..].ct_eq(&other.bytes[..])
    }
}

impl PartialEq for DataKey {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for DataKey {}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey(fp={})", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_fingerprint_not_bytes() {
        let root = RootKey::from_bytes([0xab; 32]);
        let s = format!("{root:?}");
        assert_eq!(s, format!("RootKey(fp={})", root.fingerprint()));
        assert!(!s.contains("abab"), "{s}");
        assert_eq!(root.fingerprint().len(), 2 * FINGERPRINT_BYTES);

        let dk = DataKey::from_bytes([0xab; 32]);
        let s = format!("{dk:?}");
        assert_eq!(s, format!("DataKey(fp={})", dk.fingerprint()));
        assert!(!s.contains("abab"), "{s}");
    }

    #[test]
    fn fingerprints_are_domain_separated_and_documented() {
        let bytes: [u8; 32] = core::array::from_fn(|i| i as u8);
        let root = RootKey::from_bytes(bytes);
        let dk = DataKey::from_bytes(bytes);
        assert_ne!(root.fingerprint(), dk.fingerprint());
        let mut h = Sha256::new();
        h.update(b"cipherbus-v1 fingerprint root-key");
        h.update(bytes);
        assert_eq!(root.fingerprint(), hex::encode(&h.finalize()[..8]));
    }

    #[test]
    fn equality_is_by_value() {
        assert_eq!(RootKey::from_bytes([1; 32]), RootKey::from_bytes([1; 32]));
        assert_ne!(RootKey::from_bytes([1; 32]), RootKey::from_bytes([2; 32]));
        let a = DataKey::from_bytes([1; 32]);
        let b = DataKey::from_bytes([1; 32]);
        assert_eq!(a, b);
        assert_ne!(a.id(), b.id(), "distinct values get distinct identities");
        assert_eq!(a.clone().id(), a.id());
        assert_ne!(a, DataKey::from_bytes([2; 32]));
    }

    #[test]
    fn zeroize_wipes_the_key_bytes_and_drop_zeroizes() {
        fn zeroized_on_drop<T: ZeroizeOnDrop>() {}
        zeroized_on_drop::<RootKey>();
        zeroized_on_drop::<DataKey>();

        let mut root = RootKey::from_bytes([0xa5; 32]);
        let fp = root.fingerprint();
        root.zeroize();
        assert_eq!(root.expose(), &[0u8; KEY_LEN]);
        assert_ne!(root.fingerprint(), fp);

        let mut dk = DataKey::generate().unwrap();
        let copy = dk.clone();
        dk.zeroize();
        assert_eq!(dk.bytes(), &[0u8; KEY_LEN]);
        assert_ne!(copy.bytes(), &[0u8; KEY_LEN], "a clone owns its own copy");
    }

    #[test]
    fn generate_is_random() {
        let a = RootKey::generate().unwrap();
        let b = RootKey::generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.expose(), &[0u8; 32]);
        let c = DataKey::generate().unwrap();
        let d = DataKey::generate().unwrap();
        assert_ne!(c, d);
        assert_ne!(c.bytes(), &[0u8; 32]);
    }
}
