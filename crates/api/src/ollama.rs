//! The Ollama API, for the clients that speak it (Open WebUI, Continue, the `ollama`
//! packages): `POST /api/chat`, `POST /api/generate`, `POST /api/embed`, `POST
//! /api/embeddings`, `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`.
//!
//! Requests are translated into OpenAI's [`CompletionRequest`] and go the same way as
//! `/v1/chat/completions` (`prepare_chat` / `prepare_text`, then `start`), so checks,
//! tools, JSON output, queueing and cancellation are the same; only the answer's shape
//! differs. Ollama streams by default, as newline-delimited JSON (one object a line, the
//! last with `"done": true` and the totals), and its errors are `{"error": "message"}`.
//!
//! Not supported: images (a 400) and managing models (pull, push, create,
//! copy, delete: a 501 saying so) — a node serves the one model it was started with.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use shoal_engine::FinishReason;
use shoal_swarm::routing::Strategy;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::completions::{self, new_call_id, Prepared};
use crate::error::{ApiError, Json};
use crate::runner::{self, Event};
use crate::state::AppState;
use crate::tools::{Call, Format, StreamGate, ToolSet};
use crate::types::{CompletionRequest, Content, MessageIn, Prompt, Stop, Usage};

/// The Ollama version whose API this follows; clients probe `/api/version` and some
/// refuse servers older than they need.
const OLLAMA_VERSION: &str = "0.6.0";

/// The tag Ollama gives a model named without one.
const DEFAULT_TAG: &str = ":latest";

// ---- errors ----

/// An [`ApiError`] answered the Ollama way: the same status, body `{"error": "message"}`
/// (what Ollama's clients read and raise).
pub(crate) struct OllamaError(ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let e = self.0;
        // A 501 is a client asking for what Shoal does not do, not a failure of ours.
        if e.status.is_server_error() && e.status != StatusCode::NOT_IMPLEMENTED {
            tracing::warn!(status = %e.status, message = %e.message, "request failed");
        } else {
            tracing::debug!(status = %e.status, message = %e.message, "request rejected");
        }
        let mut response = (e.status, axum::Json(json!({ "error": e.message }))).into_response();
        if let Some(seconds) = e.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

/// 404 for a model this node does not serve, in the words `ollama run` prints.
fn model_not_found(name: &str) -> ApiError {
    ApiError::model_not_found(name)
        .with_message(format!("model \"{name}\" not found, try pulling it first"))
}

/// The name the client gave, when it names this node's model (with or without the
/// `:latest` tag Ollama adds to untagged names).
fn served_model(state: &AppState, name: Option<&str>) -> Result<String, ApiError> {
    let name = name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::missing_param("model").with_message("model is required"))?;
    if is_served(state, name) {
        Ok(name.to_owned())
    } else {
        Err(model_not_found(name))
    }
}

fn is_served(state: &AppState, name: &str) -> bool {
    let id = state.model_id();
    name == id || name.strip_suffix(DEFAULT_TAG) == Some(id.as_str())
}

/// The model as `/api/tags` lists it: Ollama names always carry a tag.
fn listed_name(state: &AppState) -> String {
    let id = state.model_id();
    if id.contains(':') {
        id
    } else {
        format!("{id}{DEFAULT_TAG}")
    }
}

// ---- requests ----

/// `options`: the sampling fields Shoal has. The rest of Ollama's (`num_ctx`, `num_gpu`,
/// `mirostat`, …) are ignored, as Ollama ignores options a runner lacks.
#[derive(Debug, Default, Deserialize)]
struct Options {
    num_predict: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<serde_json::Number>,
    stop: Option<Stop>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

/// `POST /api/chat`. `keep_alive`, `think` and other fields Shoal has no use for are
/// ignored: the model stays loaded, and thinking is whatever the model does.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    model: Option<String>,
    #[serde(default)]
    messages: Vec<ChatMessageIn>,
    tools: Option<Vec<Value>>,
    format: Option<Value>,
    options: Option<Options>,
    stream: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    /// Assistant messages: `[{"function": {"name", "arguments": {…}}}]`.
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    /// Tool messages: which tool answered.
    #[serde(default)]
    tool_name: Option<String>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// `POST /api/generate`.
#[derive(Debug, Deserialize)]
pub(crate) struct GenerateRequest {
    model: Option<String>,
    prompt: Option<String>,
    system: Option<String>,
    /// No template: the prompt goes to the model as it is.
    raw: Option<bool>,
    format: Option<Value>,
    options: Option<Options>,
    stream: Option<bool>,
    images: Option<Vec<Value>>,
    /// A template to use instead of the model's (not supported).
    template: Option<String>,
    /// Text after the completion, for fill-in-the-middle (not supported).
    suffix: Option<String>,
    /// The token context an earlier answer returned (Shoal returns none).
    context: Option<Vec<Value>>,
}

/// `POST /api/show`: older clients send `name`, newer ones `model`.
#[derive(Debug, Deserialize)]
pub(crate) struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
}

