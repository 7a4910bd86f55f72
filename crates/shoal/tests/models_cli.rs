//! End to end: `shoal models`, `shoal models pull` and `--model NAME` as a user runs them,
//! in a fresh models directory, with a local stand-in for Hugging Face
//! (`SHOAL_HF_ENDPOINT`) serving the real SmolLM2 file through a redirect and dropping
//! the first connection part-way, so the pull has to resume.
//!
//! Needs the SmolLM2 model in ./models or $SHOAL_MODELS_DIR (`scripts/fetch-models.sh`),
//! which the stand-in serves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../models/tests/common/hf_standin.rs"]
mod hf_standin;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use hf_standin::{Behaviour, HfStandIn};
use shoal_models::SMOLLM2;

fn local_smollm2() -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let path = dir.join(SMOLLM2.file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set SHOAL_MODELS_DIR)",
        path.display()
    );
    path
}

fn shoal(models_dir: &Path, endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_MODELS_DIR", models_dir)
        .env("SHOAL_HF_ENDPOINT", endpoint)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn listing(models_dir: &Path, endpoint: &str) -> Vec<serde_json::Value> {
    let out = shoal(models_dir, endpoint, &["models", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn pull_from_hugging_face_stand_in_then_run_by_name() {
    let bytes = Arc::new(std::fs::read(local_smollm2()).unwrap());
    let server = HfStandIn::start(
        vec![(SMOLLM2.hf.repo, SMOLLM2.hf.file, bytes)],
        Behaviour {
            redirect: true,
            cut_after: Some(10_000_000),
            cut_times: 1,
            ..Behaviour::hub()
        },
    );
    let endpoint = server.endpoint();
    let dir = tempfile::tempdir().unwrap();

    let before = listing(dir.path(), &endpoint);
    assert_eq!(before.len(), shoal_models::REGISTRY.len());
    assert_eq!(before[0]["name"], "smollm2");
    assert_eq!(before[0]["default"], true);
    assert!(before.iter().all(|m| m["present"] == false));
    assert_eq!(
        before[0]["hf_url"],
        format!(
            "{endpoint}/{}/resolve/main/{}",
            SMOLLM2.hf.repo, SMOLLM2.hf.file
        )
    );

    let out = shoal(
        dir.path(),
        &endpoint,
        &["models", "pull", "smollm2", "--source", "http"],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        text(&out.stdout).contains("(verified)"),
        "{}",
        text(&out.stdout)
    );
    assert!(stderr.contains("retrying"), "{stderr}");
    let ranges: Vec<_> = server.seen().into_iter().filter_map(|s| s.range).collect();
    assert_eq!(ranges, vec!["bytes=10000000-"; 2], "{:?}", server.seen());

    let after = listing(dir.path(), &endpoint);
    assert_eq!(after[0]["present"], true);
    assert_eq!(after[0]["status"], "present");
    assert_eq!(after[1]["present"], false);

    // `--model NAME` finds the pulled file; nothing is fetched again.
    let requests = server.seen().len();
    let out = shoal(
        dir.path(),
        &endpoint,
        &[
            "run",
            "--model",
            "smollm2",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "8",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).trim().is_empty());
    assert!(
        !text(&out.stderr).contains("fetching"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(server.seen().len(), requests);
}

#[test]
fn unknown_model_name_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let out = shoal(
        dir.path(),
        "http://127.0.0.1:9",
        &["run", "--model", "llama-9000", "--prompt", "hi"],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not a known model name (smollm2, qwen05, qwen15, gemma3"),
        "{stderr}"
    );
    let out = shoal(
        dir.path(),
        "http://127.0.0.1:9",
        &["models", "pull", "llama-9000"],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown model `llama-9000`"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `shoal detect --json`: this machine's hardware as scripts read it, and a model choice
/// that fits the memory it reports.
#[test]
fn detect_reports_this_machine_and_a_model_that_fits() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["detect", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hw = &v["hardware"];
    assert!(hw["cpu"]["logical_cores"].as_u64().unwrap() >= 1);
    assert_eq!(hw["arch"], std::env::consts::ARCH);
    if cfg!(target_os = "linux") {
        let total = hw["memory"]["total_bytes"].as_u64().unwrap();
        let available = hw["memory"]["available_bytes"].as_u64().unwrap();
        assert!(0 < available && available <= total);
        let size = v["recommended"]["size_bytes"].as_u64().unwrap();
        assert!(size < available, "{v}");
    }
    assert!(v["recommended"]["model"].is_string());
    let table = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("detect")
        .output()
        .unwrap();
    assert!(
        text(&table.stdout).contains("would run"),
        "{}",
        text(&table.stdout)
    );
}

/// `shoal models room`: what `--model auto` runs on clusters of 1 to N devices alike; a
/// bigger cluster never runs a smaller model, and each fits in the memory of them all.
#[test]
fn models_room_shows_a_bigger_model_for_a_bigger_cluster() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["models", "room"])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, err) = run(&["--free-gib", "0.5", "--devices", "4", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let models: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["smollm2", "qwen05", "qwen05", "qwen15"]);
    for r in &rows {
        assert!(r["needs_bytes"].as_u64() <= r["free_bytes"].as_u64(), "{r}");
    }
    let (ok, table, err) = run(&["--free-gib", "0.01", "--devices", "2"]);
    assert!(ok, "{err}");
    assert!(table.contains("(none)"), "{table}");
    let (ok, _, err) = run(&["--devices", "0"]);
    assert!(!ok);
    assert!(err.contains("--devices"), "{err}");
}
