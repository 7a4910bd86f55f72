//! Decode steps of several sessions as one batched pass against one pass each, on the real
//! Qwen2.5-Coder-0.5B (fastest of a few runs). Not a test: a measurement.
//!
//! `cargo bench -p shoal-engine --bench decode_batch` (the model from
//! `scripts/fetch-models.sh qwen05`; `RAYON_NUM_THREADS=1` or `2` for the thread count;
//! `BENCH_SESSIONS="2 8"` for some of the cases and `BENCH_STEPS=60` for more steps, as a
//! profile under `perf record` wants).

use std::path::PathBuf;

use shoal_engine::candle_core::Device;
use shoal_engine::stage::BatchItem;
use shoal_engine::{GgufFile, KvCache, Logits, Stage, StageInput, StageSpec};

fn model_path() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")))
        .join("qwen2.5-coder-0.5b-instruct.gguf")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gguf = GgufFile::open(model_path())?;
    let n_layers = gguf.config().n_layers;
    let stage = Stage::load(&gguf, StageSpec::whole(n_layers), &Device::Cpu, |_, _| {})?;
    // `BENCH_SESSIONS="2 8"` measures only those (to profile one case).
    let counts: Vec<usize> = std::env::var("BENCH_SESSIONS")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect::<Vec<usize>>()
        })
        .filter(|counts| !counts.is_empty())
        .unwrap_or_else(|| vec![1, 2, 4, 8]);
    for sessions in counts {
        let mut caches: Vec<KvCache> = (0..sessions).map(|_| stage.new_cache()).collect();
        let prompt: Vec<u32> = (0..64u32).map(|i| 100 + i * 37).collect();
        let positions: Vec<usize> = (0..64).collect();
        for c in caches.iter_mut() {
            stage.forward(StageInput::Tokens(&prompt), &positions, c, Logits::Last)?;
        }
        let (mut alone, mut together) = (f64::MAX, f64::MAX);
        for step in 0..steps() {
            let pos = [64 + 2 * step];
            let t = std::time::Instant::now();
            for c in caches.iter_mut() {
                stage.forward(StageInput::Tokens(&[42]), &pos, c, Logits::Last)?;
            }
            alone = alone.min(t.elapsed().as_secs_f64());
            let pos = [65 + 2 * step];
            let t = std::time::Instant::now();
            let items = caches
                .iter_mut()
                .map(|cache| BatchItem {
                    input: StageInput::Tokens(&[43]),
                    positions: &pos,
                    cache,
                    logits: Logits::Last,
                })
                .collect();
            for out in stage.forward_batch(items) {
                out?;
            }
            together = together.min(t.elapsed().as_secs_f64());
        }
        eprintln!(
            "{sessions} sessions, one decode step each: alone {:.1} ms ({:.1} tok/s), one pass {:.1} ms ({:.1} tok/s)",
            alone * 1e3,
            sessions as f64 / alone,
            together * 1e3,
            sessions as f64 / together
        );
    }
    Ok(())
}

/// Steps measured per case (`BENCH_STEPS`, default 6; more for a profile).
fn steps() -> usize {
    std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6)
}
