//! Anthropic's Messages API, `POST /v1/messages`, so that Anthropic-SDK clients (and the
//! agents built on them) can talk to a Shoal node, as llama-server and exo allow.
//!
//! A request is translated into the OpenAI request the rest of the API already serves —
//! `system` becomes a system message, `tool_use` blocks become `tool_calls`, `tool_result`
//! blocks become `tool` messages, `tools[].input_schema` becomes `parameters`,
//! `tool_choice` `any` becomes `required` — then prepared and run the same way. Only the
//! answer is written differently: content blocks (`text`, `tool_use` with its `input`
//! object), `stop_reason` (`end_turn`, `max_tokens`, `tool_use`, `stop_sequence` with the
//! `stop_sequence` that ended the answer), and when streaming the
//! named SSE events `message_start`, `content_block_start`, `content_block_delta`
//! (`text_delta`, `input_json_delta`), `content_block_stop`, `message_delta`,
//! `message_stop`. Errors use Anthropic's shape, `{"type":"error","error":{"type","message"}}`.
//!
//! Not supported: images and documents in content (a 400 says so), server tools (web
//! search and the like), extended thinking (`thinking` is ignored).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_engine::FinishReason;
use tokio::sync::mpsc;

use crate::completions::{self, new_call_id, Answering};
use crate::error::{ApiError, Json};
use crate::runner::{self, Event};
use crate::state::AppState;
use crate::tools::{argument_fragments, CallDelta, Parsed, StreamGate};
use crate::types::{CompletionRequest, Content, MessageIn, Stop, Usage};

