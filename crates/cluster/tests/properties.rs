#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! Property tests over seeded random clusters: every plan keeps every invariant, small
//! cases match a brute force over all rings and all splits, bad input is an error and
//! never a panic. Seeds are fixed, so a failure reproduces; the failing case is printed.

mod common;

use common::{
    better, brute_force, check_invariants, close, key, random_cluster, ranges_of, Cost, Rng,
};
use shoal_cluster::{
    plan, plan_with_options, validate_split, validate_stages, LeftOutReason, ModelShape,
    NodeProfile, Objective, Plan, PlanError, PlanOptions, Search,
};

const OBJECTIVES: [Objective; 2] = [Objective::Latency, Objective::Throughput];

fn plan_key(objective: Objective, p: &Plan) -> (f64, f64) {
    key(
        objective,
        Cost {
            latency: p.predicted_decode_ms_per_token,
            bottleneck: p.predicted_bottleneck_ms,
            stages: p.stages.len(),
        },
    )
}

fn same_key(a: (f64, f64), b: (f64, f64)) -> bool {
    close(a.0, b.0) && close(a.1, b.1)
}

fn is_capacity_error(e: &PlanError) -> bool {
    matches!(
        e,
        PlanError::NotEnoughMemory { .. }
            | PlanError::HeadTooSmall { .. }
            | PlanError::DoesNotFit { .. }
    )
}

/// Random clusters of 1–12 nodes (so the heuristic runs too) and 1–48 layers: a plan,
/// when there is one, keeps every invariant, and a forced split of the same stages
/// predicts the same costs.
#[test]
fn constraints_hold_for_random_clusters() {
    let mut rng = Rng::new(0x5EED_0001);
    let (mut planned, mut heuristic) = (0, 0);
    for case in 0..400 {
        let n = rng.usize(1, 12);
        let l = rng.usize(1, 48);
        let (shape, nodes, links) = random_cluster(&mut rng, n, l);
        for objective in OBJECTIVES {
            match plan(&shape, &nodes, &links, objective) {
                Ok(p) => {
                    planned += 1;
                    if matches!(p.search, Search::Heuristic { .. }) {
                        heuristic += 1;
                    }
                    check_invariants(&shape, &nodes, &links, &p);
                    let forced = validate_stages(&shape, &nodes, &links, &ranges_of(&p))
                        .unwrap_or_else(|e| panic!("case {case}: own plan rejected: {e}"));
                    assert!(close(
                        forced.predicted_decode_ms_per_token,
                        p.predicted_decode_ms_per_token
                    ));
                    assert!(close(
                        forced.predicted_bottleneck_ms,
                        p.predicted_bottleneck_ms
                    ));
                }
                Err(e) => assert!(is_capacity_error(&e), "case {case}: {e}"),
            }
        }
    }
    println!("{planned} plans, {heuristic} by the heuristic");
    assert!(
        planned > 300,
        "too few feasible cases to mean much: {planned}"
    );
    assert!(heuristic > 50, "too few heuristic cases: {heuristic}");
}

/// Up to 4 nodes and 8 layers: the plan's objective equals the brute force's optimum
/// over every ring and every split; infeasible exactly when the brute force finds no
/// plan; and each left-out node's reason agrees with the brute force.
#[test]
fn optimal_against_brute_force_on_small_cases() {
    let mut rng = Rng::new(0x5EED_0002);
    let (mut feasible, mut infeasible) = (0, 0);
    for case in 0..600 {
        let n = rng.usize(1, 4);
        let l = rng.usize(1, 8);
        let (shape, nodes, links) = random_cluster(&mut rng, n, l);
        for objective in OBJECTIVES {
            let (best, best_with) = brute_force(&shape, &nodes, &links, objective);
            let got = plan(&shape, &nodes, &links, objective);
            let ctx = || format!("case {case} {objective}: {shape:?} {nodes:?} {links:?}");
            match (best, got) {
                (None, Err(e)) => {
                    infeasible += 1;
                    assert!(is_capacity_error(&e), "{}: {e}", ctx());
                }
                (None, Ok(p)) => panic!("{}: brute force finds no plan, planner gave {p}", ctx()),
                (Some(b), Err(e)) => panic!("{}: brute force {b:?}, planner failed: {e}", ctx()),
                (Some(b), Ok(p)) => {
                    feasible += 1;
                    check_invariants(&shape, &nodes, &links, &p);
                    assert!(matches!(p.search, Search::Exact { .. }));
                    let k = plan_key(objective, &p);
                    assert!(
                        same_key(k, b),
                        "{}: planner {k:?}, brute force {b:?}\n{p}",
                        ctx()
                    );
                    for out in &p.left_out {
                        let bw = best_with[out.node];
                        match &out.reason {
                            LeftOutReason::NoMemory { needed_bytes, .. } => {
                                assert!(nodes[out.node].free_memory_bytes < *needed_bytes);
                                assert!(bw.is_none(), "{}", ctx());
                            }
                            LeftOutReason::NoRoom => assert!(bw.is_none(), "{}", ctx()),
                            LeftOutReason::NotBetter { with, chosen } => {
                                let with_key = key(
                                    objective,
                                    Cost {
                                        latency: with.decode_ms_per_token,
                                        bottleneck: with.bottleneck_ms,
                                        stages: with.stages,
                                    },
                                );
                                let bw = bw.unwrap_or_else(|| panic!("{}", ctx()));
                                assert!(
                                    same_key(with_key, bw),
                                    "{}: {with_key:?} vs {bw:?}",
                                    ctx()
                                );
                                assert!(!better(with_key, k), "{}", ctx());
                                assert!(close(
                                    chosen.decode_ms_per_token,
                                    p.predicted_decode_ms_per_token
                                ));
                            }
                            LeftOutReason::NotInSplit => panic!("{}: NotInSplit in a plan", ctx()),
                        }
                    }
                }
            }
        }
    }
    println!("{feasible} feasible, {infeasible} infeasible");
    assert!(
        feasible > 500 && infeasible > 50,
        "{feasible} / {infeasible}"
    );
}

