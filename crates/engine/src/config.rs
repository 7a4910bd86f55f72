//! Model hyper-parameters, read from GGUF metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::{EngineError, Result};
use crate::metadata::{get_float, get_int, get_str, WrongType};

/// The families of decoder we run. They differ in a few switches, not in code paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// llama.cpp's llama weights are permuted for rotation of adjacent pairs ("normal" RoPE);
    /// qwen models rotate the two halves of each head ("neox" RoPE).
    pub fn rope_interleaved(self) -> bool {
        matches!(self, Self::Llama)
    }

    /// Qwen3 normalises each head of q and k before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3)
    }
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub rope_dim: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    /// How an embedding is pooled from the hidden states (`{arch}.pooling_type`).
    pub pooling: Pooling,
}

impl ModelConfig {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let arch_name = get_string(md, "general.architecture")?;
        let arch = Architecture::from_name(&arch_name)?;
        let p = |key: &str| format!("{arch_name}.{key}");
        let hidden = get_usize(md, &p("embedding_length"))?;
        let n_heads = get_usize(md, &p("attention.head_count"))?;
        let n_kv_heads = get_usize_or(md, &p("attention.head_count_kv"), n_heads)?;
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::InvalidInput(format!(
                "head counts {n_heads}/{n_kv_heads} do not allow grouped-query attention"
            )));
        }
        let head_dim = get_usize_or(md, &p("attention.key_length"), hidden / n_heads)?;
        let rope_dim = get_usize_or(md, &p("rope.dimension_count"), head_dim)?;
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(v) => v
                .to_vec()
                .map_err(|source| EngineError::BadMetadata {
                    key: "tokenizer.ggml.tokens".into(),
                    source,
                })?
                .len(),
            None => get_usize(md, &p("vocab_size"))?,
        };
        Ok(Self {
            arch,
            n_layers: get_usize(md, &p("block_count"))?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_hidden: get_usize(md, &p("feed_forward_length"))?,
            rms_eps: get_f64_or(md, &p("attention.layer_norm_rms_epsilon"), 1e-6)?,
            rope_theta: get_f64_or(md, &p("rope.freq_base"), 10_000.0)? as f32,
            rope_dim,
            context_length: get_usize_or(md, &p("context_length"), 4096)?,
            vocab_size,
            pooling: Pooling::from_type(get_usize_opt(md, &p("pooling_type"))?),
        })
    }
}

/// A value of the wrong kind, as the engine reports it.
fn bad(w: WrongType) -> EngineError {
    EngineError::BadMetadata {
        source: candle_core::Error::Msg(format!("expected {}, got {}", w.expected, w.found)),
        key: w.key,
    }
}

pub(crate) fn get_string(md: &HashMap<String, Value>, key: &str) -> Result<String> {
    get_str(md, key)
        .map_err(bad)?
        .map(str::to_owned)
        .ok_or_else(|| EngineError::MissingMetadata(key.to_string()))
}

fn get_usize_opt(md: &HashMap<String, Value>, key: &str) -> Result<Option<usize>> {
    let Some(v) = get_int(md, key).map_err(bad)? else {
        return Ok(None);
    };
    usize::try_from(v).map(Some).map_err(|_| {
        bad(WrongType {
            key: key.to_string(),
            expected: "a non-negative integer",
            found: v.to_string(),
        })
    })
}

/// How an embedding is made from a text's hidden states after the final norm, as
/// llama.cpp's pooling types: embedding models name theirs in the GGUF
/// (`{arch}.pooling_type`: Qwen3-Embedding takes the last token's); a generative model
/// names none and gets the mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over every token.
    #[default]
    Mean,
    /// The first token's (BERT's `[CLS]`).
    First,
    /// The last token's.
    Last,
}

impl Pooling {
    /// llama.cpp's `LLAMA_POOLING_TYPE`: 2 is CLS, 3 is LAST; MEAN (1), NONE (0, no
    /// single vector — a request for one gets the mean), RANK and none given are the mean.
    pub fn from_type(pooling_type: Option<usize>) -> Self {
        match pooling_type {
            Some(2) => Pooling::First,
            Some(3) => Pooling::Last,
            _ => Pooling::Mean,
        }
    }
}

fn get_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    get_usize_opt(md, key)?.ok_or_else(|| EngineError::MissingMetadata(key.to_string()))
}

fn get_usize_or(md: &HashMap<String, Value>, key: &str, default: usize) -> Result<usize> {
    Ok(get_usize_opt(md, key)?.unwrap_or(default))
}

fn get_f64_or(md: &HashMap<String, Value>, key: &str, default: f64) -> Result<f64> {
    Ok(get_float(md, key).map_err(bad)?.unwrap_or(default))
}
