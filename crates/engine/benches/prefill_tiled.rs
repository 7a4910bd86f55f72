//! The prompt (prefill) matmul: one activation row at a time against the tiled kernel, and
//! against candle's `QMatMul` for the k-quants, on the shapes of Qwen2.5-Coder-0.5B.
//! Not a test: a measurement.
//!
//! `RAYON_NUM_THREADS=1 cargo bench -p shoal-engine --features bench --bench prefill_tiled`
//! (and `2`); `BENCH_FORMAT=Q4K` for one format.

fn main() -> Result<(), shoal_engine::EngineError> {
    let only = std::env::var("BENCH_FORMAT").ok();
    shoal_engine::kernel_bench::prefill_tiled_against_pairwise(only.as_deref())
}
