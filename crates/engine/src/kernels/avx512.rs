//! x86-64 AVX-512 (BW + VNNI) tiles for the 32-element formats, chosen at run time.
//!
//! The activation rows of a tile are interleaved block by block (`Q8Tile`), so one zmm
//! register holds the same block of two rows: the weight block, unpacked once, is
//! broadcast to both halves and multiplied against `TILE` rows with half the
//! instructions of the AVX2 tile. Bit for bit the AVX2 single-row kernels: each i32 lane
//! holds the same exact integer sum of 4 products (`vpdpbusd` sums the 4 byte products
//! that `maddubs` + `madd` sum in two steps, which never saturate for these formats), and
//! each f32 lane runs the same `d_x * d_y` product and the same fused multiply-add per
//! block, in block order; the horizontal sums at the end are the AVX2 kernel's.

use std::arch::x86_64::*;

use super::{
    Q8Row, Q8Tile, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q5_0_BLOCK_BYTES, Q5_1_BLOCK_BYTES,
    Q5_K_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK,
};

/// Activation rows per tile (two per register): at most 16, and a short last tile is
/// padded to a multiple of 4 (`Q8Tile::rows_for`).
pub(super) const TILE: usize = 16;
/// Activation rows per tile of the k-quants.
pub(super) const K_TILE: usize = 8;

pub(super) fn available() -> bool {
    super::x86::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

// Single rows (decode): the AVX2 loops of `x86.rs` with fewer instructions per block —
// `vpdpbusd` for `maddubs` + `madd`, and for Q5_0 the high bits as a mask register instead
// of spread across bytes by shuffles. Same integer lanes, same f32 steps in the same order,
// so bit for bit the AVX2 results (tested).

pub(super) fn vec_dot_q5_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX-512
    // F/BW/DQ/VL/VNNI and AVX2, FMA, F16C.
    unsafe { vec_dot_q5_0_q8_0_avx512(w, act) }
}

pub(super) fn vec_dot_q8_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: as above.
    unsafe { vec_dot_q8_0_q8_0_avx512(w, act) }
}

pub(super) fn vec_dot_q4_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: as above.
    unsafe { vec_dot_q4_1_q8_1_avx512(w, act) }
}

/// The 16 packed bytes of a 32-element block as 32 nibbles, low nibbles first: the bytes
/// in both halves, the upper half shifted down by 4, masked.
#[inline(always)]
unsafe fn nibbles(packed: *const u8) -> __m256i {
    let bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(packed as *const __m128i));
    _mm256_and_si256(
        _mm256_srlv_epi64(bytes, _mm256_set_epi64x(4, 4, 0, 0)),
        _mm256_set1_epi8(0x0f),
    )
}

/// `|x| * sign(x) y` summed 4 bytes to an i32 lane in one instruction: the exact sums that
/// `x86::mul_sum_i8_pairs` forms in two (its 16-bit pair sums cannot saturate: |x| <= 128
/// and |y| <= 127).
#[inline(always)]
unsafe fn dot_i8_lanes(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_abs_epi8(x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn vec_dot_q5_0_q8_0_avx512(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q5_0_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    let minus_16 = _mm256_set1_epi8(0xf0u8 as i8);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_0_BLOCK_BYTES);
        let d = super::x86::block_scale(block);
        let high_bits: __mmask32 = (block.add(2) as *const u32).read_unaligned();
        let low = nibbles(block.add(6));
        // nibble - 16 where the high bit is clear (the nibble with 0xF0 set), else nibble.
        let qx = _mm256_mask_blend_epi8(high_bits, _mm256_or_si256(low, minus_16), low);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, dot_i8_lanes(qx, qy), acc);
    }
    super::x86::hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn vec_dot_q4_1_q8_1_avx512(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q4_1_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.s.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_1_BLOCK_BYTES);
        // d and m as f16 -> f32 in one conversion (a 32-bit load zeroes the register).
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        summs += m * *act.s.get_unchecked(b);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        // Nibbles are unsigned already: no sign trick.
        let sums = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
            _mm256_setzero_si256(),
            nibbles(block.add(4)),
            qy,
        ));
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, sums, acc);
    }
    super::x86::hsum(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn vec_dot_q8_0_q8_0_avx512(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q8_0_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q8_0_BLOCK_BYTES);
        let d = super::x86::block_scale(block);
        let qx = _mm256_loadu_si256(block.add(2) as *const __m256i);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, dot_i8_lanes(qx, qy), acc);
    }
    super::x86::hsum(acc)
}

