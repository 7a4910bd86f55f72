//! OpenAI's request and response objects, as far as Shoal serves them.
//!
//! One request struct serves both `/v1/chat/completions` and `/v1/completions`: the
//! sampling fields are the same, and each handler checks that the field it needs
//! (`messages` or `prompt`) is present. Unknown fields are ignored, as OpenAI clients send
//! many we have no use for.

use serde::{Deserialize, Serialize};

/// The body of a completion request (chat or plain). Serialized to pass a whole request
/// on to a swarm agent's own chat API.
#[derive(Debug, Default, Deserialize, Serialize)]
pub(crate) struct CompletionRequest {
    pub(crate) model: Option<String>,
    /// Chat only.
    pub(crate) messages: Option<Vec<MessageIn>>,
    /// Completions only.
    pub(crate) prompt: Option<Prompt>,
    /// Completions only: the text after the gap, for fill-in-the-middle (`prompt` is the
    /// text before it).
    pub(crate) suffix: Option<String>,
    /// Set by llama-server's `/infill` (never read from a body): fill in the middle between
    /// `prompt` and this, with other files for context.
    #[serde(skip)]
    pub(crate) infill: Option<Infill>,
    pub(crate) max_tokens: Option<i64>,
    /// The chat API's newer name for `max_tokens`; wins when both are present.
    pub(crate) max_completion_tokens: Option<i64>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) seed: Option<serde_json::Number>,
    pub(crate) stop: Option<Stop>,
    pub(crate) frequency_penalty: Option<f32>,
    pub(crate) presence_penalty: Option<f32>,
    pub(crate) n: Option<i64>,
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
    // llama-server's extras.
    pub(crate) top_k: Option<i64>,
    pub(crate) min_p: Option<f32>,
    pub(crate) repeat_penalty: Option<f32>,
    pub(crate) repeat_last_n: Option<i64>,
    /// llama-server's: never end at an end-of-generation token.
    pub(crate) ignore_eos: Option<bool>,
    /// llama-server's: reuse a kept prompt prefix and keep this prompt (default true).
    pub(crate) cache_prompt: Option<bool>,
    /// Chat only: the functions the model may call.
    pub(crate) tools: Option<Vec<serde_json::Value>>,
    pub(crate) tool_choice: Option<serde_json::Value>,
    pub(crate) parallel_tool_calls: Option<bool>,
    /// llama-server's: more variables for the chat template (`{"enable_thinking": false}`).
    pub(crate) chat_template_kwargs: Option<serde_json::Value>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    pub(crate) response_format: Option<serde_json::Value>,
    /// Chat: `true` for each token's log-probability; completions: how many alternatives
    /// per token (OpenAI's legacy field is a number).
    pub(crate) logprobs: Option<serde_json::Value>,
    /// Chat: how many alternatives per token, with `logprobs: true`.
    pub(crate) top_logprobs: Option<i64>,
    /// Shoal's, for swarm models: the request's time budget in seconds (0 < s ≤ 3600); the
    /// swarm answers with the best it has when it ends. Ignored by a single model.
    pub(crate) timeout_s: Option<f64>,
}

/// A fill-in-the-middle request: the text after the gap, other files (name, text), and
/// how much of each part to keep (`None`: all, or the context refuses it).
#[derive(Debug, Default)]
pub(crate) struct Infill {
    pub(crate) suffix: String,
    pub(crate) files: Vec<(String, String)>,
    pub(crate) limits: Option<shoal_engine::InfillLimits>,
}

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct StreamOptions {
    pub(crate) include_usage: Option<bool>,
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub(crate) fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `prompt`: a string, a batch of one string, or token ids.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct MessageIn {
    pub(crate) role: String,
    /// Absent or null on assistant messages that only carried tool calls.
    #[serde(default)]
    pub(crate) content: Option<Content>,
    /// Assistant messages: the calls the model made, as the API returned them.
    #[serde(default)]
    pub(crate) tool_calls: Option<Vec<serde_json::Value>>,
    /// Tool messages: which call this is the result of.
    #[serde(default)]
    pub(crate) tool_call_id: Option<String>,
    #[serde(default)]
    pub(crate) name: Option<String>,
}

impl MessageIn {
    /// A user message with `text`.
    pub(crate) fn user(text: String) -> Self {
        MessageIn {
            role: "user".to_owned(),
            content: Some(Content::Text(text)),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// A message's content: a string, or an array of typed parts of which we read the text.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) text: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) total_tokens: usize,
    /// How many prompt tokens came from the prompt cache, as OpenAI reports its own.
    pub(crate) prompt_tokens_details: PromptTokensDetails,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub(crate) struct PromptTokensDetails {
    pub(crate) cached_tokens: usize,
}

impl Usage {
    /// This usage and another choice's of the same prompt (`n` > 1): the prompt counted
    /// once, the completions added.
    pub(crate) fn with_more_choice(self, other: Usage) -> Self {
        Usage::new(
            self.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )
        .with_cached(self.prompt_tokens_details.cached_tokens)
    }

    pub(crate) fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails::default(),
        }
    }

    /// Of the prompt's tokens, `cached` were reused from the prompt cache.
    pub(crate) fn with_cached(mut self, cached: usize) -> Self {
        self.prompt_tokens_details.cached_tokens = cached;
        self
    }

    /// Prompt tokens that were computed.
    pub(crate) fn uncached_prompt_tokens(&self) -> usize {
        self.prompt_tokens
            - self
                .prompt_tokens_details
                .cached_tokens
                .min(self.prompt_tokens)
    }
}

/// `chat.completion` and `chat.completion.chunk`; `text_completion` (both ways).
#[derive(Debug, Serialize)]
pub(crate) struct CompletionObject<'a, C> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) system_fingerprint: &'static str,
    pub(crate) choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Usage>,
    /// Swarm answers only: the query type, strategy and who answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) swarm: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice {
    pub(crate) index: u32,
    pub(crate) message: MessageOut,
    pub(crate) logprobs: Option<serde_json::Value>,
    pub(crate) finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct MessageOut {
    pub(crate) role: &'static str,
    /// `null` when the answer is only tool calls, as OpenAI sends it.
    pub(crate) content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) tool_calls: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChunkChoice {
    pub(crate) index: u32,
    pub(crate) delta: Delta,
    pub(crate) logprobs: Option<serde_json::Value>,
    pub(crate) finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tool_calls: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct TextChoice {
    pub(crate) index: u32,
    pub(crate) text: String,
    pub(crate) logprobs: Option<serde_json::Value>,
    pub(crate) finish_reason: Option<&'static str>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelList<'a> {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<ModelObject<'a>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ModelObject<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) owned_by: &'static str,
}
