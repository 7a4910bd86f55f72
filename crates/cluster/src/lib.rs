//! What a node knows about the cluster: its members and whether they are alive ([`Roster`],
//! kept by heartbeats: [`heartbeat`]), the peers a head talks to ([`Membership`]), and where
//! a model's layers should go (the placement planner).
//!
//! # Members
//!
//! The [`Roster`] is the cluster as this node sees it: every node it has exchanged an
//! authenticated heartbeat with, alive, suspect or dead by how long it has been silent, and
//! the addresses still being tried (static peers, joins, mDNS answers, other members' gossip).
//! [`heartbeat::run_heartbeats`] keeps it; `GET /v1/cluster` shows it.
//!
//! # Peers of a head
//!
//! One [`Membership`] per set of peers a node talks to: every contact that works or fails
//! is recorded there, and whoever needs the live peers asks it (the swarm head for its
//! agents, the pipeline head when it re-plans after a loss).
//!
//! # Placement
//!
//! The planner is a pure function: node profiles, the model's shape and the measured
//! one-way link costs go in; a [`Plan`] comes out (or a [`PlanError`] that says what is
//! wrong). It does no I/O, knows nothing of the engine or the network, and never panics
//! on bad input.
//!
//! ## Model of the ring
//!
//! A plan is a ring `head → stage → … → last stage → head`: stage `i` runs layers
//! `[a_i, a_{i+1})` on node `s_i`, the head (node 0) always runs the first stage
//! (it owns the embedding and the session), and the last stage sends the sampled token
//! back to the head. With `k` stages a token costs `k` hops (a one-stage plan has none).
//!
//! - A stage of `c` layers on node `n` costs `c × decode_ms_per_layer(n)` per token, plus
//!   its outgoing hop `links[n][next]` (the last stage's hop returns to the head).
//! - It needs `c × (layer_bytes + kv_bytes_per_layer)` bytes, plus `embed_bytes` on the
//!   first stage and `head_bytes` on the last (a one-stage plan needs both), and that
//!   must not exceed the node's free memory. Every stage has at least one layer; every
//!   node appears at most once.
//!
//! Objectives ([`Objective`]):
//! - **Latency** (one stream): minimise `Σ c_i·d_i + Σ hops` — the predicted time per
//!   token. Ties: fewer stages, then the lower slowest stage.
//! - **Throughput** (many streams): minimise the slowest stage `max_i (c_i·d_i + h_i)`;
//!   ties broken by latency, then fewer stages.
//!
//! ## Algorithm
//!
//! The search is split in two: choose the ring (which peers, in which order), then split
//! the layers optimally over that ring.
//!
//! **Split for a fixed ring** of `k` stages with capacities `cap_i` (how many layers fit
//! next to the stage's extras), decode costs `d_i` and hops `h_i`:
//! - Latency: the hops are fixed by the ring, so minimise `Σ c_i d_i` with
//!   `1 ≤ c_i ≤ cap_i`, `Σ c_i = L`. Give every stage its one compulsory layer, then
//!   pour the rest into the fastest stages first, each up to its capacity. This greedy is
//!   optimal (an exchange argument: moving a layer from a faster to a slower stage never
//!   helps). `O(k log k)`.
//! - Throughput: every stage's time is increasing in its layer count, so the minimum
//!   bottleneck `T*` is found by handing out the `L − k` free layers one by one to the
//!   stage whose time after taking it is smallest (the chosen "slots" are then the
//!   `L − k` smallest of all slot times, which minimises the largest). `O(L log k)`. Then,
//!   for the latency tie-break, each stage is capped at the most layers that keep it
//!   within `T*` and the latency greedy above fills those caps.
//!
//! **Choice of the ring.** With at most [`PlanOptions::max_exact_nodes`] nodes
//! (default 8) the planner is exact: it enumerates every ordered selection of the usable
//! peers after the head (all subsets, all orders — hop costs make order matter), at
//! most `Σ_{j≤P} P!/(P−j)!` rings for `P` peers (13,700 for 7 peers), each split as
//! above: `O(13,700 · (k log k + L log k))`, a few milliseconds for 8 nodes.
//!
//! Beyond that it is a heuristic, and the plan says so ([`Search::Heuristic`]): it runs
//! the exact search over three shortlists of `max_exact_nodes − 1` peers (fastest per
//! layer, closest round trip to the head, most memory), adds a ring built to fit the
//! model whenever one exists (head, the roomiest peers, the best last stage), then
//! improves the best of these by steepest-descent local search over the whole cluster
//! (insert, remove, replace, swap, move and reverse stages; each neighbour split
//! exactly). It is sound: it returns a plan that satisfies every constraint whenever one
//! exists, never a worse plan than its seeds, but not necessarily the optimum.
//!
//! Feasibility is decided exactly before any search (the most layers any ring can hold
//! is the head's first-stage capacity, plus every other usable peer's middle capacity,
//! plus the best last stage), so an impossible cluster gets an error that says how much
//! is missing.
//!
//! Forced splits (`--split 0-9,10-19,20-29`) are checked and costed by
//! [`validate_split`]; [`parse_split`] reads the flag's text.

pub mod discovery;
mod error;
mod explain;
pub mod heartbeat;
mod membership;
mod planner;
mod roster;
mod split;
mod types;

pub use error::PlanError;
pub use membership::{Member, MemberState, Membership};
pub use planner::{plan, plan_with_options, PlanOptions, DEFAULT_MAX_EXACT_NODES};
pub use roster::{DetectorConfig, Liveness, MemberView, Roster, RosterError, RosterView, Source};
pub use split::{check_tiling, parse_split, validate_split, validate_stages, TilingError};
pub use types::{
    uniform_links, LeftOut, LeftOutReason, ModelShape, NodeProfile, Objective, Plan, Prediction,
    Search, StagePlan,
};
