//! Answers constrained to a fixed set of texts — a classifier's labels, a yes/no — the one
//! grammar swarm routing needs (what llama.cpp does with a GBNF grammar of alternatives).
//!
//! Each choice is tokenized once. At every step only the tokens that continue a choice the
//! answer so far is a prefix of may be drawn (the others' logits become −∞ before sampling,
//! so penalties, temperature and the seed work as usual over what is left). When the answer
//! is a whole choice that no longer choice continues, generation ends there; when a longer
//! choice does continue it (`"CODE"` and `"CODE_REVIEW"`), the end-of-generation tokens are
//! allowed too, and the model's own preference decides.

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// Most choices one generation may be constrained to.
pub const MAX_CHOICES: usize = 64;

/// The token sequences an answer may be.
#[derive(Clone, Debug)]
pub(crate) struct Choices {
    sequences: Vec<Vec<u32>>,
}

impl Choices {
    /// Tokenizes `texts` as plain text (special-token text is not parsed). Refuses an empty
    /// list, more than [`MAX_CHOICES`], and a choice that is empty.
    pub(crate) fn new(tokenizer: &Tokenizer, texts: &[String]) -> Result<Self> {
        if texts.is_empty() || texts.len() > MAX_CHOICES {
            return Err(EngineError::InvalidInput(format!(
                "an answer may be constrained to 1 to {MAX_CHOICES} choices, not {}",
                texts.len()
            )));
        }
        let mut sequences: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
        for text in texts {
            let ids = tokenizer
                .encode(text, false)
                .map_err(|e| EngineError::InvalidInput(format!("choice {text:?}: {e}")))?;
            if ids.is_empty() {
                return Err(EngineError::InvalidInput(
                    "a choice is empty; every choice needs some text".into(),
                ));
            }
            if !sequences.contains(&ids) {
                sequences.push(ids);
            }
        }
        Ok(Self { sequences })
    }

    /// Sets every logit to −∞ except those of the tokens that may come after `answer`: the
    /// next token of each choice that `answer` begins, and the `end` tokens when `answer` is
    /// itself a choice. An `answer` that no choice begins (impossible when each of its tokens
    /// was drawn through this mask) leaves only `end`.
    pub(crate) fn mask(&self, logits: &mut [f32], answer: &[u32], end: &[u32]) {
        let mut allowed: Vec<u32> = Vec::new();
        let mut complete = false;
        for seq in &self.sequences {
            if let Some(rest) = seq.strip_prefix(answer) {
                match rest.first() {
                    Some(&next) => allowed.push(next),
                    None => complete = true,
                }
            }
        }
        if complete || allowed.is_empty() {
            allowed.extend_from_slice(end);
        }
        let kept: Vec<(u32, f32)> = allowed
            .iter()
            .filter_map(|&t| logits.get(t as usize).map(|&l| (t, l)))
            .collect();
        logits.fill(f32::NEG_INFINITY);
        for (t, l) in kept {
            if let Some(slot) = logits.get_mut(t as usize) {
                // A choice's token whose logit is NaN or −∞ must still be drawable, or the
                // answer could end outside every choice.
                *slot = if l.is_finite() { l } else { f32::MIN };
            }
        }
    }

    /// Whether `answer` is a whole choice that no longer choice continues: nothing is left to
    /// generate.
    pub(crate) fn is_finished(&self, answer: &[u32]) -> bool {
        let mut complete = false;
        for seq in &self.sequences {
            if seq.len() > answer.len() && seq.starts_with(answer) {
                return false;
            }
            complete |= seq.as_slice() == answer;
        }
        complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices(seqs: &[&[u32]]) -> Choices {
        Choices {
            sequences: seqs.iter().map(|s| s.to_vec()).collect(),
        }
    }

    fn allowed(c: &Choices, answer: &[u32], end: &[u32]) -> Vec<u32> {
        let mut logits = vec![1.0f32; 10];
        c.mask(&mut logits, answer, end);
        (0..10u32)
            .filter(|&t| logits[t as usize] > f32::NEG_INFINITY)
            .collect()
    }

    #[test]
    fn only_continuations_of_a_choice_are_allowed() {
        let c = choices(&[&[1, 2, 3], &[1, 4], &[5]]);
        assert_eq!(allowed(&c, &[], &[9]), vec![1, 5]);
        assert_eq!(allowed(&c, &[1], &[9]), vec![2, 4]);
        assert_eq!(allowed(&c, &[1, 2], &[9]), vec![3]);
        assert!(!c.is_finished(&[1]));
        assert!(c.is_finished(&[1, 2, 3]));
        assert!(c.is_finished(&[5]));
    }

    #[test]
    fn a_choice_that_a_longer_one_continues_may_end_or_go_on() {
        let c = choices(&[&[1, 2], &[1, 2, 3]]);
        assert_eq!(allowed(&c, &[1, 2], &[8, 9]), vec![3, 8, 9]);
        assert!(!c.is_finished(&[1, 2]));
        assert!(c.is_finished(&[1, 2, 3]));
    }

    #[test]
    fn the_allowed_logits_keep_their_values_and_a_dead_one_stays_drawable() {
        let c = choices(&[&[2], &[3]]);
        let mut logits = vec![0.5, 0.25, 7.0, f32::NEG_INFINITY, 1.0];
        c.mask(&mut logits, &[], &[]);
        assert_eq!(logits[2], 7.0);
        assert_eq!(logits[3], f32::MIN);
        for i in [0, 1, 4] {
            assert_eq!(logits[i], f32::NEG_INFINITY);
        }
    }
}
