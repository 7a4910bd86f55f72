//! [`Pipeline`]: the head of a ring. It owns the first stage (embedding and the first layers)
//! and the session — prompt, generated tokens, sampling parameters and seed — and drives the
//! peers: `LoadStage` to each, then per step a `Forward` of hidden states to the first peer
//! and a wait for the `Token` the last stage sends to this head's reply listener. The head's
//! own stage batches too: the steps of concurrent sessions that meet at it run as one pass
//! (crate::batch).
//!
//! Here: the pipeline, its ring and recovery, its sessions; `config.rs`: how a pipeline is
//! described (peers, layers, the re-plan hook); `replies.rs`: the reply listener and the
//! router that hands tokens (and an embedding's rows) to their sessions; `embed.rs`:
//! embeddings through the ring; `local.rs`: the head's own stage, batched;
//! `layout.rs`: the layer arithmetic of a ring and of a re-plan.

mod config;
mod embed;
mod layout;
mod local;
mod replies;

pub use config::{PeerStage, PipelineConfig, Replan, ReplanResult, WeightHolders};

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use shoal_cluster::{Member, Membership};
use shoal_engine::candle_core::Device;
use shoal_engine::prefix_cache::{canonical_len, resume_point};
use shoal_engine::{
    Drafter, EngineError, GgufFile, JsonRule, JsonTracker, KvCache, Logits, ModelConfig,
    PrefixCache, PromptFormat, Sampler, SamplingParams, Stage, StageSpec, TokenLogprob, Tokenizer,
};
use shoal_wire::{
    Activations, Capabilities, EndSession, ErrorCode, Forward, JsonAnswer, LoadStage, Message,
    Payload, Ping, Resume, Want, WireError, MAX_TOP_LOGPROBS,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::batch::{spawn_worker, Active, PassTimer};
use crate::convert::{file_sha256, sampling_spec};
use crate::error::{PipelineError, Result};
use crate::link::{dial, dial_with_ack, Link};

use layout::{check_layout, check_ring, proportional};
use local::{run_local_batch, LocalJob, LocalOut};
use replies::{serve_replies, Reply, Router};

struct Peer {
    addr: SocketAddr,
    link: tokio::sync::Mutex<Link>,
    /// How often the link is pinged while unused ([`Link::keepalive_interval`]: each stage
    /// announces its own idle timeout).
    keepalive_interval: Duration,
    /// Longest a write to it may take (the transport's stall deadline): every session
    /// shares the link's lock, so a stage that stops reading must not hold it for longer.
    write_deadline: Duration,
}

/// The stages sessions run on now: the head's own and the peers', in ring order.
struct Ring {
    /// Bumped at every re-plan, so sessions that failed on the same ring re-plan it once.
    epoch: u64,
    /// The plan its stages were loaded for; every `Forward` carries it.
    plan_id: u64,
    stage: Arc<Stage>,
    peers: Arc<Vec<Peer>>,
    /// Each peer's layers, in ring order (the head's are `stage`'s).
    peer_layers: Vec<Range<usize>>,
}

/// What setting up a ring needs from its [`Pipeline`].
struct RingSetup<'a> {
    config: &'a PipelineConfig,
    model: &'a ModelConfig,
    sha: [u8; 32],
    router: &'a Arc<Router>,
    /// The head's reply listener, which serves peers without the model their layers from
    /// the head's file (`None` without a SHA-256 to check them by: then no peer is sent
    /// layers, by the head or by one another).
    weights_from: Option<SocketAddr>,
}

impl RingSetup<'_> {
    /// Loads the head's stage for `local` (unless `reuse` already runs exactly it) and sets
    /// up `peers` with a fresh plan id.
    async fn build(
        &self,
        epoch: u64,
        reuse: Option<Arc<Stage>>,
        local: Range<usize>,
        peers: &[PeerStage],
    ) -> Result<Ring> {
        let n = self.model.n_layers;
        let stage = match reuse.filter(|s| s.spec().layers == local) {
            Some(stage) => stage,
            None => {
                let path = self.config.model_path.clone();
                Arc::new(
                    tokio::task::spawn_blocking(move || -> Result<Stage> {
                        let file = GgufFile::open(&path)?;
                        Ok(Stage::load(
                            &file,
                            StageSpec::range(local, n),
                            &Device::Cpu,
                            |_, _| {},
                        )?)
                    })
                    .await??,
                )
            }
        };
        let plan_id = fresh_id();
        let holders = self.config.weight_holders.now();
        let mut links = Vec::with_capacity(peers.len());
        let mut last_stage = None;
        for (i, p) in peers.iter().enumerate() {
            let next = peers.get(i + 1).map(|q| q.addr);
            let load = LoadStage {
                plan_id,
                model_id: self.config.model_id.clone(),
                model_sha256: self.sha,
                layer_start: to_u32(p.layers.start)?,
                layer_end: to_u32(p.layers.end)?,
                embed: false,
                head: p.layers.end == n,
                activation_dtype: self.config.activation_dtype,
                max_context: to_u32(self.model.context_length)?,
                next,
                weights_from: self.weights_from.map_or_else(Vec::new, |head| {
                    let ring: Vec<SocketAddr> = peers.iter().map(|q| q.addr).collect();
                    crate::weights::with_holders(
                        crate::weights::sources_for(i, &ring, head),
                        &holders,
                        p.addr,
                        head,
                    )
                }),
            };
            // The stages load one after another; those loaded first must not be closed as
            // idle while a later one fetches or loads its weights.
            let loading = tokio::time::timeout(
                self.config.load_timeout,
                load_peer(p.addr, self.config, load, self.router.clone()),
            );
            let at = |source| PipelineError::Loading {
                peer: p.addr,
                source: Box::new(source),
            };
            let (link, node_id) = keeping_alive(&links, loading)
                .await
                .map_err(|_| {
                    at(PipelineError::Timeout {
                        what: "StageReady",
                        after: self.config.load_timeout,
                    })
                })?
                .map_err(at)?;
            links.push(Peer {
                addr: p.addr,
                keepalive_interval: link.keepalive_interval(),
                link: tokio::sync::Mutex::new(link),
                write_deadline: self.config.transport.stall_timeout,
            });
            last_stage = Some(node_id);
        }
        // From now on only this ring's last stage is heard for tokens.
        self.router.set_last_stage(last_stage);
        let links = Arc::new(links);
        keep_alive(&links);
        Ok(Ring {
            epoch,
            plan_id,
            stage,
            peers: links,
            peer_layers: peers.iter().map(|p| p.layers.clone()).collect(),
        })
    }
}

