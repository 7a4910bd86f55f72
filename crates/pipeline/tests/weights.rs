#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Weights over the LAN (issue #15 item 4), on real sockets: stage servers whose models
//! directories are empty get their layers from the head, answer token for token as the
//! single process does, keep the stage files for next time, and refuse a transfer whose
//! bytes do not match the holder's hashes — keeping nothing of it. Where a member before a
//! stage in the ring holds the model, the stage gets its layers from that member.

mod common;

use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shoal_engine::{GenerateParams, Model, SamplingParams};
use shoal_pipeline::{
    file_sha256, PeerStage, Pipeline, PipelineConfig, StageServer, StageServerConfig, STAGES_DIR,
};
use shoal_wire::{
    client_handshake, serve_peers, Capabilities, Connection, DType, ErrorCode, Hello, HelloAck,
    Limits, LoadStage, Message, PeerService, RemotePeer, ServeConfig, WeightsChunk,
    WeightsManifest, WeightsRegion, WireError,
};
use tokio::net::TcpListener;

use common::{model_path, SMOLLM2};

async fn start_server(models_dir: &Path) -> SocketAddr {
    serve(models_dir).await.1
}

/// A stage server on `models_dir` (a handle to it, and its address).
async fn serve(models_dir: &Path) -> (StageServer, SocketAddr) {
    let server = StageServer::new(StageServerConfig::new(models_dir));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    (server, addr)
}

/// The stage files a models directory keeps.
fn kept(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir.join(STAGES_DIR)) {
        Ok(entries) => {
            let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
            files.sort();
            files
        }
        Err(_) => Vec::new(),
    }
}

fn single_process(prompt: &[u32]) -> Vec<u32> {
    let model = Model::load(model_path(), |_, _| {}).unwrap();
    let mut g = model
        .generate(
            prompt.to_vec(),
            GenerateParams {
                sampling: SamplingParams::greedy(),
                max_tokens: 24,
                stop: Vec::new(),
                cache_prompt: false,
            },
        )
        .unwrap();
    while g.next_step().unwrap().is_some() {}
    g.generated().to_vec()
}

/// The head keeps layers 0..10, `b` runs 10..20 and `c` 20..30.
fn split_over(b: SocketAddr, c: SocketAddr) -> Vec<PeerStage> {
    vec![
        PeerStage {
            addr: b,
            layers: 10..20,
        },
        PeerStage {
            addr: c,
            layers: 20..30,
        },
    ]
}

/// The greedy answer to `prompt` of a ring with the head's `head_layers` and `layout`.
async fn ring_answer(
    head_layers: Range<usize>,
    layout: Vec<PeerStage>,
    prompt: &[u32],
) -> Vec<u32> {
    let pipeline = Pipeline::connect(PipelineConfig::new(model_path(), head_layers, layout))
        .await
        .unwrap();
    pipeline
        .generate(prompt, &SamplingParams::greedy(), 24)
        .await
        .unwrap()
}

