#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Membership between real nodes (in-process, real sockets, the swarm key's handshake): one
//! address is enough to join — through `--peer` or `POST /v1/cluster/join` — and then every
//! node lists every other; a node with another key is never listed and cannot join; a node
//! that stops is `suspect`, then `dead`, on every other within the detector's times; and
//! `GET /v1/cluster` keeps the contract scripts rely on.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{http, loopback, model_path};
use serde_json::{json, Value};
use shoal_node::{Node, NodeConfig};
use shoal_wire::SwarmKey;

/// A stage-only node (no model in memory) with a peer port and `key`, knowing `peers`.
async fn start(key: [u8; 32], peers: &[SocketAddr]) -> Node {
    let mut config = NodeConfig::new(model_path(), loopback());
    config.stage_only = true;
    config.peer_addr = Some(loopback());
    config.swarm_key = Some(SwarmKey::from_bytes(key));
    config.peers = peers.iter().map(|p| p.to_string()).collect();
    config.cluster.detector = common::fast_detector();
    config.cluster.mdns = false;
    Node::start(config).await.unwrap()
}

async fn cluster(node: &Node) -> Value {
    // Nodes without an API key take any token; the one with a key takes this one.
    let (status, body) = http_keyed(
        node.http_addr(),
        "GET",
        "/v1/cluster",
        None,
        "secret",
        usize::MAX,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `(id, state)` of every member `node` lists, itself included.
async fn states(node: &Node) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = cluster(node).await["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    list.sort();
    list
}

fn expect(nodes: &[(&Node, &str)]) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = nodes
        .iter()
        .map(|(n, s)| (n.node_id().to_owned(), (*s).to_owned()))
        .collect();
    list.sort();
    list
}

/// Polls until every node in `nodes` lists `want`; panics with what they list after `within`.
async fn converge(nodes: &[&Node], want: &[(String, String)], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for n in nodes {
            all &= states(n).await == want;
        }
        if all {
            return started.elapsed();
        }
        if started.elapsed() > within {
            for n in nodes {
                eprintln!("{}: {:?}", n.node_id(), states(n).await);
            }
            panic!("no agreement on {want:?} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_through_one_address_strangers_stay_out_and_the_dead_are_seen_dead() {
    let key = [7; 32];
    let a = start(key, &[]).await;
    let b = start(key, &[a.peer_addr().unwrap()]).await;
    let both = expect(&[(&a, "alive"), (&b, "alive")]);
    let took = converge(&[&a, &b], &both, Duration::from_secs(5)).await;
    eprintln!("b joined a through --peer in {took:?}");

    // The contract of GET /v1/cluster.
    let view = cluster(&a).await;
    assert_eq!(view["self"], a.node_id());
    let members = view["members"].as_array().unwrap();
    assert_eq!(members[0]["id"], a.node_id(), "this node first");
    assert_eq!(members[0]["self"], true);
    for m in members {
        for field in [
            "id",
            "addr",
            "state",
            "last_seen_ms",
            "memory_total",
            "memory_free",
            "cores",
            "models",
            "role",
            "layers",
        ] {
            assert!(m.get(field).is_some(), "{field} missing from {m}");
        }
        assert!(m["memory_total"].as_u64().unwrap() > 0, "{m}");
        assert!(m["cores"].as_u64().unwrap() > 0, "{m}");
        let models: Vec<&str> = m["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(models.contains(&common::SMOLLM2), "{m}");
    }
    let b_in_a = &members[1];
    assert_eq!(b_in_a["id"], b.node_id());
    assert_eq!(
        b_in_a["addr"],
        b.peer_addr().unwrap().to_string(),
        "b's peer port, reached from a"
    );
    assert!(b_in_a["last_seen_ms"].as_u64().unwrap() < 800);
    // The round trip of a's next heartbeat to b (b may have become a member through its
    // own heartbeat to a), timed on the set-up connection: well under the probe deadline on
    // loopback; none for this node itself.
    assert!(members[0]["rtt_ms"].is_null());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let view = cluster(&a).await;
        let b_now = &view["members"][1];
        if let Some(rtt) = b_now["rtt_ms"].as_f64() {
            assert!(rtt > 0.0 && rtt < 1000.0, "{b_now}");
            break;
        }
        assert!(Instant::now() < deadline, "no round trip to b: {b_now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // c knows nobody; one join through a's HTTP API and it learns b too, and b learns c.
    let c = start(key, &[]).await;
    let (status, body) = http(
        c.http_addr(),
        "POST",
        "/v1/cluster/join",
        Some(&json!({"addr": a.peer_addr().unwrap().to_string()})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let joined: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(joined["joined"]["id"], a.node_id());
    assert_eq!(joined["joined"]["state"], "alive");
    let three = expect(&[(&a, "alive"), (&b, "alive"), (&c, "alive")]);
    let took = converge(&[&a, &b, &c], &three, Duration::from_secs(5)).await;
    eprintln!("all three agree {took:?} after c's join");

    // A node with another key: never listed, lists nobody, and cannot join.
    let stranger = start([9; 32], &[a.peer_addr().unwrap()]).await;
    let (status, body) = http(
        stranger.http_addr(),
        "POST",
        "/v1/cluster/join",
        Some(&json!({"addr": b.peer_addr().unwrap().to_string()})),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("peer_unreachable"), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in [&a, &b, &c] {
        assert_eq!(states(n).await, three, "the stranger is not listed");
    }
    assert_eq!(
        states(&stranger).await,
        expect(&[(&stranger, "alive")]),
        "the stranger learnt nobody"
    );
    stranger.shutdown().await.unwrap();

    // Bad joins are 400s in OpenAI's error shape.
    for bad in [
        json!({"addr": "nowhere"}),
        json!({"address": "x:1"}),
        json!({}),
    ] {
        let (status, body) = http(c.http_addr(), "POST", "/v1/cluster/join", Some(&bad)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }

    // c stops: suspect, then dead, on a and b.
    let c_id = c.node_id().to_owned();
    c.shutdown().await.unwrap();
    let stopped = Instant::now();
    let dead = vec![
        (a.node_id().to_owned(), "alive".to_owned()),
        (b.node_id().to_owned(), "alive".to_owned()),
        (c_id.clone(), "dead".to_owned()),
    ];
    let mut dead_sorted = dead.clone();
    dead_sorted.sort();
    let mut saw_suspect = false;
    loop {
        let view = states(&a).await;
        saw_suspect |= view.contains(&(c_id.clone(), "suspect".to_owned()));
        if view == dead_sorted {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(5), "{view:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = stopped.elapsed();
    eprintln!("a saw c dead {took:?} after it stopped");
    assert!(saw_suspect, "suspect on the way to dead");
    assert!(
        took >= Duration::from_millis(1300),
        "not before dead_after: {took:?}"
    );
    converge(&[&a, &b], &dead_sorted, Duration::from_secs(2)).await;

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The models a member lists are those beside its model file now, not when it started: a
/// file pulled or copied there while it runs is in every other member's view of it within
/// a few heartbeats (members outside a ring are asked for layers by the files they list),
/// and one removed leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_added_while_a_node_runs_is_listed_by_the_others() {
    let key = [5; 32];
    let a = start(key, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(dir.path().join("absent.gguf"), loopback());
    config.stage_only = true;
    config.peer_addr = Some(loopback());
    config.swarm_key = Some(SwarmKey::from_bytes(key));
    config.peers = vec![a.peer_addr().unwrap().to_string()];
    config.cluster.detector = common::fast_detector();
    config.cluster.mdns = false;
    let b = Node::start(config).await.unwrap();
    let both = expect(&[(&a, "alive"), (&b, "alive")]);
    converge(&[&a, &b], &both, Duration::from_secs(5)).await;

    let listed_on_a = |view: &Value| -> Vec<String> {
        view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == b.node_id())
            .map(|m| {
                m["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let wait_for = |want: Vec<String>| {
        let a = &a;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let view = cluster(a).await;
                if listed_on_a(&view) == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "b lists {view} on a, not {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(Vec::new()).await;
    std::fs::write(dir.path().join("pulled.gguf"), b"GGUF").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"not a model").unwrap();
    wait_for(vec!["pulled.gguf".to_owned()]).await;
    std::fs::remove_file(dir.path().join("pulled.gguf")).unwrap();
    wait_for(Vec::new()).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_peer_port_lists_itself_and_cannot_join() {
    let node = Node::start(NodeConfig::new(model_path(), loopback()))
        .await
        .unwrap();
    let view = cluster(&node).await;
    assert_eq!(view["members"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(view["members"][0]["state"], "alive");
    assert_eq!(view["members"][0]["addr"], Value::Null);
    let (status, body) = http(
        node.http_addr(),
        "POST",
        "/v1/cluster/join",
        Some(&json!({"addr": "127.0.0.1:1"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no peer port"), "{body}");
    node.shutdown().await.unwrap();
}

/// The value of the counter `name` on `node`'s `/metrics`.
async fn metric(node: &Node, name: &str) -> u64 {
    let (status, body) = http(node.http_addr(), "GET", "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        .trim()
        .parse()
        .unwrap()
}

/// One HTTP/1.1 request with a bearer token; the status and the body (read up to `limit`
/// bytes, for a stream that does not end).
async fn http_keyed(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: &str,
    limit: usize,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while raw.len() < limit {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if limit < usize::MAX && String::from_utf8_lossy(&raw).contains("\n\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_feed_and_kill_and_heal() {
    let key = [5; 32];
    let mut config = NodeConfig::new(model_path(), loopback());
    config.stage_only = true;
    config.peer_addr = Some(loopback());
    config.swarm_key = Some(SwarmKey::from_bytes(key));
    config.api_key = Some("secret".into());
    config.cluster.detector = common::fast_detector();
    config.cluster.mdns = false;
    let a = Node::start(config).await.unwrap();
    let b = start(key, &[a.peer_addr().unwrap()]).await;
    let both = expect(&[(&a, "alive"), (&b, "alive")]);
    let keyed = |path: &'static str, body: Option<Value>, limit: usize| {
        let addr = a.http_addr();
        async move { http_keyed(addr, "POST", path, body.as_ref(), "secret", limit).await }
    };
    let (status, _) = http_keyed(
        a.http_addr(),
        "GET",
        "/v1/cluster",
        None,
        "secret",
        usize::MAX,
    )
    .await;
    assert_eq!(status, 200);

    // The page, without a key; the feed, with one.
    let (status, page) = http(a.http_addr(), "GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "{page}");
    let (status, _) = http(a.http_addr(), "GET", "/v1/dashboard/events", None).await;
    assert_eq!(status, 401, "the feed needs the key");
    let (status, feed) = http_keyed(
        a.http_addr(),
        "GET",
        "/v1/dashboard/events",
        None,
        "secret",
        1 << 16,
    )
    .await;
    assert_eq!(status, 200);
    let data = feed
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("an event");
    let state: Value = serde_json::from_str(data).unwrap();
    assert_eq!(state["node"]["mode"], "stage-only", "{state}");
    assert_eq!(state["node"]["chaos_allowed"], true);
    assert_eq!(state["cluster"]["self"], a.node_id());

    // Wait until a knows b, then kill b from a's API: dead on a; heal: alive again.
    converge(&[&a], &both, Duration::from_secs(5)).await;
    let (status, body) = keyed(
        "/v1/cluster/chaos",
        Some(json!({"node": b.node_id(), "action": "kill"})),
        usize::MAX,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"down\":true"), "{body}");
    let dead = expect(&[(&a, "alive"), (&b, "dead")]);
    converge(&[&a], &dead, Duration::from_secs(5)).await;
    let (status, body) = keyed(
        "/v1/cluster/chaos",
        Some(json!({"node": b.node_id(), "action": "heal"})),
        usize::MAX,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    converge(&[&a], &both, Duration::from_secs(5)).await;
    let (status, body) = keyed(
        "/v1/cluster/chaos",
        Some(json!({"node": "nobody", "action": "kill"})),
        usize::MAX,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = keyed(
        "/v1/cluster/chaos",
        Some(json!({"node": b.node_id(), "action": "explode"})),
        usize::MAX,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // Without an API key, nobody may kill.
    let (status, body) = http(
        b.http_addr(),
        "POST",
        "/v1/cluster/chaos",
        Some(&json!({"node": a.node_id(), "action": "kill"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("chaos_disabled"), "{body}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_heads_a_swarm_of_the_members_it_finds() {
    let key = [3; 32];
    let whole = |peers: Vec<String>, role: Option<shoal_swarm::roles::Role>| {
        let mut config = NodeConfig::new(model_path(), loopback());
        config.peer_addr = Some(loopback());
        config.swarm_key = Some(SwarmKey::from_bytes(key));
        config.peers = peers;
        config.roles = role.into_iter().collect();
        config.cluster.detector = common::fast_detector();
        config.cluster.mdns = false;
        config
    };
    let a = Node::start(whole(vec![], None)).await.unwrap();
    let critic = Some(shoal_swarm::roles::Role::Critic);
    let b = Node::start(whole(vec![a.peer_addr().unwrap().to_string()], critic))
        .await
        .unwrap();
    common::settle(&a).await.unwrap();
    common::settle(&b).await.unwrap();
    // a was told of nobody; b joined it, and becomes one of its agents with its role.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = http(a.http_addr(), "GET", "/v1/swarm/status", None).await;
        assert_eq!(status, 200, "{body}");
        let swarm: Value = serde_json::from_str(&body).unwrap();
        let agents = swarm["agents"].as_array().unwrap();
        if agents
            .iter()
            .any(|g| g["role"] == "critic" && g["healthy"] == true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never became a's agent: {swarm}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let answer = common::ask(&a, "swarm:fastest", "Say hello.", 8).await;
    assert!(!answer.trim().is_empty());

    // A stage-only member is listed as one (`role: "stage"`) and never made an agent: it
    // holds no whole model to answer with.
    let c = start(key, &[a.peer_addr().unwrap()]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let view = cluster(&a).await;
        let listed = view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == c.node_id())
            .cloned();
        if let Some(m) = listed {
            assert_eq!(m["role"], "stage", "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "c was never listed: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past the swarm head's next look at its members (every second).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, body) = http(a.http_addr(), "GET", "/v1/swarm/status", None).await;
    let swarm: Value = serde_json::from_str(&body).unwrap();
    let c_addr = c.peer_addr().unwrap().to_string();
    assert!(
        swarm["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["addr"] != c_addr.as_str()),
        "a stage-only member became an agent: {swarm}"
    );
    for node in [a, b, c] {
        node.shutdown().await.unwrap();
    }
}

/// Issue #15 item 3: a `--split auto` head that plans over the members it finds, started
/// before any member with too little memory of its own, waits and plans when one joins
/// (with no model file: it gets its layers from the head); a member that joins the running
/// ring is offered to the planner; every answer is the single node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_over_the_members_forms_when_one_joins_and_follows_later_joins() {
    let key = [5; 32];
    let single = Node::start(NodeConfig::new(model_path(), loopback()))
        .await
        .unwrap();
    let mut head = NodeConfig::new(model_path(), loopback());
    head.peer_addr = Some(loopback());
    head.swarm_key = Some(SwarmKey::from_bytes(key));
    head.split = Some("auto".into());
    // Less than SmolLM2 needs: the head cannot run it alone.
    head.plan_memory_bytes = Some(60 << 20);
    head.cluster.detector = common::fast_detector();
    head.cluster.mdns = false;
    let head = Node::start(head).await.unwrap();
    let head_peer = head.peer_addr().unwrap();

    // Alone, the head waits for members and says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http(head.http_addr(), "GET", "/health", None).await;
        assert_ne!(status, 200, "the head cannot run the model alone: {body}");
        if body.contains("when a member joins") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the head never said it waits: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A stage-only member with an empty models directory joins through the head's address.
    let empty = tempfile::tempdir().unwrap();
    let member = |dir: &std::path::Path| {
        let mut config = NodeConfig::new(dir.join(common::SMOLLM2), loopback());
        config.stage_only = true;
        config.peer_addr = Some(loopback());
        config.swarm_key = Some(SwarmKey::from_bytes(key));
        config.peers = vec![head_peer.to_string()];
        config.cluster.detector = common::fast_detector();
        config.cluster.mdns = false;
        config
    };
    let first = Node::start(member(empty.path())).await.unwrap();
    common::settle(&head).await.unwrap();
    common::settle(&single).await.unwrap();
    let id = "smollm2-135m-instruct-q4_1";
    let question = "What is the capital of France?";
    let alone = common::ask(&single, id, question, 24).await;
    assert_eq!(common::ask(&head, id, question, 24).await, alone);
    let stage_files: Vec<std::path::PathBuf> = std::fs::read_dir(empty.path().join("stages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        stage_files.len(),
        1,
        "the member got its layers from the head"
    );
    // Each side counts the bytes in its metrics: the head sent the member's share (and the
    // layers the member measured itself on while planning), the member received them.
    let share = std::fs::metadata(&stage_files[0]).unwrap().len();
    let sent = metric(&head, "shoal_weights_sent_bytes_total").await;
    let received = metric(&first, "shoal_weights_received_bytes_total").await;
    assert_eq!(sent, received, "what the head sent is what the member got");
    assert!(sent > share, "{sent} bytes sent for a share of {share}");
    assert_eq!(metric(&first, "shoal_weights_sent_bytes_total").await, 0);
    assert_eq!(metric(&head, "shoal_weights_received_bytes_total").await, 0);
    // Every member shows the layers it holds, the head its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = cluster(&head).await;
        let holding: Vec<String> = view["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["layers"].as_array().is_some_and(|l| !l.is_empty()))
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        if holding.contains(&head.node_id().to_owned())
            && holding.contains(&first.node_id().to_owned())
        {
            break;
        }
        assert!(Instant::now() < deadline, "layers not shown: {view}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A second member joins the running ring: the planner is asked again, and the ring
    // answers exactly as before, whether or not it moved.
    let empty2 = tempfile::tempdir().unwrap();
    let second = Node::start(member(empty2.path())).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while states(&head).await.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the second member was never listed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past the head's next look at its members (every 2 s) and the re-plan it starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(common::ask(&head, id, question, 24).await, alone);

    // The first member goes: the ring recovers onto the one that joined later (which the
    // head was never told of), getting it its layers, and the answer is unchanged.
    first.shutdown().await.unwrap();
    assert_eq!(
        common::ask(&head, id, "Name three colours.", 24).await,
        common::ask(&single, id, "Name three colours.", 24).await
    );
    assert_eq!(
        std::fs::read_dir(empty2.path().join("stages"))
            .map(|d| d.count())
            .unwrap_or(0),
        1,
        "the member that joined later holds layers now"
    );
    for node in [head, second, single] {
        node.shutdown().await.unwrap();
    }
}
