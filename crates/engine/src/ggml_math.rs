//! Elementwise math as ggml's CPU backend computes it, where its result differs from the
//! correctly rounded one: its vectorised `expf` is a polynomial with up to ~1.5 ulp of
//! error, and matching llama.cpp's logits means matching that too (see attention.rs).

#![allow(unsafe_code)] // only to call the same loops compiled with FMA enabled

/// ggml's vectorised `expf` (its AVX-512 variant, from ARM's optimized routines),
/// lane by lane: a degree-5 polynomial on the reduced argument, scaled by `2^n`.
#[inline(always)]
pub(crate) fn ggml_expf(x: f32) -> f32 {
    // ggml's constants, bit for bit (hex floats in its source).
    const SHIFT: f32 = f32::from_bits(0x4b40_0000); // 0x1.8p23
    const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
    const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
    const C1: f32 = f32::from_bits(0x3f7f_fff6); // 0x1.ffffecp-1
    const C2: f32 = f32::from_bits(0x3eff_fedb); // 0x1.fffdb6p-2
    const C3: f32 = f32::from_bits(0x3e2a_af33); // 0x1.555e66p-3
    const C4: f32 = f32::from_bits(0x3d2b_9f17); // 0x1.573e2ep-5
    const C5: f32 = f32::from_bits(0x3c07_2010); // 0x1.0e4020p-7
    let z = x.mul_add(LOG2E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    if n.abs() > 192.0 || n.is_nan() {
        return if n <= 0.0 || n.is_nan() {
            0.0
        } else {
            f32::INFINITY
        };
    }
    let u = b * b;
    let j = C5
        .mul_add(b, C4)
        .mul_add(u, C3.mul_add(b, C2))
        .mul_add(u, C1.mul_add(b, 1.0));
    // `scalef`: j·2^n rounded once (exact in f64, then one rounding to f32). |n| <= 192,
    // so 2^n is a normal f64, built from its exponent bits (`powi` is a library call).
    let two_n = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (j as f64 * two_n) as f32
}

/// [`ggml_expf`] on 16 lanes (ggml's AVX-512 `ggml_v_expf`, whose `scalef` is the single
/// rounding of `j·2^n` that the scalar port does in f64): lane for lane the scalar result,
/// NaN and out-of-range inputs included (tested).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn expf16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let shift = _mm512_set1_ps(f32::from_bits(0x4b40_0000));
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(f32::from_bits(0x3fb8_aa3b)), shift);
    let n = _mm512_sub_ps(z, shift);
    let b = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(f32::from_bits(0x35bf_be8e)),
        _mm512_fnmadd_ps(n, _mm512_set1_ps(f32::from_bits(0x3f31_7200)), x),
    );
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3c07_2010)),
                b,
                _mm512_set1_ps(f32::from_bits(0x3d2b_9f17)),
            ),
            u,
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3e2a_af33)),
                b,
                _mm512_set1_ps(f32::from_bits(0x3eff_fedb)),
            ),
        ),
        u,
        _mm512_fmadd_ps(
            _mm512_set1_ps(f32::from_bits(0x3f7f_fff6)),
            b,
            _mm512_set1_ps(1.0),
        ),
    );
    let res = _mm512_scalef_ps(j, n);
    // |n| > 192 or NaN: 0 where n <= 0 or NaN, else infinity (as the scalar port).
    let out_of_range = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    if out_of_range == 0 {
        return res;
    }
    let to_zero = _mm512_cmp_ps_mask::<_CMP_NGT_UQ>(n, _mm512_setzero_ps());
    let alt = _mm512_mask_blend_ps(to_zero, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
    _mm512_mask_blend_ps(out_of_range, res, alt)
}

/// `silu(gate) * up`, element by element, as `ggml_vec_swiglu_f32` computes it: the
/// vector `expf` for every whole group of 16, libm's `expf` for the rest.
#[cfg(test)]
pub(crate) fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len().min(up.len())];
    swiglu_into(gate, up, &mut out);
    out
}

/// [`swiglu`] into `out` (as long as `gate`).
pub(crate) fn swiglu_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && gate.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { swiglu_avx512(gate, up, out) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            unsafe { swiglu_fma(gate, up, out) };
            return;
        }
    }
    swiglu_body(gate, up, out)
}

/// Sixteen at a time with [`expf16`]: lane for lane the scalar loop's operations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let whole = gate.len() / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..whole).step_by(16) {
        let x = _mm512_loadu_ps(gate.as_ptr().add(i));
        let minus_x = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(x),
            _mm512_set1_epi32(i32::MIN),
        ));
        let e = expf16(minus_x);
        let y = _mm512_mul_ps(
            _mm512_div_ps(x, _mm512_add_ps(one, e)),
            _mm512_loadu_ps(up.as_ptr().add(i)),
        );
        _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
    }
    swiglu_body(&gate[whole..], &up[whole..], &mut out[whole..]);
}

/// The same loop with fused multiply-adds as instructions (`mul_add` is exact either way;
/// without FMA it is a library call per element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fma(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_body(gate, up, out)
}

// A plain indexed loop, not an iterator chain: the chain's `collect` is a generic function
// of its own, compiled without FMA, and `mul_add` there was a library call per element.
// Called on a tail shorter than 16, every element takes libm's `expf`.
#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let whole = gate.len() / 16 * 16;
    for i in 0..gate.len() {
        let x = gate[i];
        let e = if i < whole { ggml_expf(-x) } else { (-x).exp() };
        out[i] = x / (1.0 + e) * up[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_within_two_ulp_of_exp_and_saturates() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = ggml_expf(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(ggml_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(ggml_expf(-200.0), 0.0);
        assert_eq!(ggml_expf(0.0), 1.0);
        assert_eq!(ggml_expf(200.0), f32::INFINITY);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_expf_is_the_scalar_one_lane_for_lane() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut xs: Vec<f32> = vec![
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            -0.0,
            0.0,
            -200.0,
            200.0,
            -103.5,
            -87.4,
            88.7,
            -192.0 * std::f32::consts::LN_2,
        ];
        let mut x = -110.0f32;
        while x < 95.0 {
            xs.push(x);
            x += 0.00731;
        }
        xs.resize(xs.len().div_ceil(16) * 16, 1.0);
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F checked above.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(got.as_mut_ptr(), expf16(_mm512_loadu_ps(c.as_ptr())));
            }
            for (g, &x) in got.iter().zip(c) {
                assert_eq!(g.to_bits(), ggml_expf(x).to_bits(), "exp({x})");
            }
        }
    }

    #[test]
    fn swiglu_paths_agree_bit_for_bit() {
        let n = 4864 + 7;
        let gate: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2000) as f32 / 97.0 - 10.0)
            .collect();
        let up: Vec<f32> = (0..n)
            .map(|i| ((i * 104729) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let mut plain = vec![0f32; n];
        swiglu_body(&gate, &up, &mut plain);
        let fast = swiglu(&gate, &up);
        for i in 0..n {
            assert_eq!(fast[i].to_bits(), plain[i].to_bits(), "element {i}");
        }
    }

    #[test]
    fn swiglu_is_silu_times_up_and_uses_libm_on_the_tail() {
        let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.01).collect();
        let y = swiglu(&gate, &up);
        for (i, ((&x, &g), &y)) in gate.iter().zip(&up).zip(&y).enumerate() {
            let want = x / (1.0 + (-x).exp()) * g;
            assert!(
                (y - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1e-6),
                "{i}"
            );
            if i >= 32 {
                assert_eq!(y, want, "the tail past the last 16 uses libm");
            }
        }
    }
}
