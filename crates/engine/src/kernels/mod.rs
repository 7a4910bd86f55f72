//! Our own CPU kernels, for the quantized formats where candle's are slow or round
//! differently from llama.cpp.
//!
//! Layout follows candle's `quantized/`: block formats and a plain scalar reference here,
//! one file per instruction set with the same function names, chosen at run time (the
//! nodes of one swarm have different CPUs). Every SIMD path is tested against the scalar
//! reference on random blocks.
//!
//! Today: Q4_1 weights times Q8_1-quantized activations (the default model, SmolLM2-135M),
//! Q5_0 times Q8_0 (most of Qwen2.5-Coder-0.5B), for which candle has only a scalar
//! loop, and Q8_0 times Q8_0 (embeddings and LM heads), where candle's kernel rounds
//! activations differently from llama.cpp. Activation quantization follows llama.cpp's `quantize_row_q8_1`
//! and `quantize_row_q8_0` exactly, so our rounding is its rounding.

#![allow(unsafe_code)]

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// Elements per block, for every format here.
pub(crate) const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub(crate) const Q4_1_BLOCK_BYTES: usize = 20;
/// Bytes of one Q5_0 block: f16 scale, 32 high bits, 16 bytes of nibbles.
pub(crate) const Q5_0_BLOCK_BYTES: usize = 22;
/// Bytes of one Q8_0 block: f16 scale, 32 signed bytes.
pub(crate) const Q8_0_BLOCK_BYTES: usize = 34;

/// The weight formats with a kernel of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_1,
    Q5_0,
    Q8_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BLOCK_BYTES,
            Self::Q5_0 => Q5_0_BLOCK_BYTES,
            Self::Q8_0 => Q8_0_BLOCK_BYTES,
        }
    }
}

/// One row of activations quantized to 8 bits per block of 32: a scale `d` per block,
/// for Q8_1 also `s = d * sum(qs)` (both rounded through f16, as llama.cpp stores them),
/// and 32 signed bytes per block.
pub(crate) struct Q8Row {
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) qs: Vec<i8>,
}

impl Q8Row {
    /// llama.cpp's `quantize_row_q8_0` / `quantize_row_q8_1`: `d = amax / 127`,
    /// `q = round(x / d)`; `with_sums` adds the Q8_1 block sums.
    pub(crate) fn quantize(x: &[f32], with_sums: bool) -> Self {
        let nb = x.len() / QK;
        let mut row = Self {
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(if with_sums { nb } else { 0 }),
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
            if with_sums {
                row.s.push(f16::from_f32(d * sum as f32).to_f32());
            }
        }
        row
    }
}

/// A quantized matrix `[rows, cols]` in GGUF's block layout, row-major.
pub(crate) struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantMatrix {
    pub(crate) fn from_bytes(
        format: Format,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * format.block_bytes() {
            return Err(EngineError::InvalidInput(format!(
                "{format:?} data of {} bytes does not make a {rows}x{cols} matrix",
                data.len()
            )));
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    /// Rows `ids` as f32, `[ids.len(), cols]`: an embedding lookup that leaves the table
    /// quantized.
    pub(crate) fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                return Err(EngineError::InvalidInput(format!(
                    "row {id} of a matrix of {} rows",
                    self.rows
                )));
            }
            let row = &self.data[id * self.row_bytes()..][..self.row_bytes()];
            scalar::dequantize(self.format, row, &mut out);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
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
        let with_sums = self.format == Format::Q4_1; // Q8_1; the others pair with Q8_0
                                                     // Handing work to rayon's pool costs a wake-up and a hand-back (two context
                                                     // switches when the pool has one thread): small products run on the caller.
        let serial = rayon::current_num_threads() <= 1 || m * self.rows * k < SERIAL_BELOW;
        let acts: Vec<Q8Row> = if serial || m == 1 {
            xs.chunks(k)
                .map(|row| Q8Row::quantize(row, with_sums))
                .collect()
        } else {
            xs.par_chunks(k)
                .map(|row| Q8Row::quantize(row, with_sums))
                .collect()
        };
        let n = self.rows;
        let dot = vec_dot_fn(self.format);
        let row_bytes = self.row_bytes();
        // Parallel over matrix rows, so each weight row is read once from memory and
        // reused for every activation row while it is in cache. The result comes out
        // transposed ([rows, m]) and is turned around at the end when m > 1.
        const CHUNK: usize = 16;
        let mut by_weight_row = vec![0f32; n * m];
        let work = |(c, dst): (usize, &mut [f32])| {
            for (j, dst_row) in dst.chunks_mut(m).enumerate() {
                let w = &self.data[(c * CHUNK + j) * row_bytes..][..row_bytes];
                for (out, act) in dst_row.iter_mut().zip(&acts) {
                    *out = dot(w, act);
                }
            }
        };
        if serial {
            by_weight_row
                .chunks_mut(CHUNK * m)
                .enumerate()
                .for_each(work);
        } else {
            by_weight_row
                .par_chunks_mut(CHUNK * m)
                .enumerate()
                .for_each(work);
        }
        let out = if m == 1 {
            by_weight_row
        } else {
            let mut out = vec![0f32; m * n];
            for (j, row) in by_weight_row.chunks(m).enumerate() {
                for (i, v) in row.iter().enumerate() {
                    out[i * n + j] = *v;
                }
            }
            out
        };
        let mut shape = batch.to_vec();
        shape.push(n);
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }
}

