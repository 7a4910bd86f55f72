//! `GetWeights`, `WeightsManifest`, `WeightsWant` and `WeightsChunk`: a node that lacks a
//! model gets just its stage's share of it from a member that has the file (issue #15
//! item 4).
//!
//! The share is a GGUF file of its own, with every metadata entry of the model and only the
//! stage's tensors. The holder first sends a [`WeightsManifest`] that cuts that file into
//! regions (the header, then each tensor with its padding) with the SHA-256 it computed of
//! each; the node answers with the regions it still lacks ([`WeightsWant`]: it may hold
//! some already — from a transfer cut short, or in a stage file of the same model it kept
//! before — and checks those against the same hashes); then the holder sends those
//! regions' bytes in order as [`WeightsChunk`]s. The receiver hashes each region as it
//! arrives and gives up at the first that does not match, so a corrupt or altered tensor is
//! never loaded.

use std::ops::Range;

use bytes::{BufMut, Bytes};

use crate::codec::{bound, put_bool, put_len, put_string, Reader};
use crate::error::WireError;

use super::stage::{check_layers, MAX_MODEL_ID};

/// Most regions a manifest lists (a region per tensor: 14 per layer, a few hundred layers).
pub const MAX_WEIGHT_REGIONS: usize = 16 * 1024;
/// Largest [`WeightsChunk`], in bytes.
pub const MAX_WEIGHTS_CHUNK: usize = 8 << 20;
/// Largest stage file a manifest may announce: 1 TiB.
pub const MAX_STAGE_FILE: u64 = 1 << 40;

/// `GetWeights` (`0x0060`): node → holder, "send me the stage file of layers
/// `[layer_start, layer_end)` of this model". The holder answers the file's
/// [`WeightsManifest`], or an `Error` (`model_unavailable` when it lacks the model or its
/// file has another SHA-256).
///
/// | field | encoding |
/// |---|---|
/// | `model_id` | `u32` length (≤ [`MAX_MODEL_ID`]), UTF-8 |
/// | `model_sha256` | 32 bytes |
/// | `layer_start`, `layer_end` | `u32`, `u32` |
/// | `embed`, `head` | `u8` 0/1 each |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetWeights {
    /// Model id as the holder resolves it (the file name).
    pub model_id: String,
    /// SHA-256 of the whole model file: the holder serves only that very file.
    pub model_sha256: [u8; 32],
    /// First layer of the stage.
    pub layer_start: u32,
    /// One past the last layer of the stage.
    pub layer_end: u32,
    /// The stage embeds tokens (it needs the embedding table).
    pub embed: bool,
    /// The stage applies the final norm and LM head.
    pub head: bool,
}

impl GetWeights {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let msg = GetWeights {
            model_id: r.string("model_id", MAX_MODEL_ID)?,
            model_sha256: r.sha256("model_sha256")?,
            layer_start: r.u32("layer_start")?,
            layer_end: r.u32("layer_end")?,
            embed: r.bool("embed")?,
            head: r.bool("head")?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, &self.model_id);
        out.put_slice(&self.model_sha256);
        out.put_u32_le(self.layer_start);
        out.put_u32_le(self.layer_end);
        put_bool(out, self.embed);
        put_bool(out, self.head);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "GetWeights";
        bound(M, "model_id", self.model_id.len() as u64, MAX_MODEL_ID)?;
        check_layers(M, self.layer_start, self.layer_end)?;
        if self.layer_start == self.layer_end && !self.embed && !self.head {
            return Err(WireError::Invalid {
                message: M,
                what: "layer range",
                detail: "is empty and asks for neither the embedding nor the head".into(),
            });
        }
        Ok(())
    }
}

/// One region of a stage file: its length and the SHA-256 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightsRegion {
    /// Bytes in the region (more than 0).
    pub len: u64,
    /// SHA-256 of those bytes, as the holder computed it from its file.
    pub sha256: [u8; 32],
}

/// `WeightsManifest` (`0x0061`): holder → node, the stage file, cut into regions that
/// follow each other from byte 0; the holder then waits for the node's [`WeightsWant`].
///
/// | field | encoding |
/// |---|---|
/// | `file_len` | `u64` (≤ [`MAX_STAGE_FILE`]) |
/// | `regions` | `u32` count (1 ..= [`MAX_WEIGHT_REGIONS`]), then per region `u64` length (> 0) and 32 bytes SHA-256 |
///
/// The regions' lengths add up to `file_len` exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsManifest {
    /// Bytes of the whole stage file.
    pub file_len: u64,
    /// The file's regions in order.
    pub regions: Vec<WeightsRegion>,
}

