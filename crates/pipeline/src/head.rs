//! [`Pipeline`]: the head of a ring. It owns the first stage (embedding and the first layers)
//! and the session — prompt, generated tokens, sampling parameters and seed — and drives the
//! peers: `LoadStage` to each, then per step a `Forward` of hidden states to the first peer
//! and a wait for the `Token` the last stage sends to this head's reply listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_engine::candle_core::Device;
use shoal_engine::stage::logits_row;
use shoal_engine::{
    GgufFile, KvCache, Logits, ModelConfig, PromptFormat, Sampler, SamplingParams, Stage,
    StageInput, StageOutput, StageSpec, Tokenizer,
};
use shoal_wire::{
    serve_connections, server_handshake, Activations, Capabilities, Connection, DType, EndSession,
    Forward, HelloAck, Limits, LoadStage, Message, Payload, ServeConfig, Token, Want, WireError,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::convert::{file_sha256, sampling_spec, tensor_to_activations};
use crate::error::{PipelineError, Result};
use crate::link::{dial, Link};

/// One peer of the ring and the layers it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStage {
    /// The peer's wire address (its [`crate::StageServer`]).
    pub addr: SocketAddr,
    /// Layers `[start, end)` it runs; the last peer's range ends at the model's last layer.
    pub layers: Range<usize>,
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
    /// Encoding of hidden states between stages (f16 halves the bytes per hop).
    pub activation_dtype: DType,
    /// Prompt tokens per prefill `Forward`.
    pub prefill_chunk: usize,
    /// Address the reply listener binds (the `reply_to` of every `Forward`); must be one the
    /// last stage can reach, not `0.0.0.0`.
    pub reply_bind: SocketAddr,
    /// How long to wait for `StageReady` and for each token.
    pub timeout: Duration,
    /// Frame limits.
    pub limits: Limits,
}

impl PipelineConfig {
    /// Defaults: f16 activations, prefill chunks of 512 (the engine's), replies on
    /// `127.0.0.1:0`, a 2-minute timeout, SHA-256 checked.
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
            activation_dtype: DType::F16,
            prefill_chunk: shoal_engine::generate::PREFILL_CHUNK,
            reply_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            timeout: Duration::from_secs(120),
            limits: Limits::default(),
        }
    }
}

/// What the reply listener hands a waiting session.
enum Reply {
    Token(Token),
    Error(String),
}

/// Sessions waiting for replies, by id.
#[derive(Default)]
struct Router {
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
}

impl Router {
    fn deliver(&self, session_id: u64, reply: Reply) {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match sessions.get(&session_id) {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(session_id, "reply for a session that is gone"),
        }
    }

    fn route(&self, msg: Message) {
        match msg {
            Message::Token(t) => self.deliver(t.session_id, Reply::Token(t)),
            Message::Error(e) => match e.session_id {
                Some(id) => self.deliver(id, Reply::Error(e.message)),
                None => tracing::warn!(error = %e.message, "a stage reported an error"),
            },
            other => tracing::debug!(message = other.name(), "ignored a message on a reply link"),
        }
    }

    fn register(&self, session_id: u64) -> mpsc::UnboundedReceiver<Reply> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session_id, tx);
        rx
    }

    fn unregister(&self, session_id: u64) {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session_id);
    }
}

struct Peer {
    addr: SocketAddr,
    link: tokio::sync::Mutex<Link>,
}

