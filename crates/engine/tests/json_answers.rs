//! Answers constrained to JSON (`Generation::constrain_json`) on the real SmolLM2, a model
//! far too small to write JSON reliably on its own: with the grammar, every answer over
//! twenty seeds parses and has the schema's shape, and it ends by itself when the value
//! closes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::chat_prompt;

use serde_json::{json, Value};
use shoal_engine::{
    FinishReason, GenerateParams, JsonGrammar, JsonRule, JsonTracker, Model, SamplingParams,
};

fn answer(
    model: &Model,
    question: &str,
    grammar: &JsonGrammar,
    seed: u64,
) -> (String, FinishReason) {
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed,
            ..SamplingParams::default()
        },
        max_tokens: 200,
        stop: Vec::new(),
        cache_prompt: true,
    };
    let mut g = model
        .generate(chat_prompt(model, question), params)
        .unwrap();
    g.constrain_json(grammar).unwrap();
    while g.next_step().unwrap().is_some() {}
    (g.text().to_owned(), g.finish_reason().unwrap())
}

#[test]
fn schema_answers_always_parse_and_fit() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "population": {"type": "integer"},
            "coastal": {"type": "boolean"},
            "districts": {
                "type": "array",
                "items": {"type": "string", "maxLength": 40},
                "maxItems": 3
            }
        },
        "required": ["city", "population", "coastal"],
        "additionalProperties": false
    });
    let grammar = JsonGrammar::from_schema(&schema).unwrap();
    for seed in 0..20 {
        let (text, finish) = answer(
            &model,
            "Describe the city of Lisbon as JSON.",
            &grammar,
            seed,
        );
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        let obj = value.as_object().unwrap();
        assert!(obj["city"].is_string(), "seed {seed}: {text}");
        let short = |s: &Value| s.as_str().is_some_and(|s| s.chars().count() <= 40);
        assert!(short(&obj["city"]), "{text}");
        assert!(
            obj.get("districts")
                .and_then(Value::as_array)
                .is_none_or(|d| d.iter().all(short)),
            "{text}"
        );
        assert!(
            obj["population"].is_i64() || obj["population"].is_u64(),
            "{text}"
        );
        assert!(obj["coastal"].is_boolean(), "{text}");
        assert!(
            obj.keys().all(|k| schema["properties"].get(k).is_some()),
            "{text}"
        );
    }
}

#[test]
fn json_mode_answers_are_objects_even_when_asked_for_prose() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let grammar = JsonGrammar::any_object();
    for seed in 0..5 {
        let (text, finish) = answer(&model, "Write a haiku about the sea.", &grammar, seed);
        if finish == FinishReason::Stop {
            let value: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
            assert!(value.is_object(), "{text}");
        } else {
            // Cut by max_tokens: still a valid beginning of an object.
            assert!(text.trim_start().starts_with('{'), "{text}");
        }
    }
}

/// The grammar of a call to `get_weather(city)`, as the API builds one from a tool.
fn weather_call() -> JsonGrammar {
    JsonGrammar::from_schema(&json!({
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
                "additionalProperties": false
            }
        },
        "required": ["name", "arguments"],
        "additionalProperties": false
    }))
    .unwrap()
}

/// A sampled answer (temperature 0.9, `seed`) to `prompt` under `rule`.
fn answer_under(
    model: &Model,
    prompt: &[u32],
    rule: &JsonRule,
    seed: u64,
    max_tokens: usize,
) -> (String, FinishReason) {
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: 0.9,
            seed,
            ..SamplingParams::default()
        },
        max_tokens,
        stop: Vec::new(),
        cache_prompt: true,
    };
    let mut g = model.generate(prompt.to_vec(), params).unwrap();
    g.constrain_json_rule(rule).unwrap();
    while g.next_step().unwrap().is_some() {}
    (g.text().to_owned(), g.finish_reason().unwrap())
}

