#![allow(clippy::unwrap_used, clippy::expect_used)]
// Lists of region ranges (`WeightsWant`) often hold one range.
#![allow(clippy::single_range_in_vec_init)]
//! Weights over the LAN (issue #15 item 4), on real sockets: stage servers whose models
//! directories are empty get their layers from the head, answer token for token as the
//! single process does, keep the stage files for next time, and refuse a transfer whose
//! bytes do not match the holder's hashes — keeping only the regions that matched, checked
//! again before they are resumed (after a restart too). Where a member before a stage in
//! the ring holds the model, the stage gets its layers from that member.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_outside_the_ring_that_holds_the_model_sends_the_layers_not_the_head() {
    // D holds the model file and runs no stage; C's models directory is empty. Named to the
    // head as a holder, D sends C its layers, and the head's uplink stays with the ring.
    let (dir_c, dir_d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::os::unix::fs::symlink(model_path(), dir_d.path().join(SMOLLM2)).unwrap();
    let (server_c, c) = serve(dir_c.path()).await;
    let (server_d, d) = serve(dir_d.path()).await;
    let mut config = PipelineConfig::new(
        model_path(),
        0..15,
        vec![PeerStage {
            addr: c,
            layers: 15..30,
        }],
    );
    config.weight_holders = shoal_pipeline::WeightHolders::new(move || vec![d]);
    let pipeline = Pipeline::connect(config).await.unwrap();
    let prompt = chat_prompt("What is the capital of France?");
    let out = pipeline
        .generate(&prompt, &SamplingParams::greedy(), 24)
        .await
        .unwrap();
    assert_eq!(out, single_process(&prompt));
    let files = kept(dir_c.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let share = std::fs::metadata(&files[0]).unwrap().len();
    assert_eq!(
        server_d.weights_sent_bytes(),
        share,
        "D sent the whole share"
    );
    assert_eq!(server_c.weights_sent_bytes(), 0);
    assert!(kept(dir_d.path()).is_empty(), "D runs from its own file");
}

/// The regions each request to a holder asked for (`WeightsWant`), one list per request.
type Asked = Arc<std::sync::Mutex<Vec<Vec<Range<u32>>>>>;

/// A holder at the edge of the test (a fake: no real member sends bad bytes, or stops
/// mid-transfer on cue) that answers every `GetWeights` with the manifest it was built
/// with, then sends the regions the node wants from the bytes it has (the file's first
/// `bytes.len()`), one after another, and closes when those run out; it notes the regions
/// each request wanted.
struct FakeHolder {
    manifest: WeightsManifest,
    bytes: Vec<u8>,
    asked: Asked,
    /// A pause after each chunk: a slow link.
    pause: Duration,
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
            let Some(Message::WeightsWant(want)) = conn.read_frame().await? else {
                panic!("no WeightsWant after the manifest");
            };
            self.asked.lock().unwrap().push(want.regions.clone());
            let offsets = offsets(&self.manifest);
            let mut sent: Vec<u8> = Vec::new();
            for i in want
                .regions
                .iter()
                .flat_map(|r| r.start as usize..r.end as usize)
            {
                let (start, len) = (offsets[i] as usize, self.manifest.regions[i].len as usize);
                let end = (start + len).min(self.bytes.len());
                sent.extend_from_slice(&self.bytes[start.min(end)..end]);
                if end < start + len {
                    break;
                }
            }
            for piece in sent.chunks(64 * 1024) {
                conn.write_frame(&Message::WeightsChunk(WeightsChunk {
                    data: piece.to_vec().into(),
                }))
                .await?;
                tokio::time::sleep(self.pause).await;
            }
        }
        Err(WireError::Closed {
            expected: "nothing",
        })
    }
}

/// Where each region of `manifest` starts.
fn offsets(manifest: &WeightsManifest) -> Vec<u64> {
    let mut at = 0;
    manifest
        .regions
        .iter()
        .map(|r| {
            at += r.len;
            at - r.len
        })
        .collect()
}