/// Products with fewer multiply-adds than this run on the calling thread.
const SERIAL_BELOW: usize = 1 << 16;

type VecDot = fn(&[u8], &Q8Row) -> f32;

/// The fastest dot product this CPU runs for `format`.
fn vec_dot_fn(format: Format) -> VecDot {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            return match format {
                Format::Q4_1 => x86::vec_dot_q4_1_q8_1,
                Format::Q5_0 => x86::vec_dot_q5_0_q8_0,
                Format::Q8_0 => x86::vec_dot_q8_0_q8_0,
            };
        }
    }
    scalar_dot(format)
}

fn scalar_dot(format: Format) -> VecDot {
    match format {
        Format::Q4_1 => scalar::vec_dot_q4_1_q8_1,
        Format::Q5_0 => scalar::vec_dot_q5_0_q8_0,
        Format::Q8_0 => scalar::vec_dot_q8_0_q8_0,
    }
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

    /// Random blocks of `format`: random scales, minimums, nibbles and high bits.
    fn random_blocks(format: Format, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut r = lcg(seed);
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((r() % 1000) as f32 / 20000.0);
            data.extend_from_slice(&d.to_le_bytes());
            match format {
                Format::Q4_1 => {
                    let m = f16::from_f32(-((r() % 1000) as f32) / 4000.0);
                    data.extend_from_slice(&m.to_le_bytes());
                }
                Format::Q5_0 => {
                    data.extend_from_slice(&(r() as u32 ^ (r() as u32) << 16).to_le_bytes())
                }
                Format::Q8_0 => {}
            }
            let quant_bytes = if format == Format::Q8_0 { 32 } else { 16 };
            for _ in 0..quant_bytes {
                data.push((r() & 0xff) as u8);
            }
        }
        data
    }

    fn dequantize(format: Format, data: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        scalar::dequantize(format, data, &mut out);
        out
    }

    const FORMATS: [Format; 3] = [Format::Q4_1, Format::Q5_0, Format::Q8_0];

    fn random_f32(n: usize, seed: u64) -> Vec<f32> {
        let mut r = lcg(seed);
        (0..n)
            .map(|_| (r() % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    }

    #[test]
    fn q8_quantization_follows_llama_cpp_rules() {
        let mut x = random_f32(64, 1);
        x[5] = 0.0;
        x[40..].iter_mut().for_each(|v| *v = 0.0);
        let q = Q8Row::quantize(&x, true);
        let q0 = Q8Row::quantize(&x, false);
        assert!(q0.s.is_empty());
        assert_eq!(q.qs, q0.qs);
        for b in 0..2 {
            let block = &x[b * QK..(b + 1) * QK];
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.d[b], f16::from_f32(amax / 127.0).to_f32());
            let sum: i32 = q.qs[b * QK..(b + 1) * QK].iter().map(|&v| v as i32).sum();
            assert_eq!(q.s[b], f16::from_f32(amax / 127.0 * sum as f32).to_f32());
            assert!(q.qs[b * QK..(b + 1) * QK].iter().any(|&v| v.abs() == 127));
        }
        // An all-zero block quantizes to zeros, not NaN.
        let z = Q8Row::quantize(&[0.0; 32], true);
        assert_eq!((z.d[0], z.s[0]), (0.0, 0.0));
        assert!(z.qs.iter().all(|&v| v == 0));
    }

    #[test]
    fn scalar_dot_is_the_dot_of_the_dequantized_values() {
        for format in FORMATS {
            let cols = 256;
            let w = random_blocks(format, 1, cols, 7);
            let act = Q8Row::quantize(&random_f32(cols, 8), format == Format::Q4_1);
            let deq = dequantize(format, &w);
            // The activations as the kernel sees them: q * d.
            let want: f32 = (0..cols)
                .map(|c| deq[c] * act.qs[c] as f32 * act.d[c / QK])
                .sum();
            let got = scalar_dot(format)(&w, &act);
            // Q4_1 uses s rounded through f16 for the minimum's term.
            assert!(
                (got - want).abs() <= 2e-3 * want.abs().max(1.0),
                "{format:?}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn simd_dot_matches_scalar_on_random_blocks() {
        for format in FORMATS {
            for (cols, seed) in [(32, 1), (64, 2), (576, 3), (1536, 4), (4864, 5)] {
                let w = random_blocks(format, 1, cols, seed);
                let act = Q8Row::quantize(&random_f32(cols, seed + 100), format == Format::Q4_1);
                let want = scalar_dot(format)(&w, &act);
                let got = vec_dot_fn(format)(&w, &act);
                let tol = 1e-4 * want.abs().max(1.0);
                assert!(
                    (got - want).abs() <= tol,
                    "{format:?} cols {cols}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn matmul_matches_dequantized_f32_product() {
        for format in FORMATS {
            // 37 rows: not a multiple of the row chunk, so the tail chunk is exercised.
            let (rows, cols, m) = (37, 96, 3);
            let data = random_blocks(format, rows, cols, 9);
            let w = QuantMatrix::from_bytes(format, rows, cols, data.clone()).unwrap();
            let x = random_f32(m * cols, 10);
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            let y = w.matmul(&xt).unwrap().to_vec2::<f32>().unwrap();
            let single = w.matmul(&xt.get(1).unwrap().unsqueeze(0).unwrap()).unwrap();
            assert_eq!(single.to_vec2::<f32>().unwrap()[0], y[1]);
            let deq = dequantize(format, &data);
            for i in 0..m {
                for j in 0..rows {
                    let want: f32 = (0..cols).map(|c| x[i * cols + c] * deq[j * cols + c]).sum();
                    // Activations are rounded to 8 bits: each is off by at most half its
                    // block's step (amax / 127 / 2), plus f16 rounding of scales.
                    let bound: f32 = (0..cols)
                        .map(|c| {
                            let block = &x[i * cols + c / QK * QK..][..QK];
                            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                            deq[j * cols + c].abs() * (amax / 254.0 + 2e-3 * x[i * cols + c].abs())
                        })
                        .sum();
                    assert!(
                        (y[i][j] - want).abs() <= bound + 1e-5,
                        "{format:?} ({i},{j}): {} vs {want}",
                        y[i][j]
                    );
                }
            }
        }
    }

    #[test]
    fn rows_are_the_dequantized_rows() {
        for format in FORMATS {
            let (rows, cols) = (5, 64);
            let data = random_blocks(format, rows, cols, 21);
            let w = QuantMatrix::from_bytes(format, rows, cols, data.clone()).unwrap();
            let deq = dequantize(format, &data);
            let got = w.rows_f32(&[3, 0, 3]).unwrap().to_vec2::<f32>().unwrap();
            for (row, id) in got.iter().zip([3, 0, 3]) {
                assert_eq!(row.as_slice(), &deq[id * cols..(id + 1) * cols]);
            }
            assert!(w.rows_f32(&[5]).is_err());
        }
    }

    #[test]
    fn malformed_sizes_are_errors() {
        assert!(QuantMatrix::from_bytes(Format::Q4_1, 2, 33, vec![0; 40]).is_err());
        assert!(QuantMatrix::from_bytes(Format::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!(QuantMatrix::from_bytes(Format::Q5_0, 2, 32, vec![0; 40]).is_err());
        let w = QuantMatrix::from_bytes(Format::Q5_0, 2, 32, vec![0; 44]).unwrap();
        let x = Tensor::zeros((1, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(w.matmul(&x).is_err());
    }
}