#[test]
fn a_trigger_opens_the_grammar_and_a_whole_value_closes_it() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let tokenizer = model.tokenizer();
    let rule = JsonRule::after_trigger(weather_call(), "<tool_call>").unwrap();
    let text = "Let me look. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                {\"city\": \"Oslo\"}}\n</tool_call> and <tool_call>{\"name\"";
    let tokens = tokenizer.encode(text, false).unwrap();
    let mut tracker = JsonTracker::new(&rule, tokenizer);
    // Which bytes of the text were read under the grammar.
    let mut under = String::new();
    let mut written = String::new();
    for &t in &tokens {
        let piece = String::from_utf8(tokenizer.token_bytes(t, false).unwrap()).unwrap();
        if let Some(c) = tracker.constraint() {
            assert!(c.allows(t, tokenizer), "{piece:?} after {written:?}");
            under.push_str(&piece);
        }
        tracker.accept(t, tokenizer);
        if let Some((lead, _)) = tracker.segment() {
            if tracker.constraint().is_some() && under.is_empty() {
                under.push_str(std::str::from_utf8(lead).unwrap());
            }
        }
        written.push_str(&piece);
        assert!(!tracker.finished());
    }
    assert_eq!(written, text);
    // The first call, whole, then the second call's start (open at the end).
    let first = under.find('}').map(|i| i + 2).unwrap();
    let call: Value = serde_json::from_str(&under[..first]).unwrap();
    assert_eq!(call["arguments"]["city"], "Oslo");
    assert!(tracker.constraint().is_some(), "the second call is open");
    let (_, open) = tracker.segment().unwrap();
    assert!(!open.is_empty());

    // A trigger that ends inside a token: the token's rest is the value's lead, and a
    // constraint rebuilt from lead and tokens (as a pipeline's last stage does) goes on
    // as the tracker's own.
    let rule = JsonRule::after_trigger(weather_call(), "Result: ").unwrap();
    let text = "Result: {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}";
    let tokens = tokenizer.encode(text, false).unwrap();
    let mut tracker = JsonTracker::new(&rule, tokenizer);
    let mut leads = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        tracker.accept(t, tokenizer);
        if let (Some((lead, after)), Some(next)) = (tracker.segment(), tokens.get(i + 1)) {
            leads.push(lead.to_vec());
            let rebuilt =
                shoal_engine::JsonConstraint::after_lead(&weather_call(), tokenizer, lead, after)
                    .unwrap();
            assert!(rebuilt.allows(*next, tokenizer));
            assert!(tracker.constraint().unwrap().allows(*next, tokenizer));
        }
    }
    assert!(!leads.is_empty() && !leads[0].is_empty(), "{leads:?}");
    assert!(leads[0].starts_with(b"{"), "{leads:?}");

    // A bare call the answer opens with is held too (`or_bare`), once its opening names a
    // tool; not one later on, nor a JSON answer that is no call.
    let bare = JsonRule::after_trigger(weather_call(), "<tool_call>")
        .unwrap()
        .or_bare(["{\"name\": \"get_weather\"".to_owned()]);
    let opened = |text: &str| {
        let tokens = tokenizer.encode(text, false).unwrap();
        let tracker = JsonTracker::after(&bare, tokenizer, &tokens);
        tracker.constraint().is_some() || tracker.segment().is_some()
    };
    assert!(opened("\n{\"name\":\"get_weather\", \"arguments\": {\"ci"));
    assert!(opened("{ \"name\" : \"get_weather\""));
    assert!(!opened("{\"name\": \"get_wea"), "not yet");
    assert!(!opened("Hello {\"name\": \"get_weather\", \"arguments\""));
    assert!(!opened("{\"answer\": 42, \"name\": \"get_weather\""));

    // Without a trigger (Llama 3.x's calls are the whole answer): an answer that opens
    // with `{` is one value and ends with it; any other answer stays free to its end.
    let llama = JsonRule::bare(weather_call(), ["{".to_owned()]);
    let call = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}";
    let t = JsonTracker::after(&llama, tokenizer, &tokenizer.encode(call, false).unwrap());
    assert!(
        t.finished() && t.constraint().is_none(),
        "a whole call ends it"
    );
    let half = JsonTracker::after(
        &llama,
        tokenizer,
        &tokenizer.encode(" {\"na", false).unwrap(),
    );
    assert!(half.constraint().is_some() && !half.finished());
    let text = "Oslo is cold. {\"name\": \"get_weather\", \"arguments\": {";
    let free = JsonTracker::after(&llama, tokenizer, &tokenizer.encode(text, false).unwrap());
    assert!(free.constraint().is_none() && !free.finished());
    // An opening may start with a code fence that is not part of the value: the value is
    // from its brace on.
    let fenced = JsonRule::bare(weather_call(), ["```json{\"name\"".to_owned()]);
    let text = "```json\n{\n  \"name\": \"get_";
    let t = JsonTracker::after(&fenced, tokenizer, &tokenizer.encode(text, false).unwrap());
    let (lead, after) = t.segment().expect("held from the fence's brace");
    let mut value = lead.to_vec();
    for &token in after {
        value.extend(tokenizer.token_bytes(token, false).unwrap());
    }
    assert_eq!(value, b"{\n  \"name\": \"get_");
    let text = "```json\n{\"cities\": [";
    let t = JsonTracker::after(&fenced, tokenizer, &tokenizer.encode(text, false).unwrap());
    assert!(t.segment().is_none(), "other fenced JSON stays free");

    // A forced answer's second call opens after the closing and opening tags, also when
    // the opening tag's last token carries the call's first bytes; other text ends it.
    let forced = JsonRule::after_trigger(weather_call(), "<tool_call>")
        .unwrap()
        .from_start()
        .only_between("</tool_call>");
    let call = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}";
    for between in ["\n</tool_call>\n<tool_call>\n", "</tool_call><tool_call>"] {
        let text = format!("{call}{between}{{\"name\": \"get_");
        let t = JsonTracker::after(&forced, tokenizer, &tokenizer.encode(&text, false).unwrap());
        assert!(!t.finished() && t.constraint().is_some(), "{text:?}");
    }
    let text = format!("{call}\n</tool_call>\nThe weather");
    let t = JsonTracker::after(&forced, tokenizer, &tokenizer.encode(&text, false).unwrap());
    assert!(t.finished());

    // Without a trigger in the text, nothing is constrained; a whole rule finishes.
    let plain = JsonTracker::after(
        &rule,
        tokenizer,
        &tokenizer.encode("No call.", false).unwrap(),
    );
    assert!(plain.constraint().is_none() && plain.segment().is_none());
    let whole = JsonRule::whole(weather_call());
    let call = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}";
    let done = JsonTracker::after(&whole, tokenizer, &tokenizer.encode(call, false).unwrap());
    assert!(done.finished() && done.constraint().is_none());
    assert!(JsonRule::after_trigger(weather_call(), "").is_err());
}