/// Pings each of a ring's links that has been unused for its keep-alive interval, while the
/// ring lives: a stage closes a connection silent for its idle timeout (four times that),
/// and a ring idle between requests must not find its links closed and re-plan. Stages may
/// differ, so the task wakes at the shortest interval. It holds the links weakly, so it
/// ends with the ring.
fn keep_alive(peers: &Arc<Vec<Peer>>) {
    let Some(every) = shortest_keepalive(peers) else {
        return;
    };
    let peers = Arc::downgrade(peers);
    tokio::spawn(async move {
        let mut nonce = 0u64;
        loop {
            tokio::time::sleep(every).await;
            let Some(peers) = peers.upgrade() else {
                return;
            };
            ping_unused(&peers, &mut nonce).await;
        }
    });
}

/// `work`, keeping `peers` alive meanwhile as [`keep_alive`] does.
async fn keeping_alive<T>(peers: &[Peer], work: impl std::future::Future<Output = T>) -> T {
    let Some(every) = shortest_keepalive(peers) else {
        return work.await;
    };
    tokio::pin!(work);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            done = &mut work => return done,
            () = tokio::time::sleep(every) => ping_unused(peers, &mut nonce).await,
        }
    }
}

fn shortest_keepalive(peers: &[Peer]) -> Option<Duration> {
    peers.iter().map(|p| p.keepalive_interval).min()
}

/// Pings each of `peers` unused for its keep-alive interval.
async fn ping_unused(peers: &[Peer], nonce: &mut u64) {
    for peer in peers {
        let mut link = peer.link.lock().await;
        if link.is_closed() || link.unused_for() < peer.keepalive_interval {
            continue;
        }
        *nonce = nonce.wrapping_add(1);
        let ping = Message::Ping(Ping { nonce: *nonce });
        if let Err(e) = link.write_within(&ping, peer.write_deadline).await {
            // The next request finds the link closed and recovers.
            tracing::info!(peer = %peer.addr, error = %e, "keep-alive ping failed");
        }
    }
}

/// The head of a ring of stages.
pub struct Pipeline {
    config: PipelineConfig,
    format: PromptFormat,
    model: ModelConfig,
    /// The model file's SHA-256 (zeros when not checked), sent in every `LoadStage`.
    sha: [u8; 32],
    ring: RwLock<Arc<Ring>>,
    /// The ring's peers (every one it ever used) and whether they answer: set up, probed
    /// after a loss.
    members: Membership,
    /// Held while re-planning, so concurrent sessions that lost the same stage re-plan once.
    replan: tokio::sync::Mutex<()>,
    router: Arc<Router>,
    reply_addr: SocketAddr,
    listener: JoinHandle<()>,
    /// Steps of the head's own stage, to its batching worker.
    local: mpsc::UnboundedSender<LocalJob>,
    batcher: JoinHandle<()>,
    next_session: AtomicU64,
    /// The prompt cache: the head's own stage's caches of ended sessions with their tokens,
    /// by session id (the peers keep theirs under the same ids), for the ring of one epoch.
    kept: Mutex<KeptPrompts>,
    /// [`Stage::rows_reusable_across_chunks`] of the model.
    reuse_by_rows: bool,
    /// How long the head's own decode passes take.
    pass_timer: Arc<PassTimer>,
}

/// Caches kept on the ring of `epoch`; a re-plan reloads every stage, so they go with it.
struct KeptPrompts {
    epoch: u64,
    cache: PrefixCache,
}

/// One generation through the ring.
#[derive(Clone, Copy, Debug)]
pub struct RingRequest<'a> {
    pub prompt: &'a [u32],
    pub sampling: &'a SamplingParams,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Resume from a kept prompt that starts the same way, and keep this one (llama-server's
    /// `cache_prompt`); no effect with [`PipelineConfig::prompt_cache_bytes`] 0.
    pub cache_prompt: bool,
    /// Report each token's log-probability with this many alternatives (OpenAI's
    /// `logprobs` / `top_logprobs`), computed where the token is drawn.
    pub logprobs: Option<usize>,
    /// Keep the answer's JSON to this rule (`response_format`, tool calls): while a value
    /// is open, the stage that draws each token masks what would break it; a rule that
    /// ends the answer with its value ends it as soon as the value is whole.
    pub json: Option<&'a JsonRule>,
    /// Never draw an end-of-generation token (llama-server's `ignore_eos`).
    pub ignore_eos: bool,
}

impl<'a> RingRequest<'a> {
    /// `max_tokens` of an answer to `prompt`, sampled as `sampling` says, with the prompt
    /// cache on and nothing else asked for.
    pub fn new(prompt: &'a [u32], sampling: &'a SamplingParams, max_tokens: usize) -> Self {
        RingRequest {
            prompt,
            sampling,
            max_tokens,
            cache_prompt: true,
            logprobs: None,
            json: None,
            ignore_eos: false,
        }
    }
}

/// What a [`Pipeline::run`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingAnswer {
    pub tokens: Vec<u32>,
    /// Of the prompt's tokens, those resumed from a kept cache rather than computed.
    pub cached_tokens: usize,
    /// The answer is a whole JSON value of the request's grammar (and ended there).
    pub json_done: bool,
    /// Tokens guessed ahead and verified by the ring ([`PipelineConfig::speculation`]),
    /// and how many of them the answer kept.
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.listener.abort();
        self.batcher.abort();
    }
}

