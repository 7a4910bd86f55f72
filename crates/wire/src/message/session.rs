//! The messages of a running session: `Forward` down the ring, `Token` or `Logits` back to the
//! head, and `EndSession` / `Truncate` to manage the stages' KV caches.
//!
//! The head owns the session (prompt, output, sampling parameters, seed); a stage holds only
//! the session's KV cache, keyed by `session_id`. So every `Forward` carries all a stage needs:
//! the absolute position of each token (RoPE is right on every device), where the last stage
//! must send its answer, and how to sample. That keeps stages stateless beyond their caches,
//! which is what lets the head recover from a lost stage by replaying history on a new ring.

use std::net::SocketAddr;

use bytes::BufMut;

use crate::activations::{Activations, DType, MAX_ROWS};
use crate::codec::{bound, put_bool, put_len, put_socket_addr, put_string, put_u32_vec, Reader};
use crate::error::WireError;
use crate::message::finite;

/// Most tokens (rows) in one `Forward`.
pub const MAX_TOKENS: usize = MAX_ROWS as usize;
/// Most tokens in a [`SamplingSpec::penalty_tokens`] window.
pub const MAX_PENALTY_TOKENS: usize = 1 << 16;
/// Most alternatives a `Token` reports (OpenAI's bound for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most bytes of a JSON grammar (a schema) one sampling step carries.
pub const MAX_GRAMMAR: usize = 1 << 20;
/// Most bytes of a JSON value that came in the token that opened it ([`JsonAnswer::lead`]).
pub const MAX_LEAD: usize = 256;

/// `Forward` (`0x0020`): one step of one session moving down the ring.
///
/// The first stage receives `Tokens` (from the head) and embeds them; every other stage
/// receives the previous stage's `Hidden` states. Each stage appends to the session's KV cache
/// at `positions` and forwards to its `next`; the last stage does what `want` says and sends the
/// result to `reply_to`. Chunked prefill is a series of `Forward`s with `Want::Nothing` and a
/// final one that wants a token; speculative verify is one `Forward` of the k draft tokens that
/// wants `Logits` for every row.
///
/// | field | encoding |
/// |---|---|
/// | `session_id` | `u64` |
/// | `seq` | `u64` |
/// | `plan_id` | `u64` |
/// | `positions` | `u32` count (1..=[`MAX_TOKENS`]), then `u32` each |
/// | `payload` | `u8` tag: 0 tokens: `u32` count, `u32` each; 1 hidden: activations (`u32` rows, `u32` cols, `u8` dtype, data) |
/// | `want` | `u8` tag: 0 nothing; 1 token: [`SamplingSpec`]; 2 logits: `u8` rows (0 last, 1 all, 2 first), `u8` dtype; 3 verify: [`SamplingSpec`], `u32` count, `u32` each; 4 normed: `u8` rows (0 last, 1 all, 2 first) |
/// | `reply_to` | socket address (`u8` family 4/6, 4 or 16 octets, `u16` port) |
/// | `resume` | `u8` tag: 0 none; 1: `u64` from_session, `u32` len |
///
/// Checked on both ends: at least one token, and exactly one position per token (row).
#[derive(Clone, Debug, PartialEq)]
pub struct Forward {
    /// The session, chosen by its head; keys the KV cache on every stage.
    pub session_id: u64,
    /// The head's sequence number for this request, echoed in the reply, so the head can match
    /// replies and drop stale ones (e.g. from a ring it has since replaced).
    pub seq: u64,
    /// The plan (`LoadStage::plan_id`) the head laid this ring out by. A stage serves only
    /// the plan it has loaded: a `Forward` of another plan is refused, so a stage reloaded
    /// by another head (or re-planned) never runs a session on a cache it does not hold.
    pub plan_id: u64,
    /// Absolute position of each token in the session.
    pub positions: Vec<u32>,
    /// Token ids or hidden states.
    pub payload: Payload,
    /// What the last stage must send back.
    pub want: Want,
    /// The head's wire address: where the last stage sends `Token` / `Logits` / `Error`.
    pub reply_to: SocketAddr,
    /// On a session's first `Forward` only: the session starts from a cache the stage
    /// kept (the prompt cache), not from an empty one.
    pub resume: Option<Resume>,
}

/// Where a new session's cache starts: a copy of the first `len` positions of the cache the
/// stage kept when session `from_session` ended (`EndSession::keep`). A stage that no longer
/// holds it (or holds fewer positions) refuses the session with
/// [`crate::ErrorCode::PREFIX_GONE`], and the head runs it again from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub from_session: u64,
    pub len: u32,
}

/// What a [`Forward`] carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// Token ids, for the first stage.
    Tokens(Vec<u32>),
    /// Hidden states, one row per token.
    Hidden(Activations),
}

impl Payload {
    /// Number of tokens (rows).
    pub fn rows(&self) -> usize {
        match self {
            Payload::Tokens(t) => t.len(),
            Payload::Hidden(a) => a.rows() as usize,
        }
    }
}

