//! `POST /v1/chat/completions` and `POST /v1/completions`.
//!
//! Both go the same way: check the request (every 4xx is decided before a byte of the
//! answer is sent, so streaming requests get proper status codes too), tokenize, wait for
//! the engine, then either stream SSE chunks or collect the whole text.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;
use shoal_engine::{
    ChatMessage, FinishReason, GenerateParams, JsonGrammar, JsonRule, PromptFormat, SamplingParams,
};
use shoal_swarm::agent::ApiRefusal;
use tokio::sync::mpsc;

use crate::backend::Backend;

use crate::error::{parse_json, ApiError, Json};
use crate::runner::{self, Event, Job};
use crate::state::{unix_now, AppState};
use crate::tools::{
    argument_fragments, template_messages, Call, CallDelta, Format, StreamGate, ToolSet,
};
use crate::types::{
    ChatChoice, ChatChunkChoice, CompletionObject, CompletionRequest, Content, Delta, Infill,
    MessageIn, MessageOut, Prompt, TextChoice, Usage,
};

/// Tokens generated when the request does not say (and the context has room).
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// Sampling defaults when a request leaves a field out: llama-server's, which suit small
/// local models better than OpenAI's plain temperature 1.
const DEFAULT_TEMPERATURE: f32 = 0.8;
const DEFAULT_TOP_K: usize = 40;
const DEFAULT_TOP_P: f32 = 0.95;
const DEFAULT_MIN_P: f32 = 0.05;

/// Every answer says it came from this backend.
pub(crate) const SYSTEM_FINGERPRINT: &str = concat!("shoal-", env!("CARGO_PKG_VERSION"));

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    Json(req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    if let Some(strategy) = crate::swarm::swarm_model(req.model.as_deref())? {
        return crate::swarm::chat(state, req, strategy, received).await;
    }
    let (prepared, prompt) = prepare_chat(&state, &req).await?;
    respond(state, prepared, prompt, received, Kind::Chat).await
}

/// Answers a whole chat request (JSON) with this node's own model, as `POST
/// /v1/chat/completions` would but never streamed and never by the swarm: how this node,
/// as a swarm agent, answers a head that passes a client's request on. The response's JSON,
/// or the API's refusal.
pub(crate) async fn answer_whole(state: AppState, body: String) -> Result<String, ApiRefusal> {
    let refused = |e: ApiError| ApiRefusal {
        status: e.status.as_u16(),
        code: e.code.map(str::to_owned),
        message: e.message,
    };
    let received = Instant::now();
    let mut req: CompletionRequest = parse_json(body.as_bytes()).map_err(refused)?;
    req.model = None;
    req.stream = None;
    req.stream_options = None;
    let (prepared, prompt) = prepare_chat(&state, &req).await.map_err(refused)?;
    let response = respond(state, prepared, prompt, received, Kind::Chat)
        .await
        .map_err(refused)?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), shoal_wire::MAX_API_JSON)
        .await
        .map_err(|e| ApiRefusal {
            status: 500,
            code: None,
            message: format!("cannot read this node's own answer: {e}"),
        })?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status.is_success() {
        return Ok(text);
    }
    // An error body: `{"error": {"message": …, "code": …}}`.
    let error = serde_json::from_str::<Value>(&text).ok();
    let field = |name: &str| {
        error
            .as_ref()
            .and_then(|v| v.get("error")?.get(name)?.as_str().map(str::to_owned))
    };
    Err(ApiRefusal {
        status: status.as_u16(),
        code: field("code"),
        message: field("message").unwrap_or(text),
    })
}

/// A chat request checked and its prompt rendered and tokenized — everything before the
/// engine, shared by every API that chats (OpenAI's, Anthropic's and Ollama's, which
/// translate their requests into OpenAI's first).
pub(crate) async fn prepare_chat(
    state: &AppState,
    req: &CompletionRequest,
) -> Result<(Prepared, Vec<u32>), ApiError> {
    let checked = check(state, req, "messages")?;
    let (tools, answer_format) = answer_shape(req)?;
    let messages = chat_json(req.messages.as_deref())?;
    let variables = template_variables(req)?;
    let mut prepared = checked.with_model(state.model()?);
    let backend = prepared.model.clone();
    let format = Format::of(backend.prompt_format());
    let ((prompt, tools), grammar) = blocking(move || {
        let mut tools = tools;
        let prompt_format = backend.prompt_format();
        let text = chat_prompt(prompt_format, messages, tools.as_ref(), variables.as_ref())?;
        let grammar = match tools.as_mut() {
            Some(t) if t.forced() || answer_format.is_none() => t.call_rule(format)?,
            _ => answer_format.map(JsonRule::whole),
        };
        let ids = prompt_format
            .encode_prompt(&text)
            .map_err(|e| ApiError::from_engine(e, "messages"))?;
        Ok(((ids, tools), grammar))
    })
    .await?;
    prepared.grammar = grammar;
    prepared.tools = tools.map(|t| (Arc::new(t), format));
    Ok((prepared, prompt))
}

/// The text a chat's messages and tools become for the model: its chat template's
/// rendering (the tools described in the system message when the template renders none),
/// with a forced call's opening at the end.
fn chat_prompt(
    prompt_format: &PromptFormat,
    messages: Vec<Value>,
    tools: Option<&ToolSet>,
    variables: Option<&Value>,
) -> Result<String, ApiError> {
    let renders_tools = prompt_format.template().is_some_and(|t| t.renders_tools());
    let mut messages = template_messages(messages, renders_tools || tools.is_none());
    let rendered_tools = match tools {
        Some(t) if renders_tools => Some(t.rendered().clone()),
        Some(t) => {
            describe_tools(&mut messages, &t.description());
            None
        }
        None => None,
    };
    let mut text = prompt_format
        .render_conversation(&Value::Array(messages), rendered_tools.as_ref(), variables)
        .map_err(|e| ApiError::from_engine(e, "messages"))?;
    if tools.is_some_and(ToolSet::forced) {
        text.push_str(Format::of(prompt_format).opening());
    }
    Ok(text)
}

