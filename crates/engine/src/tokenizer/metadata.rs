//! Reading `tokenizer.ggml.*` metadata values, with errors that name the key.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::TokenizerError;

pub(super) fn type_name(v: &Value) -> String {
    format!("{:?}", v.value_type())
}

pub(super) fn get_str<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "a string",
            found: type_name(v),
        }),
    }
}

pub(super) fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

pub(super) fn get_int(
    md: &HashMap<String, Value>,
    key: &str,
) -> Result<Option<i64>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => value_as_i64(v)
            .map(Some)
            .ok_or_else(|| TokenizerError::WrongType {
                key: key.to_string(),
                expected: "an integer",
                found: type_name(v),
            }),
    }
}

pub(super) fn get_bool(
    md: &HashMap<String, Value>,
    key: &str,
) -> Result<Option<bool>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "a bool",
            found: type_name(v),
        }),
    }
}

pub(super) fn get_array<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a [Value]>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "an array",
            found: type_name(v),
        }),
    }
}

pub(super) fn array_str<'a>(key: &str, v: &'a Value) -> Result<&'a str, TokenizerError> {
    match v {
        Value::String(s) => Ok(s),
        v => Err(TokenizerError::WrongType {
            key: key.to_string(),
            expected: "an array of strings",
            found: format!("an array holding {}", type_name(v)),
        }),
    }
}
