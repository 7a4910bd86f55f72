//! The router without a socket (`oneshot`): error cases that need no model, then the
//! OpenAI endpoints on the real SmolLM2-135M model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{get, model, post, post_raw, send, Answer};

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use shoal_api::{app, AppState};
use tower::ServiceExt;

const MODEL_ID: &str = "smollm2";

fn loading_app() -> (AppState, Router) {
    common::loading_app(MODEL_ID)
}

fn ready_app() -> (AppState, Router) {
    common::ready_app(MODEL_ID)
}

impl Answer {
    fn json(&self) -> Value {
        self.body_json()
    }

    /// Asserts an OpenAI error body with this status and returns its `error` object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert!(self.content_type.starts_with("application/json"));
        let body = self.json();
        let error = body["error"].clone();
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(error["type"].is_string(), "{body}");
        assert!(error.get("param").is_some(), "{body}");
        assert!(error.get("code").is_some(), "{body}");
        error
    }

    /// The `data:` payloads of an SSE body.
    fn sse_data(&self) -> Vec<String> {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.body);
        assert!(self.content_type.starts_with("text/event-stream"));
        self.body
            .split("\n\n")
            .flat_map(|event| event.lines())
            .filter_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

// ---- no model needed ----

#[tokio::test]
async fn malformed_json_is_400() {
    let (_, app) = loading_app();
    let error = post_raw(&app, "/v1/chat/completions", "{\"messages\": [")
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "invalid_json");
    post_raw(&app, "/v1/completions", "")
        .await
        .error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn invalid_fields_are_400_with_param() {
    let (_, app) = loading_app();
    let error = post(&app, "/v1/chat/completions", json!({"messages": "hi"}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "messages");
    let error = post(&app, "/v1/chat/completions", json!({"model": MODEL_ID}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "messages");
    let error = post(&app, "/v1/completions", json!({"model": MODEL_ID}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "prompt");
    let error = post(
        &app,
        "/v1/chat/completions",
        chat("hi", json!({"temperature": "hot"})),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "temperature");
    let error = post(
        &app,
        "/v1/chat/completions",
        chat("hi", json!({"temperature": 7})),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "temperature");
    let error = post(&app, "/v1/chat/completions", chat("hi", json!({"n": 17})))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "n");
    for bad in [json!(0), json!(-3)] {
        let error = post(
            &app,
            "/v1/chat/completions",
            chat("hi", json!({"max_tokens": bad})),
        )
        .await
        .error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], "max_tokens");
    }
    let error = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "messages[0].content[0].type");
}

#[tokio::test]
async fn unknown_model_is_404() {
    let (_, app) = loading_app();
    let error = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
    let error = get(&app, "/v1/models/gpt-4o")
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
}

#[tokio::test]
async fn swarm_requests_without_a_swarm_are_clear_errors() {
    let (_, app) = loading_app();
    let chat_with =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let error = post(&app, "/v1/chat/completions", chat_with("swarm"))
        .await
        .error(StatusCode::NOT_FOUND);
    assert!(
        error["message"].as_str().unwrap().contains("--peer"),
        "{error}"
    );
    let error = post(&app, "/v1/chat/completions", chat_with("swarm:bogus"))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "model");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("valid strategies"));
    // Raw prompts, plain or fill-in-the-middle, are refused in one place for both routes
    // (`/infill` reads the model's context first: a node with its model loaded).
    let (_, ready) = ready_app();
    for (app, path, request) in [
        (
            &app,
            "/v1/completions",
            json!({"model": "swarm", "prompt": "hi"}),
        ),
        (
            &ready,
            "/infill",
            json!({"model": "swarm:vote", "input_prefix": "def f():", "input_suffix": "\n"}),
        ),
    ] {
        let error = post(app, path, request)
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], "model", "{path}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("chat completions only"),
            "{path}: {error}"
        );
    }
    let error = get(&app, "/v1/swarm/status")
        .await
        .error(StatusCode::NOT_FOUND);
    assert!(
        error["message"].as_str().unwrap().contains("no swarm"),
        "{error}"
    );
    let error = post(&app, "/v1/swarm/query", json!({"query": "hi"}))
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
}

