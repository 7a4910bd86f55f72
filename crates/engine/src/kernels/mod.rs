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
//! activations differently from llama.cpp. Q4_K and Q6_K (the k-quant tensors of the Qwen
//! models: super-blocks of 256) pair with Q8_K activations, as in llama.cpp. Activation
//! quantization follows llama.cpp's `quantize_row_q8_1`, `quantize_row_q8_0` and
//! `quantize_row_q8_K` exactly, so our rounding is its rounding. Q4_0 (times Q8_0),
//! Q5_1 (times Q8_1) and Q5_K (times Q8_K) run in the order of llama.cpp's plain x86 dot
//! products, which llama.cpp itself leaves for other orders in some shapes (stage.rs).
//!
//! Products of several activation rows (prompts) run on tiles: one weight row against a
//! few activation rows at once, each weight block unpacked once for all of them (AVX2: 4
//! rows, `x86.rs`; AVX-512 VNNI: 16 rows, two per register, `avx512.rs`). Every entry of
//! a tile is bit for bit the single-row `vec_dot` of its pair (the same exact integer sums
//! and the same f32 operations in the same order per pair), so results do not depend on
//! the tiling or the threads. The k-quants are the exception by design: llama.cpp sums
//! them in a float order that depends on the shape of the product, and `kquant.rs`
//! follows it, so that our numbers stay its numbers; their tiles (`avx512.rs`) keep one
//! activation row per f32 lane and run that row's float steps in its order, and their
//! panels (Q4_K, Q6_K) put 16 weight rows in the lanes instead, for a whole work chunk of
//! weight rows times a tile — bit for bit the same results either way.
//!
//! One opt-in exception to llama.cpp's bits: with `--amx` (`SHOAL_AMX=1`) on a CPU with
//! AMX, products of at least 8 rows of every format of ours (the k-quants included) run
//! on AMX int8 tiles (`amx.rs`), their f32 steps in an order of their own.

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(feature = "bench")]
pub mod bench;
mod kquant;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(any(test, feature = "bench"))]
mod sample;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::{Device, Tensor};
use half::f16;

use crate::error::{EngineError, Result};
use crate::pool;

/// Elements per block of the 32-element formats (Q4_1, Q5_0, Q8_0, and Q8_0/Q8_1 rows).
pub(crate) const QK: usize = 32;
/// Elements per super-block of the k-quants (Q4_K, Q6_K, and Q8_K rows).
pub(crate) const QK_K: usize = 256;
/// Bytes of one Q4_0 block: f16 scale, 16 bytes of nibbles (value - 8).
pub(crate) const Q4_0_BLOCK_BYTES: usize = 18;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub(crate) const Q4_1_BLOCK_BYTES: usize = 20;
/// Bytes of one Q5_0 block: f16 scale, 32 high bits, 16 bytes of nibbles.
pub(crate) const Q5_0_BLOCK_BYTES: usize = 22;
/// Bytes of one Q5_1 block: f16 scale, f16 minimum, 32 high bits, 16 bytes of nibbles.
pub(crate) const Q5_1_BLOCK_BYTES: usize = 24;
/// Bytes of one Q8_0 block: f16 scale, 32 signed bytes.
pub(crate) const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes of one Q4_K super-block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales
/// and minimums (8 each), 128 bytes of nibbles.
pub(crate) const Q4_K_BLOCK_BYTES: usize = 144;
/// Bytes of one Q5_K super-block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales
/// and minimums, 32 bytes of high bits (`qh`), 128 bytes of nibbles.
pub(crate) const Q5_K_BLOCK_BYTES: usize = 176;
/// Bytes of one Q6_K super-block: 128 bytes of low nibbles (`ql`), 64 of high bit pairs
/// (`qh`), 16 signed scales, f16 `d` last.
pub(crate) const Q6_K_BLOCK_BYTES: usize = 210;

/// The weight formats with a kernel of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// The formats of 32-value blocks (one scale, and for some a minimum, per block).
#[cfg(test)]
pub(crate) const BLOCK_FORMATS: [Format; 5] = [
    Format::Q4_0,
    Format::Q4_1,
    Format::Q5_0,
    Format::Q5_1,
    Format::Q8_0,
];

/// How a format wants its activation rows quantized (llama.cpp's `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    Q8_0,
    Q8_1,
    Q8K,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => Q4_0_BLOCK_BYTES,
            Self::Q4_1 => Q4_1_BLOCK_BYTES,
            Self::Q5_0 => Q5_0_BLOCK_BYTES,
            Self::Q5_1 => Q5_1_BLOCK_BYTES,
            Self::Q8_0 => Q8_0_BLOCK_BYTES,
            Self::Q4K => Q4_K_BLOCK_BYTES,
            Self::Q5K => Q5_K_BLOCK_BYTES,
            Self::Q6K => Q6_K_BLOCK_BYTES,
        }
    }

    /// Elements per block.
    fn block_len(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => QK,
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }

    fn activation(self) -> Activation {
        match self {
            Self::Q4_1 | Self::Q5_1 => Activation::Q8_1,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => Activation::Q8_0,
            Self::Q4K | Self::Q5K | Self::Q6K => Activation::Q8K,
        }
    }
}

/// One row of activations quantized to 8 bits per block: a scale `d` per block, for Q8_1
/// also `s = d * sum(qs)` (both rounded through f16, as llama.cpp stores them), and 32
/// signed bytes per block. As Q8_K (`quantize_k`): blocks of 256, `d` kept in f32, and
/// `bsums`, the sum of each 16 bytes.
#[derive(Default)]
pub(crate) struct Q8Row {
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) qs: Vec<i8>,
    pub(crate) bsums: Vec<i16>,
}