/// What the last stage does with the final hidden states of a [`Forward`].
#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// Nothing: only fill the caches (a prefill chunk that is not the last). No reply unless
    /// something fails.
    Nothing,
    /// Sample one token from the last row with these parameters and reply [`Token`].
    Token(SamplingSpec),
    /// Reply [`Logits`] for the last row or for every row, encoded as `dtype` (no stage
    /// serves it yet: refused with `bad_request`; the first row is for [`Want::Normed`]).
    Logits {
        /// Which rows.
        rows: LogitRows,
        /// Their encoding.
        dtype: DType,
    },
    /// Speculative decoding (protocol 6): the rows after the first are guesses, `draft`
    /// (row `i + 1` holds `draft[i]`). Every stage runs each row exactly as a decode step
    /// would run it alone; the last stage draws a token after each row as a decode step
    /// would draw it there (with `spec`, at that position), and stops at the first draw that
    /// differs from the guess in the next row. It replies [`Verified`] with the draws. The
    /// session's next `Forward` may start at any row after the first, dropping the rows
    /// from there on: the guesses the draws did not keep.
    Verify { spec: SamplingSpec, draft: Vec<u32> },
    /// Embeddings (protocol 11): no logits; reply [`Logits`] holding the hidden states after
    /// the model's final norm (what an embedding is pooled from), `cols` = the hidden size,
    /// as `f32` (an embedding is the product, so it is not rounded on the way), for the
    /// last row, every row, or (protocol 12) the first row.
    Normed { rows: LogitRows },
}

/// Which rows a [`Want::Logits`] or [`Want::Normed`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// The last row only.
    Last,
    /// Every row (speculative verify: one row per draft token).
    All,
    /// The first row only (protocol 12: an embedding pooled from its first token, CLS
    /// pooling, needs no other).
    First,
}

impl LogitRows {
    fn parse(r: &mut Reader) -> Result<Self, WireError> {
        match r.u8("rows")? {
            0 => Ok(LogitRows::Last),
            1 => Ok(LogitRows::All),
            2 => Ok(LogitRows::First),
            t => Err(r.invalid(
                "rows",
                format!("is {t}, expected 0 (last), 1 (all) or 2 (first)"),
            )),
        }
    }

    fn encode(self, out: &mut Vec<u8>) {
        out.put_u8(match self {
            LogitRows::Last => 0,
            LogitRows::All => 1,
            LogitRows::First => 2,
        });
    }
}

/// How the last stage samples. The head owns these and sends them with every sampling
/// `Forward`, so the last stage keeps no per-session state beyond its cache.
///
/// | field | encoding |
/// |---|---|
/// | `temperature`, then `top_k` | `f32`, `u32` |
/// | `top_p`, `min_p`, `repeat_penalty`, `frequency_penalty`, `presence_penalty` | `f32` each |
/// | `seed` | `u64` |
/// | `logprob` | `u8` 0/1 |
/// | `top_logprobs` | `u8` (≤ [`MAX_TOP_LOGPROBS`]; 0 unless `logprob`) |
/// | `penalty_tokens` | `u32` count (≤ [`MAX_PENALTY_TOKENS`]), `u32` each |
/// | `ignore_eos` | `u8` 0/1 |
/// | `json` | `u8` option tag; then `grammar` (`u32` length ≤ [`MAX_GRAMMAR`], UTF-8), `lead` (`u32` length ≤ [`MAX_LEAD`], bytes) and `answer` (`u32` count ≤ [`MAX_TOKENS`], `u32` each) |
///
/// Checked on both ends: every float finite, `temperature ≥ 0`, `top_p` and `min_p` in
/// `[0, 1]`, `repeat_penalty > 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingSpec {
    /// 0 = greedy (exactly deterministic).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: u32,
    /// Nucleus sampling mass; 1 = off.
    pub top_p: f32,
    /// Drop tokens below `min_p ×` the top probability; 0 = off.
    pub min_p: f32,
    /// Multiplicative repetition penalty (llama.cpp style); 1 = off.
    pub repeat_penalty: f32,
    /// OpenAI frequency penalty; 0 = off.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty; 0 = off.
    pub presence_penalty: f32,
    /// Seed for this step's draw. The head derives it from the session seed and the position,
    /// so a replay after recovery draws the same token.
    pub seed: u64,
    /// Return the sampled token's log-probability.
    pub logprob: bool,
    /// With `logprob`: also the log-probabilities of this many likeliest tokens.
    pub top_logprobs: u8,
    /// The recent tokens the penalties look at. Only the head has the history, so it sends the
    /// window (its length is the repeat-last-n setting).
    pub penalty_tokens: Vec<u32>,
    /// Never draw an end-of-generation token (llama-server's `ignore_eos`).
    pub ignore_eos: bool,
    /// Keep the answer to this JSON grammar (`response_format`, a forced tool call).
    pub json: Option<JsonAnswer>,
}

/// A JSON answer the last stage keeps to. The stage holds no state for it: it rebuilds
/// where the answer is in the grammar from `answer` at every step, so a stage that takes
/// over after a loss needs nothing more than the head sends anyway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonAnswer {
    /// The grammar as the engine's `JsonGrammar::wire_text` writes it: the JSON schema, or
    /// empty for any JSON object.
    pub grammar: String,
    /// The value's bytes that came in the token that opened it: a value that starts after
    /// a trigger text (a tool call's opening tag) may start inside a token. Usually empty.
    pub lead: Vec<u8>,
    /// The value's tokens so far (after the lead's token).
    pub answer: Vec<u32>,
}

