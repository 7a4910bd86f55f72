//! Keys and values of one session on one stage, kept outside the weights.
//!
//! The cache records the absolute position of every token it holds, so a stage never
//! infers positions from counts: it is told them, and RoPE and the causal mask follow.

use candle_core::{Tensor, D};

use crate::error::{EngineError, Result};

#[derive(Clone, Default)]
struct LayerKv {
    /// [n_kv_heads, tokens, head_dim]
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The KV cache of one session on one stage.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    positions: Vec<usize>,
}

impl KvCache {
    pub(crate) fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); n_layers],
            positions: Vec::new(),
        }
    }

    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Absolute positions of the tokens held, in the order they arrived.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Keep only the first `len` tokens (rolls back rejected speculative tokens).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.positions.len() {
            return Ok(());
        }
        self.positions.truncate(len);
        for layer in &mut self.layers {
            for t in [&mut layer.k, &mut layer.v] {
                if let Some(x) = t.take() {
                    if len > 0 {
                        *t = Some(x.narrow(1, 0, len)?.contiguous()?);
                    }
                }
            }
        }
        Ok(())
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.positions.clear();
        for layer in &mut self.layers {
            *layer = LayerKv::default();
        }
    }

    pub(crate) fn push_positions(&mut self, positions: &[usize]) {
        self.positions.extend_from_slice(positions);
    }

    /// Append `k`, `v` ([n_kv_heads, new, head_dim]) to layer `i` and return the whole
    /// keys and values of that layer.
    pub(crate) fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let layer = self
            .layers
            .get_mut(i)
            .ok_or_else(|| EngineError::InvalidInput(format!("no cache for layer {i}")))?;
        let cat = |old: &Option<Tensor>, new: &Tensor| -> Result<Tensor> {
            Ok(match old {
                Some(old) => Tensor::cat(&[old, new], D::Minus2)?,
                None => new.contiguous()?,
            })
        };
        let k = cat(&layer.k, k)?;
        let v = cat(&layer.v, v)?;
        layer.k = Some(k.clone());
        layer.v = Some(v.clone());
        Ok((k, v))
    }

    /// Bytes held by keys and values.
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}
