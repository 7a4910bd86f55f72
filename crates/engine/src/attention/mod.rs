//! Attention over a half-precision KV cache, computed in the order llama.cpp's CPU backend
//! computes it (its default, non-flash path), so that our logits follow its logits.
//!
//! Why the order matters: on SmolLM2-135M one probability rounded to the other side of an
//! f16 step changes the attention output by ~1e-5, which flips one 8-bit rounding of the
//! next layer's quantized activations, which moves the final logits by ~0.1 — enough to
//! change the greedy token at near-ties. Summing the same exact products in the same
//! order removes that whole cascade (measured against llama.cpp's own intermediate
//! tensors, see docs/PERFORMANCE.md).
//!
//! What llama.cpp does, and so what we do:
//! - Q, K and V are rounded to f16 (K and V are stored so, which also halves the cache).
//! - Scores `q·k`: f16×f16 products are exact in f32. A prompt of two or more tokens goes
//!   through llamafile's tinyBLAS: one 16-lane fused multiply-add accumulator over the
//!   row, then the lanes added pairwise (16→8→4→2→1). A single token goes through
//!   `ggml_vec_dot_f16`: four 16-lane accumulators over each 64 elements, added 0+2 and
//!   1+3, then 0+1, then pairwise over the lanes; elements past the last multiple of 64
//!   are added in f64.
//! - Softmax: scores times the scale, masked, minus the row maximum, exponentiated with
//!   ggml's polynomial `expf` 16 at a time; each 16-chunk summed pairwise and added in
//!   f64; every value multiplied by `1/sum` rounded to f32.
//! - The probabilities are rounded to f16 and multiply V in the same two orders, the
//!   reduction running over key positions (padded with zeros, which add nothing).

#![allow(unsafe_code)] // only to call the same loops compiled with FMA enabled

#[cfg(target_arch = "x86_64")]
mod avx512;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::ggml_math::ggml_expf;

/// Lanes of one accumulator (an AVX-512 register of f32).
const LANES: usize = 16;
/// Elements `ggml_vec_dot_f16` takes per step: four accumulators of 16 lanes.
const STEP: usize = 4 * LANES;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Adds the 16 lanes pairwise, as `_mm512_reduce_add_ps` does.
#[inline(always)]
fn reduce_lanes(mut a: [f32; LANES]) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            a[i] += a[i + half];
        }
        half /= 2;
    }
    a[0]
}

/// tinyBLAS order: one 16-lane accumulator; `x.len()` is a multiple of 16.
#[inline(always)]
fn dot_lanes(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (xc, yc) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = xc[l].mul_add(yc[l], acc[l]);
        }
    }
    reduce_lanes(acc)
}

/// `ggml_vec_dot_f16` order: four 16-lane accumulators per 64 elements, the rest in f64.
#[inline(always)]
fn dot_steps(x: &[f32], y: &[f32]) -> f32 {
    let np = x.len() / STEP * STEP;
    let mut acc = [[0f32; LANES]; 4];
    for (xs, ys) in x[..np].chunks_exact(STEP).zip(y[..np].chunks_exact(STEP)) {
        for (j, a) in acc.iter_mut().enumerate() {
            for l in 0..LANES {
                a[l] = xs[j * LANES + l].mul_add(ys[j * LANES + l], a[l]);
            }
        }
    }
    let mut sum = 0f64;
    if np > 0 {
        // GGML_F32x16_REDUCE: accumulators 0+2 and 1+3, then 0+1, then the lanes.
        let [a0, a1, a2, a3] = acc;
        let mut lanes = [0f32; LANES];
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane = (a0[l] + a2[l]) + (a1[l] + a3[l]);
        }
        sum = reduce_lanes(lanes) as f64;
    }
    for (a, b) in x[np..].iter().zip(&y[np..]) {
        sum += (a * b) as f64;
    }
    sum as f32
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

