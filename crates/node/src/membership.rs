//! This node as a member of its cluster (issue #15): what it says about itself, the roster
//! of the others, and the loops that keep both current — heartbeats to every member and
//! candidate, and a refresh of this node's own figures (free memory, stages held, models on
//! disk).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_cluster::discovery::{Advert, Discovery};
use shoal_cluster::heartbeat::{resolve, run_heartbeats, WireProber};
use shoal_cluster::{DetectorConfig, Roster, Source};
use shoal_pipeline::StageServer;
use shoal_wire::{Capabilities, HeldStage, Hello, NodeInfo, Transport, MAX_MODELS, MAX_MODEL_ID};

/// How often this node re-reads its free memory, load, the stage it holds and the models
/// beside its model file.
const REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// The peer port's stage server, while it has one (none while playing dead).
pub(crate) type CurrentStages = Arc<Mutex<Option<StageServer>>>;

/// Requests being answered now and the last decode speed (the API's figures).
pub(crate) type LoadFigures = Arc<dyn Fn() -> (u32, f32) + Send + Sync>;

/// The ring this node heads, once it is connected (and the model's file name): its own
/// layers are among those it holds, as members see them. Replaced when the head moves to
/// another model (`--model auto`).
pub(crate) type HeadRing = Arc<Mutex<Option<(String, Arc<shoal_pipeline::Pipeline>)>>>;

/// How this node takes part in membership.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Heartbeat period and failure-detector thresholds.
    pub detector: DetectorConfig,
    /// Advertise this node and find others by mDNS (only with a peer port beyond loopback).
    pub mdns: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            detector: DetectorConfig::default(),
            mdns: true,
        }
    }
}

/// What this node says about itself: read once at start (memory, cores, accelerator,
/// models next to its model file); free memory, stages and models are refreshed later
/// ([`start_refresh`]).
pub(crate) fn describe_me(
    node_id: &str,
    model: &Path,
    role: Option<&str>,
    http_port: u16,
    peer_port: u16,
    memory_offer: Option<u64>,
) -> NodeInfo {
    let hardware = shoal_models::hardware::Hardware::detect();
    let accelerator = hardware
        .gpus
        .first()
        .map(|g| g.name.clone().unwrap_or_else(|| g.vendor.clone()))
        .unwrap_or_default();
    NodeInfo {
        node_id: node_id.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        peer_port,
        http_port,
        memory_total: hardware.memory.total_bytes.unwrap_or(0),
        memory_free: offered(hardware.memory.available_bytes.unwrap_or(0), memory_offer),
        cores: u32::try_from(hardware.cpu.logical_cores).unwrap_or(u32::MAX),
        accelerator: truncate(accelerator, shoal_wire::MAX_ACCELERATOR),
        role: role.unwrap_or_default().to_owned(),
        models: models_beside(model),
        stages: Vec::new(),
        busy: 0,
        tokens_per_s: 0.0,
    }
}

/// The GGUF files in the model's directory, by file name (what `LoadStage` names).
fn models_beside(model: &Path) -> Vec<String> {
    let dir = model
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut models: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".gguf") && n.len() <= MAX_MODEL_ID)
        .collect();
    models.sort();
    models.truncate(MAX_MODELS);
    models
}

/// The free memory a node reports: what is free, but no more than it offers
/// (`--plan-memory-gib`).
pub(crate) fn offered(free: u64, offer: Option<u64>) -> u64 {
    offer.map_or(free, |o| o.min(free))
}

fn truncate(mut s: String, max: usize) -> String {
    while s.len() > max {
        s.pop();
    }
    s
}

/// Starts heartbeating: the `--peer`s become static candidates (resolved here, so a name
/// that does not resolve yet is tried again), and the loop runs until `stop`.
pub(crate) fn start_heartbeats(
    roster: Arc<Roster>,
    transport: Transport,
    peers: Vec<String>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let prober = prober(&roster, transport);
    tokio::spawn(async move {
        for peer in &peers {
            match resolve(peer).await {
                Ok(addr) => roster.add_candidate(addr, Source::Static, now()),
                Err(why) => tracing::warn!("{why}: this --peer is not heartbeaten"),
            }
        }
        run_heartbeats(roster, prober, stop).await;
    })
}

