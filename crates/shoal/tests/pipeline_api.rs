//! Pipeline mode behind the OpenAI API, with real processes on 127.0.0.1: stage nodes
//! (`shoal serve --peer-port 0`) and a head (`shoal serve --peer … --split …`) that answers
//! chat completions through the ring. Every answer must equal the single-process server's
//! (f32 activations, the default, are exact): greedy on the golden chat cases of both test
//! models, and sampled with a fixed seed; tool calls, `n` > 1 and the agents' Python suite
//! (tests/python/test_agent_api.py) through a Qwen ring.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{chat_text, http, metric, model_path, Server, QWEN05, SMOLLM2};
use serde_json::{json, Value};

/// The golden chat conversations of a model (`tests/golden`, or `SHOAL_GOLDEN_DIR`).
fn golden_chats(golden_file: &str) -> Vec<Value> {
    let dir = std::env::var_os("SHOAL_GOLDEN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::workspace_root().join("tests/golden"));
    let text = std::fs::read_to_string(dir.join(golden_file)).expect("golden file");
    let golden: Value = serde_json::from_str(&text).unwrap();
    golden["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["messages"].clone())
        .collect()
}

/// A ring of as many stages as `split` has ranges: the head and one stage node per range
/// after the first.
fn ring(model: &str, split: &str) -> (Server, Vec<Server>) {
    let n = split.split(',').count();
    ring_of(
        model,
        n - 1,
        &["--peer-port", "0"],
        &["--peer-port", "0", "--split", split],
    )
}

/// A head (`head_flags` plus `--peer` for each node, once healthy) over `n_nodes` stage
/// nodes started with `node_flags`.
fn ring_of(
    model: &str,
    n_nodes: usize,
    node_flags: &[&str],
    head_flags: &[&str],
) -> (Server, Vec<Server>) {
    let nodes: Vec<Server> = (0..n_nodes)
        .map(|_| Server::start(&model_path(model), node_flags))
        .collect();
    let peers: Vec<String> = nodes.iter().map(Server::peer).collect();
    let mut args = head_flags.to_vec();
    for p in &peers {
        args.extend(["--peer", p.as_str()]);
    }
    let head = Server::start(&model_path(model), &args);
    head.wait_healthy();
    (head, nodes)
}

/// Stage nodes that hold only their layers.
const STAGE_ONLY: [&str; 3] = ["--peer-port", "0", "--stage-only"];

fn body(messages: &Value, max_tokens: usize, sampling: Value) -> String {
    let mut b = json!({
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    if let (Some(b), Some(s)) = (b.as_object_mut(), sampling.as_object()) {
        b.extend(s.clone());
    }
    b.to_string()
}

/// The streamed text of a chat completion, pieced together from its SSE chunks.
fn streamed_text(server: &Server, body: &str) -> String {
    let mut request: Value = serde_json::from_str(body).unwrap();
    request["stream"] = json!(true);
    let r = http(
        server.addr,
        "POST",
        "/v1/chat/completions",
        Some(&request.to_string()),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.trim_end().ends_with("data: [DONE]"), "{}", r.body);
    r.body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The head guesses by prompt lookup (`--lookup`, issue #17) and the ring verifies the
/// guesses: the answers are still the single process's.
#[test]
fn smollm2_three_stage_head_answers_like_a_single_process() {
    let single = Server::start(&model_path(SMOLLM2), &[]);
    let (head, _nodes) = ring_of(
        SMOLLM2,
        2,
        &["--peer-port", "0"],
        &["--peer-port", "0", "--split", "0-9,10-19,20-29", "--lookup"],
    );
    single.wait_healthy();
    for messages in golden_chats("smollm2-135m-instruct-q4_1.json") {
        let b = body(&messages, 48, json!({}));
        let want = chat_text(single.addr, &b);
        assert!(!want.trim().is_empty());
        assert_eq!(chat_text(head.addr, &b), want, "greedy, {messages}");
    }
    // Sampling with a fixed seed, a stop string, and streaming.
    let messages = json!([{"role": "user", "content": "Write a short poem about the sea."}]);
    let sampled = body(&messages, 40, json!({"temperature": 0.8, "seed": 7}));
    let want = chat_text(single.addr, &sampled);
    assert_eq!(chat_text(head.addr, &sampled), want, "sampled");
    assert_eq!(streamed_text(&head, &sampled), want, "streamed");
    let word = want.split_whitespace().nth(3).unwrap_or("the").to_owned();
    let stopped = body(
        &messages,
        40,
        json!({"temperature": 0.8, "seed": 7, "stop": [word]}),
    );
    let want_stopped = chat_text(single.addr, &stopped);
    assert!(want_stopped.len() < want.len());
    assert_eq!(chat_text(head.addr, &stopped), want_stopped, "stop string");
    // An answer that copies its prompt: the head's guesses were verified, and some kept.
    let copy = json!([{"role": "user", "content":
        "Copy this Python code exactly:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b"}]);
    let b = body(&copy, 48, json!({}));
    assert_eq!(
        chat_text(head.addr, &b),
        chat_text(single.addr, &b),
        "guessed"
    );
    assert!(metric(head.addr, "shoal_draft_accepted_tokens_total") > 0.0);
    // Embeddings through the ring (wire protocol 11): the last stage sends the normed rows
    // back and the head pools them, so the vectors are the single process's, bit for bit —
    // a short text, and one of more than one prompt chunk (512 tokens), OpenAI's and
    // Ollama's endpoints alike.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(70);
    let models: Value =
        serde_json::from_str(&http(head.addr, "GET", "/v1/models", None).unwrap().body).unwrap();
    let input = json!({"model": models["data"][0]["id"], "input": ["hello", long]}).to_string();
    for path in ["/v1/embeddings", "/api/embed"] {
        let embed = |server: &Server| {
            let r = http(server.addr, "POST", path, Some(&input)).unwrap();
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            serde_json::from_str::<Value>(&r.body).unwrap()
        };
        let (want, got) = (embed(&single), embed(&head));
        let vectors = |v: &Value| match path {
            "/api/embed" => v["embeddings"].clone(),
            _ => json!(v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["embedding"].clone())
                .collect::<Vec<_>>()),
        };
        assert_eq!(vectors(&got), vectors(&want), "{path}");
        assert_eq!(vectors(&got).as_array().unwrap().len(), 2);
        let tokens = match path {
            "/api/embed" => got["prompt_eval_count"].as_u64().unwrap(),
            _ => got["usage"]["prompt_tokens"].as_u64().unwrap(),
        };
        assert!(tokens > 512, "{path}: the long text is {tokens} tokens");
    }
}

#[test]
fn qwen_two_stage_head_answers_like_a_single_process() {
    let single = Server::start(&model_path(QWEN05), &[]);
    let (head, _nodes) = ring(QWEN05, "0-11,12-23");
    single.wait_healthy();
    for messages in golden_chats("qwen2.5-coder-0.5b-instruct.json") {
        let b = body(&messages, 24, json!({}));
        let want = chat_text(single.addr, &b);
        assert_eq!(chat_text(head.addr, &b), want, "greedy, {messages}");
    }

    // Tool calls go through the ring as through one process (rendered by the template,
    // read back on the head), forced ones too (the last stage keeps to the call's grammar).
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let ask = |extra: Value| {
        let mut b = json!({
            "messages": [{"role": "user", "content": "What is the weather in Paris now?"}],
            "max_tokens": 60, "temperature": 0, "tools": tools,
        });
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    let call = |server: &Server, extra: Value| {
        let r = http(
            server.addr,
            "POST",
            "/v1/chat/completions",
            Some(&ask(extra)),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        v["choices"][0]["message"]["tool_calls"][0]["function"].clone()
    };
    assert_eq!(call(&head, json!({})), call(&single, json!({})));
    let forced = json!({"tool_choice": "required"});
    assert_eq!(call(&head, forced.clone()), call(&single, forced));

    // `n` > 1: each choice as the single process draws it (the i-th with seed + i).
    let choices = |server: &Server| {
        let b = json!({"messages": [{"role": "user", "content": "Name a colour."}],
                       "max_tokens": 12, "temperature": 0.9, "seed": 7, "n": 3});
        let v = common::chat(server.addr, &b.to_string());
        let texts: Vec<Value> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].clone())
            .collect();
        assert_eq!(texts.len(), 3, "{v}");
        texts
    };
    assert_eq!(choices(&head), choices(&single));

    // What agents need, through the ring, seen by the official `openai` client: streamed
    // tool calls, two calls in one answer, a tool's result answered, forced calls,
    // json_schema output, a clamped max_tokens (tests/python/test_agent_api.py).
    let status = std::process::Command::new("python3")
        .arg("tests/python/test_agent_api.py")
        .current_dir(common::workspace_root())
        .env("SHOAL_BASE_URL", format!("http://{}/v1", head.addr))
        .env("SHOAL_SEEDS", "5")
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_agent_api.py through a ring failed"
    );
}

#[test]
fn head_reports_a_bad_split_on_health_and_requests() {
    let node = Server::start(&model_path(SMOLLM2), &["--peer-port", "0"]);
    let peer = node.peer();
    let head = Server::start(
        &model_path(SMOLLM2),
        &["--peer", peer.as_str(), "--split", "0-9,10-19,20-29"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = http(head.addr, "GET", "/health", None).unwrap();
        assert_eq!(r.status, 503);
        if r.body.contains("--split has 3 ranges") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", r.body);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let r = http(
        head.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body(
            &json!([{"role": "user", "content": "hi"}]),
            4,
            json!({}),
        )),
    )
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("--split has 3 ranges"), "{}", r.body);
}

#[test]
fn a_head_started_before_its_stage_keeps_trying_and_answers_once_the_stage_is_up() {
    // The head's peer is not a stage yet: at its address something that accepts and hangs
    // up (a fake at the edge: a node restarting, or another program on the port), so every
    // try to set the ring up fails — and the head must not give up on it.
    use std::sync::atomic::{AtomicBool, Ordering};
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let peer = format!("127.0.0.1:{port}");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let hanging_up = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for conn in squatter.incoming() {
                drop(conn);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
        })
    };
    let head = Server::start(
        &model_path(SMOLLM2),
        &["--peer", peer.as_str(), "--split", "0-14,15-29"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let waiting = loop {
        let r = http(head.addr, "GET", "/health", None).unwrap();
        assert_eq!(r.status, 503, "{}", r.body);
        if r.body.contains("trying again in") {
            break r.body;
        }
        assert!(std::time::Instant::now() < deadline, "{}", r.body);
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(waiting.contains(&peer), "says which peer: {waiting}");
    let messages = json!([{"role": "user", "content": "Name three colours."}]);
    let b = body(&messages, 24, json!({}));
    let r = http(head.addr, "POST", "/v1/chat/completions", Some(&b)).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("trying again in"), "{}", r.body);

    // The port is let go and a stage comes up on it (a few tries later): the head sets the
    // ring up and answers as a single process does.
    std::thread::sleep(std::time::Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(&peer);
    hanging_up.join().unwrap();
    let port = port.to_string();
    let _stage = Server::start(
        &model_path(SMOLLM2),
        &["--peer-port", port.as_str(), "--stage-only"],
    );
    let single = Server::start(&model_path(SMOLLM2), &[]);
    head.wait_healthy();
    single.wait_healthy();
    assert_eq!(chat_text(head.addr, &b), chat_text(single.addr, &b));
}

#[test]
fn a_peer_that_is_no_address_fails_for_good_and_says_so() {
    // No later try can read `stage-one` as HOST:PORT: the head fails (it does not say
    // "trying again"). With a swarm key: without one, a peer that is not on this machine is
    // refused before anything starts.
    let key = "11".repeat(32);
    let head = Server::start(
        &model_path(SMOLLM2),
        &[
            "--peer",
            "stage-one",
            "--split",
            "0-14,15-29",
            "--swarm-key",
            key.as_str(),
            "--peer-port",
            "0",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = http(head.addr, "GET", "/health", None).unwrap();
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(!r.body.contains("trying again"), "{}", r.body);
        if r.body.contains("expected HOST:PORT") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", r.body);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Streams a chat completion; after `after` content chunks calls `midway` once; returns the
/// whole streamed text.
fn stream_with(server: &Server, body: &str, after: usize, midway: impl FnOnce()) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut request: Value = serde_json::from_str(body).unwrap();
    request["stream"] = json!(true);
    let request = request.to_string();
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{request}",
        request.len()
    )
    .unwrap();
    let mut midway = Some(midway);
    let mut chunks = 0;
    let mut text = String::new();
    let mut done = false;
    for line in BufReader::new(stream).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "the stream failed: {v}");
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
            chunks += 1;
            if chunks == after {
                if let Some(f) = midway.take() {
                    f();
                }
            }
        }
    }
    assert!(done, "the stream ended without [DONE]");
    assert!(midway.is_none(), "the answer ended before the kill");
    text
}

#[test]
fn a_stage_killed_mid_answer_does_not_change_the_answer() {
    let single = Server::start(&model_path(SMOLLM2), &[]);
    let (head, mut nodes) = ring(SMOLLM2, "0-9,10-19,20-29");
    single.wait_healthy();
    let messages =
        json!([{"role": "user", "content": "Tell me a long story about a brave dragon."}]);
    let b = body(&messages, 160, json!({}));
    let want = chat_text(single.addr, &b);
    let got = stream_with(&head, &b, 5, || nodes[1].kill());
    assert_eq!(got, want);
    // The head serves on, on what is left.
    assert_eq!(chat_text(head.addr, &b), want);
    drop(nodes);
}

#[test]
fn stage_only_nodes_hold_their_layers_and_answer_nothing_themselves() {
    let single = Server::start(&model_path(QWEN05), &[]);
    let (head, nodes) = ring_of(QWEN05, 2, &STAGE_ONLY, &["--split", "0-7,8-15,16-23"]);
    single.wait_healthy();
    let messages = json!([{"role": "user", "content": "Write a haiku about rivers."}]);
    let b = body(&messages, 24, json!({}));
    let want = chat_text(single.addr, &b);
    assert_eq!(chat_text(head.addr, &b), want);

    let health = http(nodes[0].addr, "GET", "/health", None).unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    assert!(health.body.contains("stage-only"), "{}", health.body);
    let r = http(nodes[0].addr, "POST", "/v1/chat/completions", Some(&b)).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("head"), "{}", r.body);

    // Idle stages park: after serving, a stage process burns (almost) no CPU while it
    // waits, so co-located stages do not starve each other.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before: Vec<u64> = nodes.iter().map(|n| n.cpu_ticks()).collect();
    std::thread::sleep(std::time::Duration::from_secs(2));
    for (n, before) in nodes.iter().zip(before) {
        let used = n.cpu_ticks() - before;
        assert!(used <= 10, "an idle stage used {used} ticks of CPU in 2 s");
    }

    // The middle stage holds a third of the layers and no embedding or head.
    let whole = single.peak_rss_kib();
    let middle = nodes[0].peak_rss_kib();
    eprintln!("peak RSS: whole model {whole} KiB, middle stage {middle} KiB");
    assert!(
        (middle as f64) <= 0.45 * whole as f64,
        "a third of the layers took {middle} KiB against {whole} KiB for the whole model"
    );
}

/// Issue #15 item 4: a node that runs the whole model (an agent) and also serves a stage of
/// it shares the layers instead of loading them again (before, such a node peaked at 1.17×
/// a whole-model process).
#[test]
fn a_node_that_runs_the_model_shares_its_layers_with_the_stage_it_serves() {
    let single = Server::start(&model_path(QWEN05), &[]);
    let node = Server::start(&model_path(QWEN05), &["--peer-port", "0"]);
    node.wait_healthy();
    single.wait_healthy();
    let peer = node.peer();
    let head = Server::start(
        &model_path(QWEN05),
        &["--peer", peer.as_str(), "--split", "0-5,6-23"],
    );
    head.wait_healthy();
    let messages = json!([{"role": "user", "content": "Write a haiku about rivers."}]);
    let b = body(&messages, 24, json!({}));
    let want = chat_text(single.addr, &b);
    assert_eq!(chat_text(head.addr, &b), want, "through the ring");
    assert_eq!(chat_text(node.addr, &b), want, "the node itself");
    // Log-probabilities through the ring are the single process's, to the bit (f32
    // activations), whichever stage draws the token.
    let lp = |addr| {
        let r = http(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&body(
                &messages,
                12,
                json!({"logprobs": true, "top_logprobs": 2}),
            )),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        v["choices"][0]["logprobs"].clone()
    };
    let through_ring = lp(head.addr);
    assert_eq!(through_ring["content"].as_array().map(Vec::len), Some(12));
    assert_eq!(through_ring, lp(single.addr));
    // Constrained answers — JSON of a schema, a forced tool call, `ignore_eos` — are drawn
    // by the last stage as the single process draws them.
    let weather = json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"]
            }
        }
    });
    let schema = json!({
        "type": "object",
        "properties": {"haiku": {"type": "string", "maxLength": 60}},
        "required": ["haiku"],
        "additionalProperties": false
    });
    let weather_question = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    for (extra, max_tokens) in [
        (json!({"ignore_eos": true}), 20),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "h", "schema": schema}}}),
            48,
        ),
        (json!({"response_format": {"type": "json_object"}}), 24),
        (
            json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            40,
        ),
    ] {
        let answer = |addr| {
            let r = http(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(&body(
                    if extra.get("tools").is_some() {
                        &weather_question
                    } else {
                        &messages
                    },
                    max_tokens,
                    extra.clone(),
                )),
            )
            .unwrap();
            assert_eq!(r.status, 200, "{extra}: {}", r.body);
            let v: Value = serde_json::from_str(&r.body).unwrap();
            let choice = &v["choices"][0];
            let mut message = choice["message"].clone();
            // Tool call ids are fresh per answer.
            for call in message["tool_calls"].as_array_mut().into_iter().flatten() {
                call["id"] = Value::Null;
            }
            (message, choice["finish_reason"].clone(), v["usage"].clone())
        };
        let want = answer(single.addr);
        assert_eq!(answer(head.addr), want, "{extra}");
        if extra.get("tool_choice").is_some() {
            assert_eq!(
                want.0["tool_calls"][0]["function"]["name"], "get_weather",
                "{want:?}"
            );
        }
        if extra.get("ignore_eos").is_some() {
            assert_eq!(want.2["completion_tokens"], max_tokens, "{want:?}");
        }
    }
    let (whole, both) = (single.peak_rss_kib(), node.peak_rss_kib());
    eprintln!("peak RSS: whole model {whole} KiB, whole model and a stage {both} KiB");
    assert!(
        (both as f64) <= 1.08 * whole as f64,
        "the stage loaded its layers again: {both} KiB against {whole} KiB"
    );
}

