//! `GetProfile` and `Profile`: a head planning a ring (`--split auto`) asks each node what it
//! measured about itself on the model — time per layer, free memory — and feeds the answers
//! to the placement planner (design §3 "Placement", issue #4 item 6).

use bytes::BufMut;

use crate::codec::{bound, put_string, Reader};
use crate::error::WireError;
use crate::message::{finite, MAX_MODEL_ID, MAX_NODE_ID};

/// `GetProfile` (`0x0040`): head → node, "measure yourself on this model".
///
/// | field | encoding |
/// |---|---|
/// | `model_id` | `u32` length (≤ [`MAX_MODEL_ID`]), UTF-8: the model file's name |
/// | `model_sha256` | 32 bytes: the model file's SHA-256, or zeros |
///
/// With a SHA-256, the head also serves that model's weights on this connection: a node
/// without the model may answer with a `GetWeights` for a few layers first, measure itself
/// on them, and then answer the `Profile`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetProfile {
    /// The model file's name, resolved in the node's models directory.
    pub model_id: String,
    /// The model file's SHA-256; zeros: the head sends no weights.
    pub model_sha256: [u8; 32],
}

impl GetProfile {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let msg = GetProfile {
            model_id: r.string("model_id", MAX_MODEL_ID)?,
            model_sha256: r.sha256("model_sha256")?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, &self.model_id);
        out.put_slice(&self.model_sha256);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        bound(
            "GetProfile",
            "model_id",
            self.model_id.len() as u64,
            MAX_MODEL_ID,
        )
    }
}

/// `Profile` (`0x0041`): node → head, what it measured.
///
/// | field | encoding |
/// |---|---|
/// | `node_id` | `u32` length (≤ [`MAX_NODE_ID`]), UTF-8 |
/// | `free_memory_bytes` | `u64` |
/// | `decode_ms_per_layer` | `f32`, finite, ≥ 0 |
/// | `prefill_ms_per_layer_token` | `f32`, finite, ≥ 0 |
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub node_id: String,
    /// Memory the node can give to weights and KV cache.
    pub free_memory_bytes: u64,
    /// Decode time of one layer for one token, in ms.
    pub decode_ms_per_layer: f32,
    /// Prefill time of one layer per prompt token, in ms.
    pub prefill_ms_per_layer_token: f32,
}

impl Profile {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let msg = Profile {
            node_id: r.string("node_id", MAX_NODE_ID)?,
            free_memory_bytes: r.u64("free_memory_bytes")?,
            decode_ms_per_layer: r.f32("decode_ms_per_layer")?,
            prefill_ms_per_layer_token: r.f32("prefill_ms_per_layer_token")?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, &self.node_id);
        out.put_u64_le(self.free_memory_bytes);
        out.put_f32_le(self.decode_ms_per_layer);
        out.put_f32_le(self.prefill_ms_per_layer_token);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "Profile";
        bound(M, "node_id", self.node_id.len() as u64, MAX_NODE_ID)?;
        for (what, v) in [
            ("decode_ms_per_layer", self.decode_ms_per_layer),
            (
                "prefill_ms_per_layer_token",
                self.prefill_ms_per_layer_token,
            ),
        ] {
            finite(M, what, v)?;
            if v < 0.0 {
                return Err(WireError::Invalid {
                    message: M,
                    what,
                    detail: format!("is {v}, expected ≥ 0"),
                });
            }
        }
        Ok(())
    }
}