impl SamplingSpec {
    /// Greedy sampling, no penalties.
    pub fn greedy() -> Self {
        SamplingSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            logprob: false,
            top_logprobs: 0,
            penalty_tokens: Vec::new(),
            ignore_eos: false,
            json: None,
        }
    }

    fn parse(r: &mut Reader) -> Result<Self, WireError> {
        Ok(SamplingSpec {
            temperature: r.f32("temperature")?,
            top_k: r.u32("top_k")?,
            top_p: r.f32("top_p")?,
            min_p: r.f32("min_p")?,
            repeat_penalty: r.f32("repeat_penalty")?,
            frequency_penalty: r.f32("frequency_penalty")?,
            presence_penalty: r.f32("presence_penalty")?,
            seed: r.u64("seed")?,
            logprob: r.bool("logprob")?,
            top_logprobs: r.u8("top_logprobs")?,
            penalty_tokens: r.u32_vec("penalty_tokens", MAX_PENALTY_TOKENS)?,
            ignore_eos: r.bool("ignore_eos")?,
            json: if r.present("json")? {
                Some(JsonAnswer {
                    grammar: r.string("json.grammar", MAX_GRAMMAR)?,
                    lead: {
                        let len = r.u32("json.lead")?;
                        r.bound("json.lead", u64::from(len), MAX_LEAD)?;
                        r.bytes(u64::from(len), "json.lead")?.to_vec()
                    },
                    answer: r.u32_vec("json.answer", MAX_TOKENS)?,
                })
            } else {
                None
            },
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.put_f32_le(self.temperature);
        out.put_u32_le(self.top_k);
        out.put_f32_le(self.top_p);
        out.put_f32_le(self.min_p);
        out.put_f32_le(self.repeat_penalty);
        out.put_f32_le(self.frequency_penalty);
        out.put_f32_le(self.presence_penalty);
        out.put_u64_le(self.seed);
        put_bool(out, self.logprob);
        out.put_u8(self.top_logprobs);
        put_u32_vec(out, &self.penalty_tokens);
        put_bool(out, self.ignore_eos);
        match &self.json {
            None => out.put_u8(0),
            Some(json) => {
                out.put_u8(1);
                put_string(out, &json.grammar);
                put_len(out, json.lead.len());
                out.extend_from_slice(&json.lead);
                put_u32_vec(out, &json.answer);
            }
        }
    }

    fn validate(&self, m: &'static str) -> Result<(), WireError> {
        if let Some(json) = &self.json {
            bound(m, "json.grammar", json.grammar.len() as u64, MAX_GRAMMAR)?;
            bound(m, "json.lead", json.lead.len() as u64, MAX_LEAD)?;
            bound(m, "json.answer", json.answer.len() as u64, MAX_TOKENS)?;
        }
        if usize::from(self.top_logprobs) > MAX_TOP_LOGPROBS
            || (!self.logprob && self.top_logprobs != 0)
        {
            return Err(WireError::Invalid {
                message: m,
                what: "top_logprobs",
                detail: format!(
                    "is {}, expected at most {MAX_TOP_LOGPROBS}, and 0 without logprob",
                    self.top_logprobs
                ),
            });
        }
        for (what, v) in [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            finite(m, what, v)?;
        }
        let range = |what: &'static str, v: f32, ok: bool, expected: &str| {
            if ok {
                Ok(())
            } else {
                Err(WireError::Invalid {
                    message: m,
                    what,
                    detail: format!("is {v}, expected {expected}"),
                })
            }
        };
        range(
            "temperature",
            self.temperature,
            self.temperature >= 0.0,
            "≥ 0",
        )?;
        range(
            "top_p",
            self.top_p,
            (0.0..=1.0).contains(&self.top_p),
            "in [0, 1]",
        )?;
        range(
            "min_p",
            self.min_p,
            (0.0..=1.0).contains(&self.min_p),
            "in [0, 1]",
        )?;
        range(
            "repeat_penalty",
            self.repeat_penalty,
            self.repeat_penalty > 0.0,
            "> 0",
        )?;
        bound(
            m,
            "penalty_tokens",
            self.penalty_tokens.len() as u64,
            MAX_PENALTY_TOKENS,
        )
    }
}

impl Default for SamplingSpec {
    fn default() -> Self {
        SamplingSpec::greedy()
    }
}

