#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The sandbox against programs that try to do harm (issue #14, item 2): each attempt is
//! made for real, and its effect is looked for from outside.
//!
//! Needs unprivileged user namespaces (as on this project's CI machines). Where they are
//! off, set SHOAL_NO_SANDBOX=1 to skip these tests; otherwise a missing sandbox fails
//! them, so a machine that silently lost it cannot pass.

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_sandbox::{Execution, Sandbox};

const SECONDS: Duration = Duration::from_secs(20);

fn sandbox() -> Option<Sandbox> {
    if std::env::var_os("SHOAL_NO_SANDBOX").is_some() {
        eprintln!("SHOAL_NO_SANDBOX is set: skipped");
        return None;
    }
    // As the swarm's vote takes it (as root, the system's interpreter if the first is
    // private, so that programs run as nobody).
    match Sandbox::isolated("python3") {
        Ok(s) => Some(s),
        Err(e) => panic!("{e} (set SHOAL_NO_SANDBOX=1 where namespaces are off)"),
    }
}

fn run(s: &Sandbox, program: &str) -> Execution {
    let e = s.run(program, SECONDS).expect("the run happens");
    assert!(!e.timed_out, "{program}\n{}", e.stderr_tail);
    e
}

/// A directory of the host's, for the test to look into afterwards.
fn host_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-isolation-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn it_cannot_write_outside_its_scratch_directory() {
    let Some(s) = sandbox() else { return };
    let dir = host_dir("write");
    let target = dir.join("pwned");
    // The host's directory by its own path, the system's directories; /tmp is a tmpfs of
    // the run's own, so writing there works and leaves nothing.
    let e = run(
        &s,
        &format!(
            "fails = 0\n\
             for path in ({target:?}, '/usr/pwned', '/usr/bin/pwned', '/pwned'):\n    \
                 try:\n        \
                     open(path, 'w').write('x')\n    \
                 except OSError:\n        \
                     fails += 1\n\
             open('/tmp/pwned', 'w').write('x')\n\
             assert fails >= 3, fails\n"
        ),
    );
    assert!(e.completed, "{}", e.stderr_tail);
    assert!(!target.exists());
    assert!(!PathBuf::from("/usr/pwned").exists());
    assert!(!PathBuf::from("/usr/bin/pwned").exists());
    assert!(!PathBuf::from("/pwned").exists());
    assert!(!PathBuf::from("/tmp/pwned").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn it_cannot_read_the_users_files_or_environment() {
    let Some(s) = sandbox() else { return };
    let dir = host_dir("read");
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, "the user's secret").unwrap();
    let e = run(
        &s,
        &format!(
            "import os\n\
             for path in ({secret:?}, '/etc/passwd', '/etc/hostname', '/proc/self/environ', '/home', '/var'):\n    \
                 assert not os.path.exists(path), path\n\
             assert set(os.environ) <= {{'PATH', 'HOME', 'LANG', 'LC_CTYPE', 'OMP_NUM_THREADS'}}, os.environ\n"
        ),
    );
    assert!(e.completed, "{}", e.stderr_tail);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn it_cannot_reach_the_network() {
    let Some(s) = sandbox() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let e = run(
        &s,
        &format!(
            "import socket\n\
             for host in ('127.0.0.1', '10.0.0.1', '8.8.8.8'):\n    \
                 try:\n        \
                     socket.create_connection((host, {port}), timeout=2)\n        \
                     raise SystemExit('connected to ' + host)\n    \
                 except OSError:\n        \
                     pass\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             try:\n    \
                 s.sendto(b'x', ('127.0.0.1', {port}))\n    \
                 raise SystemExit('sent')\n\
             except OSError:\n    \
                 pass\n"
        ),
    );
    assert!(e.completed, "{}", e.stderr_tail);
    assert!(
        listener.accept().is_err(),
        "the host's listener saw a connection"
    );
}

#[test]
fn what_it_forks_dies_with_it_and_it_cannot_signal_the_host() {
    let Some(s) = sandbox() else { return };
    // A process of the host's, which the program knows the PID of.
    let mut victim = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let dir = host_dir("fork");
    let proof = dir.join("child-outlived");
    // The guard sets os.fork to None; libc's fork, through ctypes, is what is left. The
    // child leaves the process group too, so only the PID namespace can end it.
    let e = run(
        &s,
        &format!(
            "import ctypes, time\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             assert libc.kill({victim}, 9) != 0, 'signalled the host'\n\
             assert ctypes.get_errno() == 3, ctypes.get_errno()  # ESRCH: no such process here\n\
             pid = libc.fork()\n\
             if pid == 0:\n    \
                 libc.setsid()\n    \
                 time.sleep(3)\n    \
                 open({proof:?}, 'w').write('x')\n    \
                 open('/work/child-outlived', 'w').write('x')\n    \
                 libc._exit(0)\n\
             assert pid > 0\n",
            victim = victim.id(),
        ),
    );
    assert!(e.completed, "{}", e.stderr_tail);
    std::thread::sleep(Duration::from_secs(4));
    assert!(!proof.exists());
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the host's process was killed"
    );
    victim.kill().unwrap();
    let _ = victim.wait();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A fork bomb gets at most `MAX_PROCESSES` processes (itself included), whoever runs the
/// node (as root, the program runs as nobody, which the kernel holds to the limit), and the
/// program itself goes on.
#[test]
fn a_fork_bomb_gets_a_few_processes() {
    let Some(s) = sandbox() else { return };
    assert!(
        s.limits_processes(),
        "{} is not held to a process limit here (root with a private interpreter)",
        s.python()
    );
    let e = run(
        &s,
        "import ctypes, sys\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         made = 0\n\
         for _ in range(200):\n    \
             pid = libc.fork()\n    \
             if pid == 0:\n        \
                 libc.pause()\n        \
                 libc._exit(0)\n    \
             if pid < 0:\n        \
                 break\n    \
             made += 1\n\
         sys.stderr.write(f'made {made} errno {ctypes.get_errno()}\\n')\n",
    );
    assert!(e.completed, "{}", e.stderr_tail);
    let made: u32 = e
        .stderr_tail
        .split_whitespace()
        .skip_while(|w| *w != "made")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count: {}", e.stderr_tail));
    assert!(
        made > 0 && made < shoal_sandbox::MAX_PROCESSES,
        "{made} processes: {}",
        e.stderr_tail
    );
    assert!(
        e.stderr_tail.contains("errno 11"),
        "EAGAIN: {}",
        e.stderr_tail
    );
}

#[test]
fn it_is_killed_at_its_deadline_with_what_it_started() {
    let Some(s) = sandbox() else { return };
    let started = Instant::now();
    let e = s
        .run(
            "import ctypes\n\
             libc = ctypes.CDLL(None)\n\
             libc.prctl(15, b'shoaldeadline')  # PR_SET_NAME, inherited by the children\n\
             for _ in range(3):\n    \
                 libc.fork()\n\
             libc.setsid()\n\
             while True:\n    \
                 pass\n",
            Duration::from_millis(1500),
        )
        .unwrap();
    assert!(e.timed_out && !e.completed);
    assert!(started.elapsed() < Duration::from_secs(10));
    // Nothing of it is left running (a zombie, dead and waiting for the host's init to
    // reap it, is not running).
    std::thread::sleep(Duration::from_millis(200));
    let mut out = String::new();
    Command::new("ps")
        .args(["-eo", "stat,ppid,comm"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
        .stdout
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let running: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("shoaldeadline") && !l.trim_start().starts_with('Z'))
        .collect();
    assert!(running.is_empty(), "{running:?}");
}

#[test]
fn its_memory_file_size_and_cpu_are_limited_by_the_os() {
    let Some(s) = sandbox() else { return };
    // Limits the guard sets from inside could be raised again; these are hard limits.
    let e = run(
        &s,
        // (The guard hides `resource`; a program can get it back.)
        "import sys\n\
         del sys.modules['resource']\n\
         import resource\n\
         for limit in (resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_CPU):\n    \
             soft, hard = resource.getrlimit(limit)\n    \
             assert hard != resource.RLIM_INFINITY, limit\n    \
             try:\n        \
                 resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n        \
                 raise SystemExit('raised a hard limit')\n    \
             except (ValueError, OSError):\n        \
                 pass\n\
         try:\n    \
             bytearray(8 << 30)\n    \
             raise SystemExit('allocated 8 GiB')\n\
         except MemoryError:\n    \
             pass\n",
    );
    assert!(e.completed, "{}", e.stderr_tail);
}

/// JavaScript runs in the same sandbox (issue #18, item 4): `node` where the machine has
/// it. A script that writes the host's files, connects out, or never ends achieves nothing
/// and is killed at its deadline.
#[test]
fn javascript_runs_with_node_in_the_same_sandbox() {
    let Some(s) = sandbox() else { return };
    let node = match s.node() {
        Ok(node) => node,
        Err(e) if which_node().is_none() => {
            eprintln!("no node on this machine: {e}");
            return;
        }
        Err(e) => panic!("node is installed but does not run in the sandbox: {e}"),
    };
    let dir = host_dir("javascript");
    let target = dir.join("pwned");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        "const fs = require('fs');\n\
         let fails = 0;\n\
         for (const path of [{target:?}, '/usr/pwned', '/usr/bin/pwned']) {{\n\
           try {{ fs.writeFileSync(path, 'x'); }} catch (e) {{ fails += 1; }}\n\
         }}\n\
         fs.writeFileSync('mine.txt', 'fine');\n\
         const s = require('net').connect({port}, '127.0.0.1');\n\
         s.on('connect', () => {{ console.log('connected'); s.end('x'); }});\n\
         s.on('error', () => console.log('no network'));\n\
         console.log('fails', fails, process.pid);\n"
    );
    let e = s.run_javascript(&node, &program, SECONDS).unwrap();
    assert!(e.completed && e.exit_code == Some(0), "{}", e.stderr_tail);
    assert!(e.stdout_tail.contains("fails 3 1"), "{}", e.stdout_tail);
    assert!(e.stdout_tail.contains("no network"), "{}", e.stdout_tail);
    assert!(!target.exists());
    assert!(listener.accept().is_err(), "the script connected");

    let started = Instant::now();
    let e = s
        .run_javascript(&node, "while (true) {}", Duration::from_millis(800))
        .unwrap();
    assert!(e.timed_out && !e.completed);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let e = s
        .run_javascript(&node, "throw new Error('boom');", SECONDS)
        .unwrap();
    assert!(!e.completed && e.exit_code == Some(1), "{e:?}");
    assert!(e.stderr_tail.contains("boom"), "{}", e.stderr_tail);
    let e = s
        .run_javascript(&node, "process.exit(0);", SECONDS)
        .unwrap();
    assert!(
        !e.completed && e.exit_code == Some(0),
        "an early exit: {e:?}"
    );
}

fn which_node() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("node"))
            .find(|p| p.is_file())
    })
}
