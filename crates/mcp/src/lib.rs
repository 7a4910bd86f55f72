//! `shoal mcp`: an MCP server over stdio, built on the official Rust SDK (`rmcp`), in front
//! of a running Shoal node or cluster. Claude Desktop, opencode and other MCP hosts start it
//! as a subprocess and get five tools:
//!
//! - `chat` — ask the node (its own model, or its ring of stages) or, with a `strategy`, its
//!   swarm; the answer's text comes back, with what the swarm did.
//! - `cluster_status` — what the node serves and, on a swarm head, its agents.
//! - `list_models` — the model ids the node answers to.
//! - `node_details` — the node's health and its key Prometheus figures.
//! - `hardware_info` — this device's CPU, memory, GPUs, temperatures, battery, and the model
//!   it would run (the device `shoal mcp` runs on, usually the node's own).
//!
//! It speaks to the node through its HTTP API (`--url`, default the local node), so it
//! needs no model of its own and works against any node, with `--api-key` when the node
//! has one. Every call has a deadline; a node that is down is a tool error the host shows,
//! not a crash.

use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// Where the node is and how to reach it.
#[derive(Clone, Debug)]
pub struct McpConfig {
    /// The node's base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Sent as the bearer token when the node wants one.
    pub api_key: Option<String>,
    /// Longest a call to the node may take (a chat answer included).
    pub timeout: Duration,
}

/// Why `shoal mcp` stopped.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("the MCP session failed: {0}")]
    Session(String),
}

/// Serves MCP on stdin/stdout until the host closes them.
pub async fn serve_stdio(config: McpConfig) -> Result<(), McpError> {
    let server = ShoalTools::new(config)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Session(e.to_string()))?;
    server
        .waiting()
        .await
        .map_err(|e| McpError::Session(e.to_string()))?;
    Ok(())
}

/// The node's HTTP API, called with a deadline.
#[derive(Clone)]
struct Node {
    config: McpConfig,
    agent: ureq::Agent,
}

/// One answer from the node: its status and body.
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| Value::String(self.body.clone()))
    }
}

impl Node {
    fn new(config: McpConfig) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("shoal-mcp/", env!("CARGO_PKG_VERSION")))
            .timeout_global(Some(config.timeout))
            .build()
            .into();
        Self { config, agent }
    }

    /// `GET` or `POST` (with a JSON body) on the node, off the async threads.
    /// `Err` carries a message for the host: the node could not be reached or read.
    async fn call(&self, path: &str, body: Option<Value>) -> Result<Reply, String> {
        let node = self.clone();
        let url = format!("{}{path}", self.config.url.trim_end_matches('/'));
        tokio::task::spawn_blocking(move || node.call_blocking(&url, body))
            .await
            .map_err(|e| format!("the call to the node failed: {e}"))?
    }

    fn call_blocking(&self, url: &str, body: Option<Value>) -> Result<Reply, String> {
        let auth = self.config.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let result = match body {
            None => {
                let mut req = self.agent.get(url);
                if let Some(auth) = &auth {
                    req = req.header("Authorization", auth);
                }
                req.call()
            }
            Some(body) => {
                let mut req = self
                    .agent
                    .post(url)
                    .header("Content-Type", "application/json");
                if let Some(auth) = &auth {
                    req = req.header("Authorization", auth);
                }
                req.send(body.to_string())
            }
        };
        let mut response = result.map_err(|e| {
            format!(
                "cannot reach the Shoal node at {}: {e} (is `shoal serve` running there? set \
                 it with --url)",
                self.config.url
            )
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("the node's answer could not be read: {e}"))?;
        Ok(Reply { status, body })
    }
}

/// `chat`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ChatArgs {
    /// What to ask.
    pub prompt: String,
    /// A system message to put first.
    pub system: Option<String>,
    /// Most tokens to generate (default: the node's).
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 (greedy) to 2.
    pub temperature: Option<f32>,
    /// Ask the swarm instead of one model: `auto`, `fastest`, `vote`, `moa`, … (see the
    /// node's `list_models`); the node must be a swarm head.
    pub strategy: Option<String>,
}

/// The MCP tools, each a call to the node.
#[derive(Clone)]
pub struct ShoalTools {
    node: Node,
    tool_router: ToolRouter<Self>,
}

/// The node's reply, or return the tool error saying why there is none.
macro_rules! reply {
    ($call:expr) => {
        match $call.await {
            Ok(reply) => reply,
            Err(message) => {
                return Ok(CallToolResult::error(vec![ContentBlock::text(message)]));
            }
        }
    };
}

fn text_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text)])
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// The node said no: the host sees its message as a tool error.
fn node_error(what: &str, reply: &Reply) -> CallToolResult {
    let message = reply
        .json()
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| reply.body.clone());
    CallToolResult::error(vec![ContentBlock::text(format!(
        "{what}: the node answered {}: {message}",
        reply.status
    ))])
}

