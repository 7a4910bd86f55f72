//! Plain reference kernels: the definition the SIMD paths are tested against.

use half::f16;

use super::{Format, Q8Row, Q4_1_BLOCK_BYTES, Q5_0_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dot product of one Q4_1 row (GGUF bytes) with one Q8_1 activation row, as
/// llama.cpp's `ggml_vec_dot_q4_1_q8_1`: `sum_b d_x d_y sum(q_x q_y) + m_x s_y`.
pub(super) fn vec_dot_q4_1_q8_1(w: &[u8], act: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(Q4_1_BLOCK_BYTES).enumerate() {
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        let qs = &block[4..];
        let y = &act.qs[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += (qs[j] & 0x0f) as i32 * y[j] as i32;
            sumi += (qs[j] >> 4) as i32 * y[j + QK / 2] as i32;
        }
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

/// Appends the f32 values of `w` (whole blocks of `format`) to `out`.
pub(super) fn dequantize(format: Format, w: &[u8], out: &mut Vec<f32>) {
    for block in w.chunks_exact(format.block_bytes()) {
        let d = f16_at(block, 0);
        match format {
            Format::Q4_1 => {
                let m = f16_at(block, 2);
                let qs = &block[4..];
                out.extend(qs.iter().map(|q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
            }
            Format::Q5_0 => out.extend(q5_0_values(block).map(|v| v as f32 * d)),
            Format::Q8_0 => out.extend(block[2..].iter().map(|&q| q as i8 as f32 * d)),
        }
    }
}
