//! Plain reference kernels: the definition the SIMD paths are tested against.

use half::f16;

use super::{
    Format, Q8Row, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q4_K_BLOCK_BYTES, Q5_0_BLOCK_BYTES,
    Q5_1_BLOCK_BYTES, Q5_K_BLOCK_BYTES, Q6_K_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK, QK_K,
};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// A block of a 32-value format as integers, its scale and its minimum (0 for the formats
/// without one): what the AMX tiles multiply (amx.rs). `None` for the k-quants.
#[cfg(target_arch = "x86_64")]
pub(super) fn block_values(format: Format, block: &[u8]) -> Option<([i32; QK], f32, f32)> {
    let d = f16_at(block, 0);
    Some(match format {
        Format::Q4_0 => (q4_0_values(block), d, 0.0),
        Format::Q5_0 => (q5_0_values(block), d, 0.0),
        Format::Q5_1 => (q5_1_values(block), d, f16_at(block, 2)),
        Format::Q8_0 => (std::array::from_fn(|j| block[2 + j] as i8 as i32), d, 0.0),
        Format::Q4_1 => (q4_1_values(block), d, f16_at(block, 2)),
        Format::Q4K | Format::Q5K | Format::Q6K => return None,
    })
}

/// The 32 signed 4-bit values of a Q4_0 block: nibble minus 8, low nibbles first.
fn q4_0_values(block: &[u8]) -> [i32; QK] {
    let qs = &block[2..];
    let mut v = [0i32; QK];
    for j in 0..QK / 2 {
        v[j] = (qs[j] & 0x0f) as i32 - 8;
        v[j + QK / 2] = (qs[j] >> 4) as i32 - 8;
    }
    v
}

/// Dot product of one Q4_0 row with one Q8_0 activation row, as llama.cpp's
/// `ggml_vec_dot_q4_0_q8_0`: `sum_b d_x d_y sum(q_x q_y)`.
pub(super) fn vec_dot_q4_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q4_0_BLOCK_BYTES).enumerate() {
        let d = f16_at(block, 0);
        let y = &act.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = q4_0_values(block)
            .iter()
            .zip(y)
            .map(|(x, y)| x * *y as i32)
            .sum();
        sum += sumi as f32 * d * act.d[b];
    }
    sum
}

/// The 32 unsigned 5-bit values of a Q5_1 block: nibble plus high bit.
fn q5_1_values(block: &[u8]) -> [i32; QK] {
    let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    let qs = &block[8..];
    let mut v = [0i32; QK];
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        v[j] = ((qs[j] & 0x0f) as u32 | h0) as i32;
        v[j + QK / 2] = ((qs[j] >> 4) as u32 | h1) as i32;
    }
    v
}

/// Dot product of one Q5_1 row with one Q8_1 activation row, as llama.cpp's
/// `ggml_vec_dot_q5_1_q8_1`: `sum_b d_x d_y sum(q_x q_y) + m_x s_y`.
pub(super) fn vec_dot_q5_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q5_1_BLOCK_BYTES).enumerate() {
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        let y = &act.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = q5_1_values(block)
            .iter()
            .zip(y)
            .map(|(x, y)| x * *y as i32)
            .sum();
        sum += sumi as f32 * d * act.d[b] + m * act.s[b];
    }
    sum
}

/// The 32 unsigned 4-bit values of a Q4_1 block, low nibbles first.
fn q4_1_values(block: &[u8]) -> [i32; QK] {
    let qs = &block[4..];
    let mut v = [0i32; QK];
    for j in 0..QK / 2 {
        v[j] = (qs[j] & 0x0f) as i32;
        v[j + QK / 2] = (qs[j] >> 4) as i32;
    }
    v
}

/// Dot product of one Q4_1 row (GGUF bytes) with one Q8_1 activation row, as
/// llama.cpp's `ggml_vec_dot_q4_1_q8_1`: `sum_b d_x d_y sum(q_x q_y) + m_x s_y`.
pub(super) fn vec_dot_q4_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q4_1_BLOCK_BYTES).enumerate() {
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        let y = &act.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = q4_1_values(block)
            .iter()
            .zip(y)
            .map(|(x, y)| x * *y as i32)
            .sum();
        sum += sumi as f32 * d * act.d[b] + m * act.s[b];
    }
    sum
}

/// The 32 signed 5-bit values of a Q5_0 block: nibble plus high bit, minus 16.
fn q5_0_values(block: &[u8]) -> [i32; QK] {
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..];
    let mut v = [0i32; QK];
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        v[j] = ((qs[j] & 0x0f) as u32 | h0) as i32 - 16;
        v[j + QK / 2] = ((qs[j] >> 4) as u32 | h1) as i32 - 16;
    }
    v
}

