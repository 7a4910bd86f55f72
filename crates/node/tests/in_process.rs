#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Nodes started in-process on 127.0.0.1:0, talked to over real sockets: a two-node pipeline
//! (a stage-only node and a head) answers exactly what a single node answers, a swarm head
//! asks a node it was given as a peer, and a shut-down node frees its ports. Uses the real
//! SmolLM2 model. (Tests where killing a process is the point stay in `crates/shoal/tests`.)

mod common;

use common::{ask, http, loopback, model_path, settle};
use serde_json::{json, Value};
use shoal_node::{Node, NodeConfig};
use tokio::net::TcpStream;

/// Waits until the node's `/health` says ok (its model loaded, its ring connected).
async fn wait_ready(node: &Node) {
    if let Err(body) = settle(node).await {
        panic!("node at {} not ready: {body}", node.http_addr());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_pipeline_in_one_process_answers_as_one_node() {
    let model = model_path();
    let single = Node::start(NodeConfig::new(&model, loopback()))
        .await
        .unwrap();

    let mut stage = NodeConfig::new(&model, loopback());
    stage.peer_addr = Some(loopback());
    stage.stage_only = true;
    let stage = Node::start(stage).await.unwrap();
    let stage_peer = stage
        .peer_addr()
        .expect("a stage-only node has a peer port");

    let mut head = NodeConfig::new(&model, loopback());
    head.peers = vec![stage_peer.to_string()];
    head.split = Some("0-11,12-29".into());
    let head = Node::start(head).await.unwrap();

    wait_ready(&single).await;
    wait_ready(&stage).await;
    wait_ready(&head).await;

    let id = "smollm2-135m-instruct-q4_1";
    for question in ["What is the capital of France?", "Name three colours."] {
        let alone = ask(&single, id, question, 24).await;
        let ring = ask(&head, id, question, 24).await;
        assert!(!alone.is_empty());
        assert_eq!(ring, alone, "the ring must answer as one node does");
    }
    // The stage-only node answers nothing itself, and says where to go.
    let request = json!({"model": id, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = http(
        stage.http_addr(),
        "POST",
        "/v1/chat/completions",
        Some(&request),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stage"), "{body}");

    for node in [head, stage, single] {
        let (http_addr, peer_addr) = (node.http_addr(), node.peer_addr());
        node.shutdown().await.unwrap();
        assert!(
            TcpStream::connect(http_addr).await.is_err(),
            "the HTTP port is closed after shutdown"
        );
        if let Some(peer) = peer_addr {
            assert!(
                TcpStream::connect(peer).await.is_err(),
                "the peer port is closed after shutdown"
            );
        }
    }
}

/// An agent node `node_id` with `roles` and a swarm head with it as its peer, both ready.
async fn agent_and_head(node_id: &str, roles: Vec<shoal_swarm::roles::Role>) -> (Node, Node) {
    let model = model_path();
    let mut agent = NodeConfig::new(&model, loopback());
    agent.peer_addr = Some(loopback());
    agent.roles = roles;
    agent.node_id = Some(node_id.into());
    let agent = Node::start(agent).await.unwrap();
    wait_ready(&agent).await;
    let mut head = NodeConfig::new(&model, loopback());
    head.peers = vec![agent.peer_addr().unwrap().to_string()];
    let head = Node::start(head).await.unwrap();
    wait_ready(&head).await;
    (agent, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_head_in_one_process_asks_its_peer() {
    let (agent, head) = agent_and_head("agent-one", vec!["concise".parse().unwrap()]).await;

    // Ready means the model is loaded; the head's first look at its peers runs beside it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let (body, swarm) = loop {
        let (status, body) = http(head.http_addr(), "GET", "/v1/swarm/status", None).await;
        assert_eq!(status, 200, "{body}");
        let swarm: Value = serde_json::from_str(&body).unwrap();
        let described = swarm["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .any(|a| a["node_id"] == "agent-one" && a["role"] == "concise");
        if described {
            break (body, swarm);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the head lists its peer with its role: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let agents = swarm["agents"].as_array().expect("agents");
    let peer = &agents[0];
    assert_eq!(peer["health"], "ok", "{body}");
    assert!(
        peer["last_seen_ms"].is_u64(),
        "when it last answered: {body}"
    );
    let answer = ask(&head, "swarm:fastest", "What is 2 + 2?", 24).await;
    assert!(!answer.is_empty());

    head.shutdown().await.unwrap();
    agent.shutdown().await.unwrap();
}

/// One node serving several roles: its one model answers as each (heads list one agent per
/// role and send each role's prompt), and each answer is the model's own under that prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_answers_as_each_of_its_roles() {
    use shoal_swarm::roles::{Role, RolePrompts};
    let roles = vec![Role::Reasoner, Role::Factchecker, Role::Aggregator];
    let (agent, head) = agent_and_head("agent-many", roles).await;
    let model = model_path();

    let question = "Write a Python function add(a, b) that returns the sum of a and b.";
    let request = json!({"query": question, "strategy": "moa", "max_tokens": 24,
                         "temperature": 0, "timeout_s": 120});
    let (status, body) = http(head.http_addr(), "POST", "/v1/swarm/query", Some(&request)).await;
    assert_eq!(status, 200, "{body}");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["query_type"], "CODE", "{out}");
    let answers = out["answers"].as_array().expect("answers");
    let by = |agent: &str, task: &str| {
        answers
            .iter()
            .find(|a| a["agent"] == agent && a["task"] == task)
            .unwrap_or_else(|| panic!("no {task} by {agent}: {out}"))
    };
    by("agent-many/aggregator", "aggregate");

    // The engine's own greedy answer under each role's prompt.
    let engine = shoal_engine::Model::load(&model, |_, _| {}).unwrap();
    let prompts = RolePrompts::new();
    for role in [Role::Reasoner, Role::Factchecker] {
        let answer = by(&format!("agent-many/{role}"), "answer");
        assert_eq!(answer["role"], role.as_str(), "{out}");
        let chat = [
            shoal_engine::ChatMessage {
                role: "system".into(),
                content: prompts.get(role).into(),
            },
            shoal_engine::ChatMessage {
                role: "user".into(),
                content: question.into(),
            },
        ];
        let prompt = engine
            .encode_prompt(&engine.render_chat(&chat).unwrap())
            .unwrap();
        let params = shoal_engine::GenerateParams {
            max_tokens: 24,
            ..Default::default()
        };
        let mut generation = engine.generate(prompt, params).unwrap();
        while generation.next_step().unwrap().is_some() {}
        assert_eq!(answer["text"], generation.text(), "{role}: {out}");
    }
    let (_, body) = http(head.http_addr(), "GET", "/v1/swarm/status", None).await;
    assert!(body.contains("reasoner,factchecker,aggregator"), "{body}");

    head.shutdown().await.unwrap();
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contradictory_configs_are_refused_before_anything_listens() {
    let mut config = NodeConfig::new(model_path(), loopback());
    config.stage_only = true;
    let e = Node::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("--stage-only needs --peer-port"), "{e}");

    let mut config = NodeConfig::new(model_path(), loopback());
    config.split = Some("0-9,10-29".into());
    let e = Node::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("--split needs a --peer"), "{e}");
}
