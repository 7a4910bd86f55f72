//! The search: which peers, in which order, and how many layers each (see the crate
//! documentation for the algorithm and its cost).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};

use crate::error::PlanError;
use crate::types::{
    LeftOut, LeftOutReason, ModelShape, NodeProfile, Objective, Plan, Prediction, Search, StagePlan,
};

/// Up to this many nodes (head included) the planner tries every ring.
pub const DEFAULT_MAX_EXACT_NODES: usize = 8;

/// Local search stops after this many improving moves (it normally stops far earlier,
/// when no neighbour is better).
const MAX_LOCAL_ROUNDS: usize = 10_000;

/// Knobs of the search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Clusters of at most this many nodes (head included) are planned exactly; larger
    /// ones by the heuristic. The exact search tries `Σ_j P!/(P−j)!` rings for
    /// `P = max_exact_nodes − 1` peers: 13,700 for 8 nodes, ~10⁶ for 10.
    pub max_exact_nodes: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            max_exact_nodes: DEFAULT_MAX_EXACT_NODES,
        }
    }
}

/// Plans the ring for `nodes` (node 0 is the head) with one-way link costs `links`
/// (`links[i][j]`: ms from node `i` to node `j`; the diagonal is ignored).
///
/// Every layer is placed exactly once, no node is over its free memory, and the plan
/// minimises the chosen [`Objective`] — exactly up to [`DEFAULT_MAX_EXACT_NODES`] nodes,
/// by a heuristic beyond (the plan's [`Search`] says which).
pub fn plan(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    objective: Objective,
) -> Result<Plan, PlanError> {
    plan_with_options(shape, nodes, links, objective, PlanOptions::default())
}

/// [`plan`] with explicit [`PlanOptions`].
pub fn plan_with_options(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    objective: Objective,
    options: PlanOptions,
) -> Result<Plan, PlanError> {
    let ctx = Ctx::new(shape, nodes, links)?;
    ctx.check_feasible()?;
    let usable = ctx.usable_peers();

    let (best, left_out, search) = if nodes.len() <= options.max_exact_nodes.max(1) {
        let mut ex = Exhaustive::new(&ctx, objective, true);
        ex.run(&usable);
        let best = ex.best.ok_or_else(|| ctx.does_not_fit())?;
        let left_out = ctx.left_out(&best, |node| ex.best_with[node].clone());
        let search = Search::Exact {
            peers: usable.len(),
            rings: ex.rings,
        };
        (best, left_out, search)
    } else {
        let mut rings = 0u64;
        let best = heuristic(
            &ctx,
            objective,
            &usable,
            options.max_exact_nodes,
            &mut rings,
        )
        .ok_or_else(|| ctx.does_not_fit())?;
        let left_out = ctx.left_out(&best, |node| {
            best_insertion(&ctx, objective, &best.order, node, &mut rings)
        });
        let search = Search::Heuristic {
            nodes: nodes.len(),
            rings,
        };
        (best, left_out, search)
    };
    Ok(ctx.build_plan(&best, Some(objective), search, left_out))
}

/// The largest number of layers each role leaves room for on one node.
#[derive(Clone, Copy, Debug)]
struct Caps {
    /// The only stage: embedding, layers, final norm and LM head.
    only: usize,
    /// The first of several stages: embedding and layers.
    first: usize,
    /// A middle stage: layers only.
    middle: usize,
    /// The last of several stages: layers, final norm and LM head.
    last: usize,
}

/// A ring with its split and predicted costs.
#[derive(Clone, Debug)]
pub(crate) struct Eval {
    pub(crate) order: Vec<usize>,
    pub(crate) counts: Vec<usize>,
    pub(crate) compute_ms: f64,
    pub(crate) hop_ms: f64,
    pub(crate) latency_ms: f64,
    pub(crate) bottleneck_ms: f64,
}