macro_rules! tile_fn {
    ($name:ident, $tile:ident) => {
        pub(super) fn $name(
            w: &[u8],
            row_bytes: usize,
            t: &Q8Tile,
            n: usize,
            out: &mut [f32],
            stride: usize,
        ) {
            assert!(n <= t.rows && n <= stride);
            for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                let out = &mut out[j * stride..][..n];
                // Safety: only selected by `multi_dot_fn` after `available()` confirmed
                // AVX-512 F/BW/DQ/VNNI (and AVX2, FMA, F16C); the kernel checks the
                // tile's sizes.
                unsafe {
                    match t.rows {
                        16 => $tile::<8>(row, t, out),
                        12 => $tile::<6>(row, t, out),
                        8 => $tile::<4>(row, t, out),
                        4 => $tile::<2>(row, t, out),
                        r => panic!("a tile of {r} rows"),
                    }
                }
            }
        }
    };
}

tile_fn!(tile_q4_0_q8_0, tile_q4_0_q8_0_avx512);
tile_fn!(tile_q4_1_q8_1, tile_q4_1_q8_1_avx512);
tile_fn!(tile_q5_1_q8_1, tile_q5_1_q8_1_avx512);
tile_fn!(tile_q5_0_q8_0, tile_q5_0_q8_0_avx512);
tile_fn!(tile_q8_0_q8_0, tile_q8_0_q8_0_avx512);

tile_fn!(tile_q5_k_q8_k, tile_q5_k_q8_k_avx512);

/// Checks the tile against `nb` weight blocks and `P` pairs of rows.
#[inline(always)]
fn check<const P: usize>(t: &Q8Tile, nb: usize, out: &[f32], sums: bool) {
    assert!(t.rows == 2 * P && out.len() <= t.rows);
    assert!(t.d.len() >= nb * t.rows && t.qs.len() >= nb * t.rows * QK);
    assert!(!sums || t.s.len() >= nb * t.rows);
}

/// For each pair `p`, the permutation that puts lane `2p` of a vector in lanes 0..8 and
/// lane `2p + 1` in lanes 8..16.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
#[inline]
unsafe fn pair_spread<const P: usize>() -> [__m512i; P] {
    std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
    })
}

/// The 2P products `d_x * d_y[r]` of block `b`, in lanes 0..2P.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
#[inline]
unsafe fn scales<const P: usize>(dx: f32, d: *const f32) -> __m512 {
    let dy = _mm512_maskz_loadu_ps(((1u32 << (2 * P)) - 1) as u16, d);
    _mm512_mul_ps(_mm512_set1_ps(dx), dy)
}

