//! The head's own stage: the steps of concurrent sessions that meet there, run as one pass.

use std::sync::Arc;

use shoal_engine::stage::{logits_row, BatchItem};
use shoal_engine::{KvCache, Logits, Stage, StageInput, StageOutput};
use shoal_wire::{Activations, DType};
use tokio::sync::oneshot;

use crate::batch::Job;
use crate::convert::tensor_to_activations;
use crate::error::{PipelineError, Result};

pub(super) enum LocalOut {
    Hidden(Activations),
    Logits(Vec<f32>),
}

/// One session's step on the head's own stage, waiting for its batch.
pub(super) struct LocalJob {
    pub(super) session: u64,
    /// The ring's stage when the step was made (a re-plan may replace it).
    pub(super) stage: Arc<Stage>,
    pub(super) tokens: Vec<u32>,
    pub(super) positions: Vec<usize>,
    pub(super) cache: KvCache,
    /// `Verify` for a step of guesses: each row run as a decode step alone.
    pub(super) logits: Logits,
    pub(super) dtype: DType,
    /// The cache back, with the step's output.
    pub(super) reply: oneshot::Sender<(KvCache, Result<LocalOut>)>,
}

impl Job for LocalJob {
    fn session(&self) -> u64 {
        self.session
    }

    fn rows(&self) -> usize {
        self.positions.len()
    }

    /// Steps share a pass only on the same stage.
    fn fits_with(&self, first: &Self) -> bool {
        Arc::ptr_eq(&self.stage, &first.stage)
    }
}

/// A batch of the head's steps as one pass of its stage (blocking); each session gets its
/// cache back with its own output or error.
pub(super) fn run_local_batch(mut batch: Vec<LocalJob>) {
    let Some(stage) = batch.first().map(|j| j.stage.clone()) else {
        return;
    };
    let items = batch
        .iter_mut()
        .map(|j| BatchItem {
            input: StageInput::Tokens(&j.tokens),
            positions: &j.positions,
            cache: &mut j.cache,
            logits: j.logits,
        })
        .collect();
    let outputs = stage.forward_batch(items);
    for (job, output) in batch.into_iter().zip(outputs) {
        let out = output.map_err(PipelineError::from).and_then(|o| match o {
            StageOutput::Hidden(h) => Ok(LocalOut::Hidden(tensor_to_activations(&h, job.dtype)?)),
            StageOutput::Logits(l) => Ok(LocalOut::Logits(logits_row(&l, 0)?)),
        });
        // A session that went away meanwhile no longer listens.
        let _ = job.reply.send((job.cache, out));
    }
}
