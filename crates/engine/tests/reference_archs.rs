#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

//! Each architecture against a plain reference implementation, on small random-weight
//! GGUF files the test writes itself. This is how qwen3 is checked without real qwen3
//! weights, and it pins down the switches between families: RoPE layout (llama rotates
//! adjacent pairs, qwen rotates halves), qwen2's q/k/v biases, qwen3's per-head q/k norms
//! and its head size that is not hidden/heads, and tied vs separate output weights.

mod common;

use shoal_engine::candle_core::quantized::gguf_file::{self, Value};
use shoal_engine::candle_core::quantized::{GgmlDType, QTensor};
use shoal_engine::candle_core::{Device, Tensor};
use shoal_engine::stage::logits_row;
use shoal_engine::{GgufFile, Logits, Stage, StageInput, StageOutput, StageSpec};

struct Cfg {
    arch: &'static str,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    theta: f32,
    eps: f32,
    tied: bool,
}

use common::Rng;

/// Weights as plain row-major f32 arrays, by GGUF tensor name, with their [rows, cols].
type Weights = std::collections::BTreeMap<String, (Vec<f32>, usize, usize)>;

fn make_weights(c: &Cfg, seed: u64) -> Weights {
    let mut r = Rng(seed);
    let mut w = Weights::new();
    let mut put = |name: String, rows: usize, cols: usize, scale: f32, offset: f32, r: &mut Rng| {
        let v = r
            .vec(rows * cols, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        w.insert(name, (v, rows, cols));
    };
    let (h, hd, q, kv) = (
        c.hidden,
        c.head_dim,
        c.heads * c.head_dim,
        c.kv_heads * c.head_dim,
    );
    put("token_embd.weight".into(), c.vocab, h, 1.0, 0.0, &mut r);
    for i in 0..c.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        put(p("attn_norm.weight"), 1, h, 0.2, 1.0, &mut r);
        put(p("attn_q.weight"), q, h, 0.3, 0.0, &mut r);
        put(p("attn_k.weight"), kv, h, 0.3, 0.0, &mut r);
        put(p("attn_v.weight"), kv, h, 0.3, 0.0, &mut r);
        if c.arch == "qwen2" {
            put(p("attn_q.bias"), 1, q, 0.5, 0.0, &mut r);
            put(p("attn_k.bias"), 1, kv, 0.5, 0.0, &mut r);
            put(p("attn_v.bias"), 1, kv, 0.5, 0.0, &mut r);
        }
        if c.arch == "qwen3" {
            put(p("attn_q_norm.weight"), 1, hd, 0.2, 1.0, &mut r);
            put(p("attn_k_norm.weight"), 1, hd, 0.2, 1.0, &mut r);
        }
        put(p("attn_output.weight"), h, q, 0.3, 0.0, &mut r);
        put(p("ffn_norm.weight"), 1, h, 0.2, 1.0, &mut r);
        put(p("ffn_gate.weight"), c.ffn, h, 0.3, 0.0, &mut r);
        put(p("ffn_up.weight"), c.ffn, h, 0.3, 0.0, &mut r);
        put(p("ffn_down.weight"), h, c.ffn, 0.3, 0.0, &mut r);
    }
    put("output_norm.weight".into(), 1, h, 0.2, 1.0, &mut r);
    if !c.tied {
        put("output.weight".into(), c.vocab, h, 0.5, 0.0, &mut r);
    }
    w
}

