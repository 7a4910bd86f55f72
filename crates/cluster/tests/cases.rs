#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! Hand-made placement cases whose answer can be worked out on paper.

mod common;

use common::{check_invariants, node, uniform_links};
use shoal_cluster::{
    parse_split, plan, plan_with_options, validate_split, validate_stages, LeftOutReason,
    ModelShape, Objective, PlanError, PlanOptions, Search,
};

/// 10 layers of 100 bytes, embedding 50, head 50, no KV.
const SHAPE: ModelShape = ModelShape {
    n_layers: 10,
    layer_bytes: 100,
    embed_bytes: 50,
    head_bytes: 50,
    kv_bytes_per_layer: 0,
};

const PLENTY: u64 = 1_000_000;

fn order(p: &shoal_cluster::Plan) -> Vec<usize> {
    p.stages.iter().map(|s| s.node).collect()
}

fn counts(p: &shoal_cluster::Plan) -> Vec<usize> {
    p.stages.iter().map(|s| s.n_layers()).collect()
}

#[test]
fn one_node_runs_everything_with_no_hops() {
    let nodes = [node("a", PLENTY, 1.5)];
    let links = uniform_links(1, 0.0);
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [0]);
    assert_eq!(p.stages[0].layers, 0..10);
    assert_eq!(p.stages[0].memory_bytes, 1100);
    assert_eq!(p.predicted_decode_ms_per_token, 15.0);
    assert_eq!(p.hop_ms, 0.0);
    assert_eq!(p.split_string(), "0-9");
    assert!(matches!(p.search, Search::Exact { peers: 0, .. }));
}

#[test]
fn slow_link_leaves_a_faster_device_out_under_latency() {
    // B is faster per layer (0.8 vs 1.0 ms) but 2 ms away each way: with B the best is
    // 1 layer on A and 9 on B = 1 + 7.2 + 4 = 12.2 ms > 10 ms on A alone.
    let nodes = [node("a", PLENTY, 1.0), node("b", PLENTY, 0.8)];
    let links = uniform_links(2, 2.0);
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [0]);
    assert_eq!(p.predicted_decode_ms_per_token, 10.0);
    assert_eq!(p.left_out.len(), 1);
    let LeftOutReason::NotBetter { with, chosen } = &p.left_out[0].reason else {
        panic!("expected NotBetter, got {:?}", p.left_out[0].reason);
    };
    assert!((with.decode_ms_per_token - 12.2).abs() < 1e-9);
    assert_eq!(chosen.decode_ms_per_token, 10.0);
    let text = p.explain().join("\n");
    assert!(
        text.contains("left out `b` (node 1): adding it would add 4.00 ms of hops but save only 1.80 ms of compute"),
        "{text}"
    );

    // For many streams the same device is worth it: the slowest stage drops from 10 ms
    // to 6.8 ms (A: 4 layers + 2 ms hop = 6; B: 6 × 0.8 + 2 = 6.8).
    let t = plan(&SHAPE, &nodes, &links, Objective::Throughput).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &t);
    assert_eq!(order(&t), [0, 1]);
    assert!((t.predicted_bottleneck_ms - 6.8).abs() < 1e-9, "{t}");
    assert_eq!(counts(&t), [4, 6]);
}

#[test]
fn slow_device_is_left_out_under_latency() {
    let nodes = [node("a", PLENTY, 1.0), node("slow", PLENTY, 3.0)];
    let links = uniform_links(2, 0.5);
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [0]);
    let text = p.explain().join("\n");
    assert!(text.contains("left out `slow`"), "{text}");
    assert!(text.contains("compute +2.00 ms, hops +1.00 ms"), "{text}");
}

#[test]
fn fast_device_with_little_memory_is_used_partially() {
    // B is 4× faster but holds only 3 layers next to the LM head (3 × 100 + 50 = 350).
    let nodes = [node("a", PLENTY, 2.0), node("b", 350, 0.5)];
    let links = uniform_links(2, 0.1);
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [0, 1]);
    assert_eq!(p.stages[0].layers, 0..7);
    assert_eq!(p.stages[1].layers, 7..10);
    assert_eq!(p.stages[1].memory_bytes, 350);
    assert!((p.predicted_decode_ms_per_token - (14.0 + 1.5 + 0.2)).abs() < 1e-9);
}