/// The OpenAI request that carries an Ollama request's options, `format` and `stream`.
fn completion_request(
    options: Option<Options>,
    format: Option<&Value>,
    stream: Option<bool>,
) -> Result<CompletionRequest, ApiError> {
    let o = options.unwrap_or_default();
    let max_tokens = match o.num_predict {
        // -1 is Ollama's "no limit" (-2: "fill the context"); Shoal's default cap
        // applies, and any limit is cut to the room the context leaves.
        Some(n) if n < 0 => None,
        Some(0) => {
            return Err(ApiError::invalid_value(
                "options.num_predict",
                "`options.num_predict` must be -1 (no limit) or at least 1, got 0",
            ))
        }
        n => n,
    };
    // Ollama's default seed, -1, means a random one; so does any negative seed.
    let seed = o.seed.filter(|s| s.as_i64().is_none_or(|i| i >= 0));
    Ok(CompletionRequest {
        max_tokens,
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k,
        min_p: o.min_p,
        seed,
        stop: o.stop,
        repeat_penalty: o.repeat_penalty,
        repeat_last_n: o.repeat_last_n,
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        response_format: response_format(format)?,
        // Ollama streams unless told not to.
        stream: Some(stream.unwrap_or(true)),
        ..CompletionRequest::default()
    })
}

/// Ollama's `format` as OpenAI's `response_format`: `"json"` for any JSON object, a JSON
/// schema for JSON of that schema; absent or `""` for text.
fn response_format(format: Option<&Value>) -> Result<Option<Value>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(json!({"type": "json_object"}))),
        Some(schema @ Value::Object(_)) => Ok(Some(json!({
            "type": "json_schema",
            "json_schema": {"schema": schema},
        }))),
        Some(other) => Err(ApiError::invalid_value(
            "format",
            format!("`format` must be \"json\" or a JSON schema object, got {other}"),
        )),
    }
}

fn refuse_images(param: &str, images: Option<&Vec<Value>>) -> Result<(), ApiError> {
    if images.is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::invalid_value(
            param,
            "images are not supported: this node serves a text-only model",
        ));
    }
    Ok(())
}

/// Ollama's messages as OpenAI's: tool calls get an id and their arguments as JSON text;
/// a tool result's `tool_name` becomes its `name`.
fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<MessageIn>, ApiError> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            refuse_images(&format!("messages[{i}].images"), m.images.as_ref())?;
            let tool_calls = match m.tool_calls {
                None => None,
                Some(calls) => Some(
                    calls
                        .iter()
                        .enumerate()
                        .map(|(j, call)| {
                            openai_call(&format!("messages[{i}].tool_calls[{j}]"), call)
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            Ok(MessageIn {
                role: m.role,
                content: m.content.map(Content::Text),
                tool_calls,
                tool_call_id: m.tool_call_id,
                name: m.tool_name,
            })
        })
        .collect()
}

/// One call from an assistant message of the history, in OpenAI's shape.
fn openai_call(param: &str, call: &Value) -> Result<Value, ApiError> {
    let function = call
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::missing_param(&format!("{param}.function")))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing_param(&format!("{param}.function.name")))?;
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => "{}".to_owned(),
        // Some clients send OpenAI's string form; it is already what we want.
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .map_or_else(new_call_id, str::to_owned);
    Ok(json!({
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }))
}

// ---- handlers ----

