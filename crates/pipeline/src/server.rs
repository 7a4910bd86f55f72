//! [`StageServer`]: the stage side of a ring, served on a node's peer port.
//!
//! A head sends `LoadStage`; the server loads that layer range from its own copy of the model
//! and answers `StageReady`. Then `Forward`s arrive: the server runs its stage on the
//! session's KV cache and either forwards the hidden states to the next stage (ring, not star:
//! design §3) or, as the last stage, samples and sends the `Token` to the `reply_to` address of
//! the head (or, for an embedding, sends back the rows after the final norm as `Logits`).
//! Stages hold only KV caches and, on the last stage, the session's sampler (its
//! random state must carry from token to token to match a single-process run with the same
//! seed); the head owns everything else.
//!
//! `Forward`s go into a queue as they are read (reading never waits for compute); one worker
//! runs what has queued as one batch across sessions (crate::batch), in `spawn_blocking`, so
//! the async runtime keeps serving connections, then sends each session's result on. An idle
//! server has no work in flight, a worker parked on its channel and only a slow eviction
//! timer, so it never spins.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use shoal_engine::candle_core::Device;
use shoal_engine::stage::{logits_row, BatchItem};
use shoal_engine::{
    EngineError, GgufFile, JsonConstraint, JsonGrammar, KvCache, Logits, Model, PrefixCache,
    Sampler, Stage, StageInput, StageOutput, StageSpec,
};
use shoal_wire::{
    serve_peers, Capabilities, Connection, DType, EndSession, ErrorCode, ErrorMessage, Forward,
    GetProfile, GetWeights, Hello, HelloAck, LoadStage, LogitRows, Logits as LogitsReply, Message,
    Payload, PeerService, Pong, Profile, Resume, ServeConfig, StageReady, Token, Transport,
    Truncate, Verified, Want, WireError,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::batch::{default_batch_rows, spawn_worker, BatchStats, Job, PassTimer};
use crate::convert::{activations_to_tensor, file_sha256, sampling_params, tensor_to_activations};
use crate::error::{PipelineError, Result};
use crate::idle::IdleMap;
use crate::link::LinkPool;

/// Default of [`StageServerConfig::queue_kib`]: 256 MiB of queued work (see
/// `Inner::queue_room`).
pub const DEFAULT_QUEUE_KIB: u32 = 256 * 1024;

/// Default of [`StageServerConfig::max_sessions_per_head`]: half the stage, still far more
/// than a head's own admission lets run at once.
pub const DEFAULT_MAX_SESSIONS_PER_HEAD: usize = DEFAULT_MAX_SESSIONS / 2;

/// Default of [`StageServerConfig::max_sessions`]: far more than the heads' own admission
/// (a few sessions each), so only a runaway or hostile peer meets it.
pub const DEFAULT_MAX_SESSIONS: usize = 64;

/// How a [`StageServer`] finds models and looks after sessions.
#[derive(Clone, Debug)]
pub struct StageServerConfig {
    /// This node's id, sent in handshakes.
    pub node_id: String,
    /// Where `LoadStage::model_id` is looked up: `<dir>/<model_id>` or `<dir>/<model_id>.gguf`.
    pub models_dir: PathBuf,
    /// A session whose cache has not been used for this long is dropped (a head that died
    /// without `EndSession` must not pin memory for ever).
    pub session_idle_timeout: Duration,
    /// The swarm key, frame limits and deadlines of every connection, in and out.
    pub transport: Transport,
    /// Token rows one batch takes at most (unless its first `Forward` alone has more).
    pub batch_rows: usize,
    /// Most sessions with a cache at once; a new session past this is refused
    /// (`OVERLOADED`) until one ends or idles out.
    pub max_sessions: usize,
    /// Most of those one head may hold (sessions are told apart by the head they answer
    /// to), so one runaway or hostile member cannot take every slot. Default
    /// [`DEFAULT_MAX_SESSIONS_PER_HEAD`].
    pub max_sessions_per_head: usize,
    /// KiB of received work that may wait for the stage; past it the stage stops reading
    /// from the connections that send more (TCP backpressure). Default [`DEFAULT_QUEUE_KIB`].
    pub queue_kib: u32,
    /// Where the batches run are counted (the node's metrics).
    pub stats: BatchStats,
    /// Where the bytes of weights sent and received are counted (the node's metrics).
    pub weight_stats: crate::WeightStats,
    /// Bytes of ended sessions' caches kept for heads to resume later sessions from
    /// (`EndSession::keep`, `Forward::resume`: the prompt cache); 0 keeps none.
    pub prompt_cache_bytes: usize,
    /// The node's own whole model, if it runs one: a stage of that very file shares its
    /// weights instead of loading the layers a second time.
    pub whole_model: Option<WholeModel>,
    /// Memory this node offers to heads' plans at most (`--plan-memory-gib`), below what
    /// is free; profiles report the smaller.
    pub memory_offer: Option<u64>,
}

/// A node's own whole model as its stage server sees it: the file, and the model once it
/// has loaded (`None` before).
#[derive(Clone)]
pub struct WholeModel {
    pub path: PathBuf,
    pub loaded: Arc<dyn Fn() -> Option<Arc<Model>> + Send + Sync>,
}

impl std::fmt::Debug for WholeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WholeModel")
            .field("path", &self.path)
            .field("loaded", &(self.loaded)().is_some())
            .finish()
    }
}