/// The body of `POST /v1/messages`.
#[derive(Debug, Deserialize)]
pub(crate) struct MessagesRequest {
    model: Option<String>,
    max_tokens: Option<i64>,
    messages: Vec<AnthropicMessage>,
    system: Option<TextOrBlocks>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct AnthropicMessage {
    role: String,
    content: TextOrBlocks,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TextOrBlocks {
    Text(String),
    Blocks(Vec<Value>),
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): State<AppState>,
    body: Result<Json<MessagesRequest>, ApiError>,
) -> Response {
    match answer(state, body).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

/// `POST /v1/messages/count_tokens`: how many tokens a Messages request's prompt is (its
/// system prompt, messages and tools as the model's template renders them), as Anthropic
/// answers it — clients such as Claude Code ask before they send. A swarm name is counted
/// with the head's model.
pub(crate) async fn count_tokens(
    State(state): State<AppState>,
    body: Result<Json<MessagesRequest>, ApiError>,
) -> Response {
    let counted = async {
        let Json(mut req) = body?;
        // Counting asks for no answer: any limit renders the same prompt.
        req.max_tokens.get_or_insert(1);
        req.stream = None;
        let openai = translate(req, &state.model_id())?;
        let (_, prompt) = completions::prepare_chat(&state, &openai).await?;
        Ok::<_, ApiError>(prompt.len())
    };
    match counted.await {
        Ok(n) => axum::Json(json!({ "input_tokens": n })).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn answer(
    state: AppState,
    body: Result<Json<MessagesRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let Json(req) = body?;
    let model = req.model.clone().unwrap_or_default();
    let (rx, answering) = match crate::swarm::swarm_model(Some(&model))? {
        // `swarm`, `swarm:vote`…: the swarm answers, as on the chat API.
        Some(strategy) => {
            let openai = translate(req, &model)?;
            crate::swarm::start(&state, &openai, strategy, received).await?
        }
        None => {
            let openai = translate(req, &state.model_id())?;
            let (prepared, prompt) = completions::prepare_chat(&state, &openai).await?;
            completions::start(&state, prepared, prompt, received).await?
        }
    };
    let out = Writer {
        id: format!("msg_{}", &new_call_id()[5..]),
        model: if model.is_empty() {
            state.model_id()
        } else {
            model
        },
    };
    if answering.stream {
        Ok(Sse::new(out.stream(rx, answering))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        let whole = runner::collect(rx).await?;
        Ok(axum::Json(out.whole(&whole, &answering)).into_response())
    }
}

/// Anthropic's request as the OpenAI request the node serves.
fn translate(req: MessagesRequest, model_id: &str) -> Result<CompletionRequest, ApiError> {
    let max_tokens = req
        .max_tokens
        .ok_or_else(|| ApiError::missing_param("max_tokens"))?;
    if let Some(t) = req.temperature {
        if !(0.0..=1.0).contains(&t) {
            return Err(ApiError::invalid_value(
                "temperature",
                format!("`temperature` must be between 0 and 1, got {t}"),
            ));
        }
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        messages.push(message("system", text_of(system, "system")?, None, None));
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        let param = format!("messages[{i}].content");
        match m.role.as_str() {
            "user" => user_turn(m.content, &param, &mut messages)?,
            "assistant" => messages.push(assistant_turn(m.content, &param)?),
            other => {
                return Err(ApiError::invalid_value(
                    &format!("messages[{i}].role"),
                    format!("`role` must be \"user\" or \"assistant\", got {other:?}"),
                ))
            }
        }
    }
    let tools = match req.tools {
        None => None,
        Some(tools) => Some(
            tools
                .iter()
                .enumerate()
                .map(|(i, t)| tool(i, t))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let (tool_choice, parallel) = match &req.tool_choice {
        None => (None, None),
        Some(choice) => {
            let parallel = choice
                .get("disable_parallel_tool_use")
                .and_then(Value::as_bool)
                .map(|disable| !disable);
            let openai = match choice.get("type").and_then(Value::as_str) {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => {
                    let name = choice
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::missing_param("tool_choice.name"))?;
                    json!({"type": "function", "function": {"name": name}})
                }
                other => {
                    return Err(ApiError::invalid_value(
                        "tool_choice.type",
                        format!(
                            "`tool_choice.type` must be \"auto\", \"any\", \"tool\" or \
                             \"none\", got {other:?}"
                        ),
                    ))
                }
            };
            (Some(openai), parallel)
        }
    };
    Ok(CompletionRequest {
        // Any model name is taken for the node's one model: Anthropic clients are often
        // configured with a Claude model name they cannot change.
        model: Some(model_id.to_owned()),
        messages: Some(messages),
        max_tokens: Some(max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop: req.stop_sequences.map(Stop::Many),
        stream: req.stream,
        tools,
        tool_choice,
        parallel_tool_calls: parallel,
        ..CompletionRequest::default()
    })
}

fn message(
    role: &str,
    text: String,
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
) -> MessageIn {
    MessageIn {
        role: role.to_owned(),
        content: Some(Content::Text(text)),
        tool_calls,
        tool_call_id,
        name: None,
    }
}

/// The text of a string or of a list of text blocks.
fn text_of(content: TextOrBlocks, param: &str) -> Result<String, ApiError> {
    match content {
        TextOrBlocks::Text(s) => Ok(s),
        TextOrBlocks::Blocks(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                texts.push(block_text(block, &format!("{param}[{j}]"))?);
            }
            Ok(texts.join("\n"))
        }
    }
}

fn block_type<'b>(block: &'b Value, param: &str) -> Result<&'b str, ApiError> {
    block
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing_param(&format!("{param}.type")))
}

fn block_text(block: &Value, param: &str) -> Result<String, ApiError> {
    match block_type(block, param)? {
        "text" => block
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ApiError::missing_param(&format!("{param}.text"))),
        other => Err(unsupported_block(other, param)),
    }
}

fn unsupported_block(kind: &str, param: &str) -> ApiError {
    ApiError::invalid_value(
        &format!("{param}.type"),
        format!("content blocks of type `{kind}` are not supported here"),
    )
}

/// A user turn: its `tool_result` blocks become `tool` messages (in order, first), the rest
/// of its text one user message.
fn user_turn(content: TextOrBlocks, param: &str, out: &mut Vec<MessageIn>) -> Result<(), ApiError> {
    let blocks = match content {
        TextOrBlocks::Text(s) => {
            out.push(message("user", s, None, None));
            return Ok(());
        }
        TextOrBlocks::Blocks(blocks) => blocks,
    };
    let mut texts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let param = format!("{param}[{j}]");
        match block_type(block, &param)? {
            "tool_result" => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::missing_param(&format!("{param}.tool_use_id")))?;
                let mut result = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .enumerate()
                        .map(|(k, p)| block_text(p, &format!("{param}.content[{k}]")))
                        .collect::<Result<Vec<_>, _>>()?
                        .join("\n"),
                    Some(_) => {
                        return Err(ApiError::invalid_value(
                            &format!("{param}.content"),
                            "a tool result's `content` must be a string or text blocks",
                        ))
                    }
                };
                if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                    result = format!("Error: {result}");
                }
                out.push(message("tool", result, None, Some(id.to_owned())));
            }
            "text" => texts.push(block_text(block, &param)?),
            other => return Err(unsupported_block(other, &param)),
        }
    }
    if !texts.is_empty() {
        out.push(message("user", texts.join("\n"), None, None));
    }
    Ok(())
}

