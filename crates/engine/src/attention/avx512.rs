//! Attention with AVX-512, straight from the f16 cache: the same operations in the same
//! order as `HeadJob::run_body` (for one query token, `ggml_vec_dot_f16`'s order for scores
//! and values; for prompts, tinyBLAS's; ggml's vector `expf`), so the same bits (tested
//! against it), without converting the whole cache to f32 for every layer and with the
//! reductions in registers.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::f16;

use super::{Heads, LANES, STEP};

/// Whether this CPU runs [`attend`].
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `super::attend` (`q`: [seq, n_heads, hd]); `hd` a multiple of 64.
pub(super) fn attend(
    heads: Heads,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    query_pos: &[usize],
    key_pos: &[usize],
) -> Vec<f32> {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = heads;
    let (seq, total) = (query_pos.len(), key_pos.len());
    assert!(hd.is_multiple_of(STEP) && n_heads.is_multiple_of(n_kv_heads));
    assert!(q.len() == seq * n_heads * hd);
    assert!(k.len() == total * n_kv_heads * hd && v.len() == k.len());
    let run_head = |h: usize| -> Vec<f32> {
        let mut out = vec![0f32; seq * hd];
        let call = HeadCall {
            heads,
            h,
            q,
            k,
            v,
            query_pos,
            key_pos,
        };
        // Safety: `available()` was checked by the caller; the sizes above.
        unsafe {
            if seq > 1 {
                prompt_head(&call, &mut out);
            } else {
                token_head(&call, &mut out);
            }
        }
        out
    };
    super::by_head(heads, seq, total, run_head)
}

/// What one query head's attention reads (`attend`'s arguments and the head `h`).
#[derive(Clone, Copy)]
struct HeadCall<'a> {
    heads: Heads,
    h: usize,
    q: &'a [f32],
    k: &'a [f16],
    v: &'a [f16],
    query_pos: &'a [usize],
    key_pos: &'a [usize],
}

impl HeadCall<'_> {
    /// The key/value head this query head reads.
    fn group(&self) -> usize {
        self.h / (self.heads.n_heads / self.heads.n_kv_heads)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.heads.head_dim as f32).sqrt()
    }

    /// Query `i`'s row of this head rounded to f16 (as llama.cpp stores it for the
    /// product), into `qh`.
    #[target_feature(enable = "avx512f,f16c,avx2")]
    #[inline]
    unsafe fn round_query(&self, i: usize, qh: &mut [f32]) {
        let hd = self.heads.head_dim;
        let q = &self.q[(i * self.heads.n_heads + self.h) * hd..][..hd];
        for (x, r) in q.chunks_exact(LANES).zip(qh.chunks_exact_mut(LANES)) {
            let x = _mm512_loadu_ps(x.as_ptr());
            let rounded = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            _mm512_storeu_ps(r.as_mut_ptr(), rounded);
        }
    }
}

/// Query head `h` for one query (a decode step): `out` [1, hd].
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
unsafe fn token_head(call: &HeadCall, out: &mut [f32]) {
    let HeadCall {
        k,
        v,
        query_pos,
        key_pos,
        ..
    } = *call;
    let (total, hd, n_kv_heads) = (key_pos.len(), call.heads.head_dim, call.heads.n_kv_heads);
    let g = call.group();
    let padded = total.div_ceil(STEP) * STEP;
    // One token sums in `ggml_vec_dot_f16`'s order (four banks of 16 lanes).
    let banks = 4;
    let mut probs = vec![0f32; padded];
    let mut slots = vec![0f32; banks * LANES * hd];
    let mut qh = vec![0f32; hd];
    for (i, &pos) in query_pos.iter().enumerate() {
        call.round_query(i, &mut qh);
        let mut visible_end = 0;
        for (j, p) in probs.iter_mut().enumerate() {
            *p = if j < total && key_pos[j] <= pos {
                visible_end = j + 1;
                let kj = k.as_ptr().add((j * n_kv_heads + g) * hd);
                score_steps(&qh, kj, hd)
            } else {
                f32::NEG_INFINITY
            };
        }
        // Chunks of 16 with no visible key would be all -inf: their probabilities are
        // exactly 0 and add exactly 0 to the softmax sum, so they are left out.
        let live = visible_end.div_ceil(LANES) * LANES;
        softmax(&mut probs[..live], call.scale());
        values(
            &probs[..live.min(total)],
            v,
            (g, n_kv_heads, hd),
            banks,
            &mut slots,
        );
        reduce_slots(&slots, banks, hd, &mut out[i * hd..][..hd]);
    }
}

