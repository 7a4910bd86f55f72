//! Outgoing links: dialling a peer with the handshake, and keeping a writer to it whose
//! incoming frames (errors, mostly) are drained by a small task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_wire::{
    Capabilities, Connection, Hello, HelloAck, Message, PeerWriter, Transport, WireError,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Dials `addr` (swarm key and deadlines from `transport`) and says hello.
pub(crate) async fn dial(
    addr: SocketAddr,
    node_id: &str,
    capabilities: Capabilities,
    transport: &Transport,
) -> Result<Connection, WireError> {
    let (conn, _ack) = dial_with_ack(addr, node_id, capabilities, transport).await?;
    Ok(conn)
}

/// [`dial`], also returning the peer's answer to the hello (its node id).
pub(crate) async fn dial_with_ack(
    addr: SocketAddr,
    node_id: &str,
    capabilities: Capabilities,
    transport: &Transport,
) -> Result<(Connection, HelloAck), WireError> {
    let hello = Hello {
        node_id: node_id.to_owned(),
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities,
    };
    transport.dial(addr, hello).await
}

/// A dialled connection used for writing; what the peer sends back goes to `on_message`, and
/// `on_close` runs once if the peer closes it or it breaks (not when the link is dropped).
pub(crate) struct Link {
    pub(crate) writer: PeerWriter,
    drain: JoinHandle<()>,
    /// Set when the peer closed the link or it broke: a write may still seem to succeed
    /// (the kernel takes the bytes before the peer's reset comes back), so a sender asks
    /// this first instead of waiting for an answer that cannot come.
    closed: Arc<AtomicBool>,
    /// When a frame was last written: the peer closes a connection silent for its idle
    /// timeout, so a link unused for long is dialled afresh or kept alive.
    written_at: Instant,
    /// How long the link may stay unused before its peer may close it
    /// ([`Transport::link_idle_timeout`]).
    idle_timeout: Duration,
}

