//! Tool calls: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, and the
//! `tool_calls` of an answer.
//!
//! Tools go to the model the way it was trained to see them: through its own chat template
//! (Qwen2.5 and Hermes-style templates list them in `<tools>` and expect
//! `<tool_call>{"name": …, "arguments": …}</tool_call>`; Llama 3.x templates expect a bare
//! `{"name": …, "parameters": …}`). A template that renders no tools (SmolLM2) gets them
//! described in the system message in the Hermes way. The answer is read back in the same
//! format; a call is passed on only when its name is one of the tools and its arguments fit
//! that tool's parameter schema — anything else stays text, so nothing is lost.
//!
//! Calls are drawn under a JSON grammar made from the tools' schemas, so they always parse
//! and fit (llama-server does the same with a GBNF grammar). Under `tool_choice: "auto"`
//! the grammar holds from each `<tool_call>` the model writes (a "lazy" grammar: the text
//! around calls stays free); `"required"` or a named function forces a call: its opening is
//! put at the start of the assistant's turn and the grammar holds from the first token (and
//! from each further opening, with parallel calls; the answer ends at the first text that
//! is not a call). An answer may also open with an untagged call — bare, fenced, after
//! Llama's python tag ([`ToolSet::bare_call_openings`]) — and is held from there; Llama
//! 3.x's calls have no tag at all, and such an answer is that one call. Because such calls
//! cannot go wrong, a stream sends them as they are written: the name as soon as it is
//! whole, then the arguments in fragments.

use serde_json::{json, Map, Value};
use shoal_engine::{JsonGrammar, JsonRule, PromptFormat};

use crate::error::ApiError;

/// Most tools one request may offer.
pub(crate) const MAX_TOOLS: usize = 128;

/// How the model writes a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` (Qwen2.5, Hermes, and our
    /// own description for templates without tools).
    Hermes,
    /// `{"name": …, "parameters": {…}}` as the whole answer (Llama 3.x).
    Llama3,
}

impl Format {
    /// The format a model's template teaches.
    pub(crate) fn of(format: &PromptFormat) -> Self {
        match format.template() {
            Some(t) if t.renders_tools() && !t.source().contains("<tool_call>") => {
                if t.source().contains("\"parameters\"") || t.source().contains("<|python_tag|>") {
                    Format::Llama3
                } else {
                    Format::Hermes
                }
            }
            _ => Format::Hermes,
        }
    }

    fn arguments_key(self) -> &'static str {
        match self {
            Format::Hermes => "arguments",
            Format::Llama3 => "parameters",
        }
    }

    /// What a forced answer starts with, written into the prompt.
    pub(crate) fn opening(self) -> &'static str {
        match self {
            Format::Hermes => "<tool_call>\n",
            Format::Llama3 => "",
        }
    }
}

/// One function the model may call.
#[derive(Debug)]
struct Tool {
    name: String,
    /// The parameters' JSON schema (`{"type": "object", "properties": {}}`, no arguments,
    /// when the request gives none).
    parameters: Value,
    /// The schema compiled as JSON Schema reads it ([`open_objects`]), to check arguments
    /// read back; `None` when it uses what the grammar does not support, and then any JSON
    /// object is taken.
    grammar: Option<JsonGrammar>,
}

/// Which calls the answer may or must make.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Choice {
    Auto,
    Required,
    Named(String),
}

/// A request's tools, checked.
#[derive(Debug)]
pub(crate) struct ToolSet {
    tools: Vec<Tool>,
    /// The `tools` array as the template wants it.
    rendered: Value,
    choice: Choice,
    parallel: bool,
    /// The answer's calls are drawn under the tools' grammar ([`ToolSet::call_rule`]), so a
    /// stream may send them as they come.
    live: bool,
}

/// One call the model made.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Call {
    pub(crate) id: String,
    pub(crate) name: String,
    /// The arguments as a JSON text, as OpenAI sends them.
    pub(crate) arguments: String,
}

/// An answer read back: its text and its calls.
#[derive(Debug, PartialEq)]
pub(crate) struct Parsed {
    pub(crate) content: String,
    pub(crate) calls: Vec<Call>,
}