/// The AVX2 kernels' horizontal sum of each half of each accumulator: row `2p` and
/// `2p + 1`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
#[inline]
unsafe fn store<const P: usize>(acc: &[__m512; P], out: &mut [f32], extra: Option<&[f32]>) {
    for (r, o) in out.iter_mut().enumerate() {
        let a = acc[r / 2];
        let half = if r % 2 == 0 {
            _mm512_castps512_ps256(a)
        } else {
            _mm512_extractf32x8_ps(a, 1)
        };
        // Adding 0.0 would turn a -0.0 into +0.0: only add what the AVX2 kernel adds.
        *o = match extra {
            Some(e) => hsum(half) + e[r],
            None => hsum(half),
        };
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
unsafe fn tile_q4_1_q8_1_avx512<const P: usize>(w: &[u8], t: &Q8Tile, out: &mut [f32]) {
    let nb = w.len() / Q4_1_BLOCK_BYTES;
    check::<P>(t, nb, out, true);
    let spread = pair_spread::<P>();
    let mut acc = [_mm512_setzero_ps(); P];
    let mut summs = _mm512_setzero_ps();
    let low_mask = _mm_set1_epi8(0x0f);
    let rows_mask = ((1u32 << (2 * P)) - 1) as u16;
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_1_BLOCK_BYTES);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        // `summs += m * s` per row: a product then a sum, as the single-row kernel.
        let s = _mm512_maskz_loadu_ps(rows_mask, t.s.as_ptr().add(b * 2 * P));
        summs = _mm512_add_ps(summs, _mm512_mul_ps(_mm512_set1_ps(m), s));
        let packed = _mm_loadu_si128(block.add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low_mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
        let qx = _mm512_broadcast_i64x4(_mm256_set_m128i(hi, lo));
        let dd = scales::<P>(d, t.d.as_ptr().add(b * 2 * P));
        let qy = t.qs.as_ptr().add(b * 2 * P * QK);
        for p in 0..P {
            let y = _mm512_loadu_si512(qy.add(2 * p * QK) as *const __m512i);
            let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), qx, y));
            acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(spread[p], dd), sums, acc[p]);
        }
    }
    let mut extra = [0f32; 16];
    _mm512_storeu_ps(extra.as_mut_ptr(), summs);
    store::<P>(&acc, out, Some(&extra));
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
unsafe fn tile_q5_1_q8_1_avx512<const P: usize>(w: &[u8], t: &Q8Tile, out: &mut [f32]) {
    let nb = w.len() / Q5_1_BLOCK_BYTES;
    check::<P>(t, nb, out, true);
    let spread = pair_spread::<P>();
    let mut acc = [_mm512_setzero_ps(); P];
    let mut summs = _mm512_setzero_ps();
    let rows_mask = ((1u32 << (2 * P)) - 1) as u16;
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_1_BLOCK_BYTES);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        // `summs += m * s` per row: a product then a sum, as the single-row kernel.
        let s = _mm512_maskz_loadu_ps(rows_mask, t.s.as_ptr().add(b * 2 * P));
        summs = _mm512_add_ps(summs, _mm512_mul_ps(_mm512_set1_ps(m), s));
        let qx = _mm512_broadcast_i64x4(super::x86::q5_1_block(block));
        let dd = scales::<P>(d, t.d.as_ptr().add(b * 2 * P));
        let qy = t.qs.as_ptr().add(b * 2 * P * QK);
        for p in 0..P {
            let y = _mm512_loadu_si512(qy.add(2 * p * QK) as *const __m512i);
            let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), qx, y));
            acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(spread[p], dd), sums, acc[p]);
        }
    }
    let mut extra = [0f32; 16];
    _mm512_storeu_ps(extra.as_mut_ptr(), summs);
    store::<P>(&acc, out, Some(&extra));
}

