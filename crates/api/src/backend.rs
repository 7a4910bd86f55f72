//! What answers a node's requests: its own whole model, or a ring of stages it heads
//! (pipeline mode). Handlers see one [`Backend`]; only the runner tells them apart.

use std::sync::Arc;

use shoal_engine::{Model, ModelConfig, PromptFormat};
use shoal_pipeline::Pipeline;

/// The model behind the API.
#[derive(Clone)]
pub enum Backend {
    /// The whole model in this process.
    Local(Arc<Model>),
    /// A ring of stages this node heads: it runs the first layers, peers the rest.
    Ring(Arc<Pipeline>),
}

impl Backend {
    /// Whether both are the very same model or ring.
    pub(crate) fn same(&self, other: &Backend) -> bool {
        match (self, other) {
            (Backend::Local(a), Backend::Local(b)) => Arc::ptr_eq(a, b),
            (Backend::Ring(a), Backend::Ring(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        match self {
            Backend::Local(m) => m.config(),
            Backend::Ring(p) => p.model_config(),
        }
    }

    pub(crate) fn prompt_format(&self) -> &PromptFormat {
        match self {
            Backend::Local(m) => m.prompt_format(),
            Backend::Ring(p) => p.prompt_format(),
        }
    }
}

impl From<Arc<Model>> for Backend {
    fn from(model: Arc<Model>) -> Self {
        Backend::Local(model)
    }
}

impl From<Arc<Pipeline>> for Backend {
    fn from(pipeline: Arc<Pipeline>) -> Self {
        Backend::Ring(pipeline)
    }
}
