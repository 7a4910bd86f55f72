//! Keys and values of one session on one stage, kept outside the weights.
//!
//! The cache records the absolute position of every token it holds, so a stage never
//! infers positions from counts: it is told them, and RoPE and the causal mask follow.

use candle_core::Tensor;

use crate::error::{EngineError, Result};

/// Keys and values of one layer in buffers that grow by doubling, so appending a token
/// copies only that token (a concatenation would copy the whole history every step).
#[derive(Default)]
struct LayerKv {
    /// [n_kv_heads, capacity, head_dim]; the first `len` positions are filled.
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerKv {
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n_kv, new, hd) = k.dims3()?;
        let needed = self.len + new;
        let capacity = self.k.as_ref().map_or(0, |t| t.dim(1).unwrap_or(0));
        if needed > capacity {
            let capacity = needed.next_power_of_two().max(MIN_CAPACITY);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((n_kv, capacity, hd), k.dtype(), k.device())?;
                if let (Some(old), true) = (old, self.len > 0) {
                    buf.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            return Err(EngineError::InvalidInput("KV buffers missing".into()));
        };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = needed;
        Ok((kb.narrow(1, 0, needed)?, vb.narrow(1, 0, needed)?))
    }
}

/// Smallest buffer a layer's cache starts with, in positions.
const MIN_CAPACITY: usize = 64;

/// The KV cache of one session on one stage.
pub struct KvCache {
    layers: Vec<LayerKv>,
    positions: Vec<usize>,
}

impl KvCache {
    pub(crate) fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerKv::default()).collect(),
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
    pub fn truncate(&mut self, len: usize) {
        if len >= self.positions.len() {
            return;
        }
        self.positions.truncate(len);
        for layer in &mut self.layers {
            layer.len = layer.len.min(len);
        }
    }

    /// Forget everything (and free the buffers).
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
        self.layers
            .get_mut(i)
            .ok_or_else(|| EngineError::InvalidInput(format!("no cache for layer {i}")))?
            .append(k, v)
    }

    /// Bytes reserved for keys and values.
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}
