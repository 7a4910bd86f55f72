//! Running a generation on the engine, off the async runtime.
//!
//! The engine is synchronous and CPU-bound, so each generation runs in
//! `spawn_blocking` and hands its text to the handler through a small bounded channel.
//! A semaphore with one permit stands in front of the engine: requests queue for it in
//! arrival order (tokio's semaphore is fair), at most [`HttpLimits::max_queue`] of them (one
//! more gets a 429). When the handler goes away (the client disconnected, hyper dropped the
//! response) the receiver is dropped, the next send fails, and the generation stops there
//! instead of running to `max_tokens` for nobody. A client that stays connected but stops
//! reading is treated the same once a piece has waited [`HttpLimits::client_stall_timeout`]:
//! it must not hold the engine that everyone else waits for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_engine::{EngineError, FinishReason, GenerateParams, JsonRule, Model, TextStream};
use shoal_pipeline::{Pipeline, PipelineError, RingAnswer, RingRequest};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::backend::Backend;
use crate::error::ApiError;
use crate::limits::{HttpLimits, RETRY_AFTER_S};
use crate::metrics::{GaugeGuard, Metrics};
use crate::state::AppState;
use crate::types::Usage;

/// Steps buffered between the engine and a slow client before the engine waits.
const CHANNEL_CAPACITY: usize = 32;

/// One prepared generation.
pub(crate) struct Job {
    pub(crate) backend: Backend,
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: GenerateParams,
    /// When the request arrived, for time-to-first-token.
    pub(crate) received: Instant,
    /// Where the answer's JSON must keep to a grammar (`response_format`, tool calls).
    pub(crate) grammar: Option<JsonRule>,
    pub(crate) ignore_eos: bool,
    /// Report each token's log-probability with this many alternatives (local models).
    pub(crate) logprobs: Option<usize>,
}

/// A generated token's log-probability as the APIs report it: the token as text and
/// bytes, and the likeliest alternatives likewise.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LogprobEntry {
    pub(crate) token: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) logprob: f32,
    pub(crate) top: Vec<(String, Vec<u8>, f32)>,
}

impl LogprobEntry {
    fn new(lp: &shoal_engine::TokenLogprob, tokenizer: &shoal_engine::Tokenizer) -> Self {
        let text = |id: u32| {
            let bytes = tokenizer.token_bytes(id, false).unwrap_or_default();
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (token, bytes) = text(lp.token);
        LogprobEntry {
            token,
            bytes,
            logprob: lp.logprob,
            top: lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (t, b) = text(id);
                    (t, b, logprob)
                })
                .collect(),
        }
    }
}

/// What a running generation reports, in order: text pieces, then one `Done` or `Failed`.
#[derive(Debug)]
pub(crate) enum Event {
    Text(String),
    /// The log-probability of the token whose text comes next (asked-for only).
    Logprob(LogprobEntry),
    Done {
        finish: FinishReason,
        usage: Usage,
        /// The stop string that ended the answer, if one did.
        stop_sequence: Option<String>,
    },
    Failed(ApiError),
}

/// Waits for the engine, then starts `job`: on a blocking thread for a local model, as a
/// task driving the ring for a pipeline. Dropping the future while it waits leaves the
/// queue; dropping the receiver stops the generation.
pub(crate) async fn start(state: &AppState, job: Job) -> Result<mpsc::Receiver<Event>, ApiError> {
    let permit = admit(state, &job.backend).await?;
    let metrics = state.metrics();
    let stall = state.limits().client_stall_timeout;
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let metrics = metrics.clone();
    match job.backend.clone() {
        Backend::Local(model) => {
            tokio::task::spawn_blocking(move || {
                let last = {
                    let _permit = permit;
                    let _in_flight = GaugeGuard::new(&metrics.in_flight);
                    run(&model, job, &tx, &metrics, stall)
                };
                // The engine is free before the client hears the end, so a client that
                // sends its next request at once finds it free and the gauges settled.
                if let Some(event) = last {
                    let _ = send_blocking(&tx, event, stall);
                }
            });
        }
        Backend::Ring(pipeline) => {
            tokio::spawn(async move {
                let last = {
                    let _permit = permit;
                    let _in_flight = GaugeGuard::new(&metrics.in_flight);
                    run_ring(&pipeline, job, &tx, &metrics, stall).await
                };
                if let Some(event) = last {
                    let _ = send(&tx, event, stall).await;
                }
            });
        }
    }
    Ok(rx)
}

