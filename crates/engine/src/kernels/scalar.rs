//! Plain reference kernels: the definition the SIMD paths are tested against.

use half::f16;

use super::{Q8_1Row, Q4_1_BLOCK_BYTES, QK};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dot product of one Q4_1 row (GGUF bytes) with one Q8_1 activation row, as
/// llama.cpp's `ggml_vec_dot_q4_1_q8_1`: `sum_b d_x d_y sum(q_x q_y) + m_x s_y`.
pub(super) fn vec_dot_q4_1_q8_1(w: &[u8], act: &Q8_1Row) -> f32 {
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

/// Q4_1 bytes to f32 values (tests and reference computations).
#[cfg(test)]
pub(super) fn dequantize_q4_1(w: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len() / Q4_1_BLOCK_BYTES * QK);
    for block in w.chunks_exact(Q4_1_BLOCK_BYTES) {
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        let qs = &block[4..];
        out.extend(qs.iter().map(|q| (q & 0x0f) as f32 * d + m));
        out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
    }
    out
}
