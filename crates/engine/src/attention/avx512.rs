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
        // Safety: `available()` was checked by the caller; the sizes above.
        unsafe { head_avx512(heads, h, q, k, v, query_pos, key_pos, &mut out) };
        out
    };
    super::by_head(heads, seq, total, run_head)
}

/// Query head `h` for every query: `out` [seq, hd].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
unsafe fn head_avx512(
    heads: Heads,
    h: usize,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    query_pos: &[usize],
    key_pos: &[usize],
    out: &mut [f32],
) {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = heads;
    let total = key_pos.len();
    let g = h / (n_heads / n_kv_heads);
    let padded = total.div_ceil(STEP) * STEP;
    let scale = 1.0 / (hd as f32).sqrt();
    // A prompt sums in tinyBLAS's order (one bank of 16 lanes), one token in
    // `ggml_vec_dot_f16`'s (four banks).
    let prompt = query_pos.len() > 1;
    let banks = if prompt { 1 } else { 4 };
    let mut probs = vec![0f32; padded];
    let mut slots = vec![0f32; banks * LANES * hd];
    let mut qh = vec![0f32; hd];
    for (i, &pos) in query_pos.iter().enumerate() {
        // Q rounded to f16, as llama.cpp stores it for the product.
        for c in 0..hd / LANES {
            let x = _mm512_loadu_ps(q.as_ptr().add((i * n_heads + h) * hd + c * LANES));
            let r = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            _mm512_storeu_ps(qh.as_mut_ptr().add(c * LANES), r);
        }
        let mut visible_end = 0;
        for (j, p) in probs.iter_mut().enumerate() {
            *p = if j < total && key_pos[j] <= pos {
                visible_end = j + 1;
                let kj = k.as_ptr().add((j * n_kv_heads + g) * hd);
                if prompt {
                    score_lanes(&qh, kj, hd)
                } else {
                    score_steps(&qh, kj, hd)
                }
            } else {
                f32::NEG_INFINITY
            };
        }
        // Chunks of 16 with no visible key would be all -inf: their probabilities are
        // exactly 0 and add exactly 0 to the softmax sum, so they are left out.
        let live = visible_end.div_ceil(LANES) * LANES;
        softmax(&mut probs[..live], scale);
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

/// `dot_lanes(q, k)` (tinyBLAS): one 16-lane accumulator over the row, then the lanes
/// pairwise. `k` is f16.
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
#[inline]
unsafe fn score_lanes(q: &[f32], k: *const f16, hd: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for c in (0..hd).step_by(LANES) {
        let kv = _mm512_cvtph_ps(_mm256_loadu_si256(k.add(c) as *const __m256i));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(c)), kv, acc);
    }
    reduce16(acc)
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
