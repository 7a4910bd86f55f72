//! Choosing code by running it (issue #18, the `verify` strategy): tests written by the
//! swarm's own agents, candidates grouped by what they *do*, and CodeT's dual agreement.
//!
//! A coding task names a function ([`Task::from_question`]: the function the prompt's
//! examples call, else the last one it defines). For it:
//!
//! 1. **Tests.** Agents with the critic and fact-checker roles write `assert` statements for
//!    the function from the task alone, without seeing any candidate ([`tests_prompt`],
//!    [`parse_tests`]); they are deduplicated. The prompt's own examples become checks too.
//! 2. **Behaviour.** Every distinct candidate runs once in the sandbox against every check
//!    ([`behaviour_program`], one process per candidate, each check under its own alarm): for
//!    each check, whether it held and what the function returned (its `repr`, or the
//!    exception it raised). Candidates with the same results on every check form one group,
//!    however differently they are written.
//! 3. **Selection** ([`choose`]): the groups passing the most of the prompt's examples (they
//!    are the task's own words); among those, the largest `candidates × tests passed²`
//!    (CodeT's dual agreement — a wrong test rarely agrees with many candidates, a wrong
//!    candidate rarely with many tests — with the candidates counted as their square root:
//!    candidates of one model share its mistakes); then the group passing more tests, then
//!    the larger, then the one whose agents weigh most.
//!
//! The head (`head/verify.rs`) sends candidates that fail an example, or a test the chosen
//! group passes, back to their agents with the failing check and its traceback, and runs
//! what comes back through the same steps.
//!
//! Python and JavaScript (with `node`, where the machine has it; [`Language`]) run; a task in
//! another language, or where nothing can run, falls back to the vote, which says so.

mod javascript;
mod program;
mod select;
mod written_tests;

pub use program::{
    behaviour_program, parse_report, sound_examples_program, Behaviour, CheckResult, REPORT_MARKER,
};
pub use select::{choose, Choice, Scored};
pub use written_tests::{parse_tests, tests_prompt, MAX_TESTS, TESTER_SYSTEM};

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use shoal_sandbox::{fenced_blocks, is_python, Node};

use crate::vote::{called_function, outside_strings, prompt_examples, sandbox};

/// The languages whose code the checks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    Python,
    /// With Node.js, in the same sandbox.
    JavaScript,
}

impl Language {
    /// The name of its fenced blocks.
    pub fn fence(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
        }
    }
}

/// A coding task as the checks see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub language: Language,
    /// The function to write.
    pub entry_point: String,
    /// The task's own code (signature, docstring, helpers, imports): what a candidate's
    /// code is appended to, so helpers the prompt defines and its imports are there.
    pub prompt_code: String,
    /// The prompt's examples as `assert` statements (Python only: JavaScript prompts write
    /// their examples too many ways; their tests are the agents').
    pub examples: Vec<String>,
    /// A task told in words, whose function is known only from the `assert` lines it shows
    /// (MBPP's form), has no code of its own: the test writers are shown the question.
    pub told_in_words: Option<String>,
}

impl Task {
    /// The task in `question`: a Python function ([`Task::python`]), else a JavaScript one
    /// ([`Task::javascript`]). `None` when it names no function in either.
    pub fn from_question(question: &str) -> Option<Task> {
        Task::python(question).or_else(|| Task::javascript(question))
    }

    /// The JavaScript task in `question`: its code is its JavaScript fenced blocks; the
    /// function is the last one they define.
    pub fn javascript(question: &str) -> Option<Task> {
        let blocks: Vec<String> = fenced_blocks(question)
            .into_iter()
            .filter(|b| javascript::is_javascript(&b.lang))
            .map(|b| b.code)
            .collect();
        let prompt_code = blocks.join("\n\n");
        let entry_point = javascript::defined_functions(&prompt_code).pop()?;
        Some(Task {
            language: Language::JavaScript,
            entry_point,
            prompt_code,
            examples: Vec::new(),
            told_in_words: None,
        })
    }

