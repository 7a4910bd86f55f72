//! The Hugging Face route: a plain HTTP(S) download that survives interruptions.
//!
//! The file is written to `FILE.part`. When a `.part` is already there, the request asks
//! for the rest (`Range: bytes=N-`) and appends if the server answers `206 Partial
//! Content` with a `Content-Range` that starts at N; a `200` means the server ignores
//! ranges, so the download starts over. Only when the size and SHA-256 of the whole file
//! are right is `FILE.part` renamed to `FILE`: a bad file never sits under the final name.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::{hex, install_verified, Expected, Progress};

/// How many times a download is tried (resuming each time) before giving up.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// `dest` with `.part` appended: where a download in progress lives.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        // Statuses are answers we handle (206, 200, 416, 404…), not errors.
        .http_status_as_error(false)
        .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // A stalled connection is an interruption, resumed by the next attempt.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Downloads `url` to `dest`, resuming from `dest.part` when present, retrying transient
/// failures up to `attempts` times (at least once), and verifying size and SHA-256 before
/// the file is renamed into place.
///
/// A checksum or size mismatch deletes the `.part` (resuming it could never succeed); an
/// interruption that outlasts the attempts keeps it, so the next call resumes.
pub fn download(
    url: &str,
    dest: &Path,
    expected: Expected<'_>,
    attempts: u32,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let part = part_path(dest);
    let label = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let agent = agent();
    let attempts = attempts.max(1);
    let mut attempt = 0;
    let (size, sha) = loop {
        attempt += 1;
        match download_once(&agent, url, &part, &label, expected, progress) {
            Ok(done) => break done,
            Err(e) if e.is_transient() && attempt < attempts => {
                progress(Progress::Warning(format!(
                    "retrying {label} ({e}) [{}/{attempts}]",
                    attempt + 1
                )));
                std::thread::sleep(Duration::from_millis(250 * u64::from(attempt)));
            }
            Err(e) => return Err(e),
        }
    };
    install_verified(&part, dest, size, &sha, expected)
}

/// One request: continue or restart `part`; returns the bytes and SHA-256 of the whole
/// file once the body has been read to its end.
fn download_once(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    label: &str,
    expected: Expected<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(u64, String)> {
    let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if have > expected.size {
        remove(part)?;
        have = 0;
    }
    if have == expected.size {
        // A finished `.part` whose rename did not happen: just check it.
        progress(Progress::Step(format!("verifying {label}")));
        return Ok((have, hash_file(part)?));
    }
    progress(Progress::Step(if have > 0 {
        format!("resuming {label} at {have} bytes")
    } else {
        format!("downloading {label}")
    }));
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = request.call().map_err(|source| Error::Http {
        url: url.to_string(),
        source: Box::new(source),
    })?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_length = header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    let mut hasher = Sha256::new();
    let mut file = match status {
        206 => {
            let range = header("content-range").unwrap_or_default();
            match parse_content_range(&range) {
                Some((start, total))
                    if start == have && total.is_none_or(|t| t == expected.size) =>
                {
                    hash_prefix(part, have, &mut hasher)?;
                    OpenOptions::new()
                        .append(true)
                        .open(part)
                        .map_err(Error::io("cannot open", part))?
                }
                _ => {
                    // Not the rest of our file: drop what we have and start over.
                    remove(part)?;
                    return Err(Error::BadContentRange {
                        url: url.to_string(),
                        have,
                        content_range: range,
                    });
                }
            }
        }
        200 => {
            // The whole file (a server without Range support, or no `.part`): start over.
            have = 0;
            File::create(part).map_err(Error::io("cannot create", part))?
        }
        416 => {
            // Range Not Satisfiable: the `.part` does not fit the file on the server.
            remove(part)?;
            return Err(Error::BadContentRange {
                url: url.to_string(),
                have,
                content_range: header("content-range").unwrap_or_default(),
            });
        }
        status => {
            return Err(Error::HttpStatus {
                url: url.to_string(),
                status,
            })
        }
    };
    // A 200 must carry the whole file (a 206 was checked against its Content-Range).
    if let (200, Some(len)) = (status, content_length) {
        if len != expected.size {
            drop(file);
            remove(part)?;
            return Err(Error::SizeMismatch {
                file: label.to_string(),
                expected: expected.size,
                got: len,
            });
        }
    }
    progress(Progress::Bytes {
        done: have,
        total: expected.size,
    });
    let mut body = response.body_mut().as_reader();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                // Keep what arrived: the next attempt resumes from here.
                file.flush().map_err(Error::io("cannot write", part))?;
                return Err(Error::Interrupted {
                    url: url.to_string(),
                    done: have,
                    total: expected.size,
                    source,
                });
            }
        };
        if have + k as u64 > expected.size {
            drop(file);
            remove(part)?;
            return Err(Error::SizeMismatch {
                file: label.to_string(),
                expected: expected.size,
                got: have + k as u64,
            });
        }
        file.write_all(&buf[..k])
            .map_err(Error::io("cannot write", part))?;
        hasher.update(&buf[..k]);
        have += k as u64;
        progress(Progress::Bytes {
            done: have,
            total: expected.size,
        });
    }
    file.sync_all().map_err(Error::io("cannot write", part))?;
    if have < expected.size {
        return Err(Error::Interrupted {
            url: url.to_string(),
            done: have,
            total: expected.size,
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok((have, hex(hasher)))
}

/// `bytes START-END/TOTAL` → (START, TOTAL if not `*`).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("cannot remove", path)(e))
        }
        _ => Ok(()),
    }
}

/// Feeds the first `len` bytes of `path` to `hasher`.
fn hash_prefix(path: &Path, len: u64, hasher: &mut Sha256) -> Result<()> {
    let file = File::open(path).map_err(Error::io("cannot open", path))?;
    let mut reader = file.take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = reader
            .read(&mut buf)
            .map_err(Error::io("cannot read", path))?;
        if k == 0 {
            return Ok(());
        }
        hasher.update(&buf[..k]);
    }
}

/// SHA-256 of a whole file, lowercase hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    hash_prefix(path, u64::MAX, &mut hasher)?;
    Ok(hex(hasher))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes */200"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn part_path_appends() {
        assert_eq!(
            part_path(Path::new("/m/a.gguf")),
            PathBuf::from("/m/a.gguf.part")
        );
    }
}