/// How many rows ahead `prompt_values` asks for values.
const AHEAD: usize = 4;

/// Queries whose scores are computed together: each key row converted from f16 once for
/// all of them.
const QUERIES: usize = 4;
/// Keys per tile of scores: `QUERIES * KEYS` accumulators, the 16 `reduce16x16` takes.
const KEYS: usize = LANES / QUERIES;

/// Query head `h` of a prompt (tinyBLAS's orders; `token_head` has a decode step's).
/// Scores come in tiles of 4 queries × 4 keys, as tinyBLAS tiles its product: each key's
/// 16-element pieces converted once and multiplied into four queries' accumulators, each
/// (query, key) sum in its own register in the same order as one at a time, the 16 sums of
/// a tile reduced together (`reduce16x16`, the same pairwise sums per key). The four
/// queries' value sums then share each value's conversion too (`prompt_values`). Keys and
/// values are read as f16 (converting them to f32 once per head was faster up to 2,048
/// tokens and slower at 4,096, where the f32 copies outgrow the core's cache).
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
unsafe fn prompt_head(call: &HeadCall, out: &mut [f32]) {
    let HeadCall { k, key_pos, .. } = *call;
    let (seq, total, hd) = (call.query_pos.len(), key_pos.len(), call.heads.head_dim);
    let padded = total.div_ceil(LANES) * LANES;
    // Key or value `j` of this head, f16.
    let (g, n_kv_heads) = (call.group(), call.heads.n_kv_heads);
    let row = |cache: &[f16], j: usize| cache.as_ptr().add((j * n_kv_heads + g) * hd);
    let mut probs = vec![0f32; QUERIES * padded];
    let mut slots = vec![0f32; QUERIES * LANES * hd];
    let mut qh = vec![0f32; QUERIES * hd];
    for first in (0..seq).step_by(QUERIES) {
        let count = (seq - first).min(QUERIES);
        // A group short of 4 repeats its last query (scored, never used).
        let mut pos_v = [_mm512_setzero_si512(); QUERIES];
        for (a, (qa, pos)) in qh.chunks_exact_mut(hd).zip(&mut pos_v).enumerate() {
            let i = first + a.min(count - 1);
            call.round_query(i, qa);
            *pos = _mm512_set1_epi64(call.query_pos[i] as i64);
        }
        let mut visible_end = [0usize; QUERIES];
        for j0 in (0..padded).step_by(LANES) {
            // Which of the 16 keys each query sees (past `total`: none).
            let n = (total - j0).min(LANES);
            let valid = (u32::MAX >> (32 - n)) as u16;
            let at = key_pos.as_ptr().add(j0) as *const i64;
            let low = _mm512_maskz_loadu_epi64(valid as u8, at);
            let high = _mm512_maskz_loadu_epi64((valid >> 8) as u8, at.add(8));
            let mut visible = [0u16; QUERIES];
            for a in 0..QUERIES {
                visible[a] = valid
                    & (u16::from(_mm512_cmple_epu64_mask(low, pos_v[a]))
                        | u16::from(_mm512_cmple_epu64_mask(high, pos_v[a])) << 8);
                if visible[a] != 0 {
                    visible_end[a] = j0 + LANES - visible[a].leading_zeros() as usize;
                }
            }
            let probs_at = probs.as_mut_ptr();
            let chunk = |a: usize| probs_at.add(a * padded + j0);
            if visible == [0; QUERIES] {
                for a in 0..QUERIES {
                    _mm512_storeu_ps(chunk(a), _mm512_set1_ps(f32::NEG_INFINITY));
                }
                continue;
            }
            let mut tiles = [_mm512_setzero_ps(); KEYS];
            for (t, tile) in tiles.iter_mut().enumerate() {
                // Keys past `total` are scored as the last one (and masked).
                let mut keys = [k.as_ptr(); KEYS];
                for (b, key) in keys.iter_mut().enumerate() {
                    *key = row(k, (j0 + t * KEYS + b).min(total - 1));
                }
                *tile = score_tile(qh.as_ptr(), hd, keys);
            }
            let scores = by_query(tiles);
            for a in 0..QUERIES {
                let masked = _mm512_set1_ps(f32::NEG_INFINITY);
                _mm512_storeu_ps(
                    chunk(a),
                    _mm512_mask_blend_ps(visible[a], masked, scores[a]),
                );
            }
        }
        // Every query's probabilities up to the group's last visible key: zeros past its
        // own (they add nothing to its sums).
        let live = visible_end.map(|end| end.div_ceil(LANES) * LANES);
        let group_live = live.into_iter().max().unwrap_or(0);
        for (a, probs) in probs.chunks_exact_mut(padded).enumerate() {
            softmax(&mut probs[..live[a]], call.scale());
            probs[live[a]..group_live].fill(0.0);
        }
        prompt_values(
            &probs,
            padded,
            group_live.min(total),
            (row(call.v, 0), n_kv_heads * hd, hd),
            &mut slots,
        );
        for (a, slots) in slots.chunks_exact(LANES * hd).take(count).enumerate() {
            reduce_slots(slots, 1, hd, &mut out[(first + a) * hd..][..hd]);
        }
    }
}