    /// The Python task in `question`: its code is its Python fenced blocks (or the whole
    /// question when it has none and defines a function); else a task told in words with
    /// `assert` examples ([`Task::told_by_asserts`]). `None` when it has neither.
    pub fn python(question: &str) -> Option<Task> {
        let blocks: Vec<String> = fenced_blocks(question)
            .into_iter()
            .filter(|b| is_python(&b.lang) && b.code.contains("def "))
            .map(|b| b.code)
            .collect();
        let prompt_code = if blocks.is_empty() {
            question.to_owned()
        } else {
            blocks.join("\n\n")
        };
        let defined = defined_functions(&prompt_code);
        let examples = prompt_examples(&prompt_code);
        let entry_point = examples
            .iter()
            .filter_map(called_function)
            .find(|name| defined.iter().any(|d| d == name))
            .map(str::to_owned)
            .or_else(|| defined.last().cloned());
        let Some(entry_point) = entry_point else {
            return Task::told_by_asserts(question);
        };
        let examples = examples
            .iter()
            .filter_map(|e| {
                let expected = e.expected.as_deref()?;
                Some(format!("assert ({}) == ({expected})", e.source))
            })
            .collect();
        Some(Task {
            language: Language::Python,
            entry_point,
            prompt_code,
            examples,
            told_in_words: None,
        })
    }

    /// A Python task told in words with the `assert` lines its function must pass, as MBPP
    /// states its problems ("Write a function to find the shared elements of two lists." and
    /// `assert set(similar_elements((3, 4), (4, 5))) == set((4,))`): the function is the
    /// first one an assert calls that is not a builtin (else the first it calls: MBPP/126
    /// writes its own `sum`), those asserts are the examples, and there is no code to append
    /// candidates to.
    pub fn told_by_asserts(question: &str) -> Option<Task> {
        let entry_point = question.lines().find_map(|line| {
            let condition = line.trim_start().strip_prefix("assert ")?;
            let names = called_names(condition);
            names
                .iter()
                .find(|name| !PYTHON_BUILTINS.contains(name))
                .or(names.first())
                .map(|name| (*name).to_owned())
        })?;
        let examples = parse_tests(question, &entry_point);
        if examples.is_empty() {
            return None;
        }
        Some(Task {
            language: Language::Python,
            entry_point,
            prompt_code: String::new(),
            examples,
            told_in_words: Some(question.trim().to_owned()),
        })
    }

    /// Leaves out the prompt's examples that cannot hold for any code: they do not parse,
    /// or read a name the prompt neither defines nor imports (HumanEval/80 writes
    /// `is_happy(a) => False` for `is_happy("a")`). Such an example fails every candidate
    /// alike, so it tells none apart, yet it sent every task that had one to a repair round,
    /// with the broken example as the failure to fix. Checked by parsing in the sandbox
    /// ([`sound_examples_program`]); where that cannot run, or for a task told in words
    /// (its asserts are the task's code), every example stays. Returns how many were left
    /// out.
    pub fn drop_unsound_examples(&mut self, timeout: Duration) -> usize {
        if self.language != Language::Python
            || self.told_in_words.is_some()
            || self.examples.is_empty()
        {
            return 0;
        }
        let Ok(sandbox) = sandbox() else { return 0 };
        let program = sound_examples_program(&self.prompt_code, &self.examples);
        let Ok(run) = sandbox.run(&program, timeout) else {
            return 0;
        };
        let sound = parse_report::<Vec<bool>>(&run.stdout_tail)
            .filter(|sound| sound.len() == self.examples.len());
        let Some(sound) = sound else { return 0 };
        let before = self.examples.len();
        let mut verdicts = sound.into_iter();
        self.examples.retain(|_| verdicts.next().unwrap_or(true));
        before - self.examples.len()
    }

    /// What a test writer is asked.
    pub fn tests_prompt(&self) -> String {
        match self.language {
            Language::Python => match &self.told_in_words {
                Some(question) => tests_prompt(question, &self.entry_point),
                None => tests_prompt(
                    &format!("```python\n{}\n```", self.prompt_code.trim_end()),
                    &self.entry_point,
                ),
            },
            Language::JavaScript => javascript::tests_prompt(&self.prompt_code, &self.entry_point),
        }
    }

