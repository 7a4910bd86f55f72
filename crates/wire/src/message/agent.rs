//! `Describe`, `AgentCard`, `Ask` and `Answer`: the head talks to swarm agents (design §4,
//! issue #5).
//!
//! A swarm agent runs a whole model with a role prompt. The head learns who an agent is with
//! `Describe` → [`AgentCard`] (role, model, measured speed, load), and puts a question to it
//! with [`Ask`] → [`Answer`]. A request that cannot be served (a prompt longer than the
//! context, a template that refuses the turns) is answered with an `Error` whose `session_id`
//! is the `Ask`'s `request_id`; the connection stays usable.
//!
//! Unlike a ring's `Forward`, an `Ask` is whole text, not tokens: agents may run different
//! models with different tokenizers and chat templates, and each renders the conversation
//! with its own.

use bytes::BufMut;

use crate::codec::{bound, put_bool, put_len, put_string, Reader};
use crate::error::WireError;
use crate::message::{finite, MAX_MODEL_ID, MAX_NODE_ID};

/// Longest agent role text, in bytes: one role name (`"factchecker"` and friends), or
/// several separated by commas (`"reasoner,critic"`); empty = plain worker.
pub const MAX_ROLE: usize = 64;
/// Longest human-readable model name in an [`AgentCard`], in bytes.
pub const MAX_MODEL_NAME: usize = 256;
/// Most turns in one [`Ask`].
pub const MAX_CHAT_TURNS: usize = 256;
/// Longest chat role (`system`, `user`, `assistant`, `tool`) of one turn, in bytes.
pub const MAX_CHAT_ROLE: usize = 32;
/// Longest text of one field of an [`Ask`] or [`Answer`] (a turn's content, the system
/// prompt, the answer), in bytes. Far beyond any context these models have; the frame's
/// payload limit bounds the whole message anyway.
pub const MAX_CHAT_TEXT: usize = 1 << 20;
/// Most stop strings in one [`Ask`] (OpenAI allows 4; a little room for the head's own).
pub const MAX_STOP: usize = 8;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;
/// Most choices an [`Ask`] may constrain its answer to (a classifier's labels).
pub const MAX_CHOICES: usize = 64;
/// Longest choice, in bytes.
pub const MAX_CHOICE_LEN: usize = 256;
/// Longest chat API request an [`Ask`] may carry, or chat API response an [`Answer`], in
/// bytes (JSON text).
pub const MAX_API_JSON: usize = 4 << 20;

/// `Describe` (`0x0030`): head → agent, "who are you". Empty payload; the agent answers with
/// its [`AgentCard`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Describe;

impl Describe {
    pub(crate) fn parse(_r: &mut Reader) -> Result<Self, WireError> {
        Ok(Describe)
    }

    pub(crate) fn encode(&self, _out: &mut Vec<u8>) {}

