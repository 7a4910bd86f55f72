//! `shoal serve`: flags and the config file become a [`NodeConfig`]; `shoal-node` runs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use shoal_api::HttpLimits;
use shoal_cluster::DetectorConfig;
use shoal_node::{ClusterSettings, Node, NodeConfig, SwarmSettings};
use shoal_swarm::roles::RolePrompts;
use shoal_swarm::routing::Strategy;

use crate::cli::{ActivationsArg, ModelArg, Switch};
use crate::load::resolve_model;

/// Default of `--auto-min-speed`, tokens per second: about reading speed.
const DEFAULT_AUTO_MIN_SPEED: f64 = 4.0;

/// The peer port a node with a swarm key listens on when not told.
const DEFAULT_PEER_PORT: u16 = 7471;

/// Default of `--cache-ram`: room for a few long conversations (a 4,000-token prompt of
/// Qwen2.5-Coder-1.5B keeps 109 MiB; of SmolLM2-135M, 88 MiB).
pub(crate) const DEFAULT_CACHE_RAM_MIB: usize = 1024;

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
    /// Render chats with this Jinja chat template instead of the model file's own (as
    /// llama-server's flag: for a GGUF whose template lacks tool calls, or has none).
    #[arg(long)]
    pub(crate) chat_template_file: Option<PathBuf>,
    /// Require this bearer token on API requests.
    #[arg(long, env = "SHOAL_API_KEY")]
    pub(crate) api_key: Option<String>,
    /// The peer port: where other nodes reach this one (membership heartbeats, stage work,
    /// swarm requests); 0 picks a free one. Default: 7471 with a swarm key, none without.
    #[arg(long)]
    pub(crate) peer_port: Option<u16>,
    /// Address the peer port listens on. Default: every interface with a swarm key (peers
    /// must prove they hold it), --host without one.
    #[arg(long)]
    pub(crate) peer_host: Option<String>,
    /// Advertise this node and find the others of its swarm on the local network by mDNS
    /// (with a peer port beyond loopback).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub(crate) mdns: Switch,
    /// Seconds a peer connection may stay silent before it is closed. Announced to whoever
    /// dials this node, who keeps the link by the shorter of it and its own (heads ping
    /// their links every quarter of it), so nodes of one cluster may use different values.
    #[arg(long, default_value_t = shoal_wire::IDLE_TIMEOUT.as_secs_f64())]
    pub(crate) peer_idle_timeout_s: f64,
    /// Seconds between heartbeats to every member.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) heartbeat_interval_s: f64,
    /// Seconds of silence after which a member is `suspect`.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) suspect_after_s: f64,
    /// Seconds of silence after which a member is `dead` (and no longer used).
    #[arg(long, default_value_t = 6.0)]
    pub(crate) dead_after_s: f64,
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
    /// Memory (GiB) this node offers to pipeline plans at most, below what is free: its own
    /// (`--split auto`, `--model auto`) and other heads' (its heartbeats report no more).
    #[arg(long)]
    pub(crate) plan_memory_gib: Option<f64>,
    /// With `--model auto`: a model whose ring the planner predicts slower than this
    /// (tokens/s, one stream) is passed over for a smaller one.
    #[arg(long, default_value_t = DEFAULT_AUTO_MIN_SPEED)]
    pub(crate) auto_min_speed: f64,
    /// How hidden states travel between stages (f32 keeps the output identical to a
    /// single process).
    #[arg(long, value_enum, default_value_t = ActivationsArg::F32)]
    pub(crate) activations: ActivationsArg,
    /// Serve only pipeline stages on --peer-port: no whole model in memory (a stage holds
    /// just its layers), no answers of this node's own. Without --model no model file is
    /// needed: the head sends the layers (kept under `<models dir>/stages/`).
    #[arg(long)]
    pub(crate) stage_only: bool,
    /// Swarm role of this node as an agent: reasoner, writer, concise, critic, factchecker,
    /// drafter, spotter or aggregator (none: a plain worker). Several, separated by commas
    /// (`reasoner,critic`), make one model answer as each: one device holds the weights
    /// once, and the roles' answers share its passes.
    #[arg(long)]
    pub(crate) role: Option<String>,
    /// This node's id on the peer protocol (default: host name and peer port).
    #[arg(long)]
    pub(crate) node_id: Option<String>,
    /// Swarm head: the strategy of `"model": "swarm"` (moa, vote, confidence, fastest, speed,
    /// strongest, cluster, verify, auto). `auto` asks the largest model alone when it has twice the
    /// parameters of every other agent's, else votes: what measured best, docs/EVAL.md.
    #[arg(long, default_value = "auto")]
    pub(crate) swarm_strategy: String,
    /// Swarm head: seconds after which a simple factual query takes the answers it has (with
    /// none yet, it waits for the first, up to what its max_tokens needs).
    #[arg(long, default_value_t = 6.0)]
    pub(crate) swarm_timeout_simple: f64,
    /// Swarm head: the same for every other query type.
    #[arg(long, default_value_t = 12.0)]
    pub(crate) swarm_timeout_complex: f64,
    /// Swarm head: answers sampled in all for `vote`.
    #[arg(long, default_value_t = 5)]
    pub(crate) swarm_samples: usize,
    /// Swarm head: `vote` runs candidates' code against the examples in the prompt, in a
    /// sandbox (docs/SECURITY.md); where this machine has none, no code runs either way.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub(crate) swarm_code_checks: Switch,
    #[command(flatten)]
    pub(crate) key: crate::key::KeyArgs,
    /// MiB of keys and values kept from earlier prompts, so that a prompt that starts the
    /// same way (a conversation's next turn, a shared system prompt) computes only what is
    /// new (llama-server's flag). 0 turns the prompt cache off.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_CACHE_RAM_MIB)]
    pub(crate) cache_ram: usize,
    #[command(flatten)]
    pub(crate) speculation: crate::cli::SpeculationArgs,
    /// Requests waiting for the model at most; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = HttpLimits::default().max_queue)]
    pub(crate) max_queue: usize,
    /// Seconds a streaming client may stop reading before it is dropped (and its
    /// generation stopped).
    #[arg(long, default_value_t = 30.0)]
    pub(crate) client_stall_timeout_s: f64,
    /// Seconds a client may take to send a request's headers, and then its body.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) request_timeout_s: f64,
    /// How `/v1/embeddings` pools a text's hidden states into one vector: `mean`, `cls`
    /// (the first token's) or `last`; by default as the model file says (the mean for a
    /// generative model).
    #[arg(long, value_enum)]
    pub(crate) pooling: Option<crate::cli::PoolingArg>,
    /// Stop strings per request at most.
    #[arg(long, default_value_t = HttpLimits::default().max_stop)]
    pub(crate) max_stop: usize,
    /// Bytes per stop string at most.
    #[arg(long, default_value_t = HttpLimits::default().max_stop_len)]
    pub(crate) max_stop_len: usize,
}

