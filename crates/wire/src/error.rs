//! The one error type of the wire crate.
//!
//! Every variant says what was wrong with which message and, where there is one, what a person
//! can do about it. Any error from [`crate::Connection::read_frame`] other than
//! [`WireError::Io`] means the peer broke the protocol: the caller closes that connection (and
//! only that one), optionally after telling the peer why with
//! [`crate::Connection::close_with_error`].

use crate::frame::MAGIC;
use crate::message::ErrorCode;

/// Everything that can go wrong reading, writing or validating a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The socket failed (reset, timed out, ...).
    #[error("wire I/O failed: {0}")]
    Io(#[from] std::io::Error),

    /// The first bytes of a frame are not the magic: the peer is not a Shoal node, or the
    /// stream is out of step.
    #[error(
        "not a Shoal peer: a frame starts with b\"{}\" where b\"{}\" belongs \
         (is something other than shoal talking to the wire port?)",
        .found.escape_ascii(),
        MAGIC.escape_ascii()
    )]
    BadMagic {
        /// The bytes found where the magic should be (up to 4).
        found: Vec<u8>,
    },

    /// The frame's protocol version is not one this build speaks.
    #[error(
        "peer speaks wire protocol version {found}, this node speaks version(s) {}; \
         run the same shoal release on every node",
        versions(.supported)
    )]
    UnsupportedVersion {
        /// The version in the frame header.
        found: u16,
        /// The versions this build accepts.
        supported: &'static [u16],
    },

    /// The frame's message type is not one this build knows.
    #[error("unknown message type {type_id:#06x}; the peer may run a newer shoal than this node")]
    UnknownMessageType {
        /// The type in the frame header.
        type_id: u16,
    },

    /// The header announces a payload above the limit; refused before allocating anything.
    #[error(
        "frame payload of {len} bytes is over this node's limit of {max} bytes and was refused \
         before allocating it (if it is legitimate, raise `Limits::max_payload` on both nodes)"
    )]
    FrameTooLarge {
        /// The announced (or, when writing, the encoded) payload length.
        len: u64,
        /// The limit in force.
        max: u32,
    },

    /// A field needs more bytes than the payload has left: a truncated payload or a length
    /// field that lies.
    #[error("malformed {message}: {what} needs {needed} bytes but only {remaining} remain")]
    Truncated {
        /// Which message was being parsed.
        message: &'static str,
        /// Which field.
        what: &'static str,
        /// Bytes the field claims or needs.
        needed: u64,
        /// Bytes left in the payload.
        remaining: usize,
    },

    /// The payload has bytes after its last field.
    #[error("malformed {message}: {extra} unexpected byte(s) after the last field")]
    TrailingBytes {
        /// Which message was being parsed.
        message: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },

    /// A length or count is above the bound for its field.
    #[error("malformed {message}: {what} is {len}, above the limit of {max}")]
    TooLong {
        /// Which message.
        message: &'static str,
        /// Which field.
        what: &'static str,
        /// The length or count found.
        len: u64,
        /// The bound for that field.
        max: u64,
    },

    /// A field holds a value outside its domain (a bad tag, a NaN, an inconsistent shape...).
    #[error("malformed {message}: {what} {detail}")]
    Invalid {
        /// Which message.
        message: &'static str,
        /// Which field.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },

    /// The peer closed the connection part-way through a frame.
    #[error(
        "peer closed the connection in the middle of a frame ({buffered} bytes of it received)"
    )]
    ClosedMidFrame {
        /// Bytes of the unfinished frame that had arrived.
        buffered: usize,
    },

    /// A valid message arrived where the protocol expects another (e.g. no `Hello` first).
    #[error("protocol violation: expected {expected} but the peer sent {got}")]
    UnexpectedMessage {
        /// What the protocol expects at this point.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },

    /// The peer closed the connection where the protocol expects a message.
    #[error("peer closed the connection while this node waited for {expected}")]
    Closed {
        /// What this node was waiting for.
        expected: &'static str,
    },

    /// A peer opened a keyed (encrypted) connection to this node, which has no swarm key.
    #[error(
        "a swarm key is in use on one side only: the peer opened an encrypted connection and \
         this node has no key (give every node the same --swarm-key)"
    )]
    KeyedPeer,

    /// The swarm-key handshake failed: the peer has no key, another key, or is not a node.
    #[error("secure handshake failed: {detail}")]
    Handshake {
        /// What went wrong, for a person.
        detail: String,
    },

    /// A peer took longer than its deadline.
    #[error("timed out after {after:?} {what}")]
    Timeout {
        /// What this node was waiting for ("connecting", "waiting for the handshake", …).
        what: &'static str,
        /// The deadline.
        after: std::time::Duration,
    },

    /// The peer answered with an `Error` message.
    #[error("peer refused: {message} (code {code})")]
    Remote {
        /// The peer's error code.
        code: ErrorCode,
        /// The peer's explanation.
        message: String,
    },
}

impl WireError {
    /// The code to send the peer in an `Error` message when this error closes its connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            WireError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            WireError::Io(_)
            | WireError::Remote { .. }
            | WireError::Closed { .. }
            | WireError::Timeout { .. } => ErrorCode::INTERNAL,
            WireError::KeyedPeer | WireError::Handshake { .. } => ErrorCode::UNAUTHORIZED,
            WireError::BadMagic { .. }
            | WireError::UnknownMessageType { .. }
            | WireError::Truncated { .. }
            | WireError::TrailingBytes { .. }
            | WireError::TooLong { .. }
            | WireError::Invalid { .. }
            | WireError::ClosedMidFrame { .. }
            | WireError::UnexpectedMessage { .. } => ErrorCode::MALFORMED,
        }
    }

    /// True when the error means the peer broke the protocol (as opposed to the socket failing).
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(
            self,
            WireError::Io(_)
                | WireError::Remote { .. }
                | WireError::Closed { .. }
                | WireError::Handshake { .. }
                | WireError::Timeout { .. }
        )
    }
}

fn versions(supported: &[u16]) -> String {
    let list: Vec<String> = supported.iter().map(u16::to_string).collect();
    list.join(", ")
}
