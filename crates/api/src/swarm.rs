//! Swarm mode over HTTP (issue #5): `"model": "swarm"` (or `"swarm:STRATEGY"`) on the chat
//! API runs the swarm and answers like any model; `POST /v1/swarm/query` returns everything
//! the swarm did (query type, each agent's answer with role, model and time, the final
//! answer, `agents_responded`); `GET /v1/swarm/status` lists the agents.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use shoal_engine::FinishReason;
use shoal_swarm::routing::{parse_swarm_model, Strategy};
use shoal_swarm::{SwarmError, SwarmOutcome, SwarmRequest};
use shoal_wire::{ChatTurn, MAX_API_JSON};
use tokio::sync::mpsc;

use crate::completions::{self, Answering, Kind, Output, Prepared};
use crate::error::{ApiError, Json};
use crate::metrics::Metrics;
use crate::runner::Event;
use crate::state::AppState;
use crate::tools::{Format, ToolSet};
use crate::types::{CompletionRequest, Usage};

/// The strategy a `model` names: `None` when it is not a swarm model, `Some(None)` for the
/// default strategy. An unknown strategy is a 400.
pub(crate) fn swarm_model(model: Option<&str>) -> Result<Option<Option<Strategy>>, ApiError> {
    let Some(model) = model else {
        return Ok(None);
    };
    parse_swarm_model(model).map_err(|e| ApiError::invalid_value("model", e.to_string()))
}

/// `GET /v1/swarm/status`.
pub(crate) async fn status(State(state): State<AppState>) -> Result<Response, ApiError> {
    let swarm = state.swarm().ok_or_else(no_swarm)?;
    Ok(axum::Json(swarm.status()).into_response())
}

/// `POST /v1/swarm/query`: `{"query": "…"}` (or `"prompt"`) or `{"messages": […]}`, optionally `strategy`,
/// `max_tokens`, `temperature`, `top_p`, `seed`, `timeout_s`.
#[derive(Debug, Deserialize)]
pub(crate) struct QueryRequest {
    #[serde(alias = "prompt")]
    query: Option<String>,
    #[serde(flatten)]
    rest: CompletionRequest,
    strategy: Option<String>,
}

pub(crate) async fn query(
    State(state): State<AppState>,
    Json(mut req): Json<QueryRequest>,
) -> Result<Response, ApiError> {
    let swarm = state.swarm().ok_or_else(no_swarm)?;
    if let Some(q) = req.query.take() {
        if req.rest.messages.is_some() {
            return Err(ApiError::invalid_request(
                "give either `query` or `messages`, not both",
            ));
        }
        req.rest.messages = Some(vec![crate::types::MessageIn::user(q)]);
    }
    let strategy = match req.strategy.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<Strategy>()
                .map_err(|e| ApiError::invalid_value("strategy", e.to_string()))?,
        ),
    };
    let prepared = completions::check(&state, &req.rest, "messages")?;
    let whole = whole_request(&req.rest, &prepared)?;
    let request = swarm_request(
        &req.rest,
        &prepared,
        strategy,
        timeout(req.rest.timeout_s)?,
        whole,
    )?;
    let outcome = swarm.run(request).await.map_err(from_swarm)?;
    Ok(axum::Json(outcome).into_response())
}

