//! Whole API requests through the swarm: an [`Ask`](shoal_wire::Ask) may carry the client's
//! OpenAI chat request, which the agent answers through its node's own chat API — tools,
//! `response_format`, log-probabilities, `n`, `ignore_eos`, all rendered with the agent's
//! own chat template and parsed back in its own tool-call format. The swarm crate knows
//! nothing of HTTP: the node hands the agent a [`ChatApi`] (the API crate makes it).

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;
use shoal_wire::Finish;

/// Answers a whole OpenAI chat completion request (JSON text, not streamed) as this node's
/// chat API answers a client: the response's JSON, or why it was refused. Dropping the
/// future stops the generation.
pub type ChatApi =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<String, ApiRefusal>> + Send + Sync>;

/// Why the chat API did not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRefusal {
    /// The HTTP status it answered with (4xx: the request; 5xx: this node).
    pub status: u16,
    /// Its error's `code` (OpenAI's, e.g. `context_length_exceeded`), if it gave one.
    pub code: Option<String>,
    pub message: String,
}

/// What the head needs of a chat API response to compare answers: a plain text of the
/// first choice (its content, then each tool call as a line of JSON), why it ended, and
/// the token counts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResponseSummary {
    pub(crate) text: String,
    pub(crate) finish: Finish,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
}

/// Reads `response` (a `chat.completion` object).
pub(crate) fn summarize(response: &str) -> Result<ResponseSummary, String> {
    let value: Value = serde_json::from_str(response)
        .map_err(|e| format!("the chat API's answer is not JSON: {e}"))?;
    let choice = value
        .pointer("/choices/0")
        .ok_or("the chat API's answer has no choice")?;
    let mut text = choice
        .pointer("/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let calls = choice
        .pointer("/message/tool_calls")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for call in calls {
        let name = call
            .pointer("/function/name")
            .cloned()
            .unwrap_or(Value::Null);
        // Arguments come as a JSON string; compared parsed, with their keys sorted, so
        // neither spacing nor key order splits votes (JSON objects keep their order).
        let mut arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .map(|a| serde_json::from_str(a).unwrap_or_else(|_| Value::from(a)))
            .unwrap_or(Value::Null);
        arguments.sort_all_objects();
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&serde_json::json!({"name": name, "arguments": arguments}).to_string());
    }
    let finish = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => Finish::Length,
        _ => Finish::Stop,
    };
    let tokens = |what: &str| {
        value
            .pointer(&format!("/usage/{what}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(ResponseSummary {
        text,
        finish,
        prompt_tokens: tokens("prompt_tokens"),
        completion_tokens: tokens("completion_tokens"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_call_answer_reads_as_one_line_per_call() {
        let response = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather",
            "arguments":"{\"city\": \"Paris\"}"}}]},"finish_reason":"tool_calls"}],
            "usage":{"prompt_tokens":90,"completion_tokens":21,"total_tokens":111}}"#;
        let summary = summarize(response).unwrap();
        let call: Value = serde_json::from_str(&summary.text).unwrap();
        assert_eq!(
            call,
            serde_json::json!({"name": "get_weather", "arguments": {"city": "Paris"}})
        );
        assert_eq!(summary.finish, Finish::Stop);
        assert_eq!((summary.prompt_tokens, summary.completion_tokens), (90, 21));
    }

    #[test]
    fn the_same_call_reads_the_same_whatever_its_key_order_and_spacing() {
        let answer = |arguments: &str| {
            let response = serde_json::json!({"choices": [{"message": {"content": null,
                "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}}]});
            summarize(&response.to_string()).unwrap().text
        };
        assert_eq!(
            answer(r#"{"city": "Paris", "days": {"from": 1, "to": 2}}"#),
            answer(r#"{"days":{"to":2,"from":1},"city":"Paris"}"#)
        );
    }

    #[test]
    fn content_then_calls_and_a_cut_answer() {
        let response = r#"{"choices":[{"message":{"content":"Let me look.","tool_calls":[
            {"function":{"name":"f","arguments":"not json"}}]},"finish_reason":"length"}]}"#;
        let summary = summarize(response).unwrap();
        let (content, call) = summary.text.split_once('\n').unwrap();
        assert_eq!(content, "Let me look.");
        let call: Value = serde_json::from_str(call).unwrap();
        assert_eq!(
            call,
            serde_json::json!({"name": "f", "arguments": "not json"})
        );
        assert_eq!(summary.finish, Finish::Length);
        assert_eq!(summary.prompt_tokens, 0);
    }

    #[test]
    fn what_is_not_a_chat_completion_is_an_error() {
        assert!(summarize("[1, 2").is_err());
        assert!(summarize(r#"{"choices": []}"#).is_err());
    }
}