#[test]
fn device_without_room_for_a_layer_is_not_used() {
    let nodes = [node("a", PLENTY, 2.0), node("tiny", 99, 0.1)];
    let links = uniform_links(2, 0.0);
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [0]);
    assert_eq!(
        p.left_out[0].reason,
        LeftOutReason::NoMemory {
            free_bytes: 99,
            needed_bytes: 100
        }
    );
    let text = p.explain().join("\n");
    assert!(text.contains("not enough memory: 99 B free"), "{text}");
    assert!(matches!(p.search, Search::Exact { peers: 0, .. }));
}

#[test]
fn head_bytes_decide_who_can_be_last() {
    // 4 + 5 layers are not enough: `b` must be in, and only as a middle stage.
    let nodes = [
        node("a", 450, 1.0), // embed 50 + 4 layers
        node("b", 140, 1.0), // 1 layer as a middle, none next to the LM head
        node("c", 600, 1.0), // 5 layers next to the LM head
    ];
    let links = uniform_links(3, 0.0);
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [0, 1, 2]);
    assert_eq!(counts(&p), [4, 1, 5]);
}

#[test]
fn memory_forces_every_node_in() {
    let nodes = [
        node("a", 450, 1.0),
        node("b", 400, 3.0),
        node("c", 450, 2.0),
    ];
    let links = uniform_links(3, 1.0);
    for objective in [Objective::Latency, Objective::Throughput] {
        let p = plan(&SHAPE, &nodes, &links, objective).unwrap();
        check_invariants(&SHAPE, &nodes, &links, &p);
        assert_eq!(p.stages.len(), 3, "{p}");
    }
}

#[test]
fn hop_costs_choose_the_order() {
    // Memory needs all three nodes. One way round costs 1 ms a hop, the other 5 ms.
    let nodes = [
        node("a", 450, 1.0),
        node("b", 450, 1.0),
        node("c", 450, 1.0),
    ];
    let mut links = vec![vec![0.0; 3]; 3];
    let (a, b, c) = (0, 1, 2);
    links[a][b] = 1.0;
    links[b][c] = 1.0;
    links[c][a] = 1.0;
    links[a][c] = 5.0;
    links[c][b] = 5.0;
    links[b][a] = 5.0;
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [a, b, c]);
    assert_eq!(p.hop_ms, 3.0);

    // Reverse the cheap direction: the ring turns round.
    let reversed: Vec<Vec<f64>> = (0..3)
        .map(|i| (0..3).map(|j| links[j][i]).collect())
        .collect();
    let p = plan(&SHAPE, &nodes, &reversed, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &reversed, &p);
    assert_eq!(order(&p), [a, c, b]);
    assert_eq!(p.hop_ms, 3.0);
}

#[test]
fn throughput_spreads_layers_to_balance() {
    let nodes = [
        node("a", PLENTY, 1.0),
        node("b", PLENTY, 1.0),
        node("c", PLENTY, 1.0),
    ];
    let links = uniform_links(3, 0.0);
    // One stream: extra stages only add hops (here free) — fewer stages win the tie.
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(order(&p), [0]);
    // Many streams: all three devices, no stage over 4 layers (4/3/3 or 4/4/2: with
    // equal speeds both have the same slowest stage and the same latency).
    let t = plan(&SHAPE, &nodes, &links, Objective::Throughput).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &t);
    assert_eq!(t.stages.len(), 3);
    assert_eq!(counts(&t).into_iter().max(), Some(4));
    assert_eq!(t.predicted_bottleneck_ms, 4.0);
    assert_eq!(t.predicted_throughput_tokens_per_s, 250.0);
}

#[test]
fn throughput_gives_faster_devices_more_layers() {
    // A is twice as fast as B: the balanced split is about 2:1.
    let shape = ModelShape {
        n_layers: 30,
        ..SHAPE
    };
    let nodes = [node("a", PLENTY, 1.0), node("b", PLENTY, 2.0)];
    let links = uniform_links(2, 0.0);
    let t = plan(&shape, &nodes, &links, Objective::Throughput).unwrap();
    check_invariants(&shape, &nodes, &links, &t);
    assert_eq!(counts(&t), [20, 10]);
    assert_eq!(t.predicted_bottleneck_ms, 20.0);
}

