//! Forced splits (`--split 0-9,10-19,20-29`): read, check against the planner's
//! invariants, and cost.

use std::ops::Range;

use crate::error::PlanError;
use crate::planner::Ctx;
use crate::types::{LeftOut, LeftOutReason, ModelShape, NodeProfile, Plan, Search};

/// Reads a `--split` value: comma-separated inclusive layer ranges `a-b` (or a single
/// layer `a`), e.g. `0-9,10-19,20-29`. Returns half-open ranges (`0..10, 10..20, 20..30`).
/// Only the syntax is checked here; [`validate_split`] checks the ranges.
pub fn parse_split(text: &str) -> Result<Vec<Range<usize>>, PlanError> {
    let bad = |msg: String| PlanError::BadSplit(msg);
    let text = text.trim();
    if text.is_empty() {
        return Err(bad("empty split".into()));
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            let num = |s: &str| {
                s.trim().parse::<usize>().map_err(|_| {
                    bad(format!(
                        "`{part}` is not a layer range (expected `FIRST-LAST`, e.g. `0-9`)"
                    ))
                })
            };
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let a = num(part)?;
                    (a, a)
                }
            };
            if last < first {
                return Err(bad(format!("`{part}` ends before it starts")));
            }
            let end = last
                .checked_add(1)
                .ok_or_else(|| bad(format!("`{part}` is out of range")))?;
            Ok(first..end)
        })
        .collect()
}

/// How layer ranges, in ring order, fail to tile a model's layers `0..n_layers`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TilingError {
    #[error("stage {stage} has no layers")]
    Empty { stage: usize },
    #[error(
        "stage {stage} starts at layer {start} but layer {expected} is next ({})",
        if start > expected { "a gap" } else { "an overlap" }
    )]
    NotNext {
        stage: usize,
        start: usize,
        expected: usize,
    },
    #[error("stage {stage} ends at layer {} but the model has {n_layers} layers", end - 1)]
    PastEnd {
        stage: usize,
        end: usize,
        n_layers: usize,
    },
    #[error("the stages stop at layer {end} but the model has {n_layers} layers (0..{n_layers})")]
    Short { end: usize, n_layers: usize },
}

/// Checks that `ranges`, in ring order, tile layers `0..n_layers`: the first starts at 0,
/// each is non-empty and starts where the one before ended, and the last ends at the model's
/// last layer. The one check of a layout's layers, whoever made the layout (a `--split`,
/// the planner, a re-plan).
pub fn check_tiling<'a>(
    ranges: impl IntoIterator<Item = &'a Range<usize>>,
    n_layers: usize,
) -> Result<(), TilingError> {
    let mut next = 0;
    for (stage, range) in ranges.into_iter().enumerate() {
        if range.start != next {
            return Err(TilingError::NotNext {
                stage,
                start: range.start,
                expected: next,
            });
        }
        if range.end <= range.start {
            return Err(TilingError::Empty { stage });
        }
        if range.end > n_layers {
            return Err(TilingError::PastEnd {
                stage,
                end: range.end,
                n_layers,
            });
        }
        next = range.end;
    }
    if next != n_layers {
        return Err(TilingError::Short {
            end: next,
            n_layers,
        });
    }
    Ok(())
}

/// Checks a forced split where stage `i` runs `ranges[i]` on node `i`: the head
/// (node 0) owns the first range and the peers the following ranges, in the order the
/// nodes are given. Nodes past the last range are left out. Returns the plan with its
/// predicted costs, or the first broken invariant.
pub fn validate_split(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    ranges: &[Range<usize>],
) -> Result<Plan, PlanError> {
    if ranges.len() > nodes.len() {
        return Err(PlanError::BadSplit(format!(
            "{} ranges but only {} nodes",
            ranges.len(),
            nodes.len()
        )));
    }
    let stages: Vec<(usize, Range<usize>)> = ranges.iter().cloned().enumerate().collect();
    validate_stages(shape, nodes, links, &stages)
}

/// Checks a forced ring given as `(node, layers)` per stage, in ring order: the first
/// stage must be the head (node 0) from layer 0, ranges must be non-empty and
/// contiguous and end at the model's last layer, no node may appear twice, and no node
/// may be over its free memory. Returns the plan with its predicted costs.
pub fn validate_stages(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    stages: &[(usize, Range<usize>)],
) -> Result<Plan, PlanError> {
    let ctx = Ctx::new(shape, nodes, links)?;
    let bad = |msg: String| Err(PlanError::BadSplit(msg));
    let l = ctx.n_layers();
    let Some((first_node, _)) = stages.first() else {
        return bad("no stages".into());
    };
    if *first_node != 0 {
        return bad(format!(
            "the first stage must run on the head (node 0), not node {first_node}"
        ));
    }
    let mut seen = vec![false; nodes.len()];
    for (i, (node, _)) in stages.iter().enumerate() {
        let Some(was) = seen.get_mut(*node) else {
            return bad(format!(
                "stage {i} names node {node}, but there are only {} nodes",
                nodes.len()
            ));
        };
        if *was {
            return bad(format!("node {node} runs two stages"));
        }
        *was = true;
    }
    if let Err(e) = check_tiling(stages.iter().map(|(_, range)| range), l) {
        return bad(e.to_string());
    }

    let order: Vec<usize> = stages.iter().map(|(n, _)| *n).collect();
    let counts: Vec<usize> = stages.iter().map(|(_, r)| r.len()).collect();
    let k = order.len();
    for (i, (&node, &c)) in order.iter().zip(&counts).enumerate() {
        let needed = ctx.stage_bytes(c, i, k);
        let free = ctx.nodes()[node].free_memory_bytes;
        if needed > u128::from(free) {
            return Err(PlanError::OverMemory {
                stage: i,
                node,
                id: ctx.nodes()[node].id.clone(),
                needed_bytes: u64::try_from(needed).unwrap_or(u64::MAX),
                free_bytes: free,
            });
        }
    }
    let e = ctx.eval(&order, counts);
    let left_out = (1..nodes.len())
        .filter(|n| !order.contains(n))
        .map(|node| LeftOut {
            node,
            node_id: nodes[node].id.clone(),
            reason: LeftOutReason::NotInSplit,
        })
        .collect();
    Ok(ctx.build_plan(&e, None, Search::Forced, left_out))
}
