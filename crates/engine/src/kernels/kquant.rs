//! The k-quant products (Q4_K, Q6_K) in the float order llama.cpp's CPU backend uses, so
//! our numbers are its numbers. Integer sums are exact whatever the order; what differs
//! between llama.cpp's code paths is where the integer totals turn into floats and in
//! what order those floats are added. llama.cpp (x86, the build measured in
//! docs/PERFORMANCE.md) picks the path by the shape of the product:
//!
//! - **Q6_K**, fewer than 8 activation rows: `ggml_vec_dot_q6_K_q8_K` (AVX2). Each
//!   super-block's integer sum is kept in 8 lanes (lane n: elements `4n..4n+3` of every
//!   32-element chunk, minus 32 × the scaled activation sums of sub-blocks `2n` and
//!   `2n + 1`), each lane accumulated as `fma(d_w·d_a, lane, acc)`, the 8 lanes added
//!   pairwise at the end.
//! - **Q6_K**, 8 rows or more: the "tiled" path: per super-block `acc = fma(total·d_w,
//!   d_a, acc)`.
//! - **Q4_K**, a matrix whose row count is a multiple of 8: repacked (`q4_K_8x8`). Rows
//!   of activations in whole groups of 4 go through its GEMM: per pair of sub-blocks (64
//!   elements) `acc = fma(sum, d_w·d_a, acc)` and `acc_min = fma(min_sum, dmin_w·d_a,
//!   acc_min)`, the result `acc - acc_min`; the rows left over (and single rows, decode)
//!   through its GEMV: the same per whole super-block.
//! - **Q4_K**, other row counts: `ggml_vec_dot_q4_K_q8_K` below 8 rows (our AVX2 kernel
//!   in x86.rs), the tiled path from 8 rows: per super-block
//!   `acc = fma(fma(-dmin_w, min_sum, sum·d_w), d_a, acc)`.
//!
//! The integer parts run on AVX2 where the CPU has it (x86.rs), the float parts here, so
//! every CPU gives the same bits.

use super::{scalar, Format, Q8Row, VecDot, Q4_K_BLOCK_BYTES, Q6_K_BLOCK_BYTES, QK_K};

/// Which of llama.cpp's orders one product follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    Q6kLanes,
    Q6kTiled,
    Q4kPairs,
    Q4kBlocks,
    Q4kTiled,
    /// The format's plain single-row kernel (`vec_dot_fn`).
    VecDot,
}

/// The order llama.cpp uses for activation row `i` of `m`, times a `format` matrix of
/// `rows` rows; `None` for formats this module does not handle.
pub(super) fn order(format: Format, rows: usize, m: usize, i: usize) -> Option<Order> {
    Some(match format {
        Format::Q6K if m >= 8 => Order::Q6kTiled,
        Format::Q6K => Order::Q6kLanes,
        Format::Q4K if rows.is_multiple_of(8) && m >= 4 && i < m - m % 4 => Order::Q4kPairs,
        Format::Q4K if rows.is_multiple_of(8) => Order::Q4kBlocks,
        Format::Q4K if m >= 8 => Order::Q4kTiled,
        Format::Q4K => Order::VecDot,
        _ => return None,
    })
}

/// The dot product function for an order (`VecDot` gives the format's own kernel): the
/// AVX-512 single rows (Q4_K in both repacked orders, Q6_K in lanes) where the CPU has
/// them, else [`portable`]'s. Every choice gives the same bits.
pub(super) fn dot_for(order: Order, vec_dot: VecDot) -> VecDot {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() && super::tiles_setting() != "avx2" {
        match order {
            Order::Q4kBlocks => return super::avx512::vec_dot_q4_k_blocks,
            Order::Q4kPairs => return super::avx512::vec_dot_q4_k_pairs,
            Order::Q6kLanes => return super::avx512::vec_dot_q6_k_lanes,
            _ => {}
        }
    }
    portable(order, vec_dot)
}

