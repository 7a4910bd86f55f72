#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `--model auto` between real nodes (in-process, real sockets, the swarm key): a head
//! alone picks the largest known model its free memory holds; when a member joins and the
//! two hold a bigger one together, the head moves up to it between requests, says so in
//! `/v1/models`, and answers through the new ring exactly as one process with that model
//! does; an answer running when it decides to move ends as it would have, and requests
//! that come meanwhile are turned away (503); when the member goes, the head moves back
//! down.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{http, loopback, model_path};
use serde_json::{json, Value};
use shoal_node::{AutoModel, Node, NodeConfig, AUTO_MODEL_ID};
use shoal_wire::SwarmKey;

const QWEN05: &str = "qwen2.5-coder-0.5b-instruct.gguf";

/// Memory each node offers: enough for SmolLM2 alone, not for Qwen 0.5B, which two hold
/// together (`shoal_models::room`).
const OFFER: u64 = 512 << 20;

async fn model_ids(node: &Node) -> Vec<String> {
    let (status, body) = http(node.http_addr(), "GET", "/v1/models", None).await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `node` lists `id` first among its models.
async fn runs(node: &Node, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ids = model_ids(node).await;
        if ids.first().map(String::as_str) == Some(id) {
            assert_eq!(ids.get(1).map(String::as_str), Some(AUTO_MODEL_ID));
            let (status, _) = http(node.http_addr(), "GET", "/health", None).await;
            if status == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{id} never ran: {ids:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_picks_the_model_the_room_holds_moves_up_when_a_member_joins_and_back_down() {
    let models = model_path().parent().unwrap().to_path_buf();
    let qwen = models.join(QWEN05);
    assert!(qwen.is_file(), "run scripts/fetch-models.sh qwen05");
    // The head's models directory: the two smaller known models (so nothing is fetched).
    let dir = tempfile::tempdir().unwrap();
    for file in [common::SMOLLM2, QWEN05] {
        std::os::unix::fs::symlink(models.join(file), dir.path().join(file)).unwrap();
    }
    let key = [8; 32];
    let mut head = NodeConfig::new(dir.path().join(common::SMOLLM2), loopback());
    head.auto_model = Some(AutoModel {
        models_dir: dir.path().to_path_buf(),
        min_tokens_per_s: 0.0,
        fetch: None,
    });
    head.peer_addr = Some(loopback());
    head.swarm_key = Some(SwarmKey::from_bytes(key));
    head.plan_memory_bytes = Some(OFFER);
    head.cluster.detector = common::fast_detector();
    head.cluster.mdns = false;
    let head = Node::start(head).await.unwrap();

    // Alone, the head runs SmolLM2, as one process with it answers.
    runs(
        &head,
        "smollm2-135m-instruct-q4_1",
        Duration::from_secs(120),
    )
    .await;
    let single = Node::start(NodeConfig::new(model_path(), loopback()))
        .await
        .unwrap();
    common::settle(&single).await.unwrap();
    let small_question = "What is the capital of France?";
    let small_answer = common::ask(&single, "smollm2-135m-instruct-q4_1", small_question, 16).await;
    assert_eq!(
        common::ask(&head, AUTO_MODEL_ID, small_question, 16).await,
        small_answer
    );
    // A long answer, to be running on the head when the member joins.
    let long_request = |model: &str| {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": "Count from 1 to 2000, one number per line."}],
            "max_tokens": 1500,
            "ignore_eos": true,
            "temperature": 0,
        })
    };
    let long_alone = common::answer(
        single.http_addr(),
        &long_request("smollm2-135m-instruct-q4_1"),
    )
    .await;
    single.shutdown().await.unwrap();
    let running = common::open_stream(head.http_addr(), &long_request(AUTO_MODEL_ID)).await;
    let reading = tokio::spawn(running.finish());

    // A stage-only member with an empty models directory joins, offering as much: the two
    // hold Qwen 0.5B together, and the head moves up to it.
    let empty = tempfile::tempdir().unwrap();
    let mut member = NodeConfig::new(empty.path().join(common::SMOLLM2), loopback());
    member.stage_only = true;
    member.peer_addr = Some(loopback());
    member.swarm_key = Some(SwarmKey::from_bytes(key));
    member.peers = vec![head.peer_addr().unwrap().to_string()];
    member.plan_memory_bytes = Some(OFFER);
    member.cluster.detector = common::fast_detector();
    member.cluster.mdns = false;
    let member = Node::start(member).await.unwrap();
    // The head decides to move while the long answer runs: new requests are told to come
    // back later, and the answer goes on to its end on SmolLM2, as one process gives it.
    let mut turned_away = None;
    while !reading.is_finished() {
        let question = json!({
            "model": AUTO_MODEL_ID,
            "messages": [{"role": "user", "content": small_question}],
            "max_tokens": 4,
        });
        let (status, body) = http(
            head.http_addr(),
            "POST",
            "/v1/chat/completions",
            Some(&question),
        )
        .await;
        if status == 503 && body.contains("moving up to qwen05") {
            turned_away = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reading.await.unwrap(), long_alone);
    assert!(
        turned_away.is_some(),
        "the head began to move while the answer ran"
    );
    runs(
        &head,
        "qwen2.5-coder-0.5b-instruct",
        Duration::from_secs(180),
    )
    .await;

    // The ring of Qwen 0.5B over both answers as one process with it.
    let single = Node::start(NodeConfig::new(&qwen, loopback()))
        .await
        .unwrap();
    common::settle(&single).await.unwrap();
    let question = "Write a Python function that adds two numbers.";
    let alone = common::ask(&single, "qwen2.5-coder-0.5b-instruct", question, 24).await;
    assert_eq!(common::ask(&head, AUTO_MODEL_ID, question, 24).await, alone);
    assert_eq!(
        common::ask(&head, "qwen2.5-coder-0.5b-instruct", question, 24).await,
        alone
    );
    assert!(
        holds_layers(empty.path()),
        "the member got its layers of Qwen 0.5B from the head"
    );
    single.shutdown().await.unwrap();

    // The member goes: Qwen 0.5B no longer plans on the head alone, which moves back down.
    member.shutdown().await.unwrap();
    runs(&head, "smollm2-135m-instruct-q4_1", Duration::from_secs(60)).await;
    assert_eq!(
        common::ask(&head, AUTO_MODEL_ID, small_question, 16).await,
        small_answer
    );
    head.shutdown().await.unwrap();
}

/// Whether a stage file was kept in `dir`'s `stages/`.
fn holds_layers(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("stages")).is_ok_and(|d| d.count() > 0)
}
