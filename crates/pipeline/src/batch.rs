//! Batching stage work across sessions (design §3: "several sessions at once flow through
//! the ring concurrently; each stage batches what it has").
//!
//! Work for a stage (a peer's `Forward`, or a step of the head's own first stage) goes into
//! a queue; one worker per stage takes what has queued up while it was busy and runs it as
//! one [`shoal_engine::Stage::forward_batch`], which reads every weight matrix once for all
//! the sessions in it and gives each session exactly the numbers it would get alone. Batches
//! form by themselves under load: a lone session runs at once, alone, as before.
//!
//! A batch takes at most one job per session (a session's next step needs the cache its
//! step before leaves), each session's oldest, in arrival order, and stops adding jobs at a
//! budget of token rows, so a long prefill chunk is not piled onto a batch of single-token
//! steps (the first job is always taken: a chunk over the budget runs alone). An idle worker
//! waits on its channel; it never polls.
//!
//! Batches would hardly form in a ring if every stage ran every job the moment it arrived:
//! the sessions spread over the stages (one here, one at the next stage, …) and each stage
//! then always sees one at a time — measured, 1.02–1.07 sessions per pass for four streams
//! through three stages. So the head, which knows which sessions are generating (each is
//! either at its stage or somewhere in the ring, coming back with a token), waits a little
//! before a pass for those that have not queued yet: at most twice its last pass (capped at
//! [`MAX_GATHER`]). The sessions then travel the ring together, and the stages after it
//! batch them as they come. Only the head waits: stages that each waited for sessions held
//! up at another stage would wait on each other (measured: slower than no batching). The
//! price: while a session is away longer (a long prefill chunk), the others' steps at the
//! head wait up to that bound.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Token rows a batch takes at most (unless its first job alone has more): a hundred
/// sessions' decode steps, or a short prefill chunk with some decode steps.
pub const DEFAULT_BATCH_ROWS: usize = 128;

/// The batch budget of new stage servers and heads: [`DEFAULT_BATCH_ROWS`], or for
/// measurements `SHOAL_BATCH_ROWS` (1 turns batching across sessions off: every pass runs
/// one session, as before batching).
pub(crate) fn default_batch_rows() -> usize {
    std::env::var("SHOAL_BATCH_ROWS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_BATCH_ROWS)
}

/// What the batcher needs to know of a queued job.
pub(crate) trait Job {
    /// The session it belongs to.
    fn session(&self) -> u64;
    /// Its token rows.
    fn rows(&self) -> usize;
    /// Whether it can share a pass with `first`, the batch's first job (the same stage).
    fn fits_with(&self, _first: &Self) -> bool {
        true
    }
}

/// Takes the next batch off the front of `queue`: the oldest job of each session, in
/// arrival order, while the rows stay within `budget` (the first job always goes). The
/// jobs left keep their order.
pub(crate) fn next_batch<J: Job>(queue: &mut VecDeque<J>, budget: usize) -> Vec<J> {
    let mut batch: Vec<J> = Vec::new();
    let mut rows = 0;
    let mut seen = HashSet::new();
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(job) = queue.pop_front() {
        // A session seen once (taken or not) keeps its later jobs for later batches.
        let first_of_session = seen.insert(job.session());
        let fits = match batch.first() {
            None => true,
            Some(first) => rows + job.rows() <= budget && job.fits_with(first),
        };
        if first_of_session && fits {
            rows += job.rows();
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *queue = rest;
    batch
}

/// The longest a worker waits for the active sessions that have not queued yet.
pub(crate) const MAX_GATHER: Duration = Duration::from_millis(20);

/// How many sessions a worker waits for before a pass (the head's: those generating).
pub(crate) type Active = Box<dyn Fn() -> usize + Send + Sync>;

/// Runs the batching worker of one stage: waits for jobs on `rx`, takes every job that has
/// arrived (with `gather`, waits a little while fewer sessions have queued than it says;
/// see the module docs), and hands batches to `run` one at a time (the next batch forms
/// while `run` works). Ends when every sender is gone.
pub(crate) fn spawn_worker<J, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<J>,
    budget: usize,
    stats: BatchStats,
    gather: Option<Active>,
    mut run: F,
) -> JoinHandle<()>
where
    J: Job + Send + 'static,
    F: FnMut(Vec<J>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut queue = VecDeque::new();
        let mut last_pass = Duration::ZERO;
        loop {
            if queue.is_empty() {
                // Parked until work comes (never a busy wait: stages share cores).
                match rx.recv().await {
                    Some(job) => queue.push_back(job),
                    None => return,
                }
            }
            // Frames of one upstream batch arrive back to back: let the reader that woke
            // this worker queue the rest before taking what is there.
            tokio::task::yield_now().await;
            while let Ok(job) = rx.try_recv() {
                queue.push_back(job);
            }
            // Batching off (a budget of one row): no reason to wait.
            if let Some(active) = gather.as_ref().filter(|_| budget > 1) {
                // Twice the last pass: a session one stage behind arrives about one pass
                // of that stage later.
                let deadline = tokio::time::Instant::now() + (2 * last_pass).min(MAX_GATHER);
                while sessions_in(&queue) < active() {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(job)) => queue.push_back(job),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let batch = next_batch(&mut queue, budget);
            stats.record(batch.len(), batch.iter().map(Job::rows).sum());
            let started = Instant::now();
            run(batch).await;
            last_pass = started.elapsed();
        }
    })
}

/// Distinct sessions with a job in `queue`.
fn sessions_in<J: Job>(queue: &VecDeque<J>) -> usize {
    queue.iter().map(Job::session).collect::<HashSet<_>>().len()
}

/// Counts of the batches a node has run (its own first stage as a head, and the stages it
/// serves), for its metrics. Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct BatchStats(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    batches: AtomicU64,
    sessions: AtomicU64,
    rows: AtomicU64,
    shared: AtomicU64,
    largest: AtomicU64,
}

