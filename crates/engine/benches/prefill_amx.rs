//! The prompt matmul on AMX int8 tiles against the engine's AVX-512 tiles, every format
//! (the 32-value ones on the shapes of Qwen2.5-Coder-0.5B, the k-quants on 1.5B's; issue
//! #17, item 5). Not a test: a measurement; on a CPU without AMX it says so and measures
//! nothing.
//!
//! `RAYON_NUM_THREADS=1 cargo bench -p shoal-engine --features bench --bench prefill_amx`
//! (and `2`); `BENCH_FORMAT=Q4K` for one format.

fn main() -> Result<(), shoal_engine::EngineError> {
    #[cfg(target_arch = "x86_64")]
    shoal_engine::kernel_bench::prefill_amx_against_tiled(
        std::env::var("BENCH_FORMAT").ok().as_deref(),
    )?;
    Ok(())
}
