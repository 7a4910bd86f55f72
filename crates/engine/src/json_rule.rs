//! When a JSON grammar holds over an answer: from its first token, or from the moment the
//! answer writes a trigger text (llama.cpp's "lazy" grammars, which its tool calls use: the
//! model writes freely until it opens a call, and the call itself is drawn under the tools'
//! grammar, so it always parses and fits); and, once a value is whole, whether the answer
//! ends there or goes on free (where the trigger may open another value).
//!
//! [`JsonTracker`] follows one answer under a [`JsonRule`], token by token. A generation
//! keeps one; a pipeline's head keeps one and sends its last stage the value in progress
//! ([`JsonTracker::segment`]), from which the stage rebuilds the constraint.

use crate::json_grammar::{JsonConstraint, JsonGrammar};
use crate::tokenizer::Tokenizer;

/// Most bytes of a trigger.
pub const MAX_TRIGGER: usize = 64;
/// Most bytes of a value that may come in the token that opens it (a longer one is left
/// unconstrained; no vocabulary has such tokens).
pub const MAX_LEAD: usize = 256;

/// When a grammar holds over an answer.
#[derive(Clone, Debug)]
pub struct JsonRule {
    grammar: JsonGrammar,
    trigger: Option<String>,
    from_start: bool,
    ends_answer: bool,
    /// After a value, the only text allowed before the trigger opens the next (blanks
    /// aside); anything else ends the answer. `None`: free text.
    between: Option<String>,
    /// Openings of a value written without the trigger at the answer's start (a bare
    /// call), blanks removed: `{"name":"get_weather"`. Empty: none.
    bare: Vec<String>,
}

impl JsonRule {
    /// The answer is one value of `grammar`, and ends when it is whole
    /// (`response_format`, a single forced tool call).
    pub fn whole(grammar: JsonGrammar) -> Self {
        Self {
            grammar,
            trigger: None,
            from_start: true,
            ends_answer: true,
            between: None,
            bare: Vec::new(),
        }
    }

    /// The answer is free until it writes `trigger`; what follows the trigger is a value of
    /// `grammar`, after which the answer is free again. Fails on an empty or over-long
    /// trigger.
    pub fn after_trigger(grammar: JsonGrammar, trigger: &str) -> crate::error::Result<Self> {
        if trigger.is_empty() || trigger.len() > MAX_TRIGGER {
            return Err(crate::error::EngineError::InvalidInput(format!(
                "a grammar's trigger must have 1 to {MAX_TRIGGER} bytes"
            )));
        }
        Ok(Self {
            grammar,
            trigger: Some(trigger.to_owned()),
            from_start: false,
            ends_answer: false,
            between: None,
            bare: Vec::new(),
        })
    }

    /// The answer is free unless it opens with one of `openings` (see
    /// [`JsonRule::or_bare`]); then it is one value of `grammar`, and ends when that is
    /// whole (Llama 3.x's tool calls: the whole answer is the call, bare JSON).
    pub fn bare(grammar: JsonGrammar, openings: impl IntoIterator<Item = String>) -> Self {
        Self {
            grammar,
            trigger: None,
            from_start: false,
            ends_answer: true,
            between: None,
            bare: Vec::new(),
        }
        .or_bare(openings)
    }

    /// Also holds from the answer's first token (a forced call whose opening the prompt
    /// wrote), and lets go when that value is whole.
    pub fn from_start(mut self) -> Self {
        self.from_start = true;
        self
    }

    /// The answer ends when a value is whole (one call where only one is wanted: the
    /// model's further calls would be dropped, so they are not generated).
    pub fn ending_after_value(mut self) -> Self {
        self.ends_answer = true;
        self
    }

    /// After a value, the answer may only write `text` (a call's closing tag) and then the
    /// trigger again; anything else ends it there (a forced call's answer is calls, and
    /// a small model's chatter after them is not worth generating).
    pub fn only_between(mut self, text: &str) -> Self {
        let mut allowed: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        allowed.extend(
            self.trigger
                .iter()
                .flat_map(|t| t.chars())
                .filter(|c| !c.is_ascii_whitespace()),
        );
        self.between = Some(allowed);
        self
    }

