//! Outgoing links: dialling a peer with the handshake, and keeping a writer to it whose
//! incoming frames (errors, mostly) are drained by a small task.

use std::collections::HashMap;
use std::net::SocketAddr;

use shoal_wire::{Capabilities, Connection, Hello, Message, PeerWriter, Transport, WireError};
use tokio::task::JoinHandle;

/// Dials `addr` (swarm key and deadlines from `transport`) and says hello.
pub(crate) async fn dial(
    addr: SocketAddr,
    node_id: &str,
    capabilities: Capabilities,
    transport: &Transport,
) -> Result<Connection, WireError> {
    let hello = Hello {
        node_id: node_id.to_owned(),
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities,
    };
    let (conn, _ack) = transport.dial(addr, hello).await?;
    Ok(conn)
}

/// A dialled connection used for writing; what the peer sends back goes to `on_message`, and
/// `on_close` runs once if the peer closes it or it breaks (not when the link is dropped).
pub(crate) struct Link {
    pub(crate) writer: PeerWriter,
    drain: JoinHandle<()>,
}

impl Link {
    pub(crate) fn new(
        conn: Connection,
        addr: SocketAddr,
        on_message: impl Fn(Message) + Send + 'static,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Self {
        let (mut reader, writer) = conn.into_split();
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
            on_close();
        });
        Link { writer, drain }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

/// Links by address, dialled on first use and re-dialled once when a write fails (the peer
/// restarted, or dropped an idle connection).
pub(crate) struct LinkPool {
    node_id: String,
    capabilities: Capabilities,
    transport: Transport,
    links: HashMap<SocketAddr, Link>,
}

impl LinkPool {
    pub(crate) fn new(node_id: String, capabilities: Capabilities, transport: Transport) -> Self {
        LinkPool {
            node_id,
            capabilities,
            transport,
            links: HashMap::new(),
        }
    }

    pub(crate) async fn send(&mut self, addr: SocketAddr, msg: &Message) -> Result<(), WireError> {
        let mut last_err = None;
        for _ in 0..2 {
            if !self.links.contains_key(&addr) {
                let conn = dial(addr, &self.node_id, self.capabilities, &self.transport).await?;
                let link = Link::new(
                    conn,
                    addr,
                    move |m| {
                        if let Message::Error(e) = m {
                            tracing::warn!(peer = %addr, error = %e.message, "peer reported an error");
                        }
                    },
                    // The next write finds out and re-dials.
                    || {},
                );
                self.links.insert(addr, link);
            }
            let Some(link) = self.links.get_mut(&addr) else {
                continue;
            };
            match link.writer.write_frame(msg).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "write failed; re-dialling");
                    self.links.remove(&addr);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(WireError::Closed {
            expected: "a writable link",
        }))
    }
}
