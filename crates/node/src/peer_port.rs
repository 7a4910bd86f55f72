//! A node's peer port: one listener for everything peers ask of this node — stage work from
//! pipeline heads (`LoadStage`, `Forward`, …) and swarm requests from swarm heads
//! (`Describe`, `Ask`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use shoal_cluster::heartbeat::answer_heartbeat;
use shoal_cluster::Roster;
use shoal_engine::Model;
use shoal_pipeline::{BatchStats, StageServer, StageServerConfig};
use shoal_swarm::agent::{measure_decode_speed, AgentConfig, AgentService};
use shoal_swarm::roles::{Role, RolePrompts};
use shoal_swarm::weight::thermal_penalty;
use shoal_wire::{
    serve_peers, Capabilities, Connection, ErrorCode, ErrorMessage, Hello, HelloAck, Message,
    PeerService, ServeConfig, Transport, WireError,
};
use tokio::net::TcpListener;

use crate::membership;

/// This node as a swarm agent, once its model has loaded.
pub(crate) type AgentSlot = Arc<OnceLock<Arc<AgentService>>>;

/// Wraps a loaded model as this node's agent: its role and role prompt, its measured decode
/// speed, and its device's thermal penalty, as swarm heads will see them in its card.
pub(crate) fn make_agent(
    model: Arc<Model>,
    node_id: &str,
    model_path: &Path,
    role: Option<Role>,
    prompts: &RolePrompts,
) -> Arc<AgentService> {
    let model_id = model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut config = AgentConfig::new(node_id, model_id);
    config.role = role.map(|r| r.as_str().to_owned()).unwrap_or_default();
    config.system_prompt = role.map(|r| prompts.get(r).to_owned());
    config.tokens_per_s = measure_decode_speed(&model);
    config.thermal_penalty = thermal_penalty();
    tracing::info!(
        role = %config.role,
        tokens_per_s = config.tokens_per_s,
        "serving as a swarm agent"
    );
    Arc::new(AgentService::new(model, config))
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
    /// The swarm key, limits and deadlines, for peers in and stage links out.
    pub(crate) transport: Transport,
    /// The cluster's members: heartbeats from peers go here.
    pub(crate) roster: Arc<Roster>,
}

/// Serves the peer port until `shutdown`: stage requests go to a [`StageServer`] over the
/// models in the model's directory, swarm requests to the agent (once loaded).
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
    let mut config = StageServerConfig::new(dir);
    config.node_id = setup.node_id;
    config.stats = setup.stats;
    config.transport = setup.transport.clone();
    let stages = StageServer::new(config);
    let evictor = stages.spawn_evictor();
    let (stop_refresh, refresh_stopped) = tokio::sync::oneshot::channel::<()>();
    let refresh = membership::start_refresh(setup.roster.clone(), Some(stages.clone()), async {
        let _ = refresh_stopped.await;
    });
    let port = PeerPort {
        stages,
        agent: setup.agent,
        roster: setup.roster,
    };
    let serve = ServeConfig::over(setup.transport);
    serve_peers(listener, serve, Arc::new(port), shutdown).await;
    let _ = stop_refresh.send(());
    refresh.abort();
    evictor.abort();
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
