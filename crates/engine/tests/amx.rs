#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! `SHOAL_AMX=1` (what `shoal --amx` sets): on a CPU with AMX int8 tiles, prompt products
//! take the tiles (kernels/amx.rs). This binary sets the variable for its own process
//! before any product, so it checks that the switch is real — the prompt's logits are no
//! longer llama.cpp's bit for bit, yet close to them — and, on a CPU without AMX, that the
//! variable changes nothing. The engine's own equalities under AMX are checked by the
//! equality suites rerun with `SHOAL_AMX=1` (scripts/test.sh does on an AMX CPU).

mod common;

#[test]
fn with_amx_asked_for_prompts_take_the_tiles_where_the_cpu_has_them() {
    // The kernels read it once, at the first prompt product; nothing has run yet (one
    // test in this binary, so no other thread can have).
    std::env::set_var("SHOAL_AMX", "1");
    // SmolLM2 is Q4_1 (and a Q8_0 embedding); Qwen2.5-Coder-0.5B mostly Q5_0 and Q8_0,
    // its feed-forward down projections Q6_K: the tiles of both kinds of format.
    for file in [common::SMOLLM2, common::QWEN05] {
        let tf = common::teacher_forced(file);
        if shoal_engine::amx_tiles_available() {
            assert!(
                tf.worst > 1e-3,
                "{file}: with AMX asked for on an AMX CPU the logits are still llama.cpp's \
                 bit for bit (largest difference {}): the tiles were not used",
                tf.worst
            );
            assert!(
                tf.agreement >= 0.9 && tf.mean < 0.5,
                "{file}: AMX products should differ from llama.cpp's only in float order: \
                 agreement {}, mean difference {}",
                tf.agreement,
                tf.mean
            );
        } else {
            // The golden test's bars (golden_model.rs), which the plain kernels meet.
            eprintln!("this CPU (or OS) offers no AMX tiles: the variable must change nothing");
            assert!(tf.agreement >= 0.98 && tf.worst <= 1e-3, "{file}");
        }
    }
}
