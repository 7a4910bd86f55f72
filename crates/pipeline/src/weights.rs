//! Weights over the LAN (design §5, issue #15 item 4): a node asked to run layers of a model
//! it does not have gets just those layers' share of the file — a stage file
//! ([`shoal_engine::StageFile`]) — from a member that has it, checks every region against the
//! SHA-256 the holder computed, and keeps it under `<models dir>/stages/` for next time.
//!
//! The holder is any member the head names in the `LoadStage`'s `weights_from`
//! ([`sources_for`]), asked in turn: the node before the stage in the ring first, then
//! the others backwards round the ring (the head among them: its reply listener serves
//! `GetWeights`), with members outside the ring said to hold the model just before the head
//! ([`with_holders`]). Any stage server that holds the model, or a kept stage file that covers
//! the layers asked for, serves them; one that does not says so and the next is asked. So
//! where several devices hold the model file, each sends the layers of the stage after it,
//! and the head's uplink is not the one source of every transfer. Kept stage files are
//! named by the model's SHA-256 and their layers, so a file of another version of the
//! model is never taken for this one. A transfer that no holder finishes leaves its whole
//! regions on disk with the manifest they came with, and the next fetch of the stage —
//! after a restart too — checks them again and asks for the rest only ([`Partial`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use shoal_engine::{GgufFile, StageFile, StageSpec};
use shoal_wire::{
    Capabilities, Connection, ErrorCode, ErrorMessage, GetWeights, LoadStage, Message, Transport,
    WeightsChunk, WeightsManifest, WeightsRegion, WeightsWant, WireError,
};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::error::{PipelineError, Result};
use crate::link::dial;
use crate::server::hex;

/// Where a models directory keeps stage files.
pub const STAGES_DIR: &str = "stages";

/// Bytes per `WeightsChunk`.
const CHUNK: usize = 4 << 20;

/// Longest wait for the manifest: the holder reads and hashes the whole share first (a
/// gigabyte takes seconds on a laptop, longer on a Raspberry Pi's SD card).
const MANIFEST_DEADLINE: Duration = Duration::from_secs(600);

/// Longest wait for the node's `WeightsWant` after the manifest: it first copies the regions
/// that stage files it kept hold (reading, hashing and writing them: up to a share's worth).
const WANT_DEADLINE: Duration = MANIFEST_DEADLINE;

/// Longest wait for each chunk once the transfer runs.
const CHUNK_DEADLINE: Duration = Duration::from_secs(60);

/// Most transfers one holder sends at once: each reads its share of the file from disk and
/// fills the link, and a node has only so much of both.
const MAX_SENDS: usize = 4;

/// Bytes of weights a node moved over the LAN, for its metrics: sent to members that lacked
/// them, received, and copied from a stage file it kept instead of being sent them. Cheap
/// to clone; clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct WeightStats(Arc<WeightCounters>);

#[derive(Debug, Default)]
struct WeightCounters {
    sent: AtomicU64,
    received: AtomicU64,
    reused: AtomicU64,
}

/// [`WeightStats`] as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightCounts {
    /// Bytes of stage files sent to members.
    pub sent: u64,
    /// Bytes of stage files received from members (a transfer cut short too).
    pub received: u64,
    /// Bytes of stage files fetched whole that were copied from a stage file kept here
    /// instead of being received.
    pub reused: u64,
}

impl WeightStats {
    /// The counts now.
    pub fn counts(&self) -> WeightCounts {
        WeightCounts {
            sent: self.0.sent.load(Ordering::Relaxed),
            received: self.0.received.load(Ordering::Relaxed),
            reused: self.0.reused.load(Ordering::Relaxed),
        }
    }
}

/// The weight transfers a holder (a stage server, a head's reply listener) sends: at most
/// [`MAX_SENDS`] at once, and one at a time to each node (a node fetches one stage at a
/// time; a second request from it waits for the first to end rather than doubling the
/// load). A turn lasts from the hashing of the share to its last byte, the wait for the
/// node's `WeightsWant` included ([`WANT_DEADLINE`] at most: the node only copies regions
/// then); a request that waits for a turn waits within its own [`MANIFEST_DEADLINE`].
pub(crate) struct Senders {
    all: Arc<Semaphore>,
    per_node: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A turn to send weights; the next waiting request goes when it is dropped.
pub(crate) struct Turn {
    _node: Option<OwnedSemaphorePermit>,
    _all: Option<OwnedSemaphorePermit>,
}

impl Senders {
    pub(crate) fn new() -> Self {
        Senders {
            all: Arc::new(Semaphore::new(MAX_SENDS)),
            per_node: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a turn to send weights to `node_id`.
    pub(crate) async fn turn(&self, node_id: &str) -> Turn {
        let node = {
            let mut per_node = self.per_node.lock().unwrap_or_else(PoisonError::into_inner);
            // Nodes nobody sends to or waits for are forgotten.
            per_node.retain(|_, s| Arc::strong_count(s) > 1);
            Arc::clone(
                per_node
                    .entry(node_id.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(1))),
            )
        };
        // The semaphores are never closed, so these always give a permit.
        let node = node.acquire_owned().await.ok();
        let all = Arc::clone(&self.all).acquire_owned().await.ok();
        Turn {
            _node: node,
            _all: all,
        }
    }
}

/// The `GetWeights` for the stage a `LoadStage` describes.
pub(crate) fn request_for(load: &LoadStage) -> GetWeights {
    GetWeights {
        model_id: load.model_id.clone(),
        model_sha256: load.model_sha256,
        layer_start: load.layer_start,
        layer_end: load.layer_end,
        embed: load.embed,
        head: load.head,
    }
}

/// The stage a `GetWeights` asks for.
fn spec_of(req: &GetWeights) -> StageSpec {
    StageSpec {
        layers: req.layer_start as usize..req.layer_end as usize,
        embed: req.embed,
        head: req.head,
    }
}

/// A kept stage file: the model it is a share of and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kept {
    sha_hex: String,
    layers: Range<usize>,
    embed: bool,
    head: bool,
}

impl Kept {
    fn of(sha: &[u8; 32], spec: &StageSpec) -> Kept {
        Kept {
            sha_hex: hex(sha),
            layers: spec.layers.clone(),
            embed: spec.embed,
            head: spec.head,
        }
    }

    /// `<sha256>.layers-<start>-<end>[.embed][.head].gguf`
    fn file_name(&self) -> String {
        format!(
            "{}.layers-{}-{}{}{}.gguf",
            self.sha_hex,
            self.layers.start,
            self.layers.end,
            if self.embed { ".embed" } else { "" },
            if self.head { ".head" } else { "" }
        )
    }

    fn parse(name: &str) -> Option<Kept> {
        let rest = name.strip_suffix(".gguf")?;
        let (sha_hex, rest) = rest.split_once(".layers-")?;
        if sha_hex.len() != 64 || !sha_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let (rest, head) = match rest.strip_suffix(".head") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (rest, embed) = match rest.strip_suffix(".embed") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (start, end) = rest.split_once('-')?;
        let kept = Kept {
            sha_hex: sha_hex.to_owned(),
            layers: start.parse().ok()?..end.parse().ok()?,
            embed,
            head,
        };
        (kept.file_name() == name).then_some(kept)
    }

