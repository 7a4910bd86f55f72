//! End to end: the real `shoal serve` on 127.0.0.1:0 with the SmolLM2-135M test model,
//! driven by the official `openai` Python client (tests/python/test_openai_client.py),
//! then by raw HTTP from here for what a client library hides: several clients at once,
//! and a client that hangs up mid-stream.
//!
//! Needs `python3` with the `openai` package (`pip install openai`) and the model
//! (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{chat_body, http, metric, model_path, workspace_root, SMOLLM2};

/// The test server: `shoal serve` with the default model.
fn start_server() -> common::Server {
    common::Server::start(&model_path(SMOLLM2), &[])
}

#[test]
fn openai_api_end_to_end() {
    let server = start_server();
    server.wait_healthy();
    let addr = server.addr;
    let models: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/v1/models", None).unwrap().body).unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_string();

    // The official client.
    let status = Command::new("python3")
        .arg("tests/python/test_openai_client.py")
        .current_dir(workspace_root())
        .env("SHOAL_BASE_URL", format!("http://{addr}/v1"))
        .env("SHOAL_MODEL", &model)
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_openai_client.py failed"
    );

    // Three clients at once: the engine takes them in turn, and all are answered.
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let body = chat_body(&model, &format!("Say the number {i}."), 8, i == 1);
            std::thread::spawn(move || http(addr, "POST", "/v1/chat/completions", Some(&body)))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "client {i}: {}", r.body);
        if i == 1 {
            assert!(r.body.trim_end().ends_with("data: [DONE]"), "{}", r.body);
        } else {
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        }
    }

    // Clients that hang up, mid-stream and while waiting for a whole answer: their
    // generations stop, the next client is served at once, and the server counts the
    // cancellations. (Counting never ends by itself, so only a hang-up stops it early.)
    for stream in [true, false] {
        let cancelled_before = metric(addr, "shoal_requests_cancelled_total");
        let generated_before = metric(addr, "shoal_generated_tokens_total");
        hang_up(addr, &model, stream);
        let started = Instant::now();
        let r = http(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&chat_body(&model, "Hi", 4, false)),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "after a hang-up (stream: {stream}) the next request waited {:?}",
            started.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(addr, "shoal_requests_cancelled_total") < cancelled_before + 1.0 {
            assert!(
                Instant::now() < deadline,
                "no cancellation was counted (stream: {stream})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let generated = metric(addr, "shoal_generated_tokens_total") - generated_before;
        assert!(
            generated < 1000.0,
            "{generated} tokens were generated for a client that hung up (stream: {stream})"
        );
    }
    assert_eq!(metric(addr, "shoal_requests_in_flight"), 0.0);
    assert_eq!(metric(addr, "shoal_requests_queued"), 0.0);
}

/// Asks for a long completion and closes the connection once generation is under way:
/// after the first chunk when streaming, after the first generated token otherwise.
fn hang_up(addr: SocketAddr, model: &str, stream: bool) {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = serde_json::json!({
        "model": model, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000,
        "temperature": 0, "stream": stream,
    })
    .to_string();
    let ttft_before = metric(addr, "shoal_time_to_first_token_seconds_count");
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    if stream {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains("data: {") {
            let n = socket.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended before its first chunk: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    } else {
        let deadline = Instant::now() + Duration::from_secs(120);
        while metric(addr, "shoal_time_to_first_token_seconds_count") < ttft_before + 1.0 {
            assert!(Instant::now() < deadline, "generation never started");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(socket);
}

/// `--model-draft` and `--lookup`: the answers are the plain server's, the guesses are
/// counted, and a draft model of another vocabulary keeps the node from getting ready, with
/// the reason in `/health`.
#[test]
fn speculative_decoding_answers_as_the_plain_server_does() {
    let smollm2 = model_path(SMOLLM2);
    let draft = smollm2.to_str().unwrap().to_string();
    let plain = start_server();
    let fast = common::Server::start(&smollm2, &["--model-draft", &draft, "--lookup"]);
    plain.wait_healthy();
    fast.wait_healthy();
    let model = SMOLLM2.trim_end_matches(".gguf");
    let code =
        "def area(w, h):\n    return w * h\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n";
    let prompt = format!("Rename `area` to `surface` and answer with the whole file:\n{code}");
    for stream in [false, true] {
        let body = chat_body(model, &prompt, 60, stream);
        let want = http(plain.addr, "POST", "/v1/chat/completions", Some(&body)).unwrap();
        let got = http(fast.addr, "POST", "/v1/chat/completions", Some(&body)).unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
        let text = |b: &str| -> String {
            if !stream {
                let v: serde_json::Value = serde_json::from_str(b).unwrap();
                return v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .into();
            }
            b.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .filter_map(|d| {
                    let v: serde_json::Value = serde_json::from_str(d).unwrap();
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(String::from)
                })
                .collect()
        };
        assert_eq!(text(&got.body), text(&want.body), "stream: {stream}");
    }
    let drafted = metric(fast.addr, "shoal_draft_tokens_total");
    let kept = metric(fast.addr, "shoal_draft_accepted_tokens_total");
    assert!(kept > 0.0 && drafted >= kept, "{kept} of {drafted} kept");
    assert_eq!(metric(plain.addr, "shoal_draft_tokens_total"), 0.0);

    let qwen = model_path(common::QWEN05);
    let refused = common::Server::start(&smollm2, &["--model-draft", qwen.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = http(refused.addr, "GET", "/health", None).unwrap();
        assert_eq!(r.status, 503, "{}", r.body);
        if r.body.contains("cannot draft") {
            break;
        }
        assert!(Instant::now() < deadline, "no reason given: {}", r.body);
        std::thread::sleep(Duration::from_millis(200));
    }
}
