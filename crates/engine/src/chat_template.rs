//! The model's chat template (`tokenizer.chat_template`), rendered with minijinja the way
//! Hugging Face transformers renders it with Jinja2: `trim_blocks` and `lstrip_blocks` on,
//! Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...), and the helpers
//! templates call: `raise_exception`, `strftime_now` and a Python-compatible `tojson`.

use std::collections::HashMap;
use std::fmt::Write as _;

use candle_core::quantized::gguf_file::Value as GgufValue;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use crate::metadata::{get_array, get_int, get_str};

const TEMPLATE_NAME: &str = "chat";

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The GGUF file has no `tokenizer.chat_template`.
    #[error(
        "the GGUF file has no `tokenizer.chat_template`; use a model with a chat template or \
         send raw prompts (completions) instead of chat messages"
    )]
    MissingTemplate,
    /// A metadata key has an unexpected type.
    #[error("GGUF metadata key `{0}` has an unexpected type")]
    BadMetadata(String),
    /// The template does not parse.
    #[error("the chat template does not compile: {0:#}")]
    Compile(#[source] Error),
    /// The template failed while rendering (including `raise_exception` from the template).
    #[error("the chat template failed to render: {0:#}")]
    Render(#[source] Error),
}

/// One chat message.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A compiled chat template with the model's BOS/EOS token strings.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Loads `tokenizer.chat_template` and the BOS/EOS token strings from GGUF metadata.
    pub fn from_gguf_metadata(md: &HashMap<String, GgufValue>) -> Result<Self, ChatTemplateError> {
        let source = match get_str(md, "tokenizer.chat_template") {
            Ok(Some(source)) => source,
            Ok(None) => return Err(ChatTemplateError::MissingTemplate),
            Err(w) => return Err(ChatTemplateError::BadMetadata(w.key)),
        };
        // The special tokens' text, for templates that use `bos_token`/`eos_token`; a
        // missing or malformed entry gives an empty string, as the template may not need it.
        let tokens = get_array(md, "tokenizer.ggml.tokens")
            .ok()
            .flatten()
            .unwrap_or(&[]);
        let token_str = |key: &str| -> String {
            let id = get_int(md, key)
                .ok()
                .flatten()
                .and_then(|i| usize::try_from(i).ok());
            match id.and_then(|i| tokens.get(i)) {
                Some(GgufValue::String(s)) => s.clone(),
                _ => String::new(),
            }
        };
        let bos = token_str("tokenizer.ggml.bos_token_id");
        let eos = token_str("tokenizer.ggml.eos_token_id");
        Self::from_source(source, &bos, &eos)
    }

    /// Compiles a template from its source.
    pub fn from_source(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(ChatTemplateError::Compile)?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the messages; with `add_generation_prompt`, the template's opening of an
    /// assistant turn is appended.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with(
            Value::from_serialize(messages),
            Value::from(()),
            add_generation_prompt,
            None,
        )
    }

    /// Renders messages given as JSON objects in OpenAI's shape — with `tool_calls` on
    /// assistant messages and `tool_call_id` on tool results — and the `tools` the model may
    /// call (`[{"type": "function", "function": {...}}]`, what transformers passes), for
    /// templates that render tools themselves. `variables` (a JSON object) are more of the
    /// template's variables — llama-server's `chat_template_kwargs`, such as Qwen3's
    /// `enable_thinking` or Llama 3.1's `date_string`; they cannot replace the messages,
    /// tools or special tokens.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        variables: Option<&serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let tools = tools.map_or(Value::from(()), Value::from_serialize);
        self.render_with(
            Value::from_serialize(messages),
            tools,
            add_generation_prompt,
            variables.map(Value::from_serialize),
        )
    }

    /// Whether the template renders a `tools` list at all (Qwen2.5, Llama 3.x, Hermes do;
    /// SmolLM2 does not, and a request's tools must then be described in the prompt).
    pub fn renders_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The template's own text, for telling the tool-call formats apart.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn render_with(
        &self,
        messages: Value,
        tools: Value,
        add_generation_prompt: bool,
        variables: Option<Value>,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Compile)?;
        let ours = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => tools,
            documents => Value::from(()),
        };
        // The last map's keys win: a caller's variables add to ours, never replace them.
        let context = match variables {
            Some(more) => minijinja::value::merge_maps([more, ours]),
            None => ours,
        };
        tmpl.render(context).map_err(ChatTemplateError::Render)
    }

    /// The BOS token string the template sees.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS token string the template sees.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers (its
