//! Shared by the API crate's router tests: the real SmolLM2 test model (loaded once per
//! test binary), apps around it, and requests through the router without a socket.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use shoal_api::{app, AppState};
use shoal_engine::Model;
use tower::ServiceExt;

pub(crate) const MODEL_FILE: &str = "smollm2-135m-instruct-q4_1.gguf";

pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")))
}

/// The test model, loaded once per test binary.
pub(crate) fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = models_dir().join(MODEL_FILE);
            assert!(
                path.is_file(),
                "{} is missing: run scripts/fetch-models.sh (or set SHOAL_MODELS_DIR)",
                path.display()
            );
            Arc::new(Model::load(&path, |_, _| {}).expect("the test model loads"))
        })
        .clone()
}

/// An app whose model is still loading, serving `model_id`.
pub(crate) fn loading_app(model_id: &str) -> (AppState, Router) {
    let state = AppState::new(model_id.into(), None);
    (state.clone(), app(state))
}

/// An app with the test model ready, serving it as `model_id`.
pub(crate) fn ready_app(model_id: &str) -> (AppState, Router) {
    let state = AppState::new(model_id.into(), None);
    state.set_ready(model());
    (state.clone(), app(state))
}

/// One answer of the router, read whole.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) content_type: String,
    pub(crate) body: String,
}

impl Answer {
    /// The body as JSON, whatever the status.
    pub(crate) fn body_json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

pub(crate) async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        content_type,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

pub(crate) async fn get(app: &Router, uri: &str) -> Answer {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

pub(crate) async fn post_raw(app: &Router, uri: &str, body: &str) -> Answer {
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(app, req).await
}

pub(crate) async fn post(app: &Router, uri: &str, body: Value) -> Answer {
    post_raw(app, uri, &body.to_string()).await
}
