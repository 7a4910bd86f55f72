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
    kquant, Q8Row, Q8Tile, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q4_K_BLOCK_BYTES, Q5_0_BLOCK_BYTES,
    Q5_1_BLOCK_BYTES, Q5_K_BLOCK_BYTES, Q6_K_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK, QK_K,
};

/// Activation rows per tile (two per register): at most 16, and a short last tile is
/// padded to a whole register, an even count (`Q8Tile::rows_for`).
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

/// How far ahead of the block it works on a single-row kernel asks for weights. A decode
/// step reads every weight once, and on the Intel Xeon the hardware alone kept the loads
/// waiting: Qwen2.5-Coder-1.5B decoded 6.3 tok/s without, 10.1–10.8 with
/// (docs/PERFORMANCE.md).
const PREFETCH_AHEAD: usize = 1024;

/// Asks for the `lines` cache lines `PREFETCH_AHEAD` bytes past `block` (past the end of
/// the weights it asks for nothing that matters: a prefetch never faults).
#[inline(always)]
unsafe fn prefetch_ahead(block: *const u8, lines: usize) {
    for line in 0..lines {
        let at = block.wrapping_add(PREFETCH_AHEAD + 64 * line);
        _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
    }
}

/// Q4_K single row in llama.cpp's repacked-GEMV order (`Order::Q4kBlocks`, a decode
/// step's): per super-block `acc = fma(sum, d_w·d_a, acc)` and `acc_min = fma(min_sum,
/// dmin_w·d_a, acc_min)`, the result `acc - acc_min` — `kquant::q4k_blocks` bit for bit
/// (tested), with a pair of sub-blocks (64 nibbles) per zmm register.
pub(super) fn vec_dot_q4_k_blocks(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `kquant::dot_for` after `available()`.
    unsafe { vec_dot_q4_k_avx512::<false>(w, act) }
}

/// The same in the repacked-GEMM order (`Order::Q4kPairs`): the float steps per pair of
/// sub-blocks (`kquant::q4k_pairs` bit for bit).
pub(super) fn vec_dot_q4_k_pairs(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: as above.
    unsafe { vec_dot_q4_k_avx512::<true>(w, act) }
}

/// The i16 lane indices that spread sub-block `2p`'s scale over lanes 0..16 and `2p + 1`'s
/// over 16..32 (`vpermw`).
#[target_feature(enable = "avx2,avx512f")]
#[inline]
unsafe fn pair_scale_index(p: i16) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(2 * p)),
        _mm256_set1_epi16(2 * p + 1),
    )
}

/// Per pair of sub-blocks: the packed bytes' low nibbles (sub-block `2p`) and high nibbles
/// (`2p + 1`) side by side in one zmm, times the 64 activation bytes (`maddubs`: at most
/// 2 · 15 · 128 in 16 bits, no saturation), times each sub-block's 6-bit scale (`madd`,
/// exact in 32 bits). The integer sums are exact, so their grouping is free; the float
/// steps are `kquant::q4k_repacked`'s.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn vec_dot_q4_k_avx512<const PAIRS: bool>(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q4_K_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK_K && act.bsums.len() >= nb * 16);
    let low = _mm512_set1_epi8(0x0f);
    // The upper half of a register shifted down by 4: the high nibbles.
    let shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    let scale_indices = [
        pair_scale_index(0),
        pair_scale_index(1),
        pair_scale_index(2),
        pair_scale_index(3),
    ];
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q4_K_BLOCK_BYTES);
        prefetch_ahead(block, 3);
        // `d` and `dmin` (F16C: the same conversion as `kquant::f16_bits_to_f32`).
        let d_dmin = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(d_dmin) * act.d[b];
        let dmin = _mm_cvtss_f32(_mm_movehdup_ps(d_dmin)) * act.d[b];
        // 16 lanes of i16: the 8 scales, then the 8 minimums.
        let scales_mins = _mm256_cvtepu8_epi16(super::x86::q4_k_scales_mins(block.add(4)));
        let scales = _mm512_castsi256_si512(scales_mins);
        // Each sub-block's activation sum (pairs of 16-sums), times its minimum, in pairs.
        let bsums = _mm256_loadu_si256(act.bsums.as_ptr().add(b * 16) as *const __m256i);
        let sub_sums = _mm_hadd_epi16(
            _mm256_castsi256_si128(bsums),
            _mm256_extracti128_si256::<1>(bsums),
        );
        let mins = _mm_madd_epi16(_mm256_extracti128_si256::<1>(scales_mins), sub_sums);
        let q8 = act.qs.as_ptr().add(b * QK_K);
        let mut total = _mm512_setzero_si512();
        for (p, index) in scale_indices.iter().enumerate() {
            let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                block.add(16 + 32 * p) as *const __m256i
            ));
            let nibbles = _mm512_and_si512(_mm512_srlv_epi64(packed, shifts), low);
            let a = _mm512_loadu_si512(q8.add(64 * p) as *const _);
            let sums = _mm512_madd_epi16(
                _mm512_maddubs_epi16(nibbles, a),
                _mm512_permutexvar_epi16(*index, scales),
            );
            if PAIRS {
                let min = match p {
                    0 => _mm_extract_epi32::<0>(mins),
                    1 => _mm_extract_epi32::<1>(mins),
                    2 => _mm_extract_epi32::<2>(mins),
                    _ => _mm_extract_epi32::<3>(mins),
                };
                acc = (_mm512_reduce_add_epi32(sums) as f32).mul_add(d, acc);
                acc_min = (min as f32).mul_add(dmin, acc_min);
            } else {
                total = _mm512_add_epi32(total, sums);
            }
        }
        if !PAIRS {
            let min = _mm_add_epi32(mins, _mm_unpackhi_epi64(mins, mins));
            let min = _mm_cvtsi128_si32(_mm_add_epi32(min, _mm_shuffle_epi32::<0b01>(min)));
            acc = (_mm512_reduce_add_epi32(total) as f32).mul_add(d, acc);
            acc_min = (min as f32).mul_add(dmin, acc_min);
        }
    }
    acc - acc_min
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

