//! The few calls `shoal eval` makes to an OpenAI-compatible API, blocking.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

/// Why a request got no usable answer.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// No connection, or it broke: the server is not there (any more).
    Unreachable(String),
    /// The request took longer than the request timeout.
    Timeout(String),
    /// A status other than 200, with the API's error message.
    Status { status: u16, message: String },
    /// A 200 whose body is not a chat completion.
    Invalid(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Unreachable(e) => write!(f, "cannot reach the API: {e}"),
            RequestError::Timeout(e) => write!(f, "the request timed out: {e}"),
            RequestError::Status { status, message } => {
                write!(f, "the API answered {status}: {message}")
            }
            RequestError::Invalid(e) => write!(f, "not a chat completion: {e}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// A chat completion's answer and what the eval keeps of the rest.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChatReply {
    pub(crate) content: String,
    pub(crate) finish_reason: Option<String>,
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    /// The head's `swarm` object, when it reports one.
    pub(crate) swarm: Option<Value>,
    /// `agents_responded`, at the top level or inside `swarm`, when reported.
    pub(crate) agents_responded: Option<Value>,
}

/// A client of one server.
pub(crate) struct Client {
    agent: ureq::Agent,
    base: String,
    api_key: Option<String>,
}

/// `http://host:port` from what a user may type: no trailing `/`, no `/v1`.
pub(crate) fn base_url(url: &str) -> String {
    let mut base = url.trim().trim_end_matches('/').to_string();
    if base.ends_with("/v1") {
        base.truncate(base.len() - 3);
    }
    if !base.contains("://") {
        base = format!("http://{base}");
    }
    base
}

/// OpenAI's `error.message` from an error body, else the body itself (shortened).
pub(crate) fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    if let Some(m) = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(Value::as_str)
    {
        return m.to_string();
    }
    let body = body.trim();
    if body.is_empty() {
        return "(empty body)".into();
    }
    let mut s: String = body.chars().take(300).collect();
    if s.len() < body.len() {
        s.push('…');
    }
    s
}

/// The parts of a chat completion body the eval uses.
pub(crate) fn parse_chat(body: &str) -> Result<ChatReply, RequestError> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| RequestError::Invalid(format!("{e}: {}", error_message(body))))?;
    let choice = v
        .pointer("/choices/0")
        .ok_or_else(|| RequestError::Invalid("no choices".into()))?;
    let content = match choice.pointer("/message/content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => {
            return Err(RequestError::Invalid(format!(
                "message.content is not a string: {other}"
            )))
        }
    };
    let swarm = v.get("swarm").filter(|s| !s.is_null()).cloned();
    let agents_responded = v
        .get("agents_responded")
        .or_else(|| swarm.as_ref().and_then(|s| s.get("agents_responded")))
        .filter(|a| !a.is_null())
        .cloned();
    Ok(ChatReply {
        content,
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        prompt_tokens: v.pointer("/usage/prompt_tokens").and_then(Value::as_u64),
        completion_tokens: v
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64),
        swarm,
        agents_responded,
    })
}

impl Client {
    pub(crate) fn new(url: &str, api_key: Option<String>, request_timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            // Statuses are answers we report, not transport errors.
            .http_status_as_error(false)
            .user_agent(concat!("shoal-eval/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(request_timeout))
            .build()
            .into();
        Client {
            agent,
            base: base_url(url),
            api_key,
        }
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn transport(e: ureq::Error) -> RequestError {
        match e {
            ureq::Error::Timeout(t) => RequestError::Timeout(t.to_string()),
            other => RequestError::Unreachable(other.to_string()),
        }
    }

    fn finish(
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, String), RequestError> {
        let mut response = result.map_err(Self::transport)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(Self::transport)?;
        Ok((status, body))
    }

    fn get(&self, path: &str) -> Result<(u16, String), RequestError> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        Self::finish(req.call())
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<(u16, String), RequestError> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .content_type("application/json");
        if let Some(key) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        Self::finish(req.send(body.to_string()))
    }

    fn unreachable(&self, e: &RequestError) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach the Shoal API at {} ({e}); is `shoal serve` running there? (--url)",
            self.base
        )
    }

