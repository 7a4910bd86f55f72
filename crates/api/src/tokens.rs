//! `POST /tokenize` and `POST /detokenize`, as llama-server answers them: a client counts
//! the tokens of a text before it sends it (agents trimming a conversation to the context,
//! front ends showing a count), or turns ids back into text, with the model's own tokenizer.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::completions::blocking;
use crate::error::{ApiError, Json};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct TokenizeRequest {
    content: Option<String>,
    /// Put the model's BOS first, when it wants one (default false, as llama-server).
    #[serde(default)]
    add_special: bool,
    /// The text of control tokens (`<|im_start|>`) becomes their id (default true).
    parse_special: Option<bool>,
    /// Answer `{"id", "piece"}` objects instead of bare ids.
    #[serde(default)]
    with_pieces: bool,
}

pub(crate) async fn tokenize(
    State(state): State<AppState>,
    Json(req): Json<TokenizeRequest>,
) -> Result<axum::Json<Value>, ApiError> {
    let content = req
        .content
        .ok_or_else(|| ApiError::missing_param("content"))?;
    let backend = state.model()?;
    let tokens = blocking(move || {
        let tokenizer = backend.prompt_format().tokenizer();
        let mut ids = Vec::new();
        if req.add_special && tokenizer.add_bos() {
            ids.extend(tokenizer.bos_id());
        }
        let text = tokenizer
            .encode(&content, req.parse_special.unwrap_or(true))
            .map_err(|e| ApiError::invalid_value("content", e.to_string()))?;
        ids.extend(text);
        if !req.with_pieces {
            return Ok(json!(ids));
        }
        let pieces = ids
            .iter()
            .map(|&id| {
                let bytes = tokenizer.token_bytes(id, false).unwrap_or_default();
                // A piece that is not whole UTF-8 (part of a character) goes as its bytes.
                let piece = match String::from_utf8(bytes) {
                    Ok(text) => json!(text),
                    Err(e) => json!(e.into_bytes()),
                };
                json!({"id": id, "piece": piece})
            })
            .collect::<Vec<_>>();
        Ok(Value::Array(pieces))
    })
    .await?;
    Ok(axum::Json(json!({ "tokens": tokens })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct DetokenizeRequest {
    tokens: Option<Vec<i64>>,
}

pub(crate) async fn detokenize(
    State(state): State<AppState>,
    Json(req): Json<DetokenizeRequest>,
) -> Result<axum::Json<Value>, ApiError> {
    let tokens = req
        .tokens
        .ok_or_else(|| ApiError::missing_param("tokens"))?;
    let backend = state.model()?;
    let content = blocking(move || {
        let tokenizer = backend.prompt_format().tokenizer();
        let vocab = tokenizer.vocab_size();
        let mut ids = Vec::with_capacity(tokens.len());
        for (i, &t) in tokens.iter().enumerate() {
            match u32::try_from(t) {
                Ok(id) if (id as usize) < vocab => ids.push(id),
                _ => {
                    return Err(ApiError::invalid_value(
                        &format!("tokens[{i}]"),
                        format!(
                            "{t} is not a token id of this model (0 to {})",
                            vocab.saturating_sub(1)
                        ),
                    ))
                }
            }
        }
        tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::invalid_value("tokens", e.to_string()))
    })
    .await?;
    Ok(axum::Json(json!({ "content": content })))
}
