//! Shoal's development tools, outside the node's dependency tree: they measure a node from
//! the outside, the way a user or a script would.
//!
//! - [`engine_bench`]: `shoal bench`, prefill and decode speed and peak memory of one model.
//! - [`humaneval`]: `shoal eval humaneval`, pass@1 on HumanEval against a running Shoal API
//!   (or a local swarm it starts), every answer run with the problem's tests in a sandbox;
//!   `shoal eval mbpp` the same over MBPP's problems.
//! - [`spec_bench`]: `shoal bench --lookup` / `--model-draft`, speculative decoding on an
//!   edit or on HumanEval prompts, against plain decoding.
//! - [`prompt_cache_bench`]: `shoal bench --prompt-cache`, a conversation's next turn with
//!   and without the prompt cache.
//! - [`swarm_overhead`]: `shoal bench --swarm-overhead`, what a swarm head adds to a request,
//!   with instant stand-in agents speaking the real peer protocol.
//! - [`plan`]: `shoal plan`, where a model's layers would go across devices described by
//!   hand, this node measured on the real model.
//! - [`relay`]: `shoal relay`, a TCP delay line that makes a slow link between pipeline
//!   stages on one machine (this kernel has no `netem`).
//!
//! The `shoal` binary parses their flags and calls them; the node itself never does.

pub mod engine_bench;
pub mod humaneval;
pub mod plan;
pub mod prompt_cache_bench;
pub mod relay;
pub mod spec_bench;
pub mod swarm_overhead;

mod client;
mod cluster;
mod exec;
mod extract;
mod mbpp;

use std::path::{Path, PathBuf};

/// How a tool finds a model the user named: a GGUF file, or a known model's name, fetched
/// into the models directory when missing (the binary's resolver, with its progress bars);
/// `None` is the default model.
pub type ResolveModel<'a> = &'a dyn Fn(Option<&Path>) -> anyhow::Result<PathBuf>;

/// The median of `xs` (the upper one of an even count); 0 for none.
pub(crate) fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}
