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

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;

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

// Token attributes, as llama.cpp's `llama_token_attr`.
const ATTR_UNKNOWN: u16 = 1 << 0;
const ATTR_UNUSED: u16 = 1 << 1;
const ATTR_NORMAL: u16 = 1 << 2;
const ATTR_CONTROL: u16 = 1 << 3;
const ATTR_USER_DEFINED: u16 = 1 << 4;
const ATTR_BYTE: u16 = 1 << 5;

/// Symbol id for a byte-level character that is neither in the vocabulary nor in any merge.
const NO_SYM: u32 = u32::MAX;

/// The pre-tokenizer families we implement (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreType {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)` (GPT-2).
    Gpt2,
    /// `\p{N}` first, then the GPT-2 regex (starcoder, smollm, ...).
    Gpt2Digits,
    /// The Llama 3 regex with `\p{N}{1,3}`.
    Llama3,
    /// The Llama 3 regex with single digits `\p{N}` (qwen2, ...).
    Qwen2,
}

/// Maps `tokenizer.ggml.pre` to the family and the settings llama.cpp gives it:
/// (pre type, ignore_merges, add_bos default).
fn pre_type_of(pre: &str) -> Option<(PreType, bool, bool)> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => (PreType::Llama3, true, true),
        "dbrx" | "smaug-bpe" => (PreType::Llama3, false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "megrez" | "hunyuan"
        | "solar-open" | "grok-2" => (PreType::Qwen2, false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => (PreType::Gpt2Digits, false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" | "exaone4" => (PreType::Gpt2, false, false),
        _ => return None,
    })
}

/// A hasher for the `(u32, u32)` merge keys: multiplicative mixing, much faster than SipHash.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(n)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// Candidate merges: (rank, left index, right index, left symbol, right symbol), lowest first.
type BigramHeap = BinaryHeap<Reverse<(u32, i32, i32, u32, u32)>>;

type PairMap = HashMap<(u32, u32), (u32, u32), BuildHasherDefault<PairHasher>>;

// Code point classes, as llama.cpp's `unicode_cpt_flags` (generated from Python's `regex`).
const CL_LETTER: u8 = 1;
const CL_NUMBER: u8 = 2;
const CL_SPACE: u8 = 4;
/// Set for every code point; absent only past the end of the text (llama.cpp's `as_uint() == 0`).
const CL_DEFINED: u8 = 8;

/// Unicode classes `\p{L}`, `\p{N}` and `\s` (White_Space), from regex-syntax's tables.
#[derive(Debug)]
struct CharClasses {
    ascii: [u8; 128],
    letter: Vec<(u32, u32)>,
    number: Vec<(u32, u32)>,
    space: Vec<(u32, u32)>,
}

fn class_ranges(pattern: &str) -> Result<Vec<(u32, u32)>, TokenizerError> {
    let hir = regex_syntax::parse(pattern)
        .map_err(|e| TokenizerError::BadVocab(format!("unicode class {pattern}: {e}")))?;
    match hir.kind() {
        regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(cls)) => Ok(cls
            .ranges()
            .iter()
            .map(|r| (u32::from(r.start()), u32::from(r.end())))
            .collect()),
        _ => Err(TokenizerError::BadVocab(format!(
            "unicode class {pattern} did not parse to a class"
        ))),
    }
}

fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    let i = ranges.partition_point(|&(_, end)| end < c);
    i < ranges.len() && ranges[i].0 <= c
}

impl CharClasses {
    fn new() -> Result<Self, TokenizerError> {
        let letter = class_ranges(r"\p{L}")?;
        let number = class_ranges(r"\p{N}")?;
        let space = class_ranges(r"\s")?;
        let mut ascii = [CL_DEFINED; 128];
        for (c, slot) in ascii.iter_mut().enumerate() {
            let c = c as u32;
            if in_ranges(&letter, c) {
                *slot |= CL_LETTER;
            }
            if in_ranges(&number, c) {
                *slot |= CL_NUMBER;
            }
            if in_ranges(&space, c) {
                *slot |= CL_SPACE;
            }
        }
        Ok(Self {
            ascii,
            letter,
            number,
            space,
        })
    }

