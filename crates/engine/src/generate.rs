//! A whole model on one device, and text generation with it.
//!
//! [`Model`] bundles the one stage `[0..L)` with the tokenizer and chat template from the
//! same GGUF file. [`Generation`] is a pull-based token loop: the caller drives it (a CLI
//! loop, an HTTP handler's blocking task), so the engine owns no threads.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::chat_template::ChatMessage;
use crate::choices::Choices;
use crate::config::{ModelConfig, Pooling};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::json_grammar::JsonGrammar;
use crate::json_rule::{JsonRule, JsonTracker};
use crate::kv_cache::KvCache;
use crate::logprobs::{token_logprob, TokenLogprob};
use crate::pooler::Pooler;
use crate::prefix_cache::{canonical_len, resume_point, PrefixCache};
use crate::prompt::PromptFormat;
use crate::sampler::{Sampler, SamplingParams};
use crate::speculation::{check_draft_vocabulary, Drafter, Speculation};
use crate::stage::{logits_row, BatchItem, Logits, Stage, StageInput, StageOutput, StageSpec};
use crate::text_stream::TextStream;
use crate::tokenizer::Tokenizer;

/// Prompts are fed through the model in chunks of this many tokens, which bounds the
/// attention matrix of a long prompt.
pub const PREFILL_CHUNK: usize = 512;

/// A whole model loaded on one device.
pub struct Model {
    name: String,
    parameters: u64,
    stage: Stage,
    format: PromptFormat,
    /// Caches of finished generations, reused by later prompts that start the same way.
    /// Empty budget (no reuse) until [`Model::set_prompt_cache_bytes`].
    prompt_cache: Mutex<PrefixCache>,
    /// [`Stage::rows_reusable_across_chunks`] of the file.
    reuse_by_rows: bool,
    /// Speculative decoding, for every generation (off until [`Model::set_speculation`]).
    speculation: Mutex<Option<Speculation>>,
    /// A smaller model of the same vocabulary that drafts for this one
    /// ([`Model::attach_draft`]).
    draft: Option<Arc<Model>>,
    /// How [`Model::embed`] pools: the file's, unless [`Model::set_pooling`] says otherwise.
    pooling: Pooling,
}

