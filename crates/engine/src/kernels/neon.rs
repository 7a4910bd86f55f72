//! AArch64 NEON kernels: the decode dot products (one activation row) of the 32-element
//! formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, and the integer totals of Q4_K and Q6_K
//! super-blocks, on the baseline NEON every 64-bit ARM core has (a Raspberry Pi 4's
//! Cortex-A72 included: no `sdot`).
//!
//! Bit for bit the x86 kernels' results: the same eight integer lanes per block (lane `l`
//! sums the products of bytes `4l..4l+4`, exact), the same `fma(d_w·d_a, lane, acc)` per
//! lane and block, the same final sum ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), so a
//! model gives the same tokens on an ARM node as on an x86 one. Tested against the scalar
//! reference like every SIMD path (`cargo test --target aarch64-unknown-linux-gnu` under
//! `qemu-aarch64`, see docs/PERFORMANCE.md).

use std::arch::aarch64::*;

use super::kquant::f16_bits_to_f32;
use super::{
    Q8Row, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q5_0_BLOCK_BYTES, Q5_1_BLOCK_BYTES,
    Q8_0_BLOCK_BYTES, QK,
};

/// Always true on AArch64 (NEON is part of the base architecture).
pub(super) fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

fn f16_at(block: &[u8]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]]))
}

/// The eight lanes of one 32-element block: lane `l` = sum of `x[i]·y[i]` for `i` in
/// `4l..4l+4`, as i32 (exact: |x| <= 128, |y| <= 127).
#[inline(always)]
unsafe fn block_lanes(x: [int8x16_t; 2], y: [int8x16_t; 2]) -> (int32x4_t, int32x4_t) {
    let half = |x: int8x16_t, y: int8x16_t| {
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(x), vget_low_s8(y)));
        let hi = vpaddlq_s16(vmull_s8(vget_high_s8(x), vget_high_s8(y)));
        vpaddq_s32(lo, hi)
    };
    (half(x[0], y[0]), half(x[1], y[1]))
}

/// `acc += dd · lanes`, lane by lane, fused as on x86.
#[inline(always)]
unsafe fn accumulate(acc: &mut [float32x4_t; 2], dd: f32, lanes: (int32x4_t, int32x4_t)) {
    let d = vdupq_n_f32(dd);
    acc[0] = vfmaq_f32(acc[0], d, vcvtq_f32_s32(lanes.0));
    acc[1] = vfmaq_f32(acc[1], d, vcvtq_f32_s32(lanes.1));
}

/// x86's `hsum` of eight lanes: halves added, then pairs, then the last two.
#[inline(always)]
unsafe fn hsum(acc: [float32x4_t; 2]) -> f32 {
    let s = vaddq_f32(acc[0], acc[1]);
    let t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    vget_lane_f32::<0>(t) + vget_lane_f32::<1>(t)
}

#[inline(always)]
unsafe fn act_bytes(act: &Q8Row, b: usize) -> [int8x16_t; 2] {
    let p = act.qs.as_ptr().add(b * QK);
    [vld1q_s8(p), vld1q_s8(p.add(16))]
}

/// The 32 nibbles of 16 packed bytes, low nibbles first.
#[inline(always)]
unsafe fn nibbles(packed: *const u8) -> [uint8x16_t; 2] {
    let v = vld1q_u8(packed);
    [vandq_u8(v, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(v)]
}

pub(super) fn vec_dot_q8_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q8_0_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    // Safety: NEON is there (base architecture); every load is inside `w` or `act`.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        for (b, block) in w.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
            let q = block.as_ptr().add(2) as *const i8;
            let lanes = block_lanes([vld1q_s8(q), vld1q_s8(q.add(16))], act_bytes(act, b));
            accumulate(&mut acc, f16_at(block) * act.d[b], lanes);
        }
        hsum(acc)
    }
}

pub(super) fn vec_dot_q4_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q4_1_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.s.len() >= nb && act.qs.len() >= nb * QK);
    // Safety: as above.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut summs = 0f32;
        for (b, block) in w.chunks_exact(Q4_1_BLOCK_BYTES).enumerate() {
            let m = f16_bits_to_f32(u16::from_le_bytes([block[2], block[3]]));
            summs += m * act.s[b];
            let [lo, hi] = nibbles(block.as_ptr().add(4));
            let x = [vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi)];
            accumulate(
                &mut acc,
                f16_at(block) * act.d[b],
                block_lanes(x, act_bytes(act, b)),
            );
        }
        hsum(acc) + summs
    }
}

