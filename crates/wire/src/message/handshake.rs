//! `Hello` and `HelloAck`: the first exchange on every connection.
//!
//! Both carry the same three fields, so they share one layout; `HelloAck` adds one:
//!
//! | field | encoding |
//! |---|---|
//! | `node_id` | `u32` length (1..=[`MAX_NODE_ID`]), UTF-8 |
//! | `software_version` | `u32` length (≤ [`MAX_SOFTWARE_VERSION`]), UTF-8 |
//! | `capabilities` | `u64` bit set ([`Capabilities`]) |
//! | `idle_timeout` (`HelloAck` only) | `u32` milliseconds, 0 for none |
//!
//! The swarm key is deliberately *not* a field here: authentication and encryption will wrap
//! the byte stream under [`crate::Connection`] (see [`crate::handshake`]), so that nothing —
//! not even a `Hello` — is read from a peer that has not proved it holds the key.

use std::time::Duration;

use bytes::BufMut;

use crate::codec::{bound, put_string, Reader};
use crate::error::WireError;

/// Longest node id, in bytes.
pub const MAX_NODE_ID: usize = 128;
/// Longest software version string, in bytes.
pub const MAX_SOFTWARE_VERSION: usize = 64;

/// What a node can do, as a bit set. Unknown bits (from newer peers) are kept, not refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// No capabilities.
    pub const NONE: Capabilities = Capabilities(0);
    /// Can load and run pipeline stages.
    pub const STAGE: Capabilities = Capabilities(1 << 0);
    /// Can be the head of a session (owns history, samples nothing itself).
    pub const HEAD: Capabilities = Capabilities(1 << 1);
    /// Accepts bf16 activations (f16 is always accepted).
    pub const ACT_BF16: Capabilities = Capabilities(1 << 2);
    /// Accepts f32 activations.
    pub const ACT_F32: Capabilities = Capabilities(1 << 3);
    /// Returns `Logits` for every row (speculative verify).
    pub const LOGITS_ALL: Capabilities = Capabilities(1 << 4);
    /// Is a swarm agent: answers `Describe` and `Ask` with a whole model (issue #5).
    pub const AGENT: Capabilities = Capabilities(1 << 5);

    /// True when every bit of `other` is set here.
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Capabilities;
    fn bitor(self, rhs: Capabilities) -> Capabilities {
        Capabilities(self.0 | rhs.0)
    }
}

/// `Hello` (`0x0001`): the first message on a connection, from the side that dialled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The caller's stable node id (as announced in discovery).
    pub node_id: String,
    /// The caller's shoal release, e.g. `"0.1.0"`, for logs and the dashboard.
    pub software_version: String,
    /// What the caller can do.
    pub capabilities: Capabilities,
}

/// `HelloAck` (`0x0002`): the answer to [`Hello`], describing the side that accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAck {
    /// The answering node's id.
    pub node_id: String,
    /// The answering node's shoal release.
    pub software_version: String,
    /// What the answering node can do.
    pub capabilities: Capabilities,
    /// How long the answering node lets this connection stay silent before closing it
    /// (`None`: never), so the dialler keeps the link alive by the answerer's clock, not
    /// its own (nodes may be set differently). [`crate::serve_peers`] fills it in from its
    /// transport; a service's own answer leaves it `None`. Carried in whole milliseconds.
    pub idle_timeout: Option<Duration>,
}

fn parse_identity(r: &mut Reader) -> Result<(String, String, Capabilities), WireError> {
    let node_id = r.string("node_id", MAX_NODE_ID)?;
    let software_version = r.string("software_version", MAX_SOFTWARE_VERSION)?;
    let capabilities = Capabilities(r.u64("capabilities")?);
    validate_identity(r.message(), &node_id, &software_version)?;
    Ok((node_id, software_version, capabilities))
}

fn encode_identity(out: &mut Vec<u8>, node_id: &str, version: &str, caps: Capabilities) {
    put_string(out, node_id);
    put_string(out, version);
    out.put_u64_le(caps.0);
}