/// A model shows as its name (its weights are not for logs).
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads a GGUF model. `progress(done, total)` is called as layers load.
    pub fn load(path: impl AsRef<Path>, progress: impl FnMut(usize, usize)) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let format = PromptFormat::from_gguf(&file)?;
        let spec = StageSpec::whole(file.config().n_layers);
        let stage = Stage::load(&file, spec, &Device::Cpu, progress)?;
        Ok(Self {
            reuse_by_rows: Stage::rows_reusable_across_chunks(&file),
            name: file.model_name(),
            parameters: file.parameter_count(),
            stage,
            format,
            prompt_cache: Mutex::new(PrefixCache::new(0)),
            speculation: Mutex::new(None),
            draft: None,
            pooling: file.config().pooling,
        })
    }

    /// Pools embeddings this way instead of as the file says (llama-server's `--pooling`).
    pub fn set_pooling(&mut self, pooling: Pooling) {
        self.pooling = pooling;
    }

    /// How [`Model::embed`] pools.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Guesses tokens ahead (by prompt lookup, with the attached draft model, or both) and
    /// verifies them in one pass, in every generation from now on (`None`: plain
    /// decoding). The output is the same either way.
    pub fn set_speculation(&self, speculation: Option<Speculation>) {
        *self
            .speculation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = speculation;
    }

    /// Uses `source` as the chat template instead of the file's own
    /// ([`PromptFormat::set_template`]).
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        self.format.set_template(source)
    }

    /// Makes `draft` this model's draft model (for [`Speculation::draft_model`]). Refused
    /// when its tokens are not this model's (ids meaning other text, other end tokens).
    pub fn attach_draft(&mut self, draft: Model) -> Result<()> {
        check_draft_vocabulary(self, &draft)?;
        self.draft = Some(Arc::new(draft));
        Ok(())
    }

    /// The attached draft model.
    pub fn draft_model(&self) -> Option<&Model> {
        self.draft.as_deref()
    }

    /// Keeps up to `bytes` of finished generations' keys and values, so that a prompt that
    /// starts as an earlier one did (the conversation's previous turn, a shared system
    /// prompt) computes only what is new. 0 turns reuse off and frees what is kept.
    pub fn set_prompt_cache_bytes(&self, bytes: usize) {
        let mut cache = self.prompt_cache();
        if cache.budget_bytes() != bytes {
            *cache = PrefixCache::new(bytes);
        }
    }

    /// Caches kept for reuse, and their bytes.
    pub fn prompt_cache_usage(&self) -> (usize, usize) {
        let cache = self.prompt_cache();
        (cache.len(), cache.bytes())
    }

    pub(crate) fn prompt_cache(&self) -> std::sync::MutexGuard<'_, PrefixCache> {
        self.prompt_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`Stage::rows_reusable_across_chunks`] of the model's file.
    pub(crate) fn reuse_by_rows(&self) -> bool {
        self.reuse_by_rows
    }

    /// How many parameters the model has (its tensors' values).
    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    pub fn config(&self) -> &ModelConfig {
        self.stage.config()
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.format.tokenizer()
    }

    /// The tokenizer and chat template.
    pub fn prompt_format(&self) -> &PromptFormat {
        &self.format
    }

    /// Token ids of a raw prompt: special tokens parsed, BOS added if the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.format.encode_prompt(text)
    }

    /// Renders a conversation with the model's own chat template, ready for the
    /// assistant's turn. Models without a template get a plain "role: content" layout.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.format.render_chat(messages)
    }

    /// An embedding of `tokens`, as llama.cpp makes one: the hidden states after the final
    /// norm pooled as the model's file says ([`crate::Pooling`]: the mean for a generative
    /// model, the last token's for Qwen3-Embedding) or [`Model::set_pooling`], then scaled to unit length (as
    /// llama-server's `/v1/embeddings` and Ollama's `/api/embed` give them). Runs in prompt
    /// chunks on a cache of its own, so it touches no generation's state; `interrupted` is
    /// asked between chunks.
    pub fn embed(&self, tokens: &[u32], interrupted: impl Fn() -> bool) -> Result<Vec<f32>> {
        self.embed_pooled(tokens, self.pooling, interrupted)
    }

    /// [`Model::embed`] with `pooling` instead of the file's.
    pub fn embed_pooled(
        &self,
        tokens: &[u32],
        pooling: Pooling,
        interrupted: impl Fn() -> bool,
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidInput("nothing to embed".into()));
        }
        let mut cache = self.stage.new_cache();
        let mut pooler = Pooler::new(pooling, self.config().hidden);
        for (chunk, ids) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            if chunk > 0 && interrupted() {
                return Err(EngineError::Interrupted);
            }
            let start = chunk * PREFILL_CHUNK;
            let positions: Vec<usize> = (start..start + ids.len()).collect();
            let out = self.stage.forward(
                StageInput::Tokens(ids),
                &positions,
                &mut cache,
                Logits::Normed,
            )?;
            let StageOutput::Hidden(h) = out else {
                return Err(EngineError::InvalidInput(
                    "no hidden states produced".into(),
                ));
            };
            for row in h.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()? {
                pooler.push(&row);
            }
        }
        Ok(pooler.finish())
    }

    /// Starts generating after `prompt`. Nothing runs until the first `next()`.
    pub fn generate(&self, prompt: Vec<u32>, params: GenerateParams) -> Result<Generation<'_>> {
        Generation::new(self, prompt, params)
    }
}

