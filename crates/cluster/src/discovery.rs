//! Finding the other members of the cluster on the LAN by mDNS / DNS-SD (issue #15, item 1).
//!
//! A home or office cluster should form by itself: start a node on each machine with the
//! same swarm key and they find each other. `--peer` and `POST /v1/cluster/join` remain for
//! networks without multicast.
//!
//! Every node advertises one `_shoal._tcp.local.` service — SRV at its peer port, A/AAAA
//! records that follow its interfaces, and a TXT record that describes it — and browses for
//! the same type. Each advert with this node's key fingerprint and another node id is offered
//! to the [`Roster`] as a candidate ([`Source::Mdns`]) at its IPv4 addresses (its IPv6 ones
//! when it has none). That is all discovery does: an advert is a hint, never membership. A
//! candidate becomes a member only after a heartbeat over a connection authenticated with the
//! swarm key, so a stranger's advert can make this node dial an address and nothing more.
//!
//! # TXT record
//!
//! RFC 6763 §6: each `key=value` string is at most 255 bytes. Long values are cut to fit
//! (models: as many whole names, in order, as fit), so an advert is never refused.
//!
//! | key | value |
//! |---|---|
//! | `id` | node id |
//! | `ver` | software version |
//! | `kf` | the swarm key's fingerprint ([`shoal_wire::SwarmKey::id`], 8 hex digits), or `none` |
//! | `pp` | peer port |
//! | `hp` | HTTP port (0: none) |
//! | `mt`, `mf` | memory total and free, bytes |
//! | `c` | logical cores |
//! | `acc` | accelerator (empty: CPU only) |
//! | `m` | model files on disk, comma-separated |
//! | `r` | swarm role (empty: a plain worker) |
//!
//! The fingerprint tells nodes of different swarms on one LAN apart without dialing them; it
//! gives nothing away about the key, and the key itself is never advertised. A received
//! advert is read defensively: `id`, `kf` and `pp` must be present and well formed, anything
//! else wrong in it falls back to a default (the heartbeat says it all again, with authority).
//!
//! # Threads and bounds
//!
//! mdns-sd runs its own thread and talks to it through bounded channels whose sends never
//! block. Here one tokio task reads its browse events (`recv_async`) and its daemon events,
//! and ends when the [`Discovery`] is shut down or dropped. Nothing grows with strangers'
//! adverts: at most [`MAX_ADDRS_PER_ADVERT`] addresses are taken from one advert, at most
//! [`MAX_KNOWN_MEMBERS`] adverts are remembered, and the sets of names already logged are
//! capped too.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mdns_sd::{
    DaemonEvent, Receiver, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo,
    TxtProperties,
};
use shoal_wire::{
    NodeInfo, MAX_ACCELERATOR, MAX_KNOWN_MEMBERS, MAX_MODELS, MAX_MODEL_ID, MAX_NODE_ID, MAX_ROLE,
    MAX_SOFTWARE_VERSION,
};
use tokio::sync::oneshot;
use tokio::time::MissedTickBehavior;

use crate::roster::{Roster, Source};

/// The DNS-SD service type every node advertises and browses for.
pub const SERVICE_TYPE: &str = "_shoal._tcp.local.";

/// The key fingerprint a node without a swarm key advertises.
pub const NO_KEY_FINGERPRINT: &str = "none";

/// Most addresses taken from one advert (the lowest, sorted): a stranger listing more gets
/// no more dials out of this node.
pub const MAX_ADDRS_PER_ADVERT: usize = 8;

/// Longest `key=value` string of a TXT record (RFC 6763 §6.1: one length byte).
const MAX_TXT_STRING: usize = 255;

/// Longest key fingerprint accepted from an advert (ours are 8 hex digits).
const MAX_FINGERPRINT: usize = 64;

/// Longest DNS label (RFC 1035 §2.3.4): the instance name and the host name's first label.
const MAX_DNS_LABEL: usize = 63;

/// How often the adverts still on the network are offered to the roster again. The roster
/// drops an mDNS candidate that never answered after `dead_after`, and mdns-sd reports a
/// service once, not on every refresh: without this, a node whose peer port came up after
/// its advert, or that was forgotten while down, would not be found again until it changed.
const REOFFER_EVERY: Duration = Duration::from_secs(10);

/// If the daemon has announced this node on no interface by then, the loop says so: the
/// daemon only logs its socket failures at debug level.
const ANNOUNCE_GRACE: Duration = Duration::from_secs(5);

/// How long the loop waits before browsing again when the daemon closed its subscription.
const REBROWSE_AFTER: Duration = Duration::from_secs(1);

/// Most names remembered in one "already logged" set; a full set starts over, so a flood of
/// strangers costs at worst a repeated debug line, never memory.
const MAX_LOGGED_NAMES: usize = 256;