/// `chat_template_kwargs`, checked: a JSON object.
fn template_variables(req: &CompletionRequest) -> Result<Option<Value>, ApiError> {
    match &req.chat_template_kwargs {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
        Some(_) => Err(ApiError::invalid_value(
            "chat_template_kwargs",
            "`chat_template_kwargs` must be an object of the template's variables",
        )),
    }
}

/// `POST /apply-template` (llama-server's endpoint): the prompt a chat request's messages
/// and tools become, exactly as the model is given it — to see how an agent's tools look
/// to the model, or to check a `--chat-template-file`.
pub(crate) async fn apply_template(
    State(state): State<AppState>,
    Json(req): Json<CompletionRequest>,
) -> Result<axum::Json<Value>, ApiError> {
    let (tools, _) = answer_shape(&req)?;
    let messages = chat_json(req.messages.as_deref())?;
    let variables = template_variables(&req)?;
    let backend = state.model()?;
    let prompt = blocking(move || {
        chat_prompt(
            backend.prompt_format(),
            messages,
            tools.as_ref(),
            variables.as_ref(),
        )
    })
    .await?;
    Ok(axum::Json(serde_json::json!({ "prompt": prompt })))
}

/// `GET /props` (llama-server's): what this node answers with — the model file, the chat
/// template in effect (the file's own or `--chat-template-file`'s), the context length and
/// the sampling defaults a request that names none gets.
pub(crate) async fn props(State(state): State<AppState>) -> Result<axum::Json<Value>, ApiError> {
    let backend = state.model()?;
    let template = backend.prompt_format().template();
    let n_ctx = backend.config().context_length;
    Ok(axum::Json(serde_json::json!({
        "model_path": state.model_file(),
        "model_alias": state.model_id(),
        "chat_template": template.map(|t| t.source()),
        "bos_token": template.map(|t| t.bos_token()),
        "eos_token": template.map(|t| t.eos_token()),
        "n_ctx": n_ctx,
        "total_slots": 1,
        "default_generation_settings": {
            "n_ctx": n_ctx,
            "params": {
                "temperature": DEFAULT_TEMPERATURE,
                "top_k": DEFAULT_TOP_K,
                "top_p": DEFAULT_TOP_P,
                "min_p": DEFAULT_MIN_P,
                "n_predict": DEFAULT_MAX_TOKENS,
            },
        },
        "modalities": {"vision": false, "audio": false},
        "build_info": SYSTEM_FINGERPRINT,
    })))
}

/// The tools the answer may call and the JSON grammar it must follow, as the request asks;
/// a 400 for what cannot be.
pub(crate) fn answer_shape(
    req: &CompletionRequest,
) -> Result<(Option<ToolSet>, Option<JsonGrammar>), ApiError> {
    let tools = ToolSet::from_request(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let answer_format = response_format(req.response_format.as_ref())?;
    if answer_format.is_some() && tools.as_ref().is_some_and(ToolSet::forced) {
        return Err(ApiError::invalid_value(
            "response_format",
            "`response_format` and a forced `tool_choice` cannot be combined: the answer \
             would have to be both",
        ));
    }
    Ok((tools, answer_format))
}

/// `response_format`: `None` for plain text; the grammar JSON answers must follow.
fn response_format(format: Option<&Value>) -> Result<Option<JsonGrammar>, ApiError> {
    let Some(format) = format else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(JsonGrammar::any_object())),
        Some("json_schema") => {
            // OpenAI nests the schema in `json_schema.schema`; llama-server also takes it
            // one level up.
            let schema = format
                .pointer("/json_schema/schema")
                .or_else(|| format.get("schema"))
                .ok_or_else(|| ApiError::missing_param("response_format.json_schema.schema"))?;
            JsonGrammar::from_schema(schema)
                .map(Some)
                .map_err(|e| ApiError::from_engine(e, "response_format"))
        }
        Some(other) => Err(ApiError::invalid_value(
            "response_format.type",
            format!(
                "`response_format.type` must be \"text\", \"json_object\" or \
                 \"json_schema\", got {other:?}"
            ),
        )),
        None => Err(ApiError::missing_param("response_format.type")),
    }
}

/// Adds the tools' description to the end of the system message (a new one if the
/// conversation has none), for templates that render no tools.
fn describe_tools(messages: &mut Vec<Value>, description: &str) {
    match messages.first_mut() {
        Some(first) if first["role"] == "system" => {
            let content = first["content"].as_str().unwrap_or_default();
            first["content"] = Value::String(format!("{content}\n\n{description}"));
        }
        _ => messages.insert(
            0,
            serde_json::json!({"role": "system", "content": description}),
        ),
    }
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    Json(mut req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let (prepared, prompt) = prepare_text(&state, &mut req).await?;
    respond(state, prepared, prompt, received, Kind::Text).await
}

/// A raw-prompt request (`prompt`, text or token ids) checked and tokenized, no template.
/// The swarm takes chats only: a swarm model name is refused here for every raw-prompt API.
pub(crate) async fn prepare_text(
    state: &AppState,
    req: &mut CompletionRequest,
) -> Result<(Prepared, Vec<u32>), ApiError> {
    if crate::swarm::swarm_model(req.model.as_deref())?.is_some() {
        return Err(ApiError::invalid_value(
            "model",
            "the swarm answers chat completions only: use /v1/chat/completions",
        ));
    }
    let checked = check(state, req, "prompt")?;
    let prompt = prompt_in(req.prompt.take())?;
    let infill = req.infill.take().or_else(|| {
        req.suffix
            .take()
            .filter(|s| !s.is_empty())
            .map(|suffix| Infill {
                suffix,
                files: Vec::new(),
                limits: None,
            })
    });
    let prepared = checked.with_model(state.model()?);
    let backend = prepared.model.clone();
    let prompt = match prompt {
        PromptIn::Text(text) => {
            blocking(move || {
                let format = backend.prompt_format();
                match &infill {
                    // Fill in the middle: the prompt is the code before the gap.
                    Some(infill) => format
                        .infill_prompt(&text, &infill.suffix, &infill.files, infill.limits)
                        .map_err(|e| ApiError::from_engine(e, "suffix")),
                    None => format
                        .encode_prompt(&text)
                        .map_err(|e| ApiError::from_engine(e, "prompt")),
                }
            })
            .await?
        }
        PromptIn::Tokens(_) if infill.is_some() => {
            return Err(ApiError::invalid_value(
                "suffix",
                "`suffix` needs a text prompt (the code before the gap), not token ids",
            ))
        }
        PromptIn::Tokens(ids) => {
            let vocab = prepared.model.config().vocab_size;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::invalid_value(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary (size {vocab})"),
                ));
            }
            ids
        }
    };
    Ok((prepared, prompt))
}

