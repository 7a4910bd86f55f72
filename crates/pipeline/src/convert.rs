//! Between engine tensors and wire matrices, and between the engine's sampling parameters and
//! the wire's `SamplingSpec`.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};
use shoal_engine::candle_core::{DType as TensorDType, Device, Tensor};
use shoal_engine::SamplingParams;
use shoal_wire::{Activations, DType, SamplingSpec};

use crate::error::{PipelineError, Result};

/// Hidden states `[n, hidden]` as a wire matrix in `dtype`.
pub(crate) fn tensor_to_activations(t: &Tensor, dtype: DType) -> Result<Activations> {
    let (rows, cols) = t.dims2().map_err(|e| PipelineError::Engine(e.into()))?;
    let values = t
        .to_dtype(TensorDType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| PipelineError::Engine(e.into()))?;
    let rows =
        u32::try_from(rows).map_err(|_| PipelineError::InvalidRequest("too many rows".into()))?;
    let cols = u32::try_from(cols)
        .map_err(|_| PipelineError::InvalidRequest("too many columns".into()))?;
    Ok(Activations::from_f32(rows, cols, &values, dtype)?)
}

/// A wire matrix as an `f32` tensor on the CPU.
pub(crate) fn activations_to_tensor(a: &Activations) -> Result<Tensor> {
    Tensor::from_vec(
        a.to_f32(),
        (a.rows() as usize, a.cols() as usize),
        &Device::Cpu,
    )
    .map_err(|e| PipelineError::Engine(e.into()))
}

/// The wire form of `params`, with the history tokens the penalties look at.
///
/// Only the window the penalties use travels (the last `repeat_last_n` tokens), and nothing
/// when no penalty is on, so a decode step stays a small frame.
pub fn sampling_spec(params: &SamplingParams, history: &[u32]) -> SamplingSpec {
    let penalties = (params.repeat_penalty != 1.0 && params.repeat_last_n > 0)
        || params.frequency_penalty != 0.0
        || params.presence_penalty != 0.0;
    let penalty_tokens = if penalties {
        history[history.len().saturating_sub(params.repeat_last_n)..].to_vec()
    } else {
        Vec::new()
    };
    SamplingSpec {
        temperature: params.temperature,
        top_k: u32::try_from(params.top_k).unwrap_or(u32::MAX),
        top_p: params.top_p,
        min_p: params.min_p,
        repeat_penalty: params.repeat_penalty,
        frequency_penalty: params.frequency_penalty,
        presence_penalty: params.presence_penalty,
        seed: params.seed,
        logprob: false,
        top_logprobs: 0,
        penalty_tokens,
        ignore_eos: false,
        json: None,
    }
}

/// The engine's sampling parameters for a spec. The penalty window is whatever the head sent
/// (it already cut the history to its `repeat_last_n`), so the window here is unbounded.
pub fn sampling_params(spec: &SamplingSpec) -> SamplingParams {
    SamplingParams {
        temperature: spec.temperature,
        top_k: spec.top_k as usize,
        top_p: spec.top_p,
        min_p: spec.min_p,
        repeat_penalty: spec.repeat_penalty,
        repeat_last_n: usize::MAX,
        frequency_penalty: spec.frequency_penalty,
        presence_penalty: spec.presence_penalty,
        seed: spec.seed,
    }
}

/// SHA-256 of a file, read in 1 MiB pieces.
pub fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trip_keeps_the_penalty_window() {
        let params = SamplingParams {
            temperature: 0.8,
            repeat_penalty: 1.1,
            repeat_last_n: 3,
            seed: 7,
            ..SamplingParams::default()
        };
        let spec = sampling_spec(&params, &[1, 2, 3, 4, 5]);
        assert_eq!(spec.penalty_tokens, vec![3, 4, 5]);
        let back = sampling_params(&spec);
        assert_eq!(back.seed, 7);
        assert_eq!(back.temperature, 0.8);
        assert_eq!(back.repeat_last_n, usize::MAX);
        assert!(sampling_spec(&SamplingParams::greedy(), &[1, 2])
            .penalty_tokens
            .is_empty());
    }

    #[test]
    fn activations_round_trip_in_f32() {
        let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"));
        let a = tensor_to_activations(&t, DType::F32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.rows(), a.cols()), (2, 3));
        let back = activations_to_tensor(&a).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            back.to_vec2::<f32>().unwrap_or_default(),
            vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]
        );
    }
}
