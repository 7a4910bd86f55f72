//! The frame header, and finding a complete, in-bounds frame at the front of a buffer.
//!
//! [`check_frame`] looks only at the header: it rejects a bad magic, an unsupported version, an
//! unknown type or an oversized length as soon as the bytes that show it have arrived, and says
//! "incomplete" (`Ok(None)`) otherwise until the whole frame is there. Only then is the payload
//! parsed ([`crate::Message::parse`]), so a parser never sees half a message and nothing is
//! allocated for a length that has not passed the bound.

use bytes::Bytes;

use crate::error::WireError;
use crate::message::{Message, MessageType};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SHOL";
/// The protocol version this build writes.
pub const PROTOCOL_VERSION: u16 = 13;
/// The protocol versions this build reads.
pub const SUPPORTED_VERSIONS: &[u16] = &[PROTOCOL_VERSION];
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;
/// Default bound on a frame's payload: 64 MiB, room for a 4096-token f16 prefill chunk of a
/// 8192-wide model.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

/// Bounds applied to every frame read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted or sent, in bytes. A header announcing more is refused before
    /// anything is allocated for it.
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// A validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version (one of [`SUPPORTED_VERSIONS`]).
    pub version: u16,
    /// What the payload holds.
    pub message_type: MessageType,
    /// Payload bytes after the header (within the limit).
    pub payload_len: u32,
}

impl FrameHeader {
    /// Header plus payload, in bytes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// The 12 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.message_type.to_u16().to_le_bytes());
        b[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }
}

/// Checks the frame at the front of `buf`.
///
/// `Ok(Some(header))`: a whole frame, `header.frame_len()` bytes, is there and within bounds.
/// `Ok(None)`: not enough bytes yet — every proper prefix of a valid frame gives this.
/// `Err(_)`: the bytes so far already break the protocol; the connection should be closed.
pub fn check_frame(buf: &[u8], limits: &Limits) -> Result<Option<FrameHeader>, WireError> {
    // Compare as much of the magic as has arrived, so a stranger is turned away on its first
    // wrong byte rather than after we wait for more.
    let m = buf.len().min(MAGIC.len());
    if buf[..m] != MAGIC[..m] {
        if buf.len() >= MAGIC.len() && buf[..MAGIC.len()] == crate::secure::PREAMBLE[..MAGIC.len()]
        {
            return Err(WireError::KeyedPeer);
        }
        return Err(WireError::BadMagic {
            found: buf[..m].to_vec(),
        });
    }
    if buf.len() < 6 {
        return Ok(None);
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(WireError::UnsupportedVersion {
            found: version,
            supported: SUPPORTED_VERSIONS,
        });
    }
    if buf.len() < 8 {
        return Ok(None);
    }
    let type_id = u16::from_le_bytes([buf[6], buf[7]]);
    let message_type =
        MessageType::from_u16(type_id).ok_or(WireError::UnknownMessageType { type_id })?;
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let payload_len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if payload_len > limits.max_payload {
        return Err(WireError::FrameTooLarge {
            len: u64::from(payload_len),
            max: limits.max_payload,
        });
    }
    let header = FrameHeader {
        version,
        message_type,
        payload_len,
    };
    if buf.len() < header.frame_len() {
        return Ok(None);
    }
    Ok(Some(header))
}

