//! Accepting peers: one task per connection, so a peer that misbehaves loses its own connection
//! and nothing else (mini-redis `server.rs`); and the one life every served connection has —
//! the handshake, then each message to a [`PeerService`] until the peer closes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::connection::Connection;
use crate::error::WireError;
use crate::frame::Limits;
use crate::handshake::server_handshake;
use crate::message::{ErrorMessage, Hello, HelloAck, Message};

/// How [`serve_connections`] accepts peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Frame limits for every connection.
    pub limits: Limits,
    /// Most connections served at once; further peers wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            limits: Limits::default(),
            max_connections: 256,
        }
    }
}

/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` until `shutdown` completes, running `handler` on each in
/// its own task with `TCP_NODELAY` set.
///
/// The connection closes when its handler returns. An `Err` is logged with the peer's address
/// and affects no other connection; a handler that panics takes down only its own task. On
/// shutdown the loop stops accepting and aborts the connections still open: ring links are
/// long-lived, and a head that loses a stage re-plans rather than waiting for it.
pub async fn serve_connections<H, F>(
    listener: TcpListener,
    config: ServeConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Connection, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), WireError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Take a permit before accepting, so a flood of peers waits in the backlog instead of
        // costing a task and a buffer each.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
        };
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
        let conn = match Connection::new(stream, config.limits) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "setting up a wire connection failed");
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tasks.spawn(async move {
            let _permit = permit;
            match handler(conn, peer).await {
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
        peer: SocketAddr,
    ) -> impl Future<Output = Result<(), WireError>> + Send;
}

/// Serves `service` on `listener` until `shutdown` (see [`serve_connections`]).
pub async fn serve_peers<S: PeerService>(
    listener: TcpListener,
    config: ServeConfig,
    service: Arc<S>,
    shutdown: impl Future<Output = ()>,
) {
    serve_connections(
        listener,
        config,
        move |conn, peer| {
            let service = Arc::clone(&service);
            async move { serve_peer_connection(&*service, conn, peer).await }
        },
        shutdown,
    )
    .await;
}

/// One accepted connection's life: the handshake, then every message to `service` until the
/// peer closes the connection (`Ok`) or something fails (the error, after the peer was told
/// when it broke the protocol).
pub async fn serve_peer_connection<S: PeerService>(
    service: &S,
    mut conn: Connection,
    peer: SocketAddr,
) -> Result<(), WireError> {
    if let Err(e) = server_handshake(&mut conn, |hello| service.accept(hello)).await {
        return Err(conn.fail(e).await);
    }
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