/// A Q5_0 block's 32 signed values (-16..=15): the 32 high bits as a mask register, the
/// nibble - 16 (the nibble with 0xF0 set) where a bit is clear, else the nibble.
#[inline(always)]
unsafe fn q5_0_values(block: *const u8) -> __m256i {
    let high_bits: __mmask32 = (block.add(2) as *const u32).read_unaligned();
    let low = nibbles(block.add(6));
    _mm256_mask_blend_epi8(
        high_bits,
        _mm256_or_si256(low, _mm256_set1_epi8(0xf0u8 as i8)),
        low,
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
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_0_BLOCK_BYTES);
        prefetch_ahead(block, 1);
        let d = super::x86::block_scale(block);
        let qx = q5_0_values(block);
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
        prefetch_ahead(block, 1);
        let (d, m) = super::x86::block_scale_min(block);
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
        prefetch_ahead(block, 1);
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
                // AVX-512 F/BW/DQ/VL/VNNI (and AVX2, FMA, F16C); the kernel checks the
                // tile's sizes.
                unsafe {
                    match t.rows {
                        16 => $tile::<8>(row, t, out),
                        14 => $tile::<7>(row, t, out),
                        12 => $tile::<6>(row, t, out),
                        10 => $tile::<5>(row, t, out),
                        8 => $tile::<4>(row, t, out),
                        6 => $tile::<3>(row, t, out),
                        4 => $tile::<2>(row, t, out),
                        2 => $tile::<1>(row, t, out),
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
        prefetch_ahead(block, 1);
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
        prefetch_ahead(block, 1);
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

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn tile_q5_0_q8_0_avx512<const P: usize>(w: &[u8], t: &Q8Tile, out: &mut [f32]) {
    let nb = w.len() / Q5_0_BLOCK_BYTES;
    check::<P>(t, nb, out, false);
    let spread = pair_spread::<P>();
    let mut acc = [_mm512_setzero_ps(); P];
    for b in 0..nb {
        let block = w.as_ptr().add(b * Q5_0_BLOCK_BYTES);
        prefetch_ahead(block, 1);
        let d = super::x86::block_scale(block);
        // The single-row kernel's unpacking.
        signed_block::<P>(q5_0_values(block), d, t, b, &spread, &mut acc);
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
        prefetch_ahead(block, 1);
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
        prefetch_ahead(block, 1);
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
        prefetch_ahead(block, 3);
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

// K-quant tiles (prompts): one weight row against up to 16 activation rows, each row's
// float state in one lane of a zmm register. llama.cpp turns the k-quants' integer sums
// into floats per (weight row, activation row) pair in an order that depends on the shape
// of the product (kquant.rs); each lane here runs exactly that pair's float steps in that
// order (Q4_K "pairs", Q6_K "tiled"), so every result is bit for bit the pairwise one. The
// integer sums are exact whatever their grouping: per row, `vpdpbusd` sums 4 products to
// a lane, lanes are scaled by their sub-block's scale, and `row_totals` adds each row's 16
// lanes, for 16 rows at once.

/// Activation rows per k-quant tile (one per f32 lane of a zmm register).
pub(super) const KQ_TILE: usize = 16;

/// Up to 16 Q8_K activation rows, with their per-super-block scales and 16-element sums
/// laid out across rows so a tile's lanes load them at once.
pub(super) struct KTile<'a> {
    qs: [&'a [i8]; KQ_TILE],
    /// Each row's own 16-element sums (`Q8Row::bsums`), for the orders that need them
    /// per row.
    row_bsums: [&'a [i16]; KQ_TILE],
    /// Rows in the tile; the lanes past it hold copies of row 0 and are not stored.
    pub(super) n: usize,
    /// `d[b * 16 + r]`: row r's scale of super-block b.
    d: Vec<f32>,
    /// `bsums[(b * 16 + j) * 16 + r]`: row r's sum of elements `16j..16j+16` of block b.
    bsums: Vec<i32>,
}

impl<'a> KTile<'a> {
    pub(super) fn new(rows: &[&'a Q8Row]) -> Self {
        assert!(!rows.is_empty() && rows.len() <= KQ_TILE);
        let nb = rows[0].d.len();
        let row = |r: usize| if r < rows.len() { rows[r] } else { rows[0] };
        let mut t = KTile {
            qs: std::array::from_fn(|r| row(r).qs.as_slice()),
            row_bsums: std::array::from_fn(|r| row(r).bsums.as_slice()),
            n: rows.len(),
            d: vec![0.0; nb * KQ_TILE],
            bsums: vec![0; nb * 16 * KQ_TILE],
        };
        for r in 0..KQ_TILE {
            let src = row(r);
            assert!(src.d.len() == nb && src.qs.len() == nb * QK_K && src.bsums.len() == nb * 16);
            for b in 0..nb {
                t.d[b * KQ_TILE + r] = src.d[b];
                for j in 0..16 {
                    t.bsums[(b * 16 + j) * KQ_TILE + r] = src.bsums[b * 16 + j] as i32;
                }
            }
        }
        t
    }
}

/// `out[r]` = the sum of the 16 lanes of `v[r]`, for 16 vectors at once (a transposing
/// tree of adds: exact, as all of it is integer). Plain functions, not closures: a closure
/// does not inherit the target features, and its intrinsics become calls.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_totals(v: &[__m512i; KQ_TILE]) -> __m512i {
    let w01 = chunk_halves(row_quad(v, 0), row_quad(v, 4));
    let w23 = chunk_halves(row_quad(v, 8), row_quad(v, 12));
    chunk_halves(w01, w23)
}

/// Rows `a..a+4`: per 128-bit chunk, the four rows' sums of that chunk side by side.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_quad(v: &[__m512i; KQ_TILE], a: usize) -> __m512i {
    let t01 = _mm512_add_epi32(
        _mm512_unpacklo_epi32(v[a], v[a + 1]),
        _mm512_unpackhi_epi32(v[a], v[a + 1]),
    );
    let t23 = _mm512_add_epi32(
        _mm512_unpacklo_epi32(v[a + 2], v[a + 3]),
        _mm512_unpackhi_epi32(v[a + 2], v[a + 3]),
    );
    _mm512_add_epi32(
        _mm512_unpacklo_epi64(t01, t23),
        _mm512_unpackhi_epi64(t01, t23),
    )
}

/// Chunks (0 and 2 of x, 0 and 2 of y) plus chunks (1 and 3 of x, 1 and 3 of y).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn chunk_halves(x: __m512i, y: __m512i) -> __m512i {
    _mm512_add_epi32(
        _mm512_shuffle_i32x4::<0b10_00_10_00>(x, y),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(x, y),
    )
}

/// Q4_K weight row times a tile in llama.cpp's repacked-GEMM order (`Order::Q4kPairs`):
/// per pair of sub-blocks, `acc = fma(sum, d_w·d_a, acc)` and `acc_min = fma(min_sum,
/// dmin_w·d_a, acc_min)`; the result `acc - acc_min`.
pub(super) fn tile_q4_k_pairs(w: &[u8], t: &KTile, out: &mut [f32]) {
    // Safety: only selected after `available()`; the sizes are checked inside.
    unsafe { tile_q4_k_avx512::<true>(w, t, out) }
}

/// Q4_K weight row times a tile in llama.cpp's repacked-GEMV order (`Order::Q4kBlocks`,
/// a decode step's): the same per whole super-block. Several decode steps at once (a
/// verification pass, sessions batched) then share the weights' unpacking.
pub(super) fn tile_q4_k_blocks(w: &[u8], t: &KTile, out: &mut [f32]) {
    // Safety: as above.
    unsafe { tile_q4_k_avx512::<false>(w, t, out) }
}

/// Q6_K weight row times a tile in `ggml_vec_dot_q6_K_q8_K`'s order (`Order::Q6kLanes`, a
/// decode step's): each row's 8 lane totals accumulated apart, added at the end as
/// `hsum_float_8` adds them.
pub(super) fn tile_q6_k_lanes(w: &[u8], t: &KTile, out: &mut [f32]) {
    // Safety: as above.
    unsafe { tile_q6_k_lanes_avx512(w, t, out) }
}

/// Q6_K weight row times a tile in llama.cpp's tiled order (`Order::Q6kTiled`): per
/// super-block `acc = fma(total·d_w, d_a, acc)`.
pub(super) fn tile_q6_k_tiled(w: &[u8], t: &KTile, out: &mut [f32]) {
    // Safety: as above.
    unsafe { tile_q6_k_tiled_avx512(w, t, out) }
}

/// `PAIRS`: the float step per pair of sub-blocks (`Q4kPairs`), else per super-block
/// (`Q4kBlocks`, the pair sums added first: exact, as they are integers).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn tile_q4_k_avx512<const PAIRS: bool>(w: &[u8], t: &KTile, out: &mut [f32]) {
    let nb = w.len() / Q4_K_BLOCK_BYTES;
    assert!(t.d.len() >= nb * KQ_TILE && out.len() >= t.n);
    assert!(t.qs.iter().all(|q| q.len() >= nb * QK_K));
    let mut acc = _mm512_setzero_ps();
    let mut acc_min = _mm512_setzero_ps();
    let low = _mm256_set1_epi8(0x0f);
    for b in 0..nb {
        let block = &w[b * Q4_K_BLOCK_BYTES..][..Q4_K_BLOCK_BYTES];
        prefetch_ahead(block.as_ptr(), 3);
        let da = _mm512_loadu_ps(t.d.as_ptr().add(b * KQ_TILE));
        let d = _mm512_mul_ps(
            _mm512_set1_ps(kquant::f16_bits_to_f32(u16::from_le_bytes([
                block[0], block[1],
            ]))),
            da,
        );
        let dmin = _mm512_mul_ps(
            _mm512_set1_ps(kquant::f16_bits_to_f32(u16::from_le_bytes([
                block[2], block[3],
            ]))),
            da,
        );
        let scales = &block[4..16];
        let zero = _mm512_setzero_si512();
        // Blocks: each row's lanes summed over the super-block (exact, as integers), then
        // added across lanes once.
        let mut block_lanes = [zero; KQ_TILE];
        let mut block_mins = zero;
        for p in 0..4 {
            let (sc0, m0) = super::scalar::scale_min_k4(2 * p, scales);
            let (sc1, m1) = super::scalar::scale_min_k4(2 * p + 1, scales);
            let packed = _mm256_loadu_si256(block.as_ptr().add(16 + 32 * p) as *const __m256i);
            let nibbles = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_and_si256(packed, low)),
                _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low),
            );
            let sc = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi32(sc0 as i32)),
                _mm256_set1_epi32(sc1 as i32),
            );
            let mut lanes = [zero; KQ_TILE];
            for r in 0..t.n {
                let a = _mm512_loadu_si512(t.qs[r].as_ptr().add(b * QK_K + 64 * p) as *const _);
                let scaled = _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, nibbles, a), sc);
                if PAIRS {
                    lanes[r] = scaled;
                } else {
                    block_lanes[r] = _mm512_add_epi32(block_lanes[r], scaled);
                }
            }
            let bsums = t.bsums.as_ptr().add(b * 16 * KQ_TILE);
            let bs = |j: usize| bsums.add(j * KQ_TILE) as *const __m512i;
            let (bs0, bs1) = (
                _mm512_loadu_si512(bs(4 * p) as *const _),
                _mm512_loadu_si512(bs(4 * p + 1) as *const _),
            );
            let (bs2, bs3) = (
                _mm512_loadu_si512(bs(4 * p + 2) as *const _),
                _mm512_loadu_si512(bs(4 * p + 3) as *const _),
            );
            let mins = _mm512_add_epi32(
                _mm512_mullo_epi32(_mm512_add_epi32(bs0, bs1), _mm512_set1_epi32(m0 as i32)),
                _mm512_mullo_epi32(_mm512_add_epi32(bs2, bs3), _mm512_set1_epi32(m1 as i32)),
            );
            if PAIRS {
                let sums = row_totals(&lanes);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, acc);
                acc_min = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins), dmin, acc_min);
            } else {
                block_mins = _mm512_add_epi32(block_mins, mins);
            }
        }
        if !PAIRS {
            let block_sums = row_totals(&block_lanes);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_sums), d, acc);
            acc_min = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_mins), dmin, acc_min);
        }
    }
    store_lanes(_mm512_sub_ps(acc, acc_min), t.n, out);
}

