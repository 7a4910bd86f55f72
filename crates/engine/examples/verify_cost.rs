#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement tool: a panic is its report
//! What a verification pass of k rows ([`Logits::Verify`], each row a decode step's
//! numbers) costs against one decode step, after a 600-token prompt: the price of checking
//! k guessed tokens in speculative decoding.
//!
//! `cargo run --release -p shoal-engine --example verify_cost -- MODEL.gguf`
//! (`SHOAL_KERNEL_TILES=pairwise` measures the rows without the shared tiles).

use std::time::Instant;

use shoal_engine::candle_core::Device;
use shoal_engine::{GgufFile, Logits, Stage, StageInput, StageSpec};

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: verify_cost MODEL.gguf");
    let gguf = GgufFile::open(&path).unwrap();
    let whole = StageSpec::whole(gguf.config().n_layers);
    let stage = Stage::load(&gguf, whole, &Device::Cpu, |_, _| {}).unwrap();
    let prompt: Vec<u32> = (0..600u32).map(|i| (i * 977) % 3000 + 30).collect();
    let mut cache = stage.new_cache();
    let positions: Vec<usize> = (0..prompt.len()).collect();
    stage
        .forward(
            StageInput::Tokens(&prompt),
            &positions,
            &mut cache,
            Logits::Last,
        )
        .unwrap();
    for k in [1usize, 2, 4, 8, 9, 16] {
        let tokens: Vec<u32> = (0..k as u32).map(|i| 100 + i).collect();
        let positions: Vec<usize> = (prompt.len()..prompt.len() + k).collect();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            stage
                .forward(
                    StageInput::Tokens(&tokens),
                    &positions,
                    &mut cache,
                    Logits::Verify,
                )
                .unwrap();
            best = best.min(started.elapsed().as_secs_f64());
            cache.truncate(prompt.len());
        }
        println!(
            "verify {k:2} rows: {:6.1} ms ({:5.1} ms per row), best of 5",
            best * 1e3,
            best * 1e3 / k as f64
        );
    }
}
