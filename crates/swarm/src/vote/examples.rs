//! A prompt's own examples (doctests, or calls in prose with their expected values) and
//! checking code against them in the sandbox.

use std::sync::OnceLock;
use std::time::Duration;

use shoal_sandbox::Sandbox;

/// One doctest example from a prompt: the source after `>>>` and the expected output, or
/// `None` for a line without output (run for its effect; its errors are ignored, since
/// prompts also use `>>>` loosely in prose).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Example {
    pub(crate) source: String,
    pub(crate) expected: Option<String>,
}

/// The characters of `text` outside string literals (`'…'` or `"…"`, with backslash
/// escapes), each with its byte offset; the quotes themselves are left out.
pub(crate) fn outside_strings(text: &str) -> impl Iterator<Item = (usize, char)> + '_ {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    text.char_indices().filter(move |&(_, c)| {
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
            None if matches!(c, '\'' | '"') => quote = Some(c),
            None => return true,
        }
        false
    })
}

/// The brackets of `text` outside string literals, each with its byte offset and the depth
/// after it (a closing bracket with depth 0 closes the first one opened).
fn brackets(text: &str) -> impl Iterator<Item = (usize, char, i32)> + '_ {
    let mut depth = 0;
    outside_strings(text).filter_map(move |(at, c)| {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => return None,
        }
        Some((at, c, depth))
    })
}

/// How many brackets `text` leaves open, outside string literals.
pub(crate) fn open_brackets(text: &str) -> i32 {
    brackets(text).last().map_or(0, |(_, _, depth)| depth)
}

/// The doctest examples of a prompt, in order.
///
/// The expected output is the line after `>>>`, continued over the following lines while
/// its brackets are open (a long list printed over two lines). A `>>> a == b` line without
/// output, as some HumanEval prompts write their examples, expects `True`.
pub(super) fn doctest_examples(prompt: &str) -> Vec<Example> {
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
        let source = without_comment(source.trim());
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

/// `text` up to its first `#` outside string literals (a comment: `f(5) # because…`).
fn without_comment(text: &str) -> &str {
    let end = outside_strings(text)
        .find(|&(_, c)| c == '#')
        .map_or(text.len(), |(at, _)| at);
    text[..end].trim_end()
}

/// An expected value as prose examples write it, made a Python expression: without a
/// trailing comment; the last step of a worked sum (`19 - 5 - 6 = 8` → `8`: the text after
/// the last `=` that is no comparison, outside brackets and strings, where only arithmetic
/// comes before it); and JavaScript's or JSON's `true`, `false`, `null` as `True`, `False`,
/// `None` (HumanEval/76 writes `is_simple_power(1, 4) => true`). Doctest outputs are
/// Python's own and are left as they are.
fn python_value(text: &str) -> String {
    let text = without_comment(text);
    let mut depth = 0;
    let mut last_assign = None;
    let bytes = text.as_bytes();
    for (at, c) in outside_strings(text) {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            '=' if depth == 0 => {
                let before = at.checked_sub(1).map(|i| bytes[i]);
                let after = bytes.get(at + 1).copied();
                let comparison =
                    matches!(before, Some(b'=' | b'<' | b'>' | b'!' | b':')) || after == Some(b'=');
                if !comparison {
                    last_assign = Some(at);
                }
            }
            _ => {}
        }
    }
    // `5, where n = 3` is no worked sum: its value does not evaluate and the check skips it.
    let arithmetic = |steps: &str| {
        steps
            .chars()
            .all(|c| c.is_ascii_digit() || " +-*/%().=".contains(c))
    };
    let text = match last_assign {
        Some(at) if !text[at + 1..].trim().is_empty() && arithmetic(&text[..at]) => {
            text[at + 1..].trim()
        }
        _ => text,
    };
    // Words outside strings, replaced where JavaScript spells a Python constant.
    let outside: Vec<usize> = outside_strings(text).map(|(at, _)| at).collect();
    let mut value = String::with_capacity(text.len());
    let mut word_start: Option<usize> = None;
    let flush = |value: &mut String, word: &str| {
        value.push_str(match word {
            "true" => "True",
            "false" => "False",
            "null" => "None",
            other => other,
        })
    };
    for (at, c) in text.char_indices() {
        let in_word = (c.is_ascii_alphanumeric() || c == '_') && outside.binary_search(&at).is_ok();
        match (word_start, in_word) {
            (None, true) => word_start = Some(at),
            (Some(start), false) => {
                flush(&mut value, &text[start..at]);
                word_start = None;
                value.push(c);
            }
            (Some(_), true) => {}
            (None, false) => value.push(c),
        }
    }
    if let Some(start) = word_start {
        flush(&mut value, &text[start..]);
    }
    value
}

