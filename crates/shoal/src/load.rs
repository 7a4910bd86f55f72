//! Finding and loading a model, with a progress bar.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_engine::Model;

/// The model to use: a file given by path; else a known model given by name (`qwen05`),
/// fetched into the models directory if missing; else the default model, likewise.
pub(crate) fn resolve_model(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let Some(p) = given else {
        return crate::models::ensure(shoal_models::default_model());
    };
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.as_os_str() == shoal_node::AUTO_MODEL_ID {
        // One device: the largest known model its free memory holds (a cluster's head
        // picks for all its members instead, see `serve`).
        let pick = shoal_models::hardware::Hardware::detect().recommend();
        eprintln!("--model auto: {} ({})", pick.model, pick.reason);
        let model = shoal_models::lookup(pick.model)
            .with_context(|| format!("{} is not in the registry", pick.model))?;
        return crate::models::ensure(model);
    }
    match p.to_str().and_then(shoal_models::lookup) {
        Some(model) => crate::models::ensure(model),
        None => bail!(
            "model file {} does not exist, and it is not a known model name ({}; see `shoal models`)",
            p.display(),
            shoal_models::known_names()
        ),
    }
}

/// Loads a model, showing a progress bar on a terminal.
pub(crate) fn load_model(path: &Path) -> anyhow::Result<Model> {
    let started = Instant::now();
    let bar = ProgressBar::new(0);
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