impl Eval {
    fn prediction(&self) -> Prediction {
        Prediction {
            decode_ms_per_token: self.latency_ms,
            compute_ms: self.compute_ms,
            hop_ms: self.hop_ms,
            bottleneck_ms: self.bottleneck_ms,
            stages: self.order.len(),
        }
    }
}

/// Validated inputs and what is derived from them once.
pub(crate) struct Ctx<'a> {
    shape: &'a ModelShape,
    nodes: &'a [NodeProfile],
    links: &'a [Vec<f64>],
    l: usize,
    caps: Vec<Caps>,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(
        shape: &'a ModelShape,
        nodes: &'a [NodeProfile],
        links: &'a [Vec<f64>],
    ) -> Result<Self, PlanError> {
        validate(shape, nodes, links)?;
        let l = shape.n_layers;
        let caps = nodes
            .iter()
            .map(|n| Caps {
                only: capacity(shape, n.free_memory_bytes, true, true),
                first: capacity(shape, n.free_memory_bytes, true, false),
                middle: capacity(shape, n.free_memory_bytes, false, false),
                last: capacity(shape, n.free_memory_bytes, false, true),
            })
            .collect();
        Ok(Self {
            shape,
            nodes,
            links,
            l,
            caps,
        })
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.l
    }

    pub(crate) fn nodes(&self) -> &[NodeProfile] {
        self.nodes
    }

    /// Peers (not the head) that can hold at least one layer somewhere in a ring.
    fn usable_peers(&self) -> Vec<usize> {
        (1..self.nodes.len())
            .filter(|&n| self.caps[n].middle >= 1)
            .collect()
    }

    /// Most layers node `node` can hold at position `pos` of a ring of `k` stages.
    fn cap_at(&self, node: usize, pos: usize, k: usize) -> usize {
        let c = &self.caps[node];
        if k == 1 {
            c.only
        } else if pos == 0 {
            c.first
        } else if pos + 1 == k {
            c.last
        } else {
            c.middle
        }
    }

    /// The outgoing hop of stage `i` (the last one returns to the head).
    pub(crate) fn hop(&self, order: &[usize], i: usize) -> f64 {
        let k = order.len();
        if k <= 1 {
            0.0
        } else {
            self.links[order[i]][order[(i + 1) % k]]
        }
    }

    /// Bytes a stage of `count` layers at position `pos` of a `k`-stage ring needs.
    pub(crate) fn stage_bytes(&self, count: usize, pos: usize, k: usize) -> u128 {
        self.shape.stage_bytes_wide(count, pos == 0, pos + 1 == k)
    }

    /// The most layers any ring can hold: the head alone, or the head as first stage
    /// plus every usable peer as a middle stage except one, which is the last.
    fn max_placeable(&self) -> usize {
        let mut best = self.caps[0].only;
        if self.l >= 2 && self.caps[0].first >= 1 {
            let usable = self.usable_peers();
            let middles = usable
                .iter()
                .fold(0usize, |a, &p| a.saturating_add(self.caps[p].middle));
            for &j in &usable {
                if self.caps[j].last >= 1 {
                    let total = self.caps[0]
                        .first
                        .saturating_add(middles.saturating_sub(self.caps[j].middle))
                        .saturating_add(self.caps[j].last);
                    best = best.max(total);
                }
            }
        }
        best
    }

    /// Ok when some ring holds the model (exact), else an error saying what is missing.
    fn check_feasible(&self) -> Result<(), PlanError> {
        if self.max_placeable() >= self.l {
            return Ok(());
        }
        Err(self.does_not_fit())
    }

    fn does_not_fit(&self) -> PlanError {
        let sat = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        let needed = self.shape.stage_bytes_wide(self.l, true, true);
        let available: u128 = self
            .nodes
            .iter()
            .map(|n| u128::from(n.free_memory_bytes))
            .sum();
        if available < needed {
            return PlanError::NotEnoughMemory {
                needed_bytes: sat(needed),
                available_bytes: sat(available),
                missing_bytes: sat(needed - available),
            };
        }
        let head = &self.nodes[0];
        let smallest_first = self.shape.stage_bytes_wide(1, true, self.l == 1);
        if u128::from(head.free_memory_bytes) < smallest_first {
            return PlanError::HeadTooSmall {
                id: head.id.clone(),
                needed_bytes: sat(smallest_first),
                free_bytes: head.free_memory_bytes,
            };
        }
        let placeable = self.max_placeable().min(self.l);
        let missing_layers = (self.l - placeable) as u128;
        PlanError::DoesNotFit {
            placeable_layers: placeable,
            n_layers: self.l,
            missing_bytes: sat(missing_layers * u128::from(self.shape.bytes_per_layer())),
        }
    }

    /// The best split of the layers over the ring `order` (which starts at the head),
    /// or `None` when the ring cannot hold the model.
    pub(crate) fn split(&self, order: &[usize], objective: Objective) -> Option<Eval> {
        let k = order.len();
        if k == 0 || k > self.l || order[0] != 0 {
            return None;
        }
        let mut caps = Vec::with_capacity(k);
        let mut total = 0usize;
        for (pos, &node) in order.iter().enumerate() {
            let c = self.cap_at(node, pos, k);
            if c == 0 {
                return None;
            }
            total = total.saturating_add(c);
            caps.push(c);
        }
        if total < self.l {
            return None;
        }
        let d: Vec<f64> = order
            .iter()
            .map(|&n| self.nodes[n].decode_ms_per_layer)
            .collect();
        let h: Vec<f64> = (0..k).map(|i| self.hop(order, i)).collect();
        let upper = match objective {
            Objective::Latency => caps,
            Objective::Throughput => {
                let t = min_bottleneck(&d, &h, &caps, self.l);
                (0..k)
                    .map(|i| most_within(t, d[i], h[i], caps[i]))
                    .collect()
            }
        };
        let counts = fill_fastest(&d, &upper, self.l)?;
        Some(self.eval(order, counts))
    }

    /// Predicted costs of `order` with `counts` layers per stage.
    pub(crate) fn eval(&self, order: &[usize], counts: Vec<usize>) -> Eval {
        let mut compute_ms = 0.0;
        let mut hop_ms = 0.0;
        let mut bottleneck_ms: f64 = 0.0;
        for (i, (&node, &c)) in order.iter().zip(&counts).enumerate() {
            let d = self.nodes[node].decode_ms_per_layer;
            let h = self.hop(order, i);
            compute_ms += c as f64 * d;
            hop_ms += h;
            bottleneck_ms = bottleneck_ms.max(stage_time(c, d, h));
        }
        Eval {
            order: order.to_vec(),
            counts,
            compute_ms,
            hop_ms,
            latency_ms: compute_ms + hop_ms,
            bottleneck_ms,
        }
    }

    /// A ring that holds the model whenever one exists: the head alone if it can, else
    /// the head, the roomiest peers as middles, and the last stage that needs fewest.
    fn fitting_ring(&self, usable: &[usize]) -> Option<Vec<usize>> {
        if self.caps[0].only >= self.l {
            return Some(vec![0]);
        }
        if self.l < 2 || self.caps[0].first == 0 {
            return None;
        }
        let mut roomiest = usable.to_vec();
        roomiest.sort_by(|&a, &b| {
            self.caps[b]
                .middle
                .cmp(&self.caps[a].middle)
                .then(a.cmp(&b))
        });
        let mut best: Option<Vec<usize>> = None;
        for &last in usable {
            if self.caps[last].last == 0 {
                continue;
            }
            let mut order = vec![0];
            let mut sum = self.caps[0].first.saturating_add(self.caps[last].last);
            for &m in &roomiest {
                if sum >= self.l {
                    break;
                }
                if m != last {
                    order.push(m);
                    sum = sum.saturating_add(self.caps[m].middle);
                }
            }
            if sum >= self.l {
                order.push(last);
                if best.as_ref().is_none_or(|b| order.len() < b.len()) {
                    best = Some(order);
                }
            }
        }
        best
    }

    /// Why each node outside `best` is left out; `with(node)` gives the best ring found
    /// that includes the node.
    fn left_out(&self, best: &Eval, mut with: impl FnMut(usize) -> Option<Eval>) -> Vec<LeftOut> {
        let in_ring: HashSet<usize> = best.order.iter().copied().collect();
        (1..self.nodes.len())
            .filter(|n| !in_ring.contains(n))
            .map(|node| {
                let reason = if self.caps[node].middle == 0 {
                    LeftOutReason::NoMemory {
                        free_bytes: self.nodes[node].free_memory_bytes,
                        needed_bytes: self.shape.bytes_per_layer(),
                    }
                } else {
                    match with(node) {
                        Some(e) => LeftOutReason::NotBetter {
                            with: e.prediction(),
                            chosen: best.prediction(),
                        },
                        None => LeftOutReason::NoRoom,
                    }
                };
                LeftOut {
                    node,
                    node_id: self.nodes[node].id.clone(),
                    reason,
                }
            })
            .collect()
    }

    pub(crate) fn build_plan(
        &self,
        e: &Eval,
        objective: Option<Objective>,
        search: Search,
        left_out: Vec<LeftOut>,
    ) -> Plan {
        let k = e.order.len();
        let mut start = 0;
        let mut prefill = 0.0;
        let stages = e
            .order
            .iter()
            .zip(&e.counts)
            .enumerate()
            .map(|(i, (&node, &c))| {
                let p = &self.nodes[node];
                let layers = start..start + c;
                start += c;
                let prefill_ms = c as f64 * p.prefill_ms_per_layer_token;
                prefill += prefill_ms;
                StagePlan {
                    node,
                    node_id: p.id.clone(),
                    layers,
                    memory_bytes: u64::try_from(self.stage_bytes(c, i, k)).unwrap_or(u64::MAX),
                    free_memory_bytes: p.free_memory_bytes,
                    compute_ms: c as f64 * p.decode_ms_per_layer,
                    hop_ms: self.hop(&e.order, i),
                    prefill_ms_per_token: prefill_ms,
                }
            })
            .collect();
        Plan {
            objective,
            search,
            n_layers: self.l,
            stages,
            predicted_decode_ms_per_token: e.latency_ms,
            predicted_throughput_tokens_per_s: tokens_per_s(e.bottleneck_ms),
            predicted_bottleneck_ms: e.bottleneck_ms,
            predicted_prefill_ms_per_token: prefill,
            compute_ms: e.compute_ms,
            hop_ms: e.hop_ms,
            left_out,
        }
    }
}