    /// Holds every tensor `spec` needs.
    fn covers(&self, spec: &StageSpec) -> bool {
        self.layers.start <= spec.layers.start
            && spec.layers.end <= self.layers.end
            && (self.embed || !spec.embed)
            && (self.head || !spec.head)
    }
}

/// A kept stage file of the model with this SHA-256 that holds `spec`'s tensors (the
/// smallest such), if `models_dir` has one.
pub(crate) fn find_kept(models_dir: &Path, sha: &[u8; 32], spec: &StageSpec) -> Option<PathBuf> {
    let want = hex(sha);
    let entries = std::fs::read_dir(models_dir.join(STAGES_DIR)).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kept = Kept::parse(&name)?;
            (kept.sha_hex == want && kept.covers(spec)).then(|| (kept.layers.len(), e.path()))
        })
        .min()
        .map(|(_, path)| path)
}

/// Serves a `GetWeights` on `conn` from `model` (a model file or a stage file that holds the
/// share asked for; the caller has checked it is the very model asked for): the manifest,
/// then — once the node has said which regions it lacks (`WeightsWant`) — those regions'
/// bytes. A share the file cannot give is answered with an `Error`.
pub(crate) async fn send_weights(
    conn: &mut Connection,
    model: PathBuf,
    req: &GetWeights,
    stats: &WeightStats,
) -> std::result::Result<(), WireError> {
    let spec = spec_of(req);
    let planned = tokio::task::spawn_blocking(move || plan_and_hash(&model, &spec)).await;
    let (file, layout, manifest) = match planned {
        Ok(Ok(planned)) => planned,
        Ok(Err(e)) => {
            let error = ErrorMessage::new(ErrorCode::MODEL_UNAVAILABLE, None, e.to_string());
            return conn.write_frame(&Message::Error(error)).await;
        }
        Err(e) => {
            let error = ErrorMessage::new(ErrorCode::INTERNAL, None, e.to_string());
            return conn.write_frame(&Message::Error(error)).await;
        }
    };
    let regions = layout.regions();
    conn.write_frame(&Message::WeightsManifest(manifest))
        .await?;
    // The node copies what it holds before it answers: [`WANT_DEADLINE`] bounds that wait,
    // not the connection's idle timeout.
    let idle_timeout = conn.idle_timeout();
    conn.set_idle_timeout(None);
    let asked = tokio::time::timeout(WANT_DEADLINE, conn.read_frame()).await;
    conn.set_idle_timeout(idle_timeout);
    let want = match asked {
        Ok(Ok(Some(Message::WeightsWant(want)))) => want,
        // The node went away.
        Ok(Ok(None)) => return Ok(()),
        // The node gave up (its disk failed it): its reason goes to whoever reads ours.
        Ok(Ok(Some(Message::Error(e)))) => {
            return Err(WireError::Remote {
                code: e.code,
                message: e.message,
            })
        }
        Ok(Ok(Some(other))) => {
            return Err(WireError::UnexpectedMessage {
                expected: "WeightsWant",
                got: other.name(),
            })
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no WeightsWant after the manifest",
            )))
        }
    };
    if let Some(past) = want.regions.iter().find(|r| r.end as usize > regions.len()) {
        let error = ErrorMessage::new(
            ErrorCode::BAD_REQUEST,
            None,
            format!(
                "asked for regions {past:?} of a stage file of {} regions",
                regions.len()
            ),
        );
        return conn.write_frame(&Message::Error(error)).await;
    }
    // Each run of regions wanted is one run of bytes.
    let runs: Vec<Range<u64>> = want
        .regions
        .iter()
        .map(|r| regions[r.start as usize].start..regions[r.end as usize - 1].end)
        .collect();
    tracing::info!(
        layers = ?req.layer_start..req.layer_end,
        bytes = runs.iter().map(|r| r.end - r.start).sum::<u64>(),
        regions = want.count(),
        of = regions.len(),
        "sending a stage's weights"
    );
    // A reader thread stays two chunks ahead of the socket, no more.
    let (tx, mut rx) = mpsc::channel::<std::result::Result<Bytes, String>>(2);
    let reader = tokio::task::spawn_blocking(move || {
        for run in runs {
            let mut offset = run.start;
            while offset < run.end {
                let n = (CHUNK as u64).min(run.end - offset) as usize;
                let mut buf = vec![0u8; n];
                let read = layout
                    .read(&file, offset, &mut buf)
                    .map(|()| Bytes::from(buf))
                    .map_err(|e| e.to_string());
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
                offset += n as u64;
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Ok(data) => {
                let bytes = data.len() as u64;
                conn.write_frame(&Message::WeightsChunk(WeightsChunk { data }))
                    .await?;
                stats.0.sent.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                // Closing the connection tells the receiver at once that the transfer
                // ended short (it asks the next holder for the rest).
                tracing::warn!(error = %e, "reading a stage's weights failed");
                return Err(WireError::Io(std::io::Error::other(e)));
            }
        }
    }
    drop(rx);
    let _ = reader.await;
    Ok(())
}

/// Lays out the stage file of `spec` from `model` and hashes each of its regions.
fn plan_and_hash(
    model: &Path,
    spec: &StageSpec,
) -> Result<(Arc<GgufFile>, StageFile, WeightsManifest)> {
    let file = GgufFile::open(model)?;
    let n = file.config().n_layers;
    if spec.layers.end > n
        || spec.embed != (spec.layers.start == 0)
        || spec.head != (spec.layers.end == n)
    {
        return Err(PipelineError::Config(format!(
            "layers {:?} (embed {}, head {}) are not a stage of a model of {n} layers",
            spec.layers, spec.embed, spec.head
        )));
    }
    let layout = StageFile::plan(&file, spec)?;
    let mut regions = Vec::new();
    for region in layout.regions() {
        regions.push(WeightsRegion {
            len: region.end - region.start,
            sha256: read_region(&file, &layout, region, |_, _| Ok(()))?,
        });
    }
    let manifest = WeightsManifest {
        file_len: layout.len(),
        regions,
    };
    Ok((Arc::new(file), layout, manifest))
}

/// Gets the stage file `req` asks for from the holder at `from` into
/// `<models_dir>/stages/`, checking every region's SHA-256 as it arrives, asking only for
/// the regions `partial` and the stage files kept here do not hold (see [`fetch_over`]).
/// Stage files of the same model that the new one covers are removed (they would never be
/// chosen again).
/// Returns the stage file's path.
pub(crate) async fn fetch(
    from: SocketAddr,
    node_id: &str,
    transport: &Transport,
    req: GetWeights,
    models_dir: &Path,
    partial: &mut Partial,
    stats: &WeightStats,
) -> Result<PathBuf> {
    // The stage files kept here are hashed before the holder is dialled: it does not wait
    // on this node's disk (once per fetch, whichever holders are asked).
    if partial.kept_files.is_none() {
        let dir = models_dir.join(STAGES_DIR);
        let kept = Kept::of(&req.model_sha256, &spec_of(&req));
        let files = tokio::task::spawn_blocking(move || kept_regions(&dir, &kept))
            .await
            .map_err(|e| PipelineError::Task(e.to_string()))?;
        partial.kept_files = Some(Arc::new(files));
    }
    let mut conn = dial(from, node_id, Capabilities::STAGE, transport).await?;
    fetch_over(
        &mut conn,
        &from.to_string(),
        req,
        models_dir,
        partial,
        stats,
    )
    .await
}

/// Whom the stage at `index` of `peers` (the ring after the head, in order) asks for its
/// layers: the node before it first, then backwards round the ring — `head` (the head's
/// reply listener) in its place before the first stage — and never itself. At most
/// `MAX_WEIGHT_SOURCES`, the head always among them (it surely holds the model).
pub(crate) fn sources_for(index: usize, peers: &[SocketAddr], head: SocketAddr) -> Vec<SocketAddr> {
    // The ring as head, peers…; the stage is at `index + 1` of it.
    let ring: Vec<SocketAddr> = std::iter::once(head).chain(peers.iter().copied()).collect();
    let at = index + 1;
    let mut sources: Vec<SocketAddr> = (1..ring.len())
        .map(|back| ring[(at + ring.len() - back) % ring.len()])
        .filter(|&addr| addr != ring[at])
        .collect();
    sources.truncate(shoal_wire::MAX_WEIGHT_SOURCES);
    if !sources.contains(&head) {
        if let Some(last) = sources.last_mut() {
            *last = head;
        }
    }
    sources
}

/// `sources` (from [`sources_for`]) with `holders` — members outside the ring said to hold
/// the model file — asked just before `head`: a member that runs no stage has its uplink
/// free, the head's carries the ring. Never the stage itself (`stage`), never twice, at
/// most `MAX_WEIGHT_SOURCES` in all, the head always among them.
pub(crate) fn with_holders(
    sources: Vec<SocketAddr>,
    holders: &[SocketAddr],
    stage: SocketAddr,
    head: SocketAddr,
) -> Vec<SocketAddr> {
    let at = sources
        .iter()
        .position(|&s| s == head)
        .unwrap_or(sources.len());
    let mut all: Vec<SocketAddr> = sources[..at].to_vec();
    for &holder in holders {
        if holder != stage && !sources.contains(&holder) && !all.contains(&holder) {
            all.push(holder);
        }
    }
    all.extend_from_slice(&sources[at..]);
    if all.len() > shoal_wire::MAX_WEIGHT_SOURCES {
        all.retain(|&s| s != head);
        all.truncate(shoal_wire::MAX_WEIGHT_SOURCES - 1);
        all.push(head);
    }
    all
}

/// [`fetch`] from the first of `sources` that serves the share, in order: one that lacks
/// the model or cannot be reached costs a try, and the next is asked; one that fails
/// mid-transfer leaves the regions it sent whole and checked, and the next is asked for the
/// others only (if its file lays the share out otherwise — another manifest — for all of
/// them). The last one's error when none served it; the whole regions of a transfer that
/// did not end are kept for the next fetch of the stage ([`Partial`]).
pub(crate) async fn fetch_from_any(
    sources: &[SocketAddr],
    node_id: &str,
    transport: &Transport,
    req: GetWeights,
    models_dir: &Path,
    stats: &WeightStats,
) -> Result<PathBuf> {
    let mut last = None;
    let mut partial = Partial::locked(models_dir, &req).await?;
    // A fetch of the same stage that held the lock before this one may have got it.
    let done = stage_path(models_dir, &req);
    if tokio::fs::try_exists(&done).await.unwrap_or(false) {
        // Whatever an unfinished transfer of it left is of no use now.
        partial.clear();
        return Ok(done);
    }
    for &from in sources {
        match fetch(
            from,
            node_id,
            transport,
            req.clone(),
            models_dir,
            &mut partial,
            stats,
        )
        .await
        {
            Ok(path) => return Ok(path),
            Err(e) => {
                let layers = req.layer_start..req.layer_end;
                tracing::info!(%from, ?layers, "the layers are not to be had there: {e}");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| PipelineError::ModelUnavailable {
        model_id: req.model_id.clone(),
        reason: "no member was named to send its layers".into(),
    }))
}

/// What a node holds of a stage file whose transfer has not ended: the `.part` file, the
/// holder's manifest (also on disk beside it, `.part.manifest`), and which of its regions
/// are there whole, written at their place in the `.part` file and matched against their
/// hashes. The next holder is asked for the others. It holds the stage file's locks from
/// [`Partial::locked`] until it is dropped, so no other fetch of the same stage — in this
/// process, or in another node that shares the models directory — writes the file
/// meanwhile.
///
/// Regions held outlive the transfer: dropped before the transfer ends (every holder
/// failed, or the node was stopped), it leaves the `.part` file and its manifest, and the
/// next fetch of the stage — after a restart too — checks their regions again and asks for
/// the others only. What holds no whole region is deleted.
#[derive(Default)]
pub(crate) struct Partial {
    lock: Option<StageLock>,
    path: Option<PathBuf>,
    manifest: Option<WeightsManifest>,
    /// Per region of `manifest`: whole and checked in the `.part` file.
    held: Vec<bool>,
    /// Bytes of the regions copied from a kept stage file.
    reused: u64,
    /// The regions of the stage files kept here that the share may take (read once per
    /// fetch, before the first holder is asked: [`kept_regions`]).
    kept_files: Option<Arc<Vec<KeptFile>>>,
}

/// A stage file kept here, laid out and hashed as a holder would: its regions may be
/// copied into a new share instead of being sent.
struct KeptFile {
    file: Arc<GgufFile>,
    layout: StageFile,
    /// Each region: its bytes in the file, its length and SHA-256.
    regions: Vec<(Range<u64>, WeightsRegion)>,
}

/// The locks of one stage file's transfer: the process's (a tokio mutex, so a second fetch
/// waits without a thread) and the file system's (an OS lock on `<stage file>.lock`, for
/// nodes that share a models directory).
struct StageLock {
    _in_process: tokio::sync::OwnedMutexGuard<()>,
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Partial {
    /// The transfer of the stage file `req` asks for, holding its locks (one fetch of a
    /// stage file at a time: a head that timed out and sent its `LoadStage` again starts a
    /// second, and the second waits for the first to end), with the whole regions an
    /// earlier transfer left: each is hashed again against the manifest kept with it, and
    /// those that do not match are not held.
    pub(crate) async fn locked(models_dir: &Path, req: &GetWeights) -> Result<Partial> {
        let part = part_path(models_dir, req);
        let in_process = fetching(&part).lock_owned().await;
        tokio::fs::create_dir_all(models_dir.join(STAGES_DIR)).await?;
        let lock_at = lock_path(models_dir, req);
        let locking = lock_at.clone();
        let reading = part.clone();
        let (file, held) = tokio::task::spawn_blocking(move || {
            let file = lock_file(&locking)?;
            if file.is_none() {
                // The process's own lock still keeps this node's fetches apart.
                tracing::warn!(
                    path = %locking.display(),
                    "the file system has no locks: other nodes on this models directory \
                     may fetch the same stage at once"
                );
            }
            Ok::<_, std::io::Error>((file, held_regions(&reading)))
        })
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?
        .map_err(|e| PipelineError::Weights(format!("locking the stage file: {e}")))?;
        let mut partial = Partial::default();
        partial.lock = Some(StageLock {
            _in_process: in_process,
            file,
            path: lock_at,
        });
        partial.path = Some(part);
        match held {
            Some((manifest, held)) if held.contains(&true) => {
                partial.manifest = Some(manifest);
                partial.held = held;
                tracing::info!(
                    layers = ?req.layer_start..req.layer_end,
                    bytes = partial.held_bytes(),
                    "resuming a stage's weights from the regions an earlier transfer left"
                );
            }
            // Nothing whole there: whatever was is forgotten.
            _ => partial.clear(),
        }
        Ok(partial)
    }

    /// Bytes of the regions held.
    fn held_bytes(&self) -> u64 {
        self.manifest.as_ref().map_or(0, |m| {
            m.regions
                .iter()
                .zip(&self.held)
                .filter(|(_, &held)| held)
                .map(|(r, _)| r.len)
                .sum()
        })
    }

    /// Forgets what was received (another holder's bytes do not continue it).
    pub(crate) fn clear(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(manifest_path(&path));
            let _ = std::fs::remove_file(path);
        }
        self.manifest = None;
        self.held.clear();
        self.reused = 0;
    }

    /// The transfer ended: the `.part` file became the stage file.
    fn finished(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(manifest_path(&path));
        }
        self.manifest = None;
        self.held.clear();
        self.reused = 0;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.path.is_some() && self.held.contains(&true) {
            // Whole regions: kept for the next fetch of the stage, with the lock file (the
            // bytes between them are checked again before anything counts as held).
            return;
        }
        self.clear();
        if let Some(StageLock {
            file: Some(file),
            path,
            ..
        }) = &self.lock
        {
            // Removed while held; a node that waits for it finds the file gone once it
            // gets the lock, and takes a new one (see [`lock_file`]).
            let _ = std::fs::remove_file(path);
            let _ = file.unlock();
        }
    }
}

/// Opens `path` (made if missing) and takes its OS lock, waiting for another process's. A
/// file that is no longer at `path` once locked (its holder removed it, having finished)
/// is let go and the one there now taken instead. `None` where the file system has no such
/// locks (the file made for it is removed again).
fn lock_file(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    loop {
        let file = open_lock_file(path)?;
        if let Err(e) = file.lock() {
            if no_locks_here(&e) {
                let _ = std::fs::remove_file(path);
                return Ok(None);
            }
            return Err(e);
        }
        if still_at(path, &file) {
            return Ok(Some(file));
        }
    }
}

/// Opens the lock file at `path`, made if missing.
fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
}

