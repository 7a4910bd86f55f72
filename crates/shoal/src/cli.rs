//! Command-line interface.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shoal_engine::{ChatMessage, GenerateParams, Generation, SamplingParams};
use shoal_swarm::roles::{Role, RolePrompts};
use shoal_swarm::routing::Strategy;
use shoal_swarm::{Swarm, SwarmConfig};

use crate::load::{load_model, resolve_model};

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
    Serve(ServeArgs),
    /// Measure prefill and decode speed and peak memory.
    Bench(crate::bench::BenchArgs),
    /// List the known models and which are here; `models pull NAME` fetches one.
    Models(crate::models::ModelsArgs),
    /// Where a model's layers would go across devices, with predicted speed, and why.
    Plan(crate::plan::PlanArgs),
    /// Measure answer quality against a running API (`eval humaneval`: pass@1).
    Eval(crate::eval::EvalArgs),
    /// Test and bench tool: a TCP relay that delays every byte by --delay-ms each way (a slow
    /// link between pipeline stages on one machine).
    Relay(crate::relay::RelayArgs),
}

#[derive(Args)]
pub(crate) struct ModelArg {
    /// GGUF model file, or a known model's name (smollm2, qwen05, qwen15, gemma3; see
    /// `shoal models`), fetched into $SHOAL_MODELS_DIR or ./models if missing. Default:
    /// smollm2.
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
        }
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
    #[arg(long, value_enum, default_value_t = crate::ring::ActivationsArg::F32)]
    pub(crate) activations: crate::ring::ActivationsArg,
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Read settings from this TOML file (keys are these flags' names; flags given here win).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// The model id clients send (default: the file's stem).
    #[arg(long)]
    pub(crate) model_id: Option<String>,
    /// Require this bearer token on API requests.
    #[arg(long, env = "SHOAL_API_KEY")]
    pub(crate) api_key: Option<String>,
    /// Also serve stage work to pipeline heads (`shoal run --peer`) on this port of --host
    /// (0 picks a free one).
    #[arg(long)]
    pub(crate) peer_port: Option<u16>,
    /// Another node's peer port, as HOST:PORT (repeatable, in ring order). With --split this
    /// node heads a pipeline over itself and these peers and answers the API through it;
    /// without, it heads a swarm of these agents (`"model": "swarm"`).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub(crate) peers: Vec<String>,
    /// Layers per stage, e.g. `0-9,10-19,20-29`: this node runs the first range, each --peer
    /// the next one in order. `auto`: measure this node and ask every peer for its profile
    /// (time per layer, free memory, round trip), and let the planner place the layers.
    #[arg(long)]
    pub(crate) split: Option<String>,
    /// With `--split auto`: memory (GiB) this node offers to the plan, below what is free.
    #[arg(long)]
    pub(crate) plan_memory_gib: Option<f64>,
    /// How hidden states travel between stages (f32 keeps the output identical to a
    /// single process).
    #[arg(long, value_enum, default_value_t = crate::ring::ActivationsArg::F32)]
    pub(crate) activations: crate::ring::ActivationsArg,
    /// Serve only pipeline stages on --peer-port: no whole model in memory (a stage holds
    /// just its layers), no answers of this node's own.
    #[arg(long)]
    pub(crate) stage_only: bool,
    /// Swarm role of this node as an agent: reasoner, writer, concise, critic, factchecker,
    /// drafter, spotter or aggregator (none: a plain worker).
    #[arg(long)]
    pub(crate) role: Option<String>,
    /// This node's id on the peer protocol (default: host name and peer port).
    #[arg(long)]
    pub(crate) node_id: Option<String>,
    /// Swarm head: the strategy of `"model": "swarm"` (moa, vote, confidence, fastest, speed,
    /// strongest, auto). `auto` asks the largest model alone when it has twice the
    /// parameters of every other agent's, else votes: what measured best, docs/EVAL.md.
    #[arg(long, default_value = "auto")]
    pub(crate) swarm_strategy: String,
    /// Swarm head: seconds allowed for answers to simple factual queries.
    #[arg(long, default_value_t = 6.0)]
    pub(crate) swarm_timeout_simple: f64,
    /// Swarm head: seconds allowed for answers to every other query type.
    #[arg(long, default_value_t = 12.0)]
    pub(crate) swarm_timeout_complex: f64,
    /// Swarm head: answers sampled in all for `vote`.
    #[arg(long, default_value_t = 5)]
    pub(crate) swarm_samples: usize,
}