impl WholeModel {
    /// The loaded model, if it is the file at `path`.
    fn of(&self, path: &Path) -> Option<Arc<Model>> {
        let same = match (self.path.canonicalize(), path.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        same.then(|| (self.loaded)()).flatten()
    }
}

impl StageServerConfig {
    /// Defaults: node id `"stage"`, a 10-minute idle timeout, no swarm key, batches
    /// of [`crate::DEFAULT_BATCH_ROWS`] rows (or `SHOAL_BATCH_ROWS`).
    pub fn new(models_dir: impl Into<PathBuf>) -> Self {
        StageServerConfig {
            node_id: "stage".to_owned(),
            models_dir: models_dir.into(),
            session_idle_timeout: Duration::from_secs(600),
            transport: Transport::default(),
            batch_rows: default_batch_rows(),
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_head: DEFAULT_MAX_SESSIONS_PER_HEAD,
            queue_kib: DEFAULT_QUEUE_KIB,
            stats: BatchStats::default(),
            weight_stats: crate::WeightStats::default(),
            prompt_cache_bytes: 0,
            whole_model: None,
            memory_offer: None,
        }
    }
}

/// Serves stage work on a TCP listener. Cheap to clone: clones share the loaded stage and the
/// sessions.
#[derive(Clone)]
pub struct StageServer {
    inner: Arc<Inner>,
}

struct Inner {
    config: StageServerConfig,
    loaded: RwLock<Option<Arc<Loaded>>>,
    /// KV caches by session, dropped when unused for the idle timeout.
    /// With each, the head it answers to (its `reply_to`), for the cap per head.
    sessions: Mutex<IdleMap<(SocketAddr, Arc<Mutex<SessionState>>)>>,
    /// Sessions ended recently. A `Forward` still in flight from the stage before (the head
    /// sends `EndSession` to every stage directly, which can overtake it) must not bring the
    /// session back to life; kept for one idle timeout.
    ended: Mutex<IdleMap<()>>,
    /// Caches of ended sessions that their heads asked to keep, by session id.
    kept: Mutex<PrefixCache>,
    /// Links to the next stage and to heads' reply listeners.
    links: LinkPool,
    /// Measured profiles by model id.
    profiles: Mutex<HashMap<String, Profile>>,
    /// The weight transfers this stage server sends to members.
    senders: crate::weights::Senders,
    /// The queue of `Forward`s to the batching worker, started with the first one (it needs
    /// the runtime); the worker ends when this goes with the server.
    queue: OnceLock<mpsc::UnboundedSender<Queued>>,
    /// KiB of work that may wait in the queue. A peer's connection waits for room before it
    /// reads its next frame, so a flood of `Forward`s slows its sender down (TCP
    /// backpressure) instead of growing this node's memory.
    queue_room: Arc<Semaphore>,
    /// How long the stage's recent decode passes take.
    pass_timer: PassTimer,
}

struct Loaded {
    stage: Arc<Stage>,
    plan: LoadStage,
    /// What constrained answers need on the last stage, built on first use.
    constraints: Constraints,
}

/// The tokenizer (read from the stage's file, which keeps the model's metadata) and the
/// JSON grammars heads asked for, compiled once each.
struct Constraints {
    path: PathBuf,
    tokenizer: std::sync::OnceLock<std::result::Result<shoal_engine::Tokenizer, String>>,
    grammars: Mutex<HashMap<String, JsonGrammar>>,
}

/// Most compiled grammars a stage keeps (they are small; heads send few distinct ones).
const MAX_GRAMMARS: usize = 64;

impl Constraints {
    fn new(path: PathBuf) -> Self {
        Constraints {
            path,
            tokenizer: std::sync::OnceLock::new(),
            grammars: Mutex::new(HashMap::new()),
        }
    }