/// An assistant turn: its text, and its `tool_use` blocks as OpenAI `tool_calls`.
fn assistant_turn(content: TextOrBlocks, param: &str) -> Result<MessageIn, ApiError> {
    let blocks = match content {
        TextOrBlocks::Text(s) => return Ok(message("assistant", s, None, None)),
        TextOrBlocks::Blocks(blocks) => blocks,
    };
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let param = format!("{param}[{j}]");
        match block_type(block, &param)? {
            "text" => texts.push(block_text(block, &param)?),
            "tool_use" => {
                let field = |name: &str| {
                    block
                        .get(name)
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::missing_param(&format!("{param}.{name}")))
                };
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": field("id")?,
                    "type": "function",
                    "function": {"name": field("name")?, "arguments": input.to_string()},
                }));
            }
            // The model's own reasoning of an earlier turn: not shown to it again.
            "thinking" | "redacted_thinking" => {}
            other => return Err(unsupported_block(other, &param)),
        }
    }
    let calls = (!calls.is_empty()).then_some(calls);
    Ok(message("assistant", texts.join("\n"), calls, None))
}

/// An Anthropic tool (`name`, `description`, `input_schema`) as an OpenAI function tool.
fn tool(i: usize, t: &Value) -> Result<Value, ApiError> {
    if let Some(kind) = t.get("type").and_then(Value::as_str) {
        if kind != "custom" {
            return Err(ApiError::invalid_value(
                &format!("tools[{i}].type"),
                format!("server tools such as `{kind}` are not supported; define a custom tool"),
            ));
        }
    }
    let name = t
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing_param(&format!("tools[{i}].name")))?;
    let mut function = json!({
        "name": name,
        "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
    });
    if let Some(d) = t.get("description") {
        function["description"] = d.clone();
    }
    Ok(json!({"type": "function", "function": function}))
}

/// Writes one answer in Anthropic's shape.
struct Writer {
    id: String,
    model: String,
}

/// The answer read back: its text and calls (calls only when tools were offered).
fn read_back(text: &str, answering: &Answering) -> Parsed {
    crate::tools::read_back(answering.tools.as_ref(), text, new_tool_id)
}

/// A tool-use id as Anthropic's look.
fn new_tool_id() -> String {
    format!("toolu_{}", &new_call_id()[5..])
}

/// Anthropic's usage: `input_tokens` are the prompt tokens computed, and the ones the prompt
/// cache held are `cache_read_input_tokens` (its own prompt caching reports them so).
fn anthropic_usage(usage: &Usage) -> serde_json::Value {
    json!({
        "input_tokens": usage.uncached_prompt_tokens(),
        "cache_read_input_tokens": usage.prompt_tokens_details.cached_tokens,
        "output_tokens": usage.completion_tokens,
    })
}

fn stop_reason(finish: FinishReason, calls: bool, stop_sequence: Option<&str>) -> &'static str {
    match (calls, finish) {
        (true, _) => "tool_use",
        (false, FinishReason::Length) => "max_tokens",
        (false, _) if stop_sequence.is_some() => "stop_sequence",
        (false, _) => "end_turn",
    }
}

fn tool_use_block(call: &crate::tools::Call) -> Value {
    let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input})
}

