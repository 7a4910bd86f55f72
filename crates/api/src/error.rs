//! Every HTTP error leaves through [`ApiError`], in OpenAI's shape:
//! `{"error":{"message","type","param","code"}}`. Clients (the `openai` packages,
//! LangChain, curl scripts) branch on the status and on `code`, so both are chosen here
//! and nowhere else.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_engine::EngineError;

use crate::state::AppState;

/// An error answer: HTTP status plus OpenAI's error object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, …
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client told to come back later should wait (`Retry-After`).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
pub(crate) struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400: the request is well-formed JSON but something in it is wrong.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400: `param` has a value outside what it may take.
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_request(message)
            .param(param)
            .code("invalid_value")
    }

    /// 400: `param` is required and absent.
    pub fn missing_param(param: &str) -> Self {
        Self::invalid_request(format!("you must provide `{param}`"))
            .param(param)
            .code("missing_required_parameter")
    }

    /// 400: the body is not JSON at all.
    pub fn malformed_json(detail: impl std::fmt::Display) -> Self {
        Self::invalid_request(format!(
            "we could not parse the JSON body of your request ({detail})"
        ))
        .code("invalid_json")
    }

    /// 400: prompt (plus the tokens asked for) does not fit the model's context.
    pub fn context_length_exceeded(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_request(message)
            .param(param)
            .code("context_length_exceeded")
    }

    /// The same error with another message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// 404: a model this node does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{model}` does not exist or you do not have access to it"),
        )
        .param("model")
        .code("model_not_found")
    }

    /// 404: no such route.
    pub fn unknown_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("unknown request URL: {method} {path}"),
        )
        .code("unknown_url")
    }

    /// 405: the route exists, not with this method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("method {method} is not allowed for {path}"),
        )
        .code("method_not_allowed")
    }

    /// 401: an API key is configured and the request did not carry it.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid or missing API key: send `Authorization: Bearer <key>`",
        )
        .code("invalid_api_key")
    }

    /// This error, telling the client to try again in `seconds` (`Retry-After`).
    pub fn retry_in(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 429: the queue for the engine is full; come back in `retry_after` seconds.
    pub fn queue_full(waiting: usize, retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is busy: {waiting} requests are waiting already; try again shortly"
            ),
        )
        .code("queue_full");
        e.retry_after = Some(retry_after);
        e
    }

    /// 408: the client took too long to send its request.
    pub fn request_timeout(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} s",
                after.as_secs()
            ),
        )
        .code("request_timeout")
    }

    /// 503: the model is not loaded (yet, or at all).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            message,
        )
        .code("model_not_ready")
    }

    /// 500: our fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// A failure from the engine while preparing a request. Input problems (a template
    /// that rejects the conversation, a prompt too long) are the client's; the rest ours.
    pub(crate) fn from_engine(err: EngineError, param: &str) -> Self {
        match err {
            EngineError::ContextFull { needed, limit } => Self::context_length_exceeded(
                param,
                format!(
                    "this model's maximum context length is {limit} tokens, \
                     but {needed} are needed; shorten the {param}"
                ),
            ),
            EngineError::InvalidInput(msg) => Self::invalid_request(msg).param(param),
            e @ EngineError::ChatTemplate(_) => Self::invalid_request(e.to_string()).param(param),
            other => Self::internal(other.to_string()),
        }
    }

    /// A ring's failure as the client sees it: its own request's fault — empty, longer than
    /// the context (`context_length_exceeded`), or refused by a stage as a bad request (a
    /// JSON schema no token can continue, drawn at the last stage) — or ours: a lost or busy
    /// stage, a timeout, the head's own engine failing, a 503 the client may retry.
    pub(crate) fn from_pipeline(err: shoal_pipeline::PipelineError, param: &str) -> Self {
        use shoal_pipeline::PipelineError;
        use shoal_wire::ErrorCode;
        match err {
            PipelineError::InvalidRequest(message) => Self::invalid_value(param, message),
            PipelineError::Engine(e @ EngineError::ContextFull { .. }) => {
                Self::from_engine(e, param)
            }
            PipelineError::Rejected { code, message } if code == ErrorCode::CONTEXT_LENGTH => {
                Self::context_length_exceeded(param, message)
            }
            PipelineError::Rejected { code, message } if code == ErrorCode::BAD_REQUEST => {
                Self::invalid_request(format!("a stage refused the request: {message}"))
                    .param(param)
            }
            e => Self::unavailable(format!("the pipeline failed: {e}")),
        }
    }

    /// The error object, for SSE streams that fail after their 200 was sent.
    pub(crate) fn object(&self) -> ErrorObject<'_> {
        ErrorObject {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }
    }

    /// The error body as JSON text.
    pub fn body(&self) -> String {
        let body = ErrorBody {
            error: self.object(),
        };
        // Serializing plain strings cannot fail; an empty object is a safe fallback.
        serde_json::to_string(&body).unwrap_or_else(|_| "{}".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "request rejected");
        }
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON body extractor whose rejections are [`ApiError`]s: malformed JSON and fields of
/// the wrong type are 400s naming the offending field, not axum's plain-text 415/422.
///
/// The `Content-Type` is not checked, since `curl -d` sends a form type and llama-server
/// accepts it too.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T> FromRequest<AppState> for Json<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    /// Reads the body within the node's request-read timeout (a client that trickles its
    /// body gets a 408), then parses it.
    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let within = state.limits().request_read_timeout;
        let read = tokio::time::timeout(within, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::request_timeout(within))?;
        let bytes = read.map_err(|rejection| {
            ApiError::new(
                rejection.status(),
                "invalid_request_error",
                rejection.body_text(),
            )
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses a request body, telling malformed JSON from well-formed JSON of the wrong shape.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.classify() != serde_json::error::Category::Data {
            return ApiError::malformed_json(inner);
        }
        let param = if path == "." {
            missing_field_name(&inner.to_string())
        } else {
            Some(path)
        };
        let message = match &param {
            Some(p) => format!("invalid value for `{p}`: {inner}"),
            None => format!("invalid request body: {inner}"),
        };
        let mut e = ApiError::invalid_request(message).code("invalid_value");
        e.param = param;
        e
    })?;
    de.end().map_err(ApiError::malformed_json)?;
    Ok(value)
}

