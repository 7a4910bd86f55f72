//! The agent's model answering several `Ask`s at once.
//!
//! One thread per agent owns every running generation and steps them together
//! ([`shoal_engine::step_together`]): the decode steps of all of them run as one pass of the
//! model, which reads each weight matrix once for all of them. On a CPU a decode step is
//! bound by reading the weights, so a few answers at once cost little more than one
//! (`cargo bench -p shoal-engine --bench decode_batch`), where answers one after another
//! cost one each — and a swarm asks its agents for several answers at once (a candidate and
//! tests, a hinted and a fresh sample, several roles on one device). Each answer is exactly
//! what it would be alone (the engine's batched pass gives each row its own numbers).
//!
//! A new `Ask` joins at the next step (its prompt is read in that step, while the others
//! wait for it); at most [`MAX_RUNNING`] run at once, and at most [`MAX_QUEUED`] more wait
//! (beyond that an `Ask` is refused as overloaded). An `Ask` whose head went away leaves
//! before the next step, and its prompt stops between chunks. The thread parks while there
//! is nothing to do, and ends when the agent is dropped.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use shoal_engine::{step_together, EngineError, FinishReason, GenerateParams, Generation, Model};
use shoal_wire::{ErrorCode, Finish};
use tokio::sync::oneshot;

use super::service::{internal, AskFailure, BusyGuard, Generated};

/// Generations stepped together at most; more `Ask`s wait their turn.
pub(super) const MAX_RUNNING: usize = 8;
/// `Ask`s waiting for a place at most; more are refused as overloaded.
pub(super) const MAX_QUEUED: usize = 64;

/// One `Ask`'s generation.
pub(super) struct Request {
    pub(super) prompt: Vec<u32>,
    pub(super) params: GenerateParams,
    /// When not empty, the answer is one of these.
    pub(super) choices: Vec<String>,
    /// Raised when the head went away: the generation stops.
    pub(super) cancel: Arc<AtomicBool>,
    /// Released before the answer goes, so a head that asks again at once finds the agent
    /// free.
    pub(super) busy: BusyGuard,
}

/// A request as handed to the thread, with where its answer goes.
struct Work {
    request: Request,
    reply: oneshot::Sender<Result<Generated, AskFailure>>,
}

/// The handle of an agent's generation thread.
pub(super) struct Generator {
    /// `None` when the thread could not be started (every request is refused, saying so).
    queue: Option<SyncSender<Work>>,
    /// The most generations that have shared one pass of the model.
    largest_pass: Arc<AtomicUsize>,
}

impl Generator {
    /// Starts the thread that runs `model`'s generations.
    pub(super) fn start(model: Arc<Model>) -> Self {
        let (queue, work) = mpsc::sync_channel(MAX_QUEUED);
        let largest_pass = Arc::new(AtomicUsize::new(0));
        let largest = Arc::clone(&largest_pass);
        let started = std::thread::Builder::new()
            .name("shoal-agent".into())
            .spawn(move || run(&model, &work, &largest));
        let queue = match started {
            Ok(_) => Some(queue),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the agent's generation thread");
                None
            }
        };
        Generator {
            queue,
            largest_pass,
        }
    }

    /// The most generations that have shared one pass of the model so far.
    pub(super) fn largest_pass(&self) -> usize {
        self.largest_pass.load(Ordering::Relaxed)
    }

    /// Runs `request` with the others and waits for its answer.
    pub(super) async fn generate(&self, request: Request) -> Result<Generated, AskFailure> {
        let Some(queue) = &self.queue else {
            return Err(internal(
                "the agent's generation thread could not be started",
            ));
        };
        let (reply, answer) = oneshot::channel();
        match queue.try_send(Work { request, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(AskFailure::Refused(
                    ErrorCode::OVERLOADED,
                    format!(
                        "the agent has {MAX_RUNNING} answers running and {MAX_QUEUED} waiting; \
                         ask again later or ask another agent"
                    ),
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(internal("the agent's model is no longer running"))
            }
        }
        answer
            .await
            .map_err(|_| internal("generation ended unexpectedly"))?
    }
}

/// A generation on the thread, with what it answers to.
struct Running<'m> {
    generation: Generation<'m>,
    cancel: Arc<AtomicBool>,
    busy: BusyGuard,
    reply: oneshot::Sender<Result<Generated, AskFailure>>,
}

impl Running<'_> {
    /// Ends the generation and sends `outcome` (if its head still waits).
    fn answer(self, outcome: Result<Generated, AskFailure>) {
        let Running {
            generation,
            busy,
            reply,
            ..
        } = self;
        // The cache goes back to the prompt cache, and the agent counts one request fewer,
        // before the head hears.
        drop(generation);
        drop(busy);
        let _ = reply.send(outcome);
    }
}