    fn tokenizer(&self) -> Result<&shoal_engine::Tokenizer> {
        self.tokenizer
            .get_or_init(|| {
                let file = GgufFile::open(&self.path).map_err(|e| e.to_string())?;
                shoal_engine::Tokenizer::from_gguf_metadata(file.metadata())
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| PipelineError::Config(format!("the stage's tokenizer: {e}")))
    }

    /// The grammar `text` describes, compiled (or from the ones compiled before).
    fn grammar(&self, text: &str) -> Result<JsonGrammar> {
        let mut grammars = lock(&self.grammars);
        if let Some(g) = grammars.get(text) {
            return Ok(g.clone());
        }
        let grammar = JsonGrammar::from_wire_text(text)
            .map_err(|e| PipelineError::InvalidRequest(format!("the JSON grammar: {e}")))?;
        if grammars.len() >= MAX_GRAMMARS {
            grammars.clear();
        }
        grammars.insert(text.to_owned(), grammar.clone());
        Ok(grammar)
    }
}

struct SessionState {
    cache: KvCache,
    /// Last stage only: created on the session's first sampled token, kept so the random
    /// stream continues exactly as in a single-process run.
    sampler: Option<Sampler>,
    /// After a speculative verify: the first of its guessed rows. The session's next
    /// `Forward` may start there or later (dropping the guesses the draws did not keep);
    /// nothing else may be rolled back.
    guessed_from: Option<usize>,
}

/// What running a `Forward` produced.
enum Outcome {
    Hidden(shoal_wire::Activations),
    Token(u32, Option<shoal_engine::TokenLogprob>),
    /// The draws of a verify.
    Verified(Vec<u32>),
    /// The last stage's normed hidden states, for an embedding.
    Normed(shoal_wire::Activations),
    Nothing,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A stage server alone on a port (a node's peer port serves it among other things).
impl PeerService for StageServer {
    fn accept(&self, _hello: &Hello) -> std::result::Result<HelloAck, ErrorMessage> {
        Ok(self.hello_ack(Capabilities::STAGE))
    }

    async fn handle(
        &self,
        msg: Message,
        conn: &mut Connection,
        peer: &shoal_wire::RemotePeer,
    ) -> std::result::Result<(), WireError> {
        self.handle_message(msg, conn, peer).await
    }
}

impl StageServer {
    /// A server with no stage loaded yet.
    pub fn new(config: StageServerConfig) -> Self {
        let links = LinkPool::new(
            config.node_id.clone(),
            Capabilities::STAGE,
            config.transport.clone(),
        );
        let queue_room = Arc::new(Semaphore::new(config.queue_kib.max(1) as usize));
        let prompt_cache_bytes = config.prompt_cache_bytes;
        StageServer {
            inner: Arc::new(Inner {
                config,
                loaded: RwLock::new(None),
                sessions: Mutex::new(IdleMap::default()),
                ended: Mutex::new(IdleMap::default()),
                kept: Mutex::new(PrefixCache::new(prompt_cache_bytes)),
                links,
                profiles: Mutex::new(HashMap::new()),
                senders: crate::weights::Senders::new(),
                queue: OnceLock::new(),
                queue_room,
                pass_timer: PassTimer::default(),
            }),
        }
    }

    /// Serves `listener` until `shutdown` completes. Each peer gets its own task: a peer that
    /// sends a malformed or hostile frame loses its connection and nothing else.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let evictor = self.spawn_evictor();
        let stages = self
            .inner
            .config
            .models_dir
            .join(crate::weights::STAGES_DIR);
        tokio::task::spawn_blocking(move || {
            crate::weights::remove_stale(&stages, crate::weights::STALE_AFTER)
        });
        let config = ServeConfig::over(self.inner.config.transport.clone());
        serve_peers(listener, config, Arc::new(self), shutdown).await;
        evictor.abort();
    }

    /// Sessions with a KV cache on this stage.
    pub fn session_count(&self) -> usize {
        lock(&self.inner.sessions).len()
    }

    /// Caches of ended sessions kept for heads to resume from, and their bytes.
    pub fn prompt_cache_usage(&self) -> (usize, usize) {
        let kept = lock(&self.inner.kept);
        (kept.len(), kept.bytes())
    }

    /// Tokens held in a session's cache, if the session exists.
    pub fn session_len(&self, session_id: u64) -> Option<usize> {
        let state = lock(&self.inner.sessions).get(session_id)?.1.clone();
        let len = lock(&state).cache.len();
        Some(len)
    }

    /// Bytes of weights sent to members that lacked them, as counted in this server's
    /// [`StageServerConfig::weight_stats`] (a node shares those with its pipeline head).
    pub fn weights_sent_bytes(&self) -> u64 {
        self.weight_counts().sent
    }

    /// Bytes of weights sent, received and copied from kept stage files, as counted in this
    /// server's [`StageServerConfig::weight_stats`] (see [`crate::WeightStats`]).
    pub fn weight_counts(&self) -> crate::WeightCounts {
        self.inner.config.weight_stats.counts()
    }

    /// Counts of the batches this server has run.
    pub fn batch_stats(&self) -> &BatchStats {
        &self.inner.config.stats
    }

    /// The layers of the loaded stage, if one is loaded.
    pub fn loaded_layers(&self) -> Option<Range<usize>> {
        self.loaded().map(|l| l.stage.spec().layers.clone())
    }

    /// Microseconds the stage's recent decode passes took, on average (0: none yet).
    pub fn pass_us(&self) -> u32 {
        self.inner.pass_timer.micros()
    }

    /// The model (as heads name it) and layers of the loaded stage, if one is loaded.
    pub fn loaded_stage(&self) -> Option<(String, Range<usize>)> {
        self.loaded()
            .map(|l| (l.plan.model_id.clone(), l.stage.spec().layers.clone()))
    }

    /// Drops sessions idle for longer than the timeout; returns how many.
    pub fn evict_idle(&self) -> usize {
        let timeout = self.inner.config.session_idle_timeout;
        let evicted = lock(&self.inner.sessions).evict(timeout);
        lock(&self.inner.ended).evict(timeout);
        if evicted > 0 {
            tracing::info!(evicted, "dropped idle sessions");
        }
        evicted
    }

    /// Drops idle sessions in the background (every quarter of the idle timeout) until the
    /// task is aborted. [`StageServer::serve`] runs one; a caller that serves connections
    /// itself through [`StageServer::handle_message`] starts its own.
    pub fn spawn_evictor(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.evict_loop().await })
    }

    async fn evict_loop(&self) {
        let period = (self.inner.config.session_idle_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.evict_idle();
        }
    }

    fn loaded(&self) -> Option<Arc<Loaded>> {
        self.inner
            .loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The handshake answer of a node that serves stages.
    pub fn hello_ack(&self, capabilities: Capabilities) -> HelloAck {
        HelloAck {
            node_id: self.inner.config.node_id.clone(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities,
            idle_timeout: None,
        }
    }

    /// Serves one stage request that arrived on `conn` (after the handshake). A message that
    /// is not a stage request returns [`WireError::UnexpectedMessage`]: the caller closes the
    /// connection, or hands the message to another service of the same peer port.
    pub async fn handle_message(
        &self,
        msg: Message,
        conn: &mut Connection,
        peer: &shoal_wire::RemotePeer,
    ) -> Result<(), WireError> {
        match msg {
            Message::LoadStage(load) => {
                let reply = match self.load(load).await {
                    Ok(ready) => Message::StageReady(ready),
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "LoadStage failed");
                        Message::Error(ErrorMessage::new(error_code(&e), None, e.to_string()))
                    }
                };
                conn.write_frame(&reply).await?;
            }
            Message::Forward(f) => self.enqueue(Work::Forward(Box::new(f))).await,
            Message::GetWeights(req) => self.send_weights(req, conn, peer).await?,
            Message::EndSession(e) => self.end_session(e),
            // Queued behind the session's `Forward`s, so it cuts what they leave.
            Message::Truncate(t) => self.enqueue(Work::Truncate(t)).await,
            Message::GetProfile(g) => {
                let reply = match self.profile(&g, conn).await {
                    Ok(profile) => Message::Profile(profile),
                    Err(e) => {
                        Message::Error(ErrorMessage::new(error_code(&e), None, e.to_string()))
                    }
                };
                conn.write_frame(&reply).await?;
            }
            Message::Ping(p) => {
                conn.write_frame(&Message::Pong(Pong { nonce: p.nonce }))
                    .await?
            }
            Message::Pong(_) => {}
            Message::Error(e) => {
                tracing::warn!(%peer, error = %e.message, "peer reported an error")
            }
            other => {
                return Err(WireError::UnexpectedMessage {
                    expected: "a stage request",
                    got: other.name(),
                })
            }
        }
        Ok(())
    }

