//! `shoal`: the one binary every device runs. It parses flags and wires the parts
//! together; the work happens in the library crates.

mod cli;
mod config;
mod detect;
mod key;
mod load;
mod mcp;
mod models;
mod serve;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let matches = cli::Cli::command().get_matches();
    let args = match cli::Cli::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    init_tracing(args.verbose);
    keep_large_allocations_in_the_heap();
    if let Some(n) = args.threads {
        // candle's CPU kernels size their rayon pool from this variable on first use, so it
        // must be set before anything touches a tensor.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if args.amx {
        // Read once by the engine's kernels, at the first prompt product.
        std::env::set_var("SHOAL_AMX", "1");
    }
    match cli::run(args, &matches) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc serves each allocation over its mmap threshold (128 KiB, rising to at most 32 MiB)
/// with fresh pages from the kernel and hands them back on free, and trims the heap's top
/// as soon as it is free. A prompt's per-layer buffers (a few MiB each, every layer) then
/// cost page faults and zeroing every time: ~15 % of a 512-token prompt at 2 threads
/// (docs/PERFORMANCE.md). Keeping them in the heap costs no peak memory — it is reused —
/// as long as there is one heap: glibc gives threads arenas of their own, and tokio runs
/// each forward pass on whichever blocking thread is free, so every such thread kept its
/// own peak of buffers (a pipeline stage grew 39 → 66 → 95 MB over three prompts, one new
/// thread each). One arena: the computing threads take turns, so its lock is uncontended,
/// and small allocations still come from each thread's own cache.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_large_allocations_in_the_heap() {
    const ONE_GIB: libc::c_int = 1 << 30;
    // Safety: mallopt only changes glibc's allocator parameters; called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_allocations_in_the_heap() {}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,shoal=info,shoal_api=info,shoal_node=info",
        1 => "info",
        _ => "debug",
    };
    // An empty SHOAL_LOG (exported but unset) counts as absent: as a filter it would log
    // everything at INFO.
    let filter = std::env::var("SHOAL_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