/// AssistantTracker extension), which only mark assistant text and render nothing.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let (before, tag) = rest.split_at(open);
        out.push_str(before);
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = tag[2..close].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if inner == "generation" || inner == "endgeneration" {
            // Keep the whitespace control of the removed tag out of the picture.
        } else {
            out.push_str(&tag[..close + 2]);
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised an exception: {message}"),
    ))
}

/// `strftime_now(format)`: the current UTC time formatted with C `strftime` codes.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(strftime(&format, secs)))
}

/// Formats a UNIX time (UTC) with the common C `strftime` codes.
fn strftime(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_secs / 86_400;
    let tod = unix_secs % 86_400;
    let (hour, minute, second) = (tod / 3600, (tod / 60) % 60, tod % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = DAYS[(days % 7) as usize];
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') | Some('h') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, as transformers' `tojson` filter (keyword arguments as there).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => v.as_str().map(str::to_string),
        Some(v) => {
            let n = i64::try_from(v)?;
            Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item(&Value::from(0))?;
            let b = s.get_item(&Value::from(1))?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn newline_indent(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&python_float(f64::try_from(v.clone())?));
            }
        }
        ValueKind::String | ValueKind::Plain => {
            write_json_str(&v.to_string(), opts.ensure_ascii, out)
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                let key = if k.kind() == ValueKind::String {
                    k.as_str().unwrap_or_default().to_string()
                } else {
                    let mut s = String::new();
                    write_json(k, opts, level + 1, &mut s)?;
                    s
                };
                write_json_str(&key, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(&v.get_item(k)?, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {}", v.kind()),
            ))
        }
    }
    Ok(())
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7E => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside 1e-4..1e16.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn template_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync>() {}
        check::<ChatTemplate>();
        check::<ChatMessage>();
    }

    #[test]
    fn generation_prompt_is_appended() -> Result<(), ChatTemplateError> {
        let t = ChatTemplate::from_source(CHATML, "<s>", "</s>")?;
        let msgs = [msg("user", "hi")];
        assert_eq!(t.render(&msgs, false)?, "<|im_start|>user\nhi<|im_end|>\n");
        assert_eq!(
            t.render(&msgs, true)?,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }

    #[test]
    fn raise_exception_is_an_error() -> Result<(), ChatTemplateError> {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok";
        let t = ChatTemplate::from_source(src, "", "")?;
        assert_eq!(t.render(&[msg("user", "x")], true)?, "ok");
        let err = t.render(&[msg("assistant", "x")], true);
        match err {
            Err(ChatTemplateError::Render(e)) => {
                assert!(format!("{e:#}").contains("first message must be from the user"))
            }
            other => panic!("expected a render error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn trim_and_lstrip_blocks_python_methods_and_tokens() -> Result<(), ChatTemplateError> {
        let src = "{{ bos_token }}\n  {% for m in messages %}\n    {{ m.content.strip().upper() }}{% if m.role.startswith('us') %}!{% endif %}\n  {% endfor %}{{ eos_token }}";
        let t = ChatTemplate::from_source(src, "<s>", "</s>")?;
        assert_eq!(
            t.render(&[msg("user", "  hi  ")], false)?,
            "<s>\n    HI!</s>"
        );
        Ok(())
    }

    #[test]
    fn tojson_is_python_like() -> Result<(), ChatTemplateError> {
        let src = "{{ {'a': [1, 2.5, 'é\"'], 'b': none, 'c': true} | tojson }}|{{ [1e20, 0.0001, 1.0] | tojson }}|{{ {'x': 1} | tojson(indent=2) }}";
        let t = ChatTemplate::from_source(src, "", "")?;
        assert_eq!(
            t.render(&[], false)?,
            "{\"a\": [1, 2.5, \"é\\\"\"], \"b\": null, \"c\": true}|[1e+20, 0.0001, 1.0]|{\n  \"x\": 1\n}"
        );
        Ok(())
    }

    #[test]
    fn variables_add_to_the_context_and_replace_nothing() -> Result<(), ChatTemplateError> {
        let t = ChatTemplate::from_source(
            "{{ x }}|{{ messages | length }}|{{ bos_token }}|{{ add_generation_prompt }}",
            "<s>",
            "</s>",
        )?;
        let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
        let variables = serde_json::json!({"x": 5, "messages": [], "bos_token": "no",
                                           "add_generation_prompt": false});
        assert_eq!(
            t.render_json(&messages, None, true, Some(&variables))?,
            "5|1|<s>|True"
        );
        assert_eq!(t.render_json(&messages, None, true, None)?, "|1|<s>|True");
        Ok(())
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %A %j", t),
            "26 Jul 2024 13:05:09 Friday 208"
        );
    }

    #[test]
    fn generation_tags_are_removed() {
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}"),
            "abc{% if x %}"
        );
    }
}
