//! Shared by the pipeline's integration tests: where the test model lives.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

pub const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";

pub fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")))
}

/// SmolLM2's file; a missing file fails the test with the way to fetch it.
pub fn model_path() -> PathBuf {
    let p = models_dir().join(SMOLLM2);
    assert!(
        p.is_file(),
        "model {} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}
