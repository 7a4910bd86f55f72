//! End to end: what coding agents need, against the real `shoal serve` with
//! Qwen2.5-Coder-0.5B (whose chat template renders tools), driven by the official `openai`
//! Python client (tests/python/test_agent_api.py): tool calls asked for, forced and
//! streamed, a tool's result answered, `json_schema` output that parses for twenty seeds,
//! and a 32,000-token `max_tokens` clamped; then by the official `anthropic` client
//! (tests/python/test_anthropic_client.py) on `POST /v1/messages`: whole and streamed
//! answers, a tool use and its result, Anthropic-shaped errors.
//!
//! Needs `python3` with the `openai` and `anthropic` packages and the model
//! (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{model_path, workspace_root, QWEN05};

#[test]
fn agent_api_end_to_end() {
    let server = common::Server::start(&model_path(QWEN05), &[]);
    server.wait_healthy();
    let status = Command::new("python3")
        .arg("tests/python/test_agent_api.py")
        .current_dir(workspace_root())
        .env("SHOAL_BASE_URL", format!("http://{}/v1", server.addr))
        .status()
        .expect("python3 runs");
    assert!(status.success(), "tests/python/test_agent_api.py failed");

    let status = Command::new("python3")
        .arg("tests/python/test_anthropic_client.py")
        .current_dir(workspace_root())
        .env("SHOAL_ROOT_URL", format!("http://{}", server.addr))
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_anthropic_client.py failed"
    );
}