impl Forward {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let session_id = r.u64("session_id")?;
        let seq = r.u64("seq")?;
        let plan_id = r.u64("plan_id")?;
        let positions = r.u32_vec("positions", MAX_TOKENS)?;
        let payload = match r.u8("payload tag")? {
            0 => Payload::Tokens(r.u32_vec("tokens", MAX_TOKENS)?),
            1 => Payload::Hidden(Activations::parse(r)?),
            t => {
                return Err(r.invalid(
                    "payload tag",
                    format!("is {t}, expected 0 (tokens) or 1 (hidden)"),
                ))
            }
        };
        let want = match r.u8("want tag")? {
            0 => Want::Nothing,
            1 => Want::Token(SamplingSpec::parse(r)?),
            2 => Want::Logits {
                rows: LogitRows::parse(r)?,
                dtype: DType::parse(r, "logits dtype")?,
            },
            3 => Want::Verify {
                spec: SamplingSpec::parse(r)?,
                draft: r.u32_vec("draft", MAX_TOKENS)?,
            },
            4 => Want::Normed {
                rows: LogitRows::parse(r)?,
            },
            t => {
                return Err(r.invalid(
                    "want tag",
                    format!(
                        "is {t}, expected 0 (nothing), 1 (token), 2 (logits), 3 (verify) or \
                         4 (normed)"
                    ),
                ))
            }
        };
        let reply_to = r.socket_addr("reply_to")?;
        let resume = match r.u8("resume tag")? {
            0 => None,
            1 => Some(Resume {
                from_session: r.u64("resume from_session")?,
                len: r.u32("resume len")?,
            }),
            t => {
                return Err(r.invalid(
                    "resume tag",
                    format!("is {t}, expected 0 (none) or 1 (resume)"),
                ))
            }
        };
        let msg = Forward {
            session_id,
            seq,
            plan_id,
            positions,
            payload,
            want,
            reply_to,
            resume,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.session_id);
        out.put_u64_le(self.seq);
        out.put_u64_le(self.plan_id);
        put_u32_vec(out, &self.positions);
        match &self.payload {
            Payload::Tokens(t) => {
                out.put_u8(0);
                put_u32_vec(out, t);
            }
            Payload::Hidden(a) => {
                out.put_u8(1);
                a.encode(out);
            }
        }
        match &self.want {
            Want::Nothing => out.put_u8(0),
            Want::Token(s) => {
                out.put_u8(1);
                s.encode(out);
            }
            Want::Logits { rows, dtype } => {
                out.put_u8(2);
                rows.encode(out);
                out.put_u8(dtype.to_u8());
            }
            Want::Verify { spec, draft } => {
                out.put_u8(3);
                spec.encode(out);
                put_u32_vec(out, draft);
            }
            Want::Normed { rows } => {
                out.put_u8(4);
                rows.encode(out);
            }
        }
        put_socket_addr(out, &self.reply_to);
        match self.resume {
            None => out.put_u8(0),
            Some(r) => {
                out.put_u8(1);
                out.put_u64_le(r.from_session);
                out.put_u32_le(r.len);
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "Forward";
        let rows = self.payload.rows();
        bound(M, "positions", self.positions.len() as u64, MAX_TOKENS)?;
        bound(M, "tokens", rows as u64, MAX_TOKENS)?;
        if rows == 0 {
            return Err(WireError::Invalid {
                message: M,
                what: "payload",
                detail: "has no tokens".to_owned(),
            });
        }
        if self.positions.len() != rows {
            return Err(WireError::Invalid {
                message: M,
                what: "positions",
                detail: format!(
                    "has {} entries but the payload has {rows} tokens; every token needs its position",
                    self.positions.len()
                ),
            });
        }
        match &self.want {
            Want::Token(s) => s.validate(M)?,
            Want::Verify { spec, draft } => {
                spec.validate(M)?;
                if draft.len() + 1 != rows {
                    return Err(WireError::Invalid {
                        message: M,
                        what: "draft",
                        detail: format!(
                            "has {} tokens for {rows} rows; a verify has one guess per row after \
                             the first",
                            draft.len()
                        ),
                    });
                }
            }
            Want::Nothing | Want::Logits { .. } | Want::Normed { .. } => {}
        }
        Ok(())
    }
}

/// `Verified` (`0x0025`, protocol 6): last stage → head, the draws of a [`Want::Verify`]:
/// the token drawn after each row, up to and including the first that differs from the
/// guess in the next row (or the draw after the last row, when every guess held).
///
/// | field | encoding |
/// |---|---|
/// | `session_id`, `seq` | `u64`, `u64` |
/// | `tokens` | `u32` count (1..=[`MAX_TOKENS`]), then `u32` each |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The session.
    pub session_id: u64,
    /// The `seq` of the `Forward` this answers.
    pub seq: u64,
    /// The draws, one per row from the first, as far as the guesses held and one more.
    pub tokens: Vec<u32>,
}

impl Verified {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let msg = Verified {
            session_id: r.u64("session_id")?,
            seq: r.u64("seq")?,
            tokens: r.u32_vec("tokens", MAX_TOKENS)?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.session_id);
        out.put_u64_le(self.seq);
        put_u32_vec(out, &self.tokens);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        bound("Verified", "tokens", self.tokens.len() as u64, MAX_TOKENS)?;
        if self.tokens.is_empty() {
            return Err(WireError::Invalid {
                message: "Verified",
                what: "tokens",
                detail: "is empty; a verify draws at least one token".to_owned(),
            });
        }
        Ok(())
    }
}