    #[inline]
    fn of(&self, c: u32) -> u8 {
        if c < 128 {
            return self.ascii[c as usize];
        }
        let mut f = CL_DEFINED;
        if in_ranges(&self.letter, c) {
            f |= CL_LETTER;
        } else if in_ranges(&self.number, c) {
            f |= CL_NUMBER;
        } else if in_ranges(&self.space, c) {
            f |= CL_SPACE;
        }
        f
    }
}

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
}

/// A byte-level BPE tokenizer matching llama.cpp for the same GGUF metadata.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

fn type_name(v: &Value) -> String {
    format!("{:?}", v.value_type())
}

fn get_str<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "a string",
            found: type_name(v),
        }),
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn get_int(md: &HashMap<String, Value>, key: &str) -> Result<Option<i64>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => value_as_i64(v)
            .map(Some)
            .ok_or_else(|| TokenizerError::WrongType {
                key: key.to_string(),
                expected: "an integer",
                found: type_name(v),
            }),
    }
}

fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "a bool",
            found: type_name(v),
        }),
    }
}

fn get_array<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a [Value]>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "an array",
            found: type_name(v),
        }),
    }
}

fn array_str<'a>(key: &str, v: &'a Value) -> Result<&'a str, TokenizerError> {
    match v {
        Value::String(s) => Ok(s),
        v => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "an array of strings",
            found: format!("an array holding {}", type_name(v)),
        }),
    }
}

/// Special token ids read from `tokenizer.ggml.*_token_id` (llama.cpp's `special_*_id`).
#[derive(Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    pad: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
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

/// llama.cpp's auto-detection of EOT/EOM/FIM tokens by their text and its EOG set.
/// Marks the detected tokens as control, as llama.cpp does. Returns the sorted EOG ids.
fn detect_special_tokens(tokens: &[String], attrs: &mut [u16], sp: &mut SpecialIds) -> Vec<u32> {
    const EOT: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ];
    const EOM: &[&str] = &["<|eom_id|>"];
    const FIM_PRE: &[&str] = &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ];
    const FIM_SUF: &[&str] = &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ];
    const FIM_MID: &[&str] = &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ];
    const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
    const FIM_REP: &[&str] = &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ];
    const FIM_SEP: &[&str] = &["<|file_sep|>"];
    const EOG: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    ];

    for (id, text) in tokens.iter().enumerate() {
        let id32 = id as u32;
        let text = text.as_str();
        let slots: [(&mut Option<u32>, &[&str]); 8] = [
            (&mut sp.eot, EOT),
            (&mut sp.eom, EOM),
            (&mut sp.fim_pre, FIM_PRE),
            (&mut sp.fim_suf, FIM_SUF),
            (&mut sp.fim_mid, FIM_MID),
            (&mut sp.fim_pad, FIM_PAD),
            (&mut sp.fim_rep, FIM_REP),
            (&mut sp.fim_sep, FIM_SEP),
        ];
        for (slot, names) in slots {
            if slot.is_none() && names.contains(&text) {
                *slot = Some(id32);
                attrs[id] |= ATTR_CONTROL;
            }
        }
    }

    let mut eog: Vec<u32> = Vec::new();
    eog.extend(sp.fim_pad);
    eog.extend(sp.fim_rep);
    eog.extend(sp.fim_sep);
    for (id, text) in tokens.iter().enumerate() {
        if EOG.contains(&text.as_str()) {
            eog.push(id as u32);
            attrs[id] |= ATTR_CONTROL;
        }
    }
    // gpt-oss: these are always rendered.
    for (id, text) in tokens.iter().enumerate() {
        if matches!(
            text.as_str(),
            "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
        ) {
            attrs[id] = ATTR_USER_DEFINED;
        }
    }
    eog.extend(sp.eos);
    eog.extend(sp.eot);
    eog.extend(sp.eom);
    eog.sort_unstable();
    eog.dedup();

    let find =
        |eog: &[u32], name: &str| eog.iter().copied().find(|&id| tokens[id as usize] == name);
    // o200k_harmony / solar-open: "<|end|>" is not EOG when "<|return|>" and "<|call|>" are.
    let has = |eog: &[u32], name: &str| find(eog, name).is_some();
    if ((has(&eog, "<|return|>") && has(&eog, "<|call|>"))
        || ((has(&eog, "<|call|>") || has(&eog, "<|calls|>")) && has(&eog, "<|flush|>")))
        && has(&eog, "<|end|>")
    {
        if let Some(end) = find(&eog, "<|end|>") {
            eog.retain(|&id| id != end);
            attrs[end as usize] = ATTR_USER_DEFINED;
        }
    }
    // gemma4 / paddleocr: "</s>" is not EOG when "<|tool_response>" is.
    if has(&eog, "<|tool_response>") {
        if let Some(s) = find(&eog, "</s>") {
            eog.retain(|&id| id != s);
            attrs[s as usize] = ATTR_NORMAL;
        }
    }
    eog
}