async fn start_fake_holder(manifest: WeightsManifest, bytes: Vec<u8>) -> SocketAddr {
    start_noting_holder(manifest, bytes).await.0
}

/// [`start_fake_holder`], and the regions each request to it wanted.
async fn start_noting_holder(manifest: WeightsManifest, bytes: Vec<u8>) -> (SocketAddr, Asked) {
    start_slow_holder(manifest, bytes, Duration::ZERO).await
}

/// [`start_noting_holder`] over a slow link: `pause` after each chunk.
async fn start_slow_holder(
    manifest: WeightsManifest,
    bytes: Vec<u8>,
    pause: Duration,
) -> (SocketAddr, Asked) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Asked::default();
    let holder = Arc::new(FakeHolder {
        manifest,
        bytes,
        asked: asked.clone(),
        pause,
    });
    tokio::spawn(serve_peers(
        listener,
        ServeConfig::default(),
        holder,
        std::future::pending(),
    ));
    (addr, asked)
}

/// Sends a `LoadStage` for layers 10..20 of SmolLM2 that names `holder`, and returns the
/// stage server's answer.
async fn load_from(stage: SocketAddr, holder: SocketAddr) -> Message {
    load_from_any(stage, &[holder]).await
}

/// [`load_from`] naming `holders`, asked in that order.
async fn load_from_any(stage: SocketAddr, holders: &[SocketAddr]) -> Message {
    load_layers(stage, 10..20, holders).await
}