/// `Token` (`0x0021`): last stage → head, the token sampled for `(session_id, seq)`.
///
/// | field | encoding |
/// |---|---|
/// | `session_id`, `seq` | `u64`, `u64` |
/// | `token_id` | `u32` |
/// | `logprob` | `u8` tag, then `f32` (not NaN) |
/// | `top` | `u32` count (≤ [`MAX_TOP_LOGPROBS`]; 0 without `logprob`), then per entry `u32` token id and `f32` log-probability (not NaN) |
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    /// The session.
    pub session_id: u64,
    /// The `seq` of the `Forward` this answers.
    pub seq: u64,
    /// The sampled token.
    pub token_id: u32,
    /// Its log-probability, when the `SamplingSpec` asked for it.
    pub logprob: Option<f32>,
    /// The likeliest tokens and their log-probabilities, likeliest first, as many as the
    /// `SamplingSpec`'s `top_logprobs`.
    pub top: Vec<(u32, f32)>,
}

impl Token {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let msg = Token {
            session_id: r.u64("session_id")?,
            seq: r.u64("seq")?,
            token_id: r.u32("token_id")?,
            logprob: if r.present("logprob")? {
                Some(r.f32("logprob")?)
            } else {
                None
            },
            top: {
                let count = r.u32("top")?;
                r.bound("top", u64::from(count), MAX_TOP_LOGPROBS)?;
                let mut top = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    top.push((r.u32("top token")?, r.f32("top logprob")?));
                }
                top
            },
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.session_id);
        out.put_u64_le(self.seq);
        out.put_u32_le(self.token_id);
        put_bool(out, self.logprob.is_some());
        if let Some(lp) = self.logprob {
            out.put_f32_le(lp);
        }
        put_len(out, self.top.len());
        for &(id, lp) in &self.top {
            out.put_u32_le(id);
            out.put_f32_le(lp);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        let invalid = |what, detail: &str| WireError::Invalid {
            message: "Token",
            what,
            detail: detail.to_owned(),
        };
        // -inf is a legitimate (if useless) log-probability; NaN never is.
        if self.logprob.is_some_and(f32::is_nan) || self.top.iter().any(|t| t.1.is_nan()) {
            return Err(invalid("logprob", "is NaN"));
        }
        if self.top.len() > MAX_TOP_LOGPROBS {
            return Err(invalid("top", "lists more than MAX_TOP_LOGPROBS tokens"));
        }
        if self.logprob.is_none() && !self.top.is_empty() {
            return Err(invalid("top", "is given without the token's logprob"));
        }
        Ok(())
    }
}

/// `Logits` (`0x0022`): last stage → head, the rows a [`Want::Logits`] or [`Want::Normed`]
/// asked for `(session_id, seq)`: one row per requested token, `cols` = the vocabulary size
/// (logits) or the hidden size (normed hidden states).
///
/// | field | encoding |
/// |---|---|
/// | `session_id`, `seq` | `u64`, `u64` |
/// | `logits` | activations (`u32` rows, `u32` cols, `u8` dtype, data) |
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    /// The session.
    pub session_id: u64,
    /// The `seq` of the `Forward` this answers.
    pub seq: u64,
    /// `rows × vocab` logits, or `rows × hidden` normed hidden states.
    pub logits: Activations,
}

impl Logits {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        Ok(Logits {
            session_id: r.u64("session_id")?,
            seq: r.u64("seq")?,
            logits: Activations::parse(r)?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.session_id);
        out.put_u64_le(self.seq);
        self.logits.encode(out);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

/// `EndSession` (`0x0023`): head → every stage, `session_id: u64`, `keep: u8` 0/1. The
/// session is over: its KV cache is freed, or with `keep` kept for later sessions to start
/// from (`Forward::resume`, the prompt cache) until an `EndSession` without `keep` names it
/// again or the stage needs the room. Naming a kept cache without `keep` frees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndSession {
    /// The session to forget.
    pub session_id: u64,
    /// Keep its cache for later sessions.
    pub keep: bool,
}

impl EndSession {
    /// Ends a session and frees its cache.
    pub fn free(session_id: u64) -> Self {
        EndSession {
            session_id,
            keep: false,
        }
    }

    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        Ok(EndSession {
            session_id: r.u64("session_id")?,
            keep: r.bool("keep")?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.session_id);
        put_bool(out, self.keep);
    }

    /// Nothing to check: every value of this message is valid.
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

/// `Truncate` (`0x0024`): head → every stage, `session_id: u64`, `len: u32`; keep only the
/// first `len` positions of the session's KV cache (rolling back rejected draft tokens, or an
/// edit of the conversation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// The session.
    pub session_id: u64,
    /// Positions to keep.
    pub len: u32,
}

impl Truncate {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        Ok(Truncate {
            session_id: r.u64("session_id")?,
            len: r.u32("len")?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.session_id);
        out.put_u32_le(self.len);
    }

    /// Nothing to check: every value of this message is valid.
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::activations::{Activations, DType};
    use crate::error::WireError;
    use crate::frame::{decode_frame, Limits, HEADER_LEN};
    use crate::message::*;

    fn addr() -> std::net::SocketAddr {
        "192.168.1.2:7070".parse().unwrap()
    }

