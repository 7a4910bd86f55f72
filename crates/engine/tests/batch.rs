#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

//! `Stage::forward_batch`: several sessions' rows through a stage in one pass must give,
//! bit for bit, what each session gets alone from `Stage::forward` — its outputs and, seen
//! through the steps after, its cache. On small random-weight GGUF files written here with
//! the k-quants (whose float order depends on the shape of the product) next to the
//! 32-element formats and a format left to candle, and on the real test models.

mod common;

use shoal_engine::candle_core::quantized::gguf_file::{self, Value};
use shoal_engine::candle_core::quantized::{GgmlDType, QTensor};
use shoal_engine::candle_core::{Device, Tensor};
use shoal_engine::stage::BatchItem;
use shoal_engine::{GgufFile, KvCache, Logits, Stage, StageInput, StageOutput, StageSpec};

use common::Rng;

const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const FFN: usize = 512;
/// Not a multiple of 8: a Q4_K LM head takes llama.cpp's other orders.
const VOCAB: usize = 100;
const LAYERS: usize = 2;

/// A qwen2-shaped model (q/k/v biases) whose matrices use every format the engine maps,
/// Q4_K and Q6_K at shapes that take each of llama.cpp's orders, and Q3_K (candle's).
fn write_model(path: &std::path::Path) {
    let a = "qwen2";
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String("random batch test".into()),
        ),
        (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{a}.embedding_length"), Value::U32(HIDDEN as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(FFN as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(1e6)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{a}.context_length"), Value::U32(256)),
        (format!("{a}.vocab_size"), Value::U32(VOCAB as u32)),
    ];
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    use GgmlDType::*;
    let mut specs: Vec<(String, usize, usize, GgmlDType, f32)> =
        vec![("token_embd.weight".into(), VOCAB, HIDDEN, Q8_0, 1.0)];
    let layer_types = [
        // q, k, v, o, gate, up, down
        [Q4K, Q6K, Q8_0, Q4_1, Q4K, Q5_0, Q6K],
        [Q6K, Q4K, Q3K, Q6K, Q6K, Q4K, Q4K],
    ];
    for (i, t) in layer_types.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}");
        specs.extend([
            (p("attn_norm.weight"), 1, HIDDEN, F32, 0.2),
            (p("attn_q.weight"), q, HIDDEN, t[0], 0.3),
            (p("attn_k.weight"), kv, HIDDEN, t[1], 0.3),
            (p("attn_v.weight"), kv, HIDDEN, t[2], 0.3),
            (p("attn_q.bias"), 1, q, F32, 0.5),
            (p("attn_k.bias"), 1, kv, F32, 0.5),
            (p("attn_v.bias"), 1, kv, F32, 0.5),
            (p("attn_output.weight"), HIDDEN, q, t[3], 0.3),
            (p("ffn_norm.weight"), 1, HIDDEN, F32, 0.2),
            (p("ffn_gate.weight"), FFN, HIDDEN, t[4], 0.3),
            (p("ffn_up.weight"), FFN, HIDDEN, t[5], 0.3),
            (p("ffn_down.weight"), HIDDEN, FFN, t[6], 0.3),
        ]);
    }
    specs.push(("output_norm.weight".into(), 1, HIDDEN, F32, 0.2));
    specs.push(("output.weight".into(), VOCAB, HIDDEN, Q4K, 0.5));

    let mut r = Rng(11);
    let tensors: Vec<(String, QTensor)> = specs
        .into_iter()
        .map(|(name, rows, cols, dtype, scale)| {
            // Norm weights around 1, everything else around 0.
            let offset = if name.contains("norm") { 1.0 } else { 0.0 };
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| r.next() * scale + offset)
                .collect();
            let t = if rows == 1 {
                Tensor::from_vec(v, cols, &Device::Cpu).unwrap()
            } else {
                Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            (name, QTensor::quantize(&t, dtype).unwrap())
        })
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn output_bits(out: &StageOutput) -> Vec<u32> {
    match out {
        StageOutput::Logits(t) | StageOutput::Hidden(t) => bits(t),
    }
}

/// One session's step: its input (token ids, or hidden states for a later stage), where
/// its tokens sit, and which logits it wants.
#[derive(Clone)]
struct Step {
    tokens: Vec<u32>,
    hidden: Option<Tensor>,
    positions: Vec<usize>,
    logits: Logits,
}