impl Q8Row {
    /// llama.cpp's `quantize_row_q8_0` / `quantize_row_q8_1` (x86): `d = amax / 127`,
    /// `q = round_half_even(x * 127 / amax)`; `with_sums` adds the Q8_1 block sums.
    pub(crate) fn quantize(x: &[f32], with_sums: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // Safety: AVX2, FMA and F16C are there.
            return unsafe { Self::quantize_avx2(x, with_sums) };
        }
        Self::quantize_body(x, with_sums)
    }

    /// The same code compiled for AVX2, the rounding 32 values at a time
    /// (`x86::round_to_i8`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_avx2(x: &[f32], with_sums: bool) -> Self {
        // Safety: AVX2 is there (the caller checked).
        Self::quantize_with(x, with_sums, |block, id, qs| unsafe {
            x86::round_to_i8(block, id, qs)
        })
    }

    fn quantize_body(x: &[f32], with_sums: bool) -> Self {
        Self::quantize_with(x, with_sums, round_to_i8)
    }

    /// `quantize` with `round` turning a block into its 8-bit values.
    #[inline(always)]
    fn quantize_with(x: &[f32], with_sums: bool, round: impl Fn(&[f32], f32, &mut [i8])) -> Self {
        let nb = x.len() / QK;
        let mut row = Self {
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(if with_sums { nb } else { 0 }),
            qs: vec![0; nb * QK],
            bsums: Vec::new(),
        };
        for (b, block) in x.chunks_exact(QK).enumerate() {
            let amax = largest_magnitude(block);
            let d = amax / 127.0;
            // As llama.cpp's x86 code: multiply by 127/amax (not 1/d) and round half to
            // even (`_mm256_round_ps`), so the 8-bit values are its values.
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let qs = &mut row.qs[b * QK..(b + 1) * QK];
            round(block, id, qs);
            let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
            row.d.push(f16::from_f32(d).to_f32());
            if with_sums {
                row.s.push(f16::from_f32(d * sum as f32).to_f32());
            }
        }
        row
    }

    /// Each `k`-long row of `xs`, quantized as `kind` — on the pool's threads unless
    /// `serial`.
    fn quantize_rows(xs: &[f32], k: usize, kind: Activation, serial: bool) -> Vec<Self> {
        if serial {
            return xs
                .chunks(k)
                .map(|row| Self::quantize_as(row, kind))
                .collect();
        }
        let mut acts: Vec<Self> = (0..xs.len() / k).map(|_| Self::default()).collect();
        pool::for_each_chunk_mut(&mut acts, 1, |i, act| {
            act[0] = Self::quantize_as(&xs[i * k..][..k], kind);
        });
        acts
    }

    /// llama.cpp's `quantize_row_q8_K_ref`: per block of 256, `max` the value of largest
    /// magnitude, `q = nearest_int(-127 / max * x)` (ties to even, as its float trick
    /// rounds), `d = 1 / (-127 / max)` in f32, and the sums of each 16 `q`.
    pub(crate) fn quantize_k(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // Safety: AVX2, FMA and F16C are there.
            return unsafe { Self::quantize_k_avx2(x) };
        }
        Self::quantize_k_body(x)
    }

    /// The same code compiled for AVX2, the rounding 32 values at a time
    /// (`x86::round_to_i8`: the scalar cast checks every value for NaN on its own).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_k_avx2(x: &[f32]) -> Self {
        // Safety: AVX2 is there (the caller checked).
        Self::quantize_k_with(x, |block, iscale, qs| unsafe {
            x86::round_to_i8(block, iscale, qs)
        })
    }

    fn quantize_k_body(x: &[f32]) -> Self {
        Self::quantize_k_with(x, round_to_i8)
    }

    /// `quantize_k` with `round` turning a block into its 8-bit values.
    #[inline(always)]
    fn quantize_k_with(x: &[f32], round: impl Fn(&[f32], f32, &mut [i8])) -> Self {
        let nb = x.len() / QK_K;
        let mut row = Self {
            d: Vec::with_capacity(nb),
            s: Vec::new(),
            qs: vec![0; nb * QK_K],
            bsums: Vec::with_capacity(nb * QK_K / 16),
        };
        for (b, block) in x.chunks_exact(QK_K).enumerate() {
            // `max` is the first value of the largest magnitude, as the reference's strict
            // `>` keeps the first.
            let amax = largest_magnitude(block);
            let max = block
                .iter()
                .copied()
                .find(|v| v.abs() == amax)
                .unwrap_or(0.0);
            let qs = &mut row.qs[b * QK_K..(b + 1) * QK_K];
            if amax == 0.0 {
                row.d.push(0.0);
                row.bsums.extend([0i16; QK_K / 16]);
                continue;
            }
            let iscale = -127.0 / max;
            round(block, iscale, qs);
            row.bsums.extend(
                qs.chunks_exact(16)
                    .map(|c| c.iter().map(|&q| q as i16).sum::<i16>()),
            );
            row.d.push(1.0 / iscale);
        }
        row
    }

    fn quantize_as(x: &[f32], kind: Activation) -> Self {
        match kind {
            Activation::Q8_0 => Self::quantize(x, false),
            Activation::Q8_1 => Self::quantize(x, true),
            Activation::Q8K => Self::quantize_k(x),
        }
    }
}

/// A block's 8-bit values: `scale * x` rounded to nearest, ties to even, and kept within
/// -128..=127 (NaN, which no model should produce, becomes 0). The scale makes the
/// largest magnitude 127 (Q8_0, Q8_1: `127 / amax`; Q8_K: `-127 / max`, llama.cpp's
/// `nearest_int` with `MIN(127, …)`, the same values in that range).
#[inline(always)]
fn round_to_i8(block: &[f32], scale: f32, qs: &mut [i8]) {
    for (q, &v) in qs.iter_mut().zip(block) {
        *q = (scale * v).round_ties_even() as i8;
    }
}

/// The largest `|x|` of a block (0 for an empty or all-NaN one), 16 lanes at a time: a
/// maximum is the same in any order, and written as selects it vectorizes.
#[inline(always)]
fn largest_magnitude(block: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    for chunk in block.chunks_exact(16) {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v.abs() > *m { v.abs() } else { *m };
        }
    }
    lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m })
}

/// The activation rows of one tile of the AVX-512 kernels, interleaved by chunks of 32:
/// chunk `c` of every row in turn (`qs[(c * rows + r) * 32..]`: a block of the 32-element
/// formats is one chunk, a Q8_K super-block eight), so one 64-byte load brings the same
/// chunk of two rows. Scales `d[b * rows + r]`, Q8_1 sums `s[b * rows + r]`, and for
/// Q8_K the activation sum of each sub-block of 32 (`sums32[(b * rows + r) * 8 + j]`,
/// pairs of `bsums`). A short last tile is padded with zero rows.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Q8Tile {
    pub(crate) rows: usize,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) qs: Vec<i8>,
    pub(crate) sums32: Vec<i16>,
}

impl Q8Tile {
    /// The rows of a tile (at most `tile`) holding `n` activation rows: `n` rounded up to
    /// an even count (the AVX-512 kernels hold two rows per register), so a short tile —
    /// the few answers of a batched decode step, a prompt's last rows — runs a narrower
    /// kernel instead of multiplying rows of zeros.
    fn rows_for(n: usize, tile: usize) -> usize {
        n.div_ceil(2).clamp(1, tile / 2) * 2
    }

    fn new(group: &[Q8Row], rows: usize) -> Self {
        let nb = group[0].d.len();
        let chunks = group[0].qs.len() / QK;
        let k_quant = !group[0].bsums.is_empty();
        let sums = !group[0].s.is_empty();
        let mut t = Self {
            rows,
            d: vec![0.0; nb * rows],
            s: vec![0.0; if sums { nb * rows } else { 0 }],
            qs: vec![0; chunks * rows * QK],
            sums32: vec![0; if k_quant { nb * rows * 8 } else { 0 }],
        };
        for (r, row) in group.iter().enumerate() {
            for c in 0..chunks {
                t.qs[(c * rows + r) * QK..][..QK].copy_from_slice(&row.qs[c * QK..][..QK]);
            }
            for b in 0..nb {
                t.d[b * rows + r] = row.d[b];
                if sums {
                    t.s[b * rows + r] = row.s[b];
                }
                if k_quant {
                    for j in 0..8 {
                        t.sums32[(b * rows + r) * 8 + j] =
                            row.bsums[b * 16 + 2 * j].wrapping_add(row.bsums[b * 16 + 2 * j + 1]);
                    }
                }
            }
        }
        t
    }
}

