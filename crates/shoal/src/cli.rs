//! Command-line interface.

use std::io::{BufRead, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_engine::{
    ChatMessage, GenerateParams, Generation, Lookup, Model, SamplingParams, Speculation, TextStream,
};
use shoal_wire::DType;

use crate::load::{load_model, resolve_model};
use crate::serve::ServeArgs;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "One LLM service from the devices you already own"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, global = true)]
    pub(crate) threads: Option<usize>,
    /// Prompt products on AMX int8 tiles where the CPU has them (Intel Xeon, Sapphire
    /// Rapids and later): products of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights 3-4.5x faster, of
    /// Q4_K/Q6_K 1.5-2.2x (Q5_K too, not measured; whole prompts about 1.3-2.5x), about 1.1 bytes
    /// per weight more memory, and numbers that differ from llama.cpp's in the last bits
    /// (docs/PERFORMANCE.md). Same as SHOAL_AMX=1.
    #[arg(long, global = true)]
    pub(crate) amx: bool,
    /// More logging (-v info, -vv debug). SHOAL_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Answer one prompt and stream the answer to stdout.
    Run(RunArgs),
    /// Talk to a model in the terminal.
    Chat(ChatArgs),
    /// Serve the OpenAI-compatible API.
    Serve(Box<ServeArgs>),
    /// Measure prefill and decode speed and peak memory.
    Bench(shoal_eval::engine_bench::BenchArgs),
    /// List the known models and which are here; `models pull NAME` fetches one.
    Models(crate::models::ModelsArgs),
    /// Where a model's layers would go across devices, with predicted speed, and why.
    Plan(shoal_eval::plan::PlanArgs),
    /// Measure answer quality against a running API (`eval humaneval`, `eval mbpp`: pass@1).
    Eval(shoal_eval::humaneval::EvalArgs),
    /// This device's CPU, memory, GPUs, temperatures and battery, and the model it would run.
    Detect(crate::detect::DetectArgs),
    /// An MCP server on stdio (for Claude Desktop, opencode, …) answering through a node.
    Mcp(crate::mcp::McpArgs),
    /// Swarm keys: `key new` prints a new one.
    #[command(subcommand)]
    Key(crate::key::KeyCommand),
    /// Test and bench tool: a TCP relay that delays every byte by --delay-ms each way (a slow
    /// link between pipeline stages on one machine).
    Relay(shoal_eval::relay::RelayArgs),
}

#[derive(Args)]
pub(crate) struct ModelArg {
    /// GGUF model file, or a known model's name (smollm2, qwen05, qwen15, gemma3; see
    /// `shoal models`), fetched into $SHOAL_MODELS_DIR or ./models if missing, or `auto`:
    /// the largest known model this device (`serve` with a peer port: the cluster's
    /// members together) can hold. Default: smollm2.
    #[arg(long, short)]
    pub(crate) model: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub(crate) struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..SamplingParams::default()
            },
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            cache_prompt: true,
        }
    }
}

/// Speculative decoding: guesses checked in one pass; the answer stays the same, token for
/// token.
#[derive(Args, Clone, Default)]
pub(crate) struct SpeculationArgs {
    /// Speculative decoding by prompt lookup: draft the tokens that followed the answer's
    /// latest words where they appeared before (code edits, agents' turns) and verify them
    /// in one pass. The answer is the same, token for token; only faster where the text
    /// repeats. On a pipeline's head (--split) the ring verifies the guesses, as it does
    /// --model-draft's.
    #[arg(long)]
    pub(crate) lookup: bool,
    /// Speculative decoding with a draft model (a file or a known name): a smaller model
    /// of the same tokenizer guesses the next tokens, the model checks them in one pass.
    /// The answer is the same, token for token. With --lookup too, lookup drafts first.
    #[arg(long, value_name = "PATH|NAME")]
    pub(crate) model_draft: Option<PathBuf>,
    /// With --lookup or --model-draft: most tokens drafted per pass.
    #[arg(long, default_value_t = Speculation::default().draft_max)]
    pub(crate) draft_max: usize,
    /// With --lookup or --model-draft: fewest drafted tokens worth a verification pass.
    #[arg(long, default_value_t = Speculation::default().draft_min)]
    pub(crate) draft_min: usize,
    /// With --model-draft: the draft model stops guessing where its own probability of its
    /// pick falls below this.
    #[arg(long, default_value_t = Speculation::default().p_min)]
    pub(crate) draft_p_min: f32,
}

impl SpeculationArgs {
    /// The speculation asked for; `None` for plain decoding.
    pub(crate) fn speculation(&self) -> Option<Speculation> {
        (self.lookup || self.model_draft.is_some()).then(|| Speculation {
            lookup: self.lookup.then(Lookup::default),
            draft_model: self.model_draft.is_some(),
            draft_max: self.draft_max.max(1),
            draft_min: self.draft_min,
            p_min: self.draft_p_min,
        })
    }

