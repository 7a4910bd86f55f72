//! x86-64 kernels (AVX2 + FMA), chosen at run time.

use std::arch::x86_64::*;

use super::{
    Q8Row, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q4_K_BLOCK_BYTES, Q5_0_BLOCK_BYTES,
    Q5_1_BLOCK_BYTES, Q5_K_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK, QK_K,
};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The f16 scale that opens a block, as f32. The load is written in assembly so that it
/// zeroes the vector register: from intrinsics, LLVM turns it into `vpinsrw` into whatever
/// register is at hand (in these loops the accumulator, whatever width we ask it to read),
/// which ties every block's scale to the previous block's sum and makes the whole loop one
/// dependency chain: decode ran at half llama.cpp's speed on the same instructions.
#[inline(always)]
pub(super) unsafe fn block_scale(block: *const u8) -> f32 {
    let bits: __m128i;
    // Safety: every block starts with its f16 scale and has at least 4 bytes.
    std::arch::asm!(
        "vmovd {bits}, dword ptr [{p}]",
        p = in(reg) block,
        bits = out(xmm_reg) bits,
        options(pure, readonly, nostack, preserves_flags)
    );
    _mm_cvtss_f32(_mm_cvtph_ps(bits))
}

/// The f16 scale and minimum that open a Q4_1/Q5_1 block, as f32, in one conversion (a
/// 32-bit load zeroes the register, so no false dependency as in `block_scale`).
#[inline(always)]
pub(super) unsafe fn block_scale_min(block: *const u8) -> (f32, f32) {
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
    (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
}

pub(super) fn vec_dot_q4_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX2, FMA, F16C.
    unsafe { vec_dot_q4_0_q8_0_avx2(w, act) }
}

/// The 32 signed values of a Q4_0 block (nibble - 8), low nibbles first.
#[inline(always)]
pub(super) unsafe fn q4_0_block(block: *const u8) -> __m256i {
    let low_mask = _mm_set1_epi8(0x0f);
    let packed = _mm_loadu_si128(block.add(2) as *const __m128i);
    let lo = _mm_and_si128(packed, low_mask);
    let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
    _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
}

/// llama.cpp's AVX2 loop: nibbles minus 8 as signed bytes times the activation bytes, as
/// 8 lanes of int sums scaled by `d_x d_y` into an f32 accumulator.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_q4_0_q8_0_avx2(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q4_0_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_0_BLOCK_BYTES);
        let d = block_scale(block);
        let qx = q4_0_block(block);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, mul_sum_i8_pairs(qx, qy), acc);
    }
    hsum(acc)
}

pub(super) fn vec_dot_q5_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX2, FMA, F16C.
    unsafe { vec_dot_q5_1_q8_1_avx2(w, act) }
}

/// The 32 unsigned 5-bit values of a Q5_1 block (nibble plus high bit).
#[inline(always)]
pub(super) unsafe fn q5_1_block(block: *const u8) -> __m256i {
    let low_mask = _mm_set1_epi8(0x0f);
    // Spreads bit i of a u32 onto byte i (as 0xFF / 0x00).
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let qh = (block.add(4) as *const i32).read_unaligned();
    let packed = _mm_loadu_si128(block.add(8) as *const __m128i);
    let lo = _mm_and_si128(packed, low_mask);
    let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
    let bits = _mm256_cmpeq_epi8(
        _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh), shuf), bit_mask),
        _mm256_set1_epi64x(-1),
    );
    _mm256_or_si256(
        _mm256_set_m128i(hi, lo),
        _mm256_and_si256(bits, _mm256_set1_epi8(0x10)),
    )
}

/// llama.cpp's AVX2 loop: the unsigned 5-bit values times the activation bytes, as 8
/// lanes of int sums scaled by `d_x d_y` into an f32 accumulator; `m_x s_y` on the side.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_q5_1_q8_1_avx2(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q5_1_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.s.len() >= nb && act.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_1_BLOCK_BYTES);
        let (d, m) = block_scale_min(block);
        summs += m * *act.s.get_unchecked(b);
        let qx = q5_1_block(block);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones));
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, sums, acc);
    }
    hsum(acc) + summs
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
        let (d, m) = block_scale_min(block);
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
        let d = block_scale(block);
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
        let d = block_scale(block);
        let qx = _mm256_loadu_si256(block.add(2) as *const __m256i);
        let qy = _mm256_loadu_si256(act.qs.as_ptr().add(b * QK) as *const __m256i);
        let dd = _mm256_set1_ps(d * *act.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, mul_sum_i8_pairs(qx, qy), acc);
    }
    hsum(acc)
}

