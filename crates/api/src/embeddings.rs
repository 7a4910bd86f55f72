//! `POST /v1/embeddings` (OpenAI's, as llama-server answers it) and the embeddings behind
//! Ollama's `/api/embed`: a text's vector from the node's model, whole or a ring of stages it
//! heads (the last stage sends the normed rows back) — every token's hidden state after the
//! final norm, pooled as the model file or `--pooling` says (the mean for a generative
//! model) and scaled to unit length, as llama.cpp makes one. Retrieval front ends (Open WebUI's documents, Continue's
//! codebase index) ask for these.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::completions::blocking;
use crate::error::{ApiError, Json};
use crate::metrics::GaugeGuard;
use crate::runner::admit;
use crate::state::AppState;

/// Most inputs in one request (OpenAI's limit).
pub(crate) const MAX_INPUTS: usize = 2048;

/// Most tokens in one request, all inputs together: the engine is the node's for as long as
/// a request runs (minutes for this many on a small CPU), so one request cannot take it for
/// hours.
pub(crate) const MAX_TOKENS: usize = 65_536;

#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingsRequest {
    model: Option<String>,
    input: Option<Value>,
    /// `float` (the default) or `base64`: the little-endian f32 bytes, base64-encoded (the
    /// `openai` Python client asks for this and decodes it).
    encoding_format: Option<String>,
    /// Only the model's own width is possible (its vectors cannot be shortened).
    dimensions: Option<u64>,
    #[allow(dead_code)]
    user: Option<String>,
}

/// One input: a text, or token ids already.
#[derive(Debug)]
pub(crate) enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// OpenAI's `input`: a string, an array of strings, an array of token ids, or an array of
/// arrays of token ids.
fn openai_inputs(input: Option<Value>) -> Result<Vec<Input>, ApiError> {
    let bad = || {
        ApiError::invalid_value(
            "input",
            "`input` must be a string, an array of strings, an array of token ids or an array \
             of arrays of token ids",
        )
    };
    let ids = |items: &[Value]| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect()
    };
    match input.ok_or_else(|| ApiError::missing_param("input"))? {
        Value::String(s) => Ok(vec![Input::Text(s)]),
        Value::Array(items) if items.is_empty() => Err(bad()),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Ok(vec![Input::Ids(ids(&items).ok_or_else(bad)?)])
        }
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(Input::Text(s)),
                Value::Array(inner) => Ok(Input::Ids(ids(&inner).ok_or_else(bad)?)),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// The vectors of `inputs`, in order, and the tokens they took: each tokenized as a
/// prompt is (the model's BOS first where it wants one), checked against the vocabulary
/// and the context (`truncate`: cut to the context instead, as Ollama does by default)
/// and all together against [`MAX_TOKENS`], then embedded one after another while this
/// request holds the engine (counted in flight, as a generation is). A client that leaves
/// stops the work at the next input or prompt chunk.
pub(crate) async fn embed(
    state: &AppState,
    inputs: Vec<Input>,
    truncate: bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::invalid_value("input", "`input` is empty"));
    }
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid_value(
            "input",
            format!(
                "{} inputs in one request; at most {MAX_INPUTS}",
                inputs.len()
            ),
        ));
    }
    let backend = state.model()?;
    let ids = tokenize(&backend, inputs, truncate).await?;
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let permit = admit(state, &backend).await?;
    let metrics = state.metrics().clone();
    let vectors = match backend {
        Backend::Local(model) => {
            let left = Arc::new(AtomicBool::new(false));
            let _leaving = SetOnDrop(left.clone());
            let metrics = metrics.clone();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let _in_flight = GaugeGuard::new(&metrics.in_flight);
                let mut vectors = Vec::with_capacity(ids.len());
                for ids in ids {
                    if left.load(Ordering::Relaxed) {
                        return Err(ApiError::internal("the client left"));
                    }
                    let vector = model
                        .embed(&ids, || left.load(Ordering::Relaxed))
                        .map_err(|e| ApiError::from_engine(e, "input"))?;
                    vectors.push(vector);
                }
                Ok(vectors)
            })
            .await
            .map_err(|e| ApiError::internal(format!("embedding failed: {e}")))??
        }
        // A client that leaves drops this future, which ends the ring's session.
        Backend::Ring(pipeline) => {
            let _permit = permit;
            let _in_flight = GaugeGuard::new(&metrics.in_flight);
            let mut vectors = Vec::with_capacity(ids.len());
            for ids in ids {
                let vector = pipeline
                    .embed(&ids)
                    .await
                    .map_err(|e| ApiError::from_pipeline(e, "input"))?;
                vectors.push(vector);
            }
            vectors
        }
    };
    metrics.prompt_tokens.inc_by(tokens as u64);
    Ok((vectors, tokens))
}