/// TXT keys, kept short: the whole record travels in every answer.
mod txt_key {
    pub(super) const NODE_ID: &str = "id";
    pub(super) const VERSION: &str = "ver";
    pub(super) const KEY_FINGERPRINT: &str = "kf";
    pub(super) const PEER_PORT: &str = "pp";
    pub(super) const HTTP_PORT: &str = "hp";
    pub(super) const MEMORY_TOTAL: &str = "mt";
    pub(super) const MEMORY_FREE: &str = "mf";
    pub(super) const CORES: &str = "c";
    pub(super) const ACCELERATOR: &str = "acc";
    pub(super) const MODELS: &str = "m";
    pub(super) const ROLE: &str = "r";
}

/// What a node advertises about itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advert {
    /// Its id, ports, memory, cores, accelerator, role and models (`stages` is not advertised).
    pub info: NodeInfo,
    /// The swarm key's public fingerprint ([`shoal_wire::SwarmKey::id`]), or
    /// [`NO_KEY_FINGERPRINT`] without a key. Never the key.
    pub key_fingerprint: String,
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mDNS discovery must be started from inside a tokio runtime")]
    NoRuntime,
    #[error(
        "the node id {node_id:?} makes no valid mDNS advert ({source}); give the node a plainer \
         one with --node-id"
    )]
    Advert {
        node_id: String,
        #[source]
        source: mdns_sd::Error,
    },
    #[error(
        "could not start mDNS discovery ({0}); other nodes can still be joined with --peer \
         HOST:PORT or POST /v1/cluster/join"
    )]
    Daemon(#[source] mdns_sd::Error),
}

/// This node's advert on the LAN and the search for others. Dropping it (or
/// [`Discovery::shutdown`]) withdraws the advert and stops the daemon and the browse loop.
pub struct Discovery {
    daemon: ServiceDaemon,
    /// This node's full service name, to withdraw it.
    fullname: String,
    /// Dropped or fired: the browse loop ends.
    stop: Option<oneshot::Sender<()>>,
}

impl Discovery {
    /// Advertises `_shoal._tcp.local.` for this node and browses for others: every resolved
    /// service with the same key fingerprint and another node id becomes a candidate in
    /// `roster` ([`Source::Mdns`]) at each of its IPv4 addresses (its IPv6 ones when it has no
    /// IPv4) with its peer port. Services of other swarms are ignored (logged once at debug).
    ///
    /// Must be called inside a tokio runtime: the browse loop is a task on it. The daemon
    /// opens its sockets on its own thread, so a network that cannot carry multicast is not
    /// an error here; the loop warns when nothing was announced after a few seconds.
    pub fn start(roster: Arc<Roster>, advert: Advert) -> Result<Discovery, DiscoveryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DiscoveryError::NoRuntime)?;
        let bad_advert = |source| DiscoveryError::Advert {
            node_id: advert.info.node_id.clone(),
            source,
        };
        let instance = dns_label(&advert.info.node_id);
        let host = format!("{instance}.local.");
        let txt = txt_properties(&advert);
        // No addresses given: `enable_addr_auto` makes the daemon publish, on each interface,
        // that interface's addresses, and follow them as they change.
        let service = ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            "",
            advert.info.peer_port,
            &txt[..],
        )
        .map_err(bad_advert)?
        .enable_addr_auto();
        let fullname = service.get_fullname().to_owned();

        let daemon = ServiceDaemon::new().map_err(DiscoveryError::Daemon)?;
        // The daemon's thread runs from here on: a failure below must stop it.
        let stop_daemon = |error: DiscoveryError| {
            if let Err(e) = daemon.shutdown() {
                tracing::debug!("mDNS: stopping the daemon after a failed start: {e}");
            }
            error
        };
        // The monitor first, so that the first announcement is seen.
        let daemon_events = daemon
            .monitor()
            .map_err(|e| stop_daemon(DiscoveryError::Daemon(e)))?;
        let service_events = daemon
            .browse(SERVICE_TYPE)
            .map_err(|e| stop_daemon(DiscoveryError::Daemon(e)))?;
        daemon.register(service).map_err(|e| match e {
            mdns_sd::Error::Msg(_) => stop_daemon(bad_advert(e)),
            other => stop_daemon(DiscoveryError::Daemon(other)),
        })?;
        tracing::info!(
            "mDNS: advertising {fullname} (key {}) on port {}",
            advert.key_fingerprint,
            advert.info.peer_port
        );

        let (stop, stopped) = oneshot::channel();
        let browse = BrowseLoop {
            roster,
            my_fingerprint: advert.key_fingerprint,
            remembered: HashMap::new(),
            strangers_logged: LogOnce::default(),
            errors_logged: LogOnce::default(),
        };
        runtime.spawn(browse.run(daemon.clone(), service_events, daemon_events, stopped));
        Ok(Discovery {
            daemon,
            fullname,
            stop: Some(stop),
        })
    }

    /// Withdraws this node's advert (one goodbye packet: peers' mDNS caches drop it now, not
    /// when its records expire) and stops the daemon and the browse loop. Never blocks; the
    /// same as dropping it.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // In this order on the daemon's queue: the goodbye packets go out before it exits.
        if let Err(e) = self.daemon.unregister(&self.fullname) {
            tracing::debug!("mDNS: withdrawing {}: {e}", self.fullname);
        }
        if let Err(e) = self.daemon.shutdown() {
            tracing::debug!("mDNS: stopping the daemon: {e}");
        }
    }
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