impl ToolSet {
    /// Checks `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the model is to
    /// see no tools: none given, or `tool_choice: "none"`.
    pub(crate) fn from_request(
        tools: Option<&[Value]>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        let choice = match tool_choice {
            None => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(ApiError::invalid_value(
                        "tool_choice",
                        format!(
                            "`tool_choice` must be \"none\", \"auto\", \"required\" or a \
                             function, got {other:?}"
                        ),
                    ))
                }
            },
            Some(v @ Value::Object(_)) => match v.pointer("/function/name").and_then(Value::as_str)
            {
                Some(name) => Choice::Named(name.to_owned()),
                None => {
                    return Err(ApiError::invalid_value(
                        "tool_choice",
                        "a named `tool_choice` needs {\"type\": \"function\", \"function\": \
                         {\"name\": …}}",
                    ))
                }
            },
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "tool_choice",
                    format!("`tool_choice` must be a string or an object, got {other}"),
                ))
            }
        };
        let tools = match tools {
            None | Some([]) => {
                return match choice {
                    Choice::Auto => Ok(None),
                    _ => Err(ApiError::invalid_value(
                        "tool_choice",
                        "`tool_choice` asks for a tool call, but the request has no `tools`",
                    )),
                };
            }
            Some(tools) => tools,
        };
        if tools.len() > MAX_TOOLS {
            return Err(ApiError::invalid_value(
                "tools",
                format!("at most {MAX_TOOLS} tools are allowed, got {}", tools.len()),
            ));
        }
        let mut checked = Vec::with_capacity(tools.len());
        let mut rendered = Vec::with_capacity(tools.len());
        for (i, tool) in tools.iter().enumerate() {
            let param = format!("tools[{i}]");
            if let Some(kind) = tool.get("type").and_then(Value::as_str) {
                if kind != "function" {
                    return Err(ApiError::invalid_value(
                        &format!("{param}.type"),
                        format!("only tools of type \"function\" are supported, got {kind:?}"),
                    ));
                }
            }
            let function = tool
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| ApiError::missing_param(&format!("{param}.function")))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| ApiError::missing_param(&format!("{param}.function.name")))?;
            if checked.iter().any(|t: &Tool| t.name == name) {
                return Err(ApiError::invalid_value(
                    &format!("{param}.function.name"),
                    format!("two tools are named {name:?}"),
                ));
            }
            let parameters = match function.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(ApiError::invalid_value(
                        &format!("{param}.function.parameters"),
                        "`parameters` must be a JSON schema object",
                    ))
                }
            };
            let grammar = {
                let mut open = parameters.clone();
                open_objects(&mut open);
                JsonGrammar::from_schema(&open).ok()
            };
            let mut function = function.clone();
            function.insert("parameters".to_owned(), parameters.clone());
            rendered.push(json!({"type": "function", "function": function}));
            checked.push(Tool {
                name: name.to_owned(),
                parameters,
                grammar,
            });
        }
        if let Choice::Named(name) = &choice {
            if !checked.iter().any(|t| &t.name == name) {
                return Err(ApiError::invalid_value(
                    "tool_choice",
                    format!("`tool_choice` names {name:?}, which is not one of the tools"),
                ));
            }
        }
        Ok(Some(Self {
            tools: checked,
            rendered: Value::Array(rendered),
            choice,
            parallel: parallel.unwrap_or(true),
            live: false,
        }))
    }

    /// The `tools` list for the chat template.
    pub(crate) fn rendered(&self) -> &Value {
        &self.rendered
    }

    /// Whether the answer must be a call.
    pub(crate) fn forced(&self) -> bool {
        self.choice != Choice::Auto
    }

    /// The grammar of a forced call in `format`: the call object of one of the allowed
    /// tools, with that tool's arguments. Fails when a tool's schema cannot be compiled.
    pub(crate) fn call_grammar(&self, format: Format) -> Result<JsonGrammar, ApiError> {
        let allowed = self.tools.iter().filter(|t| match &self.choice {
            Choice::Named(name) => &t.name == name,
            _ => true,
        });
        let alternatives: Vec<Value> = allowed
            .enumerate()
            .map(|(i, t)| {
                // The tool's own `$ref`s ("#/$defs/…", "#") point into its parameters,
                // which sit inside this schema at `anyOf/i/properties/KEY`.
                let mut parameters = t.parameters.clone();
                rebase_refs(
                    &mut parameters,
                    &format!("#/anyOf/{i}/properties/{}", format.arguments_key()),
                );
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        format.arguments_key(): parameters,
                    },
                    "required": ["name", format.arguments_key()],
                    "additionalProperties": false,
                })
            })
            .collect();
        JsonGrammar::from_schema(&json!({ "anyOf": alternatives }))
            .map_err(|e| ApiError::from_engine(e, "tools"))
    }

    /// The rule the answer's calls are drawn under, when the model writes them in a form the
    /// engine can hold to a grammar: a forced answer from its start (and, with parallel
    /// calls, from each further `<tool_call>`, ending at the first text that is not a
    /// call); an `auto` Hermes answer from each `<tool_call>` it writes, and from its
    /// start when it opens with `{` (a bare call); an `auto` Llama 3.x answer when it opens
    /// with `{`. `None` when calls are read back unconstrained: tools whose schemas the
    /// grammar cannot compile (a forced call then fails instead). Marks the set live when
    /// its calls are constrained.
    pub(crate) fn call_rule(&mut self, format: Format) -> Result<Option<JsonRule>, ApiError> {
        let engine_error = |e| ApiError::from_engine(e, "tools");
        let rule = match (self.forced(), format) {
            (true, Format::Hermes) if self.parallel => Some(
                JsonRule::after_trigger(self.call_grammar(format)?, TAG_OPEN)
                    .map_err(engine_error)?
                    .from_start()
                    .only_between(TAG_CLOSE),
            ),
            (true, _) => Some(JsonRule::whole(self.call_grammar(format)?)),
            (false, Format::Hermes) => match self.call_grammar(format) {
                Ok(grammar) => {
                    let rule = JsonRule::after_trigger(grammar, TAG_OPEN)
                        .map_err(engine_error)?
                        // An answer with tools that opens with `{` is a call (small models
                        // drop the tags; llama.cpp waits for `{"name"`, but then a slip like
                        // `{{` is past mending). A JSON reply asked for with
                        // `response_format` is not under this rule.
                        .or_bare(self.bare_call_openings());
                    // `parallel_tool_calls: false` keeps one call: the answer ends with it.
                    Some(if self.parallel {
                        rule
                    } else {
                        rule.ending_after_value()
                    })
                }
                Err(e) => {
                    tracing::debug!(error = %e.message, "tool calls read back unconstrained");
                    None
                }
            },
            // Llama 3.x writes a call as the whole answer, bare JSON: held from an opening
            // `{`, and the answer ends with the call.
            (false, Format::Llama3) => match self.call_grammar(format) {
                Ok(grammar) => Some(JsonRule::bare(grammar, self.bare_call_openings())),
                Err(e) => {
                    tracing::debug!(error = %e.message, "tool calls read back unconstrained");
                    None
                }
            },
        };
        self.live = rule.is_some();
        Ok(rule)
    }

    /// The openings of an untagged call (blanks removed) from which the tools' grammar holds
    /// under `auto`: a bare `{` (which mends a small model's `{{` slip), Llama's python tag
    /// and `{`, and an object in a code fence once it names one of the tools (small models
    /// fence their calls; other fenced JSON, a `package.json`, stays free).
    fn bare_call_openings(&self) -> Vec<String> {
        let mut openings = vec!["{".to_owned(), "<|python_tag|>{".to_owned()];
        for tool in &self.tools {
            let name = Value::String(tool.name.clone()).to_string();
            for fence in ["```json", "```"] {
                openings.push(compact(&format!("{fence}{{\"name\":{name}"), usize::MAX));
            }
        }
        openings
    }

    /// Whether the answer's calls are drawn under the grammar, so a stream may send them as
    /// they are written.
    pub(crate) fn live(&self) -> bool {
        self.live
    }

    /// A system message describing the tools, for templates that render none (the Hermes
    /// wording Qwen2.5's template uses).
    pub(crate) fn description(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for tool in self.rendered.as_array().into_iter().flatten() {
            s.push('\n');
            s.push_str(&tool.to_string());
        }
        s.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
             <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        s
    }

    /// Reads an answer back into text and calls. `forced`: the answer is the inside of
    /// one call (its opening was in the prompt).
    pub(crate) fn parse(
        &self,
        text: &str,
        format: Format,
        new_id: impl FnMut() -> String,
    ) -> Parsed {
        let mut new_id = new_id;
        let mut calls = Vec::new();
        let mut content = String::new();
        // A forced answer is the inside of a call whose opening was in the prompt.
        let opened = if self.forced() {
            format!("{}{text}", format.opening())
        } else {
            String::new()
        };
        {
            let mut rest = if self.forced() { opened.as_str() } else { text };
            while let Some(open) = rest.find(TAG_OPEN) {
                content.push_str(&rest[..open]);
                let after = &rest[open + TAG_OPEN.len()..];
                // The call is the first JSON value after the tag (what the grammar holds
                // and a stream sends), whatever comes before the closing tag, or without one.
                if let Some((call, end)) = self.first_call(after, format, &mut new_id) {
                    calls.push(call);
                    let tail = after[end..].trim_start();
                    rest = tail.strip_prefix(TAG_CLOSE).unwrap_or(tail);
                    continue;
                }
                let (inside, next) = match after.find(TAG_CLOSE) {
                    Some(close) => (&after[..close], &after[close + TAG_CLOSE.len()..]),
                    None => (after, ""),
                };
                match self.call(inside, format, &mut new_id) {
                    Some(call) => calls.push(call),
                    None => content.push_str(&rest[open..rest.len() - next.len()]),
                }
                rest = next;
            }
            content.push_str(rest);
            if calls.is_empty() {
                // Small models often drop the tags, or fence the call as code.
                // Blanks as the engine and the stream gate count them (ASCII).
                let whole = content.trim_matches(|c: char| c.is_ascii_whitespace());
                // Only the openings a stream holds back (so nothing sent as text turns out
                // to have been a call).
                if opens_bare(whole) == Some(true) {
                    if let Some((untagged, after)) = self.untagged_calls(whole, format, &mut new_id)
                    {
                        calls = untagged;
                        content = after.to_owned();
                    }
                }
            }
        }
        if !self.parallel {
            calls.truncate(1);
        }
        if self.forced() {
            // The answer is its calls: text around them (a small model's chatter) goes;
            // without a call, the text stays, so nothing is lost.
            content = if calls.is_empty() {
                text.to_owned()
            } else {
                String::new()
            };
        }
        if !calls.is_empty() && content.trim().is_empty() {
            content.clear();
        }
        Parsed { content, calls }
    }

    /// The call `text` starts with (blanks aside), and where its JSON ends. A small model's
    /// doubled brace (`{{"name": …}}`, one token in Qwen's vocabulary, so the grammar can
    /// only hold the call from the second) is read past: the call is the inner object, and
    /// the extra closing brace after it, if any, is the call's too.
    fn first_call(
        &self,
        text: &str,
        format: Format,
        new_id: &mut impl FnMut() -> String,
    ) -> Option<(Call, usize)> {
        let start = text.len() - text.trim_start().len();
        let doubled = text[start..]
            .strip_prefix('{')
            .filter(|inner| inner.trim_start().starts_with('{'));
        let from = match doubled {
            Some(inner) => text.len() - inner.trim_start().len(),
            None => 0,
        };
        let object = &text[from..];
        let mut values = serde_json::Deserializer::from_str(object).into_iter::<Value>();
        let value = values.next()?.ok()?;
        let end = values.byte_offset();
        let call = self.call_value(&value, format, new_id)?;
        let call = as_written(call, object.get(..end)?, format);
        let mut end = from + end;
        if doubled.is_some() {
            let after = &text[end..];
            if let Some(closed) = after.trim_start().strip_prefix('}') {
                end = text.len() - closed.len();
            }
        }
        Some((call, end))
    }

    /// Untagged calls at the start of `text`, with nothing but blanks between them (small
    /// models make several calls that way, one per line): bare, after Llama's python tag,
    /// or in code fences, one or several to a fence (whose closing fence may be missing: a
    /// call under the grammar can end the answer where its object closes); and the text
    /// after them. `None` unless `text` starts with a call.
    fn untagged_calls<'t>(
        &self,
        text: &'t str,
        format: Format,
        new_id: &mut impl FnMut() -> String,
    ) -> Option<(Vec<Call>, &'t str)> {
        let mut calls = Vec::new();
        let mut rest = text;
        let mut in_fence = false;
        loop {
            let start = rest.trim_start();
            let body = match start.strip_prefix("```") {
                Some(closed) if in_fence => {
                    rest = closed;
                    in_fence = false;
                    continue;
                }
                Some(opened) => {
                    in_fence = true;
                    let b = opened.trim_start();
                    b.strip_prefix("json").unwrap_or(b)
                }
                None => start.strip_prefix("<|python_tag|>").unwrap_or(start),
            };
            let body = body.trim_start();
            if !body.starts_with('{') {
                break;
            }
            let Some((call, end)) = self.first_call(body, format, new_id) else {
                break;
            };
            calls.push(call);
            rest = body.get(end..).unwrap_or_default();
        }
        (!calls.is_empty()).then_some((calls, rest))
    }

    /// One call object, when it names a tool and its arguments fit.
    fn call(
        &self,
        text: &str,
        format: Format,
        new_id: &mut impl FnMut() -> String,
    ) -> Option<Call> {
        let value: Value = serde_json::from_str(text.trim()).ok()?;
        let call = self.call_value(&value, format, new_id)?;
        Some(as_written(call, text, format))
    }

    /// [`Self::call`] of a parsed object.
    fn call_value(
        &self,
        value: &Value,
        format: Format,
        new_id: &mut impl FnMut() -> String,
    ) -> Option<Call> {
        let obj = value.as_object()?;
        let name = obj.get("name")?.as_str()?;
        let tool = self.tools.iter().find(|t| t.name == name)?;
        let arguments = obj
            .get(format.arguments_key())
            .or_else(|| obj.get("arguments"))
            .or_else(|| obj.get("parameters"))
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        // Some models write the arguments as a JSON string, as the API does.
        let arguments = match arguments {
            Value::String(s) => serde_json::from_str(&s).ok()?,
            v => v,
        };
        let arguments = serde_json::to_string(&arguments).ok()?;
        let fits = match &tool.grammar {
            Some(g) => g.accepts(&arguments),
            None => arguments.starts_with('{'),
        };
        if !fits {
            tracing::debug!(tool = name, %arguments, "a tool call's arguments do not fit its schema");
            return None;
        }
        Some(Call {
            id: new_id(),
            name: name.to_owned(),
            arguments,
        })
    }
}