/// Whether `file` is still the file at `path` (not removed, or replaced, since opened).
fn still_at(path: &Path, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(opened), Ok(there)) => opened.ino() == there.ino() && opened.dev() == there.dev(),
        _ => false,
    }
}

/// The file system has no `flock` (some network shares).
fn no_locks_here(e: &std::io::Error) -> bool {
    const ENOLCK: i32 = 37;
    e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error() == Some(ENOLCK)
}

/// The manifest kept beside the `.part` file at `part`, and which of its regions the part
/// holds whole and matching their hashes; `None` when there is no manifest (or it does not
/// read as one) or no `.part` file.
fn held_regions(part: &Path) -> Option<(WeightsManifest, Vec<bool>)> {
    let bytes = std::fs::read(manifest_path(part)).ok()?;
    let manifest = match shoal_wire::decode_frame(&bytes, &shoal_wire::Limits::default()) {
        Ok(Some((Message::WeightsManifest(m), _))) => m,
        _ => return None,
    };
    let file = std::fs::File::open(part).ok()?;
    let held = regions_in(file, &manifest);
    Some((manifest, held))
}

/// Which regions of `manifest` `file` holds at their place, whole and matching their
/// hashes.
fn regions_in(file: std::fs::File, manifest: &WeightsManifest) -> Vec<bool> {
    use std::io::Read;
    let mut file = std::io::BufReader::with_capacity(CHUNK, file);
    let mut held = Vec::with_capacity(manifest.regions.len());
    let mut buf = vec![0u8; CHUNK];
    'regions: for region in &manifest.regions {
        let mut hasher = Sha256::new();
        let mut left = region.len;
        while left > 0 {
            let n = (CHUNK as u64).min(left) as usize;
            if file.read_exact(&mut buf[..n]).is_err() {
                // The file ends here: no region from this one on is there.
                break 'regions;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        held.push(<[u8; 32]>::from(hasher.finalize()) == region.sha256);
    }
    held.resize(manifest.regions.len(), false);
    held
}

/// [`fetch`] over a connection already open to the holder (`holder` names it in errors):
/// a node without the model that a planning head asks for its profile gets the layers it
/// measures on from that head, on the head's own connection. Takes the regions `partial`
/// holds (when the holder's manifest is the one they came with; else they are forgotten)
/// and those a stage file of the same model kept here holds ([`copy_kept_regions`]: a share
/// that grew by a few layers keeps the tensors it had), and asks the holder for the others
/// only. A transfer that fails after some whole regions leaves them in `partial`; a local
/// file error, or a file that is not the stage asked for, clears it. The caller holds the
/// stage file's lock ([`Partial::locked`]).
pub(crate) async fn fetch_over(
    conn: &mut Connection,
    holder: &str,
    req: GetWeights,
    models_dir: &Path,
    partial: &mut Partial,
    stats: &WeightStats,
) -> Result<PathBuf> {
    let from = holder;
    let started = std::time::Instant::now();
    let spec = spec_of(&req);
    let kept = Kept::of(&req.model_sha256, &spec);
    let dir = models_dir.join(STAGES_DIR);
    tokio::fs::create_dir_all(&dir).await?;
    let (path, part) = (stage_path(models_dir, &req), part_path(models_dir, &req));
    if partial.path.as_ref().is_some_and(|p| *p != part) {
        partial.clear();
    }
    let unavailable = |reason: String| PipelineError::ModelUnavailable {
        model_id: req.model_id.clone(),
        reason,
    };
    // Hashed before the holder was dialled ([`fetch`]); none on a connection a head opened
    // to have this node measure itself (it waits for the answer, and the sample is small).
    let kept_files = partial.kept_files.clone().unwrap_or_default();
    conn.write_frame(&Message::GetWeights(req.clone())).await?;
    let manifest = match read_within(conn, MANIFEST_DEADLINE, "WeightsManifest").await? {
        Message::WeightsManifest(m) => m,
        Message::Error(e) => {
            return Err(unavailable(format!(
                "the holder at {from} cannot send it: {}",
                e.message
            )));
        }
        other => {
            return Err(WireError::UnexpectedMessage {
                expected: "WeightsManifest",
                got: other.name(),
            }
            .into())
        }
    };
    if partial.manifest.as_ref().is_some_and(|m| *m != manifest) {
        tracing::info!(
            %from,
            "this holder lays the share out otherwise than the one the regions held came \
             from: they are let go"
        );
        partial.clear();
    }
    partial.path = Some(part.clone());
    if partial.manifest.is_none() {
        // Kept beside the bytes, so that a fetch after this one (after a restart too) can
        // check what they hold and resume. A `.part` file of another manifest goes.
        let mut encoded = Vec::new();
        Message::WeightsManifest(manifest.clone())
            .encode_frame(&mut encoded, &shoal_wire::Limits::default())?;
        let _ = tokio::fs::remove_file(&part).await;
        if let Err(e) = tokio::fs::write(manifest_path(&part), &encoded).await {
            partial.clear();
            return Err(e.into());
        }
        partial.manifest = Some(manifest.clone());
        partial.held = vec![false; manifest.regions.len()];
    }
    let resumed = partial.held_bytes();
    let copied = {
        let (part, manifest) = (part.clone(), manifest.clone());
        let mut held = partial.held.clone();
        let (copied, held) = tokio::task::spawn_blocking(move || {
            let copied = copy_kept_regions(&kept_files, &part, &manifest, &mut held);
            (copied, held)
        })
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?;
        partial.held = held;
        partial.reused += copied;
        copied
    };
    let want = WeightsWant {
        regions: missing(&partial.held),
    };
    let asked: u64 = want
        .regions
        .iter()
        .flat_map(|r| r.start as usize..r.end as usize)
        .map(|i| manifest.regions[i].len)
        .sum();
    conn.write_frame(&Message::WeightsWant(want.clone()))
        .await?;
    let mut received = receive(conn, &manifest, &part, &mut partial.held, &want, stats).await;
    if let Err(PipelineError::Io(_)) = &received {
        // This node's disk failed it: nothing written can be trusted to be there.
        partial.clear();
    }
    if received.is_ok() {
        // The file as it lies on disk is checked once more, whole, against the manifest
        // (no write of an earlier, cancelled fetch may have landed in it), and is checked
        // to be the stage asked for.
        let (file, spec, manifest) = (part.clone(), spec.clone(), manifest.clone());
        received = tokio::task::spawn_blocking(move || {
            let held = regions_in(std::fs::File::open(&file)?, &manifest);
            if let Some(bad) = held.iter().position(|&h| !h) {
                return Err(PipelineError::Weights(format!(
                    "the stage file received does not match its manifest at region {bad}"
                )));
            }
            check_stage_file(&file, &spec)
        })
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))
        .and_then(|checked| checked);
        if received.is_err() {
            partial.clear();
        }
    }
    if let Err(e) = received {
        return Err(match e {
            PipelineError::Wire(WireError::Closed { .. }) => {
                unavailable(format!("the holder at {from} ended the transfer early"))
            }
            e => e,
        });
    }
    tokio::fs::rename(&part, &path).await?;
    stats.0.reused.fetch_add(partial.reused, Ordering::Relaxed);
    // Received whole: nothing left to resume, and the `.part` file is the stage file now.
    partial.finished();
    let _ = tokio::task::spawn_blocking(move || remove_covered(&dir, &kept)).await;
    tracing::info!(
        %from,
        layers = ?spec.layers,
        bytes = asked,
        held_before = resumed,
        copied_from_kept_files = copied,
        seconds = started.elapsed().as_secs_f64(),
        "received a stage's weights"
    );
    Ok(path)
}

