//! The planner's inputs and its answer.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// What a node measured about itself at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProfile {
    /// A name people recognise (host name, address); unique within a cluster.
    pub id: String,
    /// Memory the node can give to weights, embedding/head and KV cache.
    pub free_memory_bytes: u64,
    /// Measured decode time of one layer for one token, in milliseconds.
    pub decode_ms_per_layer: f64,
    /// Measured prefill time of one layer per prompt token, in milliseconds.
    pub prefill_ms_per_layer_token: f64,
}

impl std::str::FromStr for NodeProfile {
    type Err = crate::PlanError;

    /// A device described by hand (`shoal plan --node`):
    /// `ID:FREE_GIB:DECODE_MS_PER_LAYER[:PREFILL_MS_PER_LAYER_TOKEN]`; prefill defaults to an
    /// eighth of decode.
    fn from_str(spec: &str) -> Result<NodeProfile, crate::PlanError> {
        let bad = |reason: String| crate::PlanError::BadNodeSpec {
            spec: spec.to_owned(),
            reason,
        };
        let parts: Vec<&str> = spec.split(':').collect();
        if !(3..=4).contains(&parts.len()) {
            return Err(bad(format!("{} fields", parts.len())));
        }
        let num = |s: &str, what: &str| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| bad(format!("{what} {s:?} is not a number")))
        };
        let decode = num(parts[2], "decode ms per layer")?;
        Ok(NodeProfile {
            id: parts[0].to_string(),
            free_memory_bytes: (num(parts[1], "free GiB")? * (1u64 << 30) as f64) as u64,
            decode_ms_per_layer: decode,
            prefill_ms_per_layer_token: match parts.get(3) {
                Some(p) => num(p, "prefill ms")?,
                None => decode / 8.0,
            },
        })
    }
}

/// One-way hop costs of `n` nodes, `ms` between any two (0 from a node to itself): the
/// link matrix of a planner's input when nothing better is known.
pub fn uniform_links(n: usize, ms: f64) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| (0..n).map(|j| if i == j { 0.0 } else { ms }).collect())
        .collect()
}

/// The sizes that decide what fits where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Number of transformer layers (blocks).
    pub n_layers: usize,
    /// Weights of one layer, in bytes.
    pub layer_bytes: u64,
    /// Token embedding, held by the first stage (the head).
    pub embed_bytes: u64,
    /// Final norm and LM head, held by the last stage. With tied embeddings the last
    /// stage needs the embedding matrix as its LM head: count it here.
    pub head_bytes: u64,
    /// KV cache reserved per layer for the planned context, in bytes.
    pub kv_bytes_per_layer: u64,
}

impl ModelShape {
    /// Bytes one layer costs a stage: its weights plus its KV reserve.
    pub fn bytes_per_layer(&self) -> u64 {
        self.layer_bytes.saturating_add(self.kv_bytes_per_layer)
    }

    /// Bytes a stage of `layers` layers needs (`first`: it holds the embedding; `last`:
    /// it holds the final norm and LM head). Saturates at `u64::MAX`.
    pub fn stage_bytes(&self, layers: usize, first: bool, last: bool) -> u64 {
        u64::try_from(self.stage_bytes_wide(layers, first, last)).unwrap_or(u64::MAX)
    }

    pub(crate) fn stage_bytes_wide(&self, layers: usize, first: bool, last: bool) -> u128 {
        let mut bytes = layers as u128 * u128::from(self.bytes_per_layer());
        if first {
            bytes += u128::from(self.embed_bytes);
        }
        if last {
            bytes += u128::from(self.head_bytes);
        }
        bytes
    }
}

/// What the planner optimises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Objective {
    /// Lowest predicted time per token for one stream: the sum of stage times plus
    /// the hops around the ring.
    #[default]
    Latency,
    /// Highest throughput for many concurrent streams: the lowest slowest stage (its
    /// compute plus its outgoing hop); ties broken by latency.
    Throughput,
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Objective::Latency => "latency",
            Objective::Throughput => "throughput",
        })
    }
}

impl FromStr for Objective {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "latency" | "lat" | "one" | "single" => Ok(Objective::Latency),
            "throughput" | "tput" | "many" | "batch" => Ok(Objective::Throughput),
            other => Err(format!(
                "unknown objective `{other}` (expected `latency` or `throughput`)"
            )),
        }
    }
}

/// One stage of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    /// Index of the node in the profiles given to the planner (0 is the head).
    pub node: usize,
    /// The node's id, for people.
    pub node_id: String,
    /// The layers this stage runs, `start..end`.
    pub layers: Range<usize>,
    /// Bytes this stage needs: its layers with their KV reserve, plus the embedding
    /// (first stage) and the final norm + LM head (last stage).
    pub memory_bytes: u64,
    /// The node's free memory.
    pub free_memory_bytes: u64,
    /// Predicted decode compute per token, in ms.
    pub compute_ms: f64,
    /// The hop to the next stage (the last stage's hop returns to the head), in ms;
    /// zero for a one-stage plan.
    pub hop_ms: f64,
    /// Predicted prefill compute per prompt token, in ms.
    pub prefill_ms_per_token: f64,
}