#[test]
fn every_call_after_a_trigger_parses_and_fits_and_the_answer_goes_on_after_it() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let grammar = weather_call();
    // A forced call: the prompt opens it, the rule holds from the start and after every
    // later opening.
    let rule = JsonRule::after_trigger(grammar.clone(), "<tool_call>")
        .unwrap()
        .from_start();
    let mut prompt = chat_prompt(
        &model,
        "Call get_weather for Paris, then for Berlin, each as \
         <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": …}}</tool_call>.",
    );
    prompt.extend(model.tokenizer().encode("<tool_call>\n", false).unwrap());
    let mut went_on = 0;
    for seed in 0..8 {
        let (text, finish) = answer_under(&model, &prompt, &rule, seed, 120);
        let cut = finish == FinishReason::Length;
        // The forced call, then one after each opening the model wrote itself.
        let mut values = vec![text.as_str()];
        values.extend(text.split("<tool_call>").skip(1));
        let n = values.len();
        for (i, v) in values.into_iter().enumerate() {
            let mut stream = serde_json::Deserializer::from_str(v).into_iter::<Value>();
            match stream.next() {
                Some(Ok(call)) => {
                    assert!(grammar.accepts(&call.to_string()), "seed {seed}: {text}");
                    assert_eq!(call["name"], "get_weather");
                }
                // Only the last value may be unfinished, and only when max_tokens cut it.
                _ => assert!(cut && i + 1 == n, "seed {seed}: call {i}: {text}"),
            }
        }
        // The answer did not end with the first call's value.
        let mut first = serde_json::Deserializer::from_str(&text).into_iter::<Value>();
        let _ = first.next();
        let first_end = first.byte_offset();
        went_on += usize::from(text[first_end..].trim().len() > "</tool_call>".len());
    }
    assert!(went_on > 0, "no answer went on after its first call");
}

