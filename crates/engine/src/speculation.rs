//! Speculative decoding (issue #17): cheap guesses at the next few tokens, verified by the
//! model in one pass ([`crate::Logits::Verify`]). Each verified row is computed exactly as
//! a decode step would compute it, and a guessed token is kept only while it is the token
//! the sampler draws there, so the answer is the plain decode's, token for token — greedy or
//! seeded (a draw depends only on the seed and the position, [`crate::Sampler`]). The
//! guesses come from prompt lookup ([`crate::Lookup`]), from a smaller draft model of the
//! same tokenizer ([`Drafter`]), or from both (lookup first: it costs nothing).
//!
//! Keeping a guess only where it equals the target's own draw, rather than the usual
//! rejection rule (keep with probability p/q), gives up some acceptance under sampling but
//! makes a seeded answer reproducible whether or not a draft model is attached.

use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::generate::{keep_prompt, Model, PREFILL_CHUNK};
use crate::kv_cache::KvCache;
use crate::lookup::Lookup;
use crate::prefix_cache::{resume_point, shared_prefix};
use crate::sampler::argmax;
use crate::stage::{logits_row, Logits, StageInput, StageOutput};
use crate::tokenizer::Tokenizer;

/// How generations guess ahead ([`Model::set_speculation`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speculation {
    /// Draft by prompt lookup (tried first when a draft model is attached too).
    pub lookup: Option<Lookup>,
    /// Draft with the model attached by [`Model::attach_draft`], when there is one.
    pub draft_model: bool,
    /// Most tokens guessed per pass (llama-server's `--draft-max`).
    pub draft_max: usize,
    /// Fewest guessed tokens worth a verification pass (`--draft-min`); a shorter guess
    /// decodes one token the plain way.
    pub draft_min: usize,
    /// A draft model stops guessing where its own probability of its pick falls below this
    /// (llama-server's `--draft-p-min`): a guess it doubts is likely thrown away.
    pub p_min: f32,
}

impl Default for Speculation {
    fn default() -> Self {
        Speculation {
            lookup: None,
            draft_model: false,
            draft_max: 8,
            draft_min: 1,
            p_min: 0.75,
        }
    }
}

/// Why a draft model cannot guess for a target: its tokens would mean other text.
pub fn check_draft_vocabulary(target: &Model, draft: &Model) -> Result<()> {
    check_draft_tokenizer(target.tokenizer(), target.name(), draft)
}

/// [`check_draft_vocabulary`] against the target's tokenizer alone (a pipeline's head
/// holds the target's tokenizer, not its whole model); `target` names it in the error.
pub fn check_draft_tokenizer(t: &Tokenizer, target: &str, draft: &Model) -> Result<()> {
    let d = draft.tokenizer();
    let refuse = |why: String| {
        Err(EngineError::InvalidInput(format!(
            "the draft model {} cannot draft for {target}: {why}",
            draft.name(),
        )))
    };
    if d.vocab_size() > t.vocab_size() {
        return refuse(format!(
            "its vocabulary has {} tokens, the target's {}",
            d.vocab_size(),
            t.vocab_size()
        ));
    }
    if d.eos_ids() != t.eos_ids() {
        return refuse("their end-of-generation tokens differ".into());
    }
    for id in 0..d.vocab_size() as u32 {
        if d.token_text(id) != t.token_text(id) {
            return refuse(format!(
                "token {id} is {:?} in the draft, {:?} in the target",
                d.token_text(id).unwrap_or(""),
                t.token_text(id).unwrap_or("")
            ));
        }
    }
    Ok(())
}

/// A draft model's side of one generation: its own cache of the tokens so far, rolled back
/// to what the target kept after each verification. A pipeline's head drafts with one for
/// its ring, as a generation does for its model.
pub struct Drafter {
    model: Arc<Model>,
    cache: KvCache,
    /// The tokens whose keys and values `cache` holds.
    fed: Vec<u32>,
    prompt_len: usize,
    /// Where the prompt's computation started (a kept prefix of the draft model's own
    /// prompt cache, or 0).
    computed_from: usize,
    /// Whether `cache` holds exactly `fed`'s keys and values (false after a failure).
    whole: bool,
    cache_prompt: bool,
}

impl Drafter {
    /// The draft model `model`'s side of a generation of `prompt`, resumed from the longest
    /// prompt it kept (with `cache_prompt`), which it keeps again when dropped.
    pub fn new(model: Arc<Model>, prompt: &[u32], cache_prompt: bool) -> Self {
        let mut cache = None;
        if cache_prompt && prompt.len() > 1 {
            let mut kept = model.prompt_cache();
            if let Some(m) = kept.longest(prompt, prompt.len() - 1) {
                let at = resume_point(m.len, prompt.len(), PREFILL_CHUNK, model.reuse_by_rows());
                if at > 0 {
                    cache = kept.resume(m.key, at);
                }
            }
        }
        let cache = cache.unwrap_or_else(|| model.stage().new_cache());
        Drafter {
            model,
            fed: prompt[..cache.len()].to_vec(),
            computed_from: cache.len(),
            cache,
            prompt_len: prompt.len(),
            whole: true,
            cache_prompt,
        }
    }

