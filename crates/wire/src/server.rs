//! Accepting peers: one task per connection, so a peer that misbehaves loses its own connection
//! and nothing else (mini-redis `server.rs`); and the one life every served connection has —
//! the handshakes (swarm key, then `Hello`) under a deadline, then each message to a
//! [`PeerService`] until the peer closes.
//!
//! Two bounds keep a flood of connections from freezing a node (issue #14). Connections still
//! in their handshake are few ([`ServeConfig::max_handshakes`]) and short-lived (the
//! transport's handshake deadline); when a new one arrives and they are all taken, the oldest
//! is dropped, so silent sockets can delay a real peer by one handshake at most, never lock it
//! out. Connections past the handshake — peers that proved they hold the swarm key — are
//! capped at [`ServeConfig::max_connections`] in all and [`ServeConfig::max_per_address`]
//! from one IP address, so one device cannot take every slot; one over a cap is told
//! `OVERLOADED`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::connection::Connection;
use crate::error::WireError;
use crate::handshake::server_handshake;
use crate::message::{ErrorCode, ErrorMessage, Hello, HelloAck, Message};
use crate::transport::Transport;

/// How [`serve_peers`] accepts peers.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The swarm key, frame limits and deadlines for every connection.
    pub transport: Transport,
    /// Most connections served at once past their handshake.
    pub max_connections: usize,
    /// Most of those from one IP address.
    pub max_per_address: usize,
    /// Most connections in their handshake at once; a new one past this drops the oldest.
    pub max_handshakes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            transport: Transport::default(),
            max_connections: 256,
            max_per_address: 64,
            max_handshakes: 64,
        }
    }
}

impl ServeConfig {
    /// The defaults, over `transport`.
    pub fn over(transport: Transport) -> Self {
        ServeConfig {
            transport,
            ..ServeConfig::default()
        }
    }
}

/// Connections past their handshake, counted by IP address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

impl PerAddress {
    /// A slot for one more connection from `ip`, or `None` when it has `max` already.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(ip).or_insert(0);
        if *count >= max.max(1) {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: Arc::clone(self),
            ip,
        })
    }
}

/// One connection's place in [`PerAddress`], given back when it ends.
struct AddressSlot {
    counts: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Who is at the other end of an accepted connection: its address, and the node id its
/// `Hello` gave (proven only to be a member's, by the swarm key, where there is one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePeer {
    pub addr: SocketAddr,
    pub node_id: String,
}

impl std::fmt::Display for RemotePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.node_id, self.addr)
    }
}

/// What a listener does for its peers: answers their handshake, then handles each message
/// they send. Every peer port (a node's, a stage server's, an agent's, a head's reply
/// listener) is one of these under [`serve_peers`].
pub trait PeerService: Send + Sync + 'static {
    /// The answer to a peer's [`Hello`]: accept it with a [`HelloAck`], or refuse it.
    fn accept(&self, hello: &Hello) -> Result<HelloAck, ErrorMessage>;

    /// Handles one message of an accepted connection, replying on `conn` if it calls for
    /// it. An error ends this connection (a peer that broke the protocol is told why first)
    /// and no other.
    fn handle(
        &self,
        msg: Message,
        conn: &mut Connection,
        peer: &RemotePeer,
    ) -> impl Future<Output = Result<(), WireError>> + Send;
}

/// Accepts connections on `listener` until `shutdown` completes, serving each with `service`
/// in its own task.
///
/// An `Err` of a connection is logged with the peer's address and affects no other
/// connection; a handler that panics takes down only its own task. On shutdown the loop stops
/// accepting and aborts the connections still open: ring links are long-lived, and a head
/// that loses a stage re-plans rather than waiting for it.
pub async fn serve_peers<S: PeerService>(
    listener: TcpListener,
    config: ServeConfig,
    service: Arc<S>,
    shutdown: impl Future<Output = ()>,
) {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    // One sender per connection still in its handshake, oldest first: sending on it (or
    // dropping it) ends that handshake.
    let mut handshaking: VecDeque<oneshot::Sender<()>> = VecDeque::new();
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        // Reap finished connection tasks so the set does not grow without bound.
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                if e.is_panic() {
                    tracing::error!("a wire connection handler panicked");
                }
            }
        }
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a wire connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        handshaking.retain(|evict| !evict.is_closed());
        if handshaking.len() >= config.max_handshakes.max(1) {
            if let Some(oldest) = handshaking.pop_front() {
                let _ = oldest.send(());
            }
        }
        let (evict, evicted) = oneshot::channel();
        handshaking.push_back(evict);
        let (service, config, permits, per_address) = (
            Arc::clone(&service),
            Arc::clone(&config),
            Arc::clone(&permits),
            Arc::clone(&per_address),
        );
        tasks.spawn(async move {
            let slots = Slots {
                permits: &permits,
                per_address: &per_address,
            };
            let result = serve_one(&*service, &config, slots, stream, peer, evicted).await;
            match result {
                Ok(()) => tracing::debug!(%peer, "wire connection closed"),
                Err(e) if e.is_protocol_violation() => {
                    tracing::warn!(%peer, error = %e, "closed a wire connection that broke the protocol");
                }
                Err(e) => tracing::info!(%peer, error = %e, "wire connection ended"),
            }
        });
    }
    tasks.shutdown().await;
}

