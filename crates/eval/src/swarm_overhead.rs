//! `shoal bench --swarm-overhead`: what a swarm head adds to a request (issue #5's bar: under
//! 5 ms with agents that answer instantly).
//!
//! The head is the real thing — a `shoal serve --peer …` process answering chat completions
//! over HTTP. Its agents are [`InstantAgent`]s: stand-ins, run inside this process, that
//! speak the real peer protocol (handshake, `Describe` → card, `Ask` → `Answer`) but answer
//! at once with a fixed text instead of running a model. With the agents' own time at zero,
//! a request's wall time at the client is what the head adds: HTTP, classification, the
//! fan-out over fresh TCP connections, waiting, combining, and the response.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use shoal_wire::{
    serve_peers, AgentCard, Answer, Capabilities, Connection, ErrorMessage, Finish, Hello,
    HelloAck, Message, PeerService, Pong, ServeConfig, WireError,
};
use tokio::net::TcpListener;

use crate::client::Client;
use crate::cluster::LocalCluster;

/// The roles of the instant agents: every role a strategy asks (the spotter is added for
/// the rows that classify with one).
const ROLES: [&str; 5] = ["reasoner", "factchecker", "critic", "aggregator", "drafter"];
/// Classified as MATH by keywords, which routes it to reasoner, factchecker and critic.
const QUESTION: &str = "What is 6 times 7? Show the calculation.";
/// What every instant agent answers (a number, so that `vote` has a majority to find).
const ANSWER: &str = "6 times 7 is 42.";
/// Requests sent before the measured ones (connections, caches, the head's first
/// `Describe` round).
const WARMUP: usize = 5;

/// A swarm agent that answers every `Ask` at once with [`ANSWER`] (or, when the `Ask`
/// limits the answer to choices, with the first choice) and runs no model: a stand-in for
/// measuring the head alone. Counts the `Ask`s it got and the time it spent on them.
struct InstantAgent {
    role: &'static str,
    asks: AtomicU64,
    busy_ns: AtomicU64,
}

impl InstantAgent {
    fn card(&self) -> AgentCard {
        AgentCard {
            node_id: format!("instant-{}", self.role),
            role: self.role.to_owned(),
            model_id: "instant-agent (no model)".to_owned(),
            model_name: "instant agent".to_owned(),
            context_length: 32_768,
            // Weight 1: as fast as the weight formula counts.
            tokens_per_s: 40.0,
            thermal_penalty: 1.0,
            busy: 0,
            // No model; all stand-ins alike, so `strongest` goes by weight, then order.
            parameters: 0,
        }
    }
}

