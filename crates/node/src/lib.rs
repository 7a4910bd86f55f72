//! A Shoal node as a library: a [`NodeConfig`] in, a running [`Node`] out.
//!
//! A node is what `shoal serve` runs on every device: the HTTP API (OpenAI-compatible,
//! `/metrics`, swarm routes), and with a peer port, the stage server and swarm agent that
//! other nodes use. What it does with its model depends on the config:
//!
//! - **stage only** (`stage_only`): serves pipeline stages on its peer port, holds no whole
//!   model and answers no requests itself;
//! - **pipeline head** (`split` and `peers`): connects a ring over itself and the peers
//!   (placed by the planner with `split = "auto"`) and answers through it;
//! - **swarm head** (`peers` without `split`): answers `"model": "swarm"` with the peers as
//!   agents, and with its own model otherwise;
//! - **single node** (neither): loads the whole model and answers with it; with a peer port
//!   it is also a swarm agent for other heads.
//!
//! [`Node::start`] binds the listeners and returns at once with their addresses; the model
//! loads (or the ring connects) in the background while `/health` says so. Several nodes
//! can run in one process, which is how the end-to-end tests in `tests/` start clusters.
//! The `shoal` binary only turns flags and the config file into a [`NodeConfig`].

mod auto_model;
mod config;
mod error;
mod head;
mod membership;
mod peer_port;

pub use auto_model::AUTO_MODEL_ID;
pub use config::{AutoModel, FetchModel, NodeConfig, SwarmSettings, DEFAULT_PROMPT_CACHE_BYTES};
pub use error::NodeError;
pub use membership::ClusterSettings;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_api::{AppState, ClusterHandle};
use shoal_cluster::Roster;
use shoal_engine::Model;
use shoal_swarm::{CodeChecks, Swarm, SwarmConfig};
use shoal_wire::Transport;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::peer_port::AgentSlot;

/// The role a stage-only node gives in its heartbeats (`/v1/cluster` shows it): it serves
/// pipeline stages and no whole model, so it is no swarm agent.
pub const STAGE_ONLY_ROLE: &str = "stage";

/// How often a swarm head asks its agents how they are.
const SWARM_MONITOR_PERIOD: Duration = Duration::from_secs(5);