    /// The tests in a test writer's reply (see [`parse_tests`]).
    pub fn parse_tests(&self, reply: &str) -> Vec<String> {
        match self.language {
            Language::Python => parse_tests(reply, &self.entry_point),
            Language::JavaScript => {
                let blocks = fenced_blocks(reply);
                let text = if blocks.is_empty() {
                    reply.to_owned()
                } else {
                    blocks
                        .into_iter()
                        .filter(|b| javascript::is_javascript(&b.lang) || b.lang.is_empty())
                        .map(|b| b.code)
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                let lines: Vec<&str> = text.lines().collect();
                let mut tests = javascript::parse_statements(&lines, &self.entry_point);
                tests.truncate(MAX_TESTS);
                tests
            }
        }
    }

    /// The program text of a candidate reply: for Python, its Python block that defines the
    /// entry point (else its longest code block, else the whole reply) after the task's own
    /// code; for JavaScript, its JavaScript block that defines it, alone (the task's stub
    /// would clash with a `const` of the same name). `None` when it does not define it.
    pub fn candidate_program(&self, reply: &str) -> Option<String> {
        if self.language == Language::JavaScript {
            return fenced_blocks(reply)
                .into_iter()
                .filter(|b| {
                    (javascript::is_javascript(&b.lang) || b.lang.is_empty())
                        && javascript::defines(&b.code, &self.entry_point)
                })
                .max_by_key(|b| b.code.len())
                .map(|b| format!("{}\n", b.code.trim_end()));
        }
        let define = format!("def {}(", self.entry_point);
        let blocks = fenced_blocks(reply);
        let code = blocks
            .iter()
            .filter(|b| is_python(&b.lang) && b.code.contains(&define))
            .max_by_key(|b| b.code.len())
            .map(|b| b.code.clone())
            .or_else(|| crate::vote::extract_code(reply))
            .unwrap_or_else(|| reply.to_owned());
        if !code.contains(&define) {
            return None;
        }
        Some(format!(
            "{}\n\n{}\n",
            self.prompt_code.trim_end(),
            code.trim_end()
        ))
    }
}

/// Functions an `assert` may wrap the function under test in.
const PYTHON_BUILTINS: &[&str] = &[
    "abs",
    "all",
    "any",
    "bool",
    "dict",
    "float",
    "frozenset",
    "int",
    "isinstance",
    "len",
    "list",
    "max",
    "min",
    "repr",
    "reversed",
    "round",
    "set",
    "sorted",
    "str",
    "sum",
    "tuple",
    "type",
];

/// Words that may stand before a `(` without calling anything.
const PYTHON_KEYWORDS: &[&str] = &[
    "and", "assert", "else", "for", "if", "in", "is", "lambda", "not", "or", "return",
];

/// The plain names `code` calls (`f` in `f(x)` or `f (x)`; not `isclose` in
/// `math.isclose(x)`), in order, outside string literals.
fn called_names(code: &str) -> Vec<&str> {
    let mut names = Vec::new();
    // The last word read (its start and end), while only spaces followed it.
    let mut word: Option<(usize, usize)> = None;
    let mut before_word = ' ';
    let mut previous = ' ';
    for (at, c) in outside_strings(code) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word = match word {
                // The word goes on only where no space (or string) came between.
                Some((start, end)) if end == at => Some((start, at + 1)),
                _ => {
                    before_word = previous;
                    Some((at, at + 1))
                }
            };
        } else if c != ' ' {
            if let Some((start, end)) = word.take() {
                let name = &code[start..end];
                let plain = before_word != '.'
                    && !name.starts_with(|d: char| d.is_ascii_digit())
                    && !PYTHON_KEYWORDS.contains(&name);
                if c == '(' && plain {
                    names.push(name);
                }
            }
        }
        previous = c;
    }
    names
}

/// The names of the top-level functions `code` defines, in order.
fn defined_functions(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("def ")?;
            let name = rest[..rest.find('(')?].trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect()
}

/// Node.js in the sandbox, set up (and proven) on first use; else why there is none.
pub fn node() -> Result<&'static Node, &'static str> {
    static NODE: OnceLock<Result<Node, String>> = OnceLock::new();
    NODE.get_or_init(|| {
        let sandbox = sandbox().map_err(str::to_owned)?;
        sandbox.node().map_err(|e| {
            tracing::warn!(error = %e, "verify will not run JavaScript");
            e.to_string()
        })
    })
    .as_ref()
    .map_err(String::as_str)
}