/// Which API a response speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

/// A checked request, waiting for its prompt tokens.
#[derive(Clone)]
pub(crate) struct Prepared<M = Backend> {
    model: M,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: Vec<String>,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) ignore_eos: bool,
    /// Reuse a kept prompt prefix and keep this prompt (`cache_prompt`).
    pub(crate) cache_prompt: bool,
    /// Each token's log-probability, with this many alternatives (`logprobs`,
    /// `top_logprobs`).
    pub(crate) logprobs: Option<usize>,
    /// How many choices to answer (`n`).
    pub(crate) n: usize,
    /// The JSON the answer must be (`response_format`), or its calls (tools).
    grammar: Option<JsonRule>,
    /// The tools the answer may call, and how the model writes calls.
    tools: Option<(Arc<ToolSet>, Format)>,
    /// The request field the prompt came from, for error messages.
    prompt_param: &'static str,
}

impl Prepared<()> {
    fn with_model(self, model: Backend) -> Prepared {
        Prepared {
            model,
            sampling: self.sampling,
            stop: self.stop,
            max_tokens: self.max_tokens,
            stream: self.stream,
            include_usage: self.include_usage,
            ignore_eos: self.ignore_eos,
            cache_prompt: self.cache_prompt,
            logprobs: self.logprobs,
            n: self.n,
            grammar: self.grammar,
            tools: self.tools,
            prompt_param: self.prompt_param,
        }
    }
}

/// Most choices one request may ask for (`n`).
const MAX_CHOICES: usize = 16;

/// Checks everything that needs no model: `n`, `model`, `max_tokens`, sampling ranges.
/// (Request errors come before "still loading", so clients learn of them at once.)
pub(crate) fn check(
    state: &AppState,
    req: &CompletionRequest,
    prompt_param: &'static str,
) -> Result<Prepared<()>, ApiError> {
    let n = match req.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid_value(
                "n",
                format!("`n` is the number of choices, 1 to {MAX_CHOICES}, got {n}"),
            ))
        }
    };
    if let Some(model) = &req.model {
        if !state.answers_to(model) && crate::swarm::swarm_model(Some(model))?.is_none() {
            return Err(ApiError::model_not_found(model));
        }
    }
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        None => None,
        Some(n) if n < 1 => {
            let param = if req.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(ApiError::invalid_value(
                param,
                format!("`{param}` must be at least 1, got {n}"),
            ));
        }
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let sampling = sampling(req)?;
    let stop: Vec<String> = match &req.stop {
        None => Vec::new(),
        Some(stop) => stop
            .to_vec()
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect(),
    };
    let limits = state.limits();
    if stop.len() > limits.max_stop {
        return Err(ApiError::invalid_value(
            "stop",
            format!(
                "at most {} stop strings are allowed, got {}",
                limits.max_stop,
                stop.len()
            ),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > limits.max_stop_len) {
        return Err(ApiError::invalid_value(
            "stop",
            format!(
                "a stop string may be {} bytes at most, got one of {}",
                limits.max_stop_len,
                long.len()
            ),
        ));
    }
    Ok(Prepared {
        model: (),
        sampling,
        stop,
        max_tokens,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        ignore_eos: req.ignore_eos.unwrap_or(false),
        cache_prompt: req.cache_prompt.unwrap_or(true),
        logprobs: logprobs(req, prompt_param == "messages")?,
        n,
        grammar: None,
        tools: None,
        prompt_param,
    })
}

/// How many alternatives per token the request asks log-probabilities with, if it asks for
/// them: chat's `logprobs: true` and `top_logprobs` (0–20), or the completions API's
/// `logprobs` number (0–20; OpenAI's legacy bound is 5, llama-server's is higher).
fn logprobs(req: &CompletionRequest, chat: bool) -> Result<Option<usize>, ApiError> {
    let max = shoal_engine::MAX_TOP_LOGPROBS as i64;
    let count = |param: &str, n: i64| -> Result<usize, ApiError> {
        if (0..=max).contains(&n) {
            Ok(n as usize)
        } else {
            Err(ApiError::invalid_value(
                param,
                format!("`{param}` must be between 0 and {max}, got {n}"),
            ))
        }
    };
    let given = req.logprobs.as_ref().filter(|v| !v.is_null());
    if chat {
        let on = match given {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "logprobs",
                    format!("`logprobs` is true or false in the chat API, got {other}"),
                ))
            }
        };
        return match (on, req.top_logprobs) {
            (true, top) => Ok(Some(count("top_logprobs", top.unwrap_or(0))?)),
            (false, Some(_)) => Err(ApiError::invalid_value(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            )),
            (false, None) => Ok(None),
        };
    }
    match given {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) => Ok(Some(count("logprobs", n)?)),
            None => Err(ApiError::invalid_value(
                "logprobs",
                format!("`logprobs` is a number of alternatives per token, got {v}"),
            )),
        },
    }
}

