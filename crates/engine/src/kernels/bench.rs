//! Measurements of the kernels that need their private parts, for `benches/`; built only
//! with the `bench` feature. Not tests: they print times and assert nothing.

use std::time::Instant;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};

use crate::error::Result;

use super::sample::{random_blocks, random_f32, FORMATS};
use super::{pool, Format, QuantMatrix};

/// The prompt matmul one pair at a time against the tiled one (and candle's `QMatMul` for
/// the k-quants) on the shapes of Qwen2.5-Coder-0.5B, fastest of a few runs; `only` names
/// one format (`Q4K`, …).
pub fn prefill_tiled_against_pairwise(only: Option<&str>) -> Result<()> {
    for format in FORMATS {
        if only.is_some_and(|f| f != format!("{format:?}")) {
            continue;
        }
        for (rows, cols) in [(896usize, 896usize), (4864, 896), (896, 4864)] {
            if !cols.is_multiple_of(format.block_len()) {
                continue;
            }
            let data = random_blocks(format, rows, cols, 91);
            let w = QuantMatrix::from_bytes(format, rows, cols, data.clone())?;
            let candle = match format {
                Format::Q4K => Some(GgmlDType::Q4K),
                Format::Q6K => Some(GgmlDType::Q6K),
                _ => None,
            }
            .map(|dtype| {
                let qt = qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu)?;
                QMatMul::from_qtensor(qt)
            })
            .transpose()?;
            for m in [64, 512] {
                let x = random_f32(m * cols, 92);
                let runs = if m == 64 { 5 } else { 2 };
                let a = fastest(runs, || w.matmul_f32(&x, m, false).map(drop))?;
                let b = fastest(runs, || w.matmul_f32(&x, m, true).map(drop))?;
                let c = match &candle {
                    Some(g) => {
                        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu)?;
                        Some(fastest(runs, || Ok(g.forward(&xt).map(drop)?))?)
                    }
                    None => None,
                };
                let gmacs = (m * rows * cols) as f64 / 1e9;
                println!(
                    "{format:?} {rows}x{cols} m={m} threads={}: pairwise {:.2} ms, tiled {:.2} ms ({:.1} GMAC/s), speed-up {:.2}{}",
                    pool::threads(),
                    a * 1e3,
                    b * 1e3,
                    gmacs / b,
                    a / b,
                    c.map(|c| format!(", candle {:.2} ms, candle/tiled {:.2}", c * 1e3, c / b))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// The prompt matmul on AMX int8 tiles (`amx.rs`) against the engine's AVX-512 tiles, on
/// the shapes of Qwen2.5-Coder-0.5B's layers (the k-quants on 1.5B's), fastest of a few
/// runs; `only` names one format (`Q4K`, …). Both include quantizing the activations; the
/// AMX weights are repacked before the first run (as the first prompt does once per
/// matrix), which is timed apart.
#[cfg(target_arch = "x86_64")]
pub fn prefill_amx_against_tiled(only: Option<&str>) -> Result<()> {
    if !super::amx::available() {
        println!("this CPU (or OS) offers no AMX-INT8 tiles: nothing to measure");
        return Ok(());
    }
    for format in FORMATS {
        if only.is_some_and(|f| f != format!("{format:?}")) {
            continue;
        }
        let shapes = if format.block_len() == super::QK_K {
            [(1536usize, 1536usize), (8960, 1536), (1536, 8960)]
        } else {
            [(896, 896), (4864, 896), (896, 4864)]
        };
        for (rows, cols) in shapes {
            let data = random_blocks(format, rows, cols, 91);
            let w = QuantMatrix::from_bytes(format, rows, cols, data)?;
            let started = Instant::now();
            w.products_on_amx(&random_f32(16 * cols, 93), &[16])?;
            let repack = started.elapsed().as_secs_f64();
            for m in [64, 512] {
                let x = random_f32(m * cols, 92);
                let runs = if m == 64 { 5 } else { 3 };
                let tiled = fastest(runs, || w.products(&x, &[m], true).map(drop))?;
                let on_amx = fastest(runs, || w.products_on_amx(&x, &[m]).map(drop))?;
                let gmacs = (m * rows * cols) as f64 / 1e9;
                println!(
                    "{format:?} {rows}x{cols} m={m} threads={}: tiled {:.2} ms ({:.1} GMAC/s), \
                     amx {:.2} ms ({:.1} GMAC/s), speed-up {:.2}; repack and first 16 rows \
                     {:.1} ms",
                    pool::threads(),
                    tiled * 1e3,
                    gmacs / tiled,
                    on_amx * 1e3,
                    gmacs / on_amx,
                    tiled / on_amx,
                    repack * 1e3,
                );
            }
        }
    }
    Ok(())
}

/// The fastest of `runs` runs of `f`, in seconds.
fn fastest(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}
