//! Poly1305 over up to eight messages at once (AVX-512F, and AVX-512 IFMA where present).
//!
//! This file owns the eight-lane Poly1305 kernels: one message per 64-bit lane. Without
//! IFMA the accumulator and key are in radix 2^26 (five 26-bit limbs, the
//! poly1305-donna-32 schedule), multiplied with `vpmuludq`; with IFMA they are in radix
//! 2^44 (limbs of 44, 44 and 42 bits), multiplied with `vpmadd52luq`/`vpmadd52huq`, nine
//! products per block instead of twenty-five. The batch in `envelope::multi` picks one per
//! pass. Lanes of different lengths run in lockstep; a lane that has run out of blocks is masked
//! so its accumulator stays as it is. The final reduction and the addition of `s` are
//! scalar and constant time.
//!
//! The `unsafe` is the 16-byte loads of message blocks and the move of a finished accumulator
//! vector into a `[u64; 8]`; callers detect IFMA before they call the IFMA kernel.

#![cfg(target_arch = "x86_64")]

use core::arch::x86_64::{
    __m128i, __m512i, __mmask8, _mm256_set_m128i, _mm512_add_epi64, _mm512_and_si512,
    _mm512_castsi256_si512, _mm512_inserti64x4, _mm512_madd52hi_epu64, _mm512_madd52lo_epu64,
    _mm512_mask_mov_epi64, _mm512_mul_epu32, _mm512_or_si512, _mm512_permutex2var_epi64,
    _mm512_set1_epi64, _mm512_set_epi64, _mm512_setzero_si512, _mm512_slli_epi64,
    _mm512_srli_epi64, _mm512_ternarylogic_epi64, _mm_loadu_si128,
};
use zeroize::Zeroize;

const LANES: usize = 8;
const MASK26: u64 = (1 << 26) - 1;
const MASK44: u64 = (1 << 44) - 1;
const MASK42: u64 = (1 << 42) - 1;
const CLAMP: u128 = 0x0fff_fffc_0fff_fffc_0fff_fffc_0fff_ffff;

/// `below!(bound, what, v, ..)`: in debug builds, panics unless every lane of every vector
/// `v` is below `bound`. In release builds it is nothing, not even the evaluation of `v`.
macro_rules! below {
    ($bound:expr, $what:expr, $($v:expr),+ $(,)?) => {
        #[cfg(debug_assertions)]
        check_below(&[$($v),+], $bound, $what);
    };
}

/// The check behind [`below!`]. It looks at all eight lanes, not only the active ones: a
/// masked lane computes on its own kept accumulator, which meets the entry bounds, and on a
/// copy of an active lane's block, so its values obey the same bounds; lanes past `n` have
/// r = 0 and h = 0.
#[cfg(debug_assertions)]
#[target_feature(enable = "avx512f")]
fn check_below(vs: &[__m512i], bound: u64, what: &str) {
    for &v in vs {
        for (lane, x) in to_lanes(v).into_iter().enumerate() {
            debug_assert!(x < bound, "{what}: lane {lane} not below {bound:#x}");
        }
    }
}

/// Whether limbs of `radix` bits, the last one at weight 2^(radix * (len - 1)), hold a value
/// below p = 2^130 - 5. Limbs may exceed `radix` bits a little. Only `debug_assert!`s call it.
fn is_reduced(limbs: &[u64], radix: u32) -> bool {
    let Some((&top, rest)) = limbs.split_last() else {
        return true;
    };
    let at = radix * rest.len() as u32;
    let low = rest
        .iter()
        .rev()
        .fold(0u128, |acc, &limb| (acc << radix) + u128::from(limb));
    let top = u128::from(top) + (low >> at);
    let low = low & ((1 << at) - 1);
    // p = (2^(130 - at) - 1) * 2^at + (2^at - 5).
    let p_top = (1 << (130 - at)) - 1;
    top < p_top || (top == p_top && low < (1 << at) - 5)
}

/// One message's Poly1305 input: up to three runs of whole 16-byte blocks, processed in
/// order parts[0], parts[1], parts[2]. Every part's length is a multiple of 16 (the caller
/// pads), so every block is a full block and gets the 2^128 bit. Empty parts are allowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PolyInput<'a> {
    pub(crate) parts: [&'a [u8]; 3],
}

