//! [`PromptFormat`]: the text side of a model — its tokenizer and chat template — apart from
//! the weights, so that a node holding only some layers (a pipeline head) formats prompts
//! exactly as a whole [`crate::Model`] does.

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// The most tokens each part of a fill-in-the-middle prompt keeps
/// ([`PromptFormat::infill_prompt`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfillLimits {
    /// Of the code before the cursor (its end is kept).
    pub prefix: usize,
    /// Of the code after it (its start is kept).
    pub suffix: usize,
    /// Of the other files, with their separators (the end is kept).
    pub files: usize,
}

/// A model's tokenizer and chat template, both read from its GGUF metadata.
pub struct PromptFormat {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

impl PromptFormat {
    /// Reads `tokenizer.ggml.*` and `tokenizer.chat_template` (if present) from `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let tokenizer = Tokenizer::from_gguf_metadata(file.metadata())?;
        let template = match file.metadata().get("tokenizer.chat_template") {
            Some(_) => Some(ChatTemplate::from_gguf_metadata(file.metadata())?),
            None => None,
        };
        Ok(Self {
            tokenizer,
            template,
        })
    }

    /// Uses `source` as the chat template instead of the file's own (llama-server's
    /// `--chat-template-file`: a GGUF whose template renders no tools, or renders them
    /// wrongly, gets one that does). `bos_token` and `eos_token` are the tokenizer's.
    pub fn set_template(&mut self, source: &str) -> Result<()> {
        let text = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.token_text(id))
                .unwrap_or_default()
                .to_owned()
        };
        let (bos, eos) = (text(self.tokenizer.bos_id()), text(self.tokenizer.eos_id()));
        self.template = Some(ChatTemplate::from_source(source, &bos, &eos)?);
        Ok(())
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

    /// A fill-in-the-middle prompt: the code before the cursor and the code after it, for
    /// the model to write what goes between, in the order Qwen2.5-Coder and StarCoder were
    /// trained on (and Ollama's templates use): `<PRE>prefix<SUF>suffix<MID>`, the BOS first
    /// where the model wants one. With `files` (other files' text, for context, as
    /// llama-server's `/infill` takes them), llama.cpp's repo-level layout comes first:
    /// `<|repo_name|>myproject\n`, then `<|file_sep|>NAME\nTEXT` for each, then
    /// `<|file_sep|>filename\n` (where the model has no such tokens, each file's text
    /// follows llama.cpp's `--- snippet ---` line). The texts are tokenized as plain text (a
    /// control token's text in the code stays text). With `limits`, each part is cut to
    /// its share as llama-server cuts `/infill`'s: the prefix keeps its end (the code just
    /// before the cursor), the suffix its start, the files their end (the last given and
    /// the closing `<|file_sep|>filename`). An error for a model without FIM tokens.
    pub fn infill_prompt(
        &self,
        prefix: &str,
        suffix: &str,
        files: &[(String, String)],
        limits: Option<InfillLimits>,
    ) -> Result<Vec<u32>> {
        let fim = self.tokenizer.fim().ok_or_else(|| {
            EngineError::InvalidInput(
                "this model has no fill-in-the-middle tokens (a code model such as \
                 Qwen2.5-Coder has them)"
                    .into(),
            )
        })?;
        let text = |t: &str| self.tokenizer.encode(t, false);
        let mut repo = Vec::new();
        if !files.is_empty() {
            if let Some(id) = fim.repo {
                repo.push(id);
                repo.extend(text("myproject\n")?);
            }
            for (name, content) in files {
                match fim.file_sep {
                    Some(sep) => {
                        repo.push(sep);
                        repo.extend(text(&format!("{name}\n"))?);
                    }
                    None => repo.extend(text("\n\n--- snippet ---\n\n")?),
                }
                repo.extend(text(content)?);
            }
            if let Some(sep) = fim.file_sep {
                repo.push(sep);
                repo.extend(text("filename\n")?);
            }
        }
        let mut before = text(prefix)?;
        let mut after = text(suffix)?;
        if let Some(limits) = limits {
            repo.drain(..repo.len().saturating_sub(limits.files));
            before.drain(..before.len().saturating_sub(limits.prefix));
            after.truncate(limits.suffix);
        }
        let mut ids = Vec::new();
        if self.tokenizer.add_bos() {
            ids.extend(self.tokenizer.bos_id());
        }
        ids.extend(repo);
        ids.push(fim.prefix);
        ids.extend(before);
        ids.push(fim.suffix);
        ids.extend(after);
        ids.push(fim.middle);
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

    /// Renders a conversation given as OpenAI-shaped JSON messages (tool calls and tool
    /// results included) with the `tools` the model may call, ready for the assistant's
    /// turn, with more of the template's `variables` ([`ChatTemplate::render_json`]).
    /// Models without a template get the plain layout of [`Self::render_chat`].
    pub fn render_conversation(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        variables: Option<&serde_json::Value>,
    ) -> Result<String> {
        match &self.template {
            Some(t) => Ok(t.render_json(messages, tools, true, variables)?),
            None => {
                let plain: Vec<ChatMessage> = messages
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|m| ChatMessage {
                                role: m["role"].as_str().unwrap_or("user").to_owned(),
                                content: m["content"].as_str().unwrap_or_default().to_owned(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.render_chat(&plain)
            }
        }
    }

    /// The chat template, when the model has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }
}
