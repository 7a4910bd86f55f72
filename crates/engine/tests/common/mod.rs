//! Shared by the engine's integration tests: where the real models and the llama.cpp
//! reference outputs live, and a pseudo-random stream for generated weights.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

pub const SMOLLM2: &str = "smollm2-135m-instruct-q4_1.gguf";
pub const QWEN05: &str = "qwen2.5-coder-0.5b-instruct.gguf";
/// Only the draft-model tests use it (Qwen2.5-Coder-0.5B drafts for it).
pub const QWEN15: &str = "qwen2.5-coder-1.5b-instruct.gguf";

pub fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")))
}

pub fn golden_dir() -> PathBuf {
    std::env::var_os("SHOAL_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/golden"))
        })
}

/// The token ids of one user message in the model's chat template.
pub fn chat_prompt(model: &shoal_engine::Model, text: &str) -> Vec<u32> {
    let text = model
        .render_chat(&[shoal_engine::ChatMessage {
            role: "user".into(),
            content: text.into(),
        }])
        .unwrap();
    model.encode_prompt(&text).unwrap()
}

/// The stage's logits (a test that asked for them).
pub fn logits(out: shoal_engine::StageOutput) -> shoal_engine::candle_core::Tensor {
    match out {
        shoal_engine::StageOutput::Logits(l) => l,
        shoal_engine::StageOutput::Hidden(_) => panic!("expected logits"),
    }
}

/// How a model's logits on its golden teacher-forced text compare with llama.cpp's.
pub struct TeacherForced {
    /// The share of positions where both choose the same token.
    pub agreement: f64,
    /// The largest and the mean difference of the chosen token's logit from llama.cpp's.
    pub worst: f64,
    pub mean: f64,
}

/// Teacher-forced: the golden text's every position run as one prompt, our argmax compared
/// with llama.cpp's and our max logit with its (each disagreement and the totals printed).
pub fn teacher_forced(file: &str) -> TeacherForced {
    use shoal_engine::sampler::argmax;
    use shoal_engine::stage::logits_row;
    use shoal_engine::{Logits, StageInput};
    let g = golden(file);
    let tf = &g["teacher_forced"];
    let ids = ids(&tf["ids"]);
    let want_argmax = self::ids(&tf["argmax"]);
    let want_max: Vec<f64> = tf["max_logit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let (_, stage) = whole_stage(file);
    let mut cache = stage.new_cache();
    let positions: Vec<usize> = (0..ids.len()).collect();
    let l = logits(
        stage
            .forward(
                StageInput::Tokens(&ids),
                &positions,
                &mut cache,
                Logits::All,
            )
            .unwrap(),
    );
    let mut agree = 0;
    let mut worst = 0f64;
    let mut sum_diff = 0f64;
    let mut signed = 0f64;
    for (i, (&want, &want_max)) in want_argmax.iter().zip(&want_max).enumerate() {
        let row = logits_row(&l, i).unwrap();
        let got = argmax(&row);
        if got == want {
            agree += 1;
        } else {
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            eprintln!(
                "position {i}: ours {got} ({:.3}), llama.cpp {want} ({:.3} here), margin {:.3}",
                row[got as usize],
                row[want as usize],
                sorted[0] - sorted[1]
            );
        }
        let max = row[got as usize] as f64;
        worst = worst.max((max - want_max).abs());
        sum_diff += (max - want_max).abs();
        signed += max - want_max;
    }
    let frac = agree as f64 / want_argmax.len() as f64;
    eprintln!(
        "{file}: teacher-forced argmax agreement {agree}/{} = {:.2}%, largest max-logit difference {worst:.4}",
        want_argmax.len(),
        frac * 100.0
    );
    let mean_diff = sum_diff / want_argmax.len() as f64;
    eprintln!(
        "{file}: mean max-logit difference {mean_diff:.4} (signed {:.4})",
        signed / want_argmax.len() as f64
    );
    TeacherForced {
        agreement: frac,
        worst,
        mean: mean_diff,
    }
}

/// A real model's file and its whole stack of layers as one stage.
pub fn whole_stage(file: &str) -> (shoal_engine::GgufFile, shoal_engine::Stage) {
    let gguf = shoal_engine::GgufFile::open(model_path(file)).unwrap();
    let whole = shoal_engine::StageSpec::whole(gguf.config().n_layers);
    let device = shoal_engine::candle_core::Device::Cpu;
    let stage = shoal_engine::Stage::load(&gguf, whole, &device, |_, _| {}).unwrap();
    (gguf, stage)
}

/// Path of a real model; a missing file fails the test with the way to fetch it.
pub fn model_path(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(
        p.is_file(),
        "model {} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

/// The llama.cpp reference outputs for a model (see tests/golden/README.md).
pub fn golden(file: &str) -> serde_json::Value {
    let name = match file {
        SMOLLM2 => "smollm2-135m-instruct-q4_1.json",
        QWEN05 => "qwen2.5-coder-0.5b-instruct.json",
        other => panic!("no golden file for {other}"),
    };
    let p = golden_dir().join(name);
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_str(&text).expect("golden file is JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// A deterministic pseudo-random stream of values in [-1, 1).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}