/// Poly1305 tags of up to eight messages at once: tags[i] = Poly1305(keys[i], inputs[i]),
/// where keys[i] is the 32-byte one-time key r || s (r is clamped here, as RFC 8439 says).
/// Only the first n = min(keys.len(), inputs.len(), tags.len(), 8) entries are computed;
/// lanes may have any mix of lengths, including zero blocks (tag = s).
///
/// Trailing bytes of a part that do not fill a whole block are ignored.
// AVX-512 intrinsics are stable since Rust 1.89, newer than the crate's `rust-version`;
// every function of this file that uses them says so.
#[target_feature(enable = "avx512f")]
pub(crate) fn poly1305_x8(keys: &[[u8; 32]], inputs: &[PolyInput<'_>], tags: &mut [[u8; 16]]) {
    let n = keys.len().min(inputs.len()).min(tags.len()).min(LANES);
    if n == 0 {
        return;
    }

    // Per-lane clamped r as five limbs (limb-major, for the vector loads) and s.
    // Lanes n..8 keep r = 0; they are never active anyway. The clamp clears bits 124..127,
    // so r4 (bits 104..129) < 2^20; r0..r3 < 2^26.
    let mut r_limbs = [[0u64; LANES]; 5];
    let mut pads = [0u128; LANES];
    for (lane, key) in keys.iter().take(n).enumerate() {
        let mut r = u128::from_le_bytes(core::array::from_fn(|j| key[j])) & CLAMP;
        pads[lane] = u128::from_le_bytes(core::array::from_fn(|j| key[16 + j]));
        for (limb, lanes) in r_limbs.iter_mut().enumerate() {
            lanes[lane] = (r >> (26 * limb)) as u64 & MASK26;
        }
        r.zeroize();
    }
    let mut r = r_limbs.map(|l| from_lanes(&l));
    r_limbs.zeroize();
    // 5 * r1 .. 5 * r4: a limb product at weight 2^130 folds back as 5 times itself
    // (2^130 = 5 mod p). 5 r1..5 r3 < 5 * 2^26 < 2^28.33, 5 r4 < 5 * 2^20 < 2^22.33.
    let mut s5 = [r[1], r[2], r[3], r[4]].map(|v| _mm512_add_epi64(_mm512_slli_epi64::<2>(v), v));
    below!(1 << 26, "r0..r3", r[0], r[1], r[2], r[3]);
    below!(1 << 20, "r4", r[4]);
    below!(5 << 26, "5 r1..5 r3", s5[0], s5[1], s5[2]);
    below!(5 << 20, "5 r4", s5[3]);

    let mut h = [_mm512_setzero_si512(); 5];
    let mut feed = Feed::new(inputs, n);
    while let Some((active, steps, run)) = feed.next_run() {
        for k in 0..steps {
            let (lo, hi) = load_blocks(&run, k);
            absorb(&mut h, &r, &s5, lo, hi, active);
        }
    }
    r.zeroize();
    s5.zeroize();

    let mut h_lanes = h.map(|v| to_lanes(v));
    h.zeroize();
    for (lane, tag) in tags.iter_mut().take(n).enumerate() {
        let mut limbs = [
            h_lanes[0][lane],
            h_lanes[1][lane],
            h_lanes[2][lane],
            h_lanes[3][lane],
            h_lanes[4][lane],
        ];
        *tag = finish(&mut limbs, pads[lane]);
        limbs.zeroize();
    }
    h_lanes.zeroize();
    pads.zeroize();
}

/// h = (h + m) * r mod 2^130 - 5 for the lanes in `active`, h unchanged in the others.
/// `lo`/`hi` are the two little-endian halves of each lane's 16-byte block.
///
/// Limb bounds (docs/ENVELOPE.md has the argument; `below!` checks them in debug builds).
/// On entry and exit h0, h2, h3, h4 < 2^26 and h1 < 2^26 + 2^6; r0..r3 < 2^26, r4 < 2^20.
/// `vpmuludq` reads only the low 32 bits of each operand: every operand is < 2^28.33.
/// Every product is < 2^27 * 5 * 2^26 < 2^55.33, every sum < 2^57, far from 2^64.
#[target_feature(enable = "avx512f")]
#[inline]
fn absorb(
    h: &mut [__m512i; 5],
    r: &[__m512i; 5],
    s5: &[__m512i; 4],
    lo: __m512i,
    hi: __m512i,
    active: __mmask8,
) {
    let mask = _mm512_set1_epi64(MASK26 as i64);
    // 2^128 is bit 24 of limb 4: 128 = 4 * 26 + 24.
    let hibit = _mm512_set1_epi64(1 << 24);
    let mul = _mm512_mul_epu32;
    let add = _mm512_add_epi64;

    // m0..m3 < 2^26; m4 < 2^25: 24 bits of the block and the 2^128 bit.
    let m0 = _mm512_and_si512(lo, mask);
    let m1 = _mm512_and_si512(_mm512_srli_epi64::<26>(lo), mask);
    let m2 = _mm512_and_si512(
        _mm512_or_si512(_mm512_srli_epi64::<52>(lo), _mm512_slli_epi64::<12>(hi)),
        mask,
    );
    let m3 = _mm512_and_si512(_mm512_srli_epi64::<14>(hi), mask);
    let m4 = _mm512_or_si512(_mm512_srli_epi64::<40>(hi), hibit);
    below!(1 << 26, "absorb: m0..m3", m0, m1, m2, m3);
    below!(1 << 25, "absorb: m4", m4);

    // h0, h2, h3 < 2^27, h1 < 2^27 + 2^6, h4 < 2^26 + 2^25 < 2^26.59: all below 2^32, so
    // vpmuludq sees them whole.
    let h0 = add(h[0], m0);
    let h1 = add(h[1], m1);
    let h2 = add(h[2], m2);
    let h3 = add(h[3], m3);
    let h4 = add(h[4], m4);
    below!(1 << 27, "absorb: h0, h2, h3 + m", h0, h2, h3);
    below!((1 << 27) + (1 << 6), "absorb: h1 + m1", h1);
    below!((1 << 26) + (1 << 25), "absorb: h4 + m4", h4);

    // Products: h_i r_j < 2^53 (h1's < 2^53 + 2^32), h_i 5 r_j < 2^27 * 5 * 2^26 < 2^55.33
    // (h4's < 2^54.91), h0 r4 < 2^47, h_i 5 r4 < 2^49.33. Sums of five: d0 < 2^56.9,
    // d1 < 2^56.44 < 3 * 2^55, d2 < 2^55.78, d3 < 2^55 + 2^32 + 2^48.91 < 2^55 + 2^49,
    // d4 < 2^54.92.
    let [r0, r1, r2, r3, r4] = *r;
    let [s1, s2, s3, s4] = *s5;
    let d0 = add(
        add(add(mul(h0, r0), mul(h1, s4)), add(mul(h2, s3), mul(h3, s2))),
        mul(h4, s1),
    );
    let d1 = add(
        add(add(mul(h0, r1), mul(h1, r0)), add(mul(h2, s4), mul(h3, s3))),
        mul(h4, s2),
    );
    let d2 = add(
        add(add(mul(h0, r2), mul(h1, r1)), add(mul(h2, r0), mul(h3, s4))),
        mul(h4, s3),
    );
    let d3 = add(
        add(add(mul(h0, r3), mul(h1, r2)), add(mul(h2, r1), mul(h3, r0))),
        mul(h4, s4),
    );
    let d4 = add(
        add(add(mul(h0, r4), mul(h1, r3)), add(mul(h2, r2), mul(h3, r1))),
        mul(h4, r0),
    );
    below!(1 << 57, "absorb: d0", d0);
    below!(3 << 55, "absorb: d1", d1);
    below!(1 << 56, "absorb: d2", d2);
    below!((1 << 55) + (1 << 49), "absorb: d3", d3);
    below!(1 << 55, "absorb: d4", d4);

    // Partial carry: h0..h3 < 2^26. The carries in are < 2^30.9, 2^30.45, 2^29.78 and
    // 2^29.03, too small to move d1..d4 past the bounds above.
    let d1 = add(d1, _mm512_srli_epi64::<26>(d0));
    let h0 = _mm512_and_si512(d0, mask);
    let d2 = add(d2, _mm512_srli_epi64::<26>(d1));
    let h1 = _mm512_and_si512(d1, mask);
    let d3 = add(d3, _mm512_srli_epi64::<26>(d2));
    let h2 = _mm512_and_si512(d2, mask);
    let d4 = add(d4, _mm512_srli_epi64::<26>(d3));
    let h3 = _mm512_and_si512(d3, mask);
    below!(3 << 55, "absorb: d1 + carry", d1);
    below!(1 << 56, "absorb: d2 + carry", d2);
    below!((1 << 55) + (1 << 49), "absorb: d3 + carry", d3);
    below!(1 << 55, "absorb: d4 + carry", d4);
    // c, the part of h at 2^130 and above, is < 2^28.92. It would fit vpmuludq, but 5 * c
    // as a shift and an add is the shorter dependency chain.
    let c = _mm512_srli_epi64::<26>(d4);
    let h4 = _mm512_and_si512(d4, mask);
    below!(1 << 29, "absorb: c", c);
    // h0 + 5 c < 2^26 + 5 * 2^29 < 2^31.36, so it carries at most 40 into h1.
    let h0 = add(h0, add(_mm512_slli_epi64::<2>(c), c));
    below!((1 << 26) + (5 << 29), "absorb: h0 + 5 c", h0);
    let h1 = add(h1, _mm512_srli_epi64::<26>(h0));
    let h0 = _mm512_and_si512(h0, mask);

    h[0] = _mm512_mask_mov_epi64(h[0], active, h0);
    h[1] = _mm512_mask_mov_epi64(h[1], active, h1);
    h[2] = _mm512_mask_mov_epi64(h[2], active, h2);
    h[3] = _mm512_mask_mov_epi64(h[3], active, h3);
    h[4] = _mm512_mask_mov_epi64(h[4], active, h4);
    // The exit bounds, in every lane: masked lanes kept an accumulator that met them.
    below!(
        1 << 26,
        "absorb: exit h0, h2, h3, h4",
        h[0],
        h[2],
        h[3],
        h[4]
    );
    below!((1 << 26) + (1 << 6), "absorb: exit h1", h[1]);
}

/// The tag from one lane's accumulator limbs: full carry, reduce mod 2^130 - 5 in
/// constant time, add s mod 2^128. Leaves its working values in `h` for the caller to wipe.
/// On entry h0, h2, h3, h4 < 2^26 and h1 < 2^26 + 2^6, as `absorb` leaves them.
fn finish(h: &mut [u64; 5], s: u128) -> [u8; 16] {
    debug_assert!(
        h[1] < (1 << 26) + (1 << 6) && [h[0], h[2], h[3], h[4]].iter().all(|&l| l < 1 << 26),
        "finish: entry"
    );
    // Each carry is 0 or 1, so each limb is at most 2^26 before its mask.
    let mut c = h[1] >> 26;
    h[1] &= MASK26;
    for limb in &mut h[2..] {
        *limb += c;
        c = *limb >> 26;
        *limb &= MASK26;
    }
    // The top carry is 1 only if h4 was exactly 2^26, so h4 is now 0.
    debug_assert!(c == 0 || (c == 1 && h[4] == 0), "finish: top carry");
    // h0 < 2^26 + 5; it carries 1 into h1 only after a top carry, so h1 <= 2^26.
    h[0] += c * 5;
    c = h[0] >> 26;
    h[0] &= MASK26;
    h[1] += c;
    debug_assert!(
        h[1] <= 1 << 26 && [h[0], h[2], h[3], h[4]].iter().all(|&l| l < 1 << 26),
        "finish: carried"
    );
    // h < 2^130: without a top carry every limb is below 2^26, with one h4 = 0. As
    // 2^130 < 2 p, one conditional subtraction of p reduces it:
    // g = h + 5 - 2^130, kept iff it is not negative.
    let mut g = [0u64; 5];
    c = 5;
    for (g, h) in g.iter_mut().zip(&h[..4]) {
        *g = h + c;
        c = *g >> 26;
        *g &= MASK26;
    }
    // h4 + c <= 2^26; g4 wraps, setting bit 63, iff h < p.
    g[4] = (h[4] + c).wrapping_sub(1 << 26);
    let keep_g = (g[4] >> 63).wrapping_sub(1);
    for (h, g) in h.iter_mut().zip(&g) {
        *h = (*h & !keep_g) | (g & keep_g);
    }
    g.zeroize();
    // Kept h < p, or g = h - p <= 4: either way the canonical value mod p.
    debug_assert!(is_reduced(h, 26), "finish: not below p");
    // Added, not or-ed: h1 may still be exactly 2^26 when h was kept. Mod 2^128 from here:
    // bits 128 and 129 of h and the carry out of the addition of s drop off (RFC 8439).
    let mut acc = h.iter().rev().fold(0u128, |acc, &limb| {
        (acc << 26).wrapping_add(u128::from(limb))
    });
    let tag = acc.wrapping_add(s).to_le_bytes();
    acc.zeroize();
    tag
}

/// [`poly1305_x8`] in radix 2^44 with AVX-512 IFMA: same contract, same tags.
#[target_feature(enable = "avx512f,avx512ifma")]
pub(crate) fn poly1305_x8_ifma(keys: &[[u8; 32]], inputs: &[PolyInput<'_>], tags: &mut [[u8; 16]]) {
    let n = keys.len().min(inputs.len()).min(tags.len()).min(LANES);
    if n == 0 {
        return;
    }

    // Clamped r as limbs of 44, 44 and 36 bits (the clamp clears bits 124..127), and s:
    // r0, r1 < 2^44, r2 < 2^36.
    let mut r_limbs = [[0u64; LANES]; 3];
    let mut pads = [0u128; LANES];
    for (lane, key) in keys.iter().take(n).enumerate() {
        let mut r = u128::from_le_bytes(core::array::from_fn(|j| key[j])) & CLAMP;
        pads[lane] = u128::from_le_bytes(core::array::from_fn(|j| key[16 + j]));
        r_limbs[0][lane] = r as u64 & MASK44;
        r_limbs[1][lane] = (r >> 44) as u64 & MASK44;
        r_limbs[2][lane] = (r >> 88) as u64;
        r.zeroize();
    }
    let mut r = r_limbs.map(|l| from_lanes(&l));
    r_limbs.zeroize();
    // 20 * r1 < 2^48.33, 20 * r2 < 2^40.33: a limb product at weight 2^132 = 4 * 2^130
    // folds back as 20 times itself (2^130 = 5 mod p).
    let mut s20 = [r[1], r[2]]
        .map(|v| _mm512_add_epi64(_mm512_slli_epi64::<4>(v), _mm512_slli_epi64::<2>(v)));
    below!(1 << 44, "r0, r1", r[0], r[1]);
    below!(1 << 36, "r2", r[2]);
    below!(20 << 44, "20 r1", s20[0]);
    below!(20 << 36, "20 r2", s20[1]);

    let mut h = [_mm512_setzero_si512(); 3];
    let mut feed = Feed::new(inputs, n);
    while let Some((active, steps, run)) = feed.next_run() {
        for k in 0..steps {
            let (lo, hi) = load_blocks(&run, k);
            absorb44(&mut h, &r, &s20, lo, hi, active);
        }
    }
    r.zeroize();
    s20.zeroize();

    let mut h_lanes = h.map(|v| to_lanes(v));
    h.zeroize();
    for (lane, tag) in tags.iter_mut().take(n).enumerate() {
        let mut limbs = [h_lanes[0][lane], h_lanes[1][lane], h_lanes[2][lane]];
        *tag = finish44(&mut limbs, pads[lane]);
        limbs.zeroize();
    }
    h_lanes.zeroize();
    pads.zeroize();
}

/// h = (h + m) * r mod 2^130 - 5 in radix 2^44 for the lanes in `active`.
/// `lo`/`hi` are the two little-endian halves of each lane's 16-byte block.
///
/// IFMA multiplies only the low 52 bits of its operands, so every operand must be below
/// 2^52. Limb bounds (docs/ENVELOPE.md has the argument; `below!` checks them in debug
/// builds): on entry and exit h0 < 2^50, h1 < 2^44, h2 < 2^42 (h0 is not carried after
/// the fold of the top); r0, r1 < 2^44, r2 < 2^36, s1 = 20 r1 < 2^48.33,
/// s2 = 20 r2 < 2^40.33. The largest operand is h0 + m0 < 2^50.03, the largest sum
/// < 2^53.72.
#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn absorb44(
    h: &mut [__m512i; 3],
    r: &[__m512i; 3],
    s20: &[__m512i; 2],
    lo: __m512i,
    hi: __m512i,
    active: __mmask8,
) {
    let mask44 = _mm512_set1_epi64(MASK44 as i64);
    let mask42 = _mm512_set1_epi64(MASK42 as i64);
    // 2^128 is bit 40 of limb 2: 128 = 2 * 44 + 40.
    let hibit = _mm512_set1_epi64(1 << 40);
    let add = _mm512_add_epi64;
    let mlo = _mm512_madd52lo_epu64;
    let mhi = _mm512_madd52hi_epu64;
    let zero = _mm512_setzero_si512();

    // m = lo[0..44] + (lo[44..64] | hi[0..24]) << 44 + (hi[24..64] | 2^40) << 88.
    // m0, m1 < 2^44; m2 < 2^41: 40 bits of the block and the 2^128 bit.
    let m0 = _mm512_and_si512(lo, mask44);
    // (a | b) & c
    let m1 = _mm512_ternarylogic_epi64::<0xa8>(
        _mm512_srli_epi64::<44>(lo),
        _mm512_slli_epi64::<20>(hi),
        mask44,
    );
    let m2 = _mm512_or_si512(_mm512_srli_epi64::<24>(hi), hibit);
    below!(1 << 44, "absorb44: m0, m1", m0, m1);
    below!(1 << 41, "absorb44: m2", m2);

    // h0 < 2^50 + 2^44, h1 < 2^45, h2 < 2^42 + 2^41: all below 2^52, whole IFMA operands.
    let h0 = add(h[0], m0);
    let h1 = add(h[1], m1);
    let h2 = add(h[2], m2);
    below!((1 << 50) + (1 << 44), "absorb44: h0 + m0", h0);
    below!(1 << 45, "absorb44: h1 + m1", h1);
    below!((1 << 42) + (1 << 41), "absorb44: h2 + m2", h2);

    // d_k collects the low halves at weight 2^(44 k), t_k the high halves at 2^(44 k + 52).
    // h0 goes last in each chain: it is the last limb ready from the previous block.
    // Products: h0 r0, h0 r1 < 2^94.03, h0 r2 < 2^86.03, h1 r0, h1 r1 < 2^89,
    // h1 s2 < 2^85.33, h2 s1 < 2^90.91, h2 r0 < 2^86.59, h2 s2 < 2^82.91. Each low half is
    // < 2^52, so d_k < 3 * 2^52; t0 < 2^42.03 + 2^38.91 + 2^33.33 < 2^42.19 < 5 * 2^40,
    // t1 < 2^42.03 + 2^37 + 2^30.91 < 2^42.07, t2 < 2^37 + 2^34.59 + 2^34.03 < 2^37.4
    // < 3 * 2^36.
    let [r0, r1, r2] = *r;
    let [s1, s2] = *s20;
    let d0 = mlo(mlo(mlo(zero, h1, s2), h2, s1), h0, r0);
    let t0 = mhi(mhi(mhi(zero, h1, s2), h2, s1), h0, r0);
    let d1 = mlo(mlo(mlo(zero, h1, r0), h2, s2), h0, r1);
    let t1 = mhi(mhi(mhi(zero, h1, r0), h2, s2), h0, r1);
    let d2 = mlo(mlo(mlo(zero, h1, r1), h2, r0), h0, r2);
    let t2 = mhi(mhi(mhi(zero, h1, r1), h2, r0), h0, r2);
    below!(3 << 52, "absorb44: d0..d2", d0, d1, d2);
    below!(5 << 40, "absorb44: t0, t1", t0, t1);
    below!(3 << 36, "absorb44: t2", t2);

    // A high half at 2^(44 k + 52) is 2^8 into limb k + 1; limb 2 is 42 bits wide, so its
    // high half is 2^10 above 2^130 and folds back times 5, as does d2 >> 42.
    // d1 + (t0 << 8) + (d0 >> 44) < 3 * 2^52 + 2^50.19 + 2^9.59 < 2^53.72 < 7 * 2^51;
    // h0 < 2^44.
    let d1 = add(
        d1,
        add(_mm512_slli_epi64::<8>(t0), _mm512_srli_epi64::<44>(d0)),
    );
    let h0 = _mm512_and_si512(d0, mask44);
    // d2 + (t1 << 8) + (d1 >> 44) < 3 * 2^52 + 2^50.07 + 2^9.72 < 2^53.71; h1 < 2^44.
    let d2 = add(
        d2,
        add(_mm512_slli_epi64::<8>(t1), _mm512_srli_epi64::<44>(d1)),
    );
    let h1 = _mm512_and_si512(d1, mask44);
    below!(7 << 51, "absorb44: d1, d2 + carries", d1, d2);
    // c, the part of h at 2^130 and above: (t2 << 10) + (d2 >> 42) < 2^47.4 < 3 * 2^46;
    // h2 < 2^42.
    let c = add(_mm512_slli_epi64::<10>(t2), _mm512_srli_epi64::<42>(d2));
    let h2 = _mm512_and_si512(d2, mask42);
    below!(3 << 46, "absorb44: c", c);
    // h0 + 5 c < 2^44 + 2^49.72 < 2^49.75 (with c < 3 * 2^46 alone, < 2^44 + 15 * 2^46):
    // below 2^50 without a carry.
    let h0 = add(h0, add(_mm512_slli_epi64::<2>(c), c));

    h[0] = _mm512_mask_mov_epi64(h[0], active, h0);
    h[1] = _mm512_mask_mov_epi64(h[1], active, h1);
    h[2] = _mm512_mask_mov_epi64(h[2], active, h2);
    // The exit bounds, in every lane: masked lanes kept an accumulator that met them.
    below!(1 << 50, "absorb44: exit h0", h[0]);
    below!(1 << 44, "absorb44: exit h1", h[1]);
    below!(1 << 42, "absorb44: exit h2", h[2]);
}

/// The tag from one lane's radix-2^44 limbs (h0 < 2^50, h1 < 2^44, h2 < 2^42, as
/// `absorb44` leaves them): full carry, reduce mod 2^130 - 5 in constant time, add s mod
/// 2^128. Leaves its working values in `h` for the caller to wipe.
fn finish44(h: &mut [u64; 3], s: u128) -> [u8; 16] {
    debug_assert!(
        h[0] < 1 << 50 && h[1] < 1 << 44 && h[2] < 1 << 42,
        "finish44: entry"
    );
    // h0 >> 44 < 2^6, so h1 < 2^44 + 2^6 and its carry is 0 or 1; h2 <= 2^42.
    let mut c = h[0] >> 44;
    h[0] &= MASK44;
    h[1] += c;
    c = h[1] >> 44;
    h[1] &= MASK44;
    h[2] += c;
    c = h[2] >> 42;
    h[2] &= MASK42;
    // The top carry is 1 only if h2 was exactly 2^42, so h2 is now 0.
    debug_assert!(c == 0 || (c == 1 && h[2] == 0), "finish44: top carry");
    // h0 < 2^44 + 5; it carries 1 into h1 only after a top carry, so h1 <= 2^44.
    h[0] += c * 5;
    c = h[0] >> 44;
    h[0] &= MASK44;
    h[1] += c;
    debug_assert!(
        h[0] < 1 << 44 && h[1] <= 1 << 44 && h[2] < 1 << 42,
        "finish44: carried"
    );
    // h < 2^130: without a top carry every limb is below its width, with one h2 = 0. As
    // 2^130 < 2 p, one conditional subtraction of p reduces it:
    // g = h + 5 - 2^130, kept iff it is not negative.
    let mut g = [0u64; 3];
    g[0] = h[0] + 5;
    c = g[0] >> 44;
    g[0] &= MASK44;
    g[1] = h[1] + c;
    c = g[1] >> 44;
    g[1] &= MASK44;
    // h2 + c <= 2^42; g2 wraps, setting bit 63, iff h < p.
    g[2] = (h[2] + c).wrapping_sub(1 << 42);
    let keep_g = (g[2] >> 63).wrapping_sub(1);
    for (h, g) in h.iter_mut().zip(&g) {
        *h = (*h & !keep_g) | (g & keep_g);
    }
    g.zeroize();
    // Kept h < p, or g = h - p <= 4: either way the canonical value mod p.
    debug_assert!(is_reduced(h, 44), "finish44: not below p");
    // Added, not or-ed: h1 may be exactly 2^44 when h was kept. Mod 2^128 from here:
    // bits 128 and 129 of h (the shift drops them) and the carry out of the addition of s
    // drop off (RFC 8439).
    let mut acc = u128::from(h[0])
        .wrapping_add(u128::from(h[1]) << 44)
        .wrapping_add(u128::from(h[2]) << 88);
    let tag = acc.wrapping_add(s).to_le_bytes();
    acc.zeroize();
    tag
}

/// Every lane's blocks of one run, `steps` of them each.
type RunBlocks<'a> = [&'a [[u8; 16]]; LANES];

