//! The cluster's member list as this node sees it, and the failure detector that keeps it
//! honest (issue #15).
//!
//! A **member** is a node this node has exchanged a [`Heartbeat`] with over an authenticated
//! connection (the swarm key's handshake came first), keyed by its node id. A **candidate** is
//! an address that may be a member — a `--peer`, a `POST /v1/cluster/join`, an mDNS answer, a
//! member's gossip — tried every round until a heartbeat works (then it is a member) or it is
//! given up on. Nothing a peer says makes another node a member: gossip only adds candidates.
//!
//! Failure detection is by timeout, SWIM-style without the indirect probes: every member is
//! heartbeaten directly every [`DetectorConfig::interval`], and heartbeats that arrive from it
//! count as well. A member last heard from within `suspect_after` is **alive**, within
//! `dead_after` **suspect**, else **dead**; a dead member found through discovery is forgotten
//! after `forget_after` (a static one is kept and tried for ever). Because every member probes
//! every other directly, all views agree within about `dead_after + interval` of a change —
//! for the home and office clusters Shoal is for (tens of devices), a full mesh of small
//! heartbeats costs less than the bookkeeping of a gossip-only detector.
//!
//! Time is passed in (`now`), so the state machine is tested without clocks, and the
//! heartbeat loop ([`crate::heartbeat`]) reads tokio's clock so it is tested with
//! `tokio::time::pause()`.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shoal_wire::{Heartbeat, KnownMember, NodeInfo, MAX_KNOWN_MEMBERS};

/// Timing of heartbeats and of the failure detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Time between heartbeat rounds.
    pub interval: Duration,
    /// Longest wait for one heartbeat exchange (connect, handshake, answer).
    pub probe_timeout: Duration,
    /// Silence after which a member is suspect.
    pub suspect_after: Duration,
    /// Silence after which a member is dead.
    pub dead_after: Duration,
    /// A dead member (not a static one) is dropped from the list after this much silence; a
    /// candidate found by discovery that never answers is dropped after `dead_after`.
    pub forget_after: Duration,
}

impl Default for DetectorConfig {
    /// 1 s heartbeats; suspect after 3 s, dead after 6 s, forgotten after 5 min.
    fn default() -> Self {
        DetectorConfig {
            interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(2),
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
            forget_after: Duration::from_secs(300),
        }
    }
}

/// A member's health, from the time since it was last heard from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
}

impl Liveness {
    /// `alive`, `suspect` or `dead`: the `state` of `GET /v1/cluster`.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
        }
    }
}

/// Where an address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--peer`, the config file or `POST /v1/cluster/join`: tried for ever.
    Static,
    /// An mDNS answer.
    Mdns,
    /// Another member's heartbeat.
    Gossip,
}

impl Source {
    fn is_static(self) -> bool {
        self == Source::Static
    }
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    /// Its peer address, as this node reaches it.
    pub addr: SocketAddr,
    pub state: Liveness,
    /// Time since it was last heard from.
    pub since_seen: Duration,
    /// What it said about itself in its last heartbeat.
    pub info: NodeInfo,
    /// The last heartbeat's round trip (on a connection already set up).
    pub round_trip: Option<Duration>,
    /// Why the last heartbeat to it failed, while it is not alive.
    pub last_error: Option<String>,
}

/// The whole list, as `GET /v1/cluster` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct RosterView {
    /// This node, as it describes itself.
    pub me: NodeInfo,
    /// This node's peer address, as best known.
    pub my_addr: Option<SocketAddr>,
    /// Every other member, alive first, then by id.
    pub members: Vec<MemberView>,
    /// Addresses still being tried.
    pub candidates: Vec<SocketAddr>,
}

/// Why a heartbeat was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    /// The other node has this node's id: one of them must be given another (`--node-id`).
    #[error(
        "the node at {addr} has this node's id {id:?}; give one of them another with --node-id"
    )]
    SameId { id: String, addr: SocketAddr },
}

