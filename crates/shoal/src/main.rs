//! `shoal`: the one binary every device runs. It parses flags and wires the parts
//! together; the work happens in the library crates.

mod bench;
mod cli;
mod config;
mod eval;
mod load;
mod models;
mod node;
mod plan;
mod relay;
mod ring;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let matches = cli::Cli::command().get_matches();
    let args = match cli::Cli::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    init_tracing(args.verbose);
    if let Some(n) = args.threads {
        // candle's CPU kernels size their rayon pool from this variable on first use, so it
        // must be set before anything touches a tensor.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match cli::run(args, &matches) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,shoal=info,shoal_api=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