/// A chat completion answered by the swarm.
pub(crate) async fn chat(
    state: AppState,
    req: CompletionRequest,
    strategy: Option<Strategy>,
    received: Instant,
) -> Result<Response, ApiError> {
    let swarm = state.swarm().ok_or_else(no_swarm)?;
    let prepared = completions::check(&state, &req, "messages")?;
    let whole = whole_request(&req, &prepared)?;
    let request = swarm_request(&req, &prepared, strategy, timeout(req.timeout_s)?, whole)?;
    let answers_whole = request.api_request.is_some();
    let model = match strategy {
        Some(s) => format!("swarm:{s}"),
        None => "swarm".to_owned(),
    };
    let out = Output {
        index: 0,
        id: state.new_id("chatcmpl"),
        created: crate::state::unix_now(),
        model,
        kind: Kind::Chat,
        include_usage: prepared.include_usage,
        tools: None,
        logprobs: false,
    };
    let stream = prepared.stream;
    if stream && !answers_whole {
        // The swarm decides on a whole answer; the stream carries it in word-sized pieces so
        // clients show it the way they show any model's.
        let (rx, _) = start(&state, &req, strategy, received).await?;
        return Ok(Sse::new(out.stream(rx))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let metrics = state.metrics().clone();
    let run = async move {
        let outcome = swarm.run(request).await;
        if let Ok(o) = &outcome {
            record(&metrics, received, o);
        }
        outcome
    };
    if answers_whole {
        // The chosen agent's own API response, under this request's id and model.
        let answer = async move {
            let o = run.await.map_err(from_swarm)?;
            let choices = o
                .response
                .as_ref()
                .and_then(|r| r.get("choices"))
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| ApiError::internal("the chosen agent's answer has no choices"))?;
            Ok((choices, usage(&o), summary(&o)))
        };
        if stream {
            let answer = async move { answer.await.map(|(choices, usage, _)| (choices, usage)) };
            return Ok(Sse::new(out.replay_when_done(answer))
                .keep_alive(KeepAlive::default())
                .into_response());
        }
        let (choices, usage, summary) = answer.await?;
        let body = serde_json::json!({
            "id": out.id,
            "object": "chat.completion",
            "created": out.created,
            "model": out.model,
            "system_fingerprint": completions::SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage,
            "swarm": summary,
        });
        return Ok(axum::Json(body).into_response());
    }
    let o = run.await.map_err(from_swarm)?;
    let (usage, summary) = (usage(&o), summary(&o));
    Ok(out.whole_with(o.final_answer, FinishReason::Stop, usage, Some(summary)))
}

/// A swarm answer in the node's metrics: its time to the (whole) answer, its tokens.
fn record(metrics: &Metrics, received: Instant, o: &SwarmOutcome) {
    metrics
        .time_to_first_token
        .observe(received.elapsed().as_secs_f64());
    metrics.record_generation(
        usize::try_from(o.prompt_tokens).unwrap_or(usize::MAX),
        0,
        usize::try_from(o.completion_tokens).unwrap_or(usize::MAX),
        Duration::from_millis(o.elapsed_ms),
    );
}

/// The swarm's answer to the chat request `req`, as a model's generation reports one: the
/// events and how to answer them. For the APIs that translate their requests into OpenAI's
/// (Anthropic's Messages, Ollama's chat). The answer comes whole (the swarm decides on
/// whole answers) and is sent on in word-sized pieces; the chosen agent's tool calls are
/// written back as the Hermes format writes them, which the answer's `tools` read back.
pub(crate) async fn start(
    state: &AppState,
    req: &CompletionRequest,
    strategy: Option<Strategy>,
    received: Instant,
) -> Result<(mpsc::Receiver<Event>, Answering), ApiError> {
    let swarm = state.swarm().ok_or_else(no_swarm)?;
    let prepared = completions::check(state, req, "messages")?;
    let whole = whole_request(req, &prepared)?;
    let request = swarm_request(req, &prepared, strategy, timeout(req.timeout_s)?, whole)?;
    let (tools, _) = completions::answer_shape(req)?;
    let forced = tools.as_ref().is_some_and(ToolSet::forced);
    let answering = Answering {
        stream: prepared.stream,
        include_usage: prepared.include_usage,
        tools: tools.map(|t| (Arc::new(t), Format::Hermes)),
        logprobs: false,
    };
    let metrics = state.metrics().clone();
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let outcome = tokio::select! {
            outcome = swarm.run(request) => outcome,
            () = tx.closed() => return,
        };
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                let _ = tx.send(Event::Failed(from_swarm(e))).await;
                return;
            }
        };
        record(&metrics, received, &o);
        let (text, finish) = match &o.response {
            Some(response) => written_back(response, forced),
            None => (o.final_answer.clone(), FinishReason::Stop),
        };
        for piece in completions::pieces(&text) {
            if tx.send(Event::Text(piece.to_owned())).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(Event::Done {
                finish,
                usage: usage(&o),
                stop_sequence: None,
            })
            .await;
    });
    Ok((rx, answering))
}

