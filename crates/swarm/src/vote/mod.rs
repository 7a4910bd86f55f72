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
//!    code, each code block is run against them in the sandbox of `shoal-sandbox`
//!    (namespaces of its own: no network, none of the user's files, no other process; OS
//!    limits; killed with everything it started at its timeout) ([`code_passes_examples`]).
//!    Among the passing answers the most common code wins (by normalised text); if all
//!    passing code differs, the passing answer most similar to the others. Where there is
//!    no sandbox, or with [`CodeChecks::Off`], no code runs and the outcome says so
//!    ([`VoteOutcome::unchecked`]); the vote goes on with the methods below.
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
//!
//! Here: the vote itself; `extract.rs`: final answers (numbers, choice letters, code) taken
//! from an answer; `examples.rs`: a prompt's examples and checking code against them in the
//! sandbox; `similarity.rs`: how alike two texts are.

mod examples;
mod extract;
mod similarity;

pub use examples::{code_passes_examples, sandbox};
pub use extract::{extract_choice, extract_code, extract_number, normalise_code, FinalAnswer};
pub use similarity::similarity;

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

pub(crate) use examples::{
    called_function, open_brackets, outside_strings, prompt_examples, python_literal,
};

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
    /// Why code that could have been checked against the prompt's examples was not run
    /// (checks off, or no sandbox here); `None` when it ran or there was nothing to run.
    pub unchecked: Option<&'static str>,
}

/// Whether [`vote`] runs code against a prompt's examples (`--swarm-code-checks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeChecks {
    Off,
    /// In the sandbox, where this machine has one; each run for at most `timeout`.
    On {
        timeout: Duration,
    },
}

