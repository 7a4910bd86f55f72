//! Voting over several answers to the same prompt (issue #5, item 4: the `vote` and
//! `confidence` strategies).
//!
//! An answer's *final answer* is what can be compared exactly: a number ([`extract_number`]),
//! a code block ([`extract_code`]) or a multiple-choice letter ([`extract_choice`]).
//! [`vote`] picks one answer out of several:
//!
//! 1. **Code that passes the prompt's own examples.** When the prompt has examples
//!    (doctests, `>>> call(args)` and the expected value on the next line, or prose like
//!    `call(args) ==> value`, as HumanEval prompts have them) and some answers contain
//!    code, each code block is run against them in the sandbox of `shoal-sandbox` (no
//!    network, limits, killed with its process group at its timeout)
//!    ([`code_passes_examples`]). Among the passing answers the most common code wins (by
//!    normalised text); if all passing code differs, the passing answer most similar to the
//!    others.
//! 2. **Majority over code** when at least half the answers contain code and two or more
//!    share the same (normalised) code.
//! 3. **Majority over final answers** (choice letters or numbers) when at least half the
//!    answers have one; ties go to the earliest answer.
//! 4. **Similarity vote** otherwise: the answer with the largest summed [`similarity`] to
//!    the others.
//!
//! Ties always go to the earliest answer, so callers that order answers by agent weight get
//! the best agent on a tie. [`self_agreement`] measures how much a model's own samples agree,
//! for the `confidence` strategy.
//!
//! Numbers are taken from prose too (the last number when nothing marks the answer), so on
//! a non-math question whose answers all mention the same year the majority goes by that
//! year; the head decides which questions to vote on.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use shoal_sandbox::{fenced_blocks, is_python, FencedBlock, Isolation, Sandbox};

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
struct FoundNumber {
    start: usize,
    end: usize,
    normalised: String,
}

/// Every number in `text`, in order.
///
/// A `-` is a sign only where no letter or digit precedes it (so `5-3` is 5 and 3); a number
/// glued to a preceding letter (`E0382`, `mp3`) is part of a name and skipped; commas count
/// as thousands separators only before exactly three digits (`1,234,567`, but not `1,2,3`).
fn numbers_in(text: &str) -> Vec<FoundNumber> {
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
fn normalise_number(negative: bool, integer: &str, fraction: &str) -> String {
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
fn first_number_from(numbers: &[FoundNumber], from: usize) -> Option<&FoundNumber> {
    numbers.iter().find(|n| n.start >= from)
}

/// Phrases after which the final answer follows, in any case.
const ANSWER_MARKERS: &[&str] = &[
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
fn number_after_last_equals<'a>(text: &str, numbers: &'a [FoundNumber]) -> Option<&'a FoundNumber> {
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

/// One doctest example from a prompt: the source after `>>>` and the expected output, or
/// `None` for a line without output (run for its effect; its errors are ignored, since
/// prompts also use `>>>` loosely in prose).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Example {
    source: String,
    expected: Option<String>,
}

/// How many brackets `text` leaves open, outside string literals.
fn open_brackets(text: &str) -> i32 {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                _ => {}
            },
        }
    }
    depth
}

/// The doctest examples of a prompt, in order.
///
/// The expected output is the line after `>>>`, continued over the following lines while
/// its brackets are open (a long list printed over two lines). A `>>> a == b` line without
/// output, as some HumanEval prompts write their examples, expects `True`.
fn doctest_examples(prompt: &str) -> Vec<Example> {
    let lines: Vec<&str> = prompt.lines().collect();
    let output_line = |index: usize| -> Option<&str> {
        let line = lines.get(index)?.trim();
        // The closing quotes of the docstring may share the line with the output.
        let line = line
            .trim_end_matches("\"\"\"")
            .trim_end_matches("'''")
            .trim();
        (!line.is_empty() && !line.starts_with(">>>")).then_some(line)
    };
    let mut examples = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some(source) = line.trim_start().strip_prefix(">>>") else {
            continue;
        };
        let source = source.trim();
        if source.is_empty() {
            continue;
        }
        let mut expected = output_line(index + 1).map(str::to_string);
        if let Some(text) = expected.as_mut() {
            let mut next = index + 2;
            while open_brackets(text) > 0 {
                let Some(more) = output_line(next) else { break };
                text.push(' ');
                text.push_str(more);
                next += 1;
            }
        }
        if expected.is_none() && source.contains(" == ") {
            expected = Some("True".to_string());
        }
        examples.push(Example {
            source: source.to_string(),
            expected,
        });
    }
    examples
}

/// Where the call at the start of `text` ends: the byte after the `)` that closes its first
/// `(`, outside string literals.
fn call_end(text: &str) -> Option<usize> {
    let open = text.find('(')?;
    let mut depth = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (at, c) in text.char_indices().skip_while(|(at, _)| *at < open) {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(at + c.len_utf8());
                    }
                }
                _ => {}
            },
        }
    }
    None
}

