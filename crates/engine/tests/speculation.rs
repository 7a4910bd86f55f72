#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! Speculative decoding on the real models: by prompt lookup, with a draft model
//! (Qwen2.5-Coder-0.5B for 1.5B, as a user would run it; SmolLM2 for itself under sampling,
//! where most guesses are wrong), and both. The answer is the plain decode's token for token
//! (greedy and seeded sampling, SmolLM2's Q4_1 and Qwen2.5-Coder's k-quants), while guessed
//! tokens were really verified and kept; a verification pass's rows are each exactly a
//! decode step's logits; a draft model of another vocabulary is refused.
//!
//! Seeded sampling giving the same answer is the distribution test too: a draw depends only
//! on the seed and the position, so the same answer for every seed is the target's own
//! distribution.

mod common;

use common::*;
use shoal_engine::stage::logits_row;
use shoal_engine::{
    GenerateParams, Logits, Lookup, Model, SamplingParams, Speculation, StageInput, StageOutput,
};

/// A request that makes the model repeat its context: the case lookup drafting is for.
fn edit_prompt(model: &Model) -> Vec<u32> {
    let code = "def area(width, height):\n    return width * height\n\n\
                def perimeter(width, height):\n    return 2 * (width + height)\n\n\
                def describe(width, height):\n    return f\"{width}x{height}\"\n";
    chat_prompt(
        model,
        &format!(
            "Rename `perimeter` to `outline` in this file and answer with the whole \
             file:\n\n```python\n{code}```"
        ),
    )
}

struct Answer {
    tokens: Vec<u32>,
    drafted: usize,
    accepted: usize,
    cached: usize,
}

fn generate(model: &Model, prompt: &[u32], sampling: SamplingParams, max: usize) -> Answer {
    let params = GenerateParams {
        sampling,
        max_tokens: max,
        ..GenerateParams::default()
    };
    let mut g = model.generate(prompt.to_vec(), params).unwrap();
    while g.next_step().unwrap().is_some() {}
    let t = g.timings();
    Answer {
        tokens: g.generated().to_vec(),
        drafted: t.drafted_tokens,
        accepted: t.accepted_tokens,
        cached: t.cached_tokens,
    }
}

fn seeded(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed,
        ..SamplingParams::default()
    }
}

/// Greedy and seeded answers with `speculation` equal plain decoding's, and guesses were
/// verified: returns (kept, drafted) over both.
fn same_output(
    model: &Model,
    prompt: &[u32],
    speculation: Speculation,
    max: usize,
) -> (usize, usize) {
    let (mut kept, mut drafted) = (0, 0);
    for sampling in [SamplingParams::greedy(), seeded(0.7, 11)] {
        model.set_speculation(None);
        let plain = generate(model, prompt, sampling.clone(), max);
        assert_eq!(plain.drafted, 0);
        model.set_speculation(Some(speculation));
        let fast = generate(model, prompt, sampling.clone(), max);
        assert_eq!(
            fast.tokens,
            plain.tokens,
            "{}: {speculation:?} changed the answer ({sampling:?})",
            model.name()
        );
        assert!(
            fast.accepted > 0 && fast.drafted >= fast.accepted,
            "{}: {} of {} drafted tokens kept: nothing was verified",
            model.name(),
            fast.accepted,
            fast.drafted
        );
        eprintln!(
            "{} {sampling:?}: {} of {} drafted tokens kept",
            model.name(),
            fast.accepted,
            fast.drafted
        );
        (kept, drafted) = (kept + fast.accepted, drafted + fast.drafted);
    }
    model.set_speculation(None);
    (kept, drafted)
}

fn lookup() -> Speculation {
    Speculation {
        lookup: Some(Lookup::default()),
        ..Speculation::default()
    }
}

fn same_output_with_lookup(file: &str) {
    let model = Model::load(model_path(file), |_, _| {}).unwrap();
    let prompt = edit_prompt(&model);
    same_output(&model, &prompt, lookup(), 80);
}

#[test]
fn smollm2_answers_the_same_with_lookup() {
    same_output_with_lookup(SMOLLM2);
}

#[test]
fn qwen05_answers_the_same_with_lookup() {
    same_output_with_lookup(QWEN05);
}

/// The pair a user runs: Qwen2.5-Coder-0.5B drafts for 1.5B, alone and after lookup; and
/// a conversation's next turn resumes both models' kept prompts and still answers the same.
#[test]
fn qwen05_drafts_for_qwen15_and_the_answer_is_the_same() {
    let mut model = Model::load(model_path(QWEN15), |_, _| {}).unwrap();
    model
        .attach_draft(Model::load(model_path(QWEN05), |_, _| {}).unwrap())
        .unwrap();
    let draft = Speculation {
        draft_model: true,
        ..Speculation::default()
    };
    let prompt = chat_prompt(
        &model,
        "Write a Python function that checks whether a string is a palindrome.",
    );
    same_output(&model, &prompt, draft, 48);
    let edit = edit_prompt(&model);
    same_output(
        &model,
        &edit,
        Speculation {
            lookup: Some(Lookup::default()),
            ..draft
        },
        48,
    );

    // The prompt caches: kept by both models, resumed by both on the next turn.
    model.set_prompt_cache_bytes(1 << 28);
    model.draft_model().unwrap().set_prompt_cache_bytes(1 << 28);
    let first = generate(&model, &prompt, SamplingParams::greedy(), 8);
    let mut next = prompt.clone();
    next.extend(&first.tokens);
    let turn = "<|im_end|>\n<|im_start|>user\nNow make it ignore case.<|im_end|>\n\
                <|im_start|>assistant\n";
    next.extend(model.encode_prompt(turn).unwrap());
    model.set_speculation(Some(draft));
    let _ = generate(&model, &prompt, SamplingParams::greedy(), 8);
    let (_, draft_bytes) = model.draft_model().unwrap().prompt_cache_usage();
    assert!(draft_bytes > 0, "the draft model kept no prompt");
    let cached = generate(&model, &next, SamplingParams::greedy(), 32);
    assert!(cached.cached > 0, "the next turn resumed nothing");
    model.set_prompt_cache_bytes(0);
    model.draft_model().unwrap().set_prompt_cache_bytes(0);
    model.set_speculation(None);
    let plain = generate(&model, &next, SamplingParams::greedy(), 32);
    assert_eq!(
        cached.tokens, plain.tokens,
        "the next turn's answer changed"
    );
}