/// A quantized matrix `[rows, cols]` in GGUF's block layout, row-major.
pub(crate) struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    /// The GGUF bytes of the whole matrix.
    data: Vec<u8>,
    /// The weights repacked for AMX tiles, made at the first product that takes them
    /// (amx.rs; only when the node asks for them).
    #[cfg(target_arch = "x86_64")]
    amx: std::sync::OnceLock<amx::Packed>,
}

fn check_size(format: Format, rows: usize, cols: usize, len: usize) -> Result<()> {
    let bl = format.block_len();
    if !cols.is_multiple_of(bl) || len != rows * cols / bl * format.block_bytes() {
        return Err(EngineError::InvalidInput(format!(
            "{format:?} data of {len} bytes does not make a {rows}x{cols} matrix"
        )));
    }
    Ok(())
}

/// Calls `f` with the values of `t` as one f32 slice: read in place when `t` is a
/// contiguous f32 tensor in memory — every activation here is — and copied only otherwise.
/// A prompt's activations are megabytes per layer (a 512-token chunk's MLP rows: 3 MiB
/// each), and copying them before every product raised a stage's peak memory by as much.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let Ok(all) = cpu.as_slice::<f32>() {
                if let Some(values) = all.get(start..end) {
                    return Ok(f(values));
                }
            }
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

impl QuantMatrix {
    pub(crate) fn from_bytes(
        format: Format,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        check_size(format, rows, cols, data.len())?;
        Ok(Self {
            format,
            rows,
            cols,
            data,
            #[cfg(target_arch = "x86_64")]
            amx: std::sync::OnceLock::new(),
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.format.block_len() * self.format.block_bytes()
    }

    /// Rows `ids` as f32, `[ids.len(), cols]`: an embedding lookup that leaves the table
    /// quantized.
    pub(crate) fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        let data: &[u8] = &self.data;
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                return Err(EngineError::InvalidInput(format!(
                    "row {id} of a matrix of {} rows",
                    self.rows
                )));
            }
            let row = &data[id * self.row_bytes()..][..self.row_bytes()];
            scalar::dequantize(self.format, row, &mut out);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
    }

