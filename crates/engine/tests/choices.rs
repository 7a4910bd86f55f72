//! Answers constrained to a set of choices (`Generation::constrain_to`) on the real SmolLM2:
//! the answer is always a whole choice, its first token is the model's own favourite among
//! the choices' first tokens (checked against the unconstrained logits), and sampling never
//! leaves the set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use shoal_engine::{
    ChatMessage, FinishReason, GenerateParams, KvCache, Logits, Model, SamplingParams, StageInput,
    StageOutput,
};

const LABELS: [&str; 6] = [
    "SIMPLE_FACT",
    "COMPLEX_REASONING",
    "CREATIVE",
    "CODE",
    "MATH",
    "OPINION",
];

fn labels() -> Vec<String> {
    LABELS.iter().map(|s| s.to_string()).collect()
}

fn prompt(model: &Model, question: &str) -> Vec<u32> {
    let text = model
        .render_chat(&[ChatMessage {
            role: "user".into(),
            content: format!(
                "Classify the following query. Answer with exactly one of these labels and \
                 nothing else: {}.\n\nQuery:\n{question}\n\nLabel:",
                LABELS.join(", ")
            ),
        }])
        .unwrap();
    model.encode_prompt(&text).unwrap()
}

fn answer(model: &Model, prompt: Vec<u32>, sampling: SamplingParams, choices: &[String]) -> String {
    let params = GenerateParams {
        sampling,
        max_tokens: 32,
        stop: Vec::new(),
        cache_prompt: true,
    };
    let mut g = model.generate(prompt, params).unwrap();
    g.constrain_to(choices).unwrap();
    while g.next_step().unwrap().is_some() {}
    assert_eq!(g.finish_reason(), Some(FinishReason::Stop));
    g.text().to_owned()
}

/// The logits after `prompt`, unconstrained.
fn next_logits(model: &Model, prompt: &[u32]) -> Vec<f32> {
    let stage = model.stage();
    let mut cache: KvCache = stage.new_cache();
    let positions: Vec<usize> = (0..prompt.len()).collect();
    let out = stage
        .forward(
            StageInput::Tokens(prompt),
            &positions,
            &mut cache,
            Logits::Last,
        )
        .unwrap();
    let StageOutput::Logits(l) = out else {
        panic!("a whole model gives logits")
    };
    shoal_engine::stage::logits_row(&l, 0).unwrap()
}

#[test]
fn greedy_answers_are_whole_labels_led_by_the_models_favourite_first_token() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let tok = model.tokenizer();
    let questions = [
        "What is the capital of Japan?",
        "Write a Python function that reverses a linked list.",
        "Compose a short poem about autumn leaves.",
        "What is 17 times 23?",
        "Is remote work better than working in an office?",
        "If all bloops are razzies and some razzies are lazzies, are some bloops lazzies?",
    ];
    let mut free_text_outside = 0;
    for q in questions {
        let ids = prompt(&model, q);
        let got = answer(&model, ids.clone(), SamplingParams::greedy(), &labels());
        assert!(LABELS.contains(&got.as_str()), "{q:?} → {got:?}");

        // The first token must be the best-scoring first token among the labels'.
        let logits = next_logits(&model, &ids);
        let firsts: Vec<u32> = LABELS
            .iter()
            .map(|l| tok.encode(l, false).unwrap()[0])
            .collect();
        let best = *firsts
            .iter()
            .max_by(|&&a, &&b| {
                logits[a as usize]
                    .total_cmp(&logits[b as usize])
                    .then(b.cmp(&a))
            })
            .unwrap();
        let got_first = tok.encode(&got, false).unwrap()[0];
        assert_eq!(got_first, best, "{q:?}");

        // Unconstrained, this small model often says something else: the constraint is
        // doing the work.
        let mut free = model
            .generate(
                ids,
                GenerateParams {
                    max_tokens: 8,
                    ..GenerateParams::default()
                },
            )
            .unwrap();
        while free.next_step().unwrap().is_some() {}
        eprintln!("{q:?}: constrained {got:?}, free {:?}", free.text());
        if !LABELS.contains(&free.text().trim()) {
            free_text_outside += 1;
        }
    }
    assert!(
        free_text_outside > 0,
        "every unconstrained answer was already a bare label; this test shows nothing"
    );
}

#[test]
fn sampled_answers_never_leave_the_choices_even_where_one_prefixes_another() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let ids = prompt(&model, "Tell me a story about a dragon who learns to code.");
    // "CODE" is a prefix of "CODE_REVIEW": after "CODE", ending and going on are both allowed.
    let mut choices = labels();
    choices.push("CODE_REVIEW".into());
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let sampling = SamplingParams {
            temperature: 1.5,
            seed,
            ..SamplingParams::default()
        };
        let got = answer(&model, ids.clone(), sampling, &choices);
        assert!(choices.contains(&got), "seed {seed} → {got:?}");
        seen.insert(got);
    }
    assert!(seen.len() >= 2, "hot sampling always gave {seen:?}");
}

#[test]
fn bad_choice_lists_are_refused() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let ids = prompt(&model, "Hi");
    let mut g = model.generate(ids, GenerateParams::default()).unwrap();
    assert!(g.constrain_to(&[]).is_err());
    assert!(g.constrain_to(&["A".into(), String::new()]).is_err());
    let many: Vec<String> = (0..100).map(|i| format!("L{i}")).collect();
    assert!(g.constrain_to(&many).is_err());
    g.constrain_to(&["yes".into(), "no".into()]).unwrap();
    g.next_step().unwrap();
    assert!(
        g.constrain_to(&["yes".into()]).is_err(),
        "too late once started"
    );
}
