//! Pre-tokenizers: llama.cpp's hand-written splitters for the regexes of `tokenizer.ggml.pre`,
//! and the code point classes they use.

use super::TokenizerError;

/// The pre-tokenizer families we implement (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreType {
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
pub(super) fn pre_type_of(pre: &str) -> Option<(PreType, bool, bool)> {
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

// Code point classes, as llama.cpp's `unicode_cpt_flags` (generated from Python's `regex`).
pub(super) const CL_LETTER: u8 = 1;
pub(super) const CL_NUMBER: u8 = 2;
pub(super) const CL_SPACE: u8 = 4;
/// Set for every code point; absent only past the end of the text (llama.cpp's `as_uint() == 0`).
pub(super) const CL_DEFINED: u8 = 8;

/// Unicode classes `\p{L}`, `\p{N}` and `\s` (White_Space), from regex-syntax's tables.
#[derive(Debug)]
pub(super) struct CharClasses {
    pub(super) ascii: [u8; 128],
    pub(super) letter: Vec<(u32, u32)>,
    pub(super) number: Vec<(u32, u32)>,
    pub(super) space: Vec<(u32, u32)>,
}

pub(super) fn class_ranges(pattern: &str) -> Result<Vec<(u32, u32)>, TokenizerError> {
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

pub(super) fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    let i = ranges.partition_point(|&(_, end)| end < c);
    i < ranges.len() && ranges[i].0 <= c
}

impl CharClasses {
    pub(super) fn new() -> Result<Self, TokenizerError> {
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
    pub(super) fn of(&self, c: u32) -> u8 {
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

/// llama.cpp's `unicode_regex_split_custom_gpt2` over `cpts[ini..end]`: the GPT-2 regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
pub(super) fn split_gpt2(
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
pub(super) fn split_llama3(
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
