//! Little-endian primitives shared by every message: a bounds-checked reader over one payload
//! and the matching writers.
//!
//! The reader never allocates more than the payload still holds: every length is compared with
//! its field's bound and with the bytes remaining *before* a `Vec` or `String` is made, so a
//! length that lies costs nothing but an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes};

use crate::error::WireError;

/// A cursor over one message payload.
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader {
    /// `message` names the message being parsed, for error messages.
    pub(crate) fn new(buf: Bytes, message: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            message,
        }
    }

    pub(crate) fn message(&self) -> &'static str {
        self.message
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn check(&self, needed: u64, what: &'static str) -> Result<usize, WireError> {
        match usize::try_from(needed) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(WireError::Truncated {
                message: self.message,
                what,
                needed,
                remaining: self.remaining(),
            }),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], WireError> {
        let n = self.check(n as u64, what)?;
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..start + n])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn f32(&mut self, what: &'static str) -> Result<f32, WireError> {
        Ok(f32::from_bits(self.u32(what)?))
    }

    pub(crate) fn sha256(&mut self, what: &'static str) -> Result<[u8; 32], WireError> {
        self.array(what)
    }

    /// A `bool` is one byte, 0 or 1; anything else is an error so that every value has exactly
    /// one encoding.
    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.invalid(what, format!("is {other}, expected 0 or 1"))),
        }
    }

    /// Reads an `Option` tag (0 = none, 1 = some).
    pub(crate) fn present(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.invalid(what, format!("has option tag {other}, expected 0 or 1"))),
        }
    }

    /// `n` raw bytes, shared with the payload (no copy).
    pub(crate) fn bytes(&mut self, n: u64, what: &'static str) -> Result<Bytes, WireError> {
        let n = self.check(n, what)?;
        let start = self.pos;
        self.pos += n;
        Ok(self.buf.slice(start..start + n))
    }

    /// A `u32` byte length then that many bytes of UTF-8.
    pub(crate) fn string(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let len = self.u32(what)?;
        self.bound(what, u64::from(len), max)?;
        let bytes = self.take(len as usize, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.invalid(what, format!("is not valid UTF-8 ({e})"))),
        }
    }

    /// A `u32` count then that many `u32`s.
    pub(crate) fn u32_vec(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<Vec<u32>, WireError> {
        let count = self.u32(what)?;
        self.bound(what, u64::from(count), max)?;
        let n = self.check(u64::from(count) * 4, what)?;
        let bytes = self.take(n, what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// A family byte (4 or 6), the address octets, then the port.
    pub(crate) fn socket_addr(&mut self, what: &'static str) -> Result<SocketAddr, WireError> {
        let ip = match self.u8(what)? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(what)?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>(what)?)),
            other => {
                return Err(
                    self.invalid(what, format!("has address family {other}, expected 4 or 6"))
                )
            }
        };
        Ok(SocketAddr::new(ip, self.u16(what)?))
    }

    /// Errors unless `len <= max`.
    pub(crate) fn bound(&self, what: &'static str, len: u64, max: usize) -> Result<(), WireError> {
        bound(self.message, what, len, max)
    }

    pub(crate) fn invalid(&self, what: &'static str, detail: String) -> WireError {
        WireError::Invalid {
            message: self.message,
            what,
            detail,
        }
    }

    /// The final check of every parse: nothing may be left over.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}

/// Errors unless `len <= max`; shared by parsing and by the checks made before sending.
pub(crate) fn bound(
    message: &'static str,
    what: &'static str,
    len: u64,
    max: usize,
) -> Result<(), WireError> {
    if len > max as u64 {
        return Err(WireError::TooLong {
            message,
            what,
            len,
            max: max as u64,
        });
    }
    Ok(())
}

/// Writes a length as `u32`. A length that does not fit cannot be sent anyway: the frame it is
/// in would be over every payload limit, which [`crate::Message::encode_frame`] checks, so
/// saturating here never puts a wrong length on the wire.
pub(crate) fn put_len(out: &mut Vec<u8>, len: usize) {
    out.put_u32_le(u32::try_from(len).unwrap_or(u32::MAX));
}

pub(crate) fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.put_u8(u8::from(v));
}

pub(crate) fn put_string(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.put_slice(s.as_bytes());
}

pub(crate) fn put_u32_vec(out: &mut Vec<u8>, v: &[u32]) {
    put_len(out, v.len());
    out.reserve(v.len() * 4);
    for x in v {
        out.put_u32_le(*x);
    }
}

pub(crate) fn put_socket_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16_le(addr.port());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lying_vector_length_fails_before_allocating() {
        // A count of 1 billion u32s with 4 bytes behind it: the reader must refuse on the count,
        // not try to reserve 4 GB.
        let mut buf = Vec::new();
        buf.put_u32_le(1_000_000_000);
        buf.put_u32_le(7);
        let mut r = Reader::new(Bytes::from(buf), "Test");
        let err = r.u32_vec("tokens", usize::MAX).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Truncated {
                    needed: 4_000_000_000,
                    remaining: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn field_bounds_apply_before_the_remaining_check() {
        let mut buf = Vec::new();
        buf.put_u32_le(10);
        buf.put_slice(b"0123456789");
        let mut r = Reader::new(Bytes::from(buf), "Test");
        let err = r.string("name", 4).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TooLong {
                    len: 10,
                    max: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bools_and_tags_are_strict() {
        let mut r = Reader::new(Bytes::from_static(&[0, 1, 2]), "Test");
        assert!(!r.bool("a").unwrap());
        assert!(r.bool("b").unwrap());
        let err = r.bool("c").unwrap_err();
        assert_eq!(err.to_string(), "malformed Test: c is 2, expected 0 or 1");
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut r = Reader::new(Bytes::from_static(&[2, 0, 0, 0, 0xff, 0xfe]), "Test");
        assert!(matches!(r.string("s", 16), Err(WireError::Invalid { .. })));
    }

    #[test]
    fn socket_addr_bytes() {
        let addr: SocketAddr = "10.0.0.7:7070".parse().unwrap();
        let mut out = Vec::new();
        put_socket_addr(&mut out, &addr);
        assert_eq!(out, [4, 10, 0, 0, 7, 0x9e, 0x1b]);
        let mut r = Reader::new(Bytes::from(out), "Test");
        assert_eq!(r.socket_addr("addr").unwrap(), addr);
        r.finish().unwrap();

        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        let mut out = Vec::new();
        put_socket_addr(&mut out, &v6);
        assert_eq!(out.len(), 1 + 16 + 2);
        assert_eq!(
            Reader::new(Bytes::from(out), "T").socket_addr("a").unwrap(),
            v6
        );

        let mut r = Reader::new(Bytes::from_static(&[5, 0, 0]), "Test");
        assert!(matches!(
            r.socket_addr("addr"),
            Err(WireError::Invalid { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_counted() {
        let mut r = Reader::new(Bytes::from_static(&[1, 2, 3]), "Ping");
        r.u8("x").unwrap();
        let err = r.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed Ping: 2 unexpected byte(s) after the last field"
        );
    }
}
