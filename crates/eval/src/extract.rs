//! From a model's reply to a program: which code to run, and how it joins the problem's
//! prompt. Pure string work, no I/O; the fenced blocks are `shoal-sandbox`'s, as every
//! use of model-written code finds them.
//!
//! - The code is the reply's fenced block (```` ```python ````; a block cut off by the token
//!   limit counts), preferring a Python block that defines the entry point; without a
//!   fence, the whole reply.
//! - An `if __name__ == "__main__":` block is dropped: the program runs as `__main__`, and
//!   a demo that reads stdin or exits early must not decide the verdict.
//! - If the code defines `def ENTRY_POINT`, the program is the prompt followed by that
//!   code: the prompt brings the imports and any helper the problem defines (HumanEval/10,
//!   38 and 50 call one), and its stub of the entry point (a docstring only) is replaced
//!   by the model's definition.
//! - Otherwise the reply is the body of the prompt's function, and the program is the
//!   prompt followed by it (indented by four spaces when it starts at column 0).

use shoal_sandbox::is_python;

/// A program to run, and the code it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Program {
    /// The code taken from the reply (after the steps above).
    pub(crate) code: String,
    /// Whether `code` defines the entry point (else it continued the prompt).
    pub(crate) full_definition: bool,
    /// The whole program: prompt and code.
    pub(crate) source: String,
}

/// The program for a `reply` to a problem with this `prompt` and `entry_point`.
pub(crate) fn build_program(prompt: &str, reply: &str, entry_point: &str) -> Program {
    let code = strip_main_guard(&pick_code(reply, entry_point));
    let dedented = dedent(&code);
    if defines(&dedented, entry_point) {
        let source = format!("{}\n\n\n{}\n", prompt.trim_end(), dedented.trim_end());
        return Program {
            code: dedented,
            full_definition: true,
            source,
        };
    }
    let body = as_body(&code);
    let sep = if prompt.ends_with('\n') { "" } else { "\n" };
    let source = format!("{prompt}{sep}{}\n", body.trim_end());
    Program {
        code: body,
        full_definition: false,
        source,
    }
}

/// The code in a reply: the best fenced block, else the whole reply.
fn pick_code(reply: &str, entry_point: &str) -> String {
    let blocks = shoal_sandbox::fenced_blocks(reply);
    let chosen = blocks
        .iter()
        .find(|b| is_python(&b.lang) && defines(&b.code, entry_point))
        .or_else(|| blocks.iter().find(|b| defines(&b.code, entry_point)))
        .or_else(|| blocks.iter().find(|b| is_python(&b.lang)))
        .or_else(|| blocks.first());
    match chosen {
        Some(b) => b.code.clone(),
        None => reply.to_string(),
    }
}