#[derive(Debug)]
struct Entry {
    addr: SocketAddr,
    info: NodeInfo,
    /// The last heartbeat's round trip.
    round_trip: Option<Duration>,
    last_seen: Instant,
    is_static: bool,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Candidate {
    addr: SocketAddr,
    source: Source,
    added: Instant,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Lists {
    me: NodeInfo,
    my_addr: Option<SocketAddr>,
    members: Vec<Entry>,
    candidates: Vec<Candidate>,
}

/// The member list, shared by the heartbeat loop, the peer port that answers heartbeats,
/// discovery and the API. Every method takes the lock briefly and never across I/O.
#[derive(Debug)]
pub struct Roster {
    config: DetectorConfig,
    lists: Mutex<Lists>,
    /// Playing dead (the dashboard's kill): no heartbeats out, none answered; the peer port
    /// watches it to drop its connections.
    down: tokio::sync::watch::Sender<bool>,
}

impl Roster {
    /// A list with only this node in it.
    pub fn new(me: NodeInfo, my_addr: Option<SocketAddr>, config: DetectorConfig) -> Self {
        Roster {
            config,
            lists: Mutex::new(Lists {
                me,
                my_addr,
                members: Vec::new(),
                candidates: Vec::new(),
            }),
            down: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Plays dead (`true`) or stops (the dashboard's kill and heal): while down, this node
    /// sends no heartbeats and answers none, so the others see it suspect, then dead.
    pub fn set_down(&self, down: bool) {
        self.down
            .send_if_modified(|now| std::mem::replace(now, down) != down);
    }

    /// Whether this node is playing dead.
    pub fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    /// Follows [`Roster::set_down`].
    pub fn watch_down(&self) -> tokio::sync::watch::Receiver<bool> {
        self.down.subscribe()
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// This node's id.
    pub fn my_id(&self) -> String {
        self.lock().me.node_id.clone()
    }

    /// Changes what this node says about itself (free memory, stages held, models).
    pub fn update_me(&self, change: impl FnOnce(&mut NodeInfo)) {
        change(&mut self.lock().me);
    }

    /// This node's peer address, once known better (it listened on every interface).
    pub fn set_my_addr(&self, addr: SocketAddr) {
        self.lock().my_addr = Some(addr);
    }

    /// What this node sends: itself and the members it believes alive or suspect.
    pub fn heartbeat(&self, now: Instant) -> Heartbeat {
        let lists = self.lock();
        let known = lists
            .members
            .iter()
            .filter(|m| self.liveness(m, now) != Liveness::Dead)
            .take(MAX_KNOWN_MEMBERS)
            .map(|m| KnownMember {
                node_id: m.info.node_id.clone(),
                addr: m.addr,
            })
            .collect();
        Heartbeat {
            node: lists.me.clone(),
            known,
        }
    }

    /// An address that may be a member. Ignored when it is a member's address already or
    /// being tried, or when [`MAX_KNOWN_MEMBERS`] candidates are being tried and it is not
    /// static; a static source makes a known candidate or member static.
    pub fn add_candidate(&self, addr: SocketAddr, source: Source, now: Instant) {
        let mut lists = self.lock();
        if lists.my_addr == Some(addr) {
            return;
        }
        if let Some(m) = lists.members.iter_mut().find(|m| m.addr == addr) {
            m.is_static |= source.is_static();
            return;
        }
        if let Some(c) = lists.candidates.iter_mut().find(|c| c.addr == addr) {
            if source.is_static() {
                c.source = Source::Static;
            }
            return;
        }
        // Anyone on the LAN can copy a swarm's public fingerprint and flood adverts: only a
        // static address may grow the list past the bound.
        if !source.is_static() && lists.candidates.len() >= MAX_KNOWN_MEMBERS {
            return;
        }
        lists.candidates.push(Candidate {
            addr,
            source,
            added: now,
            last_error: None,
        });
    }

    /// A heartbeat exchange with the node at `addr` worked (it sent `heartbeat`, over a
    /// connection authenticated with the swarm key): it is a member, alive now, and the
    /// members it knows become candidates. `addr` is its peer address as this node reaches it.
    pub fn record_heartbeat(
        &self,
        addr: SocketAddr,
        heartbeat: &Heartbeat,
        now: Instant,
    ) -> Result<(), RosterError> {
        let mut lists = self.lock();
        let id = &heartbeat.node.node_id;
        if *id == lists.me.node_id {
            lists
                .candidates
                .retain(|c| c.addr != addr || c.source.is_static());
            return Err(RosterError::SameId {
                id: id.clone(),
                addr,
            });
        }
        let was_candidate = lists.candidates.iter().position(|c| c.addr == addr);
        let is_static = was_candidate
            .map(|i| lists.candidates[i].source.is_static())
            .unwrap_or(false);
        if let Some(i) = was_candidate {
            lists.candidates.swap_remove(i);
        }
        let suspect_after = self.config.suspect_after;
        match lists.members.iter_mut().find(|m| m.info.node_id == *id) {
            // A second address of a member that answers on its first (mDNS offers every
            // interface's): the member keeps the address it has, so its `addr` does not flap.
            Some(m)
                if was_candidate.is_some()
                    && m.addr != addr
                    && now.saturating_duration_since(m.last_seen) < suspect_after =>
            {
                m.info = heartbeat.node.clone();
                m.last_seen = now;
                m.is_static |= is_static;
            }
            Some(m) => {
                m.addr = addr;
                m.info = heartbeat.node.clone();
                m.last_seen = now;
                m.is_static |= is_static;
                m.last_error = None;
            }
            None => lists.members.push(Entry {
                addr,
                info: heartbeat.node.clone(),
                round_trip: None,
                last_seen: now,
                is_static,
                last_error: None,
            }),
        }
        // Another member may have held this address before (a node restarted with a new id).
        lists
            .members
            .retain(|m| m.addr != addr || m.info.node_id == *id);
        let me = lists.me.node_id.clone();
        for k in &heartbeat.known {
            let known = k.node_id == me
                || lists.members.iter().any(|m| m.info.node_id == k.node_id)
                || lists.candidates.iter().any(|c| c.addr == k.addr)
                || lists.my_addr == Some(k.addr);
            if !known && lists.candidates.len() < MAX_KNOWN_MEMBERS {
                lists.candidates.push(Candidate {
                    addr: k.addr,
                    source: Source::Gossip,
                    added: now,
                    last_error: None,
                });
            }
        }
        Ok(())
    }

    /// The round trip of the last heartbeat exchanged with the member at `addr`.
    pub fn record_round_trip(&self, addr: SocketAddr, round_trip: Duration) {
        let mut lists = self.lock();
        if let Some(m) = lists.members.iter_mut().find(|m| m.addr == addr) {
            m.round_trip = Some(round_trip);
        }
    }

    /// A heartbeat to `addr` failed with `error`.
    pub fn record_failure(&self, addr: SocketAddr, error: &str) {
        let mut lists = self.lock();
        if let Some(m) = lists.members.iter_mut().find(|m| m.addr == addr) {
            m.last_error = Some(error.to_owned());
        }
        if let Some(c) = lists.candidates.iter_mut().find(|c| c.addr == addr) {
            c.last_error = Some(error.to_owned());
        }
    }

    /// The addresses to heartbeat this round: every member and candidate. Drops first what
    /// is to be forgotten: dead members after `forget_after`, candidates from discovery that
    /// never answered within `dead_after` (static ones never).
    pub fn targets(&self, now: Instant) -> Vec<SocketAddr> {
        let config = self.config;
        let mut lists = self.lock();
        lists.members.retain(|m| {
            m.is_static || now.saturating_duration_since(m.last_seen) < config.forget_after
        });
        lists.candidates.retain(|c| {
            c.source.is_static() || now.saturating_duration_since(c.added) < config.dead_after
        });
        lists
            .members
            .iter()
            .map(|m| m.addr)
            .chain(lists.candidates.iter().map(|c| c.addr))
            .collect()
    }

    /// The list as it stands: alive members first, then suspect, then dead, each by id.
    pub fn view(&self, now: Instant) -> RosterView {
        let lists = self.lock();
        let mut members: Vec<MemberView> = lists
            .members
            .iter()
            .map(|m| {
                let state = self.liveness(m, now);
                MemberView {
                    addr: m.addr,
                    state,
                    since_seen: now.saturating_duration_since(m.last_seen),
                    info: m.info.clone(),
                    round_trip: m.round_trip,
                    last_error: (state != Liveness::Alive)
                        .then(|| m.last_error.clone())
                        .flatten(),
                }
            })
            .collect();
        members.sort_by(|a, b| (a.state, &a.info.node_id).cmp(&(b.state, &b.info.node_id)));
        RosterView {
            me: lists.me.clone(),
            my_addr: lists.my_addr,
            members,
            candidates: lists.candidates.iter().map(|c| c.addr).collect(),
        }
    }

    /// The members alive now, as [`Roster::view`] lists them.
    pub fn alive(&self, now: Instant) -> Vec<MemberView> {
        let mut view = self.view(now);
        view.members.retain(|m| m.state == Liveness::Alive);
        view.members
    }

    fn liveness(&self, m: &Entry, now: Instant) -> Liveness {
        let silent = now.saturating_duration_since(m.last_seen);
        if silent < self.config.suspect_after {
            Liveness::Alive
        } else if silent < self.config.dead_after {
            Liveness::Suspect
        } else {
            Liveness::Dead
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lists> {
        // A holder that panicked left whole entries behind; they are still valid.
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn info(id: &str, port: u16) -> NodeInfo {
        NodeInfo {
            node_id: id.into(),
            peer_port: port,
            ..NodeInfo::default()
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn beat(id: &str, port: u16, known: &[(&str, u16)]) -> Heartbeat {
        Heartbeat {
            node: info(id, port),
            known: known
                .iter()
                .map(|(id, p)| KnownMember {
                    node_id: (*id).into(),
                    addr: addr(*p),
                })
                .collect(),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_member_goes_alive_suspect_dead_and_back_with_time() {
        let t0 = Instant::now();
        let roster = Roster::new(info("a", 1), Some(addr(1)), DetectorConfig::default());
        roster.add_candidate(addr(2), Source::Static, t0);
        assert_eq!(roster.view(t0).candidates, vec![addr(2)]);
        assert!(
            roster.view(t0).members.is_empty(),
            "a candidate is no member"
        );
        assert_eq!(roster.targets(t0), vec![addr(2)]);

        roster
            .record_heartbeat(addr(2), &beat("b", 2, &[]), t0)
            .unwrap();
        let view = roster.view(t0);
        assert!(view.candidates.is_empty());
        assert_eq!(view.members.len(), 1);
        assert_eq!(view.members[0].info.node_id, "b");
        assert_eq!(view.members[0].state, Liveness::Alive);

        roster.record_failure(addr(2), "connection refused");
        assert_eq!(roster.view(t0 + 2 * S).members[0].state, Liveness::Alive);
        assert_eq!(roster.view(t0 + 2 * S).members[0].last_error, None);
        let suspect = &roster.view(t0 + 3 * S).members[0];
        assert_eq!(suspect.state, Liveness::Suspect);
        assert_eq!(suspect.last_error.as_deref(), Some("connection refused"));
        assert_eq!(roster.view(t0 + 6 * S).members[0].state, Liveness::Dead);
        assert!(roster.alive(t0 + 6 * S).is_empty());
        // A static member is never forgotten; it comes back when it answers.
        assert_eq!(roster.targets(t0 + 1000 * S), vec![addr(2)]);
        roster
            .record_heartbeat(addr(2), &beat("b", 2, &[]), t0 + 1000 * S)
            .unwrap();
        assert_eq!(roster.alive(t0 + 1000 * S).len(), 1);
    }

    #[test]
    fn gossip_adds_candidates_never_members_and_discovery_forgets() {
        let t0 = Instant::now();
        let roster = Roster::new(info("a", 1), Some(addr(1)), DetectorConfig::default());
        roster
            .record_heartbeat(addr(2), &beat("b", 2, &[("c", 3), ("a", 1), ("b", 2)]), t0)
            .unwrap();
        let view = roster.view(t0);
        assert_eq!(view.members.len(), 1, "b, who answered");
        assert_eq!(view.candidates, vec![addr(3)], "c; never a itself, b known");
        // The heartbeat a sends lists b (alive), not itself.
        let hb = roster.heartbeat(t0);
        assert_eq!(hb.node.node_id, "a");
        assert_eq!(hb.known.len(), 1);
        assert_eq!(hb.known[0].node_id, "b");

        // c never answers: forgotten after dead_after. b goes silent: dead, then forgotten.
        assert_eq!(roster.targets(t0 + 5 * S), vec![addr(2), addr(3)]);
        assert_eq!(roster.targets(t0 + 6 * S), vec![addr(2)]);
        assert!(roster.heartbeat(t0 + 6 * S).known.is_empty(), "b is dead");
        assert_eq!(roster.targets(t0 + 299 * S), vec![addr(2)]);
        assert!(roster.targets(t0 + 300 * S).is_empty());
        assert!(roster.view(t0 + 300 * S).members.is_empty());
    }

    #[test]
    fn a_member_that_moves_or_shares_this_nodes_id_is_handled() {
        let t0 = Instant::now();
        let roster = Roster::new(info("a", 1), Some(addr(1)), DetectorConfig::default());
        roster
            .record_heartbeat(addr(2), &beat("b", 2, &[]), t0)
            .unwrap();
        // b comes back on another address: one member, the new address.
        roster
            .record_heartbeat(addr(4), &beat("b", 4, &[]), t0 + S)
            .unwrap();
        let view = roster.view(t0 + S);
        assert_eq!(view.members.len(), 1);
        assert_eq!(view.members[0].addr, addr(4));
        // Another node restarted on b's old address as d: the old entry is replaced.
        roster
            .record_heartbeat(addr(4), &beat("d", 4, &[]), t0 + S)
            .unwrap();
        let ids: Vec<_> = roster
            .view(t0 + S)
            .members
            .into_iter()
            .map(|m| m.info.node_id)
            .collect();
        assert_eq!(ids, vec!["d"]);

        roster.add_candidate(addr(9), Source::Mdns, t0);
        let err = roster
            .record_heartbeat(addr(9), &beat("a", 9, &[]), t0)
            .unwrap_err();
        assert!(err.to_string().contains("--node-id"), "{err}");
        assert!(roster.view(t0).candidates.is_empty(), "not tried again");
        // This node's own address is never a candidate.
        roster.add_candidate(addr(1), Source::Mdns, t0);
        assert!(roster.view(t0).candidates.is_empty());
    }

    #[test]
    fn a_second_address_of_a_live_member_does_not_move_it() {
        let t0 = Instant::now();
        let roster = Roster::new(info("a", 1), None, DetectorConfig::default());
        roster
            .record_heartbeat(addr(2), &beat("b", 2, &[]), t0)
            .unwrap();
        // mDNS offers b's other interface; it answers as b.
        roster.add_candidate(addr(3), Source::Mdns, t0);
        roster
            .record_heartbeat(addr(3), &beat("b", 2, &[]), t0 + S)
            .unwrap();
        let view = roster.view(t0 + S);
        assert_eq!(view.members.len(), 1);
        assert_eq!(view.members[0].addr, addr(2), "keeps the address it had");
        assert!(view.candidates.is_empty());
        // But a member that went silent is found again where it answers now.
        roster.add_candidate(addr(3), Source::Mdns, t0 + 10 * S);
        roster
            .record_heartbeat(addr(3), &beat("b", 2, &[]), t0 + 10 * S)
            .unwrap();
        assert_eq!(roster.view(t0 + 10 * S).members[0].addr, addr(3));
    }

    #[test]
    fn a_flood_of_discovered_addresses_is_bounded_but_static_ones_get_in() {
        let t0 = Instant::now();
        let roster = Roster::new(info("a", 1), None, DetectorConfig::default());
        for port in 0..2 * MAX_KNOWN_MEMBERS as u16 {
            roster.add_candidate(addr(1000 + port), Source::Mdns, t0);
        }
        assert_eq!(roster.view(t0).candidates.len(), MAX_KNOWN_MEMBERS);
        roster.add_candidate(addr(9), Source::Static, t0);
        assert_eq!(roster.view(t0).candidates.len(), MAX_KNOWN_MEMBERS + 1);
        // The flood is forgotten after dead_after; the static address stays.
        assert_eq!(roster.targets(t0 + 6 * S), vec![addr(9)]);
    }

    #[test]
    fn the_view_lists_alive_then_suspect_then_dead() {
        let t0 = Instant::now();
        let roster = Roster::new(info("a", 1), None, DetectorConfig::default());
        roster
            .record_heartbeat(addr(2), &beat("z", 2, &[]), t0)
            .unwrap();
        roster
            .record_heartbeat(addr(3), &beat("y", 3, &[]), t0 + 4 * S)
            .unwrap();
        roster
            .record_heartbeat(addr(4), &beat("x", 4, &[]), t0 + 8 * S)
            .unwrap();
        roster
            .record_heartbeat(addr(5), &beat("w", 5, &[]), t0 + 8 * S)
            .unwrap();
        let states: Vec<_> = roster
            .view(t0 + 8 * S)
            .members
            .into_iter()
            .map(|m| (m.info.node_id, m.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("w".to_owned(), Liveness::Alive),
                ("x".to_owned(), Liveness::Alive),
                ("y".to_owned(), Liveness::Suspect),
                ("z".to_owned(), Liveness::Dead),
            ]
        );
    }
}
