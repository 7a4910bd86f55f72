//! A stage's share of a model as a GGUF file of its own: every metadata entry of the model
//! (architecture, tokenizer, chat template — a stage file opens like the model) and only the
//! tensors the stage loads. It is what a node that lacks a model receives over the LAN
//! (issue #15 item 4), and it loads with [`crate::Stage::load`] like the whole file.
//!
//! [`StageFile::plan`] lays the file out without writing it; [`StageFile::read`] produces any
//! of its bytes from the model file, so a sender streams it in chunks and never holds it
//! whole. Its [`StageFile::regions`] — the header, then each tensor with the padding after
//! it — are what the sender hashes and the receiver checks, one by one.

use std::ops::Range;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::stage::{Stage, StageSpec};

/// `"GGUF"` read as a little-endian `u32`.
const GGUF_MAGIC: u32 = 0x4655_4747;
/// The GGUF version written (64-bit lengths and dimensions).
const GGUF_VERSION: u32 = 3;

/// The layout of a stage file.
#[derive(Clone, Debug)]
pub struct StageFile {
    /// The GGUF header: magic, counts, metadata, tensor infos (the padding up to the first
    /// tensor's data is not stored).
    header: Vec<u8>,
    /// The tensors in file order.
    tensors: Vec<PlacedTensor>,
    /// Bytes of the whole file.
    len: u64,
}

/// One tensor of a stage file: where its bytes come from and where they go.
#[derive(Clone, Debug)]
struct PlacedTensor {
    /// Offset of its data in the model file.
    source: u64,
    /// Offset of its data in the stage file.
    offset: u64,
    /// Bytes of its data.
    len: u64,
}

impl StageFile {
    /// Lays out the stage file of `spec`: all of `file`'s metadata (keys in sorted order, so
    /// the same model and stage always give the same bytes) and the tensors
    /// [`Stage::tensor_names`] lists, aligned as the model file aligns its own.
    pub fn plan(file: &GgufFile, spec: &StageSpec) -> Result<StageFile> {
        let names = Stage::tensor_names(file, spec);
        let alignment = file.alignment();
        let metadata = file.metadata();
        let mut keys: Vec<&String> = metadata.keys().collect();
        keys.sort();

        let mut header = Vec::new();
        header.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        header.extend_from_slice(&(names.len() as u64).to_le_bytes());
        header.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        for key in keys {
            put_string(&mut header, key);
            put_value(&mut header, key, &metadata[key], true)?;
        }
        let mut placed = Vec::with_capacity(names.len());
        let mut relative = 0u64;
        for name in &names {
            let info = file
                .tensor_info(name)
                .ok_or_else(|| EngineError::MissingTensor(name.clone()))?;
            let len = file.tensor_bytes(name).unwrap_or(0);
            put_string(&mut header, name);
            let dims = info.shape.dims();
            header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            // GGUF lists dimensions innermost first; candle's shape has rows first.
            for &d in dims.iter().rev() {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&dtype_id(info.ggml_dtype).to_le_bytes());
            header.extend_from_slice(&relative.to_le_bytes());
            placed.push((
                file.data_offset().saturating_add(info.offset),
                relative,
                len,
            ));
            relative = align_up(relative + len, alignment);
        }
        let data_start = align_up(header.len() as u64, alignment);
        let tensors: Vec<PlacedTensor> = placed
            .into_iter()
            .map(|(source, relative, len)| PlacedTensor {
                source,
                offset: data_start + relative,
                len,
            })
            .collect();
        let len = tensors
            .last()
            .map_or(header.len() as u64, |t| t.offset + t.len);
        Ok(StageFile {
            header,
            tensors,
            len,
        })
    }

    /// Bytes of the whole file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (it never is: it has a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file cut into regions that follow each other from byte 0: the header with its
    /// padding, then each tensor's data with the padding after it.
    pub fn regions(&self) -> Vec<Range<u64>> {
        let mut starts: Vec<u64> = vec![0];
        starts.extend(self.tensors.iter().map(|t| t.offset));
        starts.push(self.len);
        starts.dedup();
        starts.windows(2).map(|w| w[0]..w[1]).collect()
    }

    /// Fills `buf` with the file's bytes from `offset`, reading tensor data from `file` (the
    /// model file the layout was planned from); padding is zeros.
    pub fn read(&self, file: &GgufFile, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len {
            return Err(EngineError::InvalidInput(format!(
                "bytes {offset}..{end} are past the end of a {}-byte stage file",
                self.len
            )));
        }
        buf.fill(0);
        // The header.
        copy_overlap(&self.header, 0, offset, buf);
        // The tensors it overlaps (padding stays zero).
        let first = self.tensors.partition_point(|t| t.offset + t.len <= offset);
        for t in &self.tensors[first..] {
            if t.offset >= end {
                break;
            }
            let from = offset.max(t.offset);
            let to = end.min(t.offset + t.len);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            file.read_at(t.source + (from - t.offset), dst)?;
        }
        Ok(())
    }
}

/// Copies the part of `src` (placed at `src_at` in the file) that falls in the window of
/// `buf` (placed at `offset`).
fn copy_overlap(src: &[u8], src_at: u64, offset: u64, buf: &mut [u8]) {
    let src_end = src_at + src.len() as u64;
    let end = offset + buf.len() as u64;
    let (from, to) = (offset.max(src_at), end.min(src_end));
    if from < to {
        buf[(from - offset) as usize..(to - offset) as usize]
            .copy_from_slice(&src[(from - src_at) as usize..(to - src_at) as usize]);
    }
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment.max(1)) * alignment.max(1)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's id of a metadata value's type.
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// Appends a metadata value: its type id first when `typed` (array elements share one type,
/// written once before the array).
fn put_value(out: &mut Vec<u8>, key: &str, v: &Value, typed: bool) -> Result<()> {
    if typed {
        out.extend_from_slice(&value_type_id(v).to_le_bytes());
    }
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array's element type is never read; GGUF writers use u32 too.
            let element = items.first().map_or(4, value_type_id);
            if items.iter().any(|i| value_type_id(i) != element) {
                return Err(EngineError::InvalidInput(format!(
                    "GGUF metadata `{key}`: an array of mixed types"
                )));
            }
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item, false)?;
            }
        }
    }
    Ok(())
}

/// GGUF's id of a tensor type.
fn dtype_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}