fn validate_identity(message: &'static str, node_id: &str, version: &str) -> Result<(), WireError> {
    if node_id.is_empty() {
        return Err(WireError::Invalid {
            message,
            what: "node_id",
            detail: "is empty".to_owned(),
        });
    }
    bound(message, "node_id", node_id.len() as u64, MAX_NODE_ID)?;
    bound(
        message,
        "software_version",
        version.len() as u64,
        MAX_SOFTWARE_VERSION,
    )
}

impl Hello {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let (node_id, software_version, capabilities) = parse_identity(r)?;
        Ok(Hello {
            node_id,
            software_version,
            capabilities,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        encode_identity(
            out,
            &self.node_id,
            &self.software_version,
            self.capabilities,
        );
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        validate_identity("Hello", &self.node_id, &self.software_version)
    }
}

impl HelloAck {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let (node_id, software_version, capabilities) = parse_identity(r)?;
        let idle_ms = r.u32("idle_timeout")?;
        Ok(HelloAck {
            node_id,
            software_version,
            capabilities,
            idle_timeout: (idle_ms > 0).then(|| Duration::from_millis(idle_ms.into())),
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        encode_identity(
            out,
            &self.node_id,
            &self.software_version,
            self.capabilities,
        );
        out.put_u32_le(self.idle_timeout.map_or(0, idle_millis));
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        validate_identity("HelloAck", &self.node_id, &self.software_version)
    }
}

/// An idle timeout in whole milliseconds, at least 1 (0 means none on the wire) and at
/// most `u32::MAX` (49 days, as good as none).
fn idle_millis(after: Duration) -> u32 {
    u32::try_from(after.as_millis()).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::frame::{decode_frame, Limits};
    use crate::message::*;

    #[test]
    fn hello_frame_bytes() {
        let msg = Message::Hello(Hello {
            node_id: "a1".into(),
            software_version: "0.1.0".into(),
            capabilities: Capabilities::STAGE | Capabilities::HEAD,
        });
        let frame = msg.to_frame().unwrap();
        #[rustfmt::skip]
        let expected = [
            b'S', b'H', b'O', b'L', 13, 0, 0x01, 0x00, 23, 0, 0, 0,
            2, 0, 0, 0, b'a', b'1',
            5, 0, 0, 0, b'0', b'.', b'1', b'.', b'0',
            3, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(frame, expected);
        assert_eq!(
            decode_frame(&frame, &Limits::default()).unwrap().unwrap().0,
            msg
        );
    }

    #[test]
    fn a_hello_ack_carries_its_idle_timeout_in_milliseconds() {
        let ack = |idle_timeout| {
            Message::HelloAck(HelloAck {
                node_id: "b".into(),
                software_version: String::new(),
                capabilities: Capabilities::STAGE,
                idle_timeout,
            })
        };
        let frame = ack(Some(Duration::from_millis(120_000)))
            .to_frame()
            .unwrap();
        assert_eq!(frame[frame.len() - 4..], 120_000u32.to_le_bytes());
        for (sent, read) in [
            (None, None),
            (Some(Duration::from_secs(2)), Some(Duration::from_secs(2))),
            // Under a millisecond is not "none".
            (
                Some(Duration::from_micros(10)),
                Some(Duration::from_millis(1)),
            ),
            (
                Some(Duration::MAX),
                Some(Duration::from_millis(u32::MAX.into())),
            ),
        ] {
            let frame = ack(sent).to_frame().unwrap();
            let (decoded, _) = decode_frame(&frame, &Limits::default()).unwrap().unwrap();
            assert_eq!(decoded, ack(read), "{sent:?}");
        }
    }

    #[test]
    fn empty_node_id_is_refused_both_ways() {
        let msg = Message::HelloAck(HelloAck {
            node_id: String::new(),
            software_version: String::new(),
            capabilities: Capabilities::NONE,
            idle_timeout: None,
        });
        assert!(msg.to_frame().is_err());
        let mut payload = Vec::new();
        msg.encode_payload(&mut payload);
        let err = Message::parse(MessageType::HelloAck, payload.into()).unwrap_err();
        assert_eq!(err.to_string(), "malformed HelloAck: node_id is empty");
    }

    #[test]
    fn capabilities_contain() {
        let c = Capabilities::STAGE | Capabilities::ACT_BF16;
        assert!(c.contains(Capabilities::STAGE));
        assert!(!c.contains(Capabilities::HEAD));
        assert!(c.contains(Capabilities::NONE));
    }
}
