//! How long a request waits for its agents (issue #14): the per-type timeout is when the head
//! stops waiting for *more* answers, not a reason to throw away the work of agents that are
//! still generating. Only when no answer has come by then does the head wait on, for the
//! first complete answer, up to the request's own limit: what it asks for (`max_tokens`) at
//! the slowest answering agent's measured speed, with room for prefill and for agents that
//! share cores.

use std::future::Future;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::target::Target;

/// Assumed decode speed of an agent that has not measured itself.
const UNMEASURED_TOKENS_PER_S: f32 = 5.0;
/// Room for prompt processing, connecting and queueing, per answer.
const PER_ANSWER_ALLOWANCE: Duration = Duration::from_secs(5);
/// Measured speeds are of an agent alone; several agents (and samples) on shared cores go
/// slower than that.
const CONTENTION: f64 = 2.0;
/// No request waits longer than this for its first answer.
const MAX_LIMIT: Duration = Duration::from_secs(600);

/// A request's two deadlines, from its start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Wait {
    /// Past this the head stops waiting for more answers, once it has one.
    pub(super) enough: Duration,
    /// Past this the head stops waiting at all. Never less than `enough`.
    pub(super) limit: Duration,
}

impl Wait {
    /// The deadlines of a request of `max_tokens` to `answerers`, each of which may owe up
    /// to `per_agent` answers one after another; `enough` is the query type's timeout.
    pub(super) fn for_request(
        enough: Duration,
        answerers: &[Target],
        max_tokens: u32,
        per_agent: usize,
    ) -> Wait {
        let slowest = answerers
            .iter()
            .map(|t| match t.tokens_per_s() {
                s if s.is_finite() && s > 0.0 => s,
                _ => UNMEASURED_TOKENS_PER_S,
            })
            .fold(f32::INFINITY, f32::min);
        let slowest = if slowest.is_finite() {
            slowest
        } else {
            UNMEASURED_TOKENS_PER_S
        };
        let one_answer =
            PER_ANSWER_ALLOWANCE.as_secs_f64() + f64::from(max_tokens) / f64::from(slowest);
        let seconds = one_answer * per_agent.max(1) as f64 * CONTENTION;
        let limit = Duration::from_secs_f64(seconds.min(MAX_LIMIT.as_secs_f64()));
        Wait {
            enough,
            limit: limit.max(enough),
        }
    }
}

/// What [`gather`] collected.
pub(super) struct Gathered<T, E> {
    /// Each future's result, in the order given; `None` for those still running when the
    /// wait ended (they were dropped, which stops their work).
    pub(super) results: Vec<Option<Result<T, E>>>,
    /// Whether an answer (a result `is_answer` accepts) had come.
    pub(super) answered: bool,
    /// Whether the wait ended because every ask that counts had come back without an
    /// answer (the rest could not give one).
    pub(super) hopeless: bool,
    /// How long the wait took.
    pub(super) waited: Duration,
}

/// Runs `asks` together: all of them until `wait.enough`; past it, stops as soon as one
/// has answered (a result of an ask that `counts`, given its index, which `is_answer`
/// accepts); with none by then, waits for the first up to `wait.limit`. When every ask that
/// counts has come back without an answer, the others cannot give one and the wait ends
/// there (`verify`: every candidate failed, so the tests written for them are not waited
/// for).
pub(super) async fn gather<T, E, F>(
    asks: Vec<F>,
    wait: Wait,
    counts: impl Fn(usize) -> bool,
    is_answer: impl Fn(&T) -> bool,
) -> Gathered<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let mut results: Vec<Option<Result<T, E>>> = asks.iter().map(|_| None).collect();
    let mut answers = gathering(asks, wait, counts, is_answer);
    while let Some((i, result)) = answers.next().await {
        results[i] = Some(result);
    }
    Gathered {
        results,
        answered: answers.answered,
        hopeless: answers.hopeless(),
        waited: answers.started.elapsed(),
    }
}

/// Results as they come, under [`gather`]'s deadlines, for a caller that acts on each one
/// before the next (and may stop taking them: the asks still running are dropped with it,
/// which stops their work).
pub(super) struct Gathering<Fut, P> {
    pending: FuturesUnordered<Fut>,
    came: Vec<bool>,
    /// Whether each ask's answer counts.
    counts: Vec<bool>,
    /// Asks that count and have not come back.
    hopeful: usize,
    started: Instant,
    wait: Wait,
    is_answer: P,
    answered: bool,
    over: bool,
}

