//! The cluster over HTTP (issue #15): `GET /v1/cluster` lists the members as this node sees
//! them — the contract scripts rely on:
//!
//! ```json
//! {"self": "ID", "members": [{"id", "addr", "state": "alive"|"suspect"|"dead",
//!   "last_seen_ms", "memory_total", "memory_free", "cores", "models", "role", "layers", …}],
//!   (each of "layers" `{"model", "start", "end", "pass_ms"}`; "rtt_ms" the last heartbeat's
//!   round trip)
//!  "candidates": ["HOST:PORT", …]}
//! ```
//!
//! This node is the first member (`"self": true`, `last_seen_ms` 0). `POST /v1/cluster/join`
//! with `{"addr": "HOST:PORT"}` adds a peer port where multicast does not reach: the node
//! heartbeats it at once, over the swarm key's authenticated link, and answers with the
//! member it turned out to be (502 when it did not answer; it stays on the list of
//! addresses tried every round, like a `--peer`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shoal_cluster::heartbeat::{self, WireProber};
use shoal_cluster::{MemberView, Roster, RosterView};
use shoal_wire::NodeInfo;

use crate::error::{ApiError, Json};
use crate::state::AppState;

/// The node's member list, and how to heartbeat a new address (`None` without a peer port:
/// such a node is alone and cannot join anything).
#[derive(Clone)]
pub struct ClusterHandle {
    pub roster: Arc<Roster>,
    pub prober: Option<Arc<WireProber>>,
}

/// One member in `GET /v1/cluster`.
#[derive(Serialize)]
struct MemberJson {
    id: String,
    addr: Option<String>,
    state: &'static str,
    last_seen_ms: u64,
    #[serde(rename = "self")]
    is_self: bool,
    version: String,
    http_port: Option<u16>,
    memory_total: u64,
    memory_free: u64,
    cores: u32,
    accelerator: Option<String>,
    models: Vec<String>,
    role: Option<String>,
    layers: Vec<LayersJson>,
    /// Requests it is answering now.
    busy: u32,
    /// Its last answer's decode speed.
    tokens_per_s: f32,
    /// The last heartbeat's round trip to it, ms (none for this node itself).
    rtt_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

/// Layers `[start, end)` of `model` that a member holds as a pipeline stage.
#[derive(Serialize)]
struct LayersJson {
    model: String,
    start: u32,
    end: u32,
    /// Its recent decode passes, ms on average (none before the first).
    pass_ms: Option<f64>,
}

#[derive(Serialize)]
struct ClusterJson {
    #[serde(rename = "self")]
    me: String,
    members: Vec<MemberJson>,
    candidates: Vec<String>,
}

impl MemberJson {
    fn new(info: &NodeInfo, addr: Option<SocketAddr>, state: &'static str) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        MemberJson {
            id: info.node_id.clone(),
            addr: addr.map(|a| a.to_string()),
            state,
            last_seen_ms: 0,
            is_self: false,
            version: info.version.clone(),
            http_port: (info.http_port != 0).then_some(info.http_port),
            memory_total: info.memory_total,
            memory_free: info.memory_free,
            cores: info.cores,
            accelerator: some(&info.accelerator),
            models: info.models.clone(),
            role: some(&info.role),
            layers: info
                .stages
                .iter()
                .map(|s| LayersJson {
                    model: s.model_id.clone(),
                    start: s.start,
                    end: s.end,
                    pass_ms: (s.pass_us > 0).then(|| f64::from(s.pass_us) / 1e3),
                })
                .collect(),
            busy: info.busy,
            tokens_per_s: info.tokens_per_s,
            rtt_ms: None,
            last_error: None,
        }
    }

    fn member(m: &MemberView) -> Self {
        MemberJson {
            last_seen_ms: u64::try_from(m.since_seen.as_millis()).unwrap_or(u64::MAX),
            rtt_ms: m.round_trip.map(|r| r.as_secs_f64() * 1e3),
            last_error: m.last_error.clone(),
            ..MemberJson::new(&m.info, Some(m.addr), m.state.as_str())
        }
    }
}

/// `GET /v1/cluster`.
pub(crate) async fn status(State(state): State<AppState>) -> Result<Response, ApiError> {
    let cluster = state
        .cluster()
        .ok_or_else(|| ApiError::unavailable("the node is still starting"))?;
    let view = cluster.roster.view(Instant::now());
    Ok(axum::Json(view_json(&view)).into_response())
}