/// A running node. Dropping it stops nothing; call [`Node::shutdown`].
pub struct Node {
    http_addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    node_id: String,
    state: AppState,
    roster: Arc<Roster>,
    /// Set to `true` once: every listener and background loop stops.
    stop: watch::Sender<bool>,
    http: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Node {
    /// Checks the config, binds the HTTP API (and the peer port), and starts the node's
    /// work in the background: loading the model, connecting the ring, heading the swarm.
    /// Must be called inside a multi-threaded tokio runtime.
    pub async fn start(mut config: NodeConfig) -> Result<Node, NodeError> {
        if config.auto_model.is_some() && config.split.is_none() {
            // The model for the room runs as a ring planned over the members.
            config.split = Some("auto".to_owned());
        }
        config.check()?;
        // A swarm head's agents are resolved now (a bad address fails the start); a
        // pipeline head resolves its peers when it connects the ring, in the background.
        let swarm_agents = match config.split {
            Some(_) => Vec::new(),
            None => config
                .peers
                .iter()
                .map(|p| shoal_pipeline::resolve_addr(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(NodeError::Peers)?,
        };
        let listener = bind("for HTTP", config.http_addr).await?;
        let http_addr = local_addr("for HTTP", config.http_addr, &listener)?;
        let state = AppState::with_limits(
            config.model_id(),
            config.api_key.clone(),
            config.http_limits.clone(),
        );
        let (stop, _) = watch::channel(false);
        let mut background = Vec::new();

        let agent: AgentSlot = Default::default();
        let mut node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| peer_port::default_node_id(None));
        let transport = Transport {
            idle_timeout: config.peer_idle_timeout,
            ..Transport::with_key(config.swarm_key.clone())
        };
        match &config.swarm_key {
            Some(key) => tracing::info!(
                key_id = %key.id(),
                "peer connections are authenticated and encrypted with the swarm key"
            ),
            None if config.insecure_peers => tracing::warn!(
                "no swarm key and --insecure-peers: peer connections are plain and anyone who \
                 reaches the peer port can use this node; `shoal key new` makes a key"
            ),
            None => {
                tracing::info!("no swarm key: peer connections are plain, on this machine only")
            }
        }
        let mut peer_listener = None;
        if let Some(addr) = config.peer_addr {
            let listener = bind("for peers", addr).await?;
            let bound = local_addr("for peers", addr, &listener)?;
            peer_listener = Some((listener, bound));
            if config.node_id.is_none() {
                node_id = peer_port::default_node_id(Some(bound.port()));
            }
        }
        let peer_addr = peer_listener.as_ref().map(|(_, bound)| *bound);

        let me = {
            let (id, model) = (node_id.clone(), config.model.clone());
            // A stage-only node says so: it holds no whole model, so swarm heads do not
            // take it for an agent.
            let role = if config.stage_only {
                Some(STAGE_ONLY_ROLE.to_owned())
            } else {
                Some(shoal_swarm::roles::roles_text(&config.roles)).filter(|r| !r.is_empty())
            };
            let (http_port, peer_port) = (http_addr.port(), peer_addr.map_or(0, |a| a.port()));
            let offer = config.plan_memory_bytes;
            tokio::task::spawn_blocking(move || {
                membership::describe_me(&id, &model, role.as_deref(), http_port, peer_port, offer)
            })
            .await
            .map_err(|e| NodeError::Config(format!("reading this device's hardware: {e}")))?
        };
        let roster = Arc::new(Roster::new(me, peer_addr, config.cluster.detector));
        state.set_cluster(ClusterHandle {
            roster: roster.clone(),
            prober: peer_addr.map(|_| membership::prober(&roster, transport.clone())),
        });

        let head_ring = membership::HeadRing::default();
        if let Some((listener, _)) = peer_listener {
            let port = peer_port::PeerPortSetup {
                model_path: config.model.clone(),
                node_id: node_id.clone(),
                agent: agent.clone(),
                stats: state.batch_stats(),
                weight_stats: state.weight_stats(),
                transport: transport.clone(),
                roster: roster.clone(),
                prompt_cache_bytes: config.prompt_cache_bytes,
                load: {
                    let state = state.clone();
                    Arc::new(move || state.load_figures())
                },
                head: head_ring.clone(),
                memory_offer: config.plan_memory_bytes,
            };
            let stopped_port = stopped(&stop);
            background.push(tokio::spawn(async move {
                peer_port::serve_peer_port(listener, port, stopped_port).await;
            }));
            background.push(membership::start_heartbeats(
                roster.clone(),
                transport.clone(),
                config.peers.clone(),
                stopped(&stop),
            ));
            let beyond_loopback = peer_addr.is_some_and(|a| !a.ip().is_loopback());
            if config.cluster.mdns && beyond_loopback {
                let fingerprint = config.swarm_key.as_ref().map(|k| k.id());
                if let Some(task) = membership::start_mdns(&roster, fingerprint, stopped(&stop)) {
                    background.push(task);
                }
            }
        }

        if config.stage_only {
            state.set_stage_only();
        } else if let Some(split) = config.split.clone() {
            let head = head::PipelineHead {
                model: config.model.clone(),
                split,
                peers: config.peers.clone(),
                roster: roster.clone(),
                activations: config.activations,
                node_id: node_id.clone(),
                memory_cap: config.plan_memory_bytes,
                transport: transport.clone(),
                prompt_cache_bytes: config.prompt_cache_bytes,
                speculation: config.speculation,
                model_draft: config.model_draft.clone(),
                chat_template: config.chat_template.clone(),
                pooling: config.pooling,
                ring: head_ring.clone(),
                weight_stats: state.weight_stats(),
            };
            background.push(match config.auto_model.clone() {
                Some(auto) => auto_model::start(head, auto, state.clone()),
                None => head.start(state.clone()),
            });
        } else {
            // With a peer port the node is a member of its cluster, and heads a swarm of the
            // members it finds (with `--peer`s, of those from the start).
            let members = config.peer_addr.is_some().then(|| roster.clone());
            let swarm = (!swarm_agents.is_empty() || members.is_some())
                .then(|| swarm_config(&config.swarm, &node_id, swarm_agents, &transport));
            // Every node with a peer port is a swarm agent (a plain worker without a role),
            // and a swarm head answers with its own model as a last resort.
            let setup = (config.peer_addr.is_some() || swarm.is_some()).then(|| AgentSetup {
                slot: agent,
                node_id: node_id.clone(),
                roles: config.roles.clone(),
                prompts: config.swarm.prompts.clone(),
            });
            let swarm = swarm.map(|config| (config, members));
            start_local_model(
                state.clone(),
                config.model.clone(),
                LocalModelSettings {
                    prompt_cache_bytes: config.prompt_cache_bytes,
                    speculation: config.speculation,
                    model_draft: config.model_draft.clone(),
                    chat_template: config.chat_template.clone(),
                    pooling: config.pooling,
                },
                setup,
                swarm,
                &stop,
            );
        }

        let http = tokio::spawn(shoal_api::serve(listener, state.clone(), stopped(&stop)));
        Ok(Node {
            http_addr,
            peer_addr,
            node_id,
            state,
            roster,
            stop,
            http,
            background,
        })
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the peer port listens, if this node has one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// This node's id on the peer protocol.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The cluster's members as this node sees them.
    pub fn roster(&self) -> &Arc<Roster> {
        &self.roster
    }

    /// The API's shared state (readiness, metrics).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` (e.g. Ctrl-C) or until the HTTP server fails, then shuts down.
    pub async fn serve_until(mut self, signal: impl Future<Output = ()>) -> Result<(), NodeError> {
        tokio::select! {
            () = signal => self.shutdown().await,
            ended = &mut self.http => {
                stop_all(&self.stop, self.background).await;
                http_outcome(ended)
            }
        }
    }

    /// Stops accepting, lets the HTTP requests in flight finish, and ends the peer port and
    /// every background loop. A model still loading finishes loading on its own thread and
    /// is then dropped.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        let _ = self.stop.send(true);
        let served = self.http.await;
        stop_all(&self.stop, self.background).await;
        http_outcome(served)
    }
}

/// Tells every loop to stop and ends the background tasks.
async fn stop_all(stop: &watch::Sender<bool>, background: Vec<JoinHandle<()>>) {
    let _ = stop.send(true);
    for task in background {
        task.abort();
        let _ = task.await;
    }
}

/// How the HTTP server's task ended, as the node reports it.
fn http_outcome(ended: Result<(), tokio::task::JoinError>) -> Result<(), NodeError> {
    ended.map_err(|e| NodeError::Http(std::io::Error::other(e)))
}

/// Resolves once `stop` says so (or its sender is gone).
fn stopped(stop: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen { what, addr, source })
}

fn local_addr(
    what: &'static str,
    addr: SocketAddr,
    listener: &TcpListener,
) -> Result<SocketAddr, NodeError> {
    listener
        .local_addr()
        .map_err(|source| NodeError::Listen { what, addr, source })
}

/// The swarm this node heads: one agent per peer.
fn swarm_config(
    settings: &SwarmSettings,
    node_id: &str,
    agents: Vec<SocketAddr>,
    transport: &Transport,
) -> SwarmConfig {
    let mut config = SwarmConfig::new(node_id, agents);
    config.transport = transport.clone();
    config.strategy = settings.strategy;
    config.timeouts.simple = settings.timeout_simple;
    config.timeouts.complex = settings.timeout_complex;
    config.vote_samples = settings.vote_samples;
    if !settings.code_checks {
        config.code_checks = CodeChecks::Off;
    }
    config.prompts = settings.prompts.clone();
    config
}

/// How this node's model also serves as a swarm agent.
struct AgentSetup {
    /// Where the peer port finds the agent once the model has loaded.
    slot: AgentSlot,
    node_id: String,
    roles: Vec<shoal_swarm::roles::Role>,
    prompts: shoal_swarm::roles::RolePrompts,
}

/// Loads the whole model in the background; then makes it this node's agent (with a peer
/// port or a swarm), starts heading the swarm (with peers, and the cluster's members as
/// they are found), and serves the API.
fn start_local_model(
    state: AppState,
    path: PathBuf,
    settings: LocalModelSettings,
    agent: Option<AgentSetup>,
    swarm: Option<(SwarmConfig, Option<Arc<Roster>>)>,
    stop: &watch::Sender<bool>,
) {
    let handle = tokio::runtime::Handle::current();
    let stopped = stopped(stop);
    tokio::task::spawn_blocking(move || {
        let model = match load_model(&path).and_then(|model| settings.apply(model)) {
            Ok(model) => Arc::new(model),
            Err(e) => {
                tracing::error!("{e}");
                state.set_failed(e.to_string());
                return;
            }
        };
        if let Some(a) = agent {
            let service = peer_port::make_agent(
                model.clone(),
                &a.node_id,
                &path,
                &a.roles,
                &a.prompts,
                shoal_api::agent_chat_api(state.clone()),
            );
            let _ = a.slot.set(service.clone());
            if let Some((config, members)) = swarm {
                let _runtime = handle.enter();
                let swarm = Arc::new(Swarm::new(config, Some(service)));
                let monitor = swarm.spawn_monitor(SWARM_MONITOR_PERIOD);
                let adopt = members.map(|roster| adopt_members(swarm.clone(), roster));
                handle.spawn(async move {
                    stopped.await;
                    monitor.abort();
                    if let Some(adopt) = adopt {
                        adopt.abort();
                    }
                });
                state.set_swarm(swarm);
            }
        }
        state.set_model_file(path);
        state.set_ready(model);
    });
}

/// Makes every alive member of the cluster an agent of `swarm` as it is found (a member
/// that dies is dropped from answers by the swarm's own health checks).
fn adopt_members(swarm: Arc<Swarm>, roster: Arc<Roster>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let alive = roster.alive(tokio::time::Instant::now().into_std());
            for member in alive.iter().filter(|m| m.info.role != STAGE_ONLY_ROLE) {
                if swarm.add_agent(member.addr) {
                    tracing::info!(
                        agent = %member.info.node_id,
                        role = %member.info.role,
                        "a member of the cluster joins the swarm as an agent"
                    );
                }
            }
        }
    })
}