#[tool_router]
impl ShoalTools {
    pub fn new(config: McpConfig) -> Self {
        Self {
            node: Node::new(config),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Ask the Shoal node a question and get its answer. Runs on the \
                          node's model (or its pipeline of devices); with `strategy`, the \
                          node's swarm of models answers together."
    )]
    async fn chat(
        &self,
        Parameters(args): Parameters<ChatArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let model = match &args.strategy {
            Some(s) if s.is_empty() || s == "swarm" => Some("swarm".to_owned()),
            Some(s) => Some(format!("swarm:{s}")),
            None => None,
        };
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": args.prompt}));
        let mut body = json!({"messages": messages});
        if let Some(m) = model {
            body["model"] = Value::String(m);
        }
        if let Some(n) = args.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = args.temperature {
            body["temperature"] = json!(t);
        }
        let reply = reply!(self.node.call("/v1/chat/completions", Some(body)));
        if reply.status != 200 {
            return Ok(node_error("chat", &reply));
        }
        let answer = reply.json();
        let text = answer
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut blocks = vec![ContentBlock::text(text)];
        // What the swarm did (which agents, which answer won and why), for the curious.
        if let Some(swarm) = answer.get("swarm") {
            blocks.push(ContentBlock::text(format!("swarm: {}", pretty(swarm))));
        }
        Ok(CallToolResult::success(blocks))
    }

    #[tool(
        description = "What the Shoal node serves: its health, its models and, on a swarm \
                          head, the swarm's agents and their state."
    )]
    async fn cluster_status(&self) -> Result<CallToolResult, ErrorData> {
        let health = reply!(self.node.call("/health", None));
        let models = reply!(self.node.call("/v1/models", None));
        let swarm = reply!(self.node.call("/v1/swarm/status", None));
        let status = json!({
            "node": self.node.config.url,
            "health": health.json(),
            "models": models.json().get("data").cloned().unwrap_or(Value::Null),
            "swarm": if swarm.status == 200 { swarm.json() } else { Value::Null },
        });
        Ok(text_result(pretty(&status)))
    }

    #[tool(
        description = "The model ids the Shoal node answers to (its model, and `swarm`, \
                          `swarm:STRATEGY` on a swarm head)."
    )]
    async fn list_models(&self) -> Result<CallToolResult, ErrorData> {
        let reply = reply!(self.node.call("/v1/models", None));
        if reply.status != 200 {
            return Ok(node_error("list_models", &reply));
        }
        let ids: Vec<Value> = reply
            .json()
            .get("data")
            .and_then(Value::as_array)
            .map(|data| data.iter().filter_map(|m| m.get("id").cloned()).collect())
            .unwrap_or_default();
        Ok(text_result(pretty(&Value::Array(ids))))
    }

    #[tool(
        description = "The Shoal node's health and its key figures: requests served, \
                          tokens read and generated, requests in flight and queued."
    )]
    async fn node_details(&self) -> Result<CallToolResult, ErrorData> {
        let health = reply!(self.node.call("/health", None));
        let metrics = reply!(self.node.call("/metrics", None));
        let figures: serde_json::Map<String, Value> = if metrics.status == 200 {
            key_figures(&metrics.body)
        } else {
            serde_json::Map::new()
        };
        let details = json!({
            "node": self.node.config.url,
            "health": health.json(),
            "metrics": figures,
        });
        Ok(text_result(pretty(&details)))
    }

    #[tool(
        description = "This device's hardware: CPU model, cores and SIMD features, memory \
                          total and available, GPUs, temperatures, battery, and the model it \
                          would run."
    )]
    async fn hardware_info(&self) -> Result<CallToolResult, ErrorData> {
        let info = tokio::task::spawn_blocking(|| {
            let hw = shoal_models::hardware::Hardware::detect();
            let pick = hw.recommend();
            json!({"hardware": hw, "recommended": pick})
        })
        .await
        .map_err(|e| ErrorData::internal_error(format!("detection failed: {e}"), None))?;
        Ok(text_result(pretty(&info)))
    }
}

/// The unlabelled counters and gauges of a Prometheus text page, plus labelled totals summed
/// over their labels (`shoal_requests_total` over endpoints and statuses).
fn key_figures(page: &str) -> serde_json::Map<String, Value> {
    let mut figures = serde_json::Map::new();
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if name.ends_with("_bucket") || name.ends_with("_created") {
            continue;
        }
        let slot = figures.entry(name.to_owned()).or_insert(json!(0.0));
        *slot = json!(slot.as_f64().unwrap_or(0.0) + value);
    }
    figures
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ShoalTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "Shoal turns a home's devices into one LLM service. `chat` asks it; \
             `cluster_status`, `list_models` and `node_details` describe it; `hardware_info` \
             describes this device.",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_figures_are_summed_over_labels() {
        let page = "# HELP x\nshoal_requests_total{endpoint=\"/a\",status=\"200\"} 3\n\
                    shoal_requests_total{endpoint=\"/b\",status=\"400\"} 2\n\
                    shoal_in_flight 1\nshoal_ttft_seconds_bucket{le=\"0.1\"} 9\n# EOF\n";
        let f = key_figures(page);
        assert_eq!(f["shoal_requests_total"], json!(5.0));
        assert_eq!(f["shoal_in_flight"], json!(1.0));
        assert!(!f.contains_key("shoal_ttft_seconds_bucket"));
    }
}
