//! How alike two texts are.

use std::collections::HashSet;

/// The lowercase alphanumeric words of a text.
pub(super) fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Texts with fewer words than this are compared by single words, not word pairs.
pub(super) const BIGRAM_MIN_WORDS: usize = 3;

/// How similar two texts are, in [0, 1]: the Jaccard index of their lowercase word bigrams
/// (of single words when either has fewer than three words). Texts with the same words in
/// the same order (identical texts, or differing only in case and punctuation) give 1.
pub fn similarity(a: &str, b: &str) -> f32 {
    let words_a = words(a);
    let words_b = words(b);
    if words_a == words_b {
        return 1.0;
    }
    let use_bigrams = words_a.len() >= BIGRAM_MIN_WORDS && words_b.len() >= BIGRAM_MIN_WORDS;
    let grams = |w: &[String]| -> HashSet<String> {
        if use_bigrams {
            w.windows(2)
                .map(|pair| format!("{} {}", pair[0], pair[1]))
                .collect()
        } else {
            w.iter().cloned().collect()
        }
    };
    let set_a = grams(&words_a);
    let set_b = grams(&words_b);
    let union = set_a.union(&set_b).count();
    if union == 0 {
        return 0.0;
    }
    set_a.intersection(&set_b).count() as f32 / union as f32
}
