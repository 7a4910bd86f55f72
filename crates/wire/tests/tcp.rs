#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real sockets on 127.0.0.1: a listener served by `serve_peers`, well-behaved peers that
//! keep working, and hostile peers that lose their own connection and nothing else.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use shoal_wire::{
    client_handshake, decode_frame, serve_peers, Capabilities, Connection, ErrorCode, ErrorMessage,
    Forward, Hello, HelloAck, Limits, Message, Payload, PeerService, Ping, Pong, SamplingSpec,
    ServeConfig, Token, Want, WireError, HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f).await.expect("timed out")
}

/// A toy last stage: answers Ping with Pong and Forward with the token after its last input.
struct ToyStage;

impl PeerService for ToyStage {
    fn accept(&self, h: &Hello) -> Result<HelloAck, ErrorMessage> {
        Ok(HelloAck {
            node_id: format!("stage-for-{}", h.node_id),
            software_version: "test".into(),
            capabilities: Capabilities::STAGE,
            idle_timeout: None,
        })
    }

    async fn handle(
        &self,
        msg: Message,
        conn: &mut Connection,
        _peer: &shoal_wire::RemotePeer,
    ) -> Result<(), WireError> {
        let reply = match msg {
            Message::Ping(p) => Message::Pong(Pong { nonce: p.nonce }),
            Message::Forward(f) => match &f.payload {
                Payload::Tokens(t) => Message::Token(Token {
                    session_id: f.session_id,
                    seq: f.seq,
                    token_id: t[t.len() - 1] + 1,
                    logprob: None,
                    top: Vec::new(),
                }),
                Payload::Hidden(_) => Message::Error(ErrorMessage::new(
                    ErrorCode::BAD_REQUEST,
                    Some(f.session_id),
                    "toy stage takes tokens only",
                )),
            },
            other => Message::Error(ErrorMessage::new(
                ErrorCode::BAD_REQUEST,
                None,
                format!("toy stage does not handle {}", other.name()),
            )),
        };
        conn.write_frame(&reply).await
    }
}

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_peers(
        listener,
        ServeConfig::default(),
        Arc::new(ToyStage),
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        stop: Some(stop),
        task,
    }
}

async fn good_client(addr: SocketAddr, name: &str) -> Connection {
    let mut conn = Connection::connect(addr, Limits::default()).await.unwrap();
    assert!(
        conn.get_ref().tcp().nodelay().unwrap(),
        "TCP_NODELAY must be set"
    );
    let ack = client_handshake(
        &mut conn,
        Hello {
            node_id: name.into(),
            software_version: "test".into(),
            capabilities: Capabilities::HEAD,
        },
    )
    .await
    .unwrap();
    assert_eq!(ack.node_id, format!("stage-for-{name}"));
    // `serve_peers` announces its transport's idle timeout, whatever the service said, so
    // the dialler keeps the link alive by this listener's clock.
    assert_eq!(ack.idle_timeout, Some(shoal_wire::IDLE_TIMEOUT));
    conn
}

async fn ping(conn: &mut Connection, nonce: u64) {
    conn.write_frame(&Message::Ping(Ping { nonce }))
        .await
        .unwrap();
    assert_eq!(
        conn.read_frame().await.unwrap(),
        Some(Message::Pong(Pong { nonce }))
    );
}

