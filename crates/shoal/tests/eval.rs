#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

//! `shoal eval humaneval` as a real process: the harness on the canonical solutions (no
//! server), a short run against a real `shoal serve` with the SmolLM2-135M test model on
//! 127.0.0.1:0, and the errors a user meets (no server, unknown model, no data).
//!
//! Needs `python3`, the model and the data (`scripts/fetch-models.sh smollm2 humaneval mbpp`).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn data() -> PathBuf {
    common::model_path("HumanEval.jsonl.gz")
}

fn model() -> PathBuf {
    common::model_path(common::SMOLLM2)
}

/// `shoal eval humaneval --data DATA ARGS…`.
fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["eval", "humaneval", "--data"])
        .arg(data())
        .args(args)
        .env("SHOAL_LOG", "warn")
        .env_remove("SHOAL_API_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("shoal runs")
}

fn report(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "shoal eval failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("--json prints one JSON object")
}

fn failure(o: &Output) -> String {
    assert!(!o.status.success(), "shoal eval should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_harness_passes_the_first_20_canonical_solutions() {
    let r = report(&eval(&["--check-harness", "--limit", "20", "--json"]));
    assert_eq!(r["problems"], 20);
    assert_eq!(r["passed"], 20, "{r:#}");
    assert_eq!(r["pass_at_1"], 1.0);
    assert_eq!(r["strategy"], "canonical");
}

#[test]
fn the_harness_passes_all_164_canonical_solutions() {
    let r = report(&eval(&["--check-harness", "--json"]));
    assert_eq!(r["problems"], 164);
    assert_eq!(r["passed"], 164, "{r:#}");
    assert!(r["not_passed"].as_array().unwrap().is_empty());
}

#[test]
fn the_mbpp_harness_passes_all_500_reference_solutions() {
    let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["eval", "mbpp", "--check-harness", "--json", "--data"])
        .arg(common::model_path("mbpp.jsonl.gz"))
        .env("SHOAL_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let r = report(&o);
    assert_eq!(r["benchmark"], "mbpp");
    assert_eq!(r["problems"], 500);
    assert_eq!(r["passed"], 500, "{r:#}");
}

#[test]
fn the_python_network_guard_lets_the_canonical_solutions_pass() {
    let r = report(&eval(&[
        "--check-harness",
        "--json",
        "--isolation",
        "python-guard",
        "--offset",
        "100",
        "--limit",
        "40",
    ]));
    assert_eq!(r["isolation"], "python-guard");
    assert_eq!(r["passed"], 40, "{r:#}");
}

#[test]
fn the_harness_table_and_offset() {
    let o = eval(&["--check-harness", "--offset", "160", "--limit", "10"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.contains("4/4"), "{table}");
    assert!(table.contains("100.0%"), "{table}");
}

#[test]
fn a_missing_data_file_says_how_to_fetch_it() {
    let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "eval",
            "humaneval",
            "--check-harness",
            "--data",
            "/nonexistent/HumanEval.jsonl.gz",
        ])
        .output()
        .unwrap();
    let err = failure(&o);
    assert!(err.contains("scripts/fetch-models.sh humaneval"), "{err}");
}

#[test]
fn no_server_is_a_clear_error() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let err = failure(&eval(&["--url", &url, "--limit", "1"]));
    assert!(err.contains("cannot reach the Shoal API"), "{err}");
    assert!(err.contains(&url), "{err}");
}