/// Points the local `$ref`s of `schema` ("#…") at `base`, the JSON pointer of where
/// `schema` sits inside the schema compiled.
fn rebase_refs(schema: &mut Value, base: &str) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(r) if key == "$ref" => {
                        if let Some(rest) = r.strip_prefix('#') {
                            *r = format!("{base}{rest}");
                        }
                    }
                    // Literal values are data, not schemas.
                    _ if key == "const" || key == "enum" || key == "default" => {}
                    _ => rebase_refs(value, base),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rebase_refs(v, base)),
        _ => {}
    }
}

/// `schema` read as JSON Schema reads it, for checking calls read back unconstrained: an
/// object that lists `properties` and says nothing of others takes others too (the grammar
/// a call is drawn under keeps to the listed ones, as llama.cpp's does).
fn open_objects(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    if map.contains_key("properties") && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".to_owned(), Value::Bool(true));
    }
    for (key, value) in map.iter_mut() {
        match (key.as_str(), value) {
            // Maps of names to schemas.
            ("properties" | "$defs" | "definitions" | "patternProperties", Value::Object(m)) => {
                m.values_mut().for_each(open_objects);
            }
            // Lists of schemas.
            ("anyOf" | "oneOf" | "allOf" | "prefixItems", Value::Array(items)) => {
                items.iter_mut().for_each(open_objects);
            }
            // One schema.
            ("items" | "additionalProperties" | "not" | "if" | "then" | "else", v) => {
                open_objects(v);
            }
            _ => {}
        }
    }
}

/// `call` with its arguments as the model wrote them in `object` (the call object's text),
/// as a stream sends them while they are written (and as OpenAI returns them), when they
/// are that same object.
fn as_written(mut call: Call, object: &str, format: Format) -> Call {
    let raw = scan_call(object, format.arguments_key()).arguments;
    let same = serde_json::from_str::<Value>(raw)
        .ok()
        .zip(serde_json::from_str::<Value>(&call.arguments).ok())
        .is_some_and(|(a, b)| a.is_object() && a == b);
    if same {
        call.arguments = raw.to_owned();
    }
    call
}

