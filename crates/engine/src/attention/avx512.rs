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
        unsafe {
            if seq > 1 {
                prompt_head(heads, h, q, k, v, query_pos, key_pos, &mut out);
            } else {
                token_head(heads, h, q, k, v, query_pos, key_pos, &mut out);
            }
        }
        out
    };
    super::by_head(heads, seq, total, run_head)
}

/// Query head `h` for one query (a decode step): `out` [1, hd].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
unsafe fn token_head(
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
    // One token sums in `ggml_vec_dot_f16`'s order (four banks of 16 lanes).
    let banks = 4;
    let mut probs = vec![0f32; padded];
    let mut slots = vec![0f32; banks * LANES * hd];
    let mut qh = vec![0f32; hd];
    for (i, &pos) in query_pos.iter().enumerate() {
        round_query(&q[(i * n_heads + h) * hd..][..hd], &mut qh);
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

/// Query head `h` of a prompt (tinyBLAS's orders; `token_head` has a decode step's):
/// each query's scores 16 keys at a time with the 16 accumulators reduced together
/// (`reduce16x16`, the same pairwise sums per key), and the value slots summed in
/// registers, four at a time. Keys and values are read as f16 (converting them to f32
/// once per head was faster up to 2,048 tokens and slower at 4,096, where the f32 copies
/// outgrow the core's cache).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
unsafe fn prompt_head(
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
    let padded = total.div_ceil(LANES) * LANES;
    let scale = 1.0 / (hd as f32).sqrt();
    // Key or value `j` of this head, f16.
    let row = |cache: &[f16], j: usize| cache.as_ptr().add((j * n_kv_heads + g) * hd);
    let mut probs = vec![0f32; padded];
    let mut slots = vec![0f32; LANES * hd];
    let mut qh = vec![0f32; hd];
    for (i, &pos) in query_pos.iter().enumerate() {
        round_query(&q[(i * n_heads + h) * hd..][..hd], &mut qh);
        let mut visible_end = 0;
        let pos_v = _mm512_set1_epi64(pos as i64);
        for (b, chunk) in probs.chunks_exact_mut(LANES).enumerate() {
            let j0 = b * LANES;
            // Which of the 16 keys this query sees (past `total`: none).
            let n = (total - j0).min(LANES);
            let valid = (u32::MAX >> (32 - n)) as u16;
            let at = key_pos.as_ptr().add(j0) as *const i64;
            let low = _mm512_maskz_loadu_epi64(valid as u8, at);
            let high = _mm512_maskz_loadu_epi64((valid >> 8) as u8, at.add(8));
            let visible = valid
                & (u16::from(_mm512_cmple_epu64_mask(low, pos_v))
                    | u16::from(_mm512_cmple_epu64_mask(high, pos_v)) << 8);
            if visible != 0 {
                visible_end = j0 + LANES - visible.leading_zeros() as usize;
            }
            if visible == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            // Keys past `total` keep zeros (their scores are masked).
            let mut acc = [_mm512_setzero_ps(); LANES];
            for c in 0..hd / LANES {
                let qc = _mm512_loadu_ps(qh.as_ptr().add(c * LANES));
                for (l, a) in acc.iter_mut().enumerate().take(n) {
                    let kx = row(k, j0 + l).add(c * LANES) as *const __m256i;
                    *a = _mm512_fmadd_ps(qc, _mm512_cvtph_ps(_mm256_loadu_si256(kx)), *a);
                }
            }
            let scores =
                _mm512_mask_blend_ps(visible, _mm512_set1_ps(f32::NEG_INFINITY), reduce16x16(acc));
            _mm512_storeu_ps(chunk.as_mut_ptr(), scores);
        }
        let live = visible_end.div_ceil(LANES) * LANES;
        softmax(&mut probs[..live], scale);
        prompt_values(
            &probs[..live.min(total)],
            row(v, 0),
            n_kv_heads * hd,
            hd,
            &mut slots,
        );
        reduce_slots(&slots, 1, hd, &mut out[i * hd..][..hd]);
    }
}

/// A query row rounded to f16 (as llama.cpp stores it for the product), into `qh`.
#[target_feature(enable = "avx512f,f16c,avx2")]
#[inline]
unsafe fn round_query(q: &[f32], qh: &mut [f32]) {
    for (x, r) in q.chunks_exact(LANES).zip(qh.chunks_exact_mut(LANES)) {
        let x = _mm512_loadu_ps(x.as_ptr());
        let rounded = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
        _mm512_storeu_ps(r.as_mut_ptr(), rounded);
    }
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

/// `values` for a prompt (one bank): slot `l` sums `fma(p, v, acc)` over keys `l, l + 16,
/// …` in order, 64 elements at a time in registers, four slots at once (16 independent
/// sums in flight, where one slot's four wait on each other). `v` points at the head's
/// first value (f16), the next `stride` elements on; one per key of `probs`.
#[target_feature(enable = "avx512f,f16c,fma,avx2")]
#[inline]
unsafe fn prompt_values(probs: &[f32], v: *const f16, stride: usize, hd: usize, slots: &mut [f32]) {
    const TOGETHER: usize = 4;
    for first in (0..LANES).step_by(TOGETHER) {
        for c in (0..hd).step_by(STEP) {
            let mut acc = [[_mm512_setzero_ps(); 4]; TOGETHER];
            let mut j0 = 0;
            while j0 < probs.len() {
                for (s, acc) in acc.iter_mut().enumerate() {
                    let j = j0 + first + s;
                    let p = match probs.get(j) {
                        Some(&p) if p != 0.0 => p,
                        _ => continue,
                    };
                    let pv = _mm512_set1_ps(p);
                    let row = v.add(j * stride + c);
                    for (x, a) in acc.iter_mut().enumerate() {
                        let vx = _mm256_loadu_si256(row.add(x * LANES) as *const __m256i);
                        *a = _mm512_fmadd_ps(pv, _mm512_cvtph_ps(vx), *a);
                    }
                }
                j0 += LANES;
            }
            for (s, acc) in acc.iter().enumerate() {
                let slot = &mut slots[(first + s) * hd..][..hd];
                for (x, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(slot.as_mut_ptr().add(c + x * LANES), *a);
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
