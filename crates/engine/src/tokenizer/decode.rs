//! Streaming detokenization: ids in, text out, never half a character.

use super::{Tokenizer, TokenizerError};

/// Incremental detokenizer for streaming: push ids one at a time and get the text that became
/// complete. A UTF-8 character split across tokens is held back until its last byte arrives.
pub struct DecodeStream<'a> {
    pub(super) tokenizer: &'a Tokenizer,
    pub(super) skip_special: bool,
    pub(super) pending: Vec<u8>,
}

impl DecodeStream<'_> {
    /// Adds one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.tokenizer
            .inner
            .piece(id, !self.skip_special, &mut self.pending)?;
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[consumed..consumed + valid],
                    ));
                    consumed += valid;
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => break,
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += bad;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        Ok(out)
    }

    /// Returns what is still held back (an incomplete character becomes U+FFFD) and resets.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
