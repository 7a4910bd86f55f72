//! Swarm mode (design §4, issue #5): every agent runs a whole model with a role; the head
//! classifies a query, fans it out to the agents the routing table picks, and combines their
//! answers by an aggregator (mixture-of-agents), a vote, confidence, or the fastest answer.
//!
//! - [`roles`]: the roles and their system prompts, in one table.
//! - [`classify`]: query types and the keyword classifier (the spotter agent's answer is
//!   parsed here too).
//! - [`routing`]: which roles answer which query type, and the timeouts per type.
//! - [`vote`]: final-answer extraction, majority and similarity votes, self-agreement.
//! - [`weight`]: an agent's weight from its speed and the device's thermal state.
//! - [`agent`]: the agent side of the peer protocol (answers `Describe` and `Ask` with its
//!   local model) and the client the head uses to reach agents.
//! - [`head`]: [`Swarm`], the head: agents' status, classification, fan-out, strategies.

pub use head::{Swarm, SwarmConfig, SwarmError, SwarmOutcome, SwarmRequest, SwarmStatus};
pub use vote::CodeChecks;

pub mod agent;
pub mod classify;
pub mod head;
pub mod roles;
pub mod routing;
pub mod verify;
pub mod vote;
pub mod weight;