/// What separates a call from its result in prose examples (`f(1) ==> 2`, `f(1) ➞ 2`,
/// `f(1) should return 2`), longest first where one is a prefix of another.
const PROSE_SEPARATORS: &[&str] = &[
    "==>",
    "=>",
    "➞",
    "→",
    "->",
    "==",
    "=",
    "should return",
    "should be",
    "returns",
    "return",
];

/// Examples written in prose rather than doctest form, as many HumanEval prompts have them:
/// a line that starts with a call of a function the prompt defines, then a separator
/// ([`PROSE_SEPARATORS`]) and the expected value (`x_or_y(7, 34, 12) == 34`,
/// `add(2, 3) ==> 5`). A call or value spread over several lines is joined while its
/// brackets are open. A value that is no valid Python expression is skipped by the check.
fn prose_examples(prompt: &str) -> Vec<Example> {
    let defined: Vec<&str> = prompt
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("def ")?;
            let name = rest[..rest.find('(')?].trim();
            (!name.is_empty()).then_some(name)
        })
        .collect();
    let lines: Vec<&str> = prompt.lines().map(str::trim).collect();
    let mut examples = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let calls_defined = defined.iter().any(|name| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.trim_start().starts_with('('))
        });
        if !calls_defined || line.starts_with("def ") {
            continue;
        }
        let mut text = line.to_string();
        let mut next = index + 1;
        while open_brackets(&text) > 0 {
            let Some(more) = lines.get(next) else { break };
            if more.is_empty() || more.starts_with("\"\"\"") {
                break;
            }
            text.push(' ');
            text.push_str(more);
            next += 1;
        }
        let Some(end) = call_end(&text) else { continue };
        let rest = text[end..].trim_start();
        let Some(separator) = PROSE_SEPARATORS.iter().find(|sep| rest.starts_with(**sep)) else {
            continue;
        };
        let value = rest[separator.len()..]
            .trim()
            .trim_end_matches([',', ';'])
            .trim_end();
        // A full stop ends the sentence unless it ends a number ("2." is a float).
        let value = match value.strip_suffix('.') {
            Some(stripped) if !stripped.ends_with(|c: char| c.is_ascii_digit()) => stripped,
            _ => value,
        };
        if value.is_empty() {
            continue;
        }
        examples.push(Example {
            source: text[..end].trim().to_string(),
            expected: Some(value.trim_end_matches("\"\"\"").trim().to_string()),
        });
    }
    examples
}

/// A Python string literal for `text` (a JSON string is one: same escapes).
fn python_literal(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The name of the function the first example calls (`fib` in `fib(10)`).
fn called_function(example: &Example) -> Option<&str> {
    let name_end = example.source.find('(')?;
    let name = example.source[..name_end].trim();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.');
    valid.then_some(name)
}

/// The Python program that defines `code` and checks `examples`: exit status 0 when every
/// example's value `==` its expected value (floats within 1e-6 relative), 1 when one
/// differs or raises (or the code does not even define), 3 when no example could be checked
/// because no expected value is a valid Python expression (the prompt's fault, not the
/// code's: such examples are skipped).
fn check_program(code: &str, examples: &[Example]) -> String {
    let mut program = String::from(
        "import math, sys\n\
         def __shoal_same(got, want):\n\
         \x20   if got == want:\n\
         \x20       return True\n\
         \x20   if isinstance(want, bool) or not isinstance(want, (int, float)):\n\
         \x20       return False\n\
         \x20   if isinstance(got, float):\n\
         \x20       return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)\n\
         \x20   return False\n\
         __shoal_ns = {'__name__': '__shoal_candidate__'}\n\
         try:\n\
         \x20   exec(compile(",
    );
    program.push_str(&python_literal(code));
    program.push_str(
        ", '<candidate>', 'exec'), __shoal_ns)\nexcept BaseException:\n    sys.exit(1)\n",
    );
    program.push_str("__shoal_examples = [\n");
    for example in examples {
        let expected = example
            .expected
            .as_deref()
            .map_or_else(|| "None".to_string(), python_literal);
        let callee = called_function(example)
            .filter(|name| !name.contains('.'))
            .map_or_else(|| "None".to_string(), python_literal);
        program.push_str(&format!(
            "    ({}, {}, {}),\n",
            python_literal(&example.source),
            expected,
            callee
        ));
    }
    program.push_str(
        "]\n\
         __shoal_checked = 0\n\
         for __shoal_source, __shoal_expected, __shoal_callee in __shoal_examples:\n\
         \x20   if __shoal_expected is None:\n\
         \x20       try:\n\
         \x20           exec(__shoal_source, __shoal_ns)\n\
         \x20       except BaseException:\n\
         \x20           pass\n\
         \x20       continue\n\
         \x20   try:\n\
         \x20       __shoal_want = eval(__shoal_expected, {})\n\
         \x20   except BaseException:\n\
         \x20       continue\n\
         \x20   if __shoal_callee is not None:\n\
         \x20       try:\n\
         \x20           __shoal_stubbed = dict(__shoal_ns)\n\
         \x20           __shoal_stubbed[__shoal_callee] = lambda *a, **k: None\n\
         \x20           eval(__shoal_source, __shoal_stubbed)\n\
         \x20       except BaseException:\n\
         \x20           continue\n\
         \x20   try:\n\
         \x20       if not __shoal_same(eval(__shoal_source, __shoal_ns), __shoal_want):\n\
         \x20           sys.exit(1)\n\
         \x20   except BaseException:\n\
         \x20       sys.exit(1)\n\
         \x20   __shoal_checked += 1\n\
         sys.exit(0 if __shoal_checked else 3)\n",
    );
    program
}

/// The sandbox every check runs in (`python3`, off the network where `unshare` works, with
/// limits; see `shoal-sandbox`), set up on first use; `None` where no Python 3 runs here.
fn sandbox() -> Option<&'static Sandbox> {
    static SANDBOX: OnceLock<Option<Sandbox>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| match Sandbox::new("python3", Isolation::probe()) {
            Ok(sandbox) => Some(sandbox),
            Err(e) => {
                tracing::warn!(error = %e, "vote cannot check code against examples");
                None
            }
        })
        .as_ref()
}