/// `POST /api/chat`.
pub(crate) async fn chat(
    State(state): State<AppState>,
    body: Result<Json<ChatRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let received = Instant::now();
    let Json(req) = body?;
    let swarm = swarm_strategy(req.model.as_deref())?;
    let name = match (&swarm, req.model.as_deref()) {
        (Some(_), Some(name)) => name.to_owned(),
        _ => served_model(&state, req.model.as_deref())?,
    };
    if req.messages.is_empty() {
        // Ollama's way to load a model: a chat with no messages.
        match swarm {
            Some(_) => state
                .swarm()
                .map(drop)
                .ok_or_else(|| model_not_found(&name))?,
            None => drop(state.model()?),
        }
        return Ok(load_reply(&name, Api::Chat));
    }
    let mut completion = completion_request(req.options, req.format.as_ref(), req.stream)?;
    completion.messages = Some(chat_messages(req.messages)?);
    completion.tools = req.tools;
    if let Some(strategy) = swarm {
        let (rx, answering) = crate::swarm::start(&state, &completion, strategy, received).await?;
        return reply(rx, answering, received, name, Api::Chat).await;
    }
    let (prepared, prompt) = completions::prepare_chat(&state, &completion).await?;
    answer(&state, prepared, prompt, received, name, Api::Chat).await
}

/// The swarm strategy a model name asks for (`swarm`, `swarm:vote`, with or without the
/// `:latest` Ollama clients add), `None` when it names no swarm.
fn swarm_strategy(name: Option<&str>) -> Result<Option<Option<Strategy>>, ApiError> {
    let name = name.map(|n| n.strip_suffix(":latest").unwrap_or(n));
    crate::swarm::swarm_model(name)
}

#[derive(Debug, Deserialize)]
pub(crate) struct EmbedRequest {
    model: Option<String>,
    /// A string or an array of strings.
    input: Option<Value>,
    /// Cut an input longer than the context to it (the default, as Ollama) rather than
    /// refuse it.
    truncate: Option<bool>,
    /// Only the model's own width is possible.
    dimensions: Option<u64>,
}

/// `POST /api/embed`: unit-length vectors, one per input.
pub(crate) async fn embed(
    State(state): State<AppState>,
    body: Result<Json<EmbedRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let received = Instant::now();
    let Json(req) = body?;
    let name = served_model(&state, req.model.as_deref())?;
    let bad =
        || ApiError::invalid_value("input", "`input` must be a string or an array of strings");
    let inputs = match req.input.unwrap_or(Value::Null) {
        // Ollama's way to load an embedding model: nothing to embed, an empty answer.
        Value::Null => Vec::new(),
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(s) => vec![crate::embeddings::Input::Text(s)],
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(crate::embeddings::Input::Text(s)),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad().into()),
    };
    crate::embeddings::check_dimensions(&state, req.dimensions)?;
    if inputs.is_empty() {
        state.model()?;
        return Ok(axum::Json(json!({"model": name, "embeddings": []})).into_response());
    }
    let (vectors, tokens) =
        crate::embeddings::embed(&state, inputs, req.truncate.unwrap_or(true)).await?;
    Ok(axum::Json(json!({
        "model": name,
        "embeddings": vectors,
        "total_duration": received.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": tokens,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingsRequest {
    model: Option<String>,
    prompt: Option<String>,
}

/// `POST /api/embeddings` (Ollama's older endpoint): one prompt's vector.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    body: Result<Json<EmbeddingsRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let Json(req) = body?;
    served_model(&state, req.model.as_deref())?;
    let prompt = req.prompt.unwrap_or_default();
    if prompt.is_empty() {
        // A load request, as for Ollama: an empty answer.
        state.model()?;
        return Ok(axum::Json(json!({ "embedding": [] })).into_response());
    }
    let inputs = vec![crate::embeddings::Input::Text(prompt)];
    let (mut vectors, _) = crate::embeddings::embed(&state, inputs, true).await?;
    Ok(axum::Json(json!({ "embedding": vectors.pop().unwrap_or_default() })).into_response())
}

/// `POST /api/generate`.
pub(crate) async fn generate(
    State(state): State<AppState>,
    body: Result<Json<GenerateRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let received = Instant::now();
    let Json(req) = body?;
    let name = served_model(&state, req.model.as_deref())?;
    refuse_images("images", req.images.as_ref())?;
    if req.template.as_deref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid_value(
            "template",
            "`template` is not supported: prompts use the model's own chat template, or none \
             with `raw: true`",
        )
        .into());
    }
    if req.context.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(ApiError::invalid_value(
            "context",
            "`context` is not supported: send the conversation to /api/chat instead",
        )
        .into());
    }
    let raw = req.raw.unwrap_or(false);
    if raw && response_format(req.format.as_ref())?.is_some() {
        // A raw prompt is prepared as plain text, which carries no answer format.
        return Err(ApiError::invalid_value(
            "format",
            "`format` cannot be combined with `raw: true`",
        )
        .into());
    }
    let prompt = req.prompt.unwrap_or_default();
    if prompt.is_empty() {
        // Ollama's way to load a model: a generate with no prompt.
        state.model()?;
        return Ok(load_reply(&name, Api::Generate));
    }
    let mut completion = completion_request(req.options, req.format.as_ref(), req.stream)?;
    let suffix = req.suffix.filter(|s| !s.is_empty());
    if suffix.is_some() && response_format(req.format.as_ref())?.is_some() {
        // Code filled in the middle is not a JSON answer.
        return Err(
            ApiError::invalid_value("format", "`format` cannot be combined with `suffix`").into(),
        );
    }
    let (prepared, tokens) = if raw || suffix.is_some() {
        // With a suffix, the model fills in the middle between the prompt and it, as
        // Ollama's templates for code models do (no chat template, no system prompt).
        completion.prompt = Some(Prompt::Text(prompt));
        completion.suffix = suffix;
        completions::prepare_text(&state, &mut completion).await?
    } else {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = req.system.filter(|s| !s.is_empty()) {
            messages.push(MessageIn {
                role: "system".to_owned(),
                content: Some(Content::Text(system)),
                tool_calls: None,
                tool_call_id: None,
                name: None,
            });
        }
        messages.push(MessageIn::user(prompt));
        completion.messages = Some(messages);
        completions::prepare_chat(&state, &completion).await?
    };
    answer(&state, prepared, tokens, received, name, Api::Generate).await
}

