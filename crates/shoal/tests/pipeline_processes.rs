//! Pipeline mode with real processes on 127.0.0.1: `shoal serve --peer-port 0` nodes serve
//! stages, and `shoal run --peer … --split …` drives the ring as its head. The text must
//! equal the single-process `shoal run` (f32 activations, the default, are exact).
//!
//! Needs the SmolLM2-135M test model (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output, Stdio};

use common::{model_path, Server, SMOLLM2};

const PROMPT: &str = "What is the capital of France?";

/// A node that serves stages: `shoal serve --peer-port 0`.
fn stage_node() -> Server {
    Server::start(&model_path(SMOLLM2), &["--peer-port", "0"])
}

fn shoal_run<S: AsRef<std::ffi::OsStr>>(extra: &[S]) -> Output {
    shoal_run_prompt(PROMPT, 24, extra)
}

/// `shoal run` on SmolLM2 with this prompt and token limit, plus `extra`.
fn shoal_run_prompt<S: AsRef<std::ffi::OsStr>>(
    prompt: &str,
    max_tokens: u32,
    extra: &[S],
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("run")
        .arg("--model")
        .arg(model_path(SMOLLM2))
        .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run shoal")
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "shoal run failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn ring_args(nodes: &[Server], split: &str) -> Vec<String> {
    let mut args = Vec::new();
    for n in nodes {
        args.push("--peer".to_owned());
        args.push(n.peer());
    }
    args.push("--split".to_owned());
    args.push(split.to_owned());
    args
}

#[test]
fn three_stage_ring_of_processes_matches_single_process() {
    let nodes = [stage_node(), stage_node()];
    let single = stdout_ok(&shoal_run::<&str>(&[]));
    assert!(!single.trim().is_empty(), "the model said nothing");
    let ring = stdout_ok(&shoal_run(&ring_args(&nodes, "0-9,10-19,20-29")));
    assert_eq!(ring, single);
}

/// Issue #15 item 4: stage-only nodes started with no model and an empty models directory
/// get their layers from the head and answer token for token as the single process.
#[test]
fn stage_only_nodes_without_a_model_get_their_layers_from_the_head() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let nodes = dirs
        .each_ref()
        .map(|d| Server::start_without_model(d.path(), &["--peer-port", "0", "--stage-only"]));
    let single = stdout_ok(&shoal_run::<&str>(&[]));
    let ring = stdout_ok(&shoal_run(&ring_args(&nodes, "0-9,10-19,20-29")));
    assert_eq!(ring, single);
    for dir in &dirs {
        let kept: Vec<_> = std::fs::read_dir(dir.path().join("stages"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(
            entries, 1,
            "no model file was fetched, only the stage's layers"
        );
    }
}

#[test]
fn two_stage_ring_of_processes_matches_single_process() {
    let nodes = [stage_node()];
    let single = stdout_ok(&shoal_run::<&str>(&[]));
    let ring = stdout_ok(&shoal_run(&ring_args(&nodes, "0-14,15-29")));
    assert_eq!(ring, single);
}

#[test]
fn sampled_ring_matches_single_process_for_the_same_seed() {
    let nodes = [stage_node(), stage_node()];
    let sampling = ["--temperature", "0.8", "--seed", "7"];
    let single = stdout_ok(&shoal_run(&sampling));
    let greedy = stdout_ok(&shoal_run::<&str>(&[]));
    assert_ne!(single, greedy, "the seeded run should differ from greedy");
    let mut args: Vec<String> = sampling.map(String::from).to_vec();
    args.extend(ring_args(&nodes, "0-9,10-19,20-29"));
    let ring = stdout_ok(&shoal_run(&args));
    assert_eq!(ring, single);
}

#[test]
fn split_with_the_wrong_number_of_ranges_fails_clearly() {
    let nodes = [stage_node()];
    let out = shoal_run(&ring_args(&nodes, "0-9,10-19,20-29"));
    assert!(!out.status.success(), "a bad split must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--split has 3 ranges but there are 2 stages"),
        "unclear error: {err}"
    );
    assert!(out.stdout.is_empty(), "nothing generated: {:?}", out.stdout);
}

#[test]
fn peer_without_split_is_refused() {
    let out = shoal_run(&["--peer", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--split"));
}

#[test]
fn stop_strings_and_f16_activations_work_through_the_ring() {
    let nodes = [stage_node()];
    let greedy = stdout_ok(&shoal_run::<&str>(&[]));
    // A stop string from the middle of the greedy answer.
    let words: Vec<&str> = greedy.split_whitespace().collect();
    let stop = words.get(words.len() / 2).copied().unwrap_or("the");
    let single = stdout_ok(&shoal_run(&["--stop", stop]));
    let mut args = vec!["--stop".to_owned(), stop.to_owned()];
    args.extend(ring_args(&nodes, "0-14,15-29"));
    let ring = stdout_ok(&shoal_run(&args));
    assert_eq!(ring, single);
    assert!(
        ring.len() < greedy.len(),
        "the stop string ended the answer"
    );

    let mut args = vec!["--activations".to_owned(), "f16".to_owned()];
    args.extend(ring_args(&nodes, "0-14,15-29"));
    let f16 = stdout_ok(&shoal_run(&args));
    assert!(!f16.trim().is_empty());
}

/// A stage's memory peaks with its first long prompts and stays there: every prompt's
/// per-layer buffers come back to the one heap and are reused by the next, whichever
/// thread computes it. Measured: +15–16 % after three more prompts (the holes the KV caches'
/// growth leaves, once); with an arena per thread +55 %, a new thread's worth of buffers
/// every few prompts.
#[test]
fn a_stage_does_not_grow_with_every_long_prompt() {
    let nodes = [
        Server::start(&model_path(SMOLLM2), &["--stage-only", "--peer-port", "0"]),
        Server::start(&model_path(SMOLLM2), &["--stage-only", "--peer-port", "0"]),
    ];
    let prompt: String = (0..45)
        .map(|i| format!("The quick brown fox jumps over the lazy dog number {i}. "))
        .collect();
    let ring = ring_args(&nodes, "0-9,10-19,20-29");
    let long_prompt = |n: usize| {
        stdout_ok(&shoal_run_prompt(&format!("{prompt}Prompt {n}."), 2, &ring));
    };
    long_prompt(0);
    let first = nodes[0].peak_rss_kib();
    for n in 1..4 {
        long_prompt(n);
    }
    let after = nodes[0].peak_rss_kib();
    eprintln!("middle stage peak RSS: {first} KiB after one prompt, {after} KiB after four");
    assert!(
        after * 4 <= first * 5,
        "the middle stage grew from {first} to {after} KiB over three more prompts"
    );
}
