//! Drafting by prompt lookup (issue #17; Saxena's "prompt lookup decoding", llama.cpp's
//! `lookup`): code edits and agent turns repeat their context heavily, so the tokens that
//! followed the last earlier occurrence of the answer's latest few tokens are a good guess at
//! what comes next, and cost nothing to make. [`crate::Speculation`] says how such guesses
//! are verified.

/// How tokens are drafted by lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// The longest run of latest tokens looked up (shorter ones are tried after it).
    pub max_ngram: usize,
    /// The shortest run looked up: shorter matches guess too badly to pay for their rows.
    pub min_ngram: usize,
}

impl Default for Lookup {
    fn default() -> Self {
        Lookup {
            max_ngram: 4,
            min_ngram: 2,
        }
    }
}

impl Lookup {
    /// Up to `max` tokens that followed the latest earlier occurrence of the longest run
    /// (from [`Lookup::max_ngram`] down to [`Lookup::min_ngram`] tokens) that ends
    /// `history`; empty when none occurred before.
    pub fn draft(&self, history: &[u32], max: usize) -> Vec<u32> {
        let len = history.len();
        if max == 0 {
            return Vec::new();
        }
        for n in (self.min_ngram.max(1)..=self.max_ngram).rev() {
            if len <= n {
                continue;
            }
            let tail = &history[len - n..];
            // The latest occurrence that is not the tail itself.
            let found = (0..len - n).rev().find(|&i| &history[i..i + n] == tail);
            if let Some(i) = found {
                let from = i + n;
                let to = (from + max).min(len);
                if to > from {
                    return history[from..to].to_vec();
                }
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_occurrence_of_the_longest_tail_is_followed() {
        let l = Lookup::default();
        // "1 2 3" occurred twice; the latest earlier occurrence is followed by 7 8.
        let h = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 3];
        assert_eq!(l.draft(&h, 2), vec![7, 8]);
        assert_eq!(l.draft(&h, 10), vec![7, 8, 9, 1, 2, 3]);
    }

    #[test]
    fn shorter_tails_are_tried_and_single_tokens_are_not() {
        let l = Lookup::default();
        // The 4- and 3-token tails never occurred; "5 6" did.
        assert_eq!(l.draft(&[5, 6, 7, 9, 9, 5, 6], 3), vec![7, 9, 9]);
        // Only the last token repeats: below min_ngram.
        assert!(l.draft(&[5, 1, 2, 5], 3).is_empty());
        assert!(l.draft(&[], 3).is_empty());
        assert!(l.draft(&[1, 2, 1, 2], 0).is_empty());
    }
}
