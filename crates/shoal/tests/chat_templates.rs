//! End to end: chat templates with tools, rendered by the real `shoal serve` exactly as
//! transformers' `apply_chat_template` renders them (Jinja2 as the reference, in
//! tests/python/test_chat_templates.py), and forced calls read back in each template's
//! format — for Qwen2.5-Coder's own template, and for a Llama-3.1-style and a
//! Hermes-style template given with `--chat-template-file` to SmolLM2 (whose own template
//! renders no tools); a call under `tool_choice: "auto"` in the Llama format (Qwen2.5-Coder
//! with that template), drawn under the tools' grammar and streamed as it is written. A
//! template that does not compile stops `shoal serve` at once.
//!
//! Needs `python3` with the `jinja2` and `openai` packages and the models
//! (`scripts/fetch-models.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{model_path, workspace_root, QWEN05, SMOLLM2};
use shoal_engine::{ChatTemplate, GgufFile};

/// The model file's own template, with its BOS and EOS token texts.
fn own_template(model: &Path) -> ChatTemplate {
    let file = GgufFile::open(model).unwrap();
    ChatTemplate::from_gguf_metadata(file.metadata()).unwrap()
}

/// Runs the Python suite against `server`, which renders with `template` (a file).
fn check_rendering(server: &common::Server, template: &Path, model: &ChatTemplate, one_call: bool) {
    let mut python = Command::new("python3");
    python
        .arg("tests/python/test_chat_templates.py")
        .current_dir(workspace_root())
        .env("SHOAL_ROOT_URL", format!("http://{}", server.addr))
        .env("SHOAL_TEMPLATE", template)
        .env("SHOAL_BOS", model.bos_token())
        .env("SHOAL_EOS", model.eos_token());
    if one_call {
        python.env("SHOAL_ONE_CALL", "1");
    }
    let status = python.status().expect("python3 runs");
    assert!(
        status.success(),
        "tests/python/test_chat_templates.py failed for {}",
        template.display()
    );
}

#[test]
fn qwen_renders_tools_as_transformers_does() {
    let model = model_path(QWEN05);
    let template = own_template(&model);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("qwen2.5-coder.jinja");
    std::fs::write(&file, template.source()).unwrap();
    let server = common::Server::start(&model, &[]);
    server.wait_healthy();
    check_rendering(&server, &file, &template, false);
}

#[test]
fn templates_given_on_the_command_line_render_and_read_calls_back() {
    let model = model_path(SMOLLM2);
    // SmolLM2's BOS and EOS texts: what a template from a file is given.
    let own = own_template(&model);
    for (name, one_call) in [
        ("llama3-json-tools.jinja", true),
        ("hermes-tools.jinja", false),
    ] {
        let template = workspace_root().join("tests/templates").join(name);
        let server = common::Server::start(
            &model,
            &["--chat-template-file", template.to_str().unwrap()],
        );
        server.wait_healthy();
        // The template in effect is the file's, as `GET /props` shows.
        let props = common::http(server.addr, "GET", "/props", None)
            .unwrap()
            .json();
        assert_eq!(
            props["chat_template"],
            std::fs::read_to_string(&template).unwrap()
        );
        check_rendering(&server, &template, &own, one_call);
    }
}

#[test]
fn a_llama_format_call_under_auto_is_drawn_under_the_grammar() {
    // Qwen2.5-Coder-0.5B with the Llama-3.1-style template answers a question a tool can
    // answer with a call in a code fence, which the grammar holds from its `"name"` on.
    let template = workspace_root().join("tests/templates/llama3-json-tools.jinja");
    let server = common::Server::start(
        &model_path(QWEN05),
        &["--chat-template-file", template.to_str().unwrap()],
    );
    server.wait_healthy();
    let status = Command::new("python3")
        .args(["tests/python/test_chat_templates.py", "AutoCalls"])
        .current_dir(workspace_root())
        .env("SHOAL_ROOT_URL", format!("http://{}", server.addr))
        .env("SHOAL_TEMPLATE", &template)
        .env("SHOAL_AUTO_CALLS", "1")
        .status()
        .expect("python3 runs");
    assert!(status.success(), "AutoCalls failed");
}

#[test]
fn a_template_that_does_not_compile_stops_serve_at_once() {
    // What `shoal serve` prints when it stops (it must stop) with `template`.
    let refused = |template: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model_path(SMOLLM2))
            .arg("--chat-template-file")
            .arg(template)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{% for m in messages %}{{ m.content }}").unwrap();
    let err = refused(&bad);
    assert!(
        err.contains("--chat-template-file") && err.contains("bad.jinja"),
        "{err}"
    );
    let err = refused(&dir.path().join("missing.jinja"));
    assert!(err.contains("missing.jinja"), "{err}");

    // Nor where no prompt is rendered with it.
    let template = workspace_root().join("tests/templates/hermes-tools.jinja");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "serve",
            "--port",
            "0",
            "--stage-only",
            "--chat-template-file",
        ])
        .arg(&template)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--stage-only"), "{err}");
}
