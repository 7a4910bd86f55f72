//! The head's side: reaching an agent over a fresh connection per request.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_wire::{
    AgentCard, Answer, Ask, Capabilities, Describe, ErrorCode, Hello, Message, Transport, WireError,
};

use super::SOFTWARE_VERSION;

/// What can go wrong reaching an agent from the head. Each message names the agent and says
/// what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The TCP connection could not be made.
    #[error(
        "cannot connect to agent {addr}: {source} (is `shoal serve --peer-port` running there, \
         and is the port reachable?)"
    )]
    Connect {
        /// The agent's peer address.
        addr: SocketAddr,
        /// Why the connect failed.
        source: std::io::Error,
    },
    /// The agent did not answer in time; the connection was closed, which stops its work.
    #[error(
        "agent {addr} did not answer {what} within {} ms (busy or slow; the request was \
         abandoned and the agent told so by closing the connection)",
        .timeout.as_millis()
    )]
    Timeout {
        /// The agent's peer address.
        addr: SocketAddr,
        /// Which request timed out (`"Describe"`, `"Ask"`).
        what: &'static str,
        /// The time allowed.
        timeout: Duration,
    },
    /// The agent and this head do not share the swarm key.
    #[error("agent {addr} is not in this swarm: {source} (give every node the same --swarm-key)")]
    Unauthorized {
        /// The agent's peer address.
        addr: SocketAddr,
        /// The refused handshake.
        source: WireError,
    },
    /// The peer answered the handshake but is not a swarm agent.
    #[error(
        "the peer at {addr} (node {node_id}) is not a swarm agent (start it with \
         `shoal serve --peer-port`, or remove it from the swarm's peers)"
    )]
    NotAnAgent {
        /// The peer's address.
        addr: SocketAddr,
        /// The node id it announced.
        node_id: String,
    },
    /// The agent refused the request with an `Error`.
    #[error("agent {addr} refused: {message} (code {code})")]
    Remote {
        /// The agent's peer address.
        addr: SocketAddr,
        /// The agent's error code.
        code: ErrorCode,
        /// The agent's explanation.
        message: String,
    },
    /// The connection failed or closed before the answer arrived (the agent crashed or
    /// restarted).
    #[error("agent {addr} went away before answering: {source}")]
    Disconnected {
        /// The agent's peer address.
        addr: SocketAddr,
        /// The socket error or the early close.
        source: WireError,
    },
    /// The agent broke the protocol (a different shoal release, or not a shoal peer).
    #[error(
        "protocol error talking to agent {addr}: {source} (run the same shoal release on every \
         node)"
    )]
    Protocol {
        /// The agent's peer address.
        addr: SocketAddr,
        /// What was wrong.
        source: WireError,
    },
    /// The `Ask` itself is not valid and was not sent.
    #[error("invalid Ask, not sent: {0}")]
    InvalidRequest(#[source] WireError),
}

impl AgentError {
    /// Whether the agent judged the request itself invalid (longer than its model's
    /// context, a field it cannot take): asked again, it would refuse again.
    pub fn refused_request(&self) -> bool {
        matches!(self, AgentError::Remote { code, .. } if refuses_request(*code))
    }

    /// Whether the refusal was that the request is longer than the agent's context.
    pub fn context_length(&self) -> bool {
        matches!(self, AgentError::Remote { code, .. } if *code == ErrorCode::CONTEXT_LENGTH)
    }
}

/// Whether an agent's error code says the request itself is at fault: asked again, or of
/// another agent of the same kind, it would be refused again.
pub fn refuses_request(code: ErrorCode) -> bool {
    code == ErrorCode::BAD_REQUEST || code == ErrorCode::CONTEXT_LENGTH
}

/// How the head reaches its agents: its node id (for the handshake) and the transport (the
/// swarm key and deadlines).
#[derive(Clone, Debug)]
pub struct Caller {
    /// The head's node id.
    pub node_id: String,
    /// The swarm key, frame limits and deadlines.
    pub transport: Transport,
}

/// Asks the agent at `addr` who it is. The whole exchange (connect included) must finish
/// within `timeout`.
pub async fn describe(
    addr: SocketAddr,
    caller: &Caller,
    timeout: Duration,
) -> Result<AgentCard, AgentError> {
    let exchange = async {
        match request(addr, caller, &Message::Describe(Describe), "AgentCard").await? {
            Message::AgentCard(card) => Ok(card),
            other => Err(unexpected(addr, "AgentCard", &other)),
        }
    };
    within(addr, "Describe", timeout, exchange).await
}

