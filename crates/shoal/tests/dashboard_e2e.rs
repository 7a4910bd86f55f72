//! End to end: the dashboard (issue #16) in a real browser against a real cluster. Two
//! stage-only nodes and a head that runs SmolLM2 as a three-stage ring over them, with a
//! swarm key, an API key and fast membership; tests/python/test_dashboard.py then drives
//! Chromium through Playwright: the page loads with no console errors, lists the three
//! nodes alive and the ring's three stages once the API key is entered, streams a greedy
//! chat answer, kills `stage-b` while it streams (the member turns suspect, then dead, and
//! the answer goes on and finishes on the re-planned ring), and heals it. It writes
//! `docs/img/dashboard.png` and `docs/img/dashboard-killed.png`. Then the swarm view: a
//! swarm head with two agents of different roles, and tests/python/test_dashboard_swarm.py
//! asks `swarm:vote` in the browser and checks every agent's answer, the chosen one and why
//! (`docs/img/dashboard-swarm.png`).
//!
//! Needs `python3` with `playwright`, a Chromium at `/usr/bin/chromium` (or
//! `SHOAL_CHROMIUM`) and the model: scripts/test.sh installs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use common::{model_path, workspace_root, Server, SMOLLM2};

const API_KEY: &str = "dash-key";

/// Fails, rather than skips, when the browser side is missing.
fn browser() -> PathBuf {
    let python = Command::new("python3")
        .args(["-c", "import playwright"])
        .output();
    assert!(
        python.is_ok_and(|o| o.status.success()),
        "python3 cannot import playwright: run scripts/test.sh, which installs it"
    );
    let chromium = PathBuf::from(
        std::env::var_os("SHOAL_CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into()),
    );
    assert!(
        chromium.is_file(),
        "no Chromium at {}: run scripts/test.sh, which installs it (or set SHOAL_CHROMIUM)",
        chromium.display()
    );
    chromium
}

/// `shoal serve` with what every node of this cluster shares, plus `extra`.
fn node(id: &str, extra: &[&str]) -> Server {
    let key = "11".repeat(32);
    let mut args = vec![
        "--node-id",
        id,
        "--swarm-key",
        &key,
        "--api-key",
        API_KEY,
        "--peer-port",
        "0",
        // On loopback, so that the printed peer address (the head's `--peer`) is the one
        // the members are known by, not 0.0.0.0.
        "--peer-host",
        "127.0.0.1",
        // Only the addresses given: no other test's nodes found by multicast.
        "--mdns",
        "off",
        "--heartbeat-interval-s",
        "0.5",
        "--suspect-after-s",
        "1.5",
        "--dead-after-s",
        "3",
    ];
    args.extend_from_slice(extra);
    Server::start(&model_path(SMOLLM2), &args)
}

#[test]
fn dashboard_in_a_browser() {
    let chromium = browser();
    let model = model_path(SMOLLM2);
    assert!(model.is_file());

    let a = node("stage-a", &["--stage-only"]);
    let b = node("stage-b", &["--stage-only"]);
    let (pa, pb) = (a.peer(), b.peer());
    let head = node(
        "head",
        &["--peer", &pa, "--peer", &pb, "--split", "0-9,10-19,20-29"],
    );
    for server in [&a, &b, &head] {
        server.wait_healthy();
    }

    let started = Instant::now();
    let status = Command::new("python3")
        .arg("tests/python/test_dashboard.py")
        .current_dir(workspace_root())
        .env("SHOAL_ROOT_URL", format!("http://{}", head.addr))
        .env("SHOAL_API_KEY", API_KEY)
        .env("SHOAL_KILL_NODE", "stage-b")
        .env("SHOAL_SCREENSHOTS", workspace_root().join("docs/img"))
        .env("SHOAL_CHROMIUM", &chromium)
        .status()
        .expect("python3 runs");
    eprintln!("the browser test took {:?}", started.elapsed());
    assert!(status.success(), "tests/python/test_dashboard.py failed");
}

#[test]
fn dashboard_swarm_view_in_a_browser() {
    let chromium = browser();
    let a = node("agent-a", &["--role", "reasoner"]);
    let b = node("agent-b", &["--role", "concise"]);
    let (pa, pb) = (a.peer(), b.peer());
    let head = node("swarm-head", &["--peer", &pa, "--peer", &pb]);
    for server in [&a, &b, &head] {
        server.wait_healthy();
    }
    let status = Command::new("python3")
        .arg("tests/python/test_dashboard_swarm.py")
        .current_dir(workspace_root())
        .env("SHOAL_ROOT_URL", format!("http://{}", head.addr))
        .env("SHOAL_API_KEY", API_KEY)
        .env("SHOAL_AGENTS", "agent-a,agent-b")
        .env("SHOAL_SCREENSHOTS", workspace_root().join("docs/img"))
        .env("SHOAL_CHROMIUM", &chromium)
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_dashboard_swarm.py failed"
    );
}
