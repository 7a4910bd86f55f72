//! The Ollama API through the router without a socket (`oneshot`): errors that need no
//! model, then chat, generate and the model endpoints on the real SmolLM2-135M model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{get, post, post_raw, send, Answer};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use sha2::Digest;
use shoal_api::{app, AppState};

const MODEL_ID: &str = "smollm2-135m-instruct-q4_1";

fn loading_app() -> Router {
    common::loading_app(MODEL_ID).1
}

fn ready_app() -> Router {
    common::ready_app(MODEL_ID).1
}

impl Answer {
    fn json(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.body);
        assert!(
            self.content_type.starts_with("application/json"),
            "{}",
            self.content_type
        );
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The lines of an NDJSON stream, each parsed.
    fn lines(&self) -> Vec<Value> {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.body);
        assert_eq!(self.content_type, "application/x-ndjson");
        assert!(self.body.ends_with('\n'), "{:?}", self.body);
        self.body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
            .collect()
    }

    /// Asserts an Ollama error body, `{"error": "message"}`, with this status; returns the
    /// message.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert!(self.content_type.starts_with("application/json"));
        let body: Value = serde_json::from_str(&self.body).unwrap();
        let message = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
        assert!(!message.is_empty());
        message.to_owned()
    }
}

/// A chat request for `content` at temperature 0, with `extra` fields on top.
fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "options": {"temperature": 0, "num_predict": 24},
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// Checks the last line's totals.
fn assert_totals(last: &Value) {
    assert_eq!(last["done"], true, "{last}");
    assert!(matches!(
        last["done_reason"].as_str(),
        Some("stop" | "length")
    ));
    for key in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[key].is_u64(), "{key} in {last}");
    }
    assert!(last["prompt_eval_count"].as_u64().unwrap() > 0);
    assert!(last["eval_count"].as_u64().unwrap() > 0);
    assert!(last["total_duration"].as_u64().unwrap() > 0);
}

// ---- no model needed ----