enum Fragment {
    Text(usize, usize),
    Token(u32),
}

#[derive(Clone, Copy)]
struct Symbol {
    start: u32,
    end: u32,
    sym: u32,
    prev: i32,
    next: i32,
}

#[derive(Default)]
struct Scratch {
    cpts: Vec<u32>,
    offsets: Vec<usize>,
    words: Vec<(usize, usize)>,
    pieces: Vec<(usize, usize)>,
    symbols: Vec<Symbol>,
    heap: BigramHeap,
    encoded: String,
}

impl Inner {
    /// llama.cpp's `tokenizer_st_partition`: cut special tokens out of the text.
    fn partition_special(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text(0, text.len())];
        for &id in &self.special_cache {
            let attr = self.attrs[id as usize];
            if !parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let tok = self.tokens[id as usize].as_str();
            if !text.contains(tok) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                match frag {
                    Fragment::Token(_) => next.push(frag),
                    Fragment::Text(mut start, end) => {
                        while let Some(pos) = text[start..end].find(tok) {
                            let m = start + pos;
                            if m > start {
                                next.push(Fragment::Text(start, m));
                            }
                            next.push(Fragment::Token(id));
                            start = m + tok.len();
                        }
                        if start < end {
                            next.push(Fragment::Text(start, end));
                        }
                    }
                }
            }
            frags = next;
        }
        frags
    }

    /// Pre-tokenizes and BPE-encodes a piece of text without special tokens.
    fn encode_text(&self, text: &str, out: &mut Vec<u32>, s: &mut Scratch) {
        s.cpts.clear();
        s.offsets.clear();
        for (off, c) in text.char_indices() {
            s.cpts.push(c as u32);
            s.offsets.push(off);
        }
        s.offsets.push(text.len());
        s.words.clear();
        match self.pre {
            PreType::Gpt2 => split_gpt2(&self.classes, &s.cpts, 0, s.cpts.len(), &mut s.words),
            PreType::Gpt2Digits => {
                // First `\p{N}`: every digit is a piece, the text between digits is a piece.
                s.pieces.clear();
                let mut gap = 0;
                for (i, &c) in s.cpts.iter().enumerate() {
                    if self.classes.of(c) & CL_NUMBER != 0 {
                        if gap < i {
                            s.pieces.push((gap, i));
                        }
                        s.pieces.push((i, i + 1));
                        gap = i + 1;
                    }
                }
                if gap < s.cpts.len() {
                    s.pieces.push((gap, s.cpts.len()));
                }
                for &(a, b) in &s.pieces {
                    split_gpt2(&self.classes, &s.cpts, a, b, &mut s.words);
                }
            }
            PreType::Llama3 => {
                split_llama3(&self.classes, &s.cpts, 0, s.cpts.len(), 3, &mut s.words)
            }
            PreType::Qwen2 => {
                split_llama3(&self.classes, &s.cpts, 0, s.cpts.len(), 1, &mut s.words)
            }
        }
        let words = std::mem::take(&mut s.words);
        for &(a, b) in &words {
            let bytes = &text.as_bytes()[s.offsets[a]..s.offsets[b]];
            self.bpe_word(bytes, out, s);
        }
        s.words = words;
    }

    fn bpe_word(&self, word: &[u8], out: &mut Vec<u32>, s: &mut Scratch) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            s.encoded.clear();
            for &b in word {
                s.encoded.push_str(&self.byte_enc[b as usize]);
            }
            if let Some(&id) = self.token_to_id.get(&s.encoded) {
                out.push(id);
                return;
            }
        }
        let n = word.len();
        s.symbols.clear();
        for (i, &b) in word.iter().enumerate() {
            s.symbols.push(Symbol {
                start: i as u32,
                end: i as u32 + 1,
                sym: self.byte_sym[b as usize],
                prev: i as i32 - 1,
                next: if i + 1 == n { -1 } else { i as i32 + 1 },
            });
        }
        s.heap.clear();
        for i in 1..n {
            self.add_bigram(&s.symbols, &mut s.heap, i as i32 - 1, i as i32);
        }
        while let Some(Reverse((_, left, right, lsym, rsym))) = s.heap.pop() {
            let (l, r) = (left as usize, right as usize);
            let (ls, rs) = (s.symbols[l], s.symbols[r]);
            if ls.start == ls.end || rs.start == rs.end || ls.sym != lsym || rs.sym != rsym {
                continue; // outdated
            }
            let Some(&(_, merged)) = self.merges.get(&(lsym, rsym)) else {
                continue;
            };
            s.symbols[l].end = rs.end;
            s.symbols[l].sym = merged;
            s.symbols[l].next = rs.next;
            s.symbols[r].end = rs.start;
            if rs.next >= 0 {
                s.symbols[rs.next as usize].prev = left;
            }
            let prev = s.symbols[l].prev;
            let next = s.symbols[l].next;
            self.add_bigram(&s.symbols, &mut s.heap, prev, left);
            self.add_bigram(&s.symbols, &mut s.heap, left, next);
        }
        let n_vocab = self.tokens.len() as u32;
        for sym in s.symbols.iter().filter(|x| x.start != x.end) {
            if sym.sym < n_vocab {
                out.push(sym.sym);
            } else {
                // Not a token: llama.cpp looks up each byte of the byte-level text on its own.
                for &b in &word[sym.start as usize..sym.end as usize] {
                    for &e in self.byte_enc[b as usize].as_bytes() {
                        if let Some(Some(id)) = self.ascii_token.get(e as usize) {
                            out.push(*id);
                        }
                    }
                }
            }
        }
    }

    #[inline]
    fn add_bigram(&self, symbols: &[Symbol], heap: &mut BigramHeap, left: i32, right: i32) {
        if left < 0 || right < 0 {
            return;
        }
        let (ls, rs) = (symbols[left as usize].sym, symbols[right as usize].sym);
        if ls == NO_SYM || rs == NO_SYM {
            return;
        }
        if let Some(&(rank, _)) = self.merges.get(&(ls, rs)) {
            heap.push(Reverse((rank, left, right, ls, rs)));
        }
    }

    /// llama.cpp's `token_to_piece` for a BPE vocabulary.
    fn piece(&self, id: u32, special: bool, out: &mut Vec<u8>) -> Result<(), TokenizerError> {
        let (Some(&attr), Some(text)) = (self.attrs.get(id as usize), self.tokens.get(id as usize))
        else {
            return Err(TokenizerError::InvalidTokenId {
                id,
                vocab_size: self.tokens.len(),
            });
        };
        if !special && attr & (ATTR_UNKNOWN | ATTR_CONTROL) != 0 {
            return Ok(());
        }
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            out.extend_from_slice(text.as_bytes());
        } else if attr & ATTR_NORMAL != 0 {
            for c in text.chars() {
                match self.cpt_byte.get(c as usize).copied().filter(|&b| b >= 0) {
                    Some(b) => out.push(b as u8),
                    None => {
                        // As llama.cpp's llama_decode_text.
                        out.extend_from_slice(b"[UNK_BYTE_0x");
                        let mut buf = [0u8; 4];
                        for b in c.encode_utf8(&mut buf).as_bytes() {
                            out.extend_from_slice(format!("{b:02x}").as_bytes());
                        }
                        out.extend_from_slice(text.as_bytes());
                        out.push(b']');
                    }
                }
            }
        } else if attr & ATTR_BYTE != 0 {
            if let Some(b) = text.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
            }
        }
        Ok(())
    }
}

