//! Model-written code: finding it in a reply ([`fenced_blocks`]), and running it where it can
//! do no harm ([`Sandbox`]).
//!
//! Everything in Shoal that runs code a model wrote goes through here: the swarm's vote
//! checks candidates against a prompt's examples, and `shoal eval` runs answers with a
//! benchmark's tests. One parser decides what the code of a reply is, and one runner decides
//! what that code may do, so tightening either tightens every use.

mod fence;
mod python;

pub use fence::{fenced_blocks, is_python, FencedBlock};
pub use python::{
    Execution, Isolation, Node, Sandbox, SandboxError, MAX_PROCESSES, STDOUT_TAIL_BYTES, TAIL_BYTES,
};