fn tokens_per_s(ms: f64) -> f64 {
    if ms > 0.0 {
        1000.0 / ms
    } else {
        f64::INFINITY
    }
}

/// Checks the inputs; every later step relies on what this guarantees.
pub(crate) fn validate(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
) -> Result<(), PlanError> {
    if nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    if shape.n_layers == 0 {
        return Err(PlanError::BadShape("the model has no layers".into()));
    }
    if shape.layer_bytes == 0 {
        return Err(PlanError::BadShape("layer_bytes is 0".into()));
    }
    for (i, n) in nodes.iter().enumerate() {
        let bad = |reason: String| PlanError::BadProfile {
            node: i,
            id: n.id.clone(),
            reason,
        };
        if n.id.trim().is_empty() {
            return Err(bad("empty id".into()));
        }
        if let Some(j) = nodes[..i].iter().position(|m| m.id == n.id) {
            return Err(bad(format!("same id as node {j}")));
        }
        if !(n.decode_ms_per_layer.is_finite() && n.decode_ms_per_layer > 0.0) {
            return Err(bad(format!(
                "decode_ms_per_layer must be a positive number of ms, got {}",
                n.decode_ms_per_layer
            )));
        }
        if !(n.prefill_ms_per_layer_token.is_finite() && n.prefill_ms_per_layer_token >= 0.0) {
            return Err(bad(format!(
                "prefill_ms_per_layer_token must be a number of ms ≥ 0, got {}",
                n.prefill_ms_per_layer_token
            )));
        }
    }
    let n = nodes.len();
    if links.len() != n {
        return Err(PlanError::BadLinks(format!(
            "expected a {n}×{n} matrix, got {} rows",
            links.len()
        )));
    }
    for (i, row) in links.iter().enumerate() {
        if row.len() != n {
            return Err(PlanError::BadLinks(format!(
                "expected a {n}×{n} matrix, row {i} has {} entries",
                row.len()
            )));
        }
        for (j, &ms) in row.iter().enumerate() {
            if i != j && !(ms.is_finite() && ms >= 0.0) {
                return Err(PlanError::BadLinks(format!(
                    "links[{i}][{j}] (`{}` → `{}`) must be a number of ms ≥ 0, got {ms}",
                    nodes[i].id, nodes[j].id
                )));
            }
        }
    }
    Ok(())
}

