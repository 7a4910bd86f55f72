//! The messages a frame carries: one enum, one small struct per message, each with its own
//! `parse` and `encode`, and a final check that nothing of the payload is left over.
//!
//! Parsing is strict so that every message has exactly one encoding: bools and option tags are
//! 0 or 1, enum tags are known, strings are UTF-8, floats that feed a sampler are finite, and
//! every length is bounded. [`Message::validate`] applies the same rules to a message about to
//! be sent, so a node never writes a frame its peer would refuse.

mod agent;
mod control;
mod handshake;
mod membership;
mod profile;
mod session;
mod stage;
mod weights;

use bytes::Bytes;

pub use agent::{
    AgentCard, Answer, Ask, ChatTurn, Describe, Finish, MAX_API_JSON, MAX_CHAT_ROLE, MAX_CHAT_TEXT,
    MAX_CHAT_TURNS, MAX_CHOICES, MAX_CHOICE_LEN, MAX_MODEL_NAME, MAX_ROLE, MAX_STOP, MAX_STOP_LEN,
};
pub use control::{ErrorCode, ErrorMessage, Ping, Pong, MAX_ERROR_MESSAGE};
pub use handshake::{Capabilities, Hello, HelloAck, MAX_NODE_ID, MAX_SOFTWARE_VERSION};
pub use membership::{
    Chaos, Heartbeat, HeldStage, KnownMember, NodeInfo, MAX_ACCELERATOR, MAX_HELD_STAGES,
    MAX_KNOWN_MEMBERS, MAX_MODELS,
};
pub use profile::{GetProfile, Profile};
pub use session::{
    EndSession, Forward, JsonAnswer, LogitRows, Logits, Payload, Resume, SamplingSpec, Token,
    Truncate, Verified, Want, MAX_GRAMMAR, MAX_LEAD, MAX_PENALTY_TOKENS, MAX_TOKENS,
    MAX_TOP_LOGPROBS,
};
pub use stage::{LoadStage, StageReady, MAX_MODEL_ID, MAX_WEIGHT_SOURCES};
pub use weights::{
    GetWeights, WeightsChunk, WeightsManifest, WeightsRegion, WeightsWant, MAX_STAGE_FILE,
    MAX_WEIGHTS_CHUNK, MAX_WEIGHT_REGIONS,
};

use crate::codec::Reader;
use crate::error::WireError;
use crate::frame::{FrameHeader, Limits, HEADER_LEN, PROTOCOL_VERSION};