/// Where each region of `manifest` starts in its file.
fn region_offsets(manifest: &WeightsManifest) -> Vec<u64> {
    let mut at = 0u64;
    manifest
        .regions
        .iter()
        .map(|r| {
            at += r.len;
            at - r.len
        })
        .collect()
}

/// The regions not `held`, as runs of indices.
fn missing(held: &[bool]) -> Vec<Range<u32>> {
    let mut runs: Vec<Range<u32>> = Vec::new();
    for (i, _) in held.iter().enumerate().filter(|(_, &h)| !h) {
        let i = i as u32;
        match runs.last_mut() {
            Some(run) if run.end == i => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// The stage files of the same model kept in `dir` that may share tensors with the share
/// `new` (layers in common, or both with an end's tensors: the embedding table, the output
/// norm, a tied head), each laid out and hashed as a holder would. A file that cannot be
/// read is passed over (the holder sends those regions).
fn kept_regions(dir: &Path, new: &Kept) -> Vec<KeptFile> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let Some(old) = entry.file_name().to_str().and_then(Kept::parse) else {
            continue;
        };
        let layers_meet = old.layers.start < new.layers.end && new.layers.start < old.layers.end;
        let ends_meet = (old.embed || old.head) && (new.embed || new.head);
        if old.sha_hex != new.sha_hex || old == *new || !(layers_meet || ends_meet) {
            continue;
        }
        let spec = StageSpec {
            layers: old.layers.clone(),
            embed: old.embed,
            head: old.head,
        };
        match plan_and_hash(&entry.path(), &spec) {
            Ok((file, layout, manifest)) => {
                let regions = layout.regions().into_iter().zip(manifest.regions).collect();
                files.push(KeptFile {
                    file,
                    layout,
                    regions,
                });
            }
            Err(e) => tracing::warn!(
                file = %entry.path().display(),
                "a kept stage file could not be read: {e}"
            ),
        }
    }
    files
}

/// Copies into the `.part` file at `part` the regions of `manifest` not `held` that a stage
/// file kept here holds (`kept`, from [`kept_regions`]) — a share that grew or moved by a
/// few layers (a member joined or left, and the ring was planned again) keeps the tensors
/// it had. A region of the same length and SHA-256 is copied, hashed again as it is
/// written, and held. Returns the bytes copied.
fn copy_kept_regions(
    kept: &[KeptFile],
    part: &Path,
    manifest: &WeightsManifest,
    held: &mut [bool],
) -> u64 {
    let mut wanted: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    for (i, region) in manifest.regions.iter().enumerate() {
        if !held[i] {
            wanted.entry(region.sha256).or_default().push(i);
        }
    }
    let offsets = region_offsets(manifest);
    let mut copied = 0u64;
    for file in kept {
        for (range, region) in &file.regions {
            let Some(indices) = wanted.get_mut(&region.sha256) else {
                continue;
            };
            indices.retain(|&i| {
                if manifest.regions[i].len != region.len {
                    return true;
                }
                match copy_region(&file.file, &file.layout, range.clone(), part, offsets[i]) {
                    Ok(sha) if sha == manifest.regions[i].sha256 => {
                        held[i] = true;
                        copied += region.len;
                        false
                    }
                    Ok(_) => {
                        tracing::warn!("a kept stage file changed on disk while it was copied");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "copying a region of a kept stage file failed");
                        true
                    }
                }
            });
            if indices.is_empty() {
                wanted.remove(&region.sha256);
            }
        }
    }
    copied
}

