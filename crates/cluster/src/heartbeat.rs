//! The heartbeat loop: every [`crate::DetectorConfig::interval`] this node exchanges a
//! [`Heartbeat`] with every member and candidate of its [`Roster`], all at once, each under
//! [`crate::DetectorConfig::probe_timeout`]; what comes back (or does not) goes into the roster.
//!
//! The exchange itself is a [`Prober`]: over the network that is [`WireProber`] (a fresh
//! connection, authenticated with the swarm key, per exchange — a heartbeat a second per
//! member costs one Noise handshake, far less than keeping a link per pair alive and
//! telling its failures apart from the member's). Tests drive the loop with a prober of
//! their own under `tokio::time::pause()`.
//!
//! The clock is tokio's, so paused time moves it.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_wire::{Chaos, ErrorCode, ErrorMessage, Heartbeat, Hello, Message, Transport};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::roster::{MemberView, Roster, Source};

/// A future that a [`Prober`] returns.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<Exchanged, String>> + Send + 'a>>;

/// What one heartbeat exchange brought back.
#[derive(Clone, Debug)]
pub struct Exchanged {
    /// The other node's heartbeat.
    pub heartbeat: Heartbeat,
    /// From sending ours to reading theirs, on a connection already set up: the link's
    /// round trip, as `/v1/cluster` and the dashboard show it.
    pub round_trip: Duration,
}

/// One heartbeat exchange: send `mine` to the node at `addr`, return its answer.
pub trait Prober: Send + Sync + 'static {
    fn exchange(&self, addr: SocketAddr, mine: Heartbeat) -> ProbeFuture<'_>;
}

/// Heartbeats over the peer protocol: dial (swarm-key handshake, `Hello`), send, read the
/// answer. Every step has a deadline (the transport's, and the loop's `probe_timeout`).
pub struct WireProber {
    pub transport: Transport,
    /// How this node introduces itself.
    pub hello: Hello,
}

impl Prober for WireProber {
    fn exchange(&self, addr: SocketAddr, mine: Heartbeat) -> ProbeFuture<'_> {
        Box::pin(async move {
            let (mut conn, _ack) = self
                .transport
                .dial(addr, self.hello.clone())
                .await
                .map_err(|e| e.to_string())?;
            let sent = Instant::now();
            conn.write_frame(&Message::Heartbeat(mine))
                .await
                .map_err(|e| e.to_string())?;
            match conn.read_frame().await.map_err(|e| e.to_string())? {
                Some(Message::Heartbeat(theirs)) => Ok(Exchanged {
                    heartbeat: theirs,
                    round_trip: sent.elapsed(),
                }),
                Some(Message::Error(e)) => Err(e.message),
                Some(other) => Err(format!("answered a heartbeat with {}", other.name())),
                None => Err("closed the connection instead of answering".to_owned()),
            }
        })
    }
}