#[inline(always)]
/// Softmax of one row in place, as ggml's `soft_max_ext` does; `visible` keys come first,
/// the row is padded to a multiple of 16 and the padding holds `-inf`.
fn softmax_row(row: &mut [f32], scale: f32) {
    for v in row.iter_mut() {
        *v *= scale;
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f64;
    for chunk in row.chunks_exact_mut(LANES) {
        let mut e = [0f32; LANES];
        for l in 0..LANES {
            e[l] = ggml_expf(chunk[l] - max);
            chunk[l] = e[l];
        }
        sum += reduce_lanes(e) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// One query head against its KV head: `q` [seq, hd] (f16-rounded), `keys`/`values`
/// [padded, hd] (f16 values as f32, zero padding past `total`); query `i` sees key `j`
/// when `key_pos[j] <= query_pos[i]`.
struct HeadJob<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    query_pos: &'a [usize],
    key_pos: &'a [usize],
    padded: usize,
    hd: usize,
    scale: f32,
}

impl HeadJob<'_> {
    /// Output rows [seq, hd] for this head. The same loops, compiled with FMA where the
    /// CPU has it (`mul_add` is exact either way; without FMA it is a slow library call).
    fn run(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { self.run_fma(out) };
            return;
        }
        self.run_body(out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_fma(&self, out: &mut [f32]) {
        self.run_body(out);
    }

    #[inline(always)]
    fn run_body(&self, out: &mut [f32]) {
        let (hd, padded) = (self.hd, self.padded);
        let seq = self.query_pos.len();
        let total = self.key_pos.len();
        let prompt = seq > 1;
        let lanes_order = prompt && hd % LANES == 0;
        let mut probs = vec![0f32; padded];
        let mut acc = vec![0f32; LANES * hd];
        for i in 0..seq {
            let q = &self.q[i * hd..][..hd];
            for (j, p) in probs.iter_mut().enumerate() {
                *p = if j < total && self.key_pos[j] <= self.query_pos[i] {
                    let k = &self.keys[j * hd..][..hd];
                    if lanes_order {
                        dot_lanes(q, k)
                    } else {
                        dot_steps(q, k)
                    }
                } else {
                    f32::NEG_INFINITY
                };
            }
            softmax_row(&mut probs, self.scale);
            for p in probs.iter_mut() {
                *p = round_f16(*p);
            }
            let o = &mut out[i * hd..][..hd];
            if prompt {
                // tinyBLAS over key positions: lane l takes keys j ≡ l (mod 16).
                acc.fill(0.0);
                for (jc, pc) in probs.chunks_exact(LANES).enumerate() {
                    for (l, &p) in pc.iter().enumerate() {
                        if p == 0.0 {
                            continue; // adds exactly nothing
                        }
                        let v = &self.values[(jc * LANES + l) * hd..][..hd];
                        let a = &mut acc[l * hd..][..hd];
                        for d in 0..hd {
                            a[d] = p.mul_add(v[d], a[d]);
                        }
                    }
                }
                for (d, od) in o.iter_mut().enumerate() {
                    let mut lanes = [0f32; LANES];
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        *lane = acc[l * hd + d];
                    }
                    *od = reduce_lanes(lanes);
                }
            } else {
                // ggml_vec_dot_f16 over key positions; `padded` is a multiple of 64.
                let mut acc4 = vec![0f32; 4 * LANES * hd];
                for (jc, pc) in probs.chunks_exact(LANES).enumerate() {
                    let bank = jc % 4;
                    for (l, &p) in pc.iter().enumerate() {
                        if p == 0.0 {
                            continue;
                        }
                        let v = &self.values[(jc * LANES + l) * hd..][..hd];
                        let a = &mut acc4[(bank * LANES + l) * hd..][..hd];
                        for d in 0..hd {
                            a[d] = p.mul_add(v[d], a[d]);
                        }
                    }
                }
                for (d, od) in o.iter_mut().enumerate() {
                    let lane = |bank: usize, l: usize| acc4[(bank * LANES + l) * hd + d];
                    let mut lanes = [0f32; LANES];
                    for (l, x) in lanes.iter_mut().enumerate() {
                        let a0 = lane(0, l) + lane(2, l);
                        let a1 = lane(1, l) + lane(3, l);
                        *x = a0 + a1;
                    }
                    *od = reduce_lanes(lanes);
                }
            }
        }
    }
}

/// Attention of the new queries at `query_pos` over the cached keys at `key_pos` (the
/// new ones included; a query sees the keys at its position and before).
/// `q`: [seq, n_heads, hd] after RoPE, f32. `k`, `v`: [total, n_kv_heads, hd] in f16.
/// Returns [seq, n_heads * hd].
pub(crate) fn attend(
    heads: Heads,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    query_pos: &[usize],
    key_pos: &[usize],
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if heads.head_dim.is_multiple_of(STEP) && avx512::available() {
        return avx512::attend(heads, q, k, v, query_pos, key_pos);
    }
    attend_portable(heads, q, k, v, query_pos, key_pos)
}

/// [`attend`] on any CPU: K and V converted to f32, then `HeadJob`.
fn attend_portable(
    heads: Heads,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    query_pos: &[usize],
    key_pos: &[usize],
) -> Vec<f32> {
    let total = key_pos.len();
    let Heads {
        n_kv_heads,
        head_dim: hd,
        ..
    } = heads;
    // Padded so both orders run whole chunks; the padding keys are never visible and the
    // padding values are zero.
    let padded = total.div_ceil(STEP) * STEP;
    // Keys and values of every KV head as f32 ([head][K then V][padded][hd]), in a buffer
    // kept per thread: this runs for every layer of every token, and a fresh allocation
    // of this size is fresh pages (page faults) each time.
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let per_head = padded * hd;
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.resize(n_kv_heads * 2 * per_head, 0.0);
        for (g, kv) in scratch.chunks_exact_mut(2 * per_head).enumerate() {
            let (keys, values) = kv.split_at_mut(per_head);
            for j in 0..total {
                let src = (j * n_kv_heads + g) * hd;
                f16_to_f32(&k[src..src + hd], &mut keys[j * hd..][..hd]);
                f16_to_f32(&v[src..src + hd], &mut values[j * hd..][..hd]);
            }
            keys[total * hd..].fill(0.0);
            values[total * hd..].fill(0.0);
        }
        attend_converted(heads, q, scratch, query_pos, key_pos, padded)
    })
}

