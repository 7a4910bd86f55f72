//! Helpers shared by the planner's tests: a seeded generator, random clusters, an
//! independent brute force, and an invariant checker that recomputes everything from
//! the inputs.

#![allow(dead_code, unreachable_pub)]

use std::ops::Range;

use shoal_cluster::{ModelShape, NodeProfile, Objective, Plan};

/// splitmix64: small, seeded, good enough for test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn usize(&mut self, lo: usize, hi: usize) -> usize {
        self.range(lo as u64, hi as u64) as usize
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

pub fn node(id: &str, free: u64, decode_ms: f64) -> NodeProfile {
    NodeProfile {
        id: id.to_string(),
        free_memory_bytes: free,
        decode_ms_per_layer: decode_ms,
        prefill_ms_per_layer_token: decode_ms / 4.0,
    }
}

/// Every link `ms` one way (diagonal 0).
pub fn uniform_links(n: usize, ms: f64) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| (0..n).map(|j| if i == j { 0.0 } else { ms }).collect())
        .collect()
}

/// A random cluster. `grid` draws times from multiples of 0.5 (exact floats, many
/// ties); otherwise continuous. Memory is drawn around what the model needs: most
/// clusters can hold the model, some cannot.
pub fn random_cluster(
    rng: &mut Rng,
    n_nodes: usize,
    n_layers: usize,
) -> (ModelShape, Vec<NodeProfile>, Vec<Vec<f64>>) {
    let grid = rng.chance(0.5);
    let shape = ModelShape {
        n_layers,
        layer_bytes: rng.range(1, 100),
        embed_bytes: if rng.chance(0.2) {
            0
        } else {
            rng.range(0, 300)
        },
        head_bytes: if rng.chance(0.2) {
            0
        } else {
            rng.range(0, 300)
        },
        kv_bytes_per_layer: if rng.chance(0.3) { 0 } else { rng.range(0, 50) },
    };
    let total = shape.stage_bytes(n_layers, true, true);
    let generous = rng.chance(0.7);
    let ms = |rng: &mut Rng, lo: f64, hi: f64| {
        if grid {
            let steps = ((hi - lo) / 0.5) as u64;
            lo + 0.5 * rng.range(0, steps) as f64
        } else {
            lo + (hi - lo) * rng.unit()
        }
    };
    let nodes: Vec<NodeProfile> = (0..n_nodes)
        .map(|i| {
            let free = if rng.chance(0.05) {
                u64::MAX
            } else if rng.chance(0.1) {
                rng.range(0, shape.layer_bytes)
            } else if generous {
                // Between half and three times a fair share of the model.
                let share = total / n_nodes as u64 + 1;
                rng.range(share / 2, share * 3)
            } else {
                // Up to twice a fair share: often not enough in all.
                rng.range(0, total * 2 / n_nodes as u64 + 1)
            };
            let d = ms(rng, 0.5, 6.0);
            NodeProfile {
                id: format!("n{i}"),
                free_memory_bytes: free,
                decode_ms_per_layer: d,
                prefill_ms_per_layer_token: d * rng.unit(),
            }
        })
        .collect();
    let links = (0..n_nodes)
        .map(|i| {
            (0..n_nodes)
                .map(|j| {
                    if i == j || rng.chance(0.1) {
                        0.0
                    } else {
                        ms(rng, 0.0, 5.0)
                    }
                })
                .collect()
        })
        .collect();
    (shape, nodes, links)
}

/// An objective's comparison key: (primary, secondary).
pub type Key = (f64, f64);

/// Called with each valid plan: ring, layers per stage, cost.
pub type PlanVisitor<'a> = dyn FnMut(&[usize], &[usize], Cost) + 'a;

/// Costs recomputed from the inputs, independently of the crate.
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    pub latency: f64,
    pub bottleneck: f64,
    pub stages: usize,
}

pub fn ring_cost(
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    ring: &[usize],
    counts: &[usize],
) -> Cost {
    let k = ring.len();
    let mut latency = 0.0;
    let mut bottleneck: f64 = 0.0;
    for i in 0..k {
        let compute = counts[i] as f64 * nodes[ring[i]].decode_ms_per_layer;
        let hop = if k == 1 {
            0.0
        } else {
            links[ring[i]][ring[(i + 1) % k]]
        };
        latency += compute + hop;
        bottleneck = bottleneck.max(compute + hop);
    }
    Cost {
        latency,
        bottleneck,
        stages: k,
    }
}