pub(super) fn vec_dot_q4_k_q8_k(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX2, FMA, F16C.
    unsafe { vec_dot_q4_k_q8_k_avx2(w, act) }
}

/// The 8 scales then the 8 minimums of a Q4_K super-block as bytes, unpacked from their
/// 12 bytes of 6-bit fields with llama.cpp's masks.
#[inline(always)]
pub(super) unsafe fn q4_k_scales_mins(p: *const u8) -> __m128i {
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
    _mm_set_epi32(
        mins_hi as i32,
        mins_lo as i32,
        scales_hi as i32,
        scales_lo as i32,
    )
}

/// llama.cpp's AVX2 loop: per super-block, nibbles times activation bytes (`maddubs`),
/// times the 16-bit sub-block scale (`madd`), summed as 8 lanes of i32 and scaled by
/// `d_x d_y` into an f32 accumulator; the minimums' term from the activation 16-sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_q4_k_q8_k_avx2(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q4_K_BLOCK_BYTES;
    debug_assert!(
        act.d.len() >= nb && act.qs.len() >= nb * QK_K && act.bsums.len() >= nb * QK_K / 16
    );
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_K_BLOCK_BYTES);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let dy = *act.d.get_unchecked(b);
        let d = dy * _mm_cvtss_f32(dm);
        let dmin = -dy * _mm_cvtss_f32(_mm_movehdup_ps(dm));
        // 16 lanes of i16: the 8 scales, then the 8 minimums.
        let mins_and_scales = _mm256_cvtepu8_epi16(q4_k_scales_mins(block.add(4)));
        let q8sums = _mm256_loadu_si256(act.bsums.as_ptr().add(b * QK_K / 16) as *const __m256i);
        // Pairs of 16-sums: the activation sum of each sub-block of 32.
        let q8s = _mm_hadd_epi16(
            _mm256_castsi256_si128(q8sums),
            _mm256_extracti128_si256(q8sums, 1),
        );
        let prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
        let sc128 = _mm256_castsi256_si128(mins_and_scales);
        let scales = _mm256_set_m128i(sc128, sc128);
        let q4 = block.add(16);
        let q8 = act.qs.as_ptr().add(b * QK_K);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..QK_K / 64 {
            // Broadcast the i16 scale of sub-block 2j (then 2j + 1) to all lanes.
            let lo = (4 * j) as i16 | ((4 * j + 1) as i16) << 8;
            let hi = (4 * j + 2) as i16 | ((4 * j + 3) as i16) << 8;
            let scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(lo));
            let scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(hi));
            let q4bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
            let q4l = _mm256_and_si256(q4bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            let q8l = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
            let q8h = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
            let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
            let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let m = _mm_add_ss(m, _mm_movehdup_ps(m));
    hsum(acc) + _mm_cvtss_f32(m)
}

pub(super) fn vec_dot_q5_k_q8_k(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `vec_dot_fn` after `available()` confirmed AVX2, FMA, F16C.
    unsafe { vec_dot_q5_k_q8_k_avx2(w, act) }
}

/// The minimums' term of a Q4_K/Q5_K super-block as llama.cpp's Q5_K loop forms it: the
/// i32 sum of `m_j` times the sub-block activation sums.
#[inline(always)]
unsafe fn k_min_sum(mins_and_scales: __m256i, bsums: *const i16) -> i32 {
    let q8sums = _mm256_loadu_si256(bsums as *const __m256i);
    let q8s = _mm_hadd_epi16(
        _mm256_castsi256_si128(q8sums),
        _mm256_extracti128_si256(q8sums, 1),
    );
    let prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
    let zero = _mm_setzero_si128();
    _mm_cvtsi128_si32(_mm_hadd_epi32(_mm_hadd_epi32(prod, zero), zero))
}