/// The head of a ring of stages.
pub struct Pipeline {
    config: PipelineConfig,
    stage: Arc<Stage>,
    format: PromptFormat,
    peers: Arc<Vec<Peer>>,
    router: Arc<Router>,
    reply_addr: SocketAddr,
    listener: JoinHandle<()>,
    next_session: AtomicU64,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Pipeline {
    /// Loads the head's stage, opens the reply listener, and sets up every peer with
    /// `LoadStage` (each peer's `next` is the following peer; the last has none).
    pub async fn connect(config: PipelineConfig) -> Result<Pipeline> {
        let path = config.model_path.clone();
        let local = config.local_layers.clone();
        let verify = config.verify_sha256;
        let (stage, format, sha) = tokio::task::spawn_blocking(move || -> Result<_> {
            let file = GgufFile::open(&path)?;
            let format = PromptFormat::from_gguf(&file)?;
            let n = file.config().n_layers;
            if local.start != 0 || local.end > n {
                return Err(PipelineError::Config(format!(
                    "the head runs layers 0..k of the model's {n}, not {local:?}"
                )));
            }
            let stage = Stage::load(&file, StageSpec::range(local, n), &Device::Cpu, |_, _| {})?;
            let sha = if verify { file_sha256(&path)? } else { [0; 32] };
            Ok((stage, format, sha))
        })
        .await??;
        check_ring(&config, stage.config())?;

        let listener = TcpListener::bind(config.reply_bind)
            .await
            .map_err(WireError::from)?;
        let reply_addr = listener.local_addr().map_err(WireError::from)?;
        let router = Arc::new(Router::default());
        let listener = tokio::spawn(serve_replies(
            listener,
            config.node_id.clone(),
            config.limits,
            router.clone(),
        ));

        let plan_id = fresh_id();
        let n = stage.config().n_layers;
        let mut peers = Vec::with_capacity(config.peers.len());
        for (i, p) in config.peers.iter().enumerate() {
            let next = config.peers.get(i + 1).map(|q| q.addr);
            let load = LoadStage {
                plan_id,
                model_id: config.model_id.clone(),
                model_sha256: sha,
                layer_start: to_u32(p.layers.start)?,
                layer_end: to_u32(p.layers.end)?,
                embed: false,
                head: p.layers.end == n,
                activation_dtype: config.activation_dtype,
                max_context: to_u32(stage.config().context_length)?,
                next,
            };
            let link = tokio::time::timeout(
                config.timeout,
                load_peer(p.addr, &config, load, router.clone()),
            )
            .await
            .map_err(|_| PipelineError::Timeout {
                what: "StageReady",
                after: config.timeout,
            })??;
            peers.push(Peer {
                addr: p.addr,
                link: tokio::sync::Mutex::new(link),
            });
        }
        Ok(Pipeline {
            config,
            stage: Arc::new(stage),
            format,
            peers: Arc::new(peers),
            router,
            reply_addr,
            listener,
            // Stages key caches by session id, and several heads may share a stage: start
            // each head's ids somewhere else.
            next_session: AtomicU64::new(fresh_id() >> 1),
        })
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
        self.stage.config()
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
        if prompt.is_empty() {
            return Err(PipelineError::InvalidRequest("the prompt is empty".into()));
        }
        let limit = self.stage.config().context_length;
        if prompt.len() >= limit {
            return Err(PipelineError::InvalidRequest(format!(
                "the prompt has {} tokens and the context holds {limit}",
                prompt.len()
            )));
        }
        if max_tokens == 0 {
            return Ok(Vec::new());
        }
        let session_id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut rx = self.router.register(session_id);
        let mut guard = SessionGuard {
            id: session_id,
            router: self.router.clone(),
            peers: self.peers.clone(),
            ended: false,
        };
        let result = self
            .run_session(
                session_id,
                &mut rx,
                prompt,
                sampling,
                max_tokens,
                &mut on_token,
            )
            .await;
        self.router.unregister(session_id);
        end_session(self.peers.clone(), session_id).await;
        guard.ended = true;
        result
    }

    async fn run_session(
        &self,
        session_id: u64,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
        on_token: &mut (impl FnMut(u32) + Send),
    ) -> Result<Vec<u32>> {
        let limit = self.stage.config().context_length;
        let chunk = self.config.prefill_chunk.max(1);
        let mut cache = Some(self.stage.new_cache());
        let mut local_sampler = self
            .peers
            .is_empty()
            .then(|| Sampler::new(sampling.clone()));
        let mut history = prompt.to_vec();
        let mut generated = Vec::new();
        let mut pending = prompt.to_vec();
        let mut start = 0usize;
        let mut seq = 0u64;
        loop {
            let n_chunks = pending.len().div_ceil(chunk);
            let mut token = None;
            for (i, piece) in pending.chunks(chunk).enumerate() {
                let last = i + 1 == n_chunks;
                let first = start + i * chunk;
                let positions: Vec<u32> = (first..first + piece.len())
                    .map(to_u32)
                    .collect::<Result<_>>()?;
                let out = self
                    .run_local(&mut cache, piece.to_vec(), &positions)
                    .await?;
                match out {
                    LocalOut::Logits(mut logits) => {
                        if last {
                            if let Some(s) = local_sampler.as_mut() {
                                token = Some(s.sample(&mut logits, &history));
                            }
                        }
                    }
                    LocalOut::Hidden(a) => {
                        let want = if last {
                            Want::Token(sampling_spec(sampling, &history))
                        } else {
                            Want::Nothing
                        };
                        let msg = Message::Forward(Forward {
                            session_id,
                            seq,
                            positions,
                            payload: Payload::Hidden(a),
                            want,
                            reply_to: self.reply_addr,
                        });
                        self.send_first(msg).await?;
                        if last {
                            token = Some(self.wait_token(rx, seq).await?);
                        }
                        seq += 1;
                    }
                }
            }
            let token = token
                .ok_or_else(|| PipelineError::StageFailed("the ring produced no token".into()))?;
            history.push(token);
            generated.push(token);
            on_token(token);
            if self.format.tokenizer().is_eog(token)
                || generated.len() >= max_tokens
                || history.len() >= limit
            {
                return Ok(generated);
            }
            start = history.len() - 1;
            pending = vec![token];
        }
    }

    async fn run_local(
        &self,
        cache: &mut Option<KvCache>,
        tokens: Vec<u32>,
        positions: &[u32],
    ) -> Result<LocalOut> {
        let stage = self.stage.clone();
        let dtype = self.config.activation_dtype;
        let mut c = cache
            .take()
            .ok_or_else(|| PipelineError::Task("the session's cache was lost".into()))?;
        let positions: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let (c, out) = tokio::task::spawn_blocking(move || {
            let out = (|| -> Result<LocalOut> {
                match stage.forward(
                    StageInput::Tokens(&tokens),
                    &positions,
                    &mut c,
                    Logits::Last,
                )? {
                    StageOutput::Hidden(h) => {
                        Ok(LocalOut::Hidden(tensor_to_activations(&h, dtype)?))
                    }
                    StageOutput::Logits(l) => Ok(LocalOut::Logits(logits_row(&l, 0)?)),
                }
            })();
            (c, out)
        })
        .await?;
        *cache = Some(c);
        out
    }

    /// Sends to the first peer from a task of its own: `write_frame` is not cancel-safe, and a
    /// `generate` dropped mid-write must not leave half a frame on the link every session uses.
    async fn send_first(&self, msg: Message) -> Result<()> {
        if self.peers.is_empty() {
            return Err(PipelineError::Config("no peer to forward to".into()));
        }
        let peers = self.peers.clone();
        tokio::spawn(async move {
            let Some(peer) = peers.first() else {
                return Ok(());
            };
            let mut link = peer.link.lock().await;
            link.writer.write_frame(&msg).await
        })
        .await?
        .map_err(PipelineError::from)
    }

    async fn wait_token(&self, rx: &mut mpsc::UnboundedReceiver<Reply>, seq: u64) -> Result<u32> {
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
                Ok(Some(Reply::Token(t))) if t.seq == seq => return Ok(t.token_id),
                Ok(Some(Reply::Token(t))) => {
                    tracing::debug!(seq = t.seq, expected = seq, "stale token ignored");
                }
                Ok(Some(Reply::Error(m))) => return Err(PipelineError::StageFailed(m)),
            }
        }
    }
}