pub(crate) fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(a) => run_once(a),
        Command::Chat(a) => chat(a),
        Command::Serve(mut a) => {
            let prompts = crate::config::apply(&mut a, matches.subcommand_matches("serve"))?;
            serve(a, prompts)
        }
        Command::Bench(a) => crate::bench::bench(a),
        Command::Plan(a) => crate::plan::run(a),
        Command::Models(a) => crate::models::models(a),
        Command::Eval(a) => crate::eval::run(a),
        Command::Relay(a) => crate::relay::run(a),
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
    let model = load_model(&path, false)?;
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
        let ranges = crate::ring::check_split(split, a.peers.len(), model.config().n_layers)?;
        // The head loads its own stage; the whole model is not needed any more.
        drop(model);
        crate::ring::run_ring(
            &path,
            &ids,
            &a.peers,
            &ranges,
            &a.sampling.params(),
            a.activations,
        )?;
        println!();
        return Ok(ExitCode::SUCCESS);
    }
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
}

fn chat(a: ChatArgs) -> anyhow::Result<ExitCode> {
    let path = resolve_model(a.model.model.as_deref())?;
    let model = load_model(&path, false)?;
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

/// Resolves `host:port`.
fn bind_addr(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    format!("{host}:{port}").parse().or_else(|_| {
        std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .ok()
            .and_then(|mut it| it.next())
            .context("cannot resolve --host")
    })
}

fn serve(a: ServeArgs, prompts: RolePrompts) -> anyhow::Result<ExitCode> {
    if a.stage_only && (a.split.is_some() || a.role.is_some() || !a.peers.is_empty()) {
        anyhow::bail!(
            "--stage-only serves stages for a head; it takes no --split, --role or --peer"
        );
    }
    if a.stage_only && a.peer_port.is_none() {
        anyhow::bail!("--stage-only needs --peer-port (where heads send stage work)");
    }
    if a.split.is_some() && a.peers.is_empty() {
        anyhow::bail!("--split needs a --peer for every range after this node's");
    }
    let path = resolve_model(a.model.model.as_deref())?;
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let role = a
        .role
        .as_deref()
        .map(str::parse::<Role>)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--role: {e}"))?;
    let strategy = a
        .swarm_strategy
        .parse::<Strategy>()
        .map_err(|e| anyhow::anyhow!("--swarm-strategy: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = bind_addr(&a.host, a.port)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let state = shoal_api::AppState::new(model_id, a.api_key.clone());
        // Tests and scripts read this exact line to learn the port.
        eprintln!("listening on http://{local}");
        let mut node_id = a
            .node_id
            .clone()
            .unwrap_or_else(|| crate::node::default_node_id(None));
        let agent: crate::node::AgentSlot = Default::default();
        if let Some(peer_port) = a.peer_port {
            let peer_addr = bind_addr(&a.host, peer_port)?;
            let peer_listener = tokio::net::TcpListener::bind(peer_addr)
                .await
                .with_context(|| format!("cannot listen for peers on {peer_addr}"))?;
            let peer_local = peer_listener.local_addr()?;
            // Tests and scripts read this exact line to learn the peer port.
            eprintln!("peer port listening on {peer_local}");
            if a.node_id.is_none() {
                node_id = crate::node::default_node_id(Some(peer_local.port()));
            }
            let (model_path, node_id, agent) = (path.clone(), node_id.clone(), agent.clone());
            let stats = state.batch_stats();
            tokio::spawn(async move {
                crate::node::serve_peer_port(peer_listener, &model_path, node_id, agent, stats)
                    .await;
            });
        }
        if a.stage_only {
            state.set_stage_only();
        } else if let Some(split) = a.split.clone() {
            let plan = PlanInputs {
                node_id: node_id.clone(),
                memory_cap: a
                    .plan_memory_gib
                    .map(|g| (g * 1024.0 * 1024.0 * 1024.0) as u64),
            };
            start_pipeline_head(
                state.clone(),
                path,
                split,
                a.peers.clone(),
                a.activations,
                plan,
            );
        } else {
            let swarm = swarm_config(&a, &node_id, strategy, &prompts)?;
            // Every node with a peer port is a swarm agent (a plain worker without a role),
            // and a swarm head answers with its own model as a last resort.
            let agent = (a.peer_port.is_some() || swarm.is_some()).then(|| AgentSetup {
                slot: agent,
                node_id: node_id.clone(),
                role,
                prompts,
            });
            start_local_model(state.clone(), path, agent, swarm);
        }
        axum::serve(listener, shoal_api::app(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The swarm this node heads: one agent per `--peer` (without `--split`).
fn swarm_config(
    a: &ServeArgs,
    node_id: &str,
    strategy: Strategy,
    prompts: &RolePrompts,
) -> anyhow::Result<Option<SwarmConfig>> {
    if a.peers.is_empty() {
        return Ok(None);
    }
    let agents = a
        .peers
        .iter()
        .map(|p| crate::ring::resolve_addr(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = SwarmConfig::new(node_id, agents);
    config.strategy = strategy;
    config.timeouts.simple = Duration::from_secs_f64(a.swarm_timeout_simple);
    config.timeouts.complex = Duration::from_secs_f64(a.swarm_timeout_complex);
    config.vote_samples = a.swarm_samples;
    config.prompts = prompts.clone();
    Ok(Some(config))
}

/// How this node's model also serves as a swarm agent.
struct AgentSetup {
    /// Where the peer port finds the agent once the model has loaded.
    slot: crate::node::AgentSlot,
    node_id: String,
    role: Option<Role>,
    prompts: RolePrompts,
}

/// Loads the whole model in the background; then makes it this node's agent (with a peer
/// port or a swarm), starts heading the swarm (with `--peer`), and serves the API.
fn start_local_model(
    state: shoal_api::AppState,
    path: PathBuf,
    agent: Option<AgentSetup>,
    swarm: Option<SwarmConfig>,
) {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let model = match load_model(&path, true) {
            Ok(model) => Arc::new(model),
            Err(e) => {
                tracing::error!("{e:#}");
                state.set_failed(format!("{e:#}"));
                return;
            }
        };
        if let Some(a) = agent {
            let service =
                crate::node::make_agent(model.clone(), &a.node_id, &path, a.role, &a.prompts);
            let _ = a.slot.set(service.clone());
            if let Some(config) = swarm {
                let _runtime = handle.enter();
                let swarm = Arc::new(Swarm::new(config, Some(service)));
                swarm.spawn_monitor(Duration::from_secs(5));
                state.set_swarm(swarm);
            }
        }
        state.set_ready(model);
    });
}

/// Pipeline head: plans the ring (`--split auto`) or checks the given split, loads only the
/// first stage, sets up the peers' stages, then answers through the ring.
fn start_pipeline_head(
    state: shoal_api::AppState,
    path: std::path::PathBuf,
    split: String,
    peers: Vec<String>,
    activations: crate::ring::ActivationsArg,
    plan: PlanInputs,
) {
    tokio::spawn(async move {
        let ring = async {
            let (ranges, peers, replan) = if split.trim() == "auto" {
                let (ranges, peers, planner) =
                    crate::ring::plan_ring(&path, &peers, &plan.node_id, plan.memory_cap).await?;
                let replan: Arc<dyn shoal_pipeline::Replan> = Arc::new(planner);
                (ranges, peers, Some(replan))
            } else {
                let n_layers = shoal_engine::GgufFile::open(&path)?.config().n_layers;
                let ranges = crate::ring::check_split(&split, peers.len(), n_layers)?;
                (ranges, peers, None)
            };
            let shown: Vec<String> = ranges
                .iter()
                .map(|r| format!("{}-{}", r.start, r.end.saturating_sub(1)))
                .collect();
            let stats = state.batch_stats();
            let pipeline =
                crate::ring::connect_ring(&path, &peers, &ranges, activations, stats, replan)
                    .await?;
            eprintln!(
                "pipeline ready: {} over this node and {peers:?}",
                shown.join(",")
            );
            anyhow::Ok(pipeline)
        };
        match ring.await {
            Ok(pipeline) => state.set_ready(Arc::new(pipeline)),
            Err(e) => {
                tracing::error!("{e:#}");
                state.set_failed(format!("{e:#}"));
            }
        }
    });
}

/// What `--split auto` needs besides the peers.
struct PlanInputs {
    node_id: String,
    /// Memory this node offers to the plan, if capped below what is free.
    memory_cap: Option<u64>,
}
