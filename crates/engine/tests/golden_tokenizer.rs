//! Tokenizer and chat template against llama.cpp's reference outputs in `tests/golden/`.
//!
//! Files are found through `SHOAL_GOLDEN_DIR` and `SHOAL_MODELS_DIR`; a missing file fails the
//! test (run `scripts/fetch-models.sh` to get the models).

// A test crate: a failed expectation is a test failure with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use shoal_engine::chat_template::{ChatMessage, ChatTemplate};
use shoal_engine::tokenizer::Tokenizer;

mod common;
use common::{ids, models_dir};

fn load_metadata(name: &str) -> HashMap<String, Value> {
    let path = models_dir().join(format!("{name}.gguf"));
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!(
            "cannot open model {}: {e}; run scripts/fetch-models.sh (or set SHOAL_MODELS_DIR)",
            path.display()
        )
    });
    Content::read(&mut file)
        .unwrap_or_else(|e| panic!("{} is not a readable GGUF file: {e}", path.display()))
        .metadata
}

fn load_golden(name: &str) -> serde_json::Value {
    common::golden(&format!("{name}.gguf"))
}

fn stream_decode(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut s = tok.decode_stream(false);
    let mut out = String::new();
    for &id in ids {
        out.push_str(&s.push(id).expect("stream decode"));
    }
    out.push_str(&s.flush());
    out
}

/// Checks one model; returns a list of mismatches (empty when all matched).
fn check_model(name: &str) -> Vec<String> {
    let md = load_metadata(name);
    let golden = load_golden(name);
    let built = Instant::now();
    let tok = Tokenizer::from_gguf_metadata(&md).expect("tokenizer from GGUF");
    let built = built.elapsed();
    let tmpl = ChatTemplate::from_gguf_metadata(&md).expect("chat template from GGUF");
    let mut errors = Vec::new();

    assert_eq!(
        tok.bos_id(),
        golden["bos_id"].as_u64().map(|x| x as u32),
        "{name}: bos id"
    );
    let eos = golden["eos_id"].as_u64().expect("eos_id") as u32;
    assert!(
        tok.is_eog(eos),
        "{name}: eos {eos} must be end-of-generation"
    );

    let mut n_tok = 0;
    for case in golden["tokenize"].as_array().expect("tokenize cases") {
        let text = case["text"].as_str().expect("text");
        let parse_special = case["parse_special"].as_bool().unwrap_or(true);
        let want = ids(&case["ids"]);
        let got = tok.encode(text, parse_special).expect("encode");
        if got != want {
            errors.push(format!(
                "{name}: encode({text:?}):\n  want {want:?}\n  got  {got:?}"
            ));
            continue;
        }
        let back = tok.decode(&want, false).expect("decode");
        if back != text {
            errors.push(format!("{name}: decode of {text:?} gave {back:?}"));
            continue;
        }
        let streamed = stream_decode(&tok, &want);
        if streamed != text {
            errors.push(format!(
                "{name}: stream decode of {text:?} gave {streamed:?}"
            ));
            continue;
        }
        n_tok += 1;
    }

    let mut n_chat = 0;
    for case in golden["chat"].as_array().expect("chat cases") {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let want_prompt = case["rendered_prompt"].as_str().expect("rendered_prompt");
        let prompt = tmpl.render(&messages, true).expect("render");
        if prompt != want_prompt {
            errors.push(format!(
                "{name}: render({messages:?}):\n  want {want_prompt:?}\n  got  {prompt:?}"
            ));
            continue;
        }
        let mut got = Vec::new();
        if tok.add_bos() {
            got.extend(tok.bos_id());
        }
        got.extend(tok.encode(&prompt, true).expect("encode prompt"));
        let want = ids(&case["prompt_ids"]);
        if got != want {
            errors.push(format!(
                "{name}: prompt ids:\n  want {want:?}\n  got  {got:?}"
            ));
            continue;
        }
        n_chat += 1;
    }

    let tf = &golden["teacher_forced"];
    let tf_text = tf["text"].as_str().expect("teacher_forced text");
    let tf_want = ids(&tf["ids"]);
    let tf_got = tok.encode(tf_text, true).expect("encode");
    if tf_got != tf_want {
        errors.push(format!("{name}: teacher_forced text ids differ"));
    }

    // Speed: a ~2k-token prompt.
    let long: String = std::iter::repeat_n(tf_text, 2048 / tf_want.len().max(1) + 1).collect();
    let start = Instant::now();
    let long_ids = tok.encode(&long, true).expect("encode long");
    let first = start.elapsed();
    let start = Instant::now();
    let rounds = 10;
    for _ in 0..rounds {
        tok.encode(&long, true).expect("encode long");
    }
    let avg = start.elapsed() / rounds;
    assert_eq!(tok.decode(&long_ids, false).expect("decode long"), long);
    eprintln!(
        "{name}: tokenizer built in {built:?}; tokenize {n_tok}/{} matched, chat {n_chat}/{} matched, teacher-forced {}; \
         encode of {} tokens ({} bytes): first {first:?}, mean {avg:?}",
        golden["tokenize"].as_array().map_or(0, Vec::len),
        golden["chat"].as_array().map_or(0, Vec::len),
        if tf_got == tf_want {
            "matched"
        } else {
            "DIFFERS"
        },
        long_ids.len(),
        long.len(),
    );
    errors
}

