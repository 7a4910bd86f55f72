//! `Heartbeat`: how members of a cluster keep each other's list (issue #15); and `Chaos`, the
//! dashboard's kill and heal.
//!
//! Every member sends a `Heartbeat` to every other member it knows, about once a second, on a
//! fresh authenticated connection; the receiver answers with its own. Each carries what the
//! sender is (its [`NodeInfo`]: ports, memory, cores, models, role, stages held) and the other
//! members it knows ([`KnownMember`]), so one address is enough to join: a new node learns the
//! rest from the first answer. Nothing in it is trusted for failure detection — a member is
//! alive to a node only while that node's own heartbeats with it work.

use std::net::SocketAddr;

use bytes::BufMut;

use crate::codec::{bound, put_bool, put_len, put_socket_addr, put_string, Reader};
use crate::error::WireError;
use crate::message::{finite, MAX_MODEL_ID, MAX_NODE_ID, MAX_ROLE, MAX_SOFTWARE_VERSION};

/// Most model files one node lists.
pub const MAX_MODELS: usize = 64;
/// Most stages one node says it holds.
pub const MAX_HELD_STAGES: usize = 16;
/// Most other members one heartbeat lists.
pub const MAX_KNOWN_MEMBERS: usize = 256;
/// Longest accelerator name, in bytes.
pub const MAX_ACCELERATOR: usize = 128;

/// What a node says about itself in a [`Heartbeat`].
///
/// | field | encoding |
/// |---|---|
/// | `node_id` | `u32` length (1..=[`MAX_NODE_ID`]), UTF-8 |
/// | `version` | `u32` length (≤ [`MAX_SOFTWARE_VERSION`]), UTF-8 |
/// | `peer_port` | `u16` |
/// | `http_port` | `u16` (0: none) |
/// | `memory_total` | `u64` bytes |
/// | `memory_free` | `u64` bytes |
/// | `cores` | `u32` |
/// | `accelerator` | `u32` length (≤ [`MAX_ACCELERATOR`]), UTF-8 (empty: CPU only) |
/// | `role` | `u32` length (≤ [`MAX_ROLE`]), UTF-8 (empty: a plain worker) |
/// | `models` | `u32` count (≤ [`MAX_MODELS`]), then each `u32` length (≤ [`MAX_MODEL_ID`]), UTF-8 |
/// | `stages` | `u32` count (≤ [`MAX_HELD_STAGES`]), then each [`HeldStage`] |
/// | `busy` | `u32`: requests it is answering now |
/// | `tokens_per_s` | `f32`, finite, ≥ 0: its last answer's decode speed |
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub node_id: String,
    /// The node's software version.
    pub version: String,
    /// Where its peer port listens (on the address it is reached at).
    pub peer_port: u16,
    /// Where its HTTP API listens (0: not said).
    pub http_port: u16,
    pub memory_total: u64,
    /// Memory it can still give (`MemAvailable`).
    pub memory_free: u64,
    /// Logical cores.
    pub cores: u32,
    /// Its GPU or other accelerator, if any.
    pub accelerator: String,
    /// Its swarm role, if any.
    pub role: String,
    /// The model files it has on disk.
    pub models: Vec<String>,
    /// The pipeline stages it holds now.
    pub stages: Vec<HeldStage>,
    /// Requests it is answering now.
    pub busy: u32,
    /// Its last answer's decode speed.
    pub tokens_per_s: f32,
}

/// One pipeline stage a node holds: `model_id` (`u32` length ≤ [`MAX_MODEL_ID`], UTF-8), then
/// `start` and `end` (`u32` each, `start < end`): layers `[start, end)`; then `pass_us`
/// (`u32`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldStage {
    pub model_id: String,
    pub start: u32,
    pub end: u32,
    /// Microseconds its recent decode passes took, on average (0: none yet): the stage's
    /// compute per token, as the dashboard's ring shows it.
    pub pass_us: u32,
}

/// Another member the sender knows: `node_id` (`u32` length 1..=[`MAX_NODE_ID`], UTF-8) and
/// its peer address (family byte, octets, port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownMember {
    pub node_id: String,
    pub addr: SocketAddr,
}

/// `Heartbeat` (`0x0050`): member ↔ member, both ways on one connection: the sender's
/// [`NodeInfo`], then `known`: `u32` count (≤ [`MAX_KNOWN_MEMBERS`]) of [`KnownMember`]s —
/// the members it believes alive, itself not included.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heartbeat {
    pub node: NodeInfo,
    pub known: Vec<KnownMember>,
}