/// Reads until the server closes; returns what arrived. A reset counts as closed too (the
/// server may close with our unread garbage still in its buffer, which makes the kernel send
/// RST rather than FIN).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn garbage_closes_only_the_offending_connection() {
    let server = start().await;
    let mut good = within(good_client(server.addr, "good")).await;
    within(ping(&mut good, 1)).await;

    // Someone speaks HTTP at the wire port.
    let mut garbage = TcpStream::connect(server.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    within(read_until_closed(&mut garbage)).await;

    // A valid handshake, then garbage mid-session.
    let mut rude = TcpStream::connect(server.addr).await.unwrap();
    let hello = Message::Hello(Hello {
        node_id: "rude".into(),
        software_version: String::new(),
        capabilities: Capabilities::NONE,
    });
    rude.write_all(&hello.to_frame().unwrap()).await.unwrap();
    let mut buf = Vec::new();
    let ack = loop {
        let mut chunk = [0u8; 256];
        let n = within(rude.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before HelloAck");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((msg, _)) = decode_frame(&buf, &Limits::default()).unwrap() {
            break msg;
        }
    };
    assert!(matches!(ack, Message::HelloAck(_)), "{ack:?}");
    rude.write_all(&[0xDE, 0xAD, 0xBE, 0xEF, 0, 1, 2, 3, 4, 5, 6, 7])
        .await
        .unwrap();
    within(read_until_closed(&mut rude)).await;

    // The good connection, opened before all this, still works, and so do new ones.
    within(ping(&mut good, 3)).await;
    let mut later = within(good_client(server.addr, "later")).await;
    within(ping(&mut later, 4)).await;
}

#[tokio::test]
async fn hostile_frames_each_close_their_connection_and_nothing_else() {
    let server = start().await;
    let mut good = within(good_client(server.addr, "good")).await;

    let mut header = Message::Ping(Ping { nonce: 0 }).to_frame().unwrap();
    header.truncate(HEADER_LEN);
    let hello = Message::Hello(Hello {
        node_id: "h".into(),
        software_version: String::new(),
        capabilities: Capabilities::NONE,
    })
    .to_frame()
    .unwrap();

    let mut attacks: Vec<(&str, Vec<u8>)> = Vec::new();
    // A header claiming a 4 GiB payload.
    let mut huge = header.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    attacks.push(("4 GiB length", huge));
    // An unknown message type.
    let mut unknown = header.clone();
    unknown[6..8].copy_from_slice(&0xBEEFu16.to_le_bytes());
    attacks.push(("unknown type", unknown));
    // A Hello whose node-id length says 1 GB.
    let mut lying = hello.clone();
    lying[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    attacks.push(("lying string length", lying));
    // A Hello with a byte too many.
    let mut trailing = hello.clone();
    trailing.push(0);
    let len = (trailing.len() - HEADER_LEN) as u32;
    trailing[8..12].copy_from_slice(&len.to_le_bytes());
    attacks.push(("trailing byte", trailing));

    for (name, bytes) in attacks {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let got = within(read_until_closed(&mut s)).await;
        // What came back, if anything, is a well-formed Error frame.
        if !got.is_empty() {
            let (msg, _) = decode_frame(&got, &Limits::default()).unwrap().unwrap();
            assert!(matches!(msg, Message::Error(_)), "{name}: {msg:?}");
        }
        within(ping(&mut good, 7)).await;
    }
}

#[tokio::test]
async fn a_newer_peer_is_told_which_versions_this_node_speaks() {
    let server = start().await;
    let mut frame = Message::Ping(Ping { nonce: 0 }).to_frame().unwrap();
    let newer = shoal_wire::PROTOCOL_VERSION + 1;
    frame[4..6].copy_from_slice(&newer.to_le_bytes());
    frame.truncate(HEADER_LEN);
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&frame).await.unwrap();
    let got = within(read_until_closed(&mut s)).await;
    let (msg, used) = decode_frame(&got, &Limits::default()).unwrap().unwrap();
    assert_eq!(
        used,
        got.len(),
        "one Error frame, then the connection closes"
    );
    let Message::Error(e) = msg else {
        panic!("{msg:?}")
    };
    assert_eq!(e.code, ErrorCode::UNSUPPORTED_VERSION);
    assert_eq!(
        e.message,
        format!(
            "peer speaks wire protocol version {newer}, this node speaks version(s) {}; \
             run the same shoal release on every node",
            shoal_wire::PROTOCOL_VERSION
        )
    );
}

#[tokio::test]
async fn a_stalled_half_frame_does_not_hold_up_anyone_else() {
    let server = start().await;
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    let hello = Message::Hello(Hello {
        node_id: "slow".into(),
        software_version: String::new(),
        capabilities: Capabilities::NONE,
    })
    .to_frame()
    .unwrap();
    stalled.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let mut good = within(good_client(server.addr, "good")).await;
    for n in 0..50 {
        within(ping(&mut good, n)).await;
    }
    drop(stalled);
}