    /// Nothing to check: every value of this message is valid.
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

/// `AgentCard` (`0x0031`): agent → head, who the agent is and how fast and busy it is. The head
/// weighs agents by `tokens_per_s` and `thermal_penalty` (issue #5: weight =
/// min(tokens/s ÷ 40, 1) × thermal penalty).
///
/// | field | encoding |
/// |---|---|
/// | `node_id` | `u32` length (1..=[`MAX_NODE_ID`]), UTF-8 |
/// | `role` | `u32` length (≤ [`MAX_ROLE`]), UTF-8 |
/// | `model_id` | `u32` length (≤ [`MAX_MODEL_ID`]), UTF-8 |
/// | `model_name` | `u32` length (≤ [`MAX_MODEL_NAME`]), UTF-8 |
/// | `context_length` | `u32` |
/// | `tokens_per_s` | `f32`, finite, ≥ 0 |
/// | `thermal_penalty` | `f32`, finite, in `[0, 1]` |
/// | `busy` | `u32` |
/// | `parameters` | `u64`: the model's parameter count (what the head's `strongest`
/// strategy and its default go by) |
#[derive(Clone, Debug, PartialEq)]
pub struct AgentCard {
    /// The agent's node id.
    pub node_id: String,
    /// The agent's role (`"reasoner"`, `"critic"`...), or roles separated by commas when
    /// its one model answers as each (`"reasoner,critic"`); empty for a plain worker.
    pub role: String,
    /// The model file's name, e.g. `"smollm2-135m-instruct-q4_1.gguf"`.
    pub model_id: String,
    /// The model's own name, from its metadata.
    pub model_name: String,
    /// The model's context length, in tokens.
    pub context_length: u32,
    /// Measured decode speed, tokens per second (prefill excluded).
    pub tokens_per_s: f32,
    /// 1.0 when the device is cool, lower as it throttles.
    pub thermal_penalty: f32,
    /// Requests queued or running on the agent right now.
    pub busy: u32,
    /// How many parameters the agent's model has.
    pub parameters: u64,
}

impl AgentCard {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let msg = AgentCard {
            node_id: r.string("node_id", MAX_NODE_ID)?,
            role: r.string("role", MAX_ROLE)?,
            model_id: r.string("model_id", MAX_MODEL_ID)?,
            model_name: r.string("model_name", MAX_MODEL_NAME)?,
            context_length: r.u32("context_length")?,
            tokens_per_s: r.f32("tokens_per_s")?,
            thermal_penalty: r.f32("thermal_penalty")?,
            busy: r.u32("busy")?,
            parameters: r.u64("parameters")?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, &self.node_id);
        put_string(out, &self.role);
        put_string(out, &self.model_id);
        put_string(out, &self.model_name);
        out.put_u32_le(self.context_length);
        out.put_f32_le(self.tokens_per_s);
        out.put_f32_le(self.thermal_penalty);
        out.put_u32_le(self.busy);
        out.put_u64_le(self.parameters);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "AgentCard";
        if self.node_id.is_empty() {
            return Err(invalid(M, "node_id", "is empty".to_owned()));
        }
        bound(M, "node_id", self.node_id.len() as u64, MAX_NODE_ID)?;
        bound(M, "role", self.role.len() as u64, MAX_ROLE)?;
        bound(M, "model_id", self.model_id.len() as u64, MAX_MODEL_ID)?;
        bound(
            M,
            "model_name",
            self.model_name.len() as u64,
            MAX_MODEL_NAME,
        )?;
        finite(M, "tokens_per_s", self.tokens_per_s)?;
        finite(M, "thermal_penalty", self.thermal_penalty)?;
        check(
            M,
            "tokens_per_s",
            self.tokens_per_s,
            self.tokens_per_s >= 0.0,
            "≥ 0",
        )?;
        check(
            M,
            "thermal_penalty",
            self.thermal_penalty,
            (0.0..=1.0).contains(&self.thermal_penalty),
            "in [0, 1]",
        )
    }
}

/// One turn of the conversation in an [`Ask`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTurn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

/// `Ask` (`0x0032`): head → agent, "answer this conversation". The agent renders it with its
/// own chat template, generates, and answers [`Answer`] with the same `request_id` — or an
/// `Error` whose `session_id` is the `request_id`.
///
/// | field | encoding |
/// |---|---|
/// | `request_id` | `u64` |
/// | `system` | `u8` tag (0 none, 1 some), then `u32` length (≤ [`MAX_CHAT_TEXT`]), UTF-8 |
/// | `messages` | `u32` count (1..=[`MAX_CHAT_TURNS`]), then per turn: `role` (`u32` length ≤ [`MAX_CHAT_ROLE`], UTF-8), `content` (`u32` length ≤ [`MAX_CHAT_TEXT`], UTF-8) |
/// | `max_tokens` | `u32` |
/// | `temperature` | `f32`, finite, ≥ 0 (0 = greedy) |
/// | `top_p` | `f32`, finite, in `(0, 1]` |
/// | `seed` | `u64` |
/// | `stop` | `u32` count (≤ [`MAX_STOP`]), then per string `u32` length (≤ [`MAX_STOP_LEN`]), UTF-8 |
/// | `choices` | `u32` count (≤ [`MAX_CHOICES`]), then per choice `u32` length (1..=[`MAX_CHOICE_LEN`]), UTF-8 |
/// | `request` | `u8` tag (0 none, 1 some), then `u32` length (≤ [`MAX_API_JSON`]), UTF-8 JSON (protocol 6) |
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    /// Chosen by the head; echoed in the [`Answer`] or `Error`.
    pub request_id: u64,
    /// Replaces the agent's own role prompt when `Some`; `Some("")` means no system prompt at
    /// all (the aggregator's synthesis prompt, a spotter constrained to one label...).
    pub system: Option<String>,
    /// The conversation, oldest turn first.
    pub messages: Vec<ChatTurn>,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// 0 = greedy (exactly deterministic).
    pub temperature: f32,
    /// Nucleus sampling mass; 1 = off.
    pub top_p: f32,
    /// Seed of the sampler's random stream (repeated sampling for a vote uses different
    /// seeds).
    pub seed: u64,
    /// Generation ends before the first of these strings.
    pub stop: Vec<String>,
    /// When not empty, the answer must be exactly one of these texts (the agent's sampler
    /// can draw nothing else): how the head makes a spotter answer one label.
    pub choices: Vec<String>,
    /// A whole OpenAI chat completion request (JSON) the agent answers through its own chat
    /// API, as it would answer a client: tools, `response_format`, log-probabilities, `n`
    /// and everything else the API serves go through the swarm this way. The fields above
    /// then only describe the request to the head (the agent reads this instead); the
    /// [`Answer`] carries the API's response.
    pub request: Option<String>,
}

