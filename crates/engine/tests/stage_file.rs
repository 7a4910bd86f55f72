#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A stage file — a stage's share of a model as a GGUF file of its own — opens like the
//! model, carries its metadata and exactly the stage's tensors, and runs the stage bit for
//! bit as the whole file does (issue #15 item 4: what a node without the model receives).

mod common;

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use common::{model_path, SMOLLM2};
use shoal_engine::candle_core::{Device, Tensor};
use shoal_engine::{GgufFile, Logits, Stage, StageFile, StageInput, StageOutput, StageSpec};

/// Writes the stage file in uneven pieces, as a receiver would get it over the network.
fn write_stage_file(model: &GgufFile, layout: &StageFile, path: &Path) {
    let mut out = std::fs::File::create(path).unwrap();
    let mut offset = 0u64;
    let mut piece = 1usize;
    while offset < layout.len() {
        let n = (piece as u64).min(layout.len() - offset) as usize;
        let mut buf = vec![0xEE; n];
        layout.read(model, offset, &mut buf).unwrap();
        out.write_all(&buf).unwrap();
        offset += n as u64;
        piece = piece * 3 + 1_000_003; // never a multiple of a region or an alignment
    }
}

fn run(stage: &Stage, input: StageInput<'_>, positions: &[usize]) -> Tensor {
    let mut cache = stage.new_cache();
    match stage
        .forward(input, positions, &mut cache, Logits::All)
        .unwrap()
    {
        StageOutput::Hidden(t) | StageOutput::Logits(t) => t,
    }
}

/// Tokens for a stage that embeds them, hidden states for one that does not.
fn input_for<'a>(spec: &StageSpec, tokens: &'a [u32], hidden: &Tensor) -> StageInput<'a> {
    if spec.embed {
        StageInput::Tokens(tokens)
    } else {
        StageInput::Hidden(hidden.clone())
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn a_stage_file_runs_its_layers_bit_for_bit_as_the_model_does() {
    let model = GgufFile::open(model_path(SMOLLM2)).unwrap();
    let n = model.config().n_layers;
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = vec![1, 504, 3458, 282, 4649, 30];
    let positions: Vec<usize> = (0..tokens.len()).collect();
    let hidden = Tensor::randn(
        0f32,
        1.0,
        (tokens.len(), model.config().hidden),
        &Device::Cpu,
    )
    .unwrap();
    let stages: [Range<usize>; 3] = [0..9, 9..20, 20..n];
    for layers in stages {
        let spec = StageSpec::range(layers.clone(), n);
        let layout = StageFile::plan(&model, &spec).unwrap();

        // The regions tile the file, and the file is the stage's share, not the model.
        let regions = layout.regions();
        assert_eq!(regions.first().unwrap().start, 0);
        assert_eq!(regions.last().unwrap().end, layout.len());
        assert!(regions.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(regions.len(), 1 + Stage::tensor_names(&model, &spec).len());
        let whole = std::fs::metadata(model.path()).unwrap().len();
        let weights = Stage::weight_bytes(&model, &spec);
        assert!(layout.len() < whole, "{layers:?}: as large as the model");
        assert!(
            layout.len() - weights < 8 << 20,
            "{layers:?}: {} bytes for {weights} bytes of weights",
            layout.len()
        );

        let path = dir
            .path()
            .join(format!("{}-{}.gguf", layers.start, layers.end));
        write_stage_file(&model, &layout, &path);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), layout.len());
        let part = GgufFile::open(&path).unwrap();
        assert_eq!(part.config(), model.config(), "{layers:?}: the same model");
        assert_eq!(part.metadata().len(), model.metadata().len());
        for (key, value) in model.metadata() {
            let got = part.metadata().get(key).map(|v| format!("{v:?}"));
            assert_eq!(got, Some(format!("{value:?}")), "metadata {key}");
        }
        let names = Stage::tensor_names(&model, &spec);
        for name in &names {
            assert_eq!(part.tensor_bytes(name), model.tensor_bytes(name), "{name}");
        }
        assert_eq!(Stage::tensor_names(&part, &spec), names);
        if layers.end < n {
            let next = format!("blk.{}.attn_q.weight", layers.end);
            assert!(!part.has_tensor(&next), "{layers:?}: {next} came along");
        }

        let from_model = Stage::load(&model, spec.clone(), &Device::Cpu, |_, _| {}).unwrap();
        let from_part = Stage::load(&part, spec.clone(), &Device::Cpu, |_, _| {}).unwrap();
        let input = || input_for(&spec, &tokens, &hidden);
        assert_eq!(
            bits(&run(&from_part, input(), &positions)),
            bits(&run(&from_model, input(), &positions)),
            "{layers:?}: the stage file's output differs"
        );
    }
}

#[test]
fn reading_past_the_end_is_an_error() {
    let model = GgufFile::open(model_path(SMOLLM2)).unwrap();
    let n = model.config().n_layers;
    let layout = StageFile::plan(&model, &StageSpec::range(3..4, n)).unwrap();
    let mut buf = [0u8; 2];
    assert!(layout.read(&model, layout.len() - 1, &mut buf).is_err());
    assert!(layout.read(&model, layout.len() - 2, &mut buf).is_ok());
}

#[test]
fn a_stage_shared_from_the_whole_model_runs_as_a_loaded_one() {
    let (model, whole) = common::whole_stage(SMOLLM2);
    let n = model.config().n_layers;
    let hidden = Tensor::randn(0f32, 1.0, (5, model.config().hidden), &Device::Cpu).unwrap();
    let tokens: Vec<u32> = vec![1, 504, 3458, 282, 4649];
    let positions: Vec<usize> = (0..5).collect();
    for layers in [0..9, 9..20, 20..n, 0..n] {
        let spec = StageSpec::range(layers.clone(), n);
        let shared = whole.share(spec.clone()).unwrap();
        let loaded = Stage::load(&model, spec.clone(), &Device::Cpu, |_, _| {}).unwrap();
        assert_eq!(shared.spec(), loaded.spec());
        let input = || input_for(&spec, &tokens, &hidden);
        assert_eq!(
            bits(&run(&shared, input(), &positions)),
            bits(&run(&loaded, input(), &positions)),
            "{layers:?}"
        );
    }
    let middle = whole.share(StageSpec::range(9..20, n)).unwrap();
    for outside in [8..12, 15..21, 0..5] {
        assert!(
            middle.share(StageSpec::range(outside.clone(), n)).is_err(),
            "{outside:?} is not within 9..20"
        );
    }
    assert!(middle.share(StageSpec::range(10..12, n)).is_ok());
}