    /// Up to `max` tokens the draft model picks greedily after `history` (the target's
    /// tokens so far), stopping early where it doubts its pick (below `p_min`), at an
    /// end-of-generation token, or at a token the target has no row for.
    /// `interrupted` is asked between prompt chunks.
    pub fn draft(
        &mut self,
        history: &[u32],
        max: usize,
        p_min: f32,
        target_vocab: usize,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Vec<u32>> {
        if !self.whole {
            // A pass failed half way: start again from nothing.
            self.cache = self.model.stage().new_cache();
            self.fed.clear();
            self.computed_from = 0;
        }
        // Roll back to what the target kept.
        let common = shared_prefix(&self.fed, history).min(self.cache.len());
        self.cache.truncate(common);
        self.fed.truncate(common);
        if history.len() >= self.model.config().context_length {
            return Ok(Vec::new());
        }
        let mut logits = self.feed(history, interrupted)?;
        let mut draft = Vec::with_capacity(max);
        let limit = self.model.config().context_length;
        while draft.len() < max {
            let token = argmax(&logits);
            if (token as usize) >= target_vocab
                || self.model.tokenizer().is_eog(token)
                || probability_of(&logits, token) < p_min
            {
                break;
            }
            draft.push(token);
            if draft.len() == max || self.fed.len() + 1 >= limit {
                break;
            }
            let position = self.fed.len();
            logits = self.forward(&[token], position, Logits::Last)?;
            self.fed.push(token);
        }
        Ok(draft)
    }

    /// Reads `tokens` (the prompt) into the cache.
    pub fn read(&mut self, tokens: &[u32], interrupted: &dyn Fn() -> bool) -> Result<()> {
        self.feed(tokens, interrupted).map(drop)
    }

    /// Feeds `history[fed..]` (the prompt alone first, in chunks cut where a fresh prefill
    /// cuts them, so the prompt's rows can be kept) and returns the last row's logits.
    fn feed(&mut self, history: &[u32], interrupted: &dyn Fn() -> bool) -> Result<Vec<f32>> {
        if self.fed.len() == history.len() {
            // Nothing new: the last token's logits are computed again (it was fed before).
            let last = self.fed.len() - 1;
            self.cache.truncate(last);
            self.fed.truncate(last);
        }
        let mut logits = None;
        while self.fed.len() < history.len() {
            if logits.is_some() && interrupted() {
                return Err(EngineError::Interrupted);
            }
            let start = self.fed.len();
            let mut stop = ((start / PREFILL_CHUNK + 1) * PREFILL_CHUNK).min(history.len());
            if start < self.prompt_len {
                stop = stop.min(self.prompt_len);
            }
            logits = Some(self.forward(&history[start..stop], start, Logits::Last)?);
            self.fed.extend_from_slice(&history[start..stop]);
        }
        logits.ok_or_else(|| EngineError::InvalidInput("nothing to draft from".into()))
    }

    fn forward(&mut self, tokens: &[u32], start: usize, logits: Logits) -> Result<Vec<f32>> {
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        self.whole = false;
        let out = self.model.stage().forward(
            StageInput::Tokens(tokens),
            &positions,
            &mut self.cache,
            logits,
        )?;
        self.whole = true;
        match out {
            StageOutput::Logits(l) => logits_row(&l, 0),
            StageOutput::Hidden(_) => Err(EngineError::InvalidInput("no logits produced".into())),
        }
    }
}

impl Drop for Drafter {
    /// Keeps the draft model's prompt rows for the conversation's next turn, as the target
    /// keeps its own.
    fn drop(&mut self) {
        if self.cache_prompt && self.whole {
            let cache = std::mem::replace(&mut self.cache, KvCache::new(0));
            keep_prompt(
                &self.model,
                &self.fed,
                self.prompt_len,
                self.computed_from,
                cache,
            );
        }
    }
}

/// Softmax probability of `token` under `logits`.
fn probability_of(logits: &[f32], token: u32) -> f32 {
    let Some(&top) = logits.get(token as usize) else {
        return 0.0;
    };
    let total: f32 = logits.iter().map(|&l| (l - top).exp()).sum();
    if total > 0.0 {
        1.0 / total
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_of_the_pick() {
        assert!((probability_of(&[0.0, 0.0], 0) - 0.5).abs() < 1e-6);
        let p = probability_of(&[1.0, 3.0, -2.0], 1);
        let want = 3f32.exp() / (1f32.exp() + 3f32.exp() + (-2f32).exp());
        assert!((p - want).abs() < 1e-6);
        assert_eq!(probability_of(&[1.0], 5), 0.0);
    }
}