    /// Waits until `GET /health` says the model is loaded (200), at most `wait`.
    /// A server without `/health` (404) is taken as ready.
    pub(crate) fn wait_ready(
        &self,
        wait: Duration,
        mut on_wait: impl FnMut(),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait;
        let mut told = false;
        loop {
            match self.get("/health") {
                Ok((200, _)) | Ok((404, _)) => return Ok(()),
                Ok((503, body)) => {
                    if Instant::now() >= deadline {
                        bail!(
                            "the server at {} is still not ready after {:.0} s: {}",
                            self.base,
                            wait.as_secs_f64(),
                            error_message(&body)
                        );
                    }
                    if !told {
                        on_wait();
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                Ok((401, body)) => bail!(
                    "the API at {} wants a key: {} (pass --api-key or set SHOAL_API_KEY)",
                    self.base,
                    error_message(&body)
                ),
                Ok((status, body)) => bail!(
                    "GET {}/health answered {status}: {}",
                    self.base,
                    error_message(&body)
                ),
                Err(e @ RequestError::Unreachable(_)) => return Err(self.unreachable(&e)),
                Err(e) => bail!("GET {}/health: {e}", self.base),
            }
        }
    }

    /// `GET /health`, expecting 200.
    pub(crate) fn health(&self) -> anyhow::Result<()> {
        match self.get("/health") {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => bail!(
                "GET {}/health answered {status}: {}",
                self.base,
                error_message(&body)
            ),
            Err(e) => bail!("GET {}/health: {e}", self.base),
        }
    }

    /// `GET path` as JSON, expecting 200.
    pub(crate) fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        match self.get(path) {
            Ok((200, body)) => serde_json::from_str(&body)
                .map_err(|e| anyhow::anyhow!("GET {}{path}: not JSON ({e})", self.base)),
            Ok((status, body)) => bail!(
                "GET {}{path} answered {status}: {}",
                self.base,
                error_message(&body)
            ),
            Err(e) => bail!("GET {}{path}: {e}", self.base),
        }
    }

    /// The first model id of `GET /v1/models`.
    pub(crate) fn first_model(&self) -> anyhow::Result<String> {
        match self.get("/v1/models") {
            Ok((200, body)) => {
                let v: Value = serde_json::from_str(&body)
                    .map_err(|e| anyhow::anyhow!("GET {}/v1/models: not JSON ({e})", self.base))?;
                match v.pointer("/data/0/id").and_then(Value::as_str) {
                    Some(id) => Ok(id.to_string()),
                    None => bail!(
                        "GET {}/v1/models lists no model; name one with --model",
                        self.base
                    ),
                }
            }
            Ok((status, body)) => bail!(
                "GET {}/v1/models answered {status}: {}",
                self.base,
                error_message(&body)
            ),
            Err(e @ RequestError::Unreachable(_)) => Err(self.unreachable(&e)),
            Err(e) => bail!("GET {}/v1/models: {e}", self.base),
        }
    }

    /// `POST /v1/chat/completions` with `body`; a 200 with a completion, else why not.
    pub(crate) fn chat(&self, body: &Value) -> Result<ChatReply, RequestError> {
        let (status, text) = self.post_json("/v1/chat/completions", body)?;
        if status != 200 {
            return Err(RequestError::Status {
                status,
                message: error_message(&text),
            });
        }
        parse_chat(&text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalized() {
        assert_eq!(base_url("http://127.0.0.1:8080/"), "http://127.0.0.1:8080");
        assert_eq!(base_url("http://h:1/v1"), "http://h:1");
        assert_eq!(base_url("http://h:1/v1/"), "http://h:1");
        assert_eq!(base_url("127.0.0.1:9"), "http://127.0.0.1:9");
    }

    #[test]
    fn openai_error_messages_are_extracted() {
        let body = r#"{"error":{"message":"model `x` does not exist","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        assert_eq!(error_message(body), "model `x` does not exist");
        assert_eq!(error_message("Bad Gateway"), "Bad Gateway");
        assert_eq!(error_message(""), "(empty body)");
    }

    #[test]
    fn completions_are_parsed_with_swarm_details() {
        let body = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6},"swarm":{"strategy":"vote","agents_responded":["a","b"]}}"#;
        let r = parse_chat(body).unwrap();
        assert_eq!(r.content, "hi");
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(r.completion_tokens, Some(1));
        assert_eq!(r.swarm.unwrap()["strategy"], "vote");
        assert_eq!(r.agents_responded.unwrap(), serde_json::json!(["a", "b"]));

        let plain = r#"{"choices":[{"message":{"content":null}}]}"#;
        let r = parse_chat(plain).unwrap();
        assert_eq!(r.content, "");
        assert!(r.swarm.is_none() && r.agents_responded.is_none());

        assert!(matches!(parse_chat("{}"), Err(RequestError::Invalid(_))));
        assert!(matches!(parse_chat("nope"), Err(RequestError::Invalid(_))));
    }
}