fn sampling(req: &CompletionRequest) -> Result<SamplingParams, ApiError> {
    let mut p = SamplingParams {
        temperature: DEFAULT_TEMPERATURE,
        top_k: DEFAULT_TOP_K,
        top_p: DEFAULT_TOP_P,
        min_p: DEFAULT_MIN_P,
        ..SamplingParams::default()
    };
    if let Some(t) = req.temperature {
        p.temperature = in_range("temperature", t, 0.0, 2.0)?;
    }
    if let Some(v) = req.top_p {
        p.top_p = in_range("top_p", v, 0.0, 1.0)?;
    }
    if let Some(v) = req.min_p {
        p.min_p = in_range("min_p", v, 0.0, 1.0)?;
    }
    if let Some(k) = req.top_k {
        // llama-server: zero or less turns top-k off.
        p.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(v) = req.frequency_penalty {
        p.frequency_penalty = in_range("frequency_penalty", v, -2.0, 2.0)?;
    }
    if let Some(v) = req.presence_penalty {
        p.presence_penalty = in_range("presence_penalty", v, -2.0, 2.0)?;
    }
    if let Some(v) = req.repeat_penalty {
        if !(v.is_finite() && v > 0.0) {
            return Err(ApiError::invalid_value(
                "repeat_penalty",
                format!("`repeat_penalty` must be greater than 0, got {v}"),
            ));
        }
        p.repeat_penalty = v;
    }
    if let Some(n) = req.repeat_last_n {
        p.repeat_last_n = match n {
            // llama-server: -1 means the whole context.
            -1 => usize::MAX,
            n => usize::try_from(n).map_err(|_| {
                ApiError::invalid_value(
                    "repeat_last_n",
                    format!("`repeat_last_n` must be -1 or more, got {n}"),
                )
            })?,
        };
    }
    p.seed = match &req.seed {
        // Two-complement reinterpretation keeps negative seeds distinct and valid.
        Some(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .ok_or_else(|| {
                ApiError::invalid_value("seed", format!("`seed` must be an integer, got {n}"))
            })?,
        None => random_seed(),
    };
    Ok(p)
}

fn in_range(param: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid_value(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        ))
    }
}

/// A seed for requests that give none: different each time, as OpenAI's sampling is.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// The conversation as plain role and text (what the swarm's agents take).
pub(crate) fn chat_messages(messages: Option<&[MessageIn]>) -> Result<Vec<ChatMessage>, ApiError> {
    checked_messages(messages)?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(ChatMessage {
                role: role(m),
                content: message_text(i, m)?,
            })
        })
        .collect()
}

/// The conversation in OpenAI's shape, as the chat template wants it: role and text, and
/// the tool calls and tool results of an agent's history.
fn chat_json(messages: Option<&[MessageIn]>) -> Result<Vec<Value>, ApiError> {
    checked_messages(messages)?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut out = serde_json::Map::new();
            out.insert("role".into(), Value::String(role(m)));
            out.insert("content".into(), Value::String(message_text(i, m)?));
            if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
                out.insert("tool_calls".into(), Value::Array(calls.clone()));
            }
            if let Some(id) = &m.tool_call_id {
                out.insert("tool_call_id".into(), Value::String(id.clone()));
            }
            if let Some(name) = &m.name {
                out.insert("name".into(), Value::String(name.clone()));
            }
            Ok(Value::Object(out))
        })
        .collect()
}

fn checked_messages(messages: Option<&[MessageIn]>) -> Result<&[MessageIn], ApiError> {
    let messages = messages.ok_or_else(|| ApiError::missing_param("messages"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid_value(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    Ok(messages)
}

/// OpenAI's newer name for the system role is `developer`; templates know only `system`.
fn role(m: &MessageIn) -> String {
    match m.role.as_str() {
        "developer" => "system".to_string(),
        r => r.to_string(),
    }
}

/// A message's text: its string, or its text parts joined.
fn message_text(i: usize, m: &MessageIn) -> Result<String, ApiError> {
    Ok(match &m.content {
        None => String::new(),
        Some(Content::Text(s)) => s.clone(),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(text)) => texts.push(text.as_str()),
                    ("text", None) => {
                        return Err(ApiError::missing_param(&format!(
                            "messages[{i}].content[{j}].text"
                        )))
                    }
                    (other, _) => {
                        return Err(ApiError::invalid_value(
                            &format!("messages[{i}].content[{j}].type"),
                            format!(
                                "content parts of type `{other}` are not supported; only \
                                 `text` is"
                            ),
                        ))
                    }
                }
            }
            texts.join("\n")
        }
    })
}

/// A completion prompt, as text to tokenize or as token ids.
enum PromptIn {
    Text(String),
    Tokens(Vec<u32>),
}

fn prompt_in(prompt: Option<Prompt>) -> Result<PromptIn, ApiError> {
    let one = || {
        ApiError::invalid_value(
            "prompt",
            "exactly one prompt is supported per request (batches are not)",
        )
    };
    match prompt {
        None => Err(ApiError::missing_param("prompt")),
        Some(Prompt::Text(s)) => Ok(PromptIn::Text(s)),
        Some(Prompt::Texts(v)) => match <[String; 1]>::try_from(v) {
            Ok([s]) => Ok(PromptIn::Text(s)),
            Err(_) => Err(one()),
        },
        Some(Prompt::Tokens(ids)) => Ok(PromptIn::Tokens(ids)),
        Some(Prompt::TokenBatches(v)) => match <[Vec<u32>; 1]>::try_from(v) {
            Ok([ids]) => Ok(PromptIn::Tokens(ids)),
            Err(_) => Err(one()),
        },
    }
}

/// Runs CPU work (templates, tokenizing) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
}