/// A chat API response's first choice as the text a model in the Hermes format would have
/// written: its content, then each tool call in `<tool_call>` tags — or, for a forced call,
/// the call alone (its opening is taken as given).
fn written_back(response: &Value, forced: bool) -> (String, FinishReason) {
    let choice = response.pointer("/choices/0");
    let mut text = choice
        .and_then(|c| c.pointer("/message/content"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let calls = choice
        .and_then(|c| c.pointer("/message/tool_calls"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for call in calls {
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
        let json = serde_json::json!({
            "name": call.pointer("/function/name"),
            "arguments": arguments,
        });
        if forced {
            return (json.to_string(), FinishReason::Stop);
        }
        text.push_str(&format!("<tool_call>\n{json}\n</tool_call>"));
    }
    let finish = match choice
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str)
    {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    (text, finish)
}

/// What the swarm did, as a swarm answer's extra `swarm` field says it.
fn summary(o: &SwarmOutcome) -> Value {
    serde_json::json!({
        "query_type": o.query_type,
        "classified_by": o.classified_by,
        "strategy": o.strategy,
        "decided_by": o.decided_by,
        "agents_responded": o.agents_responded,
        "failed": o.failed,
    })
}

/// The request as a whole, for the agents' own chat APIs, when it asks for what a plain
/// text answer cannot give: tools (or a history with tool calls), `response_format`,
/// `ignore_eos`, `chat_template_kwargs`, log-probabilities, `n` > 1. `None` for a plain chat, which the swarm asks
/// its agents as a conversation (with their role prompts). The answer's shape is checked
/// here, as each agent would check it, so that a bad request is the client's 400 rather
/// than every agent's refusal.
fn whole_request(
    req: &CompletionRequest,
    prepared: &Prepared<()>,
) -> Result<Option<Value>, ApiError> {
    let (tools, answer_format) = completions::answer_shape(req)?;
    let tool_history =
        req.messages.iter().flatten().any(|m| {
            m.role == "tool" || m.tool_calls.as_ref().is_some_and(|calls| !calls.is_empty())
        });
    let whole = tools.is_some()
        || tool_history
        || answer_format.is_some()
        || req.ignore_eos == Some(true)
        || req.chat_template_kwargs.is_some()
        || prepared.logprobs.is_some()
        || prepared.n > 1;
    if !whole {
        return Ok(None);
    }
    let mut value = serde_json::to_value(req)
        .map_err(|e| ApiError::internal(format!("cannot pass the request on: {e}")))?;
    if let Some(fields) = value.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
        // The agent answers with its own model, whole; the head streams.
        for key in ["model", "stream", "stream_options"] {
            fields.remove(key);
        }
    }
    if value.to_string().len() > MAX_API_JSON {
        return Err(ApiError::invalid_request(format!(
            "the request is larger than the swarm passes on to its agents ({} MiB)",
            MAX_API_JSON >> 20
        )));
    }
    Ok(Some(value))
}

fn usage(o: &SwarmOutcome) -> Usage {
    Usage::new(
        usize::try_from(o.prompt_tokens).unwrap_or(usize::MAX),
        usize::try_from(o.completion_tokens).unwrap_or(usize::MAX),
    )
}

fn swarm_request(
    req: &CompletionRequest,
    prepared: &Prepared<()>,
    strategy: Option<Strategy>,
    timeout: Option<Duration>,
    api_request: Option<Value>,
) -> Result<SwarmRequest, ApiError> {
    let messages = completions::chat_messages(req.messages.as_deref())?
        .into_iter()
        .map(|m| ChatTurn {
            role: m.role,
            content: m.content,
        })
        .collect();
    let max_tokens = prepared
        .max_tokens
        .unwrap_or(completions::DEFAULT_MAX_TOKENS);
    // Agents are asked over the wire, which carries fewer stop strings than one node takes.
    if prepared.stop.len() > shoal_wire::MAX_STOP {
        return Err(ApiError::invalid_value(
            "stop",
            format!(
                "{} stop strings; a swarm passes at most {} to its agents",
                prepared.stop.len(),
                shoal_wire::MAX_STOP
            ),
        ));
    }
    Ok(SwarmRequest {
        messages,
        strategy,
        max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
        temperature: prepared.sampling.temperature,
        top_p: prepared.sampling.top_p,
        seed: prepared.sampling.seed,
        stop: prepared.stop.clone(),
        timeout,
        api_request,
    })
}

fn timeout(seconds: Option<f64>) -> Result<Option<Duration>, ApiError> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(ApiError::invalid_value(
            "timeout_s",
            format!("`timeout_s` must be in (0, 3600], got {s}"),
        )),
    }
}

fn no_swarm() -> ApiError {
    ApiError::model_not_found("swarm").with_message(
        "this node runs no swarm: start it with `--peer HOST:PORT` for each agent (and no \
         --split)",
    )
}

fn from_swarm(e: SwarmError) -> ApiError {
    match e {
        SwarmError::NoQuestion => ApiError::invalid_value("messages", e.to_string()),
        // Streamed requests have begun (200) by then: the error comes in the stream.
        SwarmError::Refused {
            context_length: true,
            ..
        } => ApiError::context_length_exceeded("messages", e.to_string()),
        SwarmError::Refused { .. } => ApiError::invalid_request(e.to_string()),
        SwarmError::NoAgents | SwarmError::NoAnswer(_) => ApiError::unavailable(e.to_string()),
    }
}