/// `GET /api/tags`: the node's model (none on a stage-only node). While it loads, it is
/// listed with what its name tells.
pub(crate) async fn tags(State(state): State<AppState>) -> Response {
    let mut models = match state.model() {
        Ok(backend) => vec![ModelFacts::of(&state, Some(&backend)).await.listing()],
        Err(_) if state.is_stage_only() => Vec::new(),
        Err(_) => vec![ModelFacts::of(&state, None).await.listing()],
    };
    if state.swarm().is_some() {
        // The swarm as models an Ollama client can pick: `swarm` (its default strategy,
        // listed as `swarm:latest`) and `swarm:STRATEGY`.
        let names = std::iter::once("latest".to_owned())
            .chain(Strategy::ALL.iter().map(|s| s.as_str().to_owned()));
        models.extend(names.map(|tag| {
            let name = format!("swarm:{tag}");
            json!({
                "name": name,
                "model": name,
                "modified_at": rfc3339(UNIX_EPOCH + Duration::from_secs(state.started())),
                "size": 0,
                "digest": hex(&Sha256::digest(name.as_bytes())),
                "details": {"format": "", "family": "swarm", "families": ["swarm"],
                            "parameter_size": "", "quantization_level": ""},
            })
        }));
    }
    axum::Json(json!({ "models": models })).into_response()
}

