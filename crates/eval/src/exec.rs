//! Running a program with a problem's tests, in the sandbox every model-written program
//! runs in (`shoal-sandbox`: no network, limits, its own process group, a timeout).
//!
//! The verdict: passed when the process exits with status 0 *and* the line after
//! tests ran, so a program that calls `sys.exit(0)` before the tests does not
//! pass.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use shoal_sandbox::{Isolation, Sandbox};

/// What became of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    Passed,
    Failed,
    TimedOut,
}

/// One run of a program with its tests.
#[derive(Debug, Clone)]
pub(crate) struct CheckRun {
    pub(crate) verdict: Verdict,
    pub(crate) seconds: f64,
    /// The exit status; `None` when killed by a signal (or on timeout).
    pub(crate) exit_code: Option<i32>,
    /// The end of stderr (a traceback ends there).
    pub(crate) stderr_tail: String,
}

/// Runs programs with their tests, each for at most `timeout`.
#[derive(Debug, Clone)]
pub(crate) struct Checker {
    sandbox: Sandbox,
    timeout: Duration,
}

impl Checker {
    /// Checks that `python` runs (Python 3.7 or newer), in the sandbox for `Unshare`.
    pub(crate) fn with_isolation(
        python: &str,
        timeout: Duration,
        isolation: Isolation,
    ) -> anyhow::Result<Self> {
        let sandbox = Sandbox::new(python, isolation)
            .context("HumanEval's tests need Python 3 (see --python) and a sandbox to run in (see --isolation)")?;
        Ok(Checker { sandbox, timeout })
    }

    pub(crate) fn isolation(&self) -> Isolation {
        self.sandbox.isolation()
    }

    /// Runs `program`, then `tests` (the code that tests it: HumanEval's `check` function
    /// and `check(ENTRY_POINT)`, or MBPP's asserts).
    ///
    /// An error means the run could not happen here (no temporary directory, no process);
    /// whatever the program does is a [`Verdict`].
    pub(crate) fn run_check(&self, program: &str, tests: &str) -> anyhow::Result<CheckRun> {
        let script = format!("{program}\n\n{tests}");
        let run = self.sandbox.run(&script, self.timeout)?;
        let verdict = if run.timed_out {
            Verdict::TimedOut
        } else if run.exit_code == Some(0) && run.completed {
            Verdict::Passed
        } else {
            Verdict::Failed
        };
        Ok(CheckRun {
            verdict,
            seconds: run.seconds,
            exit_code: run.exit_code,
            stderr_tail: run.stderr_tail,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Instant;

    use super::*;

    const PROGRAM: &str = "def add(a, b):\n    return a + b\n";
    const TEST: &str = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n\ncheck(add)";

    fn sandboxes(timeout: Duration) -> Vec<Checker> {
        let mut v =
            vec![Checker::with_isolation("python3", timeout, Isolation::PythonGuard).unwrap()];
        match Checker::with_isolation("python3", timeout, Isolation::Unshare) {
            Ok(checker) => v.push(checker),
            // shoal-sandbox's own suite fails where the sandbox is missing.
            Err(e) => eprintln!("{e:#}"),
        }
        v
    }

    fn verdict(checker: &Checker, program: &str) -> CheckRun {
        checker.run_check(program, TEST).unwrap()
    }

    #[test]
    fn a_correct_program_passes() {
        for s in sandboxes(Duration::from_secs(10)) {
            let e = verdict(&s, PROGRAM);
            assert_eq!(
                e.verdict,
                Verdict::Passed,
                "{:?}: {}",
                s.isolation(),
                e.stderr_tail
            );
            assert_eq!(e.exit_code, Some(0));
        }
    }

    #[test]
    fn a_wrong_program_fails_with_its_traceback() {
        for s in sandboxes(Duration::from_secs(10)) {
            let e = verdict(&s, "def add(a, b):\n    return a - b\n");
            assert_eq!(e.verdict, Verdict::Failed);
            assert_eq!(e.exit_code, Some(1));
            assert!(
                e.stderr_tail.contains("AssertionError"),
                "{}",
                e.stderr_tail
            );
        }
    }

    #[test]
    fn a_syntax_error_fails() {
        for s in sandboxes(Duration::from_secs(10)) {
            let e = verdict(&s, "def add(a, b)\n    return a + b\n");
            assert_eq!(e.verdict, Verdict::Failed);
            assert!(e.stderr_tail.contains("SyntaxError"), "{}", e.stderr_tail);
        }
    }

    #[test]
    fn an_empty_body_fails() {
        for s in sandboxes(Duration::from_secs(10)) {
            let e = verdict(&s, "def add(a, b):\n    \"\"\"Adds.\"\"\"\n");
            assert_eq!(e.verdict, Verdict::Failed);
        }
    }

    #[test]
    fn an_endless_loop_times_out_and_is_killed() {
        for s in sandboxes(Duration::from_millis(1500)) {
            let started = Instant::now();
            let e = verdict(&s, "def add(a, b):\n    while True:\n        pass\n");
            assert_eq!(e.verdict, Verdict::TimedOut);
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(e.seconds >= 1.4);
        }
    }

    #[test]
    fn exiting_before_the_tests_is_not_a_pass() {
        for s in sandboxes(Duration::from_secs(10)) {
            let e = verdict(
                &s,
                "import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n",
            );
            assert_eq!(e.exit_code, Some(0));
            assert_eq!(e.verdict, Verdict::Failed);
        }
    }

    #[test]
    fn the_network_is_out_of_reach() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        for s in sandboxes(Duration::from_secs(10)) {
            let program = format!(
                "import socket\ndef add(a, b):\n    return a + b\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    reached = True\nexcept OSError:\n    reached = False\nassert not reached\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', {port}))\n    reached = True\nexcept OSError:\n    reached = False\nassert not reached\n"
            );
            let e = verdict(&s, &program);
            assert_eq!(
                e.verdict,
                Verdict::Passed,
                "{:?}: {}",
                s.isolation(),
                e.stderr_tail
            );
        }
        assert!(listener.accept().is_err(), "a program reached the listener");
    }

    #[test]
    fn destructive_os_functions_are_disabled() {
        let s = &sandboxes(Duration::from_secs(10))[0];
        let e = verdict(
            s,
            "import os\ndef add(a, b):\n    return a + b\nassert os.remove is None and os.system is None\n",
        );
        assert_eq!(e.verdict, Verdict::Passed, "{}", e.stderr_tail);
    }
}