/// The high bits of a 5-bit block (`qh`, bit i for element i) as 0x10 in each byte whose
/// bit is set: elements 0..16 and 16..32.
#[inline(always)]
unsafe fn high_bits(qh: u32) -> [uint8x16_t; 2] {
    // Bit j of each byte, to test the bits 8 at a time.
    const BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let bits = vld1q_u8(BITS.as_ptr());
    let sixteen = vdupq_n_u8(0x10);
    let spread = |k: u32| {
        let b0 = vdup_n_u8((qh >> (16 * k)) as u8);
        let b1 = vdup_n_u8((qh >> (16 * k + 8)) as u8);
        vandq_u8(vtstq_u8(vcombine_u8(b0, b1), bits), sixteen)
    };
    [spread(0), spread(1)]
}

pub(super) fn vec_dot_q5_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q5_0_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    // Safety: as above.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        for (b, block) in w.chunks_exact(Q5_0_BLOCK_BYTES).enumerate() {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            let [lo, hi] = nibbles(block.as_ptr().add(6));
            let [h0, h1] = high_bits(qh);
            // nibble | (high bit << 4), minus 16, as signed bytes.
            let value = |n: uint8x16_t, h: uint8x16_t| {
                vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(n, h)), vdupq_n_s8(16))
            };
            let x = [value(lo, h0), value(hi, h1)];
            accumulate(
                &mut acc,
                f16_at(block) * act.d[b],
                block_lanes(x, act_bytes(act, b)),
            );
        }
        hsum(acc)
    }
}

pub(super) fn vec_dot_q4_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q4_0_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.qs.len() >= nb * QK);
    // Safety: as above.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        for (b, block) in w.chunks_exact(Q4_0_BLOCK_BYTES).enumerate() {
            let [lo, hi] = nibbles(block.as_ptr().add(2));
            let minus_8 = |n: uint8x16_t| vsubq_s8(vreinterpretq_s8_u8(n), vdupq_n_s8(8));
            let x = [minus_8(lo), minus_8(hi)];
            accumulate(
                &mut acc,
                f16_at(block) * act.d[b],
                block_lanes(x, act_bytes(act, b)),
            );
        }
        hsum(acc)
    }
}

pub(super) fn vec_dot_q5_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    let nb = w.len() / Q5_1_BLOCK_BYTES;
    assert!(act.d.len() >= nb && act.s.len() >= nb && act.qs.len() >= nb * QK);
    // Safety: as above.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut summs = 0f32;
        for (b, block) in w.chunks_exact(Q5_1_BLOCK_BYTES).enumerate() {
            let m = f16_bits_to_f32(u16::from_le_bytes([block[2], block[3]]));
            summs += m * act.s[b];
            let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
            let [lo, hi] = nibbles(block.as_ptr().add(8));
            let [h0, h1] = high_bits(qh);
            let x = [
                vreinterpretq_s8_u8(vorrq_u8(lo, h0)),
                vreinterpretq_s8_u8(vorrq_u8(hi, h1)),
            ];
            accumulate(
                &mut acc,
                f16_at(block) * act.d[b],
                block_lanes(x, act_bytes(act, b)),
            );
        }
        hsum(acc) + summs
    }
}

/// `scalar::q4_k_pair_totals` (exact integers, so any grouping gives the same): per pair of
/// sub-blocks of 32, the scaled sums of nibble × activation and the minimums times the
/// activation sums.
pub(super) fn q4_k_pair_totals(block: &[u8], q8: &[i8], bsums: &[i16]) -> ([i32; 4], [i32; 4]) {
    assert!(block.len() >= super::Q4_K_BLOCK_BYTES && q8.len() >= super::QK_K);
    assert!(bsums.len() >= 16);
    let (mut sums, mut mins) = ([0i32; 4], [0i32; 4]);
    for p in 0..4 {
        // Safety: NEON is there; the 32 bytes of nibbles and 64 activations are in bounds.
        let (lo, hi) = unsafe {
            let [lo, hi] = nibbles32(block.as_ptr().add(16 + 32 * p));
            let y = q8.as_ptr().add(64 * p);
            (
                dot32(lo, [vld1q_s8(y), vld1q_s8(y.add(16))]),
                dot32(hi, [vld1q_s8(y.add(32)), vld1q_s8(y.add(48))]),
            )
        };
        for (j, dot) in [(2 * p, lo), (2 * p + 1, hi)] {
            let (sc, m) = super::scalar::scale_min_k4(j, &block[4..16]);
            sums[p] += sc as i32 * dot;
            mins[p] += m as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
        }
    }
    (sums, mins)
}

