//! A node's peer port: one listener for everything peers ask of this node — stage work from
//! pipeline heads (`LoadStage`, `Forward`, …) and swarm requests from swarm heads
//! (`Describe`, `Ask`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use shoal_cluster::heartbeat::answer_heartbeat;
use shoal_cluster::Roster;
use shoal_engine::Model;
use shoal_pipeline::{BatchStats, StageServer, StageServerConfig, WholeModel};
use shoal_swarm::agent::{measure_decode_speed, AgentConfig, AgentService, ChatApi};
use shoal_swarm::roles::{Role, RolePrompts};
use shoal_swarm::weight::thermal_penalty;
use shoal_wire::{
    serve_peers, Capabilities, Chaos, Connection, ErrorCode, ErrorMessage, Hello, HelloAck,
    Message, PeerService, ServeConfig, Transport, WireError,
};
use tokio::net::TcpListener;

use crate::membership;

/// This node as a swarm agent, once its model has loaded.
pub(crate) type AgentSlot = Arc<OnceLock<Arc<AgentService>>>;

/// Wraps a loaded model as this node's agent: its role and role prompt, its measured decode
/// speed, and its device's thermal penalty, as swarm heads will see them in its card; the
/// whole API requests heads pass on go to `chat_api` (the node's own chat API).
pub(crate) fn make_agent(
    model: Arc<Model>,
    node_id: &str,
    model_path: &Path,
    roles: &[Role],
    prompts: &RolePrompts,
    chat_api: ChatApi,
) -> Arc<AgentService> {
    let model_id = model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut config = AgentConfig::new(node_id, model_id);
    config.role = shoal_swarm::roles::roles_text(roles);
    // An agent of several roles has no one prompt: its heads send the role's.
    config.system_prompt = match roles {
        [role] => Some(prompts.get(*role).to_owned()),
        _ => None,
    };
    config.tokens_per_s = measure_decode_speed(&model);
    config.thermal_penalty = thermal_penalty();
    tracing::info!(
        role = %config.role,
        tokens_per_s = config.tokens_per_s,
        "serving as a swarm agent"
    );
    Arc::new(AgentService::new(model, config).with_chat_api(chat_api))
}

/// What the peer port serves, and how.
pub(crate) struct PeerPortSetup {
    /// The node's model; stages load from its directory.
    pub(crate) model_path: PathBuf,
    pub(crate) node_id: String,
    /// The agent, once the model has loaded.
    pub(crate) agent: AgentSlot,
    /// Where stage batches are counted.
    pub(crate) stats: BatchStats,
    /// Where the stage server counts the weights it sends and receives (the metrics).
    pub(crate) weight_stats: shoal_pipeline::WeightStats,
    /// The swarm key, limits and deadlines, for peers in and stage links out.
    pub(crate) transport: Transport,
    /// The cluster's members: heartbeats from peers go here.
    pub(crate) roster: Arc<Roster>,
    /// This node's load, as its heartbeats report it.
    pub(crate) load: membership::LoadFigures,
    /// The ring this node heads, if it heads one.
    pub(crate) head: membership::HeadRing,
    /// Bytes of ended sessions' caches its stage server keeps for heads to resume from.
    pub(crate) prompt_cache_bytes: usize,
    /// Memory this node offers to heads' plans at most, below what is free.
    pub(crate) memory_offer: Option<u64>,
}

/// Serves the peer port until `shutdown`: stage requests go to a [`StageServer`] over the
/// models in the model's directory, swarm requests to the agent (once loaded), heartbeats
/// to the roster.
///
/// While the node plays dead (the dashboard's kill, [`Roster::set_down`]) every connection
/// it had is dropped — a ring's head and the stage before see their links break, as when a
/// device dies — and the port answers nothing but the `Chaos` that heals it. Healed, it
/// starts with a fresh stage server, as a device that came back would.
pub(crate) async fn serve_peer_port(
    listener: TcpListener,
    setup: PeerPortSetup,
    shutdown: impl Future<Output = ()>,
) {
    let dir = setup
        .model_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let new_stages = || {
        let mut config = StageServerConfig::new(dir.clone());
        config.node_id = setup.node_id.clone();
        config.stats = setup.stats.clone();
        config.weight_stats = setup.weight_stats.clone();
        config.transport = setup.transport.clone();
        config.prompt_cache_bytes = setup.prompt_cache_bytes;
        config.memory_offer = setup.memory_offer;
        // A node that runs its model whole (as an agent) lends its layers to the stages
        // it serves of that same file.
        let agent = setup.agent.clone();
        config.whole_model = Some(WholeModel {
            path: setup.model_path.clone(),
            loaded: Arc::new(move || agent.get().map(|a| a.model().clone())),
        });
        StageServer::new(config)
    };
    let current: membership::CurrentStages = Default::default();
    let (stop_refresh, refresh_stopped) = tokio::sync::oneshot::channel::<()>();
    let refresh = membership::start_refresh(
        setup.roster.clone(),
        setup.model_path.clone(),
        current.clone(),
        setup.head.clone(),
        setup.load.clone(),
        setup.memory_offer,
        async {
            let _ = refresh_stopped.await;
        },
    );
    // One socket for the node's life; each phase (alive, playing dead) serves a handle to it.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the peer port cannot be served: {e}");
            return;
        }
    };
    let mut down = setup.roster.watch_down();
    tokio::pin!(shutdown);
    loop {
        let phase = match listener.try_clone().and_then(TcpListener::from_std) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("the peer port cannot be served: {e}");
                break;
            }
        };
        let serve = ServeConfig::over(setup.transport.clone());
        let mut shut = false;
        let playing_dead = *down.borrow_and_update();
        let until = async {
            tokio::select! {
                () = &mut shutdown => shut = true,
                _ = down.changed() => {}
            }
        };
        if playing_dead {
            *lock(&current) = None;
            let port = DeadPort {
                roster: setup.roster.clone(),
                node_id: setup.node_id.clone(),
            };
            serve_peers(phase, serve, Arc::new(port), until).await;
        } else {
            let stages = new_stages();
            let evictor = stages.spawn_evictor();
            *lock(&current) = Some(stages.clone());
            let port = PeerPort {
                stages,
                agent: setup.agent.clone(),
                roster: setup.roster.clone(),
            };
            serve_peers(phase, serve, Arc::new(port), until).await;
            evictor.abort();
        }
        if shut {
            break;
        }
    }
    let _ = stop_refresh.send(());
    refresh.abort();
}