/// [`load_from_any`] for `layers` (within 1..29: no end of the model).
async fn load_layers(stage: SocketAddr, layers: Range<u32>, holders: &[SocketAddr]) -> Message {
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
        layer_start: layers.start,
        layer_end: layers.end,
        embed: false,
        head: false,
        activation_dtype: DType::F32,
        max_context: 2048,
        next: Some(holders[0]),
        weights_from: holders.to_vec(),
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
async fn altered_or_short_transfers_are_refused_and_only_whole_regions_are_kept() {
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
    // (Past the 4,000 bytes the short holder below sends, so that region stays bad on disk.)
    altered[4500] ^= 1;
    let holder = start_fake_holder(manifest.clone(), altered).await;
    let Message::Error(e) = load_from(stage, holder).await else {
        panic!("an altered transfer was accepted")
    };
    assert_eq!(e.code, ErrorCode::MODEL_UNAVAILABLE);
    assert!(e.message.contains("region 1"), "{}", e.message);
    assert!(e.message.contains("SHA-256"), "{}", e.message);
    // No stage file; the first region, whole and checked, is kept to resume from.
    assert_eq!(unfinished(dir.path()), Some(2000));

    // The holder stops short: asked for the region not held, it sends part of it.
    let (holder, asked) = start_noting_holder(manifest.clone(), bytes[..4000].to_vec()).await;
    let Message::Error(e) = load_from(stage, holder).await else {
        panic!("a short transfer was accepted")
    };
    assert!(
        e.message.contains("ended the transfer early"),
        "{}",
        e.message
    );
    assert_eq!(*asked.lock().unwrap(), vec![vec![1..2]]);
    assert_eq!(unfinished(dir.path()), Some(2000));

    // Bytes that match their hashes but are no GGUF file: refused at loading, nothing kept,
    // and the stage server still serves (a real load after it works).
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

/// The share of layers 10..20 of SmolLM2 as a holder sends it: the stage file's bytes and
/// its manifest (a region per tensor, each with its SHA-256).
fn real_share() -> (Vec<u8>, WeightsManifest) {
    share_of(10..20)
}

/// [`real_share`] of `layers`.
fn share_of(layers: Range<usize>) -> (Vec<u8>, WeightsManifest) {
    let file = shoal_engine::GgufFile::open(model_path()).unwrap();
    let spec = shoal_engine::StageSpec {
        layers,
        embed: false,
        head: false,
    };
    let layout = shoal_engine::StageFile::plan(&file, &spec).unwrap();
    let mut bytes = vec![0u8; layout.len() as usize];
    layout.read(&file, 0, &mut bytes).unwrap();
    let regions = layout
        .regions()
        .into_iter()
        .map(|r| WeightsRegion {
            len: r.end - r.start,
            sha256: Sha256::digest(&bytes[r.start as usize..r.end as usize]).into(),
        })
        .collect();
    let manifest = WeightsManifest {
        file_len: layout.len(),
        regions,
    };
    (bytes, manifest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_short_is_finished_by_the_next_holder_from_where_it_stopped() {
    let (bytes, manifest) = real_share();
    // A sends 60 % of the share and vanishes; B (a stage server with the model) is next.
    let cut = bytes.len() * 6 / 10;
    let (a, a_asked) = start_noting_holder(manifest.clone(), bytes[..cut].to_vec()).await;
    let dir_b = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(model_path(), dir_b.path().join(SMOLLM2)).unwrap();
    let (server_b, b) = serve(dir_b.path()).await;
    let dir_c = tempfile::tempdir().unwrap();
    let c = start_server(dir_c.path()).await;
    let reply = load_from_any(c, &[a, b]).await;
    assert!(matches!(reply, Message::StageReady(_)), "{reply:?}");

    // C keeps the share byte for byte (and no `.part` file); B sent only what follows the
    // last region A sent whole.
    let files = kept(dir_c.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        std::fs::read(&files[0]).unwrap() == bytes,
        "the share as received"
    );
    let whole = whole_regions(&manifest, cut);
    assert!(
        whole > 0 && whole < cut as u64,
        "A sent {whole} bytes of whole regions"
    );
    let all = 0..manifest.regions.len() as u32;
    assert_eq!(*a_asked.lock().unwrap(), vec![vec![all.clone()]]);
    assert_eq!(server_b.weights_sent_bytes(), bytes.len() as u64 - whole);

    // A holder whose manifest cuts the share otherwise (its first two regions as one):
    // its regions are not the next holder's, so the next is asked for all of them.
    let mut other = manifest.clone();
    let (first, second) = (other.regions[0], other.regions[1]);
    let len = (first.len + second.len) as usize;
    other.regions.splice(
        0..2,
        [WeightsRegion {
            len: len as u64,
            sha256: Sha256::digest(&bytes[..len]).into(),
        }],
    );
    let (a2, _) = start_noting_holder(other, bytes[..cut].to_vec()).await;
    let (b2, b2_asked) = start_noting_holder(manifest.clone(), bytes.clone()).await;
    let dir_d = tempfile::tempdir().unwrap();
    let d = start_server(dir_d.path()).await;
    let reply = load_from_any(d, &[a2, b2]).await;
    assert!(matches!(reply, Message::StageReady(_)), "{reply:?}");
    let files = kept(dir_d.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        std::fs::read(&files[0]).unwrap() == bytes,
        "the share as received"
    );
    assert_eq!(*b2_asked.lock().unwrap(), vec![vec![all.clone()]]);

    // Every holder fails: the whole regions received are kept (no stage file).
    let (a3, _) = start_noting_holder(manifest.clone(), bytes[..cut].to_vec()).await;
    let (a4, a4_asked) = start_noting_holder(manifest.clone(), bytes[..cut + 1000].to_vec()).await;
    let dir_e = tempfile::tempdir().unwrap();
    let e = start_server(dir_e.path()).await;
    let Message::Error(err) = load_from_any(e, &[a3, a4]).await else {
        panic!("a share no holder sent whole was loaded")
    };
    assert!(
        err.message.contains("ended the transfer early"),
        "{}",
        err.message
    );
    assert_eq!(
        *a4_asked.lock().unwrap(),
        vec![vec![whole_count(&manifest, cut)..all.end]],
        "the second resumed the first"
    );
    let held = whole_regions(&manifest, cut + 1000);
    assert_eq!(unfinished(dir_e.path()), Some(held));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_regions_a_transfer_left_are_checked_again_and_resumed_after_a_restart() {
    let (bytes, manifest) = real_share();
    let cut = bytes.len() * 7 / 10;
    let (a, _) = start_noting_holder(manifest.clone(), bytes[..cut].to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let first = start_server(dir.path()).await;
    assert!(matches!(load_from(first, a).await, Message::Error(_)));
    let held = whole_regions(&manifest, cut);
    assert_eq!(unfinished(dir.path()), Some(held));

    // A byte of the kept regions goes bad on disk while the node is down: the region it
    // falls in is not held.
    let part = part_file(dir.path()).unwrap();
    let bad = (held / 2) as usize;
    let mut on_disk = std::fs::read(&part).unwrap();
    on_disk[bad] ^= 0x40;
    std::fs::write(&part, &on_disk).unwrap();

    // A new stage server on the same directory (a node restarted: nothing in memory) asked
    // for the stage again asks for the regions not held only: the one gone bad and those
    // the first holder never sent.
    let (b, b_asked) = start_noting_holder(manifest.clone(), bytes.clone()).await;
    let restarted = start_server(dir.path()).await;
    let reply = load_from(restarted, b).await;
    assert!(matches!(reply, Message::StageReady(_)), "{reply:?}");
    let gone_bad = whole_count(&manifest, bad);
    let sent = whole_count(&manifest, cut);
    assert!(gone_bad + 1 < sent, "region {gone_bad} of {sent}");
    let n = manifest.regions.len() as u32;
    assert_eq!(
        *b_asked.lock().unwrap(),
        vec![vec![gone_bad..gone_bad + 1, sent..n]]
    );
    let files = kept(dir.path());
    assert_eq!(files.len(), 1, "only the stage file: {files:?}");
    assert!(
        std::fs::read(&files[0]).unwrap() == bytes,
        "the share as received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_asked_for_twice_at_once_is_fetched_once() {
    // A head that timed out sends its `LoadStage` again while the first still fetches: one
    // transfer, and both answered when it ends (before, both fetches wrote one `.part`).
    let (bytes, manifest) = real_share();
    let (a, a_asked) = start_slow_holder(manifest, bytes.clone(), Duration::from_millis(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let c = start_server(dir.path()).await;
    let holders = [a];
    let (first, second) = tokio::join!(load_from_any(c, &holders), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        load_from_any(c, &holders).await
    });
    assert!(matches!(first, Message::StageReady(_)), "{first:?}");
    assert!(matches!(second, Message::StageReady(_)), "{second:?}");
    assert_eq!(a_asked.lock().unwrap().len(), 1, "one transfer");
    let files = kept(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        std::fs::read(&files[0]).unwrap() == bytes,
        "the share as received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_that_grows_keeps_the_tensors_it_had_and_is_sent_the_rest_only() {
    // C ran layers 12..20 (sent by B, which holds the model); a member left and the ring
    // was planned again: C is asked for 10..20. It copies layers 12..19 from the stage file
    // it kept, and B sends the header and layers 10 and 11 only.
    let dir_b = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(model_path(), dir_b.path().join(SMOLLM2)).unwrap();
    let (server_b, b) = serve(dir_b.path()).await;
    let dir_c = tempfile::tempdir().unwrap();
    let (server_c, c) = serve(dir_c.path()).await;
    let reply = load_layers(c, 12..20, &[b]).await;
    assert!(matches!(reply, Message::StageReady(_)), "{reply:?}");
    let (old, old_manifest) = share_of(12..20);
    assert_eq!(server_b.weights_sent_bytes(), old.len() as u64);

    let reply = load_layers(c, 10..20, &[b]).await;
    assert!(matches!(reply, Message::StageReady(_)), "{reply:?}");
    let (bytes, manifest) = share_of(10..20);
    let kept_before: Vec<[u8; 32]> = old_manifest.regions.iter().map(|r| r.sha256).collect();
    let not_kept: u64 = manifest
        .regions
        .iter()
        .filter(|r| !kept_before.contains(&r.sha256))
        .map(|r| r.len)
        .sum();
    let sent = server_b.weights_sent_bytes() - old.len() as u64;
    assert_eq!(sent, not_kept, "B sent what C did not keep");
    assert!(
        sent < bytes.len() as u64 / 3,
        "{sent} of {} bytes sent",
        bytes.len()
    );
    // C's counts: both shares' bytes received, and the rest of the new one taken from the
    // file it kept.
    let counts = server_c.weight_counts();
    assert_eq!(counts.received, old.len() as u64 + not_kept);
    assert_eq!(counts.reused, bytes.len() as u64 - not_kept);
    assert_eq!(counts.sent, 0);
    // The new share, byte for byte; the file it covers is gone.
    let files = kept(dir_c.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_str().unwrap().ends_with(".layers-10-20.gguf"));
    assert!(
        std::fs::read(&files[0]).unwrap() == bytes,
        "the share as assembled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_sends_the_regions_wanted_waits_for_them_past_its_idle_timeout_and_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(model_path(), dir.path().join(SMOLLM2)).unwrap();
    let mut config = StageServerConfig::new(dir.path());
    config.transport.idle_timeout = Duration::from_secs(1);
    let server = StageServer::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let holder = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    let (bytes, manifest) = real_share();
    let n = manifest.regions.len() as u32;

    // A node that asks, then takes 2 s to say what it wants (copying regions it kept):
    // past the holder's 1 s idle timeout, it still gets them, and exactly them.
    let mut conn = Connection::connect(holder, Limits::default())
        .await
        .unwrap();
    client_handshake(
        &mut conn,
        Hello {
            node_id: "test-node".into(),
            software_version: "test".into(),
            capabilities: Capabilities::STAGE,
        },
    )
    .await
    .unwrap();
    let ask = Message::GetWeights(shoal_wire::GetWeights {
        model_id: SMOLLM2.into(),
        model_sha256: file_sha256(&model_path()).unwrap(),
        layer_start: 10,
        layer_end: 20,
        embed: false,
        head: false,
    });
    conn.write_frame(&ask).await.unwrap();
    let Some(Message::WeightsManifest(got)) = conn.read_frame().await.unwrap() else {
        panic!("no manifest");
    };
    assert_eq!(got, manifest);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let want = shoal_wire::WeightsWant {
        regions: vec![1..3, n - 1..n],
    };
    conn.write_frame(&Message::WeightsWant(want)).await.unwrap();
    let at = offsets(&manifest);
    let mut expected = bytes[at[1] as usize..at[3] as usize].to_vec();
    expected.extend_from_slice(&bytes[at[n as usize - 1] as usize..]);
    let mut received = Vec::new();
    while received.len() < expected.len() {
        match conn.read_frame().await.unwrap() {
            Some(Message::WeightsChunk(c)) => received.extend_from_slice(&c.data),
            other => panic!("{other:?} after {} bytes", received.len()),
        }
    }
    assert!(received == expected, "the regions wanted, in order");

    // Nothing wanted: nothing sent (the next frame answers a ping). Regions past the
    // manifest: refused.
    conn.write_frame(&ask).await.unwrap();
    assert!(matches!(
        conn.read_frame().await.unwrap(),
        Some(Message::WeightsManifest(_))
    ));
    let none = shoal_wire::WeightsWant { regions: vec![] };
    conn.write_frame(&Message::WeightsWant(none)).await.unwrap();
    conn.write_frame(&Message::Ping(shoal_wire::Ping { nonce: 7 }))
        .await
        .unwrap();
    assert!(matches!(
        conn.read_frame().await.unwrap(),
        Some(Message::Pong(p)) if p.nonce == 7
    ));
    // (After that round trip the holder has counted every chunk it wrote.)
    assert_eq!(server.weights_sent_bytes(), expected.len() as u64);
    conn.write_frame(&ask).await.unwrap();
    assert!(matches!(
        conn.read_frame().await.unwrap(),
        Some(Message::WeightsManifest(_))
    ));
    let past = shoal_wire::WeightsWant {
        regions: vec![0..n + 1],
    };
    conn.write_frame(&Message::WeightsWant(past)).await.unwrap();
    let Some(Message::Error(e)) = conn.read_frame().await.unwrap() else {
        panic!("regions past the manifest were not refused");
    };
    assert_eq!(e.code, ErrorCode::BAD_REQUEST);
    assert_eq!(server.weights_sent_bytes(), expected.len() as u64);
}

/// The `.part` file in `dir`'s stages directory, if there is one.
fn part_file(dir: &Path) -> Option<PathBuf> {
    kept(dir)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "part"))
}

/// The bytes of the whole regions of the unfinished transfer `dir` keeps — its `.part` file,
/// beside its manifest and lock file and no stage file — (each region checked against the
/// manifest kept beside it), or `None` when it keeps none.
fn unfinished(dir: &Path) -> Option<u64> {
    let part = part_file(dir)?;
    let names: Vec<String> = kept(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    let stage = part.file_stem().unwrap().to_str().unwrap().to_owned();
    assert_eq!(
        names,
        [
            format!("{stage}.lock"),
            format!("{stage}.part"),
            format!("{stage}.part.manifest")
        ]
    );
    let frame = std::fs::read(format!("{}.manifest", part.display())).unwrap();
    let Some((Message::WeightsManifest(manifest), _)) =
        shoal_wire::decode_frame(&frame, &Limits::default()).unwrap()
    else {
        panic!("no manifest beside the .part file");
    };
    let on_disk = std::fs::read(&part).unwrap();
    let held = manifest
        .regions
        .iter()
        .zip(offsets(&manifest))
        .filter(|(r, at)| {
            let range = *at as usize..(*at + r.len) as usize;
            on_disk
                .get(range)
                .is_some_and(|b| Sha256::digest(b)[..] == r.sha256[..])
        })
        .map(|(r, _)| r.len)
        .sum();
    Some(held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_another_node_on_the_directory_is_fetching_is_waited_for_not_fetched_twice() {
    // Another node that shares the models directory is fetching layers 10..20: as far as
    // the OS lock goes, another open file holds `<stage file>.lock` (this test). This
    // node's fetch waits for it, and then loads the file it kept without asking a holder.
    let (bytes, manifest) = real_share();
    let dir = tempfile::tempdir().unwrap();
    let stages = dir.path().join(STAGES_DIR);
    std::fs::create_dir_all(&stages).unwrap();
    let sha: String = file_sha256(&model_path())
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("{sha}.layers-10-20.gguf");
    let other_node = std::fs::File::create(stages.join(format!("{name}.lock"))).unwrap();
    other_node.lock().unwrap();
    let (holder, asked) = start_noting_holder(manifest, bytes.clone()).await;
    let stage = start_server(dir.path()).await;
    let loading = tokio::spawn(load_from(stage, holder));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!loading.is_finished(), "it waits for the other node");
    assert!(
        asked.lock().unwrap().is_empty(),
        "and asks no holder meanwhile"
    );

    // The other node is done: its stage file is there, and it lets go.
    std::fs::write(stages.join(&name), &bytes).unwrap();
    drop(other_node);
    let reply = loading.await.unwrap();
    assert!(matches!(reply, Message::StageReady(_)), "{reply:?}");
    assert!(asked.lock().unwrap().is_empty(), "no second transfer");
}

/// How many of `manifest`'s regions lie whole within its first `len` bytes.
fn whole_count(manifest: &WeightsManifest, len: usize) -> u32 {
    let mut whole = 0u64;
    let mut count = 0;
    for region in &manifest.regions {
        if whole + region.len > len as u64 {
            break;
        }
        whole += region.len;
        count += 1;
    }
    count
}

/// The bytes of the whole regions of `manifest` within its first `len` bytes.
fn whole_regions(manifest: &WeightsManifest, len: usize) -> u64 {
    let mut whole = 0u64;
    for region in &manifest.regions {
        if whole + region.len > len as u64 {
            break;
        }
        whole += region.len;
    }
    whole
}