/// The task that turns the daemon's events into roster candidates.
struct BrowseLoop {
    roster: Arc<Roster>,
    my_fingerprint: String,
    /// This swarm's adverts on the network now, by full service name: offered again every
    /// [`REOFFER_EVERY`]. At most [`MAX_KNOWN_MEMBERS`]; beyond, new ones are offered once.
    remembered: HashMap<String, Vec<SocketAddr>>,
    /// Other swarms' and malformed services already logged.
    strangers_logged: LogOnce,
    /// Daemon errors already logged.
    errors_logged: LogOnce,
}

impl BrowseLoop {
    async fn run(
        mut self,
        daemon: ServiceDaemon,
        mut service_events: Receiver<ServiceEvent>,
        daemon_events: Receiver<DaemonEvent>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut reoffer = tokio::time::interval(REOFFER_EVERY);
        reoffer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let announce_deadline = tokio::time::sleep(ANNOUNCE_GRACE);
        tokio::pin!(announce_deadline);
        let mut announced = false;
        let mut announce_checked = false;
        let mut daemon_events_open = true;
        loop {
            tokio::select! {
                // Fired or dropped: either way the Discovery is gone.
                _ = &mut stop => break,
                event = service_events.recv_async() => match event {
                    Ok(event) => self.on_service_event(event),
                    Err(_) => {
                        // The daemon closed the subscription: it stopped, or this loop fell
                        // too far behind. Browse again, unless it has stopped.
                        tokio::select! {
                            _ = &mut stop => break,
                            () = tokio::time::sleep(REBROWSE_AFTER) => {}
                        }
                        match daemon.browse(SERVICE_TYPE) {
                            Ok(events) => {
                                tracing::debug!("mDNS: search closed by the daemon; again");
                                service_events = events;
                            }
                            Err(e) => {
                                tracing::debug!("mDNS: the daemon has stopped ({e})");
                                break;
                            }
                        }
                    }
                },
                event = daemon_events.recv_async(), if daemon_events_open => match event {
                    Ok(event) => self.on_daemon_event(event, &mut announced),
                    Err(_) => daemon_events_open = false,
                },
                () = &mut announce_deadline, if !announce_checked => {
                    announce_checked = true;
                    if !announced {
                        tracing::warn!(
                            "mDNS: this node was not announced on any network interface within \
                             {ANNOUNCE_GRACE:?}: no interface is up with multicast, or UDP port \
                             5353 could not be opened. Other nodes will not find it by mDNS; \
                             join them with --peer HOST:PORT or POST /v1/cluster/join"
                        );
                    }
                }
                _ = reoffer.tick() => self.reoffer(),
            }
        }
    }

    fn on_service_event(&mut self, event: ServiceEvent) {
        match event {
            ServiceEvent::ServiceResolved(resolved) => self.on_resolved(&resolved),
            ServiceEvent::ServiceRemoved(_, fullname) => self.forget(&fullname),
            _ => {}
        }
    }

    fn on_resolved(&mut self, resolved: &ResolvedService) {
        let fullname = &resolved.fullname;
        match offer_from(resolved, &self.roster.my_id(), &self.my_fingerprint) {
            Ok((advert, addrs)) => {
                let now = now();
                for &addr in &addrs {
                    self.roster.add_candidate(addr, Source::Mdns, now);
                }
                tracing::info!(
                    "mDNS: found node {:?} ({}) at {addrs:?}",
                    advert.info.node_id,
                    advert.info.version
                );
                if self.remembered.len() < MAX_KNOWN_MEMBERS
                    || self.remembered.contains_key(fullname)
                {
                    self.remembered.insert(fullname.clone(), addrs);
                }
            }
            Err(Skip::Mine) => {}
            Err(Skip::OtherSwarm(fingerprint)) => {
                if self.strangers_logged.first_time(fullname) {
                    tracing::debug!(
                        "mDNS: {fullname} belongs to another swarm (key {fingerprint}); ignored"
                    );
                }
            }
            Err(why) => {
                if self.strangers_logged.first_time(fullname) {
                    tracing::debug!("mDNS: ignored the advert {fullname}: {why}");
                }
            }
        }
    }