    /// `x [.., cols] -> [.., rows]`: every input row times every matrix row.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul_segments(x, None)
    }

    /// `x [m, cols] -> [m, rows]` for the rows of several independent products stacked
    /// (the sessions of a batch): `segments` are their row counts, in order, summing to
    /// `m`. Each row gets exactly the numbers it would get in a product of its own segment
    /// alone: the k-quants' float order depends on the product's shape (kquant.rs), so it
    /// is chosen from the row's segment, not from `m`. The weights are still read once
    /// for all rows. `None` is one segment of every row.
    pub(crate) fn matmul_segments(&self, x: &Tensor, segments: Option<&[usize]>) -> Result<Tensor> {
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
        let whole = [m];
        let segments = segments.unwrap_or(&whole);
        if segments.iter().sum::<usize>() != m {
            return Err(EngineError::InvalidInput(format!(
                "segments of {segments:?} rows for a product of {m} rows"
            )));
        }
        let tiled = tiles_setting() != "pairwise";
        let out = with_f32(x, |xs| self.matmul_segments_f32(xs, segments, tiled))??;
        let mut shape = batch.to_vec();
        shape.push(self.rows);
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }

    /// `xs [m, cols] -> [m, rows]`. `tiled` multiplies each weight row by `TILE` activation
    /// rows at a time (bit for bit the same numbers); without it, one pair at a time.
    /// Never on AMX tiles, which give other numbers (amx.rs has their tests).
    #[cfg(any(test, feature = "bench"))]
    fn matmul_f32(&self, xs: &[f32], m: usize, tiled: bool) -> Result<Vec<f32>> {
        self.products(xs, &[m], tiled)
    }

    /// `matmul_f32` of stacked products of `segments` rows each (see `matmul_segments`):
    /// on AMX tiles where the node asked for them and some product is long enough
    /// (amx.rs), else on the kernels below.
    fn matmul_segments_f32(&self, xs: &[f32], segments: &[usize], tiled: bool) -> Result<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if tiled
            && amx::enabled()
            && amx::supports(self)
            && segments.iter().any(|&len| len >= amx::MIN_ROWS)
        {
            return self.products_on_amx(xs, segments);
        }
        self.products(xs, segments, tiled)
    }

    /// [`Self::products`], with the rows of products of at least [`amx::MIN_ROWS`] rows on
    /// AMX tiles; the rows of shorter ones (a decode batch's, a verification's single rows)
    /// gathered and multiplied as without AMX, so they keep their bits.
    #[cfg(target_arch = "x86_64")]
    fn products_on_amx(&self, xs: &[f32], segments: &[usize]) -> Result<Vec<f32>> {
        let (k, n) = (self.cols, self.rows);
        let m: usize = segments.iter().sum();
        let mut out = vec![0f32; m * n];
        let (mut short, mut short_segments, mut long) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        for &len in segments {
            if len >= amx::MIN_ROWS {
                long.push((start, len));
            } else if len > 0 {
                short_segments.push(len);
                short.extend(start..start + len);
            }
            start += len;
        }
        if !short.is_empty() {
            let gathered: Vec<f32> = short
                .iter()
                .flat_map(|&r| &xs[r * k..][..k])
                .copied()
                .collect();
            let got = self.products(&gathered, &short_segments, true)?;
            for (row, &r) in got.chunks_exact(n).zip(&short) {
                out[r * n..][..n].copy_from_slice(row);
            }
        }
        let kind = self.format.activation();
        let (mut tiles, mut placement) = (Vec::new(), Vec::new());
        for (first, len) in long {
            let acts = Q8Row::quantize_rows(&xs[first * k..][..len * k], k, kind, false);
            for (g, group) in acts.chunks(amx::ROWS).enumerate() {
                tiles.push(Q8Tile::new(group, amx::ROWS));
                placement.push((first + g * amx::ROWS, group.len()));
            }
        }
        let packed = self.amx.get_or_init(|| amx::Packed::new(self));
        packed.matmul(&tiles, &placement, &mut out);
        Ok(out)
    }

    /// The products of [`Self::matmul_segments_f32`] on the kernels that give every entry
    /// the bits of its pair's single-row dot product (or of llama.cpp's order for its
    /// shape, for the k-quants).
    fn products(&self, xs: &[f32], segments: &[usize], tiled: bool) -> Result<Vec<f32>> {
        let k = self.cols;
        let m: usize = segments.iter().sum();
        let data: &[u8] = &self.data;
        let kind = self.format.activation();
        // Even a cheap hand-off to the pool's threads costs more than the smallest
        // products: those run on the caller.
        let serial = pool::threads() <= 1 || m * self.rows * k < SERIAL_BELOW;
        let acts = Q8Row::quantize_rows(xs, k, kind, serial || m == 1);
        let n = self.rows;
        // One dot product per activation row: the k-quants follow llama.cpp's order,
        // which depends on the shape of the product (kquant.rs): that of the row's own
        // segment, its row count and the row's index within it.
        let vec_dot = vec_dot_fn(self.format);
        let format = self.format;
        let dots: Vec<VecDot> = segments
            .iter()
            .flat_map(|&len| {
                (0..len).map(move |i| {
                    kquant::order(format, n, len, i)
                        .map_or(vec_dot, |o| kquant::dot_for(o, vec_dot))
                })
            })
            .collect();
        let multi = multi_dot_fn(self.format).filter(|_| tiled && m > 1);
        let tiles: Vec<Q8Tile> = match multi {
            Some(Multi::Interleaved(_, tile)) => acts
                .chunks(tile)
                .map(|g| Q8Tile::new(g, Q8Tile::rows_for(g.len(), tile)))
                .collect(),
            _ => Vec::new(),
        };
        #[cfg(target_arch = "x86_64")]
        let k_tiles = k_tiles(&acts, segments, format, n, tiled);
        let row_bytes = self.row_bytes();
        // Parallel over chunks of matrix rows (each thread gets whole tiles), so each
        // weight row is read once from memory and reused for every activation row while
        // it is in cache. The result comes out transposed ([rows, m]) and is turned around
        // at the end when m > 1.
        const CHUNK: usize = 16;
        // A chunk is a whole k-quant panel.
        #[cfg(target_arch = "x86_64")]
        const _: () = assert!(CHUNK == avx512::PANEL);
        let work = |(c, dst): (usize, &mut [f32])| {
            let weight = |j: usize| &data[(c * CHUNK + j) * row_bytes..][..row_bytes];
            // Activation tiles outside, the chunk's weight rows (in cache) inside.
            match multi {
                Some(Multi::Rows(multi, tile)) => {
                    for (g, group) in acts.chunks(tile).enumerate() {
                        for j in 0..dst.len() / m {
                            multi(
                                weight(j),
                                group,
                                &mut dst[j * m + g * tile..][..group.len()],
                            );
                        }
                    }
                    return;
                }
                Some(Multi::Interleaved(multi, tile)) => {
                    let rows = &data[c * CHUNK * row_bytes..][..dst.len() / m * row_bytes];
                    for (g, t) in tiles.iter().enumerate() {
                        let n = tile.min(m - g * tile);
                        multi(rows, row_bytes, t, n, &mut dst[g * tile..], m);
                    }
                    return;
                }
                None => {}
            }
            #[cfg(target_arch = "x86_64")]
            if let Some((tiles, untiled)) = &k_tiles {
                let weight_rows = dst.len() / m;
                let mut lanes = [0f32; avx512::KQ_TILE];
                let mut panel_out = [0f32; avx512::PANEL * avx512::KQ_TILE];
                for (kernel, panel, tile, rows) in tiles {
                    if let Some(panel) = panel.filter(|_| weight_rows == avx512::PANEL) {
                        let chunk = &data[c * CHUNK * row_bytes..][..CHUNK * row_bytes];
                        panel(chunk, row_bytes, tile, &mut panel_out);
                        for (dst_row, by_tile_row) in dst
                            .chunks_mut(m)
                            .zip(panel_out.chunks_exact(avx512::KQ_TILE))
                        {
                            for (&i, &v) in rows.iter().zip(by_tile_row) {
                                dst_row[i] = v;
                            }
                        }
                        continue;
                    }
                    for (j, dst_row) in dst.chunks_mut(m).enumerate() {
                        kernel(weight(j), tile, &mut lanes);
                        for (&i, &v) in rows.iter().zip(&lanes) {
                            dst_row[i] = v;
                        }
                    }
                }
                for (j, dst_row) in dst.chunks_mut(m).enumerate() {
                    for &i in untiled {
                        dst_row[i] = dots[i](weight(j), &acts[i]);
                    }
                }
                return;
            }
            for (j, dst_row) in dst.chunks_mut(m).enumerate() {
                for ((out, act), dot) in dst_row.iter_mut().zip(&acts).zip(&dots) {
                    *out = dot(weight(j), act);
                }
            }
        };
        if m == 1 {
            // One activation row: the chunks are the output itself.
            let mut by_weight_row = vec![0f32; n];
            if serial {
                by_weight_row.chunks_mut(CHUNK).enumerate().for_each(work);
            } else {
                pool::for_each_chunk_mut(&mut by_weight_row, CHUNK, |c, dst| work((c, dst)));
            }
            return Ok(by_weight_row);
        }
        // Each chunk is computed by weight row ([rows, m]) and turned around into its
        // columns of the output ([m, n]) by the thread that computed it, while it is in
        // cache.
        let mut out = vec![0f32; m * n];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let chunk_then_turn = |c: usize| {
            let rows = CHUNK.min(n - c * CHUNK);
            let mut dst = vec![0f32; rows * m];
            work((c, &mut dst));
            for i in 0..m {
                for (jj, col) in dst.chunks_exact(m).enumerate() {
                    // Safety: chunk `c` owns columns `c * CHUNK ..` of every output row,
                    // which no other chunk writes; `out` outlives the loop.
                    unsafe { *out_ptr.get().add(i * n + c * CHUNK + jj) = col[i] };
                }
            }
        };
        let chunks = n.div_ceil(CHUNK);
        if serial {
            (0..chunks).for_each(chunk_then_turn);
        } else {
            pool::for_each(chunks, chunk_then_turn);
        }
        Ok(out)
    }
}

/// The output of a product, written by chunks into disjoint columns.
struct OutPtr(*mut f32);
// Safety: only used to write disjoint elements of one output from the pool's threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    // A method, so closures capture the whole (Sync) wrapper.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// A k-quant tile kernel: one weight row times a tile's rows, lane `r` into `out[r]`.
#[cfg(target_arch = "x86_64")]
type KTileDot = fn(&[u8], &avx512::KTile, &mut [f32]);

/// A k-quant panel kernel: `avx512::PANEL` whole weight rows (of the given length) times a
/// tile's rows, weight row `j` times tile row `r` into `out[j * KQ_TILE + r]`; bit for bit
/// its tile kernel.
#[cfg(target_arch = "x86_64")]
type KPanelDot = fn(&[u8], usize, &avx512::KTile, &mut [f32]);

