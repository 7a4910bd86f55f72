//! Fuzzes the swarm key's layer (issue #14): the handshake reader and the record reader get
//! arbitrary bytes from a peer, and the record layer carries arbitrary plaintext.
//!
//! The first byte picks the mode:
//! - even: the rest is what a stranger sends to a keyed acceptor (preamble, handshake
//!   length, handshake message, records). It must be refused (no fuzzer finds the key),
//!   without a panic or a runaway allocation.
//! - odd: the rest is plaintext that a dialler writes in pieces (sizes taken from the data)
//!   over a real in-memory handshake; the acceptor must read back exactly those bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_wire::{PeerStream, SwarmKey};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

const KEY: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let key = SwarmKey::from_bytes(KEY);
        if mode % 2 == 0 {
            let (mut stranger, acceptor) = duplex(1 << 16);
            let input = rest.to_vec();
            let send = async move {
                let _ = stranger.write_all(&input).await;
                let _ = stranger.shutdown().await;
                // Keep reading so the acceptor's refusal never blocks on a full pipe.
                let mut sink = Vec::new();
                let _ = stranger.read_to_end(&mut sink).await;
            };
            let (_, accepted) = tokio::join!(send, PeerStream::respond(acceptor, &key));
            assert!(accepted.is_err(), "a stranger passed the handshake");
        } else {
            let (dialler, acceptor) = duplex(1 << 16);
            let (d, a) = tokio::join!(
                PeerStream::initiate(dialler, &key),
                PeerStream::respond(acceptor, &key)
            );
            let (mut d, mut a) = (d.expect("dialler"), a.expect("acceptor"));
            let plain = rest.to_vec();
            let write = async move {
                let mut at = 0;
                while at < plain.len() {
                    // Piece sizes from the data itself, up to ~64 KiB.
                    let n = (usize::from(plain[at]) * 257 + 1).min(plain.len() - at);
                    d.write_all(&plain[at..at + n]).await.expect("write");
                    at += n;
                }
                d.shutdown().await.expect("shutdown");
            };
            let mut got = Vec::new();
            let (_, read) = tokio::join!(write, a.read_to_end(&mut got));
            read.expect("read");
            assert!(got == rest, "the plaintext changed on the way");
        }
    });
});
