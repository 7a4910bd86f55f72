#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! What the node tests share: the model, and talking to a node over real HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shoal_node::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";

pub(crate) fn model_path() -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let p = dir.join(SMOLLM2);
    assert!(
        p.is_file(),
        "model {} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

/// Fast heartbeats, so the cluster tests take seconds.
pub(crate) fn fast_detector() -> shoal_cluster::DetectorConfig {
    shoal_cluster::DetectorConfig {
        interval: Duration::from_millis(200),
        probe_timeout: Duration::from_millis(1000),
        suspect_after: Duration::from_millis(800),
        dead_after: Duration::from_millis(1600),
        ..shoal_cluster::DetectorConfig::default()
    }
}

pub(crate) fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// One HTTP/1.1 request; the status and the body.
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(addr).await.expect("node accepts");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// Waits until `/health` leaves 503-loading: `Ok` when ready, `Err(body)` when it failed.
pub(crate) async fn settle(node: &Node) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = http(node.http_addr(), "GET", "/health", None).await;
        if status == 200 {
            return Ok(());
        }
        if body.contains("failed to load") {
            return Err(body);
        }
        assert!(Instant::now() < deadline, "node not ready: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A greedy chat answer of at most `max_tokens` from the node; `model` is the id to ask for.
pub(crate) async fn ask(node: &Node, model: &str, question: &str, max_tokens: u32) -> String {
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    answer(node.http_addr(), &request).await
}

/// The answer's text to a whole (not streamed) chat `request`, which must succeed.
pub(crate) async fn answer(addr: SocketAddr, request: &Value) -> String {
    let (status, body) = http(addr, "POST", "/v1/chat/completions", Some(request)).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("an answer")
        .to_owned()
}

/// A streamed chat answer being read: the connection, past the first content token.
pub(crate) struct OpenStream {
    lines: tokio::io::Lines<tokio::io::BufReader<TcpStream>>,
    pub(crate) text: String,
}

/// Sends `request` with `"stream": true` and reads until the first piece of content has
/// come: the answer is then running on the node.
pub(crate) async fn open_stream(addr: SocketAddr, request: &Value) -> OpenStream {
    use tokio::io::AsyncBufReadExt;
    let mut request = request.clone();
    request["stream"] = json!(true);
    let body = request.to_string();
    let mut stream = TcpStream::connect(addr).await.expect("node accepts");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut open = OpenStream {
        lines: tokio::io::BufReader::new(stream).lines(),
        text: String::new(),
    };
    let status = open
        .lines
        .next_line()
        .await
        .unwrap()
        .expect("a status line");
    assert!(status.contains(" 200 "), "{status}");
    while open.text.is_empty() {
        assert!(
            open.next_event().await,
            "the stream ended before any content"
        );
    }
    open
}

impl OpenStream {
    /// Reads up to the next `data:` event (chunk-size lines and headers are skipped), adding
    /// its content; `false` at the end of the stream.
    async fn next_event(&mut self) -> bool {
        while let Some(line) = self.lines.next_line().await.unwrap() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data.trim() == "[DONE]" {
                return false;
            }
            let event: Value = serde_json::from_str(data).expect("an SSE event of JSON");
            if let Some(piece) = event["choices"][0]["delta"]["content"].as_str() {
                self.text.push_str(piece);
            }
            return true;
        }
        false
    }

    /// Reads the rest of the answer; its whole text.
    pub(crate) async fn finish(mut self) -> String {
        while self.next_event().await {}
        self.text
    }
}