/// `scalar::q6_k_lane_totals`: lane `n` holds elements `4n..4n+4` of every 32 (the
/// unsigned 6-bit values times the scale of their 16), minus 32 × the scaled activation
/// sums of sub-blocks `2n` and `2n + 1`.
pub(super) fn q6_k_lane_totals(block: &[u8], q8: &[i8], bsums: &[i16]) -> [i32; 8] {
    assert!(block.len() >= super::Q6_K_BLOCK_BYTES && q8.len() >= super::QK_K);
    assert!(bsums.len() >= 16);
    let scale = |j: usize| block[192 + j] as i8 as i32;
    let mut lanes = [0i32; 8];
    // Safety: NEON is there; every load is inside the super-block or `q8`.
    unsafe {
        let mut acc = [vdupq_n_s32(0); 2];
        let low = vdupq_n_u8(0x0f);
        let two = vdupq_n_u8(0x03);
        for half in 0..2 {
            let ql = block.as_ptr().add(64 * half);
            let qh = block.as_ptr().add(128 + 32 * half);
            for (part, acc_part) in acc.iter_mut().enumerate() {
                // 16 elements of each of the four runs of 32 of this half.
                let (ql_a, ql_b) = (
                    vld1q_u8(ql.add(16 * part)),
                    vld1q_u8(ql.add(32 + 16 * part)),
                );
                let h = vld1q_u8(qh.add(16 * part));
                let top = |shift: i32| match shift {
                    0 => vshlq_n_u8::<4>(vandq_u8(h, two)),
                    2 => vshlq_n_u8::<2>(vandq_u8(h, vshlq_n_u8::<2>(two))),
                    4 => vandq_u8(h, vshlq_n_u8::<4>(two)),
                    _ => vshrq_n_u8::<2>(vandq_u8(h, vshlq_n_u8::<6>(two))),
                };
                let runs = [
                    vorrq_u8(vandq_u8(ql_a, low), top(0)),
                    vorrq_u8(vandq_u8(ql_b, low), top(2)),
                    vorrq_u8(vshrq_n_u8::<4>(ql_a), top(4)),
                    vorrq_u8(vshrq_n_u8::<4>(ql_b), top(6)),
                ];
                for (r, values) in runs.into_iter().enumerate() {
                    // Elements e = 128·half + 32·r + 16·part + 0..16: lanes 4·part..4·part+4
                    // of the 32-chunk (128·half + 32·r) / 32, scale of its 16.
                    let e = 128 * half + 32 * r + 16 * part;
                    let x = vreinterpretq_s8_u8(values);
                    let y = vld1q_s8(q8.as_ptr().add(e));
                    let prod_lo = vmull_s8(vget_low_s8(x), vget_low_s8(y));
                    let prod_hi = vmull_s8(vget_high_s8(x), vget_high_s8(y));
                    let four = vpaddq_s32(vpaddlq_s16(prod_lo), vpaddlq_s16(prod_hi));
                    *acc_part = vmlaq_s32(*acc_part, four, vdupq_n_s32(scale(e / 16)));
                }
            }
        }
        vst1q_s32(lanes.as_mut_ptr(), acc[0]);
        vst1q_s32(lanes.as_mut_ptr().add(4), acc[1]);
    }
    for (n, lane) in lanes.iter_mut().enumerate() {
        *lane -=
            32 * (bsums[2 * n] as i32 * scale(2 * n) + bsums[2 * n + 1] as i32 * scale(2 * n + 1));
    }
    lanes
}

/// The 64 nibbles of 32 packed bytes: low nibbles (32) and high nibbles (32).
#[inline(always)]
unsafe fn nibbles32(packed: *const u8) -> [[uint8x16_t; 2]; 2] {
    let (a, b) = (vld1q_u8(packed), vld1q_u8(packed.add(16)));
    let low = vdupq_n_u8(0x0f);
    [
        [vandq_u8(a, low), vandq_u8(b, low)],
        [vshrq_n_u8::<4>(a), vshrq_n_u8::<4>(b)],
    ]
}

/// The exact sum of 32 products of unsigned nibbles and signed bytes.
#[inline(always)]
unsafe fn dot32(x: [uint8x16_t; 2], y: [int8x16_t; 2]) -> i32 {
    let (a, b) = block_lanes([vreinterpretq_s8_u8(x[0]), vreinterpretq_s8_u8(x[1])], y);
    vaddvq_s32(vaddq_s32(a, b))
}
