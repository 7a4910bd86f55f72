#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
#![cfg(target_os = "linux")]
//! mDNS discovery between real daemons: four nodes, each in its own network namespace on
//! one bridge (four machines on one LAN), two with one swarm key and two with another. Each
//! finds the other node of its swarm as a candidate, and no node of the other swarm — whose
//! adverts reach it all the same, as the other pair finding each other shows.
//!
//! Namespaces keep the test off the host's network (its adverts never reach the LAN, the
//! LAN's never reach it) and give every node its own address and its own port 5353. They
//! need root and iproute2's `ip`; without either the test says why and passes. Each node is
//! this test binary run again inside its namespace (`ip netns exec NS <binary> mdns_node`),
//! its part given in an environment variable: it prints what its roster got, the parent
//! checks. Separate processes need no `setns` (and so no unsafe code), and are what separate
//! machines are.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_cluster::discovery::{Advert, Discovery};
use shoal_cluster::{DetectorConfig, Roster};
use shoal_wire::NodeInfo;

/// Set in a child: `node_id,key_fingerprint,peer_port,expected_candidates`.
const NODE_ENV: &str = "SHOAL_MDNS_TEST_NODE";
/// What a child's lines for the parent start with (libtest prints its own lines too).
const REPORT: &str = "MDNS-NODE";
/// Every node stays at least this long, so that the others can see it (and ignore it)...
const MIN_RUN: Duration = Duration::from_secs(4);
/// ... and at most this long when it has not found what it expects.
const MAX_RUN: Duration = Duration::from_secs(20);
/// The parent kills a child that is still running after this.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

const SWARM: &str = "1a2b3c4d";
const OTHER_SWARM: &str = "99999999";

