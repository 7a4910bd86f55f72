//! Final answers taken from an answer's text: a number, a choice letter, a code block.

use shoal_sandbox::{fenced_blocks, is_python, FencedBlock};

/// A final answer that can be compared exactly between answers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FinalAnswer {
    /// A number, normalised: no thousands separators, no leading `+` or leading zeros,
    /// trailing fractional zeros trimmed, `-0` written `0`.
    Number(String),
    /// A code block, normalised ([`normalise_code`]).
    Code(String),
    /// A multiple-choice letter (`A`–`E`), upper case.
    Choice(char),
}

/// A number found in a text: its byte range and its normalised form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FoundNumber {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) normalised: String,
}

/// Every number in `text`, in order.
///
/// A `-` is a sign only where no letter or digit precedes it (so `5-3` is 5 and 3); a number
/// glued to a preceding letter (`E0382`, `mp3`) is part of a name and skipped; commas count
/// as thousands separators only before exactly three digits (`1,234,567`, but not `1,2,3`).
pub(super) fn numbers_in(text: &str) -> Vec<FoundNumber> {
    let bytes = text.as_bytes();
    let is_digit = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
    let is_word = |i: usize| {
        bytes
            .get(i)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let preceded_by_word = i > 0 && is_word(i - 1);
        let preceded_by_dot = i > 0 && bytes[i - 1] == b'.';
        let starts_number = if preceded_by_word || preceded_by_dot {
            false
        } else if bytes[i] == b'-' {
            is_digit(i + 1) || (bytes.get(i + 1) == Some(&b'.') && is_digit(i + 2))
        } else if bytes[i] == b'.' {
            is_digit(i + 1)
        } else {
            is_digit(i)
        };
        if !starts_number {
            // Skip a whole word so that digits inside it are not taken for a number.
            if is_word(i) {
                while is_word(i) {
                    i += 1;
                }
            } else {
                i += 1;
            }
            continue;
        }
        let start = i;
        let negative = bytes[i] == b'-';
        if negative {
            i += 1;
        }
        let mut integer = String::new();
        while is_digit(i) {
            integer.push(char::from(bytes[i]));
            i += 1;
        }
        // Thousands separators: ",ddd" not followed by another digit.
        while !integer.is_empty()
            && bytes.get(i) == Some(&b',')
            && is_digit(i + 1)
            && is_digit(i + 2)
            && is_digit(i + 3)
            && !is_digit(i + 4)
        {
            integer.extend(bytes[i + 1..i + 4].iter().map(|b| char::from(*b)));
            i += 4;
        }
        let mut fraction = String::new();
        if bytes.get(i) == Some(&b'.') && is_digit(i + 1) {
            i += 1;
            while is_digit(i) {
                fraction.push(char::from(bytes[i]));
                i += 1;
            }
        }
        found.push(FoundNumber {
            start,
            end: i,
            normalised: normalise_number(negative, &integer, &fraction),
        });
    }
    found
}

/// The normalised form of a number from its sign, integer digits and fraction digits.
pub(super) fn normalise_number(negative: bool, integer: &str, fraction: &str) -> String {
    let integer = integer.trim_start_matches('0');
    let integer = if integer.is_empty() { "0" } else { integer };
    let fraction = fraction.trim_end_matches('0');
    let mut out = String::with_capacity(integer.len() + fraction.len() + 2);
    let is_zero = integer == "0" && fraction.is_empty();
    if negative && !is_zero {
        out.push('-');
    }
    out.push_str(integer);
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out
}

/// The first number at or after byte `from`.
pub(super) fn first_number_from(numbers: &[FoundNumber], from: usize) -> Option<&FoundNumber> {
    numbers.iter().find(|n| n.start >= from)
}

/// Phrases after which the final answer follows, in any case.
pub(super) const ANSWER_MARKERS: &[&str] = &[
    "final answer",
    "answer is",
    "answer:",
    "answer =",
    "answer would be",
    "result is",
];