/// What a node's whole model is set up with once loaded.
struct LocalModelSettings {
    prompt_cache_bytes: usize,
    speculation: Option<shoal_engine::Speculation>,
    model_draft: Option<PathBuf>,
    chat_template: Option<String>,
    pooling: Option<shoal_engine::Pooling>,
}

impl LocalModelSettings {
    fn apply(self, mut model: Model) -> Result<Model, String> {
        if let Some(source) = &self.chat_template {
            model
                .set_chat_template(source)
                .map_err(|e| format!("the chat template file: {e}"))?;
        }
        model.set_prompt_cache_bytes(self.prompt_cache_bytes);
        if let Some(pooling) = self.pooling {
            model.set_pooling(pooling);
        }
        if let Some(path) = &self.model_draft {
            let draft = load_model(path)?;
            // The draft keeps its own rows of the same prompts, within the same budget.
            draft.set_prompt_cache_bytes(self.prompt_cache_bytes);
            model.attach_draft(draft).map_err(|e| e.to_string())?;
        }
        model.set_speculation(self.speculation);
        Ok(model)
    }
}

/// Loads the whole model, logging how long it took.
pub(crate) fn load_model(path: &Path) -> Result<Model, String> {
    let started = Instant::now();
    let model =
        Model::load(path, |_, _| {}).map_err(|e| format!("loading {}: {e}", path.display()))?;
    tracing::info!(
        model = model.name(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(model)
}
