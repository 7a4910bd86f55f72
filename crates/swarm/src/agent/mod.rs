//! Swarm agents over the peer protocol (design §4, issue #5): the agent side
//! ([`AgentService`], `service.rs`), which answers with its local model, and the client the
//! head uses to reach agents ([`describe`], [`ask`], `client.rs`).
//!
//! An agent is a node that runs a whole model with a role prompt. The head talks to it over
//! the same framed protocol and port as pipeline stages (`shoal-wire`):
//!
//! ```text
//! head ── Hello ─────────────────► agent      (capabilities: the agent's ack has AGENT)
//!      ◄─────────────── HelloAck ──
//!      ── Describe ──────────────►            "who are you"
//!      ◄─────────────── AgentCard ─           role, model, measured tokens/s, busy
//!      ── Ask ───────────────────►            a conversation, sampling, stop strings
//!      ◄──────── Answer or Error ──           Error.session_id = Ask.request_id
//! ```
//!
//! An `Ask` may instead carry the client's whole chat API request (tools, JSON answers…):
//! the agent answers it through its node's own chat API (`chat_api.rs`) and sends the
//! API's response back in the `Answer`.
//!
//! [`AgentService`] is the agent side. Its model runs the `Ask`s it has together on a thread
//! of its own (`generator.rs`): their decode steps share each pass of the model, so several
//! answers at once cost little more than one. While an `Ask` runs the service keeps reading
//! its connection: if the head closes it (it timed out, was killed, or dropped the request)
//! the generation stops between prefill chunks or decode steps and leaves the others. A
//! killed head must not keep an agent busy for `max_tokens` of nobody's text. `Ask`s that
//! carry a whole chat API request go through the node's API one at a time (a semaphore with
//! one permit, fair, so they queue in arrival order).
//!
//! [`describe`] and [`ask`] are the head's side: each dials a fresh connection, so that
//! dropping the call — or its timeout firing — closes that connection, which is exactly what
//! stops the agent's work. A fresh TCP connection on a LAN costs well under a millisecond, far
//! below one decode step.

mod chat_api;
mod client;
mod generator;
mod service;

pub use chat_api::{ApiRefusal, ChatApi};
pub use client::{ask, describe, refuses_request, AgentError, Caller};
pub use service::{measure_decode_speed, AgentConfig, AgentService, Refused};

/// This build's release, sent in handshakes.
const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
