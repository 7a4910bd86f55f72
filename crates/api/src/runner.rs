//! Running a generation on the engine, off the async runtime.
//!
//! The engine is synchronous and CPU-bound, so each generation runs in
//! `spawn_blocking` and hands its text to the handler through a small bounded channel.
//! A semaphore with one permit stands in front of the engine: requests queue for it in
//! arrival order (tokio's semaphore is fair). When the handler goes away (the client
//! disconnected, hyper dropped the response) the receiver is dropped, the next send fails,
//! and the generation stops there instead of running to `max_tokens` for nobody.

use std::sync::Arc;
use std::time::Instant;

use shoal_engine::{EngineError, FinishReason, GenerateParams, Model};
use tokio::sync::{mpsc, Semaphore};

use crate::error::ApiError;
use crate::metrics::{GaugeGuard, Metrics};
use crate::types::Usage;

/// Steps buffered between the engine and a slow client before the engine waits.
const CHANNEL_CAPACITY: usize = 32;

/// One prepared generation.
pub(crate) struct Job {
    pub(crate) model: Arc<Model>,
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: GenerateParams,
    /// When the request arrived, for time-to-first-token.
    pub(crate) received: Instant,
}

/// What a running generation reports, in order: text pieces, then one `Done` or `Failed`.
#[derive(Debug)]
pub(crate) enum Event {
    Text(String),
    Done { finish: FinishReason, usage: Usage },
    Failed(ApiError),
}

/// Waits for the engine, then starts `job` on a blocking thread. Dropping the future
/// while it waits leaves the queue; dropping the receiver stops the generation.
pub(crate) async fn start(
    engine: &Arc<Semaphore>,
    metrics: &Metrics,
    job: Job,
) -> Result<mpsc::Receiver<Event>, ApiError> {
    let permit = {
        let _queued = GaugeGuard::new(&metrics.queued);
        Arc::clone(engine)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?
    };
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let metrics = metrics.clone();
    tokio::task::spawn_blocking(move || {
        let last = {
            let _permit = permit;
            let _in_flight = GaugeGuard::new(&metrics.in_flight);
            run(job, &tx, &metrics)
        };
        // The engine is free before the client hears the end, so a client that sends its
        // next request at once finds it free and the gauges already settled.
        if let Some(event) = last {
            let _ = tx.blocking_send(event);
        }
    });
    Ok(rx)
}

/// Generates, sending text as it comes; returns the closing event, if anyone listens.
fn run(job: Job, tx: &mpsc::Sender<Event>, metrics: &Metrics) -> Option<Event> {
    let prompt_tokens = job.prompt.len();
    let mut generation = match job.model.generate(job.prompt, job.params) {
        Ok(g) => g,
        Err(e) => return Some(Event::Failed(ApiError::from_engine(e, "prompt"))),
    };
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
                // An empty step (half a character, a possible stop string held back)
                // sends nothing, but a gone client still ends the work.
                let gone = if step.text.is_empty() {
                    tx.is_closed()
                } else {
                    tx.blocking_send(Event::Text(step.text)).is_err()
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
        timings.generated_tokens,
        timings.generate_time,
    );
    match outcome {
        Ok(()) => {
            let finish = generation.finish_reason().unwrap_or(FinishReason::Stop);
            let usage = Usage::new(prompt_tokens, timings.generated_tokens);
            Some(Event::Done { finish, usage })
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

/// The whole text of a generation, for non-streaming answers.
pub(crate) async fn collect(
    mut rx: mpsc::Receiver<Event>,
) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, usage } => return Ok((text, finish, usage)),
            Event::Failed(e) => return Err(e),
        }
    }
    Err(ended_unexpectedly())
}

/// The engine thread ended without a word (it panicked).
pub(crate) fn ended_unexpectedly() -> ApiError {
    ApiError::internal("generation ended unexpectedly")
}