/// SmolLM2 drafting greedily for itself while the answer is sampled hot: most guesses are
/// wrong, so the rollback of both caches is what is tested.
#[test]
fn a_draft_model_mostly_wrong_changes_nothing() {
    let mut model = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    model
        .attach_draft(Model::load(model_path(SMOLLM2), |_, _| {}).unwrap())
        .unwrap();
    let prompt = chat_prompt(&model, "Tell me a short story about a lighthouse keeper.");
    let speculation = Speculation {
        draft_model: true,
        p_min: 0.0,
        ..Speculation::default()
    };
    for seed in [1, 2, 3] {
        let sampling = seeded(1.5, seed);
        model.set_speculation(None);
        let plain = generate(&model, &prompt, sampling.clone(), 60);
        model.set_speculation(Some(speculation));
        let fast = generate(&model, &prompt, sampling.clone(), 60);
        assert_eq!(fast.tokens, plain.tokens, "seed {seed}");
        assert!(
            fast.drafted > 2 * fast.accepted,
            "seed {seed}: {} of {} kept: the guesses were not mostly wrong",
            fast.accepted,
            fast.drafted
        );
    }
}

#[test]
fn a_draft_model_of_another_vocabulary_is_refused() {
    let mut model = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    let other = Model::load(model_path(QWEN05), |_, _| {}).unwrap();
    let e = model.attach_draft(other).unwrap_err().to_string();
    assert!(e.contains("cannot draft"), "{e}");
    assert!(model.draft_model().is_none());
}

/// `Logits::Verify` over several rows equals decoding them one at a time, bit for bit, and
/// `Logits::All` (a prompt chunk's orders) does not, on the k-quant model.
#[test]
fn verify_rows_are_decode_steps_bit_for_bit() {
    let (_, stage) = whole_stage(QWEN05);
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 977) % 3000 + 30).collect();
    let (prefix, tail) = ids.split_at(30);
    let logits = |out: StageOutput| match out {
        StageOutput::Logits(l) => l,
        StageOutput::Hidden(_) => panic!("expected logits"),
    };
    let prefill = |cache: &mut shoal_engine::KvCache| {
        let pos: Vec<usize> = (0..prefix.len()).collect();
        stage
            .forward(StageInput::Tokens(prefix), &pos, cache, Logits::Last)
            .unwrap();
    };
    let mut stepped = stage.new_cache();
    prefill(&mut stepped);
    let mut want = Vec::new();
    for (i, t) in tail.iter().enumerate() {
        let out = stage
            .forward(
                StageInput::Tokens(&[*t]),
                &[prefix.len() + i],
                &mut stepped,
                Logits::Last,
            )
            .unwrap();
        want.push(logits_row(&logits(out), 0).unwrap());
    }
    let pos: Vec<usize> = (prefix.len()..ids.len()).collect();
    for (mode, equal) in [(Logits::Verify, true), (Logits::All, false)] {
        let mut cache = stage.new_cache();
        prefill(&mut cache);
        let out = logits(
            stage
                .forward(StageInput::Tokens(tail), &pos, &mut cache, mode)
                .unwrap(),
        );
        let same = (0..tail.len()).all(|i| {
            let got = logits_row(&out, i).unwrap();
            got.iter()
                .zip(&want[i])
                .all(|(a, b)| a.to_bits() == b.to_bits())
        });
        assert_eq!(same, equal, "{mode:?}");
    }
}

/// A JSON value that opens after a trigger (tool calls under `auto`) in an answer that
/// lookup guesses through: the guesses after the trigger are dropped and the value is
/// drawn under the grammar, so the answer is plain decoding's, token for token.
#[test]
fn a_value_opening_inside_verified_guesses_is_drawn_under_its_grammar() {
    let model = Model::load(model_path(QWEN05), |_, _| {}).unwrap();
    let prompt = edit_prompt(&model);
    let rule = shoal_engine::JsonRule::after_trigger(
        shoal_engine::JsonGrammar::any_object(),
        "def describe",
    )
    .unwrap();
    let run = |speculation: Option<Speculation>| {
        model.set_speculation(speculation);
        let params = GenerateParams {
            sampling: SamplingParams::greedy(),
            max_tokens: 90,
            ..GenerateParams::default()
        };
        let mut g = model.generate(prompt.clone(), params).unwrap();
        g.constrain_json_rule(&rule).unwrap();
        while g.next_step().unwrap().is_some() {}
        (g.text().to_owned(), g.timings().drafted_tokens)
    };
    let (plain, _) = run(None);
    let (fast, drafted) = run(Some(lookup()));
    model.set_speculation(None);
    assert_eq!(fast, plain);
    assert!(drafted > 0, "lookup guessed nothing");
    let after = plain.split_once("def describe").expect("the trigger").1;
    assert!(after.trim_start().starts_with('{'), "{plain}");
}
