//! End to end: what coding agents need, against the real `shoal serve` with
//! Qwen2.5-Coder-0.5B (whose chat template renders tools), driven by the official `openai`
//! Python client (tests/python/test_agent_api.py): tool calls asked for, forced and
//! streamed, a tool's result answered, `json_schema` output that parses for twenty seeds,
//! and a 32,000-token `max_tokens` clamped; then by the official `anthropic` client
//! (tests/python/test_anthropic_client.py) on `POST /v1/messages`: whole and streamed
//! answers, a tool use and its result, Anthropic-shaped errors. Then the same through a
//! swarm head with two agents (tests/python/test_swarm_api.py as well): every request goes
//! to the agents whole and one agent's answer comes back. And Qwen2.5-Coder-1.5B's two
//! calls in one answer, each a call of its own (with `parallel_tool_calls: false`, one).
//!
//! Needs `python3` with the `openai` and `anthropic` packages and the models
//! (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{http, model_path, workspace_root, QWEN05};

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

    // Fill in the middle, as editors' code completion asks: OpenAI's `suffix`, then
    // Ollama's. The model writes the body between the signature and the call.
    let body = serde_json::json!({
        "prompt": "def add(a, b):\n    ",
        "suffix": "\n\nprint(add(2, 3))\n",
        "max_tokens": 24,
        "temperature": 0,
    });
    let answer = post_json(server.addr, "/v1/completions", &body);
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("return a + b"), "{text:?}");
    let body = serde_json::json!({
        "model": "qwen2.5-coder-0.5b-instruct",
        "prompt": "def is_even(n):\n    ",
        "suffix": "\n\nassert is_even(4)\n",
        "stream": false,
        "options": {"temperature": 0, "num_predict": 24},
    });
    let answer = post_json(server.addr, "/api/generate", &body);
    let text = answer["response"].as_str().unwrap();
    assert!(text.starts_with("return n % 2 == 0"), "{text:?}");
    let body = r#"{"model": "qwen2.5-coder-0.5b-instruct"}"#;
    let shown = post_json(
        server.addr,
        "/api/show",
        &serde_json::from_str(body).unwrap(),
    );
    assert_eq!(
        shown["capabilities"],
        serde_json::json!(["completion", "tools", "insert"])
    );

    // llama-server's `/infill` (llama.vscode, llama.vim): whole, then streamed in its
    // chunks, which add up to the same text; another file given for context.
    let request = |stream: bool| {
        serde_json::json!({
            "input_prefix": "def add(a, b):\n",
            "prompt": "    ",
            "input_suffix": "\n\nprint(add(2, 3))\n",
            "input_extra": [{"filename": "util.py", "text": "def one():\n    return 1\n"}],
            "n_predict": 12,
            "temperature": 0,
            "stream": stream,
        })
    };
    let whole = post_json(server.addr, "/infill", &request(false));
    let content = whole["content"].as_str().unwrap();
    assert!(content.starts_with("return a + b"), "{content:?}");
    assert_eq!(whole["stop"], true);
    assert!(["eos", "limit"].contains(&whole["stop_type"].as_str().unwrap()));
    assert!(whole["tokens_predicted"].as_u64().unwrap() > 0);
    let r = http(
        server.addr,
        "POST",
        "/infill",
        Some(&request(true).to_string()),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let chunks: Vec<serde_json::Value> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, content);
    let last = chunks.last().unwrap();
    assert_eq!(last["stop"], true);
    assert_eq!(last["tokens_predicted"], whole["tokens_predicted"]);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["stop"] == false));
    // `n_predict: 0`, as editors send context ahead to warm the cache: no text.
    let warm = serde_json::json!({"input_prefix": "x = 1\n", "input_suffix": "", "n_predict": 0});
    let warmed = post_json(server.addr, "/infill", &warm);
    assert_eq!(warmed["content"], "");
    assert_eq!(warmed["tokens_predicted"], 0);
}

/// POSTs `body` to `path`; the answer, which must be a 200 with a JSON body.
fn post_json(
    addr: std::net::SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let r = http(addr, "POST", path, Some(&body.to_string())).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[test]
fn two_calls_in_one_answer_each_come_back_as_a_call() {
    // The 0.5B model makes one call at a time; Qwen2.5-Coder-1.5B makes two when asked for
    // two things.
    let server = common::Server::start(&model_path("qwen2.5-coder-1.5b-instruct.gguf"), &[]);
    server.wait_healthy();
    let status = Command::new("python3")
        .args([
            "tests/python/test_agent_api.py",
            "ToolCalls.test_two_calls_in_one_answer",
        ])
        .current_dir(workspace_root())
        .env("SHOAL_BASE_URL", format!("http://{}/v1", server.addr))
        .env("SHOAL_TWO_CALLS", "1")
        .status()
        .expect("python3 runs");
    assert!(status.success(), "the two-call test failed");
}

#[test]
fn agent_api_through_a_swarm() {
    let model = model_path(QWEN05);
    let agents: Vec<common::Server> = (0..2)
        .map(|_| common::Server::start(&model, &["--peer-port", "0"]))
        .collect();
    for agent in &agents {
        agent.wait_healthy();
    }
    let mut args = Vec::new();
    for agent in &agents {
        args.extend(["--peer".to_owned(), agent.peer()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let head = common::Server::start(&model, &args);
    head.wait_healthy();

    let base_url = format!("http://{}/v1", head.addr);
    let status = Command::new("python3")
        .arg("tests/python/test_swarm_api.py")
        .current_dir(workspace_root())
        .env("SHOAL_BASE_URL", &base_url)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "tests/python/test_swarm_api.py failed");

    // The single-node suite, with the strongest agent answering each request (fewer
    // seeds: each request also crosses the head).
    let status = Command::new("python3")
        .arg("tests/python/test_agent_api.py")
        .current_dir(workspace_root())
        .env("SHOAL_BASE_URL", &base_url)
        .env("SHOAL_MODEL", "swarm:strongest")
        .env("SHOAL_SEEDS", "5")
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_agent_api.py through the swarm failed"
    );
}
