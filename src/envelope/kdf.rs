//! Key derivation from the root key: HKDF-SHA256 with fixed labels.
//!
//! The labels below are part of the wire format: changing one changes every
//! key a deployment agrees on. They are written down in docs/ENVELOPE.md.

use hkdf::Hkdf;
use sha2::Sha256;

use super::keys::{DataKey, RootKey, KEY_LEN};

/// HKDF salt for every key derived from the root key.
pub const HKDF_SALT: &[u8] = b"cipherbus-v1 hkdf salt";
/// HKDF info for the epoch-1 data key.
pub const EPOCH1_INFO: &[u8] = b"cipherbus-v1 data-key epoch 1";
/// HKDF info for the control-plane key.
pub const CONTROL_INFO: &[u8] = b"cipherbus-v1 control-key";
/// HKDF info for the key that wraps data keys of later epochs.
pub const WRAP_INFO: &[u8] = b"cipherbus-v1 wrap-key";
/// HKDF info for the key that authenticates audit entries.
pub const AUDIT_INFO: &[u8] = b"cipherbus-v1 audit-key";

/// `HKDF-SHA256(ikm = root, salt = HKDF_SALT, info, L = 32)`.
fn derive(root: &RootKey, info: &[u8]) -> DataKey {
    let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), root.expose());
    let mut key = DataKey::from_bytes([0u8; KEY_LEN]);
    // Invariant: HKDF-SHA256 can expand up to 255 * 32 bytes; 32 always fits.
    hk.expand(info, key.bytes_mut())
        .expect("HKDF-SHA256 output of 32 bytes is always valid");
    key
}

/// The data key for epoch 1, so proxies sharing a root key agree before any
/// rotation.
pub fn derive_epoch1(root: &RootKey) -> DataKey {
    derive(root, EPOCH1_INFO)
}

/// The key that seals control-plane messages.
pub fn derive_control_key(root: &RootKey) -> DataKey {
    derive(root, CONTROL_INFO)
}

/// The key that authenticates the audit trail's entries (HMAC-SHA256).
pub fn derive_audit_key(root: &RootKey) -> DataKey {
    derive(root, AUDIT_INFO)
}

/// The key that wraps data keys for storage and announcement.
pub(crate) fn derive_wrap_key(root: &RootKey) -> DataKey {
    derive(root, WRAP_INFO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_are_distinct_and_deterministic() {
        let root = RootKey::from_bytes([7; 32]);
        let e1 = derive_epoch1(&root);
        let ctl = derive_control_key(&root);
        let wrap = derive_wrap_key(&root);
        let audit = derive_audit_key(&root);
        assert_ne!(audit, e1);
        assert_ne!(audit, ctl);
        assert_ne!(audit, wrap);
        assert_ne!(e1, ctl);
        assert_ne!(e1, wrap);
        assert_ne!(ctl, wrap);
        assert_eq!(e1, derive_epoch1(&RootKey::from_bytes([7; 32])));
        assert_ne!(e1, derive_epoch1(&RootKey::from_bytes([8; 32])));
    }

    /// RFC 5869 test case 1 run through the same HKDF call shape, so a wrong
    /// argument order (salt vs ikm) would be caught.
    #[test]
    fn hkdf_call_shape_matches_rfc5869() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let hk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }
}