    /// This node's profile on a model, measured the first time a head asks (and kept: the
    /// device does not change between heads' questions).
    /// Without the model, and asked by a head that serves its weights, the node measures
    /// itself on a few layers it gets from that head on the same connection (then drops
    /// them: they are a sample, not a stage).
    async fn profile(&self, asked: &GetProfile, conn: &mut Connection) -> Result<Profile> {
        let model_id = asked.model_id.as_str();
        let cached = lock(&self.inner.profiles).get(model_id).cloned();
        if let Some(p) = cached {
            return Ok(self.with_free_memory(p));
        }
        let sample = crate::profile::measured_stage();
        let sha = asked.model_sha256;
        let (path, fetched) = match self.model_file(model_id, &sha, &sample).await {
            Ok(path) => (path, false),
            Err(_) if sha != [0; 32] => {
                let request = GetWeights {
                    model_id: model_id.to_owned(),
                    model_sha256: sha,
                    layer_start: sample.layers.start as u32,
                    layer_end: sample.layers.end as u32,
                    embed: false,
                    head: false,
                };
                let dir = &self.inner.config.models_dir;
                // The head may hash the layers for minutes before the manifest comes (the
                // fetch has its own deadlines): the port's idle timeout is not for this wait.
                let mut partial = crate::weights::Partial::locked(dir, &request).await?;
                let idle_timeout = conn.idle_timeout();
                conn.set_idle_timeout(None);
                let fetched = crate::weights::fetch_over(
                    conn,
                    "the head",
                    request,
                    dir,
                    &mut partial,
                    &self.inner.config.weight_stats,
                )
                .await;
                conn.set_idle_timeout(idle_timeout);
                (fetched?, true)
            }
            Err(e) => return Err(e),
        };
        let node_id = self.inner.config.node_id.clone();
        let from = path.clone();
        let measured =
            tokio::task::spawn_blocking(move || crate::profile::measure_profile(&from, &node_id))
                .await?;
        if fetched {
            let _ = std::fs::remove_file(&path);
        }
        let profile = measured?;
        lock(&self.inner.profiles).insert(model_id.to_owned(), profile.clone());
        Ok(self.with_free_memory(profile))
    }

    /// `profile` with the memory free now, not when first measured (and no more than this
    /// node offers).
    fn with_free_memory(&self, mut profile: Profile) -> Profile {
        let free = crate::profile::available_memory_bytes().unwrap_or(0);
        profile.free_memory_bytes = self.inner.config.memory_offer.map_or(free, |o| o.min(free));
        profile
    }