impl WireProber {
    /// Tells the node at `addr` to play dead (`down`) or to stop; its state as it answers.
    pub async fn chaos(&self, addr: SocketAddr, down: bool) -> Result<bool, String> {
        let exchange = async {
            let (mut conn, _ack) = self
                .transport
                .dial(addr, self.hello.clone())
                .await
                .map_err(|e| e.to_string())?;
            conn.write_frame(&Message::Chaos(Chaos { down }))
                .await
                .map_err(|e| e.to_string())?;
            match conn.read_frame().await.map_err(|e| e.to_string())? {
                Some(Message::Chaos(state)) => Ok(state.down),
                Some(Message::Error(e)) => Err(e.message),
                Some(other) => Err(format!("answered with {}", other.name())),
                None => Err("closed the connection instead of answering".to_owned()),
            }
        };
        tokio::time::timeout(CHAOS_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {CHAOS_TIMEOUT:?}"))?
    }
}

/// Longest wait for a `Chaos` answer.
const CHAOS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a node's peer port does with a heartbeat from a peer at `remote` (the connection's
/// source address): records the sender, reached at its own peer port on that IP, and
/// answers with this node's heartbeat (or an error when the sender has this node's id).
pub fn answer_heartbeat(roster: &Roster, remote: SocketAddr, theirs: &Heartbeat) -> Message {
    if roster.is_down() {
        return Message::Error(ErrorMessage::new(
            ErrorCode::MODEL_UNAVAILABLE,
            None,
            "this node is playing dead".to_owned(),
        ));
    }
    let addr = SocketAddr::new(remote.ip(), theirs.node.peer_port);
    let now = now();
    match roster.record_heartbeat(addr, theirs, now) {
        Ok(()) => Message::Heartbeat(roster.heartbeat(now)),
        Err(e) => Message::Error(ErrorMessage::new(
            ErrorCode::BAD_REQUEST,
            None,
            e.to_string(),
        )),
    }
}

/// Heartbeats every member and candidate of `roster` each interval, until `stop`.
pub async fn run_heartbeats(
    roster: Arc<Roster>,
    prober: Arc<dyn Prober>,
    stop: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(roster.config().interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Addresses already warned about sharing this node's id (once each, not every second).
    let mut warned = HashSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        if roster.is_down() {
            continue;
        }
        let now = now();
        let mine = roster.heartbeat(now);
        let mut round = JoinSet::new();
        for addr in roster.targets(now) {
            let (roster, prober, mine) = (roster.clone(), prober.clone(), mine.clone());
            round.spawn(async move { (addr, probe(&roster, prober.as_ref(), addr, mine).await) });
        }
        let finish_round = async {
            while let Some(done) = round.join_next().await {
                if let Ok((addr, Err(warning))) = done {
                    if warned.insert(addr) {
                        tracing::warn!("{warning}");
                    }
                }
            }
        };
        tokio::select! {
            () = &mut stop => return,
            () = finish_round => {}
        }
    }
}

/// Adds `addr` as a static candidate and heartbeats it at once: the member it turned out
/// to be, or why not.
pub async fn join(
    roster: &Roster,
    prober: &dyn Prober,
    addr: SocketAddr,
) -> Result<MemberView, String> {
    roster.add_candidate(addr, Source::Static, now());
    let deadline = roster.config().probe_timeout;
    let failed = |why: String| {
        roster.record_failure(addr, &why);
        Err(format!("{addr} did not answer a heartbeat: {why}"))
    };
    let theirs = match tokio::time::timeout(
        deadline,
        prober.exchange(addr, roster.heartbeat(now())),
    )
    .await
    {
        Ok(Ok(theirs)) => theirs,
        Ok(Err(e)) => return failed(e),
        Err(_) => return failed(format!("no answer within {deadline:?}")),
    };
    roster
        .record_heartbeat(addr, &theirs.heartbeat, now())
        .map_err(|e| e.to_string())?;
    roster.record_round_trip(addr, theirs.round_trip);
    roster
        .view(now())
        .members
        .into_iter()
        .find(|m| m.addr == addr)
        .ok_or_else(|| format!("{addr} answered but is not a member"))
}

/// How long resolving a peer's host name may take.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `HOST:PORT` to one socket address (an IPv4 one where the name has both), under a
/// deadline; why not, for a person.
pub async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| format!("resolving {addr:?} took over {RESOLVE_TIMEOUT:?}"))?
        .map_err(|e| format!("{addr:?} is not a HOST:PORT that resolves: {e}"))?
        .collect::<Vec<_>>();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// One exchange under the probe deadline, recorded in `roster`. `Err` only for what the
/// operator must fix (two nodes with one id); a peer that fails is recorded, not an error.
async fn probe(
    roster: &Roster,
    prober: &dyn Prober,
    addr: SocketAddr,
    mine: Heartbeat,
) -> Result<(), String> {
    let deadline = roster.config().probe_timeout;
    match tokio::time::timeout(deadline, prober.exchange(addr, mine)).await {
        Ok(Ok(theirs)) => {
            roster
                .record_heartbeat(addr, &theirs.heartbeat, now())
                .map_err(|e| e.to_string())?;
            roster.record_round_trip(addr, theirs.round_trip);
            Ok(())
        }
        Ok(Err(e)) => {
            roster.record_failure(addr, &e);
            Ok(())
        }
        Err(_) => {
            roster.record_failure(addr, &format!("no answer within {deadline:?}"));
            Ok(())
        }
    }
}

