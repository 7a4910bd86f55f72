//! A whole model on one device, and text generation with it.
//!
//! [`Model`] bundles the one stage `[0..L)` with the tokenizer and chat template from the
//! same GGUF file. [`Generation`] is a pull-based token loop: the caller drives it (a CLI
//! loop, an HTTP handler's blocking task), so the engine owns no threads.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::sampler::{Sampler, SamplingParams};
use crate::stage::{logits_row, Logits, Stage, StageInput, StageOutput, StageSpec};
use crate::text_stream::TextStream;
use crate::tokenizer::Tokenizer;

/// Prompts are fed through the model in chunks of this many tokens, which bounds the
/// attention matrix of a long prompt.
pub const PREFILL_CHUNK: usize = 512;

/// A whole model loaded on one device.
pub struct Model {
    name: String,
    stage: Stage,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

impl Model {
    /// Loads a GGUF model. `progress(done, total)` is called as layers load.
    pub fn load(path: impl AsRef<Path>, progress: impl FnMut(usize, usize)) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let device = Device::Cpu;
        let tokenizer = Tokenizer::from_gguf_metadata(file.metadata())?;
        let template = match file.metadata().get("tokenizer.chat_template") {
            Some(_) => Some(ChatTemplate::from_gguf_metadata(file.metadata())?),
            None => None,
        };
        let spec = StageSpec::whole(file.config().n_layers);
        let stage = Stage::load(&file, spec, &device, progress)?;
        Ok(Self {
            name: file.model_name(),
            stage,
            tokenizer,
            template,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &ModelConfig {
        self.stage.config()
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of a raw prompt: special tokens parsed, BOS added if the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.tokenizer.add_bos() {
            if let Some(bos) = self.tokenizer.bos_id() {
                ids.push(bos);
            }
        }
        ids.extend(self.tokenizer.encode(text, true)?);
        Ok(ids)
    }

    /// Renders a conversation with the model's own chat template, ready for the
    /// assistant's turn. Models without a template get a plain "role: content" layout.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        match &self.template {
            Some(t) => Ok(t.render(messages, true)?),
            None => {
                let mut s = String::new();
                for m in messages {
                    s.push_str(&format!("{}: {}\n", m.role, m.content));
                }
                s.push_str("assistant:");
                Ok(s)
            }
        }
    }

    /// Starts generating after `prompt`. Nothing runs until the first `next()`.
    pub fn generate(&self, prompt: Vec<u32>, params: GenerateParams) -> Result<Generation<'_>> {
        Generation::new(self, prompt, params)
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
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
}

/// Time spent, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generate_time: Duration,
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
        Ok(Self {
            model,
            cache: model.stage.new_cache(),
            sampler: Sampler::new(params.sampling.clone()),
            prompt_len: prompt.len(),
            tokens: prompt,
            text: TextStream::new(&model.tokenizer, params.stop.clone()),
            params,
            finish: None,
            timings: Timings::default(),
            interrupt: None,
        })
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
        let first = self.tokens.len() == self.prompt_len;
        let mut logits = self.run_pending()?;
        let token = self.sampler.sample(&mut logits, &self.tokens);
        self.tokens.push(token);
        if first {
            self.timings.prompt_tokens = self.prompt_len;
            self.timings.prompt_time += started.elapsed();
        } else {
            self.timings.generate_time += started.elapsed();
        }
        self.timings.generated_tokens += 1;

        let text = if self.model.tokenizer.is_eog(token) {
            self.finish = Some(FinishReason::Stop);
            self.text.flush()
        } else {
            let (mut text, stopped) = self.text.push(token)?;
            let generated = self.tokens.len() - self.prompt_len;
            if stopped {
                self.finish = Some(FinishReason::Stop);
            } else if generated >= self.params.max_tokens
                || self.tokens.len() >= self.model.config().context_length
            {
                self.finish = Some(FinishReason::Length);
                text.push_str(&self.text.flush());
            }
            text
        };
        Ok(Some(Step { token, text }))
    }

    /// Feeds every token not yet in the cache and returns the logits of the last one.
    fn run_pending(&mut self) -> Result<Vec<f32>> {
        let start = self.cache.len();
        let pending = &self.tokens[start..];
        let mut last = None;
        for (i, chunk) in pending.chunks(PREFILL_CHUNK).enumerate() {
            if i > 0 && self.interrupt.as_ref().is_some_and(|stop| stop()) {
                return Err(EngineError::Interrupted);
            }
            let first = start + i * PREFILL_CHUNK;
            let positions: Vec<usize> = (first..first + chunk.len()).collect();
            let out = self.model.stage.forward(
                StageInput::Tokens(chunk),
                &positions,
                &mut self.cache,
                Logits::Last,
            )?;
            last = Some(out);
        }
        match last {
            Some(StageOutput::Logits(l)) => logits_row(&l, 0),
            _ => Err(EngineError::InvalidInput("no logits produced".into())),
        }
    }
}