/// [`dot_for`] without the AVX-512 single rows: the FMA-compiled copy where the CPU has it
/// (`fma`; its integer parts in AVX2), else the plain one.
pub(super) fn portable(order: Order, vec_dot: VecDot) -> VecDot {
    let (plain, fused): (VecDot, VecDot) = match order {
        Order::Q6kLanes => (q6k_lanes, fma::q6k_lanes),
        Order::Q6kTiled => (q6k_tiled, fma::q6k_tiled),
        Order::Q4kPairs => (q4k_pairs, fma::q4k_pairs),
        Order::Q4kBlocks => (q4k_blocks, fma::q4k_blocks),
        Order::Q4kTiled => (q4k_tiled, fma::q4k_tiled),
        Order::VecDot => return vec_dot,
    };
    if fma_compiled() {
        fused
    } else {
        plain
    }
}

/// Whether the `fma` copies are compiled with FMA and may run here.
fn fma_compiled() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::x86::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Elsewhere the "FMA-compiled" copies are the plain functions.
#[cfg(not(target_arch = "x86_64"))]
mod fma {
    pub(super) use super::{q4k_blocks, q4k_pairs, q4k_tiled, q6k_lanes, q6k_tiled};
}

/// The same functions compiled with AVX2 and FMA: `mul_add` becomes one instruction (it is
/// exact either way; without FMA it is a library call) and the AVX2 integer parts inline.
#[cfg(target_arch = "x86_64")]
mod fma {
    use super::Q8Row;

    macro_rules! with_fma {
        ($($name:ident),*) => {$(
            pub(super) fn $name(w: &[u8], act: &Q8Row) -> f32 {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn inner(w: &[u8], act: &Q8Row) -> f32 {
                    super::$name(w, act)
                }
                // Safety: only handed out by `dot_for` after `x86::available()`.
                unsafe { inner(w, act) }
            }
        )*};
    }

    with_fma!(q6k_lanes, q6k_tiled, q4k_pairs, q4k_blocks, q4k_tiled);
}

/// The little-endian f16 at the start of `b`, as f32.
#[inline(always)]
fn f16_le(b: &[u8]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// f16 → f32 exactly as F16C's `vcvtph2ps` converts (NaNs quieted, payload kept), in
/// integer steps that inline anywhere: `half`'s conversion is a function call (its F16C
/// path is compiled apart), about 2 % of a Qwen prompt.
#[inline(always)]
pub(super) fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let magnitude = (h & 0x7fff) as u32;
    if magnitude >= 0x7c00 {
        // Infinity, or NaN with the quiet bit set.
        let mantissa = (magnitude & 0x03ff) << 13;
        let quiet = if mantissa != 0 { 0x0040_0000 } else { 0 };
        return f32::from_bits(sign | 0x7f80_0000 | mantissa | quiet);
    }
    let abs = if magnitude >= 0x0400 {
        // Normal: the same bits, the exponent rebased from 15 to 127.
        f32::from_bits((magnitude << 13) + (112 << 23))
    } else {
        // Subnormal (or zero): m · 2^-24, exact. Not by scaling a subnormal f32, which
        // costs a microcode assist per multiply on this CPU (prompts ran 30 % slower).
        magnitude as f32 * f32::from_bits(0x3380_0000)
    };
    f32::from_bits(sign | abs.to_bits())
}

/// Integer totals of one Q6_K super-block in llama.cpp's 8 lanes.
#[inline(always)]
fn q6k_lane_totals(block: &[u8], act: &Q8Row, b: usize) -> [i32; 8] {
    let q8 = &act.qs[b * QK_K..][..QK_K];
    let bsums = &act.bsums[b * 16..][..16];
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        // Safety: AVX2 is there; `block`, `q8` and `bsums` are whole super-blocks.
        return unsafe { super::x86::q6_k_lane_totals(block, q8, bsums) };
    }
    #[cfg(target_arch = "aarch64")]
    if super::neon::available() {
        return super::neon::q6_k_lane_totals(block, q8, bsums);
    }
    scalar::q6_k_lane_totals(block, q8, bsums)
}