#[test]
fn a_forced_answer_is_calls_and_ends_at_the_first_text_that_is_not_one() {
    let model = Model::load(common::model_path(common::SMOLLM2), |_, _| {}).unwrap();
    let grammar = weather_call();
    let rule = JsonRule::after_trigger(grammar.clone(), "<tool_call>")
        .unwrap()
        .from_start()
        .only_between("</tool_call>");
    let mut prompt = chat_prompt(&model, "What is the weather in Paris and in Berlin?");
    prompt.extend(model.tokenizer().encode("<tool_call>\n", false).unwrap());
    for seed in 0..8 {
        let (text, finish) = answer_under(&model, &prompt, &rule, seed, 200);
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text}");
        // Calls, their tags, and at most the one token that ended it.
        let mut rest = text.as_str();
        let mut calls = 0;
        loop {
            let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            let Some(Ok(call)) = stream.next() else { break };
            assert!(grammar.accepts(&call.to_string()), "seed {seed}: {text}");
            calls += 1;
            rest = rest[stream.byte_offset()..].trim_start();
            rest = rest
                .strip_prefix("</tool_call>")
                .unwrap_or(rest)
                .trim_start();
            match rest.strip_prefix("<tool_call>") {
                Some(next) => rest = next,
                None => break,
            }
        }
        assert!(calls >= 1, "seed {seed}: {text}");
        let ending = rest.split_whitespace().count();
        assert!(
            ending <= 1,
            "seed {seed}: {rest:?} after the calls of {text:?}"
        );
    }
}

#[test]
fn a_doubled_opening_brace_in_one_token_is_held_from_the_second() {
    // Qwen2.5-Coder writes `{{` as one token now and then, opening a bare call (seen under
    // opencode). The grammar cannot start with `{{`; it holds the call from the second
    // brace, so the rest of the call is still drawn under it.
    let model = Model::load(common::model_path(common::QWEN05), |_, _| {}).unwrap();
    let tokenizer = model.tokenizer();
    let doubled = tokenizer.encode("{{", false).unwrap();
    assert_eq!(doubled.len(), 1, "`{{{{` is one token in Qwen's vocabulary");
    let rule = JsonRule::after_trigger(weather_call(), "<tool_call>")
        .unwrap()
        .or_bare(["{".to_owned()]);
    let mut answer = doubled.clone();
    answer.extend(
        tokenizer
            .encode("\"name\": \"get_weather\", \"arguments\": {\"ci", false)
            .unwrap(),
    );
    let t = JsonTracker::after(&rule, tokenizer, &answer);
    let (lead, _) = t.segment().expect("held from the second brace");
    assert_eq!(lead, b"{");
    let constraint = t.constraint().unwrap();
    let ty = tokenizer.encode("ty", false).unwrap();
    let other = tokenizer.encode("xyz", false).unwrap();
    assert!(constraint.allows(ty[0], tokenizer), "\"city\" goes on");
    assert!(!constraint.allows(other[0], tokenizer), "no other key");
    // After a tag the grammar holds before the brace comes, so the slip cannot happen.
    let tagged = tokenizer.encode("<tool_call>\n", false).unwrap();
    let t = JsonTracker::after(&rule, tokenizer, &tagged);
    let held = t.constraint().expect("held after the tag");
    assert!(!held.allows(doubled[0], tokenizer));
    // Another token the grammar cannot start with still leaves the answer free.
    let empty = tokenizer.encode("{}", false).unwrap();
    assert_eq!(empty.len(), 1, "`{{}}` is one token too");
    let t = JsonTracker::after(&rule, tokenizer, &empty);
    assert!(t.segment().is_none());
}
