//! The opening exchange of every connection: the dialler sends [`Hello`], the acceptor answers
//! [`HelloAck`] or an `Error`.
//!
//! Between nodes these run inside the swarm key's encryption ([`crate::secure`]): a peer
//! without the key never gets as far as a `Hello`. A refusal uses an `Error` frame, e.g.
//! [`ErrorCode::OVERLOADED`].

use tokio::io::{AsyncRead, AsyncWrite};

use crate::connection::Connection;
use crate::error::WireError;
#[cfg(doc)]
use crate::message::ErrorCode;
use crate::message::{ErrorMessage, Hello, HelloAck, Message};

/// Dialling side: sends `hello`, returns the peer's [`HelloAck`]. An `Error` answer becomes
/// [`WireError::Remote`].
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    hello: Hello,
) -> Result<HelloAck, WireError> {
    conn.write_frame(&Message::Hello(hello)).await?;
    match conn.read_frame().await? {
        Some(Message::HelloAck(ack)) => Ok(ack),
        Some(Message::Error(e)) => Err(WireError::Remote {
            code: e.code,
            message: e.message,
        }),
        Some(other) => Err(WireError::UnexpectedMessage {
            expected: "HelloAck",
            got: other.name(),
        }),
        None => Err(WireError::Closed {
            expected: "HelloAck",
        }),
    }
}

/// Accepting side: waits for the peer's [`Hello`], asks `decide` whether to accept it, and
/// answers with its [`HelloAck`] or its [`ErrorMessage`]. Returns the peer's `Hello`; a refusal
/// returns [`WireError::Remote`] carrying the refusal that was sent.
pub async fn server_handshake<S, D>(conn: &mut Connection<S>, decide: D) -> Result<Hello, WireError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: FnOnce(&Hello) -> Result<HelloAck, ErrorMessage>,
{
    let hello = match conn.read_frame().await? {
        Some(Message::Hello(h)) => h,
        Some(other) => {
            return Err(WireError::UnexpectedMessage {
                expected: "Hello",
                got: other.name(),
            })
        }
        None => return Err(WireError::Closed { expected: "Hello" }),
    };
    match decide(&hello) {
        Ok(ack) => {
            conn.write_frame(&Message::HelloAck(ack)).await?;
            Ok(hello)
        }
        Err(refusal) => {
            conn.write_frame(&Message::Error(refusal.clone())).await?;
            Err(WireError::Remote {
                code: refusal.code,
                message: refusal.message,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Limits;
    use crate::message::{Capabilities, ErrorCode, Ping};
    use tokio::io::duplex;

    fn hello(id: &str) -> Hello {
        Hello {
            node_id: id.into(),
            software_version: "0.1.0".into(),
            capabilities: Capabilities::STAGE,
        }
    }

    fn ack(h: &Hello) -> HelloAck {
        HelloAck {
            node_id: format!("ack-{}", h.node_id),
            software_version: "0.1.0".into(),
            capabilities: Capabilities::HEAD,
            idle_timeout: None,
        }
    }

    #[tokio::test]
    async fn handshake_succeeds() {
        let (a, b) = duplex(4096);
        let mut client = Connection::from_stream(a, Limits::default());
        let mut server = Connection::from_stream(b, Limits::default());
        let srv = tokio::spawn(async move { server_handshake(&mut server, |h| Ok(ack(h))).await });
        let got = client_handshake(&mut client, hello("n1")).await.unwrap();
        assert_eq!(got.node_id, "ack-n1");
        assert_eq!(srv.await.unwrap().unwrap(), hello("n1"));
    }

    #[tokio::test]
    async fn refusal_reaches_the_client() {
        let (a, b) = duplex(4096);
        let mut client = Connection::from_stream(a, Limits::default());
        let mut server = Connection::from_stream(b, Limits::default());
        let srv = tokio::spawn(async move {
            server_handshake(&mut server, |_| {
                Err(ErrorMessage::new(
                    ErrorCode::UNAUTHORIZED,
                    None,
                    "not in this swarm",
                ))
            })
            .await
        });
        let err = client_handshake(&mut client, hello("n1"))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer refused: not in this swarm (code 9 unauthorized)"
        );
        assert!(srv.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn hello_must_come_first() {
        let (a, b) = duplex(4096);
        let mut client = Connection::from_stream(a, Limits::default());
        let mut server = Connection::from_stream(b, Limits::default());
        client
            .write_frame(&Message::Ping(Ping { nonce: 1 }))
            .await
            .unwrap();
        let err = server_handshake(&mut server, |h| Ok(ack(h)))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol violation: expected Hello but the peer sent Ping"
        );
    }
}