/// Integer sums and minimum sums of one Q4_K super-block per pair of sub-blocks.
#[inline(always)]
fn q4k_pair_totals(block: &[u8], act: &Q8Row, b: usize) -> ([i32; 4], [i32; 4]) {
    let q8 = &act.qs[b * QK_K..][..QK_K];
    let bsums = &act.bsums[b * 16..][..16];
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        // Safety: AVX2 is there; `block`, `q8` and `bsums` are whole super-blocks.
        return unsafe { super::x86::q4_k_pair_totals(block, q8, bsums) };
    }
    #[cfg(target_arch = "aarch64")]
    if super::neon::available() {
        return super::neon::q4_k_pair_totals(block, q8, bsums);
    }
    scalar::q4_k_pair_totals(block, q8, bsums)
}

#[inline(always)]
fn q6k_lanes(w: &[u8], act: &Q8Row) -> f32 {
    let mut acc = [0f32; 8];
    for (b, block) in w.chunks_exact(Q6_K_BLOCK_BYTES).enumerate() {
        let d = act.d[b] * f16_le(&block[208..]);
        for (a, lane) in acc.iter_mut().zip(q6k_lane_totals(block, act, b)) {
            *a = d.mul_add(lane as f32, *a);
        }
    }
    // hsum_float_8: the halves, then pairs, then the last two.
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn q6k_tiled(w: &[u8], act: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, block) in w.chunks_exact(Q6_K_BLOCK_BYTES).enumerate() {
        let total: i32 = q6k_lane_totals(block, act, b).iter().sum();
        acc = (total as f32 * f16_le(&block[208..])).mul_add(act.d[b], acc);
    }
    acc
}

/// Q4_K with the float step every `per` pairs of sub-blocks (1: GEMM, 4: GEMV).
#[inline(always)]
fn q4k_repacked(w: &[u8], act: &Q8Row, per: usize) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (b, block) in w.chunks_exact(Q4_K_BLOCK_BYTES).enumerate() {
        let d = f16_le(block) * act.d[b];
        let dmin = f16_le(&block[2..]) * act.d[b];
        let (sums, mins) = q4k_pair_totals(block, act, b);
        for (s, m) in sums.chunks_exact(per).zip(mins.chunks_exact(per)) {
            acc = (s.iter().sum::<i32>() as f32).mul_add(d, acc);
            acc_min = (m.iter().sum::<i32>() as f32).mul_add(dmin, acc_min);
        }
    }
    acc - acc_min
}

#[inline(always)]
fn q4k_pairs(w: &[u8], act: &Q8Row) -> f32 {
    q4k_repacked(w, act, 1)
}

#[inline(always)]
fn q4k_blocks(w: &[u8], act: &Q8Row) -> f32 {
    q4k_repacked(w, act, 4)
}

