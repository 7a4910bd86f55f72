//! Byte-level BPE tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! The goal is to give exactly the token ids llama.cpp gives for the same GGUF and text, so this
//! module follows `src/llama-vocab.cpp` and `src/unicode.cpp` of llama.cpp closely:
//!
//! * special tokens (control, user-defined, unknown) are cut out of the text first, longest text
//!   first (`tokenizer_st_partition`); control and unknown ones only when `parse_special` is set;
//! * each remaining piece of text is pre-tokenized with the regex of `tokenizer.ggml.pre`
//!   (hand-written splitters, equal to llama.cpp's own custom splitters and to the regexes it runs);
//! * each pre-token is byte-encoded (GPT-2 `bytes_to_unicode`) and merged with the BPE ranks,
//!   lowest rank first, leftmost first on ties;
//! * decoding maps the byte-level characters back to bytes; control tokens are kept or dropped.
//!
//! Only the `gpt2` tokenizer model (byte-level BPE) is implemented; SentencePiece (`llama`) and
//! the others give [`TokenizerError::UnsupportedModel`].
//!
//! Here: the tokenizer and its public API (its `tokenizer.ggml.*` keys read by the crate's
//! `metadata` module); `special.rs`: special token ids and their detection; `pretokenize.rs`: the
//! pre-tokenizers; `bpe.rs`: byte-level BPE merging; `decode.rs`: streaming detokenization.

mod bpe;
mod decode;
mod pretokenize;
mod special;

pub use decode::DecodeStream;

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::Value;

use crate::metadata::{
    array_str, get_array, get_bool, get_int, get_str, type_name, value_as_i64, WrongType,
};
use bpe::{Fragment, PairMap, Scratch};
use pretokenize::{pre_type_of, CharClasses, PreType};
use special::{detect_special_tokens, SpecialIds};