impl Link {
    pub(crate) fn new(
        conn: Connection,
        addr: SocketAddr,
        idle_timeout: Duration,
        on_message: impl Fn(Message) + Send + 'static,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Self {
        let (mut reader, writer) = conn.into_split();
        let closed = Arc::new(AtomicBool::new(false));
        let mark = closed.clone();
        let drain = tokio::spawn(async move {
            loop {
                match reader.read_frame().await {
                    Ok(Some(msg)) => on_message(msg),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(peer = %addr, error = %e, "link closed");
                        break;
                    }
                }
            }
            mark.store(true, Ordering::Release);
            on_close();
        });
        Link {
            writer,
            drain,
            closed,
            written_at: Instant::now(),
            idle_timeout,
        }
    }

    /// How often a dialler that holds the link open pings it: a quarter of the link's idle
    /// timeout, so a ping or two may be late without the peer closing it.
    pub(crate) fn keepalive_interval(&self) -> Duration {
        self.idle_timeout / 4
    }

    /// A link unused for this long (half its idle timeout) may be closed by its peer soon,
    /// perhaps while a frame is on its way: a dialler dials afresh instead of writing on it.
    pub(crate) fn redial_after(&self) -> Duration {
        self.idle_timeout / 2
    }

    /// How long since a frame was last written on the link (or since it was dialled).
    pub(crate) fn unused_for(&self) -> Duration {
        self.written_at.elapsed()
    }

    /// Whether the peer closed the link or it broke.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Writes `msg` within `deadline`: a peer that stops reading cannot hold the link (and
    /// whoever waits for its lock) for longer. Past the deadline half a frame may be on the
    /// link, so it is marked closed: the next sender finds it so and recovers.
    pub(crate) async fn write_within(
        &mut self,
        msg: &Message,
        deadline: Duration,
    ) -> Result<(), WireError> {
        match tokio::time::timeout(deadline, self.writer.write_frame(msg)).await {
            Ok(written) => {
                if written.is_ok() {
                    self.written_at = Instant::now();
                }
                written
            }
            Err(_) => {
                self.closed.store(true, Ordering::Release);
                Err(WireError::Timeout {
                    what: "writing to a stage that stopped reading",
                    after: deadline,
                })
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

/// Links by address, dialled on first use, dialled afresh when unused for their
/// [`Link::redial_after`] (before the peer closes it as idle), and re-dialled once
/// when a write fails (the peer restarted).
///
/// Each address has its own slot: the map is locked only to find the slot, and the slot is
/// locked over its own dial and write (frames to one peer must not interleave). A peer that
/// stalls holds up only what goes to it, and for at most the transport's deadlines: a dial
/// has its connect and handshake deadlines, a write the stall deadline, after which the
/// link is dropped.
pub(crate) struct LinkPool {
    node_id: String,
    capabilities: Capabilities,
    transport: Transport,
    slots: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<Link>>>>>,
}

impl LinkPool {
    pub(crate) fn new(node_id: String, capabilities: Capabilities, transport: Transport) -> Self {
        LinkPool {
            node_id,
            capabilities,
            transport,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) async fn send(&self, addr: SocketAddr, msg: &Message) -> Result<(), WireError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(slots.entry(addr).or_default())
        };
        let mut link = slot.lock().await;
        // A link the peer closed may still take a write into the void, and one unused for
        // long may be closed by the peer while this frame is on its way: dial afresh.
        if link
            .as_ref()
            .is_some_and(|l| l.is_closed() || l.unused_for() >= l.redial_after())
        {
            *link = None;
        }
        let mut last_err = None;
        for _ in 0..2 {
            let l = match link.as_mut() {
                Some(l) => l,
                None => {
                    let (conn, ack) =
                        dial_with_ack(addr, &self.node_id, self.capabilities, &self.transport)
                            .await?;
                    let l = link.insert(Link::new(
                        conn,
                        addr,
                        self.transport.link_idle_timeout(&ack),
                        move |m| {
                            if let Message::Error(e) = m {
                                tracing::warn!(peer = %addr, error = %e.message, "peer reported an error");
                            }
                        },
                        // The next write finds out and re-dials.
                        || {},
                    ));
                    l
                }
            };
            let after = self.transport.stall_timeout;
            match tokio::time::timeout(after, l.writer.write_frame(msg)).await {
                Ok(Ok(())) => {
                    l.written_at = Instant::now();
                    return Ok(());
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "write failed; re-dialling");
                    *link = None;
                    last_err = Some(e);
                }
                Err(_) => {
                    // Half a frame may be on the link: it is unusable. A peer that stalls
                    // is not dialled again for this frame.
                    *link = None;
                    return Err(WireError::Timeout {
                        what: "writing to the peer",
                        after,
                    });
                }
            }
        }
        Err(last_err.unwrap_or(WireError::Closed {
            expected: "a writable link",
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use shoal_wire::{Forward, Limits, Payload, Want, IDLE_TIMEOUT};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test(start_paused = true)]
    async fn a_write_to_a_peer_that_stops_reading_ends_at_its_deadline_and_closes_the_link() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        // The peer never reads: the socket buffers fill, then a write waits.
        let _peer = accepted.unwrap().0;
        let conn = Connection::new(client.unwrap(), Limits::default()).unwrap();
        let mut link = Link::new(conn, addr, IDLE_TIMEOUT, |_| {}, || {});
        let n = 4096;
        let msg = Message::Forward(Forward {
            session_id: 1,
            seq: 1,
            plan_id: 1,
            positions: (0..n).collect(),
            payload: Payload::Tokens(vec![1; n as usize]),
            want: Want::Nothing,
            reply_to: addr,
            resume: None,
        });
        let deadline = Duration::from_secs(5);
        let mut written = 0;
        let result = loop {
            match link.write_within(&msg, deadline).await {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 100_000, "the socket never filled");
        };
        assert!(matches!(result, WireError::Timeout { .. }), "{result:?}");
        assert!(link.is_closed(), "a link with half a frame on it is closed");
    }

    /// A link unused for half its peer's idle timeout is dialled afresh before the next
    /// frame (its peer may be closing it as idle just then); a link in use is kept. The
    /// peer's timeout, announced in its `HelloAck`, counts where it is shorter than this
    /// node's own.
    #[tokio::test(start_paused = true)]
    async fn a_link_unused_for_long_is_dialled_afresh() {
        let peers_idle = Duration::from_secs(20);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // Counted before the handshake, so a dial has been counted when it returns.
                let _ = accepted_tx.send(());
                let mut conn = Connection::new(tcp, Limits::default()).unwrap();
                shoal_wire::server_handshake(&mut conn, |h| {
                    Ok(HelloAck {
                        node_id: format!("peer-of-{}", h.node_id),
                        software_version: "test".into(),
                        capabilities: Capabilities::STAGE,
                        idle_timeout: Some(peers_idle),
                    })
                })
                .await
                .unwrap();
                // Keep reading so the writer never stalls.
                tokio::spawn(async move { while let Ok(Some(_)) = conn.read_frame().await {} });
            }
        });
        let transport = Transport::default();
        assert!(transport.idle_timeout > peers_idle);
        let redial_after = peers_idle / 2;
        let pool = LinkPool::new("stage".into(), Capabilities::STAGE, transport.clone());
        let ping = Message::Ping(shoal_wire::Ping { nonce: 1 });
        pool.send(addr, &ping).await.unwrap();
        assert_eq!(accepted.try_recv(), Ok(()));
        // Used often enough: the same link.
        for _ in 0..4 {
            tokio::time::sleep(redial_after / 2).await;
            pool.send(addr, &ping).await.unwrap();
        }
        assert!(
            accepted.try_recv().is_err(),
            "a link in use was dialled again"
        );
        // Unused for long: a new one.
        tokio::time::sleep(redial_after).await;
        pool.send(addr, &ping).await.unwrap();
        assert_eq!(
            accepted.try_recv(),
            Ok(()),
            "a link unused for long was written on"
        );
    }
}