/// Weight rows per k-quant panel: one per f32 lane, as many as a work chunk has.
pub(super) const PANEL: usize = 16;

/// 16 weight rows times a tile's rows at once (`Order::Q4kPairs`): `out[j * KQ_TILE + r]`
/// is weight row `j` times tile row `r`, bit for bit `tile_q4_k_pairs`. Where a tile puts
/// a weight block's 64 values in the lanes of a register and must add 16 lanes per row
/// afterwards, a panel puts 16 weight rows in the lanes: each `vpdpbusd` adds 4 products
/// to each row's own sum, and the sums need no adding across lanes.
pub(super) fn panel_q4_k_pairs(rows: &[u8], row_bytes: usize, t: &KTile, out: &mut [f32]) {
    // Safety: only selected after `available()`; the sizes are checked inside.
    unsafe { panel_q4_k_avx512::<true>(rows, row_bytes, t, out) }
}

/// The same in the GEMV order (`Order::Q4kBlocks`), bit for bit `tile_q4_k_blocks`.
pub(super) fn panel_q4_k_blocks(rows: &[u8], row_bytes: usize, t: &KTile, out: &mut [f32]) {
    // Safety: as above.
    unsafe { panel_q4_k_avx512::<false>(rows, row_bytes, t, out) }
}

