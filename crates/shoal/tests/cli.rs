#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

//! The `shoal` command line, run as a real process on the real default model.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use shoal_engine::{ChatMessage, GenerateParams, Model};

fn model() -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let p = dir.join("smollm2-135m-instruct-q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_LOG", "warn")
        .output()
        .expect("shoal runs")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "shoal failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

const PROMPT: &str = "What is the capital of France?";

/// `shoal run` on the default model's greedy answer to [`PROMPT`], with `extra` flags.
fn greedy_answer(extra: &[&str]) -> String {
    let m = model();
    let mut args = vec![
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "24",
    ];
    args.extend_from_slice(extra);
    stdout(&shoal(&args))
}

#[test]
fn run_streams_the_engines_greedy_answer() {
    let m = model();
    let out = greedy_answer(&[]);
    // The same generation through the library.
    let model = Model::load(&m, |_, _| {}).unwrap();
    let prompt = model
        .render_chat(&[ChatMessage {
            role: "user".into(),
            content: PROMPT.into(),
        }])
        .unwrap();
    let ids = model.encode_prompt(&prompt).unwrap();
    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let mut g = model.generate(ids, params).unwrap();
    let mut want = String::new();
    while let Some(step) = g.next_step().unwrap() {
        want.push_str(&step.text);
    }
    assert!(!want.trim().is_empty());
    assert_eq!(out, format!("{want}\n"));
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let m = model();
    let run = |seed: &str| {
        stdout(&shoal(&[
            "--threads",
            "1",
            "run",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "Tell me a story.",
            "--max-tokens",
            "24",
            "--temperature",
            "1.0",
            "--seed",
            seed,
        ]))
    };
    let a = run("1");
    assert_eq!(a, run("1"));
    // Two other seeds both giving the same 24 sampled tokens would be a broken sampler.
    assert!(run("2") != a || run("3") != a);
}

#[test]
fn stop_strings_end_the_answer() {
    let full = greedy_answer(&[]);
    // Stop at the first space of the greedy answer: only the first word remains.
    let first_word = full.trim_start().split(' ').next().unwrap().to_string();
    let cut = greedy_answer(&["--stop", " "]);
    assert_eq!(
        cut.trim_end_matches('\n'),
        full[..full.find(' ').unwrap()].to_string()
    );
    assert!(cut.contains(&first_word));
}