impl WeightsManifest {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let file_len = r.u64("file_len")?;
        let count = r.u32("regions")?;
        bound(
            "WeightsManifest",
            "regions",
            u64::from(count),
            MAX_WEIGHT_REGIONS,
        )?;
        // 40 bytes per region must be there before anything is allocated for them.
        r.check(u64::from(count) * 40, "regions")?;
        let mut regions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            regions.push(WeightsRegion {
                len: r.u64("region length")?,
                sha256: r.sha256("region sha256")?,
            });
        }
        let msg = WeightsManifest { file_len, regions };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.file_len);
        put_len(out, self.regions.len());
        for region in &self.regions {
            out.put_u64_le(region.len);
            out.put_slice(&region.sha256);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "WeightsManifest";
        let invalid = |what, detail: String| WireError::Invalid {
            message: M,
            what,
            detail,
        };
        if self.file_len > MAX_STAGE_FILE {
            return Err(invalid(
                "file_len",
                format!(
                    "is {} bytes, over the bound of {MAX_STAGE_FILE}",
                    self.file_len
                ),
            ));
        }
        bound(M, "regions", self.regions.len() as u64, MAX_WEIGHT_REGIONS)?;
        if self.regions.is_empty() {
            return Err(invalid("regions", "are none".into()));
        }
        let mut total: u64 = 0;
        for region in &self.regions {
            if region.len == 0 {
                return Err(invalid("region length", "is 0".into()));
            }
            total = total.saturating_add(region.len);
        }
        if total != self.file_len {
            return Err(invalid(
                "regions",
                format!("add up to {total} bytes, not file_len {}", self.file_len),
            ));
        }
        Ok(())
    }
}

/// `WeightsWant` (`0x0063`, since protocol 13): node → holder, the regions of the
/// manifest to send, as ranges of region indices, in order and not overlapping (none: the
/// node holds them all). The holder sends the bytes of those regions, one after another, as
/// [`WeightsChunk`]s, or an `Error` (`bad_request`) when a range is past its manifest.
///
/// | field | encoding |
/// |---|---|
/// | `regions` | `u32` count (≤ [`MAX_WEIGHT_REGIONS`]), then per range `u32` first, `u32` end (first < end ≤ [`MAX_WEIGHT_REGIONS`], first ≥ the previous end) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsWant {
    /// The regions wanted, by index in the manifest.
    pub regions: Vec<Range<u32>>,
}

impl WeightsWant {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let count = r.u32("regions")?;
        bound(
            "WeightsWant",
            "regions",
            u64::from(count),
            MAX_WEIGHT_REGIONS,
        )?;
        // 8 bytes per range must be there before anything is allocated for them.
        r.check(u64::from(count) * 8, "regions")?;
        let mut regions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            regions.push(r.u32("first region")?..r.u32("region end")?);
        }
        let msg = WeightsWant { regions };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_len(out, self.regions.len());
        for range in &self.regions {
            out.put_u32_le(range.start);
            out.put_u32_le(range.end);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        const M: &str = "WeightsWant";
        bound(M, "regions", self.regions.len() as u64, MAX_WEIGHT_REGIONS)?;
        let mut previous_end = 0;
        for range in &self.regions {
            if range.start >= range.end
                || range.start < previous_end
                || range.end as usize > MAX_WEIGHT_REGIONS
            {
                return Err(WireError::Invalid {
                    message: M,
                    what: "regions",
                    detail: format!(
                        "{range:?} is empty, out of order, overlaps the one before or is past \
                         the last region a manifest may have"
                    ),
                });
            }
            previous_end = range.end;
        }
        Ok(())
    }

    /// How many regions are wanted.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .map(|r| r.end.saturating_sub(r.start) as usize)
            .sum()
    }
}

/// `WeightsChunk` (`0x0062`): holder → node, the next bytes of the regions wanted.
///
/// | field | encoding |
/// |---|---|
/// | `data` | `u32` length (1 ..= [`MAX_WEIGHTS_CHUNK`]), the bytes |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsChunk {
    /// The next bytes of the regions wanted.
    pub data: Bytes,
}