/// Starts `asks` together, their results to be taken with [`Gathering::next`].
pub(super) fn gathering<T, E, F, P>(
    asks: Vec<F>,
    wait: Wait,
    counts: impl Fn(usize) -> bool,
    is_answer: P,
) -> Gathering<impl Future<Output = (usize, Result<T, E>)>, P>
where
    F: Future<Output = Result<T, E>>,
    P: Fn(&T) -> bool,
{
    let counts: Vec<bool> = (0..asks.len()).map(counts).collect();
    Gathering {
        came: vec![false; asks.len()],
        hopeful: counts.iter().filter(|&&c| c).count(),
        counts,
        pending: asks
            .into_iter()
            .enumerate()
            .map(|(i, ask)| async move { (i, ask.await) })
            .collect(),
        started: Instant::now(),
        wait,
        is_answer,
        answered: false,
        over: false,
    }
}

impl<T, E, Fut, P> Gathering<Fut, P>
where
    Fut: Future<Output = (usize, Result<T, E>)>,
    P: Fn(&T) -> bool,
{
    /// The next result and the index of its ask; `None` once the wait is over (every ask
    /// came back, a deadline passed, or every ask that counts came back without an answer).
    pub(super) async fn next(&mut self) -> Option<(usize, Result<T, E>)> {
        if self.over {
            return None;
        }
        let wait = if self.answered {
            self.wait.enough
        } else {
            self.wait.limit
        };
        let next = tokio::select! {
            next = self.pending.next() => next,
            () = tokio::time::sleep_until(self.started + wait) => None,
        };
        let Some((i, result)) = next else {
            self.over = true;
            return None;
        };
        self.came[i] = true;
        if self.counts[i] {
            self.hopeful -= 1;
            self.answered |= result.as_ref().is_ok_and(|answer| (self.is_answer)(answer));
        }
        // Nothing left that could answer: the rest are not waited for.
        self.over = self.hopeless();
        Some((i, result))
    }

    /// Whether every ask that counts (there being some) came back without an answer.
    fn hopeless(&self) -> bool {
        self.hopeful == 0 && !self.answered && self.counts.contains(&true)
    }

    /// The asks whose results have not come (yet).
    pub(super) fn unanswered(&self) -> Vec<usize> {
        (0..self.came.len()).filter(|&i| !self.came[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(tokens_per_s: f32) -> Target {
        Target::Remote {
            index: 0,
            addr: "127.0.0.1:1".parse().unwrap(),
            name: "a".into(),
            role: None,
            role_prompt: None,
            model: "m".into(),
            weight: 1.0,
            parameters: 0,
            tokens_per_s,
        }
    }

    #[test]
    fn the_limit_follows_the_tokens_asked_and_the_slowest_agent() {
        let twelve = Duration::from_secs(12);
        // 512 tokens at 20 tok/s: 5 + 25.6 s per answer, two answers each, doubled.
        let w = Wait::for_request(twelve, &[agent(40.0), agent(20.0)], 512, 2);
        assert_eq!(w.enough, twelve);
        assert!((w.limit.as_secs_f64() - 4.0 * 30.6).abs() < 1e-6, "{w:?}");
        // A short answer from fast agents: never less than the per-type timeout.
        let w = Wait::for_request(twelve, &[agent(100.0)], 8, 1);
        assert_eq!(w.limit, twelve);
        // An agent that never measured itself counts as slow; no request waits for ever.
        let w = Wait::for_request(twelve, &[agent(0.0)], 4096, 5);
        assert_eq!(w.limit, MAX_LIMIT);
        let w = Wait::for_request(twelve, &[], 100, 1);
        assert!(w.limit > twelve);
    }

    /// An answer that takes `secs` (or fails after it).
    async fn answer(secs: u64, ok: bool) -> Result<u64, String> {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        if ok {
            Ok(secs)
        } else {
            Err("failed".into())
        }
    }

    fn wait(enough: u64, limit: u64) -> Wait {
        Wait {
            enough: Duration::from_secs(enough),
            limit: Duration::from_secs(limit),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn everyone_who_answers_in_time_counts() {
        let asks = vec![answer(3, true), answer(5, true), answer(11, true)];
        let g = gather(asks, wait(12, 100), |_| true, |_| true).await;
        let got: Vec<_> = g.results.into_iter().map(|r| r.map(|r| r.ok())).collect();
        assert_eq!(got, [Some(Some(3)), Some(Some(5)), Some(Some(11))]);
        assert_eq!(
            g.waited,
            Duration::from_secs(11),
            "no wait past the last answer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_enough_the_head_stops_waiting_for_more() {
        let asks = vec![answer(3, true), answer(30, true)];
        let g = gather(asks, wait(12, 100), |_| true, |_| true).await;
        assert!(g.answered);
        assert!(g.results[0].is_some() && g.results[1].is_none());
        assert_eq!(g.waited, Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_answer_by_then_the_first_one_is_awaited() {
        // Every agent is still generating at 12 s: the work is not thrown away; the first
        // complete answer (at 40 s) ends the wait, a failure before it does not.
        let asks = vec![answer(70, true), answer(40, true), answer(20, false)];
        let g = gather(asks, wait(12, 100), |_| true, |_| true).await;
        assert_eq!(g.waited, Duration::from_secs(40));
        assert!(matches!(g.results[1], Some(Ok(40))));
        assert!(matches!(g.results[2], Some(Err(_))));
        assert!(g.results[0].is_none());
        // ... but never past the request's limit.
        let g = gather(vec![answer(500, true)], wait(12, 100), |_| true, |_| true).await;
        assert!(!g.answered && g.results[0].is_none());
        assert_eq!(g.waited, Duration::from_secs(100));
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_answers_counted_by_index_end_the_wait() {
        // `verify`: a test writer's answer (index 1) does not end the wait; a candidate's
        // (index 0) does.
        let asks = vec![answer(40, true), answer(2, true), answer(60, true)];
        let g = gather(asks, wait(12, 100), |i| i == 0, |_| true).await;
        assert_eq!(g.waited, Duration::from_secs(40));
        assert!(g.results[1].is_some() && g.results[2].is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_ask_that_counts_has_failed_the_rest_are_not_waited_for() {
        // `verify`: both candidates (indices 0 and 1) fail — a request every agent refused —
        // while the test writer (index 2) is still writing tests for them.
        let asks = vec![answer(3, false), answer(5, false), answer(60, true)];
        let g = gather(asks, wait(12, 100), |i| i < 2, |_| true).await;
        assert_eq!(g.waited, Duration::from_secs(5));
        assert!(g.hopeless && !g.answered);
        assert!(g.results[2].is_none());
        // One candidate that answers: the tests are waited for as before.
        let asks = vec![answer(3, false), answer(5, true), answer(10, true)];
        let g = gather(asks, wait(12, 100), |i| i < 2, |_| true).await;
        assert_eq!(g.waited, Duration::from_secs(10));
        assert!(!g.hopeless && g.answered);
        // No ask counts: nothing ends the wait early.
        let asks = vec![answer(3, false), answer(5, true)];
        let g = gather(asks, wait(12, 100), |_| false, |_| true).await;
        assert_eq!(g.waited, Duration::from_secs(5));
        assert!(!g.hopeless && g.results.iter().all(Option::is_some));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_the_head_cannot_use_does_not_end_the_wait() {
        let asks = vec![answer(2, true), answer(50, true)];
        let g = gather(asks, wait(12, 100), |_| true, |secs| *secs > 2).await;
        assert_eq!(g.waited, Duration::from_secs(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_taking_results_leaves_the_rest_unanswered() {
        // The repair round: it acts on each answer as it comes and stops at the one that
        // settles the question; those still running are dropped with the gathering.
        let asks = vec![
            answer(30, true),
            answer(5, true),
            answer(9, true),
            answer(7, false),
        ];
        let mut answers = gathering(asks, wait(100, 100), |_| true, |_| true);
        let started = tokio::time::Instant::now();
        let mut came = Vec::new();
        while let Some((i, result)) = answers.next().await {
            came.push(i);
            if result == Ok(9) {
                break;
            }
        }
        assert_eq!(came, [1, 3, 2], "in the order they came, failures included");
        assert_eq!(answers.unanswered(), [0]);
        assert_eq!(started.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_gathering_ends_at_its_deadline_and_stays_ended() {
        let asks = vec![answer(3, true), answer(50, true)];
        let mut answers = gathering(asks, wait(12, 100), |_| true, |_| true);
        assert!(matches!(answers.next().await, Some((0, Ok(3)))));
        assert!(
            answers.next().await.is_none(),
            "past enough, with an answer"
        );
        assert!(answers.next().await.is_none());
        assert_eq!(answers.unanswered(), [1]);
    }
}
