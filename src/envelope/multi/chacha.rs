//! ChaCha20 (RFC 8439, section 2.3) over sixteen independent blocks at once: one block per
//! 32-bit lane of sixteen AVX-512 registers, so the twenty rounds, whose latency bounds a
//! single short message, are paid once for sixteen blocks from any mix of keys, nonces and
//! counters.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m512i, _mm512_add_epi32, _mm512_rol_epi32, _mm512_set1_epi32, _mm512_shuffle_i32x4,
    _mm512_unpackhi_epi32, _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64,
    _mm512_xor_si512,
};

/// Sixteen ChaCha20 states or key-stream blocks, word-major: `words[w][lane]` is word `w`
/// of the block in `lane`. Word-major is the layout the vector registers want; callers
/// write and read single lanes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Lanes {
    pub(crate) words: [[u32; 16]; 16],
}

impl Lanes {
    pub(crate) const fn zeroed() -> Self {
        Lanes {
            words: [[0; 16]; 16],
        }
    }
}

/// "expand 32-byte k", the first four words of every state.
pub(crate) const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

#[cfg(target_arch = "x86_64")]
macro_rules! quarter {
    ($x:ident, $a:literal, $b:literal, $c:literal, $d:literal) => {
        $x[$a] = _mm512_add_epi32($x[$a], $x[$b]);
        $x[$d] = _mm512_rol_epi32::<16>(_mm512_xor_si512($x[$d], $x[$a]));
        $x[$c] = _mm512_add_epi32($x[$c], $x[$d]);
        $x[$b] = _mm512_rol_epi32::<12>(_mm512_xor_si512($x[$b], $x[$c]));
        $x[$a] = _mm512_add_epi32($x[$a], $x[$b]);
        $x[$d] = _mm512_rol_epi32::<8>(_mm512_xor_si512($x[$d], $x[$a]));
        $x[$c] = _mm512_add_epi32($x[$c], $x[$d]);
        $x[$b] = _mm512_rol_epi32::<7>(_mm512_xor_si512($x[$b], $x[$c]));
    };
}

/// Sixteen 64-byte key-stream blocks, one per lane, in the byte order they are XORed in.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Blocks(pub(crate) [[u8; 64]; 16]);

/// The key-stream blocks of the sixteen states in `lanes` (each state after twenty rounds
/// plus the state itself) into `out`, lane `l`'s block at `out.0[l]`. Words 0..4 are taken
/// as [`SIGMA`] whatever the caller wrote there. With `key = Some(k)` every lane uses key
/// `k` and words 4..12 of `lanes` are not read: the common case (one sender's messages)
/// then costs the caller four stores per lane instead of twelve.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn blocks_x16(lanes: &Lanes, key: Option<&[u32; 8]>, out: &mut Blocks) {
    // Safety: `Lanes` is 16 rows of 16 u32, exactly the size of 16 `__m512i`, and every bit
    // pattern is a valid value of both types, so reading it as vectors is a plain copy.
    let input: [__m512i; 16] = unsafe { core::mem::transmute(lanes.words) };
    let mut x = input;
    for (w, s) in SIGMA.iter().enumerate() {
        x[w] = _mm512_set1_epi32(*s as i32);
    }
    if let Some(k) = key {
        for (w, k) in k.iter().enumerate() {
            x[4 + w] = _mm512_set1_epi32(*k as i32);
        }
    }
    let first = x;
    for _ in 0..10 {
        quarter!(x, 0, 4, 8, 12);
        quarter!(x, 1, 5, 9, 13);
        quarter!(x, 2, 6, 10, 14);
        quarter!(x, 3, 7, 11, 15);
        quarter!(x, 0, 5, 10, 15);
        quarter!(x, 1, 6, 11, 12);
        quarter!(x, 2, 7, 8, 13);
        quarter!(x, 3, 4, 9, 14);
    }
    for (v, f) in x.iter_mut().zip(first.iter()) {
        *v = _mm512_add_epi32(*v, *f);
    }
    let blocks = transpose(x);
    // Safety: the same 1024 bytes of plain integers, as bytes; x86 is little-endian, which
    // is the byte order ChaCha20 serialises its words in.
    out.0 = unsafe { core::mem::transmute::<[__m512i; 16], [[u8; 64]; 16]>(blocks) };
}

/// Word-major to lane-major: `x[w]` holds word `w` of every lane; the result's `[l]` holds
/// lane `l`'s sixteen words in order. Three rounds of shuffles instead of 256 scalar moves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose(x: [__m512i; 16]) -> [__m512i; 16] {
    // Pairs of words, then quads: afterwards 128-bit chunk k of `u[4i + j]` holds words
    // 4i..4i+4 of lane 4k + j.
    let mut t = x;
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
    }
    let mut u = t;
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // A 4x4 transpose of 128-bit chunks for each j: lane 4k + j is chunk k of u[j],
    // u[4 + j], u[8 + j] and u[12 + j].
    let mut out = u;
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        let p0 = _mm512_shuffle_i32x4::<0x44>(a, b);
        let p1 = _mm512_shuffle_i32x4::<0xee>(a, b);
        let p2 = _mm512_shuffle_i32x4::<0x44>(c, d);
        let p3 = _mm512_shuffle_i32x4::<0xee>(c, d);
        out[j] = _mm512_shuffle_i32x4::<0x88>(p0, p2);
        out[4 + j] = _mm512_shuffle_i32x4::<0xdd>(p0, p2);
        out[8 + j] = _mm512_shuffle_i32x4::<0x88>(p1, p3);
        out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(p1, p3);
    }
    out
}

