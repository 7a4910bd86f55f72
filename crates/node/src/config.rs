//! Everything a node can be told: what `shoal serve` and its config file say, already parsed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shoal_api::HttpLimits;
use shoal_engine::{Pooling, Speculation};
use shoal_swarm::roles::{Role, RolePrompts};
use shoal_swarm::routing::Strategy;
use shoal_wire::{DType, SwarmKey};

use crate::error::NodeError;
use crate::membership::ClusterSettings;

/// Default of [`NodeConfig::prompt_cache_bytes`]: 1 GiB.
pub const DEFAULT_PROMPT_CACHE_BYTES: usize = 1 << 30;

/// How to start a node ([`crate::Node::start`]).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The GGUF model file (already found or fetched: the node does not download).
    pub model: PathBuf,
    /// The model id clients send (default: the file's stem).
    pub model_id: Option<String>,
    /// Where the HTTP API listens (port 0 picks a free one).
    pub http_addr: SocketAddr,
    /// Bearer token the API requires, if any.
    pub api_key: Option<String>,
    /// What one HTTP client may ask, and how long it may take.
    pub http_limits: HttpLimits,
    /// Where the peer port listens, if this node serves peers (stage work, swarm requests).
    pub peer_addr: Option<SocketAddr>,
    /// Other nodes' peer ports, `HOST:PORT`, in ring order. With `split` this node heads a
    /// pipeline over itself and these; without, a swarm of these agents.
    pub peers: Vec<String>,
    /// Layers per stage (`0-9,10-19,20-29`: this node the first range, each peer the next),
    /// or `auto` to let the planner place them from measured profiles.
    pub split: Option<String>,
    /// Memory this node offers to pipeline plans at most, below what is free: to its own
    /// `split = auto` plan as a head, and to other heads' (its heartbeats and profiles
    /// report no more).
    pub plan_memory_bytes: Option<u64>,
    /// `--model auto`: this node heads a ring over the members and picks the model for
    /// them (`model` then only says where the models directory is).
    pub auto_model: Option<AutoModel>,
    /// How hidden states travel between stages (f32 keeps the output exact).
    pub activations: DType,
    /// Serve only pipeline stages on the peer port: no whole model, no answers of its own.
    pub stage_only: bool,
    /// This node's swarm roles as an agent (none: a plain worker). With several, its one
    /// model answers as each of them, and heads send each role's prompt.
    pub roles: Vec<Role>,
    /// This node's id on the peer protocol (default: host name and peer port).
    pub node_id: Option<String>,
    /// How this node heads a swarm (with `peers` and no `split`).
    pub swarm: SwarmSettings,
    /// The swarm key: every peer connection, in and out, is authenticated and encrypted
    /// with it. Without one, peer connections are plain and must stay on this machine.
    pub swarm_key: Option<SwarmKey>,
    /// Allow plain peer connections beyond loopback (no swarm key): anyone on the network
    /// could then use and read this node's peer traffic.
    pub insecure_peers: bool,
    /// Membership: heartbeats, failure detection, discovery.
    pub cluster: ClusterSettings,
    /// Bytes of keys and values kept from earlier prompts for reuse (0: none).
    pub prompt_cache_bytes: usize,
    /// Speculative decoding (whole model on this node only).
    pub speculation: Option<Speculation>,
    /// The draft model's GGUF file, for [`Speculation::draft_model`].
    pub model_draft: Option<PathBuf>,
    /// A chat template (Jinja source) used instead of the model file's own
    /// (`--chat-template-file`), by whatever this node answers with: its whole model or
    /// the head of a ring.
    pub chat_template: Option<String>,
    /// How embeddings are pooled, instead of as the model file says (`--pooling`).
    pub pooling: Option<Pooling>,
    /// A peer connection silent this long is closed ([`Transport::idle_timeout`]). Nodes
    /// announce it when they answer a dial, and diallers keep their links alive by it, so
    /// the nodes of a cluster may differ.
    pub peer_idle_timeout: Duration,
}

/// The shortest [`NodeConfig::peer_idle_timeout`]: diallers ping their links every quarter
/// of it, which must stay well above a round trip.
pub(crate) const MIN_PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a head picks the model for the room (`--model auto`): the largest known model the
/// members' free memory holds together, if the planner predicts at least
/// `min_tokens_per_s` for it; again, to move up, whenever members join.
#[derive(Clone)]
pub struct AutoModel {
    /// Where the known models are (or are fetched to).
    pub models_dir: PathBuf,
    /// A model whose planned ring is predicted slower than this (tokens per second, one
    /// stream) is passed over for a smaller one.
    pub min_tokens_per_s: f64,
    /// Fetches a known model missing from `models_dir` (the binary's `shoal models pull`);
    /// `None`: only the models already there are candidates.
    pub fetch: Option<FetchModel>,
}