/// The caps a connection must find room under once its handshakes are done.
#[derive(Clone, Copy)]
struct Slots<'a> {
    permits: &'a Arc<Semaphore>,
    per_address: &'a Arc<PerAddress>,
}

/// One accepted connection's life: the handshakes (ended early if evicted), a permit, then
/// every message to `service` until the peer closes the connection (`Ok`) or something fails
/// (the error, after the peer was told when it broke the protocol).
async fn serve_one<S: PeerService>(
    service: &S,
    config: &ServeConfig,
    slots: Slots<'_>,
    stream: TcpStream,
    peer: SocketAddr,
    evicted: oneshot::Receiver<()>,
) -> Result<(), WireError> {
    let deadline = config.transport.handshake_timeout;
    let opening = tokio::time::timeout(deadline, open(service, &config.transport, stream));
    let (conn, hello) = tokio::select! {
        opened = opening => opened.map_err(|_| WireError::Timeout {
            what: "for the peer's handshake",
            after: deadline,
        })??,
        _ = evicted => {
            return Err(WireError::Timeout {
                what: "for the peer's handshake (dropped for a newer connection)",
                after: deadline,
            })
        }
    };
    let permit = Arc::clone(slots.permits).try_acquire_owned();
    let slot = slots.per_address.take(peer.ip(), config.max_per_address);
    let busy = match (&permit, &slot) {
        (Err(_), _) => Some(format!(
            "this node serves {} peer connections already; try again later",
            config.max_connections
        )),
        (_, None) => Some(format!(
            "this node serves {} peer connections from {} already; try again later",
            config.max_per_address,
            peer.ip()
        )),
        _ => None,
    };
    if let Some(busy) = busy {
        let busy = ErrorMessage::new(ErrorCode::OVERLOADED, None, busy);
        let mut conn = conn;
        let _ = conn.write_frame(&Message::Error(busy)).await;
        return Ok(());
    }
    let peer = RemotePeer {
        addr: peer,
        node_id: hello.node_id,
    };
    let mut conn = conn;
    conn.set_idle_timeout(Some(config.transport.idle_timeout));
    serve_messages(service, conn, &peer).await
}

/// The swarm-key handshake, then the `Hello` answered by `service`.
async fn open<S: PeerService>(
    service: &S,
    transport: &Transport,
    stream: TcpStream,
) -> Result<(Connection, Hello), WireError> {
    let mut conn = transport.accept(stream).await?;
    // The dialler keeps the link alive by this node's idle timeout (`serve_one` sets it).
    let answer = |hello: &Hello| {
        service.accept(hello).map(|ack| HelloAck {
            idle_timeout: Some(transport.idle_timeout),
            ..ack
        })
    };
    match server_handshake(&mut conn, answer).await {
        Ok(hello) => Ok((conn, hello)),
        Err(e) => Err(conn.fail(e).await),
    }
}

/// Every message of an open connection to `service`, until the peer closes it, something
/// fails, or it stays silent between messages for the connection's idle timeout (the time
/// a message takes to handle does not count: the wait is for the next one).
async fn serve_messages<S: PeerService>(
    service: &S,
    mut conn: Connection,
    peer: &RemotePeer,
) -> Result<(), WireError> {
    loop {
        let msg = match conn.read_frame().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(()),
            Err(e) => return Err(conn.fail(e).await),
        };
        if let Err(e) = service.handle(msg, &mut conn, peer).await {
            return Err(conn.fail(e).await);
        }
    }
}