/// Checks the prompt against the context, waits for the engine and starts the
/// generation; its events come on the receiver. Every API answers through here.
pub(crate) async fn start(
    state: &AppState,
    prepared: Prepared,
    prompt: Vec<u32>,
    received: Instant,
) -> Result<(mpsc::Receiver<Event>, Answering), ApiError> {
    let context = prepared.model.config().context_length;
    let param = prepared.prompt_param;
    if prompt.is_empty() {
        return Err(ApiError::invalid_value(
            param,
            format!("`{param}` is empty"),
        ));
    }
    // The engine needs room for at least one generated token.
    if prompt.len() >= context {
        return Err(ApiError::context_length_exceeded(
            param,
            format!(
                "this model's maximum context length is {context} tokens, but the {param} \
                 is {} tokens long; shorten it",
                prompt.len()
            ),
        ));
    }
    let room = context - prompt.len();
    // A `max_tokens` beyond the room left is cut to it, as llama-server and Ollama do
    // (agents such as opencode ask for 32000); the answer then ends with "length".
    let max_tokens = match prepared.max_tokens {
        None => room.min(DEFAULT_MAX_TOKENS),
        Some(n) => n.min(room),
    };
    let params = GenerateParams {
        sampling: prepared.sampling,
        max_tokens,
        stop: prepared.stop,
        cache_prompt: prepared.cache_prompt,
    };
    let answering = Answering {
        stream: prepared.stream,
        include_usage: prepared.include_usage,
        tools: prepared.tools,
        logprobs: prepared.logprobs.is_some(),
    };
    let job = Job {
        backend: prepared.model,
        prompt,
        params,
        received,
        grammar: prepared.grammar,
        ignore_eos: prepared.ignore_eos,
        logprobs: prepared.logprobs,
    };
    let rx = runner::start(state, job).await?;
    Ok((rx, answering))
}

/// How a started generation is to be answered.
pub(crate) struct Answering {
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    /// The tools the answer may call, and how the model writes calls.
    pub(crate) tools: Option<(Arc<ToolSet>, Format)>,
    /// Whether to report log-probabilities.
    pub(crate) logprobs: bool,
}

/// Starts the generation and answers it in OpenAI's shape.
async fn respond(
    state: AppState,
    prepared: Prepared,
    prompt: Vec<u32>,
    received: Instant,
    kind: Kind,
) -> Result<Response, ApiError> {
    match (prepared.stream, prepared.n) {
        (false, _) => respond_whole(state, prepared, prompt, received, kind).await,
        (true, 1) => {
            let (rx, answering) = start(&state, prepared, prompt, received).await?;
            Ok(Sse::new(Output::new(&state, kind, answering).stream(rx))
                .keep_alive(KeepAlive::default())
                .into_response())
        }
        (true, _) => respond_many_streamed(state, prepared, prompt, received, kind).await,
    }
}

/// Answers whole, with `n` choices: one generation per choice, one after another, the
/// `i`-th drawn with the request's seed plus `i` (so greedy choices are the same and
/// sampled ones differ, each reproducible). Usage counts the prompt once and every
/// choice's tokens.
async fn respond_whole(
    state: AppState,
    prepared: Prepared,
    prompt: Vec<u32>,
    received: Instant,
    kind: Kind,
) -> Result<Response, ApiError> {
    let mut answers = Vec::with_capacity(prepared.n);
    let mut usage: Option<Usage> = None;
    let mut out = None;
    for i in 0..prepared.n {
        let mut choice = prepared.clone();
        choice.sampling.seed = prepared.sampling.seed.wrapping_add(i as u64);
        let (rx, answering) = start(&state, choice, prompt.clone(), received).await?;
        let o = out.get_or_insert_with(|| Output::new(&state, kind, answering));
        let whole = runner::collect(rx).await?;
        let logprobs = o.logprobs.then(|| o.logprobs_json(&whole.logprobs, &mut 0));
        usage = Some(usage.map_or(whole.usage, |u| u.with_more_choice(whole.usage)));
        answers.push((whole.text, whole.finish, logprobs));
    }
    match (out, usage) {
        (Some(out), Some(usage)) => Ok(out.whole_choices(answers, usage, None)),
        _ => Err(ApiError::internal("no choice was generated")),
    }
}

/// Streams `n` > 1 choices: generated one after another as in [`respond_whole`], each
/// choice's chunks carrying its `index` (its role chunk first, its finish chunk last), then
/// the usage chunk (if asked) for all of them and `[DONE]`.
async fn respond_many_streamed(
    state: AppState,
    prepared: Prepared,
    prompt: Vec<u32>,
    received: Instant,
    kind: Kind,
) -> Result<Response, ApiError> {
    let n = prepared.n;
    // The first choice starts here, so what fails before anything is sent (a full queue,
    // a prompt too long) is a plain error response.
    let (first, answering) = start(&state, prepared.clone(), prompt.clone(), received).await?;
    let out = Output::new(&state, kind, answering);
    let (tx, rx) = mpsc::channel::<(u32, Event)>(32);
    tokio::spawn(async move {
        let mut current = first;
        for i in 0..n {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            while let Some(event) = current.recv().await {
                if tx.send((index, event)).await.is_err() {
                    return; // the client left
                }
            }
            if i + 1 == n {
                return;
            }
            let mut choice = prepared.clone();
            choice.sampling.seed = prepared.sampling.seed.wrapping_add(i as u64 + 1);
            match start(&state, choice, prompt.clone(), received).await {
                Ok((rx, _)) => current = rx,
                Err(e) => {
                    let _ = tx.send((index + 1, Event::Failed(e))).await;
                    return;
                }
            }
        }
    });
    Ok(Sse::new(out.stream_choices(channel_stream(rx), n))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Writes one response's objects: the whole answer, or its stream of chunks.
#[derive(Clone)]
pub(crate) struct Output {
    /// The choice a streamed chunk is of (`n` > 1 streams several, by index).
    pub(crate) index: u32,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) kind: Kind,
    pub(crate) include_usage: bool,
    /// The tools the answer may call: its text is read back into calls.
    pub(crate) tools: Option<(Arc<ToolSet>, Format)>,
    /// Whether the client asked for log-probabilities (`logprobs` is `null` otherwise).
    pub(crate) logprobs: bool,
}

/// A tool call as the chat API writes it, whole (`index` only in stream deltas).
fn call_json(call: &Call, index: Option<usize>, arguments: &str) -> Value {
    let mut v = serde_json::json!({
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    });
    if let Some(i) = index {
        v["index"] = Value::from(i);
    }
    v
}

/// A call's id, as OpenAI's look (`call_` and 24 letters and digits).
pub(crate) fn new_call_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = random_seed();
    let mut id = String::from("call_");
    for _ in 0..24 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        id.push(char::from(ALPHABET[(x >> 58) as usize % ALPHABET.len()]));
    }
    id
}

