#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The swarm key on real sockets: members talk, strangers (no key, another key, plain
//! frames) are refused with a clear error and change nothing, a relay in the middle that
//! alters or replays a record ends that connection, what crosses the wire holds no plaintext,
//! and silent sockets cannot lock a member out.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_wire::{
    client_handshake, Activations, Capabilities, Connection, DType, ErrorCode, ErrorMessage,
    Forward, Hello, HelloAck, Limits, Message, Payload, PeerService, Ping, Pong, SamplingSpec,
    ServeConfig, SwarmKey, Transport, Want, WireError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f).await.expect("timed out")
}

/// Answers Ping with Pong and echoes a Forward back (so its bytes cross twice).
struct Echo;

impl PeerService for Echo {
    fn accept(&self, h: &Hello) -> Result<HelloAck, ErrorMessage> {
        Ok(HelloAck {
            node_id: format!("echo-for-{}", h.node_id),
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
            other => other,
        };
        conn.write_frame(&reply).await
    }
}

fn key() -> SwarmKey {
    SwarmKey::generate().unwrap()
}

async fn serve(config: ServeConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(shoal_wire::serve_peers(
        listener,
        config,
        Arc::new(Echo),
        std::future::pending(),
    ));
    addr
}

fn hello(name: &str) -> Hello {
    Hello {
        node_id: name.into(),
        software_version: "test".into(),
        capabilities: Capabilities::HEAD,
    }
}

async fn ping(conn: &mut Connection, nonce: u64) {
    conn.write_frame(&Message::Ping(Ping { nonce }))
        .await
        .unwrap();
    assert_eq!(
        within(conn.read_frame()).await.unwrap(),
        Some(Message::Pong(Pong { nonce }))
    );
}

/// A Forward of hidden states large enough to span many records.
fn big_forward(reply_to: SocketAddr) -> Forward {
    let (rows, cols) = (64u32, 2048u32);
    let values: Vec<f32> = (0..rows * cols).map(|i| (i % 977) as f32 * 0.25).collect();
    Forward {
        session_id: 7,
        seq: 1,
        plan_id: 1,
        positions: (0..rows).collect(),
        payload: Payload::Hidden(Activations::from_f32(rows, cols, &values, DType::F32).unwrap()),
        want: Want::Token(SamplingSpec::greedy()),
        reply_to,
        resume: None,
    }
}

#[tokio::test]
async fn members_with_the_same_key_talk_in_ciphertext() {
    let k = key();
    let addr = serve(ServeConfig::over(Transport::with_key(Some(k.clone())))).await;
    let transport = Transport::with_key(Some(k));
    let (mut conn, ack) = within(transport.dial(addr, hello("a"))).await.unwrap();
    assert_eq!(ack.node_id, "echo-for-a");
    assert!(conn.is_encrypted());
    ping(&mut conn, 1).await;
    // A 512 KiB frame: many records each way, read back intact.
    let forward = Message::Forward(big_forward(addr));
    conn.write_frame(&forward).await.unwrap();
    assert_eq!(within(conn.read_frame()).await.unwrap(), Some(forward));
    // Split halves keep working (the head's reader and writer tasks).
    let (mut rx, mut tx) = conn.into_split();
    for n in 0..50 {
        tx.write_frame(&Message::Ping(Ping { nonce: n }))
            .await
            .unwrap();
    }
    for n in 0..50 {
        assert_eq!(
            within(rx.read_frame()).await.unwrap(),
            Some(Message::Pong(Pong { nonce: n }))
        );
    }
}

#[tokio::test]
async fn another_key_is_refused_and_the_member_goes_on() {
    let k = key();
    let addr = serve(ServeConfig::over(Transport::with_key(Some(k.clone())))).await;
    let (mut member, _) = within(Transport::with_key(Some(k)).dial(addr, hello("m")))
        .await
        .unwrap();
    let err = within(Transport::with_key(Some(key())).dial(addr, hello("x")))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WireError::Handshake { .. }), "{text}");
    assert!(text.contains("swarm keys differ"), "{text}");
    ping(&mut member, 2).await;
}

