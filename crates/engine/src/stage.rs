//! A stage: a contiguous range of a model's layers, optionally with the token embedding
//! in front and the final norm and LM head behind.
//!
//! The whole model is the one stage `[0..L)` with both ends; a pipeline is several
//! stages on several devices. There is one code path for both, so "stages `[0..k)` then
//! `[k..L)`" computes exactly what `[0..L)` computes.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};

use crate::attention::{attend, Heads};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::ggml_math;
use crate::gguf::GgufFile;
use crate::kernels::{with_f32, Format, QuantMatrix};
use crate::kv_cache::KvCache;

/// Which part of a model a stage runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageSpec {
    pub layers: Range<usize>,
    /// Owns the token embedding: takes token ids as input.
    pub embed: bool,
    /// Owns the final norm and LM head: returns logits.
    pub head: bool,
}

impl StageSpec {
    /// The whole model as one stage.
    pub fn whole(n_layers: usize) -> Self {
        Self {
            layers: 0..n_layers,
            embed: true,
            head: true,
        }
    }

    /// Layers `range` of a model with `n_layers`; the ends follow from the range.
    pub fn range(range: Range<usize>, n_layers: usize) -> Self {
        Self {
            embed: range.start == 0,
            head: range.end == n_layers,
            layers: range,
        }
    }
}

/// What a stage is fed: token ids (first stage) or hidden states from the stage before.
pub enum StageInput<'a> {
    Tokens(&'a [u32]),
    /// [tokens, hidden], f32.
    Hidden(Tensor),
}

/// Which logits a head stage returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring, tests), computed as a prompt chunk is.
    All,
    /// Every token's, each row computed exactly as if its token had been decoded alone
    /// after the ones before it: every product and the attention run row by row in
    /// decode's orders (llama.cpp's orders depend on how many rows a product has), while
    /// each weight matrix is still read once for all rows. Speculative decoding verifies
    /// drafted tokens so, and its output is then the plain decode's, token for token.
    Verify,
    /// No logits: every token's hidden state after the final norm, as
    /// [`StageOutput::Hidden`] (what embeddings are pooled from, as llama.cpp's are).
    Normed,
}

/// The output of a stage: logits `[n, vocab]` from a head stage, hidden states
/// `[tokens, hidden]` otherwise.
pub enum StageOutput {
    Logits(Tensor),
    Hidden(Tensor),
}

/// One session's part of a batched pass ([`Stage::forward_batch`]): what
/// [`Stage::forward`] takes, for one session.
pub struct BatchItem<'a> {
    pub input: StageInput<'a>,
    /// Absolute positions of the input's tokens.
    pub positions: &'a [usize],
    /// The session's cache on this stage; the new keys and values are appended to it.
    pub cache: &'a mut KvCache,
    pub logits: Logits,
}

#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(file: &GgufFile, name: &str, eps: f64, device: &Device) -> Result<Self> {
        let weight = file.tensor(name, device)?.dequantize(device)?;
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    /// llama.cpp's order: the sum of squares in f64 (each square in f32), the mean
    /// rounded to f32, `scale = 1 / sqrt(mean + eps)` in f32, then `x * scale * w`.
    /// (candle divides by the root instead: one rounding apart, which is enough to flip
    /// an 8-bit activation rounding in the next matmul.) Over the last dimension.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = self.weight.elem_count();
        let w: Vec<f32> = self.weight.to_vec1()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut out = Vec::with_capacity(xs.len());
        for row in xs.chunks_exact(n) {
            let sum: f64 = row.iter().map(|v| (v * v) as f64).sum();
            let mean = (sum / n as f64) as f32;
            let scale = 1.0 / (mean + self.eps).sqrt();
            out.extend(row.iter().zip(&w).map(|(v, w)| v * scale * w));
        }
        Ok(Tensor::from_vec(out, x.shape(), x.device())?)
    }
}