/// `dst = src` as f32. F16C in line where the CPU has it: `half`'s slice conversion calls a
/// function per 8 values, which was a fifth of SmolLM2's decode (the whole cache is
/// converted for every layer of every token).
fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { f16_to_f32_f16c(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(src.len(), dst.len());
    let whole = src.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = s.to_f32();
    }
}

/// `attend` once K and V are f32 in `kv` ([head][K then V][padded][hd]).
fn attend_converted(
    heads: Heads,
    q: &[f32],
    kv: &[f32],
    query_pos: &[usize],
    key_pos: &[usize],
    padded: usize,
) -> Vec<f32> {
    let (seq, total) = (query_pos.len(), key_pos.len());
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = heads;
    let n_rep = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head = padded * hd;
    let run_head = |h: usize| -> Vec<f32> {
        let g = h / n_rep;
        let (keys, values) = kv[2 * g * per_head..][..2 * per_head].split_at(per_head);
        let mut qh = vec![0f32; seq * hd];
        for i in 0..seq {
            for d in 0..hd {
                qh[i * hd + d] = round_f16(q[(i * n_heads + h) * hd + d]);
            }
        }
        let job = HeadJob {
            q: &qh,
            keys,
            values,
            query_pos,
            key_pos,
            padded,
            hd,
            scale,
        };
        let mut out = vec![0f32; seq * hd];
        job.run(&mut out);
        out
    };
    by_head(heads, seq, total, run_head)
}

