#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

//! `step_together`: generations of one model stepped together (their decode steps in one
//! batched pass) give each exactly the tokens, text and finish it gives alone — greedy and
//! sampled with a seed, with a stop string, a token limit, an answer constrained to
//! choices, and a generation that joins while the others are half way.

mod common;

use common::*;
use shoal_engine::{
    step_together, FinishReason, GenerateParams, Generation, Model, SamplingParams,
};

/// One request: its prompt, parameters, choices, and the step at which it joins.
struct Request {
    prompt: Vec<u32>,
    params: GenerateParams,
    choices: Vec<String>,
    joins_at: usize,
}

#[derive(Debug, PartialEq)]
struct Answer {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

fn start<'m>(model: &'m Model, r: &Request) -> Generation<'m> {
    let mut g = model.generate(r.prompt.clone(), r.params.clone()).unwrap();
    if !r.choices.is_empty() {
        g.constrain_to(&r.choices).unwrap();
    }
    g
}

fn alone(model: &Model, r: &Request) -> Answer {
    let mut g = start(model, r);
    let mut text = String::new();
    while let Some(step) = g.next_step().unwrap() {
        text.push_str(&step.text);
    }
    Answer {
        tokens: g.generated().to_vec(),
        text,
        finish: g.finish_reason(),
    }
}

/// Every request stepped together from the step it joins at, and the most generations
/// that shared a pass.
fn together(model: &Model, requests: &[Request]) -> (Vec<Answer>, usize) {
    let mut running: Vec<(usize, Generation<'_>, String)> = Vec::new();
    let mut answers: Vec<Option<Answer>> = requests.iter().map(|_| None).collect();
    let mut step = 0;
    let mut most_in_pass = 0;
    while answers.iter().any(Option::is_none) {
        for (i, r) in requests.iter().enumerate() {
            if r.joins_at == step {
                running.push((i, start(model, r), String::new()));
            }
        }
        let mut gens: Vec<&mut Generation<'_>> = running.iter_mut().map(|(_, g, _)| g).collect();
        let together = step_together(&mut gens);
        most_in_pass = most_in_pass.max(together.in_pass);
        let mut finished = Vec::new();
        for ((i, g, text), got) in running.iter_mut().zip(together.steps) {
            match got.unwrap() {
                Some(s) => text.push_str(&s.text),
                None => {
                    answers[*i] = Some(Answer {
                        tokens: g.generated().to_vec(),
                        text: std::mem::take(text),
                        finish: g.finish_reason(),
                    });
                    finished.push(*i);
                }
            }
        }
        running.retain(|(i, _, _)| !finished.contains(i));
        step += 1;
        assert!(step < 10_000, "the generations never ended");
    }
    (
        answers.into_iter().map(Option::unwrap).collect(),
        most_in_pass,
    )
}

fn requests(model: &Model) -> Vec<Request> {
    let params = |temperature: f32, seed: u64, max_tokens: usize| GenerateParams {
        sampling: SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        },
        max_tokens,
        stop: Vec::new(),
        // Each generation computes its whole prompt: the comparison is of the passes.
        cache_prompt: false,
    };
    let mut stopping = params(0.0, 0, 60);
    stopping.stop = vec![".".into()];
    vec![
        Request {
            prompt: chat_prompt(model, "Write a Python function that reverses a string."),
            params: params(0.0, 0, 40),
            choices: Vec::new(),
            joins_at: 0,
        },
        Request {
            prompt: chat_prompt(model, "Name three colours of the rainbow."),
            params: params(0.8, 7, 32),
            choices: Vec::new(),
            joins_at: 0,
        },
        Request {
            prompt: chat_prompt(model, "What is a hash map? Answer in one sentence."),
            params: stopping,
            choices: Vec::new(),
            joins_at: 3,
        },
        Request {
            prompt: chat_prompt(model, "Is the sky blue? Answer yes or no."),
            params: params(0.0, 0, 8),
            choices: vec!["yes".into(), "no".into()],
            joins_at: 5,
        },
        Request {
            prompt: chat_prompt(model, "Count from one to ten in words."),
            params: params(1.0, 42, 25),
            choices: Vec::new(),
            joins_at: 9,
        },
    ]
}

fn check(file: &str) {
    let model = Model::load(model_path(file), |_, _| {}).unwrap();
    let requests = requests(&model);
    let expected: Vec<Answer> = requests.iter().map(|r| alone(&model, r)).collect();
    assert!(
        expected
            .iter()
            .any(|a| a.finish == Some(FinishReason::Stop))
            && expected
                .iter()
                .any(|a| a.finish == Some(FinishReason::Length)),
        "{file}: the requests should end both ways: {expected:?}"
    );
    let (got, most_in_pass) = together(&model, &requests);
    assert!(
        most_in_pass >= 4,
        "{file}: at most {most_in_pass} generations shared a pass"
    );
    for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
        assert_eq!(e, g, "{file}: request {i} differs when stepped together");
    }
}

#[test]
fn generations_stepped_together_equal_each_alone_on_smollm2() {
    check("smollm2-135m-instruct-q4_1.gguf");
}

#[test]
fn generations_stepped_together_equal_each_alone_on_qwen() {
    check("qwen2.5-coder-0.5b-instruct.gguf");
}