    async fn load(&self, plan: LoadStage) -> Result<StageReady> {
        if let Some(current) = self.loaded() {
            if current.plan == plan {
                return Ok(ready(&plan, 0, 0));
            }
        }
        let started = Instant::now();
        let spec = StageSpec {
            layers: plan.layer_start as usize..plan.layer_end as usize,
            embed: plan.embed,
            head: plan.head,
        };
        let path = match self
            .model_file(&plan.model_id, &plan.model_sha256, &spec)
            .await
        {
            Ok(path) => path,
            // Not here: fetch the stage's share from the members the head named.
            Err(_) if plan.model_sha256 != [0; 32] && !plan.weights_from.is_empty() => {
                let config = &self.inner.config;
                crate::weights::fetch_from_any(
                    &plan.weights_from,
                    &config.node_id,
                    &config.transport,
                    crate::weights::request_for(&plan),
                    &config.models_dir,
                    &config.weight_stats,
                )
                .await?
            }
            Err(missing) => return Err(missing),
        };
        let p = plan.clone();
        let from = path.clone();
        let whole = self
            .inner
            .config
            .whole_model
            .as_ref()
            .and_then(|w| w.of(&path));
        let loaded = tokio::task::spawn_blocking(move || -> Result<(Stage, u64)> {
            if let Some(model) = whole {
                // The node runs this very file already: share its layers, load nothing.
                return Ok((model.stage().share(spec)?, 0));
            }
            let file = GgufFile::open(&from)?;
            let n = file.config().n_layers;
            let (start, end) = (p.layer_start as usize, p.layer_end as usize);
            if end > n || p.embed != (start == 0) || p.head != (end == n) {
                return Err(PipelineError::Config(format!(
                    "layers {start}..{end} (embed {}, head {}) do not fit a model of {n} layers",
                    p.embed, p.head
                )));
            }
            let bytes = Stage::weight_bytes(&file, &spec);
            Ok((Stage::load(&file, spec, &Device::Cpu, |_, _| {})?, bytes))
        })
        .await?;
        let (stage, bytes) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                // A kept stage file that does not load is not kept: the next `LoadStage`
                // fetches it anew rather than failing on it for ever.
                let stages = self
                    .inner
                    .config
                    .models_dir
                    .join(crate::weights::STAGES_DIR);
                if path.parent() == Some(stages.as_path()) {
                    tracing::warn!(path = %path.display(), error = %e, "dropped a stage file that does not load");
                    let _ = std::fs::remove_file(&path);
                }
                return Err(e);
            }
        };
        let load_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let reply = ready(&plan, bytes, load_ms);
        tracing::info!(layers = ?stage.spec().layers, load_ms, "stage loaded");
        *self
            .inner
            .loaded
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Loaded {
            stage: Arc::new(stage),
            plan,
            constraints: Constraints::new(path),
        }));
        // Caches of the previous stage have another shape.
        lock(&self.inner.sessions).clear();
        lock(&self.inner.kept).clear();
        Ok(reply)
    }

    /// This node's file that holds `spec` of the model with id `model_id` and this SHA-256
    /// (zeros: unchecked): the model file itself, or a stage file kept from an earlier
    /// transfer (crate::weights). The error says why neither will do.
    async fn model_file(
        &self,
        model_id: &str,
        sha: &[u8; 32],
        spec: &StageSpec,
    ) -> Result<PathBuf> {
        let dir = &self.inner.config.models_dir;
        let whole = resolve_model(dir, model_id);
        let unchecked = *sha == [0; 32];
        let missing = match whole {
            Ok(path) if unchecked => return Ok(path),
            Ok(path) => {
                let p = path.clone();
                let found = tokio::task::spawn_blocking(move || file_sha256(&p)).await??;
                if found == *sha {
                    return Ok(path);
                }
                PipelineError::ModelUnavailable {
                    model_id: model_id.to_owned(),
                    reason: format!(
                        "{} has sha256 {}, the head asked for {}",
                        path.display(),
                        hex(&found),
                        hex(sha)
                    ),
                }
            }
            Err(e) => e,
        };
        if !unchecked {
            if let Some(kept) = crate::weights::find_kept(dir, sha, spec) {
                return Ok(kept);
            }
        }
        Err(missing)
    }

    /// Serves a member's `GetWeights` from this node's copy of the model (or a kept stage
    /// file that holds the share asked for).
    async fn send_weights(
        &self,
        req: GetWeights,
        conn: &mut Connection,
        peer: &shoal_wire::RemotePeer,
    ) -> Result<(), WireError> {
        let spec = StageSpec {
            layers: req.layer_start as usize..req.layer_end as usize,
            embed: req.embed,
            head: req.head,
        };
        if req.model_sha256 == [0; 32] {
            let e = ErrorMessage::new(
                ErrorCode::BAD_REQUEST,
                None,
                "GetWeights names no SHA-256: weights are sent only for a model both ends can check",
            );
            return conn.write_frame(&Message::Error(e)).await;
        }
        match self
            .model_file(&req.model_id, &req.model_sha256, &spec)
            .await
        {
            Ok(path) => {
                let _turn = self.inner.senders.turn(&peer.node_id).await;
                let stats = &self.inner.config.weight_stats;
                crate::weights::send_weights(conn, path, &req, stats).await
            }
            Err(e) => {
                let e = ErrorMessage::new(error_code(&e), None, e.to_string());
                conn.write_frame(&Message::Error(e)).await
            }
        }
    }

    /// Queues work for the batching worker (started here the first time), once there is
    /// room for it.
    async fn enqueue(&self, work: Work) {
        let kib = match &work {
            Work::Forward(f) => match &f.payload {
                Payload::Hidden(a) => a.data().len() / 1024,
                Payload::Tokens(t) => t.len() * 4 / 1024,
            },
            Work::Truncate(_) => 0,
        };
        let most = self.inner.config.queue_kib.max(1);
        let kib = u32::try_from(kib).unwrap_or(most).clamp(1, most);
        let Ok(room) = Arc::clone(&self.inner.queue_room)
            .acquire_many_owned(kib)
            .await
        else {
            return; // never closed
        };
        let work = Queued { work, room };
        let queue = self.inner.queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            // The worker holds the server weakly: dropping the last clone closes the queue.
            let server = Arc::downgrade(&self.inner);
            let config = &self.inner.config;
            // No waiting for sessions here: the head gathers them (crate::batch).
            spawn_worker(
                rx,
                config.batch_rows,
                config.stats.clone(),
                None,
                move |batch| run_batch(server.clone(), batch),
            );
            tx
        });
        if let Err(lost) = queue.send(work) {
            // Only if the worker panicked; its head hears nothing and times out.
            tracing::error!(
                session_id = lost.0.work.session(),
                "the stage's worker is gone"
            );
        }
    }

    /// Ends a session: its cache is freed, or with `keep` kept for later sessions to resume
    /// from. A cache still in use (a head that ended its session while a step was running:
    /// a client that left) is not kept, and neither is one this stage has no room for. An
    /// `EndSession` without `keep` for a kept cache frees it.
    fn end_session(&self, e: EndSession) {
        let state = lock(&self.inner.sessions)
            .remove(e.session_id)
            .map(|(_, state)| state);
        lock(&self.inner.ended).insert(e.session_id, ());
        let mut kept = lock(&self.inner.kept);
        if !e.keep {
            kept.forget(e.session_id);
            return;
        }
        let cache = state.and_then(|s| {
            let mut s = s.try_lock().ok()?;
            Some(std::mem::take(&mut s.cache))
        });
        if let Some(cache) = cache {
            kept.keep(e.session_id, &[], cache);
        }
    }

    /// The session's state, created on its first `Forward` (from a kept cache when it says
    /// `resume`); `Ok(None)` for a session ended already (a `Forward` still in flight from
    /// the stage before must not bring it back); an error for a new session when the stage
    /// holds as many as it may, or when the cache it resumes is gone.
    fn session(
        &self,
        loaded: &Loaded,
        session_id: u64,
        head: SocketAddr,
        resume: Option<Resume>,
    ) -> Result<Option<Arc<Mutex<SessionState>>>> {
        if lock(&self.inner.ended).contains(session_id) {
            tracing::debug!(session_id, "Forward for an ended session dropped");
            return Ok(None);
        }
        let mut sessions = lock(&self.inner.sessions);
        if !sessions.contains(session_id) {
            let max = self.inner.config.max_sessions;
            if sessions.len() >= max {
                return Err(PipelineError::Overloaded(format!(
                    "this stage holds {max} sessions already; try again when one ends"
                )));
            }
            // One head (a runaway or hostile member) cannot take every slot.
            let per_head = self.inner.config.max_sessions_per_head;
            if sessions.values().filter(|(h, _)| *h == head).count() >= per_head {
                return Err(PipelineError::Overloaded(format!(
                    "this stage holds {per_head} sessions of the head at {head} already; \
                     try again when one ends"
                )));
            }
        }
        if let (false, Some(r)) = (sessions.contains(session_id), resume) {
            let cache = lock(&self.inner.kept)
                .resume(r.from_session, r.len as usize)
                .ok_or(PipelineError::PrefixGone {
                    from_session: r.from_session,
                    len: r.len,
                })?;
            let state = Arc::new(Mutex::new(SessionState {
                cache,
                sampler: None,
                guessed_from: None,
            }));
            sessions.insert(session_id, (head, state.clone()));
            return Ok(Some(state));
        }
        let (_, state) = sessions.use_or_insert_with(session_id, || {
            let state = Arc::new(Mutex::new(SessionState {
                cache: loaded.stage.new_cache(),
                sampler: None,
                guessed_from: None,
            }));
            (head, state)
        });
        Ok(Some(state.clone()))
    }

    /// Runs a batch of `Forward`s (one per session) as one pass of the stage, then sends
    /// each session's result on: hidden states to the next stage, or (last stage) the
    /// sampled token to its head. A failure is reported to that session's head
    /// (`reply_to`), never to the connection it came on (the upstream stage is not the one
    /// waiting), and fails only that session.
    async fn run(&self, queued: Vec<Queued>) {
        let mut batch = Vec::with_capacity(queued.len());
        // The queue's room is given back when this batch is done (its frames are in memory
        // until then).
        let mut rooms = Vec::with_capacity(queued.len());
        for q in queued {
            rooms.push(q.room);
            match q.work {
                Work::Forward(f) => batch.push(*f),
                Work::Truncate(t) => self.truncate(&t),
            }
        }
        if batch.is_empty() {
            return;
        }
        let Some(loaded) = self.loaded() else {
            for f in batch {
                let e = PipelineError::InvalidRequest(
                    "no stage is loaded on this node (send LoadStage)".into(),
                );
                self.report(&f, e).await;
            }
            return;
        };
        let mut jobs = Vec::with_capacity(batch.len());
        let mut metas = Vec::with_capacity(batch.len());
        for f in batch {
            if f.plan_id != loaded.plan.plan_id {
                let e = PipelineError::StalePlan {
                    loaded: loaded.plan.plan_id,
                    sent: f.plan_id,
                };
                self.report(&f, e).await;
                continue;
            }
            let state = match self.session(&loaded, f.session_id, f.reply_to, f.resume) {
                Ok(Some(state)) => state,
                Ok(None) => continue,
                Err(e) => {
                    self.report(&f, e).await;
                    continue;
                }
            };
            let Forward {
                session_id,
                seq,
                plan_id,
                positions,
                payload,
                want,
                reply_to,
                resume,
            } = f;
            jobs.push(StageJob {
                state,
                payload,
                positions: positions.iter().map(|&p| p as usize).collect(),
                want: want.clone(),
            });
            metas.push(Forward {
                session_id,
                seq,
                plan_id,
                positions,
                // Not sent: replaced by the result.
                payload: Payload::Tokens(Vec::new()),
                want,
                reply_to,
                resume,
            });
        }
        if jobs.is_empty() {
            return;
        }
        let running = loaded.clone();
        let (rows, sessions) = (jobs.iter().map(|j| j.positions.len()).sum(), jobs.len());
        let started = Instant::now();
        let outcomes = tokio::task::spawn_blocking(move || compute(&running, jobs)).await;
        self.inner
            .pass_timer
            .record(rows, sessions, started.elapsed());
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                let message = format!("the stage's computation failed: {e}");
                metas
                    .iter()
                    .map(|_| Err(PipelineError::Task(message.clone())))
                    .collect()
            }
        };
        for (meta, outcome) in metas.into_iter().zip(outcomes) {
            let sent = match outcome {
                Ok(outcome) => self.deliver(&loaded, &meta, outcome).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                self.report(&meta, e).await;
            }
        }
    }

    /// Sends one session's result on.
    async fn deliver(&self, loaded: &Loaded, f: &Forward, outcome: Outcome) -> Result<()> {
        match outcome {
            Outcome::Hidden(a) => {
                let next = loaded.plan.next.ok_or_else(|| {
                    PipelineError::Config("this stage has no next stage to forward to".into())
                })?;
                let msg = Message::Forward(Forward {
                    session_id: f.session_id,
                    seq: f.seq,
                    plan_id: f.plan_id,
                    positions: f.positions.clone(),
                    payload: Payload::Hidden(a),
                    want: f.want.clone(),
                    reply_to: f.reply_to,
                    resume: f.resume,
                });
                self.inner.links.send(next, &msg).await?;
            }
            Outcome::Token(token_id, logprob) => {
                let msg = Message::Token(Token {
                    session_id: f.session_id,
                    seq: f.seq,
                    token_id,
                    logprob: logprob.as_ref().map(|l| l.logprob),
                    top: logprob.map(|l| l.top).unwrap_or_default(),
                });
                self.inner.links.send(f.reply_to, &msg).await?;
            }
            Outcome::Verified(tokens) => {
                let msg = Message::Verified(Verified {
                    session_id: f.session_id,
                    seq: f.seq,
                    tokens,
                });
                self.inner.links.send(f.reply_to, &msg).await?;
            }
            Outcome::Normed(rows) => {
                let msg = Message::Logits(LogitsReply {
                    session_id: f.session_id,
                    seq: f.seq,
                    logits: rows,
                });
                self.inner.links.send(f.reply_to, &msg).await?;
            }
            Outcome::Nothing => {}
        }
        Ok(())
    }

    /// Keeps only the first `len` tokens of a session's cache.
    fn truncate(&self, t: &Truncate) {
        let state = lock(&self.inner.sessions)
            .get(t.session_id)
            .map(|(_, state)| state.clone());
        if let Some(state) = state {
            lock(&state).cache.truncate(t.len as usize);
        }
    }

    /// Tells a session's head that its `Forward` failed.
    async fn report(&self, f: &Forward, e: PipelineError) {
        let (session_id, reply_to) = (f.session_id, f.reply_to);
        tracing::warn!(session_id, error = %e, "Forward failed");
        let msg = Message::Error(ErrorMessage::new(
            error_code(&e),
            Some(session_id),
            e.to_string(),
        ));
        if let Err(e) = self.inner.links.send(reply_to, &msg).await {
            tracing::warn!(%reply_to, error = %e, "could not report a failure to the head");
        }
    }
}