/// A task aborted when this is dropped, unless taken first.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    /// The task, no longer aborted on drop.
    fn take(&mut self) -> JoinHandle<()> {
        match self.0.take() {
            Some(task) => task,
            // Taken once, by construction; an empty task stands in otherwise.
            None => tokio::spawn(async {}),
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Most re-plans one generation makes before it gives up.
const MAX_RECOVERIES: usize = 3;

/// How long a peer has to answer a handshake to count as alive when re-planning.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Pipeline {
    /// Loads the head's stage, opens the reply listener, and sets up every peer with
    /// `LoadStage` (each peer's `next` is the following peer; the last has none).
    pub async fn connect(config: PipelineConfig) -> Result<Pipeline> {
        let path = config.model_path.clone();
        let verify = config.verify_sha256;
        let template = config.chat_template.clone();
        let (format, model, sha, reuse_by_rows) =
            tokio::task::spawn_blocking(move || -> Result<_> {
                let file = GgufFile::open(&path)?;
                let mut format = PromptFormat::from_gguf(&file)?;
                if let Some(source) = &template {
                    format.set_template(source)?;
                }
                let sha = if verify { file_sha256(&path)? } else { [0; 32] };
                let by_rows = Stage::rows_reusable_across_chunks(&file);
                Ok((format, file.config().clone(), sha, by_rows))
            })
            .await??;
        check_ring(&config, &model)?;
        if let Some(draft) = &config.draft_model {
            let name = config.model_id.clone();
            shoal_engine::check_draft_tokenizer(format.tokenizer(), &name, draft)
                .map_err(|e| PipelineError::Config(e.to_string()))?;
        }

        let listener = TcpListener::bind(config.reply_bind)
            .await
            .map_err(WireError::from)?;
        let reply_addr = listener.local_addr().map_err(WireError::from)?;
        let router = Arc::new(Router::default());
        // With a SHA-256 to check them by, the reply listener also serves the head's
        // model to peers that lack it (crate::weights).
        let weights = (sha != [0; 32]).then(|| (config.model_path.clone(), sha));
        let mut listener = AbortOnDrop(Some(tokio::spawn(serve_replies(
            listener,
            config.node_id.clone(),
            config.transport.clone(),
            router.clone(),
            weights,
            config.weight_stats.clone(),
        ))));
        let setup = RingSetup {
            config: &config,
            model: &model,
            sha,
            router: &router,
            weights_from: (sha != [0; 32]).then_some(reply_addr),
        };
        // Until the pipeline owns the listener, a failure (or this future dropped) ends it:
        // its port would stay open for good, one per try of a head that tries again.
        let ring = setup
            .build(0, None, config.local_layers.clone(), &config.peers)
            .await?;
        let (local, jobs) = mpsc::unbounded_channel();
        // The sessions generating now are those the head's stage may wait for.
        let active: Active = {
            let router = router.clone();
            Box::new(move || router.len())
        };
        let pass_timer = Arc::new(PassTimer::default());
        let timer = pass_timer.clone();
        let batcher = spawn_worker(
            jobs,
            config.batch_rows,
            config.stats.clone(),
            Some(active),
            move |batch: Vec<LocalJob>| {
                let timer = timer.clone();
                async move {
                    let (rows, sessions) =
                        (batch.iter().map(|j| j.positions.len()).sum(), batch.len());
                    let started = std::time::Instant::now();
                    // A panic drops the batch's replies: its sessions fail, the worker goes on.
                    if let Err(e) =
                        tokio::task::spawn_blocking(move || run_local_batch(batch)).await
                    {
                        tracing::error!(error = %e, "the head's stage failed");
                    }
                    timer.record(rows, sessions, started.elapsed());
                }
            },
        );
        let members = Membership::new(config.peers.iter().map(|p| p.addr));
        for p in &config.peers {
            members.seen(p.addr, None);
        }
        Ok(Pipeline {
            format,
            model,
            sha,
            ring: RwLock::new(Arc::new(ring)),
            members,
            replan: tokio::sync::Mutex::new(()),
            router,
            reply_addr,
            listener: listener.take(),
            local,
            batcher,
            // Stages key caches by session id, and several heads may share a stage: start
            // each head's ids somewhere else.
            next_session: AtomicU64::new(fresh_id() >> 1),
            kept: Mutex::new(KeptPrompts {
                epoch: 0,
                cache: PrefixCache::new(config.prompt_cache_bytes),
            }),
            reuse_by_rows,
            pass_timer,
            config,
        })
    }

    fn setup(&self) -> RingSetup<'_> {
        RingSetup {
            config: &self.config,
            model: &self.model,
            sha: self.sha,
            router: &self.router,
            weights_from: (self.sha != [0; 32]).then_some(self.reply_addr),
        }
    }

    fn current_ring(&self) -> Arc<Ring> {
        self.ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many times the ring was laid out again, after losing a stage or finding its plan
    /// gone.
    pub fn replans(&self) -> u64 {
        self.current_ring().epoch
    }

    /// Microseconds the head's own recent decode passes took, on average (0: none yet).
    pub fn pass_us(&self) -> u32 {
        self.pass_timer.micros()
    }

    /// The ring as it stands: the head's layers, then each peer's address and layers.
    pub fn layout(&self) -> (Range<usize>, Vec<PeerStage>) {
        let ring = self.current_ring();
        let peers = ring
            .peers
            .iter()
            .zip(&ring.peer_layers)
            .map(|(p, layers)| PeerStage {
                addr: p.addr,
                layers: layers.clone(),
            })
            .collect();
        (ring.stage.spec().layers.clone(), peers)
    }

    /// After a session lost a stage on `failed`: finds which peers still answer and lays the
    /// model out over the head and those — as [`PipelineConfig::replan`] decides (fresh
    /// profiles and the planner, in the binary), or else with each keeping its share of the
    /// old plan (a plan made from measured speeds stays proportionate). Only the first
    /// session to get here for a ring re-plans; the others find the new ring in place.
    async fn recover(&self, failed: &Ring) -> Result<()> {
        let _replanning = self.replan.lock().await;
        if self.current_ring().epoch != failed.epoch {
            return Ok(());
        }
        let head_layers = failed.stage.spec().layers.clone();
        for peer in failed.peers.iter() {
            let probe = tokio::time::timeout(
                PROBE_TIMEOUT,
                dial(
                    peer.addr,
                    &self.config.node_id,
                    Capabilities::HEAD,
                    &self.config.transport,
                ),
            )
            .await;
            match probe {
                Ok(Ok(_)) => self.members.seen(peer.addr, None),
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer.addr, error = %e, "stage is gone");
                    self.members.failed(peer.addr, &e.to_string());
                }
                Err(_) => {
                    tracing::warn!(peer = %peer.addr, "stage does not answer");
                    self.members
                        .failed(peer.addr, "no handshake within the probe timeout");
                }
            }
        }
        let mut alive = Vec::new();
        let mut lost = Vec::new();
        for (peer, layers) in failed.peers.iter().zip(&failed.peer_layers) {
            if self.members.is_alive(peer.addr) {
                alive.push(PeerStage {
                    addr: peer.addr,
                    layers: layers.clone(),
                });
            } else {
                lost.push(peer.addr);
            }
        }
        let n = self.model.n_layers;
        let planned = match &self.config.replan {
            Some(replan) => match replan.replan(head_layers.clone(), &alive, &lost).await {
                Ok((local, peers)) => match check_layout(&local, &peers, &lost, n) {
                    Ok(()) => Some((local, peers)),
                    Err(why) => {
                        tracing::warn!(%why, "the re-plan is not a usable layout; keeping shares instead");
                        None
                    }
                },
                Err(why) => {
                    tracing::warn!(%why, "could not re-plan from profiles; keeping shares instead");
                    None
                }
            },
            None => None,
        };
        let (local, peers) = match planned {
            Some(layout) => layout,
            None => proportional(head_layers, &alive, n)?,
        };
        tracing::warn!(
            head = ?local,
            peers = ?peers,
            "re-planned the ring on the nodes left"
        );
        self.install(failed, local, &peers).await
    }

    /// Sets up the ring that follows `previous` (the next epoch, the head's stage cut from
    /// the one it had) with these layers, and answers through it from now on.
    async fn install(
        &self,
        previous: &Ring,
        local: Range<usize>,
        peers: &[PeerStage],
    ) -> Result<()> {
        let ring = self
            .setup()
            .build(
                previous.epoch + 1,
                Some(previous.stage.clone()),
                local,
                peers,
            )
            .await?;
        for p in peers {
            self.members.seen(p.addr, None);
        }
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
        Ok(())
    }

    /// Plans the ring again with [`PipelineConfig::replan`] over the peers it knows now
    /// (members that joined since the last plan included: the planner may now put layers
    /// on them), and moves to the new layout when it differs. Returns whether it moved.
    ///
    /// Sessions running meanwhile stay exact: a stage reloaded for the new plan refuses
    /// their next step as `stale_plan`, and they replay on the new ring as after a loss.
    pub async fn replan(&self) -> Result<bool> {
        let Some(replan) = &self.config.replan else {
            return Ok(false);
        };
        let _replanning = self.replan.lock().await;
        let ring = self.current_ring();
        let (head_layers, current) = self.layout();
        let (local, peers) = replan
            .replan(head_layers.clone(), &current, &[])
            .await
            .map_err(PipelineError::Config)?;
        check_layout(&local, &peers, &[], self.model.n_layers).map_err(PipelineError::Config)?;
        if local == head_layers && peers == current {
            return Ok(false);
        }
        tracing::info!(head = ?local, peers = ?peers, "moving the ring to a new plan");
        self.install(&ring, local, &peers).await?;
        Ok(true)
    }

    /// Every peer the ring has used, and whether it answered when last contacted.
    pub fn members(&self) -> Vec<Member> {
        self.members.members()
    }

    /// The model's tokenizer (for `is_eog`, decoding).
    pub fn tokenizer(&self) -> &Tokenizer {
        self.format.tokenizer()
    }

    /// The model's tokenizer and chat template, for turning requests into prompts.
    pub fn prompt_format(&self) -> &PromptFormat {
        &self.format
    }

    /// The model's shape.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model
    }

    /// Where the last stage sends tokens.
    pub fn reply_addr(&self) -> SocketAddr {
        self.reply_addr
    }

    /// Generates up to `max_tokens` after `prompt`, stopping after an end-of-generation token.
    pub async fn generate(
        &self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
    ) -> Result<Vec<u32>> {
        self.generate_with(prompt, sampling, max_tokens, |_| {})
            .await
    }

    /// As [`Pipeline::generate`], calling `on_token` with each token as it arrives.
    pub async fn generate_with(
        &self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        mut on_token: impl FnMut(u32) + Send,
    ) -> Result<Vec<u32>> {
        let request = RingRequest::new(prompt, sampling, max_tokens);
        let answer = self
            .run(request, |t, _| {
                on_token(t);
                true
            })
            .await?;
        Ok(answer.tokens)
    }

    /// Generates as `request` says, calling `on_token` with each token as it arrives (and
    /// its log-probabilities, when the request asks for them); when it answers `false` the
    /// generation ends there, as at `max_tokens` (a stop string the caller found: the
    /// session ends normally, and its prompt is kept).
    pub async fn run(
        &self,
        request: RingRequest<'_>,
        mut on_token: impl FnMut(u32, Option<TokenLogprob>) -> bool + Send,
    ) -> Result<RingAnswer> {
        let RingRequest {
            prompt, max_tokens, ..
        } = request;
        if prompt.is_empty() {
            return Err(PipelineError::InvalidRequest("the prompt is empty".into()));
        }
        let limit = self.model.context_length;
        if prompt.len() >= limit {
            // At least one position past the prompt, for the first token.
            return Err(EngineError::ContextFull {
                needed: prompt.len() + 1,
                limit,
            }
            .into());
        }
        if max_tokens == 0 {
            return Ok(RingAnswer {
                tokens: Vec::new(),
                cached_tokens: 0,
                json_done: false,
                drafted_tokens: 0,
                accepted_tokens: 0,
            });
        }
        let mut generated = Vec::new();
        let mut guessed = Guessed::default();
        let mut recoveries = 0;
        let mut reuse = request.cache_prompt;
        loop {
            let ring = self.current_ring();
            let attempt = self
                .run_on(
                    &ring,
                    &request,
                    reuse,
                    &mut generated,
                    &mut guessed,
                    &mut on_token,
                )
                .await;
            match attempt {
                Ok(cached_tokens) => {
                    let tokenizer = self.format.tokenizer();
                    let json_done = request
                        .json
                        .is_some_and(|r| JsonTracker::after(r, tokenizer, &generated).finished());
                    return Ok(RingAnswer {
                        tokens: generated,
                        cached_tokens,
                        json_done,
                        drafted_tokens: guessed.drafted,
                        accepted_tokens: guessed.accepted,
                    });
                }
                // A stage let the kept prompt go: run the session again from the start.
                Err(e) if reuse && generated.is_empty() && e.is_prefix_gone() => {
                    tracing::info!(error = %e, "a kept prompt is gone from a stage; computing it");
                    reuse = false;
                }
                Err(e) if self.recoverable(&e, &ring, recoveries) => {
                    recoveries += 1;
                    tracing::warn!(
                        error = %e,
                        generated = generated.len(),
                        "lost a stage mid-session; re-planning and replaying the session"
                    );
                    self.recover(&ring).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a request that failed with `e` on `ring` goes on on a new ring (re-planned
    /// without the lost stage) after `recoveries` such re-plans.
    fn recoverable(&self, e: &PipelineError, ring: &Ring, recoveries: usize) -> bool {
        self.config.recover
            && e.is_stage_loss()
            && !ring.peers.is_empty()
            && recoveries < MAX_RECOVERIES
    }

    /// Runs one session on `ring`; returns how many prompt tokens it resumed from a kept
    /// cache. Tokens already in `generated` (from a ring that failed) are replayed, not
    /// sampled: fed exactly as they were first fed — the prompt in the same chunks, then one
    /// token per step — so every stage computes what the lost ring had, and greedy output
    /// goes on as if nothing had failed.
    async fn run_on(
        &self,
        ring: &Ring,
        request: &RingRequest<'_>,
        reuse: bool,
        generated: &mut Vec<u32>,
        guessed: &mut Guessed,
        on_token: &mut (impl FnMut(u32, Option<TokenLogprob>) -> bool + Send),
    ) -> Result<usize> {
        let (guard, mut rx) = self.open_session(ring);
        let session_id = guard.id;
        let resumed = if reuse && generated.is_empty() {
            self.resume_prompt(ring, request.prompt)
        } else {
            None
        };
        let from = resumed.as_ref().map_or(0, |(r, _)| r.len as usize);
        let (resume, cache) = match resumed {
            Some((r, cache)) => (Some(r), cache),
            None => (None, ring.stage.new_cache()),
        };
        let session = Session {
            ring,
            id: session_id,
            prompt: request.prompt,
            sampling: request.sampling,
            max_tokens: request.max_tokens,
            resume,
            logprobs: request.logprobs,
            json: request.json,
            ignore_eos: request.ignore_eos,
            cache_prompt: request.cache_prompt,
        };
        let mut progress = Progress {
            cache: Some(cache),
            prompt_done: false,
            guessed: Guessed::default(),
        };
        let result = self
            .run_session(&session, &mut rx, generated, on_token, &mut progress)
            .await;
        guessed.drafted += progress.guessed.drafted;
        guessed.accepted += progress.guessed.accepted;
        let mut ends = vec![EndSession::free(session_id)];
        match (&result, progress.cache.take()) {
            (Ok(()), Some(cache)) if request.cache_prompt && progress.prompt_done => {
                ends = self.keep_prompt(ring, session_id, request.prompt, from, cache);
            }
            (Err(e), _) if e.is_prefix_gone() => {
                if let Some(r) = resume {
                    lock(&self.kept).cache.forget(r.from_session);
                    ends.push(EndSession::free(r.from_session));
                }
            }
            _ => {}
        }
        guard.end(ends).await;
        result.map(|()| from)
    }

    /// A session of its own on `ring`: the guard that ends it on every stage however the
    /// caller stops (its id is `guard.id`), and the route its replies come by.
    fn open_session(&self, ring: &Ring) -> (SessionGuard, mpsc::UnboundedReceiver<Reply>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let rx = self.router.register(id);
        let guard = SessionGuard {
            id,
            router: self.router.clone(),
            peers: ring.peers.clone(),
            ended: false,
        };
        (guard, rx)
    }

    /// The head's copy of the longest kept prompt `prompt` starts with, cut where a resumed
    /// prompt computes what a whole one would (crate docs of `shoal_engine::prefix_cache`),
    /// and where the peers resume theirs.
    fn resume_prompt(&self, ring: &Ring, prompt: &[u32]) -> Option<(Resume, KvCache)> {
        let mut kept = lock(&self.kept);
        if kept.epoch != ring.epoch {
            kept.cache.clear();
            kept.epoch = ring.epoch;
            return None;
        }
        let m = kept.cache.longest(prompt, prompt.len().saturating_sub(1))?;
        let chunk = self.config.prefill_chunk.max(1);
        let at = resume_point(m.len, prompt.len(), chunk, self.reuse_by_rows);
        let len = u32::try_from(at).ok().filter(|&l| l > 0)?;
        let cache = kept.cache.resume(m.key, at)?;
        Some((
            Resume {
                from_session: m.key,
                len,
            },
            cache,
        ))
    }

    /// Keeps a finished session's prompt (the head's cache here, the peers' on the peers):
    /// the `EndSession`s to send — this session's, with `keep` unless the head had no room,
    /// and a plain one for every kept prompt it superseded or pushed out.
    fn keep_prompt(
        &self,
        ring: &Ring,
        session_id: u64,
        prompt: &[u32],
        from: usize,
        cache: KvCache,
    ) -> Vec<EndSession> {
        let chunk = self.config.prefill_chunk.max(1);
        let canonical = canonical_len(prompt.len(), from, chunk, self.reuse_by_rows);
        let mut kept = lock(&self.kept);
        if canonical == 0 || kept.epoch != ring.epoch || self.current_ring().epoch != ring.epoch {
            return vec![EndSession::free(session_id)];
        }
        let dropped = kept.cache.keep(session_id, &prompt[..canonical], cache);
        let mut ends = vec![EndSession {
            session_id,
            keep: !dropped.contains(&session_id),
        }];
        ends.extend(
            dropped
                .into_iter()
                .filter(|&k| k != session_id)
                .map(EndSession::free),
        );
        ends
    }

    /// Prompts kept for reuse by this head, and their bytes on its own stage.
    pub fn prompt_cache_usage(&self) -> (usize, usize) {
        let kept = lock(&self.kept);
        (kept.cache.len(), kept.cache.bytes())
    }

    async fn run_session(
        &self,
        session: &Session<'_>,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        generated: &mut Vec<u32>,
        on_token: &mut (impl FnMut(u32, Option<TokenLogprob>) -> bool + Send),
        progress: &mut Progress,
    ) -> Result<()> {
        let ring = session.ring;
        let limit = self.model.context_length;
        let chunk = self.config.prefill_chunk.max(1);
        let replay = generated.clone();
        let cache = &mut progress.cache;
        let mut local_sampler = ring
            .peers
            .is_empty()
            .then(|| Sampler::new(session.sampling.clone()));
        let mut history = session.prompt.to_vec();
        let tokenizer = self.format.tokenizer();
        // Where the answer is in its grammar, for the head's own draws and for ending it.
        let mut json = session.json.map(|r| JsonTracker::new(r, tokenizer));
        let mut start = session.resume.map_or(0, |r| r.len as usize);
        let mut pending = session.prompt[start..].to_vec();
        let mut resume = session.resume;
        let mut seq = 0u64;
        let mut guesser = Guesser::for_session(
            self.config.speculation,
            self.config.draft_model.as_ref(),
            session,
            self.model.vocab_size,
        );
        loop {
            // The answer's next token: replayed when a lost ring had drawn it already.
            let replayed = replay.get(history.len() - session.prompt.len()).copied();
            if let Some(g) = guesser.as_mut() {
                // The last verify's guesses the draws did not keep, on the head's stage too.
                if let Some(c) = cache.as_mut() {
                    g.drop_unkept(c, start);
                }
                let replaying = history.len() - session.prompt.len() < replay.len();
                let room = session
                    .max_tokens
                    .saturating_sub(generated.len())
                    .min(limit.saturating_sub(history.len()));
                let draft = match (replaying, pending.len()) {
                    (false, 1) => g.draft(&history, room.min(chunk).saturating_sub(1)).await?,
                    _ => Vec::new(),
                };
                if !draft.is_empty() {
                    let draws = self
                        .verify(session, rx, cache, start, pending[0], &draft, &history, seq)
                        .await?;
                    seq += 1;
                    progress.prompt_done = true;
                    g.note(draft.len(), draws.len() - 1, start);
                    progress.guessed.drafted += draft.len();
                    progress.guessed.accepted += draws.len() - 1;
                    let mut ended = false;
                    for &t in &draws {
                        generated.push(t);
                        history.push(t);
                        if !on_token(t, None)
                            || tokenizer.is_eog(t)
                            || generated.len() >= session.max_tokens
                            || history.len() >= limit
                        {
                            ended = true;
                            break;
                        }
                    }
                    if ended {
                        break;
                    }
                    start = history.len() - 1;
                    pending = vec![history[start]];
                    continue;
                }
            }
            let pieces = chunk_ends(start, start + pending.len(), chunk);
            let n_chunks = pieces.len();
            let mut token = None;
            let mut piece_start = start;
            for (i, piece_end) in pieces.into_iter().enumerate() {
                let piece = &pending[piece_start - start..piece_end - start];
                let wants_token = i + 1 == n_chunks && replayed.is_none();
                let positions: Vec<u32> = (piece_start..piece_end)
                    .map(to_u32)
                    .collect::<Result<_>>()?;
                piece_start = piece_end;
                let out = self
                    .run_local(
                        session.id,
                        ring,
                        cache,
                        piece.to_vec(),
                        &positions,
                        Logits::Last,
                    )
                    .await?;
                match out {
                    LocalOut::Logits(mut logits) => {
                        if wants_token {
                            if let Some(s) = local_sampler.as_mut() {
                                let raw = session.logprobs.map(|top| (logits.clone(), top));
                                if session.ignore_eos {
                                    mask_eos(&mut logits, tokenizer);
                                }
                                let t = match json.as_ref().and_then(JsonTracker::constraint) {
                                    None => s.sample(&mut logits, &history),
                                    Some(json) => json
                                        .draw(&mut logits, tokenizer, |l| s.sample(l, &history))
                                        .ok_or_else(no_json_token)?,
                                };
                                let lp = raw.and_then(|(raw, top)| {
                                    shoal_engine::token_logprob(&raw, t, top)
                                });
                                token = Some((t, lp));
                            }
                        }
                    }
                    LocalOut::Hidden(a) => {
                        let want = if wants_token {
                            let mut spec = sampling_spec(session.sampling, &history);
                            if let Some(top) = session.logprobs {
                                spec.logprob = true;
                                spec.top_logprobs =
                                    u8::try_from(top.min(MAX_TOP_LOGPROBS)).unwrap_or(0);
                            }
                            spec.ignore_eos = session.ignore_eos;
                            spec.json = session.json.zip(json.as_ref()).and_then(|(r, t)| {
                                let (lead, answer) = t.segment()?;
                                Some(JsonAnswer {
                                    grammar: r.grammar().wire_text().to_owned(),
                                    lead: lead.to_vec(),
                                    answer: answer.to_vec(),
                                })
                            });
                            Want::Token(spec)
                        } else {
                            Want::Nothing
                        };
                        let msg = Message::Forward(Forward {
                            session_id: session.id,
                            seq,
                            plan_id: ring.plan_id,
                            positions,
                            payload: Payload::Hidden(a),
                            want,
                            reply_to: self.reply_addr,
                            resume: resume.take(),
                        });
                        send_first(ring, msg).await?;
                        if wants_token {
                            token = match self.wait_reply(rx, seq).await? {
                                Drawn::Token(t, lp) => Some((t, lp)),
                                Drawn::Verified(_) | Drawn::Rows(_) => return Err(unasked_draws()),
                            };
                        }
                        seq += 1;
                    }
                }
            }
            // A token back means every stage has run everything sent so far.
            progress.prompt_done |= token.is_some();
            let mut go_on = true;
            let token = match replayed {
                Some(t) => t,
                None => {
                    let (t, lp) = token.ok_or_else(|| {
                        PipelineError::StageFailed("the ring produced no token".into())
                    })?;
                    generated.push(t);
                    go_on = on_token(t, lp);
                    t
                }
            };
            history.push(token);
            if let Some(json) = &mut json {
                json.accept(token, tokenizer);
            }
            if !go_on
                || json.as_ref().is_some_and(JsonTracker::finished)
                || tokenizer.is_eog(token)
                || generated.len() >= session.max_tokens
                || history.len() >= limit
            {
                break;
            }
            start = history.len() - 1;
            pending = vec![token];
        }
        Ok(())
    }

    /// A step of guesses (issue #17): `last` (the answer's latest token, at `start`) and
    /// `draft` after it, each row run as a decode step alone on every stage; the last stage
    /// draws after each row and stops at the first draw that is not the next guess. Returns
    /// the draws: the guesses that held, then one token of the ring's own.
    #[allow(clippy::too_many_arguments)]
    async fn verify(
        &self,
        session: &Session<'_>,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        cache: &mut Option<KvCache>,
        start: usize,
        last: u32,
        draft: &[u32],
        history: &[u32],
        seq: u64,
    ) -> Result<Vec<u32>> {
        let ring = session.ring;
        let mut tokens = Vec::with_capacity(draft.len() + 1);
        tokens.push(last);
        tokens.extend_from_slice(draft);
        let positions: Vec<u32> = (start..start + tokens.len())
            .map(to_u32)
            .collect::<Result<_>>()?;
        let out = self
            .run_local(session.id, ring, cache, tokens, &positions, Logits::Verify)
            .await?;
        let LocalOut::Hidden(a) = out else {
            return Err(PipelineError::Config(
                "guesses are verified only by a ring with stages after the head".into(),
            ));
        };
        let mut spec = sampling_spec(session.sampling, history);
        spec.ignore_eos = session.ignore_eos;
        let msg = Message::Forward(Forward {
            session_id: session.id,
            seq,
            plan_id: ring.plan_id,
            positions,
            payload: Payload::Hidden(a),
            want: Want::Verify {
                spec,
                draft: draft.to_vec(),
            },
            reply_to: self.reply_addr,
            resume: None,
        });
        send_first(ring, msg).await?;
        let draws = match self.wait_reply(rx, seq).await? {
            Drawn::Verified(draws) => draws,
            Drawn::Token(..) | Drawn::Rows(_) => return Err(unasked_draws()),
        };
        // The draws follow the guesses up to the last; anything else is not a verify.
        let n = draws.len();
        if n == 0 || n > draft.len() + 1 || draws[..n - 1] != draft[..n - 1] {
            return Err(PipelineError::StageFailed(format!(
                "the last stage's draws {draws:?} do not verify the guesses {draft:?}"
            )));
        }
        Ok(draws)
    }

    /// One step of the session on the head's own stage, batched with the other sessions'
    /// steps that meet it there. The cache travels with the step and comes back with it.
    async fn run_local(
        &self,
        session: u64,
        ring: &Ring,
        cache: &mut Option<KvCache>,
        tokens: Vec<u32>,
        positions: &[u32],
        logits: Logits,
    ) -> Result<LocalOut> {
        let lost = || PipelineError::Task("the session's cache was lost".into());
        let c = cache.take().ok_or_else(lost)?;
        let (reply, answer) = oneshot::channel();
        let job = LocalJob {
            session,
            stage: ring.stage.clone(),
            tokens,
            positions: positions.iter().map(|&p| p as usize).collect(),
            cache: c,
            logits,
            // Normed rows are an embedding's product: not rounded on the way.
            dtype: if logits == Logits::Normed {
                shoal_wire::DType::F32
            } else {
                self.config.activation_dtype
            },
            reply,
        };
        self.local.send(job).map_err(|_| lost())?;
        let (c, out) = answer.await.map_err(|_| lost())?;
        *cache = Some(c);
        out
    }

    /// What the last stage drew for step `seq`: a token (with its log-probabilities when
    /// they were asked for), a verify's draws, or an embedding's rows.
    async fn wait_reply(&self, rx: &mut mpsc::UnboundedReceiver<Reply>, seq: u64) -> Result<Drawn> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => {
                    return Err(PipelineError::Timeout {
                        what: "token",
                        after: self.config.timeout,
                    })
                }
                Ok(None) => {
                    return Err(PipelineError::StageFailed(
                        "the reply channel closed".into(),
                    ))
                }
                Ok(Some(Reply::Token(t))) if t.seq == seq => {
                    let lp = t.logprob.map(|logprob| TokenLogprob {
                        token: t.token_id,
                        logprob,
                        top: t.top,
                    });
                    return Ok(Drawn::Token(t.token_id, lp));
                }
                Ok(Some(Reply::Verified(v))) if v.seq == seq => {
                    return Ok(Drawn::Verified(v.tokens));
                }
                Ok(Some(Reply::Rows(l))) if l.seq == seq => return Ok(Drawn::Rows(l.logits)),
                Ok(Some(Reply::Rows(l))) => {
                    tracing::debug!(seq = l.seq, expected = seq, "stale rows ignored");
                }
                Ok(Some(Reply::Token(t))) => {
                    tracing::debug!(seq = t.seq, expected = seq, "stale token ignored");
                }
                Ok(Some(Reply::Verified(v))) => {
                    tracing::debug!(seq = v.seq, expected = seq, "stale draws ignored");
                }
                Ok(Some(Reply::Error(m))) => return Err(PipelineError::StageFailed(m)),
                // A stage that failed inside is lost, and so is one loaded again for
                // another plan (the ring is re-planned, reloaded and the session replayed);
                // one that refused the work (a bad request, too many sessions) is up and
                // said why.
                Ok(Some(Reply::Refused(code, m)))
                    if code == ErrorCode::INTERNAL || code == ErrorCode::STALE_PLAN =>
                {
                    return Err(PipelineError::StageFailed(m))
                }
                Ok(Some(Reply::Refused(code, message))) => {
                    return Err(PipelineError::Rejected { code, message })
                }
            }
        }
    }
}

/// Sends to the ring's first peer from a task of its own: `write_frame` is not cancel-safe,
/// and a `generate` dropped mid-write must not leave half a frame on the link every session
/// uses.
async fn send_first(ring: &Ring, msg: Message) -> Result<()> {
    if ring.peers.is_empty() {
        return Err(PipelineError::Config("no peer to forward to".into()));
    }
    let peers = ring.peers.clone();
    tokio::spawn(async move {
        let Some(peer) = peers.first() else {
            return Ok(());
        };
        let mut link = peer.link.lock().await;
        if link.is_closed() {
            // The stage went while the ring was idle: fail now (and recover) rather than
            // write into a dead socket and wait a token timeout for nothing.
            return Err(WireError::Closed {
                expected: "a live link to the ring's first stage",
            });
        }
        link.write_within(&msg, peer.write_deadline).await
    })
    .await?
    .map_err(PipelineError::from)
}

/// One attempt at a session, on one ring.
struct Session<'a> {
    ring: &'a Ring,
    id: u64,
    prompt: &'a [u32],
    sampling: &'a SamplingParams,
    max_tokens: usize,
    /// The kept prompt it starts from, on every stage.
    resume: Option<Resume>,
    /// Log-probabilities asked for, with this many alternatives.
    logprobs: Option<usize>,
    json: Option<&'a JsonRule>,
    ignore_eos: bool,
    /// Keep this prompt (the head's draft model keeps its rows of it too).
    cache_prompt: bool,
}

