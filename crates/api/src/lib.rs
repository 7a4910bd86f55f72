//! The HTTP face of a Shoal node: an OpenAI-compatible API, `/health` and `/metrics`.
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: streaming (SSE, ending with
//!   `data: [DONE]`; a usage chunk only with `stream_options.include_usage`) or whole.
//! - `GET /v1/models`, `GET /v1/models/{id}`: the one model this node serves.
//! - `GET /health`: 503 while the model loads (or when it failed), then
//!   `{"status":"ok","api_key_required":BOOL}` (whether the other routes want a key).
//! - `GET /metrics`: Prometheus metrics prefixed `shoal_`.
//! - `GET /v1/cluster`, `POST /v1/cluster/join`: the members and their state; adding a peer.
//!   `POST /v1/cluster/chaos`: a member plays dead, or stops (only with an API key).
//! - `GET /`: the dashboard; `GET /v1/dashboard/events`: its live feed (SSE).
//!
//! Errors are OpenAI's `{"error":{"message","type","param","code"}}`, made in one place:
//! [`ApiError`]. Generations run one at a time on the engine; the others queue (see
//! `runner`). With an API key configured, everything but `/health` wants
//! `Authorization: Bearer <key>`; without one, any token (or none) is accepted.
//!
//! [`app`] builds the router from an [`AppState`]; the binary serves it, loads the model
//! in the background and calls [`AppState::set_ready`].

mod anthropic;
mod backend;
mod cluster;
mod completions;
mod dashboard;
mod embeddings;
mod error;
mod infill;
mod limits;
mod metrics;
mod ollama;
mod runner;
mod serve;
mod state;
mod swarm;
mod tokens;
mod tools;
mod types;

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use backend::Backend;
pub use cluster::ClusterHandle;
pub use completions::DEFAULT_MAX_TOKENS;
pub use error::{ApiError, Json};
pub use limits::HttpLimits;
pub use serve::serve;
pub use state::AppState;

/// This node's chat API as its swarm agent answers with it: the whole client requests a
/// swarm head passes on (tools, JSON answers…) are answered by this node's own model, as
/// `POST /v1/chat/completions` would answer them.
pub fn agent_chat_api(state: AppState) -> shoal_swarm::agent::ChatApi {
    std::sync::Arc::new(move |body| Box::pin(completions::answer_whole(state.clone(), body)))
}

use types::{ModelList, ModelObject};

/// The router of a node's HTTP API.
pub fn app(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/apply-template", post(completions::apply_template))
        .route("/props", get(completions::props))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/infill", post(infill::infill))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(list_models))
        .route("/v1/swarm/status", get(swarm::status))
        .route("/v1/swarm/query", post(swarm::query))
        .route("/v1/cluster", get(cluster::status))
        .route("/v1/cluster/join", post(cluster::join))
        .route("/v1/cluster/chaos", post(cluster::chaos))
        .route("/v1/dashboard/events", get(dashboard::events))
        .route("/v1/models/{*id}", get(get_model))
        .route("/metrics", get(metrics))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/pull", post(ollama::unsupported))
        .route("/api/push", post(ollama::unsupported))
        .route("/api/create", post(ollama::unsupported))
        .route("/api/copy", post(ollama::unsupported))
        .route("/api/delete", axum::routing::delete(ollama::unsupported))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(protected)
        .route("/", get(dashboard::page))
        .route("/dashboard", get(dashboard::page))
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Response {
    // Whether the other routes want a key: the dashboard asks for one before it calls them.
    let api_key_required = state.api_key().is_some();
    if state.is_stage_only() {
        return axum::Json(serde_json::json!({
            "status": "ok",
            "mode": "stage-only",
            "api_key_required": api_key_required,
        }))
        .into_response();
    }
    match state.model() {
        Ok(_) => {
            axum::Json(serde_json::json!({ "status": "ok", "api_key_required": api_key_required }))
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The node's own model, then, on a swarm head, `swarm` and `swarm:STRATEGY` for each
/// strategy.
fn model_ids(state: &AppState) -> Vec<String> {
    let mut ids = vec![state.model_id()];
    ids.extend(state.model_alias().map(str::to_owned));
    if state.swarm().is_some() {
        ids.push("swarm".to_owned());
        ids.extend(
            shoal_swarm::routing::Strategy::ALL
                .iter()
                .map(|s| format!("swarm:{s}")),
        );
    }
    ids
}

async fn list_models(State(state): State<AppState>) -> Response {
    let ids = model_ids(&state);
    axum::Json(ModelList {
        object: "list",
        data: ids.iter().map(|id| model_object(&state, id)).collect(),
    })
    .into_response()
}

async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if model_ids(&state).contains(&id) {
        axum::Json(model_object(&state, &id)).into_response()
    } else {
        ApiError::model_not_found(&id).into_response()
    }
}

fn model_object<'a>(state: &AppState, id: &'a str) -> ModelObject<'a> {
    ModelObject {
        id,
        object: "model",
        created: state.started(),
        owned_by: "shoal",
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, state.registry()) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("cannot encode metrics: {e}")).into_response(),
    }
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::unknown_route(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// With an API key configured, wants `Authorization: Bearer <key>` (or `x-api-key: <key>`).
async fn require_api_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = state.api_key() {
        // Anthropic's clients send the key as `x-api-key`; it counts like the bearer token.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so response times do not tell an
/// attacker how much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every answer by route (not raw path, which would let clients mint label values)
/// and status.
async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    state
        .metrics()
        .record_request(&endpoint, response.status().as_u16());
    response
}