/// Most layers (at most the model's) that fit in `free` bytes next to the role's extras.
fn capacity(shape: &ModelShape, free: u64, first: bool, last: bool) -> usize {
    let extras = shape.stage_bytes_wide(0, first, last);
    let free = u128::from(free);
    if free < extras {
        return 0;
    }
    // layer_bytes > 0 is checked by `validate`.
    let per = u128::from(shape.bytes_per_layer()).max(1);
    usize::try_from((free - extras) / per)
        .unwrap_or(usize::MAX)
        .min(shape.n_layers)
}

/// A stage's time per token: compute plus outgoing hop. Every comparison of stage
/// times goes through this one expression so that equal inputs give equal floats.
pub(crate) fn stage_time(count: usize, d: f64, h: f64) -> f64 {
    count as f64 * d + h
}

/// One compulsory layer per stage, the rest to the fastest stages first, each up to
/// `upper`. Minimises `Σ c_i d_i`; `None` if the bounds cannot hold `l` layers.
fn fill_fastest(d: &[f64], upper: &[usize], l: usize) -> Option<Vec<usize>> {
    let k = d.len();
    let mut counts = vec![1usize; k];
    let mut rest = l.checked_sub(k)?;
    let mut by_speed: Vec<usize> = (0..k).collect();
    by_speed.sort_by(|&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
    for i in by_speed {
        let add = rest.min(upper[i].saturating_sub(1));
        counts[i] += add;
        rest -= add;
    }
    (rest == 0).then_some(counts)
}

/// The smallest possible slowest stage: hand out the free layers one at a time to the
/// stage whose time after taking it is smallest (a min-heap of each stage's next time;
/// `O(L log k)`).
fn min_bottleneck(d: &[f64], h: &[f64], caps: &[usize], l: usize) -> f64 {
    let k = d.len();
    let mut counts = vec![1usize; k];
    let mut heap: BinaryHeap<NextSlot> = (0..k)
        .filter(|&i| caps[i] > 1)
        .map(|i| NextSlot(stage_time(2, d[i], h[i]), i))
        .collect();
    for _ in k..l {
        let Some(NextSlot(_, i)) = heap.pop() else {
            break;
        };
        counts[i] += 1;
        if counts[i] < caps[i] {
            heap.push(NextSlot(stage_time(counts[i] + 1, d[i], h[i]), i));
        }
    }
    (0..k)
        .map(|i| stage_time(counts[i], d[i], h[i]))
        .fold(0.0, f64::max)
}

/// A stage's time after one more layer; ordered so that [`BinaryHeap`] pops the
/// smallest time first (then the lowest stage index).
struct NextSlot(f64, usize);

impl PartialEq for NextSlot {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for NextSlot {}

impl PartialOrd for NextSlot {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NextSlot {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(other.1.cmp(&self.1))
    }
}

/// The most layers (1..=cap) a stage can take while its time stays within `t`.
fn most_within(t: f64, d: f64, h: f64, cap: usize) -> usize {
    let estimate = ((t - h) / d).floor();
    let mut c = if estimate.is_finite() && estimate >= 1.0 {
        (estimate as usize).min(cap)
    } else {
        1
    };
    while c < cap && stage_time(c + 1, d, h) <= t {
        c += 1;
    }
    while c > 1 && stage_time(c, d, h) > t {
        c -= 1;
    }
    c
}

fn approx_eq(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn cmp_ms(a: f64, b: f64) -> Ordering {
    if approx_eq(a, b) {
        Ordering::Equal
    } else {
        a.total_cmp(&b)
    }
}

/// Which ring is better for `objective` (`Less`: `a` is better).
pub(crate) fn compare(objective: Objective, a: &Eval, b: &Eval) -> Ordering {
    let stages = a.order.len().cmp(&b.order.len());
    match objective {
        Objective::Latency => cmp_ms(a.latency_ms, b.latency_ms)
            .then(stages)
            .then(cmp_ms(a.bottleneck_ms, b.bottleneck_ms)),
        Objective::Throughput => cmp_ms(a.bottleneck_ms, b.bottleneck_ms)
            .then(cmp_ms(a.latency_ms, b.latency_ms))
            .then(stages),
    }
}

fn keep_better(objective: Objective, best: &mut Option<Eval>, candidate: Option<Eval>) {
    if let Some(c) = candidate {
        if best
            .as_ref()
            .is_none_or(|b| compare(objective, &c, b) == Ordering::Less)
        {
            *best = Some(c);
        }
    }
}

/// Every ring over a set of peers: all subsets, all orders, the head first.
struct Exhaustive<'c, 'a> {
    ctx: &'c Ctx<'a>,
    objective: Objective,
    best: Option<Eval>,
    /// Per node, the best ring that includes it (when `track`).
    best_with: Vec<Option<Eval>>,
    track: bool,
    rings: u64,
}

impl<'c, 'a> Exhaustive<'c, 'a> {
    fn new(ctx: &'c Ctx<'a>, objective: Objective, track: bool) -> Self {
        Self {
            ctx,
            objective,
            best: None,
            best_with: vec![None; ctx.nodes.len()],
            track,
            rings: 0,
        }
    }

    fn run(&mut self, peers: &[usize]) {
        let mut order = vec![0];
        let mut used = vec![false; self.ctx.nodes.len()];
        self.extend(peers, &mut order, &mut used);
    }

    fn extend(&mut self, peers: &[usize], order: &mut Vec<usize>, used: &mut [bool]) {
        self.rings += 1;
        if let Some(e) = self.ctx.split(order, self.objective) {
            self.offer(e);
        }
        if order.len() >= self.ctx.l {
            return;
        }
        for &p in peers {
            if !used[p] {
                used[p] = true;
                order.push(p);
                self.extend(peers, order, used);
                order.pop();
                used[p] = false;
            }
        }
    }

    fn offer(&mut self, e: Eval) {
        if self.track {
            for &n in &e.order[1..] {
                let slot = &mut self.best_with[n];
                if slot
                    .as_ref()
                    .is_none_or(|b| compare(self.objective, &e, b) == Ordering::Less)
                {
                    *slot = Some(e.clone());
                }
            }
        }
        keep_better(self.objective, &mut self.best, Some(e));
    }
}

/// More nodes than the exact search takes: exact searches over shortlists, a ring that
/// surely fits, then local search over every node from the best of those.
fn heuristic(
    ctx: &Ctx<'_>,
    objective: Objective,
    usable: &[usize],
    max_exact_nodes: usize,
    rings: &mut u64,
) -> Option<Eval> {
    let take = max_exact_nodes.saturating_sub(1).min(usable.len());
    let d = |n: usize| ctx.nodes[n].decode_ms_per_layer;
    let rtt = |n: usize| ctx.links[0][n] + ctx.links[n][0];

    let mut fastest = usable.to_vec();
    fastest.sort_by(|&a, &b| d(a).total_cmp(&d(b)).then(a.cmp(&b)));
    let mut closest = usable.to_vec();
    closest.sort_by(|&a, &b| rtt(a).total_cmp(&rtt(b)).then(a.cmp(&b)));
    let mut roomiest = usable.to_vec();
    roomiest.sort_by(|&a, &b| {
        ctx.caps[b]
            .middle
            .cmp(&ctx.caps[a].middle)
            .then(d(a).total_cmp(&d(b)))
            .then(a.cmp(&b))
    });

    let mut best = None;
    let mut seen: Vec<Vec<usize>> = Vec::new();
    for list in [fastest, closest, roomiest] {
        let mut short = list[..take].to_vec();
        short.sort_unstable();
        if seen.contains(&short) {
            continue;
        }
        let mut ex = Exhaustive::new(ctx, objective, false);
        ex.run(&short);
        *rings += ex.rings;
        keep_better(objective, &mut best, ex.best);
        seen.push(short);
    }
    if let Some(order) = ctx.fitting_ring(usable) {
        *rings += 1;
        keep_better(objective, &mut best, ctx.split(&order, objective));
    }
    let start = best?;
    Some(local_search(ctx, objective, start, usable, rings))
}

/// Steepest descent over [`neighbours`] until none is better.
fn local_search(
    ctx: &Ctx<'_>,
    objective: Objective,
    start: Eval,
    usable: &[usize],
    rings: &mut u64,
) -> Eval {
    let mut best = start;
    for _ in 0..MAX_LOCAL_ROUNDS {
        let mut improved: Option<Eval> = None;
        for order in neighbours(&best.order, usable, ctx.l) {
            *rings += 1;
            if let Some(e) = ctx.split(&order, objective) {
                let current = improved.as_ref().unwrap_or(&best);
                if compare(objective, &e, current) == Ordering::Less {
                    improved = Some(e);
                }
            }
        }
        match improved {
            Some(e) => best = e,
            None => break,
        }
    }
    best
}

/// Rings one move away from `order` (the head stays first): remove a stage, insert or
/// swap in an unused peer, swap two stages, move one, reverse a run of stages.
fn neighbours(order: &[usize], usable: &[usize], l: usize) -> Vec<Vec<usize>> {
    let k = order.len();
    let unused: Vec<usize> = usable
        .iter()
        .copied()
        .filter(|n| !order.contains(n))
        .collect();
    let mut out = Vec::new();
    for p in 1..k {
        let mut o = order.to_vec();
        o.remove(p);
        out.push(o);
    }
    for &u in &unused {
        if k < l {
            for p in 1..=k {
                let mut o = order.to_vec();
                o.insert(p, u);
                out.push(o);
            }
        }
        for p in 1..k {
            let mut o = order.to_vec();
            o[p] = u;
            out.push(o);
        }
    }
    for p in 1..k {
        for q in p + 1..k {
            let mut o = order.to_vec();
            o.swap(p, q);
            out.push(o);
            if q >= p + 2 {
                let mut o = order.to_vec();
                o[p..=q].reverse();
                out.push(o);
            }
        }
        for q in 1..k {
            if q != p {
                let mut o = order.to_vec();
                let x = o.remove(p);
                o.insert(q, x);
                out.push(o);
            }
        }
    }
    out
}

/// The best ring found that adds `node` to `order`: inserted anywhere, or in place of
/// one stage.
fn best_insertion(
    ctx: &Ctx<'_>,
    objective: Objective,
    order: &[usize],
    node: usize,
    rings: &mut u64,
) -> Option<Eval> {
    let k = order.len();
    let mut best = None;
    for p in 1..=k {
        let mut o = order.to_vec();
        o.insert(p, node);
        *rings += 1;
        keep_better(objective, &mut best, ctx.split(&o, objective));
        if p < k {
            let mut o = order.to_vec();
            o[p] = node;
            *rings += 1;
            keep_better(objective, &mut best, ctx.split(&o, objective));
        }
    }
    best
}