/// Errors from building a tokenizer or from encoding/decoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key the tokenizer cannot do without is absent.
    #[error(
        "GGUF metadata has no `{0}` key, so the file carries no usable tokenizer; \
         re-convert the model with llama.cpp's convert_hf_to_gguf.py"
    )]
    MissingKey(&'static str),
    /// A metadata key holds a value of an unexpected type.
    #[error("GGUF metadata key `{key}` should hold {expected}, but holds {found}")]
    WrongType {
        /// The key.
        key: String,
        /// What was expected.
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// `tokenizer.ggml.model` is not one we implement.
    #[error(
        "tokenizer model `{0}` is not supported: only byte-level BPE (`gpt2`) tokenizers are \
         implemented so far"
    )]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` is not one we implement.
    #[error(
        "pre-tokenizer `{0}` is not supported; supported are `smollm`, `qwen2`, `llama-bpe` and \
         the names llama.cpp treats as the same (e.g. `starcoder`, `gpt-2`, `deepseek-r1-qwen`, \
         `llama3`)"
    )]
    UnsupportedPre(String),
    /// The vocabulary in the metadata is inconsistent.
    #[error("the GGUF tokenizer vocabulary is inconsistent: {0}")]
    BadVocab(String),
    /// A token id outside the vocabulary was given to decode.
    #[error("token id {id} is out of range for a vocabulary of {vocab_size} tokens")]
    InvalidTokenId {
        /// The id.
        id: u32,
        /// The number of tokens in the vocabulary.
        vocab_size: usize,
    },
}

impl From<WrongType> for TokenizerError {
    fn from(w: WrongType) -> Self {
        TokenizerError::WrongType {
            key: w.key,
            expected: w.expected,
            found: w.found,
        }
    }
}

// Token attributes, as llama.cpp's `llama_token_attr`.
const ATTR_UNKNOWN: u16 = 1 << 0;
const ATTR_UNUSED: u16 = 1 << 1;
const ATTR_NORMAL: u16 = 1 << 2;
const ATTR_CONTROL: u16 = 1 << 3;
const ATTR_USER_DEFINED: u16 = 1 << 4;
const ATTR_BYTE: u16 = 1 << 5;

/// Symbol id for a byte-level character that is neither in the vocabulary nor in any merge.
const NO_SYM: u32 = u32::MAX;

/// GPT-2's `bytes_to_unicode`: the code point that stands for each byte.
fn byte_to_cpt_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut assigned = [false; 256];
    for b in (0x21..=0x7Eu32).chain(0xA1..=0xAC).chain(0xAE..=0xFF) {
        table[b as usize] = char::from_u32(b).unwrap_or('\0');
        assigned[b as usize] = true;
    }
    let mut n = 0u32;
    for b in 0..256usize {
        if !assigned[b] {
            table[b] = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
        }
    }
    table
}

/// A model's fill-in-the-middle tokens (as llama.cpp finds them: by metadata, else by their
/// text), for code completion between a prefix and a suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FimIds {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
    /// The repository-name token of repo-level prompts (Qwen2.5-Coder's `<|repo_name|>`).
    pub repo: Option<u32>,
    /// The file separator of repo-level prompts (`<|file_sep|>`).
    pub file_sep: Option<u32>,
}

#[derive(Debug)]
struct Inner {
    tokens: Vec<String>,
    attrs: Vec<u16>,
    token_to_id: HashMap<String, u32>,
    /// (left symbol, right symbol) -> (rank, merged symbol). Symbols below the vocabulary size
    /// are token ids; above are merge results that are not tokens.
    merges: PairMap,
    /// Initial symbol of each byte (its byte-level character), or `NO_SYM`.
    byte_sym: [u32; 256],
    /// The byte-level character of each byte, UTF-8 encoded.
    byte_enc: Vec<String>,
    /// Byte-level code point (< 324) -> byte, or -1.
    cpt_byte: Vec<i16>,
    /// Token id of each one-byte ASCII string, for llama.cpp's per-byte fallback.
    ascii_token: [Option<u32>; 128],
    pre: PreType,
    ignore_merges: bool,
    classes: CharClasses,
    /// Special tokens cut out before pre-tokenization, longest text first.
    special_cache: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    eog: Vec<u32>,
    /// The fill-in-the-middle tokens, when the model has the three that a prompt needs.
    fim: Option<FimIds>,
    /// Each token's bytes (empty for control tokens), built the first time a constrained
    /// answer needs them.
    pieces: OnceLock<Arc<Vec<Vec<u8>>>>,
}

/// A byte-level BPE tokenizer matching llama.cpp for the same GGUF metadata.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata (`candle_core::quantized::gguf_file::Content::metadata`).
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let model = get_str(md, "tokenizer.ggml.model")?
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre_name = get_str(md, "tokenizer.ggml.pre")?.unwrap_or("");
        let (pre, ignore_merges, add_bos_default) = pre_type_of(pre_name)
            .ok_or_else(|| TokenizerError::UnsupportedPre(pre_name.to_string()))?;

        // Vocabulary.
        let token_values = get_array(md, "tokenizer.ggml.tokens")?
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?;
        let n_tokens = token_values.len();
        if n_tokens == 0 || n_tokens >= (u32::MAX / 2) as usize {
            return Err(TokenizerError::BadVocab(format!(
                "`tokenizer.ggml.tokens` holds {n_tokens} tokens"
            )));
        }
        let mut tokens = Vec::with_capacity(n_tokens);
        let mut token_to_id: HashMap<String, u32> = HashMap::with_capacity(n_tokens);
        for (i, v) in token_values.iter().enumerate() {
            let mut word = array_str("tokenizer.ggml.tokens", v)?.to_string();
            if word.is_empty() {
                word = format!("[EMPTY_{i}]");
            }
            match token_to_id.entry(word.clone()) {
                Entry::Occupied(e) => {
                    return Err(TokenizerError::BadVocab(format!(
                        "duplicate token {:?} has ids {} and {i}",
                        e.key(),
                        e.get()
                    )));
                }
                Entry::Vacant(e) => {
                    e.insert(i as u32);
                }
            }
            tokens.push(word);
        }

        let mut attrs = vec![ATTR_NORMAL; n_tokens];
        if let Some(types) = get_array(md, "tokenizer.ggml.token_type")? {
            if types.len() < n_tokens {
                return Err(TokenizerError::BadVocab(format!(
                    "`tokenizer.ggml.token_type` has {} entries for {n_tokens} tokens",
                    types.len()
                )));
            }
            for (attr, t) in attrs.iter_mut().zip(types) {
                let t = value_as_i64(t).ok_or_else(|| TokenizerError::WrongType {
                    key: "tokenizer.ggml.token_type".to_string(),
                    expected: "an array of integers",
                    found: format!("an array holding {}", type_name(t)),
                })?;
                *attr = match t {
                    1 => ATTR_NORMAL,
                    2 => ATTR_UNKNOWN,
                    3 => ATTR_CONTROL,
                    4 => ATTR_USER_DEFINED,
                    5 => ATTR_UNUSED,
                    6 => ATTR_BYTE,
                    _ => 0,
                };
            }
        }

        // Byte-level tables.
        let byte_cpt = byte_to_cpt_table();
        let byte_enc: Vec<String> = byte_cpt.iter().map(|c| c.to_string()).collect();
        let mut cpt_byte = vec![-1i16; 324];
        for (b, c) in byte_cpt.iter().enumerate() {
            if let Some(slot) = cpt_byte.get_mut(*c as usize) {
                *slot = b as i16;
            }
        }
        let mut ascii_token = [None; 128];
        for (b, slot) in ascii_token.iter_mut().enumerate() {
            let s = (b as u8 as char).to_string();
            *slot = token_to_id.get(&s).copied();
        }

        // Merges, as symbol-id pairs. Strings that are not tokens get ids past the vocabulary.
        let merge_values = get_array(md, "tokenizer.ggml.merges")?
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.merges"))?;
        let mut extra: HashMap<String, u32> = HashMap::new();
        let sym_of = |s: &str, extra: &mut HashMap<String, u32>| -> u32 {
            if let Some(&id) = token_to_id.get(s) {
                return id;
            }
            let next = (n_tokens + extra.len()) as u32;
            *extra.entry(s.to_string()).or_insert(next)
        };
        let mut merges: PairMap =
            HashMap::with_capacity_and_hasher(merge_values.len(), BuildHasherDefault::default());
        let mut joined = String::new();
        for (rank, v) in merge_values.iter().enumerate() {
            let m = array_str("tokenizer.ggml.merges", v)?;
            // llama.cpp splits at the first space after the first byte.
            let Some(pos) = m
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1)
            else {
                continue;
            };
            let (left, right) = (&m[..pos], &m[pos + 1..]);
            if left.is_empty() || right.is_empty() {
                continue;
            }
            let l = sym_of(left, &mut extra);
            let r = sym_of(right, &mut extra);
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            let j = sym_of(&joined, &mut extra);
            merges.entry((l, r)).or_insert((rank as u32, j));
        }
        let mut byte_sym = [NO_SYM; 256];
        for (b, slot) in byte_sym.iter_mut().enumerate() {
            let s = &byte_enc[b];
            *slot = token_to_id
                .get(s)
                .or_else(|| extra.get(s))
                .copied()
                .unwrap_or(NO_SYM);
        }

        // Special token ids: llama.cpp's defaults for gpt2 are bos = eos = 11.
        let in_range =
            |id: i64| -> Option<u32> { (0..n_tokens as i64).contains(&id).then_some(id as u32) };
        let read_id = |key: &str, default: Option<u32>| -> Result<Option<u32>, TokenizerError> {
            let default = default.filter(|&d| (d as usize) < n_tokens);
            Ok(match get_int(md, key)? {
                Some(id) => in_range(id).or(default),
                None => default,
            })
        };
        let mut sp = SpecialIds {
            bos: read_id("tokenizer.ggml.bos_token_id", Some(11))?,
            eos: read_id("tokenizer.ggml.eos_token_id", Some(11))?,
            eot: read_id("tokenizer.ggml.eot_token_id", None)?,
            eom: read_id("tokenizer.ggml.eom_token_id", None)?,
            pad: read_id("tokenizer.ggml.padding_token_id", None)?,
            fim_pre: read_id("tokenizer.ggml.fim_pre_token_id", None)?,
            fim_suf: read_id("tokenizer.ggml.fim_suf_token_id", None)?,
            fim_mid: read_id("tokenizer.ggml.fim_mid_token_id", None)?,
            fim_pad: read_id("tokenizer.ggml.fim_pad_token_id", None)?,
            fim_rep: read_id("tokenizer.ggml.fim_rep_token_id", None)?,
            fim_sep: read_id("tokenizer.ggml.fim_sep_token_id", None)?,
        };
        sp.fim_pre = sp
            .fim_pre
            .or(read_id("tokenizer.ggml.prefix_token_id", None)?);
        sp.fim_suf = sp
            .fim_suf
            .or(read_id("tokenizer.ggml.suffix_token_id", None)?);
        sp.fim_mid = sp
            .fim_mid
            .or(read_id("tokenizer.ggml.middle_token_id", None)?);
        let add_bos = get_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
        if add_bos && sp.bos.is_none() {
            return Err(TokenizerError::BadVocab(
                "tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set"
                    .to_string(),
            ));
        }

        let eog = detect_special_tokens(&tokens, &mut attrs, &mut sp);

        let mut special_cache: Vec<u32> = (0..n_tokens as u32)
            .filter(|&id| {
                attrs[id as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        special_cache.sort_by_key(|&id| Reverse(tokens[id as usize].len()));

        Ok(Self {
            inner: Arc::new(Inner {
                tokens,
                attrs,
                token_to_id,
                merges,
                byte_sym,
                byte_enc,
                cpt_byte,
                ascii_token,
                pre,
                ignore_merges,
                classes: CharClasses::new()?,
                special_cache,
                bos: sp.bos,
                eos: sp.eos,
                pad: sp.pad,
                add_bos,
                eog,
                fim: match (sp.fim_pre, sp.fim_suf, sp.fim_mid) {
                    (Some(prefix), Some(suffix), Some(middle)) => Some(FimIds {
                        prefix,
                        suffix,
                        middle,
                        repo: sp.fim_rep,
                        file_sep: sp.fim_sep,
                    }),
                    _ => None,
                },
                pieces: OnceLock::new(),
            }),
        })
    }

    /// Encodes text. With `parse_special`, the text of control tokens (e.g. `<|im_start|>`)
    /// becomes their id, as llama.cpp's `parse_special = true`; without, it is tokenized as
    /// plain text (user-defined tokens are always recognized, as in llama.cpp). Never adds BOS.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let inner = &*self.inner;
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        if text.is_empty() {
            return Ok(out);
        }
        let fragments = inner.partition_special(text, parse_special);
        let mut scratch = Scratch::default();
        for frag in fragments {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(start, end) => {
                    inner.encode_text(&text[start..end], &mut out, &mut scratch)
                }
            }
        }
        Ok(out)
    }

    /// Decodes ids to text. With `skip_special`, control (and unknown) tokens are dropped;
    /// without, their text is kept. Bytes that do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.inner.piece(id, !skip_special, &mut bytes)?;
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The bytes one token stands for (its "piece"), as llama.cpp's `token_to_piece`.
    pub fn token_bytes(&self, id: u32, skip_special: bool) -> Result<Vec<u8>, TokenizerError> {
        let mut bytes = Vec::new();
        self.inner.piece(id, !skip_special, &mut bytes)?;
        Ok(bytes)
    }

    /// [`Tokenizer::token_bytes`] into `out` (cleared first), for callers that read a
    /// token at a time and keep their buffer.
    pub(crate) fn token_bytes_into(
        &self,
        id: u32,
        skip_special: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TokenizerError> {
        out.clear();
        self.inner.piece(id, !skip_special, out)
    }

    /// Every token's bytes, by id; empty for control tokens (`<|im_end|>` and the like),
    /// which constrained answers never draw as text. Built once per tokenizer.
    pub(crate) fn pieces(&self) -> Arc<Vec<Vec<u8>>> {
        Arc::clone(self.inner.pieces.get_or_init(|| {
            Arc::new(
                (0..self.vocab_size() as u32)
                    .map(|id| self.token_bytes(id, true).unwrap_or_default())
                    .collect(),
            )
        }))
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokens.len()
    }

    /// The BOS token id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos
    }

    /// The EOS token id, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.inner.eos
    }

    /// The padding token id, if the model has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.inner.pad
    }

    /// Whether a BOS token should be prepended to a prompt (`tokenizer.ggml.add_bos_token`;
    /// when absent, llama.cpp's default for the pre-tokenizer: true for llama-bpe, else false).
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    /// The end-of-generation ids (llama.cpp's EOG set, sorted): EOS, plus tokens such as
    /// `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>` and the FIM pad/repo/separator tokens.
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eog
    }

    /// The fill-in-the-middle tokens, when the model has them.
    pub fn fim(&self) -> Option<FimIds> {
        self.inner.fim
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.inner.eog.binary_search(&id).is_ok()
    }

    /// Whether `id` is a control token (dropped by `decode(.., skip_special = true)`).
    pub fn is_control(&self, id: u32) -> bool {
        self.inner
            .attrs
            .get(id as usize)
            .is_some_and(|a| a & ATTR_CONTROL != 0)
    }

    /// The raw vocabulary entry of `id` (byte-level characters, e.g. `Ġhello`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.inner.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a raw vocabulary entry.
    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id.get(token).copied()
    }

    /// An incremental decoder for streaming.
    pub fn decode_stream(&self, skip_special: bool) -> DecodeStream<'_> {
        DecodeStream {
            tokenizer: self,
            skip_special,
            pending: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pretokenize::{split_gpt2, split_llama3};
    use super::*;

    fn strings(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A tiny byte-level vocabulary: "é" is 0xC3 0xA9, i.e. the byte-level characters "Ã" "©".
    fn tiny() -> Tokenizer {
        let tokens = [
            "<|im_start|>",
            "<|im_end|>",
            "h",
            "i",
            "Ã",
            "©",
            "Ġ",
            "hi",
            "Ġh",
            "Ġhi",
            "Ã©",
            "1",
            "2",
        ];
        let types: Vec<Value> = tokens
            .iter()
            .map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 }))
            .collect();
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        md.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
        md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
        md.insert(
            "tokenizer.ggml.merges".into(),
            strings(&["Ġ h", "Ġh i", "h i", "Ã ©"]),
        );
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(0));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
        match Tokenizer::from_gguf_metadata(&md) {
            Ok(t) => t,
            Err(e) => panic!("tiny tokenizer: {e}"),
        }
    }

    #[test]
    fn encode_and_decode_tiny() -> Result<(), TokenizerError> {
        let t = tiny();
        assert_eq!(t.encode("hi hi", false)?, vec![7, 9]);
        assert_eq!(t.encode("é12", false)?, vec![10, 11, 12]);
        assert_eq!(t.encode("<|im_start|>hi<|im_end|>", true)?, vec![0, 7, 1]);
        assert_eq!(
            t.decode(&[0, 7, 9, 1], false)?,
            "<|im_start|>hi hi<|im_end|>"
        );
        assert_eq!(t.decode(&[0, 7, 9, 1], true)?, "hi hi");
        assert!(t.is_eog(1));
        assert!(!t.is_eog(7));
        assert_eq!(t.eos_ids(), &[1]);
        assert!(matches!(
            t.decode(&[99], false),
            Err(TokenizerError::InvalidTokenId { id: 99, .. })
        ));
        Ok(())
    }

    #[test]
    fn tokenizer_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn special_text_is_plain_without_parse_special() -> Result<(), TokenizerError> {
        let t = tiny();
        let ids = t.encode("<|im_start|>", false)?;
        assert!(!ids.contains(&0));
        Ok(())
    }

    #[test]
    fn decode_stream_holds_split_character() -> Result<(), TokenizerError> {
        let t = tiny();
        let mut s = t.decode_stream(false);
        assert_eq!(s.push(7)?, "hi");
        assert_eq!(s.push(4)?, ""); // 0xC3: first byte of "é"
        assert_eq!(s.push(5)?, "é"); // 0xA9 completes it
        assert_eq!(s.push(4)?, "");
        assert_eq!(s.flush(), "\u{FFFD}");
        assert_eq!(s.flush(), "");
        Ok(())
    }

    #[test]
    fn unsupported_pre_is_reported() {
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        md.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("nonesuch".into()),
        );
        let err = Tokenizer::from_gguf_metadata(&md).err();
        assert!(matches!(err, Some(TokenizerError::UnsupportedPre(ref p)) if p == "nonesuch"));
    }

    type Words = Vec<(usize, usize)>;

    #[test]
    fn splitters_follow_llama_cpp() -> Result<(), TokenizerError> {
        let cl = CharClasses::new()?;
        let split = |text: &str, f: &dyn Fn(&[u32], &mut Words)| {
            let cpts: Vec<u32> = text.chars().map(|c| c as u32).collect();
            let mut w = Vec::new();
            f(&cpts, &mut w);
            w.iter()
                .map(|&(a, b)| text.chars().skip(a).take(b - a).collect::<String>())
                .collect::<Vec<_>>()
        };
        let qwen = |c: &[u32], w: &mut Words| split_llama3(&cl, c, 0, c.len(), 1, w);
        let llama3 = |c: &[u32], w: &mut Words| split_llama3(&cl, c, 0, c.len(), 3, w);
        let gpt2 = |c: &[u32], w: &mut Words| split_gpt2(&cl, c, 0, c.len(), w);
        assert_eq!(
            split("I'M  here\n\n 12345!!\tx", &qwen),
            ["I", "'M", " ", " here", "\n\n", " ", "1", "2", "3", "4", "5", "!!", "\tx"]
        );
        assert_eq!(split("12345 abc", &llama3), ["123", "45", " abc"]);
        assert_eq!(
            split("I'M  here  ", &gpt2),
            ["I", "'", "M", " ", " here", "  "]
        );
        Ok(())
    }
}