#[tokio::test]
async fn loading_and_failed_are_503() {
    let (state, app) = loading_app();
    let error = get(&app, "/health")
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(error["message"].as_str().unwrap().contains("loading"));
    post(&app, "/v1/chat/completions", chat("hi", json!({})))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    post(
        &app,
        "/v1/completions",
        json!({"prompt": "hi", "stream": true}),
    )
    .await
    .error(StatusCode::SERVICE_UNAVAILABLE);
    // The model list needs no model.
    let models = get(&app, "/v1/models").await;
    assert_eq!(models.status, StatusCode::OK);
    assert_eq!(models.json()["data"][0]["id"], MODEL_ID);

    state.set_failed("out of memory".into());
    let error = get(&app, "/health")
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(error["message"].as_str().unwrap().contains("out of memory"));
}

#[tokio::test]
async fn a_node_moving_to_another_model_asks_clients_to_wait_then_answers_under_its_id() {
    let (state, app) = ready_app();
    state.set_model_alias("auto".into());
    let ids = get(&app, "/v1/models").await.json();
    assert_eq!(ids["data"][0]["id"], MODEL_ID);
    assert_eq!(ids["data"][1]["id"], "auto");
    let ask = |model: &str| json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(&app, "/v1/chat/completions", ask("auto")).await.status,
        StatusCode::OK
    );

    // While it moves, requests are told to come back (Retry-After), not queued on the old.
    state.set_switching("moving up to qwen05 for 2 members".into());
    let res = app
        .clone()
        .oneshot(
            Request::post("/v1/chat/completions")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(ask("auto").to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers().get(header::RETRY_AFTER).unwrap(), "5");
    let error = get(&app, "/health")
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(error["message"].as_str().unwrap().contains("moving up"));

    // Moved: the new id is listed first, `auto` still answers, the old id is gone.
    state.set_ready_as(model(), "bigger".into());
    let ids = get(&app, "/v1/models").await.json();
    assert_eq!(ids["data"][0]["id"], "bigger");
    assert_eq!(ids["data"][1]["id"], "auto");
    for id in ["auto", "bigger"] {
        let answer = post(&app, "/v1/chat/completions", ask(id)).await;
        assert_eq!(answer.status, StatusCode::OK, "{id}: {}", answer.body);
    }
    post(&app, "/v1/chat/completions", ask(MODEL_ID))
        .await
        .error(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_route_and_method() {
    let (_, app) = loading_app();
    let error = get(&app, "/v1/nope").await.error(StatusCode::NOT_FOUND);
    assert!(error["message"].as_str().unwrap().contains("/v1/nope"));
    get(&app, "/v1/chat/completions")
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn api_key_is_enforced_except_on_health() {
    let state = AppState::new(MODEL_ID.into(), Some("sesame".into()));
    state.set_ready(model());
    let app = app(state);
    let with_key = |uri: &str, key: &str| {
        Request::get(uri)
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    let error = get(&app, "/v1/models")
        .await
        .error(StatusCode::UNAUTHORIZED);
    assert_eq!(error["code"], "invalid_api_key");
    send(&app, with_key("/v1/models", "wrong"))
        .await
        .error(StatusCode::UNAUTHORIZED);
    post(&app, "/v1/chat/completions", chat("hi", json!({})))
        .await
        .error(StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(&app, with_key("/v1/models", "sesame")).await.status,
        StatusCode::OK
    );
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
    // Anthropic's clients send the key as `x-api-key`: it counts like the bearer token.
    let x_api_key = |key: &str| {
        Request::get("/v1/models")
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(send(&app, x_api_key("sesame")).await.status, StatusCode::OK);
    send(&app, x_api_key("wrong"))
        .await
        .error(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn any_token_is_fine_without_a_key() {
    let (_, app) = loading_app();
    let req = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sk-whatever")
        .body(Body::empty())
        .unwrap();
    let answer = send(&app, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    let list = answer.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["object"], "model");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let (_, app) = loading_app();
    get(&app, "/health").await;
    let answer = get(&app, "/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.content_type.contains("text"));
    let text = answer.body;
    for name in [
        "shoal_requests_total",
        "shoal_prompt_tokens_total",
        "shoal_generated_tokens_total",
        "shoal_time_to_first_token_seconds",
        "shoal_decode_tokens_per_second",
        "shoal_requests_in_flight",
        "shoal_requests_queued",
        "shoal_requests_cancelled_total",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    assert_eq!(
        metric(
            &text,
            r#"shoal_requests_total{endpoint="/health",status="503"}"#
        ),
        1.0,
        "{text}"
    );
}

// ---- with the model ----

#[tokio::test]
async fn health_is_ok_when_ready() {
    let (_, app) = ready_app();
    let answer = get(&app, "/health").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!({"status": "ok", "api_key_required": false})
    );
}

#[tokio::test]
async fn chat_completion_whole() {
    let (_, app) = ready_app();
    let answer = post(
        &app,
        "/v1/chat/completions",
        chat("What is the capital of France?", json!({"max_tokens": 16})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL_ID);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let usage = &body["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(prompt > 5);
    assert!((1..=16).contains(&completion));
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
}

#[tokio::test]
async fn chat_completion_streamed() {
    let (_, app) = ready_app();
    let request = chat(
        "Count from 1 to 5.",
        json!({"max_tokens": 12, "stream": true}),
    );
    let whole = post(&app, "/v1/chat/completions", {
        let mut r = request.clone();
        r["stream"] = json!(false);
        r
    })
    .await
    .json();

    let data = post(&app, "/v1/chat/completions", request.clone())
        .await
        .sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{data:?}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(c.get("usage").is_none(), "no usage chunk unless asked: {c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(last["choices"][0]["delta"], json!({}));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // With include_usage: one more chunk, choices empty, usage set.
    let mut request = request;
    request["stream_options"] = json!({"include_usage": true});
    let data = post(&app, "/v1/chat/completions", request).await.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
}

#[tokio::test]
async fn completions_whole_and_streamed() {
    let (_, app) = ready_app();
    let request = json!({"model": MODEL_ID, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0});
    let whole = post(&app, "/v1/completions", request.clone()).await;
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.body);
    let whole = whole.json();
    assert_eq!(whole["object"], "text_completion");
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 8);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let data = post(&app, "/v1/completions", streamed).await.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"], whole["usage"]);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // Token ids work as a prompt too, and give the same text.
    let ids = model().encode_prompt("The quick brown fox").unwrap();
    let by_ids = post(
        &app,
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 8, "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(by_ids["choices"][0]["text"], whole["choices"][0]["text"]);
}

#[tokio::test]
async fn greedy_is_deterministic_and_parts_equal_strings() {
    let (_, app) = ready_app();
    let request = chat(
        "Write a haiku about the sea.",
        json!({"max_tokens": 24, "seed": 7}),
    );
    let a = post(&app, "/v1/chat/completions", request.clone())
        .await
        .json();
    let b = post(&app, "/v1/chat/completions", request).await.json();
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);

    let parts = json!({
        "model": MODEL_ID,
        "temperature": 0,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}],
    });
    let c = post(&app, "/v1/chat/completions", parts).await.json();
    assert_eq!(a["choices"][0]["message"], c["choices"][0]["message"]);
}

#[tokio::test]
async fn stop_strings_cut_the_text() {
    let (_, app) = ready_app();
    let request = json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 20, "temperature": 0});
    let free = post(&app, "/v1/completions", request.clone()).await.json();
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.contains(" 8"), "{text}");
    for stop in [json!(" 8"), json!(["nope", " 8"])] {
        let mut r = request.clone();
        r["stop"] = stop;
        let cut = post(&app, "/v1/completions", r).await.json();
        let expected = &text[..text.find(" 8").unwrap()];
        assert_eq!(cut["choices"][0]["text"], expected);
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn context_limits_are_400() {
    let (_, app) = ready_app();
    let context = model().config().context_length;
    let long = "hello ".repeat(context + 100);
    let error = post(&app, "/v1/chat/completions", chat(&long, json!({})))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "context_length_exceeded");
    let error = post(
        &app,
        "/v1/completions",
        json!({"prompt": long, "stream": true}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "context_length_exceeded");
    let error = post(&app, "/v1/completions", json!({"prompt": [999_999_999u32]}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "prompt");
}

#[tokio::test]
async fn concurrent_requests_queue_and_all_succeed() {
    let (_, app) = ready_app();
    let requests = (0..3).map(|i| {
        let app = app.clone();
        tokio::spawn(async move {
            post(
                &app,
                "/v1/chat/completions",
                chat(&format!("Say the number {i}."), json!({"max_tokens": 8})),
            )
            .await
        })
    });
    for answer in futures::future::join_all(requests).await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert!(
            answer.json()["usage"]["completion_tokens"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
    let metrics = get(&app, "/metrics").await.body;
    assert_eq!(
        metric(&metrics, "shoal_requests_in_flight"),
        0.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "shoal_requests_queued"), 0.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            r#"shoal_requests_total{endpoint="/v1/chat/completions",status="200"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(&metrics, "shoal_time_to_first_token_seconds_count"),
        3.0
    );
}

#[tokio::test]
async fn a_dropped_stream_stops_its_generation() {
    let (_, app) = ready_app();
    let request = Request::post("/v1/completions")
        .body(Body::from(
            json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000, "stream": true, "temperature": 0})
                .to_string(),
        ))
        .unwrap();
    let res = app.clone().oneshot(request).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().starts_with("data: "));
    drop(body);

    // The engine is free again almost at once, not after 4000 tokens.
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        post(
            &app,
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 2}),
        ),
    )
    .await
    .expect("the next request is served");
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    let metrics = get(&app, "/metrics").await.body;
    assert_eq!(
        metric(&metrics, "shoal_requests_cancelled_total"),
        1.0,
        "{metrics}"
    );
    let generated = metric(&metrics, "shoal_generated_tokens_total");
    assert!(
        generated < 200.0,
        "{generated} tokens generated for a dropped stream"
    );
}

/// A `max_tokens` beyond the room left is cut to that room (as llama-server and Ollama do;
/// opencode asks for 32000), and the answer ends with "length" when the room runs out.
#[tokio::test]
async fn a_large_max_tokens_is_clamped_to_the_room_left() {
    let (_, app) = ready_app();
    let context = model().config().context_length;
    // A prompt that leaves room for three tokens, and an answer that may not end early.
    let ids = model().encode_prompt("The sea").unwrap();
    let prompt: Vec<u32> = ids.iter().copied().cycle().take(context - 3).collect();
    let body = post(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 32000, "ignore_eos": true, "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");

    // A short question with the same huge limit is simply answered.
    let body = post(
        &app,
        "/v1/chat/completions",
        chat("Say hi.", json!({"max_tokens": 32000})),
    )
    .await
    .json();
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
}

/// `ignore_eos` runs the answer to `max_tokens` where the model would have stopped.
#[tokio::test]
async fn ignore_eos_runs_to_max_tokens() {
    let (_, app) = ready_app();
    let short = post(
        &app,
        "/v1/chat/completions",
        chat("Say hi.", json!({"max_tokens": 64})),
    )
    .await
    .json();
    assert_eq!(short["choices"][0]["finish_reason"], "stop", "{short}");
    let stopped_at = short["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(stopped_at < 64);
    let long = post(
        &app,
        "/v1/chat/completions",
        chat("Say hi.", json!({"max_tokens": 64, "ignore_eos": true})),
    )
    .await
    .json();
    assert_eq!(long["choices"][0]["finish_reason"], "length", "{long}");
    assert_eq!(long["usage"]["completion_tokens"], 64);
    let (a, b) = (
        short["choices"][0]["message"]["content"].as_str().unwrap(),
        long["choices"][0]["message"]["content"].as_str().unwrap(),
    );
    assert!(
        b.starts_with(a.trim_end()),
        "greedy: the same start\n{a:?}\n{b:?}"
    );
}

/// `response_format` with a JSON schema: the answer always parses and fits, whatever the
/// seed; `json_object` gives an object; a schema we cannot enforce is a 400.
#[tokio::test]
async fn response_format_json_schema_always_parses() {
    let (_, app) = ready_app();
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
        "required": ["name", "legs"],
        "additionalProperties": false
    });
    let mut whole = 0;
    for seed in 0..6 {
        let body = post(
            &app,
            "/v1/chat/completions",
            chat(
                "Describe a spider.",
                json!({
                    "temperature": 0.7, "seed": seed, "max_tokens": 160,
                    "response_format": {"type": "json_schema",
                        "json_schema": {"name": "animal", "strict": true, "schema": schema}}
                }),
            ),
        )
        .await
        .json();
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        if body["choices"][0]["finish_reason"] == "length" {
            // A 135M model may talk until max_tokens inside a string: cut, not wrong.
            assert!(text.trim_start().starts_with('{'), "{text}");
            continue;
        }
        whole += 1;
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(
            value["name"].is_string() && value["legs"].is_i64(),
            "{text}"
        );
        assert_eq!(value.as_object().unwrap().len(), 2, "{text}");
    }
    assert!(whole >= 3, "only {whole} of 6 answers were whole");
    let body = post(
        &app,
        "/v1/chat/completions",
        chat(
            "Say hi.",
            json!({"max_tokens": 60, "response_format": {"type": "json_object"}}),
        ),
    )
    .await
    .json();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    if body["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    }
    for bad in [
        json!({"type": "xml"}),
        json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "decimal"}}}),
    ] {
        let error = post(
            &app,
            "/v1/chat/completions",
            chat("hi", json!({"response_format": bad})),
        )
        .await
        .error(StatusCode::BAD_REQUEST);
        assert!(
            error["param"]
                .as_str()
                .unwrap()
                .starts_with("response_format"),
            "{error}"
        );
    }
}

