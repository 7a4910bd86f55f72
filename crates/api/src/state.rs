//! What every handler shares: the model (once loaded), the engine's admission
//! semaphore, the API key and the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use shoal_swarm::Swarm;

use crate::backend::Backend;
use crate::cluster::ClusterHandle;
use crate::error::ApiError;
use crate::limits::HttpLimits;
use crate::metrics::Metrics;

/// Most sessions one ring runs at once; more wait in line.
const RING_SESSIONS: usize = 4;

/// Seconds a client is told to wait while the node moves to another model.
const SWITCH_RETRY_AFTER_S: u64 = 5;

/// Where the model is in its life.
enum Load {
    Loading,
    Ready(Backend),
    /// The node serves pipeline stages on its peer port and holds no whole model.
    StageOnly,
    /// Not ready, for a reason that may pass (a ring waiting for members to join).
    Waiting(String),
    /// Moving to another model (`--model auto` as members join): back in seconds.
    Switching(String),
    Failed(String),
}

/// State shared by all handlers. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// The id of the model answering; it changes when the node moves to another model.
    model_id: RwLock<String>,
    /// Another id clients may send for whatever model answers (`auto`), if any.
    model_alias: std::sync::OnceLock<String>,
    api_key: Option<String>,
    limits: HttpLimits,
    load: RwLock<Load>,
    /// One permit: one generation on the engine at a time; the rest wait in line.
    engine: Arc<Semaphore>,
    /// Sessions a ring runs at once: stages key their caches by session and interleave
    /// them, so a ring serves several clients without queueing them all behind one.
    ring_sessions: Arc<Semaphore>,
    metrics: Metrics,
    registry: Registry,
    /// Swarm mode, when this node heads one.
    swarm: std::sync::OnceLock<Arc<Swarm>>,
    /// The cluster's members as this node sees them.
    cluster: std::sync::OnceLock<ClusterHandle>,
    /// The model's file, for what the Ollama API says of it (size, digest, time).
    model_file: RwLock<Option<std::path::PathBuf>>,
    /// Unix time of start-up, reported as the model's `created`.
    started: u64,
    next_id: AtomicU64,
}

impl AppState {
    /// `model_id` is the id `/v1/models` lists and clients send as `model`. With an
    /// `api_key`, every endpoint but `/health` wants `Authorization: Bearer <api_key>`.
    pub fn new(model_id: String, api_key: Option<String>) -> Self {
        Self::with_limits(model_id, api_key, HttpLimits::default())
    }