/// Each lane's whole blocks, its three parts in order, handed out in runs during which no
/// lane moves to another part, so a run is one slice per lane.
struct Feed<'a> {
    parts: [[&'a [[u8; 16]]; 3]; LANES],
    next_part: [usize; LANES],
    current: [&'a [[u8; 16]]; LANES],
}

impl<'a> Feed<'a> {
    fn new(inputs: &[PolyInput<'a>], n: usize) -> Self {
        let mut parts = [[&[][..]; 3]; LANES];
        for (lane, input) in parts.iter_mut().zip(inputs.iter().take(n)) {
            // Only whole blocks; a partial tail (callers never send one) is dropped here.
            *lane = input.parts.map(|p| p.as_chunks::<16>().0);
        }
        Feed {
            parts,
            next_part: [0; LANES],
            current: [&[]; LANES],
        }
    }

    /// The next run: the lanes that still have blocks, how many blocks each of them takes,
    /// and those blocks. Every slice holds exactly `steps` blocks: a lane without blocks
    /// gets a copy of an active lane's, computed and then masked away.
    fn next_run(&mut self) -> Option<(__mmask8, usize, RunBlocks<'a>)> {
        let mut active: __mmask8 = 0;
        let mut steps = usize::MAX;
        for (lane, current) in self.current.iter_mut().enumerate() {
            while current.is_empty() && self.next_part[lane] < 3 {
                *current = self.parts[lane][self.next_part[lane]];
                self.next_part[lane] += 1;
            }
            if !current.is_empty() {
                active |= 1 << lane;
                steps = steps.min(current.len());
            }
        }
        if active == 0 {
            return None;
        }
        let filler = &self.current[active.trailing_zeros() as usize][..steps];
        let mut run = [filler; LANES];
        for (lane, current) in self.current.iter_mut().enumerate() {
            if active & (1 << lane) != 0 {
                (run[lane], *current) = current.split_at(steps);
            }
        }
        Some((active, steps, run))
    }
}

/// Block `k` of every lane of a run, as the vectors of the low and the high 64 bits.
#[target_feature(enable = "avx512f")]
#[inline]
fn load_blocks(run: &RunBlocks<'_>, k: usize) -> (__m512i, __m512i) {
    load_lanes(&run.map(|blocks| &blocks[k]))
}

#[target_feature(enable = "avx512f")]
#[inline]
fn load_lanes(blocks: &[&[u8; 16]; LANES]) -> (__m512i, __m512i) {
    let block = |lane: usize| -> __m128i {
        let b: &[u8; 16] = blocks[lane];
        // Safety: `b` is a reference to 16 readable bytes; the load has no alignment
        // requirement.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    };
    // Qwords lo0 hi0 lo1 hi1 .. lo3 hi3 and lo4 hi4 .. lo7 hi7.
    let a = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set_m128i(block(1), block(0))),
        _mm256_set_m128i(block(3), block(2)),
    );
    let b = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set_m128i(block(5), block(4))),
        _mm256_set_m128i(block(7), block(6)),
    );
    let even = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
    (
        _mm512_permutex2var_epi64(a, even, b),
        _mm512_permutex2var_epi64(a, odd, b),
    )
}