    /// Also holds when the answer opens with one of `openings` (blanks aside and ignored
    /// inside them, e.g. `{"name": "get_weather"`): small models often write a call as
    /// bare JSON, without its opening tag, and llama.cpp triggers on that too. The value
    /// starts at the opening's first `{` or `[`, so an opening may begin with a code fence
    /// that is not part of the value (```` ```json{"name" ````) — or at the second brace of
    /// a doubled `{{`, a small model's slip; an answer that opens otherwise (a JSON reply
    /// that is no call) stays free.
    pub fn or_bare(mut self, openings: impl IntoIterator<Item = String>) -> Self {
        self.bare = openings
            .into_iter()
            .map(|o| o.chars().filter(|c| !c.is_ascii_whitespace()).collect())
            .filter(|o: &String| !o.is_empty())
            .collect();
        self
    }

    pub fn grammar(&self) -> &JsonGrammar {
        &self.grammar
    }

    pub fn trigger(&self) -> Option<&str> {
        self.trigger.as_deref()
    }

    /// Whether a whole value ends the answer.
    pub fn ends_answer(&self) -> bool {
        self.ends_answer
    }
}

/// The value being written under the grammar.
#[derive(Debug)]
struct Segment {
    constraint: JsonConstraint,
    /// Bytes of the value that came in the token that completed the trigger.
    lead: Vec<u8>,
    /// The value's tokens after that one.
    tokens: Vec<u32>,
}

/// Where one answer is under its [`JsonRule`].
#[derive(Debug)]
pub struct JsonTracker {
    rule: JsonRule,
    active: Option<Segment>,
    /// The answer's last bytes while no value is open, to find the trigger in (it may
    /// come in several tokens).
    tail: Vec<u8>,
    /// A whole value ended the answer, or text the rule does not allow between values.
    finished: bool,
    /// The non-blank bytes written since the last value closed (under
    /// [`JsonRule::only_between`]); `None` before the first value.
    gap: Option<Vec<u8>>,
    /// The answer so far, while it may still open with a bare value ([`JsonRule::or_bare`]);
    /// `None` once it cannot.
    opening: Option<Vec<u8>>,
    /// The bytes of the token being read (kept to spare an allocation per token).
    piece: Vec<u8>,
}

impl JsonTracker {
    /// At the start of an answer.
    pub fn new(rule: &JsonRule, tokenizer: &Tokenizer) -> Self {
        let active = rule.from_start.then(|| Segment {
            constraint: JsonConstraint::new(&rule.grammar, tokenizer),
            lead: Vec::new(),
            tokens: Vec::new(),
        });
        Self {
            rule: rule.clone(),
            active,
            tail: Vec::new(),
            finished: false,
            gap: None,
            opening: (!rule.from_start && !rule.bare.is_empty()).then(Vec::new),
            piece: Vec::new(),
        }
    }

    /// After the answer's tokens `answer`, each accepted in turn.
    pub fn after(rule: &JsonRule, tokenizer: &Tokenizer, answer: &[u32]) -> Self {
        let mut tracker = Self::new(rule, tokenizer);
        for &token in answer {
            tracker.accept(token, tokenizer);
        }
        tracker
    }

    /// The constraint the next token must keep, while a value is open.
    pub fn constraint(&self) -> Option<&JsonConstraint> {
        self.active.as_ref().map(|s| &s.constraint)
    }

    /// The open value so far, for a pipeline's last stage to rebuild the constraint from:
    /// the bytes that came with the trigger, then the tokens after.
    pub fn segment(&self) -> Option<(&[u8], &[u32])> {
        self.active
            .as_ref()
            .map(|s| (s.lead.as_slice(), s.tokens.as_slice()))
    }

    /// Whether the answer is over: a whole value ended it ([`JsonRule::ends_answer`]), or
    /// it wrote what [`JsonRule::only_between`] does not allow.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Moves past the answer's next token.
    pub fn accept(&mut self, token: u32, tokenizer: &Tokenizer) {
        if self.finished || tokenizer.is_eog(token) {
            return;
        }
        if let Some(segment) = &mut self.active {
            segment.constraint.accept(token, tokenizer);
            segment.tokens.push(token);
            if segment.constraint.done() {
                self.close();
            }
            return;
        }
        // Special tokens (Qwen's `<tool_call>`) are matched by their text too.
        let mut bytes = std::mem::take(&mut self.piece);
        if tokenizer
            .token_bytes_into(token, false, &mut bytes)
            .is_err()
        {
            bytes.clear();
        }
        self.read_free(&bytes, tokenizer);
        self.piece = bytes;
    }

