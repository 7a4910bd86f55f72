//! The head's reply listener: the last stage's tokens, rows and errors, routed to their
//! sessions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use shoal_wire::{
    serve_peers, Capabilities, Connection, ErrorCode, ErrorMessage, HelloAck, Logits, Message,
    PeerService, ServeConfig, Token, Transport, Verified, WireError,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the reply listener hands a waiting session.
pub(super) enum Reply {
    Token(Token),
    /// The draws of a speculative verify.
    Verified(Verified),
    /// Rows an embedding asked for (the last stage's normed hidden states).
    Rows(Logits),
    /// The session's ring broke (a link closed).
    Error(String),
    /// A stage refused the session's work, with its error code.
    Refused(ErrorCode, String),
}

/// Sessions waiting for replies, by id.
#[derive(Default)]
pub(super) struct Router {
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    /// The node id of the current ring's last stage: the only peer whose tokens count.
    last_stage: Mutex<Option<String>>,
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

    /// Routes a message from a stage; `from` is the node id the stage gave in its hello.
    /// A token counts only from the ring's last stage; errors from any stage of it.
    pub(super) fn route(&self, msg: Message, from: &str) {
        match msg {
            Message::Token(t) if self.is_last_stage(from) => {
                self.deliver(t.session_id, Reply::Token(t))
            }
            Message::Token(t) => tracing::warn!(
                from,
                session_id = t.session_id,
                "dropped a token from a node that is not the ring's last stage"
            ),
            Message::Verified(v) if self.is_last_stage(from) => {
                self.deliver(v.session_id, Reply::Verified(v))
            }
            Message::Verified(v) => tracing::warn!(
                from,
                session_id = v.session_id,
                "dropped draws from a node that is not the ring's last stage"
            ),
            Message::Logits(l) if self.is_last_stage(from) => {
                self.deliver(l.session_id, Reply::Rows(l))
            }
            Message::Logits(l) => tracing::warn!(
                from,
                session_id = l.session_id,
                "dropped rows from a node that is not the ring's last stage"
            ),
            Message::Error(e) => match e.session_id {
                Some(id) => self.deliver(id, Reply::Refused(e.code, e.message)),
                None => tracing::warn!(error = %e.message, "a stage reported an error"),
            },
            other => tracing::debug!(message = other.name(), "ignored a message on a reply link"),
        }
    }

    /// The ring's last stage is now `node_id` (`None`: the head alone, no peer sends tokens).
    pub(super) fn set_last_stage(&self, node_id: Option<String>) {
        *self
            .last_stage
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = node_id;
    }

    fn is_last_stage(&self, node_id: &str) -> bool {
        self.last_stage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            == Some(node_id)
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

/// Accepts the last stage's connections and routes `Token`s and errors to their sessions;
/// with `weights` (the head's model file and its SHA-256), also serves peers' `GetWeights`
/// for that model.
pub(super) async fn serve_replies(
    listener: TcpListener,
    node_id: String,
    transport: Transport,
    router: Arc<Router>,
    weights: Option<(PathBuf, [u8; 32])>,
    weight_stats: crate::WeightStats,
) {
    let config = ServeConfig::over(transport);
    let replies = ReplyListener {
        node_id,
        router,
        weights,
        senders: crate::weights::Senders::new(),
        weight_stats,
    };
    serve_peers(listener, config, Arc::new(replies), std::future::pending()).await;
}

/// The head's reply listener as a peer service.
pub(super) struct ReplyListener {
    node_id: String,
    router: Arc<Router>,
    /// The head's model file and its SHA-256, served to peers without it.
    weights: Option<(PathBuf, [u8; 32])>,
    /// The weight transfers it sends.
    senders: crate::weights::Senders,
    /// Where their bytes are counted.
    weight_stats: crate::WeightStats,
}

impl PeerService for ReplyListener {
    fn accept(&self, _hello: &shoal_wire::Hello) -> std::result::Result<HelloAck, ErrorMessage> {
        Ok(HelloAck {
            node_id: self.node_id.clone(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: Capabilities::HEAD,
            idle_timeout: None,
        })
    }

    async fn handle(
        &self,
        msg: Message,
        conn: &mut Connection,
        peer: &shoal_wire::RemotePeer,
    ) -> std::result::Result<(), WireError> {
        match msg {
            Message::GetWeights(req) => match &self.weights {
                Some((path, sha)) if *sha == req.model_sha256 => {
                    let _turn = self.senders.turn(&peer.node_id).await;
                    let stats = &self.weight_stats;
                    crate::weights::send_weights(conn, path.clone(), &req, stats).await
                }
                _ => {
                    let e = ErrorMessage::new(
                        ErrorCode::MODEL_UNAVAILABLE,
                        None,
                        "this head serves only its own model's weights, by its SHA-256",
                    );
                    conn.write_frame(&Message::Error(e)).await
                }
            },
            msg => {
                self.router.route(msg, &peer.node_id);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn token(session_id: u64) -> Message {
        Message::Token(Token {
            session_id,
            seq: 0,
            token_id: 42,
            logprob: None,
            top: Vec::new(),
        })
    }

    /// Issue #14: a token counts only from the ring's last stage; another member (a middle
    /// stage, a stage of an earlier ring, any node with the key) cannot inject one. Errors
    /// are heard from every stage, since any of them may fail a session's work.
    #[test]
    fn tokens_and_rows_count_only_from_the_last_stage() {
        let router = Router::default();
        let mut rx = router.register(1);
        router.route(token(1), "last");
        assert!(rx.try_recv().is_err(), "no ring yet: no token counts");

        router.set_last_stage(Some("last".into()));
        router.route(token(1), "middle");
        assert!(rx.try_recv().is_err(), "a token from a middle stage counts");
        router.route(token(1), "last");
        assert!(matches!(rx.try_recv(), Ok(Reply::Token(t)) if t.token_id == 42));
        let rows = || {
            Message::Logits(Logits {
                session_id: 1,
                seq: 3,
                logits: shoal_wire::Activations::from_f32(1, 1, &[0.5], shoal_wire::DType::F32)
                    .unwrap(),
            })
        };
        router.route(rows(), "middle");
        assert!(rx.try_recv().is_err(), "rows from a middle stage count");
        router.route(rows(), "last");
        assert!(matches!(rx.try_recv(), Ok(Reply::Rows(l)) if l.seq == 3));

        let error = ErrorMessage::new(ErrorCode::BAD_REQUEST, Some(1), "no");
        router.route(Message::Error(error), "middle");
        assert!(matches!(
            rx.try_recv(),
            Ok(Reply::Refused(ErrorCode::BAD_REQUEST, _))
        ));

        router.set_last_stage(Some("new-last".into()));
        router.route(token(1), "last");
        assert!(
            rx.try_recv().is_err(),
            "the last stage of an earlier ring counts"
        );
    }
}