impl Step {
    fn tokens(tokens: Vec<u32>, first: usize, logits: Logits) -> Self {
        let positions = (first..first + tokens.len()).collect();
        Step {
            tokens,
            hidden: None,
            positions,
            logits,
        }
    }

    fn input(&self) -> StageInput<'_> {
        match &self.hidden {
            Some(h) => StageInput::Hidden(h.clone()),
            None => StageInput::Tokens(&self.tokens),
        }
    }
}

/// Runs `steps` (one per session) on `stage` both ways — all in one `forward_batch` on
/// `batched`, each alone with `forward` on `single` — and checks every output (or error)
/// is the same. Returns the outputs.
fn check_round(
    stage: &Stage,
    steps: &[Step],
    batched: &mut [KvCache],
    single: &mut [KvCache],
    what: &str,
) -> Vec<Option<StageOutput>> {
    let alone: Vec<_> = steps
        .iter()
        .zip(single.iter_mut())
        .map(|(s, cache)| stage.forward(s.input(), &s.positions, cache, s.logits))
        .collect();
    let items: Vec<BatchItem<'_>> = steps
        .iter()
        .zip(batched.iter_mut())
        .map(|(s, cache)| BatchItem {
            input: s.input(),
            positions: &s.positions,
            cache,
            logits: s.logits,
        })
        .collect();
    let together = stage.forward_batch(items);
    assert_eq!(together.len(), steps.len());
    let mut outs = Vec::new();
    for (i, (a, b)) in alone.into_iter().zip(together).enumerate() {
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert!(
                    output_bits(&a) == output_bits(&b),
                    "{what}: session {i}'s output differs when batched"
                );
                outs.push(Some(b));
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string(), "{what}: session {i}");
                outs.push(None);
            }
            (a, b) => panic!(
                "{what}: session {i}: alone {:?}, batched {:?}",
                a.err().map(|e| e.to_string()),
                b.err().map(|e| e.to_string())
            ),
        }
    }
    for (i, (b, s)) in batched.iter().zip(single.iter()).enumerate() {
        assert_eq!(b.positions(), s.positions(), "{what}: session {i}'s cache");
    }
    outs
}

/// The rounds of steps the random-model test feeds: prompts of lengths that take each of
/// the k-quants' orders (1, 3, 4 and 9 rows: Q6_K's lanes and tiles, Q4_K's pairs,
/// blocks and tiles), one of them after a history and away from position 0; then single
/// tokens; then a round with a session whose token is outside the vocabulary. Some
/// sessions want normed hidden states (embeddings) among others' logits.
fn random_rounds() -> Vec<Vec<Step>> {
    let t = |v: &[u32]| v.to_vec();
    vec![
        // Histories, fed alone first (one session per round is fine).
        vec![
            Step::tokens(t(&[1, 2, 3, 4, 5]), 0, Logits::Last),
            Step::tokens(t(&[9; 12]), 0, Logits::All),
        ],
        vec![
            Step::tokens(t(&[6]), 5, Logits::Last),
            // Embeddings' rows (the final norm's output, no logits) among logits rows.
            Step::tokens(t(&[10, 11, 12]), 12, Logits::Normed),
            Step::tokens(t(&[3, 1, 4, 1, 5, 9, 2, 6, 5]), 0, Logits::Last),
            Step::tokens(t(&[7, 7, 8, 8]), 30, Logits::All),
        ],
        vec![
            Step::tokens(t(&[13]), 6, Logits::Last),
            Step::tokens(t(&[14]), 15, Logits::Last),
            Step::tokens(t(&[15]), 9, Logits::Normed),
            Step::tokens(t(&[16]), 34, Logits::Last),
        ],
        vec![
            Step::tokens(t(&[17, 18]), 7, Logits::All),
            Step::tokens(t(&[VOCAB as u32]), 16, Logits::Last),
            Step::tokens(t(&[19]), 10, Logits::Last),
            Step::tokens(t(&[20; 8]), 35, Logits::Last),
        ],
    ]
}