/// Copies the bytes `range` of the stage file `layout` lays out of `file` to `part` at
/// `to`, returning their SHA-256.
fn copy_region(
    file: &GgufFile,
    layout: &StageFile,
    range: Range<u64>,
    part: &Path,
    to: u64,
) -> Result<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)?;
    let start = range.start;
    read_region(file, layout, range, |at, bytes| {
        out.write_all_at(bytes, to + (at - start))
    })
}

/// Reads the bytes `range` of the stage file `layout` lays out of `file`, a chunk at a time
/// (never a whole tensor in memory), handing each to `each` with its offset in the stage
/// file; returns their SHA-256.
fn read_region(
    file: &GgufFile,
    layout: &StageFile,
    range: Range<u64>,
    mut each: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let n = (CHUNK as u64).min(range.end - at) as usize;
        buf.resize(n, 0);
        layout.read(file, at, &mut buf)?;
        hasher.update(&buf);
        each(at, &buf)?;
        at += n as u64;
    }
    Ok(hasher.finalize().into())
}

/// Where the stage file `req` asks for is kept once received.
fn stage_path(models_dir: &Path, req: &GetWeights) -> PathBuf {
    let kept = Kept::of(&req.model_sha256, &spec_of(req));
    models_dir.join(STAGES_DIR).join(kept.file_name())
}