impl Ask {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let request_id = r.u64("request_id")?;
        let system = if r.present("system")? {
            Some(r.string("system", MAX_CHAT_TEXT)?)
        } else {
            None
        };
        let count = r.u32("messages")?;
        r.bound("messages", u64::from(count), MAX_CHAT_TURNS)?;
        // The count is bounded, so this allocation is small whatever the peer claims.
        let mut messages = Vec::with_capacity(count as usize);
        for _ in 0..count {
            messages.push(ChatTurn {
                role: r.string("message role", MAX_CHAT_ROLE)?,
                content: r.string("message content", MAX_CHAT_TEXT)?,
            });
        }
        let max_tokens = r.u32("max_tokens")?;
        let temperature = r.f32("temperature")?;
        let top_p = r.f32("top_p")?;
        let seed = r.u64("seed")?;
        let count = r.u32("stop")?;
        r.bound("stop", u64::from(count), MAX_STOP)?;
        let mut stop = Vec::with_capacity(count as usize);
        for _ in 0..count {
            stop.push(r.string("stop string", MAX_STOP_LEN)?);
        }
        let count = r.u32("choices")?;
        r.bound("choices", u64::from(count), MAX_CHOICES)?;
        let mut choices = Vec::with_capacity(count as usize);
        for _ in 0..count {
            choices.push(r.string("choice", MAX_CHOICE_LEN)?);
        }
        let request = if r.present("request")? {
            Some(r.string("request", MAX_API_JSON)?)
        } else {
            None
        };
        let msg = Ask {
            request_id,
            system,
            messages,
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            choices,
            request,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.request_id);
        put_bool(out, self.system.is_some());
        if let Some(system) = &self.system {
            put_string(out, system);
        }
        put_len(out, self.messages.len());
        for turn in &self.messages {
            put_string(out, &turn.role);
            put_string(out, &turn.content);
        }
        out.put_u32_le(self.max_tokens);
        out.put_f32_le(self.temperature);
        out.put_f32_le(self.top_p);
        out.put_u64_le(self.seed);
        put_len(out, self.stop.len());
        for s in &self.stop {
            put_string(out, s);
        }
        put_len(out, self.choices.len());
        for c in &self.choices {
            put_string(out, c);
        }
        put_bool(out, self.request.is_some());
        if let Some(request) = &self.request {
            put_string(out, request);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "Ask";
        if let Some(system) = &self.system {
            bound(M, "system", system.len() as u64, MAX_CHAT_TEXT)?;
        }
        if self.messages.is_empty() {
            return Err(invalid(
                M,
                "messages",
                "is empty; an Ask needs at least one turn".to_owned(),
            ));
        }
        bound(M, "messages", self.messages.len() as u64, MAX_CHAT_TURNS)?;
        for turn in &self.messages {
            bound(M, "message role", turn.role.len() as u64, MAX_CHAT_ROLE)?;
            bound(
                M,
                "message content",
                turn.content.len() as u64,
                MAX_CHAT_TEXT,
            )?;
        }
        finite(M, "temperature", self.temperature)?;
        finite(M, "top_p", self.top_p)?;
        check(
            M,
            "temperature",
            self.temperature,
            self.temperature >= 0.0,
            "≥ 0",
        )?;
        check(
            M,
            "top_p",
            self.top_p,
            self.top_p > 0.0 && self.top_p <= 1.0,
            "in (0, 1]",
        )?;
        bound(M, "stop", self.stop.len() as u64, MAX_STOP)?;
        for s in &self.stop {
            bound(M, "stop string", s.len() as u64, MAX_STOP_LEN)?;
        }
        bound(M, "choices", self.choices.len() as u64, MAX_CHOICES)?;
        for c in &self.choices {
            if c.is_empty() {
                return Err(invalid(M, "choice", "is empty".to_owned()));
            }
            bound(M, "choice", c.len() as u64, MAX_CHOICE_LEN)?;
        }
        if let Some(request) = &self.request {
            bound(M, "request", request.len() as u64, MAX_API_JSON)?;
        }
        Ok(())
    }
}

/// Why an agent's generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string (`0`).
    Stop,
    /// `max_tokens` or the context length (`1`).
    Length,
}

impl Finish {
    /// The byte on the wire.
    pub const fn to_u8(self) -> u8 {
        match self {
            Finish::Stop => 0,
            Finish::Length => 1,
        }
    }