impl StagePlan {
    /// Number of layers in this stage.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// This stage's time per token in a full pipeline: compute plus outgoing hop.
    pub fn stage_ms(&self) -> f64 {
        self.compute_ms + self.hop_ms
    }
}

/// The predicted cost of a ring.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// Time per token for one stream: `compute_ms + hop_ms`.
    pub decode_ms_per_token: f64,
    /// Sum of the stages' decode compute per token.
    pub compute_ms: f64,
    /// Sum of the hops around the ring, return to the head included.
    pub hop_ms: f64,
    /// The slowest stage (compute plus its outgoing hop): the time per token with
    /// many streams in flight.
    pub bottleneck_ms: f64,
    /// Number of stages.
    pub stages: usize,
}

/// Why a node is not in the plan.
#[derive(Clone, Debug, PartialEq)]
pub enum LeftOutReason {
    /// The node cannot hold a single layer with its KV reserve.
    NoMemory {
        /// The node's free memory.
        free_bytes: u64,
        /// What one layer with its KV reserve needs.
        needed_bytes: u64,
    },
    /// No valid plan can include the node (every stage needs at least one layer, and
    /// the memory limits of the others leave no ring with it).
    NoRoom,
    /// Plans with the node are predicted to be no better. `with` is the best plan that
    /// includes it (exact up to [`crate::PlanOptions::max_exact_nodes`] nodes, the best
    /// insertion or replacement beyond), `chosen` the plan returned.
    NotBetter {
        /// The best plan found that uses the node.
        with: Prediction,
        /// The plan returned.
        chosen: Prediction,
    },
    /// A forced split did not give the node a range.
    NotInSplit,
}

/// A node left out of the plan, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct LeftOut {
    /// Index of the node in the profiles.
    pub node: usize,
    /// The node's id.
    pub node_id: String,
    /// Why.
    pub reason: LeftOutReason,
}

/// How the plan was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// Every ring was tried: the plan is optimal for the model of costs.
    Exact {
        /// Usable peers (nodes other than the head that can hold a layer).
        peers: usize,
        /// Rings (ordered peer selections) tried.
        rings: u64,
    },
    /// Too many nodes for the exact search: shortlists searched exactly, then local
    /// search over every node. Valid, usually good, not proven optimal.
    Heuristic {
        /// Nodes in the cluster.
        nodes: usize,
        /// Rings evaluated in all.
        rings: u64,
    },
    /// A split given by the user, checked and costed.
    Forced,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// What was optimised; `None` for a forced split.
    pub objective: Option<Objective>,
    /// How the plan was found.
    pub search: Search,
    /// The model's layer count.
    pub n_layers: usize,
    /// Stages in ring order; the first runs on the head (node 0) from layer 0.
    pub stages: Vec<StagePlan>,
    /// Predicted time per token for one stream, in ms: compute plus hops.
    pub predicted_decode_ms_per_token: f64,
    /// Predicted tokens per second with many streams in flight (1000 / slowest stage).
    pub predicted_throughput_tokens_per_s: f64,
    /// The slowest stage's time per token (compute plus outgoing hop), in ms.
    pub predicted_bottleneck_ms: f64,
    /// Predicted prefill compute per prompt token, summed over the stages, in ms
    /// (chunked prefill overlaps stages, so this is an upper bound).
    pub predicted_prefill_ms_per_token: f64,
    /// Sum of the stages' decode compute per token, in ms.
    pub compute_ms: f64,
    /// Sum of the hops around the ring (return to the head included), in ms.
    pub hop_ms: f64,
    /// Nodes not in the plan, by index, with the reason.
    pub left_out: Vec<LeftOut>,
}

impl Plan {
    /// The plan's predicted costs.
    pub fn prediction(&self) -> Prediction {
        Prediction {
            decode_ms_per_token: self.predicted_decode_ms_per_token,
            compute_ms: self.compute_ms,
            hop_ms: self.hop_ms,
            bottleneck_ms: self.predicted_bottleneck_ms,
            stages: self.stages.len(),
        }
    }

    /// The layer ranges in ring order (the `--split` form of the plan).
    pub fn ranges(&self) -> Vec<Range<usize>> {
        self.stages.iter().map(|s| s.layers.clone()).collect()
    }

    /// The plan as a `--split` value: inclusive ranges, `0-9,10-19,20-29`.
    pub fn split_string(&self) -> String {
        self.stages
            .iter()
            .map(|s| format!("{}-{}", s.layers.start, s.layers.end.saturating_sub(1)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs_parse_and_bad_ones_are_explained() {
        let n: NodeProfile = "pi:2:1.5".parse().unwrap();
        assert_eq!(n.id, "pi");
        assert_eq!(n.free_memory_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(n.decode_ms_per_layer, 1.5);
        assert_eq!(n.prefill_ms_per_layer_token, 1.5 / 8.0);
        assert!("pi:2".parse::<NodeProfile>().is_err());
        let e = "pi:lots:1".parse::<NodeProfile>().unwrap_err().to_string();
        assert!(e.contains("free GiB"), "{e}");
        assert_eq!(uniform_links(2, 0.5), vec![vec![0.0, 0.5], vec![0.5, 0.0]]);
    }
}