/// The prober `POST /v1/cluster/join` uses: the same as the loop's.
pub(crate) fn prober(roster: &Roster, transport: Transport) -> Arc<WireProber> {
    Arc::new(WireProber {
        transport,
        hello: Hello {
            node_id: roster.my_id(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: Capabilities::STAGE | Capabilities::AGENT,
        },
    })
}

/// Keeps this node's own figures current until `stop`: free memory, load, the stage it
/// holds, the models beside `model` (a file pulled or copied there while the node runs is
/// listed from the next heartbeat on, so members outside a ring can be asked for its
/// layers), and — when it listens on every interface — the address members reach it at.
pub(crate) fn start_refresh(
    roster: Arc<Roster>,
    model: PathBuf,
    stages: CurrentStages,
    head: HeadRing,
    load: LoadFigures,
    memory_offer: Option<u64>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_PERIOD);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            let free = shoal_pipeline::available_memory_bytes();
            let model = model.clone();
            let models = tokio::task::spawn_blocking(move || models_beside(&model))
                .await
                .ok();
            let served = stages
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .and_then(|s| Some((s.loaded_stage()?, s.pass_us())))
                .map(|((model_id, layers), pass_us)| (model_id, layers, pass_us));
            let headed = head
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map(|(model_id, ring)| (model_id.clone(), ring.layout().0, ring.pass_us()));
            let held = headed.into_iter().chain(served);
            let (busy, tokens_per_s) = load();
            roster.update_me(|me| {
                me.busy = busy;
                me.tokens_per_s = tokens_per_s;
                if let Some(free) = free {
                    me.memory_free = offered(free, memory_offer);
                }
                if let Some(models) = models {
                    me.models = models;
                }
                me.stages = held
                    .filter_map(|(model_id, layers, pass_us)| {
                        Some(HeldStage {
                            model_id: truncate(model_id, MAX_MODEL_ID),
                            start: u32::try_from(layers.start).ok()?,
                            end: u32::try_from(layers.end).ok()?,
                            pass_us,
                        })
                    })
                    .collect();
            });
            learn_my_addr(&roster);
        }
    })
}

/// A node bound to `0.0.0.0` does not know which of its addresses others use; the local
/// address of a (never sent) UDP route to a member is the one on that member's network.
fn learn_my_addr(roster: &Roster) {
    let view = roster.view(now());
    let Some(mine) = view.my_addr.filter(|a| a.ip().is_unspecified()) else {
        return;
    };
    let Some(member) = view.members.first() else {
        return;
    };
    let unspecified: IpAddr = if member.addr.is_ipv4() {
        IpAddr::from([0, 0, 0, 0])
    } else {
        IpAddr::from([0u16; 8])
    };
    let local = std::net::UdpSocket::bind(SocketAddr::new(unspecified, 0))
        .and_then(|s| s.connect(member.addr).and_then(|()| s.local_addr()));
    if let Ok(local) = local {
        roster.set_my_addr(SocketAddr::new(local.ip(), mine.port()));
    }
}

/// How long a head planning over discovered members waits for the list to settle.
const DISCOVERY_SETTLE: Duration = Duration::from_secs(3);
/// The longest it waits in all.
const DISCOVERY_WAIT: Duration = Duration::from_secs(12);