/// Declares every message once — its type id, its payload struct and what it is for — and
/// derives from that one list the header's [`MessageType`], the [`Message`] enum, the
/// dispatch of parse, encode and validate to each payload struct, and `From` for each.
macro_rules! messages {
    ($($(#[doc = $doc:literal])+ $id:literal $variant:ident($ty:ident),)+) => {
        /// The `type` field of a frame header.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum MessageType {
            $(#[doc = concat!("`", stringify!($id), "` [`", stringify!($ty), "`]")] $variant,)+
        }

        impl MessageType {
            /// Every message type, in wire order.
            pub const ALL: [MessageType; [$(stringify!($variant),)+].len()] =
                [$(MessageType::$variant,)+];

            /// The type id on the wire.
            pub const fn to_u16(self) -> u16 {
                match self {
                    $(MessageType::$variant => $id,)+
                }
            }

            /// The message's name, for logs and errors.
            pub const fn name(self) -> &'static str {
                match self {
                    $(MessageType::$variant => stringify!($variant),)+
                }
            }
        }

        /// One message of the peer protocol.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Message {
            $($(#[doc = $doc])+ $variant($ty),)+
        }

        impl Message {
            /// This message's type.
            pub fn message_type(&self) -> MessageType {
                match self {
                    $(Message::$variant(_) => MessageType::$variant,)+
                }
            }

            /// Parses a whole payload of type `ty`. Fails on any missing, extra or invalid byte.
            pub fn parse(ty: MessageType, payload: Bytes) -> Result<Message, WireError> {
                let mut r = Reader::new(payload, ty.name());
                let msg = match ty {
                    $(MessageType::$variant => Message::$variant($ty::parse(&mut r)?),)+
                };
                r.finish()?;
                Ok(msg)
            }

            /// Appends the payload (no header) to `out`.
            pub fn encode_payload(&self, out: &mut Vec<u8>) {
                match self {
                    $(Message::$variant(m) => m.encode(out),)+
                }
            }

            /// Checks the rules a parser enforces, so that what is sent will be accepted.
            pub fn validate(&self) -> Result<(), WireError> {
                match self {
                    $(Message::$variant(m) => m.validate(),)+
                }
            }
        }

        $(impl From<$ty> for Message {
            fn from(m: $ty) -> Message {
                Message::$variant(m)
            }
        })+
    };
}

messages! {
    /// Opens a connection: who is calling.
    0x0001 Hello(Hello),
    /// Answers [`Hello`]: who answered.
    0x0002 HelloAck(HelloAck),
    /// Something failed; also sent before closing a connection that broke the protocol.
    0x0003 Error(ErrorMessage),
    /// Round-trip probe.
    0x0004 Ping(Ping),
    /// Answer to [`Ping`], same nonce.
    0x0005 Pong(Pong),
    /// Head → node: load these layers of this model as a stage.
    0x0010 LoadStage(LoadStage),
    /// Node → head: the stage is loaded.
    0x0011 StageReady(StageReady),
    /// Tokens or hidden states of one session moving down the ring.
    0x0020 Forward(Forward),
    /// Last stage → head: the sampled token.
    0x0021 Token(Token),
    /// Last stage → head: logits, for speculative verify or evaluation.
    0x0022 Logits(Logits),
    /// Head → stages: drop the session's KV cache.
    0x0023 EndSession(EndSession),
    /// Head → stages: roll the session's KV cache back to a length.
    0x0024 Truncate(Truncate),
    /// Last stage → head: the draws of a speculative verify.
    0x0025 Verified(Verified),
    /// Head → agent: who are you?
    0x0030 Describe(Describe),
    /// Agent → head: role, model, measured speed and load.
    0x0031 AgentCard(AgentCard),
    /// Head → agent: answer this conversation.
    0x0032 Ask(Ask),
    /// Agent → head: the answer to an [`Ask`].
    0x0033 Answer(Answer),
    /// Head → node: measure yourself on this model.
    0x0040 GetProfile(GetProfile),
    /// Node → head: time per layer and free memory.
    0x0041 Profile(Profile),
    /// Member ↔ member: who I am and whom I know (both ways on one connection).
    0x0050 Heartbeat(Heartbeat),
    /// Member → member: play dead (or stop playing dead), for demos and drills.
    0x0051 Chaos(Chaos),
    /// Node → holder: send me my stage's share of this model.
    0x0060 GetWeights(GetWeights),
    /// Holder → node: the stage file to come, its regions and their SHA-256.
    0x0061 WeightsManifest(WeightsManifest),
    /// Holder → node: the next bytes of the regions wanted.
    0x0062 WeightsChunk(WeightsChunk),
    /// Node → holder: the regions of the manifest it lacks.
    0x0063 WeightsWant(WeightsWant),
}

impl MessageType {
    /// The message type for a type id, if this build knows it.
    pub fn from_u16(id: u16) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.to_u16() == id)
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Message {
    /// This message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        self.message_type().name()
    }

    /// Appends a whole frame (header and payload) to `out`. Fails, leaving `out` as it was,
    /// when the message is invalid or its payload is over `limits.max_payload`.
    pub fn encode_frame(&self, out: &mut Vec<u8>, limits: &Limits) -> Result<(), WireError> {
        self.validate()?;
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        self.encode_payload(out);
        let len = out.len() - start - HEADER_LEN;
        let payload_len = match u32::try_from(len) {
            Ok(n) if n <= limits.max_payload => n,
            _ => {
                out.truncate(start);
                return Err(WireError::FrameTooLarge {
                    len: len as u64,
                    max: limits.max_payload,
                });
            }
        };
        let header = FrameHeader {
            version: PROTOCOL_VERSION,
            message_type: self.message_type(),
            payload_len,
        };
        out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(())
    }

    /// The whole frame as a new buffer, under the default limits.
    pub fn to_frame(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode_frame(&mut out, &Limits::default())?;
        Ok(out)
    }
}

/// Finite-float check shared by validators.
pub(crate) fn finite(message: &'static str, what: &'static str, v: f32) -> Result<(), WireError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(WireError::Invalid {
            message,
            what,
            detail: format!("is {v}, expected a finite number"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip_and_are_distinct() {
        for t in MessageType::ALL {
            assert_eq!(MessageType::from_u16(t.to_u16()), Some(t));
        }
        let mut ids: Vec<u16> = MessageType::ALL.iter().map(|t| t.to_u16()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), MessageType::ALL.len());
        assert_eq!(MessageType::from_u16(0), None);
    }

    #[test]
    fn an_oversized_message_is_refused_when_writing() {
        let msg = Message::Error(ErrorMessage {
            code: ErrorCode::INTERNAL,
            session_id: None,
            message: "x".repeat(100),
        });
        let mut out = vec![7];
        let err = msg
            .encode_frame(&mut out, &Limits { max_payload: 50 })
            .unwrap_err();
        assert!(
            matches!(err, WireError::FrameTooLarge { max: 50, .. }),
            "{err}"
        );
        assert_eq!(out, [7], "a refused frame leaves the buffer as it was");
    }
}
