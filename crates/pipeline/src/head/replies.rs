//! The head's reply listener: the last stage's tokens and errors, routed to their sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use shoal_wire::{
    serve_peers, Capabilities, Connection, ErrorCode, ErrorMessage, HelloAck, Message, PeerService,
    ServeConfig, Token, Transport, WireError,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the reply listener hands a waiting session.
pub(super) enum Reply {
    Token(Token),
    /// The session's ring broke (a link closed).
    Error(String),
    /// A stage refused the session's work, with its error code.
    Refused(ErrorCode, String),
}

/// Sessions waiting for replies, by id.
#[derive(Default)]
pub(super) struct Router {
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
}

impl Router {
    pub(super) fn deliver(&self, session_id: u64, reply: Reply) {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match sessions.get(&session_id) {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(session_id, "reply for a session that is gone"),
        }
    }

    pub(super) fn route(&self, msg: Message) {
        match msg {
            Message::Token(t) => self.deliver(t.session_id, Reply::Token(t)),
            Message::Error(e) => match e.session_id {
                Some(id) => self.deliver(id, Reply::Refused(e.code, e.message)),
                None => tracing::warn!(error = %e.message, "a stage reported an error"),
            },
            other => tracing::debug!(message = other.name(), "ignored a message on a reply link"),
        }
    }

    /// Reports `message` to every session waiting for a reply.
    pub(super) fn fail_all(&self, message: &str) {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        for tx in sessions.values() {
            let _ = tx.send(Reply::Error(message.to_owned()));
        }
    }

    pub(super) fn register(&self, session_id: u64) -> mpsc::UnboundedReceiver<Reply> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session_id, tx);
        rx
    }

    /// Sessions waiting for replies: those generating now.
    pub(super) fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub(super) fn unregister(&self, session_id: u64) {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session_id);
    }
}

/// Accepts the last stage's connections and routes `Token`s and errors to their sessions.
pub(super) async fn serve_replies(
    listener: TcpListener,
    node_id: String,
    transport: Transport,
    router: Arc<Router>,
) {
    let config = ServeConfig::over(transport);
    let replies = ReplyListener { node_id, router };
    serve_peers(listener, config, Arc::new(replies), std::future::pending()).await;
}

/// The head's reply listener as a peer service.
pub(super) struct ReplyListener {
    node_id: String,
    router: Arc<Router>,
}

impl PeerService for ReplyListener {
    fn accept(&self, _hello: &shoal_wire::Hello) -> std::result::Result<HelloAck, ErrorMessage> {
        Ok(HelloAck {
            node_id: self.node_id.clone(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: Capabilities::HEAD,
        })
    }

    async fn handle(
        &self,
        msg: Message,
        _conn: &mut Connection,
        _peer: SocketAddr,
    ) -> std::result::Result<(), WireError> {
        self.router.route(msg);
        Ok(())
    }
}
