//! What a swarm run and `/v1/swarm/status` report.

use std::net::SocketAddr;

use serde::Serialize;
use shoal_cluster::{Member, MemberState};
use shoal_wire::AgentCard;

use crate::classify::QueryType;
use crate::roles::Role;
use crate::routing::Strategy;
use crate::weight::agent_weight;

/// What the head knows of one agent.
#[derive(Clone, Debug, Serialize)]
pub struct AgentStatus {
    /// The agent's peer address.
    pub addr: String,
    /// Its node id, once it answered.
    pub node_id: Option<String>,
    /// Its role; `"worker"` for a node without one.
    pub role: Option<String>,
    /// Its model file.
    pub model: Option<String>,
    /// Its model's name.
    pub model_name: Option<String>,
    /// Whether it answered the last `Describe` (and no request since failed to reach it).
    pub healthy: bool,
    /// The same in words: `ok`, `down`, or `unknown` before the first `Describe`.
    pub health: &'static str,
    /// Measured decode speed.
    pub tokens_per_s: f32,
    /// Thermal penalty of its device (1 = cool).
    pub thermal_penalty: f32,
    /// min(tokens/s ÷ 40, 1) × thermal penalty.
    pub weight: f32,
    /// Requests queued or running on it.
    pub busy: u32,
    /// Its model's parameter count (0 before the first `Describe`).
    pub parameters: u64,
    /// Why it is unhealthy.
    pub last_error: Option<String>,
    /// Milliseconds since it last answered (`None`: never).
    pub last_seen_ms: Option<u64>,
}

impl AgentStatus {
    pub(super) fn unknown(addr: SocketAddr) -> Self {
        AgentStatus {
            addr: addr.to_string(),
            node_id: None,
            role: None,
            model: None,
            model_name: None,
            healthy: false,
            health: "unknown",
            tokens_per_s: 0.0,
            thermal_penalty: 1.0,
            weight: 0.0,
            busy: 0,
            parameters: 0,
            last_error: Some("not contacted yet".to_owned()),
            last_seen_ms: None,
        }
    }

    /// Health as the membership records it.
    pub(super) fn with_health(mut self, member: Option<Member>) -> Self {
        let Some(member) = member else { return self };
        self.healthy = member.is_alive();
        self.health = match member.state {
            MemberState::Unknown => "unknown",
            MemberState::Alive => "ok",
            MemberState::Dead => "down",
        };
        if member.state != MemberState::Unknown {
            self.last_error = member.last_error.clone();
        }
        self.last_seen_ms = member
            .since_seen()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    pub(super) fn update(&mut self, card: &AgentCard) {
        self.node_id = Some(card.node_id.clone());
        self.role = Some(if card.role.is_empty() {
            "worker".to_owned()
        } else {
            card.role.clone()
        });
        self.model = Some(card.model_id.clone());
        self.model_name = Some(card.model_name.clone());
        self.tokens_per_s = card.tokens_per_s;
        self.thermal_penalty = card.thermal_penalty;
        self.weight = agent_weight(card.tokens_per_s, card.thermal_penalty);
        self.busy = card.busy;
        self.parameters = card.parameters;
    }

    /// The roles the card names that this head knows (a newer agent may name more); none
    /// for a plain worker.
    pub(super) fn parsed_roles(&self) -> Vec<Role> {
        let mut roles = Vec::new();
        for name in self.role.as_deref().unwrap_or_default().split(',') {
            match name.parse::<Role>() {
                Ok(role) if !roles.contains(&role) => roles.push(role),
                _ => {}
            }
        }
        roles
    }
}

/// `/v1/swarm/status`.
#[derive(Clone, Debug, Serialize)]
pub struct SwarmStatus {
    pub strategy: Strategy,
    pub agents: Vec<AgentStatus>,
    /// The head's own model, which aggregates when no aggregator agent is up.
    pub head_model: Option<String>,
}

/// One answer an agent gave.
#[derive(Clone, Debug, Serialize)]
pub struct AgentAnswer {
    /// Who answered: the node id (or `head`).
    pub agent: String,
    pub addr: String,
    pub role: String,
    pub model: String,
    /// What it was asked to do: `answer`, `sample`, `aggregate`, `correct`, `draft`, `classify`;
    /// for `verify`, `tests`, `hinted`, `repair`, `resample`.
    pub task: &'static str,
    pub text: String,
    pub elapsed_ms: u64,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// The chat API's response, when it was asked a whole API request (`text` is then a
    /// plain summary of it); the run's `response` is the chosen one's.
    #[serde(skip)]
    pub response: Option<String>,
}

/// An agent that was asked and did not answer.
#[derive(Clone, Debug, Serialize)]
pub struct AgentFailure {
    pub agent: String,
    pub addr: String,
    pub role: String,
    pub task: &'static str,
    pub error: String,
    /// The agent judged the request itself invalid ([`Failure::refused_request`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refused_request: bool,
    /// ... because it is longer than the agent's context ([`Failure::context_length`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub context_length: bool,
}

/// Why one job got no answer from its agent.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) message: String,
    /// The agent judged the request itself invalid (longer than its model's context, a
    /// field it cannot take): asked again it would refuse again. When every agent asked
    /// says so, the client gets a `400`, as from one node, not a `503`.
    pub(crate) refused_request: bool,
    /// The refusal was that the request is longer than the agent's model's context.
    pub(crate) context_length: bool,
}

impl Failure {
    /// An agent's refusal with its wire error code: of the request itself (the code says
    /// so, [`crate::agent::refuses_request`]), or not.
    pub(crate) fn refused(code: shoal_wire::ErrorCode, message: String) -> Self {
        Failure {
            message,
            refused_request: crate::agent::refuses_request(code),
            context_length: code == shoal_wire::ErrorCode::CONTEXT_LENGTH,
        }
    }
}

impl From<String> for Failure {
    /// A failure that is not the request's fault (a timeout, a lost connection, an empty
    /// answer).
    fn from(message: String) -> Self {
        Failure {
            message,
            refused_request: false,
            context_length: false,
        }
    }
}

/// The result of a swarm request (`/v1/swarm/query` returns it as JSON).
#[derive(Clone, Debug, Serialize)]
pub struct SwarmOutcome {
    pub query_type: QueryType,
    /// How the query type was found: `spotter` or `keywords`.
    pub classified_by: &'static str,
    pub strategy: Strategy,
    /// Every answer given, in the order they arrived.
    pub answers: Vec<AgentAnswer>,
    pub failed: Vec<AgentFailure>,
    pub final_answer: String,
    /// How the final answer was chosen.
    pub decided_by: String,
    /// The agents that answered (each once).
    pub agents_responded: Vec<String>,
    pub elapsed_ms: u64,
    /// Tokens of every prompt and answer of the run.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// For a request with a whole API request: the chosen agent's chat API response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<serde_json::Value>,
}

/// Why a swarm request got no answer at all.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("the request has no user message to answer")]
    NoQuestion,
    #[error("no swarm agent is reachable and this node has no model of its own to answer with")]
    NoAgents,
    #[error("no agent answered: {0}")]
    NoAnswer(String),
    /// Every agent the request was put to judged it invalid (too long for its model's
    /// context, say: then `context_length`, and a client hears it as from one node).
    #[error("every agent asked refused the request: {message}")]
    Refused {
        message: String,
        context_length: bool,
    },
}