/// The 5-bit values of sub-blocks `2j` (low nibbles) and `2j + 1` (high nibbles) of a
/// Q5_K super-block: nibbles plus the high bits `2j` and `2j + 1` of `qh`.
#[inline(always)]
unsafe fn q5_k_pair(block: *const u8, hbits: __m256i, j: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0f);
    let q5bits = _mm256_loadu_si256(block.add(48 + 32 * j) as *const __m256i);
    let bit0 = _mm256_and_si256(hbits, _mm256_set1_epi8(1 << (2 * j)));
    let bit1 = _mm256_and_si256(hbits, _mm256_set1_epi8((1u8 << (2 * j + 1)) as i8));
    // Each masked bit moved to bit 4 of its byte (16-bit shifts stay within the byte).
    let h0 = _mm256_slli_epi16(_mm256_srl_epi16(bit0, _mm_cvtsi32_si128(2 * j as i32)), 4);
    let h1 = _mm256_slli_epi16(
        _mm256_srl_epi16(bit1, _mm_cvtsi32_si128(2 * j as i32 + 1)),
        4,
    );
    (
        _mm256_add_epi8(_mm256_and_si256(q5bits, m4), h0),
        _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(q5bits, 4), m4), h1),
    )
}

/// llama.cpp's AVX2 loop: as Q4_K with the high bits added to the nibbles, and the
/// minimums' term summed as an integer per super-block and added on the side in f32.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vec_dot_q5_k_q8_k_avx2(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q5_K_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK_K && act.bsums.len() >= nb * 16);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_K_BLOCK_BYTES);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let dy = *act.d.get_unchecked(b);
        let d = dy * _mm_cvtss_f32(dm);
        let dmin = -dy * _mm_cvtss_f32(_mm_movehdup_ps(dm));
        let mins_and_scales = _mm256_cvtepu8_epi16(q4_k_scales_mins(block.add(4)));
        summs += dmin * k_min_sum(mins_and_scales, act.bsums.as_ptr().add(b * 16)) as f32;
        let sc128 = _mm256_castsi256_si128(mins_and_scales);
        let scales = _mm256_set_m128i(sc128, sc128);
        let hbits = _mm256_loadu_si256(block.add(16) as *const __m256i);
        let q8 = act.qs.as_ptr().add(b * QK_K);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..QK_K / 64 {
            let lo = (4 * j) as i16 | ((4 * j + 1) as i16) << 8;
            let hi = (4 * j + 2) as i16 | ((4 * j + 3) as i16) << 8;
            let scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(lo));
            let scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(hi));
            let (q5l, q5h) = q5_k_pair(block, hbits, j);
            let q8l = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
            let q8h = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
            let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q5l, q8l));
            let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q5h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc) + summs
}

/// `scalar::q6_k_lane_totals` on AVX2: llama.cpp's loop, integers only (the float step
/// is in kquant.rs, the same on every CPU).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q6_k_lane_totals(block: &[u8], q8: &[i8], bsums: &[i16]) -> [i32; 8] {
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(3);
    let block = block.as_ptr();
    let scales = _mm_loadu_si128(block.add(192) as *const __m128i);
    // 32 × (bsums[2n]·sc[2n] + bsums[2n+1]·sc[2n+1]) in lane n.
    let q8sums = _mm256_loadu_si256(bsums.as_ptr() as *const __m256i);
    let q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, _mm256_cvtepi8_epi16(scales)), 5);
    let q8 = q8.as_ptr();
    let mut sumi = _mm256_setzero_si256();
    for j in 0..QK_K / 128 {
        let ql = block.add(64 * j);
        let qh = block.add(128 + 32 * j);
        let q8 = q8.add(128 * j);
        let q4bits1 = _mm256_loadu_si256(ql as *const __m256i);
        let q4bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
        let q4bits_h = _mm256_loadu_si256(qh as *const __m256i);
        let q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, m2), 4);
        let q4h_1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 2), m2), 4);
        let q4h_2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 4), m2), 4);
        let q4h_3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 6), m2), 4);
        let q6 = [
            _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0),
            _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m4), q4h_2),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m4), q4h_3),
        ];
        for (k, &q6k) in q6.iter().enumerate() {
            let q8k = _mm256_loadu_si256(q8.add(32 * k) as *const __m256i);
            let p16 = _mm256_maddubs_epi16(q6k, q8k);
            // Scales 8j + 2k (first 16 values) and 8j + 2k + 1 (next 16) as i16.
            let s = (8 * j + 2 * k) as i64;
            let shuf = _mm_set_epi64x((s + 1) * 0x0101010101010101, s * 0x0101010101010101);
            let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuf));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, p16));
        }
    }
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(
        lanes.as_mut_ptr() as *mut __m256i,
        _mm256_sub_epi32(sumi, q8sclsub),
    );
    lanes
}