/// An answer read back: into text and calls when tools were offered, else all text.
pub(crate) fn read_back(
    tools: Option<&(std::sync::Arc<ToolSet>, Format)>,
    text: &str,
    new_id: impl FnMut() -> String,
) -> Parsed {
    match tools {
        Some((tools, format)) => tools.parse(text, *format, new_id),
        None => Parsed {
            content: text.to_owned(),
            calls: Vec::new(),
        },
    }
}

const TAG_OPEN: &str = "<tool_call>";
/// How an answer that is a call without the tags may open: bare JSON, JSON in a code
/// fence, Llama's python tag. (Other fenced code, a coding agent's daily bread, streams.)
/// Matched without blanks ([`compact`]), as the engine matches a rule's bare openings.
const BARE_OPENINGS: [&str; 4] = ["{", "```json", "```{", "<|python_tag|>"];

/// `text` without ASCII blanks, as far as its first `n` characters.
fn compact(text: &str, n: usize) -> String {
    text.chars()
        .filter(|c| !c.is_ascii_whitespace())
        .take(n)
        .collect()
}

/// Whether `text` (blanks aside) opens like an untagged call: `Some(true)`, `Some(false)`,
/// or `None` while it is too short to tell.
fn opens_bare(text: &str) -> Option<bool> {
    let start = compact(text, 16);
    if BARE_OPENINGS.iter().any(|o| start.starts_with(o)) {
        Some(true)
    } else if start.is_empty() || BARE_OPENINGS.iter().any(|o| o.starts_with(&start)) {
        None
    } else {
        Some(false)
    }
}
const TAG_CLOSE: &str = "</tool_call>";

/// Decides, piece by piece, which text of a streamed answer can go out as content before
/// the answer is whole: everything before a tool call's opening. Text that might be the
/// start of a call is held back until it is clear; an answer that opens like a bare call
/// (`{`, a code fence) is held back entirely, and read at the end.
///
/// A live gate ([`StreamGate::live`]) also reads the calls as they are written
/// ([`StreamGate::calls`]), for answers whose calls are drawn under the tools' grammar.
#[derive(Debug, Default)]
pub(crate) struct StreamGate {
    seen: String,
    sent: usize,
    closed: bool,
    /// Calls are read as they come: tagged ones, and one the answer opens with.
    live: bool,
    /// The key of a call's arguments in the model's format.
    arguments_key: &'static str,
    /// Where the call being written starts in `seen` (after its opening tag).
    call_at: Option<usize>,
    /// Where an answer that opens like an untagged call starts in `seen`, until it is clear
    /// whether the grammar holds it (from one of `openings`).
    opening_at: Option<usize>,
    /// The openings of an untagged call that the grammar holds ([`ToolSet::bare_call_openings`]).
    openings: Vec<String>,
    /// Where to look for the next call's opening, once a call is whole.
    next_from: Option<usize>,
    /// The calls sent so far.
    calls: Vec<LiveCall>,
}

/// A call sent while it was written.
#[derive(Debug)]
struct LiveCall {
    /// Bytes of its arguments' text sent.
    sent: usize,
    whole: bool,
}

/// A piece of a call being written, as a stream sends it: the first with the call's id and
/// name, then fragments of its arguments' text.
#[derive(Debug, PartialEq)]
pub(crate) struct CallDelta {
    pub(crate) index: usize,
    /// `(id, name)` on a call's first delta.
    pub(crate) opening: Option<(String, String)>,
    pub(crate) arguments: String,
}

impl StreamGate {
    /// A gate for an answer under `tools`, written in `format`: live when their calls are
    /// drawn under the grammar; a forced answer is a call from its first token.
    pub(crate) fn for_tools(tools: Option<(&ToolSet, Format)>) -> Self {
        let live = tools.is_some_and(|(t, _)| t.live());
        let forced = tools.is_some_and(|(t, _)| t.forced());
        Self {
            live,
            arguments_key: tools.map_or("", |(_, f)| f.arguments_key()),
            openings: tools
                .filter(|_| live)
                .map_or_else(Vec::new, |(t, _)| t.bare_call_openings()),
            // A forced answer is all calls: no content goes out as it comes.
            closed: forced,
            call_at: (live && forced).then_some(0),
            ..Self::default()
        }
    }

    /// The calls' pieces written since the last call of this (live gates only; call after
    /// [`StreamGate::push`]). A call goes out once its name is whole and one of `tools`.
    pub(crate) fn calls(
        &mut self,
        tools: &ToolSet,
        mut new_id: impl FnMut() -> String,
    ) -> Vec<CallDelta> {
        let mut out = Vec::new();
        if !self.live {
            return out;
        }
        if let Some(at) = self.opening_at {
            // As the engine decides (`JsonTracker`): an opening whole within its first
            // `MAX_LEAD` bytes.
            let start = compact(&self.seen[at..], usize::MAX);
            if self.seen.len() > shoal_engine::MAX_LEAD {
                self.opening_at = None;
            } else if self.openings.iter().any(|o| start.starts_with(o.as_str())) {
                // The call is the value from its first brace (after a fence, if any), or
                // from the second of a doubled one (as the engine holds it).
                self.call_at = self.seen[at..].find('{').map(|i| {
                    let after = &self.seen[at + i + 1..];
                    match after.trim_start().strip_prefix('{') {
                        Some(inner) => self.seen.len() - inner.len() - 1,
                        None => at + i,
                    }
                });
                self.opening_at = None;
            } else if !self.openings.iter().any(|o| o.starts_with(&start)) {
                self.opening_at = None;
            }
        }
        loop {
            if self.call_at.is_none() {
                let Some(from) = self.next_from else { break };
                let Some(open) = self.seen[from..].find(TAG_OPEN) else {
                    break;
                };
                self.call_at = Some(from + open + TAG_OPEN.len());
                self.next_from = None;
            }
            let Some(at) = self.call_at else { break };
            let scan = scan_call(&self.seen[at..], self.arguments_key);
            let Some(name) = scan
                .name
                .filter(|n| tools.tools.iter().any(|t| &t.name == n))
            else {
                break;
            };
            let index = self.calls.len() - usize::from(self.calls.last().is_some_and(|c| !c.whole));
            if index == self.calls.len() {
                // `parallel_tool_calls: false` keeps the first call.
                if index > 0 && !tools.parallel {
                    break;
                }
                out.push(CallDelta {
                    index,
                    opening: Some((new_id(), name)),
                    arguments: String::new(),
                });
                self.calls.push(LiveCall {
                    sent: 0,
                    whole: false,
                });
            }
            let Some(call) = self.calls.last_mut() else {
                break;
            };
            // Under the grammar the arguments only grow; text that was not held to it
            // (a rejected opening) could start them over, and then sends nothing more.
            if let Some(more) = scan.arguments.get(call.sent..).filter(|m| !m.is_empty()) {
                out.push(CallDelta {
                    index,
                    opening: None,
                    arguments: more.to_owned(),
                });
                call.sent = scan.arguments.len();
            }
            match scan.end {
                Some(end) => {
                    call.whole = true;
                    self.call_at = None;
                    self.next_from = Some(at + end);
                }
                None => break,
            }
        }
        out
    }

