//! The registry and `scripts/fetch-models.sh` describe the same files, part for part, so
//! the two cannot drift. The script's own functions are run with `fetch` replaced by one
//! that prints its arguments (nothing is downloaded).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use shoal_models::{lookup, REGISTRY};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-models.sh");

/// For each model function of the script: (function, file, sha256, [package:path]).
fn script_entries() -> Vec<(String, String, String, Vec<String>)> {
    let text = std::fs::read_to_string(SCRIPT).unwrap();
    // Everything up to the command-line handling: settings and function definitions.
    let defs = &text[..text.find("\ntargets=(").expect("script layout changed")];
    let names: Vec<&str> = REGISTRY.iter().map(|m| m.name).collect();
    let mut program = defs.to_string();
    program.push_str("\nfetch() { printf '%s\\n' \"$@\"; echo ---; }\n");
    for n in &names {
        program.push_str(n);
        program.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(&program)
        .env("SHOAL_MODELS_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split("---\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let lines: Vec<String> = block.lines().map(str::to_string).collect();
            (
                lines[0].clone(),
                lines[1].clone(),
                lines[2].clone(),
                lines[3..].to_vec(),
            )
        })
        .collect()
}

#[test]
fn registry_agrees_with_fetch_models_script() {
    let entries = script_entries();
    assert_eq!(entries.len(), REGISTRY.len());
    for (name, file, sha, parts) in entries {
        let m = lookup(&name).unwrap_or_else(|| panic!("script model {name} not in registry"));
        assert_eq!(m.name, name);
        assert_eq!(m.file, file, "{name}");
        assert_eq!(m.sha256, sha, "{name}");
        let ours: Vec<String> = m
            .wheels
            .iter()
            .map(|p| format!("{}:{}", p.package, p.path))
            .collect();
        assert_eq!(ours, parts, "{name}");
    }
}

/// The plainest check of all, independent of how the script is structured: the SHA-256
/// strings of the two models the test suite uses appear in the script verbatim.
#[test]
fn test_models_sha256_appear_in_script() {
    let text = std::fs::read_to_string(SCRIPT).unwrap();
    for name in ["smollm2", "qwen05"] {
        let m = lookup(name).unwrap();
        assert!(
            text.contains(m.sha256),
            "{name}: {} not in script",
            m.sha256
        );
        assert!(text.contains(m.file), "{name}: {} not in script", m.file);
    }
}