/// `scalar::q4_k_pair_totals` on AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q4_k_pair_totals(
    block: &[u8],
    q8: &[i8],
    bsums: &[i16],
) -> ([i32; 4], [i32; 4]) {
    let m4 = _mm256_set1_epi8(0x0f);
    let block = block.as_ptr();
    // 16 lanes of i16: the 8 scales, then the 8 minimums.
    let mins_and_scales = _mm256_cvtepu8_epi16(q4_k_scales_mins(block.add(4)));
    let q8sums = _mm256_loadu_si256(bsums.as_ptr() as *const __m256i);
    // Pairs of 16-sums: the activation sum of each sub-block of 32.
    let q8s = _mm_hadd_epi16(
        _mm256_castsi256_si128(q8sums),
        _mm256_extracti128_si256(q8sums, 1),
    );
    let mut mins = [0i32; 4];
    _mm_storeu_si128(
        mins.as_mut_ptr() as *mut __m128i,
        _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s),
    );
    let sc128 = _mm256_castsi256_si128(mins_and_scales);
    let scales = _mm256_set_m128i(sc128, sc128);
    let q4 = block.add(16);
    let q8 = q8.as_ptr();
    let mut sums = [0i32; 4];
    for (j, sum) in sums.iter_mut().enumerate() {
        let lo = (4 * j) as i16 | ((4 * j + 1) as i16) << 8;
        let hi = (4 * j + 2) as i16 | ((4 * j + 3) as i16) << 8;
        let scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(lo));
        let scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(hi));
        let q4bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
        let q4l = _mm256_and_si256(q4bits, m4);
        let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
        let q8l = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
        let q8h = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
        let p = _mm256_add_epi32(
            _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l)),
            _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h)),
        );
        let p = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        let p = _mm_add_epi32(p, _mm_unpackhi_epi64(p, p));
        let p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0b01));
        *sum = _mm_cvtsi128_si32(p);
    }
    (sums, mins)
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
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

// Tiles: one weight row times up to `TILE` activation rows at once. Each weight block is
// unpacked once and multiplied against every activation row of the tile; every pair keeps
// its own accumulators and runs exactly the operations of the single-row kernel above, in
// the same order, so each result is bit for bit that kernel's (integer sums are exact, so
// only the order of the f32 operations matters, and that is unchanged).

/// Activation rows per tile.
pub(super) const TILE: usize = 4;

/// Runs `tile::<N>` on `acts.len()` rows (at most `TILE`), or the single-row kernel for
/// one.
macro_rules! dots_many {
    ($name:ident, $tile:ident, $single:ident) => {
        pub(super) fn $name(w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
            assert!(acts.len() == out.len() && acts.len() <= TILE);
            // Safety: only selected by `multi_dot_fn` after `available()` confirmed AVX2,
            // FMA, F16C; the tile kernels check the activation rows' lengths.
            unsafe {
                match acts.len() {
                    4 => $tile::<4>(w, acts, out),
                    3 => $tile::<3>(w, acts, out),
                    2 => $tile::<2>(w, acts, out),
                    1 => out[0] = $single(w, &acts[0]),
                    _ => {}
                }
            }
        }
    };
}

dots_many!(dots_q4_0_q8_0, tile_q4_0_q8_0, vec_dot_q4_0_q8_0_avx2);
dots_many!(dots_q4_1_q8_1, tile_q4_1_q8_1, vec_dot_q4_1_q8_1_avx2);
dots_many!(dots_q5_1_q8_1, tile_q5_1_q8_1, vec_dot_q5_1_q8_1_avx2);
dots_many!(dots_q5_0_q8_0, tile_q5_0_q8_0, vec_dot_q5_0_q8_0_avx2);
dots_many!(dots_q8_0_q8_0, tile_q8_0_q8_0, vec_dot_q8_0_q8_0_avx2);
dots_many!(dots_q5_k_q8_k, tile_q5_k_q8_k, vec_dot_q5_k_q8_k_avx2);