    /// A service left the network (a goodbye, or its records expired): no more re-offers.
    fn forget(&mut self, fullname: &str) {
        if self.remembered.remove(fullname).is_some() {
            tracing::debug!("mDNS: {fullname} withdrew its advert");
        }
    }

    fn on_daemon_event(&mut self, event: DaemonEvent, announced: &mut bool) {
        match event {
            DaemonEvent::Announce(name, on) => {
                *announced = true;
                tracing::debug!("mDNS: announced {name} on {on}");
            }
            DaemonEvent::Error(e) => {
                let e = e.to_string();
                if self.errors_logged.first_time(&e) {
                    tracing::warn!("mDNS: {e}");
                }
            }
            DaemonEvent::NameChange(change) => tracing::info!(
                "mDNS: another device on the network uses the name {}; this node is advertised \
                 as {} instead",
                change.original,
                change.new_name
            ),
            DaemonEvent::IpAdd(ip) => tracing::debug!("mDNS: now also advertised at {ip}"),
            DaemonEvent::IpDel(ip) => tracing::debug!("mDNS: no longer advertised at {ip}"),
            _ => {}
        }
    }

    fn reoffer(&self) {
        let now = now();
        for &addr in self.remembered.values().flatten() {
            self.roster.add_candidate(addr, Source::Mdns, now);
        }
    }
}

/// Remembers which names were logged, so that each is logged once; at most
/// [`MAX_LOGGED_NAMES`], then it starts over.
#[derive(Default)]
struct LogOnce(HashSet<String>);

impl LogOnce {
    fn first_time(&mut self, name: &str) -> bool {
        if self.0.contains(name) {
            return false;
        }
        if self.0.len() >= MAX_LOGGED_NAMES {
            self.0.clear();
        }
        self.0.insert(name.to_owned());
        true
    }
}

/// Why a resolved service is not offered to the roster.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Skip {
    #[error("it is this node's own")]
    Mine,
    #[error("it belongs to another swarm (key {0})")]
    OtherSwarm(String),
    #[error("{0}")]
    Malformed(#[from] BadAdvert),
    #[error("it lists no usable address")]
    NoAddress,
}

/// What is wrong with a received TXT record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum BadAdvert {
    #[error("its TXT record has no `{0}`")]
    Missing(&'static str),
    #[error("its TXT record's `{0}` is malformed")]
    Malformed(&'static str),
}

/// The advert in a resolved service and the addresses to try it at — unless it is this
/// node's own (`my_id`), another swarm's (not `my_fingerprint`) or malformed.
fn offer_from(
    resolved: &ResolvedService,
    my_id: &str,
    my_fingerprint: &str,
) -> Result<(Advert, Vec<SocketAddr>), Skip> {
    let advert = parse_advert(&resolved.txt_properties)?;
    if advert.info.node_id == my_id {
        return Err(Skip::Mine);
    }
    if advert.key_fingerprint != my_fingerprint {
        return Err(Skip::OtherSwarm(advert.key_fingerprint));
    }
    let addrs = peer_addrs(&resolved.addresses, advert.info.peer_port);
    if addrs.is_empty() {
        return Err(Skip::NoAddress);
    }
    Ok((advert, addrs))
}

/// Where to dial a peer: its IPv4 addresses, or its IPv6 ones when it has none (link-local
/// ones with the interface they were seen on), at `port`. Unspecified, multicast and
/// broadcast addresses are left out; at most [`MAX_ADDRS_PER_ADVERT`], lowest first.
fn peer_addrs(addresses: &HashSet<ScopedIp>, port: u16) -> Vec<SocketAddr> {
    let v4: Vec<SocketAddr> = addresses
        .iter()
        .filter_map(|a| match a {
            ScopedIp::V4(a) => Some(*a.addr()),
            _ => None,
        })
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast() && *ip != Ipv4Addr::BROADCAST)
        .map(|ip| SocketAddr::new(IpAddr::V4(ip), port))
        .collect();
    let mut addrs = if v4.is_empty() {
        addresses
            .iter()
            .filter_map(|a| match a {
                ScopedIp::V6(a) => Some(a),
                _ => None,
            })
            .filter(|a| !a.addr().is_unspecified() && !a.addr().is_multicast())
            .map(|a| {
                let ip = *a.addr();
                let scope = if ip.is_unicast_link_local() {
                    a.scope_id().index
                } else {
                    0
                };
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
            })
            .collect()
    } else {
        v4
    };
    addrs.sort();
    addrs.dedup();
    addrs.truncate(MAX_ADDRS_PER_ADVERT);
    addrs
}