/// One step of each of `generations`, each exactly what its own
/// [`Generation::next_step`] gives, in order. The steps that are one row through the model
/// (a token to decode, not a prompt to read or guesses to verify) of generations of the
/// same model run as one batched pass ([`Stage::forward_batch`]), which reads every weight
/// matrix once for all of them and gives each row the numbers it would get alone; the
/// other steps run one after another. How a server answers several requests on one model
/// at about the cost of one: a decode step is bound by reading the weights, not by the
/// arithmetic on a few rows.
pub fn step_together(generations: &mut [&mut Generation<'_>]) -> StepsTogether {
    let mut results: Vec<Option<Result<Option<Step>>>> = generations.iter().map(|_| None).collect();
    // The model of the first generation whose step is one row: its peers share the pass.
    let model: Option<&Model> = generations
        .iter()
        .find(|g| g.next_is_one_row())
        .map(|g| g.model);
    let shared: Vec<bool> = generations
        .iter()
        .map(|g| g.next_is_one_row() && model.is_some_and(|m| std::ptr::eq(m, g.model)))
        .collect();
    let mut in_pass = shared.iter().filter(|&&s| s).count();
    if in_pass < 2 {
        in_pass = 0;
    } else if let Some(model) = model {
        let stage = &model.stage;
        let positions: Vec<[usize; 1]> = generations
            .iter()
            .zip(&shared)
            .filter(|(_, &s)| s)
            .map(|(g, _)| [g.tokens.len() - 1])
            .collect();
        let started = Instant::now();
        let items: Vec<BatchItem<'_>> = generations
            .iter_mut()
            .zip(&shared)
            .filter(|(_, &s)| s)
            .zip(&positions)
            .map(|((g, _), at)| {
                let Generation {
                    tokens,
                    cache,
                    cache_whole,
                    ..
                } = &mut **g;
                *cache_whole = false;
                BatchItem {
                    input: StageInput::Tokens(&tokens[at[0]..]),
                    positions: at,
                    cache,
                    logits: Logits::Last,
                }
            })
            .collect();
        let outputs = stage.forward_batch(items);
        let spent = started.elapsed();
        let chosen = (0..generations.len()).filter(|&i| shared[i]);
        for (i, output) in chosen.zip(outputs) {
            let g = &mut *generations[i];
            match output.and_then(|out| last_logits(Some(out))) {
                Ok(logits) => {
                    g.cache_whole = true;
                    g.computed = Some(logits);
                    g.computed_time = spent;
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
    }
    let steps = generations
        .iter_mut()
        .zip(results)
        .map(|(g, done)| done.unwrap_or_else(|| g.next_step()))
        .collect();
    StepsTogether { steps, in_pass }
}

/// What [`step_together`] did.
pub struct StepsTogether {
    /// Each generation's step, in order, as its [`Generation::next_step`] gives it.
    pub steps: Vec<Result<Option<Step>>>,
    /// How many of them shared one pass of the model (0: none did).
    pub in_pass: usize,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Reuse the keys and values of a kept prompt that starts the same way, and keep this
    /// one's for later (llama-server's `cache_prompt`). Has no effect while the model keeps
    /// no caches ([`Model::set_prompt_cache_bytes`]).
    pub cache_prompt: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            cache_prompt: true,
        }
    }
}

/// Why generation ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One generated token and the text it makes visible (may be empty while a multi-byte
/// character or a possible stop string is incomplete).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub token: u32,
    pub text: String,
    /// The token's log-probability and the likeliest alternatives, when asked for
    /// ([`Generation::want_logprobs`]).
    pub logprob: Option<TokenLogprob>,
}

/// Time spent, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Of the prompt's tokens, those whose keys and values came from a kept cache.
    pub cached_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generate_time: Duration,
    /// Tokens drafted (by lookup) and verified, and how many of them were kept.
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
}