/// The peer addresses of the alive members, once the list has not changed for
/// [`DISCOVERY_SETTLE`] (at most [`DISCOVERY_WAIT`] after the call): what a `--split auto`
/// head with no `--peer` plans its ring over. Members need not have the model: those
/// without it get the layers they measure on and those they run from the head.
pub(crate) async fn discovered_peers(roster: &Roster) -> Vec<String> {
    let started = tokio::time::Instant::now();
    let mut last: Option<(Vec<String>, tokio::time::Instant)> = None;
    loop {
        let now_peers: Vec<String> = roster
            .alive(now())
            .into_iter()
            .map(|m| m.addr.to_string())
            .collect();
        let at = tokio::time::Instant::now();
        let settled_since = match &last {
            Some((peers, since)) if *peers == now_peers => *since,
            _ => at,
        };
        if at - settled_since >= DISCOVERY_SETTLE || at - started >= DISCOVERY_WAIT {
            return now_peers;
        }
        last = Some((now_peers, settled_since));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The peer addresses of the alive members now.
pub(crate) fn alive_peers(roster: &Roster) -> Vec<SocketAddr> {
    roster.alive(now()).into_iter().map(|m| m.addr).collect()
}

/// The alive members outside `ring` (peer addresses as given) whose models directory holds
/// a file named `model`, as their heartbeats said: they may send a stage without the model
/// its layers (each holder checks the SHA-256 the stage asks for; one whose file of that
/// name differs answers so, and the next is asked).
pub(crate) fn holders_of(roster: &Roster, model: &str, ring: &[String]) -> Vec<SocketAddr> {
    roster
        .alive(now())
        .into_iter()
        .filter(|m| m.info.models.iter().any(|name| name == model))
        .filter(|m| !ring.iter().any(|p| *p == m.addr.to_string()))
        .map(|m| m.addr)
        .collect()
}

/// Returns once an alive member is listed that is not among `known`.
pub(crate) async fn member_joins(roster: &Roster, known: &[SocketAddr]) {
    loop {
        if alive_peers(roster).iter().any(|a| !known.contains(a)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Advertises this node by mDNS and adds the nodes of its swarm that answer as candidates,
/// until `stop`. `None` (with a warning) where mDNS cannot start: static peers and joins
/// still work.
pub(crate) fn start_mdns(
    roster: &Arc<Roster>,
    key_fingerprint: Option<String>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let advert = Advert {
        info: roster.heartbeat(now()).node,
        key_fingerprint: key_fingerprint.unwrap_or_else(|| "none".to_owned()),
    };
    match Discovery::start(roster.clone(), advert) {
        Ok(discovery) => {
            tracing::info!("advertising this node and looking for the swarm's others by mDNS");
            Some(tokio::spawn(async move {
                stop.await;
                discovery.shutdown();
            }))
        }
        Err(e) => {
            tracing::warn!("no mDNS discovery ({e}); --peer and POST /v1/cluster/join still work");
            None
        }
    }
}

pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_wire::Heartbeat;

    #[test]
    fn holders_are_the_alive_members_outside_the_ring_with_a_file_of_that_name() {
        let me = NodeInfo {
            node_id: "head".into(),
            ..NodeInfo::default()
        };
        let roster = Roster::new(me, None, DetectorConfig::default());
        let addr = |n: u8| SocketAddr::from(([10, 0, 0, n], 7471));
        for (n, models) in [
            (2, vec!["smollm2.gguf", "qwen.gguf"]),
            (3, vec!["qwen.gguf"]),
            (4, vec!["smollm2.gguf"]),
        ] {
            let beat = Heartbeat {
                node: NodeInfo {
                    node_id: format!("node-{n}"),
                    models: models.into_iter().map(String::from).collect(),
                    ..NodeInfo::default()
                },
                known: Vec::new(),
            };
            roster.record_heartbeat(addr(n), &beat, now()).unwrap();
        }
        // Node 4 is in the ring: it is a stage, not a holder to ask.
        let ring = vec![addr(4).to_string()];
        assert_eq!(holders_of(&roster, "smollm2.gguf", &ring), vec![addr(2)]);
        assert_eq!(
            holders_of(&roster, "qwen.gguf", &ring).len(),
            2,
            "nodes 2 and 3"
        );
        assert!(holders_of(&roster, "other.gguf", &ring).is_empty());
    }
}