/// Now, on tokio's clock (paused in tests).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::roster::{DetectorConfig, Liveness};
    use shoal_wire::NodeInfo;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A fake network (the edge the real one replaces): an exchange with `addr` reaches the
    /// roster registered there — through `answer_heartbeat`, as a peer port would — unless
    /// that node is down.
    #[derive(Default)]
    struct FakeNet {
        nodes: Mutex<HashMap<SocketAddr, Arc<Roster>>>,
        down: Mutex<HashSet<SocketAddr>>,
    }

    /// One node's side of the fake network: who it is, for the receiver.
    struct FakeProber {
        net: Arc<FakeNet>,
        me: SocketAddr,
    }

    impl Prober for FakeProber {
        fn exchange(&self, addr: SocketAddr, mine: Heartbeat) -> ProbeFuture<'_> {
            Box::pin(async move {
                if self.net.down.lock().unwrap().contains(&addr) {
                    return Err("connection refused".into());
                }
                let target = self.net.nodes.lock().unwrap().get(&addr).cloned();
                let target = target.ok_or("connection refused")?;
                match answer_heartbeat(&target, self.me, &mine) {
                    Message::Heartbeat(h) => Ok(Exchanged {
                        heartbeat: h,
                        round_trip: Duration::from_millis(1),
                    }),
                    other => Err(format!("{other:?}")),
                }
            })
        }
    }

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i as u8], 7000 + i))
    }

    fn start(
        net: &Arc<FakeNet>,
        i: u16,
        seeds: &[u16],
    ) -> (Arc<Roster>, tokio::task::JoinHandle<()>) {
        let info = NodeInfo {
            node_id: format!("n{i}"),
            peer_port: addr(i).port(),
            ..NodeInfo::default()
        };
        let roster = Arc::new(Roster::new(info, Some(addr(i)), DetectorConfig::default()));
        for s in seeds {
            roster.add_candidate(addr(*s), Source::Static, now());
        }
        net.nodes.lock().unwrap().insert(addr(i), roster.clone());
        let prober = Arc::new(FakeProber {
            net: net.clone(),
            me: addr(i),
        });
        let task = tokio::spawn(run_heartbeats(
            roster.clone(),
            prober,
            std::future::pending(),
        ));
        (roster, task)
    }

    fn states(roster: &Roster) -> Vec<(String, Liveness)> {
        roster
            .view(now())
            .members
            .into_iter()
            .map(|m| (m.info.node_id, m.state))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn members_found_through_one_seed_converge_and_a_dead_one_is_seen_dead_by_all() {
        let net = Arc::new(FakeNet::default());
        // n1 knows nobody; n2 and n3 only know n1; n4 joins later through n3.
        let (r1, _t1) = start(&net, 1, &[]);
        let (r2, _t2) = start(&net, 2, &[1]);
        let (r3, t3) = start(&net, 3, &[1]);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let alive = |ids: &[&str]| {
            ids.iter()
                .map(|id| (id.to_string(), Liveness::Alive))
                .collect::<Vec<_>>()
        };
        assert_eq!(states(&r1), alive(&["n2", "n3"]));
        assert_eq!(states(&r2), alive(&["n1", "n3"]), "n3 learnt through n1");
        assert_eq!(states(&r3), alive(&["n1", "n2"]));

        let (r4, _t4) = start(&net, 4, &[3]);
        // Off the rounds' ticks (whole seconds for n1–n3, halves for n4), so that which of
        // a tick and the death comes first is never a tie.
        tokio::time::sleep(Duration::from_millis(2750)).await;
        for r in [&r1, &r2, &r3] {
            assert!(states(r).contains(&("n4".into(), Liveness::Alive)));
        }
        assert_eq!(states(&r4), alive(&["n1", "n2", "n3"]));

        // n3 dies: silent, refusing connections.
        t3.abort();
        net.down.lock().unwrap().insert(addr(3));
        let died = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(2000)).await;
        for r in [&r1, &r2, &r4] {
            assert!(
                states(r).contains(&("n3".into(), Liveness::Alive)),
                "not yet"
            );
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for r in [&r1, &r2, &r4] {
            assert!(states(r).contains(&("n3".into(), Liveness::Suspect)));
        }
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert!(died.elapsed() <= Duration::from_millis(6500));
        for r in [&r1, &r2, &r4] {
            assert!(states(r).contains(&("n3".into(), Liveness::Dead)));
            assert_eq!(r.alive(now()).len(), 2);
        }
        // n3 comes back: alive everywhere at the next round.
        net.down.lock().unwrap().remove(&addr(3));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for r in [&r1, &r2, &r4] {
            assert!(states(r).contains(&("n3".into(), Liveness::Alive)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_playing_dead_is_seen_dead_and_comes_back_when_it_stops() {
        let net = Arc::new(FakeNet::default());
        let (r1, _t1) = start(&net, 1, &[]);
        let (r2, _t2) = start(&net, 2, &[1]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(states(&r1), vec![("n2".to_owned(), Liveness::Alive)]);
        r2.set_down(true);
        tokio::time::sleep(Duration::from_millis(7000)).await;
        assert_eq!(states(&r1), vec![("n2".to_owned(), Liveness::Dead)]);
        r2.set_down(false);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(states(&r1), vec![("n2".to_owned(), Liveness::Alive)]);
    }

    #[tokio::test(start_paused = true)]
    async fn join_answers_with_the_member_or_why_not() {
        let net = Arc::new(FakeNet::default());
        let (_r1, _t1) = start(&net, 1, &[]);
        let (r2, _t2) = start(&net, 2, &[]);
        let prober = FakeProber {
            net: net.clone(),
            me: addr(2),
        };
        let member = join(&r2, &prober, addr(1)).await.unwrap();
        assert_eq!(member.info.node_id, "n1");
        assert_eq!(member.state, Liveness::Alive);
        let err = join(&r2, &prober, addr(9)).await.unwrap_err();
        assert!(err.contains("did not answer"), "{err}");
        assert!(r2.view(now()).candidates.contains(&addr(9)), "tried again");
    }
}