impl Writer {
    fn whole(&self, whole: &runner::Whole, answering: &Answering) -> Value {
        let parsed = read_back(&whole.text, answering);
        let stop_sequence = whole.stop_sequence.as_deref();
        let mut content = Vec::new();
        if !parsed.content.is_empty() || parsed.calls.is_empty() {
            content.push(json!({"type": "text", "text": parsed.content}));
        }
        content.extend(parsed.calls.iter().map(tool_use_block));
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason(whole.finish, !parsed.calls.is_empty(), stop_sequence),
            "stop_sequence": stop_sequence,
            "usage": anthropic_usage(&whole.usage),
        })
    }

    /// The named SSE events of a streamed answer.
    fn stream(
        self,
        rx: mpsc::Receiver<Event>,
        answering: Answering,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
        struct Run {
            rx: mpsc::Receiver<Event>,
            gate: StreamGate,
            blocks: Blocks,
            started: bool,
            finished: bool,
        }
        let writer = Arc::new(self);
        let answering = Arc::new(answering);
        let run = Run {
            rx,
            gate: StreamGate::for_tools(answering.tools.as_ref().map(|(t, f)| (&**t, *f))),
            blocks: Blocks::default(),
            started: false,
            finished: false,
        };
        stream::unfold(run, move |mut run| {
            let writer = Arc::clone(&writer);
            let answering = Arc::clone(&answering);
            async move {
                if run.finished {
                    return None;
                }
                if !run.started {
                    run.started = true;
                    let start = json!({
                        "type": "message_start",
                        "message": {
                            "id": writer.id, "type": "message", "role": "assistant",
                            "model": writer.model, "content": [], "stop_reason": null,
                            "stop_sequence": null,
                            "usage": {"input_tokens": 0, "output_tokens": 0},
                        },
                    });
                    let events = vec![
                        named("message_start", &start),
                        named("ping", &json!({"type": "ping"})),
                    ];
                    return Some((events, run));
                }
                let events = match run.rx.recv().await {
                    // Not asked for through this API.
                    Some(Event::Logprob(_)) => Vec::new(),
                    Some(Event::Text(text)) => match &answering.tools {
                        Some((tools, _)) => {
                            let text = run.gate.push(&text);
                            let mut events = run.blocks.text(text);
                            for delta in run.gate.calls(tools, new_tool_id) {
                                events.extend(run.blocks.call(&delta));
                            }
                            events
                        }
                        None => run.blocks.text(text),
                    },
                    Some(Event::Done {
                        finish,
                        usage,
                        stop_sequence,
                    }) => {
                        run.finished = true;
                        let mut events = Vec::new();
                        let parsed = read_back(run.gate.seen(), &answering);
                        if answering.tools.is_some() && !run.gate.call_cut() {
                            events.extend(run.blocks.text(run.gate.rest(&parsed)));
                        }
                        // Calls sent as they were written are the answer's first calls; the
                        // rest go now, read from the whole answer.
                        let live = run.gate.sent_calls();
                        {
                            let rest = parsed.calls.get(live..).unwrap_or_default();
                            for (index, call) in (live..).zip(rest) {
                                let fragments = argument_fragments(&call.arguments);
                                for (n, fragment) in fragments.into_iter().enumerate() {
                                    events.extend(run.blocks.call(&CallDelta {
                                        index,
                                        opening:
                                            (n == 0).then(|| (call.id.clone(), call.name.clone())),
                                        arguments: fragment.to_owned(),
                                    }));
                                }
                            }
                        }
                        let calls = live > 0 || !parsed.calls.is_empty();
                        if run.blocks.next == 0 {
                            // An empty answer still has its (empty) text block.
                            events
                                .extend(run.blocks.open(json!({"type": "text", "text": ""}), true));
                        }
                        events.extend(run.blocks.close());
                        events.push(named(
                            "message_delta",
                            &json!({
                                "type": "message_delta",
                                "delta": {"stop_reason": stop_reason(finish, calls,
                                                                     stop_sequence.as_deref()),
                                          "stop_sequence": stop_sequence},
                                "usage": anthropic_usage(&usage),
                            }),
                        ));
                        events.push(named("message_stop", &json!({"type": "message_stop"})));
                        events
                    }
                    Some(Event::Failed(e)) => {
                        run.finished = true;
                        vec![named("error", &error_body(&e))]
                    }
                    None => {
                        run.finished = true;
                        vec![named("error", &error_body(&runner::ended_unexpectedly()))]
                    }
                };
                Some((events, run))
            }
        })
        .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
    }
}

