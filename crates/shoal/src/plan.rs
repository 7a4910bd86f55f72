//! `shoal plan`: where a model's layers would go, and why.
//!
//! This node measures itself on the real model (time per layer, free memory); other
//! devices are described with `--node`, and hop costs with `--link-ms`. (`shoal serve
//! --split auto` plans the same way from profiles the peers report over the wire.)

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use shoal_cluster::{parse_split, plan, validate_split, NodeProfile, Objective};
use shoal_engine::GgufFile;

use crate::load::{load_model, resolve_model};

#[derive(Args)]
pub(crate) struct PlanArgs {
    /// GGUF model file or known model name (default: the built-in default model).
    #[arg(long, short)]
    pub(crate) model: Option<PathBuf>,
    /// Another device: `ID:FREE_GIB:DECODE_MS_PER_LAYER[:PREFILL_MS_PER_LAYER_TOKEN]`
    /// (repeatable, in ring order for `--split`).
    #[arg(long = "node")]
    pub(crate) nodes: Vec<String>,
    /// One-way hop cost between any two devices, in milliseconds.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) link_ms: f64,
    /// `latency` (one stream) or `throughput` (many streams).
    #[arg(long, default_value = "latency")]
    pub(crate) objective: String,
    /// Check and cost a forced split instead, e.g. `0-9,10-19,20-29`.
    #[arg(long)]
    pub(crate) split: Option<String>,
    /// Context length to reserve KV cache for.
    #[arg(long, default_value_t = 4096)]
    pub(crate) context: usize,
    /// This node's free memory in GiB (default: measured, MemAvailable).
    #[arg(long)]
    pub(crate) memory_gib: Option<f64>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub(crate) fn run(a: PlanArgs) -> anyhow::Result<ExitCode> {
    let path = resolve_model(a.model.as_deref())?;
    let file = GgufFile::open(&path)?;
    let shape = shoal_pipeline::model_shape(&file, a.context);

    eprintln!("measuring this node on {} ...", path.display());
    let model = load_model(&path, true)?;
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
        nodes.push(parse_node(spec)?);
    }
    let n = nodes.len();
    let links: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| if i == j { 0.0 } else { a.link_ms })
                .collect()
        })
        .collect();
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

fn parse_node(spec: &str) -> anyhow::Result<NodeProfile> {
    let parts: Vec<&str> = spec.split(':').collect();
    if !(3..=4).contains(&parts.len()) {
        bail!("--node {spec:?}: expected ID:FREE_GIB:DECODE_MS_PER_LAYER[:PREFILL_MS]");
    }
    let num = |s: &str, what: &str| -> anyhow::Result<f64> {
        s.parse::<f64>()
            .with_context(|| format!("--node {spec:?}: {what} {s:?} is not a number"))
    };
    let decode = num(parts[2], "decode ms per layer")?;
    Ok(NodeProfile {
        id: parts[0].to_string(),
        free_memory_bytes: (num(parts[1], "free GiB")? * GIB) as u64,
        decode_ms_per_layer: decode,
        prefill_ms_per_layer_token: match parts.get(3) {
            Some(p) => num(p, "prefill ms")?,
            None => decode / 8.0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs_parse_and_bad_ones_are_explained() {
        let n = parse_node("pi:2:1.5").unwrap();
        assert_eq!(n.id, "pi");
        assert_eq!(n.free_memory_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(n.decode_ms_per_layer, 1.5);
        assert!(parse_node("pi:2").is_err());
        let e = parse_node("pi:lots:1").unwrap_err().to_string();
        assert!(e.contains("free GiB"), "{e}");
    }
}