/// Dot product of one Q5_0 row with one Q8_0 activation row, as llama.cpp's
/// `ggml_vec_dot_q5_0_q8_0`: `sum_b d_x d_y sum(q_x q_y)`.
pub(super) fn vec_dot_q5_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q5_0_BLOCK_BYTES).enumerate() {
        let d = f16_at(block, 0);
        let y = &act.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = q5_0_values(block)
            .iter()
            .zip(y)
            .map(|(x, y)| x * *y as i32)
            .sum();
        sum += sumi as f32 * d * act.d[b];
    }
    sum
}

/// Dot product of one Q8_0 row with one Q8_0 activation row, as llama.cpp's
/// `ggml_vec_dot_q8_0_q8_0`: `sum_b d_x d_y sum(q_x q_y)`.
pub(super) fn vec_dot_q8_0_q8_0(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
        let d = f16_at(block, 0);
        let y = &act.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = block[2..]
            .iter()
            .zip(y)
            .map(|(&x, &y)| x as i8 as i32 * y as i32)
            .sum();
        sum += sumi as f32 * d * act.d[b];
    }
    sum
}

/// Scale and minimum `j` (0..8) of a Q4_K super-block, from its 12 bytes of packed 6-bit
/// values: llama.cpp's `get_scale_min_k4`.
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 256 unsigned 4-bit values of a Q4_K super-block, in element order: each 32 bytes
/// of `qs` hold 64 values, low nibbles first.
fn q4_k_values(block: &[u8]) -> [u8; QK_K] {
    let qs = &block[16..];
    let mut v = [0u8; QK_K];
    for (c, chunk) in qs.chunks_exact(32).enumerate() {
        for (l, &q) in chunk.iter().enumerate() {
            v[c * 64 + l] = q & 0x0f;
            v[c * 64 + 32 + l] = q >> 4;
        }
    }
    v
}

/// Dot product of one Q4_K row with one Q8_K activation row, as llama.cpp's
/// `ggml_vec_dot_q4_K_q8_K`: per super-block `d_x d_y sum_j sc_j sum(q_x q_y)` minus
/// `dmin_x d_y sum_j m_j sum(q_y)`, both inner sums exact in integers.
pub(super) fn vec_dot_q4_k_q8_k(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q4_K_BLOCK_BYTES).enumerate() {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let scales = &block[4..16];
        let x = q4_k_values(block);
        let y = &act.qs[b * QK_K..(b + 1) * QK_K];
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..QK_K / 32 {
            let (sc, m) = scale_min_k4(j, scales);
            let dot: i32 = (j * 32..(j + 1) * 32)
                .map(|i| x[i] as i32 * y[i] as i32)
                .sum();
            isum += sc as i32 * dot;
            // The sum of the activations of this sub-block, from the two 16-sums.
            let ysum = act.bsums[b * 16 + 2 * j] as i32 + act.bsums[b * 16 + 2 * j + 1] as i32;
            msum += m as i32 * ysum;
        }
        let dy = act.d[b];
        sum += d * dy * isum as f32 - dmin * dy * msum as f32;
    }
    sum
}

/// The 256 unsigned 5-bit values of a Q5_K super-block, in element order: each 32 bytes
/// of `qs` hold 64 values, low nibbles first; the high bit of value `64c + l` is bit `2c`
/// of `qh[l]`, of value `64c + 32 + l` bit `2c + 1`.
fn q5_k_values(block: &[u8]) -> [u8; QK_K] {
    let (qh, qs) = (&block[16..48], &block[48..]);
    let mut v = [0u8; QK_K];
    for (c, chunk) in qs.chunks_exact(32).enumerate() {
        for (l, &q) in chunk.iter().enumerate() {
            v[c * 64 + l] = (q & 0x0f) | (((qh[l] >> (2 * c)) & 1) << 4);
            v[c * 64 + 32 + l] = (q >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
        }
    }
    v
}

/// Dot product of one Q5_K row with one Q8_K activation row, as llama.cpp's
/// `ggml_vec_dot_q5_K_q8_K`: per super-block `d_x d_y sum_j sc_j sum(q_x q_y)` minus
/// `dmin_x d_y sum_j m_j sum(q_y)`, both inner sums exact in integers.
pub(super) fn vec_dot_q5_k_q8_k(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q5_K_BLOCK_BYTES).enumerate() {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let scales = &block[4..16];
        let x = q5_k_values(block);
        let y = &act.qs[b * QK_K..(b + 1) * QK_K];
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..QK_K / 32 {
            let (sc, m) = scale_min_k4(j, scales);
            let dot: i32 = (j * 32..(j + 1) * 32)
                .map(|i| x[i] as i32 * y[i] as i32)
                .sum();
            isum += sc as i32 * dot;
            let ysum = act.bsums[b * 16 + 2 * j] as i32 + act.bsums[b * 16 + 2 * j + 1] as i32;
            msum += m as i32 * ysum;
        }
        let dy = act.d[b];
        sum += d * dy * isum as f32 - dmin * dy * msum as f32;
    }
    sum
}

