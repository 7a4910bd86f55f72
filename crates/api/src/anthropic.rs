//! Anthropic's Messages API, `POST /v1/messages`, so that Anthropic-SDK clients can talk to
//! a Shoal node.

use axum::extract::State;
use axum::response::Response;

use crate::error::{ApiError, Json};
use crate::state::AppState;

pub(crate) async fn messages(
    State(_state): State<AppState>,
    Json(_req): Json<serde_json::Value>,
) -> Result<Response, ApiError> {
    Err(ApiError::internal("not yet"))
}