fn write_gguf(c: &Cfg, w: &Weights, path: &std::path::Path) {
    let a = c.arch;
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(format!("random {a}"))),
        (format!("{a}.block_count"), Value::U32(c.layers as u32)),
        (format!("{a}.embedding_length"), Value::U32(c.hidden as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(c.ffn as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(c.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(c.kv_heads as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            Value::U32(c.head_dim as u32),
        ),
        (
            format!("{a}.attention.value_length"),
            Value::U32(c.head_dim as u32),
        ),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32(c.head_dim as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(c.theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.eps),
        ),
        (format!("{a}.context_length"), Value::U32(256)),
        (format!("{a}.vocab_size"), Value::U32(c.vocab as u32)),
    ];
    let tensors: Vec<(String, QTensor)> = w
        .iter()
        .map(|(name, (v, rows, cols))| {
            let t = if *rows == 1 {
                Tensor::from_vec(v.clone(), *cols, &Device::Cpu).unwrap()
            } else {
                Tensor::from_vec(v.clone(), (*rows, *cols), &Device::Cpu).unwrap()
            };
            (name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

// ---- the reference: one token at a time, f64 (but f16 where llama.cpp rounds), no tensors ----

fn matvec(w: &(Vec<f32>, usize, usize), x: &[f64]) -> Vec<f64> {
    let (v, rows, cols) = w;
    (0..*rows)
        .map(|r| (0..*cols).map(|c| v[r * cols + c] as f64 * x[c]).sum())
        .collect()
}

fn rmsnorm(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, w)| v * s * *w as f64).collect()
}

fn rope(x: &mut [f64], pos: usize, theta: f32, interleaved: bool) {
    let d = x.len();
    for i in 0..d / 2 {
        let angle = pos as f64 * (theta as f64).powf(-2.0 * i as f64 / d as f64);
        let (s, c) = angle.sin_cos();
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + d / 2)
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * c - xb * s;
        x[b] = xa * s + xb * c;
    }
}

/// Rounded to f16: llama.cpp keeps K and V in f16 and multiplies Q and the attention
/// probabilities in f16, and so does the engine; the reference follows those roundings
/// (and nothing else of its arithmetic).
fn f16r(x: f64) -> f64 {
    half::f16::from_f64(x).to_f64()
}

/// Largest relative logit difference from the reference (see the comment at its use).
const F16_TOLERANCE: f64 = 4e-3;

fn reference_logits(c: &Cfg, w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let hd = c.head_dim;
    let g = |n: &str| w.get(n).unwrap_or_else(|| panic!("{n}"));
    let mut keys: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.layers]; // [layer][pos] -> kv*hd
    let mut values: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.layers];
    let mut out = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let (e, _, cols) = g("token_embd.weight");
        let mut x: Vec<f64> = e[tok as usize * cols..][..*cols]
            .iter()
            .map(|&v| v as f64)
            .collect();
        for l in 0..c.layers {
            let p = |n: &str| format!("blk.{l}.{n}");
            let h = rmsnorm(&x, &g(&p("attn_norm.weight")).0, c.eps);
            let mut q = matvec(g(&p("attn_q.weight")), &h);
            let mut k = matvec(g(&p("attn_k.weight")), &h);
            let mut v = matvec(g(&p("attn_v.weight")), &h);
            if c.arch == "qwen2" {
                for (t, b) in [
                    (&mut q, "attn_q.bias"),
                    (&mut k, "attn_k.bias"),
                    (&mut v, "attn_v.bias"),
                ] {
                    t.iter_mut()
                        .zip(&g(&p(b)).0)
                        .for_each(|(x, b)| *x += *b as f64);
                }
            }
            for (t, norm) in [
                (&mut q, "attn_q_norm.weight"),
                (&mut k, "attn_k_norm.weight"),
            ] {
                for head in t.chunks_mut(hd) {
                    if c.arch == "qwen3" {
                        let n = rmsnorm(head, &g(&p(norm)).0, c.eps);
                        head.copy_from_slice(&n);
                    }
                    rope(head, pos, c.theta, c.arch == "llama");
                }
            }
            let q: Vec<f64> = q.into_iter().map(f16r).collect();
            keys[l].push(k.into_iter().map(f16r).collect());
            values[l].push(v.into_iter().map(f16r).collect());
            let group = c.heads / c.kv_heads;
            let mut att_out = vec![0f64; c.heads * hd];
            for head in 0..c.heads {
                let kvh = head / group;
                let qh = &q[head * hd..][..hd];
                let scores: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| {
                        let kh = &k[kvh * hd..][..hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (p_, v) in exps.iter().zip(&values[l]) {
                    for d in 0..hd {
                        att_out[head * hd + d] += f16r(p_ / sum) * v[kvh * hd + d];
                    }
                }
            }
            let o = matvec(g(&p("attn_output.weight")), &att_out);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = rmsnorm(&x, &g(&p("ffn_norm.weight")).0, c.eps);
            let gate = matvec(g(&p("ffn_gate.weight")), &h);
            let up = matvec(g(&p("ffn_up.weight")), &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(g(&p("ffn_down.weight")), &act);
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        let h = rmsnorm(&x, &g("output_norm.weight").0, c.eps);
        let head = if c.tied {
            g("token_embd.weight")
        } else {
            g("output.weight")
        };
        out.push(matvec(head, &h));
    }
    out
}

/// Prefill of 6 tokens, then 3 single-token steps; every row of logits against the
/// reference. Also split into two stages, which must not change a bit.
fn check(c: Cfg) {
    let w = make_weights(&c, 42);
    let dir = std::env::temp_dir().join(format!("shoal-ref-{}-{}", c.arch, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    write_gguf(&c, &w, &path);
    let tokens: Vec<u32> = vec![3, 17, 5, 9, 30, 2, 11, 40, 7];
    let want = reference_logits(&c, &w, &tokens);

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.config().arch.name(), c.arch);
    assert_eq!(file.config().head_dim, c.head_dim);
    let stage = Stage::load(&file, StageSpec::whole(c.layers), &Device::Cpu, |_, _| {}).unwrap();
    let mut cache = stage.new_cache();
    let mut got: Vec<Vec<f32>> = Vec::new();
    let mut feed = |ids: &[u32], start: usize| {
        let pos: Vec<usize> = (start..start + ids.len()).collect();
        match stage
            .forward(StageInput::Tokens(ids), &pos, &mut cache, Logits::All)
            .unwrap()
        {
            StageOutput::Logits(l) => {
                (0..ids.len()).for_each(|i| got.push(logits_row(&l, i).unwrap()))
            }
            StageOutput::Hidden(_) => panic!("a whole model returns logits"),
        }
    };
    feed(&tokens[..6], 0);
    for (i, t) in tokens[6..].iter().enumerate() {
        feed(&[*t], 6 + i);
    }
    let mut worst = 0f64;
    for (g_row, w_row) in got.iter().zip(&want) {
        for (g, w) in g_row.iter().zip(w_row) {
            worst = worst.max((*g as f64 - w).abs() / w.abs().max(1.0));
        }
    }
    eprintln!(
        "{}: largest relative logit difference from the reference {worst:.2e}",
        c.arch
    );
    // f16 steps are 1/2048 relative; Q, K, V and the probabilities are rounded to them
    // from inputs that differ from the reference's in the last f32 bits, so a value may
    // land one step away: a few 1e-4 of drift per layer (a real fault is O(1)).
    assert!(
        worst < F16_TOLERANCE,
        "{}: logits differ from the reference by {worst}",
        c.arch
    );

    // The same tokens through two stages.
    let k = c.layers / 2;
    let a = Stage::load(
        &file,
        StageSpec::range(0..k, c.layers),
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    let b = Stage::load(
        &file,
        StageSpec::range(k..c.layers, c.layers),
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    let (mut ca, mut cb) = (a.new_cache(), b.new_cache());
    let pos: Vec<usize> = (0..tokens.len()).collect();
    let StageOutput::Hidden(h) = a
        .forward(StageInput::Tokens(&tokens), &pos, &mut ca, Logits::All)
        .unwrap()
    else {
        panic!("a first stage returns hidden states")
    };
    let StageOutput::Logits(l) = b
        .forward(StageInput::Hidden(h), &pos, &mut cb, Logits::Last)
        .unwrap()
    else {
        panic!("a last stage returns logits")
    };
    let last = logits_row(&l, 0).unwrap();
    let w_last = want.last().unwrap();
    assert!(last
        .iter()
        .zip(w_last)
        .all(|(g, w)| (*g as f64 - w).abs() / w.abs().max(1.0) < 1e-3));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn llama_matches_reference() {
    check(Cfg {
        arch: "llama",
        layers: 3,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        ffn: 96,
        vocab: 50,
        theta: 10000.0,
        eps: 1e-5,
        tied: true,
    });
}

#[test]
fn qwen2_matches_reference() {
    check(Cfg {
        arch: "qwen2",
        layers: 3,
        hidden: 64,
        heads: 4,
        kv_heads: 1,
        head_dim: 16,
        ffn: 96,
        vocab: 50,
        theta: 1e6,
        eps: 1e-6,
        tied: false,
    });
}

#[test]
fn qwen3_matches_reference() {
    // head_dim 32 with hidden 64 and 4 heads: the attention width (128) is not hidden.
    check(Cfg {
        arch: "qwen3",
        layers: 3,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        ffn: 96,
        vocab: 50,
        theta: 1e6,
        eps: 1e-6,
        tied: true,
    });
}

#[test]
fn unsupported_architecture_is_a_clear_error() {
    let c = Cfg {
        arch: "llama",
        layers: 1,
        hidden: 32,
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
        ffn: 32,
        vocab: 10,
        theta: 10000.0,
        eps: 1e-5,
        tied: true,
    };
    let w = make_weights(&c, 1);
    let dir = std::env::temp_dir().join(format!("shoal-ref-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    write_gguf(&Cfg { arch: "mamba", ..c }, &w, &path);
    let err = GgufFile::open(&path)
        .err()
        .expect("mamba is not supported")
        .to_string();
    assert!(
        err.contains("mamba") && err.contains("not supported"),
        "{err}"
    );
    // Garbage is an error too, not a panic.
    std::fs::write(&path, b"GGUF\x03\0\0\0garbage").unwrap();
    assert!(GgufFile::open(&path).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// The KV cache across its growth (64 → 128 positions) and after a rollback: a prefill,
/// single steps past the first buffer's end, then `truncate` and a re-feed, all against
/// the reference.
#[test]
fn kv_cache_grows_and_rolls_back() {
    let c = Cfg {
        arch: "qwen2",
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        ffn: 64,
        vocab: 50,
        theta: 10000.0,
        eps: 1e-6,
        tied: true,
    };
    let w = make_weights(&c, 7);
    let dir = std::env::temp_dir().join(format!("shoal-ref-kv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    write_gguf(&c, &w, &path);
    let tokens: Vec<u32> = (0..100u32).map(|i| (i * 7 + 3) % 50).collect();
    let want = reference_logits(&c, &w, &tokens);
    let file = GgufFile::open(&path).unwrap();
    let stage = Stage::load(&file, StageSpec::whole(c.layers), &Device::Cpu, |_, _| {}).unwrap();
    let mut cache = stage.new_cache();
    let close = |got: &[f32], want: &[f64]| {
        got.iter()
            .zip(want)
            .all(|(g, w)| (*g as f64 - w).abs() / w.abs().max(1.0) < F16_TOLERANCE)
    };
    let run = |cache: &mut shoal_engine::KvCache, from: usize, to: usize| -> Vec<Vec<f32>> {
        let pos: Vec<usize> = (from..to).collect();
        let out = stage
            .forward(
                StageInput::Tokens(&tokens[from..to]),
                &pos,
                cache,
                Logits::All,
            )
            .unwrap();
        let StageOutput::Logits(l) = out else {
            panic!("logits")
        };
        (0..to - from).map(|i| logits_row(&l, i).unwrap()).collect()
    };
    let mut rows = run(&mut cache, 0, 60);
    for i in 60..100 {
        rows.extend(run(&mut cache, i, i + 1));
    }
    assert_eq!(cache.len(), 100);
    for (i, (g, w)) in rows.iter().zip(&want).enumerate() {
        assert!(close(g, w), "position {i} differs from the reference");
    }
    cache.truncate(50);
    assert_eq!(cache.len(), 50);
    let again = run(&mut cache, 50, 100);
    for (i, (g, w)) in again.iter().zip(&want[50..]).enumerate() {
        assert!(close(g, w), "position {} differs after rollback", 50 + i);
    }
    std::fs::remove_dir_all(&dir).ok();
}
