#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! The prompt cache on the real models: a prompt resumed from a kept prefix computes the
//! same numbers, bit for bit, as the whole prompt from scratch (SmolLM2's Q4_1 and
//! Qwen2.5-Coder's k-quants, whose orders depend on the chunk's shape), and a conversation's
//! greedy answers are the same with and without the cache while most of each turn's prompt
//! is reused.

mod common;

use common::*;
use shoal_engine::generate::PREFILL_CHUNK;
use shoal_engine::prefix_cache::{canonical_len, resume_point};
use shoal_engine::stage::logits_row;
use shoal_engine::{
    ChatMessage, GenerateParams, KvCache, Logits, Model, Stage, StageInput, StageOutput,
};

/// Prefills `tokens[cache.len()..]` in chunks that end at multiples of [`PREFILL_CHUNK`], as
/// a generation does; the last row's logits.
fn prefill(stage: &Stage, tokens: &[u32], cache: &mut KvCache) -> Vec<f32> {
    let mut start = cache.len();
    let mut last = None;
    while start < tokens.len() {
        let stop = ((start / PREFILL_CHUNK + 1) * PREFILL_CHUNK).min(tokens.len());
        let positions: Vec<usize> = (start..stop).collect();
        last = Some(
            stage
                .forward(
                    StageInput::Tokens(&tokens[start..stop]),
                    &positions,
                    cache,
                    Logits::Last,
                )
                .unwrap(),
        );
        start = stop;
    }
    match last.unwrap() {
        StageOutput::Logits(l) => logits_row(&l, 0).unwrap(),
        StageOutput::Hidden(_) => panic!("expected logits"),
    }
}

/// Token ids that look like text to no one but exercise every row.
fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7919 + salt * 131) % 4000 + 20)
        .collect()
}

fn resumed_logits_are_fresh_logits(file: &str) {
    let (gguf, stage) = whole_stage(file);
    let by_rows = Stage::rows_reusable_across_chunks(&gguf);
    assert!(by_rows, "{file}: every matrix should be ours");
    // (first prompt, shared with the second, second prompt): last chunks of every kind of
    // length, resumes inside a chunk, at a boundary, and just short of one.
    let cases = [
        (150, 150, 230),
        (150, 101, 180),
        (203, 203, 266),
        (530, 530, 600),
        (520, 517, 700),
        (700, 610, 1030),
    ];
    for (first_len, shared, second_len) in cases {
        let first = tokens(first_len, 1);
        let mut second = first[..shared].to_vec();
        second.extend(tokens(second_len - shared, 2));

        let mut kept = stage.new_cache();
        prefill(&stage, &first, &mut kept);
        let canonical = canonical_len(first_len, 0, PREFILL_CHUNK, by_rows);
        let at = resume_point(shared.min(canonical), second_len, PREFILL_CHUNK, by_rows);
        assert!(
            at > 0,
            "{file}: nothing reused for {first_len}/{shared}/{second_len}"
        );
        let mut resumed = kept.prefix(at);
        let got = prefill(&stage, &second, &mut resumed);

        let mut fresh = stage.new_cache();
        let want = prefill(&stage, &second, &mut fresh);
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{file}: resumed at {at} of {second_len} (first {first_len}, shared {shared}): \
             logits differ from a fresh prefill"
        );
    }
}

#[test]
fn smollm2_resumed_prompts_compute_fresh_logits_bit_for_bit() {
    resumed_logits_are_fresh_logits(SMOLLM2);
}

#[test]
fn qwen05_resumed_prompts_compute_fresh_logits_bit_for_bit() {
    resumed_logits_are_fresh_logits(QWEN05);
}

/// A four-turn conversation, greedy: every turn's answer from a model that keeps prompts
/// equals a model's that does not, and every turn after the first reuses most of its prompt.
#[test]
fn a_conversation_answers_the_same_with_and_without_the_prompt_cache() {
    let cached = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    cached.set_prompt_cache_bytes(256 << 20);
    let plain = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    let params = GenerateParams {
        max_tokens: 40,
        ..GenerateParams::default()
    };
    let system = "You are a careful assistant. Answer in one or two sentences. ".repeat(12);
    let questions = [
        "What is the capital of France?",
        "And how many people live there?",
        "Name one famous museum in that city.",
        "Which river flows through it?",
    ];
    let mut messages = vec![ChatMessage {
        role: "system".into(),
        content: system,
    }];
    for (turn, q) in questions.iter().enumerate() {
        messages.push(ChatMessage {
            role: "user".into(),
            content: (*q).into(),
        });
        let prompt = cached
            .encode_prompt(&cached.render_chat(&messages).unwrap())
            .unwrap();
        let mut with = cached.generate(prompt.clone(), params.clone()).unwrap();
        while with.next_step().unwrap().is_some() {}
        let mut without = plain.generate(prompt.clone(), params.clone()).unwrap();
        while without.next_step().unwrap().is_some() {}
        assert_eq!(
            with.generated(),
            without.generated(),
            "turn {turn}: the answers differ"
        );
        assert_eq!(without.cached_tokens(), 0);
        if turn > 0 {
            // Everything up to the previous answer (and at most a few rows of the last
            // chunk) came from the cache.
            assert!(
                with.cached_tokens() + 16 + 60 >= prompt.len(),
                "turn {turn}: only {} of {} prompt tokens reused",
                with.cached_tokens(),
                prompt.len()
            );
        }
        messages.push(ChatMessage {
            role: "assistant".into(),
            content: with.text().to_owned(),
        });
    }
    let (kept, bytes) = cached.prompt_cache_usage();
    // Each turn superseded the one before it.
    assert_eq!(kept, 1, "{bytes} bytes in {kept} caches");
    assert_eq!(plain.prompt_cache_usage(), (0, 0));
}

/// A request that opts out (`cache_prompt: false`) neither reuses nor keeps.
#[test]
fn opting_out_neither_reuses_nor_keeps() {
    let model = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    model.set_prompt_cache_bytes(64 << 20);
    let prompt = model
        .encode_prompt(&"A shared system prompt. ".repeat(20))
        .unwrap();
    let run = |cache_prompt: bool| {
        let params = GenerateParams {
            max_tokens: 4,
            cache_prompt,
            ..GenerateParams::default()
        };
        let mut g = model.generate(prompt.clone(), params).unwrap();
        while g.next_step().unwrap().is_some() {}
        (g.cached_tokens(), g.generated().to_vec())
    };
    let (cached, off) = run(false);
    assert_eq!(cached, 0);
    assert_eq!(
        model.prompt_cache_usage().0,
        0,
        "an opted-out prompt was kept"
    );
    let (cached, first) = run(true);
    assert_eq!(cached, 0);
    assert_eq!(model.prompt_cache_usage().0, 1);
    let (cached, again) = run(true);
    assert!(cached > prompt.len() - 16, "{cached} of {}", prompt.len());
    let (cached, later_off) = run(false);
    assert_eq!(cached, 0);
    assert_eq!(first, off);
    assert_eq!(again, off);
    assert_eq!(later_off, off);
}