/// Masks every end-of-generation token (`ignore_eos`).
pub(crate) fn mask_eos(logits: &mut [f32], tokenizer: &Tokenizer) {
    for &eog in tokenizer.eos_ids() {
        if let Some(l) = logits.get_mut(eog as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// The error of a constrained answer no token can continue.
pub(crate) fn no_json_token() -> PipelineError {
    PipelineError::InvalidRequest("no token can continue the constrained JSON answer".into())
}

/// What a session attempt leaves for its end: the head's cache (gone if a step failed),
/// whether the whole prompt has been through every stage, and the guesses it verified.
struct Progress {
    cache: Option<KvCache>,
    prompt_done: bool,
    guessed: Guessed,
}

/// Tokens guessed ahead and verified, and those the answer kept.
#[derive(Clone, Copy, Debug, Default)]
struct Guessed {
    drafted: usize,
    accepted: usize,
}

/// What the last stage drew for one step.
enum Drawn {
    Token(u32, Option<TokenLogprob>),
    /// A verify's draws.
    Verified(Vec<u32>),
    /// The rows an embedding asked for.
    Rows(Activations),
}

fn unasked_draws() -> PipelineError {
    PipelineError::StageFailed("the last stage answered a step with the wrong kind of draw".into())
}

/// A session's guessing ahead (issue #17): prompt lookup's guesses first, else the draft
/// model's, as many as the running acceptance earns (grown by two while guesses all hold,
/// shrunk by one when one fails, as the engine's own speculation does), and which of the
/// head's cache rows are guesses.
struct Guesser {
    lookup: Option<shoal_engine::Lookup>,
    /// The draft model's side of the session (taken while it drafts off the runtime).
    drafter: Option<Drafter>,
    p_min: f32,
    /// The target's vocabulary: the draft model stops at a token it has no row for.
    vocab: usize,
    draft_max: usize,
    draft_min: usize,
    draft_len: usize,
    /// After a verify at `start`: its guessed rows begin at `start + 1`.
    guessed_from: Option<usize>,
}

impl Guesser {
    /// A guesser when the session can verify guesses: a ring with stages after the head,
    /// lookup or a draft model on, and draws that depend only on the seed and the position
    /// (no penalties, no JSON grammar, no log-probabilities).
    fn for_session(
        spec: Option<shoal_engine::Speculation>,
        draft_model: Option<&Arc<shoal_engine::Model>>,
        session: &Session<'_>,
        vocab: usize,
    ) -> Option<Self> {
        let spec = spec?;
        let draft_model = draft_model.filter(|_| spec.draft_model);
        let plain = session.json.is_none()
            && session.logprobs.is_none()
            && !session.sampling.has_penalties();
        let guesses = spec.lookup.is_some() || draft_model.is_some();
        (plain && guesses && !session.ring.peers.is_empty()).then(|| Guesser {
            lookup: spec.lookup,
            drafter: draft_model
                .map(|m| Drafter::new(m.clone(), session.prompt, session.cache_prompt)),
            p_min: spec.p_min,
            vocab,
            draft_max: spec.draft_max.max(1),
            draft_min: spec.draft_min.max(1),
            draft_len: spec.draft_max.div_ceil(2).max(1),
            guessed_from: None,
        })
    }

    /// Guesses after `history`, at most `room` of them; empty when fewer than `draft_min`.
    /// The draft model runs off the runtime.
    async fn draft(&mut self, history: &[u32], room: usize) -> Result<Vec<u32>> {
        let max = self.draft_len.min(room);
        if max < self.draft_min {
            return Ok(Vec::new());
        }
        let mut draft = self
            .lookup
            .map(|l| l.draft(history, max))
            .unwrap_or_default();
        if draft.len() < self.draft_min {
            if let Some(mut drafter) = self.drafter.take() {
                let (history, p_min, vocab) = (history.to_vec(), self.p_min, self.vocab);
                let (drafter, guessed) = tokio::task::spawn_blocking(move || {
                    let guessed = drafter.draft(&history, max, p_min, vocab, &|| false);
                    (drafter, guessed)
                })
                .await?;
                self.drafter = Some(drafter);
                draft = guessed?;
            }
        }
        if draft.len() < self.draft_min {
            return Ok(Vec::new());
        }
        Ok(draft)
    }

    /// A verify at `start` kept `kept` of its `drafted` guesses.
    fn note(&mut self, drafted: usize, kept: usize, start: usize) {
        self.draft_len = if kept == drafted {
            (self.draft_len + 2).min(self.draft_max)
        } else {
            self.draft_len.saturating_sub(1).max(1)
        };
        self.guessed_from = Some(start + 1);
    }

    /// Drops the rows of `cache` from `start` on when they are guesses of the last verify
    /// (the next step starts at `start`).
    fn drop_unkept(&mut self, cache: &mut KvCache, start: usize) {
        if let Some(from) = self.guessed_from.take() {
            if start >= from && start < cache.len() {
                cache.truncate(start);
            }
        }
    }
}

/// Where the chunks of positions `start..end` end: at multiples of `chunk` (so a prompt
/// resumed mid-way is cut where a whole one is) and at `end`.
fn chunk_ends(start: usize, end: usize, chunk: usize) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = start;
    while at < end {
        at = ((at / chunk + 1) * chunk).min(end);
        ends.push(at);
    }
    ends
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends a session however `generate` stops, including when its future is dropped (a client
/// that went away): the reply route goes at once and the stages get `EndSession`.
struct SessionGuard {
    id: u64,
    router: Arc<Router>,
    peers: Arc<Vec<Peer>>,
    ended: bool,
}

impl SessionGuard {
    /// Ends the session as its caller chose: the reply route goes and the stages get `ends`
    /// (a plain end, or one that keeps the prompt).
    async fn end(mut self, ends: Vec<EndSession>) {
        self.router.unregister(self.id);
        end_sessions(self.peers.clone(), ends).await;
        self.ended = true;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.router.unregister(self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(end_sessions(
                self.peers.clone(),
                vec![EndSession::free(self.id)],
            ));
        }
    }
}

/// Tells every peer that sessions ended: drop their caches, or keep them (best effort).
/// Runs in its own task, so a caller that is cancelled never leaves half a frame on a link.
async fn end_sessions(peers: Arc<Vec<Peer>>, ends: Vec<EndSession>) {
    if peers.is_empty() || ends.is_empty() {
        return;
    }
    let task = tokio::spawn(async move {
        for peer in peers.iter() {
            let mut link = peer.link.lock().await;
            for end in &ends {
                let msg = Message::EndSession(*end);
                if let Err(e) = link.write_within(&msg, peer.write_deadline).await {
                    tracing::warn!(peer = %peer.addr, error = %e, "EndSession was not delivered");
                    break;
                }
            }
        }
    });
    if let Err(e) = task.await {
        tracing::warn!(error = %e, "EndSession task failed");
    }
}

/// Dials a peer, sends `LoadStage` and waits for `StageReady`; then the link's incoming
/// frames (errors for a session) go to the router.
async fn load_peer(
    addr: SocketAddr,
    config: &PipelineConfig,
    load: LoadStage,
    router: Arc<Router>,
) -> Result<(Link, String)> {
    let (mut conn, ack) =
        dial_with_ack(addr, &config.node_id, Capabilities::HEAD, &config.transport).await?;
    conn.write_frame(&Message::LoadStage(load)).await?;
    match conn.read_frame().await? {
        Some(Message::StageReady(_)) => {}
        Some(Message::Error(e)) => {
            return Err(PipelineError::Refused {
                peer: addr,
                message: e.message,
            })
        }
        Some(other) => {
            return Err(WireError::UnexpectedMessage {
                expected: "StageReady",
                got: other.name(),
            }
            .into())
        }
        None => {
            return Err(WireError::Closed {
                expected: "StageReady",
            }
            .into())
        }
    }
    let on_message = {
        let router = router.clone();
        let node_id = ack.node_id.clone();
        move |m| router.route(m, &node_id)
    };
    // A stage that vanishes answers no session: tell every waiting one now rather than
    // after the token timeout.
    let on_close = move || router.fail_all(&format!("lost the link to the stage at {addr}"));
    let idle_timeout = config.transport.link_idle_timeout(&ack);
    Ok((
        Link::new(conn, addr, idle_timeout, on_message, on_close),
        ack.node_id,
    ))
}

fn to_u32(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| PipelineError::InvalidRequest(format!("{v} does not fit in u32")))
}

/// An id unlikely to repeat across restarts of the head (plan ids, the first session id).
fn fresh_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}
