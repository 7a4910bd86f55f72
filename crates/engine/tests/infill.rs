#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! Fill-in-the-middle prompts: `<|fim_prefix|>` prefix `<|fim_suffix|>` suffix
//! `<|fim_middle|>` for a code model (the order Qwen2.5-Coder was trained on and Ollama's
//! templates for it use), the code tokenized as plain text; a refusal for a model without
//! FIM tokens. (What Qwen2.5-Coder-0.5B writes into the gap is checked end to end in
//! crates/shoal/tests/agent_api.rs.)

mod common;

use common::*;
use shoal_engine::Model;

#[test]
fn a_code_model_gets_its_fim_prompt() {
    let model = Model::load(model_path(QWEN05), |_, _| {}).unwrap();
    let format = model.prompt_format();
    let tokenizer = format.tokenizer();
    let fim = tokenizer.fim().expect("Qwen2.5-Coder has FIM tokens");
    assert_eq!(tokenizer.token_text(fim.prefix), Some("<|fim_prefix|>"));
    assert_eq!(tokenizer.token_text(fim.suffix), Some("<|fim_suffix|>"));
    assert_eq!(tokenizer.token_text(fim.middle), Some("<|fim_middle|>"));
    assert_eq!(
        fim.repo.and_then(|id| tokenizer.token_text(id)),
        Some("<|repo_name|>")
    );
    assert_eq!(
        fim.file_sep.and_then(|id| tokenizer.token_text(id)),
        Some("<|file_sep|>")
    );
    // A control token's text inside the code is code, not a token.
    let prefix = "s = '<|im_end|>'\ndef f(x):\n    ";
    let suffix = "\nprint(f(1))";
    let ids = format.infill_prompt(prefix, suffix, &[], None).unwrap();
    let mut want = vec![fim.prefix];
    want.extend(tokenizer.encode(prefix, false).unwrap());
    want.push(fim.suffix);
    want.extend(tokenizer.encode(suffix, false).unwrap());
    want.push(fim.middle);
    assert_eq!(ids, want);
    let im_end = tokenizer.id_of("<|im_end|>").unwrap();
    assert!(!ids.contains(&im_end));

    // Other files for context: llama.cpp's repo-level layout first.
    let files = vec![(
        "util.py".to_owned(),
        "def one():\n    return 1\n".to_owned(),
    )];
    let with_files = format.infill_prompt(prefix, suffix, &files, None).unwrap();
    let mut layout = vec![fim.repo.unwrap()];
    layout.extend(tokenizer.encode("myproject\n", false).unwrap());
    layout.push(fim.file_sep.unwrap());
    layout.extend(tokenizer.encode("util.py\n", false).unwrap());
    layout.extend(
        tokenizer
            .encode("def one():\n    return 1\n", false)
            .unwrap(),
    );
    layout.push(fim.file_sep.unwrap());
    layout.extend(tokenizer.encode("filename\n", false).unwrap());
    layout.extend(want.clone());
    assert_eq!(with_files, layout);

    // Cut to limits: the prefix keeps its end, the suffix its start, the files their end.
    let limits = shoal_engine::InfillLimits {
        prefix: 3,
        suffix: 2,
        files: 4,
    };
    let cut = format
        .infill_prompt(prefix, suffix, &files, Some(limits))
        .unwrap();
    let before = tokenizer.encode(prefix, false).unwrap();
    let after = tokenizer.encode(suffix, false).unwrap();
    let mut want = layout[layout.len() - want.len() - 4..layout.len() - want.len()].to_vec();
    want.push(fim.prefix);
    want.extend(&before[before.len() - 3..]);
    want.push(fim.suffix);
    want.extend(&after[..2]);
    want.push(fim.middle);
    assert_eq!(cut, want);
}

#[test]
fn a_model_without_fim_tokens_is_refused() {
    let model = Model::load(model_path(SMOLLM2), |_, _| {}).unwrap();
    assert!(model.prompt_format().tokenizer().fim().is_none());
    let e = model
        .prompt_format()
        .infill_prompt("a", "b", &[], None)
        .unwrap_err();
    assert!(e.to_string().contains("fill-in-the-middle"), "{e}");
}