/// A streamed message's content blocks: text and tool uses, one open at a time, numbered
/// in order.
#[derive(Default)]
struct Blocks {
    /// The open block: its index, and whether it is text.
    open: Option<(usize, bool)>,
    /// The next block's index.
    next: usize,
}

impl Blocks {
    /// A text delta, opening a text block first if none is open.
    fn text(&mut self, text: String) -> Vec<SseEvent> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut events = Vec::new();
        if !matches!(self.open, Some((_, true))) {
            events.extend(self.open(json!({"type": "text", "text": ""}), true));
        }
        let index = self.next - 1;
        events.push(named(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
        ));
        events
    }

    /// A piece of a tool call: its block opens with the call's id and name, and its
    /// arguments follow as `input_json_delta`s.
    fn call(&mut self, delta: &CallDelta) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if let Some((id, name)) = &delta.opening {
            events.extend(self.open(
                json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                false,
            ));
        }
        if !delta.arguments.is_empty() {
            events.push(named(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": self.next - 1,
                        "delta": {"type": "input_json_delta",
                                  "partial_json": delta.arguments}}),
            ));
        }
        events
    }

    /// Closes the open block and opens `block`.
    fn open(&mut self, block: Value, text: bool) -> Vec<SseEvent> {
        let mut events = self.close();
        events.push(named(
            "content_block_start",
            &json!({"type": "content_block_start", "index": self.next,
                    "content_block": block}),
        ));
        self.open = Some((self.next, text));
        self.next += 1;
        events
    }

    fn close(&mut self) -> Vec<SseEvent> {
        match self.open.take() {
            Some((index, _)) => vec![named(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            )],
            None => Vec::new(),
        }
    }
}

fn named(event: &str, data: &Value) -> SseEvent {
    SseEvent::default().event(event).data(data.to_string())
}

/// Anthropic's error type for an HTTP status.
fn error_type(e: &ApiError) -> &'static str {
    match e.status.as_u16() {
        400 | 408 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_body(e: &ApiError) -> Value {
    let message = match &e.param {
        // Anthropic's own words for it, which clients (Claude Code) compact their history on.
        _ if e.code == Some("context_length_exceeded") => {
            format!("prompt is too long: {}", e.message)
        }
        Some(p) => format!("{p}: {}", e.message),
        None => e.message.clone(),
    };
    json!({"type": "error", "error": {"type": error_type(e), "message": message}})
}

fn error_response(e: &ApiError) -> Response {
    let mut response = (
        e.status,
        [(header::CONTENT_TYPE, "application/json")],
        error_body(e).to_string(),
    )
        .into_response();
    if let Some(seconds) = e.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(v: Value) -> MessagesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_prompt_too_long_is_said_in_anthropics_words() {
        let e = ApiError::context_length_exceeded("messages", "4000 tokens; the context is 2048");
        let body = error_body(&e);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(
            body["error"]["message"],
            "prompt is too long: 4000 tokens; the context is 2048"
        );
        let other = error_body(&ApiError::invalid_value("max_tokens", "must be positive"));
        assert_eq!(other["error"]["message"], "max_tokens: must be positive");
    }

    #[test]
    fn a_conversation_with_tool_use_translates() {
        let req = request(json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "17C"},
                    {"type": "text", "text": "Thanks"}
                ]}
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
        }));
        let r = translate(req, "qwen").unwrap();
        assert_eq!(r.model.as_deref(), Some("qwen"));
        let m = r.messages.unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        let call = &m[2].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(r.tool_choice, Some(json!("required")));
        assert_eq!(r.parallel_tool_calls, Some(false));
        assert_eq!(
            r.tools.unwrap()[0]["function"]["parameters"],
            json!({"type": "object"})
        );
    }

    #[test]
    fn what_cannot_be_served_is_refused() {
        for (body, param) in [
            (
                json!({"messages": [{"role": "user", "content": "hi"}]}),
                "max_tokens",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": [
                    {"type": "image", "source": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"max_tokens": 5, "temperature": 1.5,
                       "messages": [{"role": "user", "content": "hi"}]}),
                "temperature",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                       "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools[0].type",
            ),
        ] {
            let e = translate(request(body), "m").unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param));
            assert_eq!(error_body(&e)["error"]["type"], "invalid_request_error");
        }
    }
}