/// A tile of activation rows with its kernels (a panel kernel where the format has one)
/// and the indices of its rows.
#[cfg(target_arch = "x86_64")]
type KTileJob<'a> = (KTileDot, Option<KPanelDot>, avx512::KTile<'a>, Vec<usize>);

/// K-quant rows whose order (`kquant::order`, from the row's own segment) has a tile
/// kernel on this CPU — a prompt's, or several decode steps' (a verification pass, sessions
/// batched) — in tiles of up to 16 rows of one order: per tile its kernel and the indices
/// of its rows, and the rows left to the single-row kernels. `None` where nothing is tiled.
#[cfg(target_arch = "x86_64")]
fn k_tiles<'a>(
    acts: &'a [Q8Row],
    segments: &[usize],
    format: Format,
    n: usize,
    tiled: bool,
) -> Option<(Vec<KTileJob<'a>>, Vec<usize>)> {
    use kquant::Order;
    let kernels: &[(Order, KTileDot, Option<KPanelDot>)] = match format {
        Format::Q4K => &[
            (
                Order::Q4kPairs,
                avx512::tile_q4_k_pairs,
                Some(avx512::panel_q4_k_pairs),
            ),
            (
                Order::Q4kBlocks,
                avx512::tile_q4_k_blocks,
                Some(avx512::panel_q4_k_blocks),
            ),
        ],
        Format::Q6K => &[
            (
                Order::Q6kTiled,
                avx512::tile_q6_k_tiled,
                Some(avx512::panel_q6_k_tiled),
            ),
            (Order::Q6kLanes, avx512::tile_q6_k_lanes, None),
        ],
        _ => return None,
    };
    if !tiled || !avx512::available() || tiles_setting() == "avx2" {
        return None;
    }
    // Each row's kernel, where its order has one.
    let mut by_row = Vec::with_capacity(acts.len());
    for &len in segments {
        for i in 0..len {
            let order = kquant::order(format, n, len, i);
            by_row.push(kernels.iter().position(|(o, _, _)| Some(*o) == order));
        }
    }
    let mut tiled_rows = vec![false; acts.len()];
    let mut tiles = Vec::new();
    for (k, &(_, kernel, panel)) in kernels.iter().enumerate() {
        let rows: Vec<usize> = (0..acts.len()).filter(|&i| by_row[i] == Some(k)).collect();
        // One row alone: the single-row kernel is faster than a tile (measured on Qwen 1.5B
        // decode, 30 against 21 tok/s: the tile's set-up and transposition are not shared).
        if rows.len() < 2 {
            continue;
        }
        for idx in rows.chunks(avx512::KQ_TILE) {
            let group: Vec<&Q8Row> = idx.iter().map(|&i| &acts[i]).collect();
            tiles.push((kernel, panel, avx512::KTile::new(&group), idx.to_vec()));
            for &i in idx {
                tiled_rows[i] = true;
            }
        }
    }
    if tiles.is_empty() {
        return None;
    }
    let untiled = (0..acts.len()).filter(|&i| !tiled_rows[i]).collect();
    Some((tiles, untiled))
}

/// Whether this CPU and OS offer the AMX int8 tiles `--amx` asks for (amx.rs); false off
/// x86-64.
pub fn amx_tiles_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// For measurements: `SHOAL_KERNEL_TILES=pairwise` sends prompts one (weight row,
/// activation row) pair at a time (the path before tiles), `avx2` keeps every AVX-512
/// kernel out (tiles, panels, single rows); unset, the fastest this CPU has. Every setting
/// gives the same bits. `pairwise` also keeps AMX tiles out (`--amx`, amx.rs).
pub(super) fn tiles_setting() -> &'static str {
    static SETTING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SETTING.get_or_init(|| std::env::var("SHOAL_KERNEL_TILES").unwrap_or_default())
}

/// Products with fewer multiply-adds than this run on the calling thread.
const SERIAL_BELOW: usize = 1 << 19;

type VecDot = fn(&[u8], &Q8Row) -> f32;

/// The fastest dot product this CPU runs for `format`.
fn vec_dot_fn(format: Format) -> VecDot {
    #[cfg(target_arch = "aarch64")]
    if neon::available() {
        match format {
            Format::Q4_0 => return neon::vec_dot_q4_0_q8_0,
            Format::Q4_1 => return neon::vec_dot_q4_1_q8_1,
            Format::Q5_0 => return neon::vec_dot_q5_0_q8_0,
            Format::Q5_1 => return neon::vec_dot_q5_1_q8_1,
            Format::Q8_0 => return neon::vec_dot_q8_0_q8_0,
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() && tiles_setting() != "avx2" {
            match format {
                Format::Q4_1 => return avx512::vec_dot_q4_1_q8_1,
                Format::Q5_0 => return avx512::vec_dot_q5_0_q8_0,
                Format::Q8_0 => return avx512::vec_dot_q8_0_q8_0,
                _ => {}
            }
        }
        if x86::available() {
            return match format {
                Format::Q4_0 => x86::vec_dot_q4_0_q8_0,
                Format::Q4_1 => x86::vec_dot_q4_1_q8_1,
                Format::Q5_0 => x86::vec_dot_q5_0_q8_0,
                Format::Q5_1 => x86::vec_dot_q5_1_q8_1,
                Format::Q8_0 => x86::vec_dot_q8_0_q8_0,
                Format::Q4K => x86::vec_dot_q4_k_q8_k,
                Format::Q5K => x86::vec_dot_q5_k_q8_k,
                Format::Q6K => kquant::dot_for(kquant::Order::Q6kLanes, scalar::vec_dot_q6_k_q8_k),
            };
        }
    }
    scalar_dot(format)
}

/// Dot products of one weight row with a few activation rows (at most the tile width):
/// `out[i]` is bit for bit `vec_dot(w, &acts[i])` of the same CPU.
type MultiDot = fn(&[u8], &[Q8Row], &mut [f32]);

/// Dot products of weight rows (`w`, whole rows of `row_bytes`) with the first `n` rows of
/// a `Q8Tile`, bit for bit `vec_dot` of each pair: weight row `j` times activation row `i`
/// into `out[j * stride + i]`.
type TileDot = fn(&[u8], usize, &Q8Tile, usize, &mut [f32], usize);

/// A multi-row kernel and its tile width (activation rows).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Multi {
    Rows(MultiDot, usize),
    Interleaved(TileDot, usize),
}

