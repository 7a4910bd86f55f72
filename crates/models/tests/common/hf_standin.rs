//! A local stand-in for Hugging Face: a tiny HTTP/1.1 server on 127.0.0.1:0 that serves
//! files under `/{repo}/resolve/main/{file}` the way the hub does — optionally through a
//! redirect to a "CDN" path, with `Range` support (206 + Content-Range) or without (200),
//! and able to drop the connection part-way through a body to imitate a network failure.
//! It records every request so tests can check what the client asked for.
//!
//! Shared by the tests of `shoal-models` and the `shoal` binary (via `#[path]`).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How the stand-in behaves.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Answer `Range: bytes=N-` with 206 (true) or ignore it and send 200 (false).
    pub ranges: bool,
    /// Redirect `/…/resolve/main/F` to `/cdn/F`, as the hub redirects to its CDN.
    pub redirect: bool,
    /// For the first `n` file bodies, send only this many bytes, then hang up.
    pub cut_after: Option<u64>,
    pub cut_times: usize,
}

impl Behaviour {
    pub fn hub() -> Self {
        Behaviour {
            ranges: true,
            ..Behaviour::default()
        }
    }
}

/// One request the stand-in saw, and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

struct Shared {
    /// `/{repo}/resolve/main/{file}` → bytes.
    files: HashMap<String, Arc<Vec<u8>>>,
    behaviour: Behaviour,
    seen: Mutex<Vec<Seen>>,
    bodies_sent: AtomicUsize,
    stop: AtomicBool,
}

pub struct HfStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl HfStandIn {
    /// Serves `files`: (repo, file name, bytes).
    pub fn start(files: Vec<(&str, &str, Arc<Vec<u8>>)>, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            files: files
                .into_iter()
                .map(|(repo, file, bytes)| (format!("/{repo}/resolve/main/{file}"), bytes))
                .collect(),
            behaviour,
            seen: Mutex::new(Vec::new()),
            bodies_sent: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(&s, stream);
                });
            }
        });
        HfStandIn {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// The base URL to use as `SHOAL_HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }
}

impl Drop for HfStandIn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(s: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    if path.is_empty() {
        return Ok(());
    }
    let record = |status: u16| {
        s.seen.lock().unwrap().push(Seen {
            path: path.clone(),
            range: range.clone(),
            status,
        });
    };

    // `/cdn/F` serves the file whose hub path ends in `/F`; the hub path redirects there.
    let file = if let Some(name) = path.strip_prefix("/cdn/") {
        s.files
            .iter()
            .find(|(k, _)| k.ends_with(&format!("/{name}")))
            .map(|(_, v)| v.clone())
    } else if let Some(bytes) = s.files.get(&path) {
        if s.behaviour.redirect {
            record(302);
            let name = path.rsplit('/').next().unwrap_or("");
            write!(
                stream,
                "HTTP/1.1 302 Found\r\nLocation: /cdn/{name}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
        Some(bytes.clone())
    } else {
        None
    };
    let Some(bytes) = file else {
        record(404);
        let body = "Entry not found";
        write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    };
    let len = bytes.len() as u64;
    let start = match (&range, s.behaviour.ranges) {
        (Some(r), true) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok()),
        _ => None,
    };
    let (status, from) = match start {
        Some(n) if n >= len => {
            record(416);
            write!(
                stream,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
        Some(n) => {
            write!(
                stream,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{len}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                len - 1,
                len - n
            )?;
            (206, n)
        }
        None => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n{}Connection: close\r\n\r\n",
                if s.behaviour.ranges {
                    "Accept-Ranges: bytes\r\n"
                } else {
                    ""
                }
            )?;
            (200, 0)
        }
    };
    record(status);
    let body = &bytes[from as usize..];
    let nth = s.bodies_sent.fetch_add(1, Ordering::SeqCst);
    match s.behaviour.cut_after {
        Some(cut) if nth < s.behaviour.cut_times => {
            let cut = (cut as usize).min(body.len());
            stream.write_all(&body[..cut])?;
            stream.flush()?;
            // Hang up mid-body, as a dropped connection would.
            stream.shutdown(std::net::Shutdown::Both)?;
        }
        _ => {
            stream.write_all(body)?;
            stream.flush()?;
        }
    }
    Ok(())
}

/// `n` bytes that do not repeat in any short period (xorshift), so a misplaced byte
/// changes the hash.
pub fn test_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