#[cfg(all(test, target_arch = "x86_64"))]
#[allow(clippy::needless_range_loop)] // word and lane indices, as the RFC writes them
mod tests {
    use super::*;

    /// One block the scalar way, straight from RFC 8439 section 2.3.
    fn reference_block(key: &[u32; 8], counter: u32, nonce: &[u32; 3]) -> [u32; 16] {
        let mut s = [0u32; 16];
        s[..4].copy_from_slice(&SIGMA);
        s[4..12].copy_from_slice(key);
        s[12] = counter;
        s[13..].copy_from_slice(nonce);
        let mut x = s;
        fn qr(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
            x[a] = x[a].wrapping_add(x[b]);
            x[d] = (x[d] ^ x[a]).rotate_left(16);
            x[c] = x[c].wrapping_add(x[d]);
            x[b] = (x[b] ^ x[c]).rotate_left(12);
            x[a] = x[a].wrapping_add(x[b]);
            x[d] = (x[d] ^ x[a]).rotate_left(8);
            x[c] = x[c].wrapping_add(x[d]);
            x[b] = (x[b] ^ x[c]).rotate_left(7);
        }
        for _ in 0..10 {
            qr(&mut x, 0, 4, 8, 12);
            qr(&mut x, 1, 5, 9, 13);
            qr(&mut x, 2, 6, 10, 14);
            qr(&mut x, 3, 7, 11, 15);
            qr(&mut x, 0, 5, 10, 15);
            qr(&mut x, 1, 6, 11, 12);
            qr(&mut x, 2, 7, 8, 13);
            qr(&mut x, 3, 4, 9, 14);
        }
        for (o, i) in x.iter_mut().zip(s.iter()) {
            *o = o.wrapping_add(*i);
        }
        x
    }

    fn run(lanes: &Lanes) -> Option<Blocks> {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return None;
        }
        let mut out = Blocks([[0; 64]; 16]);
        // Safety: AVX-512F was detected just above.
        unsafe { blocks_x16(lanes, None, &mut out) };
        // The same states with the key given once must give the same blocks.
        let key: [u32; 8] = core::array::from_fn(|w| lanes.words[4 + w][0]);
        if (0..16).all(|l| (0..8).all(|w| lanes.words[4 + w][l] == key[w])) {
            let mut shared = Blocks([[0; 64]; 16]);
            let mut keyless = *lanes;
            keyless.words[4..12].iter_mut().for_each(|row| row.fill(0));
            // Safety: as above.
            unsafe { blocks_x16(&keyless, Some(&key), &mut shared) };
            assert_eq!(shared.0, out.0, "a shared key gives the same blocks");
        }
        Some(out)
    }

    /// RFC 8439 section 2.3.2, in lane 5, beside fifteen other blocks.
    #[test]
    fn rfc8439_block_vector_in_any_lane() {
        let key: [u32; 8] = core::array::from_fn(|i| {
            u32::from_le_bytes(core::array::from_fn(|j| (4 * i + j) as u8))
        });
        let nonce = [0x0900_0000, 0x4a00_0000, 0x0000_0000];
        let mut lanes = Lanes::zeroed();
        for lane in 0..16 {
            lanes.words[4..12]
                .iter_mut()
                .zip(key.iter())
                .for_each(|(w, k)| w[lane] = *k);
            lanes.words[12][lane] = if lane == 5 { 1 } else { 100 + lane as u32 };
            for n in 0..3 {
                lanes.words[13 + n][lane] = nonce[n];
            }
        }
        let Some(out) = run(&lanes) else {
            return;
        };
        assert_eq!(
            hex::encode(out.0[5]),
            "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e\
             d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
        );
    }

    #[test]
    fn every_lane_matches_the_scalar_block() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u32
        };
        for _ in 0..50 {
            let mut lanes = Lanes::zeroed();
            let mut inputs = Vec::new();
            for lane in 0..16 {
                let key: [u32; 8] = core::array::from_fn(|_| next());
                let nonce: [u32; 3] = core::array::from_fn(|_| next());
                // Counters near the top as well as small ones.
                let counter = if lane % 3 == 0 {
                    u32::MAX - lane as u32
                } else {
                    next()
                };
                for w in 0..8 {
                    lanes.words[4 + w][lane] = key[w];
                }
                lanes.words[12][lane] = counter;
                for n in 0..3 {
                    lanes.words[13 + n][lane] = nonce[n];
                }
                inputs.push((key, counter, nonce));
            }
            let Some(out) = run(&lanes) else {
                return;
            };
            for (lane, (key, counter, nonce)) in inputs.iter().enumerate() {
                let want = reference_block(key, *counter, nonce);
                for w in 0..16 {
                    let got = &out.0[lane][4 * w..4 * w + 4];
                    assert_eq!(got, want[w].to_le_bytes(), "lane {lane} word {w}");
                }
            }
        }
    }
}