/// The TXT record of `advert` (see the module's table), every `key=value` within 255 bytes.
fn txt_properties(advert: &Advert) -> Vec<(String, String)> {
    let info = &advert.info;
    let numbers = [
        (txt_key::PEER_PORT, info.peer_port.to_string()),
        (txt_key::HTTP_PORT, info.http_port.to_string()),
        (txt_key::MEMORY_TOTAL, info.memory_total.to_string()),
        (txt_key::MEMORY_FREE, info.memory_free.to_string()),
        (txt_key::CORES, info.cores.to_string()),
    ];
    let mut txt: Vec<(String, String)> = Vec::with_capacity(11);
    let mut put = |key: &str, value: &str| {
        let room = MAX_TXT_STRING - key.len() - 1;
        txt.push((key.to_owned(), truncate_utf8(value, room).to_owned()));
    };
    put(txt_key::NODE_ID, &info.node_id);
    put(txt_key::VERSION, &info.version);
    put(txt_key::KEY_FINGERPRINT, &advert.key_fingerprint);
    for (key, value) in &numbers {
        put(key, value);
    }
    put(txt_key::ACCELERATOR, &info.accelerator);
    let room = MAX_TXT_STRING - txt_key::MODELS.len() - 1;
    put(txt_key::MODELS, &models_list(&info.models, room));
    put(txt_key::ROLE, &info.role);
    txt
}

/// As many of `models`, in order, as fit in `room` bytes joined by commas. A name with a
/// comma in it, or an empty one, is left out: it would not read back as itself.
fn models_list(models: &[String], room: usize) -> String {
    let mut list = String::new();
    for model in models.iter().filter(|m| !m.is_empty() && !m.contains(',')) {
        let needed = model.len() + usize::from(!list.is_empty());
        if list.len() + needed > room {
            break;
        }
        if !list.is_empty() {
            list.push(',');
        }
        list.push_str(model);
    }
    list
}

/// Reads an advert from a received TXT record. `id`, `kf` and `pp` must be there and well
/// formed; anything else missing or malformed reads as empty or zero, and every text is cut
/// to the peer protocol's bound for it.
fn parse_advert(txt: &TxtProperties) -> Result<Advert, BadAdvert> {
    use txt_key::*;
    let node_id = required(txt, NODE_ID)?;
    if node_id.is_empty() || node_id.len() > MAX_NODE_ID {
        return Err(BadAdvert::Malformed(NODE_ID));
    }
    let key_fingerprint = required(txt, KEY_FINGERPRINT)?;
    if key_fingerprint.is_empty() || key_fingerprint.len() > MAX_FINGERPRINT {
        return Err(BadAdvert::Malformed(KEY_FINGERPRINT));
    }
    let peer_port = match required(txt, PEER_PORT)?.parse::<u16>() {
        Ok(port) if port != 0 => port,
        _ => return Err(BadAdvert::Malformed(PEER_PORT)),
    };
    let models = optional(txt, MODELS)
        .split(',')
        .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_ID)
        .take(MAX_MODELS)
        .map(str::to_owned)
        .collect();
    Ok(Advert {
        info: NodeInfo {
            node_id: node_id.to_owned(),
            version: truncate_utf8(optional(txt, VERSION), MAX_SOFTWARE_VERSION).to_owned(),
            peer_port,
            http_port: number(txt, HTTP_PORT),
            memory_total: number(txt, MEMORY_TOTAL),
            memory_free: number(txt, MEMORY_FREE),
            cores: number(txt, CORES),
            accelerator: truncate_utf8(optional(txt, ACCELERATOR), MAX_ACCELERATOR).to_owned(),
            role: truncate_utf8(optional(txt, ROLE), MAX_ROLE).to_owned(),
            models,
            ..NodeInfo::default()
        },
        key_fingerprint: key_fingerprint.to_owned(),
    })
}

/// A field that must be there, as UTF-8 text.
fn required<'a>(txt: &'a TxtProperties, key: &'static str) -> Result<&'a str, BadAdvert> {
    let value = txt
        .get(key)
        .ok_or(BadAdvert::Missing(key))?
        .val()
        .ok_or(BadAdvert::Malformed(key))?;
    std::str::from_utf8(value).map_err(|_| BadAdvert::Malformed(key))
}

/// A field that may be missing: empty when it is, or is no UTF-8 text.
fn optional<'a>(txt: &'a TxtProperties, key: &'static str) -> &'a str {
    required(txt, key).unwrap_or_default()
}

