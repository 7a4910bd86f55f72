//! Why a node could not start.

use std::net::SocketAddr;

/// Why [`crate::Node::start`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration contradicts itself.
    #[error("{0}")]
    Config(String),
    /// A listener could not be opened.
    #[error("cannot listen {what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A `--peer` cannot be resolved.
    #[error("{0}")]
    Peers(#[source] shoal_pipeline::PipelineError),
    /// The HTTP server stopped with an error.
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
}
