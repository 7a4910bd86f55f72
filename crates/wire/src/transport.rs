//! How a node reaches its peers and lets them reach it: the swarm key (or none), the frame
//! limits, and a deadline on every step that waits for the other side.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::connection::Connection;
use crate::error::WireError;
use crate::frame::Limits;
use crate::handshake::client_handshake;
use crate::key::SwarmKey;
use crate::message::{Hello, HelloAck};
use crate::secure::PeerStream;

/// Default deadline for a TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default deadline for a whole handshake (the swarm key's, then `Hello`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default longest stall inside a frame, either way.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest silence on an accepted connection past its handshake.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The shortest idle timeout a dialler believes of its peer ([`Transport::link_idle_timeout`]).
pub const MIN_LINK_IDLE_TIMEOUT: Duration = Duration::from_millis(100);

/// Everything about peer connections that both sides must agree on, or that bounds how long
/// this node waits for a peer.
#[derive(Clone, Debug)]
pub struct Transport {
    /// The swarm key: with one, every connection is authenticated and encrypted; without,
    /// connections are plain (a node only listens on loopback then).
    pub key: Option<SwarmKey>,
    /// Frame limits.
    pub limits: Limits,
    /// Longest wait for a TCP connect.
    pub connect_timeout: Duration,
    /// Longest wait for the handshakes of a new connection, either side.
    pub handshake_timeout: Duration,
    /// Longest stall inside a frame, reading one that has begun to arrive or writing one.
    pub stall_timeout: Duration,
    /// An accepted connection with no message for this long is closed, so connections whose
    /// other end went away without a word (a laptop put to sleep, a cable pulled: TCP never
    /// learns of it) do not hold their slots for ever. This node announces it in its
    /// [`HelloAck`], and a dialler keeps each link it holds open by the shorter of its own
    /// and its peer's ([`Transport::link_idle_timeout`]): a head pings its stages every
    /// quarter of that, and a link pool dials afresh rather than write on a link unused for
    /// half of it. Nodes of one cluster may so be set differently.
    pub idle_timeout: Duration,
}

impl Default for Transport {
    /// No key, default limits and deadlines.
    fn default() -> Self {
        Transport {
            key: None,
            limits: Limits::default(),
            connect_timeout: CONNECT_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

impl Transport {
    /// Default limits and deadlines, with this key (or none).
    pub fn with_key(key: Option<SwarmKey>) -> Self {
        Transport {
            key,
            ..Transport::default()
        }
    }

    /// How long a link dialled to the peer that answered `ack` may stay unused before the
    /// peer may close it: the shorter of the peer's announced idle timeout and this node's
    /// own (which a dialler keeps to even with a peer that never closes: firewalls and NATs
    /// forget quiet connections too). A peer's figure under [`MIN_LINK_IDLE_TIMEOUT`] counts
    /// as that, so a peer cannot make this node ping it in a busy loop.
    pub fn link_idle_timeout(&self, ack: &HelloAck) -> Duration {
        ack.idle_timeout.map_or(self.idle_timeout, |theirs| {
            theirs.max(MIN_LINK_IDLE_TIMEOUT).min(self.idle_timeout)
        })
    }

    /// Dials `addr`, runs the swarm-key handshake (when there is a key) and says `hello`;
    /// returns the connection and the peer's answer. Every step has its deadline.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        hello: Hello,
    ) -> Result<(Connection, HelloAck), WireError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| WireError::Timeout {
                what: "connecting",
                after: self.connect_timeout,
            })??;
        let handshake = async {
            let mut conn = self.secure(tcp, Side::Dialler).await?;
            let ack = client_handshake(&mut conn, hello).await?;
            Ok((conn, ack))
        };
        tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| WireError::Timeout {
                what: "for the handshake",
                after: self.handshake_timeout,
            })?
    }

    /// The acceptor's side of the swarm-key handshake on an accepted socket (no deadline
    /// here: the server applies it around this and the `Hello`).
    pub(crate) async fn accept(&self, tcp: TcpStream) -> Result<Connection, WireError> {
        self.secure(tcp, Side::Acceptor).await
    }

    async fn secure(&self, tcp: TcpStream, side: Side) -> Result<Connection, WireError> {
        tcp.set_nodelay(true)?;
        let stream = match (&self.key, side) {
            (None, _) => PeerStream::plain(tcp),
            (Some(key), Side::Dialler) => PeerStream::initiate(tcp, key).await?,
            (Some(key), Side::Acceptor) => PeerStream::respond(tcp, key).await?,
        };
        let mut conn = Connection::over(stream, self.limits)?;
        conn.set_stall_timeout(Some(self.stall_timeout));
        Ok(conn)
    }
}

#[derive(Clone, Copy)]
enum Side {
    Dialler,
    Acceptor,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Capabilities;

    fn ack(idle_timeout: Option<Duration>) -> HelloAck {
        HelloAck {
            node_id: "peer".into(),
            software_version: String::new(),
            capabilities: Capabilities::STAGE,
            idle_timeout,
        }
    }

    /// A link is kept by the shorter of the two ends' idle timeouts; a peer that closes
    /// nothing still gets this node's own, and one announcing next to nothing the floor.
    #[test]
    fn a_link_is_kept_alive_by_the_shorter_idle_timeout() {
        let mine = Transport::default();
        let secs = Duration::from_secs;
        assert_eq!(mine.link_idle_timeout(&ack(Some(secs(20)))), secs(20));
        assert_eq!(mine.link_idle_timeout(&ack(Some(secs(600)))), IDLE_TIMEOUT);
        assert_eq!(mine.link_idle_timeout(&ack(None)), IDLE_TIMEOUT);
        assert_eq!(
            mine.link_idle_timeout(&ack(Some(Duration::from_millis(1)))),
            MIN_LINK_IDLE_TIMEOUT
        );
    }
}
