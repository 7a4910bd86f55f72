//! Between engine tensors and wire matrices, and between the engine's sampling parameters and
//! the wire's `SamplingSpec`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

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

/// SHA-256 of a file, read in 1 MiB pieces — once per file version in this process: a
/// head hashes its model to plan the ring, to set it up and to set it up again after a
/// loss or a move, and a gigabyte takes seconds. A file whose size or modification time
/// changed is read again.
pub fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    /// A file's size and modification time, and its hash then.
    type Hashed = ((u64, Option<std::time::SystemTime>), [u8; 32]);
    static KNOWN: OnceLock<Mutex<HashMap<PathBuf, Hashed>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    let meta = std::fs::metadata(path)?;
    let version = (meta.len(), meta.modified().ok());
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let lock = || known.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((v, sha)) = lock().get(&key) {
        if *v == version {
            return Ok(*sha);
        }
    }
    let sha = read_sha256(path)?;
    lock().insert(key, (version, sha));
    Ok(sha)
}

fn read_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
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
    fn a_file_is_hashed_once_per_version() {
        let dir = std::env::temp_dir().join(format!("shoal-sha-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.gguf");
        std::fs::write(&path, b"first").unwrap();
        let first = file_sha256(&path).unwrap();
        assert_eq!(first, <[u8; 32]>::from(Sha256::digest(b"first")));
        assert_eq!(file_sha256(&path).unwrap(), first);
        // Another size: read again.
        std::fs::write(&path, b"second!").unwrap();
        assert_eq!(
            file_sha256(&path).unwrap(),
            <[u8; 32]>::from(Sha256::digest(b"second!"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