/// A generation in progress. Pull tokens with [`Generation::next_step`].
pub struct Generation<'m> {
    model: &'m Model,
    cache: KvCache,
    sampler: Sampler,
    params: GenerateParams,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Generated bytes decoded so far, and how many of them were handed out.
    text: TextStream<'m>,
    finish: Option<FinishReason>,
    timings: Timings,
    /// Asked between prefill chunks: `true` means stop (the caller lost interest).
    interrupt: Option<Box<dyn Fn() -> bool + Send + 'm>>,
    /// When set, the answer is one of these token sequences ([`Generation::constrain_to`]).
    choices: Option<Choices>,
    /// When set, the answer is, or holds, JSON of a grammar ([`Generation::constrain_json`],
    /// [`Generation::constrain_json_rule`]).
    json: Option<JsonTracker>,
    /// End-of-generation tokens are never drawn ([`Generation::ignore_eos`]).
    ignore_eos: bool,
    /// Whether `cache` holds exactly the keys and values of `tokens[..cache.len()]`: false
    /// while the model runs and after it failed, so a cache left half-written is never
    /// kept for reuse.
    cache_whole: bool,
    /// Where the prompt's computation started: the kept prefix it resumed from, or 0.
    computed_from: usize,
    /// How the generation guesses ahead, when it does.
    speculation: Option<Speculation>,
    /// The draft model's side of this generation, once it has drafted.
    drafter: Option<Drafter>,
    /// Tokens a verification pass accepted that are not handed out yet.
    ready: std::collections::VecDeque<u32>,
    /// With logprobs asked for ([`Generation::want_logprobs`]): how many alternatives per
    /// token.
    logprobs: Option<usize>,
    /// The log-probabilities of the tokens in `ready`, in order, and of the token drawn
    /// last (the next to hand out).
    ready_logprobs: std::collections::VecDeque<TokenLogprob>,
    /// How many tokens the next draft may have: grown while drafts are kept whole, shrunk
    /// when one is cut short (the running acceptance decides what a pass is worth).
    draft_len: usize,
    /// The logits of the next token, already computed by a pass shared with other
    /// generations ([`step_together`]), and that pass's time.
    computed: Option<Vec<f32>>,
    computed_time: Duration,
}

impl Drop for Generation<'_> {
    /// Keeps the cache for later prompts that start as this one did (however the
    /// generation ended: finished, stopped early, or its client went away).
    fn drop(&mut self) {
        if !self.params.cache_prompt || !self.cache_whole {
            return;
        }
        let cache = std::mem::replace(&mut self.cache, KvCache::new(0));
        keep_prompt(
            self.model,
            &self.tokens,
            self.prompt_len,
            self.computed_from,
            cache,
        );
    }
}

/// Keeps the rows of `cache` (the keys and values of `tokens`, a prompt of `prompt_len`
/// tokens and what followed it, computed from position `computed_from` on) that a fresh
/// prefill of the same prompt computes the same, in `model`'s prompt cache.
pub(crate) fn keep_prompt(
    model: &Model,
    tokens: &[u32],
    prompt_len: usize,
    computed_from: usize,
    cache: KvCache,
) {
    if cache.is_empty() {
        return;
    }
    let mut kept = model.prompt_cache();
    if kept.budget_bytes() == 0 {
        return;
    }
    // Only what a fresh prefill computes the same: the prompt's rows (not the answer's,
    // decoded one by one), the last chunk's as far as they are canonical.
    let held = cache.len().min(tokens.len());
    let canonical = if held >= prompt_len {
        canonical_len(
            prompt_len,
            computed_from,
            PREFILL_CHUNK,
            model.reuse_by_rows,
        )
    } else {
        // Stopped mid-prompt: the chunks done all end at chunk boundaries.
        held
    };
    if canonical == 0 {
        return;
    }
    let key = kept.fresh_key();
    kept.keep(key, &tokens[..canonical], cache);
}