fn lock(stages: &membership::CurrentStages) -> std::sync::MutexGuard<'_, Option<StageServer>> {
    stages
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The peer port of a node playing dead: it answers only the `Chaos` that heals it.
struct DeadPort {
    roster: Arc<Roster>,
    node_id: String,
}

impl PeerService for DeadPort {
    fn accept(&self, hello: &Hello) -> Result<HelloAck, ErrorMessage> {
        // A pipeline head probing for live stages must find none here; the members' own
        // dials (heartbeats, the `Chaos` that heals) are let through to be refused or heard.
        if hello.capabilities.contains(Capabilities::HEAD) {
            return Err(ErrorMessage::new(
                ErrorCode::MODEL_UNAVAILABLE,
                None,
                "this node is playing dead".to_owned(),
            ));
        }
        Ok(HelloAck {
            node_id: self.node_id.clone(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: Capabilities::NONE,
            idle_timeout: None,
        })
    }

    async fn handle(
        &self,
        msg: Message,
        conn: &mut Connection,
        peer: &shoal_wire::RemotePeer,
    ) -> Result<(), WireError> {
        match msg {
            Message::Chaos(chaos) => answer_chaos(&self.roster, chaos, conn, peer).await,
            // Like a dead device: the connection just ends.
            _ => Err(WireError::Io(std::io::Error::other(
                "this node is playing dead",
            ))),
        }
    }
}

/// Answers a `Chaos`, then plays dead or stops: the answer goes first, since changing
/// state ends this connection with every other.
async fn answer_chaos(
    roster: &Roster,
    chaos: Chaos,
    conn: &mut Connection,
    peer: &shoal_wire::RemotePeer,
) -> Result<(), WireError> {
    conn.write_frame(&Message::Chaos(chaos)).await?;
    if chaos.down != roster.is_down() {
        tracing::warn!(
            peer = %peer,
            "{}",
            if chaos.down {
                "playing dead, as a peer asked (the dashboard's kill)"
            } else {
                "back to life, as a peer asked (the dashboard's heal)"
            }
        );
    }
    roster.set_down(chaos.down);
    Ok(())
}

/// Everything a node serves its peers on one port: stage work, and swarm requests to its
/// agent once the model has loaded.
struct PeerPort {
    stages: StageServer,
    agent: AgentSlot,
    roster: Arc<Roster>,
}

impl PeerService for PeerPort {
    fn accept(&self, _hello: &Hello) -> Result<HelloAck, ErrorMessage> {
        Ok(self
            .stages
            .hello_ack(Capabilities::STAGE | Capabilities::AGENT))
    }

    async fn handle(
        &self,
        msg: Message,
        conn: &mut Connection,
        peer: &shoal_wire::RemotePeer,
    ) -> Result<(), WireError> {
        if let Message::Chaos(chaos) = msg {
            return answer_chaos(&self.roster, chaos, conn, peer).await;
        }
        match msg {
            Message::Describe(_) | Message::Ask(_) => match self.agent.get() {
                Some(agent) => agent.handle(msg, conn).await,
                None => {
                    let request = match &msg {
                        Message::Ask(a) => Some(a.request_id),
                        _ => None,
                    };
                    let reply = ErrorMessage::new(
                        ErrorCode::MODEL_UNAVAILABLE,
                        request,
                        "this node's model is still loading".to_owned(),
                    );
                    conn.write_frame(&Message::Error(reply)).await
                }
            },
            Message::Heartbeat(theirs) => {
                let reply = answer_heartbeat(&self.roster, peer.addr, &theirs);
                conn.write_frame(&reply).await
            }
            other => self.stages.handle_message(other, conn, peer).await,
        }
    }
}

/// A default node id: the host name and the peer port.
pub(crate) fn default_node_id(peer_port: Option<u16>) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".to_owned());
    match peer_port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}
