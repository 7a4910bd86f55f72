//! Byte-level BPE: merging each pre-token's symbols by rank, lowest first, leftmost on ties.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use super::pretokenize::{split_gpt2, split_llama3, CL_NUMBER};
use super::{
    Inner, PreType, TokenizerError, ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN,
    ATTR_USER_DEFINED, NO_SYM,
};

/// A hasher for the `(u32, u32)` merge keys: multiplicative mixing, much faster than SipHash.
#[derive(Default)]
pub(super) struct PairHasher(u64);

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
pub(super) type BigramHeap = BinaryHeap<Reverse<(u32, i32, i32, u32, u32)>>;

pub(super) type PairMap = HashMap<(u32, u32), (u32, u32), BuildHasherDefault<PairHasher>>;

pub(super) enum Fragment {
    Text(usize, usize),
    Token(u32),
}

#[derive(Clone, Copy)]
pub(super) struct Symbol {
    pub(super) start: u32,
    pub(super) end: u32,
    pub(super) sym: u32,
    pub(super) prev: i32,
    pub(super) next: i32,
}

#[derive(Default)]
pub(super) struct Scratch {
    pub(super) cpts: Vec<u32>,
    pub(super) offsets: Vec<usize>,
    pub(super) words: Vec<(usize, usize)>,
    pub(super) pieces: Vec<(usize, usize)>,
    pub(super) symbols: Vec<Symbol>,
    pub(super) heap: BigramHeap,
    pub(super) encoded: String,
}

impl Inner {
    /// llama.cpp's `tokenizer_st_partition`: cut special tokens out of the text.
    pub(super) fn partition_special(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
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
    pub(super) fn encode_text(&self, text: &str, out: &mut Vec<u32>, s: &mut Scratch) {
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

    pub(super) fn bpe_word(&self, word: &[u8], out: &mut Vec<u32>, s: &mut Scratch) {
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
    pub(super) fn add_bigram(
        &self,
        symbols: &[Symbol],
        heap: &mut BigramHeap,
        left: i32,
        right: i32,
    ) {
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
    pub(super) fn piece(
        &self,
        id: u32,
        special: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TokenizerError> {
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
