//! KV caches kept after their sessions end, so that a later session starting with the same
//! tokens — the next turn of a conversation, a shared system prompt, an agent resending its
//! whole history — reuses their keys and values and computes only the rest (issue #17;
//! llama-server's `cache_prompt`).
//!
//! A kept cache is found by the longest run of tokens it shares with a new prompt, and a
//! session resumes from a *copy* of that run: the kept one stays for others (two requests
//! with one system prompt both reuse it). When a session ends its cache is kept in turn, and
//! kept caches whose tokens it extends are dropped — the conversation's newest turn
//! supersedes the older ones. Memory is bounded by a byte budget, least recently used out.
//!
//! **Exactly the numbers a fresh run computes.** Our products follow llama.cpp's orders, and
//! those depend on the shape of a prompt chunk: a single token (decode) sums attention and
//! k-quant products in other orders than a chunk of rows, Q6_K rows take another order
//! below [`MIN_CHUNK_ROWS`] rows, and Q4_K rows take one order in whole groups of
//! [`ROW_GROUP`] and another for the rows left over. So reusing keys and values as they were
//! computed (as llama-server does, and documents as non-deterministic) can change the
//! answer. Here a cache keeps only the rows a prefill from position 0 of any longer prompt
//! with the same tokens would compute bit for bit ([`canonical_len`]): the prompt's rows,
//! never the generated tokens' (decoded one at a time), and of its last chunk only the
//! whole groups, when that chunk is long enough. A resumed prompt continues from a point
//! where its first chunk keeps the same groups and length rules ([`resume_point`]), and its
//! chunks end where a fresh run's end (multiples of the chunk size). Greedy output is then
//! identical with and without the cache (tested on the real models).
//!
//! Stages of a ring keep caches too, without knowing their tokens (they see hidden states):
//! there the head, which knows them, names the kept cache and the length to resume from.

use crate::kv_cache::KvCache;

/// Most caches kept at once, whatever their size: the lookup scans them all.
pub const MAX_KEPT: usize = 64;

/// Q4_K rows (of a matrix whose row count is a multiple of 8) are summed in one order in
/// the whole groups of this many rows from a chunk's start, and in another for the rows
/// left over (kernels/kquant.rs).
pub const ROW_GROUP: usize = 4;

/// A prompt chunk of fewer rows than this takes other orders (Q6_K below 8 rows, a single
/// row's attention), so such a chunk's rows are never reused, and a resumed prompt's first
/// chunk is never this short.
pub const MIN_CHUNK_ROWS: usize = 8;

/// Of a prompt of `len` tokens prefilled from position `from` (what was resumed, or 0) in
/// chunks that end at multiples of `chunk`, how many leading positions hold exactly what a
/// prefill from 0 of any longer prompt with the same tokens computes. `by_rows`: the
/// model's products depend on a chunk's shape only as this module allows for
/// ([`crate::Stage::rows_reusable_across_chunks`]); otherwise only whole chunks count.
pub fn canonical_len(len: usize, from: usize, chunk: usize, by_rows: bool) -> usize {
    let chunk = chunk.max(1);
    if len <= from {
        return len;
    }
    // The last chunk: from its start (a multiple of `chunk`, or `from`) to `len`.
    let last = from.max((len - 1) / chunk * chunk);
    let rows = len - last;
    if rows == chunk && last.is_multiple_of(chunk) {
        len
    } else if by_rows && rows >= MIN_CHUNK_ROWS && last.is_multiple_of(ROW_GROUP) {
        last + rows / ROW_GROUP * ROW_GROUP
    } else {
        last
    }
}