/// `silu(gate) * up` as llama.cpp computes it (its vectorised `expf`), row by row as
/// ggml does: which elements take the vector `expf` depends on the row's length only, so
/// a row's result does not depend on the rows stacked with it.
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (_, n) = gate.dims2()?;
    if gate.elem_count() != up.elem_count() {
        return Err(EngineError::InvalidInput(
            "gate and up differ in shape".into(),
        ));
    }
    let out = with_f32(gate, |g| {
        with_f32(up, |u| {
            let mut out = vec![0f32; g.len()];
            let row = |r: usize, o: &mut [f32]| {
                ggml_math::swiglu_into(&g[r * n..][..n], &u[r * n..][..n], o)
            };
            // Rows side by side for prompts (each row's result is the same on any thread).
            if g.len() >= 1 << 16 {
                crate::pool::for_each_chunk_mut(&mut out, n, row);
            } else {
                out.chunks_mut(n.max(1))
                    .enumerate()
                    .for_each(|(r, o)| row(r, o));
            }
            out
        })
    })??;
    Ok(Tensor::from_vec(out, gate.shape(), gate.device())?)
}

/// The formats our kernels take, by GGUF type.
fn own_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q5_0 => Some(Format::Q5_0),
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        // In llama.cpp's shape-dependent float order (kernels/kquant.rs).
        GgmlDType::Q4K => Some(Format::Q4K),
        GgmlDType::Q6K => Some(Format::Q6K),
        // Ours as well, in the order of llama.cpp's plain x86 dot products. llama.cpp
        // itself takes other orders for some shapes (it repacks Q4_0, and tiles Q5_K
        // prompts), so for these three our numbers are near llama.cpp's rather than
        // bit for bit — as candle's kernels, which they replace, were.
        GgmlDType::Q4_0 => Some(Format::Q4_0),
        GgmlDType::Q5_1 => Some(Format::Q5_1),
        GgmlDType::Q5K => Some(Format::Q5K),
        _ => None,
    }
}

/// A weight matrix in its quantized form, multiplied by our own kernel where we have one
/// for its format and by candle's otherwise.
enum Weight {
    Candle(QMatMul),
    Own(QuantMatrix),
}

impl Weight {
    /// Tensor `name` of `file`: the formats with a kernel of ours are read as raw bytes
    /// straight into our matrix (one copy in memory while loading), the others through
    /// candle.
    fn load(file: &GgufFile, name: &str, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            if let Some(format) = file.tensor_dtype(name).and_then(own_format) {
                let (_, dims, bytes) = file.tensor_raw(name)?;
                let [rows, cols] = dims[..] else {
                    return Err(EngineError::InvalidInput(format!(
                        "tensor {name} has {} dimensions, not 2",
                        dims.len()
                    )));
                };
                return Ok(Self::Own(QuantMatrix::from_bytes(
                    format, rows, cols, bytes,
                )?));
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(
            file.tensor(name, device)?,
        )?))
    }

    /// `x [m, cols]` times the matrix, `x` being the stacked rows of products of `rows`
    /// rows each (one per session of a batch); each segment's rows come out as they would
    /// from a product of that segment alone.
    fn forward(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        match self {
            Self::Own(w) => w.matmul_segments(x, Some(rows)),
            Self::Candle(w) if rows.len() <= 1 => Ok(w.forward(x)?),
            Self::Candle(w) => {
                // candle's kernels may sum in an order that depends on the product's
                // shape: each segment alone, so its numbers are those it gets unbatched.
                let mut parts = Vec::with_capacity(rows.len());
                let mut start = 0;
                for &n in rows {
                    parts.push(w.forward(&x.narrow(0, start, n)?)?);
                    start += n;
                }
                Ok(Tensor::cat(&parts, 0)?)
            }
        }
    }

    /// Rows `ids` as f32: an embedding lookup; the table stays quantized.
    fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Candle(w) => Ok(w.embedding(&Tensor::new(ids, &Device::Cpu)?)?),
            Self::Own(w) => w.rows_f32(ids),
        }
    }
}