/// `POST /api/show`: what Ollama tells of a model, as far as Shoal knows it.
pub(crate) async fn show(
    State(state): State<AppState>,
    body: Result<Json<ShowRequest>, ApiError>,
) -> Result<Response, OllamaError> {
    let Json(req) = body?;
    let name = req
        .model
        .or(req.name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::missing_param("model").with_message("model is required"))?;
    if !is_served(&state, &name) {
        return Err(ApiError::model_not_found(&name)
            .with_message(format!("model '{name}' not found"))
            .into());
    }
    let backend = state.model()?;
    let facts = ModelFacts::of(&state, Some(&backend)).await;
    let config = backend.config();
    let arch = config.arch.name();
    let mut info = Map::new();
    info.insert("general.architecture".into(), arch.into());
    if let Backend::Local(model) = &backend {
        info.insert("general.name".into(), model.name().into());
    }
    info.insert("general.parameter_count".into(), facts.parameters.into());
    for (key, value) in [
        ("context_length", config.context_length),
        ("embedding_length", config.hidden),
        ("block_count", config.n_layers),
        ("feed_forward_length", config.ffn_hidden),
        ("attention.head_count", config.n_heads),
        ("attention.head_count_kv", config.n_kv_heads),
        ("attention.key_length", config.head_dim),
        ("rope.dimension_count", config.rope_dim),
        ("vocab_size", config.vocab_size),
    ] {
        info.insert(format!("{arch}.{key}"), value.into());
    }
    info.insert(
        format!("{arch}.rope.freq_base"),
        f64::from(config.rope_theta).into(),
    );
    info.insert(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        config.rms_eps.into(),
    );
    let template = backend
        .prompt_format()
        .template()
        .map(|t| t.source().to_owned())
        .unwrap_or_default();
    // Every model takes tools here: a template without them gets them described in the
    // system message. "insert": a `suffix` is filled in the middle (FIM tokens).
    let mut capabilities = vec!["completion", "tools"];
    if backend.prompt_format().tokenizer().fim().is_some() {
        capabilities.push("insert");
    }
    Ok(axum::Json(json!({
        "modelfile": "",
        "parameters": "",
        "template": template,
        "details": facts.details,
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": facts.modified_at,
    }))
    .into_response())
}

/// `GET /api/ps`: the running models — the node's, once loaded; it never unloads.
pub(crate) async fn ps(State(state): State<AppState>) -> Response {
    let models = match state.model() {
        Ok(backend) => {
            let facts = ModelFacts::of(&state, Some(&backend)).await;
            vec![json!({
                "name": facts.name,
                "model": facts.name,
                "size": facts.size,
                "digest": facts.digest,
                "details": facts.details,
                // Never: the model stays loaded for the life of the node.
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": 0,
                "context_length": backend.config().context_length,
            })]
        }
        Err(_) => Vec::new(),
    };
    axum::Json(json!({ "models": models })).into_response()
}

/// `GET /api/version`.
pub(crate) async fn version() -> Response {
    axum::Json(json!({ "version": OLLAMA_VERSION })).into_response()
}

/// Ollama's model management and embeddings: a clear "not here" rather than a 404 that
/// reads like a typo.
pub(crate) async fn unsupported(uri: Uri) -> OllamaError {
    let what = match uri.path() {
        "/api/pull" | "/api/push" | "/api/create" | "/api/copy" | "/api/delete" => {
            "manage models (pull, push, create, copy, delete): it serves the one model it was \
             started with (`shoal serve --model …`)"
        }
        _ => "support this endpoint",
    };
    OllamaError(ApiError {
        status: StatusCode::NOT_IMPLEMENTED,
        ..ApiError::internal(format!("Shoal does not {what}"))
    })
}

// ---- model facts ----

/// What `/api/tags`, `/api/show` and `/api/ps` say of the model.
struct ModelFacts {
    name: String,
    /// `general.parameter_count`; 0 while loading.
    parameters: u64,
    /// The model file's size (0 when the node was given no file, e.g. in tests).
    size: u64,
    digest: String,
    modified_at: String,
    details: Value,
}

impl ModelFacts {
    async fn of(state: &AppState, backend: Option<&Backend>) -> Self {
        let parameters = backend.map_or(0, parameter_count);
        let family = backend.map(|b| b.config().arch.name());
        let details = json!({
            "parent_model": "",
            "format": "gguf",
            "family": family.unwrap_or_default(),
            "families": family.map(|f| vec![f]),
            "parameter_size": if parameters == 0 { String::new() } else { human_number(parameters) },
            "quantization_level": quantization_level(&state.model_id()),
        });
        let file = match state.model_file() {
            Some(path) => file_facts(path).await,
            None => None,
        };
        let (size, digest, modified) = match file {
            Some(f) => f,
            // No file known: the id's hash (stable for a model, different between models)
            // and the node's start.
            None => (
                0,
                hex(&Sha256::digest(state.model_id().as_bytes())),
                UNIX_EPOCH + Duration::from_secs(state.started()),
            ),
        };
        Self {
            name: listed_name(state),
            parameters,
            size,
            digest,
            modified_at: rfc3339(modified),
            details,
        }
    }

    /// One entry of `/api/tags`.
    fn listing(self) -> Value {
        json!({
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        })
    }
}

