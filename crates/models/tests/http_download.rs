//! The Hugging Face route against a local stand-in for the hub (`common/hf_standin.rs`):
//! real sockets, real files, real SHA-256 checks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/hf_standin.rs"]
mod hf_standin;

use std::path::Path;
use std::sync::Arc;

use hf_standin::{test_bytes, Behaviour, HfStandIn, Seen};
use sha2::{Digest, Sha256};
use shoal_models::http::{download, part_path};
use shoal_models::{Error, Expected, Fetcher, HfFile, ModelInfo, Progress, Source, WheelPart};

const REPO: &str = "HuggingFaceTB/Test-GGUF";
const FILE: &str = "test-q4_1.gguf";
const LEN: usize = 3 * 1024 * 1024 + 123;
const CUT: u64 = 1024 * 1024 + 7;

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn serve(bytes: &Arc<Vec<u8>>, behaviour: Behaviour) -> HfStandIn {
    HfStandIn::start(vec![(REPO, FILE, bytes.clone())], behaviour)
}

fn url(server: &HfStandIn) -> String {
    format!("{}/{REPO}/resolve/main/{FILE}", server.endpoint())
}

fn hub_path() -> String {
    format!("/{REPO}/resolve/main/{FILE}")
}

fn expected(bytes: &[u8]) -> Expected<'static> {
    Expected {
        size: bytes.len() as u64,
        sha256: leak(sha(bytes)),
    }
}

/// A registry entry for the generated file, as `Fetcher::fetch` takes them.
fn model(bytes: &[u8]) -> ModelInfo {
    ModelInfo {
        name: "test",
        title: "generated test file",
        file: "test.gguf",
        size: bytes.len() as u64,
        sha256: leak(sha(bytes)),
        arch: "llama",
        wheels: &[WheelPart {
            package: "shoal-test-never-fetched",
            path: "x/test.gguf",
        }],
        hf: HfFile {
            repo: REPO,
            file: FILE,
        },
    }
}

fn assert_only_final(dir: &Path, dest: &Path, bytes: &[u8]) {
    assert_eq!(std::fs::read(dest).unwrap(), bytes);
    assert!(!part_path(dest).exists(), ".part left behind");
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn full_download_is_verified() {
    let bytes = Arc::new(test_bytes(LEN, 1));
    let server = serve(&bytes, Behaviour::hub());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let mut last = None;
    download(&url(&server), &dest, expected(&bytes), 1, &mut |p| {
        if let Progress::Bytes { done, total } = p {
            last = Some((done, total));
        }
    })
    .unwrap();
    assert_only_final(dir.path(), &dest, &bytes);
    assert_eq!(last, Some((LEN as u64, LEN as u64)));
    assert_eq!(
        server.seen(),
        vec![Seen {
            path: hub_path(),
            range: None,
            status: 200
        }]
    );
}

#[test]
fn interrupted_download_resumes_with_range() {
    let bytes = Arc::new(test_bytes(LEN, 2));
    let server = serve(
        &bytes,
        Behaviour {
            cut_after: Some(CUT),
            cut_times: 1,
            ..Behaviour::hub()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");

    // One attempt only: the connection drops after CUT bytes, which stay in `.part`.
    let err = download(&url(&server), &dest, expected(&bytes), 1, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, Error::Interrupted { done, .. } if done == CUT),
        "{err}"
    );
    assert!(err.to_string().contains("run again to resume"), "{err}");
    assert!(!dest.exists());
    assert_eq!(std::fs::metadata(part_path(&dest)).unwrap().len(), CUT);

    // The next call asks for the rest and appends it.
    download(&url(&server), &dest, expected(&bytes), 1, &mut |_| {}).unwrap();
    assert_only_final(dir.path(), &dest, &bytes);
    assert_eq!(shoal_models::http::hash_file(&dest).unwrap(), sha(&bytes));
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].range.as_deref(), seen[0].status), (None, 200));
    assert_eq!(
        (seen[1].range.clone(), seen[1].status),
        (Some(format!("bytes={CUT}-")), 206)
    );
}

#[test]
fn interruptions_are_retried_within_one_call() {
    let bytes = Arc::new(test_bytes(LEN, 3));
    let server = serve(
        &bytes,
        Behaviour {
            cut_after: Some(CUT),
            cut_times: 2,
            ..Behaviour::hub()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let mut steps = Vec::new();
    download(
        &url(&server),
        &dest,
        expected(&bytes),
        5,
        &mut |p| match p {
            Progress::Step(s) | Progress::Warning(s) => steps.push(s),
            Progress::Bytes { .. } => {}
        },
    )
    .unwrap();
    assert_only_final(dir.path(), &dest, &bytes);
    let ranges: Vec<_> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some(format!("bytes={CUT}-")),
            Some(format!("bytes={}-", 2 * CUT))
        ]
    );
    assert!(steps.iter().any(|s| s.starts_with("retrying")), "{steps:?}");
    assert!(steps
        .iter()
        .any(|s| s.contains(&format!("resuming m.gguf at {CUT} bytes"))));
}