/// llama.cpp's `unicode_regex_split_custom_gpt2` over `cpts[ini..end]`: the GPT-2 regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn split_gpt2(
    cl: &CharClasses,
    cpts: &[u32],
    ini: usize,
    end: usize,
    words: &mut Vec<(usize, usize)>,
) {
    const OUT: u32 = u32::MAX;
    let cpt = |p: usize| if p >= ini && p < end { cpts[p] } else { OUT };
    let fl = |p: usize| {
        if p >= ini && p < end {
            cl.of(cpts[p])
        } else {
            0
        }
    };
    let is_other = |f: u8| f & (CL_SPACE | CL_LETTER | CL_NUMBER) == 0 && f != 0;
    let mut pos = ini;
    while pos < end {
        let start = pos;
        let c = cpt(pos);
        let f = fl(pos);
        if c == u32::from(b'\'') && pos + 1 < end {
            let n = cpt(pos + 1);
            if [b's', b't', b'm', b'd'].iter().any(|&x| n == u32::from(x)) {
                pos += 2;
                words.push((start, pos));
                continue;
            }
            if pos + 2 < end {
                let nn = cpt(pos + 2);
                let pair = |a: u8, b: u8| n == u32::from(a) && nn == u32::from(b);
                if pair(b'r', b'e') || pair(b'v', b'e') || pair(b'l', b'l') {
                    pos += 3;
                    words.push((start, pos));
                    continue;
                }
            }
        }
        let space = c == u32::from(b' ');
        let mut f2 = if space { fl(pos + 1) } else { f };
        if f2 & CL_LETTER != 0 {
            pos += usize::from(space);
            while f2 & CL_LETTER != 0 {
                pos += 1;
                f2 = fl(pos);
            }
            words.push((start, pos));
            continue;
        }
        if f2 & CL_NUMBER != 0 {
            pos += usize::from(space);
            while f2 & CL_NUMBER != 0 {
                pos += 1;
                f2 = fl(pos);
            }
            words.push((start, pos));
            continue;
        }
        if is_other(f2) {
            pos += usize::from(space);
            while is_other(f2) {
                pos += 1;
                f2 = fl(pos);
            }
            words.push((start, pos));
            continue;
        }
        let mut n_ws = 0;
        while fl(pos + n_ws) & CL_SPACE != 0 {
            n_ws += 1;
        }
        if n_ws > 1 && cpt(pos + n_ws) != OUT {
            pos += n_ws - 1;
        } else if n_ws > 0 {
            pos += n_ws;
        } else {
            pos += 1;
        }
        words.push((start, pos));
    }
}