/// The model file's size, SHA-256 (as Ollama's digests are; read once per file version, off
/// the runtime) and modification time; `None` when it cannot be read.
async fn file_facts(path: std::path::PathBuf) -> Option<(u64, String, std::time::SystemTime)> {
    tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&path).ok()?;
        let sha = shoal_pipeline::file_sha256(&path).ok()?;
        Some((meta.len(), hex(&sha), meta.modified().unwrap_or(UNIX_EPOCH)))
    })
    .await
    .ok()
    .flatten()
}

/// The model's parameter count: exact for a local model; for a ring, whose head holds
/// only its own layers, counted from the shape (embedding, attention and MLP matrices,
/// output head; norms are too small to matter).
fn parameter_count(backend: &Backend) -> u64 {
    match backend {
        Backend::Local(model) => model.parameters(),
        Backend::Ring(pipeline) => {
            let c = pipeline.model_config();
            let q = c.n_heads * c.head_dim;
            let kv = c.n_kv_heads * c.head_dim;
            let layer = c.hidden * (q + 2 * kv) + q * c.hidden + 3 * c.hidden * c.ffn_hidden;
            (2 * c.vocab_size * c.hidden + c.n_layers * layer) as u64
        }
    }
}

/// Ollama's way of writing a count: `135M`, `494.03M`, `1.5B`.
fn human_number(n: u64) -> String {
    let n = n as f64;
    let whole_or = |x: f64, places: usize, unit: &str| {
        if x.fract() == 0.0 {
            format!("{x:.0}{unit}")
        } else {
            format!("{x:.places$}{unit}")
        }
    };
    if n >= 1e9 {
        whole_or(n / 1e9, 1, "B")
    } else if n >= 1e6 {
        whole_or(n / 1e6, 2, "M")
    } else if n >= 1e3 {
        format!("{:.0}K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// GGUF quantization names, as Ollama writes them.
const QUANTIZATIONS: [&str; 30] = [
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
    "IQ4_XS", "IQ4_NL", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S",
    "Q5_K_M", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16", "F32", "Q4_K",
];

/// The quantization the model's name tells (GGUF files are named for it, as in
/// `smollm2-135m-instruct-q4_1`); the loaded weights do not say it in one word.
fn quantization_level(model_id: &str) -> String {
    model_id
        .to_ascii_uppercase()
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .rev()
        .find(|word| QUANTIZATIONS.contains(word))
        .unwrap_or("unknown")
        .to_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- times ----

/// `t` in RFC 3339, UTC, with nanoseconds, as Ollama writes `created_at`.
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_nanos()
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// ---- answers ----

/// Which endpoint answers: chat lines carry a `message`, generate lines a `response`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Chat,
    Generate,
}

/// One line of an answer (or the whole of a non-streamed one).
#[derive(Serialize)]
struct Line<'a> {
    model: &'a str,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<MessageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<String>,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'static str>,
    #[serde(flatten)]
    totals: Option<Totals>,
}

#[derive(Serialize)]
struct MessageOut {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
}

/// The last line's counts and times, in nanoseconds.
#[derive(Serialize)]
struct Totals {
    total_duration: u64,
    /// The model is loaded before any request is taken.
    load_duration: u64,
    prompt_eval_count: usize,
    prompt_eval_duration: u64,
    eval_count: usize,
    eval_duration: u64,
}

/// The answer to a load request: nothing generated.
fn load_reply(name: &str, api: Api) -> Response {
    let (message, response) = match api {
        Api::Chat => (Some(assistant(String::new(), Vec::new())), None),
        Api::Generate => (None, Some(String::new())),
    };
    axum::Json(Line {
        model: name,
        created_at: now(),
        message,
        response,
        done: true,
        done_reason: Some("load"),
        totals: None,
    })
    .into_response()
}

fn assistant(content: String, tool_calls: Vec<Value>) -> MessageOut {
    MessageOut {
        role: "assistant",
        content,
        tool_calls,
    }
}

/// Calls as Ollama writes them: arguments as an object.
fn ollama_calls(calls: &[Call]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            // The parser wrote the arguments from a JSON object, so they parse back.
            let arguments = serde_json::from_str::<Value>(&call.arguments)
                .unwrap_or_else(|_| Value::Object(Map::new()));
            json!({
                "id": call.id,
                "function": {"index": i, "name": call.name, "arguments": arguments},
            })
        })
        .collect()
}

