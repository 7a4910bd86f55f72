//! Swarm mode over HTTP (issue #5): `"model": "swarm"` (or `"swarm:STRATEGY"`) on the chat
//! API runs the swarm and answers like any model; `POST /v1/swarm/query` returns everything
//! the swarm did (query type, each agent's answer with role, model and time, the final
//! answer, `agents_responded`); `GET /v1/swarm/status` lists the agents.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use shoal_engine::FinishReason;
use shoal_swarm::routing::{parse_swarm_model, Strategy};
use shoal_swarm::{SwarmError, SwarmOutcome, SwarmRequest};
use shoal_wire::ChatTurn;
use tokio::sync::mpsc;

use crate::completions::{self, Kind, Output, Prepared};
use crate::error::{ApiError, Json};
use crate::runner::Event;
use crate::state::AppState;
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
    timeout_s: Option<f64>,
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
    let request = swarm_request(&req.rest, &prepared, strategy, timeout(req.timeout_s)?)?;
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
    // Not yet through the swarm: say so rather than answer as if they were not asked for.
    for (param, given) in [
        ("tools", req.tools.as_ref().is_some_and(|t| !t.is_empty())),
        ("response_format", req.response_format.is_some()),
        ("ignore_eos", req.ignore_eos == Some(true)),
        ("logprobs", prepared.logprobs.is_some()),
        ("n", prepared.n > 1),
    ] {
        if given {
            return Err(ApiError::invalid_value(
                param,
                format!(
                    "`{param}` is not supported by the swarm yet; ask the node's own model \
                     (without `model: \"swarm…\"`)"
                ),
            ));
        }
    }
    let request = swarm_request(&req, &prepared, strategy, None)?;
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
    let metrics = state.metrics().clone();
    let stream = prepared.stream;
    let run = async move {
        let outcome = swarm.run(request).await;
        if let Ok(o) = &outcome {
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
        outcome
    };
    if stream {
        // The swarm decides on a whole answer; the stream carries it in word-sized pieces so
        // clients show it the way they show any model's.
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(async move {
            let event = tokio::select! {
                outcome = run => outcome,
                () = tx.closed() => return,
            };
            match event {
                Ok(o) => {
                    for piece in pieces(&o.final_answer) {
                        if tx.send(Event::Text(piece.to_owned())).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(done(&o)).await;
                }
                Err(e) => {
                    let _ = tx.send(Event::Failed(from_swarm(e))).await;
                }
            }
        });
        Ok(Sse::new(out.stream(rx))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        let o = run.await.map_err(from_swarm)?;
        let summary = serde_json::json!({
            "query_type": o.query_type,
            "classified_by": o.classified_by,
            "strategy": o.strategy,
            "decided_by": o.decided_by,
            "agents_responded": o.agents_responded,
            "failed": o.failed,
        });
        let usage = usage(&o);
        Ok(out.whole_with(o.final_answer, FinishReason::Stop, usage, Some(summary)))
    }
}

fn usage(o: &SwarmOutcome) -> Usage {
    Usage::new(
        usize::try_from(o.prompt_tokens).unwrap_or(usize::MAX),
        usize::try_from(o.completion_tokens).unwrap_or(usize::MAX),
    )
}

fn done(o: &SwarmOutcome) -> Event {
    Event::Done {
        finish: FinishReason::Stop,
        usage: usage(o),
        stop_sequence: None,
    }
}

/// `text` cut after each run of whitespace, so that the pieces join back to `text`.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
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

fn swarm_request(
    req: &CompletionRequest,
    prepared: &Prepared<()>,
    strategy: Option<Strategy>,
    timeout: Option<Duration>,
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
    Ok(SwarmRequest {
        messages,
        strategy,
        max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
        temperature: prepared.sampling.temperature,
        top_p: prepared.sampling.top_p,
        seed: prepared.sampling.seed,
        stop: prepared.stop.clone(),
        timeout,
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
        SwarmError::NoAgents | SwarmError::NoAnswer(_) => ApiError::unavailable(e.to_string()),
    }
}