/// Whether some line of `code` is `def ENTRY_POINT(`.
fn defines(code: &str, entry_point: &str) -> bool {
    code.lines().any(|line| {
        line.trim_start()
            .strip_prefix("def ")
            .map(str::trim_start)
            .and_then(|rest| rest.strip_prefix(entry_point))
            .is_some_and(|rest| rest.trim_start().starts_with('('))
    })
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// `code` without the leading whitespace all its non-blank lines share.
fn dedent(code: &str) -> String {
    let common = code
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| &l[..indent_of(l)])
        .reduce(|a, b| {
            let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            &a[..n]
        })
        .unwrap_or("")
        .len();
    if common == 0 {
        return code.to_string();
    }
    code.lines()
        .map(|l| l.get(common..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A function body: indented by four spaces if its first line is at column 0.
fn as_body(code: &str) -> String {
    let first = code.lines().find(|l| !l.trim().is_empty());
    match first {
        Some(l) if indent_of(l) == 0 => code
            .lines()
            .map(|l| {
                if l.trim().is_empty() {
                    String::new()
                } else {
                    format!("    {l}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => code.to_string(),
    }
}

/// `code` without top-level `if __name__ == "__main__":` blocks.
fn strip_main_guard(code: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in code.lines() {
        let top_level = !line.trim().is_empty() && indent_of(line) == 0;
        if top_level {
            let t = line.replace(' ', "");
            skipping = t.starts_with("if__name__==")
                || t.starts_with("if'__main__'==")
                || t.starts_with("if\"__main__\"==");
        }
        if !skipping {
            out.push(line);
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT: &str = "from typing import List\n\n\ndef helper(x: int) -> int:\n    return x + 1\n\n\ndef add_one(xs: List[int]) -> List[int]:\n    \"\"\" Add one to each.\n    >>> add_one([1])\n    [2]\n    \"\"\"\n";

    #[test]
    fn a_fenced_definition_follows_the_prompt() {
        let reply = "Here it is:\n```python\nfrom typing import List\n\ndef add_one(xs: List[int]) -> List[int]:\n    return [helper(x) for x in xs]\n```\nThis adds one.";
        let p = build_program(PROMPT, reply, "add_one");
        assert!(p.full_definition);
        assert_eq!(
            p.code,
            "from typing import List\n\ndef add_one(xs: List[int]) -> List[int]:\n    return [helper(x) for x in xs]"
        );
        assert!(p.source.starts_with(PROMPT.trim_end()));
        assert!(p.source.ends_with("return [helper(x) for x in xs]\n"));
        assert!(!p.source.contains("```"));
        assert!(!p.source.contains("This adds one"));
    }

    #[test]
    fn the_block_that_defines_the_entry_point_wins() {
        let reply = "```\n$ pip install nothing\n```\n```python\nprint(1)\n```\n```python\ndef add_one(xs):\n    return [x + 1 for x in xs]\n```";
        let p = build_program(PROMPT, reply, "add_one");
        assert!(p.full_definition);
        assert_eq!(p.code, "def add_one(xs):\n    return [x + 1 for x in xs]");
    }

    #[test]
    fn a_prefix_of_the_name_is_not_the_entry_point() {
        assert!(!defines("def add_one_more(x):\n    pass", "add_one"));
        assert!(defines("    def add_one (x):\n        pass", "add_one"));
        assert!(!defines("# def add_one", "add_one"));
    }

    #[test]
    fn a_body_continues_the_prompt() {
        let reply = "    return [x + 1 for x in xs]\n";
        let p = build_program(PROMPT, reply, "add_one");
        assert!(!p.full_definition);
        assert_eq!(
            p.source,
            format!("{PROMPT}    return [x + 1 for x in xs]\n")
        );
    }

    #[test]
    fn a_fenced_body_at_column_zero_is_indented() {
        let reply = "```python\nresult = [x + 1 for x in xs]\nreturn result\n```";
        let p = build_program(PROMPT, reply, "add_one");
        assert!(!p.full_definition);
        assert!(p
            .source
            .ends_with("    \"\"\"\n    result = [x + 1 for x in xs]\n    return result\n"));
    }

    #[test]
    fn an_unterminated_block_runs_to_the_end() {
        let reply = "```python\ndef add_one(xs):\n    return [x + 1 for x in xs]";
        let p = build_program(PROMPT, reply, "add_one");
        assert!(p.full_definition);
        assert_eq!(p.code, "def add_one(xs):\n    return [x + 1 for x in xs]");
    }

    #[test]
    fn an_indented_block_is_dedented() {
        let reply = "1. Code:\n   ```python\n   def add_one(xs):\n       return xs\n   ```";
        let p = build_program(PROMPT, reply, "add_one");
        assert!(p.full_definition);
        assert_eq!(p.code, "def add_one(xs):\n    return xs");
    }

    #[test]
    fn the_main_guard_is_dropped() {
        let reply = "```python\ndef add_one(xs):\n    return xs\n\nif __name__ == \"__main__\":\n    print(add_one([int(input())]))\n\n    exit(1)\nprint('kept')\n```";
        let p = build_program(PROMPT, reply, "add_one");
        assert_eq!(p.code, "def add_one(xs):\n    return xs\n\nprint('kept')");
    }

    #[test]
    fn without_a_fence_the_whole_reply_is_the_code() {
        let reply = "def add_one(xs):\n    return xs";
        let p = build_program(PROMPT, reply, "add_one");
        assert!(p.full_definition);
        assert_eq!(p.code, reply);
    }

    #[test]
    fn an_empty_reply_leaves_the_stub() {
        let p = build_program(PROMPT, "", "add_one");
        assert!(!p.full_definition);
        assert_eq!(p.source, format!("{PROMPT}\n"));
    }
}