/// One tile of scores: lane `a * KEYS + b` is `reduce16` of query `a`'s (rows of `qh`,
/// `hd` apart) products with key `b`, summed 16 elements at a time in order.
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
#[inline]
unsafe fn score_tile(qh: *const f32, hd: usize, keys: [*const f16; KEYS]) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); QUERIES * KEYS];
    for c in (0..hd).step_by(LANES) {
        let mut kv = [_mm512_setzero_ps(); KEYS];
        for (x, key) in kv.iter_mut().zip(keys) {
            *x = _mm512_cvtph_ps(_mm256_loadu_si256(key.add(c) as *const __m256i));
        }
        for a in 0..QUERIES {
            let qv = _mm512_loadu_ps(qh.add(a * hd + c));
            for (b, x) in kv.iter().enumerate() {
                acc[a * KEYS + b] = _mm512_fmadd_ps(qv, *x, acc[a * KEYS + b]);
            }
        }
    }
    reduce16x16(acc)
}

/// Four tiles of 4 × 4 scores (tile `t`: keys `4t..4t + 4`, lanes by query) as each query's
/// 16 keys: a 4 × 4 transpose of 128-bit blocks.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn by_query(t: [__m512; KEYS]) -> [__m512; QUERIES] {
    // Blocks 0, 1 (queries 0, 1) and 2, 3 of tiles 0 and 1, and of tiles 2 and 3.
    let low01 = _mm512_shuffle_f32x4::<0b01_00_01_00>(t[0], t[1]);
    let low23 = _mm512_shuffle_f32x4::<0b01_00_01_00>(t[2], t[3]);
    let high01 = _mm512_shuffle_f32x4::<0b11_10_11_10>(t[0], t[1]);
    let high23 = _mm512_shuffle_f32x4::<0b11_10_11_10>(t[2], t[3]);
    [
        _mm512_shuffle_f32x4::<0b10_00_10_00>(low01, low23),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(low01, low23),
        _mm512_shuffle_f32x4::<0b10_00_10_00>(high01, high23),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(high01, high23),
    ]
}

/// `reduce16` of 16 registers at once: lane `l` of the result is `reduce16(v[l])`, bit for
/// bit — each level adds the same pairs of lanes (8 apart, then 4, 2, 1), for several
/// registers per instruction.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn reduce16x16(v: [__m512; LANES]) -> __m512 {
    // Lanes i and i + 8 of two registers: [v_a's 8 sums | v_b's 8 sums].
    let mut eights = [_mm512_setzero_ps(); 8];
    for (i, e) in eights.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *e = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        );
    }
    // Lanes i and i + 4 of each: four registers' 4 sums in each 128-bit chunk.
    let mut fours = [_mm512_setzero_ps(); 4];
    for (i, f) in fours.iter_mut().enumerate() {
        let (a, b) = (eights[2 * i], eights[2 * i + 1]);
        *f = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        );
    }
    // Lanes i and i + 2 (as 64-bit pairs), then i and i + 1.
    let mut twos = [_mm512_setzero_ps(); 2];
    for (i, t) in twos.iter_mut().enumerate() {
        let (a, b) = (
            _mm512_castps_pd(fours[2 * i]),
            _mm512_castps_pd(fours[2 * i + 1]),
        );
        *t = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
    }
    let ones = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(twos[0], twos[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(twos[0], twos[1]),
    );
    // Lane L now holds register (L % 4) * 4 + L / 4: back in register order.
    _mm512_permutexvar_ps(
        _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0),
        ones,
    )
}