    /// Loads the draft model (if any) onto `model` and turns speculation on.
    fn apply(&self, model: &mut Model) -> anyhow::Result<()> {
        if let Some(draft) = &self.model_draft {
            let path = resolve_model(Some(draft)).context("--model-draft")?;
            model.attach_draft(load_model(&path)?)?;
        }
        model.set_speculation(self.speculation());
        Ok(())
    }
}

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// The user's message.
    #[arg(long, short)]
    pub(crate) prompt: String,
    /// Optional system message.
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub(crate) raw: bool,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    #[command(flatten)]
    pub(crate) speculation: SpeculationArgs,
    /// Print timings to stderr at the end.
    #[arg(long)]
    pub(crate) timings: bool,
    /// Pipeline mode (preview): a peer running `shoal serve --peer-port`, as HOST:PORT
    /// (repeatable, in ring order). Needs --split.
    #[arg(long = "peer", value_name = "HOST:PORT", requires = "split")]
    pub(crate) peers: Vec<String>,
    /// Layers per stage, e.g. `0-9,10-19,20-29`: this node runs the first range, each --peer
    /// the next one in order.
    #[arg(long, requires = "peers")]
    pub(crate) split: Option<String>,
    /// How hidden states travel between stages (f32 keeps the output identical to a
    /// single process).
    #[arg(long, value_enum, default_value_t = ActivationsArg::F32)]
    pub(crate) activations: ActivationsArg,
    #[command(flatten)]
    pub(crate) key: crate::key::KeyArgs,
}

/// How hidden states travel between stages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ActivationsArg {
    /// Half precision: half the bytes, may round differently from a single process.
    F16,
    /// bfloat16.
    Bf16,
    /// Exact: the output equals a single-process run.
    #[default]
    F32,
}

/// How embeddings are pooled from a text's hidden states (llama-server's `--pooling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PoolingArg {
    /// The mean over every token (what a generative model's file implies).
    Mean,
    /// The first token's (BERT's `[CLS]`).
    Cls,
    /// The last token's (Qwen3-Embedding's).
    Last,
}

impl PoolingArg {
    pub(crate) fn pooling(self) -> shoal_engine::Pooling {
        match self {
            PoolingArg::Mean => shoal_engine::Pooling::Mean,
            PoolingArg::Cls => shoal_engine::Pooling::First,
            PoolingArg::Last => shoal_engine::Pooling::Last,
        }
    }
}

/// A setting that is on or off (`--swarm-code-checks on|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Switch {
    #[default]
    On,
    Off,
}

impl ActivationsArg {
    pub(crate) fn dtype(self) -> DType {
        match self {
            ActivationsArg::F16 => DType::F16,
            ActivationsArg::Bf16 => DType::BF16,
            ActivationsArg::F32 => DType::F32,
        }
    }
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    #[command(flatten)]
    pub(crate) speculation: SpeculationArgs,
    /// MiB of keys and values kept from earlier turns, so each turn computes only what is
    /// new (0: every turn reads the whole conversation again).
    #[arg(long, value_name = "MIB", default_value_t = crate::serve::DEFAULT_CACHE_RAM_MIB)]
    pub(crate) cache_ram: usize,
}

pub(crate) fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(a) => run_once(a),
        Command::Chat(a) => chat(a),
        Command::Serve(mut a) => {
            let prompts = crate::config::apply(&mut a, matches.subcommand_matches("serve"))?;
            crate::serve::serve(*a, prompts)
        }
        Command::Bench(a) => shoal_eval::engine_bench::run(a, &resolve_model),
        Command::Plan(a) => shoal_eval::plan::run(a, &resolve_model),
        Command::Models(a) => crate::models::models(a),
        Command::Eval(a) => shoal_eval::humaneval::run(a, &resolve_model),
        Command::Relay(a) => shoal_eval::relay::run(a),
        Command::Key(k) => crate::key::run(k),
        Command::Detect(a) => crate::detect::run(a),
        Command::Mcp(a) => crate::mcp::run(a),
    }
}

fn messages(system: Option<&str>) -> Vec<ChatMessage> {
    system
        .map(|s| ChatMessage {
            role: "system".into(),
            content: s.into(),
        })
        .into_iter()
        .collect()
}

/// Streams a generation to stdout; returns the full text.
fn stream_to_stdout(generation: &mut Generation<'_>) -> anyhow::Result<String> {
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    while let Some(step) = generation.next_step()? {
        out.write_all(step.text.as_bytes())?;
        out.flush()?;
        text.push_str(&step.text);
    }
    Ok(text)
}

