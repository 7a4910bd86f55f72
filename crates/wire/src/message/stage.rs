//! `LoadStage` and `StageReady`: the head sets up a ring.

use std::net::SocketAddr;

use bytes::BufMut;

use crate::activations::DType;
use crate::codec::{bound, put_bool, put_socket_addr, put_string, Reader};
use crate::error::WireError;

/// Longest model id, in bytes.
pub const MAX_MODEL_ID: usize = 256;

/// Most members one `LoadStage` names as sources of weights.
pub const MAX_WEIGHT_SOURCES: usize = 16;

/// `LoadStage` (`0x0010`): head → node, "run layers `[layer_start, layer_end)` of this model
/// as a stage of plan `plan_id`". The node answers [`StageReady`] or an `Error`
/// (`model_unavailable`, `out_of_memory`, `bad_request`).
///
/// | field | encoding |
/// |---|---|
/// | `plan_id` | `u64` |
/// | `model_id` | `u32` length (≤ [`MAX_MODEL_ID`]), UTF-8 |
/// | `model_sha256` | 32 bytes |
/// | `layer_start`, `layer_end` | `u32`, `u32` |
/// | `embed`, `head` | `u8` 0/1 each |
/// | `activation_dtype` | `u8` (0 f16, 1 bf16, 2 f32) |
/// | `max_context` | `u32` |
/// | `next` | `u8` tag, then socket address (`u8` family 4/6, 4 or 16 octets, `u16` port) |
/// | `weights_from` | `u8` count (≤ [`MAX_WEIGHT_SOURCES`]), then that many socket addresses (with 0 or 1, the same bytes as version 6's option tag and address) |
///
/// Rules checked on both ends: `layer_start ≤ layer_end`; a stage with no layers has `embed`
/// or `head`; `next` is present exactly when the stage is not the last (`head` false) — the
/// last stage sends its result to each `Forward`'s `reply_to` instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadStage {
    /// Identifies the ring this stage belongs to; a re-plan after a failure gets a new id, so
    /// a node can tell a stale request from a current one.
    pub plan_id: u64,
    /// Model id as in the registry, e.g. `"qwen2.5-coder-1.5b-instruct-q4_k_m"`.
    pub model_id: String,
    /// SHA-256 of the GGUF file, so both ends mean the very same weights.
    pub model_sha256: [u8; 32],
    /// First layer of the stage.
    pub layer_start: u32,
    /// One past the last layer of the stage.
    pub layer_end: u32,
    /// The stage embeds tokens (it is the first stage).
    pub embed: bool,
    /// The stage applies the final norm and LM head and samples (it is the last stage).
    pub head: bool,
    /// Encoding of the activations this stage sends downstream.
    pub activation_dtype: DType,
    /// KV cache length to reserve per session.
    pub max_context: u32,
    /// The next stage's wire address; `None` for the last stage.
    pub next: Option<SocketAddr>,
    /// Members that may hold the model file and serve its stages' shares (`GetWeights`),
    /// in the order to ask them: a node without the file fetches its layers from the
    /// first that serves them. Empty: the node must have the file.
    pub weights_from: Vec<SocketAddr>,
}

