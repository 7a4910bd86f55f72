//! Tests written by agents: what they are asked, and the `assert` statements taken from
//! their replies.

use shoal_sandbox::{fenced_blocks, is_python};

use crate::vote::{open_brackets, outside_strings};

/// At most this many tests are taken from one reply.
pub const MAX_TESTS: usize = 12;
/// A longer statement is no test anyone can read (or a model looping).
const MAX_TEST_CHARS: usize = 600;

/// The system prompt of a test writer (in place of its role's): small coding models
/// asked for tests under a role prompt, or with the task last, implement the function
/// instead.
pub const TESTER_SYSTEM: &str = "You are a software tester. You write unit tests as plain \
    assert statements. You never implement the function under test.";

/// What a test writer is asked: asserts for `entry_point`, from the task alone (`task`: its
/// code in a fenced block, or its words; the task first, the instruction last).
pub fn tests_prompt(task: &str, entry_point: &str) -> String {
    format!(
        "{}\n\n\
         Do not implement `{entry_point}`: it is written elsewhere. Write 6 to 10 assert \
         statements that test it, one per line, each calling `{entry_point}` with concrete \
         arguments and comparing the result with the exact expected value, like \
         `assert {entry_point}(...) == ...`. Work out each expected value carefully from the \
         description and its examples. Cover typical cases and edge cases.\n\
         Answer with only the assert statements, in one ```python block.",
        task.trim_end()
    )
}

/// The `assert` statements of `reply` that call `entry_point`, in order, deduplicated (by
/// their text without spaces), at most [`MAX_TESTS`]. They are taken from its Python fenced
/// blocks (the whole reply when it has none), wherever they stand (asserts inside a
/// `def test_…():` count too, dedented); a statement continues over the following lines
/// while its brackets are open.
pub fn parse_tests(reply: &str, entry_point: &str) -> Vec<String> {
    let blocks = fenced_blocks(reply);
    let texts: Vec<String> = if blocks.is_empty() {
        vec![reply.to_owned()]
    } else {
        blocks
            .into_iter()
            .filter(|b| is_python(&b.lang))
            .map(|b| b.code)
            .collect()
    };
    let call = format!("{entry_point}(");
    let mut tests: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for text in &texts {
        let lines: Vec<&str> = text.lines().collect();
        let mut index = 0;
        while index < lines.len() {
            let line = lines[index].trim();
            index += 1;
            if !line.starts_with("assert ") && !line.starts_with("assert(") {
                continue;
            }
            let mut statement = line.to_owned();
            while open_brackets(&statement) > 0 && index < lines.len() {
                statement.push(' ');
                statement.push_str(lines[index].trim());
                index += 1;
            }
            let statement = strip_comment(&statement);
            if !statement.contains(&call)
                || statement.len() > MAX_TEST_CHARS
                || open_brackets(statement) != 0
            {
                continue;
            }
            let key: String = statement.chars().filter(|c| !c.is_whitespace()).collect();
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            tests.push(statement.to_owned());
            if tests.len() == MAX_TESTS {
                return tests;
            }
        }
    }
    tests
}

/// `statement` without a trailing `# comment` outside string literals.
fn strip_comment(statement: &str) -> &str {
    let end = outside_strings(statement)
        .find(|&(_, c)| c == '#')
        .map_or(statement.len(), |(at, _)| at);
    statement[..end].trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asserts_are_taken_from_the_reply() {
        let reply = "Here are tests:\n```python\nassert add(1, 2) == 3  # simple\nassert add(0, 0) == 0\nassert  add(1,2)==3\nassert add(\n    [1, 2],\n    [3]\n) == [1, 2, 3]\nassert other(1) == 1\nx = add(2, 2)\nassert x == 4\ndef test_add():\n    assert add(-1, 1) == 0, 'zero'\nassert add('#', 'a') == '#a'\n```\n```text\nassert add(9, 9) == 18\n```";
        assert_eq!(
            parse_tests(reply, "add"),
            [
                "assert add(1, 2) == 3",
                "assert add(0, 0) == 0",
                "assert add( [1, 2], [3] ) == [1, 2, 3]",
                "assert add(-1, 1) == 0, 'zero'",
                "assert add('#', 'a') == '#a'",
            ]
        );
        // No fences: the whole reply.
        assert_eq!(
            parse_tests("assert f(1) == 2\nassert f(2) == 4", "f"),
            ["assert f(1) == 2", "assert f(2) == 4"]
        );
        // An unclosed statement at the end is left out; so is a flood past the limit.
        assert!(parse_tests("```python\nassert f([1, 2\n```", "f").is_empty());
        let flood: String = (0..50).map(|i| format!("assert f({i}) == {i}\n")).collect();
        assert_eq!(parse_tests(&flood, "f").len(), MAX_TESTS);
    }

    #[test]
    fn the_prompt_names_the_function_and_holds_the_task() {
        let prompt = tests_prompt("```python\ndef f(x):\n    \"\"\"Twice x.\"\"\"\n```\n", "f");
        assert!(prompt.contains("`assert f(...) == ...`"));
        assert!(prompt.starts_with("```python\ndef f(x):\n    \"\"\"Twice x.\"\"\"\n```\n\n"));
    }
}
