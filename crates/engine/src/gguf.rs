//! A GGUF file opened for reading: metadata now, tensors on demand.
//!
//! A stage reads only the tensors it needs, by offset, so its memory is about its share
//! of the weights rather than the whole file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
    config: ModelConfig,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| EngineError::Open {
            path: path.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|source| EngineError::Gguf {
            path: path.clone(),
            source,
        })?;
        let config = ModelConfig::from_metadata(&content.metadata)?;
        Ok(Self {
            path,
            content,
            reader: Mutex::new(reader),
            config,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The model's parameter count: the values of every tensor in the file (an output
    /// matrix tied to the embedding counts once where the file stores it once, twice where
    /// it stores a copy, as Qwen2.5 files do).
    pub fn parameter_count(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|info| info.shape.elem_count() as u64)
            .sum()
    }

    /// Size in bytes of a tensor's data in the file (for progress and memory estimates).
    pub fn tensor_bytes(&self, name: &str) -> Option<u64> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| data_len(info) as u64)
    }

    /// A tensor's GGUF type, if the file has it.
    pub(crate) fn tensor_dtype(&self, name: &str) -> Option<GgmlDType> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.ggml_dtype)
    }

    /// How many dimensions a tensor has, if the file has it.
    pub(crate) fn tensor_rank(&self, name: &str) -> Option<usize> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.rank())
    }

    /// A tensor's type, shape (candle's order: rows first) and raw GGUF bytes, read by
    /// offset straight into one buffer (no typed copy on the way, so loading a large
    /// matrix does not hold it twice).
    pub(crate) fn tensor_raw(&self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count();
        if elems % dtype.block_size() != 0 {
            return Err(EngineError::InvalidInput(format!(
                "tensor {name}: {elems} values are not whole {dtype:?} blocks"
            )));
        }
        let len = data_len(info);
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let mut bytes = vec![0u8; len];
        self.read_at(start, &mut bytes)?;
        Ok((dtype, info.shape.dims().to_vec(), bytes))
    }

    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::MissingTensor(name.to_string()));
        }
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| EngineError::InvalidInput("GGUF reader lock poisoned".into()))?;
        Ok(self.content.tensor(&mut *reader, name, device)?)
    }

    /// A tensor's type, shape and offset in the data section, if the file has it.
    pub(crate) fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.content.tensor_infos.get(name)
    }

    /// Where the tensors' data section begins in the file.
    pub(crate) fn data_offset(&self) -> u64 {
        self.content.tensor_data_offset
    }

    /// The alignment of tensor data (`general.alignment`, else GGUF's 32), read as candle
    /// reads it.
    pub(crate) fn alignment(&self) -> u64 {
        match self.content.metadata.get("general.alignment") {
            Some(Value::U8(v)) => u64::from(*v),
            Some(Value::U16(v)) => u64::from(*v),
            Some(Value::U32(v)) => u64::from(*v),
            Some(Value::I8(v)) if *v > 0 => *v as u64,
            Some(Value::I16(v)) if *v > 0 => *v as u64,
            Some(Value::I32(v)) if *v > 0 => *v as u64,
            _ => 32,
        }
        .max(1)
    }

    /// Reads `buf.len()` bytes of the file from `offset`.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| EngineError::InvalidInput("GGUF reader lock poisoned".into()))?;
        let read = |source| EngineError::Open {
            path: self.path.clone(),
            source,
        };
        reader.seek(SeekFrom::Start(offset)).map_err(read)?;
        reader.read_exact(buf).map_err(read)
    }

    /// A human-readable model name: `general.name`, else the file stem.
    pub fn model_name(&self) -> String {
        match self.content.metadata.get("general.name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => self
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".to_string()),
        }
    }
}

/// Bytes of a tensor's data: whole blocks of its type.
fn data_len(info: &TensorInfo) -> usize {
    let dtype = info.ggml_dtype;
    info.shape.elem_count() / dtype.block_size() * dtype.type_size()
}