#[test]
fn two_problems_against_a_real_server() {
    let server = common::Server::start(&model(), &[]);
    let url = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.jsonl");
    // `eval` waits for the model to load by itself.
    let r = report(&eval(&[
        "--url",
        &url,
        "--limit",
        "2",
        "--max-tokens",
        "64",
        "--seed",
        "11",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(r["problems"], 2, "{r:#}");
    assert_eq!(r["seed"], 11, "{r:#}");
    let passed = r["passed"].as_u64().unwrap();
    assert!(passed <= 2);
    assert_eq!(r["request_errors"], 0, "{r:#}");
    assert_eq!(
        r["passed"].as_u64().unwrap()
            + r["failed"].as_u64().unwrap()
            + r["timed_out"].as_u64().unwrap(),
        2
    );
    assert_eq!(r["pass_at_1"].as_f64().unwrap(), passed as f64 / 2.0);
    assert_eq!(r["strategy"], "single");
    // The default model is the server's one.
    assert_eq!(r["model"], "smollm2-135m-instruct-q4_1");
    assert_eq!(r["url"], url.as_str());
    assert!(r["wall_s"].as_f64().unwrap() > 0.0);
    assert!(r["mean_s_per_problem"].as_f64().unwrap() > 0.0);

    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["task_id"], format!("HumanEval/{i}"));
        assert!(line["completion"].is_string());
        assert!(line["code"].is_string());
        assert!(["passed", "failed", "timed_out"].contains(&line["outcome"].as_str().unwrap()));
        assert!(line["completion_tokens"].as_u64().unwrap() <= 64);
        assert!(line["request_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(
        lines.iter().filter(|l| l["passed"] == true).count() as u64,
        passed
    );

    // MBPP the same way: its first problem, asked as a task in words with one assert.
    let mbpp_out = dir.path().join("mbpp.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "eval",
            "mbpp",
            "--limit",
            "1",
            "--max-tokens",
            "64",
            "--json",
        ])
        .args(["--url", &url, "--data"])
        .arg(common::model_path("mbpp.jsonl.gz"))
        .arg("--out")
        .arg(&mbpp_out)
        .env("SHOAL_LOG", "warn")
        .env_remove("SHOAL_API_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let r = report(&o);
    assert_eq!(r["benchmark"], "mbpp");
    assert_eq!(r["problems"], 1, "{r:#}");
    assert_eq!(r["request_errors"], 0, "{r:#}");
    let line: Value =
        serde_json::from_str(std::fs::read_to_string(&mbpp_out).unwrap().trim()).unwrap();
    assert_eq!(line["task_id"], "MBPP/11");
    assert_eq!(line["passed"], r["passed"] == 1);

    // A model the server does not have: the API's own message, and a failure.
    let err = failure(&eval(&["--url", &url, "--limit", "1", "--model", "gpt-9"]));
    assert!(err.contains("404"), "{err}");
    assert!(err.contains("gpt-9"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn a_model_name_with_a_swarm_strategy_is_refused() {
    let err = failure(&eval(&[
        "--strategy",
        "vote",
        "--model",
        "m",
        "--limit",
        "1",
    ]));
    assert!(err.contains("--model is for --strategy single"), "{err}");
    assert!(err.contains("swarm:vote"), "{err}");
}

#[test]
fn agents_start_the_swarm_that_is_measured() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vote.jsonl");
    let smol = model().to_string_lossy().into_owned();
    let agents = format!("{smol}:reasoner,{smol}:critic");
    let r = report(&eval(&[
        "--agents",
        agents.as_str(),
        "--strategy",
        "vote",
        "--limit",
        "1",
        "--max-tokens",
        "48",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(r["problems"], 1, "{r:#}");
    assert_eq!(r["model"], "swarm:vote");
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let responded = line["agents_responded"]
        .as_array()
        .expect("the head's report");
    assert_eq!(responded.len(), 2, "both started agents answered: {line}");
}

/// The `shoal` processes whose parent is `pid`, from /proc: (pid, state).
#[cfg(target_os = "linux")]
fn children_of(pid: u32) -> Vec<(u32, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID …": COMM may hold spaces, so split after its ')'.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if ppid == pid.to_string() && head.contains("(shoal") {
            let child: u32 = head.split(' ').next().unwrap().parse().unwrap();
            found.push((child, state.chars().next().unwrap()));
        }
    }
    found
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
#[cfg(target_os = "linux")]
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_killed_eval_takes_its_servers_with_it() {
    use std::time::{Duration, Instant};
    let mut run = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["eval", "humaneval", "--data"])
        .arg(data())
        .args(["--agents"])
        .arg(model())
        .args(["--strategy", "single", "--max-tokens", "48", "--json"])
        .env("SHOAL_LOG", "warn")
        .env_remove("SHOAL_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let servers = loop {
        let servers = children_of(run.id());
        if !servers.is_empty() {
            break servers;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the eval started no server"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // SIGTERM, as a user's `kill` or a CI timeout sends it: no destructor runs.
    let killed = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    run.wait().unwrap();
    let stopped = Instant::now();
    for (server, _) in servers {
        while !ended(server) {
            assert!(
                stopped.elapsed() < Duration::from_secs(20),
                "server {server} outlived its eval"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