    fn decode(frame: &[u8]) -> Result<Message, WireError> {
        decode_frame(frame, &Limits::default()).map(|m| m.unwrap().0)
    }

    #[test]
    fn forward_tokens_frame_bytes() {
        let msg = Message::Forward(Forward {
            session_id: 0x11,
            seq: 0x22,
            plan_id: 0x33,
            positions: vec![0, 1],
            payload: Payload::Tokens(vec![0x0100, 0x0200]),
            want: Want::Nothing,
            reply_to: addr(),
            resume: None,
        });
        let frame = msg.to_frame().unwrap();
        #[rustfmt::skip]
        let expected = [
            b'S', b'H', b'O', b'L', 13, 0, 0x20, 0, 58, 0, 0, 0,
            0x11, 0, 0, 0, 0, 0, 0, 0,              // session_id
            0x22, 0, 0, 0, 0, 0, 0, 0,              // seq
            0x33, 0, 0, 0, 0, 0, 0, 0,              // plan_id
            2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,     // positions [0, 1]
            0,                                      // payload: tokens
            2, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0,     // [256, 512]
            0,                                      // want: nothing
            4, 192, 168, 1, 2, 0x9E, 0x1B,          // reply_to 192.168.1.2:7070
            0,                                      // resume: none
        ];
        assert_eq!(frame, expected);
        assert_eq!(decode(&frame).unwrap(), msg);
    }

    #[test]
    fn forward_hidden_frame_bytes() {
        let hidden = Activations::from_f32(1, 2, &[1.0, -2.0], DType::F16).unwrap();
        let msg = Message::Forward(Forward {
            session_id: 1,
            seq: 2,
            plan_id: 1,
            positions: vec![7],
            payload: Payload::Hidden(hidden),
            want: Want::Logits {
                rows: LogitRows::All,
                dtype: DType::BF16,
            },
            reply_to: addr(),
            resume: None,
        });
        let frame = msg.to_frame().unwrap();
        #[rustfmt::skip]
        let expected = [
            b'S', b'H', b'O', b'L', 13, 0, 0x20, 0, 57, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0,
            2, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 0, 0, 7, 0, 0, 0,                 // positions [7]
            1,                                      // payload: hidden
            1, 0, 0, 0, 2, 0, 0, 0, 0,              // 1×2 f16
            0x00, 0x3C, 0x00, 0xC0,                 // 1.0, -2.0
            2, 1, 1,                                // want: logits, all rows, bf16
            4, 192, 168, 1, 2, 0x9E, 0x1B,
            0,
        ];
        assert_eq!(frame, expected);
        let Message::Forward(back) = decode(&frame).unwrap() else {
            panic!("not a Forward")
        };
        let Payload::Hidden(h) = &back.payload else {
            panic!("not hidden")
        };
        assert_eq!(h.to_f32(), [1.0, -2.0]);
    }

    #[test]
    fn forward_sampling_frame_bytes() {
        let spec = SamplingSpec {
            temperature: 1.0,
            seed: 42,
            logprob: true,
            top_logprobs: 3,
            penalty_tokens: vec![5],
            ignore_eos: true,
            json: Some(JsonAnswer {
                grammar: "{}".into(),
                lead: b"\n".to_vec(),
                answer: vec![7],
            }),
            ..SamplingSpec::greedy()
        };
        let msg = Message::Forward(Forward {
            session_id: 1,
            seq: 1,
            plan_id: 1,
            positions: vec![3],
            payload: Payload::Tokens(vec![9]),
            want: Want::Token(spec),
            reply_to: addr(),
            resume: None,
        });
        let frame = msg.to_frame().unwrap();
        let want_at = HEADER_LEN + 8 + 8 + 8 + 8 + 1 + 8;
        #[rustfmt::skip]
        let spec_bytes = [
            1,                      // want: token
            0, 0, 0x80, 0x3F,       // temperature 1.0
            0, 0, 0, 0,             // top_k 0
            0, 0, 0x80, 0x3F,       // top_p 1.0
            0, 0, 0, 0,             // min_p 0
            0, 0, 0x80, 0x3F,       // repeat_penalty 1.0
            0, 0, 0, 0,             // frequency_penalty
            0, 0, 0, 0,             // presence_penalty
            42, 0, 0, 0, 0, 0, 0, 0, // seed
            1,                      // logprob
            3,                      // top_logprobs
            1, 0, 0, 0, 5, 0, 0, 0, // penalty_tokens [5]
            1,                      // ignore_eos
            1,                      // json: some
            2, 0, 0, 0, b'{', b'}', // grammar
            1, 0, 0, 0, b'\n',      // lead
            1, 0, 0, 0, 7, 0, 0, 0, // answer [7]
        ];
        assert_eq!(&frame[want_at..want_at + spec_bytes.len()], spec_bytes);
        // reply_to (7 bytes), no resume (1).
        assert_eq!(frame.len(), want_at + spec_bytes.len() + 8);
        assert_eq!(decode(&frame).unwrap(), msg);
    }

