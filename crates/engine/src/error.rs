use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {source}")]
    Gguf {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("GGUF metadata key `{0}` is missing")]
    MissingMetadata(String),
    #[error("GGUF metadata key `{key}` has an unexpected type: {source}")]
    BadMetadata {
        key: String,
        source: candle_core::Error,
    },
    #[error("model architecture `{0}` is not supported (supported: llama, qwen2, qwen3)")]
    UnsupportedArchitecture(String),
    #[error("tensor `{0}` is missing from the GGUF file")]
    MissingTensor(String),
    #[error("invalid stage: {0}")]
    InvalidStage(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("the context is full: {needed} positions needed, the model allows {limit}")]
    ContextFull { needed: usize, limit: usize },
    #[error("generation was interrupted")]
    Interrupted,
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] crate::chat_template::ChatTemplateError),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
