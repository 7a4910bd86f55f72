//! Setting up a ring from a node: the peers named by address, a `--split` checked against
//! the model, or the layers placed by the planner (`--split auto`) from the profiles the
//! peers report; connecting with patience (nodes of a cluster start in any order); and
//! re-planning from fresh profiles after a loss ([`RingPlanner`] as the ring's [`Replan`]).

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use shoal_engine::{GgufFile, Stage, StageSpec};
use shoal_wire::{DType, Transport, WireError};
use tokio::time::Instant;

use crate::error::{PipelineError, Result};
use crate::head::{PeerStage, Pipeline, PipelineConfig, Replan, ReplanResult};
use crate::BatchStats;

/// Resolves `HOST:PORT`.
pub fn resolve_addr(text: &str) -> Result<SocketAddr> {
    text.to_socket_addrs()
        .map_err(|e| {
            let message = format!("cannot resolve peer `{text}` (expected HOST:PORT): {e}");
            if e.kind() == std::io::ErrorKind::InvalidInput {
                // Not `HOST:PORT` at all: no later try will read it otherwise.
                PipelineError::Config(message)
            } else {
                PipelineError::Address(message)
            }
        })?
        .next()
        .ok_or_else(|| PipelineError::Address(format!("peer `{text}` resolves to no address")))
}

/// Resolves every `HOST:PORT`.
fn resolve_all(peers: &[String]) -> Result<Vec<SocketAddr>> {
    peers.iter().map(|p| resolve_addr(p)).collect()
}

/// Checks a `--split` against the peers and the model: one range for the head and one per
/// peer, in order, contiguous from layer 0 to the last layer.
pub fn check_split(split: &str, n_peers: usize, n_layers: usize) -> Result<Vec<Range<usize>>> {
    let bad = |msg: String| Err(PipelineError::Config(msg));
    let ranges = match shoal_cluster::parse_split(split) {
        Ok(ranges) => ranges,
        Err(e) => return bad(format!("--split: {e}")),
    };
    if ranges.len() != n_peers + 1 {
        return bad(format!(
            "--split has {} ranges but there are {} stages (this node and {} --peer): give one \
             range for this node, then one per --peer in order",
            ranges.len(),
            n_peers + 1,
            n_peers
        ));
    }
    match shoal_cluster::check_tiling(&ranges, n_layers) {
        Ok(()) => Ok(ranges),
        Err(e) => bad(format!("--split: {e}")),
    }
}