/// `PAIRS`: the float step per pair of sub-blocks, else per super-block (as in
/// `tile_q4_k_avx512`). Lane `j` of every register is weight row `j`: its nibbles four at
/// a time (`vpgatherdd` across the rows), its scales and minimums, its `d` and `dmin`;
/// each tile row's activation bytes are broadcast four at a time.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn panel_q4_k_avx512<const PAIRS: bool>(
    rows: &[u8],
    row_bytes: usize,
    t: &KTile,
    out: &mut [f32],
) {
    let (nb, lane, row_starts) = panel_setup(rows, row_bytes, Q4_K_BLOCK_BYTES, t, out);
    let zero = _mm512_setzero_si512();
    let low = _mm512_set1_epi8(0x0f);
    let sm_rows = _mm512_mullo_epi32(lane, _mm512_set1_epi32(16));
    let byte = _mm512_set1_epi32(0xff);
    let high_byte = _mm512_set1_epi32(0x00ff_0000);
    let mut acc = [_mm512_setzero_ps(); KQ_TILE];
    let mut acc_min = [_mm512_setzero_ps(); KQ_TILE];
    for b in 0..nb {
        let base = rows.as_ptr().add(b * Q4_K_BLOCK_BYTES);
        // Each row's `d`, `dmin` and unpacked scales and minimums, then across the rows.
        let mut d_dmin = [0i32; PANEL];
        let mut scales_mins = [[0u8; 16]; PANEL];
        for (j, (dd, sm)) in d_dmin.iter_mut().zip(&mut scales_mins).enumerate() {
            let block = base.add(j * row_bytes);
            *dd = (block as *const i32).read_unaligned();
            let unpacked = super::x86::q4_k_scales_mins(block.add(4));
            _mm_storeu_si128(sm.as_mut_ptr() as *mut __m128i, unpacked);
        }
        let dd = _mm512_loadu_si512(d_dmin.as_ptr() as *const _);
        let d_w = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
        let dmin_w = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
        // Dword k of every row's 16 bytes (scales 4k..4k+4; for k = 2, 3 minimums).
        let table = scales_mins.as_ptr() as *const i32;
        let sm0 = _mm512_i32gather_epi32::<1>(sm_rows, table);
        let sm1 =
            _mm512_i32gather_epi32::<1>(_mm512_add_epi32(sm_rows, _mm512_set1_epi32(4)), table);
        let sm2 =
            _mm512_i32gather_epi32::<1>(_mm512_add_epi32(sm_rows, _mm512_set1_epi32(8)), table);
        let sm3 =
            _mm512_i32gather_epi32::<1>(_mm512_add_epi32(sm_rows, _mm512_set1_epi32(12)), table);
        let scales = [
            _mm512_and_si512(sm0, byte),
            _mm512_and_si512(_mm512_srli_epi32::<8>(sm0), byte),
            _mm512_and_si512(_mm512_srli_epi32::<16>(sm0), byte),
            _mm512_srli_epi32::<24>(sm0),
            _mm512_and_si512(sm1, byte),
            _mm512_and_si512(_mm512_srli_epi32::<8>(sm1), byte),
            _mm512_and_si512(_mm512_srli_epi32::<16>(sm1), byte),
            _mm512_srli_epi32::<24>(sm1),
        ];
        // A pair's two minimums as the 16-bit halves of a lane: bytes 0, 1 or 2, 3.
        let mins = [
            _mm512_or_si512(
                _mm512_and_si512(sm2, byte),
                _mm512_and_si512(_mm512_slli_epi32::<8>(sm2), high_byte),
            ),
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32::<16>(sm2), byte),
                _mm512_and_si512(_mm512_srli_epi32::<8>(sm2), high_byte),
            ),
            _mm512_or_si512(
                _mm512_and_si512(sm3, byte),
                _mm512_and_si512(_mm512_slli_epi32::<8>(sm3), high_byte),
            ),
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32::<16>(sm3), byte),
                _mm512_and_si512(_mm512_srli_epi32::<8>(sm3), high_byte),
            ),
        ];
        let mut block_sums = [zero; KQ_TILE];
        let mut block_mins = [zero; KQ_TILE];
        for p in 0..4 {
            // Dword k of the pair's 32 packed bytes, in every row: its low nibbles are
            // elements 4k..4k+4 of sub-block 2p, its high nibbles those of 2p + 1.
            let mut lo = [zero; 8];
            let mut hi = [zero; 8];
            for k in 0..8 {
                let at =
                    _mm512_add_epi32(row_starts, _mm512_set1_epi32((16 + 32 * p + 4 * k) as i32));
                let packed = _mm512_i32gather_epi32::<1>(at, base as *const i32);
                lo[k] = _mm512_and_si512(packed, low);
                hi[k] = _mm512_and_si512(_mm512_srli_epi32::<4>(packed), low);
            }
            for r in 0..t.n {
                let q = t.qs[r].as_ptr().add(b * QK_K + 64 * p) as *const i32;
                let (mut s_lo, mut s_hi) = (zero, zero);
                for k in 0..8 {
                    s_lo = _mm512_dpbusd_epi32(
                        s_lo,
                        lo[k],
                        _mm512_set1_epi32(q.add(k).read_unaligned()),
                    );
                    s_hi = _mm512_dpbusd_epi32(
                        s_hi,
                        hi[k],
                        _mm512_set1_epi32(q.add(8 + k).read_unaligned()),
                    );
                }
                let sums = _mm512_add_epi32(
                    _mm512_mullo_epi32(s_lo, scales[2 * p]),
                    _mm512_mullo_epi32(s_hi, scales[2 * p + 1]),
                );
                // The pair's two sub-block sums of activations (as `_mm_hadd_epi16` adds
                // them), times the row's two minimums.
                let bs = &t.row_bsums[r][b * 16 + 4 * p..][..4];
                let sub0 = bs[0].wrapping_add(bs[1]) as u16 as i32;
                let sub1 = bs[2].wrapping_add(bs[3]) as u16 as i32;
                let min_sums = _mm512_madd_epi16(mins[p], _mm512_set1_epi32(sub0 | sub1 << 16));
                if PAIRS {
                    let da = _mm512_set1_ps(t.d[b * KQ_TILE + r]);
                    acc[r] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(d_w, da), acc[r]);
                    acc_min[r] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(min_sums),
                        _mm512_mul_ps(dmin_w, da),
                        acc_min[r],
                    );
                } else {
                    block_sums[r] = _mm512_add_epi32(block_sums[r], sums);
                    block_mins[r] = _mm512_add_epi32(block_mins[r], min_sums);
                }
            }
        }
        if !PAIRS {
            for r in 0..t.n {
                let da = _mm512_set1_ps(t.d[b * KQ_TILE + r]);
                acc[r] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(block_sums[r]),
                    _mm512_mul_ps(d_w, da),
                    acc[r],
                );
                acc_min[r] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(block_mins[r]),
                    _mm512_mul_ps(dmin_w, da),
                    acc_min[r],
                );
            }
        }
    }
    let mut by_row = [0f32; PANEL];
    for r in 0..t.n {
        _mm512_storeu_ps(by_row.as_mut_ptr(), _mm512_sub_ps(acc[r], acc_min[r]));
        for (j, v) in by_row.iter().enumerate() {
            out[j * KQ_TILE + r] = *v;
        }
    }
}

