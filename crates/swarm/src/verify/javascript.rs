//! JavaScript tasks: finding the function to write, the tests agents write for it
//! (`assertEqual(f(…), expected);`), and the Node.js program that runs one candidate against
//! every check, reporting as the Python one does ([`super::Behaviour`]).

use std::time::Duration;

use super::program::REPORT_MARKER;
use crate::vote::{open_brackets, python_literal};

/// The fence languages taken for JavaScript.
pub(super) fn is_javascript(lang: &str) -> bool {
    matches!(
        lang,
        "javascript" | "js" | "node" | "nodejs" | "mjs" | "cjs"
    )
}

/// The names of the functions `code` defines at the start of a line: `function NAME(`,
/// `async function NAME(`, `const|let|var NAME = (…) =>` or `= function`.
pub(super) fn defined_functions(code: &str) -> Vec<String> {
    let name_of = |rest: &str| -> Option<String> {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(rest.len());
        (end > 0).then(|| rest[..end].to_owned())
    };
    code.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let line = line.strip_prefix("async ").unwrap_or(line);
            if let Some(rest) = line.strip_prefix("function ") {
                let rest = rest.trim_start().trim_start_matches('*').trim_start();
                return name_of(rest);
            }
            let rest = ["const ", "let ", "var "]
                .iter()
                .find_map(|kw| line.strip_prefix(kw))?;
            let name = name_of(rest)?;
            let value = rest[name.len()..]
                .trim_start()
                .strip_prefix('=')?
                .trim_start();
            // An arrow function: its parameters (one name, or a bracketed list) then `=>`.
            let params = value.split("=>").next().unwrap_or_default().trim();
            let arrow = value.contains("=>")
                && (params.starts_with('(') && params.ends_with(')')
                    || name_of(params).is_some_and(|p| p == params));
            let is_function = value.starts_with("function") || value.starts_with("async") || arrow;
            is_function.then_some(name)
        })
        .collect()
}

/// Whether `code` defines `name` ([`defined_functions`]).
pub(super) fn defines(code: &str, name: &str) -> bool {
    defined_functions(code).iter().any(|d| d == name)
}

/// What a test writer is asked for a JavaScript function.
pub(super) fn tests_prompt(prompt_code: &str, entry_point: &str) -> String {
    format!(
        "```javascript\n{}\n```\n\n\
         Do not implement `{entry_point}`: it is written elsewhere. Write 6 to 10 test \
         lines that test it, one per line, each calling `{entry_point}` with concrete \
         arguments and comparing the result with the exact expected value, like \
         `assertEqual({entry_point}(...), expected);`. Work out each expected value carefully \
         from the description and its examples. Cover typical cases and edge cases.\n\
         Answer with only those lines, in one ```javascript block.",
        prompt_code.trim_end()
    )
}

/// The assertion calls a JavaScript test may be written with.
const ASSERTIONS: &[&str] = &[
    "assertEqual(",
    "assert.deepStrictEqual(",
    "assert.strictEqual(",
    "assert.deepEqual(",
    "assert.equal(",
    "assert.ok(",
    "assert(",
    "console.assert(",
];

/// The test statements of a JavaScript reply's `lines`: a line that starts with one of the
/// assertion calls, continued while its brackets are open, that calls `entry_point`.
pub(super) fn parse_statements(lines: &[&str], entry_point: &str) -> Vec<String> {
    let call = format!("{entry_point}(");
    let mut tests = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index].trim();
        index += 1;
        if !ASSERTIONS.iter().any(|a| line.starts_with(a)) {
            continue;
        }
        let mut statement = line.to_owned();
        while open_brackets(&statement) > 0 && index < lines.len() {
            statement.push(' ');
            statement.push_str(lines[index].trim());
            index += 1;
        }
        let statement = statement.trim_end_matches(';').trim_end();
        if statement.contains(&call) && open_brackets(statement) == 0 {
            tests.push(format!("{statement};"));
        }
    }
    tests
}