/// Each input's token ids, checked (and cut to the context with `truncate`); off the
/// async threads, and before the engine is waited for.
async fn tokenize(
    backend: &Backend,
    inputs: Vec<Input>,
    truncate: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let backend = backend.clone();
    blocking(move || {
        let context = backend.config().context_length;
        let vocab = backend.config().vocab_size;
        let mut all = Vec::with_capacity(inputs.len());
        let mut tokens = 0;
        for (i, input) in inputs.into_iter().enumerate() {
            let mut ids = match input {
                Input::Text(text) if text.is_empty() => {
                    return Err(ApiError::invalid_value(
                        "input",
                        format!("input {i} is empty"),
                    ))
                }
                Input::Text(text) => backend
                    .prompt_format()
                    .encode_prompt(&text)
                    .map_err(|e| ApiError::from_engine(e, "input"))?,
                Input::Ids(ids) => ids,
            };
            if ids.is_empty() {
                return Err(ApiError::invalid_value(
                    "input",
                    format!("input {i} has no tokens"),
                ));
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::invalid_value(
                    "input",
                    format!("input {i}: token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            if ids.len() > context {
                if !truncate {
                    return Err(ApiError::context_length_exceeded(
                        "input",
                        format!(
                            "input {i} is {} tokens; the model's context is {context}",
                            ids.len()
                        ),
                    ));
                }
                ids.truncate(context);
            }
            tokens += ids.len();
            if tokens > MAX_TOKENS {
                return Err(ApiError::invalid_value(
                    "input",
                    format!("more than {MAX_TOKENS} tokens in one request"),
                ));
            }
            all.push(ids);
        }
        Ok(all)
    })
    .await
}

/// `dimensions`, where a request gives it: only the model's own width (its vectors cannot
/// be shortened).
pub(crate) fn check_dimensions(state: &AppState, dimensions: Option<u64>) -> Result<(), ApiError> {
    let Some(dimensions) = dimensions else {
        return Ok(());
    };
    let width = state.model()?.config().hidden as u64;
    if dimensions != width {
        return Err(ApiError::invalid_value(
            "dimensions",
            format!("this model's embeddings have {width} dimensions, not {dimensions}"),
        ));
    }
    Ok(())
}

/// Raises its flag when dropped: the handler's future was dropped (the client left).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    Json(req): Json<EmbeddingsRequest>,
) -> Result<axum::Json<Value>, ApiError> {
    if let Some(model) = &req.model {
        if !state.answers_to(model) {
            return Err(ApiError::model_not_found(model));
        }
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_value(
                "encoding_format",
                format!("`encoding_format` must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    let inputs = openai_inputs(req.input)?;
    check_dimensions(&state, req.dimensions)?;
    let (vectors, tokens) = embed(&state, inputs, false).await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": state.model_id(),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn shapes(v: Value) -> Result<Vec<String>, ApiError> {
        openai_inputs(Some(v)).map(|inputs| {
            inputs
                .into_iter()
                .map(|i| match i {
                    Input::Text(t) => format!("text {t}"),
                    Input::Ids(ids) => format!("ids {ids:?}"),
                })
                .collect()
        })
    }

    #[test]
    fn every_input_shape_openai_allows_is_read() {
        assert_eq!(shapes(json!("hi")).unwrap(), ["text hi"]);
        assert_eq!(shapes(json!(["a", "b"])).unwrap(), ["text a", "text b"]);
        assert_eq!(shapes(json!([1, 2, 3])).unwrap(), ["ids [1, 2, 3]"]);
        assert_eq!(
            shapes(json!([[1, 2], [3]])).unwrap(),
            ["ids [1, 2]", "ids [3]"]
        );
        for bad in [
            json!([]),
            json!(7),
            json!({"text": "x"}),
            json!([1, "a"]),
            json!([-1]),
            json!([1.5]),
            json!([[1, -2]]),
            json!([4294967296u64]),
        ] {
            let e = shapes(bad.clone()).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
        }
        assert_eq!(openai_inputs(None).unwrap_err().status.as_u16(), 400);
    }
}
