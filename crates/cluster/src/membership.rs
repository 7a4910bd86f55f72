//! Who the peers are and whether they answer: one record per peer, kept by whoever talks to
//! them (a swarm head's monitor and requests, a pipeline head's recovery probes) instead of
//! each keeping its own list.
//!
//! For now a peer is only `unknown` (never tried), `alive` (its last contact worked) or
//! `dead` (its last contact failed). Discovery, heartbeats and a failure detector with a
//! `suspect` state grow from here (the membership issue); the callers already record every
//! success and failure through [`Membership::seen`] and [`Membership::failed`].

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What the last contact with a peer said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Not contacted yet.
    Unknown,
    /// The last contact worked.
    Alive,
    /// The last contact failed.
    Dead,
}

impl MemberState {
    /// `unknown`, `alive` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Unknown => "unknown",
            MemberState::Alive => "alive",
            MemberState::Dead => "dead",
        }
    }
}

/// One peer as this node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its peer address.
    pub addr: SocketAddr,
    /// Its node id, once it said.
    pub node_id: Option<String>,
    pub state: MemberState,
    /// When it last answered.
    pub last_seen: Option<Instant>,
    /// Why the last contact failed (`None` while alive).
    pub last_error: Option<String>,
}

impl Member {
    fn new(addr: SocketAddr) -> Self {
        Member {
            addr,
            node_id: None,
            state: MemberState::Unknown,
            last_seen: None,
            last_error: None,
        }
    }

    pub fn is_alive(&self) -> bool {
        self.state == MemberState::Alive
    }

    /// Time since it last answered, if it ever did.
    pub fn since_seen(&self) -> Option<Duration> {
        self.last_seen.map(|t| t.elapsed())
    }
}

/// The peers a node knows, in the order they were added. Shared between tasks (`&self`
/// everywhere); every method takes the lock briefly and never across I/O.
#[derive(Debug, Default)]
pub struct Membership {
    members: Mutex<Vec<Member>>,
}

impl Membership {
    /// The peers at `addrs`, none contacted yet (an address given twice is kept once).
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        let membership = Membership::default();
        for addr in addrs {
            membership.add(addr);
        }
        membership
    }

    /// Adds a peer not contacted yet; a known one is left as it is.
    pub fn add(&self, addr: SocketAddr) {
        let mut members = self.lock();
        if !members.iter().any(|m| m.addr == addr) {
            members.push(Member::new(addr));
        }
    }

    /// `addr` answered now (as `node_id`, when it said); an unknown address is added.
    pub fn seen(&self, addr: SocketAddr, node_id: Option<&str>) {
        self.update(addr, |m| {
            m.state = MemberState::Alive;
            m.last_seen = Some(Instant::now());
            m.last_error = None;
            if let Some(id) = node_id {
                m.node_id = Some(id.to_owned());
            }
        });
    }

    /// Contacting `addr` failed with `error`; an unknown address is added.
    pub fn failed(&self, addr: SocketAddr, error: &str) {
        self.update(addr, |m| {
            m.state = MemberState::Dead;
            m.last_error = Some(error.to_owned());
        });
    }

    /// The peer at `addr`, if known.
    pub fn get(&self, addr: SocketAddr) -> Option<Member> {
        self.lock().iter().find(|m| m.addr == addr).cloned()
    }

    /// Whether the peer at `addr` answered its last contact.
    pub fn is_alive(&self, addr: SocketAddr) -> bool {
        self.get(addr).is_some_and(|m| m.is_alive())
    }

    /// Every peer, in the order added.
    pub fn members(&self) -> Vec<Member> {
        self.lock().clone()
    }

    /// The addresses of the peers that answered their last contact, in the order added.
    pub fn alive(&self) -> Vec<SocketAddr> {
        self.lock()
            .iter()
            .filter(|m| m.is_alive())
            .map(|m| m.addr)
            .collect()
    }

    fn update(&self, addr: SocketAddr, change: impl FnOnce(&mut Member)) {
        let mut members = self.lock();
        let index = match members.iter().position(|m| m.addr == addr) {
            Some(i) => i,
            None => {
                members.push(Member::new(addr));
                members.len() - 1
            }
        };
        change(&mut members[index]);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Member>> {
        // A holder that panicked left whole members behind; they are still valid.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_peer_goes_from_unknown_to_alive_to_dead_and_back() {
        let members = Membership::new([addr(1), addr(2), addr(1)]);
        assert_eq!(
            members.members().len(),
            2,
            "an address given twice is kept once"
        );
        let first = members.get(addr(1)).unwrap();
        assert_eq!(first.state, MemberState::Unknown);
        assert_eq!(first.last_seen, None);
        assert!(members.alive().is_empty());

        members.seen(addr(2), Some("b"));
        members.seen(addr(1), None);
        assert_eq!(
            members.alive(),
            vec![addr(1), addr(2)],
            "in the order added"
        );
        assert_eq!(members.get(addr(2)).unwrap().node_id.as_deref(), Some("b"));
        assert!(members.get(addr(2)).unwrap().since_seen().is_some());

        members.failed(addr(2), "connection refused");
        let b = members.get(addr(2)).unwrap();
        assert_eq!(b.state, MemberState::Dead);
        assert_eq!(b.state.as_str(), "dead");
        assert_eq!(b.last_error.as_deref(), Some("connection refused"));
        assert_eq!(
            b.node_id.as_deref(),
            Some("b"),
            "a failure keeps who it was"
        );
        assert!(b.last_seen.is_some(), "and when it was last seen");
        assert_eq!(members.alive(), vec![addr(1)]);
        assert!(!members.is_alive(addr(2)));

        members.seen(addr(2), None);
        assert!(members.is_alive(addr(2)));
        assert_eq!(members.get(addr(2)).unwrap().last_error, None);
    }

    #[test]
    fn news_of_an_unknown_peer_adds_it() {
        let members = Membership::default();
        members.failed(addr(3), "timed out");
        members.seen(addr(4), Some("d"));
        members.add(addr(4));
        let all = members.members();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].state, MemberState::Dead);
        assert_eq!(all[1].state, MemberState::Alive);
        assert!(members.get(addr(5)).is_none());
    }
}