#[target_feature(enable = "avx512f")]
#[inline]
fn from_lanes(v: &[u64; LANES]) -> __m512i {
    _mm512_set_epi64(
        v[7] as i64,
        v[6] as i64,
        v[5] as i64,
        v[4] as i64,
        v[3] as i64,
        v[2] as i64,
        v[1] as i64,
        v[0] as i64,
    )
}

#[target_feature(enable = "avx512f")]
#[inline]
fn to_lanes(v: __m512i) -> [u64; LANES] {
    // Safety: both types are 64 bytes of plain integers, every bit pattern valid in each;
    // lane i of the vector is element i of the array (x86 is little-endian).
    unsafe { core::mem::transmute::<__m512i, [u64; LANES]>(v) }
}

#[cfg(test)]
mod tests {
    use super::{poly1305_x8, poly1305_x8_ifma, PolyInput};
    use poly1305::universal_hash::KeyInit;
    use poly1305::Poly1305;
    use std::arch::is_x86_feature_detected;

    fn reference(key: &[u8; 32], msg: &[u8]) -> [u8; 16] {
        Poly1305::new(key.into()).compute_unpadded(msg).into()
    }

    /// One kernel under test; only [`kernels`] and [`ifma`] make them, after detecting
    /// the CPU features the kernel needs.
    type KernelFn = unsafe fn(&[[u8; 32]], &[PolyInput<'_>], &mut [[u8; 16]]);

    #[derive(Clone, Copy)]
    struct Kernel {
        name: &'static str,
        f: KernelFn,
    }

    impl Kernel {
        fn call(self, keys: &[[u8; 32]], inputs: &[PolyInput<'_>], tags: &mut [[u8; 16]]) {
            // Safety: a Kernel exists only once its CPU features were detected.
            unsafe { (self.f)(keys, inputs, tags) }
        }

        fn run(self, keys: &[[u8; 32]], inputs: &[PolyInput<'_>]) -> Vec<[u8; 16]> {
            let mut tags = vec![[0u8; 16]; keys.len().min(inputs.len()).min(8)];
            self.call(keys, inputs, &mut tags);
            tags
        }
    }

    fn ifma() -> Option<Kernel> {
        let detected =
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512ifma");
        detected.then_some(Kernel {
            name: "poly1305_x8_ifma",
            f: poly1305_x8_ifma,
        })
    }

    /// Every kernel this CPU runs: none without AVX-512F, so each test is then a no-op.
    fn kernels() -> Vec<Kernel> {
        let mut all = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            all.push(Kernel {
                name: "poly1305_x8",
                f: poly1305_x8,
            });
        }
        all.extend(ifma());
        all
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.next() as u8;
            }
        }
        fn key(&mut self) -> [u8; 32] {
            let mut k = [0u8; 32];
            self.fill(&mut k);
            k
        }
    }

    /// Cuts `msg` (whole blocks) into three parts at two random block boundaries.
    fn split<'a>(rng: &mut XorShift, msg: &'a [u8]) -> PolyInput<'a> {
        let blocks = msg.len() / 16;
        let mut a = rng.below(blocks + 1);
        let mut b = rng.below(blocks + 1);
        if a > b {
            core::mem::swap(&mut a, &mut b);
        }
        PolyInput {
            parts: [&msg[..a * 16], &msg[a * 16..b * 16], &msg[b * 16..]],
        }
    }

    fn check_all(k: Kernel, keys: &[[u8; 32]], msgs: &[Vec<u8>], inputs: &[PolyInput<'_>]) {
        let tags = k.run(keys, inputs);
        for (lane, tag) in tags.iter().enumerate() {
            assert_eq!(
                *tag,
                reference(&keys[lane], &msgs[lane]),
                "{}: lane {lane} of {}",
                k.name,
                tags.len()
            );
        }
    }

    #[test]
    fn rfc8439_vector() {
        for k in kernels() {
            let key: [u8; 32] = [
                0x85, 0xd6, 0xbe, 0x78, 0x57, 0x55, 0x6d, 0x33, 0x7f, 0x44, 0x52, 0xfe, 0x42, 0xd5,
                0x06, 0xa8, 0x01, 0x03, 0x80, 0x8a, 0xfb, 0x0d, 0xb2, 0xfd, 0x4a, 0xbf, 0xf6, 0xaf,
                0x41, 0x49, 0xf5, 0x1b,
            ];
            let expected = [
                0xa8, 0x06, 0x1d, 0xc1, 0x30, 0x51, 0x36, 0xc6, 0xc2, 0x2b, 0x8b, 0xaf, 0x0c, 0x01,
                0x27, 0xa9,
            ];
            let msg = b"Cryptographic Forum Research Group";
            assert_eq!(reference(&key, msg), expected);

            let mut padded = msg.to_vec();
            padded.resize(48, 0);
            let want = reference(&key, &padded);
            for n in 1..=8 {
                let keys = vec![key; n];
                let msgs = vec![padded.clone(); n];
                let inputs: Vec<_> = (0..n)
                    .map(|lane| {
                        let cut = (lane % 4) * 16;
                        PolyInput {
                            parts: [
                                &padded[..cut.min(16)],
                                &padded[cut.min(16)..cut],
                                &padded[cut..],
                            ],
                        }
                    })
                    .collect();
                check_all(k, &keys, &msgs, &inputs);
                assert!(k.run(&keys, &inputs).iter().all(|t| *t == want));
            }
        }
    }

    #[test]
    fn random_lanes_lengths_and_splits() {
        for k in kernels() {
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
            for round in 0..24 {
                for n in 1..=8 {
                    let keys: Vec<_> = (0..n).map(|_| rng.key()).collect();
                    let msgs: Vec<Vec<u8>> = (0..n)
                        .map(|_| {
                            // Mostly short, sometimes up to ~300 blocks, sometimes empty.
                            let blocks = match rng.below(4) {
                                0 => 0,
                                1 => rng.below(301),
                                _ => rng.below(20),
                            };
                            let mut m = vec![0u8; blocks * 16];
                            rng.fill(&mut m);
                            m
                        })
                        .collect();
                    let inputs: Vec<_> = msgs.iter().map(|m| split(&mut rng, m)).collect();
                    check_all(k, &keys, &msgs, &inputs);
                    // Same messages, every lane in one part, or the lanes shifted over: same tags.
                    let whole: Vec<_> = msgs
                        .iter()
                        .map(|m| PolyInput {
                            parts: [&[], m, &[]],
                        })
                        .collect();
                    assert_eq!(
                        k.run(&keys, &whole),
                        k.run(&keys, &inputs),
                        "round {round}, {n} lanes"
                    );
                }
            }
        }
    }

    #[test]
    fn extra_entries_beyond_n_are_untouched() {
        for k in kernels() {
            let mut rng = XorShift(7);
            let keys: Vec<_> = (0..10).map(|_| rng.key()).collect();
            let msg = vec![0x5au8; 64];
            let inputs = vec![
                PolyInput {
                    parts: [&msg, &[], &[]],
                };
                3
            ];
            let mut tags = vec![[0xeeu8; 16]; 5];
            k.call(&keys, &inputs, &mut tags);
            for (lane, tag) in tags.iter().enumerate().take(3) {
                assert_eq!(*tag, reference(&keys[lane], &msg));
            }
            assert_eq!(tags[3..], [[0xee; 16]; 2]);

            // More than eight of everything: only eight computed.
            let inputs = vec![inputs[0]; 10];
            let mut tags = vec![[0xeeu8; 16]; 10];
            k.call(&keys, &inputs, &mut tags);
            for (lane, tag) in tags.iter().enumerate().take(8) {
                assert_eq!(*tag, reference(&keys[lane], &msg));
            }
            assert_eq!(tags[8..], [[0xee; 16]; 2]);

            // Nothing to do.
            k.call(&[], &inputs, &mut tags);
        }
    }

    #[test]
    fn empty_lanes_give_s() {
        for k in kernels() {
            let mut rng = XorShift(11);
            let keys: Vec<_> = (0..8).map(|_| rng.key()).collect();
            let msg = vec![1u8; 160];
            let inputs: Vec<_> = (0..8)
                .map(|lane| PolyInput {
                    parts: if lane % 2 == 0 {
                        [&[], &[], &[]]
                    } else {
                        [&msg, &[], &msg]
                    },
                })
                .collect();
            let tags = k.run(&keys, &inputs);
            for lane in (0..8).step_by(2) {
                assert_eq!(tags[lane][..], keys[lane][16..]);
            }
            let twice = [msg.clone(), msg.clone()].concat();
            for lane in (1..8).step_by(2) {
                assert_eq!(tags[lane], reference(&keys[lane], &twice));
            }
        }
    }

    #[test]
    fn edge_keys_and_blocks() {
        for k in kernels() {
            let ones = vec![0xffu8; 300 * 16];
            let zeros = vec![0u8; 300 * 16];
            // r at the clamp maximum with s = 0, and with s all ones.
            let mut clamp_max = [0u8; 32];
            clamp_max[..16]
                .copy_from_slice(&0x0fff_fffc_0fff_fffc_0fff_fffc_0fff_ffffu128.to_le_bytes());
            let mut clamp_max_s = clamp_max;
            clamp_max_s[16..].fill(0xff);
            let keys = [
                [0xffu8; 32],
                [0u8; 32],
                clamp_max,
                clamp_max_s,
                [0xff; 32],
                clamp_max_s,
                [0u8; 32],
                clamp_max,
            ];
            for &len in &[0usize, 1, 2, 3, 5, 17, 64, 300] {
                let msgs: Vec<Vec<u8>> = (0..8)
                    .map(|lane| {
                        if lane < 6 {
                            ones[..len * 16].to_vec()
                        } else {
                            zeros[..len * 16].to_vec()
                        }
                    })
                    .collect();
                let inputs: Vec<_> = msgs
                    .iter()
                    .map(|m| PolyInput {
                        parts: [m, &[], &[]],
                    })
                    .collect();
                check_all(k, &keys, &msgs, &inputs);
                // An all-zero key authenticates everything to zero.
                assert_eq!(k.run(&keys, &inputs)[1], [0; 16]);
            }
        }
    }

    #[test]
    fn final_reduction_boundary() {
        for k in kernels() {
            // With r = 1, three blocks 0, 0, b give h = 3 * 2^128 + b; b = 2^128 - 5 + d makes
            // h = p + d, straddling the final conditional subtraction.
            let mut keys = [[0u8; 32]; 8];
            let mut msgs = Vec::new();
            for (lane, d) in (-2i32..6).enumerate() {
                keys[lane][0] = 1;
                if lane % 2 == 1 {
                    keys[lane][16..].fill(0xff);
                }
                let b = (u128::MAX - 4).wrapping_add(d as u128);
                let mut m = vec![0u8; 32];
                m.extend_from_slice(&b.to_le_bytes());
                msgs.push(m);
            }
            let inputs: Vec<_> = msgs
                .iter()
                .map(|m| PolyInput {
                    parts: [&m[..16], &m[16..32], &m[32..]],
                })
                .collect();
            check_all(k, &keys, &msgs, &inputs);
        }
    }

    #[test]
    fn long_lane_with_short_ones() {
        for k in kernels() {
            let mut rng = XorShift(0xdead_beef);
            let keys: Vec<_> = (0..8).map(|_| rng.key()).collect();
            let msgs: Vec<Vec<u8>> = (0..8)
                .map(|lane| {
                    let mut m = vec![0u8; if lane == 3 { 64 * 1024 } else { 16 }];
                    rng.fill(&mut m);
                    m
                })
                .collect();
            let inputs: Vec<_> = msgs
                .iter()
                .map(|m| PolyInput {
                    parts: [&[], &[], m],
                })
                .collect();
            check_all(k, &keys, &msgs, &inputs);
        }
    }

    #[test]
    fn partial_trailing_bytes_are_ignored() {
        for k in kernels() {
            let mut rng = XorShift(99);
            let keys: Vec<_> = (0..8).map(|_| rng.key()).collect();
            let mut data = vec![0u8; 200];
            rng.fill(&mut data);
            let inputs: Vec<_> = (0..8)
                .map(|lane| PolyInput {
                    parts: [
                        &data[..17 + lane],
                        &data[40..45],
                        &data[50..50 + 33 + lane * 7],
                    ],
                })
                .collect();
            let tags = k.run(&keys, &inputs);
            for (lane, input) in inputs.iter().enumerate() {
                let whole: Vec<u8> = input
                    .parts
                    .iter()
                    .flat_map(|p| &p[..p.len() / 16 * 16])
                    .copied()
                    .collect();
                assert_eq!(tags[lane], reference(&keys[lane], &whole), "lane {lane}");
            }
        }
    }

    /// Radix 2^44 carries differ from radix 2^26: final values straddling p reached after
    /// 0..8 blocks of folding, and all-ones blocks with r at or next to its limb boundaries.
    #[test]
    fn ifma_final_reduction_and_all_ones() {
        let Some(k) = ifma() else {
            return;
        };
        // r = 1, `zeros` zero blocks, then zero, zero and b: h = (zeros + 3) * 2^128 + b,
        // and for zeros = 0 that is p + d.
        for zeros in 0..8 {
            let mut keys = [[0u8; 32]; 8];
            let mut msgs = Vec::new();
            for (lane, d) in (-2i32..6).enumerate() {
                keys[lane][0] = 1;
                if lane % 2 == 1 {
                    keys[lane][16..].fill(0xff);
                }
                let b = (u128::MAX - 4).wrapping_add(d as u128);
                let mut m = vec![0u8; (zeros + 2) * 16];
                m.extend_from_slice(&b.to_le_bytes());
                msgs.push(m);
            }
            let inputs: Vec<_> = msgs
                .iter()
                .map(|m| PolyInput {
                    parts: [&m[..16], &m[16..m.len() - 16], &m[m.len() - 16..]],
                })
                .collect();
            check_all(k, &keys, &msgs, &inputs);
        }

        let clamp = 0x0fff_fffc_0fff_fffc_0fff_fffc_0fff_ffffu128;
        let rs = [
            1u128 << 44,
            (1 << 44) - 1,
            1 << 88,
            ((1 << 88) - 1) & clamp,
            clamp,
            clamp & !((1 << 44) - 1),
            clamp & ((1 << 88) - 1),
            clamp & !((1 << 88) - 1),
        ];
        let keys: Vec<[u8; 32]> = rs
            .iter()
            .enumerate()
            .map(|(lane, r)| {
                let mut key = [0xffu8; 32];
                key[..16].copy_from_slice(&r.to_le_bytes());
                if lane % 3 == 0 {
                    key[16..].fill(0);
                }
                key
            })
            .collect();
        let ones = vec![0xffu8; 200 * 16];
        for len in [1usize, 2, 3, 4, 7, 12, 68, 200] {
            let msgs = vec![ones[..len * 16].to_vec(); 8];
            let inputs: Vec<_> = msgs
                .iter()
                .map(|m| PolyInput {
                    parts: [&[], m, &[]],
                })
                .collect();
            check_all(k, &keys, &msgs, &inputs);
            // All-ones keys too, as the key the clamp sees most of.
            check_all(k, &[[0xff; 32]; 8], &msgs, &inputs);
        }
    }

    /// All-ones keys (the largest r the clamp leaves, and s all ones) and all-ones blocks
    /// (the largest m in every block) over up to 4096 blocks, in both kernels: the limbs,
    /// products and sums come close to the bounds that `below!` and the `debug_assert!`s of
    /// `finish`/`finish44` check in debug builds. The first block differs in each lane, so
    /// the eight accumulators take different paths; the lengths differ, so lanes drop out
    /// and are masked while the others go on.
    #[test]
    fn limbs_at_their_bounds() {
        let keys = [[0xffu8; 32]; 8];
        let lens = [4096usize, 4096, 4095, 4000, 2048, 1000, 17, 1];
        let msgs: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(lane, &blocks)| {
                let mut m = vec![0xffu8; blocks * 16];
                m[0] -= lane as u8;
                m
            })
            .collect();
        let inputs: Vec<_> = msgs
            .iter()
            .map(|m| PolyInput {
                parts: [&m[..16], &m[16..], &[]],
            })
            .collect();
        for k in kernels() {
            check_all(k, &keys, &msgs, &inputs);
        }
    }

    /// Rough throughput: `cargo test --release --lib envelope::multi::poly -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        let kernels = kernels();
        if kernels.is_empty() {
            return;
        }
        use std::hint::black_box;
        use std::time::Instant;
        let mut rng = XorShift(5);
        let keys: Vec<_> = (0..8).map(|_| rng.key()).collect();
        for blocks in [12usize, 68] {
            let msgs: Vec<Vec<u8>> = (0..8)
                .map(|_| {
                    let mut m = vec![0u8; blocks * 16];
                    rng.fill(&mut m);
                    m
                })
                .collect();
            let inputs: Vec<_> = msgs
                .iter()
                .map(|m| PolyInput {
                    parts: [&m[..32], &m[32..m.len() - 16], &m[m.len() - 16..]],
                })
                .collect();
            let iters = 200_000 / blocks * 12;
            let per_message = |f: &mut dyn FnMut()| {
                let start = Instant::now();
                for _ in 0..iters {
                    f();
                }
                start.elapsed().as_nanos() as f64 / (iters * 8) as f64
            };
            let mut one_by_one = || {
                for (key, msg) in keys.iter().zip(&msgs) {
                    black_box(reference(black_box(key), black_box(msg)));
                }
            };
            // The crate before and after, in case the vector unit's state skews it.
            let single = per_message(&mut one_by_one);
            let mut line = format!("{blocks} blocks:");
            for k in &kernels {
                let mut tags = [[0u8; 16]; 8];
                let mut batch = || {
                    k.call(black_box(&keys), black_box(&inputs), &mut tags);
                    black_box(&tags);
                };
                let ns = per_message(&mut batch);
                line += &format!(" {} {ns:.1},", k.name);
            }
            let single_after = per_message(&mut one_by_one);
            println!("{line} poly1305 crate {single:.1} / {single_after:.1} ns/message");
        }
    }
}