/// What the worker takes in order per session: a `Forward`, or a `Truncate`, which must cut
/// the cache the session's earlier `Forward`s leave (it goes in the batch after theirs).
enum Work {
    Forward(Box<Forward>),
    Truncate(Truncate),
}

impl Job for Work {
    fn session(&self) -> u64 {
        match self {
            Work::Forward(f) => f.session_id,
            Work::Truncate(t) => t.session_id,
        }
    }

    fn rows(&self) -> usize {
        match self {
            Work::Forward(f) => f.positions.len(),
            Work::Truncate(_) => 0,
        }
    }
}

/// Work in the queue, holding its share of the queue's room.
struct Queued {
    work: Work,
    /// Given back to the queue when dropped.
    room: OwnedSemaphorePermit,
}

impl Job for Queued {
    fn session(&self) -> u64 {
        self.work.session()
    }

    fn rows(&self) -> usize {
        self.work.rows()
    }
}

/// The worker's batch: on the server, if it is still there.
async fn run_batch(server: Weak<Inner>, batch: Vec<Queued>) {
    if let Some(inner) = server.upgrade() {
        StageServer { inner }.run(batch).await;
    }
}

/// One session's part of a batch.
struct StageJob {
    state: Arc<Mutex<SessionState>>,
    payload: Payload,
    positions: Vec<usize>,
    want: Want,
}