/// The fastest multi-row dot product this CPU runs for `format`; `None` where there is
/// none (the scalar path runs one pair at a time).
fn multi_dot_fn(format: Format) -> Option<Multi> {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() && tiles_setting() != "avx2" {
            let f: Option<TileDot> = match format {
                Format::Q4_0 => Some(avx512::tile_q4_0_q8_0),
                Format::Q4_1 => Some(avx512::tile_q4_1_q8_1),
                Format::Q5_0 => Some(avx512::tile_q5_0_q8_0),
                Format::Q5_1 => Some(avx512::tile_q5_1_q8_1),
                Format::Q8_0 => Some(avx512::tile_q8_0_q8_0),
                // The k-quants follow llama.cpp's shape-dependent order (kquant.rs).
                Format::Q4K | Format::Q6K => None,
                Format::Q5K => Some(avx512::tile_q5_k_q8_k),
            };
            if let Some(f) = f {
                let tile = if format.block_len() == QK_K {
                    avx512::K_TILE
                } else {
                    avx512::TILE
                };
                return Some(Multi::Interleaved(f, tile));
            }
        }
        if x86::available() {
            let f: MultiDot = match format {
                Format::Q4_0 => x86::dots_q4_0_q8_0,
                Format::Q4_1 => x86::dots_q4_1_q8_1,
                Format::Q5_0 => x86::dots_q5_0_q8_0,
                Format::Q5_1 => x86::dots_q5_1_q8_1,
                Format::Q8_0 => x86::dots_q8_0_q8_0,
                Format::Q5K => x86::dots_q5_k_q8_k,
                Format::Q4K | Format::Q6K => return None,
            };
            return Some(Multi::Rows(f, x86::TILE));
        }
    }
    let _ = format;
    None
}

fn scalar_dot(format: Format) -> VecDot {
    match format {
        Format::Q4_0 => scalar::vec_dot_q4_0_q8_0,
        Format::Q4_1 => scalar::vec_dot_q4_1_q8_1,
        Format::Q5_0 => scalar::vec_dot_q5_0_q8_0,
        Format::Q5_1 => scalar::vec_dot_q5_1_q8_1,
        Format::Q8_0 => scalar::vec_dot_q8_0_q8_0,
        Format::Q4K => scalar::vec_dot_q4_k_q8_k,
        Format::Q5K => scalar::vec_dot_q5_k_q8_k,
        Format::Q6K => scalar::vec_dot_q6_k_q8_k,
    }
}

#[cfg(test)]
mod tests {
    use super::sample::{random_blocks, random_f32, FORMATS};
    use super::*;