/// Runs the [`check_program`] `program` in the [`sandbox`]. `Some(true)` when it exits with
/// status 0 within `timeout`; `None` on status 3 (nothing checked) or when it cannot be run
/// here; `Some(false)` on any other status or when it runs past the timeout (it is killed
/// with everything it started).
fn run_python(program: &str, timeout: Duration) -> Option<bool> {
    let run = sandbox()?.run(program, timeout).ok()?;
    if run.timed_out {
        return Some(false);
    }
    match run.exit_code {
        Some(0) => Some(true),
        Some(3) => None,
        _ => Some(false),
    }
}

/// The examples of a prompt: its doctest examples when it has any with an expected value,
/// else its prose examples.
fn prompt_examples(prompt: &str) -> Vec<Example> {
    let doctests = doctest_examples(prompt);
    if doctests.iter().any(|e| e.expected.is_some()) {
        doctests
    } else {
        prose_examples(prompt)
    }
}

/// Whether `code` passes the examples in `prompt`: doctest examples (`>>> call(args)`
/// followed by the expected value), or where there are none, examples in prose
/// (`call(args) ==> value`, `call(args) == value`, …), as HumanEval prompts have them.
///
/// `None` when the prompt has no example with an expected value, or none that could be
/// checked (an expected value that is no valid Python expression, or a call that fails even
/// with the function replaced by a stub, is the prompt's fault and skipped), or when
/// `python3` cannot be started: nothing can be judged. Otherwise `Some(all passed)`: the
/// code is defined in a fresh namespace in a `python3` subprocess and each example's value
/// is compared with `==` against `eval(expected)`; a syntax error, an exception or running
/// past `timeout` (the child is killed) counts as failing.
///
/// Known limits: a prompt whose own examples are wrong or ambiguous (HumanEval/47, /116,
/// /130, /148) fails correct code; code that calls `os._exit(0)` passes. Of HumanEval's 164
/// canonical solutions, 129 pass, 4 fail that way and 31 prompts have no checkable examples.
///
/// The prompt's top-level imports (`from typing import List`) are prepended to the code, and
/// when the code does not define the function the examples call, the prompt is prepended
/// too (the code is then taken as a completion of the prompt, HumanEval style).
pub fn code_passes_examples(prompt: &str, code: &str, timeout: Duration) -> Option<bool> {
    let examples = prompt_examples(prompt);
    if examples.iter().all(|e| e.expected.is_none()) {
        return None;
    }
    let imports: Vec<&str> = prompt
        .lines()
        .filter(|line| {
            line.starts_with("import ") || (line.starts_with("from ") && line.contains(" import "))
        })
        .collect();
    let defines_callee = examples
        .iter()
        .find_map(called_function)
        .is_none_or(|name| {
            code.contains(&format!("def {name}(")) || code.contains(&format!("{name} ="))
        });
    let mut full_code = String::with_capacity(prompt.len() + code.len() + 64);
    if defines_callee {
        for import in imports {
            full_code.push_str(import);
            full_code.push('\n');
        }
    } else {
        full_code.push_str(prompt);
        full_code.push('\n');
    }
    full_code.push_str(code);
    full_code.push('\n');
    run_python(&check_program(&full_code, &examples), timeout)
}

/// The lowercase alphanumeric words of a text.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Texts with fewer words than this are compared by single words, not word pairs.
const BIGRAM_MIN_WORDS: usize = 3;

