//! `shoal bench --lookup`: speculative decoding by prompt lookup on an edit (a file pasted,
//! one function to change, the whole file answered back), against plain decoding of the
//! same request in the same run; the answers must be the same, token for token.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use shoal_engine::{ChatMessage, GenerateParams, Lookup, Model};

use crate::median;

#[derive(Serialize)]
struct LookupResult {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    answer_tokens: usize,
    plain_tokens_per_s: f64,
    lookup_tokens_per_s: f64,
    /// Lookup over plain decoding (the issue's bar on Qwen2.5-Coder-1.5B: at least 2).
    speedup: f64,
    drafted_tokens: usize,
    accepted_tokens: usize,
    same_answer: bool,
}

/// Runs the benchmark: a file of about `prompt_tokens`, answers of up to `answer_tokens`,
/// `repeat` times each way (medians reported), drafting with `lookup`.
pub fn run(
    path: &Path,
    prompt_tokens: usize,
    answer_tokens: usize,
    repeat: usize,
    lookup: Lookup,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let model =
        Model::load(path, |_, _| {}).with_context(|| format!("loading {}", path.display()))?;
    let prompt = edit_prompt(&model, prompt_tokens)?;
    let params = GenerateParams {
        max_tokens: answer_tokens,
        cache_prompt: false,
        ..GenerateParams::default()
    };
    let (mut plain, mut fast) = (Vec::new(), Vec::new());
    let mut same_answer = true;
    let (mut drafted, mut accepted, mut answer_len) = (0, 0, 0);
    for _ in 0..repeat.max(1) {
        let mut answers = Vec::new();
        for (setting, speeds) in [(None, &mut plain), (Some(lookup), &mut fast)] {
            model.set_lookup(setting);
            let mut g = model.generate(prompt.clone(), params.clone())?;
            // Decode speed: from the first token on (the prompt is the same both ways).
            g.next_step()?;
            let started = Instant::now();
            while g.next_step()?.is_some() {}
            let decoded = g.generated().len().saturating_sub(1);
            speeds.push(decoded as f64 / started.elapsed().as_secs_f64());
            let t = g.timings();
            (drafted, accepted, answer_len) =
                (t.drafted_tokens, t.accepted_tokens, g.generated().len());
            answers.push(g.generated().to_vec());
        }
        same_answer &= answers[0] == answers[1];
    }
    model.set_lookup(None);
    let (plain_tokens_per_s, lookup_tokens_per_s) = (median(&mut plain), median(&mut fast));
    let result = LookupResult {
        model: model.name().to_string(),
        threads: shoal_engine::candle_core::utils::get_num_threads(),
        prompt_tokens: prompt.len(),
        answer_tokens: answer_len,
        plain_tokens_per_s,
        lookup_tokens_per_s,
        speedup: lookup_tokens_per_s / plain_tokens_per_s,
        drafted_tokens: drafted,
        accepted_tokens: accepted,
        same_answer,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "{} | threads {} | edit: {} prompt tok, {} answer tok | plain {:.1} tok/s | \
             lookup {:.1} tok/s ({:.2}×), {} of {} drafted kept | same answer: {}",
            result.model,
            result.threads,
            result.prompt_tokens,
            result.answer_tokens,
            result.plain_tokens_per_s,
            result.lookup_tokens_per_s,
            result.speedup,
            result.accepted_tokens,
            result.drafted_tokens,
            result.same_answer
        );
    }
    Ok(if same_answer {
        ExitCode::SUCCESS
    } else {
        eprintln!("the answer differs with lookup");
        ExitCode::FAILURE
    })
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