impl<'m> Generation<'m> {
    fn new(model: &'m Model, prompt: Vec<u32>, params: GenerateParams) -> Result<Self> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        let limit = model.config().context_length;
        if prompt.len() >= limit {
            return Err(EngineError::ContextFull {
                needed: prompt.len() + 1,
                limit,
            });
        }
        // Resume from the longest kept prefix, leaving at least one prompt token to compute
        // (its logits choose the first token).
        let mut cache = None;
        let mut timings = Timings::default();
        if params.cache_prompt {
            let mut kept = model.prompt_cache();
            if let Some(m) = kept.longest(&prompt, prompt.len() - 1) {
                let at = resume_point(m.len, prompt.len(), PREFILL_CHUNK, model.reuse_by_rows);
                if at > 0 {
                    cache = kept.resume(m.key, at);
                    timings.cached_tokens = cache.as_ref().map_or(0, KvCache::len);
                }
            }
        }
        Ok(Self {
            model,
            cache: cache.unwrap_or_else(|| model.stage.new_cache()),
            sampler: Sampler::new(params.sampling.clone()),
            prompt_len: prompt.len(),
            tokens: prompt,
            text: TextStream::new(model.tokenizer(), params.stop.clone()),
            params,
            finish: None,
            timings,
            interrupt: None,
            choices: None,
            json: None,
            ignore_eos: false,
            cache_whole: true,
            computed_from: timings.cached_tokens,
            speculation: *model
                .speculation
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            drafter: None,
            ready: std::collections::VecDeque::new(),
            logprobs: None,
            ready_logprobs: std::collections::VecDeque::new(),
            draft_len: 0,
            computed: None,
            computed_time: Duration::ZERO,
        })
    }

    /// Constrains the answer to exactly one of `texts` (as plain text, e.g. a classifier's
    /// labels): only tokens that continue a choice can be drawn, and generation ends with
    /// [`FinishReason::Stop`] once a choice is complete (unless `max_tokens` cuts it first).
    /// Call before the first step. Fails on an empty list, more than
    /// [`crate::choices::MAX_CHOICES`] choices, or an empty choice.
    pub fn constrain_to(&mut self, texts: &[String]) -> Result<()> {
        if self.tokens.len() > self.prompt_len {
            return Err(EngineError::InvalidInput(
                "an answer can only be constrained before it starts".into(),
            ));
        }
        self.choices = Some(Choices::new(self.model.tokenizer(), texts)?);
        Ok(())
    }

    /// Constrains the answer to JSON that `grammar` accepts: a token that would break it is
    /// never drawn, and generation ends with [`FinishReason::Stop`] as soon as the value is
    /// whole (unless `max_tokens` cuts it first, leaving it unfinished). Call before the
    /// first step.
    pub fn constrain_json(&mut self, grammar: &JsonGrammar) -> Result<()> {
        self.constrain_json_rule(&JsonRule::whole(grammar.clone()))
    }

    /// Keeps the answer's JSON values to `rule`'s grammar where the rule says: from the
    /// start, after each trigger, or both (tool calls: the model writes freely until it
    /// opens a call, and the call is drawn under the tools' grammar). Call before the first
    /// step. Guessing ahead (prompt lookup) goes on between values; the draft model's is off.
    pub fn constrain_json_rule(&mut self, rule: &JsonRule) -> Result<()> {
        if self.tokens.len() > self.prompt_len {
            return Err(EngineError::InvalidInput(
                "an answer can only be constrained before it starts".into(),
            ));
        }
        self.json = Some(JsonTracker::new(rule, self.model.tokenizer()));
        Ok(())
    }

    /// Never draws an end-of-generation token, so the answer runs to `max_tokens` or a stop
    /// string (llama-server's `ignore_eos`, which benchmark tools use for fixed lengths).
    /// A constrained answer still ends where its constraint is complete.
    pub fn ignore_eos(&mut self, ignore: bool) {
        self.ignore_eos = ignore;
    }