/// Puts `ask` to the agent at `addr` and returns its answer. The whole exchange (connect
/// included) must finish within `timeout`; when it does not, or when this future is dropped,
/// the connection closes and the agent stops generating.
pub async fn ask(
    addr: SocketAddr,
    caller: &Caller,
    ask: Ask,
    timeout: Duration,
) -> Result<Answer, AgentError> {
    let request_id = ask.request_id;
    let msg = Message::Ask(ask);
    msg.validate().map_err(AgentError::InvalidRequest)?;
    let exchange = async {
        match request(addr, caller, &msg, "Answer").await? {
            Message::Answer(answer) if answer.request_id == request_id => Ok(answer),
            Message::Answer(answer) => Err(AgentError::Protocol {
                addr,
                source: WireError::Invalid {
                    message: "Answer",
                    what: "request_id",
                    detail: format!("is {}, expected {request_id}", answer.request_id),
                },
            }),
            other => Err(unexpected(addr, "Answer", &other)),
        }
    };
    within(addr, "Ask", timeout, exchange).await
}

async fn within<T>(
    addr: SocketAddr,
    what: &'static str,
    timeout: Duration,
    exchange: impl Future<Output = Result<T, AgentError>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(AgentError::Timeout {
            addr,
            what,
            timeout,
        }),
    }
}

/// Dials, shakes hands, sends `msg` and returns the reply; an `Error` reply becomes
/// [`AgentError::Remote`].
async fn request(
    addr: SocketAddr,
    caller: &Caller,
    msg: &Message,
    expected: &'static str,
) -> Result<Message, AgentError> {
    let hello = Hello {
        node_id: caller.node_id.clone(),
        software_version: SOFTWARE_VERSION.to_owned(),
        capabilities: Capabilities::HEAD,
    };
    let (mut conn, ack) = caller
        .transport
        .dial(addr, hello)
        .await
        .map_err(|e| match e {
            WireError::Io(source) => AgentError::Connect { addr, source },
            // Connected (the kernel accepts for a stopped process too), but no handshake.
            WireError::Timeout { after, .. } => AgentError::Timeout {
                addr,
                what: "the handshake",
                timeout: after,
            },
            e => wire(addr, e),
        })?;
    if !ack.capabilities.contains(Capabilities::AGENT) {
        return Err(AgentError::NotAnAgent {
            addr,
            node_id: ack.node_id,
        });
    }
    conn.write_frame(msg).await.map_err(|e| wire(addr, e))?;
    match conn.read_frame().await {
        Ok(Some(Message::Error(e))) => Err(AgentError::Remote {
            addr,
            code: e.code,
            message: e.message,
        }),
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(AgentError::Disconnected {
            addr,
            source: WireError::Closed { expected },
        }),
        Err(e) => Err(wire(addr, e)),
    }
}

/// Sorts a wire error into the agent error a person can act on.
fn wire(addr: SocketAddr, e: WireError) -> AgentError {
    match e {
        WireError::Handshake { .. } | WireError::KeyedPeer => {
            AgentError::Unauthorized { addr, source: e }
        }
        WireError::Remote { code, .. } if code == ErrorCode::UNAUTHORIZED => {
            AgentError::Unauthorized { addr, source: e }
        }
        WireError::Remote { code, message } => AgentError::Remote {
            addr,
            code,
            message,
        },
        e if e.is_protocol_violation() => AgentError::Protocol { addr, source: e },
        e => AgentError::Disconnected { addr, source: e },
    }
}

fn unexpected(addr: SocketAddr, expected: &'static str, got: &Message) -> AgentError {
    AgentError::Protocol {
        addr,
        source: WireError::UnexpectedMessage {
            expected,
            got: got.name(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_errors_are_sorted() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            wire(
                addr,
                WireError::Remote {
                    code: ErrorCode::BAD_REQUEST,
                    message: "no".into()
                }
            ),
            AgentError::Remote { .. }
        ));
        assert!(matches!(
            wire(addr, WireError::Closed { expected: "Answer" }),
            AgentError::Disconnected { .. }
        ));
        assert!(matches!(
            wire(addr, WireError::BadMagic { found: vec![1] }),
            AgentError::Protocol { .. }
        ));
    }
}