/// 16 weight rows times a tile's rows in llama.cpp's tiled order (`Order::Q6kTiled`): per
/// super-block `acc = fma(total·d_w, d_a, acc)`, bit for bit `tile_q6_k_tiled` (see
/// `panel_q4_k_pairs` for the layout).
pub(super) fn panel_q6_k_tiled(rows: &[u8], row_bytes: usize, t: &KTile, out: &mut [f32]) {
    // Safety: only selected after `available()`; the sizes are checked inside.
    unsafe { panel_q6_k_tiled_avx512(rows, row_bytes, t, out) }
}

/// What every panel checks and sets up: the super-blocks per row (`nb`, of `block_bytes`
/// each), and per lane `j` its index and its row's offset, `j * row_bytes` (checked to fit
/// the gathers' 32-bit offsets).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn panel_setup(
    rows: &[u8],
    row_bytes: usize,
    block_bytes: usize,
    t: &KTile,
    out: &[f32],
) -> (usize, __m512i, __m512i) {
    let nb = row_bytes / block_bytes;
    assert!(row_bytes == nb * block_bytes && rows.len() >= PANEL * row_bytes);
    assert!(i32::try_from(PANEL * row_bytes).is_ok() && out.len() >= PANEL * KQ_TILE);
    assert!(t.d.len() >= nb * KQ_TILE && t.n <= KQ_TILE);
    assert!(t.qs.iter().all(|q| q.len() >= nb * QK_K));
    assert!(t.row_bsums.iter().all(|s| s.len() >= nb * 16));
    let lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let row_starts = _mm512_mullo_epi32(lane, _mm512_set1_epi32(row_bytes as i32));
    (nb, lane, row_starts)
}

