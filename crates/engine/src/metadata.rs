//! Reading GGUF metadata by key: one getter per kind of value, an absent key as `None`, a
//! value of another kind as a [`WrongType`] that names the key. The model's shape
//! (`config`) and its tokenizer both read their keys here.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

/// A metadata key holds a value of another kind than its reader expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WrongType {
    pub(crate) key: String,
    pub(crate) expected: &'static str,
    pub(crate) found: String,
}

fn wrong(key: &str, expected: &'static str, found: String) -> WrongType {
    WrongType {
        key: key.to_string(),
        expected,
        found,
    }
}

pub(crate) fn type_name(v: &Value) -> String {
    format!("{:?}", v.value_type())
}

pub(crate) fn get_str<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, WrongType> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong(key, "a string", type_name(v))),
    }
}

pub(crate) fn value_as_i64(v: &Value) -> Option<i64> {
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

pub(crate) fn get_int(md: &HashMap<String, Value>, key: &str) -> Result<Option<i64>, WrongType> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => value_as_i64(v)
            .map(Some)
            .ok_or_else(|| wrong(key, "an integer", type_name(v))),
    }
}

pub(crate) fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>, WrongType> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong(key, "a bool", type_name(v))),
    }
}

pub(crate) fn get_array<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a [Value]>, WrongType> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(wrong(key, "an array", type_name(v))),
    }
}

pub(crate) fn array_str<'a>(key: &str, v: &'a Value) -> Result<&'a str, WrongType> {
    match v {
        Value::String(s) => Ok(s),
        v => Err(wrong(
            key,
            "an array of strings",
            format!("an array holding {}", type_name(v)),
        )),
    }
}

/// A float (`f32` or `f64`).
pub(crate) fn get_float(md: &HashMap<String, Value>, key: &str) -> Result<Option<f64>, WrongType> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(v) => Err(wrong(key, "a float", type_name(v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md() -> HashMap<String, Value> {
        HashMap::from([
            ("s".to_owned(), Value::String("x".into())),
            ("n".to_owned(), Value::U32(7)),
            ("neg".to_owned(), Value::I16(-3)),
            ("f".to_owned(), Value::F32(0.5)),
            ("b".to_owned(), Value::Bool(true)),
            (
                "a".to_owned(),
                Value::Array(vec![Value::String("t".into()), Value::U8(1)]),
            ),
        ])
    }

    #[test]
    fn each_kind_is_read_and_absent_keys_are_none() {
        let md = md();
        assert_eq!(get_str(&md, "s"), Ok(Some("x")));
        assert_eq!(get_int(&md, "n"), Ok(Some(7)));
        assert_eq!(get_int(&md, "neg"), Ok(Some(-3)));
        assert_eq!(get_float(&md, "f"), Ok(Some(0.5)));
        assert_eq!(get_bool(&md, "b"), Ok(Some(true)));
        assert_eq!(
            get_array(&md, "a").map(|a| a.map(<[Value]>::len)),
            Ok(Some(2))
        );
        assert_eq!(get_str(&md, "missing"), Ok(None));
        assert_eq!(get_float(&md, "missing"), Ok(None));
    }

    #[test]
    fn a_value_of_another_kind_names_the_key() {
        let md = md();
        let e = get_int(&md, "s").unwrap_err();
        assert_eq!((e.key.as_str(), e.expected), ("s", "an integer"));
        assert_eq!(get_float(&md, "n").unwrap_err().expected, "a float");
        assert_eq!(get_str(&md, "b").unwrap_err().expected, "a string");
        let items = get_array(&md, "a").ok().flatten().unwrap_or(&[]);
        assert_eq!(array_str("a", &items[0]), Ok("t"));
        let e = array_str("a", &items[1]).unwrap_err();
        assert!(e.found.starts_with("an array holding"), "{e:?}");
    }
}