impl PeerService for InstantAgent {
    fn accept(&self, _hello: &Hello) -> Result<HelloAck, ErrorMessage> {
        Ok(HelloAck {
            node_id: format!("instant-{}", self.role),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: Capabilities::AGENT,
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
            Message::Describe(_) => Message::AgentCard(self.card()),
            Message::Ping(p) => Message::Pong(Pong { nonce: p.nonce }),
            Message::Ask(ask) => {
                let started = Instant::now();
                let text = ask
                    .choices
                    .iter()
                    .find(|c| c.as_str() == "MATH")
                    .or(ask.choices.first())
                    .cloned()
                    .unwrap_or_else(|| ANSWER.to_owned());
                let answer = Message::Answer(Answer {
                    request_id: ask.request_id,
                    text,
                    finish: Finish::Stop,
                    prompt_tokens: 1,
                    completion_tokens: 8,
                    elapsed_ms: 0,
                    response: None,
                });
                self.asks.fetch_add(1, Ordering::Relaxed);
                let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.busy_ns.fetch_add(ns, Ordering::Relaxed);
                answer
            }
            other => {
                return Err(WireError::UnexpectedMessage {
                    expected: "Describe, Ask or Ping",
                    got: other.name(),
                })
            }
        };
        conn.write_frame(&reply).await
    }
}

/// Starts one instant agent per role on loopback; returns them with their peer addresses.
async fn start_agents(
    roles: &[&'static str],
) -> anyhow::Result<(Vec<Arc<InstantAgent>>, Vec<SocketAddr>)> {
    let mut agents = Vec::new();
    let mut addrs = Vec::new();
    for &role in roles {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        let agent = Arc::new(InstantAgent {
            role,
            asks: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
        });
        agents.push(Arc::clone(&agent));
        tokio::spawn(serve_peers(
            listener,
            ServeConfig::default(),
            agent,
            std::future::pending(),
        ));
    }
    Ok((agents, addrs))
}

/// One strategy's measurements.
#[derive(Serialize)]
struct Row {
    strategy: String,
    /// Whether a spotter agent classified the query (one more round trip) or keywords did.
    classified_by: String,
    requests: usize,
    /// Client-side wall time of a chat completion, ms.
    median_ms: f64,
    p90_ms: f64,
    max_ms: f64,
    /// `Ask`s the agents answered per request.
    asks_per_request: f64,
    /// The agents' own time per request, ms (the instant agents' work: building a reply).
    agents_ms_per_request: f64,
}

#[derive(Serialize)]
struct Report {
    head_model: String,
    agents: usize,
    /// `GET /health` on the head: the HTTP round trip every request pays.
    health_median_ms: f64,
    rows: Vec<Row>,
}

/// Runs the measurement: `requests` measured requests per strategy through a real head on
/// `head_model`; prints a table, or JSON with `json`.
pub fn swarm_overhead(head_model: &Path, requests: usize, json: bool) -> anyhow::Result<ExitCode> {
    let requests = requests.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut roles: Vec<&'static str> = ROLES.to_vec();
    roles.push("spotter");
    let (agents, addrs) = runtime.block_on(start_agents(&roles))?;
    let (spotter_addr, plain_addrs) = addrs.split_last().context("the agents did not start")?;

    let timeout = Duration::from_secs(30);
    let mut rows = Vec::new();
    let mut health_median_ms = 0.0;
    for with_spotter in [false, true] {
        let mut peers: Vec<SocketAddr> = plain_addrs.to_vec();
        if with_spotter {
            peers.push(*spotter_addr);
        }
        let head = LocalCluster::start_head(head_model, &peers, timeout)?;
        let client = Client::new(&head.url, None, timeout);
        client.wait_ready(Duration::from_secs(300), || {
            eprintln!("waiting for the head at {} to load…", head.url)
        })?;
        wait_agents_healthy(&client, peers.len())?;
        if !with_spotter {
            let mut health = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                client.health()?;
                health.push(t.elapsed().as_secs_f64() * 1e3);
            }
            health_median_ms = percentile(&mut health, 0.5);
        }
        let strategies: &[&str] = if with_spotter {
            &["fastest", "vote"]
        } else {
            &["fastest", "vote", "moa", "confidence", "speed", "strongest"]
        };
        for &strategy in strategies {
            let body = json!({
                "model": format!("swarm:{strategy}"),
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 16,
                "temperature": 0,
            });
            for _ in 0..WARMUP {
                check_reply(&client.chat(&body)?, strategy, with_spotter)?;
            }
            let (asks_before, busy_before) = totals(&agents);
            let mut ms = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                let reply = client.chat(&body)?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                check_reply(&reply, strategy, with_spotter)?;
            }
            let (asks, busy) = totals(&agents);
            rows.push(Row {
                strategy: strategy.to_owned(),
                classified_by: if with_spotter { "spotter" } else { "keywords" }.to_owned(),
                requests,
                median_ms: percentile(&mut ms, 0.5),
                p90_ms: percentile(&mut ms, 0.9),
                max_ms: percentile(&mut ms, 1.0),
                asks_per_request: (asks - asks_before) as f64 / requests as f64,
                agents_ms_per_request: (busy - busy_before) as f64 / 1e6 / requests as f64,
            });
        }
    }
    let report = Report {
        head_model: head_model.display().to_string(),
        agents: ROLES.len(),
        health_median_ms,
        rows,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "swarm head overhead: head model {}, {} instant agents (+ spotter), {} requests per row; GET /health median {:.3} ms",
            report.head_model, report.agents, requests, report.health_median_ms
        );
        println!(
            "strategy    classified  median ms  p90 ms  max ms  asks/request  agents ms/request"
        );
        for r in &report.rows {
            println!(
                "{:<11} {:<10} {:>9.3} {:>7.3} {:>7.3} {:>13.1} {:>18.4}",
                r.strategy,
                r.classified_by,
                r.median_ms,
                r.p90_ms,
                r.max_ms,
                r.asks_per_request,
                r.agents_ms_per_request
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `Ask`s answered and nanoseconds spent on them, over all the agents.
fn totals(agents: &[Arc<InstantAgent>]) -> (u64, u64) {
    agents.iter().fold((0, 0), |(asks, ns), g| {
        (
            asks + g.asks.load(Ordering::Relaxed),
            ns + g.busy_ns.load(Ordering::Relaxed),
        )
    })
}

/// Waits until the head's `/v1/swarm/status` shows `n` healthy agents.
fn wait_agents_healthy(client: &Client, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.get_json("/v1/swarm/status")?;
        let healthy = status["agents"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|x| x["healthy"] == true).count());
        if healthy == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the head sees {healthy} of {n} agents healthy after 30 s: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A measured request must be a real swarm answer, not an error that happened to be fast.
fn check_reply(
    reply: &crate::client::ChatReply,
    strategy: &str,
    with_spotter: bool,
) -> anyhow::Result<()> {
    let swarm = reply
        .swarm
        .as_ref()
        .context("the head's reply has no swarm report")?;
    let responded = swarm["agents_responded"].as_array().map_or(0, Vec::len);
    let classified_by = swarm["classified_by"].as_str().unwrap_or("");
    let expected = if with_spotter { "spotter" } else { "keywords" };
    if reply.content.trim().is_empty() || responded == 0 || classified_by != expected {
        bail!("{strategy}: not the swarm answer expected (classified by {classified_by:?}, {responded} agents responded): {swarm}");
    }
    Ok(())
}

/// The `q` quantile (0..=1) by rank; 0 for no samples.
fn percentile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        return 0.0;
    }
    let i = ((xs.len() - 1) as f64 * q).round() as usize;
    xs[i.min(xs.len() - 1)]
}
