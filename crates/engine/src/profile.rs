//! How fast this device runs a model's layers: the numbers the placement planner needs.

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::stage::{Logits, Stage, StageInput};

/// Measured time of one layer, per token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTiming {
    /// Decoding: one token through one layer, in milliseconds.
    pub decode_ms_per_layer: f64,
    /// Prefill: one prompt token through one layer, in milliseconds.
    pub prefill_ms_per_layer_token: f64,
}

/// Runs `stage` on a prompt of `prefill_tokens` and then `decode_tokens` single steps,
/// and divides the times by its layer count. Fixed token ids (or zero hidden states on
/// a stage without the embedding): speed does not depend on the values. The embedding
/// and LM head, when the stage has them, are counted in, so the per-layer figures are a
/// little pessimistic for whole models.
pub fn measure(stage: &Stage, prefill_tokens: usize, decode_tokens: usize) -> Result<StageTiming> {
    let layers = stage.spec().layers.len().max(1) as f64;
    let hidden = stage.config().hidden;
    let input = |n: usize| -> Result<StageInput<'static>> {
        Ok(if stage.spec().embed {
            StageInput::Tokens(&TOKENS[..n])
        } else {
            StageInput::Hidden(Tensor::zeros((n, hidden), DType::F32, stage.device())?)
        })
    };
    let prefill_tokens = prefill_tokens.clamp(1, TOKENS.len());
    let mut cache = stage.new_cache();
    let positions: Vec<usize> = (0..prefill_tokens).collect();
    let started = Instant::now();
    stage.forward(input(prefill_tokens)?, &positions, &mut cache, Logits::Last)?;
    let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    for i in 0..decode_tokens {
        stage.forward(input(1)?, &[prefill_tokens + i], &mut cache, Logits::Last)?;
    }
    let decode_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(StageTiming {
        decode_ms_per_layer: decode_ms / decode_tokens.max(1) as f64 / layers,
        prefill_ms_per_layer_token: prefill_ms / prefill_tokens as f64 / layers,
    })
}

/// Token ids used for measuring: small ids exist in every vocabulary.
static TOKENS: [u32; 128] = {
    let mut t = [0u32; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = (i as u32 * 7 + 11) % 200;
        i += 1;
    }
    t
};