/// Where the call at the start of `text` ends: the byte after the `)` that closes its first
/// `(`, outside string literals.
pub(super) fn call_end(text: &str) -> Option<usize> {
    let open = text.find('(')?;
    brackets(&text[open..])
        .find(|&(_, c, depth)| depth == 0 && matches!(c, ')' | ']' | '}'))
        .map(|(at, c, _)| open + at + c.len_utf8())
}

/// What separates a call from its result in prose examples (`f(1) ==> 2`, `f(1) ➞ 2`,
/// `f(1) should return 2`), longest first where one is a prefix of another.
pub(super) const PROSE_SEPARATORS: &[&str] = &[
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
pub(super) fn prose_examples(prompt: &str) -> Vec<Example> {
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
        let value = python_value(value.trim_end_matches("\"\"\"").trim());
        if value.is_empty() {
            continue;
        }
        examples.push(Example {
            source: without_comment(text[..end].trim()).to_string(),
            expected: Some(value),
        });
    }
    examples
}

/// A Python string literal for `text` (a JSON string is one: same escapes).
pub(crate) fn python_literal(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The name of the function the first example calls (`fib` in `fib(10)`).
pub(crate) fn called_function(example: &Example) -> Option<&str> {
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
pub(super) fn check_program(code: &str, examples: &[Example]) -> String {
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

/// The sandbox every check runs in (`python3` in `shoal-sandbox`'s namespaces, proven by a
/// trial run), set up on first use; else why there is none here (then no code runs).
pub fn sandbox() -> Result<&'static Sandbox, &'static str> {
    static SANDBOX: OnceLock<Result<Sandbox, String>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| {
            let sandbox = Sandbox::isolated("python3").map_err(|e| {
                tracing::warn!(error = %e, "vote will not run code against examples");
                e.to_string()
            })?;
            if !sandbox.limits_processes() {
                tracing::warn!(
                    python = sandbox.python(),
                    "this node runs as root and no interpreter nobody can read was found: \
                     checked code is not held to a process limit (install the system's \
                     python3, or run shoal as a user)"
                );
            }
            Ok(sandbox)
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Runs the [`check_program`] `program` in the [`sandbox`]. `Some(true)` when it exits with
/// status 0 within `timeout`; `None` on status 3 (nothing checked) or when it cannot be run
/// here; `Some(false)` on any other status or when it runs past the timeout (it is killed
/// with everything it started).
pub(super) fn run_python(program: &str, timeout: Duration) -> Option<bool> {
    let run = sandbox().ok()?.run(program, timeout).ok()?;
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
pub(crate) fn prompt_examples(prompt: &str) -> Vec<Example> {
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
/// there is no [`sandbox`] here: nothing can be judged. Otherwise `Some(all passed)`: the
/// code is defined in a fresh namespace in a sandboxed `python3` and each example's value
/// is compared with `==` against `eval(expected)`; a syntax error, an exception or running
/// past `timeout` (the child is killed) counts as failing.
///
/// Known limits: a prompt whose own examples are wrong or ambiguous (HumanEval/47, /116,
/// /130, /148) fails correct code; code that calls `os._exit(0)` passes. Of HumanEval's 164
/// canonical solutions, 131 pass, 4 fail that way and 29 prompts have no checkable examples.
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
