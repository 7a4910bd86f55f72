//! Why no plan could be made, in words a person can act on.

use crate::explain::human_bytes;

/// Why the planner (or a forced split) gave no plan.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("no nodes to plan for")]
    NoNodes,

    #[error("bad model shape: {0}")]
    BadShape(String),

    #[error("bad profile for node {node} (`{id}`): {reason}")]
    BadProfile {
        node: usize,
        id: String,
        reason: String,
    },

    #[error("bad link costs: {0}")]
    BadLinks(String),

    #[error("node {spec:?}: {reason} (expected ID:FREE_GIB:DECODE_MS_PER_LAYER[:PREFILL_MS])")]
    BadNodeSpec { spec: String, reason: String },

    #[error(
        "not enough memory: the model needs at least {} and the nodes have {} free in all ({} missing)",
        human_bytes(*needed_bytes),
        human_bytes(*available_bytes),
        human_bytes(*missing_bytes)
    )]
    NotEnoughMemory {
        needed_bytes: u64,
        available_bytes: u64,
        missing_bytes: u64,
    },

    #[error(
        "the head (`{id}`) cannot run the first stage: it needs {} for the embedding and one layer, and has {} free",
        human_bytes(*needed_bytes),
        human_bytes(*free_bytes)
    )]
    HeadTooSmall {
        id: String,
        needed_bytes: u64,
        free_bytes: u64,
    },

    #[error(
        "the model does not fit: at most {placeable_layers} of its {n_layers} layers fit on these nodes (about {} more memory needed on the nodes, in whole layers)",
        human_bytes(*missing_bytes)
    )]
    DoesNotFit {
        placeable_layers: usize,
        n_layers: usize,
        missing_bytes: u64,
    },

    #[error("bad split: {0}")]
    BadSplit(String),

    #[error(
        "stage {stage} on node {node} (`{id}`) needs {} but the node has {} free",
        human_bytes(*needed_bytes),
        human_bytes(*free_bytes)
    )]
    OverMemory {
        stage: usize,
        node: usize,
        id: String,
        needed_bytes: u64,
        free_bytes: u64,
    },
}