/// serde reports a missing field at the parent's path; the field's name is in the message.
fn missing_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Req {
        messages: Vec<String>,
        n: Option<u32>,
    }

    /// A ring's failure is the client's only when its request is at fault; a lost or busy
    /// stage, a timeout or the head's own engine failing is a 503, which clients retry.
    #[test]
    fn ring_failures_are_the_clients_only_for_its_request() {
        use shoal_pipeline::PipelineError;
        use shoal_wire::ErrorCode;
        let ring = |e: PipelineError| ApiError::from_pipeline(e, "prompt");
        let empty = ring(PipelineError::InvalidRequest("the prompt is empty".into()));
        assert_eq!(
            (empty.status.as_u16(), empty.param),
            (400, Some("prompt".into()))
        );
        let too_long = |e| {
            let e = ring(e);
            assert_eq!(e.status.as_u16(), 400, "{e:?}");
            assert_eq!(e.code, Some("context_length_exceeded"), "{e:?}");
        };
        too_long(PipelineError::Engine(EngineError::ContextFull {
            needed: 5000,
            limit: 2048,
        }));
        too_long(PipelineError::Rejected {
            code: ErrorCode::CONTEXT_LENGTH,
            message: "the context is full".into(),
        });
        let dead_end = ring(PipelineError::Rejected {
            code: ErrorCode::BAD_REQUEST,
            message: "no token can continue the constrained JSON answer".into(),
        });
        assert_eq!(dead_end.status.as_u16(), 400);
        assert!(dead_end.message.contains("JSON"), "{}", dead_end.message);
        for ours in [
            PipelineError::StageFailed("gone".into()),
            PipelineError::Rejected {
                code: ErrorCode::OVERLOADED,
                message: "too many sessions".into(),
            },
            PipelineError::Engine(EngineError::InvalidInput("no output".into())),
        ] {
            assert_eq!(ring(ours).status.as_u16(), 503);
        }
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        let e = parse_json::<Req>(b"{\"messages\": [").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("invalid_json"));
        let e = parse_json::<Req>(b"{\"messages\": []} trailing").unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse_json::<Req>(br#"{"messages": [], "n": "two"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = parse_json::<Req>(br#"{"messages": ["a", 3]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1]"));
        let e = parse_json::<Req>(br#"{"n": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn body_has_openai_shape() {
        let body: serde_json::Value =
            serde_json::from_str(&ApiError::model_not_found("gpt-9").body()).unwrap();
        let error = &body["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], "model");
        assert_eq!(error["code"], "model_not_found");
        assert!(error["message"].as_str().unwrap().contains("gpt-9"));
        let body: serde_json::Value =
            serde_json::from_str(&ApiError::internal("boom").body()).unwrap();
        assert!(body["error"]["param"].is_null());
        assert!(body["error"]["code"].is_null());
    }
}