#[test]
fn throughput_ties_are_broken_by_latency() {
    // A big LM head (500 bytes): only `c` can close the ring, with one layer, and its
    // 10 ms hop back to the head pins the slowest stage at 1 + 10 = 11 ms. `a` (5
    // layers at most) and `b` (5 at most, twice as slow) share the other 9 layers:
    // 5/4 and 4/5 both stay under 11 ms, and 5/4 is faster for one stream.
    let shape = ModelShape {
        head_bytes: 500,
        ..SHAPE
    };
    let nodes = [
        node("a", 550, 1.0),
        node("b", 590, 2.0),
        node("c", 600, 1.0),
    ];
    let mut links = uniform_links(3, 0.0);
    links[2][0] = 10.0;
    let t = plan(&shape, &nodes, &links, Objective::Throughput).unwrap();
    check_invariants(&shape, &nodes, &links, &t);
    assert_eq!(order(&t), [0, 1, 2]);
    assert_eq!(counts(&t), [5, 4, 1]);
    assert_eq!(t.predicted_bottleneck_ms, 11.0);
    assert_eq!(t.predicted_decode_ms_per_token, 24.0);
}

#[test]
fn errors_say_what_is_wrong() {
    let links1 = uniform_links(1, 0.0);
    assert_eq!(
        plan(&SHAPE, &[], &[], Objective::Latency),
        Err(PlanError::NoNodes)
    );

    let too_small = [node("a", 500, 1.0)];
    let e = plan(&SHAPE, &too_small, &links1, Objective::Latency).unwrap_err();
    assert_eq!(
        e,
        PlanError::NotEnoughMemory {
            needed_bytes: 1100,
            available_bytes: 500,
            missing_bytes: 600
        }
    );
    assert!(e.to_string().contains("600 B missing"), "{e}");

    let no_layers = ModelShape {
        n_layers: 0,
        ..SHAPE
    };
    assert!(matches!(
        plan(
            &no_layers,
            &[node("a", PLENTY, 1.0)],
            &links1,
            Objective::Latency
        ),
        Err(PlanError::BadShape(_))
    ));

    for bad in [f64::NAN, 0.0, -1.0, f64::INFINITY] {
        let e = plan(
            &SHAPE,
            &[node("a", PLENTY, bad)],
            &links1,
            Objective::Latency,
        );
        assert!(
            matches!(e, Err(PlanError::BadProfile { node: 0, .. })),
            "{e:?}"
        );
    }
    let dup = [node("a", PLENTY, 1.0), node("a", PLENTY, 1.0)];
    assert!(matches!(
        plan(&SHAPE, &dup, &uniform_links(2, 0.0), Objective::Latency),
        Err(PlanError::BadProfile { node: 1, .. })
    ));

    let two = [node("a", PLENTY, 1.0), node("b", PLENTY, 1.0)];
    assert!(matches!(
        plan(&SHAPE, &two, &links1, Objective::Latency),
        Err(PlanError::BadLinks(_))
    ));
    let mut nan_link = uniform_links(2, 1.0);
    nan_link[1][0] = f64::NAN;
    let e = plan(&SHAPE, &two, &nan_link, Objective::Latency).unwrap_err();
    assert!(e.to_string().contains("`b` → `a`"), "{e}");

    // Plenty in total, but the head cannot hold the embedding and a layer.
    let weak_head = [node("a", 149, 1.0), node("b", PLENTY, 1.0)];
    let e = plan(
        &SHAPE,
        &weak_head,
        &uniform_links(2, 0.0),
        Objective::Latency,
    )
    .unwrap_err();
    assert_eq!(
        e,
        PlanError::HeadTooSmall {
            id: "a".into(),
            needed_bytes: 150,
            free_bytes: 149
        }
    );

    // Enough bytes in total, but not in whole layers: 4 nodes hold 2 layers each
    // (+ 99 spare bytes each).
    let crumbs = [
        node("a", 50 + 299, 1.0),
        node("b", 299, 1.0),
        node("c", 299, 1.0),
        node("d", 299, 1.0),
    ];
    let e = plan(&SHAPE, &crumbs, &uniform_links(4, 0.0), Objective::Latency).unwrap_err();
    assert_eq!(
        e,
        PlanError::DoesNotFit {
            placeable_layers: 8,
            n_layers: 10,
            missing_bytes: 200
        }
    );
}

