//! Teacher-forced logits from llama.cpp on this machine: reads token ids (JSON list) and
//! prints, per position, the argmax and max logit as JSON. For checking the golden
//! references and our engine against llama.cpp run here.
use std::num::NonZeroU32;

use anyhow::Context as _;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_path = &args[1];
    let ids: Vec<i32> = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
    let fa: i32 = args.get(3).map_or(Ok(-1), |s| s.parse())?;
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, model_path, &LlamaModelParams::default())
        .context("load")?;
    let n = ids.len() as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n + 16))
        .with_n_batch(512)
        .with_flash_attention_policy(fa);
    let mut ctx = model.new_context(&backend, params)?;
    let mut batch = LlamaBatch::new(ids.len(), 1);
    let toks: Vec<LlamaToken> = ids.iter().map(|&i| LlamaToken(i)).collect();
    batch.add_sequence(&toks, 0, true)?;
    ctx.decode(&mut batch)?;
    let mut out = Vec::new();
    for i in 0..ids.len() {
        let l = ctx.get_logits_ith(i as i32);
        let (am, mx) = l
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |(a, m), (j, &v)| if v > m { (j, v) } else { (a, m) });
        out.push(serde_json::json!([am, mx]));
    }
    println!("{}", serde_json::Value::Array(out));
    Ok(())
}