/// `run_head(h)` ([seq, hd]) for every query head, in parallel when there is enough work
/// to pay for the hand-off, laid out as [seq, n_heads * hd].
fn by_head(
    heads: Heads,
    seq: usize,
    total: usize,
    run_head: impl Fn(usize) -> Vec<f32> + Sync,
) -> Vec<f32> {
    let Heads {
        n_heads,
        head_dim: hd,
        ..
    } = heads;
    let per_head: Vec<Vec<f32>> = if seq * total * hd >= 1 << 16 {
        let mut per_head = vec![Vec::new(); n_heads];
        crate::pool::for_each_chunk_mut(&mut per_head, 1, |h, slot| slot[0] = run_head(h));
        per_head
    } else {
        (0..n_heads).map(run_head).collect()
    };
    let mut out = vec![0f32; seq * n_heads * hd];
    for (h, rows) in per_head.iter().enumerate() {
        for i in 0..seq {
            out[(i * n_heads + h) * hd..][..hd].copy_from_slice(&rows[i * hd..][..hd]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_attention_is_bit_identical_to_the_portable_path() {
        if !avx512::available() {
            return;
        }
        for (n_heads, n_kv_heads, hd) in [(9, 3, 64), (14, 2, 64), (4, 4, 128), (2, 1, 192)] {
            for total in [1usize, 2, 15, 16, 17, 63, 64, 65, 130, 300] {
                let mut r = lcg((n_heads * 1000 + total * 7 + hd) as u64);
                let heads = Heads {
                    n_heads,
                    n_kv_heads,
                    head_dim: hd,
                };
                // A row per query (the prompt path scores queries four at a time).
                let q: Vec<f32> = (0..total * n_heads * hd).map(|_| r() * 4.0).collect();
                let kv = |r: &mut dyn FnMut() -> f32| -> Vec<f16> {
                    (0..total * n_kv_heads * hd)
                        .map(|_| f16::from_f32(r() * 3.0))
                        .collect()
                };
                let (k, v) = (kv(&mut r), kv(&mut r));
                // Positions with a gap, as after a truncated turn; the last is the query.
                let key_pos: Vec<usize> =
                    (0..total).map(|j| j + usize::from(j > total / 2)).collect();
                // One token (the last position), and prompts of the last tokens: whole
                // groups of four queries and groups short by one to three.
                for seq in [1, 2, 3, 4, 5, 8, 11, total] {
                    let seq = seq.min(total);
                    let query = &key_pos[total - seq..];
                    let q = &q[..seq * n_heads * hd];
                    let fast = avx512::attend(heads, q, &k, &v, query, &key_pos);
                    let portable = attend_portable(heads, q, &k, &v, query, &key_pos);
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&fast),
                        bits(&portable),
                        "{n_heads}/{n_kv_heads}x{hd}, {total} keys, {seq} queries"
                    );
                }
            }
        }
    }

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
    }

    /// Plain f64 attention on the same f16-rounded inputs.
    fn reference(
        heads: Heads,
        q: &[f32],
        k: &[f16],
        v: &[f16],
        qp: &[usize],
        kp: &[usize],
    ) -> Vec<f64> {
        let Heads {
            n_heads,
            n_kv_heads,
            head_dim: hd,
        } = heads;
        let n_rep = n_heads / n_kv_heads;
        let mut out = vec![0f64; qp.len() * n_heads * hd];
        for (i, &p) in qp.iter().enumerate() {
            for h in 0..n_heads {
                let g = h / n_rep;
                let qv: Vec<f64> = (0..hd)
                    .map(|d| round_f16(q[(i * n_heads + h) * hd + d]) as f64)
                    .collect();
                let scores: Vec<Option<f64>> = kp
                    .iter()
                    .enumerate()
                    .map(|(j, &kpos)| {
                        (kpos <= p).then(|| {
                            (0..hd)
                                .map(|d| qv[d] * k[(j * n_kv_heads + g) * hd + d].to_f64())
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                    })
                    .collect();
                let max = scores.iter().flatten().fold(f64::MIN, |m, &s| m.max(s));
                let sum: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                for d in 0..hd {
                    out[(i * n_heads + h) * hd + d] = scores
                        .iter()
                        .enumerate()
                        .filter_map(|(j, s)| {
                            s.map(|s| {
                                (s - max).exp() / sum * v[(j * n_kv_heads + g) * hd + d].to_f64()
                            })
                        })
                        .sum();
                }
            }
        }
        out
    }

    fn check(heads: Heads, cached: usize, new: usize, seed: u64) {
        let mut r = lcg(seed);
        let Heads {
            n_heads,
            n_kv_heads,
            head_dim: hd,
        } = heads;
        let total = cached + new;
        let q: Vec<f32> = (0..new * n_heads * hd).map(|_| r() * 2.0).collect();
        let k: Vec<f16> = (0..total * n_kv_heads * hd)
            .map(|_| f16::from_f32(r() * 2.0))
            .collect();
        let v: Vec<f16> = (0..total * n_kv_heads * hd)
            .map(|_| f16::from_f32(r()))
            .collect();
        let key_pos: Vec<usize> = (0..total).collect();
        let query_pos = &key_pos[cached..];
        let got = attend(heads, &q, &k, &v, query_pos, &key_pos);
        let want = reference(heads, &q, &k, &v, query_pos, &key_pos);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // The probabilities are rounded to f16 (as llama.cpp does): ~1e-3 relative.
            assert!((*g as f64 - w).abs() < 2e-3, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn prompt_and_single_token_attention_match_an_f64_reference() {
        let heads = Heads {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 64,
        };
        check(heads, 0, 37, 1); // a prompt: the 16-lane order
        check(heads, 37, 1, 2); // one token after it: ggml_vec_dot_f16's order
        check(heads, 70, 5, 3); // a chunk after a cache
                                // A head size that is not a multiple of 16 takes the other order for prompts too.
        check(
            Heads {
                n_heads: 4,
                n_kv_heads: 4,
                head_dim: 24,
            },
            3,
            9,
            4,
        );
    }

    #[test]
    fn a_query_sees_only_keys_at_or_before_its_position() {
        let heads = Heads {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 16,
        };
        let q = vec![0.5f32; 16];
        let k = vec![f16::from_f32(0.1); 32];
        // Key 1 sits at a later position than the query: its value must not leak in.
        let mut v = vec![f16::from_f32(1.0); 16];
        v.extend(vec![f16::from_f32(100.0); 16]);
        let out = attend(heads, &q, &k, &v, &[0], &[0, 5]);
        assert!(out.iter().all(|&x| x == 1.0), "{out:?}");
    }

    #[test]
    fn the_reduction_orders_are_llama_cpps() {
        // Values whose sum depends on the order: one big term and many small ones.
        let mut x = vec![1.0f32; 64];
        x[0] = 1.0e8;
        let y = vec![1.0f32; 64];
        // 16 lanes: lane 0 holds 1e8 + 3 (exactly 1e8 in f32), pairwise to the end.
        let mut lanes = [4.0f32; LANES];
        lanes[0] = 1.0e8f32 + 1.0 + 1.0 + 1.0;
        assert_eq!(dot_lanes(&x, &y), reduce_lanes(lanes));
        // Four accumulators of one product each, added (0+2)+(1+3) first.
        assert_eq!(
            dot_steps(&x, &y),
            reduce_lanes({
                let mut l = [4.0f32; LANES];
                l[0] = (1.0e8f32 + 1.0) + (1.0 + 1.0);
                l
            })
        );
        // Elements past the last 64 are added in f64 after the vector part.
        let x70: Vec<f32> = (0..70).map(|i| if i == 64 { 0.25 } else { 0.0 }).collect();
        assert_eq!(dot_steps(&x70, &vec![1.0; 70]), 0.25);
    }
}