    #[test]
    fn token_and_session_control_bytes() {
        let frame = Message::Token(Token {
            session_id: 3,
            seq: 4,
            token_id: 0x0102_0304,
            logprob: Some(-0.5),
            top: vec![(7, -0.25)],
        })
        .to_frame()
        .unwrap();
        #[rustfmt::skip]
        assert_eq!(frame, [
            b'S', b'H', b'O', b'L', 13, 0, 0x21, 0, 37, 0, 0, 0,
            3, 0, 0, 0, 0, 0, 0, 0,
            4, 0, 0, 0, 0, 0, 0, 0,
            4, 3, 2, 1,
            1, 0, 0, 0, 0xBF,       // Some(-0.5)
            1, 0, 0, 0,             // one alternative:
            7, 0, 0, 0, 0, 0, 0x80, 0xBE, // token 7, -0.25
        ]);
        let frame = Message::EndSession(EndSession::free(5)).to_frame().unwrap();
        assert_eq!(
            frame,
            [b'S', b'H', b'O', b'L', 13, 0, 0x23, 0, 9, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let frame = Message::EndSession(EndSession {
            session_id: 5,
            keep: true,
        })
        .to_frame()
        .unwrap();
        assert_eq!(frame[HEADER_LEN + 8], 1);
        let mut bad = frame.clone();
        bad[HEADER_LEN + 8] = 2;
        assert!(decode(&bad).is_err(), "keep must be 0 or 1");
        let frame = Message::Truncate(Truncate {
            session_id: 5,
            len: 6,
        })
        .to_frame()
        .unwrap();
        #[rustfmt::skip]
        assert_eq!(frame, [
            b'S', b'H', b'O', b'L', 13, 0, 0x24, 0, 12, 0, 0, 0,
            5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0,
        ]);
    }

    #[test]
    fn logits_frame_bytes() {
        let logits = Activations::from_f32(1, 1, &[2.0], DType::F32).unwrap();
        let frame = Message::Logits(Logits {
            session_id: 1,
            seq: 2,
            logits,
        })
        .to_frame()
        .unwrap();
        #[rustfmt::skip]
        assert_eq!(frame, [
            b'S', b'H', b'O', b'L', 13, 0, 0x22, 0, 29, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0,
            2, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 0, 0, 1, 0, 0, 0, 2,
            0, 0, 0, 0x40,
        ]);
    }

    #[test]
    fn a_normed_want_is_its_tag_and_rows_and_other_rows_are_refused() {
        let msg = Message::Forward(Forward {
            session_id: 1,
            seq: 0,
            plan_id: 1,
            positions: vec![0],
            payload: Payload::Tokens(vec![5]),
            want: Want::Normed {
                rows: LogitRows::All,
            },
            reply_to: addr(),
            resume: None,
        });
        let mut frame = msg.to_frame().unwrap();
        // header, ids, one position, one token; then the want, reply_to (7) and resume (1).
        let want = frame.len() - 8 - 2;
        assert_eq!(frame[want..want + 2], [4, 1]);
        assert_eq!(decode(&frame).unwrap(), msg);
        // 2: the first row only (protocol 12).
        frame[want + 1] = 2;
        let Message::Forward(first) = decode(&frame).unwrap() else {
            panic!("not a Forward")
        };
        assert_eq!(
            first.want,
            Want::Normed {
                rows: LogitRows::First
            }
        );
        frame[want + 1] = 3;
        let err = decode(&frame).unwrap_err().to_string();
        assert!(err.contains("rows") && err.contains("is 3"), "{err}");
        frame[want] = 5;
        let err = decode(&frame).unwrap_err().to_string();
        assert!(
            err.contains("want tag") && err.contains("4 (normed)"),
            "{err}"
        );
    }

    fn tokens_forward() -> Vec<u8> {
        Message::Forward(Forward {
            session_id: 1,
            seq: 1,
            plan_id: 1,
            positions: vec![0, 1, 2],
            payload: Payload::Tokens(vec![10, 11, 12]),
            want: Want::Nothing,
            reply_to: addr(),
            resume: None,
        })
        .to_frame()
        .unwrap()
    }

    #[test]
    fn lying_token_count_is_an_error() {
        // Claim 1,000,000 tokens where 3 are: refused before a 4 MB Vec is made.
        let mut frame = tokens_forward();
        let count_at = HEADER_LEN + 8 + 8 + 8 + 4 + 12 + 1;
        frame[count_at..count_at + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
        let err = decode(&frame).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Truncated {
                    what: "tokens",
                    needed: 4_000_000,
                    ..
                }
            ),
            "{err}"
        );
        // Over the field bound: refused on the count alone.
        frame[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&frame).unwrap_err(),
            WireError::TooLong { what: "tokens", .. }
        ));
    }

    #[test]
    fn positions_must_match_tokens() {
        let mut frame = tokens_forward();
        // Say the tokens vector has 2 entries and drop the last one, fixing the header length.
        let count_at = HEADER_LEN + 8 + 8 + 8 + 4 + 12 + 1;
        frame[count_at] = 2;
        frame.drain(count_at + 4 + 8..count_at + 4 + 12);
        let len = (frame.len() - HEADER_LEN) as u32;
        frame[8..12].copy_from_slice(&len.to_le_bytes());
        let err = decode(&frame).unwrap_err();
        assert!(
            err.to_string()
                .contains("positions has 3 entries but the payload has 2 tokens"),
            "{err}"
        );
    }