/// How similar two texts are, in [0, 1]: the Jaccard index of their lowercase word bigrams
/// (of single words when either has fewer than three words). Texts with the same words in
/// the same order (identical texts, or differing only in case and punctuation) give 1.
pub fn similarity(a: &str, b: &str) -> f32 {
    let words_a = words(a);
    let words_b = words(b);
    if words_a == words_b {
        return 1.0;
    }
    let use_bigrams = words_a.len() >= BIGRAM_MIN_WORDS && words_b.len() >= BIGRAM_MIN_WORDS;
    let grams = |w: &[String]| -> HashSet<String> {
        if use_bigrams {
            w.windows(2)
                .map(|pair| format!("{} {}", pair[0], pair[1]))
                .collect()
        } else {
            w.iter().cloned().collect()
        }
    };
    let set_a = grams(&words_a);
    let set_b = grams(&words_b);
    let union = set_a.union(&set_b).count();
    if union == 0 {
        return 0.0;
    }
    set_a.intersection(&set_b).count() as f32 / union as f32
}

/// How the winner of a [`vote`] was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VoteMethod {
    /// The most common extracted final answer (code, number or choice letter).
    Majority,
    /// Code that passes the prompt's own examples.
    CodeExamples,
    /// The answer most similar to the others.
    Similarity,
}

/// The result of a [`vote`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VoteOutcome {
    /// Index of the winning answer.
    pub winner: usize,
    /// How it was chosen.
    pub method: VoteMethod,
    /// How many answers agree with the winner, the winner included: the same final answer
    /// (for [`VoteMethod::CodeExamples`]: passing the examples), or for
    /// [`VoteMethod::Similarity`] a similarity of at least [`AGREEMENT_SIMILARITY`].
    pub support: usize,
}

/// Two answers with at least this [`similarity`] count as agreeing.
pub const AGREEMENT_SIMILARITY: f32 = 0.5;

/// Groups `keys` (one per answer, `None` for answers without one) by equal value and returns
/// the largest group as (index of its first member, size); ties go to the group whose first
/// member comes earliest.
fn majority<K: Eq + std::hash::Hash>(keys: &[Option<K>]) -> Option<(usize, usize)> {
    let mut groups: HashMap<&K, (usize, usize)> = HashMap::new();
    for (index, key) in keys.iter().enumerate() {
        if let Some(key) = key {
            groups.entry(key).or_insert((index, 0)).1 += 1;
        }
    }
    groups
        .into_values()
        .max_by(|(first_a, size_a), (first_b, size_b)| {
            size_a.cmp(size_b).then(first_b.cmp(first_a))
        })
}

/// The index among `candidates` (indices into `answers`) whose summed similarity to all other
/// answers is largest, ties to the earliest, with its support (answers at least
/// [`AGREEMENT_SIMILARITY`] similar, itself included).
fn most_similar(answers: &[String], candidates: &[usize]) -> Option<(usize, usize)> {
    let n = answers.len();
    let mut matrix = vec![0.0f32; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let s = similarity(&answers[i], &answers[j]);
            matrix[i * n + j] = s;
            matrix[j * n + i] = s;
        }
    }
    let mut best: Option<(usize, f32)> = None;
    for &i in candidates {
        let total: f32 = (0..n).filter(|&j| j != i).map(|j| matrix[i * n + j]).sum();
        if best.is_none_or(|(_, best_total)| total > best_total) {
            best = Some((i, total));
        }
    }
    let (winner, _) = best?;
    let support = 1
        + (0..n)
            .filter(|&j| j != winner && matrix[winner * n + j] >= AGREEMENT_SIMILARITY)
            .count();
    Some((winner, support))
}

/// The comparable final answer of a text that is not code: an explicit choice letter, else a
/// number.
fn final_text_answer(text: &str) -> Option<FinalAnswer> {
    extract_choice(text)
        .map(FinalAnswer::Choice)
        .or_else(|| extract_number(text).map(FinalAnswer::Number))
}

/// The final answer of a text: its code if it has a fenced block, else an explicit choice
/// letter, else a number.
pub fn final_answer(text: &str) -> Option<FinalAnswer> {
    extract_code(text)
        .map(|code| FinalAnswer::Code(normalise_code(&code)))
        .or_else(|| final_text_answer(text))
}

