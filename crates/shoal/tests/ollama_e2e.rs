//! End to end: the real `shoal serve` on 127.0.0.1:0 with the SmolLM2-135M test model,
//! driven by the official `ollama` Python client (tests/python/test_ollama_client.py).
//!
//! Needs `python3` with the `ollama` package (`pip install ollama`) and the model
//! (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{http, model_path, workspace_root, SMOLLM2};

#[test]
fn ollama_api_end_to_end() {
    let server = common::Server::start(&model_path(SMOLLM2), &[]);
    server.wait_healthy();
    let addr = server.addr;
    let tags: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/api/tags", None).unwrap().body).unwrap();
    let model = tags["models"][0]["name"].as_str().unwrap().to_string();

    let status = Command::new("python3")
        .arg("tests/python/test_ollama_client.py")
        .current_dir(workspace_root())
        .env("SHOAL_OLLAMA_HOST", format!("http://{addr}"))
        .env("SHOAL_MODEL", &model)
        .env_remove("OLLAMA_HOST")
        .env_remove("OLLAMA_API_KEY")
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_ollama_client.py failed"
    );
}