/// Where a prompt of `len` tokens that shares its first `shared` tokens with a kept
/// canonical cache resumes: at most `shared` and `len - 1` (one token must be computed, for
/// its logits), at a multiple of [`ROW_GROUP`] from which the first chunk (to the next
/// multiple of `chunk`, or `len`) has at least [`MIN_CHUNK_ROWS`] rows — or at a multiple
/// of `chunk`, where the chunks are a fresh run's. Without `by_rows`, only the latter.
pub fn resume_point(shared: usize, len: usize, chunk: usize, by_rows: bool) -> usize {
    let chunk = chunk.max(1);
    let mut at = shared.min(len.saturating_sub(1));
    if !by_rows {
        return at / chunk * chunk;
    }
    at = at / ROW_GROUP * ROW_GROUP;
    loop {
        if at.is_multiple_of(chunk) {
            return at;
        }
        let end = ((at / chunk + 1) * chunk).min(len);
        if end - at >= MIN_CHUNK_ROWS {
            return at;
        }
        // Start earlier, so the first chunk is long enough (never before its chunk start,
        // which is a multiple of `chunk` and ends the loop).
        let earlier = end.saturating_sub(MIN_CHUNK_ROWS) / ROW_GROUP * ROW_GROUP;
        at = earlier.max(at / chunk * chunk);
    }
}

/// Kept caches with their tokens, bounded in bytes.
pub struct PrefixCache {
    budget_bytes: usize,
    kept: Vec<Kept>,
    /// Bumped at every use, for least-recently-used eviction.
    clock: u64,
    next_key: u64,
}

struct Kept {
    key: u64,
    /// The tokens whose keys and values `cache` holds (one per position), or none where the
    /// keeper does not know them (a stage in the middle of a ring).
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    used: u64,
}

/// A kept cache that shares a prefix with a prompt, and how many tokens of it to reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    pub key: u64,
    pub len: usize,
}

impl PrefixCache {
    /// An empty cache that keeps at most `budget_bytes` of keys and values (0 keeps nothing).
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            kept: Vec::new(),
            clock: 0,
            next_key: 1,
        }
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// Number of caches kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Bytes of keys and values kept.
    pub fn bytes(&self) -> usize {
        self.kept.iter().map(|k| k.bytes).sum()
    }

    /// A key no cache kept here has had (for keepers that do not bring their own).
    pub fn fresh_key(&mut self) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        key
    }

    /// The kept cache sharing the longest prefix with `tokens`, and how much of it to
    /// reuse: the shared tokens, but at most `limit` (a prompt must leave at least one
    /// token to compute, for its logits). `None` when nothing is shared.
    pub fn longest(&self, tokens: &[u32], limit: usize) -> Option<PrefixMatch> {
        self.kept
            .iter()
            .map(|k| PrefixMatch {
                key: k.key,
                len: shared_prefix(&k.tokens, tokens).min(limit),
            })
            .filter(|m| m.len > 0)
            .max_by_key(|m| m.len)
    }

    /// A copy of the first `len` positions of the cache kept as `key`, which counts as
    /// used. `None` when no cache is kept under `key` or it holds fewer positions.
    pub fn resume(&mut self, key: u64, len: usize) -> Option<KvCache> {
        self.clock += 1;
        let clock = self.clock;
        let kept = self.kept.iter_mut().find(|k| k.key == key)?;
        if kept.cache.len() < len {
            return None;
        }
        kept.used = clock;
        Some(kept.cache.prefix(len))
    }

    /// Keeps `cache` under `key` (replacing what `key` held). `tokens` are the tokens of its
    /// positions, one each, or empty where they are unknown; cut to the positions held, and
    /// the cache cut to the tokens given. Kept caches whose tokens are a prefix of these are
    /// dropped, then the least recently used until the rest fits the budget. Returns the
    /// keys dropped (`key` itself when it alone is over the budget).
    pub fn keep(&mut self, key: u64, tokens: &[u32], mut cache: KvCache) -> Vec<u64> {
        let mut dropped = Vec::new();
        if let Some(i) = self.kept.iter().position(|k| k.key == key) {
            self.kept.swap_remove(i);
        }
        let tokens = if tokens.is_empty() {
            Vec::new()
        } else {
            cache.truncate(tokens.len());
            tokens[..cache.len()].to_vec()
        };
        cache.shrink_to_fit();
        let bytes = cache.size_in_bytes();
        if cache.is_empty() || bytes > self.budget_bytes {
            dropped.push(key);
            return dropped;
        }
        if !tokens.is_empty() {
            self.kept.retain(|k| {
                let superseded = !k.tokens.is_empty() && tokens.starts_with(&k.tokens);
                if superseded {
                    dropped.push(k.key);
                }
                !superseded
            });
        }
        self.clock += 1;
        self.kept.push(Kept {
            key,
            tokens,
            cache,
            bytes,
            used: self.clock,
        });
        while self.bytes() > self.budget_bytes || self.kept.len() > MAX_KEPT {
            let Some(oldest) = self
                .kept
                .iter()
                .enumerate()
                .min_by_key(|(_, k)| k.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            dropped.push(self.kept.swap_remove(oldest).key);
        }
        dropped
    }

    /// Drops the cache kept as `key`; `true` if there was one.
    pub fn forget(&mut self, key: u64) -> bool {
        let before = self.kept.len();
        self.kept.retain(|k| k.key != key);
        self.kept.len() != before
    }

    /// Drops every kept cache (their stage was replaced).
    pub fn clear(&mut self) {
        self.kept.clear();
    }
}