impl CodeChecks {
    /// The time allowed to each run, or why nothing may run.
    pub(crate) fn runnable(self) -> Result<Duration, &'static str> {
        match self {
            CodeChecks::Off => Err("code checks are off"),
            CodeChecks::On { timeout } => sandbox().map(|_| timeout),
        }
    }
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
/// `checks` says whether code runs against the prompt's examples and for how long (runs are
/// in parallel, one sandboxed process per distinct code). `None` only when `answers` is
/// empty.
pub fn vote(prompt: &str, answers: &[String], checks: CodeChecks) -> Option<VoteOutcome> {
    if answers.is_empty() {
        return None;
    }
    let raw_codes: Vec<Option<String>> = answers.iter().map(|a| extract_code(a)).collect();
    let codes: Vec<Option<String>> = raw_codes
        .iter()
        .map(|code| code.as_deref().map(normalise_code))
        .collect();
    let with_code = codes.iter().filter(|c| c.is_some()).count();
    let outcome = |winner, method, support, unchecked| VoteOutcome {
        winner,
        method,
        support,
        unchecked,
    };

    let checkable = with_code > 0 && prompt_examples(prompt).iter().any(|e| e.expected.is_some());
    // The sandbox is set up (and proven) only when there is code to check.
    let (timeout, unchecked) = if checkable {
        match checks.runnable() {
            Ok(timeout) => (Some(timeout), None),
            Err(why) => (None, Some(why)),
        }
    } else {
        (None, None)
    };
    if let Some(timeout) = timeout {
        let passed = run_checks(prompt, &raw_codes, &codes, timeout);
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
            return Some(outcome(
                winner,
                VoteMethod::CodeExamples,
                passing.len(),
                None,
            ));
        }
    }

    if with_code * 2 >= answers.len() {
        if let Some((winner, support)) = majority(&codes) {
            if support >= 2 {
                return Some(outcome(winner, VoteMethod::Majority, support, unchecked));
            }
        }
    }

    let finals: Vec<Option<FinalAnswer>> = answers.iter().map(|a| final_text_answer(a)).collect();
    let with_final = finals.iter().filter(|f| f.is_some()).count();
    if with_final * 2 >= answers.len() {
        if let Some((winner, support)) = majority(&finals) {
            return Some(outcome(winner, VoteMethod::Majority, support, unchecked));
        }
    }

    let everyone: Vec<usize> = (0..answers.len()).collect();
    let (winner, support) = most_similar(answers, &everyone)?;
    Some(outcome(winner, VoteMethod::Similarity, support, unchecked))
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

    use super::examples::*;
    use super::extract::*;
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);
    const CHECKS: CodeChecks = CodeChecks::On { timeout: TIMEOUT };

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
        let outcome = vote(PROMPT, &answers, CHECKS).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 2,
                method: VoteMethod::CodeExamples,
                support: 1,
                unchecked: None,
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
        let outcome = vote(PROMPT, &answers, CHECKS).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 1,
                method: VoteMethod::CodeExamples,
                support: 3,
                unchecked: None,
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
        let outcome = vote(prompt, &answers, CHECKS).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 1,
                method: VoteMethod::Majority,
                support: 2,
                unchecked: None,
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
        let outcome = vote("How many apples?", &answers, CHECKS).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Majority,
                support: 3,
                unchecked: None,
            }
        );
    }

    #[test]
    fn vote_number_ties_go_to_the_earliest() {
        let answers = strings(&["It is 8.", "It is 7.", "It is 7.0", "The answer is 8"]);
        let outcome = vote("?", &answers, CHECKS).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Majority,
                support: 2,
                unchecked: None,
            }
        );
    }

    #[test]
    fn vote_majority_over_choices() {
        let answers = strings(&["The answer is (B)", "Answer: C", "answer is B."]);
        let outcome = vote("Pick one", &answers, CHECKS).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Majority,
                support: 2,
                unchecked: None,
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
        let outcome = vote("What is the capital of France?", &answers, CHECKS).unwrap();
        assert_eq!(outcome.method, VoteMethod::Similarity);
        assert_ne!(outcome.winner, 0);
        assert!(outcome.support >= 1);
    }

    #[test]
    fn vote_edge_cases() {
        assert_eq!(vote("q", &[], CHECKS), None);
        let one = vote("q", &strings(&["only one"]), CHECKS).unwrap();
        assert_eq!(
            one,
            VoteOutcome {
                winner: 0,
                method: VoteMethod::Similarity,
                support: 1,
                unchecked: None,
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
    fn examples_written_loosely_become_python() {
        // HumanEval/67, /76, /123 and /32's ways of writing an example.
        let prompt = "def f(s, n):\n    \"\"\"\n    f(\"5 apples\", 19) ->19 - 5 = 14\n    f(1, 4) => true\n    f(2, 2) => false # not 'true'\n    f(5, 1) returns [1, 5] # the odd ones: 1, and 5.\n    f(\"a=b\", 0) == \"true = x\"\n    f(1, 2) == (a >= b) != c\n    f(3) = 5, where n = 3\n    f(4) => # nothing\n    f(5) => (y := 2)\n    \"\"\"\n";
        let pairs: Vec<(String, String)> = prose_examples(prompt)
            .into_iter()
            .map(|e| (e.source, e.expected.unwrap()))
            .collect();
        let want = [
            ("f(\"5 apples\", 19)", "14"),
            ("f(1, 4)", "True"),
            ("f(2, 2)", "False"),
            ("f(5, 1)", "[1, 5]"),
            ("f(\"a=b\", 0)", "\"true = x\""),
            ("f(1, 2)", "(a >= b) != c"),
            ("f(3)", "5, where n = 3"),
            ("f(5)", "(y := 2)"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(s, e)| (s.to_string(), e.to_string()))
            .collect();
        assert_eq!(pairs, want);
        let doctest = "def g(x):\n    \"\"\"\n    >>> round(g([1, 2]), 2) # g(x) = 1 + 2x\n    -0.5\n    \"\"\"\n";
        let examples = doctest_examples(doctest);
        assert_eq!(examples[0].source, "round(g([1, 2]), 2)");
        assert_eq!(examples[0].expected.as_deref(), Some("-0.5"));
    }

    #[test]
    fn python_checks_prose_examples() {
        let prompt = "def solve(s):\n    \"\"\"Reverse the case of letters.\n    Examples\n    solve(\"ab\") = \"AB\"\n    solve(\"#a@C\") = \"#A@c\"\n    \"\"\"\n";
        let right = "def solve(s):\n    return s.swapcase()\n";
        let wrong = "def solve(s):\n    return s.upper()\n";
        assert_eq!(code_passes_examples(prompt, right, TIMEOUT), Some(true));
        assert_eq!(code_passes_examples(prompt, wrong, TIMEOUT), Some(false));
        let answers = vec![fenced(wrong), fenced(right)];
        let outcome = vote(prompt, &answers, CHECKS).unwrap();
        assert_eq!(
            outcome,
            VoteOutcome {
                winner: 1,
                method: VoteMethod::CodeExamples,
                support: 1,
                unchecked: None,
            }
        );
        // Unquoted arguments fail even against a stub: the examples are skipped, nothing is
        // judged.
        let unquoted = "def is_happy(s):\n    \"\"\"\n    is_happy(a) => False\n    is_happy(abc) => True\n    \"\"\"\n";
        let code = "def is_happy(s):\n    return len(s) >= 3\n";
        assert_eq!(code_passes_examples(unquoted, code, TIMEOUT), None);
    }
}