#[tokio::test]
async fn bad_bodies_are_400_in_ollamas_shape() {
    let app = loading_app();
    post_raw(&app, "/api/chat", "{\"messages\": [")
        .await
        .error(StatusCode::BAD_REQUEST);
    post_raw(&app, "/api/generate", "")
        .await
        .error(StatusCode::BAD_REQUEST);
    let message = post(&app, "/api/chat", json!({"messages": []}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(message, "model is required");
    post(
        &app,
        "/api/chat",
        json!({"model": MODEL_ID, "messages": "hi"}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    let message = post(
        &app,
        "/api/chat",
        chat("hi", json!({"options": {"temperature": 7}})),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert!(message.contains("temperature"), "{message}");
    let message = post(
        &app,
        "/api/chat",
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "what is this?", "images": ["aGk="]}]}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert!(message.contains("images"), "{message}");
    let message = post(
        &app,
        "/api/generate",
        json!({"model": MODEL_ID, "prompt": "hi", "format": "yaml"}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert!(message.contains("format"), "{message}");
    post(
        &app,
        "/api/generate",
        json!({"model": MODEL_ID, "prompt": "hi", "raw": true, "format": "json"}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_models_are_404() {
    let app = loading_app();
    let message = post(&app, "/api/chat", chat("hi", json!({"model": "llama3"})))
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(message, "model \"llama3\" not found, try pulling it first");
    post(
        &app,
        "/api/generate",
        json!({"model": "llama3:8b", "prompt": "hi"}),
    )
    .await
    .error(StatusCode::NOT_FOUND);
    let message = post(&app, "/api/show", json!({"model": "llama3"}))
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(message, "model 'llama3' not found");
}

#[tokio::test]
async fn while_loading_requests_are_503_and_tags_list_the_model() {
    let app = loading_app();
    post(&app, "/api/chat", chat("hi", json!({})))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    let tags = get(&app, "/api/tags").await.json();
    assert_eq!(tags["models"][0]["name"], format!("{MODEL_ID}:latest"));
    let ps = get(&app, "/api/ps").await.json();
    assert_eq!(ps["models"], json!([]));
}

#[tokio::test]
async fn version_and_unsupported_endpoints() {
    let app = loading_app();
    let version = get(&app, "/api/version").await.json();
    assert!(version["version"].as_str().unwrap().starts_with("0."));
    let message = post(&app, "/api/pull", json!({"model": "llama3"}))
        .await
        .error(StatusCode::NOT_IMPLEMENTED);
    assert!(message.contains("pull"), "{message}");
    // Embeddings need the model, which is still loading here.
    post(
        &app,
        "/api/embed",
        json!({"model": MODEL_ID, "input": "hi"}),
    )
    .await
    .error(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_api_key_guards_the_ollama_routes() {
    let state = AppState::new(MODEL_ID.into(), Some("secret".into()));
    let app = app(state);
    assert_eq!(
        get(&app, "/api/tags").await.status,
        StatusCode::UNAUTHORIZED
    );
    let req = Request::get("/api/tags")
        .header(header::AUTHORIZATION, "Bearer secret")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.status, StatusCode::OK);
}

// ---- on the model ----

#[tokio::test]
async fn chat_streams_ndjson_that_adds_up_to_the_whole_answer() {
    let app = ready_app();
    // Ollama streams by default.
    let lines = post(&app, "/api/chat", chat("Name three colors.", json!({})))
        .await
        .lines();
    assert!(lines.len() >= 3, "{lines:?}");
    let (last, pieces) = lines.split_last().unwrap();
    let mut streamed = String::new();
    for line in pieces {
        assert_eq!(line["model"], MODEL_ID);
        assert_eq!(line["done"], false);
        assert_eq!(line["message"]["role"], "assistant");
        assert!(line["created_at"].as_str().unwrap().ends_with('Z'));
        streamed.push_str(line["message"]["content"].as_str().unwrap());
    }
    assert_totals(last);
    streamed.push_str(last["message"]["content"].as_str().unwrap());
    assert!(!streamed.trim().is_empty());

    let whole = post(
        &app,
        "/api/chat",
        chat("Name three colors.", json!({"stream": false})),
    )
    .await
    .json();
    assert_totals(&whole);
    assert_eq!(whole["message"]["content"].as_str().unwrap(), streamed);
    assert_eq!(whole["eval_count"], last["eval_count"]);
    assert_eq!(whole["prompt_eval_count"], last["prompt_eval_count"]);

    // The name with Ollama's default tag is the same model, and is echoed back.
    let tagged = post(
        &app,
        "/api/chat",
        chat(
            "Name three colors.",
            json!({"stream": false, "model": format!("{MODEL_ID}:latest")}),
        ),
    )
    .await
    .json();
    assert_eq!(tagged["model"], format!("{MODEL_ID}:latest"));
    assert_eq!(tagged["message"]["content"], whole["message"]["content"]);
}

#[tokio::test]
async fn num_predict_ends_with_length() {
    let app = ready_app();
    let body = chat(
        "Write a long story about the sea.",
        json!({"stream": false, "options": {"temperature": 0, "num_predict": 3}}),
    );
    let whole = post(&app, "/api/chat", body).await.json();
    assert_eq!(whole["done_reason"], "length");
    assert_eq!(whole["eval_count"], 3);
    let lines = post(
        &app,
        "/api/generate",
        json!({"model": MODEL_ID, "prompt": "Write a long story.", "options": {"num_predict": 2}}),
    )
    .await
    .lines();
    assert_eq!(lines.last().unwrap()["done_reason"], "length");
}

#[tokio::test]
async fn format_json_answers_json() {
    let app = ready_app();
    let whole = post(
        &app,
        "/api/chat",
        chat(
            "Give me a JSON object describing a cat.",
            json!({"stream": false, "format": "json", "options": {"temperature": 0, "num_predict": 64}}),
        ),
    )
    .await
    .json();
    if whole["done_reason"] == "stop" {
        let content = whole["message"]["content"].as_str().unwrap();
        let parsed: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("not JSON ({e}): {content}"));
        assert!(parsed.is_object());
    } else {
        assert!(whole["message"]["content"]
            .as_str()
            .unwrap()
            .trim_start()
            .starts_with('{'));
    }
    let schema = json!({"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"], "additionalProperties": false});
    let whole = post(
        &app,
        "/api/generate",
        json!({"model": MODEL_ID, "prompt": "How old is the cat? Answer in JSON.", "format": schema,
               "stream": false, "options": {"temperature": 0, "num_predict": 32}}),
    )
    .await
    .json();
    assert_eq!(whole["done_reason"], "stop", "{whole}");
    let parsed: Value = serde_json::from_str(whole["response"].as_str().unwrap()).unwrap();
    assert!(parsed["age"].is_i64(), "{parsed}");
}

#[tokio::test]
async fn generate_templated_raw_and_load() {
    let app = ready_app();
    let lines = post(
        &app,
        "/api/generate",
        json!({"model": MODEL_ID, "prompt": "Say hello.", "system": "You are terse.",
               "options": {"temperature": 0, "num_predict": 16}}),
    )
    .await
    .lines();
    let (last, pieces) = lines.split_last().unwrap();
    assert_totals(last);
    assert_eq!(last["response"], "");
    let text: String = pieces
        .iter()
        .map(|l| l["response"].as_str().unwrap())
        .collect();
    assert!(!text.trim().is_empty());
    assert!(pieces
        .iter()
        .all(|l| l["done"] == false && l.get("message").is_none()));

    let raw = post(
        &app,
        "/api/generate",
        json!({"model": MODEL_ID, "prompt": "The capital of France is", "raw": true,
               "stream": false, "options": {"temperature": 0, "num_predict": 4}}),
    )
    .await
    .json();
    assert_totals(&raw);
    // A raw prompt is not wrapped in the chat template, so it is a handful of tokens.
    assert!(raw["prompt_eval_count"].as_u64().unwrap() < 10, "{raw}");

    let load = post(&app, "/api/generate", json!({"model": MODEL_ID}))
        .await
        .json();
    assert_eq!(load["done"], true);
    assert_eq!(load["done_reason"], "load");
    assert_eq!(load["response"], "");
    let load = post(
        &app,
        "/api/chat",
        json!({"model": MODEL_ID, "messages": []}),
    )
    .await
    .json();
    assert_eq!(load["done_reason"], "load");
    assert_eq!(load["message"]["content"], "");
}

#[tokio::test]
async fn chat_with_tools_and_a_tool_history() {
    let app = ready_app();
    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}});
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
    ]);
    for stream in [false, true] {
        let answer = post(
            &app,
            "/api/chat",
            json!({"model": MODEL_ID, "messages": messages, "tools": [weather],
                   "stream": stream, "options": {"temperature": 0, "num_predict": 48}}),
        )
        .await;
        let last = if stream {
            answer.lines().pop().unwrap()
        } else {
            answer.json()
        };
        assert_totals(&last);
        // SmolLM2 may or may not call the tool; whatever it does is well formed.
        for call in last["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(call["function"]["name"], "get_weather");
            assert!(call["function"]["arguments"].is_object(), "{call}");
        }
    }
}

#[tokio::test]
async fn tags_show_and_ps_describe_the_model() {
    let (state, app) = common::ready_app(MODEL_ID);
    let file = common::models_dir().join(common::MODEL_FILE);
    state.set_model_file(file.clone());
    let tags = get(&app, "/api/tags").await.json();
    let listed = &tags["models"][0];
    assert_eq!(listed["name"], format!("{MODEL_ID}:latest"));
    assert_eq!(listed["model"], listed["name"]);
    // The file's size and SHA-256, as Ollama reports its own.
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(listed["size"], bytes.len() as u64);
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(listed["digest"], sha);
    assert!(listed["modified_at"].as_str().unwrap().ends_with('Z'));
    let details = &listed["details"];
    assert_eq!(details["format"], "gguf");
    assert_eq!(details["family"], "llama");
    assert_eq!(details["families"], json!(["llama"]));
    assert_eq!(details["quantization_level"], "Q4_1");
    assert!(details["parameter_size"].as_str().unwrap().ends_with('M'));

    for body in [
        json!({"model": MODEL_ID}),
        json!({"name": format!("{MODEL_ID}:latest")}),
    ] {
        let show = post(&app, "/api/show", body).await.json();
        assert_eq!(show["details"], *details);
        assert_eq!(show["model_info"]["general.architecture"], "llama");
        assert!(show["model_info"]["llama.context_length"].as_u64().unwrap() >= 2048);
        assert!(
            show["model_info"]["general.parameter_count"]
                .as_u64()
                .unwrap()
                > 100_000_000
        );
        assert!(show["template"].as_str().unwrap().contains("im_start"));
        assert_eq!(show["capabilities"], json!(["completion", "tools"]));
    }

    let ps = get(&app, "/api/ps").await.json();
    assert_eq!(ps["models"][0]["name"], listed["name"]);
    assert!(ps["models"][0]["context_length"].as_u64().unwrap() >= 2048);
}