#[test]
fn forced_split_is_checked_and_costed() {
    let nodes = [
        node("a", PLENTY, 1.0),
        node("b", PLENTY, 2.0),
        node("c", PLENTY, 1.0),
    ];
    let links = uniform_links(3, 0.5);
    let ranges = parse_split("0-3, 4-6,7-9").unwrap();
    assert_eq!(ranges, [0..4, 4..7, 7..10]);
    let p = validate_split(&SHAPE, &nodes, &links, &ranges).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert_eq!(p.search, Search::Forced);
    assert_eq!(p.objective, None);
    assert_eq!(p.predicted_decode_ms_per_token, 4.0 + 6.0 + 3.0 + 1.5);
    assert_eq!(p.predicted_bottleneck_ms, 6.5);
    assert_eq!(p.split_string(), "0-3,4-6,7-9");

    // Two ranges: `c` is left out.
    let p = validate_split(&SHAPE, &nodes, &links, &parse_split("0-4,5-9").unwrap()).unwrap();
    assert_eq!(p.left_out.len(), 1);
    assert_eq!(p.left_out[0].reason, LeftOutReason::NotInSplit);

    let bad = |ranges: &[std::ops::Range<usize>]| validate_split(&SHAPE, &nodes, &links, ranges);
    assert!(matches!(
        bad(std::slice::from_ref(&(1..10))),
        Err(PlanError::BadSplit(_))
    ));
    assert!(matches!(bad(&[0..4, 5..10]), Err(PlanError::BadSplit(_))));
    assert!(matches!(bad(&[0..5, 4..10]), Err(PlanError::BadSplit(_))));
    assert!(matches!(bad(&[0..5, 5..9]), Err(PlanError::BadSplit(_))));
    assert!(matches!(bad(&[0..5, 5..11]), Err(PlanError::BadSplit(_))));
    assert!(matches!(
        bad(&[0..5, 5..5, 5..10]),
        Err(PlanError::BadSplit(_))
    ));
    assert!(matches!(
        bad(&[0..2, 2..4, 4..6, 6..10]),
        Err(PlanError::BadSplit(_))
    ));
    assert!(matches!(bad(&[]), Err(PlanError::BadSplit(_))));

    let small = [node("a", PLENTY, 1.0), node("b", 300, 1.0)];
    let e = validate_split(&SHAPE, &small, &uniform_links(2, 0.0), &[0..7, 7..10]).unwrap_err();
    assert_eq!(
        e,
        PlanError::OverMemory {
            stage: 1,
            node: 1,
            id: "b".into(),
            needed_bytes: 350,
            free_bytes: 300
        }
    );

    for text in ["", "a-b", "3-1", "0-", ",", "0-4;5-9"] {
        assert!(parse_split(text).is_err(), "{text:?}");
    }
    assert_eq!(parse_split("0-4,5,6-9").unwrap(), [0..5, 5..6, 6..10]);

    // Any ring, by node index.
    let p = validate_stages(&SHAPE, &nodes, &links, &[(0, 0..5), (2, 5..10)]).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    assert!(matches!(
        validate_stages(&SHAPE, &nodes, &links, &[(1, 0..10)]),
        Err(PlanError::BadSplit(_))
    ));
    assert!(matches!(
        validate_stages(&SHAPE, &nodes, &links, &[(0, 0..5), (0, 5..10)]),
        Err(PlanError::BadSplit(_))
    ));
    assert!(matches!(
        validate_stages(&SHAPE, &nodes, &links, &[(0, 0..5), (7, 5..10)]),
        Err(PlanError::BadSplit(_))
    ));
}