/// The thread: takes new work between steps, steps every running generation together,
/// answers those that end. A panic in the engine fails the answers then running, not the
/// agent: the thread goes on with the next.
fn run(model: &Model, work: &Receiver<Work>, largest_pass: &AtomicUsize) {
    let mut running: Vec<Running<'_>> = Vec::new();
    loop {
        if running.is_empty() {
            // Parked until an Ask comes; the agent is gone when the channel closes.
            match work.recv() {
                Ok(w) => admit(model, w, &mut running),
                Err(_) => return,
            }
        }
        while running.len() < MAX_RUNNING {
            match work.try_recv() {
                Ok(w) => admit(model, w, &mut running),
                Err(TryRecvError::Empty) => break,
                // Finish what runs; the next recv ends the thread.
                Err(TryRecvError::Disconnected) => break,
            }
        }
        // Nobody waits for these any more (their replies are simply dropped).
        running.retain(|r| !r.cancel.load(Ordering::Relaxed));
        if running.is_empty() {
            continue;
        }
        let mut generations: Vec<&mut Generation<'_>> =
            running.iter_mut().map(|r| &mut r.generation).collect();
        let stepped =
            std::panic::catch_unwind(AssertUnwindSafe(|| step_together(&mut generations)));
        let steps = match stepped {
            Ok(together) => {
                largest_pass.fetch_max(together.in_pass, Ordering::Relaxed);
                together.steps
            }
            Err(_) => {
                tracing::error!(
                    answers = running.len(),
                    "the engine panicked; the answers in progress fail"
                );
                for r in running.drain(..) {
                    r.answer(Err(internal("generation failed inside the engine")));
                }
                continue;
            }
        };
        let ended: Vec<Option<Result<Generated, AskFailure>>> = running
            .iter()
            .zip(steps)
            .map(|(r, step)| match step {
                Ok(Some(_)) => None,
                Ok(None) => Some(Ok(finished(&r.generation))),
                Err(EngineError::Interrupted) => Some(Err(AskFailure::Cancelled)),
                Err(e) => {
                    tracing::warn!(error = %e, "agent generation failed");
                    Some(Err(refused(e)))
                }
            })
            .collect();
        let mut still = Vec::with_capacity(running.len());
        for (r, end) in running.into_iter().zip(ended) {
            match end {
                None => still.push(r),
                Some(outcome) => r.answer(outcome),
            }
        }
        running = still;
    }
}

/// Starts `w`'s generation among `running`, or answers it with why it cannot start.
fn admit<'m>(model: &'m Model, w: Work, running: &mut Vec<Running<'m>>) {
    let Work {
        request:
            Request {
                prompt,
                params,
                choices,
                cancel,
                busy,
            },
        reply,
    } = w;
    if cancel.load(Ordering::Relaxed) {
        return;
    }
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
        model.generate(prompt, params).and_then(|mut generation| {
            if !choices.is_empty() {
                generation.constrain_to(&choices)?;
            }
            Ok(generation)
        })
    }));
    let Ok(started) = started else {
        drop(busy);
        let _ = reply.send(Err(internal("the engine failed while starting the answer")));
        return;
    };
    match started {
        Ok(mut generation) => {
            let watch = Arc::clone(&cancel);
            generation.set_interrupt(move || watch.load(Ordering::Relaxed));
            running.push(Running {
                generation,
                cancel,
                busy,
                reply,
            });
        }
        Err(e) => {
            drop(busy);
            let _ = reply.send(Err(refused(e)));
        }
    }
}

/// What a finished generation answers.
fn finished(generation: &Generation<'_>) -> Generated {
    let finish = match generation.finish_reason() {
        Some(FinishReason::Length) => Finish::Length,
        Some(FinishReason::Stop) | None => Finish::Stop,
    };
    Generated {
        text: generation.text().to_owned(),
        finish,
        prompt_tokens: generation.prompt_len(),
        completion_tokens: generation.generated().len(),
    }
}

/// The `Error` a failed generation answers with.
fn refused(e: EngineError) -> AskFailure {
    match e {
        EngineError::ContextFull { .. } => {
            AskFailure::Refused(ErrorCode::CONTEXT_LENGTH, e.to_string())
        }
        EngineError::InvalidInput(_) => AskFailure::Refused(ErrorCode::BAD_REQUEST, e.to_string()),
        e => AskFailure::Refused(ErrorCode::INTERNAL, format!("generation failed: {e}")),
    }
}