/// The heuristic (forced on small clusters) keeps every invariant, is never better than
/// the optimum (a sanity check of both), finds a plan whenever one exists, and is
/// usually optimal.
#[test]
fn heuristic_is_valid_and_close_to_brute_force() {
    let mut rng = Rng::new(0x5EED_0003);
    let options = PlanOptions { max_exact_nodes: 2 };
    let (mut cases, mut optimal) = (0, 0);
    for case in 0..300 {
        let n = rng.usize(3, 5);
        let l = rng.usize(2, 8);
        let (shape, nodes, links) = random_cluster(&mut rng, n, l);
        for objective in OBJECTIVES {
            let (best, _) = brute_force(&shape, &nodes, &links, objective);
            let got = plan_with_options(&shape, &nodes, &links, objective, options);
            match (best, got) {
                (None, Err(_)) => {}
                (Some(b), Ok(p)) => {
                    cases += 1;
                    assert!(matches!(p.search, Search::Heuristic { .. }));
                    check_invariants(&shape, &nodes, &links, &p);
                    let k = plan_key(objective, &p);
                    assert!(
                        !better(k, b),
                        "case {case}: heuristic {k:?} beats optimum {b:?}"
                    );
                    if same_key(k, b) {
                        optimal += 1;
                    }
                }
                (b, g) => panic!("case {case}: brute force {b:?}, heuristic {g:?}"),
            }
        }
    }
    println!("heuristic optimal in {optimal} of {cases} small cases");
    assert!(optimal * 100 >= cases * 95, "{optimal} of {cases}");
}

/// 9 nodes, just past the exact limit: the heuristic against the exact search.
#[test]
fn heuristic_against_exact_on_nine_nodes() {
    let mut rng = Rng::new(0x5EED_0004);
    let exact = PlanOptions { max_exact_nodes: 9 };
    let (mut cases, mut optimal, mut worst) = (0, 0, 1.0f64);
    for case in 0..24 {
        let l = rng.usize(8, 24);
        let (shape, nodes, links) = random_cluster(&mut rng, 9, l);
        for objective in OBJECTIVES {
            let (Ok(h), Ok(e)) = (
                plan(&shape, &nodes, &links, objective),
                plan_with_options(&shape, &nodes, &links, objective, exact),
            ) else {
                continue;
            };
            cases += 1;
            assert!(matches!(h.search, Search::Heuristic { .. }));
            assert!(matches!(e.search, Search::Exact { .. }));
            let (hk, ek) = (plan_key(objective, &h), plan_key(objective, &e));
            assert!(!better(hk, ek), "case {case}: heuristic beats exact");
            if same_key(hk, ek) {
                optimal += 1;
            }
            worst = worst.max(hk.0 / ek.0);
        }
    }
    println!("9 nodes: heuristic optimal in {optimal} of {cases}, worst ratio {worst:.3}");
    assert!(cases >= 16, "{cases}");
    assert!(worst < 1.25, "heuristic too far off: {worst}");
}

