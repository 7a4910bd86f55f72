//! Who is asked: a remote agent, or the head's own model.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::agent::AgentService;
use crate::roles::Role;

/// Who is asked: a remote agent, or the head's own model.
#[derive(Clone)]
pub(super) enum Target {
    Remote {
        index: usize,
        addr: SocketAddr,
        name: String,
        role: Option<Role>,
        /// The role's prompt, sent with every request that does not bring its own, for an
        /// agent that serves several roles (it has no one prompt of its own).
        role_prompt: Option<String>,
        model: String,
        weight: f32,
        parameters: u64,
        /// Measured decode speed (0: not measured).
        tokens_per_s: f32,
    },
    Local {
        service: Arc<AgentService>,
        weight: f32,
    },
}

impl Target {
    pub(super) fn name(&self) -> String {
        match self {
            Target::Remote { name, .. } => name.clone(),
            Target::Local { .. } => "head".to_owned(),
        }
    }

    pub(super) fn addr(&self) -> String {
        match self {
            Target::Remote { addr, .. } => addr.to_string(),
            Target::Local { .. } => "local".to_owned(),
        }
    }

    pub(super) fn role(&self) -> Option<Role> {
        match self {
            Target::Remote { role, .. } => *role,
            Target::Local { .. } => None,
        }
    }

    pub(super) fn role_name(&self) -> String {
        self.role()
            .map(|r| r.as_str().to_owned())
            .unwrap_or_else(|| "worker".to_owned())
    }

    pub(super) fn model(&self) -> String {
        match self {
            Target::Remote { model, .. } => model.clone(),
            Target::Local { service, .. } => service.config().model_id.clone(),
        }
    }

    pub(super) fn weight(&self) -> f32 {
        match self {
            Target::Remote { weight, .. } | Target::Local { weight, .. } => *weight,
        }
    }

    /// Measured decode speed, tokens per second (0: not measured).
    pub(super) fn tokens_per_s(&self) -> f32 {
        match self {
            Target::Remote { tokens_per_s, .. } => *tokens_per_s,
            Target::Local { service, .. } => service.card().tokens_per_s,
        }
    }

    pub(super) fn parameters(&self) -> u64 {
        match self {
            Target::Remote { parameters, .. } => *parameters,
            Target::Local { service, .. } => service.model().parameters(),
        }
    }
}

/// A parameter count in words: `1.54 B parameters`.
pub(super) fn billions(parameters: u64) -> String {
    if parameters == 0 {
        return "size unknown".to_owned();
    }
    format!("{:.2} B parameters", parameters as f64 / 1e9)
}