/// Picks the best of `answers` to `prompt`; see the module docs for the order of methods.
/// `code_timeout` bounds each run of code against the prompt's examples (they run in
/// parallel, one subprocess per distinct code). `None` only when `answers` is empty.
pub fn vote(prompt: &str, answers: &[String], code_timeout: Duration) -> Option<VoteOutcome> {
    if answers.is_empty() {
        return None;
    }
    let raw_codes: Vec<Option<String>> = answers.iter().map(|a| extract_code(a)).collect();
    let codes: Vec<Option<String>> = raw_codes
        .iter()
        .map(|code| code.as_deref().map(normalise_code))
        .collect();
    let with_code = codes.iter().filter(|c| c.is_some()).count();

    if with_code > 0 && prompt_examples(prompt).iter().any(|e| e.expected.is_some()) {
        let passed = run_checks(prompt, &raw_codes, &codes, code_timeout);
        let passing: Vec<usize> = (0..answers.len())
            .filter(|&i| passed[i] == Some(true))
            .collect();
        if !passing.is_empty() {
            let passing_codes: Vec<Option<&String>> = (0..answers.len())
                .map(|i| {
                    if passed[i] == Some(true) {
                        codes[i].as_ref()
                    } else {
                        None
                    }
                })
                .collect();
            let winner = match majority(&passing_codes) {
                Some((first, size)) if size >= 2 => first,
                _ => most_similar(answers, &passing).map_or(passing[0], |(winner, _)| winner),
            };
            return Some(VoteOutcome {
                winner,
                method: VoteMethod::CodeExamples,
                support: passing.len(),
            });
        }
    }

    if with_code * 2 >= answers.len() {
        if let Some((winner, support)) = majority(&codes) {
            if support >= 2 {
                return Some(VoteOutcome {
                    winner,
                    method: VoteMethod::Majority,
                    support,
                });
            }
        }
    }

    let finals: Vec<Option<FinalAnswer>> = answers.iter().map(|a| final_text_answer(a)).collect();
    let with_final = finals.iter().filter(|f| f.is_some()).count();
    if with_final * 2 >= answers.len() {
        if let Some((winner, support)) = majority(&finals) {
            return Some(VoteOutcome {
                winner,
                method: VoteMethod::Majority,
                support,
            });
        }
    }

    let everyone: Vec<usize> = (0..answers.len()).collect();
    let (winner, support) = most_similar(answers, &everyone)?;
    Some(VoteOutcome {
        winner,
        method: VoteMethod::Similarity,
        support,
    })
}