    /// [`AppState::new`] with these limits on what clients may ask.
    pub fn with_limits(model_id: String, api_key: Option<String>, limits: HttpLimits) -> Self {
        let (metrics, registry) = Metrics::new();
        Self {
            inner: Arc::new(Inner {
                model_id: RwLock::new(model_id),
                model_alias: std::sync::OnceLock::new(),
                api_key,
                limits,
                load: RwLock::new(Load::Loading),
                engine: Arc::new(Semaphore::new(1)),
                ring_sessions: Arc::new(Semaphore::new(RING_SESSIONS)),
                metrics,
                registry,
                swarm: std::sync::OnceLock::new(),
                cluster: std::sync::OnceLock::new(),
                model_file: RwLock::new(None),
                started: unix_now(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The model has loaded: requests are served from now on.
    pub fn set_ready(&self, backend: impl Into<Backend>) {
        *self.write_load() = Load::Ready(backend.into());
    }

    /// The node moves to another model: `backend`, known as `model_id`, answers from now
    /// on (requests that waited for the old one are refused, see [`AppState::is_current`]).
    pub fn set_ready_as(&self, backend: impl Into<Backend>, model_id: String) {
        let mut load = self.write_load();
        *self
            .inner
            .model_id
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = model_id;
        *load = Load::Ready(backend.into());
    }

    /// The model's file (set again when the node moves to another model).
    pub fn set_model_file(&self, path: std::path::PathBuf) {
        *self
            .inner
            .model_file
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(path);
    }

    pub(crate) fn model_file(&self) -> Option<std::path::PathBuf> {
        self.inner
            .model_file
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Clients may also send `alias` as the model (`auto`: whichever model the cluster
    /// chose); `/v1/models` lists it after the model's own id. Set once.
    pub fn set_model_alias(&self, alias: String) {
        let _ = self.inner.model_alias.set(alias);
    }

    /// The node is moving to another model (`message` says which): requests get a 503
    /// with `Retry-After` until [`AppState::set_ready_as`].
    pub fn set_switching(&self, message: String) {
        *self.write_load() = Load::Switching(message);
    }

    /// Waits until no ring session runs or waits, and keeps new ones out while the
    /// returned permits live: a node moves its ring to another model between requests.
    pub async fn drain_ring(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner
            .ring_sessions
            .clone()
            .acquire_many_owned(RING_SESSIONS as u32)
            .await
            .ok()
    }

    /// Whether `backend` still answers: a request that waited in line while the node moved
    /// to another model must not run on the old one.
    pub(crate) fn is_current(&self, backend: &Backend) -> bool {
        match &*self
            .inner
            .load
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Load::Ready(now) => now.same(backend),
            _ => false,
        }
    }

    /// This node heads a swarm: `"model": "swarm"` and the `/v1/swarm/*` routes use it.
    /// Set once; later calls are ignored.
    pub fn set_swarm(&self, swarm: Arc<Swarm>) {
        let _ = self.inner.swarm.set(swarm);
    }

    pub(crate) fn swarm(&self) -> Option<Arc<Swarm>> {
        self.inner.swarm.get().cloned()
    }

    /// The cluster's member list: `/v1/cluster` shows it. Set once; later calls are ignored.
    pub fn set_cluster(&self, cluster: ClusterHandle) {
        let _ = self.inner.cluster.set(cluster);
    }

    pub(crate) fn cluster(&self) -> Option<ClusterHandle> {
        self.inner.cluster.get().cloned()
    }

    /// The node holds no whole model and only serves pipeline stages: `/health` is ok,
    /// generation requests get a 503 that points to the head.
    pub fn set_stage_only(&self) {
        *self.write_load() = Load::StageOnly;
    }

    pub(crate) fn is_stage_only(&self) -> bool {
        matches!(
            *self
                .inner
                .load
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Load::StageOnly
        )
    }

    /// Not ready yet, for a reason that may pass (`message` says which): `/health` and
    /// every request say so, with a 503, until [`AppState::set_ready`].
    pub fn set_waiting(&self, message: String) {
        *self.write_load() = Load::Waiting(message);
    }

    /// The model could not load: `/health` and every request say why, with a 503.
    pub fn set_failed(&self, message: String) {
        *self.write_load() = Load::Failed(message);
    }

    fn write_load(&self) -> std::sync::RwLockWriteGuard<'_, Load> {
        // A writer that panicked left a whole `Load` behind; it is still valid.
        self.inner
            .load
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The loaded model, or the 503 to answer while there is none.
    pub(crate) fn model(&self) -> Result<Backend, ApiError> {
        let load = self
            .inner
            .load
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*load {
            Load::Ready(backend) => Ok(backend.clone()),
            Load::Loading => Err(ApiError::unavailable("the model is still loading")),
            Load::StageOnly => Err(ApiError::unavailable(
                "this node only serves pipeline stages (--stage-only); send requests to the \
                 pipeline's head",
            )),
            Load::Waiting(message) => {
                Err(ApiError::unavailable(format!("not ready yet: {message}")))
            }
            Load::Switching(message) => Err(ApiError::unavailable(format!(
                "{message}; try again in a few seconds"
            ))
            .retry_in(SWITCH_RETRY_AFTER_S)),
            Load::Failed(message) => Err(ApiError::unavailable(format!(
                "the model failed to load: {message}"
            ))),
        }
    }

    /// The id of the model answering now.
    pub(crate) fn model_id(&self) -> String {
        self.inner
            .model_id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The other id clients may send, if any (`auto`).
    pub(crate) fn model_alias(&self) -> Option<&str> {
        self.inner.model_alias.get().map(String::as_str)
    }

    /// Whether clients may name the model answering `model`.
    pub(crate) fn answers_to(&self, model: &str) -> bool {
        model == self.model_id() || self.model_alias() == Some(model)
    }

    /// What clients may ask.
    pub fn limits(&self) -> &HttpLimits {
        &self.inner.limits
    }

    pub(crate) fn api_key(&self) -> Option<&str> {
        self.inner.api_key.as_deref()
    }

    /// The queue a generation on `backend` waits in.
    pub(crate) fn admission(&self, backend: &Backend) -> &Arc<Semaphore> {
        match backend {
            Backend::Local(_) => &self.inner.engine,
            Backend::Ring(_) => &self.inner.ring_sessions,
        }
    }

    /// Where this node's pipeline stages count their batches (for `/metrics`): hand it to
    /// the stage server and the pipeline head this node runs.
    pub fn batch_stats(&self) -> shoal_pipeline::BatchStats {
        self.inner.metrics.batches.clone()
    }

    /// Where this node counts the bytes of weights it sends and receives (for `/metrics`):
    /// hand it to the stage server and the pipeline head this node runs.
    pub fn weight_stats(&self) -> shoal_pipeline::WeightStats {
        self.inner.metrics.weights.clone()
    }

    /// Requests being answered now, and the last answer's decode speed (tokens/s): what this
    /// node tells its cluster about its load.
    pub fn load_figures(&self) -> (u32, f32) {
        let metrics = &self.inner.metrics;
        let busy = u32::try_from(metrics.in_flight.get().max(0)).unwrap_or(u32::MAX);
        let speed = metrics.decode_tokens_per_second.get();
        (
            busy,
            if speed.is_finite() {
                speed.max(0.0) as f32
            } else {
                0.0
            },
        )
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn started(&self) -> u64 {
        self.inner.started
    }

    /// A fresh response id such as `chatcmpl-18a2f…`: unique within this process, and
    /// unlikely to repeat across restarts.
    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        format!("{prefix}-{nanos:x}{n:04x}")
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
