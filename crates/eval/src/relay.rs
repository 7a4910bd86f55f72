//! `shoal relay`: a TCP delay line, a test and bench tool (issue #4 item 7).
//!
//! This machine's kernel has no `netem`, so a slow link between pipeline stages is made by
//! putting a relay in front of a node: every accepted connection is forwarded to `--to`, and
//! every chunk of bytes, in each direction, is written `--delay-ms` after it was read. It is a
//! delay line, not a rate limit: chunks read at t₁ < t₂ go out at t₁ + d and t₂ + d, in order,
//! so throughput is whatever the sockets give. End of stream is delayed the same way (a
//! half-close travels like data).
//!
//! Each direction is two threads, a reader that stamps chunks and a writer that sleeps until
//! each chunk is due, joined by a bounded channel: an idle relay blocks in `read` / `recv`
//! and never spins, so it does not steal the cores of the stages it sits between. Threads
//! sleep with the OS timer (tens of microseconds of slack), which keeps a 2 ms delay a 2 ms
//! delay, unlike a millisecond-tick timer wheel.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct RelayArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one; the chosen address is printed
    /// as `relay listening on ADDR` on stderr).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Where each accepted connection is forwarded, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    /// How long every chunk is held, in milliseconds, in each direction (a round trip through
    /// the relay gains twice this).
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
}

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction before the reader waits (at most 64 MiB held).
const IN_FLIGHT: usize = 1024;

/// A chunk and when it is due; `None` is the end of the stream.
type Timed = (Instant, Option<Vec<u8>>);

/// Runs the relay until the process is stopped.
pub fn run(a: RelayArgs) -> anyhow::Result<ExitCode> {
    if !a.delay_ms.is_finite() || a.delay_ms < 0.0 {
        anyhow::bail!("--delay-ms must be a non-negative number of milliseconds");
    }
    let delay = Duration::from_secs_f64(a.delay_ms / 1e3);
    let listen = resolve(&a.listen).context("--listen")?;
    let to = resolve(&a.to).context("--to")?;
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    // Scripts and tests read this exact line to learn the port.
    eprintln!("relay listening on {local}");
    for conn in listener.incoming() {
        match conn {
            Ok(client) => {
                std::thread::spawn(move || {
                    if let Err(e) = connect(client, to, delay) {
                        tracing::warn!("relay to {to}: {e:#}");
                    }
                });
            }
            Err(e) => tracing::warn!("relay accept: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    text.to_socket_addrs()
        .with_context(|| format!("cannot resolve {text:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{text:?} resolves to no address"))
}

/// Dials `to` for a freshly accepted `client` and starts both directions.
fn connect(client: TcpStream, to: SocketAddr, delay: Duration) -> anyhow::Result<()> {
    let server = TcpStream::connect(to).with_context(|| format!("cannot connect to {to}"))?;
    // Frames are small and latency-bound; the relay must not add Nagle's wait to its delay.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    direction(client.try_clone()?, server.try_clone()?, delay);
    direction(server, client, delay);
    Ok(())
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
fn direction(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::sync_channel::<Timed>(IN_FLIGHT);
    let reader_side = from.try_clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let item = match from.read(&mut buf) {
                Ok(0) | Err(_) => None,
                Ok(n) => buf.get(..n).map(<[u8]>::to_vec),
            };
            let end = item.is_none();
            if tx.send((Instant::now() + delay, item)).is_err() || end {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, item) in rx {
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            match item {
                Some(bytes) => {
                    if to.write_all(&bytes).is_err() {
                        // The far side is gone: close the near side too, so the reader and
                        // the other direction end instead of waiting forever.
                        let _ = to.shutdown(Shutdown::Both);
                        if let Ok(from) = &reader_side {
                            let _ = from.shutdown(Shutdown::Both);
                        }
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    });
}