/// Signed weight bytes `qx` against interleaved activation rows, as the AVX2 kernels'
/// `mul_sum_i8_pairs`: |x| times y with x's sign (a masked negation: AVX-512 has no
/// `vpsignb`; where x = 0 the product is 0 either way).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
#[inline]
unsafe fn signed_block<const P: usize>(
    qx: __m256i,
    dx: f32,
    t: &Q8Tile,
    b: usize,
    spread: &[__m512i; P],
    acc: &mut [__m512; P],
) {
    let qx = _mm512_broadcast_i64x4(qx);
    let ax = _mm512_abs_epi8(qx);
    let neg = _mm512_movepi8_mask(qx);
    let dd = scales::<P>(dx, t.d.as_ptr().add(b * 2 * P));
    let qy = t.qs.as_ptr().add(b * 2 * P * QK);
    for p in 0..P {
        let y = _mm512_loadu_si512(qy.add(2 * p * QK) as *const __m512i);
        let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
        let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy));
        acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(spread[p], dd), sums, acc[p]);
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
unsafe fn tile_q5_0_q8_0_avx512<const P: usize>(w: &[u8], t: &Q8Tile, out: &mut [f32]) {
    let nb = w.len() / Q5_0_BLOCK_BYTES;
    check::<P>(t, nb, out, false);
    let spread = pair_spread::<P>();
    let mut acc = [_mm512_setzero_ps(); P];
    let low_mask = _mm_set1_epi8(0x0f);
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let all_ones = _mm256_set1_epi64x(-1);
    let high_nibble = _mm256_set1_epi8(0xf0u8 as i8);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_0_BLOCK_BYTES);
        let d = super::x86::block_scale(block);
        let qh = (block.add(2) as *const i32).read_unaligned();
        let packed = _mm_loadu_si128(block.add(6) as *const __m128i);
        let lo = _mm_and_si128(packed, low_mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
        let nibbles = _mm256_set_m128i(hi, lo);
        let bits = _mm256_cmpeq_epi8(
            _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh), shuf), bit_mask),
            all_ones,
        );
        let qx = _mm256_or_si256(nibbles, _mm256_andnot_si256(bits, high_nibble));
        signed_block::<P>(qx, d, t, b, &spread, &mut acc);
    }
    store::<P>(&acc, out, None);
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
unsafe fn tile_q4_0_q8_0_avx512<const P: usize>(w: &[u8], t: &Q8Tile, out: &mut [f32]) {
    let nb = w.len() / Q4_0_BLOCK_BYTES;
    check::<P>(t, nb, out, false);
    let spread = pair_spread::<P>();
    let mut acc = [_mm512_setzero_ps(); P];
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_0_BLOCK_BYTES);
        let d = super::x86::block_scale(block);
        signed_block::<P>(super::x86::q4_0_block(block), d, t, b, &spread, &mut acc);
    }
    store::<P>(&acc, out, None);
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
unsafe fn tile_q8_0_q8_0_avx512<const P: usize>(w: &[u8], t: &Q8Tile, out: &mut [f32]) {
    let nb = w.len() / Q8_0_BLOCK_BYTES;
    check::<P>(t, nb, out, false);
    let spread = pair_spread::<P>();
    let mut acc = [_mm512_setzero_ps(); P];
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q8_0_BLOCK_BYTES);
        let d = super::x86::block_scale(block);
        let qx = _mm256_loadu_si256(block.add(2) as *const __m256i);
        signed_block::<P>(qx, d, t, b, &spread, &mut acc);
    }
    store::<P>(&acc, out, None);
}

/// Checks a Q8_K tile against `nb` super-blocks and `P` pairs of rows.
#[inline(always)]
fn check_k<const P: usize>(t: &Q8Tile, nb: usize, n: usize) {
    assert!(t.rows == 2 * P && n <= t.rows);
    assert!(t.d.len() >= nb * t.rows && t.qs.len() >= nb * t.rows * 256);
    assert!(t.sums32.len() >= nb * t.rows * 8);
}

/// The 8 scales then the 8 minimums of a Q4_K super-block, unpacked from their 12 bytes
/// of 6-bit fields with llama.cpp's masks (as `x86::q4_k_scales_mins`).
#[inline(always)]
unsafe fn q4_k_scales_mins(p: *const u8) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let u0 = (p as *const u32).read_unaligned();
    let u1 = (p.add(4) as *const u32).read_unaligned();
    let u2 = (p.add(8) as *const u32).read_unaligned();
    let scales_lo = u0 & KMASK1;
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let mins_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut out = [0u8; 16];
    for (i, v) in [scales_lo, scales_hi, mins_lo, mins_hi].iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// As the AVX2 kernel (llama.cpp's Q5_K loop), per pair of rows: as Q4_K with the high