#[tokio::test]
async fn concurrent_sessions_get_their_own_tokens() {
    let server = start().await;
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let addr = server.addr;
        clients.push(tokio::spawn(async move {
            let conn = good_client(addr, &format!("head{c}")).await;
            let reply_to = conn.get_ref().tcp().local_addr().unwrap();
            let (mut rx, mut tx) = conn.into_split();
            // Pipeline: send every step before reading any reply.
            for seq in 0..20u64 {
                let f = Forward {
                    session_id: c,
                    seq,
                    plan_id: 1,
                    positions: vec![seq as u32],
                    payload: Payload::Tokens(vec![(c * 1000 + seq) as u32]),
                    want: Want::Token(SamplingSpec::greedy()),
                    reply_to,
                    resume: None,
                };
                tx.write_frame(&Message::Forward(f)).await.unwrap();
            }
            for seq in 0..20u64 {
                let got = rx.read_frame().await.unwrap().unwrap();
                assert_eq!(
                    got,
                    Message::Token(Token {
                        session_id: c,
                        seq,
                        token_id: (c * 1000 + seq + 1) as u32,
                        logprob: None,
                        top: Vec::new(),
                    })
                );
            }
        }));
    }
    for c in clients {
        within(c).await.unwrap();
    }
}

#[tokio::test]
async fn shutdown_stops_accepting_and_closes_connections() {
    let mut server = start().await;
    let mut conn = within(good_client(server.addr, "a")).await;
    within(ping(&mut conn, 1)).await;
    server.stop.take().unwrap().send(()).unwrap();
    within(&mut server.task).await.unwrap();
    // The open connection was closed by the server...
    assert!(matches!(
        within(conn.read_frame()).await,
        Ok(None) | Err(WireError::Io(_))
    ));
    // ...and nobody listens any more.
    assert!(TcpStream::connect(server.addr).await.is_err());
}

/// Issue #14: a connection past its handshake that says nothing for the transport's idle
/// timeout is closed (its other end may be gone without a word), while one that keeps
/// talking — a head pinging its stages — stays open however long it lives.
#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_closed_after_the_idle_timeout_and_a_talking_one_is_kept() {
    let server = start().await;
    let idle = shoal_wire::IDLE_TIMEOUT;
    let mut silent = good_client(server.addr, "silent").await;
    let mut talking = good_client(server.addr, "talking").await;
    for nonce in 0..12 {
        tokio::time::sleep(idle / 3).await;
        ping(&mut talking, nonce).await;
    }
    // Four idle timeouts later the silent one was closed: its read ends at once.
    assert!(matches!(
        within(silent.read_frame()).await,
        Ok(None) | Err(_)
    ));
    ping(&mut talking, 99).await;
}

/// A frame that has begun to arrive is under the stall deadline, not the idle one: a big
/// frame on a slow link may take longer than the idle timeout, while its bytes keep coming.
#[tokio::test(start_paused = true)]
async fn a_frame_arriving_slowly_is_not_cut_off_by_the_idle_timeout() {
    let server = start().await;
    let mut conn = good_client(server.addr, "slow").await;
    let mut frame = Vec::new();
    Message::Ping(Ping { nonce: 7 })
        .encode_frame(&mut frame, &Limits::default())
        .unwrap();
    // One byte every tenth of the idle timeout: the frame takes longer than the idle
    // timeout to arrive, but never stalls for the stall deadline.
    let step = shoal_wire::IDLE_TIMEOUT / 10;
    assert!(step < shoal_wire::STALL_TIMEOUT);
    assert!(step * frame.len() as u32 > shoal_wire::IDLE_TIMEOUT);
    for byte in &frame {
        conn.get_mut()
            .write_all(std::slice::from_ref(byte))
            .await
            .unwrap();
        tokio::time::sleep(step).await;
    }
    assert_eq!(
        conn.read_frame().await.unwrap(),
        Some(Message::Pong(Pong { nonce: 7 }))
    );
}