#[test]
fn checksum_mismatch_leaves_no_file() {
    let bytes = Arc::new(test_bytes(LEN, 4));
    let server = serve(&bytes, Behaviour::hub());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let wrong = sha(b"something else");
    let err = download(
        &url(&server),
        &dest,
        Expected {
            size: LEN as u64,
            sha256: &wrong,
        },
        3,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("expected {wrong}")), "{msg}");
    assert!(msg.contains(&format!("got {}", sha(&bytes))), "{msg}");
    assert!(!dest.exists());
    assert!(!part_path(&dest).exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Not retried: the bytes arrived, they are just not the file we want.
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn server_without_range_support_restarts_cleanly() {
    let bytes = Arc::new(test_bytes(LEN, 5));
    let server = serve(
        &bytes,
        Behaviour {
            ranges: false,
            ..Behaviour::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    // A stale `.part` that does not even match the file: a 200 must replace it, not extend it.
    std::fs::write(part_path(&dest), vec![0xAAu8; 1000]).unwrap();
    download(&url(&server), &dest, expected(&bytes), 1, &mut |_| {}).unwrap();
    assert_only_final(dir.path(), &dest, &bytes);
    assert_eq!(
        server.seen(),
        vec![Seen {
            path: hub_path(),
            range: Some("bytes=1000-".into()),
            status: 200
        }]
    );
}

#[test]
fn wrong_size_from_server_is_refused() {
    let bytes = Arc::new(test_bytes(LEN, 6));
    let server = serve(&bytes, Behaviour::hub());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let err = download(
        &url(&server),
        &dest,
        Expected {
            size: LEN as u64 - 1,
            sha256: &sha(&bytes),
        },
        3,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::SizeMismatch { expected, got, .. } if expected == LEN as u64 - 1 && got == LEN as u64),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn http_status_is_reported() {
    let bytes = Arc::new(test_bytes(100, 7));
    let server = serve(&bytes, Behaviour::hub());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let missing = format!("{}/{REPO}/resolve/main/nope.gguf", server.endpoint());
    let err = download(&missing, &dest, expected(&bytes), 3, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, Error::HttpStatus { status: 404, .. }),
        "{err}"
    );
    assert_eq!(err.to_string(), format!("HTTP 404 from {missing}"));
    assert_eq!(server.seen().len(), 1, "a 404 is not retried");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The hub answers `/{repo}/resolve/main/{file}` with a redirect to its CDN; the Range
/// header must survive the redirect. Also checks the URL layout under the endpoint.
#[test]
fn fetcher_resumes_through_the_hub_redirect() {
    let bytes = Arc::new(test_bytes(LEN, 8));
    let server = serve(
        &bytes,
        Behaviour {
            redirect: true,
            cut_after: Some(CUT),
            cut_times: 1,
            ..Behaviour::hub()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let m = model(&bytes);
    let fetcher = Fetcher {
        hf_endpoint: format!("{}/", server.endpoint()),
        ..Fetcher::default()
    };
    let path = fetcher.fetch(&m, dir.path(), Source::Http, |_| {}).unwrap();
    assert_eq!(path, dir.path().join("test.gguf"));
    assert_only_final(dir.path(), &path, &bytes);
    let cdn = format!("/cdn/{FILE}");
    let seen: Vec<_> = server
        .seen()
        .into_iter()
        .map(|s| (s.path, s.range, s.status))
        .collect();
    let r = Some(format!("bytes={CUT}-"));
    assert_eq!(
        seen,
        vec![
            (hub_path(), None, 302),
            (cdn.clone(), None, 200),
            (hub_path(), r.clone(), 302),
            (cdn, r, 206),
        ]
    );

    // Fetching again finds the verified file and downloads nothing.
    fetcher.fetch(&m, dir.path(), Source::Http, |_| {}).unwrap();
    assert_eq!(server.seen().len(), 4);
}

#[test]
fn auto_falls_back_to_hugging_face_when_python_is_missing() {
    let bytes = Arc::new(test_bytes(LEN, 9));
    let server = serve(&bytes, Behaviour::hub());
    let dir = tempfile::tempdir().unwrap();
    let m = model(&bytes);
    let fetcher = Fetcher {
        hf_endpoint: server.endpoint(),
        python: Some("/nonexistent/python3".into()),
        ..Fetcher::default()
    };
    let mut steps = Vec::new();
    let path = fetcher
        .fetch(&m, dir.path(), Source::Auto, |p| {
            if let Progress::Warning(s) = p {
                steps.push(s);
            }
        })
        .unwrap();
    assert_only_final(dir.path(), &path, &bytes);
    assert!(
        steps.iter().any(|s| s.contains("trying Hugging Face")),
        "{steps:?}"
    );
}

#[test]
fn auto_reports_both_sources_when_both_fail() {
    let bytes = Arc::new(test_bytes(100, 10));
    let server = HfStandIn::start(vec![], Behaviour::hub());
    let dir = tempfile::tempdir().unwrap();
    let m = model(&bytes);
    let fetcher = Fetcher {
        hf_endpoint: server.endpoint(),
        python: Some("/nonexistent/python3".into()),
        ..Fetcher::default()
    };
    let err = fetcher
        .fetch(&m, dir.path(), Source::Auto, |_| {})
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::AllSourcesFailed { .. }), "{msg}");
    assert!(msg.contains("Python 3 was not found"), "{msg}");
    assert!(msg.contains("HTTP 404 from"), "{msg}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