fn run_once(a: RunArgs) -> anyhow::Result<ExitCode> {
    let path = resolve_model(a.model.model.as_deref())?;
    let mut model = load_model(&path)?;
    let prompt = if a.raw {
        a.prompt.clone()
    } else {
        let mut m = messages(a.system.as_deref());
        m.push(ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        model.render_chat(&m)?
    };
    let ids = model.encode_prompt(&prompt)?;
    if let Some(split) = a.split.as_deref() {
        let ranges = shoal_pipeline::check_split(split, a.peers.len(), model.config().n_layers)?;
        // The head loads its own stage; the whole model is not needed any more.
        drop(model);
        let draft_model = match &a.speculation.model_draft {
            Some(draft) => {
                let path = resolve_model(Some(draft)).context("--model-draft")?;
                Some(std::sync::Arc::new(load_model(&path)?))
            }
            None => None,
        };
        let settings = shoal_pipeline::RingSettings {
            activations: a.activations.dtype(),
            transport: shoal_wire::Transport::with_key(a.key.key()?),
            speculation: a.speculation.speculation(),
            draft_model,
            ..Default::default()
        };
        run_ring(
            &path,
            &ids,
            &a.peers,
            &ranges,
            &a.sampling.params(),
            settings,
        )?;
        println!();
        return Ok(ExitCode::SUCCESS);
    }
    a.speculation.apply(&mut model)?;
    let mut generation = model.generate(ids, a.sampling.params())?;
    stream_to_stdout(&mut generation)?;
    println!();
    if a.timings {
        print_timings(&generation);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_timings(g: &Generation<'_>) {
    let t = g.timings();
    let rate = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt: {} tokens in {:.0} ms ({:.1} tok/s); generated: {} tokens ({:.1} tok/s); finish: {}",
        t.prompt_tokens,
        t.prompt_time.as_secs_f64() * 1e3,
        rate(t.prompt_tokens, t.prompt_time),
        t.generated_tokens,
        rate(t.generated_tokens.saturating_sub(1), t.generate_time),
        g.finish_reason().map(|f| f.as_str()).unwrap_or("-"),
    );
    if t.drafted_tokens > 0 {
        eprintln!(
            "speculation: {} of {} guessed tokens kept",
            t.accepted_tokens, t.drafted_tokens
        );
    }
}

fn chat(a: ChatArgs) -> anyhow::Result<ExitCode> {
    let path = resolve_model(a.model.model.as_deref())?;
    let mut model = load_model(&path)?;
    a.speculation.apply(&mut model)?;
    model.set_prompt_cache_bytes(a.cache_ram.saturating_mul(1 << 20));
    if let Some(draft) = model.draft_model() {
        draft.set_prompt_cache_bytes(a.cache_ram.saturating_mul(1 << 20));
    }
    let mut history = messages(a.system.as_deref());
    let stdin = std::io::stdin();
    eprintln!(
        "chatting with {} — an empty line or Ctrl-D ends",
        model.name()
    );
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line.trim_end().to_string(),
        });
        let ids = model.encode_prompt(&model.render_chat(&history)?)?;
        let mut generation = model.generate(ids, a.sampling.params())?;
        let answer = stream_to_stdout(&mut generation)?;
        println!();
        history.push(ChatMessage {
            role: "assistant".into(),
            content: answer,
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `prompt` through a ring ([`shoal_pipeline::connect_ring`]) and streams the text to
/// stdout like the single-process `run`.
fn run_ring(
    model_path: &Path,
    prompt: &[u32],
    peers: &[String],
    ranges: &[Range<usize>],
    params: &GenerateParams,
    settings: shoal_pipeline::RingSettings,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pipeline = shoal_pipeline::connect_ring(model_path, peers, ranges, settings)
            .await
            .context("setting up the ring of stages")?;
        let mut text = TextStream::new(pipeline.tokenizer(), params.stop.clone());
        // The ring stops only at end-of-generation tokens or the token limit, so a stop
        // string ends the visible text here.
        let mut ended = false;
        let mut failed: Option<anyhow::Error> = None;
        let generated = pipeline
            .generate_with(prompt, &params.sampling, params.max_tokens, |token| {
                if failed.is_some() || ended {
                    return;
                }
                let written = text
                    .push_generated(token)
                    .map_err(anyhow::Error::from)
                    .and_then(|(piece, end)| {
                        ended = end;
                        print_now(&piece)
                    });
                if let Err(e) = written {
                    failed = Some(e);
                }
            })
            .await
            .context("generating through the ring")?;
        if let Some(e) = failed {
            return Err(e);
        }
        // Generation ended by length: hand out what was held back.
        if !ended {
            print_now(&text.flush())?;
        }
        tracing::debug!(tokens = generated.len(), "ring generation done");
        Ok(())
    })
}

fn print_now(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
