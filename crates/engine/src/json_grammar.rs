//! Answers that must be JSON — `response_format` `json_object` / `json_schema`, a forced
//! tool call's arguments — drawn so that the text always parses, and has the schema's shape
//! where one is given (what llama.cpp does with a GBNF grammar built from the schema).
//!
//! The schema is compiled into a small graph of [`Node`]s; a pushdown machine reads the
//! answer byte by byte (tokens are byte strings, and a token may end inside a character).
//! `anyOf`, `enum`, `type: [..]` and a plain "any value" are alternatives the machine
//! follows side by side until the bytes tell them apart, so the machine's state is a small
//! set of stacks.
//!
//! Sampling follows llama.cpp: the sampler draws as usual, and only when the drawn token
//! would break the JSON is it struck out and the draw repeated; after a few misses every
//! token of the vocabulary is checked once and the draw made from those that fit
//! ([`JsonConstraint::mask`]). End-of-generation is allowed only once the value is whole.
//!
//! Supported schema keywords: `type` (one or several), `properties`, `required`,
//! `additionalProperties` (absent beside `properties`: no other keys, as llama.cpp reads
//! it), `items`, `minItems`, `maxItems`, `minLength`, `maxLength` (characters, an escape
//! counting as one), `enum`, `const`, `anyOf`, `oneOf`, a one-element `allOf` (not read
//! beside `properties`, as in llama.cpp), and `$ref` (any JSON pointer into the schema,
//! array indices included; recursion too).
//! String `pattern` and `format`, and numeric ranges, are not enforced: the text is valid
//! JSON of the right type there, not more.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// Deepest nesting an answer may reach (objects and arrays), which also bounds recursion
/// through `$ref`.
const MAX_DEPTH: usize = 48;
/// Most schema nodes one schema may compile to.
const MAX_NODES: usize = 4096;
/// Most alternatives followed at once; more are dropped (the first ones are kept).
const MAX_ALTERNATIVES: usize = 64;
/// Whitespace allowed in a row between tokens of the JSON, of which one newline at most:
/// enough for pretty printing (a newline and the indent of ten levels), not enough for a
/// model to spend its answer on blanks (llama.cpp's JSON grammars allow a newline and 20
/// blanks).
const MAX_WHITESPACE_RUN: u16 = 24;
/// Most digits of an integer: every such number fits in an `i64`.
const MAX_INTEGER_DIGITS: u8 = 18;
/// Draws tried and struck out before every token is checked.
const TRIES_BEFORE_FULL_SCAN: usize = 4;

type NodeId = usize;

/// What a value must look like.
#[derive(Clone, Debug)]
enum Node {
    /// Object with these properties (keys JSON-escaped, without quotes); `additional`:
    /// the node of any other key's value, `None` when no other key is allowed.
    Object {
        props: Vec<(Vec<u8>, NodeId)>,
        required: Vec<usize>,
        additional: Option<NodeId>,
    },
    Array {
        items: NodeId,
        min: usize,
        max: Option<usize>,
    },
    /// A string of `min` to `max` characters.
    String {
        min: u32,
        max: Option<u32>,
    },
    Number {
        integer: bool,
    },
    /// Exactly these bytes (a `const`, an `enum` member, `true`, `false`, `null`).
    Literal(Vec<u8>),
    /// Any one of these.
    OneOf(Vec<NodeId>),
    /// A `$ref` not yet resolved while compiling; never left in a finished grammar.
    Pending,
}

// The nodes every grammar starts with.
const ANY: NodeId = 0;
const ANY_OBJECT: NodeId = 1;
const ANY_ARRAY: NodeId = 2;
const STRING: NodeId = 3;
const NUMBER: NodeId = 4;
const INTEGER: NodeId = 5;
const TRUE: NodeId = 6;
const FALSE: NodeId = 7;
const NULL: NodeId = 8;
const BOOLEAN: NodeId = 9;

/// A compiled JSON schema (or "any JSON value"), shared by the generations that use it.
#[derive(Clone, Debug)]
pub struct JsonGrammar {
    nodes: Arc<Vec<Node>>,
    root: NodeId,
    /// The schema it was compiled from, as JSON text; `None` for any object. What
    /// [`JsonGrammar::wire_text`] sends to a pipeline's last stage.
    source: Option<Arc<str>>,
}

