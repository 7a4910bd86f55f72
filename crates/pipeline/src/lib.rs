//! Pipeline mode (design §3, issue #4): a session's ring of stages.
//!
//! ```text
//! head: tokenize → Pipeline [embed, 0..k) ──Forward──► StageServer [k..m) ──► StageServer [m..L), sample
//!   ▲                                                                                 │
//!   └──────────────────────────── Token (to the head's reply listener) ◄──────────────┘
//! ```
//!
//! - [`StageServer`] serves stage work on a node's peer port: `LoadStage` → `StageReady`,
//!   `Forward` → run the stage on the session's KV cache and forward hidden states to the
//!   next stage, or (last stage) sample and send the `Token` to the head. `EndSession`,
//!   `Truncate`, and idle eviction look after the caches.
//! - [`Pipeline`] is the head: it runs the first stage itself, sets up the peers in order and
//!   generates, owning the session (prompt, tokens, sampling parameters, seed).
//!
//! Greedy output equals the single-process [`shoal_engine::Model`] run bit for bit when
//! activations travel as f32 and the prompt is prefilled in the same chunks (the engine's
//! numerics depend on the chunking, not on the split); with the default f16 the tests see the
//! same tokens for SmolLM2, but that is rounding luck, not a guarantee. Sampled output equals it
//! for the same seed because every token's draw is seeded by the session seed and the token's
//! position, on the last stage as in the single-process loop.
//!
//! **Recovery.** When a stage dies mid-session (its link closes, it reports an error, or no
//! token comes in time), the head probes the peers, spreads the layers over itself and the
//! ones that answer (each keeping its share of the old plan), and replays the session on the
//! new ring: the prompt in the same chunks, then every token generated so far one step at a
//! time, exactly as first fed. Every stage then computes what the lost ring had, so greedy
//! output goes on unchanged; so does a sampled session, since a token's random draw depends
//! only on the seed and its position (see [`shoal_engine::Sampler`]), not on which node
//! draws it.
//!
//! **Batching.** Several sessions share a ring at once; every stage (the head's own too) runs
//! the steps of different sessions that meet there as one pass (see `batch`), each session's
//! numbers unchanged.
//!
//! **Setting up a ring from a node** (`ring`): peers by address, a `--split` checked against
//! the model or the layers placed by the planner of `shoal-cluster` from the profiles the
//! peers report, and re-planning from fresh profiles after a loss ([`RingPlanner`]).
//!
//! Not yet: `Logits` replies (speculative verify), authentication.

mod batch;
mod convert;
mod error;
mod head;
mod idle;
mod link;
mod profile;
mod ring;
mod server;
mod weights;

pub use batch::{BatchCounts, BatchStats, DEFAULT_BATCH_ROWS};
pub use convert::{file_sha256, sampling_params, sampling_spec};
pub use error::{PipelineError, Result};
pub use head::{
    PeerStage, Pipeline, PipelineConfig, Replan, ReplanResult, RingAnswer, RingRequest,
    WeightHolders,
};
pub use profile::{available_memory_bytes, measure_profile, probe_peer, PeerProfile, ProbedModel};
pub use ring::{
    check_split, connect_ring, model_shape, plan_ring, resolve_addr, PlannedRing, RingPlanner,
    RingSettings, CONNECT_PATIENCE,
};
pub use server::{
    StageServer, StageServerConfig, WholeModel, DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_HEAD, DEFAULT_QUEUE_KIB,
};
pub use weights::{WeightCounts, WeightStats, STAGES_DIR};