/// One node of the test, inside its namespace: advertise, browse, report the candidates.
/// Does nothing when run as an ordinary test.
#[tokio::test]
async fn mdns_node() {
    let Ok(spec) = std::env::var(NODE_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let [node_id, key_fingerprint, peer_port, expected] = parts[..] else {
        panic!("{NODE_ENV}={spec:?} is not id,fingerprint,port,expected");
    };
    let expected: usize = expected.parse().unwrap();
    let info = NodeInfo {
        node_id: node_id.to_owned(),
        version: "test".to_owned(),
        peer_port: peer_port.parse().unwrap(),
        ..NodeInfo::default()
    };
    let roster = Arc::new(Roster::new(info.clone(), None, DetectorConfig::default()));
    let started = Instant::now();
    let discovery = Discovery::start(
        roster.clone(),
        Advert {
            info,
            key_fingerprint: key_fingerprint.to_owned(),
        },
    )
    .unwrap();
    let mut found_after = None;
    let candidates = loop {
        let candidates = roster.view(Instant::now()).candidates;
        let elapsed = started.elapsed();
        if found_after.is_none() && expected > 0 && candidates.len() >= expected {
            found_after = Some(elapsed);
        }
        let done = expected == 0 || found_after.is_some();
        if (done && elapsed >= MIN_RUN) || elapsed >= MAX_RUN {
            break candidates;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    discovery.shutdown();
    // The browse loop holds the roster while it runs: it must let go once shut down.
    let shut_down = Instant::now();
    while Arc::strong_count(&roster) > 1 {
        assert!(
            shut_down.elapsed() < Duration::from_secs(2),
            "the browse loop still runs after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(after) = found_after {
        println!("{REPORT} found_after_ms={}", after.as_millis());
    }
    for c in candidates {
        println!("{REPORT} candidate={c}");
    }
}

#[test]
fn nodes_find_the_nodes_of_their_swarm_and_no_others() {
    if let Some(why) = cannot_make_namespaces() {
        eprintln!("skipped: {why}");
        return;
    }
    remove_leftovers();
    let lan = match Lan::new(4) {
        Ok(lan) => lan,
        Err(why) => {
            eprintln!("skipped: could not build the test network: {why}");
            return;
        }
    };
    // The other swarm first: it is on the network before the first pair starts looking.
    let c = lan.spawn_node(3, &format!("node-c:7003,{OTHER_SWARM},7003,1"));
    let d = lan.spawn_node(4, &format!("node-d:7004,{OTHER_SWARM},7004,1"));
    std::thread::sleep(Duration::from_millis(500));
    let a = lan.spawn_node(1, &format!("node-a:7001,{SWARM},7001,1"));
    let b = lan.spawn_node(2, &format!("node-b:7002,{SWARM},7002,1"));
    let reports = [finish(a), finish(b), finish(c), finish(d)];
    for (name, report) in ["a", "b", "c", "d"].iter().zip(&reports) {
        eprintln!("node {name}: {report:?}");
    }
    let [a, b, c, d] = reports;

    assert_eq!(a.candidates, [addr("10.77.0.2:7002")], "a must find b only");
    assert_eq!(b.candidates, [addr("10.77.0.1:7001")], "b must find a only");
    assert_eq!(c.candidates, [addr("10.77.0.4:7004")], "c must find d only");
    assert_eq!(d.candidates, [addr("10.77.0.3:7003")], "d must find c only");
    let slowest = [a, b, c, d].iter().filter_map(|r| r.found_after).max();
    eprintln!("the slowest node found its peer after {slowest:?}");
    drop(lan);
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What one node reported.
#[derive(Debug)]
struct Report {
    found_after: Option<Duration>,
    candidates: Vec<SocketAddr>,
}

/// Waits for a node (killing it past [`CHILD_DEADLINE`]) and reads its report; a node that
/// failed fails the test with its output.
fn finish(mut child: Child) -> Report {
    let deadline = Instant::now() + CHILD_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "a node failed ({status:?}):\n{stdout}\n{stderr}"
    );
    let mut report = Report {
        found_after: None,
        candidates: Vec::new(),
    };
    for line in stdout.lines() {
        // libtest may have begun the line with "test mdns_node ... ".
        let Some(at) = line.find(REPORT) else {
            continue;
        };
        let line = line[at + REPORT.len()..].trim();
        if let Some(ms) = line.strip_prefix("found_after_ms=") {
            report.found_after = Some(Duration::from_millis(ms.parse().unwrap()));
        } else if let Some(c) = line.strip_prefix("candidate=") {
            report.candidates.push(c.parse().unwrap());
        }
    }
    report
}

/// Why this machine cannot run the test, if it cannot.
fn cannot_make_namespaces() -> Option<String> {
    let uid = Command::new("id").arg("-u").output();
    match uid {
        Ok(out) if String::from_utf8_lossy(&out.stdout).trim() == "0" => {}
        Ok(_) => return Some("creating network namespaces needs root".to_owned()),
        Err(e) => return Some(format!("cannot run `id -u`: {e}")),
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("needs iproute2's `ip` on the PATH".to_owned()),
    }
}

/// Runs `ip ARGS`; its complaint on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespace of node `i` of the test run by process `pid`.
fn namespace(pid: u32, i: usize) -> String {
    format!("shoal-mdns-{pid}-{i}")
}

/// The bridge of the test run by process `pid` (interface names have at most 15 bytes).
fn bridge(pid: u32) -> String {
    format!("smbr{pid}")
}

/// Removes what an earlier run left behind: namespaces and bridges of this test whose
/// process is gone (or is this one: a pid reused).
fn remove_leftovers() {
    let mine = std::process::id();
    let stale = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|pid| pid == mine || !Path::new(&format!("/proc/{pid}")).exists())
    };
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("shoal-mdns-") else {
            continue;
        };
        if rest.split('-').next().is_some_and(stale) {
            let _ = ip(&["netns", "del", name]);
        }
    }
    for line in ip(&["-o", "link", "show", "type", "bridge"])
        .unwrap_or_default()
        .lines()
    {
        // "7: smbr1234: <BROADCAST,...>"
        let name = line.split(':').nth(1).unwrap_or_default().trim();
        if name.strip_prefix("smbr").is_some_and(stale) {
            let _ = ip(&["link", "del", name]);
        }
    }
}

/// A bridge in this namespace and `nodes` namespaces on it, node `i` at `10.77.0.i/24`;
/// all removed on drop, even when the test fails.
struct Lan {
    pid: u32,
    nodes: usize,
}

impl Lan {
    fn new(nodes: usize) -> Result<Lan, String> {
        let pid = std::process::id();
        let br = bridge(pid);
        // Built up step by step: if a step fails, `drop` removes what was made.
        let mut lan = Lan { pid, nodes: 0 };
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 1..=nodes {
            let ns = namespace(pid, i);
            let (outside, inside) = (format!("sm{pid}h{i}"), format!("sm{pid}n{i}"));
            ip(&["netns", "add", &ns])?;
            lan.nodes = i;
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            ip(&["link", "set", &outside, "master", &br])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{i}/24"),
                "dev",
                &inside,
            ])?;
            ip(&["-n", &ns, "link", "set", &inside, "multicast", "on"])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
        }
        Ok(lan)
    }

    /// Runs node `i` (`spec` as [`NODE_ENV`] reads it) in its namespace.
    fn spawn_node(&self, i: usize, spec: &str) -> Child {
        let exe = std::env::current_exe().unwrap();
        Command::new("ip")
            .args(["netns", "exec", &namespace(self.pid, i)])
            .arg(exe)
            .args(["mdns_node", "--exact", "--nocapture", "--test-threads=1"])
            .env(NODE_ENV, spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // A namespace's end of a veth pair goes with it, and the other end with that.
        for i in 1..=self.nodes {
            let _ = ip(&["netns", "del", &namespace(self.pid, i)]);
        }
        let _ = ip(&["link", "del", &bridge(self.pid)]);
    }
}