/// Starts the generation and answers it the Ollama way, streamed or whole.
async fn answer(
    state: &AppState,
    prepared: Prepared,
    prompt: Vec<u32>,
    received: Instant,
    name: String,
    api: Api,
) -> Result<Response, OllamaError> {
    let (rx, answering) = completions::start(state, prepared, prompt, received).await?;
    reply(rx, answering, received, name, api).await
}

/// Answers a started generation (or the swarm's answer) the Ollama way, streamed or whole.
async fn reply(
    rx: mpsc::Receiver<Event>,
    answering: completions::Answering,
    received: Instant,
    name: String,
    api: Api,
) -> Result<Response, OllamaError> {
    let reply = Reply {
        model: name,
        api,
        tools: answering.tools,
        received,
        started: Instant::now(),
    };
    if answering.stream {
        Ok((
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(reply.stream(rx)),
        )
            .into_response())
    } else {
        reply.whole(rx).await
    }
}

/// How one started generation is answered.
struct Reply {
    model: String,
    api: Api,
    /// The tools the answer may call: its text is read back into calls.
    tools: Option<(Arc<ToolSet>, Format)>,
    received: Instant,
    /// When the engine took the request (after any wait in the queue).
    started: Instant,
}

impl Reply {
    fn line(
        &self,
        text: String,
        tool_calls: Vec<Value>,
        end: Option<(FinishReason, Totals)>,
    ) -> Line<'_> {
        let (message, response) = match self.api {
            Api::Chat => (Some(assistant(text, tool_calls)), None),
            Api::Generate => (None, Some(text)),
        };
        let (done_reason, totals) = match end {
            Some((finish, totals)) => (Some(finish.as_str()), Some(totals)),
            None => (None, None),
        };
        Line {
            model: &self.model,
            created_at: now(),
            message,
            response,
            done: done_reason.is_some(),
            done_reason,
            totals,
        }
    }

    /// The totals, timed here: the prompt's evaluation until the first piece of text
    /// arrived (which includes drawing the first token), generation from then on.
    fn totals(&self, usage: Usage, first_piece: Option<Instant>) -> Totals {
        let done = Instant::now();
        let first = first_piece.unwrap_or(done);
        Totals {
            total_duration: nanos(done.duration_since(self.received)),
            load_duration: 0,
            prompt_eval_count: usage.prompt_tokens,
            prompt_eval_duration: nanos(first.duration_since(self.started)),
            eval_count: usage.completion_tokens,
            eval_duration: nanos(done.duration_since(first)),
        }
    }

    /// The whole answer, read back into text and tool calls.
    fn split(&self, text: &str) -> (String, Vec<Value>) {
        let parsed = crate::tools::read_back(self.tools.as_ref(), text, new_call_id);
        (parsed.content, ollama_calls(&parsed.calls))
    }

    /// A non-streamed answer: one object with the whole text and the totals.
    async fn whole(self, mut rx: mpsc::Receiver<Event>) -> Result<Response, OllamaError> {
        let mut text = String::new();
        let mut first_piece = None;
        while let Some(event) = rx.recv().await {
            match event {
                Event::Text(piece) => {
                    first_piece.get_or_insert_with(Instant::now);
                    text.push_str(&piece);
                }
                // Not asked for through this API.
                Event::Logprob(_) => {}
                Event::Done { finish, usage, .. } => {
                    let (content, calls) = self.split(&text);
                    let totals = self.totals(usage, first_piece);
                    return Ok(
                        axum::Json(self.line(content, calls, Some((finish, totals))))
                            .into_response(),
                    );
                }
                Event::Failed(e) => return Err(e.into()),
            }
        }
        Err(runner::ended_unexpectedly().into())
    }

    /// A streamed answer: a line per piece of text (with tools, only what the gate lets
    /// out before a call), then the last line with the rest, any tool calls, the reason
    /// and the totals. A failure after the start is an `{"error": …}` line, which the
    /// `ollama` clients raise.
    fn stream(
        self,
        rx: mpsc::Receiver<Event>,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        let streaming = Streaming {
            rx,
            reply: self,
            gate: StreamGate::default(),
            first_piece: None,
            finished: false,
        };
        stream::unfold(streaming, |mut s| async move {
            let line = s.next_line().await?;
            Some((Ok(line), s))
        })
    }
}