/// The Node.js program that defines `code` and runs each check (one statement with an
/// assertion call), each under its own `per_check` limit, then prints the behaviour as JSON
/// after [`REPORT_MARKER`]. The first assertion a check makes is its verdict and its
/// observed value (`util.inspect` of the actual value); numbers compare within 1e-6
/// relative. A candidate's `module.exports`, `require` and `console.log` work.
pub(super) fn behaviour_program(code: &str, checks: &[String], per_check: Duration) -> String {
    let mut program = String::from(PROGRAM_HEAD);
    program.push_str(&format!(
        "const CODE = {};\nconst CHECKS = [\n",
        python_literal(code)
    ));
    for check in checks {
        program.push_str(&format!("  {},\n", python_literal(check)));
    }
    program.push_str(&format!(
        "];\nconst LIMIT_MS = {};\nconst MARKER = {};\n",
        per_check.as_millis().max(1),
        python_literal(REPORT_MARKER)
    ));
    program.push_str(PROGRAM_TAIL);
    program
}

const PROGRAM_HEAD: &str = r#""use strict";
const vm = require("vm");
const util = require("util");
let current = null;
function show(value) {
  let text;
  try { text = util.inspect(value, { depth: 4, breakLength: Infinity }); } catch (e) { text = "<no inspect>"; }
  return text.slice(0, 200);
}
function same(got, want) {
  if (util.isDeepStrictEqual(got, want)) return true;
  if (typeof got === "number" && typeof want === "number") {
    return Math.abs(got - want) <= 1e-9 + 1e-6 * Math.abs(want);
  }
  return false;
}
function record(got, want, compare) {
  if (current === null || current.recorded) return;
  current.recorded = true;
  current.out = show(got);
  current.ok = compare ? same(got, want) : Boolean(got);
  if (!current.ok) {
    current.err = compare ? "got " + show(got) + ", expected " + show(want) : "the condition is " + show(got);
  }
}
const check = (cond) => record(cond, undefined, false);
globalThis.assertEqual = (got, want) => record(got, want, true);
globalThis.assert = Object.assign(check, {
  ok: check,
  equal: (got, want) => record(got, want, true),
  strictEqual: (got, want) => record(got, want, true),
  deepEqual: (got, want) => record(got, want, true),
  deepStrictEqual: (got, want) => record(got, want, true),
});
console.assert = check;
globalThis.module = { exports: {} };
globalThis.exports = globalThis.module.exports;
globalThis.require = require;
"#;

