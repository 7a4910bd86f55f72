#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! Speculative decoding by prompt lookup on the real models: the answer is the plain
//! decode's token for token (greedy and seeded sampling, SmolLM2's Q4_1 and Qwen2.5-Coder's
//! k-quants), while drafted tokens were really verified and kept; and a verification pass's
//! rows are each exactly a decode step's logits.

mod common;

use common::*;
use shoal_engine::candle_core::Device;
use shoal_engine::stage::logits_row;
use shoal_engine::{
    ChatMessage, GenerateParams, GgufFile, Logits, Lookup, Model, SamplingParams, Stage,
    StageInput, StageOutput, StageSpec,
};

/// A request that makes the model repeat its context: the case lookup drafting is for.
fn edit_prompt(model: &Model) -> Vec<u32> {
    let code = "def area(width, height):\n    return width * height\n\n\
                def perimeter(width, height):\n    return 2 * (width + height)\n\n\
                def describe(width, height):\n    return f\"{width}x{height}\"\n";
    let text = model
        .render_chat(&[ChatMessage {
            role: "user".into(),
            content: format!(
                "Rename `perimeter` to `outline` in this file and answer with the whole \
                 file:\n\n```python\n{code}```"
            ),
        }])
        .unwrap();
    model.encode_prompt(&text).unwrap()
}

fn generate(model: &Model, prompt: &[u32], sampling: SamplingParams) -> (Vec<u32>, usize, usize) {
    let params = GenerateParams {
        sampling,
        max_tokens: 80,
        ..GenerateParams::default()
    };
    let mut g = model.generate(prompt.to_vec(), params).unwrap();
    while g.next_step().unwrap().is_some() {}
    let t = g.timings();
    (g.generated().to_vec(), t.drafted_tokens, t.accepted_tokens)
}

fn same_output_with_lookup(file: &str) {
    let model = Model::load(model_path(file), |_, _| {}).unwrap();
    let prompt = edit_prompt(&model);
    let seeded = SamplingParams {
        temperature: 0.7,
        seed: 11,
        ..SamplingParams::default()
    };
    for sampling in [SamplingParams::greedy(), seeded] {
        model.set_lookup(None);
        let (plain, drafted, _) = generate(&model, &prompt, sampling.clone());
        assert_eq!(drafted, 0);
        model.set_lookup(Some(Lookup::default()));
        let (fast, drafted, accepted) = generate(&model, &prompt, sampling.clone());
        assert_eq!(
            fast, plain,
            "{file}: lookup changed the answer ({sampling:?})"
        );
        assert!(
            accepted > 0 && drafted >= accepted,
            "{file}: {accepted} of {drafted} drafted tokens kept: nothing was verified"
        );
        eprintln!("{file} {sampling:?}: {accepted} of {drafted} drafted tokens kept");
    }
}

#[test]
fn smollm2_answers_the_same_with_lookup() {
    same_output_with_lookup(SMOLLM2);
}

#[test]
fn qwen05_answers_the_same_with_lookup() {
    same_output_with_lookup(QWEN05);
}

/// `Logits::Verify` over several rows equals decoding them one at a time, bit for bit, and
/// `Logits::All` (a prompt chunk's orders) does not, on the k-quant model.
#[test]
fn verify_rows_are_decode_steps_bit_for_bit() {
    let gguf = GgufFile::open(model_path(QWEN05)).unwrap();
    let stage = Stage::load(
        &gguf,
        StageSpec::whole(gguf.config().n_layers),
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
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