/// Puts a known model into the models directory; its path, or why not.
pub type FetchModel = std::sync::Arc<
    dyn Fn(&'static shoal_models::ModelInfo) -> Result<PathBuf, String> + Send + Sync,
>;

impl std::fmt::Debug for AutoModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoModel")
            .field("models_dir", &self.models_dir)
            .field("min_tokens_per_s", &self.min_tokens_per_s)
            .field("fetch", &self.fetch.is_some())
            .finish()
    }
}

/// The swarm head's settings.
#[derive(Clone, Debug)]
pub struct SwarmSettings {
    /// The strategy of `"model": "swarm"`.
    pub strategy: Strategy,
    /// Time allowed for answers to simple factual queries.
    pub timeout_simple: Duration,
    /// Time allowed for answers to every other query type.
    pub timeout_complex: Duration,
    /// Answers sampled in all for `vote`.
    pub vote_samples: usize,
    /// `vote` runs candidates' code against the prompt's examples (in the sandbox, where
    /// this machine has one; never without).
    pub code_checks: bool,
    /// Role system prompts (the built-in ones, with any overrides).
    pub prompts: RolePrompts,
}

impl Default for SwarmSettings {
    /// `serve`'s defaults: `auto`, 6 s / 12 s, 5 vote samples, code checks on, the built-in
    /// prompts.
    fn default() -> Self {
        SwarmSettings {
            strategy: Strategy::Auto,
            timeout_simple: Duration::from_secs(6),
            timeout_complex: Duration::from_secs(12),
            vote_samples: 5,
            code_checks: true,
            prompts: RolePrompts::new(),
        }
    }
}

impl NodeConfig {
    /// A node serving `model` over HTTP on `http_addr`, with no peer port, no peers and the
    /// defaults of `shoal serve` for everything else.
    pub fn new(model: impl Into<PathBuf>, http_addr: SocketAddr) -> Self {
        NodeConfig {
            model: model.into(),
            model_id: None,
            http_addr,
            api_key: None,
            http_limits: HttpLimits::default(),
            peer_addr: None,
            peers: Vec::new(),
            split: None,
            plan_memory_bytes: None,
            auto_model: None,
            activations: DType::F32,
            stage_only: false,
            roles: Vec::new(),
            node_id: None,
            swarm: SwarmSettings::default(),
            swarm_key: None,
            insecure_peers: false,
            cluster: ClusterSettings::default(),
            prompt_cache_bytes: DEFAULT_PROMPT_CACHE_BYTES,
            speculation: None,
            model_draft: None,
            chat_template: None,
            pooling: None,
            peer_idle_timeout: shoal_wire::IDLE_TIMEOUT,
        }
    }

    /// Refuses combinations that cannot work, with what to change.
    pub fn check(&self) -> Result<(), NodeError> {
        let bad = |msg: &str| Err(NodeError::Config(msg.to_owned()));
        // A stage-only node's --peers only introduce it to the cluster.
        if self.stage_only && (self.split.is_some() || !self.roles.is_empty()) {
            return bad("--stage-only serves stages for a head; it takes no --split or --role");
        }
        if shoal_swarm::roles::roles_text(&self.roles).len() > shoal_wire::MAX_ROLE {
            return bad(&format!(
                "--role lists more roles than an agent's card carries ({} characters at most)",
                shoal_wire::MAX_ROLE
            ));
        }
        if self.peer_idle_timeout < MIN_PEER_IDLE_TIMEOUT {
            return bad(&format!(
                "--peer-idle-timeout-s must be at least {} s",
                MIN_PEER_IDLE_TIMEOUT.as_secs()
            ));
        }
        if self.speculation.is_some() && self.stage_only {
            return bad(
                "--lookup and --model-draft are for the node that answers (a whole model, or \
                 a pipeline's head); a --stage-only node verifies what its head guesses",
            );
        }
        let draft_model = self.speculation.is_some_and(|s| s.draft_model);
        if draft_model && self.auto_model.is_some() {
            return bad(
                "--model-draft drafts for one model; with --model auto the model changes \
                 with the cluster (use --lookup, which fits any model)",
            );
        }
        if self.speculation.is_some_and(|s| s.draft_model) && self.model_draft.is_none() {
            return bad("speculation with a draft model needs --model-draft");
        }
        if self.auto_model.is_some() {
            if self.stage_only {
                return bad("--stage-only serves the layers heads send; it takes no --model auto");
            }
            if self.peer_addr.is_none() {
                return bad(
                    "--model auto picks the model for the cluster's members: it needs a peer \
                     port (a swarm key, or --peer-port)",
                );
            }
            if self.split.as_deref().is_some_and(|s| s.trim() != "auto") {
                return bad(
                    "--model auto plans the layers itself: leave --split off (or say auto)",
                );
            }
        }
        if self.stage_only && self.peer_addr.is_none() {
            return bad("--stage-only needs --peer-port (where heads send stage work)");
        }
        let d = &self.cluster.detector;
        if d.interval.is_zero() || d.suspect_after >= d.dead_after || d.suspect_after <= d.interval
        {
            return Err(NodeError::Config(format!(
                "heartbeats every {:?}, suspect after {:?}, dead after {:?}: the interval must \
                 be above zero and below the suspect time, and that below the dead time",
                d.interval, d.suspect_after, d.dead_after
            )));
        }
        let auto = self.split.as_deref().map(str::trim) == Some("auto");
        if self.split.is_some() && self.peers.is_empty() && !(auto && self.peer_addr.is_some()) {
            return bad(
                "--split needs a --peer for every range after this node's (or --split auto \
                 with a peer port: the ring is then planned over the members found)",
            );
        }
        if self.swarm_key.is_none() && !self.insecure_peers {
            if let Some(addr) = self.peer_addr.filter(|a| !a.ip().is_loopback()) {
                return Err(NodeError::Config(format!(
                    "the peer port would listen on {addr} without a swarm key, open to anyone on \
                     the network. {MAKE_A_KEY}"
                )));
            }
            if let Some(peer) = self.peers.iter().find(|p| !is_loopback_peer(p)) {
                return Err(NodeError::Config(format!(
                    "peer {peer} is not on this machine, and without a swarm key the traffic to \
                     it would be readable and forgeable by anyone on the network. {MAKE_A_KEY}"
                )));
            }
        }
        Ok(())
    }