pub fn fits(shape: &ModelShape, nodes: &[NodeProfile], ring: &[usize], counts: &[usize]) -> bool {
    let k = ring.len();
    ring.iter().zip(counts).enumerate().all(|(i, (&n, &c))| {
        let mut need = c as u128 * (shape.layer_bytes as u128 + shape.kv_bytes_per_layer as u128);
        if i == 0 {
            need += shape.embed_bytes as u128;
        }
        if i + 1 == k {
            need += shape.head_bytes as u128;
        }
        need <= nodes[n].free_memory_bytes as u128
    })
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Lexicographic key of a cost under an objective (primary, secondary).
pub fn key(objective: Objective, c: Cost) -> (f64, f64) {
    match objective {
        Objective::Latency => (c.latency, 0.0),
        Objective::Throughput => (c.bottleneck, c.latency),
    }
}

/// `a` strictly better than `b` (with tolerance).
pub fn better(a: (f64, f64), b: (f64, f64)) -> bool {
    if !close(a.0, b.0) {
        a.0 < b.0
    } else {
        !close(a.1, b.1) && a.1 < b.1
    }
}

fn compositions(total: usize, parts: usize, out: &mut Vec<usize>, f: &mut dyn FnMut(&[usize])) {
    if parts == 1 {
        out.push(total);
        f(out);
        out.pop();
        return;
    }
    for first in 1..=total.saturating_sub(parts - 1) {
        out.push(first);
        compositions(total - first, parts - 1, out, f);
        out.pop();
    }
}

fn rings(n: usize, ring: &mut Vec<usize>, max_len: usize, f: &mut dyn FnMut(&[usize])) {
    f(ring);
    if ring.len() >= max_len {
        return;
    }
    for p in 1..n {
        if !ring.contains(&p) {
            ring.push(p);
            rings(n, ring, max_len, f);
            ring.pop();
        }
    }
}

/// Brute force over every ring (head first, any subset and order of peers) and every
/// split. Calls `f(ring, counts, cost)` for each valid plan.
pub fn for_each_plan(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    f: &mut PlanVisitor<'_>,
) {
    let l = shape.n_layers;
    let mut ring = vec![0];
    rings(nodes.len(), &mut ring, l, &mut |ring| {
        let ring = ring.to_vec();
        compositions(l, ring.len(), &mut Vec::new(), &mut |counts| {
            if fits(shape, nodes, &ring, counts) {
                f(&ring, counts, ring_cost(nodes, links, &ring, counts));
            }
        });
    });
}

/// The best objective key over all valid plans, and per node the best key over the
/// plans that include it.
pub fn brute_force(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    objective: Objective,
) -> (Option<Key>, Vec<Option<Key>>) {
    // Two passes so that "best secondary among best primary" is computed with the same
    // tolerance as the comparison.
    let mut all: Vec<(Vec<usize>, (f64, f64))> = Vec::new();
    for_each_plan(shape, nodes, links, &mut |ring, _counts, cost| {
        all.push((ring.to_vec(), key(objective, cost)));
    });
    let best_of = |keys: &mut dyn Iterator<Item = (f64, f64)>| {
        let keys: Vec<(f64, f64)> = keys.collect();
        let p = keys.iter().map(|k| k.0).fold(f64::INFINITY, f64::min);
        if !p.is_finite() {
            return None;
        }
        let s = keys
            .iter()
            .filter(|k| close(k.0, p))
            .map(|k| k.1)
            .fold(f64::INFINITY, f64::min);
        Some((p, s))
    };
    let best = best_of(&mut all.iter().map(|(_, k)| *k));
    let per_node = (0..nodes.len())
        .map(|n| best_of(&mut all.iter().filter(|(r, _)| r.contains(&n)).map(|(_, k)| *k)))
        .collect();
    (best, per_node)
}

/// Checks every invariant of `plan` against the inputs, recomputing the numbers.
pub fn check_invariants(
    shape: &ModelShape,
    nodes: &[NodeProfile],
    links: &[Vec<f64>],
    plan: &Plan,
) {
    let l = shape.n_layers;
    assert!(!plan.stages.is_empty(), "no stages");
    assert_eq!(plan.n_layers, l);
    assert_eq!(plan.stages[0].node, 0, "the head runs the first stage");
    let mut next = 0;
    let mut seen = vec![false; nodes.len()];
    for s in &plan.stages {
        assert!(s.node < nodes.len());
        assert!(!seen[s.node], "node {} used twice", s.node);
        seen[s.node] = true;
        assert_eq!(s.layers.start, next, "ranges contiguous");
        assert!(s.layers.end > s.layers.start, "every stage has a layer");
        assert_eq!(s.node_id, nodes[s.node].id);
        assert_eq!(s.free_memory_bytes, nodes[s.node].free_memory_bytes);
        next = s.layers.end;
    }
    assert_eq!(next, l, "every layer exactly once");
    let ring: Vec<usize> = plan.stages.iter().map(|s| s.node).collect();
    let counts: Vec<usize> = plan.stages.iter().map(|s| s.n_layers()).collect();
    assert!(
        fits(shape, nodes, &ring, &counts),
        "a node over its memory: {plan:?}"
    );
    let k = ring.len();
    for (i, s) in plan.stages.iter().enumerate() {
        let need = shape.stage_bytes(s.n_layers(), i == 0, i + 1 == k);
        assert_eq!(s.memory_bytes, need);
        assert!(s.memory_bytes <= s.free_memory_bytes);
    }
    let cost = ring_cost(nodes, links, &ring, &counts);
    assert!(close(plan.predicted_decode_ms_per_token, cost.latency));
    assert!(close(plan.predicted_bottleneck_ms, cost.bottleneck));
    assert!(close(plan.compute_ms + plan.hop_ms, cost.latency));
    assert!(close(
        plan.predicted_throughput_tokens_per_s,
        1000.0 / cost.bottleneck
    ));
    let out: Vec<usize> = plan.left_out.iter().map(|l| l.node).collect();
    let expected: Vec<usize> = (1..nodes.len()).filter(|n| !seen[*n]).collect();
    assert_eq!(out, expected, "left_out lists exactly the unused nodes");
    let lines = plan.explain();
    assert!(lines.len() >= plan.stages.len() + plan.left_out.len() + 2);
}

pub fn ranges_of(plan: &Plan) -> Vec<(usize, Range<usize>)> {
    plan.stages
        .iter()
        .map(|s| (s.node, s.layers.clone()))
        .collect()
}