#[test]
fn chat_answers_each_line() {
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["chat", "--model", m.to_str().unwrap(), "--max-tokens", "12"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi!\nWhat is 2+2?\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    // Two answers, one line each at least.
    assert!(
        text.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
        "{text:?}"
    );
}

#[test]
fn bench_reports_speed_and_memory_as_json() {
    let m = model();
    let out = stdout(&shoal(&[
        "bench",
        "--model",
        m.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "8",
        "--repeat",
        "1",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prompt_tokens"], 16);
    assert_eq!(v["decode_tokens"], 8);
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_mib",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {}", v[key]);
    }
}

#[test]
fn bench_swarm_overhead_measures_every_strategy_through_a_real_head() {
    let m = model();
    let out = stdout(&shoal(&[
        "bench",
        "--swarm-overhead",
        "--model",
        m.to_str().unwrap(),
        "--requests",
        "3",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["health_median_ms"].as_f64().unwrap() > 0.0, "{v}");
    let rows = v["rows"].as_array().unwrap();
    // (strategy, classified by, Asks each request must have cost at least)
    let expected = [
        ("fastest", "keywords", 1.0),
        ("vote", "keywords", 5.0),
        ("moa", "keywords", 4.0),
        ("confidence", "keywords", 9.0),
        ("speed", "keywords", 2.0),
        ("strongest", "keywords", 1.0),
        ("fastest", "spotter", 2.0),
        ("vote", "spotter", 6.0),
    ];
    assert_eq!(rows.len(), expected.len(), "{v}");
    for (row, (strategy, classified_by, asks)) in rows.iter().zip(expected) {
        assert_eq!(row["strategy"], strategy, "{row}");
        assert_eq!(row["classified_by"], classified_by, "{row}");
        assert_eq!(row["requests"], 3, "{row}");
        assert!(row["asks_per_request"].as_f64().unwrap() >= asks, "{row}");
        let median = row["median_ms"].as_f64().unwrap();
        assert!(
            median > 0.0 && median <= row["max_ms"].as_f64().unwrap(),
            "{row}"
        );
    }
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let o = shoal(&[
        "run",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn a_file_that_is_not_gguf_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("shoal-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"this is not a model").unwrap();
    let o = shoal(&["run", "--model", bad.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("GGUF"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn plan_measures_this_node_and_explains_the_ring() {
    let m = model();
    // A forced three-way split over this node and two described peers.
    let out = stdout(&shoal(&[
        "plan",
        "--model",
        m.to_str().unwrap(),
        "--node",
        "b:1:0.2",
        "--node",
        "c:1:0.2",
        "--split",
        "0-9,10-19,20-29",
    ]));
    for want in [
        "layers 0-9",
        "layers 10-19",
        "layers 20-29",
        "predicted:",
        "3 hops",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    // A device far slower than this one is left out of a latency plan, with the reason.
    let out = stdout(&shoal(&[
        "plan",
        "--model",
        m.to_str().unwrap(),
        "--node",
        "slow:8:500",
    ]));
    assert!(out.contains("left out `slow`"), "{out}");
    // A split that does not cover the model is refused.
    let o = shoal(&[
        "plan",
        "--model",
        m.to_str().unwrap(),
        "--node",
        "b:1:0.2",
        "--split",
        "0-9,10-20",
    ]);
    assert!(!o.status.success());
}

#[test]
fn greedy_output_is_identical_across_thread_counts() {
    let qwen = model()
        .with_file_name("qwen2.5-coder-0.5b-instruct.gguf")
        .to_string_lossy()
        .into_owned();
    let smol = model().to_string_lossy().into_owned();
    // Qwen exercises the Q4_K, Q6_K, Q5_0 and Q8_0 kernels, SmolLM2 Q4_1.
    for path in [qwen.as_str(), smol.as_str()] {
        let answer = |threads: &str| {
            stdout(&shoal(&[
                "--threads",
                threads,
                "run",
                "-m",
                path,
                "--prompt",
                "Write quicksort in Python.",
                "--max-tokens",
                "40",
                "--temperature",
                "0",
            ]))
        };
        let one = answer("1");
        assert!(!one.trim().is_empty());
        assert_eq!(answer("2"), one, "{path}: 1 vs 2 threads");
    }
}

#[test]
fn key_new_prints_a_fresh_key_that_serve_accepts() {
    let a = stdout(&shoal(&["key", "new"]));
    let b = stdout(&shoal(&["key", "new"]));
    let key = a.trim();
    assert_eq!(key.len(), 64, "{a}");
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    assert_ne!(key, b.trim(), "every key is new");
    // A bad key is refused before anything listens, saying how to make a good one.
    let o = shoal(&[
        "serve",
        "--model",
        "/nonexistent/model.gguf",
        "--swarm-key",
        "abc",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shoal key new"), "{err}");
}

#[test]
fn a_peer_port_beyond_loopback_needs_a_key() {
    // Refused before the model is looked for (the path does not exist).
    let o = shoal(&[
        "serve",
        "--model",
        "/nonexistent/model.gguf",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--peer-port",
        "0",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("without a swarm key"), "{err}");
    assert!(err.contains("shoal key new"), "{err}");
    assert!(err.contains("--insecure-peers"), "{err}");
    // With a key the same flags get past that check (and stop at the missing model).
    let key = stdout(&shoal(&["key", "new"]));
    let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "serve",
            "--model",
            "/nonexistent/model.gguf",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--peer-port",
            "0",
        ])
        .env("SHOAL_SWARM_KEY", key.trim())
        .env("SHOAL_LOG", "warn")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("without a swarm key"), "{err}");
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn the_config_file_names_a_key_file() {
    let dir = std::env::temp_dir().join(format!("shoal-key-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = stdout(&shoal(&["key", "new"]));
    std::fs::write(dir.join("swarm.key"), &key).unwrap();
    let config = dir.join("shoal.toml");
    std::fs::write(
        &config,
        "model = \"/nonexistent/model.gguf\"\nhost = \"0.0.0.0\"\nport = 0\npeer_port = 0\n\
         swarm_key_file = \"swarm.key\"\n",
    )
    .unwrap();
    let o = shoal(&["serve", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("without a swarm key"), "{err}");
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
    // A key file that holds no key is named in the error.
    std::fs::write(dir.join("swarm.key"), "not a key").unwrap();
    let o = shoal(&["serve", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("swarm.key"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
