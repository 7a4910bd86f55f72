//! `shoal bench --prompt-cache`: what the prompt cache saves on a conversation's next turn.
//!
//! Turn 1 is a long prompt (a system prompt, then a file pasted by the user) and an answer;
//! turn 2 is the same conversation with the answer and a short follow-up added — what a
//! coding agent sends every turn. Each repetition starts with an empty cache and measures the
//! time to the first token of turn 1, of turn 2 with the cache (resuming turn 1's prompt),
//! and of turn 2 without it (`cache_prompt: false`), and checks that turn 2's greedy answer
//! is the same both ways.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use shoal_engine::{ChatMessage, GenerateParams, Model};

use crate::median;

/// Keys and values the benchmark lets the model keep: far more than one conversation needs.
const BUDGET: usize = 4 << 30;

/// Tokens of turn 2's answer compared with and without the cache.
const COMPARED_TOKENS: usize = 32;

#[derive(Serialize)]
struct PromptCacheResult {
    model: String,
    threads: usize,
    first_prompt_tokens: usize,
    second_prompt_tokens: usize,
    cached_tokens: usize,
    first_ttft_s: f64,
    second_ttft_cached_s: f64,
    second_ttft_uncached_s: f64,
    /// Turn 2 with the cache, over turn 1 (the issue's bar: at most 0.15).
    cached_over_first: f64,
    /// Turn 2 with the cache, over turn 2 without.
    cached_over_uncached: f64,
    same_answer: bool,
}

/// Runs the benchmark on the model at `path`: a first prompt of about `prompt_tokens`, a
/// first answer of `answer_tokens`, `repeat` times (medians reported).
pub fn run(
    path: &Path,
    prompt_tokens: usize,
    answer_tokens: usize,
    repeat: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let model =
        Model::load(path, |_, _| {}).with_context(|| format!("loading {}", path.display()))?;
    let first = ChatTurns::new(&model, prompt_tokens)?;
    let (mut t1, mut t2, mut t2_fresh) = (Vec::new(), Vec::new(), Vec::new());
    let mut cached_tokens = 0;
    let mut same_answer = true;
    let mut second_len = 0;
    for _ in 0..repeat.max(1) {
        // Every repetition starts from nothing kept.
        model.set_prompt_cache_bytes(0);
        model.set_prompt_cache_bytes(BUDGET);
        let prompt = first.prompt(&model, &[])?;
        let (ttft, answer, _) = time_turn(&model, prompt, answer_tokens, true)?;
        t1.push(ttft);
        let second = first.prompt(&model, &[answer.as_str()])?;
        second_len = second.len();
        let (ttft, with, cached) = time_turn(&model, second.clone(), COMPARED_TOKENS, true)?;
        t2.push(ttft);
        cached_tokens = cached;
        let (ttft, without, _) = time_turn(&model, second, COMPARED_TOKENS, false)?;
        t2_fresh.push(ttft);
        same_answer &= with == without;
    }
    let first_ttft_s = median(&mut t1);
    let second_ttft_cached_s = median(&mut t2);
    let second_ttft_uncached_s = median(&mut t2_fresh);
    let result = PromptCacheResult {
        model: model.name().to_string(),
        threads: shoal_engine::candle_core::utils::get_num_threads(),
        first_prompt_tokens: first.first_len,
        second_prompt_tokens: second_len,
        cached_tokens,
        first_ttft_s,
        second_ttft_cached_s,
        second_ttft_uncached_s,
        cached_over_first: second_ttft_cached_s / first_ttft_s,
        cached_over_uncached: second_ttft_cached_s / second_ttft_uncached_s,
        same_answer,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "{} | threads {} | turn 1: {} tok, first token {:.2} s | turn 2: {} tok ({} cached), \
             first token {:.3} s cached, {:.2} s uncached | cached/turn 1 {:.3}, \
             cached/uncached {:.3} | same answer: {}",
            result.model,
            result.threads,
            result.first_prompt_tokens,
            result.first_ttft_s,
            result.second_prompt_tokens,
            result.cached_tokens,
            result.second_ttft_cached_s,
            result.second_ttft_uncached_s,
            result.cached_over_first,
            result.cached_over_uncached,
            result.same_answer
        );
    }
    Ok(if same_answer {
        ExitCode::SUCCESS
    } else {
        eprintln!("turn 2's answer differs with and without the prompt cache");
        ExitCode::FAILURE
    })
}

/// The conversation: a system prompt and a first user message holding a file of about the
/// asked size; later turns add an answer and a follow-up each.
struct ChatTurns {
    messages: Vec<ChatMessage>,
    first_len: usize,
}

impl ChatTurns {
    fn new(model: &Model, prompt_tokens: usize) -> anyhow::Result<Self> {
        let mut file = String::new();
        let mut i = 0;
        let mut turns = ChatTurns {
            messages: Vec::new(),
            first_len: 0,
        };
        // Grow the pasted file until the prompt has the tokens asked for.
        loop {
            turns.messages = vec![
                ChatMessage {
                    role: "system".into(),
                    content: "You are a careful coding assistant. Answer with code.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: format!(
                        "Here is my module:\n\n```python\n{file}```\n\nExplain what it does."
                    ),
                },
            ];
            turns.first_len = turns.prompt(model, &[])?.len();
            if turns.first_len >= prompt_tokens {
                return Ok(turns);
            }
            file.push_str(&format!(
                "def step_{i}(values, scale={i}):\n    \"\"\"Scale every value by {i} and drop the negative ones.\"\"\"\n    return [v * scale for v in values if v >= 0]\n\n"
            ));
            i += 1;
        }
    }

    /// Token ids of the conversation with `answers` given (each followed by a follow-up).
    fn prompt(&self, model: &Model, answers: &[&str]) -> anyhow::Result<Vec<u32>> {
        let mut messages = self.messages.clone();
        for answer in answers {
            messages.push(ChatMessage {
                role: "assistant".into(),
                content: (*answer).to_owned(),
            });
            messages.push(ChatMessage {
                role: "user".into(),
                content: "Now add type hints to step_0.".into(),
            });
        }
        Ok(model.encode_prompt(&model.render_chat(&messages)?)?)
    }
}

/// Runs one turn greedily: time to its first token, its text, and the prompt tokens reused.
fn time_turn(
    model: &Model,
    prompt: Vec<u32>,
    max_tokens: usize,
    cache_prompt: bool,
) -> anyhow::Result<(f64, String, usize)> {
    let params = GenerateParams {
        max_tokens,
        cache_prompt,
        ..GenerateParams::default()
    };
    let started = Instant::now();
    let mut generation = model.generate(prompt, params)?;
    let mut ttft = Duration::ZERO;
    while generation.next_step()?.is_some() {
        if ttft.is_zero() {
            ttft = started.elapsed();
        }
    }
    Ok((
        ttft.as_secs_f64(),
        generation.text().to_owned(),
        generation.cached_tokens(),
    ))
}