/// Waits for `backend`'s engine in the bounded queue (`429` when it is full), as every
/// request that computes does; the permit is the engine until it is dropped.
pub(crate) async fn admit(
    state: &AppState,
    backend: &Backend,
) -> Result<OwnedSemaphorePermit, ApiError> {
    let metrics = state.metrics();
    let limits: &HttpLimits = state.limits();
    let engine = state.admission(backend);
    let permit = match engine.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            let waiting = usize::try_from(metrics.queued.get()).unwrap_or(0);
            if waiting >= limits.max_queue {
                metrics.rejected.inc();
                return Err(ApiError::queue_full(waiting, RETRY_AFTER_S));
            }
            let _queued = GaugeGuard::new(&metrics.queued);
            engine
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ApiError::unavailable("the server is shutting down"))?
        }
    };
    if !state.is_current(backend) {
        // The node moved to another model while this request waited: its prompt was
        // tokenized for the old one.
        return Err(ApiError::unavailable(
            "the node moved to another model while this request waited; send it again",
        )
        .retry_in(0));
    }
    Ok(permit)
}

/// Hands `event` to the client's handler, waiting at most `stall` for room; `Err` when the
/// client is gone or stopped reading.
async fn send(tx: &mpsc::Sender<Event>, event: Event, stall: Duration) -> Result<(), ()> {
    match tokio::time::timeout(stall, tx.send(event)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(()),
        Err(_) => {
            tracing::info!(
                seconds = stall.as_secs_f64(),
                "a client stopped reading its answer; dropping it"
            );
            Err(())
        }
    }
}

/// [`send`] from a blocking thread (the engine's).
fn send_blocking(tx: &mpsc::Sender<Event>, event: Event, stall: Duration) -> Result<(), ()> {
    match tx.try_send(event) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        Err(mpsc::error::TrySendError::Full(event)) => {
            tokio::runtime::Handle::current().block_on(send(tx, event, stall))
        }
    }
}