/// A matrix in its quantized form, with an optional bias (qwen2's q/k/v).
struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(file: &GgufFile, prefix: &str, device: &Device) -> Result<Self> {
        let weight = Weight::load(file, &format!("{prefix}.weight"), device)?;
        let bias_name = format!("{prefix}.bias");
        let bias = if file.has_tensor(&bias_name) {
            Some(file.tensor(&bias_name, device)?.dequantize(device)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let y = self.weight.forward(x, rows)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    fn load(file: &GgufFile, i: usize, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let p = |name: &str| format!("blk.{i}.{name}");
        let (q_norm, k_norm) = if cfg.arch.has_qk_norm() {
            (
                Some(RmsNorm::load(
                    file,
                    &p("attn_q_norm.weight"),
                    cfg.rms_eps,
                    device,
                )?),
                Some(RmsNorm::load(
                    file,
                    &p("attn_k_norm.weight"),
                    cfg.rms_eps,
                    device,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            attn_norm: RmsNorm::load(file, &p("attn_norm.weight"), cfg.rms_eps, device)?,
            q: Linear::load(file, &p("attn_q"), device)?,
            k: Linear::load(file, &p("attn_k"), device)?,
            v: Linear::load(file, &p("attn_v"), device)?,
            o: Linear::load(file, &p("attn_output"), device)?,
            q_norm,
            k_norm,
            ffn_norm: RmsNorm::load(file, &p("ffn_norm.weight"), cfg.rms_eps, device)?,
            gate: Linear::load(file, &p("ffn_gate"), device)?,
            up: Linear::load(file, &p("ffn_up"), device)?,
            down: Linear::load(file, &p("ffn_down"), device)?,
        })
    }

    /// Names of the tensors a layer reads, for sizing a stage before loading it.
    fn tensor_names(i: usize) -> impl Iterator<Item = String> {
        [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_q.bias",
            "attn_k.weight",
            "attn_k.bias",
            "attn_v.weight",
            "attn_v.bias",
            "attn_output.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ]
        .into_iter()
        .map(move |n| format!("blk.{i}.{n}"))
    }

    /// The layer over the stacked rows of a batch's sessions (`segments`, in order).
    /// Everything but attention works row by row (or, for the matrices, segment by
    /// segment in its numbers), so it runs once over all rows: each weight matrix is read
    /// once for every session. Attention runs per session, on its own cache.
    fn forward(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        rows: &[usize],
        cache_layer: usize,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("layer", cache_layer).entered();
        let residual = x;
        let h = self.attn_norm.forward(x)?;
        let h = self.attention(&h, segments, rows, cache_layer, cfg)?;
        let x = (residual + h)?;
        // Each buffer goes as soon as it is used: a prompt's MLP rows are the largest a
        // layer holds (3 MiB each for a 512-token chunk of SmolLM2), and they set the
        // peak memory of every stage.
        let act = {
            let h = self.ffn_norm.forward(&x)?;
            let gate = self.gate.forward(&h, rows)?;
            let up = self.up.forward(&h, rows)?;
            drop(h);
            swiglu(&gate, &up)?
        };
        let h = self.down.forward(&act, rows)?;
        drop(act);
        Ok((x + h)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        rows: &[usize],
        cache_layer: usize,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let (total, _hidden) = x.dims2()?;
        let (n_heads, n_kv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        // Rows of [seq, heads, hd], the layout of the projections and of the cache.
        let mut q = self.q.forward(x, rows)?;
        let mut k = self.k.forward(x, rows)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?; // over each head's hd values
            k = kn.forward(&k)?;
        }
        let mut q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let mut k: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = self.v.forward(x, rows)?.flatten_all()?.to_vec1()?;
        let heads = Heads {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        // Multiply-adds of the sessions' attention (the cache holds the new tokens' keys
        // only after `append`, so theirs are added).
        let work: usize = segments
            .iter()
            .map(|s| s.rows * (s.cache.len() + s.rows) * hd)
            .sum();
        // Each session's slices of Q, K and V, with its cache.
        let mut jobs = Vec::with_capacity(segments.len());
        let (mut q_rest, mut k_rest, mut v_rest) = (&mut q[..], &mut k[..], &v[..]);
        for seg in segments.iter_mut() {
            let (qs, qr) = std::mem::take(&mut q_rest).split_at_mut(seg.rows * n_heads * hd);
            let (ks, kr) = std::mem::take(&mut k_rest).split_at_mut(seg.rows * n_kv * hd);
            let (vs, vr) = v_rest.split_at(seg.rows * n_kv * hd);
            (q_rest, k_rest, v_rest) = (qr, kr, vr);
            jobs.push((seg, qs, ks, vs));
        }
        let run = |(seg, q, k, v): (&mut Segment<'_>, &mut [f32], &mut [f32], &[f32])| {
            seg.rope.apply(q, hd);
            seg.rope.apply(k, hd);
            // The cache already lists the new tokens' positions, last.
            let key_pos = seg.cache.positions().to_vec();
            let query_pos = &key_pos[key_pos.len() - seg.rows..];
            let layer_kv = seg.cache.append(cache_layer, k, v)?;
            if !seg.alone {
                return Ok(attend(
                    heads,
                    q,
                    &layer_kv.k,
                    &layer_kv.v,
                    query_pos,
                    &key_pos,
                ));
            }
            // Row by row, each over the keys up to its own, as decode steps would run.
            let before = key_pos.len() - seg.rows;
            let mut out = Vec::with_capacity(q.len());
            for (i, qi) in q.chunks_exact(n_heads * hd).enumerate() {
                let keys = before + i + 1;
                out.extend(attend(
                    heads,
                    qi,
                    &layer_kv.k[..keys * n_kv * hd],
                    &layer_kv.v[..keys * n_kv * hd],
                    &query_pos[i..=i],
                    &key_pos[..keys],
                ));
            }
            Ok(out)
        };
        // Sessions side by side when there is enough work to pay for the hand-off (each
        // session's attention is the same whichever thread runs it).
        let outs: Vec<Result<Vec<f32>>> = if jobs.len() > 1 && work >= 1 << 16 {
            let mut slots: Vec<_> = jobs.into_iter().map(|job| (Some(job), None)).collect();
            crate::pool::for_each_chunk_mut(&mut slots, 1, |_, slot| {
                if let Some(job) = slot[0].0.take() {
                    slot[0].1 = Some(run(job));
                }
            });
            slots
                .into_iter()
                .map(|(_, out)| {
                    out.unwrap_or_else(|| {
                        Err(EngineError::InvalidInput("attention not run".into()))
                    })
                })
                .collect()
        } else {
            jobs.into_iter().map(run).collect()
        };
        let mut y = Vec::with_capacity(total * n_heads * hd);
        for out in outs {
            y.extend(out?);
        }
        let y = Tensor::from_vec(y, (total, n_heads * hd), x.device())?;
        self.o.forward(&y, rows)
    }
}

/// One session's place in a batched pass: its rows of the stacked activations, the RoPE
/// angles of their positions, and its cache.
struct Segment<'c> {
    rows: usize,
    /// Each row as if decoded alone ([`Logits::Verify`]).
    alone: bool,
    rope: RopeAt,
    cache: &'c mut KvCache,
}

/// RoPE angles for the exact positions of one forward pass, and the rotation, both as
/// llama.cpp's CPU backend computes them (so the f16 rounding of Q and K that attention
/// sees is the same).
struct RopeAt {
    /// `[positions, rope_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    rope_dim: usize,
    interleaved: bool,
}

impl RopeAt {
    /// In f32: `theta = position`, multiplied by `base^(-2/dim)` once per pair of
    /// dimensions (not `position * base^(-2i/dim)`: the rounding differs).
    fn new(cfg: &ModelConfig, positions: &[usize]) -> Self {
        let half = cfg.rope_dim / 2;
        let theta_scale = cfg.rope_theta.powf(-2.0 / cfg.rope_dim as f32);
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let mut theta = p as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Self {
            cos,
            sin,
            rope_dim: cfg.rope_dim,
            interleaved: cfg.arch.rope_interleaved(),
        }
    }

    /// Rotates `x` (`[positions, heads, hd]`) in place: pairs `(2i, 2i+1)` when
    /// interleaved, `(i, i + rope_dim/2)` otherwise; dimensions past `rope_dim` stay.
    /// `x0·cos − x1·sin` and `x0·sin + x1·cos` each with one fused multiply-add, the
    /// way ggml's C compiles.
    fn apply(&self, x: &mut [f32], hd: usize) {
        let half = self.rope_dim / 2;
        let n_pos = self.cos.len() / half.max(1);
        if n_pos == 0 {
            return;
        }
        let per_pos = x.len() / n_pos;
        for (p, row) in x.chunks_exact_mut(per_pos).enumerate() {
            let (cos, sin) = (&self.cos[p * half..][..half], &self.sin[p * half..][..half]);
            for head in row.chunks_exact_mut(hd) {
                for i in 0..half {
                    let (a, b) = if self.interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
                    head[b] = x0.mul_add(sin[i], x1 * cos[i]);
                }
            }
        }
    }
}

/// A loaded stage. Immutable and shareable: per-session state lives in [`KvCache`].
pub struct Stage {
    cfg: ModelConfig,
    spec: StageSpec,
    device: Device,
    embedding: Option<Arc<Weight>>,
    /// Shared with any stage cut from this one ([`Stage::share`]).
    layers: Vec<Arc<Layer>>,
    norm: Option<RmsNorm>,
    lm_head: Option<Arc<Weight>>,
}

impl Stage {
    /// Tensor names a stage reads: its share of the file.
    pub fn tensor_names(file: &GgufFile, spec: &StageSpec) -> Vec<String> {
        let mut names = Vec::new();
        let tied = !file.has_tensor("output.weight");
        if spec.embed || (spec.head && tied) {
            names.push("token_embd.weight".to_string());
        }
        for i in spec.layers.clone() {
            names.extend(Layer::tensor_names(i).filter(|n| file.has_tensor(n)));
        }
        if spec.head {
            names.push("output_norm.weight".to_string());
            if !tied {
                names.push("output.weight".to_string());
            }
        }
        names
    }

    /// Whether a prompt row's numbers depend on its prefill chunk only as the prefix cache
    /// allows for (crate::prefix_cache): true when every matrix of the model is multiplied
    /// by our own kernels, which follow llama.cpp's shape-dependent orders exactly and
    /// nothing else; false when candle multiplies some (its orders may follow any shape),
    /// and then only whole chunks are reused.
    pub fn rows_reusable_across_chunks(file: &GgufFile) -> bool {
        Self::tensor_names(file, &StageSpec::whole(file.config().n_layers))
            .iter()
            .filter(|n| file.tensor_rank(n) == Some(2))
            .all(|n| file.tensor_dtype(n).and_then(own_format).is_some())
    }

    /// Bytes of weights a stage reads from the file.
    pub fn weight_bytes(file: &GgufFile, spec: &StageSpec) -> u64 {
        Self::tensor_names(file, spec)
            .iter()
            .filter_map(|n| file.tensor_bytes(n))
            .sum()
    }

    /// Loads only the tensors of `spec`. `progress` is called after each layer with
    /// (layers done, layers total).
    pub fn load(
        file: &GgufFile,
        spec: StageSpec,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = file.config().clone();
        if spec.layers.start > spec.layers.end || spec.layers.end > cfg.n_layers {
            return Err(EngineError::InvalidStage(format!(
                "layers {}..{} do not fit a model of {} layers",
                spec.layers.start, spec.layers.end, cfg.n_layers
            )));
        }
        if spec.embed != (spec.layers.start == 0) || spec.head != (spec.layers.end == cfg.n_layers)
        {
            return Err(EngineError::InvalidStage(
                "the embedding belongs with layer 0 and the head with the last layer".into(),
            ));
        }
        if cfg.rope_dim != cfg.head_dim {
            return Err(EngineError::InvalidInput(format!(
                "partial rotary embeddings ({} of {}) are not supported",
                cfg.rope_dim, cfg.head_dim
            )));
        }
        let tied = !file.has_tensor("output.weight");
        // One copy of the embedding table serves both ends of a tied model.
        let embedding = if spec.embed || (spec.head && tied) {
            Some(Arc::new(Weight::load(file, "token_embd.weight", device)?))
        } else {
            None
        };
        let total = spec.layers.len();
        let mut layers = Vec::with_capacity(total);
        for (done, i) in spec.layers.clone().enumerate() {
            layers.push(Arc::new(Layer::load(file, i, &cfg, device)?));
            progress(done + 1, total);
        }
        let (norm, lm_head) = if spec.head {
            let norm = RmsNorm::load(file, "output_norm.weight", cfg.rms_eps, device)?;
            let head = match (&embedding, tied) {
                (Some(e), true) => e.clone(),
                _ => Arc::new(Weight::load(file, "output.weight", device)?),
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        // The embedding is kept only by a first stage; a tied last stage holds it as its head.
        let embedding = if spec.embed { embedding } else { None };
        Ok(Self {
            cfg,
            spec,
            device: device.clone(),
            embedding,
            layers,
            norm,
            lm_head,
        })
    }

    /// The stage `spec` of the same model, sharing this stage's weights instead of loading
    /// them again: a node that holds the whole model and also serves a stage of it keeps one
    /// copy (issue #15). `spec` must lie within this stage.
    pub fn share(&self, spec: StageSpec) -> Result<Stage> {
        let n = self.cfg.n_layers;
        let mine = &self.spec.layers;
        let inside = mine.start <= spec.layers.start
            && spec.layers.start <= spec.layers.end
            && spec.layers.end <= mine.end;
        let ends = spec.embed == (spec.layers.start == 0) && spec.head == (spec.layers.end == n);
        let has_ends = (!spec.embed || self.embedding.is_some())
            && (!spec.head || (self.norm.is_some() && self.lm_head.is_some()));
        if !(inside && ends && has_ends) {
            return Err(EngineError::InvalidStage(format!(
                "layers {:?} (embed {}, head {}) are not within this stage's {:?}",
                spec.layers, spec.embed, spec.head, self.spec.layers
            )));
        }
        let from = spec.layers.start - mine.start;
        let layers = self.layers[from..from + spec.layers.len()].to_vec();
        Ok(Stage {
            cfg: self.cfg.clone(),
            device: self.device.clone(),
            embedding: if spec.embed {
                self.embedding.clone()
            } else {
                None
            },
            layers,
            norm: if spec.head { self.norm.clone() } else { None },
            lm_head: if spec.head {
                self.lm_head.clone()
            } else {
                None
            },
            spec,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh KV cache for one session on this stage.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Runs the stage on `input`, whose tokens sit at absolute `positions`, appending
    /// their keys and values to `cache`. The batch of one: [`Stage::forward_batch`].
    pub fn forward(
        &self,
        input: StageInput<'_>,
        positions: &[usize],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<StageOutput> {
        let item = BatchItem {
            input,
            positions,
            cache,
            logits,
        };
        self.forward_batch(vec![item])
            .pop()
            .unwrap_or_else(|| Err(EngineError::InvalidInput("no output".into())))
    }

    /// Runs several sessions' inputs through the stage in one pass; one output per item,
    /// in order. Each item's output (and what its cache holds afterwards) is bit for bit
    /// what [`Stage::forward`] gives for that item alone: the row-wise steps (norms,
    /// residuals, SwiGLU) are the same per row, the quantized products compute each
    /// session's rows in the order of that session's own product, and RoPE and attention
    /// run per session on its positions and cache. What batching saves is memory traffic:
    /// every weight matrix is read once for all sessions' rows instead of once each.
    ///
    /// An item that is invalid on its own (a wrong shape, a token outside the vocabulary,
    /// a full context) gets its error and is left out, its cache untouched; an error of
    /// the shared computation (not expected once the inputs are checked) fails every item
    /// left.
    pub fn forward_batch(&self, items: Vec<BatchItem<'_>>) -> Vec<Result<StageOutput>> {
        let _span = tracing::debug_span!("stage", layers = ?self.spec.layers, batch = items.len())
            .entered();
        let mut results: Vec<Option<Result<StageOutput>>> = Vec::with_capacity(items.len());
        // The items that passed their checks: index, input rows, cache, logits wanted.
        let mut xs = Vec::with_capacity(items.len());
        let mut segments = Vec::with_capacity(items.len());
        let mut wanted = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match self.input_rows(item.input, item.positions, item.cache) {
                Ok(x) => {
                    results.push(None);
                    xs.push((i, x));
                    item.cache.push_positions(item.positions);
                    wanted.push(item.logits);
                    segments.push(Segment {
                        rows: item.positions.len(),
                        alone: item.logits == Logits::Verify,
                        rope: RopeAt::new(&self.cfg, item.positions),
                        cache: item.cache,
                    });
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !xs.is_empty() {
            let indices: Vec<usize> = xs.iter().map(|(i, _)| *i).collect();
            let inputs: Vec<Tensor> = xs.into_iter().map(|(_, x)| x).collect();
            match self.run_batch(inputs, &mut segments, &wanted) {
                Ok(outs) => {
                    for (i, out) in indices.into_iter().zip(outs) {
                        results[i] = Some(Ok(out));
                    }
                }
                Err(e) => {
                    // Every item left shares the failure; the first gets the error itself.
                    let message = e.to_string();
                    let mut first = Some(e);
                    for i in indices {
                        let e = first.take().unwrap_or_else(|| {
                            EngineError::Candle(candle_core::Error::Msg(message.clone()))
                        });
                        results[i] = Some(Err(e));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::InvalidInput("no output".into()))))
            .collect()
    }

    /// Checks one item against this stage and returns its input rows as f32
    /// `[tokens, hidden]` (looked up in the embedding on a first stage).
    fn input_rows(
        &self,
        input: StageInput<'_>,
        positions: &[usize],
        cache: &KvCache,
    ) -> Result<Tensor> {
        if cache.n_layers() != self.layers.len() {
            return Err(EngineError::InvalidInput(
                "KV cache belongs to a stage of another shape".into(),
            ));
        }
        let n = positions.len();
        if n == 0 {
            return Err(EngineError::InvalidInput("no tokens to run".into()));
        }
        if let Some(&p) = positions.iter().max() {
            if p >= self.cfg.context_length {
                return Err(EngineError::ContextFull {
                    needed: p + 1,
                    limit: self.cfg.context_length,
                });
            }
        }
        match input {
            StageInput::Tokens(ids) => {
                let embedding = self.embedding.as_ref().ok_or_else(|| {
                    EngineError::InvalidInput("this stage does not take token ids".into())
                })?;
                if ids.len() != n {
                    return Err(EngineError::InvalidInput(format!(
                        "{} tokens but {n} positions",
                        ids.len()
                    )));
                }
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(EngineError::InvalidInput(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.cfg.vocab_size
                    )));
                }
                embedding.embedding(ids)
            }
            StageInput::Hidden(h) => {
                if self.embedding.is_some() {
                    return Err(EngineError::InvalidInput(
                        "the first stage takes token ids, not hidden states".into(),
                    ));
                }
                let (rows, cols) = h.dims2()?;
                if rows != n || cols != self.cfg.hidden {
                    return Err(EngineError::InvalidInput(format!(
                        "hidden states are {rows}x{cols}, expected {n}x{}",
                        self.cfg.hidden
                    )));
                }
                Ok(h.to_dtype(DType::F32)?.to_device(&self.device)?)
            }
        }
    }

    /// The layers (and the head) over the checked items' stacked rows; one output each.
    fn run_batch(
        &self,
        inputs: Vec<Tensor>,
        segments: &mut [Segment<'_>],
        wanted: &[Logits],
    ) -> Result<Vec<StageOutput>> {
        // The products' segments: a session's rows together, or one by one where each row
        // is to be computed as if decoded alone.
        let rows: Vec<usize> = segments
            .iter()
            .flat_map(|s| match s.alone {
                true => vec![1; s.rows],
                false => vec![s.rows],
            })
            .collect();
        let mut x = if inputs.len() == 1 {
            inputs
                .into_iter()
                .next()
                .ok_or_else(|| EngineError::InvalidInput("no input".into()))?
        } else {
            Tensor::cat(&inputs, 0)?
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, segments, &rows, i, &self.cfg)?;
        }
        let (Some(norm), Some(head)) = (&self.norm, &self.lm_head) else {
            // Each session's rows of the hidden states.
            let mut start = 0;
            return segments
                .iter()
                .map(|s| s.rows)
                .map(|n| {
                    let h = x.narrow(0, start, n)?;
                    start += n;
                    Ok(StageOutput::Hidden(h))
                })
                .collect();
        };
        // The rows each session wants logits for: its last, or all of them (one by one
        // for `Verify`: the LM head's product too is a decode step's). A session that
        // wants its normed hidden states gets them here, and no logits.
        let mut outputs: Vec<Option<StageOutput>> = Vec::with_capacity(segments.len());
        let mut picked = Vec::with_capacity(segments.len());
        let mut counts = Vec::with_capacity(segments.len());
        let mut products = Vec::with_capacity(segments.len());
        let mut start = 0;
        for (n, &logits) in segments.iter().map(|s| s.rows).zip(wanted) {
            let (first, count) = match logits {
                Logits::Last => (start + n - 1, 1),
                Logits::All | Logits::Verify => (start, n),
                Logits::Normed => {
                    let h = norm.forward(&x.narrow(0, start, n)?)?;
                    outputs.push(Some(StageOutput::Hidden(h)));
                    start += n;
                    continue;
                }
            };
            outputs.push(None);
            picked.push(x.narrow(0, first, count)?);
            counts.push(count);
            match logits {
                Logits::Verify => products.extend(std::iter::repeat_n(1, count)),
                _ => products.push(count),
            }
            start += n;
        }
        if !picked.is_empty() {
            let x = if picked.len() == 1 {
                picked
                    .pop()
                    .ok_or_else(|| EngineError::InvalidInput("no rows".into()))?
            } else {
                Tensor::cat(&picked, 0)?
            };
            let logits = head.forward(&norm.forward(&x)?, &products)?;
            let mut start = 0;
            let mut counts = counts.into_iter();
            for slot in outputs.iter_mut().filter(|o| o.is_none()) {
                let n = counts.next().unwrap_or(0);
                *slot = Some(StageOutput::Logits(logits.narrow(0, start, n)?));
                start += n;
            }
        }
        outputs
            .into_iter()
            .map(|o| o.ok_or_else(|| EngineError::InvalidInput("no output".into())))
            .collect()
    }
}

/// Convenience: the logits as a `Vec<f32>` of one row.
pub fn logits_row(logits: &Tensor, row: usize) -> Result<Vec<f32>> {
    Ok(logits.get(row)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
