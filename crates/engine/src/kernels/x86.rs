//! x86-64 kernels (AVX2 + FMA), chosen at run time.

use std::arch::x86_64::*;

use super::{Q8Row, Q4_1_BLOCK_BYTES, Q5_0_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub(super) fn vec_dot_q4_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX2, FMA, F16C.
    unsafe { vec_dot_q4_1_q8_1_avx2(w, act) }
}

/// llama.cpp's AVX2 loop: per block, the 32 nibbles times 32 bytes as 8 lanes of int
/// sums, scaled by `d_x d_y` into an f32 accumulator; `m_x s_y` summed on the side.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_q4_1_q8_1_avx2(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q4_1_BLOCK_BYTES;
    debug_assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let low_mask = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_1_BLOCK_BYTES);
        // d and m as f16 -> f32 in one conversion.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        summs += m * *act.s.get_unchecked(b);
        let packed = _mm_loadu_si128(block.add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low_mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
        let qx = _mm256_set_m128i(hi, lo);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let pairs = _mm256_maddubs_epi16(qx, qy);
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, sums, acc);
    }
    hsum(acc) + summs
}

pub(super) fn vec_dot_q5_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX2, FMA, F16C.
    unsafe { vec_dot_q5_0_q8_0_avx2(w, act) }
}

/// llama.cpp's AVX2 loop: nibbles plus the high bit as signed bytes (`- 16` folded in by
/// setting 0xF0 where the high bit is clear), times the activation bytes, as 8 lanes of
/// int sums scaled by `d_x d_y` into an f32 accumulator.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_q5_0_q8_0_avx2(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q5_0_BLOCK_BYTES;
    debug_assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    let low_mask = _mm_set1_epi8(0x0f);
    // Spreads bit i of a u32 onto byte i (as 0xFF / 0x00).
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
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (block as *const u16).read_unaligned() as i32,
        )));
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
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, mul_sum_i8_pairs(qx, qy), acc);
    }
    hsum(acc)
}

pub(super) fn vec_dot_q8_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX2, FMA, F16C.
    unsafe { vec_dot_q8_0_q8_0_avx2(w, act) }
}

/// llama.cpp's AVX2 loop: 32 signed bytes times 32 signed bytes as 8 lanes of int sums,
/// scaled by `d_x d_y` into an f32 accumulator.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_q8_0_q8_0_avx2(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q8_0_BLOCK_BYTES;
    debug_assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q8_0_BLOCK_BYTES);
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (block as *const u16).read_unaligned() as i32,
        )));
        let qx = _mm256_loadu_si256(block.add(2) as *const __m256i);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, mul_sum_i8_pairs(qx, qy), acc);
    }
    hsum(acc)
}

/// Signed bytes times signed bytes, summed in pairs of pairs to 8 f32 lanes. `maddubs`
/// takes unsigned times signed, so |x| (128 for -128 reads right as unsigned) times y
/// with x's sign. `y` must not hold -128 (negating it wraps); activations rounded as
/// llama.cpp rounds them stay within ±127.
#[target_feature(enable = "avx2")]
unsafe fn mul_sum_i8_pairs(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(
        _mm256_maddubs_epi16(ax, sy),
        _mm256_set1_epi16(1),
    ))
}

#[target_feature(enable = "avx2")]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
