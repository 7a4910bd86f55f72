//! `Error`, `Ping` and `Pong`: the messages any connection may carry at any time.

use bytes::BufMut;

use crate::codec::{bound, put_bool, put_string, Reader};
use crate::error::WireError;

/// Longest `Error` message text, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// What kind of failure an [`ErrorMessage`] reports. A plain `u16` so that a node can relay a
/// code from a newer peer it does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The peer sent a frame this node could not parse; the connection is being closed.
    pub const MALFORMED: ErrorCode = ErrorCode(1);
    /// The peer's protocol version is not supported; the message lists the supported ones.
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(2);
    /// The peer's frame was over this node's payload limit.
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(3);
    /// A well-formed request that cannot be honoured (bad layer range, wrong stage...).
    pub const BAD_REQUEST: ErrorCode = ErrorCode(4);
    /// The session is not known to this stage (evicted, or never started here).
    pub const UNKNOWN_SESSION: ErrorCode = ErrorCode(5);
    /// The model (by id and hash) is not on this node and could not be fetched.
    pub const MODEL_UNAVAILABLE: ErrorCode = ErrorCode(6);
    /// Not enough memory for the stage or the session's cache.
    pub const OUT_OF_MEMORY: ErrorCode = ErrorCode(7);
    /// Too busy now; try again or elsewhere.
    pub const OVERLOADED: ErrorCode = ErrorCode(8);
    /// The peer did not prove it holds the swarm key (or has one where this node has none).
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(9);
    /// A `Forward` of a plan other than the one the stage has loaded (it was loaded again,
    /// by another head or a re-plan): the session's cache is not there.
    pub const STALE_PLAN: ErrorCode = ErrorCode(10);
    /// A `Forward` resumed a kept cache (`Forward::resume`) the stage no longer holds: the
    /// head runs the session again from the start.
    pub const PREFIX_GONE: ErrorCode = ErrorCode(11);
    /// The request is longer than the model's context (protocol 11): the client's to
    /// shorten, as [`ErrorCode::BAD_REQUEST`] is, and named so that an API can say so
    /// (OpenAI's `context_length_exceeded`, which agents compact their history on). Swarm
    /// agents answer with it, and a stage asked to run positions past the model's context
    /// (a ring's head checks a prompt's length first, so only a faulty head sees that).
    pub const CONTEXT_LENGTH: ErrorCode = ErrorCode(12);
    /// A bug or an unexpected failure on the sending node.
    pub const INTERNAL: ErrorCode = ErrorCode(0xFFFF);

    /// The code's name, `None` for codes this build does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            ErrorCode::MALFORMED => "malformed",
            ErrorCode::UNSUPPORTED_VERSION => "unsupported_version",
            ErrorCode::FRAME_TOO_LARGE => "frame_too_large",
            ErrorCode::BAD_REQUEST => "bad_request",
            ErrorCode::UNKNOWN_SESSION => "unknown_session",
            ErrorCode::MODEL_UNAVAILABLE => "model_unavailable",
            ErrorCode::OUT_OF_MEMORY => "out_of_memory",
            ErrorCode::OVERLOADED => "overloaded",
            ErrorCode::UNAUTHORIZED => "unauthorized",
            ErrorCode::STALE_PLAN => "stale_plan",
            ErrorCode::PREFIX_GONE => "prefix_gone",
            ErrorCode::CONTEXT_LENGTH => "context_length",
            ErrorCode::INTERNAL => "internal",
            _ => return None,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{} {name}", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

/// `Error` (`0x0003`): something failed.
///
/// | field | encoding |
/// |---|---|
/// | `code` | `u16` |
/// | `session_id` | `u8` tag (0 none, 1 some), then `u64` |
/// | `message` | `u32` length (≤ [`MAX_ERROR_MESSAGE`]), UTF-8 |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMessage {
    /// What kind of failure.
    pub code: ErrorCode,
    /// The session the failure belongs to, if it belongs to one (a stage failing a `Forward`).
    pub session_id: Option<u64>,
    /// What happened and what to do, for a person.
    pub message: String,
}

impl ErrorMessage {
    /// An error with `message` cut (at a character boundary) to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn new(code: ErrorCode, session_id: Option<u64>, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        ErrorMessage {
            code,
            session_id,
            message,
        }
    }

    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let code = ErrorCode(r.u16("code")?);
        let session_id = if r.present("session_id")? {
            Some(r.u64("session_id")?)
        } else {
            None
        };
        let message = r.string("message", MAX_ERROR_MESSAGE)?;
        Ok(ErrorMessage {
            code,
            session_id,
            message,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u16_le(self.code.0);
        put_bool(out, self.session_id.is_some());
        if let Some(id) = self.session_id {
            out.put_u64_le(id);
        }
        put_string(out, &self.message);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        bound(
            "Error",
            "message",
            self.message.len() as u64,
            MAX_ERROR_MESSAGE,
        )
    }
}

/// `Ping` (`0x0004`): `nonce: u64`. The receiver answers [`Pong`] with the same nonce at once;
/// the sender's clock alone measures the round trip, which the placement planner uses as the
/// cost of a hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    /// Echoed back in the [`Pong`].
    pub nonce: u64,
}

/// `Pong` (`0x0005`): `nonce: u64`, copied from the [`Ping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pong {
    /// The [`Ping`]'s nonce.
    pub nonce: u64,
}

impl Ping {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        Ok(Ping {
            nonce: r.u64("nonce")?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.nonce);
    }

    /// Nothing to check: every value of this message is valid.
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

impl Pong {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        Ok(Pong {
            nonce: r.u64("nonce")?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.nonce);
    }

    /// Nothing to check: every value of this message is valid.
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::frame::{decode_frame, Limits};
    use crate::message::*;

    #[test]
    fn error_frame_bytes() {
        let msg = Message::Error(ErrorMessage::new(
            ErrorCode::UNKNOWN_SESSION,
            Some(7),
            "gone",
        ));
        let frame = msg.to_frame().unwrap();
        #[rustfmt::skip]
        let expected = [
            b'S', b'H', b'O', b'L', 13, 0, 0x03, 0x00, 19, 0, 0, 0,
            0x05, 0x00,                 // code 5
            1, 7, 0, 0, 0, 0, 0, 0, 0,  // Some(7)
            4, 0, 0, 0, b'g', b'o', b'n', b'e',
        ];
        assert_eq!(frame, expected);
        assert_eq!(
            decode_frame(&frame, &Limits::default()).unwrap().unwrap().0,
            msg
        );
    }

    #[test]
    fn pong_frame_bytes() {
        let frame = Message::Pong(Pong { nonce: 1 }).to_frame().unwrap();
        assert_eq!(
            frame,
            [b'S', b'H', b'O', b'L', 13, 0, 5, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn long_error_text_is_cut_at_a_char_boundary() {
        let m = ErrorMessage::new(ErrorCode::INTERNAL, None, "é".repeat(MAX_ERROR_MESSAGE));
        assert!(m.message.len() <= MAX_ERROR_MESSAGE);
        assert!(m.message.len() >= MAX_ERROR_MESSAGE - 1);
        Message::Error(m).to_frame().unwrap();
    }

    #[test]
    fn codes_display_with_names() {
        assert_eq!(ErrorCode::MALFORMED.to_string(), "1 malformed");
        assert_eq!(ErrorCode(4242).to_string(), "4242");
    }
}