/// The body of `GET /v1/cluster` (the dashboard's feed carries it too).
pub(crate) fn view_json(view: &RosterView) -> serde_json::Value {
    let mut me = MemberJson::new(&view.me, view.my_addr, "alive");
    me.is_self = true;
    let mut members = vec![me];
    members.extend(view.members.iter().map(MemberJson::member));
    serde_json::to_value(ClusterJson {
        me: view.me.node_id.clone(),
        members,
        candidates: view.candidates.iter().map(|a| a.to_string()).collect(),
    })
    .unwrap_or(serde_json::Value::Null)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JoinRequest {
    /// Another node's peer port, `HOST:PORT`.
    addr: String,
}

#[derive(Serialize)]
struct Joined {
    joined: MemberJson,
}

/// `POST /v1/cluster/join`.
pub(crate) async fn join(
    State(state): State<AppState>,
    Json(request): Json<JoinRequest>,
) -> Result<Response, ApiError> {
    let cluster = state
        .cluster()
        .ok_or_else(|| ApiError::unavailable("the node is still starting"))?;
    let prober = cluster.prober.ok_or_else(|| {
        ApiError::invalid_request(
            "this node has no peer port, so it cannot join a cluster; start it with --peer-port",
        )
    })?;
    let addr = heartbeat::resolve(&request.addr)
        .await
        .map_err(|why| ApiError::invalid_value("addr", why))?;
    match heartbeat::join(&cluster.roster, prober.as_ref(), addr).await {
        Ok(member) => Ok(axum::Json(Joined {
            joined: MemberJson::member(&member),
        })
        .into_response()),
        Err(why) => Err(ApiError::bad_gateway(why)),
    }
}

impl ApiError {
    /// 403: this node does not allow what was asked.
    pub fn forbidden(message: impl Into<String>, code: &'static str) -> Self {
        let mut e = ApiError::internal(message);
        e.status = StatusCode::FORBIDDEN;
        e.kind = "permission_error";
        e.code = Some(code);
        e
    }

    /// 404: the request names something that does not exist.
    pub fn not_found(param: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::invalid_value(param, message);
        e.status = StatusCode::NOT_FOUND;
        e.code = Some("not_found");
        e
    }

    /// 502: another node this one asked did not answer.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        let mut e = ApiError::internal(message);
        e.status = StatusCode::BAD_GATEWAY;
        e.kind = "upstream_error";
        e.code = Some("peer_unreachable");
        e
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChaosRequest {
    /// The member's id.
    node: String,
    /// `kill` or `heal`.
    action: String,
}

/// `POST /v1/cluster/chaos`: `{"node": ID, "action": "kill"|"heal"}` — for demos and failure
/// drills, a member plays dead (its peer port refuses everything, it stops heartbeating) or
/// stops. Only on a node started with `--api-key` (the request carries it, as every request
/// there must): without one, anyone who reaches the HTTP port could take the cluster down.
pub(crate) async fn chaos(
    State(state): State<AppState>,
    Json(request): Json<ChaosRequest>,
) -> Result<Response, ApiError> {
    if state.api_key().is_none() {
        return Err(ApiError::forbidden(
            "kill and heal are allowed only on a node started with --api-key",
            "chaos_disabled",
        ));
    }
    let down = match request.action.as_str() {
        "kill" => true,
        "heal" => false,
        other => {
            return Err(ApiError::invalid_value(
                "action",
                format!("is {other:?}; expected \"kill\" or \"heal\""),
            ))
        }
    };
    let cluster = state
        .cluster()
        .ok_or_else(|| ApiError::unavailable("the node is still starting"))?;
    let view = cluster.roster.view(Instant::now());
    let now_down = if request.node == view.me.node_id {
        cluster.roster.set_down(down);
        tracing::warn!(
            down,
            "this node plays dead: {down} (the dashboard's kill/heal)"
        );
        down
    } else {
        let member = view
            .members
            .iter()
            .find(|m| m.info.node_id == request.node)
            .ok_or_else(|| ApiError::not_found("node", format!("no member {:?}", request.node)))?;
        let prober = cluster.prober.ok_or_else(|| {
            ApiError::invalid_request("this node has no peer port to reach its members with")
        })?;
        prober
            .chaos(member.addr, down)
            .await
            .map_err(ApiError::bad_gateway)?
    };
    Ok(axum::Json(serde_json::json!({"node": request.node, "down": now_down})).into_response())
}
