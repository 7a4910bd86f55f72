//! How a pipeline is described: its peers and their layers, and how it re-plans.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use shoal_wire::{DType, Transport};

use crate::batch::{default_batch_rows, BatchStats};

/// One peer of the ring and the layers it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStage {
    /// The peer's wire address (its [`crate::StageServer`]).
    pub addr: SocketAddr,
    /// Layers `[start, end)` it runs; the last peer's range ends at the model's last layer.
    pub layers: Range<usize>,
}

/// What a [`Replan`] answers: the head's new layers and the new stages, or why it has none.
pub type ReplanResult = std::result::Result<(Range<usize>, Vec<PeerStage>), String>;

/// Chooses the ring's layout after stages were lost ([`PipelineConfig::replan`]), e.g. by
/// asking the nodes left for fresh profiles and running the planner on them.
pub trait Replan: Send + Sync + std::fmt::Debug {
    /// `head`: the head's layers now; `alive`: the ring's peers that still answer, in ring
    /// order, with the layers they hold now; `lost`: the ring's peers that do not. Returns
    /// the head's new layers (from 0) and the new stages in ring order: any nodes the hook
    /// knows to serve stages (a node the old plan left out may join), none of `lost`. The
    /// layout is checked; one that does not tile the model is not used.
    fn replan<'a>(
        &'a self,
        head: Range<usize>,
        alive: &'a [PeerStage],
        lost: &'a [SocketAddr],
    ) -> Pin<Box<dyn Future<Output = ReplanResult> + Send + 'a>>;
}

/// How to build a [`Pipeline`].
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// This node's id, sent in handshakes.
    pub node_id: String,
    /// The head's copy of the model.
    pub model_path: PathBuf,
    /// The id peers resolve in their models directory (default: the file name).
    pub model_id: String,
    /// Send the file's SHA-256 so peers check they have the very same weights.
    pub verify_sha256: bool,
    /// Layers the head runs itself; starts at 0 (the head embeds).
    pub local_layers: Range<usize>,
    /// The other stages, in ring order. Empty: the head runs the whole model.
    pub peers: Vec<PeerStage>,
    /// Encoding of hidden states between stages: f32 (the default) gives exactly the
    /// single process's output; f16 and bf16 halve the bytes per hop but round the hidden
    /// state at each boundary, which can change the text at a near-tie.
    pub activation_dtype: DType,
    /// Prompt tokens per prefill `Forward`.
    pub prefill_chunk: usize,
    /// Address the reply listener binds (the `reply_to` of every `Forward`); must be one the
    /// last stage can reach, not `0.0.0.0`.
    pub reply_bind: SocketAddr,
    /// How long to wait for each token.
    pub timeout: Duration,
    /// How long to wait for a peer's `StageReady`: loading may begin with fetching the
    /// stage's weights from the head over the LAN (a stalled transfer is cut sooner, by the
    /// peer's own deadline on every chunk).
    pub load_timeout: Duration,
    /// When a stage is lost mid-session, re-plan on the nodes left and replay the session
    /// there (greedy output unchanged) instead of failing the request.
    pub recover: bool,
    /// How to re-plan: `None` (or a [`Replan`] that fails) spreads the layers over the
    /// nodes left in proportion to their shares of the old plan.
    pub replan: Option<Arc<dyn Replan>>,
    /// The swarm key, frame limits and deadlines of every connection.
    pub transport: Transport,
    /// Token rows one batch of the head's own stage takes at most (unless its first step
    /// alone has more).
    pub batch_rows: usize,
    /// Where the head's batches are counted (the node's metrics).
    pub stats: BatchStats,
    /// Where the bytes of weights its reply listener sends stages are counted (the node's
    /// metrics).
    pub weight_stats: crate::WeightStats,
    /// Bytes of the head's own stage's caches kept from ended sessions, so a prompt that
    /// starts as an earlier one did resumes from it on every stage (the prompt cache;
    /// each peer bounds what it keeps by its own setting). 0 keeps none.
    pub prompt_cache_bytes: usize,
    /// Speculative decoding across the ring: the head guesses the next tokens — by prompt
    /// lookup ([`shoal_engine::Speculation::lookup`]), with [`PipelineConfig::draft_model`]
    /// (`draft_model`, `p_min`), or both, lookup first — up to `draft_max` at a time, and
    /// the ring verifies them in one pass. `None`: one token per pass.
    pub speculation: Option<shoal_engine::Speculation>,
    /// A smaller model of the same tokenizer, whole on the head, that guesses greedily for
    /// the ring (with `speculation.draft_model`). Checked against the model's tokenizer
    /// when the ring is set up.
    pub draft_model: Option<Arc<shoal_engine::Model>>,
    /// A chat template (Jinja source) the head renders prompts with instead of the model
    /// file's own; `None`: the file's.
    pub chat_template: Option<String>,
    /// How [`crate::Pipeline::embed`] pools; `None`: as the model file says.
    pub pooling: Option<shoal_engine::Pooling>,
    /// Members outside the ring said to hold the model file (their peer addresses), asked
    /// anew each time the ring is set up: a stage without the model asks them for its
    /// layers before the head, whose uplink is busy with the ring ([`crate::weights`]).
    pub weight_holders: WeightHolders,
}

/// Who outside the ring holds the model file, asked each time a ring is set up (members
/// come and go: a list taken once, at start, would be empty or stale).
#[derive(Clone, Default)]
pub struct WeightHolders(Option<Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync>>);

impl WeightHolders {
    /// Holders as `now` says when asked.
    pub fn new(now: impl Fn() -> Vec<SocketAddr> + Send + Sync + 'static) -> Self {
        WeightHolders(Some(Arc::new(now)))
    }

    /// The holders now.
    pub fn now(&self) -> Vec<SocketAddr> {
        self.0.as_ref().map_or_else(Vec::new, |now| now())
    }
}

impl std::fmt::Debug for WeightHolders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.now()).finish()
    }
}

impl PipelineConfig {
    /// Defaults: f32 activations (exact), prefill chunks of 512 (the engine's), replies on
    /// `127.0.0.1:0`, a 2-minute timeout per token and 30 minutes to load a stage (weights
    /// over the LAN included), SHA-256 checked.
    pub fn new(
        model_path: impl Into<PathBuf>,
        local_layers: Range<usize>,
        peers: Vec<PeerStage>,
    ) -> Self {
        let model_path = model_path.into();
        let model_id = model_path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        PipelineConfig {
            node_id: "head".to_owned(),
            model_path,
            model_id,
            verify_sha256: true,
            local_layers,
            peers,
            activation_dtype: DType::F32,
            prefill_chunk: shoal_engine::generate::PREFILL_CHUNK,
            reply_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            timeout: Duration::from_secs(120),
            load_timeout: Duration::from_secs(30 * 60),
            recover: true,
            replan: None,
            transport: Transport::default(),
            batch_rows: default_batch_rows(),
            stats: BatchStats::default(),
            weight_stats: crate::WeightStats::default(),
            prompt_cache_bytes: 0,
            speculation: None,
            draft_model: None,
            chat_template: None,
            pooling: None,
            weight_holders: WeightHolders::default(),
        }
    }
}
