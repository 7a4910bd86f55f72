//! What the process tests share: where the test models are, a real `shoal serve` process
//! on 127.0.0.1:0, and a small HTTP/1.1 client.

// Each test file uses a different part of this module.
#![allow(dead_code, unreachable_pub)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The built-in default and test model.
pub const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";
/// A larger model the suite also fetches.
pub const QWEN05: &str = "qwen2.5-coder-0.5b-instruct.gguf";

pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// A model of `scripts/fetch-models.sh`, from `SHOAL_MODELS_DIR` or the workspace's `models/`.
pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set SHOAL_MODELS_DIR)",
        path.display()
    );
    path
}

/// A `shoal serve` process; killed when dropped, so a failing test leaves nothing running.
pub struct Server {
    child: Child,
    /// The HTTP address it printed (`listening on http://ADDR`).
    pub addr: SocketAddr,
    /// The peer port it printed (`peer port listening on ADDR`), when started with one.
    pub peer_addr: Option<SocketAddr>,
    /// Every line it has printed so far (stdout and stderr).
    output: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Server {
    /// `shoal serve --model MODEL --host 127.0.0.1 --port 0` plus `extra`; returns once the
    /// HTTP port (and the peer port, when `--peer-port` is among `extra`) is known.
    pub fn start(model: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<OsString> = vec!["serve".into(), "--model".into(), model.into()];
        args.extend(["--host", "127.0.0.1", "--port", "0"].map(OsString::from));
        args.extend(extra.iter().map(OsString::from));
        let wants_peer_port = extra.contains(&"--peer-port");
        Server::spawn(
            Command::new(env!("CARGO_BIN_EXE_shoal")),
            args,
            wants_peer_port,
        )
    }

    /// `shoal serve --host 127.0.0.1 --port 0` plus `extra`, with no `--model` and
    /// `SHOAL_MODELS_DIR` set to `models_dir`.
    pub fn start_without_model(models_dir: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<OsString> = vec!["serve".into()];
        args.extend(["--host", "127.0.0.1", "--port", "0"].map(OsString::from));
        args.extend(extra.iter().map(OsString::from));
        let mut command = Command::new(env!("CARGO_BIN_EXE_shoal"));
        command.env("SHOAL_MODELS_DIR", models_dir);
        Server::spawn(command, args, extra.contains(&"--peer-port"))
    }

    /// `shoal serve --model MODEL` plus `args` inside the network namespace `netns` (as
    /// root: `ip netns exec`, which becomes the server's process); returns once both ports
    /// are known.
    pub fn start_in_netns(netns: &str, model: &Path, args: &[&str]) -> Self {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_shoal")]);
        let mut all: Vec<OsString> = vec!["serve".into(), "--model".into(), model.into()];
        all.extend(args.iter().map(OsString::from));
        Server::spawn(command, all, true)
    }

    /// `shoal serve` with no `--model`, `SHOAL_MODELS_DIR` set to `models_dir`, plus `args`,
    /// inside the network namespace `netns`; returns once both ports are known.
    pub fn start_in_netns_without_model(netns: &str, models_dir: &Path, args: &[&str]) -> Self {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_shoal")]);
        command.env("SHOAL_MODELS_DIR", models_dir);
        let mut all: Vec<OsString> = vec!["serve".into()];
        all.extend(args.iter().map(OsString::from));
        Server::spawn(command, all, true)
    }

    fn spawn(mut command: Command, args: Vec<OsString>, wants_peer_port: bool) -> Self {
        let mut child = command
            .args(&args)
            .env_remove("SHOAL_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("shoal starts");
        // Both pipes are drained for the life of the process (a full pipe would stall the
        // server) and echoed, so a failure shows the server's own words.
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let pid = child.id();
        let output = Arc::new(Mutex::new(Vec::new()));
        for pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let tx = tx.clone();
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[shoal {pid}] {line}");
                    output.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            peer_addr: None,
            output,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut http = None;
        while http.is_none() || (wants_peer_port && server.peer_addr.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!("shoal {args:?} never printed its addresses");
            };
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("listening on http://") {
                http = Some(addr.parse().expect("a socket address"));
            } else if let Some(addr) = line.strip_prefix("peer port listening on ") {
                server.peer_addr = Some(addr.parse().expect("a socket address"));
            }
        }
        server.addr = http.unwrap_or(server.addr);
        // Keep draining; nobody reads the lines any more.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        server
    }

    /// The peer address as `HOST:PORT`, for another node's `--peer`.
    pub fn peer(&self) -> String {
        self.peer_addr
            .expect("started with --peer-port")
            .to_string()
    }

    /// Waits until `/health` says 200 (503 while loading is fine; anything else is not).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(r) = http(self.addr, "GET", "/health", None) {
                if r.status == 200 {
                    return;
                }
                assert_eq!(r.status, 503, "while loading: {}", r.body);
            }
            assert!(
                Instant::now() < deadline,
                "the node did not get ready in time"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the process has used (user + system), in clock ticks (1/100 s).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// The process's peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Waits until the process has used `ticks` more CPU than `since` (it is working on
    /// something), polling every 5 ms.
    pub fn wait_busy(&self, since: u64, ticks: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.cpu_ticks() < since + ticks {
            assert!(Instant::now() < deadline, "the process never got busy");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process has printed a line containing `text` (ANSI colours included,
    /// so look for plain words).
    pub fn printed(&self, text: &str) -> bool {
        self.printed_line(text).is_some()
    }

    /// The first line printed so far that contains `text`.
    pub fn printed_line(&self, text: &str) -> Option<String> {
        self.output
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(text))
            .cloned()
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the process: a stopped process keeps its
    /// sockets open but answers nothing, like a hung device.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Kills the process at once (SIGKILL), as a crashed device would go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection, read to the end.
pub fn http(
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

/// `POST /v1/chat/completions`, expecting 200; returns the response's JSON.
pub fn chat(addr: SocketAddr, body: &str) -> serde_json::Value {
    let r = http(addr, "POST", "/v1/chat/completions", Some(body)).expect("HTTP request");
    assert_eq!(r.status, 200, "chat completion failed: {}", r.body);
    r.json()
}

/// The text of a non-streamed chat completion.
pub fn chat_text(addr: SocketAddr, body: &str) -> String {
    chat(addr, body)["choices"][0]["message"]["content"]
        .as_str()
        .expect("message content")
        .to_owned()
}

/// A value of a Prometheus metric (0 when absent).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = http(addr, "GET", "/metrics", None).unwrap().body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// A chat request body with one user message.
pub fn chat_body(model: &str, content: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}