/// A streamed answer in progress.
struct Streaming {
    rx: mpsc::Receiver<Event>,
    reply: Reply,
    gate: StreamGate,
    first_piece: Option<Instant>,
    finished: bool,
}

impl Streaming {
    /// The next line to send, or `None` after the last.
    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if self.finished {
                return None;
            }
            let event = self.rx.recv().await;
            let reply = &self.reply;
            return match event {
                Some(Event::Logprob(_)) => continue,
                Some(Event::Text(piece)) => {
                    self.first_piece.get_or_insert_with(Instant::now);
                    let content = match &reply.tools {
                        Some(_) => self.gate.push(&piece),
                        None => piece,
                    };
                    if content.is_empty() {
                        continue;
                    }
                    Some(ndjson(&reply.line(content, Vec::new(), None)))
                }
                Some(Event::Done { finish, usage, .. }) => {
                    self.finished = true;
                    let (rest, calls) = match &reply.tools {
                        None => (String::new(), Vec::new()),
                        Some((tools, format)) => {
                            let parsed = tools.parse(self.gate.seen(), *format, new_call_id);
                            (self.gate.rest(&parsed), ollama_calls(&parsed.calls))
                        }
                    };
                    let totals = reply.totals(usage, self.first_piece);
                    Some(ndjson(&reply.line(rest, calls, Some((finish, totals)))))
                }
                Some(Event::Failed(e)) => {
                    self.finished = true;
                    Some(error_line(&e))
                }
                None => {
                    self.finished = true;
                    Some(error_line(&runner::ended_unexpectedly()))
                }
            };
        }
    }
}

/// One NDJSON line.
fn ndjson<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(mut line) => {
            line.push(b'\n');
            Bytes::from(line)
        }
        Err(e) => error_line(&ApiError::internal(format!("cannot serialize a line: {e}"))),
    }
}

fn error_line(e: &ApiError) -> Bytes {
    let mut line = json!({ "error": e.message }).to_string();
    line.push('\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000000005Z");
        let end_of_year = UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        assert_eq!(rfc3339(end_of_year), "2024-12-31T23:59:59.000000000Z");
    }

    #[test]
    fn counts_and_quantizations_read_as_ollama_writes_them() {
        assert_eq!(human_number(134_515_008), "134.52M");
        assert_eq!(human_number(135_000_000), "135M");
        assert_eq!(human_number(1_543_714_304), "1.5B");
        assert_eq!(human_number(7_000_000_000), "7B");
        assert_eq!(quantization_level("smollm2-135m-instruct-q4_1"), "Q4_1");
        assert_eq!(quantization_level("Qwen2.5-7B-Instruct-Q4_K_M"), "Q4_K_M");
        assert_eq!(quantization_level("qwen2.5-coder-0.5b-instruct"), "unknown");
    }

    #[test]
    fn formats_and_options_translate() {
        assert_eq!(response_format(None).unwrap(), None);
        assert_eq!(response_format(Some(&json!(""))).unwrap(), None);
        assert_eq!(
            response_format(Some(&json!("json"))).unwrap(),
            Some(json!({"type": "json_object"}))
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            response_format(Some(&schema)).unwrap().unwrap()["json_schema"]["schema"],
            schema
        );
        assert_eq!(
            response_format(Some(&json!("yaml"))).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let options: Options =
            serde_json::from_value(json!({"num_predict": -1, "seed": -1, "num_ctx": 8192}))
                .unwrap();
        let req = completion_request(Some(options), None, None).unwrap();
        assert_eq!(req.max_tokens, None);
        assert!(req.seed.is_none());
        assert_eq!(req.stream, Some(true));
        let options: Options = serde_json::from_value(json!({"num_predict": 0})).unwrap();
        assert!(completion_request(Some(options), None, Some(false)).is_err());
    }

    #[test]
    fn history_calls_become_openai_calls() {
        let call = openai_call(
            "m",
            &json!({"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}),
        )
        .unwrap();
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"city": "Paris"}));
        assert!(openai_call("m", &json!({"name": "x"})).is_err());
    }
}