/// The activation rows' quantized bytes and scales, checked long enough for `nb` blocks
/// of `block` elements (and `bsums` for the k-quants).
#[inline(always)]
fn act_ptrs<const N: usize>(
    acts: &[Q8Row],
    nb: usize,
    block: usize,
) -> ([*const i8; N], [*const f32; N]) {
    assert!(acts.len() == N);
    for a in acts {
        assert!(a.d.len() >= nb && a.qs.len() >= nb * block);
    }
    (
        std::array::from_fn(|i| acts[i].qs.as_ptr()),
        std::array::from_fn(|i| acts[i].d.as_ptr()),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4_0_q8_0<const N: usize>(w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    let nb = w.len() / Q4_0_BLOCK_BYTES;
    let (qy, dy) = act_ptrs::<N>(acts, nb, QK);
    let mut acc = [_mm256_setzero_ps(); N];
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_0_BLOCK_BYTES);
        let d = block_scale(block);
        let qx = q4_0_block(block);
        let ax = _mm256_sign_epi8(qx, qx);
        for i in 0..N {
            let q = _mm256_loadu_si256(qy[i].add(b * QK) as *const __m256i);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                _mm256_maddubs_epi16(ax, _mm256_sign_epi8(q, qx)),
                ones,
            ));
            let dd = _mm256_set1_ps(d * *dy[i].add(b));
            acc[i] = _mm256_fmadd_ps(dd, sums, acc[i]);
        }
    }
    for i in 0..N {
        out[i] = hsum(acc[i]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q5_1_q8_1<const N: usize>(w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    let nb = w.len() / Q5_1_BLOCK_BYTES;
    let (qy, dy) = act_ptrs::<N>(acts, nb, QK);
    for a in acts {
        assert!(a.s.len() >= nb);
    }
    let sy: [*const f32; N] = std::array::from_fn(|i| acts[i].s.as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summs = [0f32; N];
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_1_BLOCK_BYTES);
        let (d, m) = block_scale_min(block);
        let qx = q5_1_block(block);
        for i in 0..N {
            summs[i] += m * *sy[i].add(b);
            let q = _mm256_loadu_si256(qy[i].add(b * QK) as *const __m256i);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qx, q), ones));
            let dd = _mm256_set1_ps(d * *dy[i].add(b));
            acc[i] = _mm256_fmadd_ps(dd, sums, acc[i]);
        }
    }
    for i in 0..N {
        out[i] = hsum(acc[i]) + summs[i];
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4_1_q8_1<const N: usize>(w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    let nb = w.len() / Q4_1_BLOCK_BYTES;
    let (qy, dy) = act_ptrs::<N>(acts, nb, QK);
    for a in acts {
        assert!(a.s.len() >= nb);
    }
    let sy: [*const f32; N] = std::array::from_fn(|i| acts[i].s.as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summs = [0f32; N];
    let low_mask = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_1_BLOCK_BYTES);
        let (d, m) = block_scale_min(block);
        let packed = _mm_loadu_si128(block.add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low_mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
        let qx = _mm256_set_m128i(hi, lo);
        for i in 0..N {
            summs[i] += m * *sy[i].add(b);
            let q = _mm256_loadu_si256(qy[i].add(b * QK) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(qx, q);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            let dd = _mm256_set1_ps(d * *dy[i].add(b));
            acc[i] = _mm256_fmadd_ps(dd, sums, acc[i]);
        }
    }
    for i in 0..N {
        out[i] = hsum(acc[i]) + summs[i];
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q5_0_q8_0<const N: usize>(w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    let nb = w.len() / Q5_0_BLOCK_BYTES;
    let (qy, dy) = act_ptrs::<N>(acts, nb, QK);
    let mut acc = [_mm256_setzero_ps(); N];
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
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_0_BLOCK_BYTES);
        let d = block_scale(block);
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
        let ax = _mm256_sign_epi8(qx, qx);
        for i in 0..N {
            let q = _mm256_loadu_si256(qy[i].add(b * QK) as *const __m256i);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                _mm256_maddubs_epi16(ax, _mm256_sign_epi8(q, qx)),
                ones,
            ));
            let dd = _mm256_set1_ps(d * *dy[i].add(b));
            acc[i] = _mm256_fmadd_ps(dd, sums, acc[i]);
        }
    }
    for i in 0..N {
        out[i] = hsum(acc[i]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q8_0_q8_0<const N: usize>(w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    let nb = w.len() / Q8_0_BLOCK_BYTES;
    let (qy, dy) = act_ptrs::<N>(acts, nb, QK);
    let mut acc = [_mm256_setzero_ps(); N];
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q8_0_BLOCK_BYTES);
        let d = block_scale(block);
        let qx = _mm256_loadu_si256(block.add(2) as *const __m256i);
        let ax = _mm256_sign_epi8(qx, qx);
        for i in 0..N {
            let q = _mm256_loadu_si256(qy[i].add(b * QK) as *const __m256i);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                _mm256_maddubs_epi16(ax, _mm256_sign_epi8(q, qx)),
                ones,
            ));
            let dd = _mm256_set1_ps(d * *dy[i].add(b));
            acc[i] = _mm256_fmadd_ps(dd, sums, acc[i]);
        }
    }
    for i in 0..N {
        out[i] = hsum(acc[i]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q5_k_q8_k<const N: usize>(w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    let nb = w.len() / Q5_K_BLOCK_BYTES;
    let (qy, dy) = act_ptrs::<N>(acts, nb, QK_K);
    for a in acts {
        assert!(a.bsums.len() >= nb * QK_K / 16);
    }
    let bs: [*const i16; N] = std::array::from_fn(|i| acts[i].bsums.as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summs = [0f32; N];
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_K_BLOCK_BYTES);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let dx = _mm_cvtss_f32(dm);
        let dminx = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        let mins_and_scales = _mm256_cvtepu8_epi16(q4_k_scales_mins(block.add(4)));
        for i in 0..N {
            let dmin = -*dy[i].add(b) * dminx;
            summs[i] += dmin * k_min_sum(mins_and_scales, bs[i].add(b * 16)) as f32;
        }
        let sc128 = _mm256_castsi256_si128(mins_and_scales);
        let scales = _mm256_set_m128i(sc128, sc128);
        let hbits = _mm256_loadu_si256(block.add(16) as *const __m256i);
        let mut sumi = [_mm256_setzero_si256(); N];
        for j in 0..QK_K / 64 {
            let lo = (4 * j) as i16 | ((4 * j + 1) as i16) << 8;
            let hi = (4 * j + 2) as i16 | ((4 * j + 3) as i16) << 8;
            let scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(lo));
            let scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(hi));
            let (q5l, q5h) = q5_k_pair(block, hbits, j);
            for i in 0..N {
                let q8 = qy[i].add(b * QK_K + 64 * j);
                let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q5l, q8l));
                let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q5h, q8h));
                sumi[i] = _mm256_add_epi32(sumi[i], _mm256_add_epi32(p16l, p16h));
            }
        }
        for i in 0..N {
            let d = *dy[i].add(b) * dx;
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[i]), acc[i]);
        }
    }
    for i in 0..N {
        out[i] = hsum(acc[i]) + summs[i];
    }
}