/// Ends a session however `generate` stops, including when its future is dropped (a client
/// that went away): the reply route goes at once and the stages get `EndSession`.
struct SessionGuard {
    id: u64,
    router: Arc<Router>,
    peers: Arc<Vec<Peer>>,
    ended: bool,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.router.unregister(self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(end_session(self.peers.clone(), self.id));
        }
    }
}

/// Tells every peer to drop the session's cache (best effort). Runs in its own task, so a
/// caller that is cancelled never leaves half a frame on a link.
async fn end_session(peers: Arc<Vec<Peer>>, session_id: u64) {
    if peers.is_empty() {
        return;
    }
    let task = tokio::spawn(async move {
        let msg = Message::EndSession(EndSession { session_id });
        for peer in peers.iter() {
            if let Err(e) = peer.link.lock().await.writer.write_frame(&msg).await {
                tracing::warn!(peer = %peer.addr, error = %e, "EndSession was not delivered");
            }
        }
    });
    if let Err(e) = task.await {
        tracing::warn!(error = %e, "EndSession task failed");
    }
}

enum LocalOut {
    Hidden(Activations),
    Logits(Vec<f32>),
}

/// Dials a peer, sends `LoadStage` and waits for `StageReady`; then the link's incoming
/// frames (errors for a session) go to the router.
async fn load_peer(
    addr: SocketAddr,
    config: &PipelineConfig,
    load: LoadStage,
    router: Arc<Router>,
) -> Result<Link> {
    let mut conn = dial(addr, &config.node_id, Capabilities::HEAD, config.limits).await?;
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
    Ok(Link::new(conn, addr, move |m| router.route(m)))
}

/// Accepts the last stage's connections and routes `Token`s and errors to their sessions.
async fn serve_replies(
    listener: TcpListener,
    node_id: String,
    limits: Limits,
    router: Arc<Router>,
) {
    let config = ServeConfig {
        limits,
        ..ServeConfig::default()
    };
    serve_connections(
        listener,
        config,
        move |mut conn: Connection, _peer| {
            let router = router.clone();
            let node_id = node_id.clone();
            async move {
                let accept = |_: &shoal_wire::Hello| {
                    Ok(HelloAck {
                        node_id,
                        software_version: env!("CARGO_PKG_VERSION").to_owned(),
                        capabilities: Capabilities::HEAD,
                    })
                };
                server_handshake(&mut conn, accept).await?;
                loop {
                    match conn.read_frame().await {
                        Ok(Some(msg)) => router.route(msg),
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(conn.fail(e).await),
                    }
                }
            }
        },
        std::future::pending(),
    )
    .await;
}

/// Checks that the head's layers and the peers' tile the model in order.
fn check_ring(config: &PipelineConfig, model: &ModelConfig) -> Result<()> {
    let n = model.n_layers;
    let mut end = config.local_layers.end;
    for p in &config.peers {
        if p.layers.start != end || p.layers.end <= p.layers.start {
            return Err(PipelineError::Config(format!(
                "peer {} runs layers {:?}, but the ring needs the next range to start at layer {end}",
                p.addr, p.layers
            )));
        }
        end = p.layers.end;
    }
    if end != n {
        return Err(PipelineError::Config(format!(
            "the ring covers layers 0..{end} of the model's {n}"
        )));
    }
    Ok(())
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
