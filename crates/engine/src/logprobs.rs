//! Log-probabilities of drawn tokens, for `logprobs` / `top_logprobs` (OpenAI) and
//! `Token::logprob` (the ring): the model's own distribution at each position — the
//! log-softmax of its logits before any sampling setting (temperature, penalties, top-k/p)
//! or constraint, as llama-server reports them by default.

/// A drawn token's log-probability, and the likeliest tokens at its place.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The likeliest tokens and their log-probabilities, likeliest first (ties: lower id
    /// first); as many as asked for.
    pub top: Vec<(u32, f32)>,
}

/// Most alternatives one position reports (OpenAI's bound for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `token`'s log-probability under `logits`, with the `top` likeliest tokens (at most
/// [`MAX_TOP_LOGPROBS`]); `None` when `token` is outside the logits.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> Option<TokenLogprob> {
    let x = *logits.get(token as usize)?;
    let lse = log_sum_exp(logits);
    let mut best: Vec<(u32, f32)> = Vec::new();
    let k = top.min(MAX_TOP_LOGPROBS).min(logits.len());
    if k > 0 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        // Descending logit, then ascending id: a total order, so the result is the same on
        // every machine. NaN (never produced) sorts last.
        let order = |a: &u32, b: &u32| {
            let (la, lb) = (logits[*a as usize], logits[*b as usize]);
            lb.partial_cmp(&la)
                .unwrap_or_else(|| la.is_nan().cmp(&lb.is_nan()))
                .then(a.cmp(b))
        };
        ids.select_nth_unstable_by(k - 1, order);
        ids.truncate(k);
        ids.sort_unstable_by(order);
        best = ids
            .into_iter()
            .map(|id| (id, (f64::from(logits[id as usize]) - lse) as f32))
            .collect();
    }
    Some(TokenLogprob {
        token,
        logprob: (f64::from(x) - lse) as f32,
        top: best,
    })
}

fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    max + sum.ln()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_and_the_top_are_ordered() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let lp = token_logprob(&logits, 3, 3).unwrap();
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(lp.logprob) - ((-2.0f64).exp() / z).ln()).abs() < 1e-6);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 2, 0],
            "likeliest first, ties by id"
        );
        let probs: f64 = (0..5)
            .map(|t| f64::from(token_logprob(&logits, t, 0).unwrap().logprob).exp())
            .sum();
        assert!((probs - 1.0).abs() < 1e-6);
        assert!(token_logprob(&logits, 5, 1).is_none());
        assert_eq!(token_logprob(&logits, 0, 99).unwrap().top.len(), 5);
        assert!(token_logprob(&logits, 0, 0).unwrap().top.is_empty());
    }
}