/// Runs [`code_passes_examples`] for every answer that has code, in parallel, once per
/// distinct normalised code; the result per answer (`None` without code).
fn run_checks(
    prompt: &str,
    raw_codes: &[Option<String>],
    normalised: &[Option<String>],
    timeout: Duration,
) -> Vec<Option<bool>> {
    // First answer index of each distinct normalised code.
    let mut distinct: HashMap<&str, usize> = HashMap::new();
    for (index, code) in normalised.iter().enumerate() {
        if let Some(code) = code {
            distinct.entry(code.as_str()).or_insert(index);
        }
    }
    let results: HashMap<&str, Option<bool>> = std::thread::scope(|scope| {
        let handles: Vec<(&str, std::thread::ScopedJoinHandle<'_, Option<bool>>)> = distinct
            .iter()
            .filter_map(|(&key, &index)| {
                let code = raw_codes[index].as_deref()?;
                Some((
                    key,
                    scope.spawn(move || code_passes_examples(prompt, code, timeout)),
                ))
            })
            .collect();
        handles
            .into_iter()
            .map(|(key, handle)| (key, handle.join().unwrap_or(Some(false))))
            .collect()
    });
    normalised
        .iter()
        .map(|code| {
            code.as_deref()
                .and_then(|c| results.get(c).copied().flatten())
        })
        .collect()
}

/// How much a model's own samples agree, in [0, 1], for the `confidence` strategy: the share
/// of samples with the most common final answer ([`final_answer`]) when at least half the
/// samples have one, else the mean pairwise [`similarity`]. 0 for no samples, 1 for one.
pub fn self_agreement(samples: &[String]) -> f32 {
    match samples.len() {
        0 => return 0.0,
        1 => return 1.0,
        _ => {}
    }
    let finals: Vec<Option<FinalAnswer>> = samples.iter().map(|s| final_answer(s)).collect();
    let with_final = finals.iter().filter(|f| f.is_some()).count();
    if with_final * 2 >= samples.len() {
        if let Some((_, size)) = majority(&finals) {
            return size as f32 / samples.len() as f32;
        }
    }
    let mut total = 0.0;
    let mut pairs = 0usize;
    for i in 0..samples.len() {
        for j in i + 1..samples.len() {
            total += similarity(&samples[i], &samples[j]);
            pairs += 1;
        }
    }
    total / pairs as f32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    const PROMPT: &str = "from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n    \"\"\" You're given a list of deposit and withdrawal operations on a bank account that starts with\n    zero balance. Your task is to detect if at any point the balance of account falls below zero, and\n    at that point function should return True. Otherwise it should return False.\n    >>> below_zero([1, 2, 3])\n    False\n    >>> below_zero([1, 2, -4, 5])\n    True\n    \"\"\"\n";

    const CORRECT: &str = "def below_zero(operations: List[int]) -> bool:\n    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n";

    const WRONG: &str =
        "def below_zero(operations: List[int]) -> bool:\n    return sum(operations) < 0\n";

    fn fenced(code: &str) -> String {
        format!("Here is the solution:\n```python\n{code}```\nIt walks the list once.")
    }

    fn strings(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn numbers_are_normalised() {
        let all: Vec<String> =
            numbers_in("1,234,567 and 3.50 and -0 and 007 and -0.0 and .5 and 1,2,3 and 5-3")
                .into_iter()
                .map(|n| n.normalised)
                .collect();
        assert_eq!(
            all,
            ["1234567", "3.5", "0", "7", "0", "0.5", "1", "2", "3", "5", "3"]
        );
        assert!(numbers_in("error E0382 in mp3").is_empty());
        assert_eq!(extract_number("It costs $1,000.00."), Some("1000".into()));
        assert_eq!(extract_number("It is 50%."), Some("50".into()));
        assert_eq!(extract_number("no numbers here"), None);
    }

    #[test]
    fn explicit_markers_beat_the_last_number() {
        assert_eq!(
            extract_number("So \\boxed{42} is it, after 3 steps."),
            Some("42".into())
        );
        assert_eq!(
            extract_number("x = \\boxed{-7} (checked 2 ways)"),
            Some("-7".into())
        );
        assert_eq!(
            extract_number("She pays 3 * 4 = 12 dollars.\n#### 12\nThanks 2"),
            Some("12".into())
        );
        assert_eq!(
            extract_number("The answer is 18. It took 3 steps."),
            Some("18".into())
        );
        assert_eq!(
            extract_number("Final answer: -5, found in 2 tries"),
            Some("-5".into())
        );
        assert_eq!(
            extract_number("2 + 3 = 5\nSo she has them after 2 days."),
            Some("5".into())
        );
        assert_eq!(
            extract_number("x = 3, then y = x+2 gives 5."),
            Some("5".into())
        );
        assert_eq!(
            extract_number("I counted 3 then 4 then 9"),
            Some("9".into())
        );
    }

    #[test]
    fn choice_letters_need_a_marker() {
        assert_eq!(extract_choice("The answer is (B)."), Some('B'));
        assert_eq!(extract_choice("Answer: **C**"), Some('C'));
        assert_eq!(
            extract_choice("I think the answer is A, no wait, the answer is D"),
            Some('D')
        );
        assert_eq!(extract_choice("B is tempting"), None);
        assert_eq!(extract_choice("The answer is Paris"), None);
    }

    #[test]
    fn code_blocks() {
        assert_eq!(extract_code("no code"), None);
        assert_eq!(extract_code("```python\n```"), None);
        let text = "Usage:\n```\nf(1)\n```\nSolution:\n```python\ndef f(x):\n    return x\n```\n";
        assert_eq!(extract_code(text).unwrap(), "def f(x):\n    return x");
        let rust_only = "```rust\nfn main() {}\n```";
        assert_eq!(extract_code(rust_only).unwrap(), "fn main() {}");
        let cut_off = "```python\ndef f(x):\n    return x";
        assert_eq!(extract_code(cut_off).unwrap(), "def f(x):\n    return x");
        assert_eq!(
            normalise_code("def f():\n\n    # comment\n    return 1   \n"),
            "def f():\n    return 1"
        );
    }

    #[test]
    fn doctest_examples_are_found() {
        let examples = doctest_examples(PROMPT);
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0].source, "below_zero([1, 2, 3])");
        assert_eq!(examples[0].expected.as_deref(), Some("False"));
        let inline_close = "def f():\n    \"\"\"\n    >>> f()\n    3 \"\"\"\n";
        assert_eq!(
            doctest_examples(inline_close)[0].expected.as_deref(),
            Some("3")
        );
        assert_eq!(called_function(&examples[0]), Some("below_zero"));
        let multi_line = "def f():\n    \"\"\"\n    >>> f(['a'])\n    [\"x ] y\",\n    \"z\"]\n    Text after.\n    \"\"\"\n";
        let examples = doctest_examples(multi_line);
        assert_eq!(examples[0].expected.as_deref(), Some("[\"x ] y\", \"z\"]"));
        let comparisons =
            "def g(x):\n    \"\"\"\n    >>> g(1) == 2\n    >>> g([]) [1]\n\n    \"\"\"\n";
        let examples = doctest_examples(comparisons);
        assert_eq!(examples[0].expected.as_deref(), Some("True"));
        assert_eq!(examples[1].expected, None);
    }

    #[test]
    fn python_checks_correct_and_wrong_code() {
        assert_eq!(code_passes_examples(PROMPT, CORRECT, TIMEOUT), Some(true));
        assert_eq!(code_passes_examples(PROMPT, WRONG, TIMEOUT), Some(false));
        assert_eq!(
            code_passes_examples("def f():\n    pass\n", CORRECT, TIMEOUT),
            None
        );
    }

    #[test]
    fn python_checks_comparison_examples_and_ignores_broken_statements() {
        let prompt = "def double(x):\n    \"\"\"\n    >>> double(2) == 4\n    >>> double(3) == 6\n    >>> double(1) [2]\n    \"\"\"\n";
        let right = "def double(x):\n    return 2 * x\n";
        let wrong = "def double(x):\n    return x + 2\n";
        assert_eq!(code_passes_examples(prompt, right, TIMEOUT), Some(true));
        assert_eq!(code_passes_examples(prompt, wrong, TIMEOUT), Some(false));
    }

    #[test]
    fn python_check_of_a_completion_uses_the_prompt() {
        let body = "    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n";
        assert_eq!(code_passes_examples(PROMPT, body, TIMEOUT), Some(true));
    }

    #[test]
    fn python_syntax_errors_and_exceptions_fail() {
        let syntax_error = "def below_zero(operations) -> bool\n    return False\n";
        assert_eq!(
            code_passes_examples(PROMPT, syntax_error, TIMEOUT),
            Some(false)
        );
        let raises = "def below_zero(operations):\n    raise ValueError('no')\n";
        assert_eq!(code_passes_examples(PROMPT, raises, TIMEOUT), Some(false));
        let exits = "import sys\ndef below_zero(operations):\n    sys.exit(0)\n";
        assert_eq!(code_passes_examples(PROMPT, exits, TIMEOUT), Some(false));
    }

    #[test]
    fn python_check_times_out() {
        let forever = "def below_zero(operations):\n    while True:\n        pass\n";
        let started = Instant::now();
        assert_eq!(
            code_passes_examples(PROMPT, forever, Duration::from_millis(700)),
            Some(false)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn python_floats_and_strings() {
        let prompt = "def truncate_number(number: float) -> float:\n    \"\"\"\n    >>> truncate_number(3.5)\n    0.5\n    >>> truncate_number(1.1)\n    0.1\n    \"\"\"\n";
        let code = "def truncate_number(number: float) -> float:\n    return number % 1.0\n";
        assert_eq!(code_passes_examples(prompt, code, TIMEOUT), Some(true));
        let prompt = "def greet(name):\n    \"\"\"\n    >>> greet('Ana \"A\" Ñ')\n    'hi Ana \"A\" Ñ'\n    \"\"\"\n";
        let code = "def greet(name):\n    return 'hi ' + name\n";
        assert_eq!(code_passes_examples(prompt, code, TIMEOUT), Some(true));
    }

    #[test]
    fn similarity_bounds() {
        assert_eq!(similarity("The cat sat.", "the cat SAT"), 1.0);
        assert_eq!(similarity("", ""), 1.0);
        assert_eq!(similarity("alpha beta gamma", "delta epsilon zeta"), 0.0);
        let s = similarity("the quick brown fox jumps", "the quick brown dog jumps");
        assert!(s > 0.2 && s < 1.0, "{s}");
        let short = similarity("Paris", "Paris France");
        assert!((short - 0.5).abs() < 1e-6, "{short}");
        assert_eq!(similarity("Paris", ""), 0.0);
    }

    #[test]
    fn vote_prefers_code_that_passes_examples() {
        let answers = vec![
            fenced(WRONG),
            fenced(WRONG),
            fenced(CORRECT),
            "I am not sure.".to_string(),
        ];
        let outcome = vote(PROMPT, &answers, TIMEOUT).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 2,
                method: VoteMethod::CodeExamples,
                support: 1
            }
        );
    }

    #[test]
    fn vote_takes_the_most_common_passing_code() {
        let alternative = "def below_zero(operations):\n    import itertools\n    return any(b < 0 for b in itertools.accumulate(operations))\n";
        let answers = vec![
            fenced(alternative),
            fenced(CORRECT),
            fenced(WRONG),
            format!("Sure.\n```python\n{CORRECT}\n# done\n```"),
        ];
        let outcome = vote(PROMPT, &answers, TIMEOUT).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 1,
                method: VoteMethod::CodeExamples,
                support: 3
            }
        );
    }

    #[test]
    fn vote_without_examples_uses_code_majority() {
        let prompt = "Write a function that adds two numbers.";
        let add = "def add(a, b):\n    return a + b\n";
        let answers = vec![
            fenced("def add(a, b):\n    return a - b\n"),
            fenced(add),
            fenced(add),
        ];
        let outcome = vote(prompt, &answers, TIMEOUT).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 1,
                method: VoteMethod::Majority,
                support: 2
            }
        );
    }

    #[test]
    fn vote_majority_over_numbers() {
        let answers = strings(&[
            "He has 3 + 4 = 7 apples.",
            "The answer is 8.",
            "#### 7",
            "Let me think. 7",
            "I don't know",
        ]);
        let outcome = vote("How many apples?", &answers, TIMEOUT).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Majority,
                support: 3
            }
        );
    }

    #[test]
    fn vote_number_ties_go_to_the_earliest() {
        let answers = strings(&["It is 8.", "It is 7.", "It is 7.0", "The answer is 8"]);
        let outcome = vote("?", &answers, TIMEOUT).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Majority,
                support: 2
            }
        );
    }

    #[test]
    fn vote_majority_over_choices() {
        let answers = strings(&["The answer is (B)", "Answer: C", "answer is B."]);
        let outcome = vote("Pick one", &answers, TIMEOUT).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Majority,
                support: 2
            }
        );
    }

    #[test]
    fn vote_falls_back_to_similarity() {
        let answers = strings(&[
            "Bananas are a good source of potassium.",
            "Paris is the capital city of France and its largest city.",
            "The capital city of France is Paris, which is also its largest city.",
            "Paris is the capital city of France.",
        ]);
        let outcome = vote("What is the capital of France?", &answers, TIMEOUT).unwrap();
        assert_eq!(outcome.method, VoteMethod::Similarity);
        assert_ne!(outcome.winner, 0);
        assert!(outcome.support >= 1);
    }

    #[test]
    fn vote_edge_cases() {
        assert_eq!(vote("q", &[], TIMEOUT), None);
        let one = vote("q", &strings(&["only one"]), TIMEOUT).unwrap();
        assert_eq!(
            one,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Similarity,
                support: 1
            }
        );
        let serialised = serde_json::to_value(one).unwrap();
        assert_eq!(serialised["method"], "similarity");
    }

    #[test]
    fn self_agreement_by_final_answer_or_similarity() {
        assert_eq!(self_agreement(&[]), 0.0);
        assert_eq!(self_agreement(&strings(&["anything"])), 1.0);
        let numbers = strings(&["#### 12", "so 12", "The answer is 13", "= 12"]);
        assert!((self_agreement(&numbers) - 0.75).abs() < 1e-6);
        let identical = strings(&["The sky is blue.", "the sky is blue"]);
        assert_eq!(self_agreement(&identical), 1.0);
        let different = strings(&["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]);
        assert_eq!(self_agreement(&different), 0.0);
        let code = vec![fenced(CORRECT), fenced(CORRECT), fenced(WRONG)];
        assert!((self_agreement(&code) - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn final_answer_kinds() {
        assert_eq!(
            final_answer("```python\nx = 1\n```"),
            Some(FinalAnswer::Code("x = 1".into()))
        );
        assert_eq!(
            final_answer("The answer is (C)"),
            Some(FinalAnswer::Choice('C'))
        );
        assert_eq!(
            final_answer("It is 1,000"),
            Some(FinalAnswer::Number("1000".into()))
        );
        assert_eq!(final_answer("nothing"), None);
    }

    #[test]
    fn prose_examples_are_found() {
        let prompt = "def x_or_y(n, x, y):\n    \"\"\"Examples:\n    for x_or_y(7, 34, 12) == 34\n    x_or_y(7, 34, 12) == 34\n    x_or_y(15, 8, 5) ==> 5.\n    x_or_y(2, 1, 0) \u{279e} 1,\n    x_or_y(4, 'a', \"b)\") should return \"b)\"\n    x_or_y(4,\n           5, 6) => 6\n    x_or_y(n) means something\n    \"\"\"\n";
        let examples = prose_examples(prompt);
        let pairs: Vec<(&str, &str)> = examples
            .iter()
            .map(|e| (e.source.as_str(), e.expected.as_deref().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("x_or_y(7, 34, 12)", "34"),
                // "5." stays: it is a valid float, equal to 5.
                ("x_or_y(15, 8, 5)", "5."),
                ("x_or_y(2, 1, 0)", "1"),
                ("x_or_y(4, 'a', \"b)\")", "\"b)\""),
                ("x_or_y(4, 5, 6)", "6"),
            ]
        );
    }

    #[test]
    fn python_checks_prose_examples() {
        let prompt = "def solve(s):\n    \"\"\"Reverse the case of letters.\n    Examples\n    solve(\"ab\") = \"AB\"\n    solve(\"#a@C\") = \"#A@c\"\n    \"\"\"\n";
        let right = "def solve(s):\n    return s.swapcase()\n";
        let wrong = "def solve(s):\n    return s.upper()\n";
        assert_eq!(code_passes_examples(prompt, right, TIMEOUT), Some(true));
        assert_eq!(code_passes_examples(prompt, wrong, TIMEOUT), Some(false));
        let answers = vec![fenced(wrong), fenced(right)];
        let outcome = vote(prompt, &answers, TIMEOUT).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 1,
                method: VoteMethod::CodeExamples,
                support: 1
            }
        );
        // Unquoted arguments fail even against a stub: the examples are skipped, nothing is
        // judged.
        let unquoted = "def is_happy(s):\n    \"\"\"\n    is_happy(a) => False\n    is_happy(abc) => True\n    \"\"\"\n";
        let code = "def is_happy(s):\n    return len(s) >= 3\n";
        assert_eq!(code_passes_examples(unquoted, code, TIMEOUT), None);
    }
}
