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
mod profile;
mod session;
mod stage;

use bytes::Bytes;

pub use agent::{
    AgentCard, Answer, Ask, ChatTurn, Describe, Finish, MAX_CHAT_ROLE, MAX_CHAT_TEXT,
    MAX_CHAT_TURNS, MAX_CHOICES, MAX_CHOICE_LEN, MAX_MODEL_NAME, MAX_ROLE, MAX_STOP, MAX_STOP_LEN,
};
pub use control::{ErrorCode, ErrorMessage, Ping, Pong, MAX_ERROR_MESSAGE};
pub use handshake::{Capabilities, Hello, HelloAck, MAX_NODE_ID, MAX_SOFTWARE_VERSION};
pub use profile::{GetProfile, Profile};
pub use session::{
    EndSession, Forward, LogitRows, Logits, Payload, SamplingSpec, Token, Truncate, Want,
    MAX_PENALTY_TOKENS, MAX_TOKENS,
};
pub use stage::{LoadStage, StageReady, MAX_MODEL_ID};

use crate::codec::Reader;
use crate::error::WireError;
use crate::frame::{FrameHeader, Limits, HEADER_LEN, PROTOCOL_VERSION};

/// The `type` field of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `0x0001` [`Hello`]
    Hello,
    /// `0x0002` [`HelloAck`]
    HelloAck,
    /// `0x0003` [`ErrorMessage`]
    Error,
    /// `0x0004` [`Ping`]
    Ping,
    /// `0x0005` [`Pong`]
    Pong,
    /// `0x0010` [`LoadStage`]
    LoadStage,
    /// `0x0011` [`StageReady`]
    StageReady,
    /// `0x0020` [`Forward`]
    Forward,
    /// `0x0021` [`Token`]
    Token,
    /// `0x0022` [`Logits`]
    Logits,
    /// `0x0023` [`EndSession`]
    EndSession,
    /// `0x0024` [`Truncate`]
    Truncate,
    /// `0x0030` [`Describe`]
    Describe,
    /// `0x0031` [`AgentCard`]
    AgentCard,
    /// `0x0032` [`Ask`]
    Ask,
    /// `0x0033` [`Answer`]
    Answer,
    /// `0x0040` [`GetProfile`]
    GetProfile,
    /// `0x0041` [`Profile`]
    Profile,
}

impl MessageType {
    /// Every message type, in wire order.
    pub const ALL: [MessageType; 18] = [
        MessageType::Hello,
        MessageType::HelloAck,
        MessageType::Error,
        MessageType::Ping,
        MessageType::Pong,
        MessageType::LoadStage,
        MessageType::StageReady,
        MessageType::Forward,
        MessageType::Token,
        MessageType::Logits,
        MessageType::EndSession,
        MessageType::Truncate,
        MessageType::Describe,
        MessageType::AgentCard,
        MessageType::Ask,
        MessageType::Answer,
        MessageType::GetProfile,
        MessageType::Profile,
    ];

    /// The type id on the wire.
    pub const fn to_u16(self) -> u16 {
        match self {
            MessageType::Hello => 0x0001,
            MessageType::HelloAck => 0x0002,
            MessageType::Error => 0x0003,
            MessageType::Ping => 0x0004,
            MessageType::Pong => 0x0005,
            MessageType::LoadStage => 0x0010,
            MessageType::StageReady => 0x0011,
            MessageType::Forward => 0x0020,
            MessageType::Token => 0x0021,
            MessageType::Logits => 0x0022,
            MessageType::EndSession => 0x0023,
            MessageType::Truncate => 0x0024,
            MessageType::Describe => 0x0030,
            MessageType::AgentCard => 0x0031,
            MessageType::Ask => 0x0032,
            MessageType::Answer => 0x0033,
            MessageType::GetProfile => 0x0040,
            MessageType::Profile => 0x0041,
        }
    }

    /// The message type for a type id, if this build knows it.
    pub fn from_u16(id: u16) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.to_u16() == id)
    }

    /// The message's name, for logs and errors.
    pub const fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "Hello",
            MessageType::HelloAck => "HelloAck",
            MessageType::Error => "Error",
            MessageType::Ping => "Ping",
            MessageType::Pong => "Pong",
            MessageType::LoadStage => "LoadStage",
            MessageType::StageReady => "StageReady",
            MessageType::Forward => "Forward",
            MessageType::Token => "Token",
            MessageType::Logits => "Logits",
            MessageType::EndSession => "EndSession",
            MessageType::Truncate => "Truncate",
            MessageType::Describe => "Describe",
            MessageType::AgentCard => "AgentCard",
            MessageType::Ask => "Ask",
            MessageType::Answer => "Answer",
            MessageType::GetProfile => "GetProfile",
            MessageType::Profile => "Profile",
        }
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One message of the peer protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Opens a connection: who is calling.
    Hello(Hello),
    /// Answers [`Hello`]: who answered.
    HelloAck(HelloAck),
    /// Something failed; also sent before closing a connection that broke the protocol.
    Error(ErrorMessage),
    /// Round-trip probe.
    Ping(Ping),
    /// Answer to [`Ping`], same nonce.
    Pong(Pong),
    /// Head → node: load these layers of this model as a stage.
    LoadStage(LoadStage),
    /// Node → head: the stage is loaded.
    StageReady(StageReady),
    /// Tokens or hidden states of one session moving down the ring.
    Forward(Forward),
    /// Last stage → head: the sampled token.
    Token(Token),
    /// Last stage → head: logits, for speculative verify or evaluation.
    Logits(Logits),
    /// Head → stages: drop the session's KV cache.
    EndSession(EndSession),
    /// Head → stages: roll the session's KV cache back to a length.
    Truncate(Truncate),
    /// Head → agent: who are you?
    Describe(Describe),
    /// Agent → head: role, model, measured speed and load.
    AgentCard(AgentCard),
    /// Head → agent: answer this conversation.
    Ask(Ask),
    /// Agent → head: the answer to an [`Ask`].
    Answer(Answer),
    /// Head → node: measure yourself on this model.
    GetProfile(GetProfile),
    /// Node → head: time per layer and free memory.
    Profile(Profile),
}