fn weather_tool() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": false
            }
        }
    }])
}

/// SmolLM2's template renders no tools, so they are described in the system message; a
/// named `tool_choice` forces a call that always parses, whole and streamed alike.
#[tokio::test]
async fn a_forced_tool_call_is_returned_whole_and_streamed() {
    let (_, app) = ready_app();
    let request = chat(
        "What is the weather in Paris?",
        json!({
            "max_tokens": 60,
            "tools": weather_tool(),
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
        }),
    );
    let body = post(&app, "/v1/chat/completions", request.clone())
        .await
        .json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null(), "{body}");
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let data = post(&app, "/v1/chat/completions", streamed)
        .await
        .sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut arguments = String::new();
    let mut names = Vec::new();
    for c in &chunks {
        assert!(
            c["choices"][0]["delta"]
                .get("content")
                .is_none_or(|t| t == ""),
            "{c}"
        );
        for call in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(call["index"], 0);
            if let Some(name) = call["function"]["name"].as_str() {
                names.push(name.to_owned());
            }
            arguments.push_str(call["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(names, ["get_weather"]);
    assert_eq!(
        arguments,
        call["function"]["arguments"].as_str().unwrap(),
        "greedy: the same call"
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

/// Tool requests that cannot be right are 400s, before any generation.
#[tokio::test]
async fn malformed_tool_requests_are_400() {
    let (_, app) = ready_app();
    for (extra, param) in [
        (
            json!({"tools": [{"type": "function", "function": {}}]}),
            "tools[0].function.name",
        ),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (
            json!({"tools": weather_tool(), "tool_choice": "always"}),
            "tool_choice",
        ),
        (
            json!({"tools": weather_tool(),
                   "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": weather_tool(), "tool_choice": "required",
                   "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let error = post(&app, "/v1/chat/completions", chat("hi", extra.clone()))
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], param, "{extra}");
    }
}

/// The prompt cache through the API: a conversation's second turn reuses the first turn's
/// prompt, says so in `usage.prompt_tokens_details.cached_tokens` (and in Anthropic's
/// `cache_read_input_tokens`) and `/metrics`, and answers exactly as with `cache_prompt: false`.
#[tokio::test]
async fn a_conversations_next_turn_reuses_its_prompt() {
    let model = shoal_engine::Model::load(common::models_dir().join(common::MODEL_FILE), |_, _| {})
        .unwrap();
    model.set_prompt_cache_bytes(64 << 20);
    let state = AppState::new(MODEL_ID.into(), None);
    state.set_ready(std::sync::Arc::new(model));
    let app = app(state);
    let system = "You answer questions about geography in one short sentence. ".repeat(6);
    let mut messages = vec![
        json!({"role": "system", "content": system}),
        json!({"role": "user", "content": "What is the capital of France?"}),
    ];
    let ask = |messages: &Vec<Value>, cache_prompt: bool| {
        json!({"model": MODEL_ID, "messages": messages, "temperature": 0,
               "max_tokens": 12, "cache_prompt": cache_prompt})
    };
    let first = post(&app, "/v1/chat/completions", ask(&messages, true)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let first = first.json();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    messages.push(json!({"role": "assistant",
                         "content": first["choices"][0]["message"]["content"]}));
    messages.push(json!({"role": "user", "content": "And of Italy?"}));

    let second = post(&app, "/v1/chat/completions", ask(&messages, true))
        .await
        .json();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // All of the first prompt but the rows of its last chunk that are not whole groups.
    assert!(
        cached + 12 >= first_prompt && cached < second["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{cached} cached of a first prompt of {first_prompt}: {second}"
    );
    let fresh = post(&app, "/v1/chat/completions", ask(&messages, false))
        .await
        .json();
    assert_eq!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        second["choices"][0]["message"]["content"],
        fresh["choices"][0]["message"]["content"]
    );

    let text = get(&app, "/metrics").await.body;
    assert_eq!(
        metric(&text, "shoal_prompt_cache_hits_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "shoal_prompt_cache_reused_tokens_total"),
        cached as f64
    );
    assert!(metric(&text, "shoal_prompt_cache_bytes") > 0.0, "{text}");

    // Anthropic's usage counts the reused tokens apart from the computed ones.
    let body = json!({"model": MODEL_ID, "max_tokens": 12, "temperature": 0, "system": system,
                      "messages": &messages[1..]});
    let answer = post(&app, "/v1/messages", body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let usage = answer.json()["usage"].clone();
    let read = usage["cache_read_input_tokens"].as_u64().unwrap();
    assert!(read >= cached, "{usage}");
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{usage}");
}

#[tokio::test]
async fn apply_template_shows_the_prompt_the_model_is_given() {
    let (_, app) = ready_app();
    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    let r = post(
        &app,
        "/apply-template",
        json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let prompt = r.body_json()["prompt"].as_str().unwrap().to_owned();
    // SmolLM2's template renders no tools: they are described in a system message, in
    // the tool's own key order, and the turn of the assistant is opened.
    assert!(
        prompt.contains("<tools>\n{\"type\":\"function\",\"function\":{\"name\":\"get_weather\""),
        "{prompt}"
    );
    assert!(prompt.contains("Weather in Paris?"), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");

    let error = post(&app, "/apply-template", json!({"tools": [weather]}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "messages");
    let error = post(
        &app,
        "/apply-template",
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "tools[0].function");
    let error = post(
        &app,
        "/apply-template",
        json!({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": 3}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "chat_template_kwargs");
}

/// Every case of the model's tokenizer golden file (llama.cpp's ids, tests/golden).
fn tokenizer_golden() -> Vec<Value> {
    let dir = std::env::var_os("SHOAL_GOLDEN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/golden").into());
    let path = dir.join("smollm2-135m-instruct-q4_1.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    golden["tokenize"].as_array().unwrap().clone()
}

#[tokio::test]
async fn tokenize_answers_llama_cpp_ids_and_detokenize_gives_the_text_back() {
    let (_, app) = ready_app();
    for case in tokenizer_golden() {
        let text = case["text"].as_str().unwrap();
        let r = post(
            &app,
            "/tokenize",
            json!({"content": text, "parse_special": case["parse_special"]}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let tokens = r.body_json()["tokens"].clone();
        assert_eq!(tokens, case["ids"], "{text:?}");

        let r = post(&app, "/detokenize", json!({"tokens": tokens})).await;
        assert_eq!(r.body_json()["content"], text, "{text:?}");

        // Pieces: each token's text (or bytes, for part of a character), in order.
        let r = post(
            &app,
            "/tokenize",
            json!({"content": text, "parse_special": case["parse_special"], "with_pieces": true}),
        )
        .await;
        let mut bytes = Vec::new();
        for (piece, id) in r.body_json()["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["ids"].as_array().unwrap())
        {
            assert_eq!(&piece["id"], id);
            match &piece["piece"] {
                Value::String(s) => bytes.extend_from_slice(s.as_bytes()),
                Value::Array(b) => bytes.extend(b.iter().map(|x| x.as_u64().unwrap() as u8)),
                other => panic!("a piece is text or bytes: {other}"),
            }
        }
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
    }
}

#[tokio::test]
async fn tokenize_and_detokenize_refuse_what_is_not_text_or_ids() {
    let (_, app) = ready_app();
    let error = post(&app, "/tokenize", json!({"text": "hi"}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "content");
    for (bad, param) in [
        (json!([1, -1]), "tokens[1]"),
        (json!([49152]), "tokens[0]"),
        (json!([4294967296_i64]), "tokens[0]"),
    ] {
        let error = post(&app, "/detokenize", json!({"tokens": bad}))
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], param, "{bad}");
    }
    post(&app, "/detokenize", json!({"tokens": "12"}))
        .await
        .error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn props_show_the_template_context_and_defaults_in_effect() {
    let (_, app) = ready_app();
    let props = get(&app, "/props").await.json();
    let model = model();
    let template = model.prompt_format().template().unwrap();
    assert_eq!(props["chat_template"], template.source());
    assert_eq!(props["eos_token"], template.eos_token());
    assert_eq!(props["n_ctx"], model.config().context_length);
    assert_eq!(
        props["default_generation_settings"]["params"]["n_predict"],
        shoal_api::DEFAULT_MAX_TOKENS
    );
    assert_eq!(props["model_alias"], MODEL_ID);
}

/// The golden embedding (llama.cpp's, `tests/golden/embeddings.json`) of the model's first
/// case: its text and vector.
fn embedding_golden() -> (String, Vec<f64>) {
    let dir = std::env::var_os("SHOAL_GOLDEN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/golden").into());
    let text = std::fs::read_to_string(dir.join("embeddings.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let case = &golden["models"]["smollm2-135m-instruct-q4_1.gguf"][0];
    let vector = case["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (case["text"].as_str().unwrap().to_owned(), vector)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A JSON array of an answer's f32 values (each read back as the f32 it was written from).
fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| f64::from(x.as_f64().unwrap() as f32))
        .collect()
}

#[tokio::test]
async fn embeddings_answer_llama_cpp_vectors_in_every_shape() {
    let (_, app) = ready_app();
    let (text, want) = embedding_golden();
    let r = post(
        &app,
        "/v1/embeddings",
        json!({"model": MODEL_ID, "input": [text.clone(), "something else entirely"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let body = r.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], MODEL_ID);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let first = floats(&data[0]["embedding"]);
    assert_eq!(first.len(), want.len());
    assert!(cosine(&first, &want) > 0.999, "{}", cosine(&first, &want));
    let second = floats(&data[1]["embedding"]);
    assert!(cosine(&first, &second) < 0.99, "two texts, one vector");
    let tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 10);
    assert_eq!(body["usage"]["total_tokens"], tokens);

    // The same text as token ids, and base64 (little-endian f32s): the same vector.
    let ids = post(&app, "/tokenize", json!({"content": text}))
        .await
        .json()["tokens"]
        .clone();
    let r = post(
        &app,
        "/v1/embeddings",
        json!({"input": ids, "encoding_format": "base64"}),
    )
    .await;
    let b64 = r.json()["data"][0]["embedding"]
        .as_str()
        .unwrap()
        .to_owned();
    let bytes = base64_decode(&b64);
    let decoded: Vec<f64> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect();
    assert!(decoded == first, "base64 gives other values");

    // Ollama's endpoints: the same vectors.
    let r = post(
        &app,
        "/api/embed",
        json!({"model": format!("{MODEL_ID}:latest"), "input": text.clone()}),
    )
    .await
    .json();
    assert!(floats(&r["embeddings"][0]) == first);
    assert!(r["prompt_eval_count"].as_u64().unwrap() > 0);
    let r = post(
        &app,
        "/api/embeddings",
        json!({"model": MODEL_ID, "prompt": text}),
    )
    .await
    .json();
    assert!(floats(&r["embedding"]) == first);
}

#[tokio::test]
async fn bad_embedding_requests_get_clear_errors() {
    let (_, app) = ready_app();
    for (body, param) in [
        (json!({}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": [[]]}), "input"),
        (json!({"input": [99999999]}), "input"),
        (
            json!({"input": "hi", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "hi", "dimensions": 3}), "dimensions"),
    ] {
        let e = post(&app, "/v1/embeddings", body.clone())
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}");
    }
    let e = post(
        &app,
        "/v1/embeddings",
        json!({"model": "gpt-9", "input": "hi"}),
    )
    .await
    .error(StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "model_not_found");
    // Longer than the context: refused by OpenAI's endpoint, cut by Ollama's.
    let long = vec![1; 8193];
    let e = post(&app, "/v1/embeddings", json!({"input": long}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "context_length_exceeded");
    let r = post(&app, "/api/embed", json!({"model": MODEL_ID, "input": 7})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("input"));
    let long = "word ".repeat(9000);
    let r = post(
        &app,
        "/api/embed",
        json!({"model": MODEL_ID, "input": long, "truncate": false}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("context"));
    // Too many tokens in all: refused before the engine is asked.
    let many = vec![vec![1; 8000]; 9];
    let e = post(&app, "/v1/embeddings", json!({"input": many}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("65536"), "{e}");
    // Nothing to embed is Ollama's load request: an empty answer.
    let r = post(&app, "/api/embed", json!({"model": MODEL_ID})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["embeddings"], json!([]));
    let r = post(
        &app,
        "/api/embeddings",
        json!({"model": MODEL_ID, "prompt": ""}),
    )
    .await;
    assert_eq!(r.json()["embedding"], json!([]));
    // Ollama's default: cut to the context (8,192 tokens here), then embedded.
    let r = post(
        &app,
        "/api/embed",
        json!({"model": MODEL_ID, "input": long}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["prompt_eval_count"], 8192);
}

/// RFC 4648 base64, decoded here so the test does not share the server's encoder.
fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// SmolLM2 has no fill-in-the-middle tokens: a `suffix` gets a clear 400 (what a code
/// model writes into the gap is tested in crates/shoal/tests/agent_api.rs).
#[tokio::test]
async fn a_suffix_for_a_model_without_fim_tokens_is_refused() {
    let (_, app) = ready_app();
    let e = post(
        &app,
        "/v1/completions",
        json!({"prompt": "def f(x):\n    ", "suffix": "\nprint(f(1))", "max_tokens": 4}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "suffix");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("fill-in-the-middle"));
    let e = post(
        &app,
        "/v1/completions",
        json!({"prompt": [1, 2, 3], "suffix": "x", "max_tokens": 4}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "suffix");
    let e = post(
        &app,
        "/infill",
        json!({"input_prefix": "def f(x):\n    ", "input_suffix": "\n", "n_predict": 4}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "suffix");
    let r = post(
        &app,
        "/api/generate",
        json!({"model": MODEL_ID, "prompt": "def f(x):", "suffix": "\n", "format": "json"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("suffix"));
    // An empty suffix is no suffix.
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "suffix": "", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// Anthropic's `count_tokens`: the prompt a Messages request renders to, counted; the
/// same as the `/v1/messages` answer's input (plus what it read from the prompt cache).
#[tokio::test]
async fn count_tokens_counts_the_messages_prompt() {
    let (_, app) = ready_app();
    let request = json!({
        "model": "claude-sonnet-4-5",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Name a colour."}],
    });
    let r = post(&app, "/v1/messages/count_tokens", request.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let counted = r.json()["input_tokens"].as_u64().unwrap();
    let mut asked = request.clone();
    asked["max_tokens"] = json!(2);
    let answer = post(&app, "/v1/messages", asked).await.json();
    let usage = &answer["usage"];
    assert_eq!(
        counted,
        usage["input_tokens"].as_u64().unwrap()
            + usage["cache_read_input_tokens"].as_u64().unwrap_or(0)
    );
    // Anthropic-shaped errors for a bad body.
    let r = post(&app, "/v1/messages/count_tokens", json!({"model": "x"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["type"], "error");
}
