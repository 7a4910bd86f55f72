//! Choosing the next token from logits.
//!
//! Order follows llama.cpp's default chain: penalties, top-k, top-p, min-p, temperature,
//! then a draw. Temperature 0 is greedy: the highest logit, lowest id on ties, with no
//! randomness at all, so greedy output is exactly reproducible.

use std::collections::HashMap;

/// How to pick tokens. Defaults are greedy with no penalties.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off. Divides positive logits (multiplies negative ones) of tokens seen in the
    /// last `repeat_last_n` tokens, as llama.cpp does.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's: subtract `frequency_penalty * count + presence_penalty * (count > 0)`.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether any penalty changes the logits (each draw then depends on the history).
    pub fn has_penalties(&self) -> bool {
        (self.repeat_penalty != 1.0 && self.repeat_last_n > 0)
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// A sampler for one session. Its random draw for a token depends only on the seed and the
/// token's position in the session, not on how many draws came before: any node that
/// samples a position draws the same, so a ring re-planned mid-session (a new last stage,
/// a new sampler) replays to exactly the tokens the lost ring would have drawn.
pub struct Sampler {
    params: SamplingParams,
    /// Scratch space reused between tokens.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token. `history` is every token of the session so far (prompt included),
    /// for the penalties; the token is drawn for position `history.len()`. `logits` is
    /// modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.sample_at(logits, history, history.len())
    }

    /// Picks the token at `position` (its index in the session). `history` holds the tokens
    /// the penalties look at (the whole session, or just its last `repeat_last_n`).
    pub fn sample_at(&mut self, logits: &mut [f32], history: &[u32], position: usize) -> u32 {
        self.apply_penalties(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let p = &self.params;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);

        // Probabilities at temperature 1 for the top-p and min-p cuts (llama.cpp applies
        // temperature last).
        let probs = softmax(c.iter().map(|x| x.1));
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p as f64;
            let keep = probs
                .iter()
                .take(c.len())
                .take_while(|&&pr| pr >= threshold)
                .count();
            c.truncate(keep.max(1));
        }
        let t = p.temperature;
        let probs = softmax(c.iter().map(|x| x.1 / t));
        let mut rng = Xoshiro256::seed(
            self.params
                .seed
                .wrapping_add((position as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)),
        );
        let r = rng.next_f64() * probs.iter().sum::<f64>();
        let mut cum = 0.0;
        for (i, pr) in probs.iter().enumerate() {
            cum += pr;
            if r < cum {
                return c[i].0;
            }
        }
        c.last().map(|x| x.0).unwrap_or(0)
    }

    fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if !p.has_penalties() {
            return;
        }
        let repeat = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
        let openai = p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        let window = &history[history.len().saturating_sub(p.repeat_last_n)..];
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in window {
            *counts.entry(t).or_default() += 1;
        }
        for (&tok, &n) in &counts {
            let Some(l) = logits.get_mut(tok as usize) else {
                continue;
            };
            if repeat {
                *l = if *l > 0.0 {
                    *l / p.repeat_penalty
                } else {
                    *l * p.repeat_penalty
                };
            }
            if openai {
                *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
}

/// Index of the largest value; the lowest index wins ties, NaN never wins.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in xs.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

fn softmax(xs: impl Iterator<Item = f32> + Clone) -> Vec<f64> {
    let max = xs.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = xs.map(|x| (x as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// xoshiro256** — small, fast, and the same on every platform, so a seed means the same
/// draws on every device of a swarm.
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn seed(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_max_and_the_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0], &[]), 1);
        assert_eq!(s.sample(&mut [f32::NAN, 0.5, 0.2], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                p.seed = seed;
            }));
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 5.0;
            p.top_k = 1;
        }));
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 2.0, 0.5], &[]), 2);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass: top_p 0.5 keeps it alone.
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.5;
        }));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn min_p_cuts_unlikely_tokens() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.min_p = 0.5;
            p.seed = 3;
        }));
        for _ in 0..100 {
            let t = s.sample(&mut [3.0, 2.9, -5.0, -6.0], &[]);
            assert!(t == 0 || t == 1, "got {t}");
        }
    }

    #[test]
    fn temperature_draws_follow_the_distribution() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.seed = 11;
        }));
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let ones = (0..4000)
            .filter(|&i| s.sample_at(&mut logits.clone(), &[], i) == 1)
            .count();
        let frac = ones as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }

    #[test]
    fn a_draw_depends_on_seed_and_position_only() {
        let p = params(|p| {
            p.temperature = 1.0;
            p.seed = 5;
        });
        let logits = [0.0f32, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7];
        let mut busy = Sampler::new(p.clone());
        for i in 0..37 {
            busy.sample_at(&mut logits.clone(), &[], i);
        }
        let draws: Vec<u32> = (100..140)
            .map(|i| busy.sample_at(&mut logits.clone(), &[], i))
            .collect();
        // A fresh sampler (a new last stage after a re-plan) draws the same.
        let mut fresh = Sampler::new(p);
        let again: Vec<u32> = (100..140)
            .map(|i| fresh.sample_at(&mut logits.clone(), &[], i))
            .collect();
        assert_eq!(draws, again);
        assert!(
            draws.iter().any(|&t| t != draws[0]),
            "positions draw differently"
        );
    }

    #[test]
    fn repeat_penalty_changes_the_greedy_choice() {
        let mut s = Sampler::new(params(|p| p.repeat_penalty = 2.0));
        // Token 0 would win, but it was just said: 3.0 / 2 < 2.0.
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1);
        // Negative logits are pushed further down, not up.
        assert_eq!(s.sample(&mut [-1.0, -1.5], &[0]), 1);
    }

    #[test]
    fn frequency_and_presence_penalties_count_occurrences() {
        let mut s = Sampler::new(params(|p| {
            p.frequency_penalty = 0.5;
            p.presence_penalty = 0.1;
        }));
        let mut logits = [2.0f32, 1.0];
        s.sample(&mut logits, &[0, 0, 0]);
        assert!((logits[0] - (2.0 - 1.5 - 0.1)).abs() < 1e-6);
        assert_eq!(logits[1], 1.0);
    }
}