/// The 256 signed 6-bit values of a Q6_K super-block (`ql` low nibbles, `qh` high bit
/// pairs, minus 32), in element order, as llama.cpp's `dequantize_row_q6_K` reads them.
fn q6_k_values(block: &[u8]) -> [i32; QK_K] {
    let (ql, qh) = (&block[..128], &block[128..192]);
    let mut v = [0i32; QK_K];
    for half in 0..2 {
        let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
        let y = &mut v[half * 128..];
        for l in 0..32 {
            y[l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            y[l + 32] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
        }
    }
    v
}

/// One Q6_K super-block times Q8_K values (`q8`, `bsums` of that super-block) as
/// integer totals in the 8 lanes of llama.cpp's AVX2 loop: lane `n` holds elements
/// `4n..4n+3` of every 32 (unsigned 6-bit values times the scale of their 16), minus
/// 32 × the scaled activation sums of sub-blocks `2n` and `2n + 1` (the format's `- 32`).
pub(super) fn q6_k_lane_totals(block: &[u8], q8: &[i8], bsums: &[i16]) -> [i32; 8] {
    let x = q6_k_values(block);
    let scale = |j: usize| block[192 + j] as i8 as i32;
    let mut lanes = [0i32; 8];
    for (e, (&v, &q)) in x.iter().zip(q8).enumerate() {
        lanes[(e % 32) / 4] += scale(e / 16) * (v + 32) * q as i32;
    }
    for (n, lane) in lanes.iter_mut().enumerate() {
        *lane -=
            32 * (bsums[2 * n] as i32 * scale(2 * n) + bsums[2 * n + 1] as i32 * scale(2 * n + 1));
    }
    lanes
}

/// One Q4_K super-block times Q8_K values: per pair of sub-blocks of 32 (64 elements),
/// the scaled integer sum and the minimums times the activation sums.
pub(super) fn q4_k_pair_totals(block: &[u8], q8: &[i8], bsums: &[i16]) -> ([i32; 4], [i32; 4]) {
    let x = q4_k_values(block);
    let (mut sums, mut mins) = ([0i32; 4], [0i32; 4]);
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &block[4..16]);
        let dot: i32 = (j * 32..(j + 1) * 32)
            .map(|i| x[i] as i32 * q8[i] as i32)
            .sum();
        sums[j / 2] += sc as i32 * dot;
        mins[j / 2] += m as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
    }
    (sums, mins)
}

/// A k-quant super-block read out for the AMX tiles (amx.rs): its 256 values (unsigned
/// for Q4_K and Q5_K, signed for Q6_K), each sub-block's integer scale (Q6_K's 16
/// sub-blocks of 16; the first 8 for the others' sub-blocks of 32) and (Q4_K, Q5_K)
/// minimum (0 for Q6_K), `d` and `dmin` (0 for Q6_K).
#[cfg(target_arch = "x86_64")]
pub(super) struct SuperBlock {
    pub(super) values: [i32; QK_K],
    pub(super) scales: [i8; 16],
    pub(super) mins: [i8; 8],
    pub(super) d: f32,
    pub(super) dmin: f32,
}

/// A k-quant super-block as [`SuperBlock`]; `None` for the 32-value formats.
#[cfg(target_arch = "x86_64")]
pub(super) fn super_block(format: Format, block: &[u8]) -> Option<SuperBlock> {
    let widen = |v: [u8; QK_K]| v.map(i32::from);
    let values = match format {
        Format::Q4K => widen(q4_k_values(block)),
        Format::Q5K => widen(q5_k_values(block)),
        Format::Q6K => {
            return Some(SuperBlock {
                values: q6_k_values(block),
                scales: std::array::from_fn(|j| block[192 + j] as i8),
                mins: [0; 8],
                d: f16_at(block, 208),
                dmin: 0.0,
            })
        }
        _ => return None,
    };
    // Q4_K and Q5_K: 6-bit scales and minimums, so they fit in i8.
    let (mut scales, mut mins) = ([0i8; 16], [0i8; 8]);
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &block[4..16]);
        (scales[j], mins[j]) = (sc as i8, m as i8);
    }
    Some(SuperBlock {
        values,
        scales,
        mins,
        d: f16_at(block, 0),
        dmin: f16_at(block, 2),
    })
}

