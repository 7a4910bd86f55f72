//! Activations on the wire: a `rows × cols` matrix of `f32` in memory, f16 (default), bf16 or
//! f32 on the wire.
//!
//! Halving the bytes per hop is the point of f16: a decode step of a 2048-wide model sends
//! 4 KiB instead of 8 KiB, and a 512-token prefill chunk 2 MiB instead of 4 MiB. Conversion
//! rounds to nearest, ties to even (the `half` crate, which uses F16C/NEON where the CPU has
//! them). Values outside f16's range become ±inf; bf16 keeps f32's range at lower precision.
//!
//! On the wire: `rows: u32`, `cols: u32`, `dtype: u8`, then `rows * cols` little-endian
//! elements. There is no separate byte length: the shape *is* the length, so it cannot disagree
//! with it, and it is checked against the bytes left in the payload before anything is copied.

use bytes::{BufMut, Bytes};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::codec::Reader;
use crate::error::WireError;

/// Most rows in one matrix (tokens in a prefill chunk or verify batch).
pub const MAX_ROWS: u32 = 1 << 20;
/// Most columns in one matrix (hidden size, or vocabulary size for logits).
pub const MAX_COLS: u32 = 1 << 20;

/// How activation elements are encoded on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision: 2 bytes, the default.
    #[default]
    F16,
    /// bfloat16: 2 bytes, f32's exponent range.
    BF16,
    /// f32 as is: 4 bytes, exact.
    F32,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// The tag byte on the wire.
    pub const fn to_u8(self) -> u8 {
        match self {
            DType::F16 => 0,
            DType::BF16 => 1,
            DType::F32 => 2,
        }
    }

    /// The dtype for a tag byte, if there is one.
    pub const fn from_u8(tag: u8) -> Option<DType> {
        match tag {
            0 => Some(DType::F16),
            1 => Some(DType::BF16),
            2 => Some(DType::F32),
            _ => None,
        }
    }

    /// Lower-case name, as in configuration files.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }

    pub(crate) fn parse(r: &mut Reader, what: &'static str) -> Result<DType, WireError> {
        let tag = r.u8(what)?;
        DType::from_u8(tag).ok_or_else(|| {
            r.invalid(
                what,
                format!("is {tag}, expected 0 (f16), 1 (bf16) or 2 (f32)"),
            )
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements converted per chunk: small enough for the stack, large enough for SIMD.
const CHUNK: usize = 256;

/// Encodes `values` as little-endian `dtype` elements.
pub fn encode_activations(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    encode_into(values, dtype, &mut out);
    out
}

fn encode_into(values: &[f32], dtype: DType, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => {
            for v in values {
                out.put_f32_le(*v);
            }
        }
        DType::F16 => encode_halves::<f16>(values, out),
        DType::BF16 => encode_halves::<bf16>(values, out),
    }
}

/// The two 16-bit float formats, so that one body converts either (a chunk at a time, which
/// lets `half` use F16C/NEON).
trait Half: Copy {
    const ZERO: Self;
    fn to_le(self) -> [u8; 2];
    fn from_le(bytes: [u8; 2]) -> Self;
}

impl Half for f16 {
    const ZERO: Self = f16::ZERO;
    fn to_le(self) -> [u8; 2] {
        self.to_le_bytes()
    }
    fn from_le(bytes: [u8; 2]) -> Self {
        f16::from_le_bytes(bytes)
    }
}

impl Half for bf16 {
    const ZERO: Self = bf16::ZERO;
    fn to_le(self) -> [u8; 2] {
        self.to_le_bytes()
    }
    fn from_le(bytes: [u8; 2]) -> Self {
        bf16::from_le_bytes(bytes)
    }
}

fn encode_halves<H: Half>(values: &[f32], out: &mut Vec<u8>)
where
    [H]: HalfFloatSliceExt,
{
    let mut tmp = [H::ZERO; CHUNK];
    for chunk in values.chunks(CHUNK) {
        let tmp = &mut tmp[..chunk.len()];
        tmp.convert_from_f32_slice(chunk);
        for h in tmp.iter() {
            out.put_slice(&h.to_le());
        }
    }
}

fn decode_halves<H: Half>(bytes: &[u8], out: &mut Vec<f32>)
where
    [H]: HalfFloatSliceExt,
{
    let mut tmp = [H::ZERO; CHUNK];
    let mut wide = [0f32; CHUNK];
    for chunk in bytes.chunks(CHUNK * 2) {
        let n = chunk.len() / 2;
        for (h, c) in tmp.iter_mut().zip(chunk.chunks_exact(2)) {
            *h = H::from_le([c[0], c[1]]);
        }
        tmp[..n].convert_to_f32_slice(&mut wide[..n]);
        out.extend_from_slice(&wide[..n]);
    }
}

/// Decodes little-endian `dtype` elements back to `f32`. Errors when `bytes` is not a whole
/// number of elements.
pub fn decode_activations(bytes: &[u8], dtype: DType) -> Result<Vec<f32>, WireError> {
    if !bytes.len().is_multiple_of(dtype.size()) {
        return Err(WireError::Invalid {
            message: "activations",
            what: "data",
            detail: format!(
                "is {} bytes, not a whole number of {}-byte {dtype} elements",
                bytes.len(),
                dtype.size()
            ),
        });
    }
    let mut out = Vec::with_capacity(bytes.len() / dtype.size());
    decode_into(bytes, dtype, &mut out);
    Ok(out)
}

fn decode_into(bytes: &[u8], dtype: DType, out: &mut Vec<f32>) {
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::F16 => decode_halves::<f16>(bytes, out),
        DType::BF16 => decode_halves::<bf16>(bytes, out),
    }
}

/// A `rows × cols` row-major matrix, held as its wire encoding.
///
/// Holding the encoded bytes (shared with the receive buffer, no copy) rather than `f32`s means
/// a frame is parsed without converting anything and a stage converts exactly once, with
/// [`Activations::to_f32`]. The shape and the byte count always agree: both constructors check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activations {
    rows: u32,
    cols: u32,
    dtype: DType,
    data: Bytes,
}