/// Dword `offset` of 16 rows: lane `j` reads `base + row_starts[j] + offset`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gather_rows(row_starts: __m512i, base: *const u8, offset: usize) -> __m512i {
    _mm512_i32gather_epi32::<1>(
        _mm512_add_epi32(row_starts, _mm512_set1_epi32(offset as i32)),
        base as *const i32,
    )
}

/// Each row's 256 values as stored (6-bit, + 32) four at a time (`values[g]`: elements
/// `4g..4g+4`), the integer total per super-block as `Σ scale · (stored · a)` less
/// `32 · Σ scale · (16-sum of a)` (exact), then the float step.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn panel_q6_k_tiled_avx512(rows: &[u8], row_bytes: usize, t: &KTile, out: &mut [f32]) {
    let (nb, _, row_starts) = panel_setup(rows, row_bytes, Q6_K_BLOCK_BYTES, t, out);
    let zero = _mm512_setzero_si512();
    let nibble = _mm512_set1_epi32(0x0f0f_0f0f);
    let two = _mm512_set1_epi32(0x0303_0303);
    let mut acc = [_mm512_setzero_ps(); KQ_TILE];
    let mut values = [zero; QK_K / 4];
    for b in 0..nb {
        let base = rows.as_ptr().add(b * Q6_K_BLOCK_BYTES);
        // Per half of 128: `ql` dwords k and k + 8 hold elements 4k.. and 32 + 4k.. (low
        // nibbles) and 64 + 4k.., 96 + 4k.. (high nibbles); `qh` dword k their top bits.
        for h in 0..2 {
            for k in 0..8 {
                let ql_a = gather_rows(row_starts, base, 64 * h + 4 * k);
                let ql_b = gather_rows(row_starts, base, 64 * h + 32 + 4 * k);
                let qh = gather_rows(row_starts, base, 128 + 32 * h + 4 * k);
                let g = 32 * h + k;
                values[g] = _mm512_or_si512(
                    _mm512_and_si512(ql_a, nibble),
                    _mm512_slli_epi32::<4>(_mm512_and_si512(qh, two)),
                );
                values[g + 8] = _mm512_or_si512(
                    _mm512_and_si512(ql_b, nibble),
                    _mm512_slli_epi32::<2>(_mm512_and_si512(qh, _mm512_slli_epi32::<2>(two))),
                );
                values[g + 16] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi32::<4>(ql_a), nibble),
                    _mm512_and_si512(qh, _mm512_slli_epi32::<4>(two)),
                );
                values[g + 24] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi32::<4>(ql_b), nibble),
                    _mm512_srli_epi32::<2>(_mm512_and_si512(qh, _mm512_slli_epi32::<6>(two))),
                );
            }
        }
        // The 16 signed scales (bytes 192..208), each sign-extended to 32 bits, and in
        // pairs as 16-bit halves for the offsets.
        let sc = [
            gather_rows(row_starts, base, 192),
            gather_rows(row_starts, base, 196),
            gather_rows(row_starts, base, 200),
            gather_rows(row_starts, base, 204),
        ];
        // Byte s % 4 of dword s / 4, to the top, then back down with its sign.
        let mut scales = [zero; 16];
        for (s, scale) in scales.iter_mut().enumerate() {
            let up = _mm512_set1_epi32(24 - 8 * (s % 4) as i32);
            *scale = _mm512_srai_epi32::<24>(_mm512_sllv_epi32(sc[s / 4], up));
        }
        let halves = _mm512_set1_epi32(0xffff);
        let mut scale_pairs = [zero; 8];
        for (u, pair) in scale_pairs.iter_mut().enumerate() {
            *pair = _mm512_or_si512(
                _mm512_and_si512(scales[2 * u], halves),
                _mm512_slli_epi32::<16>(scales[2 * u + 1]),
            );
        }
        // `d`: the upper half of the dword at 206 (so no read past the block).
        let d_w = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(gather_rows(
            row_starts, base, 206,
        ))));
        for (r, acc) in acc.iter_mut().enumerate().take(t.n) {
            let q = t.qs[r].as_ptr().add(b * QK_K) as *const i32;
            let mut total = zero;
            for (s, scale) in scales.iter().enumerate() {
                let mut sum = zero;
                for (g, v) in values.iter().enumerate().skip(4 * s).take(4) {
                    let a = _mm512_set1_epi32(q.add(g).read_unaligned());
                    sum = _mm512_dpbusd_epi32(sum, *v, a);
                }
                total = _mm512_add_epi32(total, _mm512_mullo_epi32(sum, *scale));
            }
            let bs = &t.row_bsums[r][b * 16..][..16];
            let mut offset = zero;
            for (u, pair) in scale_pairs.iter().enumerate() {
                let sums = bs[2 * u] as u16 as i32 | (bs[2 * u + 1] as i32) << 16;
                offset =
                    _mm512_add_epi32(offset, _mm512_madd_epi16(*pair, _mm512_set1_epi32(sums)));
            }
            let total = _mm512_sub_epi32(total, _mm512_slli_epi32::<5>(offset));
            let da = _mm512_set1_ps(t.d[b * KQ_TILE + r]);
            *acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(total), d_w), da, *acc);
        }
    }
    let mut by_row = [0f32; PANEL];
    for r in 0..t.n {
        _mm512_storeu_ps(by_row.as_mut_ptr(), acc[r]);
        for (j, v) in by_row.iter().enumerate() {
            out[j * KQ_TILE + r] = *v;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn tile_q6_k_tiled_avx512(w: &[u8], t: &KTile, out: &mut [f32]) {
    let nb = w.len() / Q6_K_BLOCK_BYTES;
    assert!(t.d.len() >= nb * KQ_TILE && out.len() >= t.n);
    assert!(t.qs.iter().all(|q| q.len() >= nb * QK_K));
    let mut acc = _mm512_setzero_ps();
    for b in 0..nb {
        let block = &w[b * Q6_K_BLOCK_BYTES..][..Q6_K_BLOCK_BYTES];
        prefetch_ahead(block.as_ptr(), 4);
        let scale = |j: usize| block[192 + j] as i8 as i32;
        let (values, sc) = q6_k_unpack(block);
        let zero = _mm512_setzero_si512();
        let mut lanes = [zero; KQ_TILE];
        for (r, l) in lanes.iter_mut().enumerate().take(t.n) {
            *l = q6_k_row_lanes(&values, &sc, t.qs[r].as_ptr().add(b * QK_K));
        }
        // Minus 32 × the scaled activation sums (the values are stored + 32).
        let mut offset = zero;
        for j in 0..16 {
            let bs = _mm512_loadu_si512(t.bsums.as_ptr().add((b * 16 + j) * KQ_TILE) as *const _);
            offset = _mm512_add_epi32(
                offset,
                _mm512_mullo_epi32(bs, _mm512_set1_epi32(32 * scale(j))),
            );
        }
        let total = _mm512_sub_epi32(row_totals(&lanes), offset);
        let d_w = kquant::f16_bits_to_f32(u16::from_le_bytes([block[208], block[209]]));
        let da = _mm512_loadu_ps(t.d.as_ptr().add(b * KQ_TILE));
        acc = _mm512_fmadd_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(d_w)),
            da,
            acc,
        );
    }
    store_lanes(acc, t.n, out);
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn tile_q6_k_lanes_avx512(w: &[u8], t: &KTile, out: &mut [f32]) {
    let nb = w.len() / Q6_K_BLOCK_BYTES;
    assert!(t.d.len() >= nb * KQ_TILE && out.len() >= t.n);
    assert!(t.qs.iter().all(|q| q.len() >= nb * QK_K));
    assert!(t.row_bsums.iter().all(|s| s.len() >= nb * 16));
    let mut acc = [_mm256_setzero_ps(); KQ_TILE];
    for b in 0..nb {
        let block = &w[b * Q6_K_BLOCK_BYTES..][..Q6_K_BLOCK_BYTES];
        prefetch_ahead(block.as_ptr(), 4);
        let (values, sc) = q6_k_unpack(block);
        let scales32 = q6_k_scales32(block);
        let d_w = kquant::f16_bits_to_f32(u16::from_le_bytes([block[208], block[209]]));
        for (r, acc) in acc.iter_mut().enumerate().take(t.n) {
            let lanes = q6_k_lane_totals(
                &values,
                &sc,
                scales32,
                t.qs[r].as_ptr().add(b * QK_K),
                t.row_bsums[r].as_ptr().add(b * 16),
            );
            let d = t.d[b * KQ_TILE + r] * d_w;
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(d), *acc);
        }
    }
    for (r, acc) in acc.iter().enumerate().take(t.n) {
        out[r] = hsum_float_8(*acc);
    }
}