/// `super::round_to_i8`, 32 values at a time: the same products, rounded to nearest even
/// (`_mm256_round_ps`), kept within -128..=127 and NaN made 0 as the scalar cast does,
/// then packed to bytes. `block` and `qs` are whole multiples of 32.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn round_to_i8(block: &[f32], scale: f32, qs: &mut [i8]) {
    let scale = _mm256_set1_ps(scale);
    let (low, high) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    for (x, q) in block.chunks_exact(32).zip(qs.chunks_exact_mut(32)) {
        let mut ints = [_mm256_setzero_si256(); 4];
        for (i, int) in ints.iter_mut().enumerate() {
            let v = _mm256_mul_ps(scale, _mm256_loadu_ps(x.as_ptr().add(i * 8)));
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            // `min_ps(r, high)` would give 127 for NaN: these keep NaN, zeroed next.
            let r = _mm256_max_ps(low, _mm256_min_ps(high, r));
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
            *int = _mm256_cvtps_epi32(r);
        }
        // Packing works within 128-bit halves: [0 1 2 3 | 4 5 6 7] of each group of four
        // come out as 0-3 of every register, then 4-7; put them back in order.
        let words01 = _mm256_packs_epi32(ints[0], ints[1]);
        let words23 = _mm256_packs_epi32(ints[2], ints[3]);
        let bytes = _mm256_packs_epi16(words01, words23);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
    }
}