impl Heartbeat {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let node = NodeInfo::parse(r)?;
        let count = r.u32("known")?;
        r.bound("known", u64::from(count), MAX_KNOWN_MEMBERS)?;
        let mut known = Vec::new();
        for _ in 0..count {
            known.push(KnownMember {
                node_id: node_id(r, "known node_id")?,
                addr: r.socket_addr("known addr")?,
            });
        }
        Ok(Heartbeat { node, known })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        self.node.encode(out);
        put_len(out, self.known.len());
        for k in &self.known {
            put_string(out, &k.node_id);
            put_socket_addr(out, &k.addr);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        self.node.validate()?;
        bound(M, "known", self.known.len() as u64, MAX_KNOWN_MEMBERS)?;
        for k in &self.known {
            check_node_id(&k.node_id, "known node_id")?;
        }
        Ok(())
    }
}

const M: &str = "Heartbeat";

/// `Chaos` (`0x0051`): `down`, one byte 0 or 1. Member → member, for demos and failure
/// drills (the dashboard's kill and heal): with `down` the receiver plays dead — its peer
/// port refuses every message but `Chaos` and it stops heartbeating — until a `Chaos` without
/// it. The receiver answers with its state, as a `Chaos`. Only a peer holding the swarm key
/// can send one, and a node only sends one for an HTTP client that had its API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chaos {
    pub down: bool,
}