/// The rounds through the whole model, and through two stages (the first hands the second
/// its hidden states: token ids in, hidden out; hidden in, logits out).
fn check_random_model(stages: &[Stage], whole: &Stage) {
    let n = 4;
    let new = |s: &Stage| (0..n).map(|_| s.new_cache()).collect::<Vec<_>>();
    let (mut wb, mut ws) = (new(whole), new(whole));
    let mut caches: Vec<(Vec<KvCache>, Vec<KvCache>)> =
        stages.iter().map(|s| (new(s), new(s))).collect();
    for (r, round) in random_rounds().iter().enumerate() {
        let k = round.len();
        check_round(
            whole,
            round,
            &mut wb[..k],
            &mut ws[..k],
            &format!("whole, round {r}"),
        );
        let mut steps = round.clone();
        for (i, (stage, (b, s))) in stages.iter().zip(caches.iter_mut()).enumerate() {
            let outs = check_round(
                stage,
                &steps,
                &mut b[..k],
                &mut s[..k],
                &format!("stage {i}, round {r}"),
            );
            // The next stage gets the hidden states of the sessions that went through.
            steps = steps
                .into_iter()
                .zip(outs)
                .map(|(mut step, out)| {
                    step.hidden = match out {
                        Some(StageOutput::Hidden(h)) => Some(h),
                        // A session that failed here feeds garbage on: it fails there too.
                        _ => Some(
                            Tensor::zeros(
                                (1, 1),
                                shoal_engine::candle_core::DType::F32,
                                &Device::Cpu,
                            )
                            .unwrap(),
                        ),
                    };
                    step
                })
                .collect();
        }
    }
}

#[test]
fn a_batch_equals_each_session_alone_on_every_format_and_thread_count() {
    let dir = std::env::temp_dir().join(format!("shoal-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    write_model(&path);
    let file = GgufFile::open(&path).unwrap();
    let load = |spec| Stage::load(&file, spec, &Device::Cpu, |_, _| {}).unwrap();
    let whole = load(StageSpec::whole(LAYERS));
    let stages = [
        load(StageSpec::range(0..1, LAYERS)),
        load(StageSpec::range(1..LAYERS, LAYERS)),
    ];
    for threads in [1, 2] {
        shoal_engine::with_kernel_threads(threads, || check_random_model(&stages, &whole));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The real models: four sessions' prompts of different lengths (one after a history),
/// then a few decode steps, batched against alone, logits bit for bit.
fn check_real_model(file: &str) {
    let gguf = GgufFile::open(common::model_path(file)).unwrap();
    let n_layers = gguf.config().n_layers;
    let stage = Stage::load(&gguf, StageSpec::whole(n_layers), &Device::Cpu, |_, _| {}).unwrap();
    let prompt = |seed: u32, len: usize| -> Vec<u32> {
        (0..len as u32)
            .map(|i| (seed * 7919 + i * 104_729) % 30_000 + 100)
            .collect()
    };
    let new = || (0..4).map(|_| stage.new_cache()).collect::<Vec<_>>();
    let (mut b, mut s) = (new(), new());
    // Session 1 has a history of 6 tokens.
    check_round(
        &stage,
        &[Step::tokens(prompt(1, 6), 0, Logits::Last)],
        &mut b[1..2],
        &mut s[1..2],
        "history",
    );
    let mut steps = vec![
        Step::tokens(prompt(0, 13), 0, Logits::Last),
        Step::tokens(prompt(1, 3), 6, Logits::Last),
        Step::tokens(prompt(2, 1), 0, Logits::Last),
        Step::tokens(prompt(3, 9), 0, Logits::All),
    ];
    for round in 0..4 {
        let outs = check_round(
            &stage,
            &steps,
            &mut b,
            &mut s,
            &format!("{file} round {round}"),
        );
        // Feed each session its greedy token.
        steps = steps
            .iter()
            .zip(outs)
            .map(|(step, out)| {
                let Some(StageOutput::Logits(l)) = out else {
                    panic!("logits expected")
                };
                let last = l.dims2().unwrap().0 - 1;
                let row = shoal_engine::stage::logits_row(&l, last).unwrap();
                let token = shoal_engine::sampler::argmax(&row);
                let next = step.positions.last().unwrap() + 1;
                Step::tokens(vec![token], next, Logits::Last)
            })
            .collect();
    }
}

#[test]
fn a_batch_equals_each_session_alone_on_smollm2() {
    check_real_model(common::SMOLLM2);
}

#[test]
fn a_batch_equals_each_session_alone_on_qwen() {
    check_real_model(common::QWEN05);
}
