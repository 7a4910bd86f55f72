//! Answers constrained to JSON (`Generation::constrain_json`) on the real SmolLM2, a model
//! far too small to write JSON reliably on its own: with the grammar, every answer over
//! twenty seeds parses and has the schema's shape, and it ends by itself when the value
//! closes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::chat_prompt;

use serde_json::{json, Value};
use shoal_engine::{FinishReason, GenerateParams, JsonGrammar, Model, SamplingParams};

fn answer(
    model: &Model,
    question: &str,
    grammar: &JsonGrammar,
    seed: u64,
) -> (String, FinishReason) {
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed,
            ..SamplingParams::default()
        },
        max_tokens: 200,
        stop: Vec::new(),
        cache_prompt: true,
    };
    let mut g = model
        .generate(chat_prompt(model, question), params)
        .unwrap();
    g.constrain_json(grammar).unwrap();
    while g.next_step().unwrap().is_some() {}
    (g.text().to_owned(), g.finish_reason().unwrap())
}

#[test]
fn schema_answers_always_parse_and_fit() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "population": {"type": "integer"},
            "coastal": {"type": "boolean"},
            "districts": {
                "type": "array",
                "items": {"type": "string", "maxLength": 40},
                "maxItems": 3
            }
        },
        "required": ["city", "population", "coastal"],
        "additionalProperties": false
    });
    let grammar = JsonGrammar::from_schema(&schema).unwrap();
    for seed in 0..20 {
        let (text, finish) = answer(
            &model,
            "Describe the city of Lisbon as JSON.",
            &grammar,
            seed,
        );
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        let obj = value.as_object().unwrap();
        assert!(obj["city"].is_string(), "seed {seed}: {text}");
        let short = |s: &Value| s.as_str().is_some_and(|s| s.chars().count() <= 40);
        assert!(short(&obj["city"]), "{text}");
        assert!(
            obj.get("districts")
                .and_then(Value::as_array)
                .is_none_or(|d| d.iter().all(short)),
            "{text}"
        );
        assert!(
            obj["population"].is_i64() || obj["population"].is_u64(),
            "{text}"
        );
        assert!(obj["coastal"].is_boolean(), "{text}");
        assert!(
            obj.keys().all(|k| schema["properties"].get(k).is_some()),
            "{text}"
        );
    }
}

#[test]
fn json_mode_answers_are_objects_even_when_asked_for_prose() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let grammar = JsonGrammar::any_object();
    for seed in 0..5 {
        let (text, finish) = answer(&model, "Write a haiku about the sea.", &grammar, seed);
        if finish == FinishReason::Stop {
            let value: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
            assert!(value.is_object(), "{text}");
        } else {
            // Cut by max_tokens: still a valid beginning of an object.
            assert!(text.trim_start().starts_with('{'), "{text}");
        }
    }
}