impl LoadStage {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let plan_id = r.u64("plan_id")?;
        let model_id = r.string("model_id", MAX_MODEL_ID)?;
        let model_sha256 = r.sha256("model_sha256")?;
        let layer_start = r.u32("layer_start")?;
        let layer_end = r.u32("layer_end")?;
        let embed = r.bool("embed")?;
        let head = r.bool("head")?;
        let activation_dtype = DType::parse(r, "activation_dtype")?;
        let max_context = r.u32("max_context")?;
        let next = if r.present("next")? {
            Some(r.socket_addr("next")?)
        } else {
            None
        };
        let sources = r.u8("weights_from")?;
        r.bound("weights_from", u64::from(sources), MAX_WEIGHT_SOURCES)?;
        let weights_from = (0..sources)
            .map(|_| r.socket_addr("weights_from"))
            .collect::<Result<_, _>>()?;
        let msg = LoadStage {
            plan_id,
            model_id,
            model_sha256,
            layer_start,
            layer_end,
            embed,
            head,
            activation_dtype,
            max_context,
            next,
            weights_from,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.plan_id);
        put_string(out, &self.model_id);
        out.put_slice(&self.model_sha256);
        out.put_u32_le(self.layer_start);
        out.put_u32_le(self.layer_end);
        put_bool(out, self.embed);
        put_bool(out, self.head);
        out.put_u8(self.activation_dtype.to_u8());
        out.put_u32_le(self.max_context);
        put_bool(out, self.next.is_some());
        if let Some(addr) = &self.next {
            put_socket_addr(out, addr);
        }
        // `validate` keeps the count within a byte.
        out.put_u8(self.weights_from.len().min(MAX_WEIGHT_SOURCES) as u8);
        for addr in self.weights_from.iter().take(MAX_WEIGHT_SOURCES) {
            put_socket_addr(out, addr);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "LoadStage";
        bound(M, "model_id", self.model_id.len() as u64, MAX_MODEL_ID)?;
        bound(
            M,
            "weights_from",
            self.weights_from.len() as u64,
            MAX_WEIGHT_SOURCES,
        )?;
        check_layers(M, self.layer_start, self.layer_end)?;
        if self.layer_start == self.layer_end && !self.embed && !self.head {
            return Err(invalid(
                M,
                "layer range",
                "is empty and the stage neither embeds nor samples, so it would do nothing",
            ));
        }
        match (self.head, self.next.is_some()) {
            (true, true) => Err(invalid(
                M,
                "next",
                "is set on the last stage (head = true), which replies to the session's head instead",
            )),
            (false, false) => Err(invalid(
                M,
                "next",
                "is missing: a stage that is not the last must know where to forward",
            )),
            _ => Ok(()),
        }
    }
}

/// `StageReady` (`0x0011`): node → head, the stage of `plan_id` is loaded and accepts
/// `Forward`s.
///
/// | field | encoding |
/// |---|---|
/// | `plan_id` | `u64` |
/// | `layer_start`, `layer_end` | `u32`, `u32` (echoed, `start ≤ end`) |
/// | `resident_bytes` | `u64` |
/// | `load_ms` | `u32` |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageReady {
    /// The plan from the [`LoadStage`].
    pub plan_id: u64,
    /// First layer loaded.
    pub layer_start: u32,
    /// One past the last layer loaded.
    pub layer_end: u32,
    /// Memory the stage's weights take on the node.
    pub resident_bytes: u64,
    /// How long loading took, for the planner and the dashboard.
    pub load_ms: u32,
}

impl StageReady {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let msg = StageReady {
            plan_id: r.u64("plan_id")?,
            layer_start: r.u32("layer_start")?,
            layer_end: r.u32("layer_end")?,
            resident_bytes: r.u64("resident_bytes")?,
            load_ms: r.u32("load_ms")?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.plan_id);
        out.put_u32_le(self.layer_start);
        out.put_u32_le(self.layer_end);
        out.put_u64_le(self.resident_bytes);
        out.put_u32_le(self.load_ms);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        check_layers("StageReady", self.layer_start, self.layer_end)
    }
}

pub(super) fn check_layers(message: &'static str, start: u32, end: u32) -> Result<(), WireError> {
    if start > end {
        return Err(WireError::Invalid {
            message,
            what: "layer range",
            detail: format!("{start}..{end} ends before it starts"),
        });
    }
    Ok(())
}

