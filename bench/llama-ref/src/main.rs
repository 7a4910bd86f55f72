//! `llama-ref`: llama.cpp's prefill and decode speed and peak memory on one GGUF file,
//! measured the same way as `shoal bench`, so the two can be compared in one run
//! (issue #2 item 6; `scripts/bench-vs-llama.sh` runs both).
//!
//! Bench-only: this crate is excluded from the main workspace because it builds
//! llama.cpp from source (cmake + libclang, several minutes on two cores).
//!
//! Method, kept in step with `crates/shoal/src/bench.rs`:
//! - the prompt is a fixed English sentence repeated, tokenized without special
//!   tokens and truncated to exactly `--prompt-tokens` tokens;
//! - prefill is one `llama_decode` of the whole prompt (logits for the last token
//!   only); llama.cpp splits it into micro-batches of `n_ubatch` (default 512);
//! - decode is `--decode-tokens` single-token steps, each greedy-sampled from the
//!   previous step's logits;
//! - each repetition starts from an empty KV cache; the median (element `len/2` of
//!   the sorted values, as in shoal) of the repetitions is reported;
//! - peak RSS is `VmHWM` from `/proc/self/status` (mmap'd weight pages that were
//!   touched count, as for shoal).

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;

/// The same text `shoal bench` repeats to build its prompt.
const TEXT: &str =
    "The quick brown fox jumps over the lazy dog while the sun sets slowly behind the hills. ";

const USAGE: &str = "usage: llama-ref --model PATH [--threads N] [--prompt-tokens P] \
[--decode-tokens D] [--repeat R] [--json] [--verbose] [--embed TEXT]\n  --verbose  keep llama.cpp's log on stderr and print the greedy continuation\n  --embed TEXT  instead of timing: print TEXT's ids and its embedding (mean pooling, unit length) as JSON";

