//! `shoal bench --lookup` / `--model-draft`: speculative decoding against plain decoding of
//! the same requests in the same run, on an edit (a file pasted, one function to change, the
//! whole file answered back) or on HumanEval prompts. The answers must be the same, token
//! for token, or the run fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::ValueEnum;
use serde::Serialize;
use shoal_engine::{ChatMessage, GenerateParams, Lookup, Model, Speculation};

use crate::median;

/// What the speculative decoding benchmark decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// A module of --prompt-tokens, one function renamed, the whole file answered back.
    Edit,
    /// The first --prompts HumanEval problems, as `shoal eval humaneval` asks them.
    Humaneval,
}

/// What to measure.
pub struct SpecBench<'a> {
    pub model: &'a Path,
    pub draft_model: Option<PathBuf>,
    pub lookup: bool,
    pub workload: Workload,
    /// Edit: the file's size; HumanEval: unused.
    pub prompt_tokens: usize,
    /// Most answer tokens per request.
    pub answer_tokens: usize,
    /// HumanEval: how many problems (the first ones).
    pub prompts: usize,
    pub repeat: usize,
    pub draft_max: usize,
    pub draft_min: usize,
    pub p_min: f32,
    pub json: bool,
}

/// One way of decoding, over all the workload's requests.
#[derive(Serialize)]
struct Way {
    /// `plain`, `lookup`, `draft` or `lookup+draft`.
    name: String,
    /// Decoded tokens over decode time (the first token of each answer, which the prompt
    /// costs, left out), the median over repeats.
    tokens_per_s: f64,
    /// Over plain decoding, measured in the same run.
    speedup: f64,
    drafted_tokens: usize,
    accepted_tokens: usize,
    /// Every answer the same as plain decoding's, token for token.
    same_answers: bool,
}

#[derive(Serialize)]
struct SpecResult {
    model: String,
    draft_model: Option<String>,
    workload: Workload,
    threads: usize,
    requests: usize,
    prompt_tokens: usize,
    answer_tokens: usize,
    ways: Vec<Way>,
}