/// Where the stage file `req` asks for is written while it arrives.
fn part_path(models_dir: &Path, req: &GetWeights) -> PathBuf {
    with_suffix(&stage_path(models_dir, req), ".part")
}

/// `path` with `suffix` after its whole name (`a.gguf` → `a.gguf.part`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut path = path.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// The manifest kept beside the `.part` file at `part`.
fn manifest_path(part: &Path) -> PathBuf {
    with_suffix(part, ".manifest")
}

/// The file whose OS lock a fetch of the stage file `req` asks for holds.
fn lock_path(models_dir: &Path, req: &GetWeights) -> PathBuf {
    with_suffix(&stage_path(models_dir, req), ".lock")
}

/// The lock of the stage file whose partial transfer is at `part`: two fetches of one
/// stage (a head that timed out and asked again) must not write one file at once.
fn fetching(part: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static FETCHING: Mutex<Vec<(PathBuf, std::sync::Weak<tokio::sync::Mutex<()>>)>> =
        Mutex::new(Vec::new());
    let mut all = FETCHING.lock().unwrap_or_else(PoisonError::into_inner);
    all.retain(|(_, lock)| lock.strong_count() > 0);
    if let Some(lock) = all
        .iter()
        .find(|(p, _)| p == part)
        .and_then(|(_, l)| l.upgrade())
    {
        return lock;
    }
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    all.push((part.to_path_buf(), Arc::downgrade(&lock)));
    lock
}

/// Reads the regions `want` names into `part`, each at its place, as the holder sends them
/// one after another, checking each as it completes and marking it `held` once its bytes
/// are written and flushed. A region whose bytes fail their hash is an error (the regions
/// before it are held).
async fn receive(
    conn: &mut Connection,
    manifest: &WeightsManifest,
    part: &Path,
    held: &mut [bool],
    want: &WeightsWant,
    stats: &WeightStats,
) -> Result<()> {
    // A file with regions held (resumed, or copied from a kept file) must still be there,
    // not made anew (it would read as zeros where they were).
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create(!held.contains(&true))
        .truncate(false)
        .open(part)
        .await?;
    if out.metadata().await?.len() > manifest.file_len {
        out.set_len(manifest.file_len).await?;
    }
    let received = receive_into(conn, manifest, &mut out, held, want, stats).await;
    if received.is_err() {
        // No write of this handle may land after the next holder's (tokio writes in the
        // background until a flush).
        let _ = out.flush().await;
    }
    received
}

/// [`receive`]'s loop.
async fn receive_into(
    conn: &mut Connection,
    manifest: &WeightsManifest,
    out: &mut tokio::fs::File,
    held: &mut [bool],
    want: &WeightsWant,
    stats: &WeightStats,
) -> Result<()> {
    let offsets = region_offsets(manifest);
    let wanted: Vec<usize> = want
        .regions
        .iter()
        .flat_map(|r| r.start as usize..r.end as usize)
        .collect();
    let total: u64 = wanted.iter().map(|&i| manifest.regions[i].len).sum();
    let mut next = 0;
    let mut left_in_region = wanted.first().map_or(0, |&i| manifest.regions[i].len);
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    // Where the file's cursor is: after the last byte written.
    let mut cursor = None;
    // Regions completed and checked, held once flushed.
    let mut completed = Vec::new();
    while got < total {
        let data = match read_within(conn, CHUNK_DEADLINE, "WeightsChunk").await? {
            Message::WeightsChunk(c) => c.data,
            Message::Error(e) => {
                return Err(PipelineError::Weights(format!(
                    "the holder stopped: {}",
                    e.message
                )))
            }
            other => {
                return Err(WireError::UnexpectedMessage {
                    expected: "WeightsChunk",
                    got: other.name(),
                }
                .into())
            }
        };
        if got + data.len() as u64 > total {
            return Err(PipelineError::Weights(format!(
                "the holder sent more than the {total} bytes of the regions asked for"
            )));
        }
        stats
            .0
            .received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            let index = wanted[next];
            let region = &manifest.regions[index];
            let place = offsets[index] + (region.len - left_in_region);
            let take = left_in_region.min(rest.len() as u64) as usize;
            if cursor != Some(place) {
                out.seek(std::io::SeekFrom::Start(place)).await?;
            }
            out.write_all(&rest[..take]).await?;
            cursor = Some(place + take as u64);
            hasher.update(&rest[..take]);
            rest = &rest[take..];
            got += take as u64;
            left_in_region -= take as u64;
            if left_in_region == 0 {
                let sha: [u8; 32] = std::mem::take(&mut hasher).finalize().into();
                if sha != region.sha256 {
                    out.flush().await?;
                    for i in completed.drain(..) {
                        held[i] = true;
                    }
                    return Err(PipelineError::Weights(format!(
                        "region {index} of the stage file does not match its SHA-256 \
                         (corrupted or altered on the way)"
                    )));
                }
                completed.push(index);
                next += 1;
                left_in_region = wanted.get(next).map_or(0, |&i| manifest.regions[i].len);
            }
        }
        if !completed.is_empty() {
            // Written for certain (tokio writes in the background until a flush) before
            // it counts as held.
            out.flush().await?;
            for i in completed.drain(..) {
                held[i] = true;
            }
        }
    }
    out.sync_all().await?;
    Ok(())
}

/// Whether the file at `path` is a GGUF file with every tensor `spec` loads.
fn check_stage_file(path: &Path, spec: &StageSpec) -> Result<()> {
    let file = GgufFile::open(path)
        .map_err(|e| PipelineError::Weights(format!("the stage file received: {e}")))?;
    let n = file.config().n_layers;
    if spec.layers.end > n {
        return Err(PipelineError::Weights(format!(
            "the stage file received is of a model of {n} layers, not of layers {:?}",
            spec.layers
        )));
    }
    // The ends' tensors by name; each layer by its first tensor (the rest are optional by
    // architecture, and loading names any that is missing).
    let missing = shoal_engine::Stage::tensor_names(&file, spec)
        .into_iter()
        .chain(
            spec.layers
                .clone()
                .map(|i| format!("blk.{i}.attn_norm.weight")),
        )
        .find(|name| !file.has_tensor(name));
    match missing {
        Some(name) => Err(PipelineError::Weights(format!(
            "the stage file received lacks {name}"
        ))),
        None => Ok(()),
    }
}