#[test]
fn smollm2_matches_llama_cpp() {
    let errors = check_model("smollm2-135m-instruct-q4_1");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn qwen25_coder_matches_llama_cpp() {
    let errors = check_model("qwen2.5-coder-0.5b-instruct");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn end_of_generation_tokens() {
    let tok = Tokenizer::from_gguf_metadata(&load_metadata("qwen2.5-coder-0.5b-instruct"))
        .expect("tokenizer");
    for t in [
        "<|im_end|>",
        "<|endoftext|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ] {
        let id = tok.id_of(t).expect("token in vocab");
        assert!(tok.is_eog(id), "{t} should end generation");
    }
    assert!(!tok.is_eog(tok.id_of("<|im_start|>").expect("im_start")));
    assert!(!tok.add_bos());

    let tok = Tokenizer::from_gguf_metadata(&load_metadata("smollm2-135m-instruct-q4_1"))
        .expect("tokenizer");
    assert_eq!(tok.eos_ids(), &[0, 2, 4]); // <|endoftext|>, <|im_end|>, <reponame> (FIM repo)
    assert!(!tok.add_bos());
    // Control text without parse_special is plain text.
    let ids = tok.encode("<|im_start|>", false).expect("encode");
    assert!(ids.len() > 1 && !ids.contains(&1));
    assert_eq!(tok.decode(&[1, 19556, 2], true).expect("decode"), "Hello");
}

/// Hugging Face `tokenizers` built from the same vocabulary and merges, with the pre-tokenizer
/// of the model's tokenizer.json: a second reference, for texts the golden files do not cover.
fn hf_reference(md: &HashMap<String, Value>, pre: &str) -> tokenizers::Tokenizer {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

    let strings = |key: &str| -> Vec<String> {
        md[key]
            .to_vec()
            .expect("array")
            .iter()
            .map(|v| v.to_string().expect("string").clone())
            .collect()
    };
    let vocab: HashMap<String, u32> = strings("tokenizer.ggml.tokens")
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")
        .into_iter()
        .map(|m| {
            let p = m
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .expect("merge")
                + 1;
            (m[..p].to_string(), m[p + 1..].to_string())
        })
        .collect();
    let model = serde_json::json!({
        "type": "BPE", "vocab": vocab, "merges": merges, "dropout": null, "unk_token": null,
        "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
        "byte_fallback": false, "ignore_merges": pre == "llama-bpe",
    });
    let model: tokenizers::models::bpe::BPE =
        serde_json::from_str(&model.to_string()).expect("BPE model");
    let mut tk = tokenizers::Tokenizer::new(model);
    let split = |digits: &str| {
        let re = format!(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        );
        Sequence::new(vec![
            PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(re),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .expect("split"),
            ),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])
    };
    let pre_tokenizer = match pre {
        "qwen2" => split(""),
        "llama-bpe" => split("{1,3}"),
        _ => Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]),
    };
    tk.with_pre_tokenizer(Some(pre_tokenizer));
    tk
}

/// Random texts over an alphabet of the cases pre-tokenizers differ on (contractions, digit
/// runs, whitespace kinds, newlines, marks, non-Latin letters, numbers that are not digits).
fn check_against_hf(name: &str, pre: &str) {
    let mut md = load_metadata(name);
    md.insert(
        "tokenizer.ggml.pre".to_string(),
        Value::String(pre.to_string()),
    );
    let ours = Tokenizer::from_gguf_metadata(&md).expect("tokenizer");
    let theirs = hf_reference(&md, pre);
    let alphabet = [
        "a",
        "b",
        "Z",
        "hello",
        " ",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\r",
        "'",
        "'s",
        "'T",
        "'re",
        "'LL",
        "1",
        "23",
        "4567",
        ".",
        ",",
        "!!",
        "?",
        "-",
        "_",
        "(",
        ")",
        "{",
        "}",
        "\"",
        "é",
        "ß",
        "Ω",
        "日本",
        "한",
        "\u{a0}",
        "\u{2028}",
        "\u{3000}",
        "\u{301}",
        "🚀",
        "👩\u{200d}💻",
        "Ⅻ",
        "²",
        "٣",
        "½",
        "€",
        "$",
        "<",
        ">",
        "=",
        "#",
        "@",
        "\u{85}",
        "\u{1c}",
        "\u{b}",
        "\u{c}",
        "ﬁ",
        "ǅ",
        "ʰ",
        "\u{e000}",
        "\u{378}",
    ];
    let mut seed: u64 = 0x1234_5678_9abc_def1;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let n = 5000;
    let mut diffs = Vec::new();
    for _ in 0..n {
        let len = rnd() % 12 + 1;
        let text: String = (0..len)
            .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
            .collect();
        let a = ours.encode(&text, false).expect("encode");
        let b = theirs.encode(text.as_str(), false).expect("hf encode");
        if a != b.get_ids() {
            diffs.push(format!(
                "{text:?}: ours {a:?}, tokenizers {:?}",
                b.get_ids()
            ));
        }
        assert_eq!(ours.decode(&a, false).expect("decode"), text);
    }
    assert!(
        diffs.is_empty(),
        "{name} with pre {pre}: {} of {n} texts differ:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(10)].join("\n")
    );
}

#[test]
fn random_text_matches_hf_tokenizers() {
    check_against_hf("smollm2-135m-instruct-q4_1", "smollm");
    check_against_hf("qwen2.5-coder-0.5b-instruct", "qwen2");
    // No Llama 3 model here: its splitter checked on the Qwen vocabulary.
    check_against_hf("qwen2.5-coder-0.5b-instruct", "llama-bpe");
}