/// Runs the benchmark; fails when an answer differs from plain decoding's.
pub fn run(b: SpecBench<'_>) -> anyhow::Result<ExitCode> {
    let load =
        |p: &Path| Model::load(p, |_, _| {}).with_context(|| format!("loading {}", p.display()));
    let mut model = load(b.model)?;
    if let Some(draft) = &b.draft_model {
        model.attach_draft(load(draft)?)?;
    }
    let prompts = match b.workload {
        Workload::Edit => vec![edit_prompt(&model, b.prompt_tokens)?],
        Workload::Humaneval => humaneval_prompts(&model, b.prompts)?,
    };
    let params = GenerateParams {
        max_tokens: b.answer_tokens,
        cache_prompt: false,
        ..GenerateParams::default()
    };
    let speculation = |lookup: bool, draft_model: bool| Speculation {
        lookup: lookup.then(Lookup::default),
        draft_model,
        draft_max: b.draft_max.max(1),
        draft_min: b.draft_min,
        p_min: b.p_min,
    };
    let mut settings = vec![("plain", None)];
    if b.lookup {
        settings.push(("lookup", Some(speculation(true, false))));
    }
    if b.draft_model.is_some() {
        settings.push(("draft", Some(speculation(false, true))));
    }
    if b.lookup && b.draft_model.is_some() {
        settings.push(("lookup+draft", Some(speculation(true, true))));
    }

    struct Tally {
        speeds: Vec<f64>,
        drafted: usize,
        accepted: usize,
        answers: Vec<Vec<u32>>,
        same: bool,
    }
    let mut tallies: Vec<Tally> = settings
        .iter()
        .map(|_| Tally {
            speeds: Vec::new(),
            drafted: 0,
            accepted: 0,
            answers: Vec::new(),
            same: true,
        })
        .collect();
    let mut answer_tokens = 0;
    for round in 0..b.repeat.max(1) {
        // The ways alternate within a round, so a noisy minute hurts them alike.
        for (i, (_, setting)) in settings.iter().enumerate() {
            model.set_speculation(*setting);
            let (mut decoded, mut seconds) = (0, 0.0);
            let (mut drafted, mut accepted) = (0, 0);
            let mut answers = Vec::with_capacity(prompts.len());
            for prompt in &prompts {
                let mut g = model.generate(prompt.clone(), params.clone())?;
                // Decode speed: from the first token on (the prompt costs the same each way).
                g.next_step()?;
                let started = Instant::now();
                while g.next_step()?.is_some() {}
                seconds += started.elapsed().as_secs_f64();
                decoded += g.generated().len().saturating_sub(1);
                let t = g.timings();
                (drafted, accepted) = (drafted + t.drafted_tokens, accepted + t.accepted_tokens);
                answers.push(g.generated().to_vec());
            }
            let tally = &mut tallies[i];
            tally.speeds.push(decoded as f64 / seconds.max(1e-9));
            (tally.drafted, tally.accepted) = (drafted, accepted);
            if round == 0 {
                answer_tokens = answers.iter().map(Vec::len).sum();
            }
            tally.answers = answers;
        }
        let plain = tallies[0].answers.clone();
        for t in &mut tallies[1..] {
            t.same &= t.answers == plain;
        }
    }
    model.set_speculation(None);
    let plain_speed = median(&mut tallies[0].speeds);
    let ways: Vec<Way> = settings
        .iter()
        .zip(&mut tallies)
        .map(|((name, _), t)| {
            let tokens_per_s = median(&mut t.speeds);
            Way {
                name: (*name).to_string(),
                tokens_per_s,
                speedup: tokens_per_s / plain_speed,
                drafted_tokens: t.drafted,
                accepted_tokens: t.accepted,
                same_answers: t.same,
            }
        })
        .collect();
    let all_same = ways.iter().all(|w| w.same_answers);
    let result = SpecResult {
        model: model.name().to_string(),
        draft_model: model.draft_model().map(|d| d.name().to_string()),
        workload: b.workload,
        threads: shoal_engine::candle_core::utils::get_num_threads(),
        requests: prompts.len(),
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        answer_tokens,
        ways,
    };
    if b.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "{}{} | threads {} | {:?}: {} request(s), {} prompt tok, {} answer tok",
            result.model,
            result
                .draft_model
                .as_ref()
                .map(|d| format!(" (draft: {d})"))
                .unwrap_or_default(),
            result.threads,
            result.workload,
            result.requests,
            result.prompt_tokens,
            result.answer_tokens,
        );
        for w in &result.ways {
            println!(
                "  {:<13} {:>7.1} tok/s  {:>5.2}×  {} of {} drafted kept  same answers: {}",
                w.name,
                w.tokens_per_s,
                w.speedup,
                w.accepted_tokens,
                w.drafted_tokens,
                w.same_answers
            );
        }
    }
    Ok(if all_same {
        ExitCode::SUCCESS
    } else {
        eprintln!("an answer differs from plain decoding's");
        ExitCode::FAILURE
    })
}

/// The first `count` HumanEval problems as `shoal eval humaneval` asks them.
fn humaneval_prompts(model: &Model, count: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let problems = crate::humaneval::load_problems(&crate::humaneval::default_data_path())?;
    problems
        .iter()
        .take(count.max(1))
        .map(|p| {
            let text = model.render_chat(&[
                ChatMessage {
                    role: "system".into(),
                    content: crate::humaneval::SYSTEM_PROMPT.into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: crate::humaneval::user_message(&p.prompt),
                },
            ])?;
            Ok(model.encode_prompt(&text)?)
        })
        .collect()
}

/// A module of about `tokens` tokens and the request to rename one of its functions,
/// answering with the whole file.
fn edit_prompt(model: &Model, tokens: usize) -> anyhow::Result<Vec<u32>> {
    let mut file = String::new();
    let mut i = 0;
    loop {
        let request = format!(
            "Here is my module:\n\n```python\n{file}```\n\nRename `step_1` to `scale_1` \
             (and its uses) and answer with the whole updated file, nothing else."
        );
        let text = model.render_chat(&[ChatMessage {
            role: "user".into(),
            content: request,
        }])?;
        let ids = model.encode_prompt(&text)?;
        if ids.len() >= tokens || i > 10_000 {
            return Ok(ids);
        }
        file.push_str(&format!(
            "def step_{i}(values, limit={i}):\n    \"\"\"Keep the values up to {i} and sum them.\"\"\"\n    kept = [v for v in values if v <= limit]\n    return sum(kept)\n\n"
        ));
        i += 1;
    }
}