/// A number that may be missing: zero when it is, or is no number of that type.
fn number<T: FromStr + Default>(txt: &TxtProperties, key: &'static str) -> T {
    optional(txt, key).parse().unwrap_or_default()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The node id as one DNS label, for the instance and host names: ASCII letters and digits
/// (lower-cased), every run of anything else one `-`, no `-` at either end, at most 63 bytes;
/// `shoal` when nothing is left. Two ids that come out the same are told apart by mdns-sd's
/// conflict resolution (a suffix); the TXT record carries the id itself.
fn dns_label(node_id: &str) -> String {
    let mut label = String::with_capacity(node_id.len().min(MAX_DNS_LABEL));
    for c in node_id.chars() {
        if c.is_ascii_alphanumeric() {
            label.push(c.to_ascii_lowercase());
        } else if !label.is_empty() && !label.ends_with('-') {
            label.push('-');
        }
        if label.len() >= MAX_DNS_LABEL {
            break;
        }
    }
    label.truncate(MAX_DNS_LABEL);
    let label = label.trim_end_matches('-');
    if label.is_empty() {
        "shoal".to_owned()
    } else {
        label.to_owned()
    }
}

/// Now, on tokio's clock, as the heartbeat loop reads it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn sample() -> Advert {
        Advert {
            info: NodeInfo {
                node_id: "pi:7471".into(),
                version: "0.1.0".into(),
                peer_port: 7471,
                http_port: 8080,
                memory_total: 8 << 30,
                memory_free: 5 << 30,
                cores: 4,
                accelerator: "NVIDIA H200".into(),
                role: "critic".into(),
                models: vec!["smollm2.gguf".into(), "qwen.gguf".into()],
                ..NodeInfo::default()
            },
            key_fingerprint: "1a2b3c4d".into(),
        }
    }

    /// A TXT record's bytes as they come off the wire: length-prefixed strings.
    fn raw_txt(strings: &[&[u8]]) -> TxtProperties {
        let mut bytes = Vec::new();
        for s in strings {
            bytes.push(u8::try_from(s.len()).unwrap());
            bytes.extend_from_slice(s);
        }
        TxtProperties::from(&bytes[..])
    }

    /// `advert` as a peer resolves it: through mdns-sd's own TXT encoding, at `ips`.
    fn resolved(advert: &Advert, ips: &str) -> ResolvedService {
        let txt = txt_properties(advert);
        let label = dns_label(&advert.info.node_id);
        ServiceInfo::new(
            SERVICE_TYPE,
            &label,
            &format!("{label}.local."),
            ips,
            advert.info.peer_port,
            &txt[..],
        )
        .unwrap()
        .as_resolved_service()
    }

    const ONE_OF_EACH: &str = "192.168.1.20,10.0.0.7,fd00::2,fe80::1";

    #[test]
    fn an_advert_round_trips_through_its_txt_record() {
        let advert = sample();
        let service = resolved(&advert, ONE_OF_EACH);
        assert_eq!(parse_advert(&service.txt_properties).unwrap(), advert);

        let txt = txt_properties(&advert);
        let keys: Vec<&str> = txt.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["id", "ver", "kf", "pp", "hp", "mt", "mf", "c", "acc", "m", "r"]
        );
        assert!(txt.contains(&("m".into(), "smollm2.gguf,qwen.gguf".into())));

        // Empty optional fields read back empty.
        let mut plain = sample();
        plain.info.accelerator.clear();
        plain.info.role.clear();
        plain.info.models.clear();
        plain.info.http_port = 0;
        let service = resolved(&plain, "10.0.0.7");
        assert_eq!(parse_advert(&service.txt_properties).unwrap(), plain);
    }

    #[test]
    fn long_values_are_cut_to_fit_and_the_advert_is_never_refused() {
        let mut advert = sample();
        advert.info.node_id = "n".repeat(MAX_NODE_ID);
        advert.info.accelerator = "é".repeat(200); // 400 bytes, two per character
        advert.info.models = (0..MAX_MODELS)
            .map(|i| format!("{i:02}-{}.gguf", "x".repeat(40)))
            .collect();
        advert.info.models.insert(1, "with,comma.gguf".into());
        advert.info.models.insert(2, String::new());
        let txt = txt_properties(&advert);
        for (key, value) in &txt {
            assert!(
                key.len() + 1 + value.len() <= MAX_TXT_STRING,
                "{key} is too long"
            );
        }
        // mdns-sd refuses a string over 255 bytes: this one it takes.
        let service = resolved(&advert, "10.0.0.7");
        let back = parse_advert(&service.txt_properties).unwrap();
        assert_eq!(back.info.node_id, advert.info.node_id);
        assert!(back.info.accelerator.len() <= MAX_TXT_STRING - 4);
        assert!(back.info.accelerator.chars().all(|c| c == 'é'));
        // A prefix of the models, whole names only, without the comma and the empty one.
        let expected: Vec<String> = advert
            .info
            .models
            .iter()
            .filter(|m| !m.is_empty() && !m.contains(','))
            .take(back.info.models.len())
            .cloned()
            .collect();
        assert!(back.info.models.len() >= 4, "{:?}", back.info.models);
        assert!(back.info.models.len() < MAX_MODELS);
        assert_eq!(back.info.models, expected);
    }

    #[test]
    fn missing_or_malformed_required_fields_refuse_the_advert() {
        let cases: &[(&[&[u8]], BadAdvert)] = &[
            (&[b"kf=1a2b3c4d", b"pp=7471"], BadAdvert::Missing("id")),
            (&[b"id=a", b"pp=7471"], BadAdvert::Missing("kf")),
            (&[b"id=a", b"kf=1a2b3c4d"], BadAdvert::Missing("pp")),
            (&[b"id=", b"kf=k", b"pp=1"], BadAdvert::Malformed("id")),
            (&[b"id", b"kf=k", b"pp=1"], BadAdvert::Malformed("id")),
            (
                &[b"id=\xff\xfe", b"kf=k", b"pp=1"],
                BadAdvert::Malformed("id"),
            ),
            (&[b"id=a", b"kf=", b"pp=1"], BadAdvert::Malformed("kf")),
            (&[b"id=a", b"kf=k", b"pp=0"], BadAdvert::Malformed("pp")),
            (&[b"id=a", b"kf=k", b"pp=65536"], BadAdvert::Malformed("pp")),
            (&[b"id=a", b"kf=k", b"pp=-1"], BadAdvert::Malformed("pp")),
            (&[b"id=a", b"kf=k", b"pp= 1"], BadAdvert::Malformed("pp")),
            (&[b"id=a", b"kf=k", b"pp"], BadAdvert::Malformed("pp")),
        ];
        for (strings, expected) in cases {
            assert_eq!(
                parse_advert(&raw_txt(strings)),
                Err(expected.clone()),
                "{strings:?}"
            );
        }
        let long_id = format!("id={}", "a".repeat(MAX_NODE_ID + 1));
        let txt = raw_txt(&[long_id.as_bytes(), b"kf=k", b"pp=1"]);
        assert_eq!(parse_advert(&txt), Err(BadAdvert::Malformed("id")));
        let long_kf = format!("kf={}", "a".repeat(MAX_FINGERPRINT + 1));
        let txt = raw_txt(&[b"id=a", long_kf.as_bytes(), b"pp=1"]);
        assert_eq!(parse_advert(&txt), Err(BadAdvert::Malformed("kf")));
    }

    #[test]
    fn malformed_optional_fields_read_as_defaults() {
        let txt = raw_txt(&[
            b"ID=a", // keys are case-insensitive
            b"kf=k",
            b"pp=9",
            b"pp=10", // a repeated key: the first counts (RFC 6763 §6.4)
            b"hp=http",
            b"mt=-5",
            b"mf=99999999999999999999999",
            b"c",
            b"acc=\xc3",
            b"m=,,a.gguf,,b.gguf,",
            b"=orphan",
            b"",
        ]);
        let advert = parse_advert(&txt).unwrap();
        assert_eq!(
            advert,
            Advert {
                info: NodeInfo {
                    node_id: "a".into(),
                    peer_port: 9,
                    models: vec!["a.gguf".into(), "b.gguf".into()],
                    ..NodeInfo::default()
                },
                key_fingerprint: "k".into(),
            }
        );
    }

    #[test]
    fn arbitrary_txt_bytes_never_panic() {
        // A seeded generator: the same bytes every run.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"idkfpm=,0123456789\xff\xc3 ";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 3 == 0 {
                        (r >> 8) as u8
                    } else {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    }
                })
                .collect();
            let txt = TxtProperties::from(&bytes[..]);
            let _ = parse_advert(&txt);
        }
    }

    #[test]
    fn a_same_swarm_advert_offers_its_ipv4_addresses_at_its_peer_port() {
        let advert = sample();
        let (back, addrs) = offer_from(&resolved(&advert, ONE_OF_EACH), "me", "1a2b3c4d").unwrap();
        assert_eq!(back, advert);
        assert_eq!(
            addrs,
            [
                "10.0.0.7:7471".parse::<SocketAddr>().unwrap(),
                "192.168.1.20:7471".parse().unwrap()
            ]
        );
        // No IPv4: its IPv6 addresses.
        let (_, addrs) = offer_from(&resolved(&advert, "fd00::2"), "me", "1a2b3c4d").unwrap();
        assert_eq!(addrs, ["[fd00::2]:7471".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn other_swarms_this_node_and_useless_addresses_are_not_offered() {
        let advert = sample();
        let service = resolved(&advert, ONE_OF_EACH);
        assert_eq!(
            offer_from(&service, "me", "ffffffff").unwrap_err(),
            Skip::OtherSwarm("1a2b3c4d".into())
        );
        assert_eq!(
            offer_from(&service, "me", NO_KEY_FINGERPRINT).unwrap_err(),
            Skip::OtherSwarm("1a2b3c4d".into())
        );
        assert_eq!(
            offer_from(&service, "pi:7471", "1a2b3c4d").unwrap_err(),
            Skip::Mine
        );
        let useless = resolved(&advert, "0.0.0.0,224.0.0.251,255.255.255.255,ff02::fb,::");
        assert_eq!(
            offer_from(&useless, "me", "1a2b3c4d").unwrap_err(),
            Skip::NoAddress
        );
        let mut malformed = resolved(&advert, "10.0.0.7");
        malformed.txt_properties = raw_txt(&[b"id=a", b"kf=1a2b3c4d"]);
        assert_eq!(
            offer_from(&malformed, "me", "1a2b3c4d").unwrap_err(),
            Skip::Malformed(BadAdvert::Missing("pp"))
        );
    }

    #[test]
    fn one_advert_yields_a_bounded_number_of_addresses() {
        let ips: Vec<String> = (1..=50).map(|i| format!("10.0.0.{i}")).collect();
        let (_, addrs) =
            offer_from(&resolved(&sample(), &ips.join(",")), "me", "1a2b3c4d").unwrap();
        assert_eq!(addrs.len(), MAX_ADDRS_PER_ADVERT);
    }

    #[test]
    fn node_ids_become_dns_labels() {
        assert_eq!(dns_label("pi:7471"), "pi-7471");
        assert_eq!(dns_label("Laptop.local:7471"), "laptop-local-7471");
        assert_eq!(dns_label("--a__b--"), "a-b");
        assert_eq!(dns_label("über:1"), "ber-1");
        assert_eq!(dns_label(":::"), "shoal");
        assert_eq!(dns_label(""), "shoal");
        let long = dns_label(&format!("{}:{}", "a".repeat(62), "b".repeat(100)));
        assert_eq!(long, "a".repeat(62));
        assert_eq!(dns_label(&"x".repeat(128)).len(), MAX_DNS_LABEL);
        // mdns-sd takes the names built from them.
        let txt = txt_properties(&sample());
        for id in ["pi:7471", "über:1", ":::", &"x".repeat(128)] {
            let label = dns_label(id);
            let host = format!("{label}.local.");
            ServiceInfo::new(SERVICE_TYPE, &label, &host, "10.0.0.1", 1, &txt[..]).unwrap();
        }
    }

    #[test]
    fn the_loop_offers_adverts_again_until_they_are_withdrawn() {
        let config = crate::roster::DetectorConfig::default();
        let mut me = sample().info;
        me.node_id = "me".into();
        let roster = Arc::new(Roster::new(me, None, config));
        let mut browse = BrowseLoop {
            roster: roster.clone(),
            my_fingerprint: "1a2b3c4d".into(),
            remembered: HashMap::new(),
            strangers_logged: LogOnce::default(),
            errors_logged: LogOnce::default(),
        };
        let peer = resolved(&sample(), "10.0.0.7");
        let fullname = peer.fullname.clone();
        let mut stranger = sample();
        stranger.info.node_id = "stranger".into();
        stranger.key_fingerprint = "ffffffff".into();
        browse.on_service_event(ServiceEvent::ServiceResolved(Box::new(resolved(
            &stranger, "10.0.0.8",
        ))));
        browse.on_service_event(ServiceEvent::ServiceResolved(Box::new(peer)));
        let expected: Vec<SocketAddr> = vec!["10.0.0.7:7471".parse().unwrap()];
        assert_eq!(roster.view(now()).candidates, expected);

        // It never answered: the roster lets it go; the next re-offer brings it back.
        let later = now() + config.dead_after;
        assert!(roster.targets(later).is_empty());
        browse.reoffer();
        assert_eq!(roster.view(now()).candidates, expected);

        // Withdrawn: offered no more.
        browse.on_service_event(ServiceEvent::ServiceRemoved(SERVICE_TYPE.into(), fullname));
        assert!(browse.remembered.is_empty());
        assert!(roster.targets(now() + config.dead_after).is_empty());
        browse.reoffer();
        assert!(roster.view(now()).candidates.is_empty());
    }

    #[test]
    fn log_once_is_bounded() {
        let mut logged = LogOnce::default();
        assert!(logged.first_time("a"));
        assert!(!logged.first_time("a"));
        for i in 0..10 * MAX_LOGGED_NAMES {
            logged.first_time(&i.to_string());
        }
        assert!(logged.0.len() <= MAX_LOGGED_NAMES);
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error_not_a_panic() {
        let roster = Arc::new(Roster::new(
            sample().info,
            None,
            crate::roster::DetectorConfig::default(),
        ));
        let err = Discovery::start(roster, sample()).unwrap_err();
        assert!(matches!(err, DiscoveryError::NoRuntime), "{err}");
    }
}