    /// How many calls went out while they were written.
    pub(crate) fn sent_calls(&self) -> usize {
        self.calls.len()
    }

    /// Whether a call that went out is unfinished (`max_tokens` cut it): the rest of the
    /// answer is that call's text, already sent as a call.
    pub(crate) fn call_cut(&self) -> bool {
        self.calls.last().is_some_and(|c| !c.whole)
    }

    /// Takes the next piece; returns the content that may be sent now.
    pub(crate) fn push(&mut self, piece: &str) -> String {
        self.seen.push_str(piece);
        if self.closed {
            return String::new();
        }
        if self.sent == 0 {
            // An answer that opens like a bare call is read whole at the end; one that is
            // still too short to tell waits.
            match opens_bare(&self.seen) {
                Some(true) => {
                    self.closed = true;
                    // A bare call is drawn under the grammar too (`JsonRule::or_bare`), from
                    // the openings `calls` looks for.
                    if self.live {
                        let start = self
                            .seen
                            .trim_start_matches(|c: char| c.is_ascii_whitespace());
                        self.opening_at = Some(self.seen.len() - start.len());
                    }
                    return String::new();
                }
                None => return String::new(),
                Some(false) => {}
            }
        }
        let open = self.seen[self.sent..].find(TAG_OPEN).map(|i| self.sent + i);
        let until = match open {
            Some(i) => {
                self.closed = true;
                if self.live {
                    self.call_at = Some(i + TAG_OPEN.len());
                }
                i
            }
            // Hold back a tail that could be the start of the tag.
            None => {
                let mut until = self.seen.len();
                for k in (1..TAG_OPEN.len()).rev() {
                    if self.seen.len() >= k
                        && self.seen.is_char_boundary(self.seen.len() - k)
                        && TAG_OPEN.starts_with(&self.seen[self.seen.len() - k..])
                    {
                        until = self.seen.len() - k;
                        break;
                    }
                }
                until
            }
        };
        if until <= self.sent {
            return String::new();
        }
        let out = self.seen[self.sent..until].to_owned();
        self.sent = until;
        out
    }

    /// The whole answer so far.
    pub(crate) fn seen(&self) -> &str {
        &self.seen
    }

    /// The content of the whole answer not yet sent, once `parsed` has read it. Sent text
    /// is always the start of the parsed content (it came before any call).
    pub(crate) fn rest(&self, parsed: &Parsed) -> String {
        parsed
            .content
            .get(self.sent.min(parsed.content.len())..)
            .unwrap_or_default()
            .to_owned()
    }
}

/// How far a call object's text has come: `{"name": …, "arguments": {…}}`, keys in either
/// order, possibly unfinished.
#[derive(Debug, Default, PartialEq)]
struct CallScan<'a> {
    /// The name, once its string is whole.
    name: Option<String>,
    /// The arguments' text so far (without blanks that may trail it).
    arguments: &'a str,
    /// Just past the object's closing brace, once it is whole.
    end: Option<usize>,
}

/// Reads a call object's text as far as it goes (`text` may start with blanks).
fn scan_call<'a>(text: &'a str, arguments_key: &str) -> CallScan<'a> {
    #[derive(PartialEq)]
    enum Expect {
        Key,
        Colon,
        Value,
        Comma,
    }
    let mut scan = CallScan::default();
    let bytes = text.as_bytes();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut expect = Expect::Key;
    let mut key = "";
    // The value of the outer object being read: its start, and where its key string began.
    let mut value_at: Option<usize> = None;
    let mut key_at = 0;
    let value_ends = |scan: &mut CallScan<'a>, key: &str, value: &'a str| {
        if key == "name" {
            scan.name = serde_json::from_str::<String>(value).ok();
        } else if key == arguments_key {
            scan.arguments = value;
        }
    };
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
                if depth == 1 {
                    match expect {
                        Expect::Key => {
                            key = text.get(key_at + 1..i).unwrap_or_default();
                            expect = Expect::Colon;
                        }
                        Expect::Value => {
                            if let Some(at) = value_at.take() {
                                value_ends(&mut scan, key, &text[at..=i]);
                            }
                            expect = Expect::Comma;
                        }
                        _ => {}
                    }
                }
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if depth == 1 && expect == Expect::Value && value_at.is_none() {
            value_at = Some(i);
        }
        match b {
            b'"' => {
                in_string = true;
                if depth == 1 && expect == Expect::Key {
                    key_at = i;
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 1 && expect == Expect::Value {
                    if let Some(at) = value_at.take() {
                        value_ends(&mut scan, key, &text[at..=i]);
                    }
                    expect = Expect::Comma;
                } else if depth == 0 {
                    if let Some(at) = value_at.take() {
                        value_ends(&mut scan, key, text[at..i].trim_end());
                    }
                    scan.end = Some(i + 1);
                    return scan;
                }
            }
            b':' if depth == 1 && expect == Expect::Colon => expect = Expect::Value,
            b',' if depth == 1 => {
                if let Some(at) = value_at.take() {
                    value_ends(&mut scan, key, text[at..i].trim_end());
                }
                expect = Expect::Key;
            }
            _ => {}
        }
    }
    // Unfinished: the arguments so far, when they are being written.
    if let Some(at) = value_at {
        if key == arguments_key {
            scan.arguments = text[at..].trim_end();
        }
    }
    scan
}

/// The `arguments` text of a call that came whole, cut into the few pieces a streamed
/// answer sends: first none (the delta with the call's id and name, as OpenAI's first one
/// and a live call's), then fragments (clients join them).
pub(crate) fn argument_fragments(arguments: &str) -> Vec<&str> {
    const PIECE: usize = 32;
    let mut out = vec![""];
    let mut rest = arguments;
    while !rest.is_empty() {
        let mut cut = rest.len().min(PIECE);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let (a, b) = rest.split_at(cut);
        out.push(a);
        rest = b;
    }
    out
}