/// Random forced splits agree with an independent check of the invariants.
#[test]
fn forced_splits_are_checked_like_plans() {
    let mut rng = Rng::new(0x5EED_0005);
    let (mut ok, mut rejected) = (0, 0);
    for case in 0..500 {
        let n = rng.usize(1, 5);
        let l = rng.usize(1, 12);
        let (shape, nodes, links) = random_cluster(&mut rng, n, l);
        // A random cut into 1..=n ranges, sometimes broken on purpose.
        let k = rng.usize(1, n.min(l));
        let mut cuts: Vec<usize> = (1..l).collect();
        for i in (1..cuts.len()).rev() {
            cuts.swap(i, rng.usize(0, i));
        }
        let mut cuts: Vec<usize> = cuts.into_iter().take(k - 1).collect();
        cuts.sort_unstable();
        let mut ranges = Vec::new();
        let mut start = 0;
        for c in cuts.into_iter().chain([l]) {
            ranges.push(start..c);
            start = c;
        }
        let broken = rng.chance(0.2);
        if broken {
            let i = rng.usize(0, ranges.len() - 1);
            match rng.usize(0, 2) {
                0 => ranges[i].end += 1,
                1 => ranges[i].start = ranges[i].start.saturating_sub(1).max(1),
                _ => {
                    ranges.remove(i);
                }
            }
        }
        let ring: Vec<usize> = (0..ranges.len()).collect();
        let counts: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        let well_formed = !ranges.is_empty()
            && ranges[0].start == 0
            && ranges.windows(2).all(|w| w[0].end == w[1].start)
            && ranges.iter().all(|r| r.end > r.start)
            && ranges.last().is_some_and(|r| r.end == l);
        let valid = well_formed && common::fits(&shape, &nodes, &ring, &counts);
        match validate_split(&shape, &nodes, &links, &ranges) {
            Ok(p) => {
                ok += 1;
                assert!(valid, "case {case}: accepted {ranges:?}");
                check_invariants(&shape, &nodes, &links, &p);
                assert_eq!(p.ranges(), ranges);
            }
            Err(e) => {
                rejected += 1;
                assert!(!valid, "case {case}: rejected valid {ranges:?}: {e}");
            }
        }
    }
    println!("{ok} accepted, {rejected} rejected");
    assert!(ok > 50 && rejected > 50);
}

/// Garbage in: NaN, infinities, negatives, zero layers, ragged link matrices, huge
/// memory. Always an error or a valid plan, never a panic.
#[test]
fn bad_inputs_are_errors_not_panics() {
    let mut rng = Rng::new(0x5EED_0006);
    let weird = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1.0,
        0.0,
        f64::MIN_POSITIVE,
        1e300,
        1.0,
    ];
    let mut errors = 0;
    for _ in 0..2000 {
        let n = rng.usize(0, 4);
        let shape = ModelShape {
            n_layers: [0, 1, 3, 1000][rng.usize(0, 3)],
            layer_bytes: [0, 1, 100, u64::MAX][rng.usize(0, 3)],
            embed_bytes: [0, 7, u64::MAX][rng.usize(0, 2)],
            head_bytes: [0, 7, u64::MAX][rng.usize(0, 2)],
            kv_bytes_per_layer: [0, 3, u64::MAX][rng.usize(0, 2)],
        };
        let nodes: Vec<NodeProfile> = (0..n)
            .map(|i| NodeProfile {
                id: if rng.chance(0.05) {
                    String::new()
                } else if rng.chance(0.05) {
                    "dup".into()
                } else {
                    format!("n{i}")
                },
                free_memory_bytes: [0, 1, 1000, 1 << 40, u64::MAX][rng.usize(0, 4)],
                decode_ms_per_layer: weird[rng.usize(0, weird.len() - 1)],
                prefill_ms_per_layer_token: weird[rng.usize(0, weird.len() - 1)],
            })
            .collect();
        let rows = if rng.chance(0.1) { n + 1 } else { n };
        let links: Vec<Vec<f64>> = (0..rows)
            .map(|_| {
                let cols = if rng.chance(0.05) {
                    n.saturating_sub(1)
                } else {
                    n
                };
                (0..cols)
                    .map(|_| {
                        if rng.chance(0.9) {
                            1.0
                        } else {
                            weird[rng.usize(0, 7)]
                        }
                    })
                    .collect()
            })
            .collect();
        for objective in OBJECTIVES {
            match plan(&shape, &nodes, &links, objective) {
                Ok(p) => check_invariants(&shape, &nodes, &links, &p),
                Err(e) => {
                    errors += 1;
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        let _ = validate_split(&shape, &nodes, &links, &[0..1, 1..shape.n_layers]);
    }
    assert!(errors > 1000);
}