    /// Installs a check that is asked between prefill chunks; when it answers `true`,
    /// `next_step` stops with [`EngineError::Interrupted`]. A long prompt then does not
    /// hold the device for a client that has gone.
    pub fn set_interrupt(&mut self, check: impl Fn() -> bool + Send + 'm) {
        self.interrupt = Some(Box::new(check));
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// How many of the prompt's tokens were not computed: their keys and values came from a
    /// kept cache.
    pub fn cached_tokens(&self) -> usize {
        self.timings.cached_tokens
    }

    /// Generated token ids so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The visible text generated so far (stop string excluded).
    pub fn text(&self) -> &str {
        self.text.visible()
    }

    /// The stop string that ended the answer, if one did.
    pub fn stop_string(&self) -> Option<&str> {
        self.text.stop_string()
    }

    /// Runs the model for one more token. `Ok(None)` once finished; then
    /// [`Generation::finish_reason`] says why. All visible text is handed out in steps:
    /// the step that ends generation carries whatever was held back.
    pub fn next_step(&mut self) -> Result<Option<Step>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.params.max_tokens == 0 {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        let started = Instant::now();
        // A shared pass computed this step's logits: its time is this step's too.
        let spent = std::mem::take(&mut self.computed_time);
        let first = self.tokens.len() == self.prompt_len;
        let token = match self.ready.pop_front() {
            Some(token) => token,
            None if self.computed.is_some() => self.decode_one()?,
            None => match self.speculate()? {
                Some(token) => token,
                None => self.decode_one()?,
            },
        };
        let logprob = self.ready_logprobs.pop_front();
        self.tokens.push(token);
        if let Some(json) = &mut self.json {
            let was_open = json.constraint().is_some();
            json.accept(token, self.model.tokenizer());
            if !was_open && json.constraint().is_some() && !self.ready.is_empty() {
                // A value opened inside a verified guess: the guesses after it were drawn
                // without the grammar. They go, with their keys and values.
                self.ready.clear();
                self.ready_logprobs.clear();
                self.cache.truncate(self.tokens.len() - 1);
            }
        }
        if first {
            // The draft model reads the prompt now, as part of the prompt's time.
            self.drafter_prompt()?;
            self.timings.prompt_tokens = self.prompt_len;
            self.timings.prompt_time += started.elapsed() + spent;
        } else {
            self.timings.generate_time += started.elapsed() + spent;
        }
        self.timings.generated_tokens += 1;

        let (mut text, ended) = self.text.push_generated(token)?;
        let generated = self.tokens.len() - self.prompt_len;
        let chosen = || {
            self.choices
                .as_ref()
                .is_some_and(|c| c.is_finished(&self.tokens[self.prompt_len..]))
                || self.json.as_ref().is_some_and(JsonTracker::finished)
        };
        if ended {
            self.finish = Some(FinishReason::Stop);
        } else if chosen() {
            self.finish = Some(FinishReason::Stop);
            text.push_str(&self.text.flush());
        } else if generated >= self.params.max_tokens
            || self.tokens.len() >= self.model.config().context_length
        {
            self.finish = Some(FinishReason::Length);
            text.push_str(&self.text.flush());
        }
        Ok(Some(Step {
            token,
            text,
            logprob,
        }))
    }

    /// Guesses tokens ahead and verifies them in one pass: the tokens the sampler draws at
    /// each verified row, up to the first that differs from the guess (which it replaces),
    /// the first handed out now and the rest queued. `None` when no guess is worth a pass
    /// (speculation off, a constrained answer, nothing to guess from, little room left, or
    /// the prompt still to compute).
    fn speculate(&mut self) -> Result<Option<u32>> {
        let Some(spec) = self.speculation else {
            return Ok(None);
        };
        let n = self.tokens.len();
        // Guesses are drawn without a grammar: none while a JSON value is open (between
        // values they are free text, and a value opening inside them is handled in
        // `next_step`).
        let constrained = self
            .json
            .as_ref()
            .is_some_and(|j| j.constraint().is_some() || j.finished());
        if self.choices.is_some() || constrained || self.cache.len() + 1 != n {
            return Ok(None);
        }
        // Guessed tokens past what the answer may still hold would be thrown away.
        let left = (self.params.max_tokens + self.prompt_len)
            .min(self.model.config().context_length)
            .saturating_sub(n + 1);
        if self.draft_len == 0 {
            self.draft_len = spec.draft_max.div_ceil(2).max(1);
        }
        let max = self.draft_len.min(left);
        let enough = spec.draft_min.max(1);
        if max < enough {
            return Ok(None);
        }
        // Lookup first: it costs nothing.
        let mut draft = spec
            .lookup
            .map(|lookup| lookup.draft(&self.tokens, max))
            .unwrap_or_default();
        if draft.len() < enough {
            let vocab = self.model.config().vocab_size;
            let interrupt = &self.interrupt;
            let interrupted = || interrupt.as_ref().is_some_and(|stop| stop());
            if let Some(drafter) = &mut self.drafter {
                draft = drafter.draft(&self.tokens, max, spec.p_min, vocab, &interrupted)?;
            }
        }
        if draft.len() < enough {
            return Ok(None);
        }
        let mut input = Vec::with_capacity(draft.len() + 1);
        input.push(self.tokens[n - 1]);
        input.extend_from_slice(&draft);
        let positions: Vec<usize> = (n - 1..n + draft.len()).collect();
        self.cache_whole = false;
        let out = self.model.stage.forward(
            StageInput::Tokens(&input),
            &positions,
            &mut self.cache,
            Logits::Verify,
        )?;
        let StageOutput::Logits(rows) = out else {
            return Err(EngineError::InvalidInput("no logits produced".into()));
        };
        let tokenizer = self.model.tokenizer();
        let mut history = self.tokens.clone();
        for i in 0..input.len() {
            let mut logits = logits_row(&rows, i)?;
            let raw = self.logprobs.map(|_| logits.clone());
            self.mask_eos(&mut logits);
            let token = self.sampler.sample(&mut logits, &history);
            self.note_logprob(raw.as_deref(), token);
            history.push(token);
            self.ready.push_back(token);
            if draft.get(i) != Some(&token) || tokenizer.is_eog(token) {
                break;
            }
        }
        // Keep the keys and values of the tokens now in the answer; the rest were guesses.
        let kept = self.ready.len();
        self.cache.truncate(n - 1 + kept);
        self.cache_whole = true;
        self.timings.drafted_tokens += draft.len();
        self.timings.accepted_tokens += kept - 1;
        self.draft_len = if kept > draft.len() {
            (self.draft_len + 2).min(spec.draft_max.max(1))
        } else {
            self.draft_len.saturating_sub(1).max(1)
        };
        Ok(self.ready.pop_front())
    }

    /// Starts the draft model's side of the generation, when it drafts: its cache of the
    /// prompt (resumed from its own kept prompts where it can).
    fn drafter_prompt(&mut self) -> Result<()> {
        let Some(spec) = self.speculation else {
            return Ok(());
        };
        let Some(draft_model) = self.model.draft.clone() else {
            return Ok(());
        };
        if !spec.draft_model || self.choices.is_some() || self.json.is_some() {
            return Ok(());
        }
        let prompt = &self.tokens[..self.prompt_len];
        let mut drafter = Drafter::new(draft_model, prompt, self.params.cache_prompt);
        let interrupt = &self.interrupt;
        drafter.read(prompt, &|| interrupt.as_ref().is_some_and(|stop| stop()))?;
        self.drafter = Some(drafter);
        Ok(())
    }

    /// Reports each token's log-probability and its `top` likeliest alternatives (at most
    /// [`crate::MAX_TOP_LOGPROBS`]) in [`Step::logprob`].
    pub fn want_logprobs(&mut self, top: usize) {
        self.logprobs = Some(top.min(crate::MAX_TOP_LOGPROBS));
    }

    /// Never an end-of-generation token with `ignore_eos` (and no choices to finish).
    fn mask_eos(&self, logits: &mut [f32]) {
        if self.ignore_eos && self.choices.is_none() {
            for &eog in self.model.tokenizer().eos_ids() {
                if let Some(l) = logits.get_mut(eog as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Runs the model for the pending tokens and draws one.
    fn decode_one(&mut self) -> Result<u32> {
        let mut logits = match self.computed.take() {
            Some(logits) => logits,
            None => self.run_pending()?,
        };
        let raw = self.logprobs.map(|_| logits.clone());
        if let Some(choices) = &self.choices {
            let answer = &self.tokens[self.prompt_len..];
            choices.mask(&mut logits, answer, self.model.tokenizer().eos_ids());
        }
        self.mask_eos(&mut logits);
        let tokenizer = self.model.tokenizer();
        let token = match self.json.as_ref().and_then(JsonTracker::constraint) {
            None => self.sampler.sample(&mut logits, &self.tokens),
            Some(json) => {
                let (sampler, history) = (&mut self.sampler, &self.tokens);
                json.draw(&mut logits, tokenizer, |l| sampler.sample(l, history))
                    .ok_or_else(|| {
                        EngineError::InvalidInput(
                            "no token can continue the constrained JSON answer".into(),
                        )
                    })?
            }
        };
        self.note_logprob(raw.as_deref(), token);
        Ok(token)
    }

    /// Queues `token`'s log-probabilities under the model's own logits `raw` (taken
    /// before masks and sampling settings), when they were asked for.
    fn note_logprob(&mut self, raw: Option<&[f32]>, token: u32) {
        if let (Some(top), Some(raw)) = (self.logprobs, raw) {
            if let Some(entry) = token_logprob(raw, token, top) {
                self.ready_logprobs.push_back(entry);
            }
        }
    }

    /// Whether the next step is one row through the model and a draw from its logits: the
    /// prompt is in the cache, no verified guesses wait, and nothing guesses ahead — the
    /// steps [`step_together`] runs in a shared pass.
    fn next_is_one_row(&self) -> bool {
        self.finish.is_none()
            && self.params.max_tokens > 0
            && self.ready.is_empty()
            && self.speculation.is_none()
            && self.computed.is_none()
            && self.cache.len() + 1 == self.tokens.len()
    }

    /// Feeds every token not yet in the cache and returns the logits of the last one.
    /// Prompt chunks end at multiples of [`PREFILL_CHUNK`] positions, wherever the cache
    /// left off, so a prompt resumed from a kept prefix is cut where it would be cut whole.
    fn run_pending(&mut self) -> Result<Vec<f32>> {
        let mut start = self.cache.len();
        let end = self.tokens.len();
        let mut last = None;
        while start < end {
            if last.is_some() && self.interrupt.as_ref().is_some_and(|stop| stop()) {
                return Err(EngineError::Interrupted);
            }
            let stop = ((start / PREFILL_CHUNK + 1) * PREFILL_CHUNK).min(end);
            let positions: Vec<usize> = (start..stop).collect();
            self.cache_whole = false;
            let out = self.model.stage.forward(
                StageInput::Tokens(&self.tokens[start..stop]),
                &positions,
                &mut self.cache,
                Logits::Last,
            )?;
            self.cache_whole = true;
            last = Some(out);
            start = stop;
        }
        last_logits(last)
    }
}

/// The logits of the first (for a one-row step: the only) row of a whole model's output.
fn last_logits(out: Option<StageOutput>) -> Result<Vec<f32>> {
    match out {
        Some(StageOutput::Logits(l)) => logits_row(&l, 0),
        _ => Err(EngineError::InvalidInput("no logits produced".into())),
    }
}