pub(crate) fn serve(a: ServeArgs, prompts: RolePrompts) -> anyhow::Result<ExitCode> {
    let config = node_config(a, prompts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let node = Node::start(config).await?;
        // Tests and scripts read these exact lines to learn the ports.
        eprintln!("listening on http://{}", node.http_addr());
        if let Some(peer) = node.peer_addr() {
            eprintln!("peer port listening on {peer}");
        }
        node.serve_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The node `serve`'s flags describe; the model is found (or fetched) here.
fn node_config(a: ServeArgs, prompts: RolePrompts) -> anyhow::Result<NodeConfig> {
    let roles = shoal_swarm::roles::parse_roles(a.role.as_deref().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("--role: {e}"))?;
    let strategy = a
        .swarm_strategy
        .parse::<Strategy>()
        .map_err(|e| anyhow::anyhow!("--swarm-strategy: {e}"))?;
    let mut config = NodeConfig::new(PathBuf::new(), bind_addr(&a.host, a.port)?);
    config.model_id = a.model_id;
    config.chat_template = a
        .chat_template_file
        .as_deref()
        .map(|path| -> anyhow::Result<String> {
            let what = || format!("--chat-template-file {}", path.display());
            let source = std::fs::read_to_string(path).with_context(what)?;
            // A template that does not compile is refused now, not when the model is up.
            shoal_engine::ChatTemplate::from_source(&source, "", "").with_context(what)?;
            Ok(source)
        })
        .transpose()?;
    config.prompt_cache_bytes = a.cache_ram.saturating_mul(1 << 20);
    config.speculation = a.speculation.speculation();
    config.pooling = a.pooling.map(crate::cli::PoolingArg::pooling);
    // Resolved (perhaps fetched) after the checks below.
    config.model_draft = a.speculation.model_draft.clone();
    config.api_key = a.api_key;
    config.http_limits = HttpLimits {
        max_queue: a.max_queue,
        client_stall_timeout: secs(a.client_stall_timeout_s, "client-stall-timeout-s")?,
        request_read_timeout: secs(a.request_timeout_s, "request-timeout-s")?,
        max_stop: a.max_stop,
        max_stop_len: a.max_stop_len,
    };
    let key = a.key.key()?;
    let peer_port = a.peer_port.or(key.as_ref().map(|_| DEFAULT_PEER_PORT));
    let peer_host = a.peer_host.clone().unwrap_or_else(|| match &key {
        Some(_) => "0.0.0.0".to_owned(),
        None => a.host.clone(),
    });
    config.peer_addr = peer_port
        .map(|port| bind_addr(&peer_host, port))
        .transpose()?;
    config.peers = a.peers;
    config.split = a.split;
    config.plan_memory_bytes = a
        .plan_memory_gib
        .map(|g| (g * 1024.0 * 1024.0 * 1024.0) as u64);
    config.activations = a.activations.dtype();
    config.stage_only = a.stage_only;
    config.roles = roles;
    config.node_id = a.node_id;
    config.swarm_key = key;
    config.insecure_peers = a.key.insecure_peers;
    config.swarm = SwarmSettings {
        strategy,
        timeout_simple: secs(a.swarm_timeout_simple, "swarm-timeout-simple")?,
        timeout_complex: secs(a.swarm_timeout_complex, "swarm-timeout-complex")?,
        vote_samples: a.swarm_samples,
        code_checks: a.swarm_code_checks == Switch::On,
        prompts,
    };
    config.peer_idle_timeout = secs(a.peer_idle_timeout_s, "peer-idle-timeout-s")?;
    let interval = secs(a.heartbeat_interval_s, "heartbeat-interval-s")?;
    config.cluster = ClusterSettings {
        detector: DetectorConfig {
            interval,
            probe_timeout: (2 * interval).max(Duration::from_secs(1)),
            suspect_after: secs(a.suspect_after_s, "suspect-after-s")?,
            dead_after: secs(a.dead_after_s, "dead-after-s")?,
            ..DetectorConfig::default()
        },
        mdns: a.mdns == Switch::On,
    };
    // Refuse a contradiction before a model is fetched for it.
    config.check()?;
    let auto = a.model.model.as_deref() == Some(std::path::Path::new(shoal_node::AUTO_MODEL_ID));
    if config.chat_template.is_some() && (config.stage_only || auto) {
        anyhow::bail!(
            "--chat-template-file has no use with {}: {}",
            if auto { "--model auto" } else { "--stage-only" },
            if auto {
                "the cluster picks the model, and a template is written for one model's format"
            } else {
                "a stage renders no prompts; give the template to the head"
            }
        );
    }
    config.model = match a.model.model.as_deref() {
        // A stage-only node needs no model file: heads send it the layers it is to run
        // (weights over the LAN), kept in its models directory for next time.
        None if a.stage_only => shoal_models::models_dir().join(shoal_models::default_model().file),
        // The cluster's model is picked by the head as members come (the models
        // directory is where it looks, and fetches to).
        Some(_) if auto && config.peer_addr.is_some() => {
            let dir = shoal_models::models_dir();
            config.auto_model = Some(auto_model(dir.clone(), a.auto_min_speed)?);
            dir.join(shoal_models::default_model().file)
        }
        given => resolve_model(given)?,
    };
    if let Some(draft) = config.model_draft.take() {
        config.model_draft = Some(resolve_model(Some(&draft)).context("--model-draft")?);
    }
    Ok(config)
}

/// How `--model auto` picks, fetching known models into `dir` when they are missing.
fn auto_model(dir: PathBuf, min_tokens_per_s: f64) -> anyhow::Result<shoal_node::AutoModel> {
    if !min_tokens_per_s.is_finite() || min_tokens_per_s < 0.0 {
        anyhow::bail!("--auto-min-speed: {min_tokens_per_s} is not a speed in tokens/s");
    }
    let into = dir.clone();
    Ok(shoal_node::AutoModel {
        models_dir: dir,
        min_tokens_per_s,
        fetch: Some(std::sync::Arc::new(move |model| {
            crate::models::pull(model, &into, shoal_models::Source::Auto)
                .map_err(|e| format!("{e:#}"))
        })),
    })
}

/// A flag's seconds as a duration (not negative, not NaN).
fn secs(v: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("--{flag}: {v} is not a time in seconds"))
}

/// Resolves `host:port`.
fn bind_addr(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()
        .and_then(|mut it| it.next())
        .with_context(|| format!("cannot resolve --host {host}"))
}
