//! `shoal bench`: prefill and decode speed and peak memory of one model on this device
//! (with `--swarm-overhead`, [`crate::swarm_overhead`] instead).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use shoal_engine::{Logits, Model, Speculation, StageInput};

use crate::spec_bench::{SpecBench, Workload};
use crate::{median, ResolveModel};

#[derive(Args)]
pub struct BenchArgs {
    /// The model measured (with --swarm-overhead: the head's model, which stays idle).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Instead: what a swarm head adds to a request, with instant stand-in agents (a real
    /// `shoal serve --peer …` head, chat completions over HTTP, each strategy).
    #[arg(long)]
    pub swarm_overhead: bool,
    /// With --swarm-overhead: measured requests per strategy.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Instead: a conversation's second turn with and without the prompt cache (time to
    /// first token; --prompt-tokens is the first turn's prompt, --decode-tokens its answer).
    #[arg(long)]
    pub prompt_cache: bool,
    /// Instead: speculative decoding by prompt lookup against plain decoding, on
    /// --workload (answers of up to --decode-tokens).
    #[arg(long)]
    pub lookup: bool,
    /// Instead: speculative decoding with this draft model (a file or a known name)
    /// against plain decoding; with --lookup too, each alone and both together.
    #[arg(long, value_name = "PATH|NAME")]
    pub model_draft: Option<PathBuf>,
    /// With --lookup or --model-draft: an edit (--prompt-tokens of file, the whole file
    /// answered back) or the first --prompts HumanEval problems.
    #[arg(long, value_enum, default_value_t = Workload::Edit)]
    pub workload: Workload,
    /// With --workload humaneval: how many problems.
    #[arg(long, default_value_t = 10)]
    pub prompts: usize,
    /// Most tokens drafted per pass.
    #[arg(long, default_value_t = Speculation::default().draft_max)]
    pub draft_max: usize,
    /// Fewest drafted tokens worth a pass.
    #[arg(long, default_value_t = Speculation::default().draft_min)]
    pub draft_min: usize,
    /// The draft model stops where its probability of its pick falls below this.
    #[arg(long, default_value_t = Speculation::default().p_min)]
    pub draft_p_min: f32,
}

#[derive(Serialize)]
struct BenchResult {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    load_s: f64,
    peak_rss_mib: f64,
}

/// Runs `shoal bench`; `resolve` finds the model.
pub fn run(a: BenchArgs, resolve: ResolveModel<'_>) -> anyhow::Result<ExitCode> {
    let path = resolve(a.model.as_deref())?;
    if a.swarm_overhead {
        return crate::swarm_overhead::swarm_overhead(&path, a.requests, a.json);
    }
    if a.lookup || a.model_draft.is_some() {
        let draft_model = match &a.model_draft {
            Some(d) => Some(resolve(Some(d)).context("--model-draft")?),
            None => None,
        };
        return crate::spec_bench::run(SpecBench {
            model: &path,
            draft_model,
            lookup: a.lookup,
            workload: a.workload,
            prompt_tokens: a.prompt_tokens,
            answer_tokens: a.decode_tokens,
            prompts: a.prompts,
            repeat: a.repeat,
            draft_max: a.draft_max,
            draft_min: a.draft_min,
            p_min: a.draft_p_min,
            json: a.json,
        });
    }
    if a.prompt_cache {
        return crate::prompt_cache_bench::run(
            &path,
            a.prompt_tokens,
            a.decode_tokens,
            a.repeat,
            a.json,
        );
    }
    let started = Instant::now();
    let model =
        Model::load(&path, |_, _| {}).with_context(|| format!("loading {}", path.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let stage = model.stage();
    let vocab = model.config().vocab_size as u32;
    // A fixed, ordinary-looking token sequence: the speed of a forward pass does not
    // depend on which ids it sees.
    let text =
        "The quick brown fox jumps over the lazy dog while the sun sets slowly behind the hills. ";
    let mut ids = model
        .tokenizer()
        .encode(&text.repeat(1 + a.prompt_tokens / 8), false)?;
    ids.truncate(a.prompt_tokens.max(1));
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..a.repeat.max(1) {
        let mut cache = stage.new_cache();
        let positions: Vec<usize> = (0..ids.len()).collect();
        let t = Instant::now();
        for (i, chunk) in ids
            .chunks(shoal_engine::generate::PREFILL_CHUNK)
            .enumerate()
        {
            let p = &positions[i * shoal_engine::generate::PREFILL_CHUNK..][..chunk.len()];
            stage.forward(StageInput::Tokens(chunk), p, &mut cache, Logits::Last)?;
        }
        prefill.push(ids.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut token = ids[ids.len() - 1];
        for i in 0..a.decode_tokens {
            let pos = ids.len() + i;
            let out = stage.forward(
                StageInput::Tokens(&[token]),
                &[pos],
                &mut cache,
                Logits::Last,
            )?;
            if let shoal_engine::StageOutput::Logits(l) = out {
                let row = shoal_engine::stage::logits_row(&l, 0)?;
                token = shoal_engine::sampler::argmax(&row) % vocab;
            }
        }
        decode.push(a.decode_tokens as f64 / t.elapsed().as_secs_f64());
    }
    let result = BenchResult {
        model: model.name().to_string(),
        threads: shoal_engine::candle_core::utils::get_num_threads(),
        prompt_tokens: ids.len(),
        decode_tokens: a.decode_tokens,
        prefill_tokens_per_s: median(&mut prefill),
        decode_tokens_per_s: median(&mut decode),
        load_s,
        peak_rss_mib: peak_rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "{} | threads {} | prefill {} tok: {:.1} tok/s | decode {} tok: {:.1} tok/s | peak RSS {:.0} MiB | load {:.2} s",
            result.model,
            result.threads,
            result.prompt_tokens,
            result.prefill_tokens_per_s,
            result.decode_tokens,
            result.decode_tokens_per_s,
            result.peak_rss_mib,
            result.load_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Peak resident set size of this process (Linux: VmHWM), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
