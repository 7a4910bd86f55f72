//! A stage: a contiguous range of a model's layers, optionally with the token embedding
//! in front and the final norm and LM head behind.
//!
//! The whole model is the one stage `[0..L)` with both ends; a pipeline is several
//! stages on several devices. There is one code path for both, so "stages `[0..k)` then
//! `[k..L)`" computes exactly what `[0..L)` computes.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// A weight matrix in its quantized form, multiplied by our own kernel where we have one
/// for its format and by candle's otherwise.
enum Weight {
    Candle(QMatMul),
    Own(QuantMatrix),
}

impl Weight {
    fn new(t: QTensor) -> Result<Self> {
        let own = match t.dtype() {
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q5_0 => Some(Format::Q5_0),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            // Ours for single rows (decode), candle's repacked GEMM for prompts.
            GgmlDType::Q4K => Some(Format::Q4K),
            GgmlDType::Q6K => Some(Format::Q6K),
            _ => None,
        };
        if let (Some(format), true) = (own, t.device().is_cpu()) {
            return Ok(Self::Own(QuantMatrix::from_qtensor(format, t)?));
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
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
        let weight = Weight::new(file.tensor(&format!("{prefix}.weight"), device)?)?;
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
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        cache_layer: usize,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("layer", cache_layer).entered();
        let residual = x;
        let h = self.attn_norm.forward(x)?;
        let h = self.attention(&h, rope, mask, cache, cache_layer, cfg)?;
        let x = (residual + h)?;
        let residual = &x;
        let h = self.ffn_norm.forward(&x)?;
        let gate = candle_nn::ops::silu(&self.gate.forward(&h)?)?;
        let h = self.down.forward(&(gate * self.up.forward(&h)?)?)?;
        Ok((residual + h)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        cache_layer: usize,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let (seq, _hidden) = x.dims2()?;
        let (n_heads, n_kv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        // [seq, heads*hd] -> [1, heads, seq, hd]
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((1, seq, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let mut q = heads(self.q.forward(x)?, n_heads)?;
        let mut k = heads(self.k.forward(x)?, n_kv)?;
        let v = heads(self.v.forward(x)?, n_kv)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let (k, v) = cache.append(cache_layer, &k.squeeze(0)?, &v.squeeze(0)?)?;
        let total = k.dim(1)?;

        // Grouped-query attention without copying K/V: the n_rep query heads that share a
        // KV head are laid out one after another, so [heads, seq, hd] reshapes to
        // [kv_heads, n_rep*seq, hd] and multiplies each KV head once.
        let n_rep = n_heads / n_kv;
        let q = q.squeeze(0)?.reshape((n_kv, n_rep * seq, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att
                .reshape((n_kv, n_rep, seq, total))?
                .broadcast_add(m)?
                .reshape((n_kv, n_rep * seq, total))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // [kv, n_rep*seq, hd]
        let y = y
            .reshape((n_heads, seq, hd))?
            .transpose(0, 1)?
            .reshape((seq, n_heads * hd))?;
        self.o.forward(&y)
    }
}

/// RoPE cos/sin for the exact positions of one forward pass.
struct RopeAt {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RopeAt {
    fn new(cfg: &ModelConfig, positions: &[usize], device: &Device) -> Result<Self> {
        let half = cfg.rope_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.rope_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let n = positions.len();
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
            interleaved: cfg.arch.rope_interleaved(),
        })
    }

    /// x: [1, heads, seq, hd], contiguous.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(x, &self.cos, &self.sin)?
        } else {
            candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)?
        })
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
            Some(Arc::new(Weight::new(
                file.tensor("token_embd.weight", device)?,
            )?))
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
                _ => Arc::new(Weight::new(file.tensor("output.weight", device)?)?),
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

        let mask = self.mask(positions, cache)?;
        let rope = RopeAt::new(&self.cfg, positions, &self.device)?;
        cache.push_positions(positions);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rope, mask.as_ref(), cache, i, &self.cfg)?;
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

    /// Causal mask over the cache plus the new tokens, by absolute position: a token
    /// sees every token at the same or an earlier position. `None` when nothing is hidden.
    fn mask(&self, positions: &[usize], cache: &KvCache) -> Result<Option<Tensor>> {
        let keys: Vec<usize> = cache.positions().iter().chain(positions).copied().collect();
        let mut any_hidden = false;
        let mut mask = Vec::with_capacity(positions.len() * keys.len());
        for &q in positions {
            for &k in &keys {
                if k <= q {
                    mask.push(0f32);
                } else {
                    any_hidden = true;
                    mask.push(f32::NEG_INFINITY);
                }
            }
        }
        if !any_hidden {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(
            mask,
            (positions.len(), keys.len()),
            &self.device,
        )?))
    }
}

/// Convenience: the logits as a `Vec<f32>` of one row.
pub fn logits_row(logits: &Tensor, row: usize) -> Result<Vec<f32>> {
    Ok(logits.get(row)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
