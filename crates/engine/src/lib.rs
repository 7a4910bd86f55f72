//! The Shoal engine: GGUF models on candle tensors, run range-of-layers by
//! range-of-layers.
//!
//! - [`gguf::GgufFile`] opens a file and reads tensors on demand.
//! - [`stage::Stage`] runs layers `[a..b)`, with the embedding in front when `a == 0` and
//!   the final norm and LM head behind when `b == L`. A whole model is one stage.
//! - [`kv_cache::KvCache`] holds one session's keys and values, outside the weights, with
//!   the absolute position of every token.
//! - [`tokenizer::Tokenizer`] and [`chat_template::ChatTemplate`] come from the GGUF's own
//!   metadata; [`sampler::Sampler`] picks tokens; [`generate::Model`] ties them together.
//!
//! The engine has no sockets and no idea that peers exist; its only threads are the
//! kernels' fork-join pool (`pool.rs`).

mod attention;
pub mod chat_template;
pub mod choices;
pub mod config;
pub mod error;
pub mod generate;
mod ggml_math;
pub mod gguf;
pub mod json_grammar;
pub mod json_rule;
mod kernels;
pub mod kv_cache;
pub mod logprobs;
pub mod lookup;
mod metadata;
mod pool;
pub mod pooler;
pub mod prefix_cache;
pub mod profile;
pub mod prompt;
pub mod sampler;
pub mod speculation;
pub mod stage;
pub mod stage_file;
pub mod text_stream;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig, Pooling};
pub use error::{EngineError, Result};
pub use generate::{
    step_together, FinishReason, GenerateParams, Generation, Model, Step, StepsTogether, Timings,
};
pub use gguf::GgufFile;
pub use json_grammar::{JsonConstraint, JsonGrammar};
pub use json_rule::{JsonRule, JsonTracker, MAX_LEAD};
pub use kv_cache::KvCache;
pub use logprobs::{token_logprob, TokenLogprob, MAX_TOP_LOGPROBS};
pub use lookup::Lookup;
pub use pool::with_threads as with_kernel_threads;
pub use pooler::Pooler;
pub use prefix_cache::{PrefixCache, PrefixMatch};
pub use prompt::{InfillLimits, PromptFormat};
pub use sampler::{Sampler, SamplingParams};
pub use speculation::{check_draft_tokenizer, check_draft_vocabulary, Drafter, Speculation};
pub use stage::{Logits, Stage, StageInput, StageOutput, StageSpec};
pub use stage_file::StageFile;
pub use text_stream::TextStream;
pub use tokenizer::{FimIds, Tokenizer};

pub use kernels::amx_tiles_available;

/// Re-exported so callers can build devices and tensors without naming candle.
pub use candle_core;
#[cfg(feature = "bench")]
#[doc(hidden)]
pub use kernels::bench as kernel_bench;
