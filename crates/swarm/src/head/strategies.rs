//! One request in progress, and each way of combining the agents' answers.

use std::ops::Range;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use shoal_wire::{Answer, ChatTurn};

use crate::classify::{classify_keywords, parse_label, QueryType};
use crate::roles::{aggregator_prompt, correction_prompt, spotter_prompt, Role};
use crate::routing::{pick, Candidate};
use crate::vote::{self_agreement, vote, VoteMethod};

use super::report::{AgentAnswer, AgentFailure, Failure, SwarmError};
use super::target::{billions, Target};
use super::wait::{gather, Wait};
use super::{Swarm, SwarmRequest};

/// One request in progress: what was asked, and every answer and failure so far.
pub(super) struct Run<'a> {
    pub(super) swarm: &'a Swarm,
    pub(super) request: &'a SwarmRequest,
    pub(super) question: String,
    pub(super) answers: Vec<AgentAnswer>,
    pub(super) failed: Vec<AgentFailure>,
}

/// What one agent is asked.
pub(super) struct Job {
    pub(super) target: Target,
    pub(super) task: &'static str,
    /// `None`: the agent's own role prompt.
    pub(super) system: Option<String>,
    pub(super) messages: Vec<ChatTurn>,
    pub(super) max_tokens: u32,
    pub(super) temperature: f32,
    pub(super) top_p: f32,
    pub(super) seed: u64,
    pub(super) stop: Vec<String>,
    /// When not empty, the answer must be one of these (the spotter's labels).
    pub(super) choices: Vec<String>,
    /// The client's whole chat API request, answered through the agent's chat API.
    pub(super) api_request: Option<String>,
}