impl Output {
    /// The writer of one answer of `kind` to a request answered as `answering` says.
    fn new(state: &AppState, kind: Kind, answering: Answering) -> Output {
        Output {
            index: 0,
            id: state.new_id(match kind {
                Kind::Chat => "chatcmpl",
                Kind::Text => "cmpl",
            }),
            created: unix_now(),
            model: state.model_id(),
            kind,
            include_usage: answering.include_usage,
            tools: answering.tools,
            logprobs: answering.logprobs,
        }
    }

    fn object<C>(&self, object: &'static str, choices: Vec<C>) -> CompletionObject<'_, C> {
        CompletionObject {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices,
            usage: None,
            swarm: None,
        }
    }

    /// Log-probabilities in the shape of this response's API: chat's `{"content": [{token,
    /// logprob, bytes, top_logprobs}]}`, or the completions API's `{tokens, token_logprobs,
    /// top_logprobs, text_offset}` (offsets counted on from `offset`, in characters).
    fn logprobs_json(&self, entries: &[runner::LogprobEntry], offset: &mut usize) -> Value {
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let top: Vec<Value> = e
                            .top
                            .iter()
                            .map(|(token, bytes, logprob)| {
                                serde_json::json!({"token": token, "logprob": logprob, "bytes": bytes})
                            })
                            .collect();
                        serde_json::json!({
                            "token": e.token,
                            "logprob": e.logprob,
                            "bytes": e.bytes,
                            "top_logprobs": top,
                        })
                    })
                    .collect();
                serde_json::json!({ "content": content })
            }
            Kind::Text => {
                let mut text_offset = Vec::with_capacity(entries.len());
                for e in entries {
                    text_offset.push(*offset);
                    *offset += e.token.chars().count();
                }
                let top: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let alternatives: serde_json::Map<String, Value> = e
                            .top
                            .iter()
                            .map(|(token, _, logprob)| (token.clone(), Value::from(*logprob)))
                            .collect();
                        Value::Object(alternatives)
                    })
                    .collect();
                serde_json::json!({
                    "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": text_offset,
                })
            }
        }
    }

    /// The whole answer, with `swarm` (what the swarm did) as an extra top-level field.
    pub(crate) fn whole_with(
        &self,
        text: String,
        finish: FinishReason,
        usage: Usage,
        swarm: Option<serde_json::Value>,
    ) -> Response {
        self.whole_choices(vec![(text, finish, None)], usage, swarm)
    }

    /// The whole answer with one choice per `(text, finish, logprobs)`, in order (`n`).
    fn whole_choices(
        &self,
        answers: Vec<(String, FinishReason, Option<Value>)>,
        usage: Usage,
        swarm: Option<serde_json::Value>,
    ) -> Response {
        match self.kind {
            Kind::Chat => {
                let choices: Vec<ChatChoice> = answers
                    .into_iter()
                    .enumerate()
                    .map(|(index, (text, finish, logprobs))| {
                        self.chat_choice(index, text, finish, logprobs)
                    })
                    .collect();
                let mut body = self.object("chat.completion", choices);
                body.usage = Some(usage);
                body.swarm = swarm;
                axum::Json(body).into_response()
            }
            Kind::Text => {
                let choices: Vec<TextChoice> = answers
                    .into_iter()
                    .enumerate()
                    .map(|(index, (text, finish, logprobs))| TextChoice {
                        index: u32::try_from(index).unwrap_or(u32::MAX),
                        text,
                        logprobs,
                        finish_reason: Some(finish.as_str()),
                    })
                    .collect();
                let mut body = self.object("text_completion", choices);
                body.usage = Some(usage);
                axum::Json(body).into_response()
            }
        }
    }

    /// One chat choice: the text, or the tool calls read back from it.
    fn chat_choice(
        &self,
        index: usize,
        text: String,
        finish: FinishReason,
        logprobs: Option<Value>,
    ) -> ChatChoice {
        let mut finish_reason = finish.as_str();
        let (content, tool_calls) = match &self.tools {
            None => (Some(text), Vec::new()),
            Some((tools, format)) => {
                let parsed = tools.parse(&text, *format, new_call_id);
                if !parsed.calls.is_empty() {
                    finish_reason = "tool_calls";
                }
                let calls = parsed
                    .calls
                    .iter()
                    .map(|c| call_json(c, None, &c.arguments))
                    .collect();
                let content = (!parsed.content.is_empty() || parsed.calls.is_empty())
                    .then_some(parsed.content);
                (content, calls)
            }
        };
        ChatChoice {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            message: MessageOut {
                role: "assistant",
                content,
                tool_calls,
            },
            logprobs,
            finish_reason,
        }
    }

    /// A chunk carrying `text` (with the role, for the first chat chunk) or the finish
    /// reason.
    fn chunk(&self, role: bool, text: Option<String>, finish: Option<&'static str>) -> SseEvent {
        self.chunk_with(role, text, finish, None)
    }

    /// [`Output::chunk`], with the log-probabilities of the tokens it carries.
    fn chunk_with(
        &self,
        role: bool,
        text: Option<String>,
        finish: Option<&'static str>,
        logprobs: Option<Value>,
    ) -> SseEvent {
        match self.kind {
            Kind::Chat => {
                let delta = Delta {
                    role: role.then_some("assistant"),
                    content: text,
                    tool_calls: None,
                };
                let choice = ChatChunkChoice {
                    index: self.index,
                    delta,
                    logprobs,
                    finish_reason: finish,
                };
                sse_json(&self.object("chat.completion.chunk", vec![choice]))
            }
            Kind::Text => {
                let choice = TextChoice {
                    index: self.index,
                    text: text.unwrap_or_default(),
                    logprobs,
                    finish_reason: finish,
                };
                sse_json(&self.object("text_completion", vec![choice]))
            }
        }
    }

    fn delta_chunk(&self, delta: Delta, finish_reason: Option<&'static str>) -> SseEvent {
        let choice = ChatChunkChoice {
            index: self.index,
            delta,
            logprobs: None,
            finish_reason,
        };
        sse_json(&self.object("chat.completion.chunk", vec![choice]))
    }

    /// The usage chunk: no choices, only `usage` (sent when the client asked for it).
    fn usage_chunk(&self, usage: Usage) -> SseEvent {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let mut body = self.object::<TextChoice>(object, Vec::new());
        body.usage = Some(usage);
        sse_json(&body)
    }

    /// A piece of streamed text: sent as it comes, or, when the answer may hold tool calls,
    /// only as far as the gate lets content out, and the calls as they are written when
    /// they are drawn under the grammar.
    fn text_events(
        &self,
        gate: &mut StreamGate,
        text: String,
        logprobs: &mut Logprobs,
    ) -> Vec<SseEvent> {
        let Some((tools, _)) = &self.tools else {
            let lp = logprobs.take(self);
            return vec![self.chunk_with(false, Some(text), None, lp)];
        };
        let text = gate.push(&text);
        let mut events = Vec::new();
        if !text.is_empty() {
            let lp = logprobs.take(self);
            events.push(self.chunk_with(false, Some(text), None, lp));
        }
        for delta in gate.calls(tools, new_call_id) {
            events.push(self.call_delta(&delta));
        }
        events
    }

    /// One piece of a call as OpenAI streams it: id, type and name first, then fragments
    /// of the arguments.
    fn call_delta(&self, delta: &CallDelta) -> SseEvent {
        let call = match &delta.opening {
            Some((id, name)) => serde_json::json!({
                "index": delta.index, "id": id, "type": "function",
                "function": {"name": name, "arguments": delta.arguments},
            }),
            None => serde_json::json!({
                "index": delta.index, "function": {"arguments": delta.arguments},
            }),
        };
        self.delta_chunk(
            Delta {
                tool_calls: Some(vec![call]),
                ..Delta::default()
            },
            None,
        )
    }

    /// The end of a streamed answer: content the gate held back, the tool calls as OpenAI
    /// streams them (a first delta with id and name, then the arguments in fragments), the
    /// finish reason.
    fn end_events(
        &self,
        gate: &StreamGate,
        finish: FinishReason,
        logprobs: &mut Logprobs,
    ) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut finish_reason = finish.as_str();
        if let Some((tools, format)) = &self.tools {
            let parsed = tools.parse(gate.seen(), *format, new_call_id);
            let rest = gate.rest(&parsed);
            if !rest.is_empty() && !gate.call_cut() {
                events.push(self.chunk(false, Some(rest), None));
            }
            // Calls sent as they were written are the answer's first calls; the rest (a
            // small model's untagged second call) go now, read from the whole answer.
            let live = gate.sent_calls();
            if live > 0 {
                finish_reason = match finish {
                    FinishReason::Length => "length",
                    _ => "tool_calls",
                };
            }
            let at_end = parsed.calls.get(live..).unwrap_or_default();
            for (i, call) in (live..).zip(at_end) {
                let mut first = true;
                for fragment in argument_fragments(&call.arguments) {
                    let call = if first {
                        call_json(call, Some(i), fragment)
                    } else {
                        serde_json::json!({"index": i, "function": {"arguments": fragment}})
                    };
                    first = false;
                    events.push(self.delta_chunk(
                        Delta {
                            tool_calls: Some(vec![call]),
                            ..Delta::default()
                        },
                        None,
                    ));
                }
            }
            if !at_end.is_empty() {
                finish_reason = "tool_calls";
            }
        }
        let lp = logprobs.take(self);
        events.push(self.chunk_with(false, None, Some(finish_reason), lp));
        events
    }

    /// The SSE events of a streamed answer: for chat, a first chunk with the role; then
    /// one chunk per piece of text; a chunk with the finish reason; the usage chunk if
    /// asked; `[DONE]`. A failure after the start becomes an `{"error": …}` event, which
    /// the `openai` clients raise as an exception. (The one-choice case of
    /// [`Output::stream_choices`].)
    pub(crate) fn stream(
        self,
        rx: mpsc::Receiver<Event>,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
        self.stream_choices(channel_stream(rx).map(|event| (0, event)), 1)
    }
}

