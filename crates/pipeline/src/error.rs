//! The one error type of the pipeline crate.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_engine::EngineError;
use shoal_wire::WireError;

/// Everything that can go wrong while setting up or running a ring of stages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// Loading or running the local stage failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Talking to a peer failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Reading the model file (for its hash) failed.
    #[error("cannot read model file: {0}")]
    Io(#[from] std::io::Error),
    /// The model a `LoadStage` names is not on this node, or is a different file.
    #[error("model `{model_id}` is not available on this node: {reason}")]
    ModelUnavailable { model_id: String, reason: String },
    /// A peer answered a request with an error.
    #[error("stage at {peer} refused: {message}")]
    Refused { peer: SocketAddr, message: String },
    /// A stage reported a failure for this session (to the head's reply listener).
    #[error("a stage failed while running the session: {0}")]
    StageFailed(String),
    /// A stage that is up refused the session's work (its code says why: a bad request, too
    /// many sessions, …). Not a lost stage.
    #[error("a stage refused the session's work: {message} ({code})")]
    Rejected {
        code: shoal_wire::ErrorCode,
        message: String,
    },
    /// This node has as much work as it may take.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A `Forward` of a plan this stage does not serve (it was loaded for another).
    #[error(
        "this stage serves plan {loaded:016x}, not {sent:016x}: it was loaded again (by \
         another head, or a re-plan), so the session's cache is not here"
    )]
    StalePlan { loaded: u64, sent: u64 },
    /// A session was to resume from a kept cache this stage no longer holds (its prompt
    /// cache needed the room, or it was loaded again since).
    #[error(
        "the kept cache of session {from_session} (first {len} positions) is not on this stage"
    )]
    PrefixGone { from_session: u64, len: u32 },
    /// No answer came in time.
    #[error("no {what} arrived within {after:?}; is every stage of the ring still up?")]
    Timeout { what: &'static str, after: Duration },
    /// A peer's address cannot be resolved.
    #[error("{0}")]
    Address(String),
    /// The pipeline's description does not fit the model.
    #[error("invalid pipeline: {0}")]
    Config(String),

    /// A stage's weights could not be fetched over the LAN, or arrived altered.
    #[error("fetching a stage's weights: {0}")]
    Weights(String),
    /// The request cannot be run.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A peer gave no profile to plan with.
    #[error("asking peer {peer} for its profile: {source}")]
    Probe {
        peer: String,
        #[source]
        source: Box<PipelineError>,
    },
    /// A stage of a ring being set up did not get ready (unreachable, refused, vanished,
    /// or silent past the load timeout).
    #[error("setting up the stage at {peer}: {source}")]
    Loading {
        peer: SocketAddr,
        #[source]
        source: Box<PipelineError>,
    },
    /// The planner found no ring for the model on these nodes.
    #[error(transparent)]
    Plan(#[from] shoal_cluster::PlanError),
    /// A blocking compute task panicked or was cancelled.
    #[error("a compute task failed: {0}")]
    Task(String),
}

impl From<tokio::task::JoinError> for PipelineError {
    fn from(e: tokio::task::JoinError) -> Self {
        PipelineError::Task(e.to_string())
    }
}

impl PipelineError {
    /// True when the error means a stage (or the link to it) is gone or hung, so the session
    /// could go on after a re-plan; false for bad requests and local failures.
    pub fn is_stage_loss(&self) -> bool {
        match self {
            PipelineError::Wire(e) => !e.is_protocol_violation(),
            PipelineError::StageFailed(_)
            | PipelineError::Timeout { .. }
            | PipelineError::Refused { .. } => true,
            PipelineError::Loading { source, .. } => source.is_stage_loss(),
            _ => false,
        }
    }

    /// True when the error is this node's own (its model file, its stage, its settings):
    /// setting up a ring again cannot help until someone changes something here. Errors of
    /// peers, links and plans are not.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            PipelineError::Engine(_)
                | PipelineError::Io(_)
                | PipelineError::Config(_)
                | PipelineError::InvalidRequest(_)
                | PipelineError::Task(_)
        )
    }

    /// True when a stage no longer holds the kept cache a session was to resume from.
    pub fn is_prefix_gone(&self) -> bool {
        matches!(
            self,
            PipelineError::Rejected { code, .. } if *code == shoal_wire::ErrorCode::PREFIX_GONE
        )
    }
}

/// Result with [`PipelineError`].
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
