//! Pipeline mode with real processes on 127.0.0.1: `shoal serve --peer-port 0` nodes serve
//! stages, and `shoal run --peer … --split …` drives the ring as its head. The text must
//! equal the single-process `shoal run` (f32 activations, the default, are exact).
//!
//! Needs the SmolLM2-135M test model (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const MODEL_FILE: &str = "smollm2-135m-instruct-q4_1.gguf";
const PROMPT: &str = "What is the capital of France?";

fn model_path() -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let path = dir.join(MODEL_FILE);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set SHOAL_MODELS_DIR)",
        path.display()
    );
    path
}

/// A `shoal serve --peer-port 0` process; killed when dropped.
struct Node {
    child: Child,
    peer_addr: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["serve", "--model"])
            .arg(model_path())
            .args(["--host", "127.0.0.1", "--port", "0", "--peer-port", "0"])
            .env_remove("SHOAL_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start shoal serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        // Keep draining stderr after the line is found so the process never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("peer port listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_owned());
                    }
                }
            }
        });
        let mut node = Node {
            child,
            peer_addr: String::new(),
        };
        node.peer_addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("`peer port listening on` line from shoal serve");
        node
    }
}

fn shoal_run(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("run")
        .arg("--model")
        .arg(model_path())
        .args(["--prompt", PROMPT, "--max-tokens", "24"])
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

fn ring_args<'a>(nodes: &'a [Node], split: &'a str) -> Vec<&'a str> {
    let mut args = Vec::new();
    for n in nodes {
        args.push("--peer");
        args.push(n.peer_addr.as_str());
    }
    args.push("--split");
    args.push(split);
    args
}

#[test]
fn three_stage_ring_of_processes_matches_single_process() {
    let nodes = [Node::start(), Node::start()];
    let single = stdout_ok(&shoal_run(&[]));
    assert!(!single.trim().is_empty(), "the model said nothing");
    let ring = stdout_ok(&shoal_run(&ring_args(&nodes, "0-9,10-19,20-29")));
    assert_eq!(ring, single);
}

#[test]
fn two_stage_ring_of_processes_matches_single_process() {
    let nodes = [Node::start()];
    let single = stdout_ok(&shoal_run(&[]));
    let ring = stdout_ok(&shoal_run(&ring_args(&nodes, "0-14,15-29")));
    assert_eq!(ring, single);
}

#[test]
fn sampled_ring_matches_single_process_for_the_same_seed() {
    let nodes = [Node::start(), Node::start()];
    let sampling = ["--temperature", "0.8", "--seed", "7"];
    let single = stdout_ok(&shoal_run(&sampling));
    let greedy = stdout_ok(&shoal_run(&[]));
    assert_ne!(single, greedy, "the seeded run should differ from greedy");
    let mut args = sampling.to_vec();
    args.extend(ring_args(&nodes, "0-9,10-19,20-29"));
    let ring = stdout_ok(&shoal_run(&args));
    assert_eq!(ring, single);
}

#[test]
fn split_with_the_wrong_number_of_ranges_fails_clearly() {
    let nodes = [Node::start()];
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
    let nodes = [Node::start()];
    let greedy = stdout_ok(&shoal_run(&[]));
    // A stop string from the middle of the greedy answer.
    let words: Vec<&str> = greedy.split_whitespace().collect();
    let stop = words.get(words.len() / 2).copied().unwrap_or("the");
    let single = stdout_ok(&shoal_run(&["--stop", stop]));
    let mut args = vec!["--stop", stop];
    args.extend(ring_args(&nodes, "0-14,15-29"));
    let ring = stdout_ok(&shoal_run(&args));
    assert_eq!(ring, single);
    assert!(
        ring.len() < greedy.len(),
        "the stop string ended the answer"
    );

    let mut args = vec!["--activations", "f16"];
    args.extend(ring_args(&nodes, "0-14,15-29"));
    let f16 = stdout_ok(&shoal_run(&args));
    assert!(!f16.trim().is_empty());
}