#[test]
fn explanation_names_stages_left_out_nodes_and_totals() {
    let nodes = [
        node("head", 450, 1.0),
        node("gpu", 2_000, 0.25),
        node("phone", PLENTY, 5.0),
        node("watch", 10, 0.1),
    ];
    let links = uniform_links(4, 1.0);
    let p = plan(&SHAPE, &nodes, &links, Objective::Latency).unwrap();
    check_invariants(&SHAPE, &nodes, &links, &p);
    let text = p.to_string();
    println!("{text}");
    assert!(
        text.starts_with("objective: lowest time per token"),
        "{text}"
    );
    assert!(text.contains("search: exact"), "{text}");
    assert!(
        text.contains("stage 0: `head` (node 0, head: embedding)  layers 0-0 (1)"),
        "{text}"
    );
    assert!(
        text.contains("stage 1: `gpu` (node 1, last: LM head, samples)  layers 1-9 (9)"),
        "{text}"
    );
    assert!(text.contains("token back to `head` 1.00 ms"), "{text}");
    assert!(text.contains("left out `phone` (node 2)"), "{text}");
    assert!(
        text.contains("left out `watch` (node 3): not enough memory"),
        "{text}"
    );
    assert!(
        text.contains("predicted: 5.25 ms/token for one stream (compute 3.25 ms + 2 hops 2.00 ms)"),
        "{text}"
    );
    assert!(
        text.contains("many streams: slowest stage 3.25 ms (stage 1 on `gpu`)"),
        "{text}"
    );
    assert!(text.contains("split: --split 0-0,1-9"), "{text}");
}

#[test]
fn many_nodes_use_the_heuristic_and_keep_every_invariant() {
    let shape = ModelShape {
        n_layers: 64,
        ..SHAPE
    };
    // 16 nodes, each holding 10 layers; speeds and links vary.
    let nodes: Vec<_> = (0..16)
        .map(|i| node(&format!("n{i}"), 1_050, 1.0 + (i % 5) as f64 * 0.3))
        .collect();
    let links: Vec<Vec<f64>> = (0..16)
        .map(|i| {
            (0..16)
                .map(|j| {
                    if i == j {
                        0.0
                    } else {
                        0.2 + ((i * 7 + j * 3) % 5) as f64 * 0.4
                    }
                })
                .collect()
        })
        .collect();
    for objective in [Objective::Latency, Objective::Throughput] {
        let p = plan(&shape, &nodes, &links, objective).unwrap();
        check_invariants(&shape, &nodes, &links, &p);
        assert!(matches!(p.search, Search::Heuristic { nodes: 16, .. }));
        assert!(p.explain()[1].contains("heuristic"));
        if objective == Objective::Latency {
            // At least seven stages of at most 10 layers are needed for 64 layers.
            assert!(p.stages.len() >= 7, "{p}");
        }
    }
    // The exact search can be asked for explicitly (small enough here to be quick
    // with a short model).
    let short = ModelShape {
        n_layers: 4,
        ..SHAPE
    };
    let p = plan_with_options(
        &short,
        &nodes[..10],
        &links[..10]
            .iter()
            .map(|r| r[..10].to_vec())
            .collect::<Vec<_>>(),
        Objective::Latency,
        PlanOptions {
            max_exact_nodes: 10,
        },
    )
    .unwrap();
    assert!(matches!(p.search, Search::Exact { peers: 9, .. }));
}

#[test]
fn tiling_is_checked_in_one_place_and_says_what_is_wrong() {
    use shoal_cluster::{check_tiling, TilingError};
    assert_eq!(check_tiling(&[0..10, 10..20, 20..30], 30), Ok(()));
    assert_eq!(check_tiling(std::iter::once(&(0..30)), 30), Ok(()));
    assert_eq!(
        check_tiling(std::iter::once(&(1..30)), 30),
        Err(TilingError::NotNext {
            stage: 0,
            start: 1,
            expected: 0
        })
    );
    let gap = check_tiling(&[0..10, 11..30], 30).unwrap_err();
    assert!(gap.to_string().contains("a gap"), "{gap}");
    let overlap = check_tiling(&[0..10, 9..30], 30).unwrap_err();
    assert!(overlap.to_string().contains("an overlap"), "{overlap}");
    assert_eq!(
        check_tiling(&[0..10, 10..10, 10..30], 30),
        Err(TilingError::Empty { stage: 1 })
    );
    assert_eq!(
        check_tiling(&[0..10, 10..31], 30),
        Err(TilingError::PastEnd {
            stage: 1,
            end: 31,
            n_layers: 30
        })
    );
    assert_eq!(
        check_tiling(&[0..10, 10..29], 30),
        Err(TilingError::Short {
            end: 29,
            n_layers: 30
        })
    );
    let none: [std::ops::Range<usize>; 0] = [];
    assert_eq!(
        check_tiling(&none, 30),
        Err(TilingError::Short {
            end: 0,
            n_layers: 30
        })
    );
}
