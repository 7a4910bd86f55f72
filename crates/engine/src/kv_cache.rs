//! Keys and values of one session on one stage, kept outside the weights.
//!
//! The cache records the absolute position of every token it holds, so a stage never
//! infers positions from counts: it is told them, and RoPE and the causal mask follow.

use half::f16;

use crate::error::{EngineError, Result};

/// Keys and values of one layer, in f16 as llama.cpp keeps them (half the memory of f32,
/// and the rounding its attention sees), position-major: `[len, n_kv_heads, head_dim]`,
/// so appending a token copies only that token (the buffers grow by doubling) and
/// truncating is cutting the tail.
#[derive(Default)]
pub(crate) struct LayerKv {
    pub(crate) k: Vec<f16>,
    pub(crate) v: Vec<f16>,
}

impl LayerKv {
    fn append(&mut self, k: &[f32], v: &[f32]) {
        self.k.extend(k.iter().map(|&x| f16::from_f32(x)));
        self.v.extend(v.iter().map(|&x| f16::from_f32(x)));
    }
}

/// The KV cache of one session on one stage. The default holds nothing and has no layers
/// (a placeholder for a cache moved elsewhere).
#[derive(Default)]
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
        let held = self.positions.len();
        if len >= held {
            return;
        }
        self.positions.truncate(len);
        for layer in &mut self.layers {
            // Layers hold `held` tokens each (or none yet); keep the first `len`.
            let per_token = layer.k.len() / held.max(1);
            layer.k.truncate(len * per_token);
            layer.v.truncate(len * per_token);
        }
    }

    /// A copy of the first `len` positions (all of them if it holds fewer): a session that
    /// starts with a kept session's prefix (crate::prefix_cache).
    pub fn prefix(&self, len: usize) -> KvCache {
        let held = self.positions.len();
        let len = len.min(held);
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let per_token = layer.k.len() / held.max(1);
                LayerKv {
                    k: layer.k[..len * per_token].to_vec(),
                    v: layer.v[..len * per_token].to_vec(),
                }
            })
            .collect();
        KvCache {
            layers,
            positions: self.positions[..len].to_vec(),
        }
    }

    /// Gives back the room reserved beyond what is held (a cache kept for later need not
    /// keep the doubling buffers' slack).
    pub fn shrink_to_fit(&mut self) {
        self.positions.shrink_to_fit();
        for layer in &mut self.layers {
            layer.k.shrink_to_fit();
            layer.v.shrink_to_fit();
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

    /// Append `k`, `v` (`[new, n_kv_heads, head_dim]`, rounded to f16 here) to layer `i`
    /// and return all keys and values of that layer.
    pub(crate) fn append(&mut self, i: usize, k: &[f32], v: &[f32]) -> Result<&LayerKv> {
        let layer = self
            .layers
            .get_mut(i)
            .ok_or_else(|| EngineError::InvalidInput(format!("no cache for layer {i}")))?;
        layer.append(k, v);
        Ok(layer)
    }

    /// Bytes reserved for keys and values.
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * std::mem::size_of::<f16>())
            .sum()
    }
}