    /// The model id clients send: the configured one, else the file's stem.
    pub(crate) fn model_id(&self) -> String {
        self.model_id
            .clone()
            .unwrap_or_else(|| model_id_of(&self.model))
    }
}

/// The id clients send for the model in `file`: the file's stem.
pub(crate) fn model_id_of(file: &std::path::Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// What to do about a missing swarm key.
const MAKE_A_KEY: &str = "Make a key with `shoal key new` and give the same key to every node \
     (--swarm-key, SHOAL_SWARM_KEY, or swarm_key_file in the config file); or, on a network \
     you trust completely, pass --insecure-peers";

/// Whether a `HOST:PORT` peer names this machine (`localhost`, `127.x.x.x`, `[::1]`).
/// Other names count as remote: a plain connection to them would leave the machine.
fn is_loopback_peer(peer: &str) -> bool {
    let host = peer
        .rsplit_once(':')
        .map_or(peer, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_idle_timeout_too_short_to_ping_within_is_refused() {
        let mut config = NodeConfig::new(PathBuf::from("m.gguf"), "127.0.0.1:0".parse().unwrap());
        assert!(config.check().is_ok());
        config.peer_idle_timeout = Duration::from_millis(1500);
        let e = config.check().unwrap_err().to_string();
        assert!(e.contains("--peer-idle-timeout-s"), "{e}");
    }

    #[test]
    fn loopback_peers_are_told_apart_from_remote_ones() {
        for p in ["127.0.0.1:7000", "localhost:1", "[::1]:9", "127.3.4.5:80"] {
            assert!(is_loopback_peer(p), "{p}");
        }
        for p in [
            "192.168.1.5:7000",
            "pi.local:7000",
            "[fe80::1]:9",
            "0.0.0.0:1",
        ] {
            assert!(!is_loopback_peer(p), "{p}");
        }
    }

    #[test]
    fn speculation_is_for_the_answering_node_with_its_draft_model_given() {
        let mut config = NodeConfig::new("m.gguf", "127.0.0.1:0".parse().unwrap());
        config.speculation = Some(Speculation {
            draft_model: true,
            ..Speculation::default()
        });
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("--model-draft"), "{err}");
        config.model_draft = Some("d.gguf".into());
        assert!(config.check().is_ok());
        // A pipeline's head guesses too; a stage-only node guesses nothing.
        config.split = Some("0-9,10-19".into());
        config.peers = vec!["127.0.0.1:7471".into()];
        assert!(config.check().is_ok());
        config.model_draft = None;
        config.speculation = Some(Speculation {
            lookup: Some(shoal_engine::Lookup::default()),
            ..Speculation::default()
        });
        assert!(config.check().is_ok());
        config.split = None;
        config.stage_only = true;
        config.peer_addr = Some("127.0.0.1:0".parse().unwrap());
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("stage-only"), "{err}");
    }

    #[test]
    fn plain_peer_traffic_beyond_this_machine_is_refused_without_a_key() {
        let mut config = NodeConfig::new("m.gguf", "127.0.0.1:0".parse().unwrap());
        config.peer_addr = Some("0.0.0.0:0".parse().unwrap());
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("without a swarm key"), "{err}");
        assert!(err.contains("shoal key new"), "{err}");
        config.insecure_peers = true;
        assert!(config.check().is_ok());
        config.insecure_peers = false;
        config.swarm_key = Some(SwarmKey::from_bytes([1; 32]));
        assert!(config.check().is_ok());

        let mut head = NodeConfig::new("m.gguf", "127.0.0.1:0".parse().unwrap());
        head.peers = vec!["192.168.1.9:7000".into()];
        let err = head.check().unwrap_err().to_string();
        assert!(err.contains("192.168.1.9:7000"), "{err}");
        head.peers = vec!["127.0.0.1:7000".into()];
        assert!(head.check().is_ok());
    }
}