#[inline(always)]
fn q4k_tiled(w: &[u8], act: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, block) in w.chunks_exact(Q4_K_BLOCK_BYTES).enumerate() {
        let (sums, mins) = q4k_pair_totals(block, act, b);
        let (s, m) = (sums.iter().sum::<i32>(), mins.iter().sum::<i32>());
        let res = (-f16_le(&block[2..])).mul_add(m as f32, s as f32 * f16_le(block));
        acc = res.mul_add(act.d[b], acc);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::super::sample::{lcg, random_f32};
    use super::*;

    fn random_act(seed: u64, blocks: usize) -> Q8Row {
        Q8Row::quantize_k(&random_f32(blocks * QK_K, seed))
    }

    fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut r = lcg(seed);
        (0..n).map(|_| r() as u8).collect()
    }

    #[test]
    fn simd_integer_totals_equal_the_scalar_ones() {
        for seed in 0..20 {
            let act = random_act(seed, 2);
            let q6 = random_bytes(seed + 100, Q6_K_BLOCK_BYTES);
            let q4 = random_bytes(seed + 200, Q4_K_BLOCK_BYTES);
            for b in 0..2 {
                let q8 = &act.qs[b * QK_K..][..QK_K];
                let bsums = &act.bsums[b * 16..][..16];
                assert_eq!(
                    q6k_lane_totals(&q6, &act, b),
                    scalar::q6_k_lane_totals(&q6, q8, bsums)
                );
                assert_eq!(
                    q4k_pair_totals(&q4, &act, b),
                    scalar::q4_k_pair_totals(&q4, q8, bsums)
                );
            }
        }
    }

    #[test]
    fn every_order_is_the_exact_dot_product_up_to_rounding() {
        // The integer totals, whatever their grouping, sum to the exact dot product of the
        // quantized values, so every order agrees with an f64 evaluation closely.
        for seed in 0..10 {
            let act = random_act(seed, 3);
            let mut r = lcg(seed + 7);
            let mut q6 = random_bytes(seed + 1, 3 * Q6_K_BLOCK_BYTES);
            let mut q4 = random_bytes(seed + 2, 3 * Q4_K_BLOCK_BYTES);
            // Sane f16 scales (random bytes make NaNs and huge values).
            for b in 0..3 {
                let d = half::f16::from_f32((r() % 1000) as f32 / 1.0e5).to_le_bytes();
                q6[b * Q6_K_BLOCK_BYTES + 208..][..2].copy_from_slice(&d);
                q4[b * Q4_K_BLOCK_BYTES..][..2].copy_from_slice(&d);
                q4[b * Q4_K_BLOCK_BYTES + 2..][..2].copy_from_slice(&d);
            }
            let exact = |f: Format, w: &[u8]| -> f64 {
                let mut x = Vec::new();
                scalar::dequantize(f, w, &mut x);
                x.iter()
                    .zip(act.qs.iter())
                    .enumerate()
                    .map(|(i, (&x, &q))| x as f64 * q as f64 * act.d[i / QK_K] as f64)
                    .sum()
            };
            let (e6, e4) = (exact(Format::Q6K, &q6), exact(Format::Q4K, &q4));
            for (got, want) in [
                (q6k_lanes(&q6, &act) as f64, e6),
                (q6k_tiled(&q6, &act) as f64, e6),
                (q4k_pairs(&q4, &act) as f64, e4),
                (q4k_blocks(&q4, &act) as f64, e4),
                (q4k_tiled(&q4, &act) as f64, e4),
            ] {
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn f16_conversion_is_the_hardware_one_for_every_value() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            assert_eq!(f16_bits_to_f32(h).to_bits(), want.to_bits(), "{h:#06x}");
        }
    }

    #[test]
    fn the_order_follows_the_shape_as_llama_cpp_does() {
        assert_eq!(order(Format::Q6K, 896, 1, 0), Some(Order::Q6kLanes));
        assert_eq!(order(Format::Q6K, 896, 7, 6), Some(Order::Q6kLanes));
        assert_eq!(order(Format::Q6K, 896, 8, 0), Some(Order::Q6kTiled));
        assert_eq!(order(Format::Q4K, 896, 1, 0), Some(Order::Q4kBlocks));
        assert_eq!(order(Format::Q4K, 896, 3, 2), Some(Order::Q4kBlocks));
        assert_eq!(order(Format::Q4K, 896, 6, 3), Some(Order::Q4kPairs));
        assert_eq!(order(Format::Q4K, 896, 6, 4), Some(Order::Q4kBlocks));
        assert_eq!(order(Format::Q4K, 900, 6, 0), Some(Order::VecDot));
        assert_eq!(order(Format::Q4K, 900, 9, 0), Some(Order::Q4kTiled));
        assert_eq!(order(Format::Q8_0, 896, 9, 0), None);
    }
}