/// The stage over a batch of sessions (blocking): one `forward_batch`, then per session
/// the hidden states to send on or the token sampled. One result per job, in order.
fn compute(loaded: &Loaded, jobs: Vec<StageJob>) -> Vec<Result<Outcome>> {
    let (stage, dtype) = (&loaded.stage, loaded.plan.activation_dtype);
    let last_stage = loaded.plan.head;
    // Every session of a batch is a different one, so these are distinct locks.
    let mut guards: Vec<_> = jobs.iter().map(|j| lock(&j.state)).collect();
    let mut results: Vec<Option<Result<Outcome>>> = jobs.iter().map(|_| None).collect();
    let mut samplers = Vec::with_capacity(jobs.len());
    let mut items = Vec::with_capacity(jobs.len());
    for (i, (job, guard)) in jobs.iter().zip(guards.iter_mut()).enumerate() {
        // Hidden states that do not decode fail their session alone.
        let input = match &job.payload {
            Payload::Tokens(t) => StageInput::Tokens(t),
            Payload::Hidden(a) => match activations_to_tensor(a) {
                Ok(h) => StageInput::Hidden(h),
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            },
        };
        let SessionState {
            cache,
            sampler,
            guessed_from,
        } = &mut **guard;
        drop_unkept_guesses(cache, guessed_from.take(), &job.positions);
        if let Err(e) = continues(cache, &job.positions) {
            results[i] = Some(Err(e));
            continue;
        }
        let logits = match &job.want {
            Want::Verify { .. } => {
                *guessed_from = job.positions.first().map(|&p| p + 1);
                Logits::Verify
            }
            Want::Normed { .. } => Logits::Normed,
            _ => Logits::Last,
        };
        samplers.push((i, sampler));
        items.push(BatchItem {
            input,
            positions: &job.positions,
            cache,
            logits,
        });
    }
    let outputs = stage.forward_batch(items);
    for ((i, sampler), output) in samplers.into_iter().zip(outputs) {
        let job = &jobs[i];
        let outcome = output.map_err(PipelineError::from).and_then(|out| {
            finish(
                out,
                &job.want,
                &job.positions,
                sampler,
                dtype,
                last_stage,
                &loaded.constraints,
            )
        });
        results[i] = Some(outcome);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(PipelineError::Task("no result".into()))))
        .collect()
}

/// After a verify whose guessed rows start at `guessed_from`: when `positions` start among
/// those rows (or at the end of the cache), the rows from there on are guesses the draws did
/// not keep, and are dropped. Any other start is left for [`continues`] to judge.
fn drop_unkept_guesses(cache: &mut KvCache, guessed_from: Option<usize>, positions: &[usize]) {
    let (Some(from), Some(&first)) = (guessed_from, positions.first()) else {
        return;
    };
    let next = cache.positions().last().map_or(0, |&p| p + 1);
    if (from..next).contains(&first) {
        cache.truncate(first);
    }
}

/// Checks that `positions` continue the session's cache: the next position, then one
/// after another. Anything else (a `Forward` lost, repeated or reordered, or a peer
/// writing where it likes) would corrupt the cache or grow it without end.
fn continues(cache: &KvCache, positions: &[usize]) -> Result<()> {
    let next = cache.positions().last().map_or(0, |&p| p + 1);
    let expected = next..next + positions.len();
    if positions.is_empty() || !positions.iter().copied().eq(expected.clone()) {
        return Err(PipelineError::InvalidRequest(format!(
            "positions {}..{} do not continue the session's cache, which holds positions \
             0..{next} (a Forward was lost, repeated or reordered)",
            positions.first().copied().unwrap_or(0),
            positions.last().map_or(0, |&p| p + 1),
        )));
    }
    Ok(())
}

