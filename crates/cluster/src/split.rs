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
    let mut next = 0;
    let mut seen = vec![false; nodes.len()];
    for (i, (node, range)) in stages.iter().enumerate() {
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
        if range.start != next {
            return bad(format!(
                "stage {i} starts at layer {} but layer {next} is next ({})",
                range.start,
                if range.start > next {
                    "a gap"
                } else {
                    "an overlap"
                }
            ));
        }
        if range.end <= range.start {
            return bad(format!("stage {i} has no layers"));
        }
        if range.end > l {
            return bad(format!(
                "stage {i} ends at layer {} but the model has {l} layers",
                range.end - 1
            ));
        }
        next = range.end;
    }
    if next != l {
        return bad(format!(
            "the split stops at layer {next} but the model has {l} layers (0..{l})"
        ));
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
