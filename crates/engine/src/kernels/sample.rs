//! Random but reproducible quantized blocks and activations: the inputs of the kernels'
//! tests and of the prefill benchmark (`benches/prefill_tiled.rs`).

use half::f16;

use super::{Format, QK, QK_K};

/// A deterministic pseudo-random stream, so failures reproduce.
pub(crate) fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s >> 33
    }
}

/// Random blocks of `format`: random scales, minimums, nibbles and high bits.
pub(crate) fn random_blocks(format: Format, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut r = lcg(seed);
    let mut data = Vec::new();
    if format.block_len() == QK_K {
        for _ in 0..rows * cols / QK_K {
            let d = f16::from_f32((r() % 1000) as f32 / 200000.0);
            let dmin = f16::from_f32((r() % 1000) as f32 / 400000.0);
            if format != Format::Q6K {
                data.extend_from_slice(&d.to_le_bytes());
                data.extend_from_slice(&dmin.to_le_bytes());
            }
            // Q4_K: packed scales, minimums, nibbles; Q5_K: the same with high bits
            // before the nibbles; Q6_K: ql, qh, signed scales.
            let quant_bytes = format.block_bytes() - if format == Format::Q6K { 2 } else { 4 };
            for _ in 0..quant_bytes {
                data.push((r() & 0xff) as u8);
            }
            if format == Format::Q6K {
                data.extend_from_slice(&d.to_le_bytes());
            }
        }
        return data;
    }
    for _ in 0..rows * cols / QK {
        let d = f16::from_f32((r() % 1000) as f32 / 20000.0);
        data.extend_from_slice(&d.to_le_bytes());
        if matches!(format, Format::Q4_1 | Format::Q5_1) {
            let m = f16::from_f32(-((r() % 1000) as f32) / 4000.0);
            data.extend_from_slice(&m.to_le_bytes());
        }
        if matches!(format, Format::Q5_0 | Format::Q5_1) {
            data.extend_from_slice(&(r() as u32 ^ (r() as u32) << 16).to_le_bytes())
        }
        let quant_bytes = if format == Format::Q8_0 { 32 } else { 16 };
        for _ in 0..quant_bytes {
            data.push((r() & 0xff) as u8);
        }
    }
    data
}

pub(crate) const FORMATS: [Format; 8] = [
    Format::Q4_0,
    Format::Q4_1,
    Format::Q5_0,
    Format::Q5_1,
    Format::Q8_0,
    Format::Q4K,
    Format::Q5K,
    Format::Q6K,
];

pub(crate) fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut r = lcg(seed);
    (0..n)
        .map(|_| (r() % 20001) as f32 / 10000.0 - 1.0)
        .collect()
}