impl Activations {
    /// Encodes `values` (row-major, `rows * cols` of them) as `dtype`.
    pub fn from_f32(rows: u32, cols: u32, values: &[f32], dtype: DType) -> Result<Self, WireError> {
        let elements = check_shape("activations", rows, cols)?;
        if values.len() as u64 != elements {
            return Err(WireError::Invalid {
                message: "activations",
                what: "values",
                detail: format!(
                    "has {} elements but the shape {rows}×{cols} needs {elements}",
                    values.len()
                ),
            });
        }
        Ok(Activations {
            rows,
            cols,
            dtype,
            data: Bytes::from(encode_activations(values, dtype)),
        })
    }

    /// Wraps bytes already encoded as `dtype`; errors unless there are exactly
    /// `rows * cols * dtype.size()` of them.
    pub fn from_encoded(
        rows: u32,
        cols: u32,
        dtype: DType,
        data: Bytes,
    ) -> Result<Self, WireError> {
        let elements = check_shape("activations", rows, cols)?;
        let expected = elements * dtype.size() as u64;
        if data.len() as u64 != expected {
            return Err(WireError::Invalid {
                message: "activations",
                what: "data",
                detail: format!(
                    "is {} bytes but a {rows}×{cols} {dtype} matrix is {expected}",
                    data.len()
                ),
            });
        }
        Ok(Activations {
            rows,
            cols,
            dtype,
            data,
        })
    }

    /// Rows (tokens).
    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// Columns (hidden size or vocabulary).
    pub fn cols(&self) -> u32 {
        self.cols
    }

    /// The encoding of [`Activations::data`].
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The encoded elements, little-endian, row-major.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Decodes to `f32`, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.data.len() / self.dtype.size());
        decode_into(&self.data, self.dtype, &mut out);
        out
    }

    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let rows = r.u32("activation rows")?;
        let cols = r.u32("activation cols")?;
        let dtype = DType::parse(r, "activation dtype")?;
        let elements = check_shape(r.message(), rows, cols)?;
        // Checked against the bytes left before anything is taken: a shape that lies fails here.
        let data = r.bytes(elements * dtype.size() as u64, "activation data")?;
        Ok(Activations {
            rows,
            cols,
            dtype,
            data,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32_le(self.rows);
        out.put_u32_le(self.cols);
        out.put_u8(self.dtype.to_u8());
        out.put_slice(&self.data);
    }
}