const PROGRAM_TAIL: &str = r#"const report = { defined: true, error: "", checks: [] };
try {
  vm.runInThisContext(CODE, { filename: "candidate.js", timeout: LIMIT_MS * 2 });
} catch (e) {
  report.defined = false;
  report.error = String((e && e.stack) || e).slice(-800);
}
if (report.defined) {
  for (const source of CHECKS) {
    current = { ok: false, out: "", err: "", recorded: false };
    try {
      vm.runInThisContext(source, { filename: "check.js", timeout: LIMIT_MS });
      if (!current.recorded) {
        current.out = "no assertion";
        current.err = "the check asserted nothing";
      }
    } catch (e) {
      if (!current.recorded) {
        const timedOut = e && e.code === "ERR_SCRIPT_EXECUTION_TIMEOUT";
        current.out = timedOut ? "timeout" : "raise " + ((e && e.name) || typeof e);
        current.err = timedOut ? "it did not finish in time" : String((e && e.stack) || e).slice(-800);
      }
    }
    report.checks.push({ ok: current.ok, out: current.out, err: current.err });
  }
}
process.stdout.write("\n" + MARKER + JSON.stringify(report) + "\n", () => process.exit(0));
"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::verify::{node, run_behaviours, Language, Task};

    #[test]
    fn each_check_reports_what_the_function_did() {
        if let Err(e) = node() {
            // CI installs node (for opencode); a machine without it says so and skips.
            assert!(
                std::process::Command::new("node")
                    .arg("--version")
                    .output()
                    .is_err(),
                "node is installed but does not run in the sandbox: {e}"
            );
            return;
        }
        let code = "const half = (x) => {\n  console.log('noise', x);\n  if (x < 0) throw new RangeError('negative');\n  if (x === 7) { while (true) {} }\n  return x / 2;\n};\nmodule.exports = { half };\n";
        let checks: Vec<String> = [
            "assertEqual(half(4), 2);",
            "assert.strictEqual(half(1), 0.5000000001);",
            "assert.deepStrictEqual(half(2), 5);",
            "assertEqual(half(-1), 0);",
            "assertEqual(half(7), 1);",
            "assert(half(2) > 0);",
            "half(3);",
            "assertEqual(half(",
        ]
        .map(str::to_owned)
        .to_vec();
        let programs = [Some(code.to_owned()), Some("const half = ;".to_owned())];
        let got = run_behaviours(
            Language::JavaScript,
            &programs,
            &checks,
            Duration::from_secs(10),
        );
        let b = got[0].as_ref().expect("a report");
        assert!(b.defined, "{b:?}");
        let seen: Vec<(bool, &str)> = b.checks.iter().map(|c| (c.ok, c.out.as_str())).collect();
        assert_eq!(
            seen,
            [
                (true, "2"),
                (true, "0.5"),
                (false, "1"),
                (false, "raise RangeError"),
                (false, "timeout"),
                (true, "true"),
                (false, "no assertion"),
                (false, "raise SyntaxError"),
            ]
        );
        assert_eq!(b.checks[2].err, "got 1, expected 5");
        let broken = got[1].as_ref().expect("a report");
        assert!(
            !broken.defined && broken.error.contains("SyntaxError"),
            "{broken:?}"
        );

        // The task and candidate as the head finds them.
        let task = Task::from_question(
            "Complete this:\n```javascript\n/** Half of x. */\nfunction half(x) {\n}\n```",
        )
        .unwrap();
        assert_eq!(task.language, Language::JavaScript);
        assert_eq!(task.entry_point, "half");
        let reply = format!("Here:\n```js\n{code}```");
        assert_eq!(task.candidate_program(&reply).unwrap(), code);
        assert_eq!(
            task.parse_tests(
                "```javascript\nassertEqual(half(2), 1);\nassertEqual(half(2), 1);\n```"
            ),
            ["assertEqual(half(2), 1);", "assertEqual(half(2), 1);"]
        );
    }

    #[test]
    fn functions_are_found_in_their_usual_forms() {
        let code = "/** doc */\nfunction add(a, b) {\n  return a + b;\n}\nasync function load() {}\nconst twice = (x) => 2 * x;\nlet half = x => x / 2;\nvar f = function (x) { return x; };\nexport function g() {}\nconst limit = 10;\nconst h = compute(3);\n";
        assert_eq!(
            defined_functions(code),
            ["add", "load", "twice", "half", "f", "g"]
        );
        assert!(defines(code, "twice") && !defines(code, "limit"));
    }

    #[test]
    fn test_lines_are_taken_in_any_assertion_form() {
        let lines = [
            "assertEqual(add(1, 2), 3);",
            "assert.deepStrictEqual(add([1],",
            "  [2]), [1, 2])",
            "console.log(add(1, 1));",
            "assert.strictEqual(other(1), 1);",
            "assert(add(0, 0) === 0);",
        ];
        assert_eq!(
            parse_statements(&lines, "add"),
            [
                "assertEqual(add(1, 2), 3);",
                "assert.deepStrictEqual(add([1], [2]), [1, 2]);",
                "assert(add(0, 0) === 0);",
            ]
        );
        assert!(tests_prompt("function f(x) {}", "f").contains("`assertEqual(f(...), expected);`"));
    }
}
