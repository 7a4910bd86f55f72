//! The dashboard (issue #16): one HTML page embedded in the binary, served at `/` and
//! `/dashboard` on every node, and the live feed it reads, `GET /v1/dashboard/events` —
//! Server-Sent Events, one `state` event at once and then every second:
//!
//! ```json
//! {"node": {"id", "model", "mode": "single"|"pipeline"|"swarm"|"stage-only"|"loading"|"failed",
//!           "busy", "tokens_per_s", "chaos_allowed"},
//!  "cluster": <GET /v1/cluster>,
//!  "ring": null | {"stages": [{"id", "addr", "layers": [START, END], "state", "head"}]},
//!  "swarm": null | <GET /v1/swarm/status>}
//! ```
//!
//! The page needs no build step and loads nothing from elsewhere; it reads the feed with
//! `fetch` (not `EventSource`, which cannot send the API key) and sends the key the user
//! typed on every request. The feed and everything the page calls sit behind the API key;
//! the page itself holds nothing secret.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::cluster;
use crate::state::AppState;

/// The page.
const PAGE: &str = include_str!("dashboard/index.html");
/// How often the feed sends the state.
const PERIOD: Duration = Duration::from_secs(1);

/// `GET /` and `GET /dashboard`.
pub(crate) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /v1/dashboard/events`.
pub(crate) async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(PERIOD).await;
        }
        let event = SseEvent::default()
            .event("state")
            .data(snapshot(&state).to_string());
        Some((Ok(event), (state, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Everything the page shows, now.
fn snapshot(state: &AppState) -> Value {
    let (busy, tokens_per_s) = state.load_figures();
    let cluster = state.cluster();
    let view = cluster.as_ref().map(|c| c.roster.view(Instant::now()));
    let backend = state.model();
    let mode = match &backend {
        Ok(_) if state.swarm().is_some() => "swarm",
        Ok(Backend::Local(_)) => "single",
        Ok(Backend::Ring(_)) => "pipeline",
        Err(_) if state.is_stage_only() => "stage-only",
        Err(e) if e.message.contains("failed") => "failed",
        Err(_) => "loading",
    };
    let ring = match (&backend, &view) {
        (Ok(Backend::Ring(pipeline)), view) => {
            let (head_layers, peers) = pipeline.layout();
            let me = view
                .as_ref()
                .map(|v| v.me.node_id.clone())
                .unwrap_or_default();
            let ms = |us: u32| (us > 0).then(|| f64::from(us) / 1e3);
            let mut stages = vec![json!({
                "id": me,
                "addr": view.as_ref().and_then(|v| v.my_addr).map(|a| a.to_string()),
                "layers": [head_layers.start, head_layers.end],
                "state": "alive",
                "head": true,
                "pass_ms": ms(pipeline.pass_us()),
            })];
            // One-way time to each peer from the head: half the heartbeat's round trip. A
            // hop between two peers, which the head cannot see, is taken as the mean of
            // theirs (as the planner takes it).
            let mut one_way = Vec::new();
            for peer in &peers {
                let member = view.as_ref().and_then(|v| {
                    v.members
                        .iter()
                        .find(|m| m.addr == peer.addr)
                        .or_else(|| v.members.iter().find(|m| same_machine(m.addr, peer.addr)))
                });
                let pass_us = member.and_then(|m| {
                    m.info
                        .stages
                        .iter()
                        .find(|s| {
                            s.start as usize == peer.layers.start
                                && s.end as usize == peer.layers.end
                        })
                        .map(|s| s.pass_us)
                });
                let half = member
                    .and_then(|m| m.round_trip)
                    .map(|r| r.as_secs_f64() * 1e3 / 2.0);
                let hop_in = match (one_way.last(), half) {
                    (None, h) => h,
                    (Some(Some(before)), Some(h)) => Some((before + h) / 2.0),
                    _ => None,
                };
                one_way.push(half);
                stages.push(json!({
                    "id": member.map_or_else(|| peer.addr.to_string(), |m| m.info.node_id.clone()),
                    "addr": peer.addr.to_string(),
                    "layers": [peer.layers.start, peer.layers.end],
                    "state": member.map_or("unknown", |m| m.state.as_str()),
                    "head": false,
                    "pass_ms": pass_us.and_then(ms),
                    "hop_in_ms": hop_in,
                }));
            }
            // The token comes back from the last stage to the head.
            let hop_back = one_way.last().copied().flatten();
            json!({ "stages": stages, "hop_back_ms": hop_back })
        }
        _ => Value::Null,
    };
    json!({
        "node": {
            "id": view.as_ref().map(|v| v.me.node_id.clone()),
            "model": state.model_id(),
            "mode": mode,
            "busy": busy,
            "tokens_per_s": tokens_per_s,
            "chaos_allowed": state.api_key().is_some() && cluster.is_some(),
        },
        "cluster": view.as_ref().map(cluster::view_json),
        "ring": ring,
        "swarm": state.swarm().map(|s| serde_json::to_value(s.status()).unwrap_or(Value::Null)),
    })
}

/// Whether two peer addresses name one port of this machine (a ring dialled `0.0.0.0:P`,
/// heartbeats reached `127.0.0.1:P`).
fn same_machine(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
    a.port() == b.port() && local(a.ip()) && local(b.ip())
}
