//! Runs recorded `verify` pools again, for studying how candidates are chosen offline.
//!
//! Reads JSON lines on stdin, each `{"id": …, "question": …, "answers": [{"task": …,
//! "text": …}, …], "final_answer": …, "judge": …}` (`answers` and `final_answer` as a
//! `/v1/swarm/query` reply gives them, in order: `tests` answers are the written tests, the
//! rest candidates; `judge`, optional, is code that ends a candidate's program and exits
//! non-zero when it is wrong, such as a HumanEval problem's hidden tests and `check(…)`),
//! and writes one JSON line per problem: the examples and tests as the head reads them, each
//! candidate's behaviour on them (its `out` per check, which groups candidates, and whether
//! each check held), the candidate [`choose`] picks from the whole pool now
//! (`replayed_choice`), and with `judge`, whether each candidate and the final answer pass it.
//! Everything runs in the sandbox, as the head runs its checks; `judge` is Python (a
//! JavaScript task's candidates are grouped, but not judged right).
//!
//! ```sh
//! cargo run --release -p shoal-swarm --example verify_replay < pools.jsonl > replayed.jsonl
//! ```
//!
//! `scripts/verify-pools.py` records the pools and reads what this writes (docs/EVAL.md).

use std::io::{BufRead, Write};
use std::time::Duration;

use serde_json::{json, Value};
use shoal_sandbox::Sandbox;
use shoal_swarm::verify::{choose, run_behaviours, Task};

/// The head's default limit for one candidate's run (`SwarmConfig::default`'s code checks).
const RUN_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sandbox = Sandbox::isolated("python3")?;
    // Whether `reply`'s program, ended by `judge`, exits with status 0 in time.
    let judged = |task: &Task, reply: &str, judge: &str| -> bool {
        let Some(program) = task.candidate_program(reply) else {
            return false;
        };
        sandbox
            .run(&format!("{program}\n{judge}\n"), RUN_TIMEOUT)
            .is_ok_and(|run| !run.timed_out && run.exit_code == Some(0))
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(&line)?;
        let id = record.get("id").cloned().unwrap_or(Value::Null);
        let question = record.get("question").and_then(Value::as_str).unwrap_or("");
        let Some(mut task) = Task::from_question(question) else {
            writeln!(
                out,
                "{}",
                json!({"id": id, "error": "no task in the question"})
            )?;
            continue;
        };
        let unsound = task.drop_unsound_examples(RUN_TIMEOUT);
        let answers: Vec<&Value> = record
            .get("answers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let text = |a: &Value| {
            a.get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let is_tests = |a: &Value| a.get("task").and_then(Value::as_str) == Some("tests");
        let mut tests: Vec<String> = Vec::new();
        let squeeze = |t: &str| t.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        let mut seen: Vec<String> = task.examples.iter().map(|e| squeeze(e)).collect();
        for answer in answers.iter().filter(|a| is_tests(a)) {
            for test in task.parse_tests(&text(answer)) {
                if !seen.contains(&squeeze(&test)) {
                    seen.push(squeeze(&test));
                    tests.push(test);
                }
            }
        }
        let candidates: Vec<&&Value> = answers.iter().filter(|a| !is_tests(a)).collect();
        let programs: Vec<Option<String>> = candidates
            .iter()
            .map(|a| task.candidate_program(&text(a)))
            .collect();
        let checks: Vec<String> = task.examples.iter().chain(&tests).cloned().collect();
        let behaviours = run_behaviours(task.language, &programs, &checks, RUN_TIMEOUT);
        // The head's choice made again over the whole pool, every agent of equal weight.
        let scored: Vec<_> = behaviours.iter().map(|b| (b.as_ref(), 1.0)).collect();
        let chosen = choose(&scored, task.examples.len()).map(|c| c.winner);
        let judge = record.get("judge").and_then(Value::as_str);
        let final_answer = record.get("final_answer").and_then(Value::as_str);
        let described: Vec<Value> = candidates
            .iter()
            .zip(&programs)
            .zip(&behaviours)
            .map(|((answer, program), behaviour)| {
                json!({
                    "task": answer.get("task"),
                    "role": answer.get("role"),
                    "program": program.is_some(),
                    "defined": behaviour.as_ref().is_some_and(|b| b.defined),
                    "outs": behaviour.as_ref().map(|b| b.checks.iter().map(|c| c.out.clone()).collect::<Vec<_>>()),
                    "oks": behaviour.as_ref().map(|b| b.checks.iter().map(|c| c.ok).collect::<Vec<_>>()),
                    "passes_judge": judge.map(|j| judged(&task, &text(answer), j)),
                })
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({
                "id": id,
                "examples": task.examples,
                "unsound_examples": unsound,
                "tests": tests,
                "candidates": described,
                "final_passes_judge": judge.zip(final_answer).map(|(j, f)| judged(&task, f, j)),
                "replayed_choice": chosen,
            })
        )?;
    }
    Ok(())
}