/// The chat history in the shape templates expect: OpenAI's messages, with each call's
/// `arguments` parsed back into an object (transformers' templates write them with
/// `tojson`). For templates that render no tools, calls and results become text in the
/// Hermes way, so the model still sees what happened.
pub(crate) fn template_messages(messages: Vec<Value>, template_renders_tools: bool) -> Vec<Value> {
    messages
        .into_iter()
        .map(|mut m| {
            if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                for call in calls.iter_mut() {
                    if let Some(args) = call.pointer_mut("/function/arguments") {
                        if let Value::String(s) = args {
                            if let Ok(v) = serde_json::from_str::<Value>(s) {
                                *args = v;
                            }
                        }
                    }
                }
            }
            if template_renders_tools {
                return m;
            }
            let role = m["role"].as_str().unwrap_or_default().to_owned();
            let content = m["content"].as_str().unwrap_or_default().to_owned();
            match role.as_str() {
                "assistant" => {
                    let mut text = content;
                    for call in m["tool_calls"].as_array().into_iter().flatten() {
                        let call = json!({
                            "name": call.pointer("/function/name").cloned().unwrap_or_default(),
                            "arguments": call.pointer("/function/arguments").cloned().unwrap_or_default(),
                        });
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(&format!("{TAG_OPEN}\n{call}\n{TAG_CLOSE}"));
                    }
                    json!({"role": "assistant", "content": text})
                }
                "tool" => json!({
                    "role": "user",
                    "content": format!("<tool_response>\n{content}\n</tool_response>"),
                }),
                _ => m,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> ToolSet {
        ToolSet::from_request(Some(&[weather_json()]), None, None)
            .unwrap()
            .unwrap()
    }

    fn weather_json() -> Value {
        json!({
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"]
                }
            }
        })
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("call_{n}")
        }
    }

    #[test]
    fn hermes_calls_are_read_and_checked() {
        let t = weather();
        let p = t.parse(
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            Format::Hermes,
            ids(),
        );
        assert_eq!(p.content, "Let me look.\n");
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].name, "get_weather");
        assert_eq!(p.calls[0].arguments, r#"{"city": "Paris"}"#, "as written");

        // Wrong argument type, unknown tool, broken JSON: not calls; the text stays.
        for bad in [
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": 3}}</tool_call>",
            "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>",
        ] {
            let p = t.parse(bad, Format::Hermes, ids());
            assert!(p.calls.is_empty(), "{bad}");
            assert_eq!(p.content, bad);
        }
    }

    #[test]
    fn bare_and_llama3_calls_and_string_arguments() {
        let t = weather();
        let p = t.parse(
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\", \"days\": 2}}",
            Format::Llama3,
            ids(),
        );
        assert_eq!(p.calls[0].arguments, r#"{"city": "Oslo", "days": 2}"#);
        assert_eq!(p.content, "");
        let p = t.parse(
            "```json\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}\n```",
            Format::Hermes,
            ids(),
        );
        assert_eq!(p.calls[0].arguments, r#"{"city":"Rome"}"#);
        let p = t.parse("{\"answer\": 42}", Format::Hermes, ids());
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "{\"answer\": 42}");
    }

    #[test]
    fn a_doubled_brace_around_a_call_is_read_past() {
        // Qwen2.5-Coder under opencode wrote `{{…}}` (one token opens it, so the grammar
        // could hold the call only from the second brace).
        let t = weather();
        let call = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}";
        for text in [
            format!("{{{call}}}"),
            format!("{{ {call} }}\n"),
            // Under the grammar the answer ends where the inner object closes.
            format!("{{{call}"),
            format!("<tool_call>\n{{{call}}}\n</tool_call>"),
        ] {
            let p = t.parse(&text, Format::Hermes, ids());
            assert_eq!(p.calls.len(), 1, "{text}");
            assert_eq!(p.calls[0].arguments, r#"{"city": "Oslo"}"#, "{text}");
            assert_eq!(p.content, "", "{text}");
        }
        // Two calls, each doubled, one per line; and text after a doubled call stays.
        let p = t.parse(&format!("{{{call}}}\n{{{call}}}"), Format::Hermes, ids());
        assert_eq!(p.calls.len(), 2);
        let p = t.parse(&format!("{{{call}}} Done."), Format::Hermes, ids());
        assert_eq!((p.calls.len(), p.content.trim()), (1, "Done."));
        // A doubled brace around what is no call is text.
        let p = t.parse("{{\"answer\": 42}}", Format::Hermes, ids());
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "{{\"answer\": 42}}");
    }

    #[test]
    fn several_bare_calls_one_per_line_are_all_read() {
        let t = weather();
        let two = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
                   {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tokyo\"}}";
        let p = t.parse(two, Format::Hermes, ids());
        let cities: Vec<&str> = p.calls.iter().map(|c| c.arguments.as_str()).collect();
        assert_eq!(cities, [r#"{"city": "Paris"}"#, r#"{"city": "Tokyo"}"#]);
        assert_ne!(p.calls[0].id, p.calls[1].id);
        assert_eq!(p.content, "");
        // In one fence too.
        let fenced = format!("```json\n{two}\n```");
        assert_eq!(t.parse(&fenced, Format::Hermes, ids()).calls.len(), 2);

        // Text after the calls (an object that is no call, words, a call cut short) is
        // the answer's content; an answer that does not open with a call is all text.
        for after in [
            "\n{\"answer\": 42}",
            "\nThat is all.",
            "\n{\"name\": \"get_weather\"",
        ] {
            let p = t.parse(&format!("{two}{after}"), Format::Hermes, ids());
            assert_eq!(p.calls.len(), 2, "{after}");
            assert_eq!(p.content, after);
        }
        let mixed = format!("{{\"answer\": 42}}\n{two}");
        let p = t.parse(&mixed, Format::Hermes, ids());
        assert!(p.calls.is_empty());
        assert_eq!(p.content, mixed);
    }

    #[test]
    fn parallel_false_keeps_the_first_call() {
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        let t = ToolSet::from_request(Some(&tools), None, Some(false))
            .unwrap()
            .unwrap();
        let two = "<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>";
        assert_eq!(t.parse(two, Format::Hermes, ids()).calls.len(), 1);
        let t = ToolSet::from_request(Some(&tools), None, None)
            .unwrap()
            .unwrap();
        assert_eq!(t.parse(two, Format::Hermes, ids()).calls.len(), 2);
    }

    #[test]
    fn tool_choice_is_checked() {
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        assert!(
            ToolSet::from_request(Some(&tools), Some(&json!("none")), None)
                .unwrap()
                .is_none()
        );
        let forced = ToolSet::from_request(
            Some(&tools),
            Some(&json!({"type": "function", "function": {"name": "f"}})),
            None,
        )
        .unwrap()
        .unwrap();
        assert!(forced.forced());
        let g = forced.call_grammar(Format::Hermes).unwrap();
        assert!(g.accepts(r#"{"name": "f", "arguments": {}}"#));
        assert!(!g.accepts(r#"{"name": "g", "arguments": {}}"#));
        for (choice, tools) in [
            (json!("sometimes"), Some(&tools[..])),
            (
                json!({"type": "function", "function": {"name": "g"}}),
                Some(&tools[..]),
            ),
            (json!("required"), None),
        ] {
            assert!(
                ToolSet::from_request(tools, Some(&choice), None).is_err(),
                "{choice}"
            );
        }
        let nameless = [json!({"type": "function", "function": {}})];
        assert!(ToolSet::from_request(Some(&nameless), None, None).is_err());
    }

    /// `pieces` of an answer under `tools` through a gate, as a stream sends them: the gate,
    /// the content it let out, and the calls' pieces.
    fn stream(
        tools: &ToolSet,
        format: Format,
        pieces: &[&str],
    ) -> (StreamGate, String, Vec<CallDelta>) {
        let mut gate = StreamGate::for_tools(Some((tools, format)));
        let mut new_id = ids();
        let mut content = String::new();
        let mut deltas = Vec::new();
        for piece in pieces {
            content.push_str(&gate.push(piece));
            deltas.extend(gate.calls(tools, &mut new_id));
        }
        (gate, content, deltas)
    }

    #[test]
    fn the_stream_gate_holds_back_calls() {
        let t = weather();
        let mut gate = StreamGate::default();
        let pieces = [
            "Sure",
            ", let me check. <",
            "tool_",
            "call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ];
        let mut sent = String::new();
        let mut whole = String::new();
        for p in pieces {
            sent.push_str(&gate.push(p));
            whole.push_str(p);
        }
        assert_eq!(sent, "Sure, let me check. ");
        let parsed = t.parse(&whole, Format::Hermes, ids());
        assert_eq!(parsed.calls.len(), 1);
        assert_eq!(gate.rest(&parsed), "");

        let mut gate = StreamGate::default();
        assert_eq!(gate.push("{\"name\""), "");
        assert_eq!(gate.push(": 1}"), "");

        // A fenced call waits; other fenced code streams.
        let mut gate = StreamGate::default();
        assert_eq!(gate.push("``"), "");
        assert_eq!(gate.push("`json\n{\"name\""), "");
        let mut gate = StreamGate::default();
        assert_eq!(gate.push("```"), "");
        assert_eq!(gate.push("python\nprint(1)"), "```python\nprint(1)");

        let mut gate = StreamGate::default();
        assert_eq!(gate.push("a < b"), "a < b");
        assert_eq!(gate.push(" and <t"), " and ");
        assert_eq!(gate.push("ag>"), "<tag>");
    }

    #[test]
    fn a_call_is_scanned_as_it_is_written() {
        let whole = "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa\\\"ris\", \"days\": [1, {\"x\": 2}]}}\n</tool_call>";
        let end = whole.find("}}").unwrap() + 2;
        let mut named_at = None;
        for cut in 0..=whole.len() {
            let s = scan_call(&whole[..cut], "arguments");
            if s.name.is_some() && named_at.is_none() {
                named_at = Some(cut);
            }
            // What is read of the arguments is always the start of what they will be.
            assert!(
                "{\"city\": \"Pa\\\"ris\", \"days\": [1, {\"x\": 2}]}".starts_with(s.arguments),
                "{cut}: {:?}",
                s.arguments
            );
            assert_eq!(s.end, (cut >= end).then_some(end), "{cut}");
        }
        assert_eq!(named_at, Some(whole.find("get_weather").unwrap() + 12));
        let s = scan_call(whole, "arguments");
        assert_eq!(s.name.as_deref(), Some("get_weather"));
        let v: Value = serde_json::from_str(s.arguments).unwrap();
        assert_eq!(v["city"], "Pa\"ris");

        // Arguments first; scalar arguments; not a call at all.
        let s = scan_call(r#"{"arguments": {}, "name": "f"}"#, "arguments");
        assert_eq!(
            (s.name.as_deref(), s.arguments, s.end),
            (Some("f"), "{}", Some(30))
        );
        let s = scan_call(r#"{"name": "f", "arguments": 12 }"#, "arguments");
        assert_eq!(s.arguments, "12");
        assert_eq!(scan_call("Sure, here", "arguments"), CallScan::default());
    }

    #[test]
    fn a_live_gate_sends_calls_as_they_are_written() {
        let mut t = weather();
        assert!(t.call_rule(Format::Hermes).unwrap().is_some());
        assert!(t.live());
        let pieces = [
            "Checking. <tool_call>",
            "\n{\"name\": \"get_wea",
            "ther\", \"arguments\": {\"ci",
            "ty\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"city\": \"Rome\"},",
            " \"name\": \"get_weather\"}\n</tool_call>",
        ];
        let (gate, content, deltas) = stream(&t, Format::Hermes, &pieces);
        assert_eq!(content, "Checking. ");
        // The first call opens once its name is whole, before its arguments are.
        assert_eq!(
            deltas[0],
            CallDelta {
                index: 0,
                opening: Some(("call_1".into(), "get_weather".into())),
                arguments: String::new()
            }
        );
        let args = |i: usize| -> String {
            deltas
                .iter()
                .filter(|d| d.index == i)
                .map(|d| d.arguments.as_str())
                .collect()
        };
        assert!(
            deltas.iter().filter(|d| d.index == 0).count() >= 3,
            "{deltas:?}"
        );
        assert_eq!(args(0), r#"{"city": "Paris"}"#);
        assert_eq!(args(1), r#"{"city": "Rome"}"#);
        assert_eq!(gate.sent_calls(), 2);
        // With `parallel_tool_calls: false`, only the first.
        let mut live = ToolSet::from_request(Some(&[weather_json()]), None, Some(false))
            .unwrap()
            .unwrap();
        live.call_rule(Format::Hermes).unwrap();
        let (gate, _, sent) = stream(&live, Format::Hermes, &pieces);
        assert_eq!(gate.sent_calls(), 1, "{sent:?}");

        // A bare call opened with a doubled brace (one Qwen token) goes out as it is
        // written too, from the second brace.
        let doubled = [
            "{{",
            "\"name\": \"get_weather\", \"arg",
            "uments\": {\"city\": \"Oslo\"}}",
        ];
        let (gate, content, deltas) = stream(&t, Format::Hermes, &doubled);
        assert_eq!(content, "");
        assert_eq!(gate.sent_calls(), 1, "{deltas:?}");
        let sent: String = deltas.iter().map(|d| d.arguments.as_str()).collect();
        assert_eq!(sent, r#"{"city": "Oslo"}"#);

        // A forced answer is a call from its first token; a name that is no tool's is not
        // sent.
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        let mut forced = ToolSet::from_request(Some(&tools), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        forced.call_rule(Format::Hermes).unwrap();
        let mut gate = StreamGate::for_tools(Some((&forced, Format::Hermes)));
        assert_eq!(gate.push("{\"name\": \"g\", "), "");
        assert!(gate.calls(&forced, ids()).is_empty());
        let mut gate = StreamGate::for_tools(Some((&forced, Format::Hermes)));
        assert_eq!(gate.push("{\"name\": \"f\", \"arguments\": {}}"), "");
        assert_eq!(gate.calls(&forced, ids()).len(), 2);

        // Llama 3's bare calls under `auto` are drawn under the grammar from their `{`, and
        // sent as they come, with their `parameters` as the arguments; an answer that opens
        // otherwise is content.
        let mut bare = weather();
        assert!(bare.call_rule(Format::Llama3).unwrap().is_some());
        assert!(bare.live());
        let pieces = [
            "{\"name\": \"get_weather\", \"para",
            "meters\": {\"city",
            "\": \"Oslo\"}}",
        ];
        let (_, content, deltas) = stream(&bare, Format::Llama3, &pieces);
        assert_eq!(content, "");
        assert_eq!(
            deltas[0].opening,
            Some(("call_1".into(), "get_weather".into()))
        );
        let args: String = deltas.iter().map(|d| d.arguments.as_str()).collect();
        assert_eq!(args, r#"{"city": "Oslo"}"#);
        assert!(deltas.len() >= 3, "{deltas:?}");
        let mut gate = StreamGate::for_tools(Some((&bare, Format::Llama3)));
        assert_eq!(gate.push("Oslo is "), "Oslo is ");
        assert!(gate.calls(&bare, ids()).is_empty());

        // A fenced call (small models fence them) is held from its `"name"` on: live too,
        // and read back without its closing fence (the grammar ended the answer there).
        let pieces = [
            "```",
            "json\n{\n  \"na",
            "me\": \"get_weather\", \"parameters\": {\"city",
            "\": \"Oslo\"}}",
        ];
        let (gate, content, deltas) = stream(&bare, Format::Llama3, &pieces);
        assert_eq!(content, "");
        let args: String = deltas.iter().map(|d| d.arguments.as_str()).collect();
        assert_eq!(args, r#"{"city": "Oslo"}"#);
        let parsed = bare.parse(gate.seen(), Format::Llama3, ids());
        assert_eq!((parsed.calls.len(), parsed.content.as_str()), (1, ""));
        // Other fenced JSON is not a call, and goes out whole at the end.
        for other in [
            "```json\n{\"cities\": [",
            "```json\n{\n  \"name\": \"my-app\",",
        ] {
            let mut gate = StreamGate::for_tools(Some((&bare, Format::Llama3)));
            gate.push(other);
            assert!(gate.calls(&bare, ids()).is_empty());
            assert!(gate.opening_at.is_none(), "{other}: no longer looked for");
        }
        // Blanks inside the fence, and Llama's python tag where the text keeps it.
        for opening in [
            "``` json\n\n{ \"name\" :\"get_weather\"",
            "<|python_tag|>{\"name\": \"get_weather\"",
        ] {
            let mut gate = StreamGate::for_tools(Some((&bare, Format::Llama3)));
            assert_eq!(gate.push(opening), "");
            assert_eq!(gate.push(", \"parameters\": {\"city\": \"Oslo\"}}"), "");
            assert_eq!(gate.calls(&bare, ids()).len(), 2, "{opening}");
            assert_eq!(
                bare.parse(gate.seen(), Format::Llama3, ids()).calls.len(),
                1
            );
        }
        // An opening must be whole within the engine's MAX_LEAD bytes, as there.
        let mut gate = StreamGate::for_tools(Some((&bare, Format::Llama3)));
        gate.push(&" ".repeat(shoal_engine::MAX_LEAD));
        gate.push("{\"name\": \"get_weather\", \"parameters\": {}}");
        assert!(gate.calls(&bare, ids()).is_empty());
    }

    #[test]
    fn a_call_is_the_first_value_after_its_tag() {
        let t = weather();
        let call = r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
        // No closing tag (cut, or a model that leaves it out); text before the closing tag;
        // a bare call with words after it.
        // Fenced calls, closed or not (the grammar may end the answer at the object's end).
        for (text, content, n) in [
            (format!("<tool_call>\n{call}"), "", 1),
            (
                format!("<tool_call>\n{call} done</tool_call>\nOK"),
                "done</tool_call>\nOK",
                1,
            ),
            (
                format!("{call}\nThat is the call."),
                "\nThat is the call.",
                1,
            ),
            (format!("```json\n{call}\n```\nDone."), "\nDone.", 1),
            (format!("```json\n{call}\n```\n```json\n{call}"), "", 2),
            // Several calls in one fence, closed or not, and text after them.
            (format!("```json\n{call}\n{call}\n```\nDone."), "\nDone.", 2),
            (format!("```\n{call}\n{call}\nDone."), "\nDone.", 2),
            // The python tag inside a fence, and a fence after it.
            (
                format!("```json\n{call}\n<|python_tag|>{call}\n```\n```json\n{call}\n```"),
                "",
                3,
            ),
            // A fence or tag with no call in it ends the calls, and is content.
            (
                format!("{call}\n```python\nprint(1)\n```"),
                "```python\nprint(1)\n```",
                1,
            ),
            (
                format!("{call}\n<|python_tag|>print(1)"),
                "<|python_tag|>print(1)",
                1,
            ),
        ] {
            let p = t.parse(&text, Format::Hermes, ids());
            assert_eq!(p.calls.len(), n, "{text}");
            assert_eq!(p.calls[0].arguments, r#"{"city": "Oslo"}"#);
            assert_eq!(p.content.trim(), content.trim(), "{text}");
        }
    }

    #[test]
    fn tool_schemas_with_refs_compile_into_the_call_grammar() {
        // Pydantic's nested models: `$defs` and references into them, and recursion to the
        // parameters' own root.
        let tools = [
            json!({"type": "function", "function": {"name": "move", "parameters": {
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/Point"}, "via": {"type": "array", "items": {"$ref": "#/$defs/Point"}}},
                "required": ["to"],
                "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}
            }}}),
            json!({"type": "function", "function": {"name": "tree", "parameters": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
                "required": ["v"]
            }}}),
        ];
        let t = ToolSet::from_request(Some(&tools), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        let g = t
            .call_grammar(Format::Hermes)
            .expect("the references resolve");
        assert!(g.accepts(
            r#"{"name": "move", "arguments": {"to": {"x": 1, "y": 2}, "via": [{"x": 0, "y": 0}]}}"#
        ));
        assert!(!g.accepts(r#"{"name": "move", "arguments": {"to": {"x": "1", "y": 2}}}"#));
        assert!(
            g.accepts(r#"{"name": "tree", "arguments": {"v": 1, "kids": [{"v": 2, "kids": []}]}}"#)
        );
        assert!(!g.accepts(r#"{"name": "tree", "arguments": {"v": 1, "kids": [{"w": 2}]}}"#));
    }

    #[test]
    fn calls_read_back_unconstrained_are_checked_as_json_schema_reads_them() {
        // A tool whose schema the grammar cannot compile leaves every call unconstrained; a
        // call with an argument its schema does not list still fits (JSON Schema allows it).
        let tools = [
            weather_json(),
            json!({"type": "function", "function": {"name": "g", "parameters": {"allOf": [{}, {}]}}}),
        ];
        let mut t = ToolSet::from_request(Some(&tools), None, None)
            .unwrap()
            .unwrap();
        assert!(
            t.call_rule(Format::Hermes).unwrap().is_none(),
            "unconstrained"
        );
        let p = t.parse(
            r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>"#,
            Format::Hermes,
            ids(),
        );
        assert_eq!(p.calls.len(), 1);
        // Still checked: a wrong type is not a call.
        let p = t.parse(
            r#"<tool_call>{"name": "get_weather", "arguments": {"city": 3}}</tool_call>"#,
            Format::Hermes,
            ids(),
        );
        assert!(p.calls.is_empty());
    }

    #[test]
    fn a_forced_answer_with_parallel_calls_is_all_its_calls() {
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        let t = ToolSet::from_request(Some(&tools), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        let p = t.parse(
            "{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\nBye",
            Format::Hermes,
            ids(),
        );
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.content, "");
        let p = t.parse("not a call", Format::Hermes, ids());
        assert_eq!((p.calls.len(), p.content.as_str()), (0, "not a call"));
    }

    #[test]
    fn history_is_shaped_for_templates() {
        let history = vec![
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
        ];
        let shaped = template_messages(history.clone(), true);
        assert_eq!(
            shaped[1]["tool_calls"][0]["function"]["arguments"]["city"],
            "Paris"
        );
        let plain = template_messages(history, false);
        assert!(plain[1]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_call>"));
        assert_eq!(plain[2]["role"], "user");
        assert!(plain[2]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_response>\nsunny"));
    }
}