#[test]
fn split_auto_plans_from_measured_profiles_and_answers_the_same() {
    let single = Server::start(&model_path(QWEN05), &[]);
    // The head offers too little memory for the whole model: the planner must use peers.
    let (head, nodes) = ring_of(
        QWEN05,
        2,
        &STAGE_ONLY,
        &["--split", "auto", "--plan-memory-gib", "0.25"],
    );
    single.wait_healthy();
    let messages = json!([{"role": "user", "content": "Write a haiku about rivers."}]);
    let b = body(&messages, 24, json!({}));
    assert_eq!(chat_text(head.addr, &b), chat_text(single.addr, &b));
    // The peers hold layers now.
    let used: usize = nodes
        .iter()
        .filter(|n| n.peak_rss_kib() > 100 * 1024)
        .count();
    assert!(used >= 1, "no peer took layers");
}

#[test]
fn after_a_loss_split_auto_replans_from_fresh_profiles() {
    let single = Server::start(&model_path(QWEN05), &[]);
    // The head offers 0.25 GiB, too little for the model: whatever the ring loses, the
    // planner must keep the head within that and put the rest on the peer left.
    let (head, mut nodes) = ring_of(
        QWEN05,
        2,
        &STAGE_ONLY,
        &["--split", "auto", "--plan-memory-gib", "0.25"],
    );
    single.wait_healthy();
    let ready = head
        .printed_line("pipeline ready")
        .expect("the head says how it laid out the ring");
    // Kill a peer the ring uses (the planner may have left one out).
    let victim = (0..nodes.len())
        .find(|&i| ready.contains(&nodes[i].peer()))
        .expect("the ring uses a peer");
    let messages = json!([{"role": "user", "content": "Write a haiku about rivers."}]);
    let b = body(&messages, 32, json!({}));
    let want = chat_text(single.addr, &b);
    let got = stream_with(&head, &b, 4, || nodes[victim].kill());
    assert_eq!(got, want);
    assert!(
        head.printed("re-planned the ring from fresh profiles"),
        "the head re-planned with the planner, not by shares"
    );
    // The head serves on, on the new ring.
    assert_eq!(chat_text(head.addr, &b), want);
}