/// Generates, sending text as it comes; returns the closing event, if anyone listens.
fn run(
    model: &Model,
    job: Job,
    tx: &mpsc::Sender<Event>,
    metrics: &Metrics,
    stall: Duration,
) -> Option<Event> {
    let prompt_tokens = job.prompt.len();
    let mut generation = match model.generate(job.prompt, job.params) {
        Ok(g) => g,
        Err(e) => return Some(Event::Failed(ApiError::from_engine(e, "prompt"))),
    };
    if let Some(rule) = &job.grammar {
        if let Err(e) = generation.constrain_json_rule(rule) {
            return Some(Event::Failed(ApiError::from_engine(e, "response_format")));
        }
    }
    generation.ignore_eos(job.ignore_eos);
    if let Some(top) = job.logprobs {
        generation.want_logprobs(top);
    }
    // A client that leaves during a long prefill stops it between chunks.
    let watcher = tx.clone();
    generation.set_interrupt(move || watcher.is_closed());
    let mut first = true;
    let outcome: Result<(), Option<EngineError>> = loop {
        match generation.next_step() {
            Ok(Some(step)) => {
                if first {
                    first = false;
                    metrics
                        .time_to_first_token
                        .observe(job.received.elapsed().as_secs_f64());
                }
                // The end-of-generation token is not part of the answer's text, nor of its
                // log-probabilities (as OpenAI reports them).
                let eog = model.tokenizer().is_eog(step.token);
                if let Some(lp) = step.logprob.as_ref().filter(|_| !eog) {
                    let entry = LogprobEntry::new(lp, model.tokenizer());
                    if send_blocking(tx, Event::Logprob(entry), stall).is_err() {
                        break Err(None);
                    }
                }
                // An empty step (half a character, a possible stop string held back)
                // sends nothing, but a gone client still ends the work.
                let gone = if step.text.is_empty() {
                    tx.is_closed()
                } else {
                    send_blocking(tx, Event::Text(step.text), stall).is_err()
                };
                if gone {
                    break Err(None);
                }
            }
            Ok(None) => break Ok(()),
            Err(EngineError::Interrupted) => break Err(None),
            Err(e) => break Err(Some(e)),
        }
    };
    let timings = generation.timings();
    metrics.record_generation(
        prompt_tokens,
        timings.cached_tokens,
        timings.generated_tokens,
        timings.generate_time,
    );
    metrics.draft_tokens.inc_by(timings.drafted_tokens as u64);
    metrics
        .draft_accepted_tokens
        .inc_by(timings.accepted_tokens as u64);
    let finish = generation.finish_reason().unwrap_or(FinishReason::Stop);
    let stop_sequence = generation.stop_string().map(str::to_owned);
    // The cache is kept when the generation goes: count it after.
    drop(generation);
    let (_, kept_bytes) = model.prompt_cache_usage();
    metrics
        .prompt_cache_bytes
        .set(i64::try_from(kept_bytes).unwrap_or(i64::MAX));
    match outcome {
        Ok(()) => {
            let usage = Usage::new(prompt_tokens, timings.generated_tokens)
                .with_cached(timings.cached_tokens);
            Some(Event::Done {
                finish,
                usage,
                stop_sequence,
            })
        }
        Err(None) => {
            metrics.cancelled.inc();
            tracing::debug!(
                generated = timings.generated_tokens,
                "client went away; generation stopped"
            );
            None
        }
        Err(Some(e)) => {
            tracing::warn!(error = %e, "generation failed");
            Some(Event::Failed(ApiError::internal(format!(
                "generation failed: {e}"
            ))))
        }
    }
}