struct Args {
    model: PathBuf,
    threads: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    repeat: usize,
    json: bool,
    verbose: bool,
    embed: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut model = None;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut prompt_tokens = 64;
    let mut decode_tokens = 128;
    let mut repeat = 3;
    let mut json = false;
    let mut verbose = false;
    let mut embed = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> anyhow::Result<String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => bail!("{name} needs a value\n{USAGE}"),
            }
        };
        let number = |name: &str, v: String| -> anyhow::Result<usize> {
            v.parse().with_context(|| format!("{name}: not a number: {v:?}"))
        };
        match key.as_str() {
            "--model" | "-m" => model = Some(PathBuf::from(value("--model")?)),
            "--threads" | "-t" => threads = number("--threads", value("--threads")?)?,
            "--prompt-tokens" => prompt_tokens = number(&key, value(&key)?)?,
            "--decode-tokens" => decode_tokens = number(&key, value(&key)?)?,
            "--repeat" => repeat = number(&key, value(&key)?)?,
            "--json" => json = true,
            "--verbose" | "-v" => verbose = true,
            "--embed" => embed = Some(value("--embed")?),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let Some(model) = model else {
        bail!("--model is required\n{USAGE}")
    };
    if threads == 0 || prompt_tokens == 0 || repeat == 0 {
        bail!("--threads, --prompt-tokens and --repeat must be at least 1");
    }
    Ok(Args {
        model,
        threads,
        prompt_tokens,
        decode_tokens,
        repeat,
        json,
        verbose,
        embed,
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("llama-ref: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let a = parse_args()?;
    if !a.model.is_file() {
        bail!("model file not found: {}", a.model.display());
    }
    let mut backend = LlamaBackend::init().context("initialising llama.cpp")?;
    if !a.verbose {
        // llama.cpp logs every load step to stderr; keep the output clean.
        backend.void_logs();
    }

    let started = Instant::now();
    let model = LlamaModel::load_from_file(&backend, &a.model, &LlamaModelParams::default())
        .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    if let Some(text) = &a.embed {
        return embed(&backend, &model, text, a.threads);
    }

    let vocab = model.vocab();
    let mut ids = vocab.tokenize(TEXT.repeat(1 + a.prompt_tokens / 8).as_bytes(), false, false);
    if ids.len() < a.prompt_tokens {
        bail!(
            "prompt text gave only {} tokens, {} asked",
            ids.len(),
            a.prompt_tokens
        );
    }
    ids.truncate(a.prompt_tokens);
    let n_prompt = ids.len();

    let n_ctx = u32::try_from(n_prompt + a.decode_tokens + 16).context("context too large")?;
    let threads = i32::try_from(a.threads).context("too many threads")?;
    let defaults = LlamaContextParams::default();
    // The whole prompt must fit one `llama_decode` call.
    let n_batch = defaults
        .n_batch()
        .max(u32::try_from(n_prompt).context("prompt too large")?);
    let params = defaults
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model
        .new_context(&backend, params)
        .context("creating the llama.cpp context")?;

    let mut batch = LlamaBatch::new(n_prompt, 1);
    let mut sampler = LlamaSampler::greedy();
    let mut prefill = Vec::with_capacity(a.repeat);
    let mut decode = Vec::with_capacity(a.repeat);
    let mut generated = Vec::with_capacity(a.decode_tokens);
    for rep in 0..a.repeat {
        ctx.clear_kv_cache();

        batch.clear();
        for (i, &t) in ids.iter().enumerate() {
            batch.add(t, i32::try_from(i)?, &[0], i + 1 == n_prompt)?;
        }
        let t = Instant::now();
        ctx.decode(&mut batch).context("prefill decode")?;
        ctx.synchronize();
        prefill.push(n_prompt as f64 / t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut last = batch.n_tokens() - 1;
        for i in 0..a.decode_tokens {
            // Greedy; an end-of-generation token is fed back like any other, so every
            // repetition decodes exactly `decode_tokens` tokens.
            let token = sampler.sample(&ctx, last);
            if rep == 0 && a.verbose {
                generated.push(token);
            }
            batch.clear();
            batch.add(token, i32::try_from(n_prompt + i)?, &[0], true)?;
            ctx.decode(&mut batch).context("decode step")?;
            last = 0;
        }
        ctx.synchronize();
        if a.decode_tokens > 0 {
            decode.push(a.decode_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }

    if a.verbose {
        // A sanity check that the timed work is real: the greedy continuation.
        let text = vocab.detokenize(&generated, false, false);
        eprintln!(
            "llama-ref: greedy continuation: {:?}",
            String::from_utf8_lossy(&text)
        );
    }

    let model_name = model
        .meta_val_str("general.name")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            a.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let prefill_tps = median(&mut prefill);
    let decode_tps = median(&mut decode);
    let peak_rss_mib = peak_rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0);
    if a.json {
        let out = serde_json::json!({
            "engine": "llama.cpp",
            "model": model_name,
            "threads": a.threads,
            "prompt_tokens": n_prompt,
            "decode_tokens": a.decode_tokens,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
            "load_s": load_s,
            "peak_rss_mib": peak_rss_mib,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "llama.cpp {model_name} | threads {} | prefill {n_prompt} tok: {prefill_tps:.1} tok/s | \
             decode {} tok: {decode_tps:.1} tok/s | peak RSS {peak_rss_mib:.0} MiB | load {load_s:.2} s",
            a.threads, a.decode_tokens
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The reference for `shoal`'s embeddings: `text` tokenized as llama-server tokenizes an
/// embeddings input (special tokens added and parsed), one `llama_decode` with mean
/// pooling, scaled to unit length as llama-server's `/v1/embeddings` does.
fn embed(
    backend: &LlamaBackend,
    model: &LlamaModel,
    text: &str,
    threads: usize,
) -> anyhow::Result<ExitCode> {
    let ids = model.vocab().tokenize(text.as_bytes(), true, true);
    let n = u32::try_from(ids.len()).context("text too long")?;
    let threads = i32::try_from(threads).context("too many threads")?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n.max(64)))
        .with_n_batch(n.max(64))
        .with_n_ubatch(n.max(64))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_embeddings(true)
        .with_pooling_type(llama_cpp_2::context::params::LlamaPoolingType::Mean);
    let mut ctx = model
        .new_context(backend, params)
        .context("creating the llama.cpp context")?;
    let mut batch = LlamaBatch::new(ids.len(), 1);
    batch.add_sequence(&ids, 0, false)?;
    ctx.decode(&mut batch).context("embedding decode")?;
    let pooled = ctx.embeddings_seq_ith(0).context("pooled embedding")?;
    let norm = pooled
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let embedding: Vec<f64> = pooled.iter().map(|&v| f64::from(v) / norm).collect();
    let out = serde_json::json!({
        "text": text,
        "ids": ids.iter().map(|t| t.0).collect::<Vec<_>>(),
        "embedding": embedding,
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(ExitCode::SUCCESS)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// Peak resident set size of this process (Linux: VmHWM), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
