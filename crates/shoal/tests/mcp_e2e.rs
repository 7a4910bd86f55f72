//! End to end: `shoal mcp` started over stdio by the official MCP Python SDK
//! (tests/python/test_mcp_client.py), answering through a real `shoal serve` with the
//! SmolLM2 test model: the five tools listed with schemas, each answering (`chat` with the
//! node's own greedy answer), a node that is not there reported as a tool error.
//!
//! Needs `python3` with the `mcp` package (`pip install mcp`) and the model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{model_path, workspace_root, SMOLLM2};

#[test]
fn mcp_server_through_the_python_sdk() {
    let server = common::Server::start(&model_path(SMOLLM2), &[]);
    server.wait_healthy();
    let status = Command::new("python3")
        .arg("tests/python/test_mcp_client.py")
        .current_dir(workspace_root())
        .env("SHOAL_BIN", env!("CARGO_BIN_EXE_shoal"))
        .env("SHOAL_URL", format!("http://{}", server.addr))
        .status()
        .expect("python3 runs");
    assert!(status.success(), "tests/python/test_mcp_client.py failed");
}