/// bits added to the nibbles; the minimums' term an exact integer per row and super-block,
/// scaled and summed on the side in f32, as that kernel does.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni")]
unsafe fn tile_q5_k_q8_k_avx512<const P: usize>(w: &[u8], t: &Q8Tile, out: &mut [f32]) {
    let nb = w.len() / Q5_K_BLOCK_BYTES;
    check_k::<P>(t, nb, out.len());
    let rows = 2 * P;
    let spread = pair_spread::<P>();
    let m4 = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); P];
    let mut summs = [0f32; 16];
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_K_BLOCK_BYTES);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let dx = _mm_cvtss_f32(dm);
        let dminx = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        let sm = q4_k_scales_mins(block.add(4));
        let d_rows = t.d.as_ptr().add(b * rows);
        let sums32 = t.sums32.as_ptr().add(b * rows * 8);
        for (r, summ) in summs.iter_mut().enumerate().take(rows) {
            let mut mins = 0i32;
            for j in 0..8 {
                mins += sm[8 + j] as i32 * *sums32.add(r * 8 + j) as i32;
            }
            let dmin = -*d_rows.add(r) * dminx;
            *summ += dmin * mins as f32;
        }
        let hbits = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(16) as *const __m256i));
        let qy = t.qs.as_ptr().add(b * 8 * rows * QK);
        let mut sumi = [_mm512_setzero_si512(); P];
        for j in 0..4 {
            let scale_l = _mm512_set1_epi16(sm[2 * j] as i16);
            let scale_h = _mm512_set1_epi16(sm[2 * j + 1] as i16);
            let q5bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                block.add(48 + 32 * j) as *const __m256i
            ));
            let bit0 = _mm512_and_si512(hbits, _mm512_set1_epi8(1 << (2 * j)));
            let bit1 = _mm512_and_si512(hbits, _mm512_set1_epi8((1u8 << (2 * j + 1)) as i8));
            let h0 = _mm512_slli_epi16(_mm512_srl_epi16(bit0, _mm_cvtsi32_si128(2 * j as i32)), 4);
            let h1 = _mm512_slli_epi16(
                _mm512_srl_epi16(bit1, _mm_cvtsi32_si128(2 * j as i32 + 1)),
                4,
            );
            let q5l = _mm512_add_epi8(_mm512_and_si512(q5bits, m4), h0);
            let q5h = _mm512_add_epi8(_mm512_and_si512(_mm512_srli_epi16(q5bits, 4), m4), h1);
            let ql = qy.add(2 * j * rows * QK);
            let qh = qy.add((2 * j + 1) * rows * QK);
            for (p, sumi) in sumi.iter_mut().enumerate() {
                let q8l = _mm512_loadu_si512(ql.add(2 * p * QK) as *const __m512i);
                let q8h = _mm512_loadu_si512(qh.add(2 * p * QK) as *const __m512i);
                *sumi = _mm512_dpwssd_epi32(*sumi, _mm512_maddubs_epi16(q5l, q8l), scale_l);
                *sumi = _mm512_dpwssd_epi32(*sumi, _mm512_maddubs_epi16(q5h, q8h), scale_h);
            }
        }
        let dy = _mm512_maskz_loadu_ps(((1u32 << rows) - 1) as u16, d_rows);
        let dd = _mm512_mul_ps(dy, _mm512_set1_ps(dx));
        for p in 0..P {
            let f = _mm512_permutexvar_ps(spread[p], dd);
            acc[p] = _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(sumi[p]), acc[p]);
        }
    }
    store::<P>(&acc, out, Some(&summs));
}

/// The AVX2 kernels' horizontal sum (`x86::hsum`), the same additions in the same order.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