/// What a channel receives, as a stream that ends when every sender is gone.
fn channel_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// A stream's log-probabilities not yet sent: they go with the next chunk of text (or the
/// last chunk), and the completions API counts `text_offset` on across chunks.
#[derive(Default)]
struct Logprobs {
    pending: Vec<runner::LogprobEntry>,
    offset: usize,
}

impl Logprobs {
    fn take(&mut self, out: &Output) -> Option<Value> {
        if !out.logprobs || self.pending.is_empty() {
            return None;
        }
        let entries = std::mem::take(&mut self.pending);
        Some(out.logprobs_json(&entries, &mut self.offset))
    }
}

impl Output {
    /// The SSE events of `n` choices streamed one after another (`(index, event)` from
    /// `rx`): per choice, as [`Output::stream`] sends one, with its index; then the usage
    /// chunk for all (if asked) and `[DONE]`.
    fn stream_choices(
        self,
        events: impl Stream<Item = (u32, Event)> + Send + 'static,
        n: usize,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
        struct Choice {
            out: Output,
            gate: StreamGate,
            logprobs: Logprobs,
            started: bool,
        }
        struct State<S> {
            events: S,
            opened: bool,
            choices: Vec<Choice>,
            usage: Option<Usage>,
            done: usize,
            finished: bool,
        }
        let choices = (0..n)
            .map(|i| Choice {
                out: Output {
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    ..self.clone()
                },
                gate: StreamGate::for_tools(self.tools.as_ref().map(|(t, f)| (&**t, *f))),
                logprobs: Logprobs::default(),
                started: false,
            })
            .collect();
        let state = State {
            events: Box::pin(events),
            opened: false,
            choices,
            usage: None,
            done: 0,
            finished: false,
        };
        let out = Arc::new(self);
        stream::unfold(state, move |mut st| {
            let out = Arc::clone(&out);
            async move {
                if st.finished {
                    return None;
                }
                // The first choice's role chunk goes at once: the client sees the answer
                // begin before the first token.
                if !st.opened {
                    st.opened = true;
                    if let Some(first) = st.choices.first_mut() {
                        if first.out.kind == Kind::Chat {
                            first.started = true;
                            let role = first.out.chunk(true, Some(String::new()), None);
                            return Some((vec![role], st));
                        }
                    }
                }
                let Some((index, event)) = st.events.next().await else {
                    st.finished = true;
                    return Some((vec![sse_error(&runner::ended_unexpectedly())], st));
                };
                let Some(choice) = st.choices.get_mut(index as usize) else {
                    st.finished = true;
                    let e = ApiError::internal("a choice out of range");
                    return Some((vec![sse_error(&e)], st));
                };
                let mut events = Vec::new();
                if !choice.started && choice.out.kind == Kind::Chat {
                    events.push(choice.out.chunk(true, Some(String::new()), None));
                }
                choice.started = true;
                match event {
                    Event::Text(text) => events.extend(choice.out.text_events(
                        &mut choice.gate,
                        text,
                        &mut choice.logprobs,
                    )),
                    Event::Logprob(entry) => choice.logprobs.pending.push(entry),
                    Event::Done { finish, usage, .. } => {
                        events.extend(choice.out.end_events(
                            &choice.gate,
                            finish,
                            &mut choice.logprobs,
                        ));
                        st.done += 1;
                        let usage = st.usage.map_or(usage, |u| u.with_more_choice(usage));
                        st.usage = Some(usage);
                        // The last choice done: the usage chunk (if asked) and the end.
                        if st.done == st.choices.len() {
                            st.finished = true;
                            if out.include_usage {
                                events.push(out.usage_chunk(usage));
                            }
                            events.push(SseEvent::default().data("[DONE]"));
                        }
                    }
                    Event::Failed(e) => {
                        st.finished = true;
                        events.push(sse_error(&e));
                    }
                }
                Some((events, st))
            }
        })
        .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
    }
}