/// The next message, within `deadline`; a closed connection is an error.
async fn read_within(
    conn: &mut Connection,
    deadline: Duration,
    expected: &'static str,
) -> Result<Message> {
    match tokio::time::timeout(deadline, conn.read_frame()).await {
        Err(_) => Err(PipelineError::Timeout {
            what: expected,
            after: deadline,
        }),
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => Err(WireError::Closed { expected }.into()),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// How long the regions of an unfinished transfer are kept for a fetch of the same stage
/// to resume from, after its last byte arrived.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Removes the unfinished transfers in `dir` (a models directory's stages) whose last byte
/// arrived longer than `after` ago and that no fetch holds: a stage that is never asked for
/// again would otherwise keep its regions on disk for good. A stage server does this as it
/// starts.
pub(crate) fn remove_stale(dir: &Path, after: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(stage_name) = name.to_str().and_then(|n| n.strip_suffix(".part")) else {
            continue;
        };
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if Kept::parse(stage_name).is_some() && age.is_some_and(|age| age > after) {
            tracing::info!(
                file = stage_name,
                "removing an unfinished transfer left unused"
            );
            remove_unfinished(&dir.join(stage_name));
        }
    }
}

/// Removes what an unfinished transfer of the stage file at `stage` left (`.part`, its
/// manifest and its lock file), unless a fetch — of this process or another — holds its
/// locks now.
fn remove_unfinished(stage: &Path) {
    let part = with_suffix(stage, ".part");
    // This process's fetches first (on a file system whose locks are per process, the OS
    // lock below would not see them).
    let in_process = fetching(&part);
    let Ok(_fetching) = in_process.try_lock() else {
        return;
    };
    let lock = with_suffix(stage, ".lock");
    let Some(file) = try_lock_file(&lock) else {
        return;
    };
    // Removed while this holds the lock (a fetch that waits for it then finds its file
    // gone, as in [`lock_file`]).
    let _ = std::fs::remove_file(manifest_path(&part));
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(lock);
    drop(file);
}

/// [`lock_file`] without waiting: `None` when another holds the lock (or the file cannot
/// be had); the file unlocked where the file system has no locks.
fn try_lock_file(path: &Path) -> Option<std::fs::File> {
    let file = open_lock_file(path).ok()?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::Error(e)) if no_locks_here(&e) => return Some(file),
        Err(_) => return None,
    }
    still_at(path, &file).then_some(file)
}