/// The final numeric answer of `text`, normalised (see [`FinalAnswer::Number`]).
///
/// Explicit markers win over position, in this order: the last `\boxed{…}`, the number
/// after the last `####` (GSM8K style), the first number after the last "answer is",
/// "answer:", "final answer", …, the number right after the last `=` on a line where it is
/// the line's last number (`2 + 3 = 5`); otherwise the last number in the text.
pub fn extract_number(text: &str) -> Option<String> {
    let numbers = numbers_in(text);
    if numbers.is_empty() {
        return None;
    }
    // ASCII lowercasing keeps byte offsets.
    let lower = text.to_ascii_lowercase();

    if let Some(at) = lower.rfind("\\boxed{") {
        let open = at + "\\boxed{".len();
        let mut depth = 1;
        let mut close = lower.len();
        for (offset, byte) in lower.as_bytes()[open..].iter().enumerate() {
            match byte {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + offset;
                        break;
                    }
                }
                _ => {}
            }
        }
        if let Some(n) = numbers.iter().find(|n| n.start >= open && n.end <= close) {
            return Some(n.normalised.clone());
        }
    }

    if let Some(at) = lower.rfind("####") {
        if let Some(n) = first_number_from(&numbers, at + 4) {
            return Some(n.normalised.clone());
        }
    }

    let last_marker = ANSWER_MARKERS
        .iter()
        .filter_map(|marker| lower.rfind(marker).map(|at| at + marker.len()))
        .max();
    if let Some(after) = last_marker {
        if let Some(n) = first_number_from(&numbers, after) {
            return Some(n.normalised.clone());
        }
    }

    if let Some(n) = number_after_last_equals(text, &numbers) {
        return Some(n.normalised.clone());
    }

    numbers.last().map(|n| n.normalised.clone())
}

/// The number right after an `=` (spaces, `$` and `*` between allowed) that is the last
/// number on its line, from the last such line.
pub(super) fn number_after_last_equals<'a>(
    text: &str,
    numbers: &'a [FoundNumber],
) -> Option<&'a FoundNumber> {
    let mut line_start = text.len();
    for line in text.rsplit('\n') {
        line_start -= line.len();
        let line_end = line_start + line.len();
        if let Some(eq) = line.rfind('=') {
            let after = &line[eq + 1..];
            let skipped = after.len() - after.trim_start_matches([' ', '\t', '$', '*']).len();
            let number_start = line_start + eq + 1 + skipped;
            let on_line: Vec<&FoundNumber> = numbers
                .iter()
                .filter(|n| n.start >= line_start && n.end <= line_end)
                .collect();
            if let Some(last) = on_line.last() {
                if last.start == number_start {
                    return Some(last);
                }
            }
        }
        // Step over the '\n' that separated this line from the one before it.
        line_start = line_start.saturating_sub(1);
    }
    None
}

/// The multiple-choice letter (`A`–`E`) after an explicit marker ("answer is (B)",
/// "Answer: **C**"), from the last marker; `None` without a marker.
pub fn extract_choice(text: &str) -> Option<char> {
    let lower = text.to_ascii_lowercase();
    let mut best: Option<(usize, char)> = None;
    for marker in ANSWER_MARKERS.iter().chain(&["option", "choice is"]) {
        let mut search_from = 0;
        while let Some(found) = lower[search_from..].find(marker) {
            let after = search_from + found + marker.len();
            search_from = after;
            let rest = text[after..].trim_start_matches([' ', ':', '*', '(', '[', '\t', '\n']);
            let mut chars = rest.chars();
            let Some(letter) = chars.next() else { continue };
            let next = chars.next();
            let is_choice =
                ('A'..='E').contains(&letter) && next.is_none_or(|c| !c.is_alphanumeric());
            if is_choice && best.is_none_or(|(at, _)| after > at) {
                best = Some((after, letter));
            }
        }
    }
    best.map(|(_, letter)| letter)
}

/// The code of an answer: the longest fenced block tagged Python (or untagged), else the
/// first fenced block; `None` when the answer has no non-empty fenced block.
pub fn extract_code(text: &str) -> Option<String> {
    let blocks: Vec<FencedBlock> = fenced_blocks(text)
        .into_iter()
        .filter(|b| !b.code.trim().is_empty())
        .collect();
    // `max_by_key` keeps the last of equal maxima; reverse so the first longest wins.
    let chosen = blocks
        .iter()
        .rev()
        .filter(|b| is_python(&b.lang))
        .max_by_key(|b| b.code.trim().len())
        .or_else(|| blocks.first())?;
    Some(chosen.code.trim_matches('\n').trim_end().to_string())
}

/// Code reduced for comparison: trailing spaces, blank lines and whole-line `#` comments
/// removed.
pub fn normalise_code(code: &str) -> String {
    code.lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}
