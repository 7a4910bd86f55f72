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
use crate::kernels::{Format, QuantMatrix};
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
    /// Every token's (scoring, speculative verification, tests).
    All,
}

/// The output of a stage: logits `[n, vocab]` from a head stage, hidden states
/// `[tokens, hidden]` otherwise.
pub enum StageOutput {
    Logits(Tensor),
    Hidden(Tensor),
}

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

/// `silu(gate) * up` as llama.cpp computes it (its vectorised `expf`).
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let g: Vec<f32> = gate.flatten_all()?.to_vec1()?;
    let u: Vec<f32> = up.flatten_all()?.to_vec1()?;
    Ok(Tensor::from_vec(
        ggml_math::swiglu(&g, &u),
        gate.shape(),
        gate.device(),
    )?)
}

/// The formats our kernels take, by GGUF type.
fn own_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q5_0 => Some(Format::Q5_0),
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        // In llama.cpp's shape-dependent float order (kernels/kquant.rs). Q4_0, Q5_1 and
        // Q5_K have kernels too, but stay on candle's until they follow llama.cpp's
        // order (it repacks Q4_0 and tiles Q5_K prompts).
        GgmlDType::Q4K => Some(Format::Q4K),
        GgmlDType::Q6K => Some(Format::Q6K),
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(w) => Ok(w.forward(x)?),
            Self::Own(w) => w.matmul(x),
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
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

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        cache: &mut KvCache,
        cache_layer: usize,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("layer", cache_layer).entered();
        let residual = x;
        let h = self.attn_norm.forward(x)?;
        let h = self.attention(&h, rope, cache, cache_layer, cfg)?;
        let x = (residual + h)?;
        let residual = &x;
        let h = self.ffn_norm.forward(&x)?;
        let h = self
            .down
            .forward(&swiglu(&self.gate.forward(&h)?, &self.up.forward(&h)?)?)?;
        Ok((residual + h)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        cache: &mut KvCache,
        cache_layer: usize,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let (seq, _hidden) = x.dims2()?;
        let (n_heads, n_kv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        // Rows of [seq, heads, hd], the layout of the projections and of the cache.
        let mut q = self.q.forward(x)?;
        let mut k = self.k.forward(x)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?; // over each head's hd values
            k = kn.forward(&k)?;
        }
        let mut q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let mut k: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = self.v.forward(x)?.flatten_all()?.to_vec1()?;
        rope.apply(&mut q, hd);
        rope.apply(&mut k, hd);
        // The cache already lists the new tokens' positions, last.
        let key_pos = cache.positions().to_vec();
        let query_pos = &key_pos[key_pos.len() - seq..];
        let layer_kv = cache.append(cache_layer, &k, &v)?;
        let heads = Heads {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let y = attend(heads, &q, &layer_kv.k, &layer_kv.v, query_pos, &key_pos);
        let y = Tensor::from_vec(y, (seq, n_heads * hd), x.device())?;
        self.o.forward(&y)
    }
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
    layers: Vec<Layer>,
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
            layers.push(Layer::load(file, i, &cfg, device)?);
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
    /// their keys and values to `cache`.
    pub fn forward(
        &self,
        input: StageInput<'_>,
        positions: &[usize],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<StageOutput> {
        let _span = tracing::debug_span!("stage", layers = ?self.spec.layers).entered();
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
        let mut x = match input {
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
                embedding.embedding(ids)?
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
                h.to_dtype(DType::F32)?.to_device(&self.device)?
            }
        };

        let rope = RopeAt::new(&self.cfg, positions);
        cache.push_positions(positions);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rope, cache, i, &self.cfg)?;
        }

        match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) => {
                let x = match logits {
                    Logits::Last => x.narrow(0, n - 1, 1)?,
                    Logits::All => x,
                };
                let x = norm.forward(&x)?;
                Ok(StageOutput::Logits(head.forward(&x)?))
            }
            _ => Ok(StageOutput::Hidden(x)),
        }
    }
}

/// Convenience: the logits as a `Vec<f32>` of one row.
pub fn logits_row(logits: &Tensor, row: usize) -> Result<Vec<f32>> {
    Ok(logits.get(row)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