/// Q6_K single row in `ggml_vec_dot_q6_K_q8_K`'s order (`Order::Q6kLanes`, a decode
/// step's): `kquant::q6k_lanes` bit for bit (tested), one super-block per pass.
pub(super) fn vec_dot_q6_k_lanes(w: &[u8], act: &Q8Row) -> f32 {
    // Safety: only selected by `kquant::dot_for` after `available()`.
    unsafe { vec_dot_q6_k_lanes_avx512(w, act) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn vec_dot_q6_k_lanes_avx512(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q6_K_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK_K && act.bsums.len() >= nb * 16);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let block = &w[b * Q6_K_BLOCK_BYTES..][..Q6_K_BLOCK_BYTES];
        prefetch_ahead(block.as_ptr(), 4);
        let (values, sc) = q6_k_unpack(block);
        let lanes = q6_k_lane_totals(
            &values,
            &sc,
            q6_k_scales32(block),
            act.qs.as_ptr().add(b * QK_K),
            act.bsums.as_ptr().add(b * 16),
        );
        let d_w = kquant::f16_bits_to_f32(u16::from_le_bytes([block[208], block[209]]));
        let d = act.d[b] * d_w;
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(d), acc);
    }
    hsum_float_8(acc)
}

/// llama.cpp's `hsum_float_8`: the halves, then pairs, then the last two.
#[target_feature(enable = "avx")]
#[inline]
unsafe fn hsum_float_8(v: __m256) -> f32 {
    let mut a = [0f32; 8];
    _mm256_storeu_ps(a.as_mut_ptr(), v);
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// A Q6_K super-block's 16 sub-block scales, ×32 (its values are stored + 32).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn q6_k_scales32(block: &[u8]) -> __m512i {
    _mm512_slli_epi32::<5>(_mm512_cvtepi8_epi32(_mm_loadu_si128(
        block.as_ptr().add(192) as *const __m128i,
    )))
}

