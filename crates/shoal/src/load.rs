//! Finding and loading a model, with a progress bar.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_engine::Model;

/// The built-in default model: small enough for every device and every test.
pub(crate) const DEFAULT_MODEL_FILE: &str = "smollm2-135m-instruct-q4_1.gguf";

/// Where models live: `$SHOAL_MODELS_DIR`, else `./models`.
pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// The model to use: the one given, else the default model in the models directory.
pub(crate) fn resolve_model(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("model file {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let default = models_dir().join(DEFAULT_MODEL_FILE);
    if default.is_file() {
        return Ok(default);
    }
    bail!(
        "no --model given and the default model {} is missing; fetch it with `scripts/fetch-models.sh smollm2`",
        default.display()
    )
}

/// Loads a model, showing a progress bar on a terminal.
pub(crate) fn load_model(path: &Path, quiet: bool) -> anyhow::Result<Model> {
    let started = Instant::now();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    bar.set_message(format!("loading {name}"));
    let model = Model::load(path, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("loading {}", path.display()))?;
    bar.finish_and_clear();
    tracing::info!(
        model = model.name(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(model)
}