/// The counts at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Batches run (one pass of a stage, over one session or more).
    pub batches: u64,
    /// Session steps run in them (÷ `batches`: the mean batch size).
    pub sessions: u64,
    /// Token rows run in them.
    pub rows: u64,
    /// Batches of two sessions or more.
    pub shared: u64,
    /// The most sessions in one batch.
    pub largest: u64,
}

impl BatchStats {
    fn record(&self, sessions: usize, rows: usize) {
        let c = &self.0;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.sessions.fetch_add(sessions as u64, Ordering::Relaxed);
        c.rows.fetch_add(rows as u64, Ordering::Relaxed);
        if sessions > 1 {
            c.shared.fetch_add(1, Ordering::Relaxed);
        }
        c.largest.fetch_max(sessions as u64, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> BatchCounts {
        let c = &self.0;
        BatchCounts {
            batches: c.batches.load(Ordering::Relaxed),
            sessions: c.sessions.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            shared: c.shared.load(Ordering::Relaxed),
            largest: c.largest.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct J(u64, usize, u8);

    impl Job for J {
        fn session(&self) -> u64 {
            self.0
        }
        fn rows(&self) -> usize {
            self.1
        }
        fn fits_with(&self, first: &Self) -> bool {
            self.2 == first.2
        }
    }

    #[test]
    fn a_batch_takes_each_sessions_oldest_job_within_the_budget() {
        let mut q: VecDeque<J> = [
            J(1, 1, 0),
            J(2, 1, 0),
            J(1, 1, 0), // session 1's second: next batch
            J(3, 100, 0),
            J(4, 1, 0),
        ]
        .into();
        let batch = next_batch(&mut q, 64);
        // Session 3's chunk is over the budget: it waits, and session 4 still joins.
        assert_eq!(batch, vec![J(1, 1, 0), J(2, 1, 0), J(4, 1, 0)]);
        assert_eq!(q, VecDeque::from([J(1, 1, 0), J(3, 100, 0)]));
        // The first job always goes, even over the budget.
        assert_eq!(next_batch(&mut q, 64), vec![J(1, 1, 0)]);
        assert_eq!(next_batch(&mut q, 64), vec![J(3, 100, 0)]);
        assert!(q.is_empty());
        assert!(next_batch(&mut q, 64).is_empty());
    }

    #[test]
    fn a_session_held_back_keeps_its_order_and_jobs_for_another_stage_wait() {
        let mut q: VecDeque<J> =
            [J(1, 10, 0), J(2, 60, 0), J(2, 1, 0), J(3, 1, 1), J(4, 1, 0)].into();
        // Session 2's first job does not fit: its second must not overtake it.
        let batch = next_batch(&mut q, 64);
        assert_eq!(batch, vec![J(1, 10, 0), J(4, 1, 0)]);
        assert_eq!(q, VecDeque::from([J(2, 60, 0), J(2, 1, 0), J(3, 1, 1)]));
        assert_eq!(next_batch(&mut q, 64), vec![J(2, 60, 0)]);
        assert_eq!(next_batch(&mut q, 64), vec![J(2, 1, 0)]);
        assert_eq!(next_batch(&mut q, 64), vec![J(3, 1, 1)]);
    }

    #[test]
    fn stats_count_batches_sessions_and_the_largest() {
        let s = BatchStats::default();
        s.record(1, 5);
        s.record(3, 3);
        s.clone().record(2, 2);
        assert_eq!(
            s.counts(),
            BatchCounts {
                batches: 3,
                sessions: 6,
                rows: 10,
                shared: 2,
                largest: 3
            }
        );
    }
}

/// The average time of a stage's recent decode passes (each session one row), in
/// microseconds: the stage's compute per token, as members' heartbeats and the dashboard's
/// ring show it. Prefill passes (several rows a session) are left out: they would swamp
/// the figure.
#[derive(Debug, Default)]
pub(crate) struct PassTimer(std::sync::atomic::AtomicU32);

impl PassTimer {
    /// A pass of `rows` rows over `sessions` sessions took `took`.
    pub(crate) fn record(&self, rows: usize, sessions: usize, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        if rows == 0 || rows != sessions {
            return;
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let old = u64::from(self.0.load(Relaxed));
        // A moving average over about the last five passes.
        let new = if old == 0 { us } else { (old * 4 + us) / 5 };
        self.0
            .store(u32::try_from(new).unwrap_or(u32::MAX).max(1), Relaxed);
    }

    /// The average, in microseconds; 0 before the first decode pass.
    pub(crate) fn micros(&self) -> u32 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