#[tokio::test]
async fn a_plain_peer_is_told_it_needs_the_key() {
    let addr = serve(ServeConfig::over(Transport::with_key(Some(key())))).await;
    let mut plain = Connection::connect(addr, Limits::default()).await.unwrap();
    let err = within(client_handshake(&mut plain, hello("plain")))
        .await
        .unwrap_err();
    match err {
        WireError::Remote { code, message } => {
            assert_eq!(code, ErrorCode::UNAUTHORIZED);
            assert!(message.contains("needs the swarm key"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_keyed_peer_is_told_this_node_has_no_key() {
    let addr = serve(ServeConfig::default()).await;
    let err = within(Transport::with_key(Some(key())).dial(addr, hello("k")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a swarm key is in use on one side only"),
        "{err}"
    );
}

/// What a relay between a member and the server does to the member's bytes after the
/// handshake.
#[derive(Clone, Copy)]
enum Meddle {
    Nothing,
    /// Flip one bit inside the first record.
    Tamper,
    /// Send the first record twice.
    Replay,
}

/// Bytes of the dialler's handshake: preamble, length, `e` and tag.
const DIALLER_HANDSHAKE: usize = 8 + 2 + 48;

/// A relay from a port of its own to `server`, recording every byte both ways.
async fn relay(server: SocketAddr, meddle: Meddle) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let upstream = TcpStream::connect(server).await.unwrap();
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut up_rx, mut up_tx) = upstream.into_split();
        let down_seen = Arc::clone(&record);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = up_rx.read(&mut buf).await {
                if n == 0 || client_tx.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                down_seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        // Upstream: the handshake as is, then the first record as `meddle` says.
        let mut handshake = vec![0u8; DIALLER_HANDSHAKE];
        client_rx.read_exact(&mut handshake).await.unwrap();
        up_tx.write_all(&handshake).await.unwrap();
        let mut len = [0u8; 2];
        client_rx.read_exact(&mut len).await.unwrap();
        let mut first = len.to_vec();
        first.resize(2 + usize::from(u16::from_be_bytes(len)), 0);
        client_rx.read_exact(&mut first[2..]).await.unwrap();
        match meddle {
            Meddle::Nothing => up_tx.write_all(&first).await.unwrap(),
            Meddle::Tamper => {
                first[5] ^= 0x01;
                up_tx.write_all(&first).await.unwrap();
            }
            Meddle::Replay => {
                up_tx.write_all(&first).await.unwrap();
                up_tx.write_all(&first).await.unwrap();
            }
        }
        record.lock().unwrap().extend_from_slice(&handshake);
        record.lock().unwrap().extend_from_slice(&first);
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = client_rx.read(&mut buf).await {
            if n == 0 || up_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
            record.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn nothing_readable_crosses_the_wire() {
    let k = key();
    let server = serve(ServeConfig::over(Transport::with_key(Some(k.clone())))).await;
    let (via, seen) = relay(server, Meddle::Nothing).await;
    let (mut conn, _) = within(Transport::with_key(Some(k)).dial(via, hello("secret-node-name")))
        .await
        .unwrap();
    let forward = big_forward(server);
    let Payload::Hidden(acts) = &forward.payload else {
        unreachable!()
    };
    let activation_bytes = acts.data().to_vec();
    let msg = Message::Forward(forward);
    conn.write_frame(&msg).await.unwrap();
    assert_eq!(within(conn.read_frame()).await.unwrap(), Some(msg));
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 2 * activation_bytes.len(), "{}", seen.len());
    let contains = |needle: &[u8]| seen.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(b"secret-node-name"),
        "the node id crossed in plaintext"
    );
    assert!(!contains(b"SHOL"), "a frame header crossed in plaintext");
    // Any 32 bytes of the activations (a run of 8 floats) would show them.
    for at in (0..activation_bytes.len() - 32).step_by(4096) {
        assert!(
            !contains(&activation_bytes[at..at + 32]),
            "activations crossed in plaintext"
        );
    }
}

#[tokio::test]
async fn an_altered_or_replayed_record_ends_the_connection() {
    for meddle in [Meddle::Tamper, Meddle::Replay] {
        let k = key();
        let server = serve(ServeConfig::over(Transport::with_key(Some(k.clone())))).await;
        let (via, _) = relay(server, meddle).await;
        let transport = Transport::with_key(Some(k.clone()));
        let outcome = within(transport.dial(via, hello("victim"))).await;
        match (meddle, outcome) {
            // The Hello itself was altered: the server never answers it.
            (Meddle::Tamper, Err(_)) => {}
            // The Hello arrived once, its copy failed: the connection ends at the next read.
            (Meddle::Replay, Ok((mut conn, _))) => {
                conn.write_frame(&Message::Ping(Ping { nonce: 1 }))
                    .await
                    .ok();
                let read = within(conn.read_frame()).await;
                assert!(
                    matches!(read, Ok(None) | Err(_)),
                    "a replayed record was accepted: {read:?}"
                );
            }
            (_, outcome) => panic!("unexpected: {:?}", outcome.map(|(_, ack)| ack)),
        }
        // The server is unharmed.
        let (mut member, _) = within(transport.dial(server, hello("m"))).await.unwrap();
        ping(&mut member, 3).await;
    }
}

#[tokio::test]
async fn silent_sockets_do_not_lock_a_member_out() {
    let k = key();
    let addr = serve(ServeConfig::over(Transport::with_key(Some(k.clone())))).await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Well within the 5 s handshake deadline: the member does not wait for the silent ones.
    let started = std::time::Instant::now();
    let transport = Transport::with_key(Some(k));
    let dial = transport.dial(addr, hello("m"));
    let (mut member, _) = tokio::time::timeout(Duration::from_secs(3), dial)
        .await
        .expect("the member waited for the silent sockets")
        .unwrap();
    ping(&mut member, 4).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(silent);
}

#[tokio::test(start_paused = true)]
async fn a_silent_socket_is_closed_at_the_handshake_deadline() {
    let addr = serve(ServeConfig::over(Transport::with_key(Some(key())))).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = silent.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    assert!(started.elapsed() >= shoal_wire::HANDSHAKE_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_frame_that_stalls_halfway_ends_its_connection() {
    let k = key();
    let addr = serve(ServeConfig::over(Transport::with_key(Some(k.clone())))).await;
    let (mut conn, _) = Transport::with_key(Some(k))
        .dial(addr, hello("a"))
        .await
        .unwrap();
    // Half a Ping frame, sealed in a record of its own, then nothing.
    let frame = Message::Ping(Ping { nonce: 1 }).to_frame().unwrap();
    let started = tokio::time::Instant::now();
    let raw = conn.get_mut();
    raw.write_all(&frame[..frame.len() / 2]).await.unwrap();
    raw.flush().await.unwrap();
    let read = conn.read_frame().await;
    assert!(matches!(read, Ok(None) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= shoal_wire::STALL_TIMEOUT);
}

/// Issue #14: one address may hold only so many of a port's connections, so one device
/// cannot take every slot; when one of its connections ends, it may open another.
#[tokio::test]
async fn connections_per_address_are_capped() {
    let k = key();
    let mut config = ServeConfig::over(Transport::with_key(Some(k.clone())));
    config.max_per_address = 2;
    let addr = serve(config).await;
    let member = Transport::with_key(Some(k));
    let (mut first, _) = within(member.dial(addr, hello("a"))).await.unwrap();
    let (mut second, _) = within(member.dial(addr, hello("b"))).await.unwrap();
    ping(&mut first, 1).await;
    ping(&mut second, 2).await;
    // The third is accepted by the key, then told the address is full, and closed.
    let (mut third, _) = within(member.dial(addr, hello("c"))).await.unwrap();
    match within(third.read_frame()).await {
        Ok(Some(Message::Error(e))) => {
            assert_eq!(e.code, ErrorCode::OVERLOADED);
            assert!(e.message.contains("from 127.0.0.1"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    drop(first);
    // Its slot comes back once the server has seen it close.
    let mut again = None;
    for _ in 0..50 {
        let (mut conn, _) = within(member.dial(addr, hello("d"))).await.unwrap();
        conn.write_frame(&Message::Ping(Ping { nonce: 4 }))
            .await
            .unwrap();
        if let Ok(Some(Message::Pong(_))) = within(conn.read_frame()).await {
            again = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the address got no slot back");
    ping(&mut second, 5).await;
}