/// Generates through a ring of stages, sending text as tokens come back from the last
/// stage; returns the closing event, if anyone listens. The ring stops by itself at an
/// end-of-generation token or `max_tokens`, and at a stop string when its token callback
/// says so (it may have run a token further; the session ends normally and its prompt is
/// kept); a client that left ends it here by dropping the generation, which ends the
/// session on every stage.
async fn run_ring(
    pipeline: &Pipeline,
    job: Job,
    tx: &mpsc::Sender<Event>,
    metrics: &Metrics,
    stall: Duration,
) -> Option<Event> {
    let prompt_tokens = job.prompt.len();
    let tokenizer = pipeline.tokenizer();
    let (token_tx, mut token_rx) = mpsc::unbounded_channel();
    let request = RingRequest {
        prompt: &job.prompt,
        sampling: &job.params.sampling,
        max_tokens: job.params.max_tokens,
        cache_prompt: job.params.cache_prompt,
        logprobs: job.logprobs,
        json: job.grammar.as_ref(),
        ignore_eos: job.ignore_eos,
    };
    let stop_ring = Arc::new(AtomicBool::new(false));
    let stopped = stop_ring.clone();
    let generation = pipeline.run(request, move |token, logprob| {
        let _ = token_tx.send((token, logprob));
        !stopped.load(Ordering::Relaxed)
    });
    tokio::pin!(generation);
    let mut text = TextStream::new(tokenizer, job.params.stop.clone());
    let mut generated = 0usize;
    let mut first_token_at = None;
    let mut ended: Option<Result<RingAnswer, PipelineError>> = None;
    // Ok(finish), Err(None) = the client left, Err(Some(error)) = the ring failed.
    let outcome: Result<FinishReason, Option<ApiError>> = loop {
        tokio::select! {
            biased;
            () = tx.closed() => break Err(None),
            token = token_rx.recv() => {
                let Some((token, logprob)) = token else {
                    // The generation finished (its callback, holding the sender, is gone)
                    // and every token it produced has been handled.
                    break match ended.take() {
                        Some(Ok(answer)) => {
                            // A constrained answer ends where its value is whole.
                            let finish = if answer.json_done {
                                FinishReason::Stop
                            } else {
                                FinishReason::Length
                            };
                            ended = Some(Ok(answer));
                            Ok(finish)
                        }
                        Some(Err(e)) => Err(Some(ApiError::from_pipeline(e, "prompt"))),
                        None => Err(Some(ApiError::unavailable(
                            "the pipeline ended without a result",
                        ))),
                    };
                };
                generated += 1;
                if first_token_at.is_none() {
                    first_token_at = Some(Instant::now());
                    metrics
                        .time_to_first_token
                        .observe(job.received.elapsed().as_secs_f64());
                }
                if let Some(lp) = logprob.filter(|_| !tokenizer.is_eog(token)) {
                    let entry = LogprobEntry::new(&lp, tokenizer);
                    if send(tx, Event::Logprob(entry), stall).await.is_err() {
                        break Err(None);
                    }
                }
                let (piece, stop) = match text.push_generated(token) {
                    Ok(pushed) => pushed,
                    Err(e) => break Err(Some(ApiError::internal(format!("decoding failed: {e}")))),
                };
                if !piece.is_empty() && send(tx, Event::Text(piece), stall).await.is_err() {
                    break Err(None);
                }
                if stop {
                    stop_ring.store(true, Ordering::Relaxed);
                    break Ok(FinishReason::Stop);
                }
            }
            result = &mut generation, if ended.is_none() => ended = Some(result),
        }
    };
    // Stopped at a stop string: the ring ends at its next token; its answer says how much
    // of the prompt was resumed.
    if outcome.is_ok() && ended.is_none() {
        ended = Some(generation.await);
    }
    let cached_tokens = match &ended {
        Some(Ok(answer)) => {
            metrics.draft_tokens.inc_by(answer.drafted_tokens as u64);
            metrics
                .draft_accepted_tokens
                .inc_by(answer.accepted_tokens as u64);
            answer.cached_tokens
        }
        _ => 0,
    };
    let generate_time = first_token_at.map(|t| t.elapsed()).unwrap_or_default();
    metrics.record_generation(prompt_tokens, cached_tokens, generated, generate_time);
    match outcome {
        Ok(finish) => {
            // Text held back in case a stop string was starting is the answer's, unless a
            // stop string did end it.
            let json_done = matches!(&ended, Some(Ok(answer)) if answer.json_done);
            if finish == FinishReason::Length || json_done {
                let tail = text.flush();
                if !tail.is_empty() && send(tx, Event::Text(tail), stall).await.is_err() {
                    metrics.cancelled.inc();
                    return None;
                }
            }
            Some(Event::Done {
                finish,
                usage: Usage::new(prompt_tokens, generated).with_cached(cached_tokens),
                stop_sequence: text.stop_string().map(str::to_owned),
            })
        }
        Err(None) => {
            metrics.cancelled.inc();
            tracing::debug!(generated, "client went away; ring generation stopped");
            None
        }
        Err(Some(error)) => {
            tracing::warn!(error = %error.message, "ring generation failed");
            Some(Event::Failed(error))
        }
    }
}

/// A whole answer, for non-streaming replies.
pub(crate) struct Whole {
    pub(crate) text: String,
    pub(crate) finish: FinishReason,
    pub(crate) usage: Usage,
    /// The stop string that ended the answer, if one did.
    pub(crate) stop_sequence: Option<String>,
    /// Each token's log-probability, when asked for.
    pub(crate) logprobs: Vec<LogprobEntry>,
}

/// The whole text of a generation, for non-streaming answers.
pub(crate) async fn collect(mut rx: mpsc::Receiver<Event>) -> Result<Whole, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Logprob(entry) => logprobs.push(entry),
            Event::Done {
                finish,
                usage,
                stop_sequence,
            } => {
                return Ok(Whole {
                    text,
                    finish,
                    usage,
                    stop_sequence,
                    logprobs,
                })
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Err(ended_unexpectedly())
}

/// The engine thread ended without a word (it panicked).
pub(crate) fn ended_unexpectedly() -> ApiError {
    ApiError::internal("generation ended unexpectedly")
}
