#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! Embeddings against llama.cpp's on the same GGUF files (`tests/golden/embeddings.json`,
//! made by `bench/llama-ref --embed`: mean pooling over the final norm's output, unit
//! length): the same token ids, and vectors that point the same way.

mod common;

use common::*;
use shoal_engine::Model;

fn golden_cases(file: &str) -> Vec<serde_json::Value> {
    let path = golden_dir().join("embeddings.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all["models"][file].as_array().unwrap().clone()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn matches_llama_cpp(file: &str) {
    let model = Model::load(model_path(file), |_, _| {}).unwrap();
    let cases = golden_cases(file);
    assert_eq!(cases.len(), 3);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = model.encode_prompt(text).unwrap();
        assert_eq!(ids, common::ids(&case["ids"]), "ids of {text:?}");
        let want = floats(&case["embedding"]);
        let got = model.embed(&ids, || false).unwrap();
        assert_eq!(got.len(), want.len());
        assert_eq!(got.len(), model.config().hidden);
        let length: f32 = got.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((length - 1.0).abs() < 1e-4, "length {length}");
        let cosine: f32 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{file}: {} tokens, cosine {cosine:.6}, largest difference {worst:.5}",
            ids.len()
        );
        // Two implementations sum in other orders and round activations to 8 bits at
        // other points; the direction must agree closely all the same.
        assert!(cosine > 0.999, "{text:?}: cosine {cosine}");
        assert!(worst < 0.02, "{text:?}: largest difference {worst}");
    }
}

#[test]
fn smollm2_embeddings_match_llama_cpp() {
    matches_llama_cpp(SMOLLM2);
}

#[test]
fn qwen_embeddings_match_llama_cpp() {
    matches_llama_cpp(QWEN05);
}

/// The engine's prompt chunk (`generate::PREFILL_CHUNK`).
const CHUNK: usize = 512;

/// Longer than a prompt chunk: the chunks' hidden states all count, and an empty input
/// and one past the context are refused.
#[test]
fn chunks_all_count_and_bad_inputs_are_refused() {
    let model = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    let ids = model
        .encode_prompt(&"a few words over and over ".repeat(200))
        .unwrap();
    assert!(ids.len() > CHUNK);
    let whole = model.embed(&ids, || false).unwrap();
    let first_chunk = model.embed(&ids[..CHUNK], || false).unwrap();
    assert_ne!(whole, first_chunk);
    assert!(model.embed(&[], || false).is_err());
    let too_long = vec![ids[0]; model.config().context_length + 1];
    assert!(model.embed(&too_long, || false).is_err());
    // Asked to stop, it stops between chunks.
    assert!(model.embed(&ids, || true).is_err());
}

/// The pooling a file names (`{arch}.pooling_type`, llama.cpp's numbers): the first or
/// the last token's normed state, scaled to unit length; the mean otherwise.
#[test]
fn first_and_last_token_pooling_take_that_row() {
    use shoal_engine::{Logits, Pooling, StageInput, StageOutput};
    assert_eq!(Pooling::from_type(None), Pooling::Mean);
    assert_eq!(Pooling::from_type(Some(0)), Pooling::Mean);
    assert_eq!(Pooling::from_type(Some(1)), Pooling::Mean);
    assert_eq!(Pooling::from_type(Some(2)), Pooling::First);
    assert_eq!(Pooling::from_type(Some(3)), Pooling::Last);

    let model = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    // SmolLM2's file names no pooling: the mean.
    assert_eq!(model.config().pooling, Pooling::Mean);
    let ids = model
        .encode_prompt("The quick brown fox jumps over the lazy dog.")
        .unwrap();
    let positions: Vec<usize> = (0..ids.len()).collect();
    let mut cache = model.stage().new_cache();
    let StageOutput::Hidden(h) = model
        .stage()
        .forward(
            StageInput::Tokens(&ids),
            &positions,
            &mut cache,
            Logits::Normed,
        )
        .unwrap()
    else {
        panic!("normed hidden states expected");
    };
    let rows = h.to_vec2::<f32>().unwrap();
    let unit = |row: &[f32]| {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        row.iter()
            .map(|&v| (f64::from(v) / norm) as f32)
            .collect::<Vec<_>>()
    };
    let first = model.embed_pooled(&ids, Pooling::First, || false).unwrap();
    let last = model.embed_pooled(&ids, Pooling::Last, || false).unwrap();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
    assert!(close(&first, &unit(&rows[0])));
    assert!(close(&last, &unit(&rows[rows.len() - 1])));
    assert!(!close(&first, &last));
    assert_ne!(last, model.embed(&ids, || false).unwrap());

    // `--pooling last` in place of the file's.
    let mut model = model;
    model.set_pooling(Pooling::Last);
    assert_eq!(model.pooling(), Pooling::Last);
    assert_eq!(model.embed(&ids, || false).unwrap(), last);
}