/// Decodes the frame at the front of `buf`: the message and how many bytes it used, `Ok(None)`
/// while incomplete. The buffer-level twin of [`crate::Connection::read_frame`] (which shares
/// the payload with its read buffer instead of copying it).
pub fn decode_frame(buf: &[u8], limits: &Limits) -> Result<Option<(Message, usize)>, WireError> {
    let Some(header) = check_frame(buf, limits)? else {
        return Ok(None);
    };
    let payload = Bytes::copy_from_slice(&buf[HEADER_LEN..header.frame_len()]);
    let message = Message::parse(header.message_type, payload)?;
    Ok(Some((message, header.frame_len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ping, Truncate};

    fn ping_frame() -> Vec<u8> {
        Message::Ping(Ping {
            nonce: 0x0102_0304_0506_0708,
        })
        .to_frame()
        .unwrap()
    }

    #[test]
    fn ping_frame_bytes() {
        assert_eq!(
            ping_frame(),
            [
                b'S', b'H', b'O', b'L', // magic
                0x0D, 0x00, // version 13
                0x04, 0x00, // type Ping
                0x08, 0x00, 0x00, 0x00, // payload length 8
                0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // nonce
            ]
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let frame = ping_frame();
        for n in 0..frame.len() {
            assert_eq!(
                check_frame(&frame[..n], &Limits::default()).unwrap(),
                None,
                "prefix {n}"
            );
            assert!(decode_frame(&frame[..n], &Limits::default())
                .unwrap()
                .is_none());
        }
        let (msg, used) = decode_frame(&frame, &Limits::default()).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            msg,
            Message::Ping(Ping {
                nonce: 0x0102_0304_0506_0708
            })
        );
    }

    #[test]
    fn decode_takes_one_frame_and_leaves_the_rest() {
        let mut two = ping_frame();
        let second = Message::Truncate(Truncate {
            session_id: 9,
            len: 3,
        })
        .to_frame()
        .unwrap();
        two.extend_from_slice(&second);
        let (_, used) = decode_frame(&two, &Limits::default()).unwrap().unwrap();
        let (msg, used2) = decode_frame(&two[used..], &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(used + used2, two.len());
        assert_eq!(
            msg,
            Message::Truncate(Truncate {
                session_id: 9,
                len: 3
            })
        );
    }

    #[test]
    fn bad_magic_is_refused_on_the_first_wrong_byte() {
        let err = check_frame(b"G", &Limits::default()).unwrap_err();
        assert!(matches!(&err, WireError::BadMagic { found } if found == b"G"));
        let err = check_frame(b"GET / HTTP/1.1\r\n", &Limits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "not a Shoal peer: a frame starts with b\"GET \" where b\"SHOL\" belongs \
             (is something other than shoal talking to the wire port?)"
        );
        assert!(check_frame(b"SHOX", &Limits::default()).is_err());
    }

    #[test]
    fn wrong_version_names_the_supported_ones() {
        let mut frame = ping_frame();
        frame[4] = 1;
        let err = check_frame(&frame[..6], &Limits::default()).unwrap_err();
        assert!(matches!(
            err,
            WireError::UnsupportedVersion { found: 1, .. }
        ));
        assert_eq!(
            err.to_string(),
            "peer speaks wire protocol version 1, this node speaks version(s) 13; \
             run the same shoal release on every node"
        );
    }

    #[test]
    fn unknown_type_is_an_error() {
        let mut frame = ping_frame();
        frame[6..8].copy_from_slice(&0x7777u16.to_le_bytes());
        let err = check_frame(&frame, &Limits::default()).unwrap_err();
        assert!(matches!(
            err,
            WireError::UnknownMessageType { type_id: 0x7777 }
        ));
        assert!(err.to_string().contains("0x7777"), "{err}");
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        // A header claiming 4 GiB - 1: refused with only the 12 header bytes in hand, so nothing
        // was or will be allocated for it.
        let mut header = ping_frame()[..HEADER_LEN].to_vec();
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = check_frame(&header, &Limits::default()).unwrap_err();
        assert!(matches!(
            err,
            WireError::FrameTooLarge {
                len: 0xFFFF_FFFF,
                max: DEFAULT_MAX_PAYLOAD
            }
        ));
        // The bound is configurable, and inclusive.
        let small = Limits { max_payload: 8 };
        assert!(check_frame(&ping_frame(), &small).unwrap().is_some());
        let tiny = Limits { max_payload: 7 };
        assert!(matches!(
            check_frame(&ping_frame(), &tiny),
            Err(WireError::FrameTooLarge { len: 8, max: 7 })
        ));
    }

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            version: PROTOCOL_VERSION,
            message_type: MessageType::Forward,
            payload_len: 0x0A0B_0C0D,
        };
        assert_eq!(
            h.to_bytes(),
            [b'S', b'H', b'O', b'L', 13, 0, 0x20, 0, 0x0D, 0x0C, 0x0B, 0x0A]
        );
        let limits = Limits {
            max_payload: u32::MAX,
        };
        assert_eq!(check_frame(&h.to_bytes(), &limits).unwrap(), None);
    }

    #[test]
    fn truncated_payload_is_an_error_not_incomplete() {
        // The header says 4 bytes, so the frame is complete at 4 bytes; a Ping needs 8.
        let mut frame = ping_frame();
        frame[8] = 4;
        frame.truncate(HEADER_LEN + 4);
        let err = decode_frame(&frame, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Truncated {
                    message: "Ping",
                    needed: 8,
                    remaining: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn trailing_payload_bytes_are_an_error() {
        let mut frame = ping_frame();
        frame[8] = 9;
        frame.push(0);
        let err = decode_frame(&frame, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TrailingBytes {
                    message: "Ping",
                    extra: 1
                }
            ),
            "{err}"
        );
    }
}
