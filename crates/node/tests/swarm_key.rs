#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The swarm key between real nodes (in-process, real sockets, the real SmolLM2): a keyed
//! ring answers exactly as one node does and a keyed swarm head asks its agent, while a
//! recording relay in the middle sees neither the prompt, nor the model's name, nor the
//! head's activations (checked against the bytes the same layers give here, which a
//! plaintext ring does show), nor a frame header in plaintext; and strangers — no key, another key — can neither load a stage, ask
//! the agent, nor head a ring of the swarm's nodes.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ask, loopback, model_path, settle, SMOLLM2};

use shoal_node::{Node, NodeConfig};
use shoal_wire::{
    client_handshake, Ask, Capabilities, ChatTurn, Connection, ErrorCode, Hello, Limits, LoadStage,
    Message, SwarmKey, Transport, WireError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MODEL_ID: &str = "smollm2-135m-instruct-q4_1";

/// 32 bytes of the hidden states the head of a `0-11,12-29` SmolLM2 ring sends its stage for
/// `question` (its third prompt row, as f32 little-endian, as they go on the wire): what an
/// eavesdropper would find in plaintext traffic.
fn head_activation_bytes(question: &str) -> Vec<u8> {
    use shoal_engine::candle_core::{DType, Device};
    use shoal_engine::{ChatMessage, GgufFile, Logits, Model, Stage, StageInput, StageOutput};
    let model = Model::load(model_path(), |_, _| {}).unwrap();
    let text = model
        .render_chat(&[ChatMessage {
            role: "user".into(),
            content: question.into(),
        }])
        .unwrap();
    let tokens = model.encode_prompt(&text).unwrap();
    let file = GgufFile::open(model_path()).unwrap();
    let n = file.config().n_layers;
    let spec = shoal_engine::StageSpec::range(0..12, n);
    let stage = Stage::load(&file, spec, &Device::Cpu, |_, _| {}).unwrap();
    let positions: Vec<usize> = (0..tokens.len()).collect();
    let mut cache = stage.new_cache();
    let StageOutput::Hidden(hidden) = stage
        .forward(
            StageInput::Tokens(&tokens),
            &positions,
            &mut cache,
            Logits::All,
        )
        .unwrap()
    else {
        panic!("a first stage gives hidden states")
    };
    let row: Vec<f32> = hidden
        .to_dtype(DType::F32)
        .unwrap()
        .get(2)
        .unwrap()
        .to_vec1()
        .unwrap();
    row[..8].iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A relay to `upstream` that records every byte of every connection, both ways.
async fn recording_relay(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (client_rx, client_tx) = client.into_split();
            let (server_rx, server_tx) = server.into_split();
            tokio::spawn(pump(client_rx, server_tx, Arc::clone(&record)));
            tokio::spawn(pump(server_rx, client_tx, Arc::clone(&record)));
        }
    });
    (addr, seen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that what a relay saw is all ciphertext: no frame header, none of `secrets`.
fn assert_sealed(seen: &[u8], secrets: &[&str]) {
    assert!(
        seen.len() > 500,
        "the relay saw the traffic: {}",
        seen.len()
    );
    assert!(
        !contains(seen, b"SHOL"),
        "a frame header crossed in plaintext"
    );
    for secret in secrets {
        assert!(
            !contains(seen, secret.as_bytes()),
            "{secret:?} crossed in plaintext"
        );
    }
}

fn keyed(mut config: NodeConfig, key: &SwarmKey) -> NodeConfig {
    config.swarm_key = Some(key.clone());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_ring_answers_as_one_node_and_shows_nothing_on_the_wire() {
    let model = model_path();
    let key = SwarmKey::generate().unwrap();
    let single = Node::start(NodeConfig::new(&model, loopback()))
        .await
        .unwrap();

    let mut stage = keyed(NodeConfig::new(&model, loopback()), &key);
    stage.peer_addr = Some(loopback());
    stage.stage_only = true;
    let stage = Node::start(stage).await.unwrap();
    let (via, seen) = recording_relay(stage.peer_addr().unwrap()).await;

    let mut head = keyed(NodeConfig::new(&model, loopback()), &key);
    head.peers = vec![via.to_string()];
    head.split = Some("0-11,12-29".into());
    let head = Node::start(head).await.unwrap();

    settle(&single).await.unwrap();
    settle(&stage).await.unwrap();
    settle(&head).await.unwrap();
    let question = "What is the capital of France?";
    let alone = ask(&single, MODEL_ID, question, 16).await;
    assert_eq!(ask(&head, MODEL_ID, question, 16).await, alone);
    // The head → stage link carried the model's name (LoadStage) and the hidden states of
    // the prompt; none of it readable.
    let seen = seen.lock().unwrap().clone();
    assert_sealed(&seen, &[SMOLLM2, MODEL_ID]);
    let activations = head_activation_bytes(question);
    assert!(
        !contains(&seen, &activations),
        "the head's activations crossed in plaintext"
    );

    // A head with another key cannot use the stage: its ring is not set up, and it says
    // why (503) while it tries again.
    let mut stranger = keyed(
        NodeConfig::new(&model, loopback()),
        &SwarmKey::generate().unwrap(),
    );
    stranger.peers = vec![stage.peer_addr().unwrap().to_string()];
    stranger.split = Some("0-11,12-29".into());
    let stranger = Node::start(stranger).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, why) = common::http(stranger.http_addr(), "GET", "/health", None).await;
        assert_eq!(status, 503, "a ring with another key: {why}");
        if why.contains("swarm key") {
            assert!(why.contains("trying again"), "{why}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and the real ring is unharmed.
    assert_eq!(ask(&head, MODEL_ID, question, 16).await, alone);

    for node in [stranger, head, stage, single] {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_swarm_asks_its_agent_in_ciphertext_and_strangers_get_nothing() {
    let model = model_path();
    let key = SwarmKey::generate().unwrap();
    let mut agent = keyed(NodeConfig::new(&model, loopback()), &key);
    agent.peer_addr = Some(loopback());
    agent.node_id = Some("agent-secret-name".into());
    let agent = Node::start(agent).await.unwrap();
    settle(&agent).await.unwrap();
    let agent_port = agent.peer_addr().unwrap();
    let (via, seen) = recording_relay(agent_port).await;

    let mut head = keyed(NodeConfig::new(&model, loopback()), &key);
    head.peers = vec![via.to_string()];
    let head = Node::start(head).await.unwrap();
    settle(&head).await.unwrap();
    let question = "Spell the word zanzibarian backwards.";
    assert!(!ask(&head, "swarm:fastest", question, 16).await.is_empty());
    let seen = seen.lock().unwrap().clone();
    assert_sealed(&seen, &[question, "zanzibarian", "agent-secret-name"]);

    // A stranger without the key is told it needs one, and gets no further.
    let mut plain = Connection::connect(agent_port, Limits::default())
        .await
        .unwrap();
    let hello = Hello {
        node_id: "stranger".into(),
        software_version: "0".into(),
        capabilities: Capabilities::HEAD,
    };
    match client_handshake(&mut plain, hello.clone()).await {
        Err(WireError::Remote { code, .. }) => assert_eq!(code, ErrorCode::UNAUTHORIZED),
        other => panic!("a plain stranger got {other:?}"),
    }
    // Even ignoring the refusal and sending requests, nothing comes back.
    let mut raw = TcpStream::connect(agent_port).await.unwrap();
    for msg in [
        Message::Hello(hello.clone()),
        Message::LoadStage(LoadStage {
            plan_id: 1,
            model_id: SMOLLM2.into(),
            model_sha256: [0; 32],
            layer_start: 0,
            layer_end: 30,
            embed: true,
            head: true,
            activation_dtype: shoal_wire::DType::F32,
            max_context: 64,
            next: None,
            weights_from: Vec::new(),
        }),
        Message::Ask(Ask {
            request_id: 1,
            system: None,
            messages: vec![ChatTurn {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: 4,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            choices: Vec::new(),
            request: None,
        }),
    ] {
        let _ = raw.write_all(&msg.to_frame().unwrap()).await;
    }
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut got)).await;
    let replies = shoal_wire::decode_frame(&got, &Limits::default());
    assert!(
        matches!(replies, Ok(Some((Message::Error(ref e), used))) if e.code == ErrorCode::UNAUTHORIZED && used == got.len()),
        "a stranger got more than one refusal: {replies:?}"
    );
    // Another key: the handshake fails, naming the cause.
    let other = Transport::with_key(Some(SwarmKey::generate().unwrap()));
    let err = other.dial(agent_port, hello).await.unwrap_err().to_string();
    assert!(err.contains("swarm keys differ"), "{err}");
    // The swarm still answers.
    assert!(!ask(&head, "swarm:fastest", "What is 2 + 2?", 16)
        .await
        .is_empty());

    head.shutdown().await.unwrap();
    agent.shutdown().await.unwrap();
}
