#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Vote runs a prompt's examples with the candidates' code, so the prompt's author chooses
//! code that runs on the head (issue #14, item 2). Examples that try to write a file, open
//! a socket or leave a process behind achieve none of it: each is tried for real through
//! `code_passes_examples`, and its effect is looked for from outside.
//!
//! Needs unprivileged user namespaces; SHOAL_NO_SANDBOX=1 skips (see shoal-sandbox's
//! tests/isolation.rs). Without a sandbox vote runs no code at all, which
//! `checks_off_run_nothing_and_the_outcome_says_so` covers everywhere.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use shoal_swarm::verify::{run_behaviours, Language};
use shoal_swarm::vote::{code_passes_examples, sandbox, vote, CodeChecks, VoteMethod};

const TIMEOUT: Duration = Duration::from_secs(20);
const IDENTITY: &str = "def f(x):\n    return x\n";

fn with_sandbox() -> bool {
    if std::env::var_os("SHOAL_NO_SANDBOX").is_some() {
        eprintln!("SHOAL_NO_SANDBOX is set: skipped");
        return false;
    }
    if let Err(e) = sandbox() {
        panic!("{e} (set SHOAL_NO_SANDBOX=1 where namespaces are off)");
    }
    true
}

/// A prompt for `f` with one doctest example.
fn prompt(call: &str) -> String {
    format!("def f(x):\n    \"\"\"Returns x.\n    >>> f({call})\n    1\n    \"\"\"\n")
}

fn host_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("shoal-vote-{name}-{}", std::process::id()))
}

#[test]
fn examples_that_write_a_file_write_nothing() {
    if !with_sandbox() {
        return;
    }
    let target = host_path("pwned");
    let _ = std::fs::remove_file(&target);
    let p = prompt(&format!("open({target:?}, 'w').write('x')"));
    // The call fails inside (no such directory there), so the example cannot be judged.
    let _ = code_passes_examples(&p, IDENTITY, TIMEOUT);
    assert!(!target.exists(), "the example wrote {}", target.display());
}

#[test]
fn examples_that_open_a_socket_reach_nothing() {
    if !with_sandbox() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let p = prompt(&format!(
        "__import__('socket').create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')"
    ));
    let _ = code_passes_examples(&p, IDENTITY, TIMEOUT);
    assert!(listener.accept().is_err(), "the example connected");
}

#[test]
fn examples_that_fork_leave_nothing_behind() {
    if !with_sandbox() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let marker = host_path("forked");
    let _ = std::fs::remove_file(&marker);
    // The child waits for the check to end, then tries to act: write, connect.
    let child = format!(
        "(__import__('time').sleep(2), open({marker:?}, 'w'), \
         __import__('socket').create_connection(('127.0.0.1', {port})))"
    );
    let p = prompt(&format!(
        "(lambda pid: 1 if pid else {child})(__import__('ctypes').CDLL(None).fork())"
    ));
    let _ = code_passes_examples(&p, IDENTITY, TIMEOUT);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!marker.exists(), "a forked child wrote");
    assert!(listener.accept().is_err(), "a forked child connected");
}

#[test]
fn checks_off_run_nothing_and_the_outcome_says_so() {
    let p = prompt("1");
    let wrong = "```python\ndef f(x):\n    return 2\n```";
    let right = "```python\ndef f(x):\n    return x\n```";
    let answers: Vec<String> = [wrong, wrong, right].map(str::to_owned).to_vec();

    let off = vote(&p, &answers, CodeChecks::Off).unwrap();
    assert_eq!(off.method, VoteMethod::Majority);
    assert_eq!(off.winner, 0, "without checks the majority wins");
    assert_eq!(off.unchecked, Some("code checks are off"));

    if !with_sandbox() {
        return;
    }
    let on = vote(&p, &answers, CodeChecks::On { timeout: TIMEOUT }).unwrap();
    assert_eq!(on.method, VoteMethod::CodeExamples);
    assert_eq!(on.winner, 2, "the code that passes the example wins");
    assert_eq!(on.unchecked, None);
}

/// Tests written by agents run the same way (issue #18): a written test that writes a file
/// on the head or opens a socket achieves nothing there, and its candidate's other checks
/// still report.
#[test]
fn written_tests_that_write_a_file_or_open_a_socket_achieve_nothing() {
    if !with_sandbox() {
        return;
    }
    let target = host_path("written-test");
    let _ = std::fs::remove_file(&target);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let checks = vec![
        "assert f(1) == 1".to_owned(),
        format!("assert f(open({target:?}, 'w').write('x')) == 1"),
        format!(
            "assert f(__import__('socket').create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')) == 1"
        ),
        "assert f(2) == 3".to_owned(),
    ];
    let program = Some(IDENTITY.to_owned());
    let behaviours = run_behaviours(Language::Python, &[program], &checks, TIMEOUT);
    let b = behaviours[0].as_ref().expect("the candidate reports");
    let got: Vec<(bool, &str)> = b.checks.iter().map(|c| (c.ok, c.out.as_str())).collect();
    assert_eq!(got[0], (true, "1"));
    // The write may succeed inside (a scratch of its own) or fail; the host's file is
    // untouched either way.
    assert!(!got[2].0 && got[2].1.starts_with("raise "), "{b:?}");
    assert_eq!(got[3], (false, "2"));
    assert!(
        !target.exists(),
        "a written test wrote {}",
        target.display()
    );
    assert!(listener.accept().is_err(), "a written test connected");
}