    #[test]
    fn activations_are_read_in_place_or_copied_with_the_same_values() {
        let t = Tensor::from_vec(
            (0..12).map(|i| i as f32).collect::<Vec<_>>(),
            (3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let all = with_f32(&t, <[f32]>::to_vec).unwrap();
        assert_eq!(all, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        // Rows 1..3: contiguous, at an offset into the storage.
        let rows = with_f32(&t.narrow(0, 1, 2).unwrap(), <[f32]>::to_vec).unwrap();
        assert_eq!(rows, (4..12).map(|i| i as f32).collect::<Vec<_>>());
        // Transposed: not contiguous, copied in row-major order of the view.
        let tr = with_f32(&t.t().unwrap(), <[f32]>::to_vec).unwrap();
        assert_eq!(tr, vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
        // Another dtype is an error, never its bytes read as f32.
        let ints = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(with_f32(&ints, <[f32]>::to_vec).is_err());
    }

    fn dequantize(format: Format, data: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        scalar::dequantize(format, data, &mut out);
        out
    }

    fn quantize_for(format: Format, x: &[f32]) -> Q8Row {
        Q8Row::quantize_as(x, format.activation())
    }

    /// Elements per activation scale: the error of one quantized activation is at most
    /// half the step of its block.
    fn act_block(format: Format) -> usize {
        match format.activation() {
            Activation::Q8K => QK_K,
            _ => QK,
        }
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
        // Ties round to even, as `_mm256_round_ps` does (`roundf` would give 3 and -3).
        let mut tie = [0f32; 32];
        tie[0] = 127.0;
        tie[1] = 2.5;
        tie[2] = -2.5;
        tie[3] = 3.5;
        let t = Q8Row::quantize(&tie, false);
        assert_eq!(&t.qs[..4], &[127, 2, -2, 4]);
        // An all-zero block quantizes to zeros, not NaN.
        let z = Q8Row::quantize(&[0.0; 32], true);
        assert_eq!((z.d[0], z.s[0]), (0.0, 0.0));
        assert!(z.qs.iter().all(|&v| v == 0));
    }

    #[test]
    fn scalar_dot_is_the_dot_of_the_dequantized_values() {
        for format in FORMATS {
            let cols = 512;
            let w = random_blocks(format, 1, cols, 7);
            let act = quantize_for(format, &random_f32(cols, 8));
            let deq = dequantize(format, &w);
            // The activations as the kernel sees them: q * d.
            let ab = act_block(format);
            let want: f32 = (0..cols)
                .map(|c| deq[c] * act.qs[c] as f32 * act.d[c / ab])
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
            for (cols, seed) in [
                (32usize, 1),
                (64, 2),
                (576, 3),
                (1536, 4),
                (4864, 5),
                (256, 6),
            ] {
                if !cols.is_multiple_of(format.block_len()) {
                    continue;
                }
                let w = random_blocks(format, 1, cols, seed);
                let act = quantize_for(format, &random_f32(cols, seed + 100));
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_single_rows_are_bit_identical_to_avx2() {
        if !avx512::available() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        type Pair = (Format, VecDot, VecDot);
        let pairs: [Pair; 3] = [
            (
                Format::Q4_1,
                avx512::vec_dot_q4_1_q8_1,
                x86::vec_dot_q4_1_q8_1,
            ),
            (
                Format::Q5_0,
                avx512::vec_dot_q5_0_q8_0,
                x86::vec_dot_q5_0_q8_0,
            ),
            (
                Format::Q8_0,
                avx512::vec_dot_q8_0_q8_0,
                x86::vec_dot_q8_0_q8_0,
            ),
        ];
        for (format, fast, avx2) in pairs {
            for (cols, seed) in [(32usize, 11), (96, 12), (896, 13), (4864, 14)] {
                for row in 0..8u64 {
                    let w = random_blocks(format, 1, cols, seed * 100 + row);
                    let act = quantize_for(format, &random_f32(cols, seed * 100 + row + 50));
                    let (got, want) = (fast(&w, &act), avx2(&w, &act));
                    assert_eq!(got.to_bits(), want.to_bits(), "{format:?} cols {cols}");
                }
            }
        }
        // The k-quants in llama.cpp's orders of a single row, against the AVX2 integer parts.
        use kquant::Order;
        for (format, order) in [
            (Format::Q4K, Order::Q4kBlocks),
            (Format::Q4K, Order::Q4kPairs),
            (Format::Q6K, Order::Q6kLanes),
        ] {
            let fast = kquant::dot_for(order, x86::vec_dot_q4_k_q8_k);
            let avx2 = kquant::portable(order, x86::vec_dot_q4_k_q8_k);
            for (cols, seed) in [(256usize, 15), (1536, 16), (8960, 17)] {
                for row in 0..8u64 {
                    let w = random_blocks(format, 1, cols, seed * 100 + row);
                    let act = quantize_for(format, &random_f32(cols, seed * 100 + row + 50));
                    let (got, want) = (fast(&w, &act), avx2(&w, &act));
                    assert_eq!(got.to_bits(), want.to_bits(), "{order:?} cols {cols}");
                }
            }
        }
    }

    #[test]
    fn simd_dots_give_the_same_bits_on_every_cpu() {
        #[cfg(target_arch = "x86_64")]
        let simd = x86::available();
        #[cfg(target_arch = "aarch64")]
        let simd = neon::available();
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let simd = false;
        if !simd {
            eprintln!("no SIMD kernels on this CPU: nothing to compare");
            return;
        }
        for format in BLOCK_FORMATS {
            for (cols, seed) in [(32usize, 21), (96, 22), (576, 23), (4864, 24)] {
                for row in 0..6u64 {
                    let w = random_blocks(format, 1, cols, seed * 100 + row);
                    let act = quantize_for(format, &random_f32(cols, seed * 100 + row + 50));
                    let want = scalar::lane_order_dot(format, &w, &act);
                    let got = vec_dot_fn(format)(&w, &act);
                    assert_eq!(got.to_bits(), want.to_bits(), "{format:?} cols {cols}");
                    #[cfg(target_arch = "x86_64")]
                    {
                        let avx2 = match format {
                            Format::Q4_0 => x86::vec_dot_q4_0_q8_0(&w, &act),
                            Format::Q4_1 => x86::vec_dot_q4_1_q8_1(&w, &act),
                            Format::Q5_0 => x86::vec_dot_q5_0_q8_0(&w, &act),
                            Format::Q5_1 => x86::vec_dot_q5_1_q8_1(&w, &act),
                            _ => x86::vec_dot_q8_0_q8_0(&w, &act),
                        };
                        assert_eq!(avx2.to_bits(), want.to_bits(), "AVX2 {format:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_rows_match_the_scalar_dot_including_the_tail_chunk() {
        for format in FORMATS {
            // 16 rows per work chunk: 37 leaves a tail of 5, 7 is all tail.
            for (rows, seed) in [(37, 61), (7, 62)] {
                let cols = 2 * format.block_len().max(QK_K);
                let data = random_blocks(format, rows, cols, seed);
                let w = QuantMatrix::from_bytes(format, rows, cols, data.clone()).unwrap();
                let x = random_f32(cols, seed + 1);
                let act = quantize_for(format, &x);
                let xt = Tensor::from_vec(x, (1, cols), &Device::Cpu).unwrap();
                let y = w.matmul(&xt).unwrap().to_vec2::<f32>().unwrap();
                let row_bytes = data.len() / rows;
                for (j, got) in y[0].iter().enumerate() {
                    let want = scalar_dot(format)(&data[j * row_bytes..][..row_bytes], &act);
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{format:?} rows {rows} row {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_matches_dequantized_f32_product() {
        for format in FORMATS {
            // 37 rows: not a multiple of the row chunk, so the tail chunk is exercised.
            let cols = if format.block_len() == QK_K { 512 } else { 96 };
            let (rows, m) = (37, 3);
            let ab = act_block(format);
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
                            let block = &x[i * cols + c / ab * ab..][..ab];
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
            let (rows, cols) = (5, 2 * format.block_len());
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
    fn q8_k_quantization_follows_llama_cpp_rules() {
        let mut x = random_f32(3 * QK_K, 11);
        x[700] = -3.0; // the largest magnitude of block 2 is negative
        x[720] = 3.0; // and comes first: it sets the scale's sign
        x[256..512].iter_mut().for_each(|v| *v = 0.0);
        let q = Q8Row::quantize_k(&x);
        assert_eq!((q.d.len(), q.qs.len(), q.bsums.len()), (3, 3 * QK_K, 48));
        for b in 0..3 {
            let block = &x[b * QK_K..(b + 1) * QK_K];
            let qs = &q.qs[b * QK_K..(b + 1) * QK_K];
            let max = block
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            if max == 0.0 {
                assert_eq!(q.d[b], 0.0);
                assert!(qs.iter().all(|&v| v == 0));
            } else {
                let iscale = -127.0 / max;
                assert_eq!(q.d[b], 1.0 / iscale);
                for (&v, &xv) in qs.iter().zip(block) {
                    assert_eq!(v as f32, (iscale * xv).round_ties_even().min(127.0));
                }
                // The value of largest magnitude lands on -127.
                assert!(qs.contains(&-127));
            }
            for (j, chunk) in qs.chunks(16).enumerate() {
                let sum: i32 = chunk.iter().map(|&v| v as i32).sum();
                assert_eq!(q.bsums[b * 16 + j] as i32, sum);
            }
        }
        // Ties go to even, as llama.cpp's `nearest_int`: max 127 makes iscale -1.
        let mut t = vec![0f32; QK_K];
        t[0] = 127.0;
        t[1] = 2.5;
        t[2] = -3.5;
        let q = Q8Row::quantize_k(&t);
        assert_eq!(&q.qs[..3], &[-127, -2, 4]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rounding_to_8_bits_with_avx2_equals_the_scalar_rounding() {
        if !x86::available() {
            return;
        }
        // As quantize_k calls it: the block's largest magnitude times `iscale` is 127.
        let x = random_f32(QK_K, 5);
        let max = x
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        // Values near the limits: ties both ways, the cap, past either end (a scale
        // that overshot), NaN.
        let mut near_cap: Vec<f32> = x.iter().map(|v| v * 127.0 / max.abs()).collect();
        near_cap[..7].copy_from_slice(&[2.5, -3.5, 126.5, 127.0, 127.4, 128.6, f32::NAN]);
        for (x, iscale) in [(&x, -127.0 / max), (&near_cap, 1.0), (&near_cap, -1.0)] {
            let (mut scalar, mut avx2) = (vec![0i8; QK_K], vec![0i8; QK_K]);
            round_to_i8(x, iscale, &mut scalar);
            // Safety: AVX2 is there.
            unsafe { x86::round_to_i8(x, iscale, &mut avx2) };
            assert_eq!(scalar, avx2, "iscale {iscale}");
        }
    }

    #[test]
    fn dequantization_matches_candle() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
        for (format, dtype) in [
            (Format::Q4K, GgmlDType::Q4K),
            (Format::Q6K, GgmlDType::Q6K),
            (Format::Q4_0, GgmlDType::Q4_0),
            (Format::Q5K, GgmlDType::Q5K),
            (Format::Q5_1, GgmlDType::Q5_1),
        ] {
            let (rows, cols) = (3, 3 * QK_K);
            let data = random_blocks(format, rows, cols, 31);
            let ours = dequantize(format, &data);
            let qt = qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu).unwrap();
            let theirs = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{format:?} element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn k_quant_matmul_matches_candle() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
        use candle_core::Module;
        for (format, dtype) in [(Format::Q4K, GgmlDType::Q4K), (Format::Q6K, GgmlDType::Q6K)] {
            let (rows, cols, m) = (19, 2 * QK_K, 2);
            let data = random_blocks(format, rows, cols, 41);
            let ours = QuantMatrix::from_bytes(format, rows, cols, data.clone()).unwrap();
            let qt = qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu).unwrap();
            let theirs = QMatMul::from_qtensor(qt).unwrap();
            let x = random_f32(m * cols, 42);
            let xt = Tensor::from_vec(x, (m, cols), &Device::Cpu).unwrap();
            let a = ours.matmul(&xt).unwrap().to_vec2::<f32>().unwrap();
            let b = theirs.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
            for i in 0..m {
                for j in 0..rows {
                    let tol = 1e-4 * b[i][j].abs().max(1.0);
                    assert!(
                        (a[i][j] - b[i][j]).abs() <= tol,
                        "{format:?} ({i},{j}): {} vs {}",
                        a[i][j],
                        b[i][j]
                    );
                }
            }
        }
    }

    #[test]
    fn multi_row_dots_are_bit_identical_to_single_row_dots() {
        if multi_dot_fn(Format::Q4_1).is_none() {
            return;
        }
        for format in FORMATS {
            // The k-quants have no tiles: their order depends on the product's shape.
            let Some(multi) = multi_dot_fn(format) else {
                continue;
            };
            let tile = match multi {
                Multi::Rows(_, t) | Multi::Interleaved(_, t) => t,
            };
            for (cols, seed) in [(256usize, 1), (512, 2), (1536, 3), (4864, 4), (32, 5)] {
                if !cols.is_multiple_of(format.block_len()) {
                    continue;
                }
                let w = random_blocks(format, 1, cols, seed);
                for n in 1..=tile {
                    let acts: Vec<Q8Row> = (0..n)
                        .map(|i| quantize_for(format, &random_f32(cols, seed * 10 + i as u64)))
                        .collect();
                    let mut out = vec![f32::NAN; n];
                    match multi {
                        Multi::Rows(f, _) => f(&w, &acts, &mut out),
                        Multi::Interleaved(f, _) => {
                            let t = Q8Tile::new(&acts, Q8Tile::rows_for(n, tile));
                            f(&w, w.len(), &t, n, &mut out, n)
                        }
                    }
                    for (got, act) in out.iter().zip(&acts) {
                        let want = vec_dot_fn(format)(&w, act);
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{format:?} cols {cols} n {n}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tiled_matmul_is_bit_identical_to_pairwise_on_any_thread_count() {
        for format in FORMATS {
            let cols = 2 * QK_K;
            // Rows not a multiple of the 16-row chunk, m not a multiple of the tile.
            for (rows, m, seed) in [
                (37, 2, 71),
                (37, 3, 72),
                (21, 5, 73),
                (16, 4, 74),
                (7, 9, 75),
                (40, 13, 76),
                (33, 64, 77),
                (17, 30, 78),
                // Whole chunks of 16 weight rows and several tiles: panels.
                (32, 40, 79),
            ] {
                let data = random_blocks(format, rows, cols, seed);
                let w = QuantMatrix::from_bytes(format, rows, cols, data.clone()).unwrap();
                let x = random_f32(m * cols, seed + 1);
                let pairwise = w.matmul_f32(&x, m, false).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                for threads in [1, 2, 3] {
                    let tiled = pool::with_threads(threads, || w.matmul_f32(&x, m, true).unwrap());
                    assert_eq!(
                        bits(&tiled),
                        bits(&pairwise),
                        "{format:?} {rows}x{cols} m {m}"
                    );
                }
                // And each entry is the dot of its pair in the order llama.cpp uses for
                // this shape (the single-row kernel, or the k-quants' own).
                let row_bytes = data.len() / rows;
                for (i, xi) in x.chunks(cols).enumerate() {
                    let act = quantize_for(format, xi);
                    let dot = kquant::order(format, rows, m, i).map_or(vec_dot_fn(format), |o| {
                        kquant::dot_for(o, vec_dot_fn(format))
                    });
                    for j in 0..rows {
                        let want = dot(&data[j * row_bytes..][..row_bytes], &act);
                        assert_eq!(pairwise[i * rows + j].to_bits(), want.to_bits());
                    }
                }
            }
        }
    }

    /// Stacked products (a verification pass's rows each a decode step, sessions batched):
    /// the tiles give every row the bits of its own segment's order.
    #[test]
    fn tiled_segments_are_bit_identical_to_each_rows_own_order() {
        for format in FORMATS {
            let cols = 3 * QK_K;
            for (rows, segments, seed) in [
                (32, vec![1; 9], 91),
                (40, vec![1, 1, 4, 1, 8, 2, 1], 92),
                (37, vec![1; 17], 93),
                (24, vec![3, 1, 1], 94),
                (48, vec![1; 20], 95),
            ] {
                let m: usize = segments.iter().sum();
                let data = random_blocks(format, rows, cols, seed);
                let w = QuantMatrix::from_bytes(format, rows, cols, data.clone()).unwrap();
                let x = random_f32(m * cols, seed + 1);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let pairwise = w.matmul_segments_f32(&x, &segments, false).unwrap();
                for threads in [1, 2] {
                    let tiled = pool::with_threads(threads, || {
                        w.matmul_segments_f32(&x, &segments, true).unwrap()
                    });
                    assert_eq!(
                        bits(&tiled),
                        bits(&pairwise),
                        "{format:?} {rows}x{cols} segments {segments:?}"
                    );
                }
                let row_bytes = data.len() / rows;
                let mut i = 0;
                for &len in &segments {
                    for within in 0..len {
                        let act = quantize_for(format, &x[i * cols..][..cols]);
                        let dot = kquant::order(format, rows, len, within)
                            .map_or(vec_dot_fn(format), |o| {
                                kquant::dot_for(o, vec_dot_fn(format))
                            });
                        for j in 0..rows {
                            let want = dot(&data[j * row_bytes..][..row_bytes], &act);
                            assert_eq!(
                                pairwise[i * rows + j].to_bits(),
                                want.to_bits(),
                                "{format:?} row {i}"
                            );
                        }
                        i += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_sizes_are_errors() {
        assert!(QuantMatrix::from_bytes(Format::Q4_1, 2, 33, vec![0; 40]).is_err());
        assert!(QuantMatrix::from_bytes(Format::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!(QuantMatrix::from_bytes(Format::Q5_0, 2, 32, vec![0; 40]).is_err());
        assert!(QuantMatrix::from_bytes(Format::Q4K, 1, 128, vec![0; 72]).is_err());
        assert!(QuantMatrix::from_bytes(Format::Q6K, 1, 256, vec![0; 209]).is_err());
        assert!(QuantMatrix::from_bytes(Format::Q6K, 1, 256, vec![0; 210]).is_ok());
        let w = QuantMatrix::from_bytes(Format::Q5_0, 2, 32, vec![0; 44]).unwrap();
        let x = Tensor::zeros((1, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(w.matmul(&x).is_err());
    }
}
