//! What a node tells a planning head about itself (`GetProfile` → `Profile`), and the head's
//! side: asking a peer for its profile and timing the round trip to it.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_engine::candle_core::Device;
use shoal_engine::{GgufFile, Stage, StageSpec};
use shoal_wire::{
    Capabilities, ErrorCode, ErrorMessage, GetProfile, Message, Ping, Profile, Transport, WireError,
};

use crate::error::{PipelineError, Result};
use crate::link::dial;

/// Layers measured for a profile: enough to average over, few enough to load in a moment.
const MEASURED_LAYERS: usize = 4;

/// The layers a node without the model asks the head for, to measure itself on: those
/// [`measure_profile`] picks from a model of more than `MEASURED_LAYERS + 1` layers.
pub(crate) fn measured_stage() -> StageSpec {
    StageSpec {
        layers: 1..1 + MEASURED_LAYERS,
        embed: false,
        head: false,
    }
}

/// The model a planning head asks peers about.
#[derive(Clone, Debug)]
pub struct ProbedModel {
    /// The model file's name, as peers resolve it.
    pub id: String,
    /// The head's copy and its SHA-256, served to a peer without the model so it can
    /// measure itself; `None`: peers must have the model.
    pub weights: Option<(PathBuf, [u8; 32])>,
    /// Where the bytes of those layers are counted.
    pub weight_stats: crate::WeightStats,
}

/// Measures this node on the model at `path`: a few middle layers (no embedding or head, so
/// the figures are per layer), a 64-token prefill and 16 decode steps; and the memory it has
/// free. Blocking and CPU-bound (a second or two for small models).
pub fn measure_profile(path: &Path, node_id: &str) -> Result<Profile> {
    let file = GgufFile::open(path)?;
    let n = file.config().n_layers;
    let layers: Range<usize> = if n > MEASURED_LAYERS + 1 {
        1..1 + MEASURED_LAYERS
    } else {
        0..n
    };
    let stage = Stage::load(&file, StageSpec::range(layers, n), &Device::Cpu, |_, _| {})?;
    let timing = shoal_engine::profile::measure(&stage, 64, 16)?;
    Ok(Profile {
        node_id: node_id.to_owned(),
        free_memory_bytes: available_memory_bytes().unwrap_or(0),
        decode_ms_per_layer: timing.decode_ms_per_layer as f32,
        prefill_ms_per_layer_token: timing.prefill_ms_per_layer_token as f32,
    })
}

/// MemAvailable from /proc/meminfo, in bytes (`None` where there is no such file).
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A peer as a planning head sees it.
#[derive(Clone, Debug)]
pub struct PeerProfile {
    pub addr: SocketAddr,
    pub profile: Profile,
    /// The fastest of a few `Ping` round trips.
    pub rtt: Duration,
}

/// Dials `addr`, times three `Ping` round trips (keeping the fastest), and asks for the
/// peer's profile on `model`, sending it the layers it asks for to measure on when it lacks
/// the model. The whole exchange must finish within `timeout` (the peer measures itself,
/// which takes a moment the first time).
pub async fn probe_peer(
    addr: SocketAddr,
    node_id: &str,
    transport: &Transport,
    model: &ProbedModel,
    timeout: Duration,
) -> Result<PeerProfile> {
    let exchange = async {
        let mut conn = dial(addr, node_id, Capabilities::HEAD, transport).await?;
        let mut rtt = Duration::MAX;
        for nonce in 0..3u64 {
            let sent = Instant::now();
            conn.write_frame(&Message::Ping(Ping { nonce })).await?;
            match conn.read_frame().await? {
                Some(Message::Pong(p)) if p.nonce == nonce => rtt = rtt.min(sent.elapsed()),
                other => return Err(unexpected("Pong", other)),
            }
        }
        conn.write_frame(&Message::GetProfile(GetProfile {
            model_id: model.id.clone(),
            model_sha256: model.weights.as_ref().map_or([0; 32], |(_, sha)| *sha),
        }))
        .await?;
        loop {
            match conn.read_frame().await? {
                Some(Message::Profile(profile)) => return Ok(PeerProfile { addr, profile, rtt }),
                Some(Message::GetWeights(req)) => match &model.weights {
                    Some((path, sha)) if *sha == req.model_sha256 => {
                        let stats = &model.weight_stats;
                        crate::weights::send_weights(&mut conn, path.clone(), &req, stats).await?
                    }
                    _ => {
                        let e = ErrorMessage::new(
                            ErrorCode::MODEL_UNAVAILABLE,
                            None,
                            "this head sends only its own model's weights, by its SHA-256",
                        );
                        conn.write_frame(&Message::Error(e)).await?
                    }
                },
                Some(Message::Error(e)) => {
                    return Err(PipelineError::Refused {
                        peer: addr,
                        message: e.message,
                    })
                }
                other => return Err(unexpected("Profile", other)),
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PipelineError::Timeout {
            what: "Profile",
            after: timeout,
        })?
}

fn unexpected(expected: &'static str, got: Option<Message>) -> PipelineError {
    match got {
        Some(m) => WireError::UnexpectedMessage {
            expected,
            got: m.name(),
        }
        .into(),
        None => WireError::Closed { expected }.into(),
    }
}
