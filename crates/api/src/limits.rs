//! What one client may ask of a node's HTTP API, and how long it may take to ask (issue
//! #14): the limits llama-server and a reverse proxy in front of it would give.

use std::time::Duration;

/// The HTTP API's limits. Every one is a `serve` flag (README, "The API").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Generations waiting for the engine at most; a request past this is answered `429`
    /// with `Retry-After` at once instead of queueing without end.
    pub max_queue: usize,
    /// A streaming client that does not take the next piece of its answer for this long
    /// is dropped and its generation stopped, so it cannot hold the engine.
    pub client_stall_timeout: Duration,
    /// Longest a client may take to send a request's headers, and then its body.
    pub request_read_timeout: Duration,
    /// Stop strings one request may give.
    pub max_stop: usize,
    /// Bytes of one stop string.
    pub max_stop_len: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_queue: 64,
            client_stall_timeout: Duration::from_secs(30),
            request_read_timeout: Duration::from_secs(30),
            max_stop: 16,
            max_stop_len: 256,
        }
    }
}

/// What a client told to retry waits, in seconds (`Retry-After`).
pub(crate) const RETRY_AFTER_S: u64 = 5;
