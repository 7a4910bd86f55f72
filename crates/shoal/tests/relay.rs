#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `shoal relay`, the delaying TCP relay of the pipeline benchmarks (issue #4 item 7), as a
//! real process on 127.0.0.1: bytes pass unchanged both ways, every round trip gains at least
//! twice the set delay, and it is a delay line (many chunks in flight), not one chunk per delay.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `shoal relay` process; killed when dropped.
struct Relay {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn start(to: SocketAddr, delay_ms: u32) -> Relay {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["relay", "--listen", "127.0.0.1:0", "--to"])
            .arg(to.to_string())
            .args(["--delay-ms", &delay_ms.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("shoal relay starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the relay printed its address")
                .unwrap();
            if let Some(a) = line.trim().strip_prefix("relay listening on ") {
                break a.parse().unwrap();
            }
        };
        // Keep draining stderr so the relay never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Relay { child, addr }
    }
}

/// Deterministic pseudo-random bytes (xorshift).
fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// An echo server on 127.0.0.1:0 (every connection, until the test ends).
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            conn.set_nodelay(true).unwrap();
            std::thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut out);
            });
        }
    });
    addr
}

#[test]
fn bytes_pass_unchanged_both_ways() {
    const MB: usize = 1 << 20;
    let up = random_bytes(4 * MB, 0x9e37_79b9_7f4a_7c15);
    let down = random_bytes(3 * MB + 12345, 0x2545_f491_4f6c_dd1d);
    // The server reads everything (to the client's half-close), checks it, then answers with
    // different bytes: the two directions are told apart, and end-of-stream travels too.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr = listener.local_addr().unwrap();
    let (want_up, reply) = (up.clone(), down.clone());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        let same = got == want_up;
        conn.write_all(&reply).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        (same, got.len())
    });
    let relay = Relay::start(server_addr, 5);
    let mut client = TcpStream::connect(relay.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    client.write_all(&up).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    let (same, up_len) = server.join().unwrap();
    assert!(
        same,
        "client → server bytes changed ({up_len} of {})",
        up.len()
    );
    assert_eq!(got.len(), down.len());
    assert!(got == down, "server → client bytes changed");
}

#[test]
fn a_round_trip_gains_twice_the_delay() {
    let relay = Relay::start(echo_server(), 20);
    let mut conn = TcpStream::connect(relay.addr).unwrap();
    conn.set_nodelay(true).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut byte = [0u8; 1];
    for i in 0..6u8 {
        let started = Instant::now();
        conn.write_all(&[i]).unwrap();
        conn.read_exact(&mut byte).unwrap();
        let rtt = started.elapsed();
        assert_eq!(byte[0], i);
        assert!(
            rtt >= Duration::from_millis(40),
            "round trip {rtt:?} < 40 ms"
        );
        // Generous: a loaded shared machine may be slow, but not seconds slow.
        assert!(rtt < Duration::from_secs(2), "round trip {rtt:?}");
    }
}

#[test]
fn many_chunks_are_in_flight_at_once() {
    // 100 small messages 2 ms apart through a 20 ms relay: a delay line echoes them all in
    // about 100 × 2 + 40 ms; a relay that held one chunk at a time would need ≥ 4 s.
    let relay = Relay::start(echo_server(), 20);
    let mut conn = TcpStream::connect(relay.addr).unwrap();
    conn.set_nodelay(true).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = conn.try_clone().unwrap();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut got = vec![0u8; 100 * 64];
        reader.read_exact(&mut got).unwrap();
        got
    });
    let mut sent = Vec::new();
    for i in 0..100u8 {
        let msg = [i; 64];
        conn.write_all(&msg).unwrap();
        sent.extend_from_slice(&msg);
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = receiver.join().unwrap();
    let took = started.elapsed();
    assert!(got == sent, "echoed bytes differ");
    assert!(took >= Duration::from_millis(40), "{took:?}");
    assert!(
        took < Duration::from_millis(2000),
        "{took:?}: chunks were serialised"
    );
}
