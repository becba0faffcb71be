//! Constant-time comparison for secret-derived values outside the AEAD.
//!
//! Key fingerprints, audit-chain hashes and the like are compared here, never with `==`, so the
//! time a comparison takes does not tell an attacker how many leading bytes matched. The batched
//! AEAD (`envelope::multi`) compares its tags here too ([`eq_tag`]); aws-lc and OpenSSL check
//! their own. Key types compare through their `ConstantTimeEq` impls.

use subtle::ConstantTimeEq;

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
///
/// Lengths are not secret here (fingerprints and hashes have fixed, public lengths), so
/// different lengths return `false` at once.
pub fn eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

/// [`eq`] for 16-byte AEAD tags, compared as one 128-bit value: one optimisation barrier per
/// tag instead of one per byte, which mattered on the batched open path.
pub fn eq_tag(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let diff = u128::from_ne_bytes(*a) ^ u128::from_ne_bytes(*b);
    bool::from(diff.ct_eq(&0))
}

/// [`eq`] for text values such as hex fingerprints and hashes.
pub fn eq_str(a: &str, b: &str) -> bool {
    eq(a.as_bytes(), b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_unequal_and_different_lengths() {
        assert!(eq(b"", b""));
        assert!(eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!eq(b"0123456789abcdef", b"x123456789abcdef"));
        assert!(!eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!eq(b"abc", b""));
        assert!(eq_str("deadbeef", "deadbeef"));
        assert!(!eq_str("deadbeef", "deadbeee"));
    }

    #[test]
    fn every_single_byte_difference_is_seen() {
        let a = [0x5au8; 64];
        for i in 0..a.len() {
            for bit in 0..8 {
                let mut b = a;
                b[i] ^= 1 << bit;
                assert!(!eq(&a, &b), "byte {i} bit {bit}");
            }
        }
        let t = [0xa5u8; 16];
        assert!(eq_tag(&t, &t));
        for i in 0..t.len() {
            for bit in 0..8 {
                let mut u = t;
                u[i] ^= 1 << bit;
                assert!(!eq_tag(&t, &u), "tag byte {i} bit {bit}");
            }
        }
    }
}