/// `values` for a prompt's group of queries (one bank each): query `a`'s slot `l` sums
/// `fma(p, v, acc)` over keys `l, l + 16, …` below `len` in order, 64 elements at a time in
/// registers, each value converted from f16 once for the four queries. `probs` holds the
/// queries' probabilities `padded` apart; `slots` gets each query's 16 slots, `16 * hd`
/// apart. `v` points at the head's first value (f16), the next `stride` elements on.
///
/// Keys a query gives probability 0 are multiplied in, not skipped as `run_body` and
/// `values` skip them: with finite values that adds exactly +0 to a sum that starts at +0
/// and so can never be -0, which leaves it as it was (and tinyBLAS multiplies them too).
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
#[inline]
unsafe fn prompt_values(
    probs: &[f32],
    padded: usize,
    len: usize,
    (v, stride, hd): (*const f16, usize, usize),
    slots: &mut [f32],
) {
    // What the unchecked reads below rely on.
    assert!(len <= padded && probs.len() >= QUERIES * padded);
    assert!(slots.len() >= QUERIES * LANES * hd);
    for slot in 0..LANES {
        for c in (0..hd).step_by(STEP) {
            let mut acc = [[_mm512_setzero_ps(); 4]; QUERIES];
            for j in (slot..len).step_by(LANES) {
                let row = v.add(j * stride + c);
                // Rows 16 keys apart are pages apart, where the hardware's prefetchers
                // stop: ask for the piece four rows on.
                let ahead = row.wrapping_add(AHEAD * LANES * stride) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                let mut vx = [_mm512_setzero_ps(); 4];
                for (x, value) in vx.iter_mut().enumerate() {
                    let at = row.add(x * LANES) as *const __m256i;
                    *value = _mm512_cvtph_ps(_mm256_loadu_si256(at));
                }
                for (a, acc) in acc.iter_mut().enumerate() {
                    let pv = _mm512_set1_ps(*probs.get_unchecked(a * padded + j));
                    for (sum, value) in acc.iter_mut().zip(vx) {
                        *sum = _mm512_fmadd_ps(pv, value, *sum);
                    }
                }
            }
            for (a, acc) in acc.iter().enumerate() {
                let at = slots.as_mut_ptr().add((a * LANES + slot) * hd + c);
                for (x, sum) in acc.iter().enumerate() {
                    _mm512_storeu_ps(at.add(x * LANES), *sum);
                }
            }
        }
    }
}

/// `dot_steps(q, k)` (`ggml_vec_dot_f16`): four 16-lane accumulators over each 64 elements, then
/// (0 + 2) + (1 + 3) and the lanes pairwise. `k` is f16.
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
#[inline]
unsafe fn score_steps(q: &[f32], k: *const f16, hd: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    for s in (0..hd).step_by(STEP) {
        for (c, a) in acc.iter_mut().enumerate() {
            let kv = _mm512_cvtph_ps(_mm256_loadu_si256(k.add(s + c * LANES) as *const __m256i));
            let qv = _mm512_loadu_ps(q.as_ptr().add(s + c * LANES));
            *a = _mm512_fmadd_ps(qv, kv, *a);
        }
    }
    let lanes = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
    // As `reduce_lanes` (and the f64 round trip of `dot_steps` is exact).
    reduce16(lanes)
}

