//! The Python program that runs one candidate against every check and reports, per check,
//! whether it held and what the function returned.

use std::time::Duration;

use serde::Deserialize;

use crate::vote::python_literal;

/// The line that starts the report on stdout (the last line the program prints).
pub const REPORT_MARKER: &str = "__shoal_behaviour__ ";

/// How one check went for one candidate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct CheckResult {
    /// The assertion held.
    pub ok: bool,
    /// What was observed: the `repr` of the compared value (the left side of `==`, else the
    /// whole condition), `raise NAME` for an exception, `timeout` past the check's limit.
    /// This is the candidate's behaviour on the check.
    pub out: String,
    /// Why it failed: the end of the traceback, or what was got against what was wanted.
    pub err: String,
}

/// How one candidate behaved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Behaviour {
    /// The code ran to its end (it defines, imports and compiles).
    pub defined: bool,
    /// Why it did not: the end of its traceback.
    pub error: String,
    /// One result per check, in the order given (empty when not defined).
    pub checks: Vec<CheckResult>,
}

impl Behaviour {
    /// What the candidate did on every check: candidates with equal signatures behave
    /// alike on everything that was tried.
    pub fn signature(&self) -> Option<Vec<&str>> {
        self.defined
            .then(|| self.checks.iter().map(|c| c.out.as_str()).collect())
    }
}

/// The program that defines `code` in a fresh namespace and runs each check (an `assert`
/// statement) against it, each under its own `per_check` alarm, then prints the
/// [`Behaviour`] as JSON after [`REPORT_MARKER`].
///
/// A check `assert A == B` evaluates `A` and `B` separately: the observed value is `A`, and
/// floats compare within 1e-6 relative. Any other check evaluates its condition. A check
/// that is not one `assert` statement, or does not parse, fails for every candidate alike.
pub fn behaviour_program(code: &str, checks: &[String], per_check: Duration) -> String {
    let mut program = String::from(PROGRAM_HEAD);
    program.push_str(&format!(
        "__shoal_code = {}\n__shoal_checks = [\n",
        python_literal(code)
    ));
    for check in checks {
        program.push_str(&format!("    {},\n", python_literal(check)));
    }
    program.push_str(&format!(
        "]\n__shoal_limit = {:.3}\n__shoal_marker = {}\n",
        per_check.as_secs_f64(),
        python_literal(REPORT_MARKER)
    ));
    program.push_str(PROGRAM_TAIL);
    program
}

/// The report in a run's stdout: the JSON after the last [`REPORT_MARKER`] (a [`Behaviour`]
/// from [`behaviour_program`], the list of verdicts from [`sound_examples_program`]). `None`
/// when there is none (the program was killed, or killed its interpreter) or it does not
/// parse as a `T`.
pub fn parse_report<T: serde::de::DeserializeOwned>(stdout: &str) -> Option<T> {
    let at = stdout.rfind(REPORT_MARKER)?;
    let line = stdout[at + REPORT_MARKER.len()..].lines().next()?;
    serde_json::from_str(line).ok()
}

/// The program that tells which of `examples` (`assert` statements) are sound: each parses,
/// and every name it reads is a builtin, a name `prompt_code` binds at module level (a
/// function, class, import or assignment, in compound statements too; not a function's
/// parameter or local), or one bound inside the example itself (a
/// comprehension's variable, a lambda's argument). It prints a JSON list of booleans after
/// [`REPORT_MARKER`]; it only parses, it runs nothing of the prompt's. Where the prompt's
/// code does not parse, or star-imports, every example that parses counts as sound.
pub fn sound_examples_program(prompt_code: &str, examples: &[String]) -> String {
    let mut program = format!(
        "__shoal_prompt = {}\n__shoal_marker = {}\n__shoal_examples = [\n",
        python_literal(prompt_code),
        python_literal(REPORT_MARKER)
    );
    for example in examples {
        program.push_str(&format!("    {},\n", python_literal(example)));
    }
    program.push_str("]\n");
    program.push_str(SOUND_EXAMPLES_TAIL);
    program
}

