//! End to end: the real `shoal serve` on 127.0.0.1:0 with the SmolLM2-135M test model,
//! driven by the official `openai` Python client (tests/python/test_openai_client.py),
//! then by raw HTTP from here for what a client library hides: several clients at once,
//! and a client that hangs up mid-stream.
//!
//! Needs `python3` with the `openai` package (`pip install openai`) and the model
//! (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MODEL_FILE: &str = "smollm2-135m-instruct-q4_1.gguf";

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn model_path() -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    let path = dir.join(MODEL_FILE);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set SHOAL_MODELS_DIR)",
        path.display()
    );
    path
}

/// The server process; killed when dropped, so a failing test leaves nothing running.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["serve", "--model"])
            .arg(model_path())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .env_remove("SHOAL_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("shoal starts");
        // Both pipes are drained for the life of the process (a full pipe would stall
        // the server) and echoed, so a failure shows the server's own words.
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[shoal] {line}");
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.trim().strip_prefix("listening on http://") {
                        server.addr = addr.parse().expect("a socket address");
                        break;
                    }
                }
                Err(_) => panic!("shoal never printed `listening on http://ADDR`"),
            }
        }
        // Keep draining; nobody reads the lines any more.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        server
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = http(self.addr, "GET", "/health", None) {
                if r.status == 200 {
                    return;
                }
                assert_eq!(r.status, 503, "while loading: {}", r.body);
            }
            assert!(Instant::now() < deadline, "the model did not load in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct HttpResponse {
    status: u16,
    body: String,
}

/// One HTTP/1.1 request on a fresh connection, read to the end.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = http(addr, "GET", "/metrics", None).unwrap().body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn chat_body(model: &str, content: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

#[test]
fn openai_api_end_to_end() {
    let server = Server::start();
    server.wait_healthy();
    let addr = server.addr;
    let models: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/v1/models", None).unwrap().body).unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_string();

    // The official client.
    let status = Command::new("python3")
        .arg("tests/python/test_openai_client.py")
        .current_dir(workspace_root())
        .env("SHOAL_BASE_URL", format!("http://{addr}/v1"))
        .env("SHOAL_MODEL", &model)
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_openai_client.py failed"
    );

    // Three clients at once: the engine takes them in turn, and all are answered.
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let body = chat_body(&model, &format!("Say the number {i}."), 8, i == 1);
            std::thread::spawn(move || http(addr, "POST", "/v1/chat/completions", Some(&body)))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "client {i}: {}", r.body);
        if i == 1 {
            assert!(r.body.trim_end().ends_with("data: [DONE]"), "{}", r.body);
        } else {
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        }
    }

    // Clients that hang up, mid-stream and while waiting for a whole answer: their
    // generations stop, the next client is served at once, and the server counts the
    // cancellations. (Counting never ends by itself, so only a hang-up stops it early.)
    for stream in [true, false] {
        let cancelled_before = metric(addr, "shoal_requests_cancelled_total");
        let generated_before = metric(addr, "shoal_generated_tokens_total");
        hang_up(addr, &model, stream);
        let started = Instant::now();
        let r = http(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&chat_body(&model, "Hi", 4, false)),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "after a hang-up (stream: {stream}) the next request waited {:?}",
            started.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(addr, "shoal_requests_cancelled_total") < cancelled_before + 1.0 {
            assert!(
                Instant::now() < deadline,
                "no cancellation was counted (stream: {stream})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let generated = metric(addr, "shoal_generated_tokens_total") - generated_before;
        assert!(
            generated < 1000.0,
            "{generated} tokens were generated for a client that hung up (stream: {stream})"
        );
    }
    assert_eq!(metric(addr, "shoal_requests_in_flight"), 0.0);
    assert_eq!(metric(addr, "shoal_requests_queued"), 0.0);
}

/// Asks for a long completion and closes the connection once generation is under way:
/// after the first chunk when streaming, after the first generated token otherwise.
fn hang_up(addr: SocketAddr, model: &str, stream: bool) {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = serde_json::json!({
        "model": model, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000,
        "temperature": 0, "stream": stream,
    })
    .to_string();
    let ttft_before = metric(addr, "shoal_time_to_first_token_seconds_count");
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    if stream {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains("data: {") {
            let n = socket.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended before its first chunk: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    } else {
        let deadline = Instant::now() + Duration::from_secs(120);
        while metric(addr, "shoal_time_to_first_token_seconds_count") < ttft_before + 1.0 {
            assert!(Instant::now() < deadline, "generation never started");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(socket);
}