/// Dot product of one Q6_K row with one Q8_K activation row, as llama.cpp's
/// `ggml_vec_dot_q6_K_q8_K`: per super-block `d_x d_y sum_j sc_j sum(q_x q_y)` over the
/// 16 sub-blocks of 16, the inner sum exact in integers.
pub(super) fn vec_dot_q6_k_q8_k(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q6_K_BLOCK_BYTES).enumerate() {
        let d = f16_at(block, 208);
        let x = q6_k_values(block);
        let y = &act.qs[b * QK_K..(b + 1) * QK_K];
        let mut isum = 0i32;
        for j in 0..QK_K / 16 {
            let sc = block[192 + j] as i8 as i32;
            let dot: i32 = (j * 16..(j + 1) * 16).map(|i| x[i] * y[i] as i32).sum();
            isum += sc * dot;
        }
        sum += d * act.d[b] * isum as f32;
    }
    sum
}

/// Appends the f32 values of `w` (whole blocks of `format`) to `out`.
pub(super) fn dequantize(format: Format, w: &[u8], out: &mut Vec<f32>) {
    for block in w.chunks_exact(format.block_bytes()) {
        match format {
            Format::Q4_1 => {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                let qs = &block[4..];
                out.extend(qs.iter().map(|q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
            }
            // As llama.cpp's `dequantize_row_q4_0`: `(q - 8) d`.
            Format::Q4_0 => {
                let d = f16_at(block, 0);
                out.extend(q4_0_values(block).map(|v| v as f32 * d));
            }
            Format::Q5_0 => {
                let d = f16_at(block, 0);
                out.extend(q5_0_values(block).map(|v| v as f32 * d));
            }
            // As llama.cpp's `dequantize_row_q5_1`: `q d + m`.
            Format::Q5_1 => {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                out.extend(q5_1_values(block).map(|v| v as f32 * d + m));
            }
            Format::Q8_0 => {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| q as i8 as f32 * d));
            }
            // As llama.cpp's `dequantize_row_q4_K`: `d sc_j q - dmin m_j`.
            Format::Q4K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let x = q4_k_values(block);
                for (j, v) in x.chunks_exact(32).enumerate() {
                    let (sc, m) = scale_min_k4(j, &block[4..16]);
                    let (d1, m1) = (d * sc as f32, dmin * m as f32);
                    out.extend(v.iter().map(|&q| d1 * q as f32 - m1));
                }
            }
            // As llama.cpp's `dequantize_row_q5_K`: `d sc_j q - dmin m_j`.
            Format::Q5K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let x = q5_k_values(block);
                for (j, v) in x.chunks_exact(32).enumerate() {
                    let (sc, m) = scale_min_k4(j, &block[4..16]);
                    let (d1, m1) = (d * sc as f32, dmin * m as f32);
                    out.extend(v.iter().map(|&q| d1 * q as f32 - m1));
                }
            }
            // As llama.cpp's `dequantize_row_q6_K`: `d sc_j q`.
            Format::Q6K => {
                let d = f16_at(block, 208);
                let x = q6_k_values(block);
                for (j, v) in x.chunks_exact(16).enumerate() {
                    let ds = d * (block[192 + j] as i8 as f32);
                    out.extend(v.iter().map(|&q| ds * q as f32));
                }
            }
        }
    }
}

/// The 32-element formats' dot products in the SIMD kernels' float order (x86 and NEON):
/// eight lanes of 4-product integer sums per block, `fma(d_w·d_a, lane, acc)` per lane, the
/// lanes added ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)); Q4_1's `m·s` terms summed on the
/// side (Q4_1, Q5_1). The SIMD paths must give these bits exactly, on every CPU.
#[cfg(test)]
pub(super) fn lane_order_dot(format: Format, w: &[u8], act: &Q8Row) -> f32 {
    let block_bytes = format.block_bytes();
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (b, block) in w.chunks_exact(block_bytes).enumerate() {
        let values: [i32; QK] = match format {
            Format::Q4_1 => {
                summs += f16_at(block, 2) * act.s[b];
                std::array::from_fn(|i| {
                    let q = block[4 + i % 16];
                    (if i < 16 { q & 0x0f } else { q >> 4 }) as i32
                })
            }
            Format::Q5_0 => q5_0_values(block),
            Format::Q4_0 => q4_0_values(block),
            Format::Q5_1 => {
                summs += f16_at(block, 2) * act.s[b];
                q5_1_values(block)
            }
            Format::Q8_0 => std::array::from_fn(|i| block[2 + i] as i8 as i32),
            other => panic!("no lane order for {other:?}"),
        };
        let dd = f16_at(block, 0) * act.d[b];
        for (l, a) in acc.iter_mut().enumerate() {
            let lane: i32 = (4 * l..4 * l + 4)
                .map(|i| values[i] * act.qs[b * QK + i] as i32)
                .sum();
            *a = dd.mul_add(lane as f32, *a);
        }
    }
    let sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    if matches!(format, Format::Q4_1 | Format::Q5_1) {
        sum + summs
    } else {
        sum
    }
}