/// The 16 lanes added pairwise: 8 + 8, 4 + 4, 2 + 2, 1 + 1.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn reduce16(v: __m512) -> f32 {
    // The upper half through the f64 view: `extractf32x8` would need AVX-512 DQ.
    let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let x8 = _mm256_add_ps(_mm512_castps512_ps256(v), upper);
    let x4 = _mm_add_ps(_mm256_castps256_ps128(x8), _mm256_extractf128_ps::<1>(x8));
    let x2 = _mm_add_ps(x4, _mm_movehl_ps(x4, x4));
    _mm_cvtss_f32(_mm_add_ss(x2, _mm_movehdup_ps(x2)))
}

/// `softmax_row`, then the probabilities rounded to f16.
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
#[inline]
unsafe fn softmax(row: &mut [f32], scale: f32) {
    let scale_v = _mm512_set1_ps(scale);
    let mut max_v = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in row.chunks_exact_mut(LANES) {
        let x = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), scale_v);
        _mm512_storeu_ps(c.as_mut_ptr(), x);
        max_v = _mm512_max_ps(max_v, x);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max_v));
    let mut sum = 0f64;
    for c in row.chunks_exact_mut(LANES) {
        let e = crate::ggml_math::expf16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), max));
        _mm512_storeu_ps(c.as_mut_ptr(), e);
        sum += reduce16(e) as f64;
    }
    let inv = _mm512_set1_ps((1.0 / sum) as f32);
    for c in row.chunks_exact_mut(LANES) {
        let p = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv);
        let p = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(p));
        _mm512_storeu_ps(c.as_mut_ptr(), p);
    }
}

/// The value sums of each (bank, lane) slot, in key order, `fma(p, v, acc)` per element:
/// with 4 banks (one token) key `j` goes to bank `(j / 16) % 4`, lane `j % 16`; with 1
/// (prompts) to lane `j % 16`. Zero probabilities add nothing and are skipped, as in
/// `run_body`; `probs` covers every key that can have a non-zero one.
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
#[inline]
unsafe fn values(
    probs: &[f32],
    v: &[f16],
    (g, n_kv_heads, hd): (usize, usize, usize),
    banks: usize,
    slots: &mut [f32],
) {
    let vecs = hd / LANES;
    for slot_index in 0..banks * LANES {
        let slot = &mut slots[slot_index * hd..][..hd];
        slot.fill(0.0);
        let mut j = slot_index;
        while j < probs.len() {
            let p = probs[j];
            if p != 0.0 {
                let pv = _mm512_set1_ps(p);
                let row = v.as_ptr().add((j * n_kv_heads + g) * hd);
                for c in 0..vecs {
                    let x =
                        _mm512_cvtph_ps(_mm256_loadu_si256(row.add(c * LANES) as *const __m256i));
                    let a = slot.as_mut_ptr().add(c * LANES);
                    _mm512_storeu_ps(a, _mm512_fmadd_ps(pv, x, _mm512_loadu_ps(a)));
                }
            }
            j += banks * LANES;
        }
    }
}

/// Per element: four banks added as (0 + 2) + (1 + 3), then the 16 lanes pairwise.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn reduce_slots(slots: &[f32], banks: usize, hd: usize, out: &mut [f32]) {
    // (No closure for the loads: a closure does not inherit the target features.)
    let base = slots.as_ptr();
    for c in 0..hd / LANES {
        let mut lanes = [_mm512_setzero_ps(); LANES];
        for (l, x) in lanes.iter_mut().enumerate() {
            let at = |b: usize| base.add((b * LANES + l) * hd + c * LANES);
            *x = if banks == 4 {
                let (b0, b1) = (_mm512_loadu_ps(at(0)), _mm512_loadu_ps(at(1)));
                let (b2, b3) = (_mm512_loadu_ps(at(2)), _mm512_loadu_ps(at(3)));
                _mm512_add_ps(_mm512_add_ps(b0, b2), _mm512_add_ps(b1, b3))
            } else {
                _mm512_loadu_ps(at(0))
            };
        }
        let mut half = LANES / 2;
        while half > 0 {
            for i in 0..half {
                lanes[i] = _mm512_add_ps(lanes[i], lanes[i + half]);
            }
            half /= 2;
        }
        _mm512_storeu_ps(out.as_mut_ptr().add(c * LANES), lanes[0]);
    }
}
