//! `POST /infill`, llama-server's code-completion endpoint (what llama.vscode and llama.vim
//! ask an editor's completions from): the code before the cursor (`input_prefix`, then
//! `prompt`), the code after it (`input_suffix`) and other files for context
//! (`input_extra`), answered in llama-server's own shape (`content`, `stop`, `stop_type`,
//! `tokens_predicted`, `timings`), streamed as its SSE chunks or whole.

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_engine::{FinishReason, InfillLimits};
use tokio::sync::mpsc;

use crate::completions::{self, prepare_text, DEFAULT_MAX_TOKENS};
use crate::error::{ApiError, Json};
use crate::runner::{collect, Event};
use crate::state::AppState;
use crate::types::{CompletionRequest, Infill, Prompt, Stop, Usage};

/// llama-server's default batch size, by which its `/infill` shares the prompt out.
const N_BATCH: usize = 2048;

#[derive(Debug, Deserialize)]
pub(crate) struct InfillRequest {
    model: Option<String>,
    #[serde(default)]
    input_prefix: String,
    #[serde(default)]
    input_suffix: String,
    #[serde(default)]
    input_extra: Vec<ExtraFile>,
    /// Text at the cursor, after `input_prefix` (llama.vim sends the current line's start).
    #[serde(default)]
    prompt: String,
    n_predict: Option<i64>,
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<serde_json::Number>,
    stop: Option<Stop>,
    repeat_penalty: Option<f32>,
    cache_prompt: Option<bool>,
    #[serde(default)]
    stream: bool,
}

/// One of `input_extra`: another file's text (or a chunk of it), for context.
#[derive(Debug, Deserialize)]
struct ExtraFile {
    #[serde(default = "default_filename")]
    filename: String,
    #[serde(default)]
    text: String,
}

/// llama-server's name for a chunk that gives none.
fn default_filename() -> String {
    "tmp".to_owned()
}

pub(crate) async fn infill(
    State(state): State<AppState>,
    Json(req): Json<InfillRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    // `n_predict: 0` only evaluates the prompt, as editors send their context ahead to warm
    // the cache: one token is drawn (the engine ends a prompt with a draw) and not sent.
    // -1 (and any negative) is llama-server's "no limit": Shoal's default cap applies.
    let warm_only = req.n_predict == Some(0);
    let max_tokens = match req.n_predict {
        Some(0) => Some(1),
        n => n.filter(|&n| n >= 0),
    };
    // Each part cut to its share as llama-server cuts them (its default batch of 2,048:
    // three quarters for the code before the cursor, a quarter for the code after, the
    // other files what the context leaves beside a batch and twice the answer).
    let context = state.model()?.config().context_length;
    let answer = max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize);
    let limits = InfillLimits {
        prefix: 3 * (N_BATCH / 4),
        suffix: (N_BATCH / 4).saturating_sub(2),
        files: context.saturating_sub(N_BATCH + 2 * answer),
    };
    let mut completion = CompletionRequest {
        model: req.model,
        prompt: Some(Prompt::Text(format!("{}{}", req.input_prefix, req.prompt))),
        infill: Some(Infill {
            suffix: req.input_suffix,
            files: req
                .input_extra
                .into_iter()
                .map(|f| (f.filename, f.text))
                .collect(),
            limits: Some(limits),
        }),
        max_tokens,
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
        min_p: req.min_p,
        seed: req.seed,
        stop: req.stop,
        repeat_penalty: req.repeat_penalty,
        cache_prompt: req.cache_prompt,
        stream: Some(req.stream && !warm_only),
        ..CompletionRequest::default()
    };
    let (prepared, prompt) = prepare_text(&state, &mut completion).await?;
    let stream = prepared.stream;
    let prompt_n = prompt.len();
    let (rx, _) = completions::start(&state, prepared, prompt, received).await?;
    let model = state.model_id();
    if stream {
        let events = chunks(rx, model, prompt_n, received);
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut whole = collect(rx).await?;
    if warm_only {
        whole.text.clear();
        whole.usage.completion_tokens = 0;
    }
    let mut body = last_chunk(
        &model,
        whole.finish,
        whole.stop_sequence.as_deref(),
        &whole.usage,
        prompt_n,
        received,
    );
    body["content"] = json!(whole.text);
    body["has_new_line"] = json!(whole.text.contains('\n'));
    Ok(axum::Json(body).into_response())
}

/// The closing object of an answer: llama-server's `stop: true` chunk with its counts.
fn last_chunk(
    model: &str,
    finish: FinishReason,
    stop_sequence: Option<&str>,
    usage: &Usage,
    prompt_n: usize,
    received: Instant,
) -> Value {
    let stop_type = match (finish, stop_sequence) {
        (FinishReason::Length, _) => "limit",
        (FinishReason::Stop, Some(_)) => "word",
        (FinishReason::Stop, None) => "eos",
    };
    json!({
        "index": 0,
        "content": "",
        "stop": true,
        "model": model,
        "stop_type": stop_type,
        "stopping_word": stop_sequence.unwrap_or_default(),
        "tokens_predicted": usage.completion_tokens,
        "tokens_evaluated": prompt_n,
        "tokens_cached": usage.prompt_tokens_details.cached_tokens,
        "truncated": false,
        // The counts only: the API does not see where prompt time ends and decode begins.
        "timings": {
            "prompt_n": prompt_n,
            "predicted_n": usage.completion_tokens,
            "total_ms": received.elapsed().as_secs_f64() * 1e3,
        },
    })
}

/// llama-server's stream: `data: {"content": PIECE, "stop": false}` per piece, then the
/// closing object (no `[DONE]`); a failure mid-answer is an `error` object.
fn chunks(
    rx: mpsc::Receiver<Event>,
    model: String,
    prompt_n: usize,
    received: Instant,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Some(rx), move |rx| {
        let model = model.clone();
        async move {
            let mut rx = rx?;
            loop {
                let data = match rx.recv().await {
                    Some(Event::Text(piece)) => {
                        json!({"index": 0, "content": piece, "stop": false})
                    }
                    Some(Event::Logprob(_)) => continue,
                    Some(Event::Done {
                        finish,
                        usage,
                        stop_sequence,
                    }) => {
                        let last = last_chunk(
                            &model,
                            finish,
                            stop_sequence.as_deref(),
                            &usage,
                            prompt_n,
                            received,
                        );
                        return Some((Ok(SseEvent::default().data(last.to_string())), None));
                    }
                    Some(Event::Failed(e)) => {
                        let error =
                            json!({"error": {"code": e.status.as_u16(), "message": e.message}});
                        return Some((Ok(SseEvent::default().data(error.to_string())), None));
                    }
                    None => return None,
                };
                return Some((Ok(SseEvent::default().data(data.to_string())), Some(rx)));
            }
        }
    })
}
