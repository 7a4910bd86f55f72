//! Generated tokens to visible text: decoded incrementally (never half a character), cut
//! before the first stop string, and holding back a tail that could still become one.
//!
//! Shared by every place that streams a generation (a local [`crate::Generation`], a
//! pipeline head, the API), so they all show exactly the same text.

use crate::error::Result;
use crate::tokenizer::{DecodeStream, Tokenizer};

pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    decoder: DecodeStream<'t>,
    stop: Vec<String>,
    /// Everything decoded so far (cut at a stop string once one is found).
    text: String,
    /// How much of `text` was handed out.
    emitted: usize,
    /// The stop string that ended the text, once one did.
    stopped_by: Option<usize>,
}

impl<'t> TextStream<'t> {
    /// Special tokens are not shown; `stop` strings end the text before them.
    pub fn new(tokenizer: &'t Tokenizer, stop: Vec<String>) -> Self {
        Self {
            tokenizer,
            decoder: tokenizer.decode_stream(true),
            stop,
            text: String::new(),
            emitted: 0,
            stopped_by: None,
        }
    }

    /// Adds a generated (non end-of-generation) token. Returns the text it makes visible
    /// and whether a stop string just completed (then the text ends before it).
    pub fn push(&mut self, token: u32) -> Result<(String, bool)> {
        let piece = self.decoder.push(token)?;
        self.text.push_str(&piece);
        if let Some((cut, which)) = self.find_stop() {
            self.text.truncate(cut);
            self.stopped_by = Some(which);
            return Ok((self.take(cut), true));
        }
        let upto = self.safe_end();
        Ok((self.take(upto), false))
    }

    /// Adds any generated token: an end-of-generation token ends the text (whatever was
    /// held back comes out with it), any other is [`TextStream::push`]ed. Returns the text
    /// it makes visible and whether the text has ended (end of generation or a stop string).
    pub fn push_generated(&mut self, token: u32) -> Result<(String, bool)> {
        if self.tokenizer.is_eog(token) {
            return Ok((self.flush(), true));
        }
        self.push(token)
    }

    /// Everything still held back (a partial character, a stop string that never
    /// completed), at the end of generation.
    pub fn flush(&mut self) -> String {
        let tail = self.decoder.flush();
        self.text.push_str(&tail);
        let upto = self.text.len();
        self.take(upto)
    }

    /// The text handed out so far.
    pub fn visible(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// The stop string that ended the text, if one did (Anthropic's `stop_sequence`).
    pub fn stop_string(&self) -> Option<&str> {
        self.stopped_by
            .and_then(|i| self.stop.get(i))
            .map(String::as_str)
    }

    /// Byte offset of the earliest complete stop string in the text, and which one it is
    /// (the first listed, of several ending there).
    fn find_stop(&self) -> Option<(usize, usize)> {
        self.stop
            .iter()
            .enumerate()
            .filter(|(_, stop)| !stop.is_empty())
            .filter_map(|(which, stop)| {
                // Only text past what was emitted can complete a stop string; it may
                // straddle the boundary.
                let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(stop.len()));
                self.text[from..]
                    .find(stop.as_str())
                    .map(|i| (from + i, which))
            })
            .min()
            .map(|(at, which)| (at.max(self.emitted), which))
    }

    /// End of the text that is safe to show: a tail that could still grow into a stop
    /// string is held back.
    fn safe_end(&self) -> usize {
        let mut end = self.text.len();
        for stop in &self.stop {
            if let Some(k) = (1..stop.len())
                .rev()
                .filter(|&k| stop.is_char_boundary(k))
                .find(|&k| self.text.ends_with(&stop[..k]))
            {
                end = end.min(self.text.len() - k);
            }
        }
        end.max(self.emitted)
    }

    fn take(&mut self, upto: usize) -> String {
        let s = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        s
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