impl Chaos {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        Ok(Chaos {
            down: r.bool("down")?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_bool(out, self.down);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

impl NodeInfo {
    fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let node_id = node_id(r, "node_id")?;
        let version = r.string("version", MAX_SOFTWARE_VERSION)?;
        let peer_port = r.u16("peer_port")?;
        let http_port = r.u16("http_port")?;
        let memory_total = r.u64("memory_total")?;
        let memory_free = r.u64("memory_free")?;
        let cores = r.u32("cores")?;
        let accelerator = r.string("accelerator", MAX_ACCELERATOR)?;
        let role = r.string("role", MAX_ROLE)?;
        let count = r.u32("models")?;
        r.bound("models", u64::from(count), MAX_MODELS)?;
        let mut models = Vec::new();
        for _ in 0..count {
            models.push(r.string("model", MAX_MODEL_ID)?);
        }
        let count = r.u32("stages")?;
        r.bound("stages", u64::from(count), MAX_HELD_STAGES)?;
        let mut stages = Vec::new();
        for _ in 0..count {
            let stage = HeldStage {
                model_id: r.string("stage model_id", MAX_MODEL_ID)?,
                start: r.u32("stage start")?,
                end: r.u32("stage end")?,
                pass_us: r.u32("stage pass_us")?,
            };
            if stage.start >= stage.end {
                return Err(r.invalid(
                    "stage",
                    format!("is [{}, {}), expected start < end", stage.start, stage.end),
                ));
            }
            stages.push(stage);
        }
        let busy = r.u32("busy")?;
        let tokens_per_s = r.f32("tokens_per_s")?;
        let info = NodeInfo {
            node_id,
            version,
            peer_port,
            http_port,
            memory_total,
            memory_free,
            cores,
            accelerator,
            role,
            models,
            stages,
            busy,
            tokens_per_s,
        };
        check_speed(info.tokens_per_s)?;
        Ok(info)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, &self.node_id);
        put_string(out, &self.version);
        out.put_u16_le(self.peer_port);
        out.put_u16_le(self.http_port);
        out.put_u64_le(self.memory_total);
        out.put_u64_le(self.memory_free);
        out.put_u32_le(self.cores);
        put_string(out, &self.accelerator);
        put_string(out, &self.role);
        put_len(out, self.models.len());
        for m in &self.models {
            put_string(out, m);
        }
        put_len(out, self.stages.len());
        for s in &self.stages {
            put_string(out, &s.model_id);
            out.put_u32_le(s.start);
            out.put_u32_le(s.end);
            out.put_u32_le(s.pass_us);
        }
        out.put_u32_le(self.busy);
        out.put_f32_le(self.tokens_per_s);
    }

    fn validate(&self) -> Result<(), WireError> {
        check_node_id(&self.node_id, "node_id")?;
        bound(
            M,
            "version",
            self.version.len() as u64,
            MAX_SOFTWARE_VERSION,
        )?;
        bound(
            M,
            "accelerator",
            self.accelerator.len() as u64,
            MAX_ACCELERATOR,
        )?;
        bound(M, "role", self.role.len() as u64, MAX_ROLE)?;
        bound(M, "models", self.models.len() as u64, MAX_MODELS)?;
        for m in &self.models {
            bound(M, "model", m.len() as u64, MAX_MODEL_ID)?;
        }
        bound(M, "stages", self.stages.len() as u64, MAX_HELD_STAGES)?;
        for s in &self.stages {
            bound(M, "stage model_id", s.model_id.len() as u64, MAX_MODEL_ID)?;
            if s.start >= s.end {
                return Err(WireError::Invalid {
                    message: M,
                    what: "stage",
                    detail: format!("is [{}, {}), expected start < end", s.start, s.end),
                });
            }
        }
        check_speed(self.tokens_per_s)
    }
}

fn check_speed(v: f32) -> Result<(), WireError> {
    finite(M, "tokens_per_s", v)?;
    if v < 0.0 {
        return Err(WireError::Invalid {
            message: M,
            what: "tokens_per_s",
            detail: format!("is {v}, expected ≥ 0"),
        });
    }
    Ok(())
}

/// A node id: not empty, at most [`MAX_NODE_ID`] bytes.
fn node_id(r: &mut Reader, what: &'static str) -> Result<String, WireError> {
    let id = r.string(what, MAX_NODE_ID)?;
    if id.is_empty() {
        return Err(r.invalid(what, "is empty".to_owned()));
    }
    Ok(id)
}

fn check_node_id(id: &str, what: &'static str) -> Result<(), WireError> {
    bound(M, what, id.len() as u64, MAX_NODE_ID)?;
    if id.is_empty() {
        return Err(WireError::Invalid {
            message: M,
            what,
            detail: "is empty".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::message::{Message, MessageType};
    use crate::{decode_frame, Limits};

    fn sample() -> Heartbeat {
        Heartbeat {
            node: NodeInfo {
                node_id: "pi:7471".into(),
                version: "0.1.0".into(),
                peer_port: 7471,
                http_port: 8080,
                memory_total: 8 << 30,
                memory_free: 5 << 30,
                cores: 4,
                accelerator: String::new(),
                role: "critic".into(),
                models: vec!["smollm2.gguf".into(), "qwen.gguf".into()],
                stages: vec![HeldStage {
                    model_id: "qwen.gguf".into(),
                    start: 12,
                    end: 24,
                    pass_us: 8_500,
                }],
                busy: 2,
                tokens_per_s: 41.5,
            },
            known: vec![
                KnownMember {
                    node_id: "laptop:7471".into(),
                    addr: "192.168.1.20:7471".parse().unwrap(),
                },
                KnownMember {
                    node_id: "v6".into(),
                    addr: "[fe80::1]:9".parse().unwrap(),
                },
            ],
        }
    }

    #[test]
    fn a_heartbeat_round_trips_to_the_same_bytes() {
        let msg = Message::Heartbeat(sample());
        let frame = msg.to_frame().unwrap();
        assert_eq!(&frame[6..8], &0x0050u16.to_le_bytes());
        let (decoded, used) = decode_frame(&frame, &Limits::default()).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(decoded, msg);
        assert_eq!(decoded.to_frame().unwrap(), frame);
    }

    #[test]
    fn a_lying_or_malformed_heartbeat_is_refused() {
        // A count far beyond the bound is refused before anything is allocated for it.
        let mut payload = Vec::new();
        sample().node.encode(&mut payload);
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = Message::parse(MessageType::Heartbeat, payload.into()).unwrap_err();
        assert!(err.to_string().contains("known"), "{err}");

        // An empty stage range.
        let mut bad = sample();
        bad.node.stages[0].end = 12;
        assert!(Message::Heartbeat(bad.clone()).to_frame().is_err());
        let mut payload = Vec::new();
        bad.encode(&mut payload);
        assert!(Message::parse(MessageType::Heartbeat, payload.into()).is_err());

        // A speed that is not a number.
        let mut bad = sample();
        bad.node.tokens_per_s = f32::NAN;
        assert!(Message::Heartbeat(bad.clone()).to_frame().is_err());
        let mut payload = Vec::new();
        bad.encode(&mut payload);
        assert!(Message::parse(MessageType::Heartbeat, payload.into()).is_err());

        // An empty node id.
        let mut bad = sample();
        bad.known[0].node_id.clear();
        let mut payload = Vec::new();
        bad.encode(&mut payload);
        assert!(Message::parse(MessageType::Heartbeat, payload.into()).is_err());

        // A byte too many, or one too few.
        let mut payload = Vec::new();
        sample().encode(&mut payload);
        let mut long = payload.clone();
        long.push(0);
        assert!(Message::parse(MessageType::Heartbeat, long.into()).is_err());
        payload.pop();
        assert!(Message::parse(MessageType::Heartbeat, payload.into()).is_err());
    }
}
