//! Several chat completions at once through a ring of real processes on 127.0.0.1 (a head
//! and stage-only nodes): each stage batches the sessions' steps that meet there, and every
//! answer is still exactly the single-process server's answer to that request alone
//! (greedy, and sampled with a fixed seed). The stages' `/metrics` must show batches of two
//! sessions or more, so the test cannot pass without batching.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{chat_text, metric, model_path, Server, QWEN05, SMOLLM2};
use serde_json::json;

fn body(content: &str, max_tokens: usize, sampled: bool) -> String {
    let mut b = json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    if sampled {
        b["temperature"] = json!(0.8);
        b["seed"] = json!(7);
    }
    b.to_string()
}

/// Four requests (the third sampled) through a head on `split` over stage-only nodes,
/// all at once; each answer against the single process's.
fn concurrent_answers_match(model: &str, split: &str, max_tokens: usize) {
    let prompts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Tell me a short story about a brave dragon.",
        "Why is the sky blue? Answer in one sentence.",
    ];
    let bodies: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| body(p, max_tokens, i == 2))
        .collect();

    let single = Server::start(&model_path(model), &[]);
    let n_nodes = split.split(',').count() - 1;
    let nodes: Vec<Server> = (0..n_nodes)
        .map(|_| Server::start(&model_path(model), &["--peer-port", "0", "--stage-only"]))
        .collect();
    let mut args = vec!["--peer-port", "0", "--split", split];
    let peers: Vec<String> = nodes.iter().map(Server::peer).collect();
    for p in &peers {
        args.extend(["--peer", p.as_str()]);
    }
    let head = Server::start(&model_path(model), &args);
    single.wait_healthy();
    head.wait_healthy();
    let want: Vec<String> = bodies.iter().map(|b| chat_text(single.addr, b)).collect();

    let addr = head.addr;
    let runs: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| std::thread::spawn(move || chat_text(addr, &b)))
        .collect();
    for (i, (run, want)) in runs.into_iter().zip(&want).enumerate() {
        assert_eq!(&run.join().unwrap(), want, "request {i}: {}", bodies[i]);
    }

    // Every stage ran batches of several sessions (the head's own stage too).
    for (name, server) in std::iter::once(("head", &head)).chain(nodes.iter().map(|n| ("node", n)))
    {
        let shared = metric(server.addr, "shoal_stage_batches_shared_total");
        let largest = metric(server.addr, "shoal_stage_batch_sessions_max");
        let batches = metric(server.addr, "shoal_stage_batches_total");
        let sessions = metric(server.addr, "shoal_stage_batch_sessions_total");
        eprintln!(
            "{name} {}: {batches} passes, {sessions} session steps, {shared} shared, at most {largest} sessions",
            server.addr
        );
        assert!(
            shared > 0.0 && largest >= 2.0 && sessions > batches,
            "the {name} at {} never ran two sessions in one pass",
            server.addr
        );
    }
}

#[test]
fn smollm2_concurrent_requests_batch_through_three_stage_processes() {
    concurrent_answers_match(SMOLLM2, "0-9,10-19,20-29", 48);
}

#[test]
fn qwen_concurrent_requests_batch_through_three_stage_processes() {
    concurrent_answers_match(QWEN05, "0-7,8-15,16-23", 24);
}