/// Removes the kept stage files of the same model that `new` covers, and the regions kept
/// of their unfinished transfers (those no fetch holds the lock of).
fn remove_covered(dir: &Path, new: &Kept) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        // An unfinished transfer's files: `.part`, its manifest, its lock file (each may
        // be left alone, by a node stopped between removing one and the next).
        let unfinished_of = [".part", ".part.manifest", ".lock"]
            .into_iter()
            .find_map(|suffix| name.strip_suffix(suffix));
        let (stage_name, unfinished) = match unfinished_of {
            Some(stage_name) => (stage_name, true),
            None => (name, false),
        };
        let Some(old) = Kept::parse(stage_name) else {
            continue;
        };
        let spec = StageSpec {
            layers: old.layers.clone(),
            embed: old.embed,
            head: old.head,
        };
        if old.sha_hex != new.sha_hex || !new.covers(&spec) {
            continue;
        }
        if unfinished {
            remove_unfinished(&dir.join(stage_name));
        } else if old != *new {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// `f`'s output if it is ready at its first poll.
    fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn each_stage_asks_the_node_before_it_first_then_backwards_round_the_ring() {
        let addr = |port: u16| SocketAddr::from(([10, 0, 0, 1], port));
        let (head, peers) = (addr(1), [addr(2), addr(3), addr(4)]);
        assert_eq!(sources_for(0, &peers, head), [head, addr(4), addr(3)]);
        assert_eq!(sources_for(1, &peers, head), [addr(2), head, addr(4)]);
        assert_eq!(sources_for(2, &peers, head), [addr(3), addr(2), head]);
        // One peer: the head alone.
        assert_eq!(sources_for(0, &peers[..1], head), [head]);
        // A ring longer than the list: the nearest before the stage, and the head last.
        let long: Vec<SocketAddr> = (2..40).map(addr).collect();
        let sources = sources_for(30, &long, head);
        assert_eq!(sources.len(), shoal_wire::MAX_WEIGHT_SOURCES);
        assert_eq!(sources[..3], [addr(31), addr(30), addr(29)]);
        assert_eq!(sources.last(), Some(&head));
    }

    #[tokio::test]
    async fn one_transfer_per_node_and_a_few_in_all() {
        let senders = Senders::new();
        let first = senders.turn("pi").await;
        assert!(
            now_or_never(senders.turn("pi")).is_none(),
            "a second transfer to the same node waits"
        );
        drop(first);
        let again = now_or_never(senders.turn("pi"));
        assert!(again.is_some(), "its turn comes when the first ends");
        let mut others: Vec<Turn> = Vec::new();
        for node in ["a", "b", "c"] {
            others.push(now_or_never(senders.turn(node)).expect("room for four"));
        }
        assert!(
            now_or_never(senders.turn("d")).is_none(),
            "at most four at once"
        );
        others.pop();
        assert!(now_or_never(senders.turn("d")).is_some());
        // Nodes nobody sends to are not kept.
        drop((again, others));
        let _ = senders.turn("e").await;
        assert_eq!(senders.per_node.lock().unwrap().len(), 1);
    }

    fn spec(layers: Range<usize>, embed: bool, head: bool) -> StageSpec {
        StageSpec {
            layers,
            embed,
            head,
        }
    }

    #[test]
    fn holders_outside_the_ring_are_asked_just_before_the_head() {
        let a = |n: u8| SocketAddr::from(([10, 0, 0, n], 7471));
        let head = a(1);
        // Stage 3 of the ring head, 2, 3, 4 asks 2 (before it), the head, then 4.
        let sources = sources_for(1, &[a(2), a(3), a(4)], head);
        assert_eq!(sources, vec![a(2), head, a(4)]);
        assert_eq!(
            with_holders(sources, &[a(9), a(2), a(3), a(9), a(8)], a(3), head),
            vec![a(2), a(9), a(8), head, a(4)],
            "before the head; not itself, nor twice"
        );
        // The first stage asks the head first, so holders go before it.
        let first = sources_for(0, &[a(2)], head);
        assert_eq!(with_holders(first, &[a(9)], a(2), head), vec![a(9), head]);
        // Never more than the wire carries, and the head stays.
        let many: Vec<SocketAddr> = (20..60).map(a).collect();
        let all = with_holders(vec![head], &many, a(2), head);
        assert_eq!(all.len(), shoal_wire::MAX_WEIGHT_SOURCES);
        assert_eq!(all.last(), Some(&head));
        assert_eq!(all[0], a(20));
    }

    #[test]
    fn kept_file_names_round_trip_and_nothing_else_parses() {
        let sha = [0xAB; 32];
        for s in [
            spec(0..4, true, false),
            spec(4..9, false, false),
            spec(9..30, false, true),
            spec(0..30, true, true),
        ] {
            let kept = Kept::of(&sha, &s);
            assert_eq!(Kept::parse(&kept.file_name()), Some(kept));
        }
        let good = Kept::of(&sha, &spec(4..9, false, false)).file_name();
        for bad in [
            "model.gguf".to_owned(),
            format!("{good}.part"),
            good.replace("layers-4-9", "layers-04-9"),
            good.replace(&"ab".repeat(32), "ab"),
            good.replace(".gguf", ".head.embed.gguf"),
            good.replace("4-9", "4-x"),
        ] {
            assert_eq!(Kept::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn a_kept_file_covers_the_stages_whose_tensors_it_holds() {
        let kept = Kept::of(&[1; 32], &spec(0..10, true, false));
        assert!(kept.covers(&spec(0..10, true, false)));
        assert!(kept.covers(&spec(2..5, false, false)));
        assert!(!kept.covers(&spec(0..11, true, false)));
        let last = Kept::of(&[1; 32], &spec(20..30, false, true));
        assert!(last.covers(&spec(25..30, false, true)));
        assert!(!last.covers(&spec(19..30, false, true)));
        assert!(
            !Kept::of(&[1; 32], &spec(20..29, false, false)).covers(&spec(20..29, false, true))
        );
    }

    #[test]
    fn find_kept_chooses_the_smallest_file_of_the_same_model() {
        let dir = tempfile::tempdir().unwrap();
        let stages = dir.path().join(STAGES_DIR);
        std::fs::create_dir_all(&stages).unwrap();
        let (sha, other) = ([1; 32], [2; 32]);
        for (s, k) in [
            (sha, spec(0..30, true, true)),
            (sha, spec(5..12, false, false)),
            (other, spec(6..8, false, false)),
        ] {
            std::fs::write(stages.join(Kept::of(&s, &k).file_name()), b"x").unwrap();
        }
        let found = |s: &[u8; 32], k| find_kept(dir.path(), s, &k);
        assert_eq!(
            found(&sha, spec(6..8, false, false)),
            Some(stages.join(Kept::of(&sha, &spec(5..12, false, false)).file_name()))
        );
        assert_eq!(
            found(&sha, spec(20..30, false, true)),
            Some(stages.join(Kept::of(&sha, &spec(0..30, true, true)).file_name()))
        );
        assert_eq!(found(&[3; 32], spec(6..8, false, false)), None);

        remove_covered(&stages, &Kept::of(&sha, &spec(0..30, true, true)));
        assert_eq!(
            std::fs::read_dir(&stages).unwrap().count(),
            2,
            "the covered file of the same model went, the other model's stayed"
        );
    }

    #[test]
    fn unfinished_transfers_a_new_stage_file_covers_go_unless_a_fetch_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let stages = dir.path().join(STAGES_DIR);
        std::fs::create_dir_all(&stages).unwrap();
        let sha = [1; 32];
        let leave = |k: &StageSpec| {
            let name = Kept::of(&sha, k).file_name();
            for suffix in [".part", ".part.manifest", ".lock"] {
                std::fs::write(stages.join(format!("{name}{suffix}")), b"x").unwrap();
            }
            stages.join(format!("{name}.lock"))
        };
        leave(&spec(5..10, false, false));
        let held = lock_file(&leave(&spec(10..15, false, false)))
            .unwrap()
            .unwrap();
        leave(&spec(20..30, false, true));
        // A node stopped between removing the `.part` and the rest leaves those alone.
        let orphan = Kept::of(&sha, &spec(15..20, false, false)).file_name();
        std::fs::write(stages.join(format!("{orphan}.part.manifest")), b"x").unwrap();
        std::fs::write(stages.join(format!("{orphan}.lock")), b"").unwrap();
        remove_covered(&stages, &Kept::of(&sha, &spec(0..20, true, false)));
        let mut left: Vec<String> = std::fs::read_dir(&stages)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let names = |k: &StageSpec| {
            let name = Kept::of(&sha, k).file_name();
            [".lock", ".part", ".part.manifest"].map(|s| format!("{name}{s}"))
        };
        let mut expected = names(&spec(10..15, false, false)).to_vec();
        expected.extend(names(&spec(20..30, false, true)));
        assert_eq!(
            left, expected,
            "5..10 and 15..20 went; 10..15 is being fetched; 20..30 is not covered"
        );
        drop(held);
    }

    #[test]
    fn the_regions_held_are_those_whole_and_matching_at_their_place_in_the_part_file() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("stage.gguf.part");
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
        let manifest = WeightsManifest {
            file_len: 300,
            regions: (0..3)
                .map(|r| WeightsRegion {
                    len: 100,
                    sha256: Sha256::digest(&bytes[r * 100..(r + 1) * 100]).into(),
                })
                .collect(),
        };
        let mut frame = Vec::new();
        Message::WeightsManifest(manifest.clone())
            .encode_frame(&mut frame, &shoal_wire::Limits::default())
            .unwrap();
        let held = |part_bytes: &[u8]| {
            std::fs::write(&part, part_bytes).unwrap();
            held_regions(&part).map(|(m, n)| (m == manifest, n))
        };
        assert_eq!(held(&bytes), None, "no manifest beside it");
        std::fs::write(manifest_path(&part), &frame).unwrap();
        assert_eq!(held(&bytes), Some((true, vec![true; 3])));
        // A node killed mid-region leaves a region cut short.
        assert_eq!(held(&bytes[..250]), Some((true, vec![true, true, false])));
        let mut bad = bytes.clone();
        bad[150] ^= 1;
        assert_eq!(
            held(&bad),
            Some((true, vec![true, false, true])),
            "all but the region changed"
        );
        bad[3] ^= 1;
        assert_eq!(held(&bad), Some((true, vec![false, false, true])));
        // Regions written out of order, with a hole between them (zeros on disk).
        let mut holed = bytes.clone();
        holed[100..200].fill(0);
        assert_eq!(held(&holed), Some((true, vec![true, false, true])));
        assert_eq!(missing(&[true, false, true]), vec![1..2]);
        assert_eq!(missing(&[false, false, true, false]), vec![0..2, 3..4]);
        assert!(missing(&[true, true]).is_empty());
        std::fs::remove_file(&part).unwrap();
        assert_eq!(held_regions(&part).map(|(_, n)| n), None, "no .part");
        std::fs::write(manifest_path(&part), b"not a frame").unwrap();
        assert_eq!(held(&bytes), None, "a manifest that does not read");
    }

    #[test]
    fn unfinished_transfers_unused_for_long_are_removed_and_recent_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (old, recent) = (
            Kept::of(&[1; 32], &spec(0..10, true, false)).file_name(),
            Kept::of(&[1; 32], &spec(10..20, false, false)).file_name(),
        );
        for name in [&old, &recent] {
            for suffix in [".part", ".part.manifest", ".lock"] {
                std::fs::write(dir.path().join(format!("{name}{suffix}")), b"x").unwrap();
            }
        }
        let eight_days_ago = std::time::SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(format!("{old}.part")))
            .unwrap()
            .set_modified(eight_days_ago)
            .unwrap();
        remove_stale(dir.path(), STALE_AFTER);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let expected: Vec<String> = [".lock", ".part", ".part.manifest"]
            .iter()
            .map(|s| format!("{recent}{s}"))
            .collect();
        assert_eq!(left, expected);
    }

    #[test]
    fn a_lock_file_keeps_a_second_fetch_out_until_the_first_lets_go() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage.gguf.lock");
        let first = lock_file(&path).unwrap().unwrap();
        // Another open file (another process's, as far as the OS lock goes) cannot take it.
        let other = std::fs::File::open(&path).unwrap();
        assert!(other.try_lock().is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = path.clone();
        let second = std::thread::spawn(move || {
            let file = lock_file(&waiting).unwrap().unwrap();
            tx.send(()).unwrap();
            file
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "it waits"
        );
        // The first finishes: removes its lock file while holding it, then lets go. The
        // second takes the file at the path now (a new one), not the one removed.
        std::fs::remove_file(&path).unwrap();
        drop(first);
        let second = second.join().unwrap();
        assert_eq!(
            second.metadata().unwrap().ino(),
            std::fs::metadata(&path).unwrap().ino()
        );
        assert!(std::fs::File::open(&path).unwrap().try_lock().is_err());
        drop(second);
        assert!(std::fs::File::open(&path).unwrap().try_lock().is_ok());
    }
}