impl JsonGrammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`: OpenAI's JSON mode
    /// answers with an object).
    pub fn any_object() -> Self {
        Self {
            nodes: Arc::new(base_nodes()),
            root: ANY_OBJECT,
            source: None,
        }
    }

    /// The grammar as text another process compiles it from with
    /// [`JsonGrammar::from_wire_text`]: the schema's JSON, or empty for any object.
    pub fn wire_text(&self) -> &str {
        self.source.as_deref().unwrap_or("")
    }

    /// The grammar [`JsonGrammar::wire_text`] describes.
    pub fn from_wire_text(text: &str) -> Result<Self> {
        if text.is_empty() {
            return Ok(Self::any_object());
        }
        let schema: Value = serde_json::from_str(text).map_err(|e| {
            EngineError::InvalidInput(format!("the JSON schema does not parse: {e}"))
        })?;
        Self::from_schema(&schema)
    }

    /// Compiles a JSON schema; fails with a message naming what is not supported.
    pub fn from_schema(schema: &Value) -> Result<Self> {
        let mut c = Compiler {
            nodes: base_nodes(),
            root: schema,
            refs: HashMap::new(),
        };
        let root = c.compile(schema, 0)?;
        Ok(Self {
            nodes: Arc::new(c.nodes),
            root,
            source: Some(schema.to_string().into()),
        })
    }

    /// Whether `text` is a whole value this grammar accepts (whitespace around allowed).
    pub fn accepts(&self, text: &str) -> bool {
        let mut state = self.start();
        text.bytes().all(|b| state.feed(b)) && state.can_end()
    }

    fn start(&self) -> MachineState {
        MachineState {
            grammar: self.clone(),
            stacks: vec![Stack {
                frames: vec![Frame::Value(self.root)],
                blanks: 0,
                newline: false,
            }],
        }
    }
}

fn base_nodes() -> Vec<Node> {
    let mut nodes = vec![Node::Pending; 10];
    nodes[ANY] = Node::OneOf(vec![
        ANY_OBJECT, ANY_ARRAY, STRING, NUMBER, TRUE, FALSE, NULL,
    ]);
    nodes[ANY_OBJECT] = Node::Object {
        props: Vec::new(),
        required: Vec::new(),
        additional: Some(ANY),
    };
    nodes[ANY_ARRAY] = Node::Array {
        items: ANY,
        min: 0,
        max: None,
    };
    nodes[STRING] = Node::String { min: 0, max: None };
    nodes[NUMBER] = Node::Number { integer: false };
    nodes[INTEGER] = Node::Number { integer: true };
    nodes[TRUE] = Node::Literal(b"true".to_vec());
    nodes[FALSE] = Node::Literal(b"false".to_vec());
    nodes[NULL] = Node::Literal(b"null".to_vec());
    nodes[BOOLEAN] = Node::OneOf(vec![TRUE, FALSE]);
    nodes
}

struct Compiler<'s> {
    nodes: Vec<Node>,
    root: &'s Value,
    refs: HashMap<String, NodeId>,
}

fn unsupported(what: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidInput(format!("JSON schema: {what}"))
}

impl<'s> Compiler<'s> {
    fn push(&mut self, node: Node) -> Result<NodeId> {
        if self.nodes.len() >= MAX_NODES {
            return Err(unsupported(format!(
                "the schema is too large (more than {MAX_NODES} parts)"
            )));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn compile(&mut self, schema: &'s Value, depth: usize) -> Result<NodeId> {
        if depth > MAX_DEPTH {
            return Err(unsupported("the schema is nested too deeply"));
        }
        let obj = match schema {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return Err(unsupported("`false` accepts no value")),
            Value::Object(obj) => obj,
            other => {
                return Err(unsupported(format!(
                    "a schema must be an object, got {other}"
                )))
            }
        };
        if let Some(reference) = obj.get("$ref") {
            return self.reference(reference, depth);
        }
        if let Some(value) = obj.get("const") {
            return self.push(Node::Literal(compact(value)));
        }
        if let Some(values) = obj.get("enum") {
            let Value::Array(values) = values else {
                return Err(unsupported("`enum` must be an array"));
            };
            if values.is_empty() {
                return Err(unsupported("`enum` is empty"));
            }
            let mut alts = Vec::with_capacity(values.len());
            for v in values {
                alts.push(self.push(Node::Literal(compact(v)))?);
            }
            return self.push(Node::OneOf(alts));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = obj.get(key) {
                let Value::Array(list) = list else {
                    return Err(unsupported(format!("`{key}` must be an array")));
                };
                if list.is_empty() {
                    return Err(unsupported(format!("`{key}` is empty")));
                }
                let mut alts = Vec::with_capacity(list.len());
                for s in list {
                    alts.push(self.compile(s, depth + 1)?);
                }
                return self.push(Node::OneOf(alts));
            }
        }
        // Beside `properties`, an `allOf` is not read (llama.cpp's order: the listed
        // properties make the object).
        if let (Some(list), false) = (obj.get("allOf"), obj.contains_key("properties")) {
            return match list {
                Value::Array(list) if list.len() == 1 => self.compile(&list[0], depth + 1),
                _ => Err(unsupported(
                    "`allOf` with more than one schema is not supported",
                )),
            };
        }
        match obj.get("type") {
            None if obj.contains_key("properties") => self.typed("object", obj, depth),
            None if obj.contains_key("items") => self.typed("array", obj, depth),
            None => Ok(ANY),
            Some(Value::String(t)) => self.typed(t, obj, depth),
            Some(Value::Array(types)) => {
                let mut alts = Vec::with_capacity(types.len());
                for t in types {
                    let Value::String(t) = t else {
                        return Err(unsupported("`type` entries must be strings"));
                    };
                    alts.push(self.typed(t, obj, depth)?);
                }
                if alts.is_empty() {
                    return Err(unsupported("`type` is an empty list"));
                }
                self.push(Node::OneOf(alts))
            }
            Some(other) => Err(unsupported(format!("`type` must be a string, got {other}"))),
        }
    }

    fn typed(
        &mut self,
        kind: &str,
        obj: &'s serde_json::Map<String, Value>,
        depth: usize,
    ) -> Result<NodeId> {
        match kind {
            "string" => {
                let length = |key: &str| -> Result<Option<u32>> {
                    match obj.get(key) {
                        None => Ok(None),
                        Some(v) => v
                            .as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .map(Some)
                            .ok_or_else(|| unsupported(format!("`{key}` must be a count"))),
                    }
                };
                let min = length("minLength")?.unwrap_or(0);
                let max = length("maxLength")?;
                if max.is_some_and(|max| max < min) {
                    return Err(unsupported("`maxLength` is below `minLength`"));
                }
                if min == 0 && max.is_none() {
                    return Ok(STRING);
                }
                self.push(Node::String { min, max })
            }
            "number" => Ok(NUMBER),
            "integer" => Ok(INTEGER),
            "boolean" => Ok(BOOLEAN),
            "null" => Ok(NULL),
            "object" => {
                let mut props = Vec::new();
                if let Some(p) = obj.get("properties") {
                    let Value::Object(p) = p else {
                        return Err(unsupported("`properties` must be an object"));
                    };
                    for (key, sub) in p {
                        let node = self.compile(sub, depth + 1)?;
                        props.push((escaped_key(key), node));
                    }
                }
                let mut required = Vec::new();
                if let Some(r) = obj.get("required") {
                    let Value::Array(r) = r else {
                        return Err(unsupported("`required` must be an array"));
                    };
                    for name in r {
                        let Value::String(name) = name else {
                            return Err(unsupported("`required` entries must be strings"));
                        };
                        let key = escaped_key(name);
                        match props.iter().position(|(k, _)| *k == key) {
                            Some(i) if !required.contains(&i) => required.push(i),
                            Some(_) => {}
                            None => {
                                // A required key with no schema of its own: any value.
                                props.push((key, ANY));
                                required.push(props.len() - 1);
                            }
                        }
                    }
                }
                let additional = match obj.get("additionalProperties") {
                    // As llama.cpp's schema converter does (so Ollama's `format` and
                    // llama-server's `json_schema` answer the same): an object that lists its
                    // properties takes no others unless the schema says so. JSON Schema would
                    // allow any, and a small model then pads the answer with keys of its own.
                    // (`patternProperties`, which is not enforced, keeps others allowed.)
                    None if obj.contains_key("properties")
                        && !obj.contains_key("patternProperties") =>
                    {
                        None
                    }
                    None | Some(Value::Bool(true)) => Some(ANY),
                    Some(Value::Bool(false)) => None,
                    Some(s) => Some(self.compile(s, depth + 1)?),
                };
                self.push(Node::Object {
                    props,
                    required,
                    additional,
                })
            }
            "array" => {
                let items = match obj.get("items") {
                    None => ANY,
                    Some(s) => self.compile(s, depth + 1)?,
                };
                let count = |key: &str| -> Result<Option<usize>> {
                    match obj.get(key) {
                        None => Ok(None),
                        Some(v) => v
                            .as_u64()
                            .and_then(|n| usize::try_from(n).ok())
                            .map(Some)
                            .ok_or_else(|| unsupported(format!("`{key}` must be a count"))),
                    }
                };
                let min = count("minItems")?.unwrap_or(0);
                let max = count("maxItems")?;
                if max.is_some_and(|max| max < min) {
                    return Err(unsupported("`maxItems` is below `minItems`"));
                }
                self.push(Node::Array { items, min, max })
            }
            other => Err(unsupported(format!("unknown type `{other}`"))),
        }
    }

    fn reference(&mut self, reference: &'s Value, depth: usize) -> Result<NodeId> {
        let Value::String(path) = reference else {
            return Err(unsupported("`$ref` must be a string"));
        };
        if let Some(&id) = self.refs.get(path.as_str()) {
            return Ok(id);
        }
        let target = if path == "#" {
            Some(self.root)
        } else {
            path.strip_prefix("#/").and_then(|p| {
                p.split('/').try_fold(self.root, |v, part| {
                    let part = part.replace("~1", "/").replace("~0", "~");
                    match v {
                        Value::Array(items) => {
                            part.parse::<usize>().ok().and_then(|i| items.get(i))
                        }
                        _ => v.get(part),
                    }
                })
            })
        };
        let Some(target) = target else {
            return Err(unsupported(format!(
                "`$ref` {path:?} does not point into this schema"
            )));
        };
        // Reserve the node first, so that a reference back to it (recursion) finds it.
        let id = self.push(Node::Pending)?;
        self.refs.insert(path.clone(), id);
        let inner = self.compile(target, depth + 1)?;
        self.nodes[id] = Node::OneOf(vec![inner]);
        Ok(id)
    }
}

fn compact(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A key as it appears between the quotes in JSON text.
fn escaped_key(key: &str) -> Vec<u8> {
    let quoted = serde_json::to_vec(&Value::String(key.to_owned())).unwrap_or_default();
    quoted
        .get(1..quoted.len().saturating_sub(1))
        .unwrap_or_default()
        .to_vec()
}

/// Where the machine is inside a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Str {
    Plain,
    Escape,
    /// Inside `\uXXXX`, this many hex digits still to come.
    Unicode(u8),
    /// Inside a character of several UTF-8 bytes, this many still to come (JSON text is
    /// UTF-8; a token may end mid-character).
    Utf8(u8),
}

impl Str {
    /// The next state inside a string, `None` when `b` cannot come here; `Some(None)` when
    /// `b` closes the string.
    fn step(self, b: u8) -> Option<Option<Str>> {
        match self {
            Str::Plain => match b {
                b'"' => Some(None),
                b'\\' => Some(Some(Str::Escape)),
                0..=0x1f => None,
                0x20..=0x7f => Some(Some(Str::Plain)),
                0xC2..=0xDF => Some(Some(Str::Utf8(1))),
                0xE0..=0xEF => Some(Some(Str::Utf8(2))),
                0xF0..=0xF4 => Some(Some(Str::Utf8(3))),
                // A continuation byte with no character begun, or a byte UTF-8 never uses.
                _ => None,
            },
            Str::Utf8(n) => ((b & 0xC0) == 0x80).then_some(Some(if n == 1 {
                Str::Plain
            } else {
                Str::Utf8(n - 1)
            })),
            Str::Escape => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(Some(Str::Plain)),
                b'u' => Some(Some(Str::Unicode(4))),
                _ => None,
            },
            Str::Unicode(n) => b.is_ascii_hexdigit().then_some(Some(if n == 1 {
                Str::Plain
            } else {
                Str::Unicode(n - 1)
            })),
        }
    }
}

/// Where the machine is inside a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    /// Digits of the integer part so far (saturating; only integers are bounded).
    Int(u8),
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn step(self, b: u8, integer: bool) -> Option<Num> {
        use Num::*;
        match (self, b) {
            // `-0` is JSON, but strict parsers read it as a float.
            (Minus, b'0') if !integer => Some(Zero),
            (Minus, b'1'..=b'9') => Some(Int(1)),
            // An integer stays within 64 bits, as parsers on the other side store it.
            (Int(n), b'0'..=b'9') if !integer || n < MAX_INTEGER_DIGITS => {
                Some(Int(n.saturating_add(1)))
            }
            (Zero | Int(_), b'.') if !integer => Some(Dot),
            (Zero | Int(_) | Frac, b'e' | b'E') if !integer => Some(Exp),
            (Dot | Frac, b'0'..=b'9') => Some(Frac),
            (Exp, b'+' | b'-') => Some(ExpSign),
            (Exp | ExpSign | ExpDigits, b'0'..=b'9') => Some(ExpDigits),
            _ => None,
        }
    }

    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int(_) | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Obj {
    /// After `{`: a key or `}`.
    Open,
    /// Inside a key; its bytes so far.
    Key(Vec<u8>, Str),
    /// After a key: `:`, then the value of this node.
    Colon(NodeId),
    /// After a value: `,` or `}`.
    Next,
    /// After `,`: a key.
    Comma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arr {
    Open,
    Next,
    Comma,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Frame {
    /// A value of this node comes next.
    Value(NodeId),
    Object {
        node: NodeId,
        seen: Vec<bool>,
        state: Obj,
    },
    Array {
        node: NodeId,
        count: usize,
        state: Arr,
    },
    String {
        node: NodeId,
        state: Str,
        /// Characters so far.
        chars: u32,
    },
    Number {
        integer: bool,
        state: Num,
    },
    Literal {
        node: NodeId,
        matched: usize,
    },
}

/// One way the text so far can be read: the frames still open, innermost last.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stack {
    frames: Vec<Frame>,
    /// Whitespace bytes in a row just read.
    blanks: u16,
    /// Whether they held a newline.
    newline: bool,
}

#[derive(Clone, Debug)]
struct MachineState {
    grammar: JsonGrammar,
    stacks: Vec<Stack>,
}

impl MachineState {
    /// Reads one byte; `false` (and the state unusable) when no reading allows it.
    fn feed(&mut self, b: u8) -> bool {
        let mut next = Vec::with_capacity(self.stacks.len());
        for stack in self.stacks.drain(..) {
            self.grammar.step(stack, b, &mut next, 0);
        }
        if next.len() > 1 {
            let mut unique: Vec<Stack> = Vec::with_capacity(next.len());
            for s in next {
                if unique.len() < MAX_ALTERNATIVES && !unique.contains(&s) {
                    unique.push(s);
                }
            }
            next = unique;
        }
        self.stacks = next;
        !self.stacks.is_empty()
    }

    /// Whether the text so far is a whole value (a number at the top may still go on).
    fn can_end(&self) -> bool {
        self.stacks.iter().any(|s| match s.frames.as_slice() {
            [] => true,
            [Frame::Number { state, .. }] => state.complete(),
            _ => false,
        })
    }

    /// Whether the value is whole and nothing but whitespace could follow.
    fn done(&self) -> bool {
        self.stacks.iter().all(|s| s.frames.is_empty())
    }
}

fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonGrammar {
    /// Every way `stack` can read `b`, pushed onto `out`.
    fn step(&self, mut stack: Stack, b: u8, out: &mut Vec<Stack>, expansions: usize) {
        if stack.frames.len() > MAX_DEPTH || expansions > MAX_DEPTH {
            return;
        }
        let nodes = &self.nodes;
        // Whitespace between tokens: wherever the top frame is between tokens.
        let between = match stack.frames.last() {
            None | Some(Frame::Value(_)) => true,
            Some(Frame::Object { state, .. }) => !matches!(state, Obj::Key(..)),
            Some(Frame::Array { .. }) => true,
            _ => false,
        };
        if between && is_blank(b) {
            if stack.blanks < MAX_WHITESPACE_RUN && !(b == b'\n' && stack.newline) {
                stack.blanks += 1;
                stack.newline |= b == b'\n';
                out.push(stack);
            }
            return;
        }
        stack.blanks = 0;
        stack.newline = false;
        let Some(top) = stack.frames.pop() else {
            return; // The value is whole: only whitespace may follow.
        };
        match top {
            Frame::Value(node) => match &nodes[node] {
                Node::OneOf(alts) => {
                    for &alt in alts {
                        let mut s = stack.clone();
                        s.frames.push(Frame::Value(alt));
                        self.step(s, b, out, expansions + 1);
                    }
                }
                Node::Object { props, .. } if b == b'{' => {
                    stack.frames.push(Frame::Object {
                        node,
                        seen: vec![false; props.len()],
                        state: Obj::Open,
                    });
                    out.push(stack);
                }
                Node::Array { .. } if b == b'[' => {
                    stack.frames.push(Frame::Array {
                        node,
                        count: 0,
                        state: Arr::Open,
                    });
                    out.push(stack);
                }
                Node::String { .. } if b == b'"' => {
                    stack.frames.push(Frame::String {
                        node,
                        state: Str::Plain,
                        chars: 0,
                    });
                    out.push(stack);
                }
                Node::Number { integer } => {
                    let state = match b {
                        b'-' => Num::Minus,
                        b'0' => Num::Zero,
                        b'1'..=b'9' => Num::Int(1),
                        _ => return,
                    };
                    stack.frames.push(Frame::Number {
                        integer: *integer,
                        state,
                    });
                    out.push(stack);
                }
                Node::Literal(bytes) if bytes.first() == Some(&b) => {
                    if bytes.len() > 1 {
                        stack.frames.push(Frame::Literal { node, matched: 1 });
                    }
                    out.push(stack);
                }
                _ => {}
            },
            Frame::String { node, state, chars } => {
                let Node::String { min, max } = nodes[node] else {
                    return;
                };
                match state.step(b) {
                    None => {}
                    Some(None) if chars >= min => out.push(stack),
                    Some(None) => {}
                    Some(Some(next)) => {
                        // Every byte read between characters begins one (an escape is one
                        // character from its backslash, a UTF-8 character from its lead).
                        let begins = state == Str::Plain;
                        let chars = chars + u32::from(begins);
                        if max.is_some_and(|max| chars > max) {
                            return;
                        }
                        stack.frames.push(Frame::String {
                            node,
                            state: next,
                            chars,
                        });
                        out.push(stack);
                    }
                }
            }
            Frame::Number { integer, state } => match state.step(b, integer) {
                Some(state) => {
                    stack.frames.push(Frame::Number { integer, state });
                    out.push(stack);
                }
                // The byte after a number belongs to what holds the number.
                None if state.complete() => self.step(stack, b, out, expansions + 1),
                None => {}
            },
            Frame::Literal { node, matched } => {
                let Node::Literal(bytes) = &nodes[node] else {
                    return;
                };
                if bytes.get(matched) == Some(&b) {
                    if matched + 1 < bytes.len() {
                        stack.frames.push(Frame::Literal {
                            node,
                            matched: matched + 1,
                        });
                    }
                    out.push(stack);
                }
            }
            Frame::Array { node, count, state } => {
                let Node::Array { items, min, max } = &nodes[node] else {
                    return;
                };
                let close_ok = count >= *min;
                let more_ok = max.is_none_or(|max| count < max);
                match (state, b) {
                    (Arr::Open | Arr::Next, b']') if close_ok => out.push(stack),
                    (Arr::Next, b',') if more_ok => {
                        stack.frames.push(Frame::Array {
                            node,
                            count,
                            state: Arr::Comma,
                        });
                        out.push(stack);
                    }
                    (Arr::Open | Arr::Comma, _) if more_ok => {
                        stack.frames.push(Frame::Array {
                            node,
                            count: count + 1,
                            state: Arr::Next,
                        });
                        stack.frames.push(Frame::Value(*items));
                        self.step(stack, b, out, expansions + 1);
                    }
                    _ => {}
                }
            }
            Frame::Object { node, seen, state } => {
                let Node::Object {
                    props,
                    required,
                    additional,
                } = &nodes[node]
                else {
                    return;
                };
                let push = |mut stack: Stack, seen: Vec<bool>, state: Obj, out: &mut Vec<Stack>| {
                    stack.frames.push(Frame::Object { node, seen, state });
                    out.push(stack);
                };
                match (state, b) {
                    (Obj::Open | Obj::Next, b'}')
                        if required.iter().all(|&i| seen.get(i) == Some(&true)) =>
                    {
                        out.push(stack);
                    }
                    // Another key only if one is still possible.
                    (Obj::Next, b',') if additional.is_some() || seen.iter().any(|s| !s) => {
                        push(stack, seen, Obj::Comma, out);
                    }
                    (Obj::Open | Obj::Comma, b'"') => {
                        push(stack, seen, Obj::Key(Vec::new(), Str::Plain), out);
                    }
                    (Obj::Key(mut key, s), b) => match s.step(b) {
                        None => {}
                        Some(Some(s)) => {
                            key.push(b);
                            let fits = additional.is_some()
                                || props
                                    .iter()
                                    .zip(&seen)
                                    .any(|((k, _), seen)| !seen && k.starts_with(&key));
                            if fits {
                                push(stack, seen, Obj::Key(key, s), out);
                            }
                        }
                        Some(None) => {
                            let mut seen = seen;
                            let value = match props.iter().position(|(k, _)| *k == key) {
                                Some(i) if seen[i] => return, // a key given twice
                                Some(i) => {
                                    seen[i] = true;
                                    props[i].1
                                }
                                None => match additional {
                                    Some(node) => *node,
                                    None => return,
                                },
                            };
                            push(stack, seen, Obj::Colon(value), out);
                        }
                    },
                    (Obj::Colon(value), b':') => {
                        stack.frames.push(Frame::Object {
                            node,
                            seen,
                            state: Obj::Next,
                        });
                        stack.frames.push(Frame::Value(value));
                        out.push(stack);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One generation's JSON constraint: the grammar, where the answer is in it, and the
/// vocabulary's bytes. [`crate::Generation::constrain_json`] keeps one; a pipeline's last
/// stage rebuilds one per step from the answer so far ([`JsonConstraint::after`]).
#[derive(Debug)]
pub struct JsonConstraint {
    state: MachineState,
    /// Each token's bytes; empty for control tokens, which never appear inside JSON.
    pieces: Arc<Vec<Vec<u8>>>,
}

impl JsonConstraint {
    /// At the start of the answer.
    pub fn new(grammar: &JsonGrammar, tokenizer: &Tokenizer) -> Self {
        Self {
            state: grammar.start(),
            pieces: tokenizer.pieces(),
        }
    }

    /// After the answer's tokens `answer` (each accepted in turn).
    pub fn after(grammar: &JsonGrammar, tokenizer: &Tokenizer, answer: &[u32]) -> Self {
        let mut constraint = Self::new(grammar, tokenizer);
        for &token in answer {
            constraint.accept(token, tokenizer);
        }
        constraint
    }

    /// After the bytes `lead`, then the tokens `answer`: a value that opened inside a token
    /// (see [`crate::JsonTracker::segment`]). `None` when the grammar does not allow `lead`.
    pub fn after_lead(
        grammar: &JsonGrammar,
        tokenizer: &Tokenizer,
        lead: &[u8],
        answer: &[u32],
    ) -> Option<Self> {
        let mut constraint = Self::new(grammar, tokenizer);
        if !constraint.feed(lead) {
            return None;
        }
        for &token in answer {
            constraint.accept(token, tokenizer);
        }
        Some(constraint)
    }

    /// Reads `bytes` as part of the value; `false` (and the constraint unusable) when the
    /// grammar does not allow them here.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.state.feed(b))
    }

    /// Whether `token` may come next (end-of-generation tokens once the value is whole).
    pub fn allows(&self, token: u32, tokenizer: &Tokenizer) -> bool {
        if tokenizer.is_eog(token) {
            return self.state.can_end();
        }
        match self.pieces.get(token as usize) {
            Some(piece) if !piece.is_empty() => {
                let mut state = self.state.clone();
                piece.iter().all(|&b| state.feed(b))
            }
            _ => false,
        }
    }

    /// Draws a token that keeps the answer valid JSON: tries the sampler's own pick a few
    /// times, striking out each that does not fit, then masks every token that does not fit
    /// and draws once more. `None` when nothing fits (the answer cannot go on).
    pub fn draw(
        &self,
        logits: &mut [f32],
        tokenizer: &Tokenizer,
        mut sample: impl FnMut(&mut [f32]) -> u32,
    ) -> Option<u32> {
        for _ in 0..TRIES_BEFORE_FULL_SCAN {
            let mut trial = logits.to_vec();
            let token = sample(&mut trial);
            if self.allows(token, tokenizer) {
                return Some(token);
            }
            if let Some(l) = logits.get_mut(token as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            if *l == f32::NEG_INFINITY {
                continue;
            }
            if self.allows(id as u32, tokenizer) {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !any {
            // Tokens the model scored −∞ may still be the only way on.
            for (id, l) in logits.iter_mut().enumerate() {
                if self.allows(id as u32, tokenizer) {
                    *l = f32::MIN;
                    any = true;
                }
            }
        }
        any.then(|| sample(logits))
    }

    /// Moves past `token` (one [`JsonConstraint::allows`] accepted).
    pub fn accept(&mut self, token: u32, tokenizer: &Tokenizer) {
        if tokenizer.is_eog(token) {
            return;
        }
        if let Some(piece) = self.pieces.get(token as usize) {
            for &b in piece {
                self.state.feed(b);
            }
        }
    }

    /// The value is whole and nothing but blanks could follow: the answer is finished.
    pub fn done(&self) -> bool {
        self.state.done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(s: Value) -> JsonGrammar {
        JsonGrammar::from_schema(&s).unwrap()
    }

    /// Every prefix of `text` is allowed and the whole is accepted.
    fn whole(g: &JsonGrammar, text: &str) -> bool {
        g.accepts(text)
    }

    /// How far `text` gets before a byte is refused (its length when none is).
    fn reach(g: &JsonGrammar, text: &str) -> usize {
        let mut s = g.start();
        for (i, b) in text.bytes().enumerate() {
            if !s.feed(b) {
                return i;
            }
        }
        text.len()
    }

    #[test]
    fn any_object_takes_json_objects_only() {
        let g = JsonGrammar::any_object();
        for ok in [
            "{}",
            " { \"a\" : [1, -2.5e3, true, null, \"x\\\"y\\u00e9\"] , \"b\": {\"c\": {}}}",
            "{\"k\":\"héllo\"}",
            "{\"n\": 0}",
        ] {
            assert!(whole(&g, ok), "{ok}");
        }
        for bad in [
            "[]",
            "\"s\"",
            "1",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":01}",
            "{\"a\":1,}",
            "{'a':1}",
            "{\"a\":tru}",
            "{\"a\":\"\n\"}",
            "{\"a\":1}}",
            "{\"a\":-}",
        ] {
            assert!(!whole(&g, bad), "{bad}");
        }
    }

    #[test]
    fn a_schema_fixes_keys_types_and_required_fields() {
        let g = schema(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            },
            "required": ["name", "age"],
            "additionalProperties": false
        }));
        assert!(whole(&g, r#"{"name": "Ann", "age": 31}"#));
        assert!(whole(
            &g,
            r#"{"age": 3, "name": "B", "tags": ["x", "y"], "unit": "celsius"}"#
        ));
        assert!(!whole(&g, r#"{"name": "Ann"}"#), "age is required");
        assert!(
            !whole(&g, r#"{"name": "Ann", "age": 3.5}"#),
            "age is an integer"
        );
        assert!(!whole(&g, r#"{"name": 1, "age": 3}"#));
        assert!(!whole(
            &g,
            r#"{"name": "A", "age": 3, "tags": ["a","b","c"]}"#
        ));
        assert!(!whole(&g, r#"{"name": "A", "age": 3, "unit": "kelvin"}"#));
        assert!(
            !whole(&g, r#"{"name": "A", "name": "B", "age": 3}"#),
            "twice"
        );
        // An unknown key is refused at its first byte that no allowed key shares.
        assert_eq!(reach(&g, r#"{"nick": 1}"#), 3);
        assert_eq!(reach(&g, r#"{"name": "A", "ag": 1}"#), 17);

        // Without `additionalProperties`, listed properties are the only ones (llama.cpp's
        // reading, which Ollama's `format` and llama-server share); `true` or a schema lets
        // others in, and an object that lists none takes any keys.
        let listed = json!({"type": "object", "properties": {"name": {"type": "string"}}});
        assert!(whole(&schema(listed.clone()), r#"{"name": "Ann"}"#));
        assert!(!whole(
            &schema(listed.clone()),
            r#"{"name": "Ann", "age": 3}"#
        ));
        let mut open = listed.clone();
        open["additionalProperties"] = json!(true);
        assert!(whole(&schema(open), r#"{"name": "Ann", "age": 3}"#));
        let mut typed = listed;
        typed["additionalProperties"] = json!({"type": "integer"});
        assert!(whole(&schema(typed.clone()), r#"{"age": 3}"#));
        assert!(!whole(&schema(typed), r#"{"age": "3"}"#));
        let patterned = json!({"type": "object", "properties": {"name": {"type": "string"}},
            "patternProperties": {"^x-": {"type": "string"}}});
        assert!(whole(&schema(patterned), r#"{"name": "Ann", "x-id": "7"}"#));
        let any = json!({"type": "object", "required": ["id"]});
        assert!(whole(&schema(any), r#"{"id": 1, "more": [true]}"#));
    }

    #[test]
    fn alternatives_refs_and_recursion() {
        let g = schema(json!({
            "$defs": {"node": {
                "type": "object",
                "properties": {"v": {"type": ["integer", "null"]},
                               "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["v"],
                "additionalProperties": false
            }},
            "anyOf": [{"$ref": "#/$defs/node"}, {"const": "leaf"}]
        }));
        assert!(whole(&g, r#""leaf""#));
        assert!(whole(&g, r#"{"v": null}"#));
        assert!(whole(
            &g,
            r#"{"v": 1, "kids": [{"v": 2, "kids": [{"v": null}]}]}"#
        ));
        assert!(!whole(&g, r#""lea""#));
        assert!(!whole(&g, r#"{"v": 1, "kids": [{"w": 2}]}"#));

        // A reference may step through arrays by index (a tool's parameters inside the call
        // grammar's `anyOf`).
        let g = schema(json!({"anyOf": [{"type": "object", "properties": {
            "a": {"$ref": "#/anyOf/0/$defs/n"}}, "$defs": {"n": {"type": "integer"}}}]}));
        assert!(whole(&g, r#"{"a": 3}"#));
        assert!(!whole(&g, r#"{"a": "3"}"#));
        // `properties` beside an `allOf` make the object (llama.cpp's order).
        let g = schema(
            json!({"type": "object", "properties": {"id": {"type": "integer"}},
            "required": ["id"], "allOf": [{"properties": {"name": {"type": "string"}}}]}),
        );
        assert!(whole(&g, r#"{"id": 1}"#));
    }

    #[test]
    fn numbers_end_where_their_holder_says() {
        let g = schema(json!({"type": "array", "items": {"type": "number"}}));
        assert!(whole(&g, "[0, -1, 2.50, 3e-7, 4E+2]"));
        assert!(!whole(&g, "[1.]"));
        assert!(!whole(&g, "[.5]"));
        assert!(!whole(&g, "[1e]"));
        let ints = schema(json!({"type": "array", "items": {"type": "integer"}}));
        assert!(whole(&ints, "[0, -7, 123456789012345678]"));
        assert!(!whole(&ints, "[-0]"));
        assert!(!whole(&ints, "[1234567890123456789]"));
        assert!(!whole(&ints, "[1.0]"));
        let top = schema(json!({"type": "integer"}));
        let mut s = top.start();
        assert!("42".bytes().all(|b| s.feed(b)));
        assert!(s.can_end() && !s.done(), "a number may still go on");
    }

    #[test]
    fn string_lengths_count_characters() {
        let g = schema(json!({"type": "string", "minLength": 2, "maxLength": 4}));
        assert!(!whole(&g, "\"a\""));
        assert!(whole(&g, "\"ab\""));
        assert!(whole(&g, "\"abcd\""));
        assert!(!whole(&g, "\"abcde\""));
        // A character of several bytes, and an escape, count once each.
        assert!(whole(&g, "\"éé漢🐟\""));
        assert!(whole(&g, "\"\\n\\u00e9ab\""));
        assert!(!whole(&g, "\"\\n\\u00e9abc\""));
        // Where a string may not go on, the machine says so at once.
        let mut s = g.start();
        assert!("\"abcd".bytes().all(|b| s.feed(b)));
        assert!(!s.clone().feed(b'e'));
        assert!(s.feed(b'"') && s.done());
        assert!(JsonGrammar::from_schema(
            &json!({"type": "string", "minLength": 3, "maxLength": 2})
        )
        .is_err());
    }

    #[test]
    fn strings_are_utf8() {
        let g = JsonGrammar::any_object();
        let fed = |bytes: &[u8]| {
            let mut s = g.start();
            bytes.iter().all(|&b| s.feed(b)) && s.done()
        };
        assert!(fed("{\"k\": \"é漢🐟\"}".as_bytes()));
        // A character cut short, a stray continuation byte, a byte UTF-8 never uses.
        assert!(!fed(b"{\"k\": \"\xC3\"}"));
        assert!(!fed(b"{\"k\": \"\x80\"}"));
        assert!(!fed(b"{\"k\": \"\xFF\"}"));
        // A character split across feeds (tokens) is whole once its last byte comes.
        let mut s = g.start();
        assert!(b"{\"k\": \"\xE6\xBC".iter().all(|&b| s.feed(b)));
        assert!(!s.clone().feed(b'"'));
        assert!(s.feed(0xA2) && s.feed(b'"') && s.feed(b'}') && s.done());
    }

    #[test]
    fn blanks_are_bounded() {
        let g = JsonGrammar::any_object();
        let many = format!("{{{}}}", " ".repeat(MAX_WHITESPACE_RUN as usize));
        assert!(whole(&g, &many));
        let too_many = format!("{{{}}}", " ".repeat(MAX_WHITESPACE_RUN as usize + 1));
        assert!(!whole(&g, &too_many));
        // Pretty printing: a newline and an indent between tokens; never two newlines.
        assert!(whole(&g, "{\n  \"a\": [\n    1,\n    2\n  ]\r\n}"));
        assert!(!whole(&g, "{\n\n  \"a\": 1}"));
        assert!(!whole(&g, "{\"a\": 1 \n \n}"));
    }

    #[test]
    fn unsupported_schemas_are_refused_with_a_reason() {
        for bad in [
            json!({"type": "decimal"}),
            json!({"$ref": "#/$defs/missing"}),
            json!({"enum": []}),
            json!({"allOf": [{"type": "string"}, {"type": "number"}]}),
            json!(false),
        ] {
            let e = JsonGrammar::from_schema(&bad).unwrap_err().to_string();
            assert!(e.contains("JSON schema"), "{e}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let g = JsonGrammar::any_object();
        let deep = format!("{}{}", "{\"a\":".repeat(60), "}".repeat(60));
        assert!(!whole(&g, &deep));
    }

    #[test]
    fn the_wire_text_compiles_to_the_same_grammar() {
        let g = schema(json!({
            "type": "object",
            "properties": {"n": {"type": "integer"}, "s": {"enum": ["a", "b"]}},
            "required": ["n"],
            "additionalProperties": false
        }));
        let back = JsonGrammar::from_wire_text(g.wire_text()).unwrap();
        for text in [
            r#"{"n": 3}"#,
            r#"{"n": 1, "s": "b"}"#,
            r#"{"s": "a"}"#,
            r#"{"n": 1.5}"#,
        ] {
            assert_eq!(whole(&g, text), whole(&back, text), "{text}");
        }
        let any = JsonGrammar::from_wire_text(JsonGrammar::any_object().wire_text()).unwrap();
        assert!(whole(&any, r#"{"x": [1, {"y": null}]}"#));
        assert!(!whole(&any, "[1]"));
        assert!(JsonGrammar::from_wire_text("{not json").is_err());
    }
}