/// One activation row's integer totals with an unpacked Q6_K super-block in llama.cpp's 8
/// lanes (`x86::q6_k_lane_totals`'s): lane n holds elements `4n..4n+4` of every 32,
/// times their scales, less 32 × the scaled sums of sub-blocks `2n` and `2n + 1`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512dq,avx512vnni")]
#[inline]
unsafe fn q6_k_lane_totals(
    values: &[__m512i; 4],
    sc: &[__m512i; 4],
    scales32: __m512i,
    q: *const i8,
    bsums: *const i16,
) -> __m256i {
    let sum = q6_k_row_lanes(values, sc, q);
    // Register lane L holds elements 4L..4L+4 of a 64: llama.cpp's lane L % 8.
    let folded = _mm256_add_epi32(
        _mm512_castsi512_si256(sum),
        _mm512_extracti64x4_epi64::<1>(sum),
    );
    // Lane n's offset: sub-blocks 2n and 2n + 1, each sum times 32 × its scale.
    let bs = _mm512_cvtepi16_epi32(_mm256_loadu_si256(bsums as *const __m256i));
    let scaled = _mm512_mullo_epi32(bs, scales32);
    let pairs = _mm512_add_epi32(scaled, _mm512_srli_epi64::<32>(scaled));
    _mm256_sub_epi32(folded, _mm512_cvtepi64_epi32(pairs))
}

/// One row's scaled integer products with a Q6_K super-block: 16 lanes, lane L of the sum
/// holding elements `4L..4L+4` of each 64.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn q6_k_row_lanes(values: &[__m512i; 4], sc: &[__m512i; 4], q: *const i8) -> __m512i {
    let zero = _mm512_setzero_si512();
    let mut sum = zero;
    for (k, (v, s)) in values.iter().zip(sc).enumerate() {
        let a = _mm512_loadu_si512(q.add(64 * k) as *const _);
        sum = _mm512_add_epi32(
            sum,
            _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, *v, a), *s),
        );
    }
    sum
}

/// A Q6_K super-block's 256 unsigned 6-bit values in element order, 64 per register, and
/// the scales of the sub-blocks each register's lanes cover.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
#[inline]
unsafe fn q6_k_unpack(block: &[u8]) -> ([__m512i; 4], [__m512i; 4]) {
    let low = _mm256_set1_epi8(0x0f);
    let two = _mm256_set1_epi8(0x03);
    // Per half of 128, `ql` bytes 0..32 and 32..64 give the low nibbles of elements 0..32
    // and 32..64 and the high nibbles of 64..96 and 96..128; `qh` their top two bits.
    let mut values = [_mm512_setzero_si512(); 4];
    for h in 0..2 {
        let ql_a = _mm256_loadu_si256(block.as_ptr().add(64 * h) as *const __m256i);
        let ql_b = _mm256_loadu_si256(block.as_ptr().add(64 * h + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(block.as_ptr().add(128 + 32 * h) as *const __m256i);
        // Bits 2k, 2k + 1 of each `qh` byte, moved to bits 4 and 5.
        let top0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, two));
        let top1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_slli_epi16::<2>(two)));
        let top2 = _mm256_and_si256(qh, _mm256_slli_epi16::<4>(two));
        let top3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_slli_epi16::<6>(two)));
        let e0 = _mm256_or_si256(_mm256_and_si256(ql_a, low), top0);
        let e1 = _mm256_or_si256(_mm256_and_si256(ql_b, low), top1);
        let e2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql_a), low), top2);
        let e3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql_b), low), top3);
        values[2 * h] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(e0), e1);
        values[2 * h + 1] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(e2), e3);
    }
    // Register k covers sub-blocks 4k..4k+4 (16 elements, 4 lanes each).
    let sc = [
        q6_k_scales(block, 0),
        q6_k_scales(block, 1),
        q6_k_scales(block, 2),
        q6_k_scales(block, 3),
    ];
    (values, sc)
}

/// The signed scales of Q6_K sub-blocks `4k..4k+4`, each over its 4 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn q6_k_scales(block: &[u8], k: usize) -> __m512i {
    let s = |j: usize| block[192 + 4 * k + j] as i8 as i32;
    let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
    _mm512_set_epi32(
        s3, s3, s3, s3, s2, s2, s2, s2, s1, s1, s1, s1, s0, s0, s0, s0,
    )
}

/// The first `n` lanes of `v` into `out`.
#[inline(always)]
unsafe fn store_lanes(v: __m512, n: usize, out: &mut [f32]) {
    let mut lanes = [0f32; KQ_TILE];
    _mm512_storeu_ps(lanes.as_mut_ptr(), v);
    out[..n].copy_from_slice(&lanes[..n]);
}