/// llama.cpp's `unicode_regex_split_custom_llama3` over `cpts[ini..end]`, with `\p{N}{1,max_digits}`:
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
/// With `max_digits = 1` it gives exactly the matches of the qwen2 regex (which llama.cpp runs
/// through std::regex): the two differ only in the digit group.
fn split_llama3(
    cl: &CharClasses,
    cpts: &[u32],
    ini: usize,
    end: usize,
    max_digits: usize,
    words: &mut Vec<(usize, usize)>,
) {
    const OUT: u32 = u32::MAX;
    let cpt = |p: usize| if p >= ini && p < end { cpts[p] } else { OUT };
    let fl = |p: usize| {
        if p >= ini && p < end {
            cl.of(cpts[p])
        } else {
            0
        }
    };
    let lower = |c: u32| {
        if (u32::from(b'A')..=u32::from(b'Z')).contains(&c) {
            c + 32
        } else {
            c
        }
    };
    let is_cr_lf = |c: u32| c == u32::from(b'\r') || c == u32::from(b'\n');
    let mut pos = ini;
    while pos < end {
        let start = pos;
        let c = cpt(pos);
        let f = fl(pos);
        if c == u32::from(b'\'') && pos + 1 < end {
            let n = lower(cpt(pos + 1));
            if [b's', b't', b'm', b'd'].iter().any(|&x| n == u32::from(x)) {
                pos += 2;
                words.push((start, pos));
                continue;
            }
            if pos + 2 < end {
                let nn = lower(cpt(pos + 2));
                let pair = |a: u8, b: u8| n == u32::from(a) && nn == u32::from(b);
                if pair(b'r', b'e') || pair(b'v', b'e') || pair(b'l', b'l') {
                    pos += 3;
                    words.push((start, pos));
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(is_cr_lf(c) || f & CL_NUMBER != 0)
            && (f & CL_LETTER != 0 || fl(pos + 1) & CL_LETTER != 0)
        {
            pos += 1;
            while fl(pos) & CL_LETTER != 0 {
                pos += 1;
            }
            words.push((start, pos));
            continue;
        }
        // \p{N}{1,max_digits}
        if f & CL_NUMBER != 0 {
            let mut group = pos;
            while fl(pos) & CL_NUMBER != 0 {
                pos += 1;
                if pos - group >= max_digits {
                    words.push((group, pos));
                    group = pos;
                }
            }
            if group < pos {
                words.push((group, pos));
            }
            continue;
        }
        // ?[^\s\p{L}\p{N}]+[\r\n]*
        let space = c == u32::from(b' ');
        let mut f2 = if space { fl(pos + 1) } else { f };
        let not_wln = |f: u8| f & (CL_SPACE | CL_LETTER | CL_NUMBER) == 0;
        if not_wln(f2) && f != 0 {
            pos += usize::from(space);
            while not_wln(f2) && f2 != 0 {
                pos += 1;
                f2 = fl(pos);
            }
            while is_cr_lf(cpt(pos)) {
                pos += 1;
            }
            words.push((start, pos));
            continue;
        }
        let mut n_ws = 0;
        let mut last_cr_lf_end = 0;
        while fl(pos + n_ws) & CL_SPACE != 0 {
            if is_cr_lf(cpt(pos + n_ws)) {
                last_cr_lf_end = pos + n_ws + 1;
            }
            n_ws += 1;
        }
        if last_cr_lf_end > 0 {
            // \s*[\r\n]+
            pos = last_cr_lf_end;
        } else if n_ws > 1 && cpt(pos + n_ws) != OUT {
            // \s+(?!\S)
            pos += n_ws - 1;
        } else if n_ws > 0 {
            // \s+
            pos += n_ws;
        } else {
            pos += 1;
        }
        words.push((start, pos));
    }
}

/// Incremental detokenizer for streaming: push ids one at a time and get the text that became
/// complete. A UTF-8 character split across tokens is held back until its last byte arrives.
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
}

impl DecodeStream<'_> {
    /// Adds one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.tokenizer
            .inner
            .piece(id, !self.skip_special, &mut self.pending)?;
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[consumed..consumed + valid],
                    ));
                    consumed += valid;
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => break,
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += bad;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        Ok(out)
    }

    /// Returns what is still held back (an incomplete character becomes U+FFFD) and resets.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
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
