//! Our own CPU kernels, for the quantized formats where candle's are slow or round
//! differently from llama.cpp.
//!
//! Layout follows candle's `quantized/`: block formats and a plain scalar reference here,
//! one file per instruction set with the same function names, chosen at run time (the
//! nodes of one swarm have different CPUs). Every SIMD path is tested against the scalar
//! reference on random blocks.
//!
//! Today: Q4_1 weights times Q8_1-quantized activations, the format of the default model
//! (SmolLM2-135M), for which candle has only a scalar loop. Activation quantization
//! follows llama.cpp's `quantize_row_q8_1` exactly, so our rounding is its rounding.

#![allow(unsafe_code)]

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// Elements per Q4_1 / Q8_1 block.
pub(crate) const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub(crate) const Q4_1_BLOCK_BYTES: usize = 20;

/// One row of activations quantized to Q8_1: per block a scale `d`, `s = d * sum(qs)`
/// (both rounded through f16, as llama.cpp stores them) and 32 signed bytes.
pub(crate) struct Q8_1Row {
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) qs: Vec<i8>,
}

impl Q8_1Row {
    /// llama.cpp's `quantize_row_q8_1`: `d = amax / 127`, `q = round(x / d)`.
    pub(crate) fn quantize(x: &[f32]) -> Self {
        let nb = x.len() / QK;
        let mut row = Self {
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(nb),
            qs: vec![0; nb * QK],
        };
        for (b, block) in x.chunks_exact(QK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in row.qs[b * QK..(b + 1) * QK].iter_mut().zip(block) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            row.d.push(f16::from_f32(d).to_f32());
            row.s.push(f16::from_f32(d * sum as f32).to_f32());
        }
        row
    }
}

/// A Q4_1 matrix `[rows, cols]` in GGUF's block layout, row-major.
pub(crate) struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Q4_1Matrix {
    pub(crate) fn from_bytes(rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * Q4_1_BLOCK_BYTES {
            return Err(EngineError::InvalidInput(format!(
                "Q4_1 data of {} bytes does not make a {rows}x{cols} matrix",
                data.len()
            )));
        }
        Ok(Self { rows, cols, data })
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * Q4_1_BLOCK_BYTES
    }

    /// `x [.., cols] -> [.., rows]`: every input row times every matrix row.
    pub(crate) fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (&k, batch) = dims
            .split_last()
            .ok_or_else(|| EngineError::InvalidInput("matmul of a scalar".into()))?;
        if k != self.cols {
            return Err(EngineError::InvalidInput(format!(
                "matmul of width {k} with a matrix of width {}",
                self.cols
            )));
        }
        let m: usize = batch.iter().product();
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let rows: Vec<Q8_1Row> = xs.par_chunks(k).map(Q8_1Row::quantize).collect();
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        let dot = vec_dot_fn();
        // Parallel over matrix rows, so each weight row is read once from memory and
        // reused for every activation row while it is in cache.
        const CHUNK: usize = 16;
        let mut transposed = vec![0f32; n * m];
        transposed
            .par_chunks_mut(CHUNK * m)
            .enumerate()
            .for_each(|(c, dst)| {
                let first = c * CHUNK;
                for (j, dst_row) in dst.chunks_mut(m).enumerate() {
                    let w = &self.data[(first + j) * self.row_bytes()..][..self.row_bytes()];
                    for (i, act) in rows.iter().enumerate() {
                        dst_row[i] = dot(w, act);
                    }
                }
            });
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = transposed[j * m + i];
            }
        }
        let mut shape = batch.to_vec();
        shape.push(n);
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }
}

type VecDot = fn(&[u8], &Q8_1Row) -> f32;

/// The fastest dot product this CPU runs.
fn vec_dot_fn() -> VecDot {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            return x86::vec_dot_q4_1_q8_1;
        }
    }
    scalar::vec_dot_q4_1_q8_1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream, so failures reproduce.
    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        }
    }

    fn random_q4_1(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut r = lcg(seed);
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((r() % 1000) as f32 / 20000.0);
            let m = f16::from_f32(-((r() % 1000) as f32) / 4000.0);
            data.extend_from_slice(&d.to_le_bytes());
            data.extend_from_slice(&m.to_le_bytes());
            for _ in 0..16 {
                data.push((r() & 0xff) as u8);
            }
        }
        data
    }

    fn random_f32(n: usize, seed: u64) -> Vec<f32> {
        let mut r = lcg(seed);
        (0..n)
            .map(|_| (r() % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }

    #[test]
    fn q8_1_quantization_matches_llama_cpp_rules() {
        let mut x = random_f32(64, 1);
        x[5] = 0.0;
        x[40..].iter_mut().for_each(|v| *v = 0.0); // an all-zero tail block part
        let q = Q8_1Row::quantize(&x);
        for b in 0..2 {
            let block = &x[b * QK..(b + 1) * QK];
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.d[b], f16::from_f32(amax / 127.0).to_f32());
            let sum: i32 = q.qs[b * QK..(b + 1) * QK].iter().map(|&v| v as i32).sum();
            assert_eq!(q.s[b], f16::from_f32(amax / 127.0 * sum as f32).to_f32());
            assert!(q.qs[b * QK..(b + 1) * QK].iter().any(|&v| v.abs() == 127));
        }
    }

    #[test]
    fn simd_dot_matches_scalar_on_random_blocks() {
        for (cols, seed) in [(32, 1), (64, 2), (576, 3), (1536, 4), (4864, 5)] {
            let w = random_q4_1(1, cols, seed);
            let act = Q8_1Row::quantize(&random_f32(cols, seed + 100));
            let want = scalar::vec_dot_q4_1_q8_1(&w, &act);
            let got = vec_dot_fn()(&w, &act);
            let tol = 1e-4 * want.abs().max(1.0);
            assert!((got - want).abs() <= tol, "cols {cols}: {got} vs {want}");
        }
    }

    #[test]
    fn matmul_matches_dequantized_f32_product() {
        let (rows, cols, m) = (37, 96, 3);
        let data = random_q4_1(rows, cols, 9);
        let w = Q4_1Matrix::from_bytes(rows, cols, data.clone()).unwrap();
        let x = random_f32(m * cols, 10);
        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
        let y = w.matmul(&xt).unwrap().to_vec2::<f32>().unwrap();
        // Reference: dequantize the weights and multiply in f32.
        let deq = scalar::dequantize_q4_1(&data);
        for i in 0..m {
            for j in 0..rows {
                let want: f32 = (0..cols).map(|c| x[i * cols + c] * deq[j * cols + c]).sum();
                // Activations are quantized to 8 bits: allow their rounding error.
                assert!(
                    (y[i][j] - want).abs() <= 0.02 * want.abs().max(1.0),
                    "({i},{j}): {} vs {want}",
                    y[i][j]
                );
            }
        }
    }

    #[test]
    fn malformed_sizes_are_errors() {
        assert!(Q4_1Matrix::from_bytes(2, 33, vec![0; 40]).is_err());
        assert!(Q4_1Matrix::from_bytes(2, 32, vec![0; 39]).is_err());
        let w = Q4_1Matrix::from_bytes(2, 32, vec![0; 40]).unwrap();
        let x = Tensor::zeros((1, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(w.matmul(&x).is_err());
    }
}