impl Output {
    /// [`Output::replay`] of the answer `answer` gives, once it has come; an error event
    /// if it fails. Dropping the stream drops `answer`.
    pub(crate) fn replay_when_done(
        self,
        answer: impl Future<Output = Result<(Vec<Value>, Usage), ApiError>> + Send + 'static,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
        stream::once(answer).flat_map(move |answer| match answer {
            Ok((choices, usage)) => self.clone().replay(&choices, usage).left_stream(),
            Err(e) => stream::iter([Ok(sse_error(&e))]).right_stream(),
        })
    }

    /// The SSE events of a finished chat answer (a `chat.completion` object's `choices`, as
    /// a swarm agent's chat API gave them), streamed the way a live answer is: per choice,
    /// the role, the content in word-sized pieces (in one piece with its log-probabilities
    /// when it has them), each tool call as OpenAI streams it, the finish reason; then the
    /// usage chunk (if asked) and `[DONE]`.
    pub(crate) fn replay(
        self,
        choices: &[Value],
        usage: Usage,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
        let mut events = Vec::new();
        for (index, choice) in choices.iter().enumerate() {
            let out = Output {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                ..self.clone()
            };
            events.push(out.chunk(true, Some(String::new()), None));
            let content = choice
                .pointer("/message/content")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let logprobs = choice.get("logprobs").filter(|l| !l.is_null()).cloned();
            if logprobs.is_some() {
                events.push(out.chunk_with(false, Some(content.to_owned()), None, logprobs));
            } else {
                for piece in pieces(content) {
                    events.push(out.chunk(false, Some(piece.to_owned()), None));
                }
            }
            let calls = choice
                .pointer("/message/tool_calls")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (i, call) in calls.iter().enumerate() {
                let name = call.pointer("/function/name").and_then(Value::as_str);
                let arguments = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                for (n, fragment) in argument_fragments(arguments).into_iter().enumerate() {
                    let delta = if n == 0 {
                        serde_json::json!({
                            "index": i,
                            "id": call.get("id"),
                            "type": "function",
                            "function": {"name": name, "arguments": fragment},
                        })
                    } else {
                        serde_json::json!({"index": i, "function": {"arguments": fragment}})
                    };
                    events.push(out.delta_chunk(
                        Delta {
                            tool_calls: Some(vec![delta]),
                            ..Delta::default()
                        },
                        None,
                    ));
                }
            }
            let finish = match choice.get("finish_reason").and_then(Value::as_str) {
                Some("length") => "length",
                Some("tool_calls") => "tool_calls",
                _ => "stop",
            };
            events.push(out.chunk(false, None, Some(finish)));
        }
        if self.include_usage {
            events.push(self.usage_chunk(usage));
        }
        events.push(SseEvent::default().data("[DONE]"));
        stream::iter(events.into_iter().map(Ok))
    }
}

/// `text` cut after each run of whitespace, so that the pieces join back to `text`: how an
/// answer that came whole is streamed.
pub(crate) fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let word_end = rest
            .char_indices()
            .skip_while(|(_, c)| c.is_whitespace())
            .find(|(_, c)| c.is_whitespace())
            .map_or(rest.len(), |(i, _)| i);
        let end = rest[word_end..]
            .char_indices()
            .find(|(_, c)| !c.is_whitespace())
            .map_or(rest.len(), |(i, _)| word_end + i);
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

fn sse_json<T: Serialize>(value: &T) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(json) => SseEvent::default().data(json),
        Err(e) => sse_error(&ApiError::internal(format!(
            "cannot serialize a chunk: {e}"
        ))),
    }
}

fn sse_error(e: &ApiError) -> SseEvent {
    SseEvent::default().data(e.body())
}
