#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One command per device, on a real (virtual) LAN: network namespaces joined by a bridge,
//! one `shoal serve --swarm-key KEY` process in each, no addresses given. They find each
//! other by mDNS over real multicast and list each other in `GET /v1/cluster`; a head with
//! `--split auto` and no `--peer` plans its ring over the members it found and answers as a
//! single process does; a node with another key is never listed; a node killed with
//! `kill -9` is `dead` on the others within the detector's time (issue #15).
//!
//! Needs root (`ip netns`); without it the test says so and does nothing. CI runs as root.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{chat_body, chat_text, http, model_path, Server, SMOLLM2};
use serde_json::Value;

/// The virtual LAN's subnet: node `i` is `10.78.0.i`, the test itself `10.78.0.100`.
const SUBNET: &str = "10.78.0";

/// Namespaces on a bridge, and a veth from this (the root) namespace into it so the test
/// reaches every node's HTTP API. Everything is removed on drop.
struct Lan {
    tag: String,
    nodes: usize,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    fn new(nodes: usize) -> Result<Lan, String> {
        let tag = format!("sh{}", std::process::id() % 100_000);
        let lan = Lan { tag, nodes };
        lan.teardown();
        let bridge = lan.bridge();
        ip(&["netns", "add", &bridge])?;
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        // Every multicast frame to every port: no snooping to wait on.
        ip(&[
            "-n",
            &bridge,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for i in 1..=nodes {
            let ns = lan.ns(i);
            let (inside, port) = (format!("{}v{i}", lan.tag), format!("{}p{i}", lan.tag));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &inside, "type", "veth", "peer", "name", &port,
            ])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["link", "set", &port, "netns", &bridge])?;
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{SUBNET}.{i}/24");
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (host, port) = (format!("{}h", lan.tag), format!("{}hp", lan.tag));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &port])?;
        ip(&["link", "set", &port, "netns", &bridge])?;
        ip(&["-n", &bridge, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{SUBNET}.100/24"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        Ok(lan)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    /// Deleting a namespace deletes the veth ends in it, and so their peers.
    fn teardown(&self) {
        let _ = ip(&["link", "del", &format!("{}h", self.tag)]);
        for i in 1..=self.nodes {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["netns", "del", &self.bridge()]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `(id, state)` of every member `node` lists, sorted.
fn members(node: SocketAddr) -> Vec<(String, String)> {
    let Ok(r) = http(node, "GET", "/v1/cluster", None) else {
        return Vec::new();
    };
    let view: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    let mut list: Vec<(String, String)> = view["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["id"].as_str().unwrap_or("").to_owned(),
                        m["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    list.sort();
    list
}

fn listed(ids: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = ids
        .iter()
        .map(|(i, s)| ((*i).to_owned(), (*s).to_owned()))
        .collect();
    list.sort();
    list
}

/// Polls until every node lists `want`, up to `within`; the time it took.
fn converge(nodes: &[&Server], want: &[(String, String)], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if nodes.iter().all(|n| members(n.addr) == want) {
            return started.elapsed();
        }
        if started.elapsed() > within {
            for n in nodes {
                eprintln!("{}: {:?}", n.addr, members(n.addr));
            }
            panic!("the nodes did not agree on {want:?} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nodes_on_a_lan_find_each_other_by_mdns_and_see_a_killed_one_dead() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let lan = Lan::new(4).expect("a virtual LAN of network namespaces");
    let model = model_path(SMOLLM2);
    let key = "11".repeat(32);
    let other_key = "22".repeat(32);
    // Stage-only members start with no model and empty models directories: they get the
    // layers they are given from the head (weights over the LAN).
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let start_with = |i: usize, key: &str, role: &[&str]| {
        let host = format!("{SUBNET}.{i}");
        let id = format!("node-{i}");
        let mut args = role.to_vec();
        args.extend([
            "--host",
            &host,
            "--port",
            "8080",
            "--swarm-key",
            key,
            "--node-id",
            &id,
            "--heartbeat-interval-s",
            "0.5",
            "--suspect-after-s",
            "1.5",
            "--dead-after-s",
            "3",
        ]);
        if role.contains(&"--stage-only") {
            Server::start_in_netns_without_model(&lan.ns(i), dirs[i].path(), &args)
        } else {
            Server::start_in_netns(&lan.ns(i), &model, &args)
        }
    };
    let start = |i: usize, key: &str| start_with(i, key, &["--stage-only"]);

    let started = Instant::now();
    let n2 = start(2, &key);
    let mut n3 = start(3, &key);
    // The head offers the plan less memory than the model needs, so the planner must use
    // the members it found.
    let n1 = start_with(1, &key, &["--split", "auto", "--plan-memory-gib", "0.06"]);
    let three = listed(&[
        ("node-1", "alive"),
        ("node-2", "alive"),
        ("node-3", "alive"),
    ]);
    let took = converge(&[&n1, &n2, &n3], &three, Duration::from_secs(15));
    eprintln!(
        "three nodes list each other {:?} after the first started ({took:?} of polling)",
        started.elapsed()
    );
    let view: Value =
        serde_json::from_str(&http(n1.addr, "GET", "/v1/cluster", None).unwrap().body).unwrap();
    let two = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "node-2")
        .cloned()
        .unwrap();
    assert_eq!(two["addr"], format!("{SUBNET}.2:7471"), "{two}");

    // The head planned over node-2 and node-3 without being told of them, and answers
    // token for token as a single process does.
    n1.wait_healthy();
    assert!(
        n1.printed("over the members found"),
        "the head planned over discovered members"
    );
    let question = chat_body(
        "smollm2-135m-instruct-q4_1",
        "Name three colours.",
        24,
        false,
    );
    let through_ring = chat_text(n1.addr, &question);
    let single = Server::start(&model, &[]);
    single.wait_healthy();
    assert_eq!(through_ring, chat_text(single.addr, &question));
    drop(single);
    let deadline = Instant::now() + Duration::from_secs(10);
    let holding = loop {
        let view: Value =
            serde_json::from_str(&http(n1.addr, "GET", "/v1/cluster", None).unwrap().body).unwrap();
        let holding: Vec<String> = view["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["layers"].as_array().is_some_and(|l| !l.is_empty()))
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        if !holding.is_empty() || Instant::now() > deadline {
            break holding;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(!holding.is_empty(), "members show the layers they hold");
    for id in &holding {
        let i: usize = id.trim_start_matches("node-").parse().unwrap();
        if i == 1 {
            continue;
        }
        let kept = std::fs::read_dir(dirs[i].path().join("stages")).map_or(0, |d| d.count());
        assert_eq!(kept, 1, "{id} keeps the layers it was sent");
        let gguf_models = std::fs::read_dir(dirs[i].path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "gguf")
            })
            .count();
        assert_eq!(gguf_models, 0, "{id} has no model file of its own");
    }

    // Another swarm on the same LAN: it sees the adverts, but never becomes a member.
    let stranger = start(4, &other_key);
    std::thread::sleep(Duration::from_secs(4));
    for n in [&n1, &n2, &n3] {
        assert_eq!(members(n.addr), three, "the stranger is not listed");
    }
    assert_eq!(members(stranger.addr), listed(&[("node-4", "alive")]));

    // kill -9: dead on the others within dead_after (3 s) and a heartbeat or two.
    n3.kill();
    let killed = Instant::now();
    let dead = listed(&[("node-1", "alive"), ("node-2", "alive"), ("node-3", "dead")]);
    converge(&[&n1, &n2], &dead, Duration::from_secs(6));
    eprintln!(
        "node-3 is dead on both others {:?} after kill -9",
        killed.elapsed()
    );
    assert!(killed.elapsed() >= Duration::from_millis(2500));
    drop(lan);
}