/// How many leading tokens `a` and `b` share.
pub fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `n` positions on 2 layers, each position's keys and values all `p as f32`
    /// (so a copy can be told apart from another cache).
    fn cache(n: usize) -> KvCache {
        let mut c = KvCache::new(2);
        for p in 0..n {
            for layer in 0..2 {
                let row = [p as f32; 4];
                c.append(layer, &row, &row).unwrap();
            }
            c.push_positions(&[p]);
        }
        c
    }

    #[test]
    fn the_longest_shared_prefix_is_found_and_capped_by_the_limit() {
        let mut pc = PrefixCache::new(1 << 20);
        pc.keep(1, &[1, 2, 3, 4], cache(4));
        pc.keep(2, &[1, 2, 9], cache(3));
        let m = pc.longest(&[1, 2, 3, 4, 5, 6], 5).unwrap();
        assert_eq!(m, PrefixMatch { key: 1, len: 4 });
        // The whole prompt is kept: one token is left to compute.
        assert_eq!(
            pc.longest(&[1, 2, 3, 4], 3),
            Some(PrefixMatch { key: 1, len: 3 })
        );
        assert_eq!(
            pc.longest(&[1, 2, 9, 9], 3),
            Some(PrefixMatch { key: 2, len: 3 })
        );
        assert_eq!(pc.longest(&[7, 1, 2], 2), None);
    }

    #[test]
    fn resuming_copies_the_prefix_and_leaves_the_kept_cache_whole() {
        let mut pc = PrefixCache::new(1 << 20);
        pc.keep(1, &[1, 2, 3, 4], cache(4));
        let copy = pc.resume(1, 2).unwrap();
        assert_eq!(copy.positions(), &[0, 1]);
        assert_eq!(copy.size_in_bytes(), cache(2).size_in_bytes());
        // The kept one still holds all four: a second session reuses it too.
        assert_eq!(pc.resume(1, 4).unwrap().len(), 4);
        assert!(pc.resume(1, 5).is_none(), "more than it holds");
        assert!(pc.resume(9, 1).is_none(), "never kept");
    }

    #[test]
    fn a_longer_turn_supersedes_the_caches_it_extends() {
        let mut pc = PrefixCache::new(1 << 20);
        pc.keep(1, &[1, 2], cache(2));
        pc.keep(2, &[1, 5], cache(2));
        let dropped = pc.keep(3, &[1, 2, 3, 4], cache(4));
        assert_eq!(dropped, vec![1]);
        assert_eq!(pc.len(), 2);
        // Keys without tokens (a stage's) are never superseded by tokens.
        pc.keep(4, &[], cache(1));
        assert!(pc.keep(5, &[1, 5, 6], cache(3)).contains(&2));
        assert_eq!(pc.len(), 3);
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let one = {
            let mut c = cache(4);
            c.shrink_to_fit();
            c.size_in_bytes()
        };
        let mut pc = PrefixCache::new(2 * one);
        pc.keep(1, &[1, 1, 1, 1], cache(4));
        pc.keep(2, &[2, 2, 2, 2], cache(4));
        // Using 1 makes 2 the oldest.
        assert!(pc.resume(1, 1).is_some());
        assert_eq!(pc.keep(3, &[3, 3, 3, 3], cache(4)), vec![2]);
        assert!(pc.bytes() <= pc.budget_bytes());
        // A cache over the whole budget is not kept at all.
        assert_eq!(pc.keep(4, &[4; 12], cache(12)), vec![4]);
        assert_eq!(pc.len(), 2);
        // A zero budget keeps nothing.
        let mut none = PrefixCache::new(0);
        assert_eq!(none.keep(1, &[1], cache(1)), vec![1]);
        assert!(none.is_empty());
    }

    #[test]
    fn canonical_rows_are_whole_chunks_and_whole_groups_of_a_long_last_chunk() {
        // Whole chunks.
        assert_eq!(canonical_len(1024, 0, 512, true), 1024);
        assert_eq!(canonical_len(1024, 0, 512, false), 1024);
        // A last chunk of 190 rows: its whole groups of 4.
        assert_eq!(canonical_len(702, 0, 512, true), 512 + 188);
        assert_eq!(canonical_len(702, 0, 512, false), 512);
        // A last chunk shorter than MIN_CHUNK_ROWS counts for nothing.
        assert_eq!(canonical_len(517, 0, 512, true), 512);
        assert_eq!(canonical_len(7, 0, 512, true), 0);
        // Resumed at 600 (a group start): the chunk [600, 702) of 102 rows, 100 of them.
        assert_eq!(canonical_len(702, 600, 512, true), 700);
        // Nothing computed: what was resumed.
        assert_eq!(canonical_len(600, 600, 512, true), 600);
    }

    #[test]
    fn resume_points_keep_the_first_chunk_long_and_its_groups_aligned() {
        assert_eq!(resume_point(700, 2000, 512, true), 700);
        assert_eq!(resume_point(703, 2000, 512, true), 700);
        // One token is always left to compute (and the first chunk is long enough).
        assert_eq!(resume_point(900, 900, 512, true), 892);
        // A first chunk of 4 rows (to 1024) would be too short: start 8 before it.
        assert_eq!(resume_point(1020, 2000, 512, true), 1016);
        // ... likewise before the prompt's end.
        assert_eq!(resume_point(700, 706, 512, true), 696);
        // A chunk boundary is always fine, however short what follows.
        assert_eq!(resume_point(512, 515, 512, true), 512);
        assert_eq!(resume_point(514, 515, 512, true), 512);
        // Whole chunks only, without `by_rows`.
        assert_eq!(resume_point(1020, 2000, 512, false), 512);
        assert_eq!(resume_point(300, 2000, 512, false), 0);
    }

    #[test]
    fn every_resume_point_obeys_the_rules() {
        for len in 1..1100 {
            for shared in (0..=len).step_by(7) {
                let at = resume_point(shared, len, 512, true);
                assert!(at <= shared && at < len.max(1), "{shared} {len} -> {at}");
                if !at.is_multiple_of(512) {
                    assert!(at.is_multiple_of(ROW_GROUP));
                    let end = ((at / 512 + 1) * 512).min(len);
                    assert!(end - at >= MIN_CHUNK_ROWS, "{shared} {len} -> {at}");
                }
            }
        }
    }

    #[test]
    fn tokens_and_positions_are_cut_to_each_other() {
        let mut pc = PrefixCache::new(1 << 20);
        // Two tokens known, three positions held: the third is cut.
        pc.keep(1, &[1, 2], cache(3));
        assert!(pc.resume(1, 3).is_none());
        assert_eq!(
            pc.longest(&[1, 2, 3], 2),
            Some(PrefixMatch { key: 1, len: 2 })
        );
        // More tokens than positions: only those held count.
        pc.keep(2, &[7, 8, 9], cache(1));
        assert_eq!(
            pc.longest(&[7, 8, 9], 2),
            Some(PrefixMatch { key: 2, len: 1 })
        );
        assert!(pc.forget(2));
        assert!(!pc.forget(2));
    }
}