/// What one session's stage output becomes: hidden states to send on, or (last stage) the
/// token drawn with the session's sampler, which carries its random state from token to
/// token as in a single-process run, or the normed rows an embedding wants.
fn finish(
    out: StageOutput,
    want: &Want,
    positions: &[usize],
    sampler: &mut Option<Sampler>,
    dtype: DType,
    last_stage: bool,
    constraints: &Constraints,
) -> Result<Outcome> {
    match out {
        // The last stage's normed rows (a stage before it has no final norm and sends its
        // hidden states on, whatever the `Forward` wants).
        StageOutput::Hidden(h) if last_stage && matches!(want, Want::Normed { .. }) => {
            let n = h.dims().first().copied().unwrap_or(0);
            let rows = match want {
                Want::Normed {
                    rows: LogitRows::Last,
                } if n > 1 => h.narrow(0, n - 1, 1).map_err(EngineError::from)?,
                Want::Normed {
                    rows: LogitRows::First,
                } if n > 1 => h.narrow(0, 0, 1).map_err(EngineError::from)?,
                _ => h,
            };
            Ok(Outcome::Normed(tensor_to_activations(&rows, DType::F32)?))
        }
        StageOutput::Hidden(h) => Ok(Outcome::Hidden(tensor_to_activations(&h, dtype)?)),
        StageOutput::Logits(l) => match want {
            Want::Nothing => Ok(Outcome::Nothing),
            Want::Token(spec) => {
                let mut logits = logits_row(&l, 0)?;
                let raw = spec.logprob.then(|| logits.clone());
                let params = sampling_params(spec);
                if sampler.as_ref().is_some_and(|s| *s.params() != params) {
                    *sampler = None;
                }
                let sampler = sampler.get_or_insert_with(|| Sampler::new(params));
                // The token drawn is the one after the last position fed.
                let position = positions.last().map_or(0, |&p| p + 1);
                if spec.ignore_eos {
                    crate::head::mask_eos(&mut logits, constraints.tokenizer()?);
                }
                let token = match &spec.json {
                    None => sampler.sample_at(&mut logits, &spec.penalty_tokens, position),
                    Some(json) => {
                        // Where the answer is in the grammar, rebuilt from the answer so
                        // far: nothing to lose when this stage replaces a lost one.
                        let tokenizer = constraints.tokenizer()?;
                        let grammar = constraints.grammar(&json.grammar)?;
                        JsonConstraint::after_lead(&grammar, tokenizer, &json.lead, &json.answer)
                            .ok_or_else(crate::head::no_json_token)?
                            .draw(&mut logits, tokenizer, |l| {
                                sampler.sample_at(l, &spec.penalty_tokens, position)
                            })
                            .ok_or_else(crate::head::no_json_token)?
                    }
                };
                let top = usize::from(spec.top_logprobs);
                let lp = raw.and_then(|l| shoal_engine::token_logprob(&l, token, top));
                Ok(Outcome::Token(token, lp))
            }
            Want::Verify { spec, draft } => {
                let params = sampling_params(spec);
                if spec.json.is_some() || spec.logprob || params.has_penalties() {
                    // The penalties' window would need the head's repeat-last-n.
                    return Err(PipelineError::InvalidRequest(
                        "a verify draws plain tokens: no JSON grammar, no log-probabilities, \
                         no penalties"
                            .into(),
                    ));
                }
                if sampler.as_ref().is_some_and(|s| *s.params() != params) {
                    *sampler = None;
                }
                let sampler = sampler.get_or_insert_with(|| Sampler::new(params));
                let mut history = spec.penalty_tokens.clone();
                let mut tokens = Vec::with_capacity(draft.len() + 1);
                for (row, &position) in positions.iter().enumerate() {
                    let mut logits = logits_row(&l, row)?;
                    if spec.ignore_eos {
                        crate::head::mask_eos(&mut logits, constraints.tokenizer()?);
                    }
                    // Drawn as a decode step after this row would draw it: at the next
                    // position, with the guesses before it in the penalties' window.
                    let token = sampler.sample_at(&mut logits, &history, position + 1);
                    tokens.push(token);
                    match draft.get(row) {
                        Some(&guess) if guess == token => history.push(guess),
                        _ => break,
                    }
                }
                Ok(Outcome::Verified(tokens))
            }
            Want::Logits { .. } => Err(PipelineError::InvalidRequest(
                "logits replies are not implemented yet; ask for a token".into(),
            )),
            // The engine gives normed rows, not logits, to a session that wants them.
            Want::Normed { .. } => Err(PipelineError::Task(
                "the stage computed logits for a session that wants its normed rows".into(),
            )),
        },
    }
}

fn ready(plan: &LoadStage, resident_bytes: u64, load_ms: u32) -> StageReady {
    StageReady {
        plan_id: plan.plan_id,
        layer_start: plan.layer_start,
        layer_end: plan.layer_end,
        resident_bytes,
        load_ms,
    }
}

/// The file a model id names under `dir`. Ids are file names, never paths: a peer must not be
/// able to make this node open anything outside its models directory.
pub(crate) fn resolve_model(dir: &Path, model_id: &str) -> Result<PathBuf> {
    let unavailable = |reason: String| PipelineError::ModelUnavailable {
        model_id: model_id.to_owned(),
        reason,
    };
    if model_id.is_empty() || model_id.starts_with('.') || model_id.contains(['/', '\\', '\0']) {
        return Err(unavailable("a model id is a file name, not a path".into()));
    }
    let candidates = [dir.join(model_id), dir.join(format!("{model_id}.gguf"))];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            unavailable(format!(
                "neither {model_id} nor {model_id}.gguf is in {} (fetch it, or copy it there)",
                dir.display()
            ))
        })
}

fn error_code(e: &PipelineError) -> ErrorCode {
    match e {
        PipelineError::ModelUnavailable { .. } | PipelineError::Weights(_) => {
            ErrorCode::MODEL_UNAVAILABLE
        }
        PipelineError::Overloaded(_) => ErrorCode::OVERLOADED,
        PipelineError::StalePlan { .. } => ErrorCode::STALE_PLAN,
        PipelineError::PrefixGone { .. } => ErrorCode::PREFIX_GONE,
        // Positions past the model's context. A head checks a prompt's length first, so only
        // a faulty head gets this; it is said in the code an API reads as a prompt too long.
        PipelineError::Engine(EngineError::ContextFull { .. }) => ErrorCode::CONTEXT_LENGTH,
        PipelineError::Config(_)
        | PipelineError::InvalidRequest(_)
        | PipelineError::Engine(EngineError::InvalidInput(_) | EngineError::InvalidStage(_)) => {
            ErrorCode::BAD_REQUEST
        }
        _ => ErrorCode::INTERNAL,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_file_names() {
        let dir = std::env::temp_dir();
        for bad in ["", "../etc/passwd", "a/b", ".hidden", "a\\b"] {
            assert!(
                matches!(
                    resolve_model(&dir, bad),
                    Err(PipelineError::ModelUnavailable { .. })
                ),
                "{bad:?}"
            );
        }
        let err = resolve_model(&dir, "surely-not-a-model-here").unwrap_err();
        assert!(err.to_string().contains(".gguf"), "{err}");
    }

    #[test]
    fn a_context_overflow_is_the_context_length_code() {
        let full = PipelineError::Engine(EngineError::ContextFull {
            needed: 9,
            limit: 8,
        });
        assert_eq!(error_code(&full), ErrorCode::CONTEXT_LENGTH);
        let bad = PipelineError::InvalidRequest("no".into());
        assert_eq!(error_code(&bad), ErrorCode::BAD_REQUEST);
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