    #[test]
    fn empty_forward_is_refused() {
        let msg = Message::Forward(Forward {
            session_id: 1,
            seq: 1,
            plan_id: 1,
            positions: vec![],
            payload: Payload::Tokens(vec![]),
            want: Want::Nothing,
            reply_to: addr(),
            resume: None,
        });
        assert!(msg.to_frame().is_err());
    }

    #[test]
    fn bad_tags_are_errors() {
        let frame = tokens_forward();
        let payload_tag_at = HEADER_LEN + 8 + 8 + 8 + 4 + 12;
        let mut bad = frame.clone();
        bad[payload_tag_at] = 2;
        assert!(matches!(
            decode(&bad).unwrap_err(),
            WireError::Invalid {
                what: "payload tag",
                ..
            }
        ));
        let mut bad = frame.clone();
        let want_at = payload_tag_at + 1 + 4 + 12;
        bad[want_at] = 5;
        assert!(matches!(
            decode(&bad).unwrap_err(),
            WireError::Invalid {
                what: "want tag",
                ..
            }
        ));
    }

    #[test]
    fn a_verify_has_one_guess_per_row_after_the_first() {
        let verify = |draft: Vec<u32>| {
            Message::Forward(Forward {
                session_id: 1,
                seq: 2,
                plan_id: 3,
                positions: vec![7, 8, 9],
                payload: Payload::Tokens(vec![1, 2, 3]),
                want: Want::Verify {
                    spec: SamplingSpec::greedy(),
                    draft,
                },
                reply_to: addr(),
                resume: None,
            })
        };
        let good = verify(vec![2, 3]);
        let frame = good.to_frame().unwrap();
        assert_eq!(decode(&frame).unwrap(), good);
        for bad in [vec![], vec![2], vec![2, 3, 4]] {
            let err = verify(bad).to_frame().unwrap_err();
            assert!(
                matches!(err, WireError::Invalid { what: "draft", .. }),
                "{err}"
            );
        }
        let empty = Message::Verified(Verified {
            session_id: 1,
            seq: 2,
            tokens: vec![],
        });
        assert!(empty.to_frame().is_err());
    }

    #[test]
    fn sampling_values_are_checked() {
        let with = |spec: SamplingSpec| {
            Message::Forward(Forward {
                session_id: 1,
                seq: 1,
                plan_id: 1,
                positions: vec![0],
                payload: Payload::Tokens(vec![1]),
                want: Want::Token(spec),
                reply_to: addr(),
                resume: None,
            })
            .to_frame()
        };
        assert!(with(SamplingSpec::greedy()).is_ok());
        for bad in [
            SamplingSpec {
                temperature: f32::NAN,
                ..SamplingSpec::greedy()
            },
            SamplingSpec {
                temperature: -1.0,
                ..SamplingSpec::greedy()
            },
            SamplingSpec {
                top_p: 1.5,
                ..SamplingSpec::greedy()
            },
            SamplingSpec {
                min_p: -0.1,
                ..SamplingSpec::greedy()
            },
            SamplingSpec {
                repeat_penalty: 0.0,
                ..SamplingSpec::greedy()
            },
            SamplingSpec {
                presence_penalty: f32::INFINITY,
                ..SamplingSpec::greedy()
            },
        ] {
            assert!(with(bad.clone()).is_err(), "{bad:?}");
        }
        // And a NaN temperature written by hand is refused on receipt.
        let mut frame = with(SamplingSpec::greedy()).unwrap();
        let temp_at = HEADER_LEN + 8 + 8 + 8 + 8 + 1 + 8 + 1;
        frame[temp_at..temp_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = decode(&frame).unwrap_err();
        assert!(
            err.to_string()
                .contains("temperature is NaN, expected a finite number"),
            "{err}"
        );
    }

    #[test]
    fn nan_logprob_is_refused() {
        let t = Message::Token(Token {
            session_id: 1,
            seq: 1,
            token_id: 1,
            logprob: Some(f32::NAN),
            top: Vec::new(),
        });
        assert!(t.to_frame().is_err());
        let t = Message::Token(Token {
            session_id: 1,
            seq: 1,
            token_id: 1,
            logprob: Some(f32::NEG_INFINITY),
            top: vec![(2, f32::NEG_INFINITY)],
        });
        assert!(t.to_frame().is_ok());
        for top in [vec![(2, f32::NAN)], vec![(0, -1.0); MAX_TOP_LOGPROBS + 1]] {
            let t = Message::Token(Token {
                session_id: 1,
                seq: 1,
                token_id: 1,
                logprob: Some(-1.0),
                top,
            });
            assert!(t.to_frame().is_err());
        }
        let without = Message::Token(Token {
            session_id: 1,
            seq: 1,
            token_id: 1,
            logprob: None,
            top: vec![(2, -1.0)],
        });
        assert!(
            without.to_frame().is_err(),
            "alternatives without the token's logprob"
        );
    }
}