    /// In OpenAI's words: `"stop"` or `"length"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// `Answer` (`0x0033`): agent → head, the generated text for one [`Ask`].
///
/// | field | encoding |
/// |---|---|
/// | `request_id` | `u64` |
/// | `text` | `u32` length (≤ [`MAX_CHAT_TEXT`]), UTF-8 |
/// | `finish` | `u8` (0 stop, 1 length) |
/// | `prompt_tokens`, `completion_tokens` | `u32`, `u32` |
/// | `elapsed_ms` | `u32` |
/// | `response` | `u8` tag (0 none, 1 some), then `u32` length (≤ [`MAX_API_JSON`]), UTF-8 JSON (protocol 6) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The `Ask`'s `request_id`.
    pub request_id: u64,
    /// The generated text (stop string excluded).
    pub text: String,
    /// Why generation ended.
    pub finish: Finish,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Time the agent spent on the request, queueing for its model included.
    pub elapsed_ms: u32,
    /// The chat API's response (JSON) to an [`Ask`] that carried a `request`; `text` is
    /// then a plain summary of it (the content, and each tool call as a line of JSON) for
    /// the head to compare answers by.
    pub response: Option<String>,
}

impl Answer {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let request_id = r.u64("request_id")?;
        let text = r.string("text", MAX_CHAT_TEXT)?;
        let finish = match r.u8("finish")? {
            0 => Finish::Stop,
            1 => Finish::Length,
            other => {
                return Err(r.invalid(
                    "finish",
                    format!("is {other}, expected 0 (stop) or 1 (length)"),
                ))
            }
        };
        Ok(Answer {
            request_id,
            text,
            finish,
            prompt_tokens: r.u32("prompt_tokens")?,
            completion_tokens: r.u32("completion_tokens")?,
            elapsed_ms: r.u32("elapsed_ms")?,
            response: if r.present("response")? {
                Some(r.string("response", MAX_API_JSON)?)
            } else {
                None
            },
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.request_id);
        put_string(out, &self.text);
        out.put_u8(self.finish.to_u8());
        out.put_u32_le(self.prompt_tokens);
        out.put_u32_le(self.completion_tokens);
        out.put_u32_le(self.elapsed_ms);
        put_bool(out, self.response.is_some());
        if let Some(response) = &self.response {
            put_string(out, response);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        bound("Answer", "text", self.text.len() as u64, MAX_CHAT_TEXT)?;
        if let Some(response) = &self.response {
            bound("Answer", "response", response.len() as u64, MAX_API_JSON)?;
        }
        Ok(())
    }
}

fn invalid(message: &'static str, what: &'static str, detail: String) -> WireError {
    WireError::Invalid {
        message,
        what,
        detail,
    }
}

/// Errors with "is {v}, expected {expected}" unless `ok`.
fn check(
    message: &'static str,
    what: &'static str,
    v: f32,
    ok: bool,
    expected: &str,
) -> Result<(), WireError> {
    if ok {
        Ok(())
    } else {
        Err(invalid(
            message,
            what,
            format!("is {v}, expected {expected}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::error::WireError;
    use crate::frame::{decode_frame, Limits, HEADER_LEN};
    use crate::message::*;

    fn decode(frame: &[u8]) -> Result<Message, WireError> {
        decode_frame(frame, &Limits::default()).map(|m| m.unwrap().0)
    }

    #[test]
    fn describe_is_an_empty_frame() {
        let frame = Message::Describe(Describe).to_frame().unwrap();
        assert_eq!(frame, [b'S', b'H', b'O', b'L', 13, 0, 0x30, 0, 0, 0, 0, 0]);
        assert_eq!(decode(&frame).unwrap(), Message::Describe(Describe));
    }

    #[test]
    fn ask_needs_a_turn() {
        let ask = Message::Ask(Ask {
            request_id: 1,
            system: None,
            messages: vec![],
            max_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
            choices: vec![],
            request: None,
        });
        assert!(ask.to_frame().is_err());
        let mut payload = Vec::new();
        ask.encode_payload(&mut payload);
        let err = Message::parse(MessageType::Ask, payload.into()).unwrap_err();
        assert!(err.to_string().contains("messages is empty"), "{err}");
    }

    #[test]
    fn answer_finish_byte_is_strict() {
        let mut frame = Message::Answer(Answer {
            request_id: 1,
            text: String::new(),
            finish: Finish::Length,
            prompt_tokens: 0,
            completion_tokens: 0,
            elapsed_ms: 0,
            response: None,
        })
        .to_frame()
        .unwrap();
        let at = HEADER_LEN + 8 + 4;
        assert_eq!(frame[at], 1);
        frame[at] = 2;
        assert!(matches!(
            decode(&frame).unwrap_err(),
            WireError::Invalid { what: "finish", .. }
        ));
    }
}