const SOUND_EXAMPLES_TAIL: &str = r#"import ast, builtins, json

# The names the prompt's code binds at module level, in compound statements too (`try:
# import numpy as np`), but not inside functions, classes or lambdas: a parameter `a` does
# not make an example's bare `a` sound.
class __ShoalModuleNames(ast.NodeVisitor):
    def __init__(self):
        self.names = set(dir(builtins))

    def visit_FunctionDef(self, node):
        self.names.add(node.name)

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef

    def visit_Lambda(self, node):
        pass

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name == "*":
                raise ValueError("a star import binds names unknown here")
            self.names.add((alias.asname or alias.name).split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_Name(self, node):
        if not isinstance(node.ctx, ast.Load):
            self.names.add(node.id)


try:
    __shoal_visitor = __ShoalModuleNames()
    __shoal_visitor.visit(ast.parse(__shoal_prompt))
    __shoal_known = __shoal_visitor.names
except Exception:
    __shoal_known = None
__shoal_sound = []
for __shoal_source in __shoal_examples:
    try:
        __shoal_nodes = list(ast.walk(ast.parse(__shoal_source)))
    except Exception:
        __shoal_sound.append(False)
        continue
    __shoal_bound = {n.id for n in __shoal_nodes
                     if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    __shoal_bound |= {n.arg for n in __shoal_nodes if isinstance(n, ast.arg)}
    __shoal_sound.append(__shoal_known is None or all(
        n.id in __shoal_known or n.id in __shoal_bound
        for n in __shoal_nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)))
print("\n" + __shoal_marker + json.dumps(__shoal_sound), flush=True)
"#;

const PROGRAM_HEAD: &str = r#"import ast, json, math, signal, sys, traceback


class __ShoalTimeout(BaseException):
    pass


def __shoal_alarm(signum, frame):
    raise __ShoalTimeout()


def __shoal_same(got, want):
    if got == want:
        return True
    if isinstance(want, bool) or not isinstance(want, (int, float)):
        return False
    if isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    return False


def __shoal_show(value):
    try:
        text = repr(value)
    except BaseException:
        text = "<no repr>"
    return text[:200]


def __shoal_eval(node, namespace):
    return eval(compile(ast.Expression(body=node), "<check>", "eval"), namespace)


"#;

const PROGRAM_TAIL: &str = r#"signal.signal(signal.SIGALRM, __shoal_alarm)
__shoal_report = {"defined": True, "error": "", "checks": []}
__shoal_ns = {"__name__": "__shoal_candidate__"}
try:
    signal.setitimer(signal.ITIMER_REAL, __shoal_limit * 2)
    exec(compile(__shoal_code, "<candidate>", "exec"), __shoal_ns)
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException:
    signal.setitimer(signal.ITIMER_REAL, 0)
    __shoal_report["defined"] = False
    __shoal_report["error"] = traceback.format_exc()[-800:]
if __shoal_report["defined"]:
    for __shoal_source in __shoal_checks:
        __shoal_result = {"ok": False, "out": "", "err": ""}
        try:
            signal.setitimer(signal.ITIMER_REAL, __shoal_limit)
            __shoal_tree = ast.parse(__shoal_source)
            if len(__shoal_tree.body) != 1 or not isinstance(__shoal_tree.body[0], ast.Assert):
                raise SyntaxError("a check is one assert statement")
            __shoal_test = __shoal_tree.body[0].test
            if (isinstance(__shoal_test, ast.Compare) and len(__shoal_test.ops) == 1
                    and isinstance(__shoal_test.ops[0], ast.Eq)):
                __shoal_got = __shoal_eval(__shoal_test.left, __shoal_ns)
                __shoal_result["out"] = __shoal_show(__shoal_got)
                __shoal_want = __shoal_eval(__shoal_test.comparators[0], __shoal_ns)
                __shoal_result["ok"] = bool(__shoal_same(__shoal_got, __shoal_want))
                if not __shoal_result["ok"]:
                    __shoal_result["err"] = "got " + __shoal_show(__shoal_got) + ", expected " + __shoal_show(__shoal_want)
            else:
                __shoal_got = __shoal_eval(__shoal_test, __shoal_ns)
                __shoal_result["out"] = __shoal_show(__shoal_got)
                __shoal_result["ok"] = bool(__shoal_got)
                if not __shoal_result["ok"]:
                    __shoal_result["err"] = "the condition is " + __shoal_show(__shoal_got)
        except __ShoalTimeout:
            __shoal_result["out"] = "timeout"
            __shoal_result["err"] = "it did not finish within %.1f s" % __shoal_limit
        except BaseException as __shoal_error:
            __shoal_result["out"] = "raise " + type(__shoal_error).__name__
            __shoal_result["err"] = traceback.format_exc()[-800:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        __shoal_report["checks"].append(__shoal_result)
sys.stdout.flush()
print("\n" + __shoal_marker + json.dumps(__shoal_report), flush=True)
"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::vote::sandbox;

    fn run(code: &str, checks: &[&str]) -> Behaviour {
        let checks: Vec<String> = checks.iter().map(|c| c.to_string()).collect();
        let program = behaviour_program(code, &checks, Duration::from_millis(500));
        let run = sandbox()
            .unwrap()
            .run(&program, Duration::from_secs(20))
            .unwrap();
        parse_report(&run.stdout_tail)
            .unwrap_or_else(|| panic!("no report: {}\n{}", run.stdout_tail, run.stderr_tail))
    }

    #[test]
    fn each_check_reports_what_the_function_did() {
        let code = "def f(x):\n    print('noise', x)\n    if x < 0:\n        raise ValueError('negative')\n    if x == 7:\n        while True:\n            pass\n    return x / 2\n";
        let b = run(
            code,
            &[
                "assert f(4) == 2",
                "assert f(1) == 0.5000000001",
                "assert f(2) == 5",
                "assert f(-1) == 0",
                "assert f(7) == 1",
                "assert f(2) > 0",
                "assert not f(0)",
                "f(3)",
                "assert f(",
            ],
        );
        assert!(b.defined, "{b:?}");
        let got: Vec<(bool, &str)> = b.checks.iter().map(|c| (c.ok, c.out.as_str())).collect();
        assert_eq!(
            got,
            [
                (true, "2.0"),
                (true, "0.5"),
                (false, "1.0"),
                (false, "raise ValueError"),
                (false, "timeout"),
                (true, "True"),
                (true, "True"),
                (false, "raise SyntaxError"),
                (false, "raise SyntaxError"),
            ]
        );
        assert_eq!(b.checks[2].err, "got 1.0, expected 5");
        assert!(b.checks[3].err.contains("ValueError: negative"), "{b:?}");
        assert_eq!(b.signature().unwrap().len(), 9);
    }

    #[test]
    fn code_that_does_not_define_reports_why() {
        let b = run("def f(x)\n    return x\n", &["assert f(1) == 1"]);
        assert!(!b.defined);
        assert!(b.error.contains("SyntaxError"), "{}", b.error);
        assert!(b.checks.is_empty());
        assert_eq!(b.signature(), None);
        // A fake report printed by the candidate is not the last one.
        let sneaky = format!(
            "print({:?} + '{{\"defined\": true, \"error\": \"\", \"checks\": [{{\"ok\": true, \"out\": \"\", \"err\": \"\"}}]}}')\ndef f(x):\n    return 0\n",
            REPORT_MARKER
        );
        let b = run(&sneaky, &["assert f(1) == 1"]);
        assert!(!b.checks[0].ok);
    }

    #[test]
    fn reports_are_parsed_from_the_end() {
        assert_eq!(parse_report::<Behaviour>("nothing here"), None);
        assert_eq!(
            parse_report::<Behaviour>(&format!("{REPORT_MARKER}{{not json")),
            None
        );
        let b = parse_report::<Behaviour>(&format!(
            "x\n{REPORT_MARKER}{{\"defined\": false, \"error\": \"e\", \"checks\": []}}\n"
        ))
        .unwrap();
        assert_eq!(b.error, "e");
    }
}