impl Message {
    /// This message's type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloAck(_) => MessageType::HelloAck,
            Message::Error(_) => MessageType::Error,
            Message::Ping(_) => MessageType::Ping,
            Message::Pong(_) => MessageType::Pong,
            Message::LoadStage(_) => MessageType::LoadStage,
            Message::StageReady(_) => MessageType::StageReady,
            Message::Forward(_) => MessageType::Forward,
            Message::Token(_) => MessageType::Token,
            Message::Logits(_) => MessageType::Logits,
            Message::EndSession(_) => MessageType::EndSession,
            Message::Truncate(_) => MessageType::Truncate,
            Message::Describe(_) => MessageType::Describe,
            Message::AgentCard(_) => MessageType::AgentCard,
            Message::Ask(_) => MessageType::Ask,
            Message::Answer(_) => MessageType::Answer,
            Message::GetProfile(_) => MessageType::GetProfile,
            Message::Profile(_) => MessageType::Profile,
        }
    }

    /// This message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        self.message_type().name()
    }

    /// Parses a whole payload of type `ty`. Fails on any missing, extra or invalid byte.
    pub fn parse(ty: MessageType, payload: Bytes) -> Result<Message, WireError> {
        let mut r = Reader::new(payload, ty.name());
        let msg = match ty {
            MessageType::Hello => Message::Hello(Hello::parse(&mut r)?),
            MessageType::HelloAck => Message::HelloAck(HelloAck::parse(&mut r)?),
            MessageType::Error => Message::Error(ErrorMessage::parse(&mut r)?),
            MessageType::Ping => Message::Ping(Ping::parse(&mut r)?),
            MessageType::Pong => Message::Pong(Pong::parse(&mut r)?),
            MessageType::LoadStage => Message::LoadStage(LoadStage::parse(&mut r)?),
            MessageType::StageReady => Message::StageReady(StageReady::parse(&mut r)?),
            MessageType::Forward => Message::Forward(Forward::parse(&mut r)?),
            MessageType::Token => Message::Token(Token::parse(&mut r)?),
            MessageType::Logits => Message::Logits(Logits::parse(&mut r)?),
            MessageType::EndSession => Message::EndSession(EndSession::parse(&mut r)?),
            MessageType::Truncate => Message::Truncate(Truncate::parse(&mut r)?),
            MessageType::Describe => Message::Describe(Describe::parse(&mut r)?),
            MessageType::AgentCard => Message::AgentCard(AgentCard::parse(&mut r)?),
            MessageType::Ask => Message::Ask(Ask::parse(&mut r)?),
            MessageType::Answer => Message::Answer(Answer::parse(&mut r)?),
            MessageType::GetProfile => Message::GetProfile(GetProfile::parse(&mut r)?),
            MessageType::Profile => Message::Profile(Profile::parse(&mut r)?),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the payload (no header) to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(m) => m.encode(out),
            Message::HelloAck(m) => m.encode(out),
            Message::Error(m) => m.encode(out),
            Message::Ping(m) => m.encode(out),
            Message::Pong(m) => m.encode(out),
            Message::LoadStage(m) => m.encode(out),
            Message::StageReady(m) => m.encode(out),
            Message::Forward(m) => m.encode(out),
            Message::Token(m) => m.encode(out),
            Message::Logits(m) => m.encode(out),
            Message::EndSession(m) => m.encode(out),
            Message::Truncate(m) => m.encode(out),
            Message::Describe(m) => m.encode(out),
            Message::AgentCard(m) => m.encode(out),
            Message::Ask(m) => m.encode(out),
            Message::Answer(m) => m.encode(out),
            Message::GetProfile(m) => m.encode(out),
            Message::Profile(m) => m.encode(out),
        }
    }

    /// Checks the rules a parser enforces, so that what is sent will be accepted.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Hello(m) => m.validate(),
            Message::HelloAck(m) => m.validate(),
            Message::Error(m) => m.validate(),
            Message::LoadStage(m) => m.validate(),
            Message::StageReady(m) => m.validate(),
            Message::Forward(m) => m.validate(),
            Message::Token(m) => m.validate(),
            Message::Logits(m) => m.validate(),
            Message::AgentCard(m) => m.validate(),
            Message::Ask(m) => m.validate(),
            Message::Answer(m) => m.validate(),
            Message::GetProfile(m) => m.validate(),
            Message::Profile(m) => m.validate(),
            Message::Ping(_)
            | Message::Pong(_)
            | Message::EndSession(_)
            | Message::Truncate(_)
            | Message::Describe(_) => Ok(()),
        }
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

macro_rules! impl_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for Message {
            fn from(m: $ty) -> Message {
                Message::$variant(m)
            }
        })*
    };
}

impl_from!(
    Hello(Hello),
    HelloAck(HelloAck),
    Error(ErrorMessage),
    Ping(Ping),
    Pong(Pong),
    LoadStage(LoadStage),
    StageReady(StageReady),
    Forward(Forward),
    Token(Token),
    Logits(Logits),
    EndSession(EndSession),
    Truncate(Truncate),
    Describe(Describe),
    AgentCard(AgentCard),
    Ask(Ask),
    Answer(Answer),
    GetProfile(GetProfile),
    Profile(Profile),
);

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