impl WeightsChunk {
    pub(crate) fn parse(r: &mut Reader) -> Result<Self, WireError> {
        let len = r.u32("data")?;
        bound("WeightsChunk", "data", u64::from(len), MAX_WEIGHTS_CHUNK)?;
        let msg = WeightsChunk {
            data: r.bytes(u64::from(len), "data")?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_len(out, self.data.len());
        out.put_slice(&self.data);
    }

    pub(crate) fn validate(&self) -> Result<(), WireError> {
        bound(
            "WeightsChunk",
            "data",
            self.data.len() as u64,
            MAX_WEIGHTS_CHUNK,
        )?;
        if self.data.is_empty() {
            return Err(WireError::Invalid {
                message: "WeightsChunk",
                what: "data",
                detail: "is empty".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::frame::{decode_frame, Limits};
    use crate::message::*;

    fn round_trip(msg: Message) {
        let frame = msg.to_frame().unwrap();
        assert_eq!(
            decode_frame(&frame, &Limits::default()).unwrap().unwrap().0,
            msg
        );
    }

    fn get() -> GetWeights {
        GetWeights {
            model_id: "m.gguf".into(),
            model_sha256: [7; 32],
            layer_start: 3,
            layer_end: 9,
            embed: false,
            head: true,
        }
    }

    #[test]
    fn get_weights_frame_bytes() {
        let frame = Message::GetWeights(get()).to_frame().unwrap();
        let mut expected = vec![b'S', b'H', b'O', b'L', 13, 0, 0x60, 0, 52, 0, 0, 0];
        expected.extend_from_slice(&[6, 0, 0, 0]);
        expected.extend_from_slice(b"m.gguf");
        expected.extend_from_slice(&[7; 32]);
        expected.extend_from_slice(&[3, 0, 0, 0, 9, 0, 0, 0, 0, 1]);
        assert_eq!(frame, expected);
        round_trip(Message::GetWeights(get()));
        let nothing = GetWeights {
            layer_start: 9,
            head: false,
            ..get()
        };
        assert!(Message::GetWeights(nothing).to_frame().is_err());
    }

    #[test]
    // Lists of one range, and a range backwards, are the point here.
    #[allow(clippy::single_range_in_vec_init, clippy::reversed_empty_ranges)]
    fn wanted_regions_are_in_order_apart_and_bounded() {
        let want = WeightsWant {
            regions: vec![0..1, 3..7],
        };
        let frame = Message::WeightsWant(want.clone()).to_frame().unwrap();
        let mut expected = vec![b'S', b'H', b'O', b'L', 13, 0, 0x63, 0, 20, 0, 0, 0];
        expected.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        expected.extend_from_slice(&[3, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(frame, expected);
        assert_eq!(want.count(), 5);
        round_trip(Message::WeightsWant(want));
        round_trip(Message::WeightsWant(WeightsWant { regions: vec![] }));
        let end = MAX_WEIGHT_REGIONS as u32;
        round_trip(Message::WeightsWant(WeightsWant {
            regions: vec![0..2, 2..end],
        }));
        for bad in [
            vec![2..2],
            vec![3..2],
            vec![0..4, 3..5],
            vec![4..5, 0..1],
            vec![0..end + 1],
        ] {
            let want = WeightsWant { regions: bad };
            assert!(Message::WeightsWant(want).to_frame().is_err());
        }
        // A count that promises more ranges than the payload holds is refused before any
        // allocation.
        let mut frame = Message::WeightsWant(WeightsWant {
            regions: vec![0..1],
        })
        .to_frame()
        .unwrap();
        frame[12..16].copy_from_slice(&(16u32 * 1024).to_le_bytes());
        assert!(decode_frame(&frame, &Limits::default()).is_err());
    }

    #[test]
    fn a_manifest_must_add_up_to_its_file() {
        let region = |len| WeightsRegion {
            len,
            sha256: [len as u8; 32],
        };
        let ok = WeightsManifest {
            file_len: 30,
            regions: vec![region(10), region(20)],
        };
        round_trip(Message::WeightsManifest(ok.clone()));
        for bad in [
            WeightsManifest {
                file_len: 31,
                ..ok.clone()
            },
            WeightsManifest {
                file_len: 0,
                regions: vec![],
            },
            WeightsManifest {
                file_len: 10,
                regions: vec![region(10), region(0)],
            },
            WeightsManifest {
                file_len: u64::MAX,
                regions: vec![region(u64::MAX)],
            },
        ] {
            assert!(Message::WeightsManifest(bad).to_frame().is_err());
        }
        // A count that promises more regions than the payload holds is refused before any
        // allocation.
        let mut frame = Message::WeightsManifest(ok).to_frame().unwrap();
        frame[20..24].copy_from_slice(&(16u32 * 1024).to_le_bytes());
        assert!(decode_frame(&frame, &Limits::default()).is_err());
    }

    #[test]
    fn chunks_are_bounded_and_not_empty() {
        round_trip(Message::WeightsChunk(WeightsChunk {
            data: bytes::Bytes::from_static(b"abc"),
        }));
        let empty = WeightsChunk {
            data: bytes::Bytes::new(),
        };
        assert!(Message::WeightsChunk(empty).to_frame().is_err());
        let huge = WeightsChunk {
            data: bytes::Bytes::from(vec![0; MAX_WEIGHTS_CHUNK + 1]),
        };
        assert!(Message::WeightsChunk(huge).to_frame().is_err());
    }
}