fn chat_prompt(text: &str) -> Vec<u32> {
    let model = Model::load(model_path(), |_, _| {}).unwrap();
    let rendered = model
        .render_chat(&[shoal_engine::ChatMessage {
            role: "user".into(),
            content: text.into(),
        }])
        .unwrap();
    model.encode_prompt(&rendered).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_with_empty_model_directories_get_their_layers_and_answer_exactly() {
    let (dir_b, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (b, c) = (
        start_server(dir_b.path()).await,
        start_server(dir_c.path()).await,
    );
    let prompt = chat_prompt("What is the capital of France?");
    let expected = single_process(&prompt);
    assert_eq!(
        ring_answer(0..10, split_over(b, c), &prompt).await,
        expected,
        "the ring must answer as one process does"
    );

    let model_bytes = std::fs::metadata(model_path()).unwrap().len();
    let sha = file_sha256(&model_path()).unwrap();
    let sha_hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let mut inodes = Vec::new();
    for (dir, layers) in [(&dir_b, "10-20"), (&dir_c, "20-30.head")] {
        let files = kept(dir.path());
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(name, format!("{sha_hex}.layers-{layers}.gguf"));
        let bytes = std::fs::metadata(&files[0]).unwrap().len();
        assert!(
            bytes < model_bytes,
            "{name}: {bytes} of {model_bytes} bytes"
        );
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() == 1,
            "nothing but the stages directory"
        );
        inodes.push(std::fs::metadata(&files[0]).unwrap().ino());
    }

    // A second ring over the same nodes loads the kept files: nothing is fetched again.
    assert_eq!(
        ring_answer(0..10, split_over(b, c), &prompt).await,
        expected
    );
    for (dir, inode) in [&dir_b, &dir_c].into_iter().zip(inodes) {
        let files = kept(dir.path());
        assert_eq!(files.len(), 1);
        assert_eq!(
            std::fs::metadata(&files[0]).unwrap().ino(),
            inode,
            "the kept stage file was used, not fetched again"
        );
    }

    // A re-plan that gives a node a range inside its kept file needs no transfer either;
    // one that needs more layers fetches them and drops the file it covers.
    let moved = vec![
        PeerStage {
            addr: b,
            layers: 12..18,
        },
        PeerStage {
            addr: c,
            layers: 18..30,
        },
    ];
    assert_eq!(ring_answer(0..12, moved, &prompt).await, expected);
    let names = |dir: &Path| -> Vec<String> {
        kept(dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(dir_b.path()),
        [format!("{sha_hex}.layers-10-20.gguf")]
    );
    assert_eq!(
        names(dir_c.path()),
        [format!("{sha_hex}.layers-18-30.head.gguf")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_gets_its_layers_from_the_member_before_it_when_that_member_holds_the_model() {
    // B holds the model file; C's models directory is empty. C asks B (the node before it
    // in the ring) first, then the head.
    let (dir_b, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::os::unix::fs::symlink(model_path(), dir_b.path().join(SMOLLM2)).unwrap();
    let (server_b, b) = serve(dir_b.path()).await;
    let (server_c, c) = serve(dir_c.path()).await;
    let prompt = chat_prompt("What is the capital of France?");
    assert_eq!(
        ring_answer(0..10, split_over(b, c), &prompt).await,
        single_process(&prompt)
    );

    // C keeps its share, every byte of it sent by B; B fetched nothing (it runs from its
    // own file) and C sent nothing.
    let files = kept(dir_c.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let share = std::fs::metadata(&files[0]).unwrap().len();
    let sent = server_b.weights_sent_bytes();
    assert_eq!(sent, share, "B sent the whole share");
    assert!(kept(dir_b.path()).is_empty());
    assert_eq!(server_c.weights_sent_bytes(), 0);
}

/// A holder at the edge of the test (a fake: no real member sends bad bytes) that answers
/// every `GetWeights` with the manifest and bytes it was built with, then closes.
struct FakeHolder {
    manifest: WeightsManifest,
    bytes: Vec<u8>,
}

impl PeerService for FakeHolder {
    fn accept(&self, _hello: &Hello) -> Result<HelloAck, shoal_wire::ErrorMessage> {
        Ok(HelloAck {
            node_id: "fake-holder".into(),
            software_version: "test".into(),
            capabilities: Capabilities::HEAD,
            idle_timeout: None,
        })
    }

    async fn handle(
        &self,
        msg: Message,
        conn: &mut Connection,
        _peer: &RemotePeer,
    ) -> Result<(), WireError> {
        if let Message::GetWeights(_) = msg {
            conn.write_frame(&Message::WeightsManifest(self.manifest.clone()))
                .await?;
            for piece in self.bytes.chunks(1000) {
                conn.write_frame(&Message::WeightsChunk(WeightsChunk {
                    data: piece.to_vec().into(),
                }))
                .await?;
            }
        }
        Err(WireError::Closed {
            expected: "nothing",
        })
    }
}

async fn start_fake_holder(manifest: WeightsManifest, bytes: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = Arc::new(FakeHolder { manifest, bytes });
    tokio::spawn(serve_peers(
        listener,
        ServeConfig::default(),
        holder,
        std::future::pending(),
    ));
    addr
}

/// Sends a `LoadStage` for layers 10..20 of SmolLM2 that names `holder`, and returns the
/// stage server's answer.
async fn load_from(stage: SocketAddr, holder: SocketAddr) -> Message {
    let mut conn = Connection::connect(stage, Limits::default()).await.unwrap();
    client_handshake(
        &mut conn,
        Hello {
            node_id: "test-head".into(),
            software_version: "test".into(),
            capabilities: Capabilities::HEAD,
        },
    )
    .await
    .unwrap();
    conn.write_frame(&Message::LoadStage(LoadStage {
        plan_id: 1,
        model_id: SMOLLM2.into(),
        model_sha256: file_sha256(&model_path()).unwrap(),
        layer_start: 10,
        layer_end: 20,
        embed: false,
        head: false,
        activation_dtype: DType::F32,
        max_context: 2048,
        next: Some(holder),
        weights_from: vec![holder],
    }))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), conn.read_frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_or_short_transfers_are_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let stage = start_server(dir.path()).await;
    let bytes = vec![0x5A_u8; 5000];
    let region = |range: std::ops::Range<usize>, data: &[u8]| WeightsRegion {
        len: range.len() as u64,
        sha256: Sha256::digest(&data[range]).into(),
    };

    // One byte of the second region altered on the way.
    let manifest = WeightsManifest {
        file_len: 5000,
        regions: vec![region(0..2000, &bytes), region(2000..5000, &bytes)],
    };
    let mut altered = bytes.clone();
    altered[3333] ^= 1;
    let holder = start_fake_holder(manifest.clone(), altered).await;
    let Message::Error(e) = load_from(stage, holder).await else {
        panic!("an altered transfer was accepted")
    };
    assert_eq!(e.code, ErrorCode::MODEL_UNAVAILABLE);
    assert!(e.message.contains("region 1"), "{}", e.message);
    assert!(e.message.contains("SHA-256"), "{}", e.message);
    assert!(kept(dir.path()).is_empty(), "{:?}", kept(dir.path()));

    // The holder stops short.
    let holder = start_fake_holder(manifest.clone(), bytes[..4000].to_vec()).await;
    let Message::Error(e) = load_from(stage, holder).await else {
        panic!("a short transfer was accepted")
    };
    assert!(
        e.message.contains("ended the transfer early"),
        "{}",
        e.message
    );
    assert!(kept(dir.path()).is_empty(), "{:?}", kept(dir.path()));

    // Bytes that match their hashes but are no GGUF file: refused at loading, and the stage
    // server still serves (a real load after it works).
    let holder = start_fake_holder(manifest, bytes.clone()).await;
    let Message::Error(e) = load_from(stage, holder).await else {
        panic!("a file that is no GGUF was loaded")
    };
    assert!(!e.message.is_empty());
    assert!(kept(dir.path()).is_empty(), "{:?}", kept(dir.path()));
    let _ = std::fs::remove_dir_all(dir.path().join(STAGES_DIR));
    let real = start_server(common::models_dir().as_path()).await;
    let pipeline = Pipeline::connect(PipelineConfig::new(
        model_path(),
        0..10,
        vec![
            PeerStage {
                addr: stage,
                layers: 10..20,
            },
            PeerStage {
                addr: real,
                layers: 20..30,
            },
        ],
    ))
    .await
    .unwrap();
    let prompt = chat_prompt("Name three colours.");
    let out = pipeline
        .generate(&prompt, &SamplingParams::greedy(), 24)
        .await
        .unwrap();
    assert_eq!(out, single_process(&prompt));
    assert_eq!(kept(dir.path()).len(), 1);
}