/// Checks both dimensions against their bounds; returns `rows * cols`.
fn check_shape(message: &'static str, rows: u32, cols: u32) -> Result<u64, WireError> {
    crate::codec::bound(
        message,
        "activation rows",
        u64::from(rows),
        MAX_ROWS as usize,
    )?;
    crate::codec::bound(
        message,
        "activation cols",
        u64::from(cols),
        MAX_COLS as usize,
    )?;
    // Both ≤ 2^20, so the product fits easily in u64.
    Ok(u64::from(rows) * u64::from(cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_bytes_are_little_endian() {
        // 1.0 = 0x3C00, -2.0 = 0xC000, 65504 (f16::MAX) = 0x7BFF.
        assert_eq!(
            encode_activations(&[1.0, -2.0, 65504.0], DType::F16),
            [0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B]
        );
    }

    #[test]
    fn bf16_and_f32_bytes() {
        // bf16 1.0 = 0x3F80; f32 1.0 = 0x3F800000.
        assert_eq!(encode_activations(&[1.0], DType::BF16), [0x80, 0x3F]);
        assert_eq!(encode_activations(&[1.0], DType::F32), [0, 0, 0x80, 0x3F]);
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        let ulp = 2f32.powi(-10); // f16 spacing just above 1.0
        let got = |x: f32| {
            decode_activations(&encode_activations(&[x], DType::F16), DType::F16).unwrap()[0]
        };
        // Halfway between 1.0 and 1.0+ulp: ties go to the even one, 1.0.
        assert_eq!(got(1.0 + ulp / 2.0), 1.0);
        // Halfway between 1.0+ulp and 1.0+2ulp: ties to even, 1.0+2ulp.
        assert_eq!(got(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp);
        // Just above halfway rounds up, just below rounds down.
        assert_eq!(got(1.0 + 0.75 * ulp), 1.0 + ulp);
        assert_eq!(got(1.0 + 0.25 * ulp), 1.0);
        // Beyond the range: infinity, not garbage.
        assert_eq!(got(1e6), f32::INFINITY);
    }

    #[test]
    fn round_trips_within_precision() {
        let values: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 8.0).collect();
        let exact =
            decode_activations(&encode_activations(&values, DType::F32), DType::F32).unwrap();
        assert_eq!(exact, values);
        for (dtype, rel) in [(DType::F16, 1.0 / 2048.0), (DType::BF16, 1.0 / 256.0)] {
            let back = decode_activations(&encode_activations(&values, dtype), dtype).unwrap();
            assert_eq!(back.len(), values.len());
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * rel + 1e-6, "{dtype}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn odd_byte_counts_are_rejected() {
        assert!(decode_activations(&[0, 0, 0], DType::F16).is_err());
        assert!(decode_activations(&[0, 0, 0, 0, 0], DType::F32).is_err());
    }

    #[test]
    fn shapes_are_checked() {
        assert!(Activations::from_f32(2, 3, &[0.0; 6], DType::F16).is_ok());
        assert!(Activations::from_f32(2, 3, &[0.0; 5], DType::F16).is_err());
        assert!(Activations::from_f32(MAX_ROWS + 1, 0, &[], DType::F16).is_err());
        assert!(Activations::from_encoded(1, 2, DType::F32, Bytes::from_static(&[0; 4])).is_err());
        let a = Activations::from_encoded(1, 2, DType::F32, Bytes::from_static(&[0; 8])).unwrap();
        assert_eq!(a.to_f32(), [0.0, 0.0]);
    }

    #[test]
    fn lying_shape_fails_before_copying() {
        // 2^20 × 2^20 f32 claimed, 3 bytes present.
        let mut buf = Vec::new();
        buf.put_u32_le(MAX_ROWS);
        buf.put_u32_le(MAX_COLS);
        buf.put_u8(2);
        buf.put_slice(&[1, 2, 3]);
        let mut r = Reader::new(Bytes::from(buf), "Forward");
        let err = Activations::parse(&mut r).unwrap_err();
        assert!(
            matches!(err, WireError::Truncated { needed, remaining: 3, .. } if needed == 1 << 42),
            "{err}"
        );
    }
}