/// The address this host uses to reach `peer` (the head's reply listener must be one the
/// last stage can reach).
fn local_ip_towards(peer: SocketAddr) -> std::net::IpAddr {
    let any: SocketAddr = if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| {
            s.connect(peer)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or_else(|_| peer.ip())
}

/// How long a head keeps trying to reach its peers at start-up: nodes of a cluster are
/// started in any order, so a peer that is not listening yet is waited for.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(120);

/// How a ring set up by [`connect_ring`] runs.
#[derive(Clone, Debug, Default)]
pub struct RingSettings {
    /// How hidden states travel.
    pub activations: DType,
    /// Where the head's batches are counted.
    pub stats: BatchStats,
    /// How to lay the ring out after a loss (the planner, with `--split auto`); `None`: in
    /// proportion to the old split.
    pub replan: Option<Arc<dyn Replan>>,
    /// The swarm key, limits and deadlines of every link.
    pub transport: Transport,
    /// The head's prompt cache ([`PipelineConfig::prompt_cache_bytes`]).
    pub prompt_cache_bytes: usize,
    /// Guessing ahead, verified by the ring ([`PipelineConfig::speculation`]).
    pub speculation: Option<shoal_engine::Speculation>,
    /// The head's draft model ([`PipelineConfig::draft_model`]).
    pub draft_model: Option<Arc<shoal_engine::Model>>,
    /// The chat template instead of the model's own ([`PipelineConfig::chat_template`]).
    pub chat_template: Option<String>,
    /// How embeddings are pooled ([`PipelineConfig::pooling`]).
    pub pooling: Option<shoal_engine::Pooling>,
    /// Members outside the ring said to hold the model ([`PipelineConfig::weight_holders`]).
    pub weight_holders: crate::WeightHolders,
    /// Where the weights the head sends are counted ([`PipelineConfig::weight_stats`]).
    pub weight_stats: crate::WeightStats,
}

/// Sets up a ring as its head: this node runs `ranges[0]`, `peers[i]` runs `ranges[i + 1]`,
/// as `settings` say. Peers not yet listening are retried for [`CONNECT_PATIENCE`].
pub async fn connect_ring(
    model_path: &Path,
    peers: &[String],
    ranges: &[Range<usize>],
    settings: RingSettings,
) -> Result<Pipeline> {
    let addrs = resolve_all(peers)?;
    let Some((local, rest)) = ranges.split_first() else {
        return Err(PipelineError::Config("--split has no ranges".into()));
    };
    let stages: Vec<PeerStage> = addrs
        .iter()
        .zip(rest)
        .map(|(&addr, layers)| PeerStage {
            addr,
            layers: layers.clone(),
        })
        .collect();
    let mut config = PipelineConfig::new(model_path, local.clone(), stages);
    config.activation_dtype = settings.activations;
    config.stats = settings.stats;
    config.replan = settings.replan;
    config.transport = settings.transport;
    config.prompt_cache_bytes = settings.prompt_cache_bytes;
    config.speculation = settings.speculation;
    config.draft_model = settings.draft_model;
    config.chat_template = settings.chat_template;
    config.pooling = settings.pooling;
    config.weight_holders = settings.weight_holders;
    config.weight_stats = settings.weight_stats;
    if let Some(last) = addrs.last() {
        config.reply_bind = SocketAddr::new(local_ip_towards(*last), 0);
    }
    until_listening(|| Pipeline::connect(config.clone())).await
}

/// Pause between attempts to reach a peer that is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Runs `attempt` until it succeeds or fails for another reason than a peer not listening
/// yet, for at most [`CONNECT_PATIENCE`].
async fn until_listening<T, F>(mut attempt: impl FnMut() -> F) -> Result<T, PipelineError>
where
    F: std::future::Future<Output = Result<T, PipelineError>>,
{
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match attempt().await {
            Err(e) if not_listening_yet(&e) && Instant::now() < deadline => {
                tracing::info!("a peer is not listening yet ({e}); retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// A peer refused the connection: nothing listens on its port (yet).
fn not_listening_yet(e: &PipelineError) -> bool {
    let io = match e {
        PipelineError::Wire(WireError::Io(io)) | PipelineError::Io(io) => io,
        PipelineError::Loading { source, .. } => return not_listening_yet(source),
        _ => return false,
    };
    io.kind() == std::io::ErrorKind::ConnectionRefused
}

/// A ring [`plan_ring`] planned, before it is connected.
#[derive(Debug)]
pub struct PlannedRing {
    /// Layers per stage in ring order, the head's first.
    pub ranges: Vec<Range<usize>>,
    /// The peers that take part, in ring order (possibly none: a model that runs best on
    /// the head alone).
    pub peers: Vec<String>,
    /// Re-plans the ring from fresh profiles if a stage is lost.
    pub planner: RingPlanner,
    /// The plan, with its predicted speed.
    pub plan: shoal_cluster::Plan,
}

/// `--split auto`: asks every peer for its profile on the model (time per layer, free
/// memory) and times the round trip to it, measures this node, and lets the planner place
/// the layers for one stream. The layers sent to peers without the model to measure on are
/// counted in `weight_stats`.
pub async fn plan_ring(
    model_path: &Path,
    peers: &[String],
    node_id: &str,
    memory_cap: Option<u64>,
    transport: &Transport,
    weight_stats: &crate::WeightStats,
) -> Result<PlannedRing> {
    let addrs = resolve_all(peers)?;
    let planner = RingPlanner::measure(
        model_path,
        node_id,
        memory_cap,
        addrs.clone(),
        transport,
        weight_stats,
    )
    .await?;
    let mut probed = Vec::with_capacity(peers.len());
    for (p, &addr) in peers.iter().zip(&addrs) {
        let probe = until_listening(|| {
            crate::probe_peer(
                addr,
                node_id,
                transport,
                &planner.model,
                Duration::from_secs(120),
            )
        })
        .await;
        let probe = probe.map_err(|e| PipelineError::Probe {
            peer: p.clone(),
            source: Box::new(e),
        })?;
        probed.push((probe, 0));
    }
    let plan = planner.plan(&probed, peers)?;
    tracing::info!("{plan}");
    let ranges = plan.ranges();
    let ring_peers = plan
        .stages
        .iter()
        .skip(1)
        .filter_map(|s| peers.get(s.node.checked_sub(1)?).cloned())
        .collect();
    Ok(PlannedRing {
        ranges,
        peers: ring_peers,
        planner,
        plan,
    })
}

/// What `--split auto` plans with: this node's profile, measured once at start-up, the
/// model's shape and every `--peer`. It plans the first ring and, as the ring's [`Replan`],
/// the ring after a loss, from the profiles the nodes left give then — peers the first plan
/// left out included.
#[derive(Debug)]
pub struct RingPlanner {
    /// The model, as peers are asked about it (and served its weights).
    model: crate::ProbedModel,
    node_id: String,
    /// Every `--peer`, in the order given, and members found later
    /// ([`RingPlanner::add_candidates`]).
    peers: std::sync::Mutex<Vec<SocketAddr>>,
    /// How the peers are reached (the swarm key).
    transport: Transport,
    shape: shoal_cluster::ModelShape,
    /// This node, its free memory taken before its stage was loaded (capped by
    /// `--plan-memory-gib`): what it offers to any plan.
    head: shoal_cluster::NodeProfile,
}

/// How long a peer has to give a fresh profile when re-planning (its speed is measured once
/// and kept, so this is a round trip and a memory reading).
const REPLAN_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

impl RingPlanner {
    /// Makes `addrs` candidates of the next re-plan (members that joined); returns those
    /// that were not already.
    pub fn add_candidates(&self, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let new: Vec<SocketAddr> = addrs
            .iter()
            .filter(|a| !peers.contains(a))
            .copied()
            .collect();
        peers.extend(&new);
        new
    }

    /// The peers a re-plan probes.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn measure(
        model_path: &Path,
        node_id: &str,
        memory_cap: Option<u64>,
        peers: Vec<SocketAddr>,
        transport: &Transport,
        weight_stats: &crate::WeightStats,
    ) -> Result<Self> {
        let model_id = model_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = model_path.to_path_buf();
        let id = node_id.to_owned();
        // The SHA-256 lets peers without the model get the layers they measure on.
        let (mine, sha) = tokio::task::spawn_blocking(move || -> Result<_> {
            Ok((
                crate::measure_profile(&path, &id)?,
                crate::file_sha256(&path)?,
            ))
        })
        .await??;
        let free = memory_cap.map_or(mine.free_memory_bytes, |cap| {
            cap.min(mine.free_memory_bytes)
        });
        let file = GgufFile::open(model_path)?;
        let context = file.config().context_length.min(4096);
        Ok(RingPlanner {
            model: crate::ProbedModel {
                id: model_id,
                weights: Some((model_path.to_path_buf(), sha)),
                weight_stats: weight_stats.clone(),
            },
            node_id: node_id.to_owned(),
            peers: std::sync::Mutex::new(peers),
            transport: transport.clone(),
            shape: model_shape(&file, context),
            head: node_profile(node_id, &mine, free),
        })
    }

    /// Plans over this node and the `probed` peers (named `names`), for one stream. Each
    /// peer comes with the weight bytes it holds now, which count as free: a new stage
    /// replaces them.
    ///
    /// Link costs: head ↔ peer is half the measured round trip; peer ↔ peer, which the head
    /// cannot see, is taken as the mean of the two peers' one-way costs to the head.
    fn plan(
        &self,
        probed: &[(crate::PeerProfile, u64)],
        names: &[String],
    ) -> Result<shoal_cluster::Plan> {
        let mut nodes = vec![self.head.clone()];
        for ((p, held), name) in probed.iter().zip(names) {
            let free = p.profile.free_memory_bytes.saturating_add(*held);
            nodes.push(node_profile(name, &p.profile, free));
        }
        let one_way: Vec<f64> = std::iter::once(0.0)
            .chain(probed.iter().map(|(p, _)| p.rtt.as_secs_f64() * 1e3 / 2.0))
            .collect();
        let links: Vec<Vec<f64>> = (0..nodes.len())
            .map(|i| {
                (0..nodes.len())
                    .map(|j| match (i, j) {
                        _ if i == j => 0.0,
                        (0, k) | (k, 0) => one_way[k],
                        (a, b) => (one_way[a] + one_way[b]) / 2.0,
                    })
                    .collect()
            })
            .collect();
        Ok(shoal_cluster::plan(
            &self.shape,
            &nodes,
            &links,
            shoal_cluster::Objective::Latency,
        )?)
    }

    /// Weight bytes a stage of `layers` holds (the LM head too when it is the last).
    fn held_bytes(&self, layers: &Range<usize>) -> u64 {
        let mut bytes = self.shape.layer_bytes.saturating_mul(layers.len() as u64);
        if layers.end == self.shape.n_layers && !layers.is_empty() {
            bytes = bytes.saturating_add(self.shape.head_bytes);
        }
        bytes
    }

    /// Probes every known peer but the `lost` (one that does not answer is left out), and
    /// plans over this node and those that answer. `alive`: the ring's peers left, with the
    /// layers they hold.
    async fn replan_now(
        &self,
        alive: &[PeerStage],
        lost: &[SocketAddr],
    ) -> Result<(Range<usize>, Vec<PeerStage>)> {
        let mut probed = Vec::new();
        let mut names = Vec::new();
        let mut addrs = Vec::new();
        for addr in self.candidates().into_iter().filter(|a| !lost.contains(a)) {
            let probe = crate::probe_peer(
                addr,
                &self.node_id,
                &self.transport,
                &self.model,
                REPLAN_PROBE_TIMEOUT,
            )
            .await;
            let p = match probe {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(peer = %addr, error = %e, "left out of the re-plan: no fresh profile");
                    continue;
                }
            };
            let held = alive
                .iter()
                .find(|s| s.addr == addr)
                .map_or(0, |s| self.held_bytes(&s.layers));
            probed.push((p, held));
            names.push(addr.to_string());
            addrs.push(addr);
        }
        let plan = self.plan(&probed, &names)?;
        tracing::info!("re-planned the ring from fresh profiles of the nodes left:\n{plan}");
        let mut stages = plan.stages.iter();
        let local = stages
            .next()
            .ok_or_else(|| PipelineError::Config("the plan has no stage for the head".into()))?
            .layers
            .clone();
        let peers = stages
            .map(|s| {
                let addr = s
                    .node
                    .checked_sub(1)
                    .and_then(|i| addrs.get(i))
                    .ok_or_else(|| {
                        PipelineError::Config("the plan names a node that was not probed".into())
                    })?;
                Ok(PeerStage {
                    addr: *addr,
                    layers: s.layers.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((local, peers))
    }
}

impl Replan for RingPlanner {
    fn replan<'a>(
        &'a self,
        _head: Range<usize>,
        alive: &'a [PeerStage],
        lost: &'a [SocketAddr],
    ) -> Pin<Box<dyn Future<Output = ReplanResult> + Send + 'a>> {
        Box::pin(async move {
            self.replan_now(alive, lost)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

fn node_profile(id: &str, p: &shoal_wire::Profile, free: u64) -> shoal_cluster::NodeProfile {
    shoal_cluster::NodeProfile {
        id: id.to_owned(),
        free_memory_bytes: free,
        decode_ms_per_layer: f64::from(p.decode_ms_per_layer),
        prefill_ms_per_layer_token: f64::from(p.prefill_ms_per_layer_token),
    }
}

/// Sizes of a model's parts, from its GGUF file: what the planner places, with KV cache
/// reserved for `context` positions.
pub fn model_shape(file: &GgufFile, context: usize) -> shoal_cluster::ModelShape {
    let cfg = file.config();
    let n = cfg.n_layers;
    let only = |layers: Range<usize>, embed, head| StageSpec {
        layers,
        embed,
        head,
    };
    let layers_bytes = Stage::weight_bytes(file, &only(0..n, false, false));
    let embed_bytes = Stage::weight_bytes(file, &only(0..0, true, false));
    let head_bytes = Stage::weight_bytes(file, &only(n..n, false, true));
    // Keys and values in f32, for every position of the context.
    let kv = 2 * cfg.n_kv_heads * cfg.head_dim * 4 * context;
    shoal_cluster::ModelShape {
        n_layers: n,
        layer_bytes: layers_bytes / n.max(1) as u64,
        embed_bytes,
        head_bytes,
        kv_bytes_per_layer: kv as u64,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn split_must_match_peers_and_model() {
        assert_eq!(
            check_split("0-9,10-19,20-29", 2, 30).unwrap(),
            vec![0..10, 10..20, 20..30]
        );
        let e = check_split("0-9,10-29", 2, 30).unwrap_err().to_string();
        assert!(e.contains("2 ranges but there are 3 stages"), "{e}");
        assert!(check_split("0-9,10-19", 1, 30).is_err());
        assert!(check_split("0-9,11-29", 1, 30).is_err());
        assert!(check_split("1-9,10-29", 1, 30).is_err());
        assert!(check_split("zero", 0, 30).is_err());
    }

    fn refused() -> PipelineError {
        PipelineError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn a_stage_that_failed_to_set_up_is_named_and_its_error_still_classified() {
        let at = |source| PipelineError::Loading {
            peer: "10.0.0.7:7471".parse().unwrap(),
            source: Box::new(source),
        };
        let refused_there = at(refused());
        assert!(not_listening_yet(&refused_there));
        assert!(refused_there.to_string().contains("10.0.0.7:7471"));
        assert!(!refused_there.is_local());
        let silent = at(PipelineError::Timeout {
            what: "StageReady",
            after: Duration::from_secs(1),
        });
        assert!(silent.is_stage_loss() && !not_listening_yet(&silent));
        assert!(!at(PipelineError::Config("x".into())).is_stage_loss());
        // Faults of the head's own are lasting; a peer's (wrapped) never are.
        assert!(PipelineError::Config("a bad template".into()).is_local());
        assert!(PipelineError::Io(std::io::Error::other("no file")).is_local());
        assert!(!at(PipelineError::Io(std::io::Error::other("x"))).is_local());
        assert!(!PipelineError::Address("no such host".into()).is_local());
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_not_listening_yet_is_waited_for_until_the_patience_runs_out() {
        let started = Instant::now();
        let mut attempts = 0;
        let result: Result<()> = until_listening(|| {
            attempts += 1;
            std::future::ready(Err(refused()))
        })
        .await;
        assert!(matches!(result, Err(PipelineError::Io(_))), "{result:?}");
        let waited = started.elapsed();
        assert!(waited >= CONNECT_PATIENCE, "{waited:?}");
        assert!(waited < CONNECT_PATIENCE + RETRY_PAUSE * 2, "{waited:?}");
        let expected = (CONNECT_PATIENCE.as_millis() / RETRY_PAUSE.as_millis()) as usize + 1;
        assert!(
            (expected..=expected + 1).contains(&attempts),
            "{attempts} attempts, one every {RETRY_PAUSE:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_starts_listening_is_used_and_other_errors_are_not_retried() {
        let started = Instant::now();
        let mut attempts = 0;
        let result = until_listening(|| {
            attempts += 1;
            std::future::ready(if attempts < 4 { Err(refused()) } else { Ok(7) })
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(attempts, 4);
        assert_eq!(started.elapsed(), RETRY_PAUSE * 3);

        let mut attempts = 0;
        let result: Result<()> = until_listening(|| {
            attempts += 1;
            std::future::ready(Err(PipelineError::Config("bad".into())))
        })
        .await;
        assert!(matches!(result, Err(PipelineError::Config(_))));
        assert_eq!(
            attempts, 1,
            "only a refused connection is worth waiting for"
        );
    }
}