fn invalid(message: &'static str, what: &'static str, detail: &str) -> WireError {
    WireError::Invalid {
        message,
        what,
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::activations::DType;
    use crate::frame::{decode_frame, Limits};
    use crate::message::*;

    fn load() -> LoadStage {
        LoadStage {
            plan_id: 2,
            model_id: "m".into(),
            model_sha256: [0xAB; 32],
            layer_start: 4,
            layer_end: 8,
            embed: false,
            head: false,
            activation_dtype: DType::F16,
            max_context: 4096,
            next: Some("127.0.0.1:9000".parse().unwrap()),
            weights_from: Vec::new(),
        }
    }

    #[test]
    fn load_stage_frame_bytes() {
        let frame = Message::LoadStage(load()).to_frame().unwrap();
        let mut expected = vec![b'S', b'H', b'O', b'L', 13, 0, 0x10, 0, 69, 0, 0, 0];
        expected.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]); // plan_id
        expected.extend_from_slice(&[1, 0, 0, 0, b'm']); // model_id
        expected.extend_from_slice(&[0xAB; 32]); // sha256
        expected.extend_from_slice(&[4, 0, 0, 0, 8, 0, 0, 0]); // layers 4..8
        expected.extend_from_slice(&[0, 0, 0]); // embed, head, f16
        expected.extend_from_slice(&[0x00, 0x10, 0, 0]); // max_context 4096
        expected.extend_from_slice(&[1, 4, 127, 0, 0, 1, 0x28, 0x23]); // Some(127.0.0.1:9000)
        expected.push(0); // weights_from: none
        assert_eq!(frame, expected);
        assert_eq!(
            decode_frame(&frame, &Limits::default()).unwrap().unwrap().0,
            Message::LoadStage(load())
        );
    }

    #[test]
    fn weight_sources_are_a_counted_list() {
        let (a, b) = ("127.0.0.1:7000", "[::1]:7001");
        let two = LoadStage {
            weights_from: vec![a.parse().unwrap(), b.parse().unwrap()],
            ..load()
        };
        let frame = Message::LoadStage(two.clone()).to_frame().unwrap();
        let mut tail = vec![2, 4, 127, 0, 0, 1, 0x58, 0x1b, 6];
        tail.extend_from_slice(&[0; 15]);
        tail.extend_from_slice(&[1, 0x59, 0x1b]);
        assert!(frame.ends_with(&tail), "{frame:?}");
        assert_eq!(
            decode_frame(&frame, &Limits::default()).unwrap().unwrap().0,
            Message::LoadStage(two)
        );
        // More than the most, sent or received, is refused.
        let many = LoadStage {
            weights_from: vec![a.parse().unwrap(); MAX_WEIGHT_SOURCES + 1],
            ..load()
        };
        assert!(Message::LoadStage(many).to_frame().is_err());
        let mut frame = Message::LoadStage(load()).to_frame().unwrap();
        let count_at = frame.len() - 1;
        frame[count_at] = MAX_WEIGHT_SOURCES as u8 + 1;
        let err = decode_frame(&frame, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("weights_from"), "{err}");
    }

    #[test]
    fn inconsistent_stages_are_refused() {
        let backwards = LoadStage {
            layer_start: 9,
            ..load()
        };
        assert!(Message::LoadStage(backwards).to_frame().is_err());
        let empty = LoadStage {
            layer_start: 8,
            ..load()
        };
        assert!(Message::LoadStage(empty).to_frame().is_err());
        let last_with_next = LoadStage {
            head: true,
            ..load()
        };
        assert!(Message::LoadStage(last_with_next).to_frame().is_err());
        let middle_without_next = LoadStage {
            next: None,
            ..load()
        };
        assert!(Message::LoadStage(middle_without_next).to_frame().is_err());
        let whole = LoadStage {
            layer_start: 0,
            embed: true,
            head: true,
            next: None,
            ..load()
        };
        assert!(Message::LoadStage(whole).to_frame().is_ok());

        // And when received: flip `head` in a valid frame.
        let mut frame = Message::LoadStage(load()).to_frame().unwrap();
        let head_at = 12 + 8 + 5 + 32 + 8 + 1;
        frame[head_at] = 1;
        let err = decode_frame(&frame, &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains("next is set on the last stage"),
            "{err}"
        );
    }

    #[test]
    fn stage_ready_bytes() {
        let msg = Message::StageReady(StageReady {
            plan_id: 1,
            layer_start: 0,
            layer_end: 12,
            resident_bytes: 1 << 32,
            load_ms: 250,
        });
        let frame = msg.to_frame().unwrap();
        #[rustfmt::skip]
        let expected = [
            b'S', b'H', b'O', b'L', 13, 0, 0x11, 0, 28, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 12, 0, 0, 0,
            0, 0, 0, 0, 1, 0, 0, 0,
            250, 0, 0, 0,
        ];
        assert_eq!(frame, expected);
    }
}
