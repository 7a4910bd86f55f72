#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Log-probabilities of generated tokens (OpenAI's `logprobs` / `top_logprobs`): the model's
//! own distribution at each position, checked against logits computed afresh, and the same
//! whether the tokens came one at a time or from a verified guess (speculation).

mod common;

use common::{chat_prompt, model_path, SMOLLM2};
use shoal_engine::stage::logits_row;
use shoal_engine::{
    token_logprob, GenerateParams, Logits, Lookup, Model, SamplingParams, Speculation, StageInput,
    StageOutput, TokenLogprob,
};

fn answer(model: &Model, prompt: &[u32], top: usize) -> Vec<(u32, TokenLogprob)> {
    let mut g = model
        .generate(
            prompt.to_vec(),
            GenerateParams {
                sampling: SamplingParams::greedy(),
                max_tokens: 40,
                stop: Vec::new(),
                cache_prompt: false,
            },
        )
        .unwrap();
    g.want_logprobs(top);
    let mut out = Vec::new();
    while let Some(step) = g.next_step().unwrap() {
        out.push((step.token, step.logprob.expect("asked for logprobs")));
    }
    out
}

#[test]
fn logprobs_are_the_models_distribution_at_each_token() {
    let model = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    let prompt = chat_prompt(
        &model,
        "Rename `perimeter` to `outline` in: def perimeter(w, h): return 2 * (w + h)",
    );
    let steps = answer(&model, &prompt, 5);
    assert!(!steps.is_empty());

    // Against the model run by hand: the prompt in one pass, then one token at a time
    // (exactly the generation's path, so exactly its numbers).
    let stage = model.stage();
    let mut cache = stage.new_cache();
    let positions: Vec<usize> = (0..prompt.len()).collect();
    let mut out = stage
        .forward(
            StageInput::Tokens(&prompt),
            &positions,
            &mut cache,
            Logits::Last,
        )
        .unwrap();
    for (i, (token, lp)) in steps.iter().enumerate() {
        let StageOutput::Logits(l) = &out else {
            panic!("logits")
        };
        let expected = token_logprob(&logits_row(l, 0).unwrap(), *token, 5).unwrap();
        assert_eq!(*lp, expected, "step {i}");
        assert_eq!(lp.token, *token);
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0].0, *token, "step {i}: greedy draws the likeliest");
        assert_eq!(lp.top[0].1, lp.logprob);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.logprob <= 0.0);
        let at = [prompt.len() + i];
        out = stage
            .forward(StageInput::Tokens(&[*token]), &at, &mut cache, Logits::Last)
            .unwrap();
    }

    // Verified guesses report the same numbers as tokens decoded one by one.
    model.set_speculation(Some(Speculation {
        lookup: Some(Lookup::default()),
        ..Speculation::default()
    }));
    let guessed = answer(&model, &prompt, 5);
    model.set_speculation(None);
    assert_eq!(guessed, steps);
}