    /// Reads the bytes of a token written while no value is open.
    fn read_free(&mut self, bytes: &[u8], tokenizer: &Tokenizer) {
        if let Some(lead) = self.bare_opening(bytes) {
            self.open(lead, tokenizer);
            return;
        }
        let Some(trigger) = self.rule.trigger.as_deref() else {
            return;
        };
        self.tail.extend_from_slice(bytes);
        let lead =
            find(&self.tail, trigger.as_bytes()).map(|at| self.tail[at + trigger.len()..].to_vec());
        // Between values only the allowed text may come, up to the trigger's end (what
        // follows it in the token is the next value's).
        if let (Some(gap), Some(allowed)) = (&mut self.gap, &self.rule.between) {
            let upto = bytes.len() - lead.as_ref().map_or(0, Vec::len).min(bytes.len());
            gap.extend(bytes[..upto].iter().filter(|b| !b.is_ascii_whitespace()));
            if !allowed.as_bytes().starts_with(gap) {
                self.finished = true;
                return;
            }
        }
        match lead {
            Some(lead) => {
                self.tail.clear();
                self.open(lead, tokenizer);
            }
            None => {
                let keep = trigger.len().saturating_sub(1);
                let cut = self.tail.len().saturating_sub(keep);
                self.tail.drain(..cut);
            }
        }
    }

    /// While the answer may open with a bare value: takes the token's `bytes`, and returns
    /// the value's bytes so far once an opening is whole.
    fn bare_opening(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let so_far = self.opening.as_mut()?;
        so_far.extend_from_slice(bytes);
        if so_far.len() > MAX_LEAD {
            // Blanks without end: no opening a value could be read from.
            self.opening = None;
            return None;
        }
        let start = so_far.iter().position(|b| !b.is_ascii_whitespace())?;
        let compact: Vec<u8> = so_far[start..]
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let openings = self.rule.bare.iter().map(String::as_bytes);
        if openings.clone().any(|o| compact.starts_with(o)) {
            // The value starts at its first brace or bracket (after a fence, if any).
            let value_at = so_far[start..]
                .iter()
                .position(|b| matches!(b, b'{' | b'['))
                .map_or(start, |at| start + at);
            let value = so_far[value_at..].to_vec();
            self.opening = None;
            return Some(value);
        }
        if !openings.into_iter().any(|o| o.starts_with(&compact)) {
            self.opening = None;
        }
        None
    }

    /// Opens a value whose first bytes, `lead`, came with the token just read.
    fn open(&mut self, mut lead: Vec<u8>, tokenizer: &Tokenizer) {
        if lead.len() > MAX_LEAD {
            return;
        }
        let mut constraint = JsonConstraint::new(&self.rule.grammar, tokenizer);
        if !constraint.feed(&lead) {
            // A small model's slip: a doubled opening brace (`{{"name": …`, one token in
            // Qwen's vocabulary). The value is held from the second brace, so the rest is
            // still drawn under the grammar (the caller's parse reads past the extra one).
            let first = lead.iter().position(|b| !b.is_ascii_whitespace());
            let doubled = first.filter(|&at| lead[at..].starts_with(b"{{"));
            let Some(at) = doubled else {
                // A token that ran past the trigger into something the grammar cannot
                // start with leaves this one unconstrained (the caller's parse of the
                // answer still decides).
                return;
            };
            lead.remove(at);
            constraint = JsonConstraint::new(&self.rule.grammar, tokenizer);
            if !constraint.feed(&lead) {
                return;
            }
        }
        let done = constraint.done();
        self.gap = None;
        self.active = Some(Segment {
            constraint,
            lead,
            tokens: Vec::new(),
        });
        if done {
            self.close();
        }
    }

    /// A value is whole: the answer ends, or goes on free.
    fn close(&mut self) {
        self.active = None;
        self.finished = self.rule.ends_answer;
        self.gap = self.rule.between.as_ref().map(|_| Vec::new());
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