/// Whether code in `language` can run here; else why not.
pub fn runnable(language: Language) -> Result<(), &'static str> {
    match language {
        Language::Python => sandbox().map(|_| ()),
        Language::JavaScript => node().map(|_| ()),
    }
}

/// Runs each distinct program of `programs` (in `language`) against `checks` in the
/// sandbox, in parallel, each for at most `timeout` in all; the behaviour per program
/// (`None` where it cannot run here, or the program ended without a report: it killed its
/// interpreter).
pub fn run_behaviours(
    language: Language,
    programs: &[Option<String>],
    checks: &[String],
    timeout: Duration,
) -> Vec<Option<Behaviour>> {
    let Ok(sandbox) = sandbox() else {
        return programs.iter().map(|_| None).collect();
    };
    let node = match language {
        Language::Python => None,
        Language::JavaScript => match node() {
            Ok(node) => Some(node),
            Err(_) => return programs.iter().map(|_| None).collect(),
        },
    };
    let mut distinct: HashMap<&str, Option<Behaviour>> = HashMap::new();
    for program in programs.iter().flatten() {
        distinct.entry(program.as_str()).or_insert(None);
    }
    let per_check = per_check_limit(timeout, checks.len());
    let results: Vec<(&str, Option<Behaviour>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = distinct
            .keys()
            .map(|&program| {
                let handle = scope.spawn(move || {
                    let run = match node {
                        None => {
                            sandbox.run(&behaviour_program(program, checks, per_check), timeout)
                        }
                        Some(node) => sandbox.run_javascript(
                            node,
                            &javascript::behaviour_program(program, checks, per_check),
                            timeout,
                        ),
                    };
                    parse_report(&run.ok()?.stdout_tail)
                });
                (program, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(program, handle)| (program, handle.join().ok().flatten()))
            .collect()
    });
    distinct.extend(results);
    programs
        .iter()
        .map(|p| {
            p.as_deref()
                .and_then(|p| distinct.get(p).cloned().flatten())
        })
        .collect()
}

/// Each check's own limit: an even share of the run's, between 0.2 and 2 seconds, so one
/// check that never ends costs its own verdict and not the others'.
fn per_check_limit(timeout: Duration, checks: usize) -> Duration {
    let share = timeout.as_secs_f64() * 0.8 / checks.max(1) as f64;
    Duration::from_secs_f64(share.clamp(0.2, 2.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const QUESTION: &str = "Complete this Python function:\n```python\nfrom typing import List\n\n\ndef is_palindrome(s: str) -> bool:\n    return s == s[::-1]\n\n\ndef below_zero(operations: List[int]) -> bool:\n    \"\"\" Detect if the balance falls below zero.\n    >>> below_zero([1, 2, 3])\n    False\n    >>> below_zero([1, 2, -4, 5])\n    True\n    \"\"\"\n```";

    #[test]
    fn the_task_is_the_function_the_examples_call() {
        let task = Task::from_question(QUESTION).unwrap();
        assert_eq!(task.entry_point, "below_zero");
        assert!(task.prompt_code.starts_with("from typing import List"));
        assert_eq!(
            task.examples,
            [
                "assert (below_zero([1, 2, 3])) == (False)",
                "assert (below_zero([1, 2, -4, 5])) == (True)"
            ]
        );
        // Without examples: the last function defined.
        let task = Task::from_question(
            "```python\ndef f(x):\n    pass\ndef g(y):\n    \"\"\"Twice y.\"\"\"\n```",
        )
        .unwrap();
        assert_eq!(task.entry_point, "g");
        assert!(task.examples.is_empty());
        assert_eq!(Task::from_question("What is the capital of France?"), None);
    }

    #[test]
    fn examples_that_cannot_hold_for_any_code_are_left_out() {
        // Unquoted strings (HumanEval/80), a recurrence in words (HumanEval/130), a typo
        // (HumanEval/158); beside examples that read the prompt's imports, its helpers and
        // their own comprehension and lambda variables.
        let question = "```python\nimport math\ntry:\n    from typing import List as L\n\
            except ImportError:\n    pass\nLIMIT = 3\n\
            def helper(x):\n    return x\n\ndef f(a):\n    \"\"\"\n    f(a) => False\n    \
            f(n) = 1 + n / 2, if n is even\n    f(\"x\") => \"\"x\"\n    f(\"ab\") => True\n    \
            f([helper(i) for i in range(LIMIT)]) => math.pi\n    f(lambda y: y) => L\n    \"\"\"\n```";
        let mut task = Task::from_question(question).unwrap();
        assert_eq!(task.examples.len(), 6, "{:?}", task.examples);
        assert_eq!(task.drop_unsound_examples(Duration::from_secs(20)), 3);
        assert_eq!(
            task.examples,
            [
                "assert (f(\"ab\")) == (True)",
                "assert (f([helper(i) for i in range(LIMIT)])) == (math.pi)",
                "assert (f(lambda y: y)) == (L)",
            ]
        );
        // A task told in words keeps its asserts: they are its code.
        let mut told = Task::from_question("Write `g`.\nassert g(x) == 1").unwrap();
        assert_eq!(told.drop_unsound_examples(Duration::from_secs(20)), 0);
        assert_eq!(told.examples.len(), 1);
    }

    #[test]
    fn a_task_told_in_words_is_known_by_its_asserts() {
        // MBPP/14, and MBPP/2's assert that wraps the function in a builtin.
        let question = "Write a python function to find the volume of a triangular prism.\n\
            Your code should pass this test:\n```python\nassert find_Volume(10,8,6) == 240\n```";
        let task = Task::from_question(question).unwrap();
        assert_eq!(task.language, Language::Python);
        assert_eq!(task.entry_point, "find_Volume");
        assert_eq!(task.examples, ["assert find_Volume(10,8,6) == 240"]);
        assert_eq!(task.prompt_code, "");
        let asked = task.tests_prompt();
        assert!(
            asked.starts_with("Write a python function to find the volume"),
            "{asked}"
        );
        assert!(asked.contains("`assert find_Volume(...) == ...`"));
        let program = task
            .candidate_program(
                "```python\ndef find_Volume(l, b, h):\n    return l * b * h / 2\n```",
            )
            .unwrap();
        assert!(
            program.trim_start().starts_with("def find_Volume("),
            "{program}"
        );

        let wrapped = "Write a function to find the shared elements from the given two lists.\n\
            assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n\
            assert math.isclose(other(1), 2)";
        let task = Task::from_question(wrapped).unwrap();
        assert_eq!(task.entry_point, "similar_elements");
        assert_eq!(task.examples.len(), 1);
        // A call inside a string, or a method, is no function to write.
        assert_eq!(called_names("x.isclose(g(1), 'h(2)')"), ["g"]);
        assert_eq!(called_names("f (1) + 2(3) + _g(4) and (5)"), ["f", "_g"]);
        // A builtin only when nothing else is called (MBPP/126 defines its own `sum`).
        let own_sum =
            Task::from_question("Write a function `sum`.\nassert sum(10,15) == 6").unwrap();
        assert_eq!(own_sum.entry_point, "sum");
        assert_eq!(Task::from_question("assert x == 2, 'f(1)'"), None);
    }

    #[test]
    fn a_candidate_program_is_the_task_then_its_code() {
        let task = Task::from_question(QUESTION).unwrap();
        let reply = "Sure:\n```python\nprint('usage')\n```\n```python\ndef below_zero(operations):\n    return False\n```";
        let program = task.candidate_program(reply).unwrap();
        assert!(program.starts_with("from typing import List"));
        assert!(program.ends_with("def below_zero(operations):\n    return False\n"));
        assert_eq!(task.candidate_program("I cannot do that."), None);
    }

    #[test]
    fn per_check_limits_stay_in_bounds() {
        assert_eq!(
            per_check_limit(Duration::from_secs(10), 1),
            Duration::from_secs(2)
        );
        assert_eq!(
            per_check_limit(Duration::from_secs(1), 100),
            Duration::from_millis(200)
        );
    }
}
