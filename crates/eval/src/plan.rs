//! `shoal plan`: where a model's layers would go, and why.
//!
//! This node measures itself on the real model (time per layer, free memory); other
//! devices are described with `--node`, and hop costs with `--link-ms`. (`shoal serve
//! --split auto` plans the same way from profiles the peers report over the wire.)

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use shoal_cluster::{parse_split, plan, uniform_links, validate_split, NodeProfile, Objective};
use shoal_engine::{GgufFile, Model};

use crate::ResolveModel;

#[derive(Args)]
pub struct PlanArgs {
    /// GGUF model file or known model name (default: the built-in default model).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// Another device: `ID:FREE_GIB:DECODE_MS_PER_LAYER[:PREFILL_MS_PER_LAYER_TOKEN]`
    /// (repeatable, in ring order for `--split`).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// One-way hop cost between any two devices, in milliseconds.
    #[arg(long, default_value_t = 0.5)]
    pub link_ms: f64,
    /// `latency` (one stream) or `throughput` (many streams).
    #[arg(long, default_value = "latency")]
    pub objective: String,
    /// Check and cost a forced split instead, e.g. `0-9,10-19,20-29`.
    #[arg(long)]
    pub split: Option<String>,
    /// Context length to reserve KV cache for.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// This node's free memory in GiB (default: measured, MemAvailable).
    #[arg(long)]
    pub memory_gib: Option<f64>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub fn run(a: PlanArgs, resolve_model: ResolveModel<'_>) -> anyhow::Result<ExitCode> {
    let path = resolve_model(a.model.as_deref())?;
    let file = GgufFile::open(&path)?;
    let shape = shoal_pipeline::model_shape(&file, a.context);

    eprintln!("measuring this node on {} ...", path.display());
    let model =
        Model::load(&path, |_, _| {}).with_context(|| format!("loading {}", path.display()))?;
    let timing = shoal_engine::profile::measure(model.stage(), 64, 16)?;
    let free = match a.memory_gib {
        Some(g) => (g * GIB) as u64,
        None => shoal_pipeline::available_memory_bytes().context("cannot read /proc/meminfo")?,
    };
    let mut nodes = vec![NodeProfile {
        id: "this-node".into(),
        free_memory_bytes: free,
        decode_ms_per_layer: timing.decode_ms_per_layer,
        prefill_ms_per_layer_token: timing.prefill_ms_per_layer_token,
    }];
    for spec in &a.nodes {
        nodes.push(spec.parse::<NodeProfile>()?);
    }
    let links = uniform_links(nodes.len(), a.link_ms);
    let result = match &a.split {
        Some(split) => validate_split(&shape, &nodes, &links, &parse_split(split)?)?,
        None => {
            let objective: Objective = a
                .objective
                .parse()
                .map_err(|e| anyhow::anyhow!("--objective: {e}"))?;
            plan(&shape, &nodes, &links, objective)?
        }
    };
    println!("{result}");
    Ok(ExitCode::SUCCESS)
}