impl Run<'_> {
    /// The query type: the spotter's label when a spotter is up and gives one, else keywords.
    /// The spotter's answer is constrained to the labels (its sampler can draw nothing
    /// else); the answer is still parsed, tolerantly, in case an agent ignores the choices.
    pub(super) async fn classify(&mut self) -> (QueryType, &'static str) {
        if let Some(spotter) = self.swarm.best_with_role(Role::Spotter, None) {
            let job = Job {
                target: spotter,
                task: "classify",
                system: None,
                messages: vec![user(spotter_prompt(&self.question))],
                // The longest label, COMPLEX_REASONING, is a handful of tokens.
                max_tokens: 16,
                temperature: 0.0,
                top_p: 1.0,
                seed: self.request.seed,
                stop: Vec::new(),
                choices: QueryType::ALL
                    .iter()
                    .map(|q| q.as_str().to_owned())
                    .collect(),
                api_request: None,
            };
            let timeout = self.swarm.config.timeouts.simple;
            if let Some(answer) = self.ask_one(job, timeout).await {
                if let Some(label) = parse_label(&answer.text) {
                    return (label, "spotter");
                }
            }
        }
        (classify_keywords(&self.question), "keywords")
    }

    /// The agents that answer this query type, best first; the head's own model when none
    /// is up.
    pub(super) fn answerers(&self, query_type: QueryType) -> Result<Vec<Target>, SwarmError> {
        let targets = self.swarm.targets();
        let candidates: Vec<Candidate> = targets
            .iter()
            .map(|t| Candidate {
                role: t.role(),
                weight: t.weight(),
            })
            .collect();
        let picked: Vec<Target> = pick(query_type, &candidates)
            .into_iter()
            .filter_map(|i| targets.get(i).cloned())
            .collect();
        if !picked.is_empty() {
            return Ok(picked);
        }
        self.swarm
            .local_target()
            .map(|t| vec![t])
            .ok_or(SwarmError::NoAgents)
    }

    /// Every member that answers queries, whatever the query type's roles, and the head's
    /// own model: who answers a cross-swarm vote. A member of several roles answers once
    /// (as its first role that answers queries): it is one model.
    pub(super) fn every_member(&self) -> Result<Vec<Target>, SwarmError> {
        let mut seen = std::collections::HashSet::new();
        let mut all: Vec<Target> = self
            .swarm
            .targets()
            .into_iter()
            .filter(|t| t.role().is_none_or(Role::answers_queries))
            .filter(|t| seen.insert(t.addr()))
            .collect();
        all.extend(self.swarm.local_target());
        if all.is_empty() {
            return Err(SwarmError::NoAgents);
        }
        Ok(all)
    }

    pub(super) fn answer_job(
        &self,
        target: Target,
        task: &'static str,
        temperature: f32,
        seed: u64,
    ) -> Job {
        Job {
            target,
            task,
            system: None,
            messages: self.request.messages.clone(),
            max_tokens: self.request.max_tokens,
            temperature,
            top_p: self.request.top_p,
            seed,
            stop: self.request.stop.clone(),
            choices: Vec::new(),
            api_request: self.request.api_request.as_ref().map(|request| {
                let mut request = request.clone();
                if let Some(fields) = request.as_object_mut() {
                    fields.insert("temperature".to_owned(), temperature.into());
                    fields.insert("seed".to_owned(), seed.into());
                }
                request.to_string()
            }),
        }
    }

    /// Each of `targets` asked to answer, at the request's temperature and seed.
    pub(super) fn answer_jobs(&self, targets: &[Target]) -> Vec<Job> {
        targets
            .iter()
            .map(|t| {
                self.answer_job(
                    t.clone(),
                    "answer",
                    self.request.temperature,
                    self.request.seed,
                )
            })
            .collect()
    }

    /// A job on the request's settings with one user message of the head's making
    /// (aggregate, correct): `system` replaces the agent's role prompt when given.
    pub(super) fn task_job(
        &self,
        target: Target,
        task: &'static str,
        system: Option<String>,
        prompt: String,
    ) -> Job {
        Job {
            target,
            task,
            system,
            messages: vec![user(prompt)],
            max_tokens: self.request.max_tokens,
            temperature: self.request.temperature,
            top_p: self.request.top_p,
            seed: self.request.seed,
            stop: self.request.stop.clone(),
            choices: Vec::new(),
            api_request: None,
        }
    }

    /// Mixture of agents: every picked agent answers; an aggregator (the aggregator agent,
    /// else the head's own model) writes the final answer from theirs. When it is missing or
    /// fails, the answer of the highest-weight agent stands.
    pub(super) async fn moa(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let got = self.ask_all(self.answer_jobs(answerers), wait).await;
        if got.is_empty() {
            return Err(self.no_answer());
        }
        let best = best_by_weight(&got);
        if got.len() == 1 {
            return Ok((
                got[best].1.text.clone(),
                format!("only {} answered", got[best].1.agent),
            ));
        }
        let labelled: Vec<(String, String)> = got
            .iter()
            .map(|(_, a)| (format!("{} ({})", a.role, a.model), a.text.clone()))
            .collect();
        let aggregator = self
            .swarm
            .best_with_role(Role::Aggregator, None)
            .map(|t| (t, None))
            .or_else(|| self.swarm.local_as(Role::Aggregator));
        if let Some((target, system)) = aggregator {
            let prompt = aggregator_prompt(&self.question, &labelled);
            let job = self.task_job(target, "aggregate", system, prompt);
            if let Some(a) = self.ask_one(job, wait.limit).await {
                if !a.text.trim().is_empty() {
                    return Ok((a.text, format!("aggregated by {} ({})", a.agent, a.model)));
                }
            }
        }
        let (_, a) = &got[best];
        Ok((
            a.text.clone(),
            format!("no aggregator answered; highest-weight agent {}", a.agent),
        ))
    }

    /// Samples `indices` of the `vote_samples` answers spread over `answerers`, round robin:
    /// each agent's first at the request's temperature, the rest at the sampling temperature
    /// (sample `i` is seeded with the request's seed + `i`, so asking for them in parts asks
    /// for the same answers as asking at once).
    pub(super) fn sample_jobs(&self, answerers: &[Target], indices: Range<usize>) -> Vec<Job> {
        indices
            .filter_map(|i| {
                let target = answerers.get(i % answerers.len().max(1))?.clone();
                let temperature = if i < answerers.len() {
                    self.request.temperature
                } else {
                    self.swarm.config.sample_temperature
                };
                Some(self.answer_job(
                    target,
                    "sample",
                    temperature,
                    self.request.seed.wrapping_add(i as u64),
                ))
            })
            .collect()
    }

    /// `vote_samples` answers across the agents ([`Run::sample_jobs`]), then a vote.
    pub(super) async fn vote(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let all = 0..self.swarm.config.vote_samples.max(1);
        let got = self.ask_all(self.sample_jobs(answerers, all), wait).await;
        if got.is_empty() {
            return Err(self.no_answer());
        }
        let texts: Vec<String> = got.iter().map(|(_, a)| a.text.clone()).collect();
        let (winner, how) = self.vote_over(texts).await;
        let a = &got[winner].1;
        Ok((a.text.clone(), format!("{how}; answer of {}", a.agent)))
    }

    /// Cross-swarm vote: each of `members` answers once, at the request's temperature and
    /// seed (its own best answer; greedy at temperature 0), then a vote over the answers.
    pub(super) async fn cluster(
        &mut self,
        members: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let got = self.ask_all(self.answer_jobs(members), wait).await;
        if got.is_empty() {
            return Err(self.no_answer());
        }
        let texts: Vec<String> = got.iter().map(|(_, a)| a.text.clone()).collect();
        let (winner, how) = self.vote_over(texts).await;
        let a = &got[winner].1;
        Ok((
            a.text.clone(),
            format!(
                "{how} among the members' answers ({} of {} answered); answer of {}",
                got.len(),
                members.len(),
                a.agent
            ),
        ))
    }

    /// Each agent samples `confidence_samples` times; the agent whose samples agree most
    /// with each other wins, with the answer its own samples vote for.
    pub(super) async fn confidence(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let k = self.swarm.config.confidence_samples.max(1);
        let mut jobs = Vec::new();
        for (agent, target) in answerers.iter().enumerate() {
            for i in 0..k {
                let temperature = if i == 0 {
                    self.request.temperature
                } else {
                    self.swarm.config.sample_temperature
                };
                let seed = self.request.seed.wrapping_add((agent * k + i) as u64);
                jobs.push(self.answer_job(target.clone(), "sample", temperature, seed));
            }
        }
        let got = self.ask_all(jobs, wait).await;
        if got.is_empty() {
            return Err(self.no_answer());
        }
        // Group the samples by agent; score each agent by its self-agreement.
        let mut groups: Vec<(String, f32, Vec<String>)> = Vec::new();
        for (target, a) in &got {
            let name = target.name();
            match groups.iter_mut().find(|g| g.0 == name) {
                Some(g) => g.2.push(a.text.clone()),
                None => groups.push((name, target.weight(), vec![a.text.clone()])),
            }
        }
        let mut best: Option<(usize, f32)> = None;
        for (i, (_, weight, samples)) in groups.iter().enumerate() {
            // A lone sample shows no agreement; weight breaks ties.
            let agreement = if samples.len() > 1 {
                self_agreement(samples)
            } else {
                0.0
            };
            let score = agreement + 1e-3 * weight;
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        let Some((group, score)) = best else {
            return Err(self.no_answer());
        };
        let (name, _, samples) = groups.swap_remove(group);
        let (winner, how) = self.vote_over(samples.clone()).await;
        let text = samples.get(winner).cloned().unwrap_or_default();
        Ok((
            text,
            format!("most self-consistent agent {name} (agreement {score:.2}); {how}"),
        ))
    }

    /// The first answer that arrives; the rest are abandoned.
    pub(super) async fn fastest(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let mut pending: FuturesUnordered<_> = answerers
            .iter()
            .map(|t| {
                let job = self.answer_job(
                    t.clone(),
                    "answer",
                    self.request.temperature,
                    self.request.seed,
                );
                let swarm = self.swarm;
                async move {
                    let target = job.target.clone();
                    let result = swarm.send(job, wait.limit).await;
                    (target, result)
                }
            })
            .collect();
        while let Some((target, result)) = pending.next().await {
            if let Some(a) = self.accept(&target, "answer", result) {
                return Ok((a.text, format!("fastest answer, from {}", a.agent)));
            }
        }
        Err(self.no_answer())
    }

    /// The agent with the largest model answers alone (ties: the higher weight); when it
    /// fails or gives nothing, the next largest, and so on.
    pub(super) async fn strongest(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let mut by_size: Vec<&Target> = answerers.iter().collect();
        by_size.sort_by(|a, b| {
            b.parameters()
                .cmp(&a.parameters())
                .then(b.weight().total_cmp(&a.weight()))
        });
        for target in by_size {
            let job = self.answer_job(
                target.clone(),
                "answer",
                self.request.temperature,
                self.request.seed,
            );
            let result = self.swarm.send(job, wait.limit).await;
            if let Some(a) = self.accept(target, "answer", result) {
                let size = billions(target.parameters());
                return Ok((
                    a.text,
                    format!("the largest model answering ({size}), from {}", a.agent),
                ));
            }
        }
        Err(self.no_answer())
    }

    /// A drafter (the drafter agent, else the fastest agent) answers; the highest-weight
    /// reasoner (else the highest-weight other agent, else the head) checks and corrects
    /// the draft. When the check fails, the draft stands.
    pub(super) async fn speed(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let by_weight = |a: &&Target, b: &&Target| a.weight().total_cmp(&b.weight());
        let drafter = self
            .swarm
            .best_with_role(Role::Drafter, None)
            .or_else(|| answerers.iter().max_by(by_weight).cloned())
            .ok_or(SwarmError::NoAgents)?;
        let job = self.answer_job(
            drafter.clone(),
            "draft",
            self.request.temperature,
            self.request.seed,
        );
        let Some(draft) = self.ask_one(job, wait.limit).await else {
            return Err(self.no_answer());
        };
        // Another device checks: not the drafter's model under another of its roles.
        let drafter_addr = drafter.addr();
        let checker = self
            .swarm
            .best_with_role(Role::Reasoner, Some(&drafter_addr))
            .or_else(|| {
                answerers
                    .iter()
                    .filter(|t| t.addr() != drafter_addr)
                    .max_by(by_weight)
                    .cloned()
            })
            .map(|t| (t, None))
            .or_else(|| self.swarm.local_as(Role::Reasoner));
        if let Some((target, system)) = checker {
            let prompt = correction_prompt(&self.question, &draft.text);
            let job = self.task_job(target, "correct", system, prompt);
            if let Some(a) = self.ask_one(job, wait.limit).await {
                if !a.text.trim().is_empty() {
                    return Ok((
                        a.text,
                        format!("draft by {}, checked by {}", draft.agent, a.agent),
                    ));
                }
            }
        }
        Ok((
            draft.text,
            format!("draft by {} (no checker answered)", draft.agent),
        ))
    }

    /// Votes over `texts` off the runtime (checking code runs Python); returns the winner's
    /// index and how it won.
    pub(super) async fn vote_over(&self, texts: Vec<String>) -> (usize, String) {
        let question = self.question.clone();
        let checks = self.swarm.config.code_checks;
        let n = texts.len();
        let outcome = tokio::task::spawn_blocking(move || vote(&question, &texts, checks)).await;
        match outcome {
            Ok(Some(o)) => {
                let method = match o.method {
                    VoteMethod::Majority => "majority vote",
                    VoteMethod::CodeExamples => "vote among answers passing the prompt's examples",
                    VoteMethod::Similarity => "similarity vote",
                };
                let mut decided_by = format!("{method}, {} of {n} agree", o.support);
                if let Some(why) = o.unchecked {
                    decided_by.push_str(&format!("; code not run against the examples: {why}"));
                }
                (o.winner, decided_by)
            }
            _ => (0, "no vote possible; first answer".to_owned()),
        }
    }

    /// Asks every job in parallel; returns the answers that came, in job order. Waits for
    /// all of them until `wait.enough`; past it, stops as soon as one has answered (the
    /// others are abandoned, which stops their generation); with none by then, waits for
    /// the first up to `wait.limit`.
    pub(super) async fn ask_all(
        &mut self,
        jobs: Vec<Job>,
        wait: Wait,
    ) -> Vec<(Target, AgentAnswer)> {
        self.ask_all_until(jobs, wait, |_| true).await
    }

    /// [`Run::ask_all`], where only the answers to jobs `counts` accepts (by task) end the
    /// wait past `wait.enough`.
    pub(super) async fn ask_all_until(
        &mut self,
        jobs: Vec<Job>,
        wait: Wait,
        counts: impl Fn(&'static str) -> bool,
    ) -> Vec<(Target, AgentAnswer)> {
        let swarm = self.swarm;
        let asked: Vec<(Target, &'static str)> =
            jobs.iter().map(|j| (j.target.clone(), j.task)).collect();
        let sends = jobs
            .into_iter()
            .map(|job| swarm.send(job, wait.limit))
            .collect();
        let gathered = gather(
            sends,
            wait,
            |i| asked.get(i).is_some_and(|(_, task)| counts(task)),
            |a: &Answer| !a.text.trim().is_empty(),
        )
        .await;
        let mut got = Vec::new();
        for ((target, task), result) in asked.into_iter().zip(gathered.results) {
            let result = result.unwrap_or_else(|| {
                let waited = gathered.waited.as_millis();
                Err(Failure::from(if gathered.hopeless {
                    format!(
                        "not waited for: after {waited} ms every ask that could give an \
                         answer had failed"
                    )
                } else {
                    format!(
                        "did not answer in time: the head stopped waiting after {waited} ms ({})",
                        if gathered.answered {
                            "others had answered"
                        } else {
                            "the request's limit"
                        }
                    )
                }))
            });
            if let Some(a) = self.accept(&target, task, result) {
                got.push((target, a));
            }
        }
        got
    }

    pub(super) async fn ask_one(&mut self, job: Job, timeout: Duration) -> Option<AgentAnswer> {
        let target = job.target.clone();
        let task = job.task;
        match self.swarm.send(job, timeout).await {
            Ok(answer) => Some(self.record(&target, task, answer)),
            Err(e) => {
                self.record_failure(&target, task, e);
                None
            }
        }
    }

    pub(super) fn record(
        &mut self,
        target: &Target,
        task: &'static str,
        answer: Answer,
    ) -> AgentAnswer {
        let a = AgentAnswer {
            agent: target.name(),
            addr: target.addr(),
            role: target.role_name(),
            model: target.model(),
            task,
            text: answer.text,
            elapsed_ms: u64::from(answer.elapsed_ms),
            prompt_tokens: answer.prompt_tokens,
            completion_tokens: answer.completion_tokens,
            response: answer.response,
        };
        self.answers.push(a.clone());
        a
    }

    /// Records what an agent sent back: its answer, or — for an error or an empty answer —
    /// a failure, leaving it out.
    pub(super) fn accept(
        &mut self,
        target: &Target,
        task: &'static str,
        result: Result<Answer, Failure>,
    ) -> Option<AgentAnswer> {
        match result {
            Ok(answer) if !answer.text.trim().is_empty() => Some(self.record(target, task, answer)),
            Ok(_) => {
                self.record_failure(target, task, "an empty answer".to_owned());
                None
            }
            Err(e) => {
                self.record_failure(target, task, e);
                None
            }
        }
    }

    pub(super) fn record_failure(
        &mut self,
        target: &Target,
        task: &'static str,
        failure: impl Into<Failure>,
    ) {
        let Failure {
            message: error,
            refused_request,
            context_length,
        } = failure.into();
        tracing::info!(agent = %target.name(), task, %error, "swarm agent left out");
        self.failed.push(AgentFailure {
            agent: target.name(),
            addr: target.addr(),
            role: target.role_name(),
            task,
            error,
            refused_request,
            context_length,
        });
    }

    /// Why nothing came back: a refusal of the request itself when every agent it was put
    /// to refused it (the client's to mend), else everyone's reasons.
    pub(super) fn no_answer(&self) -> SwarmError {
        if let Some(refused) = refusal(&self.failed) {
            return SwarmError::Refused {
                message: format!("{}: {}", refused.agent, refused.error),
                context_length: refused.context_length,
            };
        }
        let why: Vec<String> = self
            .failed
            .iter()
            .map(|f| format!("{}: {}", f.agent, f.error))
            .collect();
        SwarmError::NoAnswer(if why.is_empty() {
            "nobody was asked".to_owned()
        } else {
            why.join("; ")
        })
    }
}

/// The tasks of jobs that put the client's own conversation to an agent
/// ([`Run::answer_job`]); the others (a spotter's label, written tests, an aggregation)
/// carry a prompt of the head's making, which may fit where the request does not.
const REQUEST_TASKS: [&str; 6] = ["answer", "draft", "sample", "resample", "repair", "hinted"];

/// The refusal to report, when the client's request was put to some agent and every one of
/// them refused it as invalid ([`AgentFailure::refused_request`]): the first for being
/// longer than the agent's context, if any was (the request is too long for at least that
/// agent's model, which is what a client can mend), else the first.
fn refusal(failed: &[AgentFailure]) -> Option<&AgentFailure> {
    let asked: Vec<&AgentFailure> = failed
        .iter()
        .filter(|f| REQUEST_TASKS.contains(&f.task))
        .collect();
    if asked.is_empty() || !asked.iter().all(|f| f.refused_request) {
        return None;
    }
    asked
        .iter()
        .find(|f| f.context_length)
        .or(asked.first())
        .copied()
}

/// The index of the answer whose agent has the highest weight (the first on ties).
pub(super) fn best_by_weight(got: &[(Target, AgentAnswer)]) -> usize {
    let mut best = 0;
    for (i, (t, _)) in got.iter().enumerate() {
        if t.weight() > got[best].0.weight() {
            best = i;
        }
    }
    best
}

pub(super) fn user(content: String) -> ChatTurn {
    ChatTurn {
        role: "user".to_owned(),
        content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(task: &'static str, refused_request: bool) -> AgentFailure {
        AgentFailure {
            agent: format!("{task}-{refused_request}"),
            addr: String::new(),
            role: String::new(),
            task,
            error: String::new(),
            refused_request,
            context_length: false,
        }
    }

    /// A request is refused when every job that carried it was refused as invalid; the
    /// head's own prompts (a spotter's, a test writer's) do not count either way.
    #[test]
    fn a_request_is_refused_when_every_agent_it_went_to_refused_it() {
        let refused = |failed: &[AgentFailure]| refusal(failed).map(|f| f.agent.clone());
        assert_eq!(refused(&[]), None);
        assert_eq!(
            refused(&[failure("sample", true), failure("sample", true)]),
            Some("sample-true".into())
        );
        // One agent that timed out (or answered nothing) might have answered.
        assert_eq!(
            refused(&[failure("answer", true), failure("answer", false)]),
            None
        );
        // A spotter or test writer that failed otherwise does not hide the refusal.
        assert_eq!(
            refused(&[
                failure("classify", false),
                failure("answer", true),
                failure("tests", false)
            ]),
            Some("answer-true".into())
        );
        // Only the head's own prompts failed: the request itself was never refused.
        assert_eq!(refused(&[failure("classify", true)]), None);
        assert_eq!(
            refused(&[failure("draft", true)]),
            Some("draft-true".into())
        );
        // Too long for one agent's context, refused otherwise by another: the length is
        // what the client can mend, so that is the refusal reported.
        let too_long = AgentFailure {
            agent: "small".into(),
            context_length: true,
            ..failure("sample", true)
        };
        let failed = [failure("sample", true), too_long];
        let got = refusal(&failed).unwrap();
        assert!(got.context_length && got.agent == "small");
    }
}
