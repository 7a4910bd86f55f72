//! The head's side of swarm mode: [`Swarm`] knows the agents (from `--peer`), keeps their
//! cards fresh, and runs a query: classify it, pick agents by the routing table, fan out with
//! the query type's timeout, and combine by the chosen [`Strategy`].
//!
//! Agents are reached over the peer protocol, one connection per request ([`crate::agent`]):
//! an agent that fails, times out or answers nothing is left out and named in
//! [`SwarmOutcome::failed`]; a request still answers as long as one agent (or the head's own
//! model) does. Dropping a run closes every connection, which stops the agents' work.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use shoal_cluster::{Member, MemberState, Membership};
use shoal_wire::{AgentCard, Answer, Ask, ChatTurn};

use crate::agent::{self, AgentService};
use crate::classify::{classify_keywords, parse_label, QueryType};
use crate::roles::{aggregator_prompt, correction_prompt, spotter_prompt, Role, RolePrompts};
use crate::routing::{pick, Candidate, Strategy, Timeouts};
use crate::vote::{self_agreement, vote, VoteMethod};
use crate::weight::agent_weight;

/// How a [`Swarm`] works.
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    /// This node's id, sent in handshakes.
    pub node_id: String,
    /// The agents' peer addresses.
    pub agents: Vec<SocketAddr>,
    /// Time allowed for the agents' answers, per query type.
    pub timeouts: Timeouts,
    /// The strategy of requests that name none (`"model": "swarm"`).
    pub strategy: Strategy,
    /// System prompts for what the head's own model does (aggregate, correct, classify).
    pub prompts: RolePrompts,
    /// `vote`: how many answers are sampled in all, across the agents.
    pub vote_samples: usize,
    /// `confidence`: samples per model.
    pub confidence_samples: usize,
    /// Temperature of the extra samples of `vote` and `confidence` (the first answer of each
    /// agent uses the request's own temperature).
    pub sample_temperature: f32,
    /// How long a `Describe` may take before the agent counts as unhealthy.
    pub describe_timeout: Duration,
    /// Time allowed to run code against a prompt's examples when voting.
    pub code_timeout: Duration,
}

impl SwarmConfig {
    /// Defaults: `auto` (`strongest` or `vote`, whichever measured best on HumanEval for
    /// swarms like this one, docs/EVAL.md),
    /// 6 s / 12 s timeouts, 5 vote samples, 3 confidence samples.
    pub fn new(node_id: impl Into<String>, agents: Vec<SocketAddr>) -> Self {
        SwarmConfig {
            node_id: node_id.into(),
            agents,
            timeouts: Timeouts::default(),
            strategy: Strategy::Auto,
            prompts: RolePrompts::new(),
            vote_samples: 5,
            confidence_samples: 3,
            sample_temperature: 0.7,
            describe_timeout: Duration::from_secs(2),
            code_timeout: Duration::from_secs(10),
        }
    }
}

/// One swarm request.
#[derive(Clone, Debug)]
pub struct SwarmRequest {
    /// The conversation; the last user turn is the question.
    pub messages: Vec<ChatTurn>,
    /// `None`: the swarm's default.
    pub strategy: Option<Strategy>,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Overrides the query type's timeout.
    pub timeout: Option<Duration>,
}

/// What the head knows of one agent.
#[derive(Clone, Debug, Serialize)]
pub struct AgentStatus {
    /// The agent's peer address.
    pub addr: String,
    /// Its node id, once it answered.
    pub node_id: Option<String>,
    /// Its role; `"worker"` for a node without one.
    pub role: Option<String>,
    /// Its model file.
    pub model: Option<String>,
    /// Its model's name.
    pub model_name: Option<String>,
    /// Whether it answered the last `Describe` (and no request since failed to reach it).
    pub healthy: bool,
    /// The same in words: `ok`, `down`, or `unknown` before the first `Describe`.
    pub health: &'static str,
    /// Measured decode speed.
    pub tokens_per_s: f32,
    /// Thermal penalty of its device (1 = cool).
    pub thermal_penalty: f32,
    /// min(tokens/s ÷ 40, 1) × thermal penalty.
    pub weight: f32,
    /// Requests queued or running on it.
    pub busy: u32,
    /// Its model's parameter count (0 before the first `Describe`).
    pub parameters: u64,
    /// Why it is unhealthy.
    pub last_error: Option<String>,
    /// Milliseconds since it last answered (`None`: never).
    pub last_seen_ms: Option<u64>,
}

impl AgentStatus {
    fn unknown(addr: SocketAddr) -> Self {
        AgentStatus {
            addr: addr.to_string(),
            node_id: None,
            role: None,
            model: None,
            model_name: None,
            healthy: false,
            health: "unknown",
            tokens_per_s: 0.0,
            thermal_penalty: 1.0,
            weight: 0.0,
            busy: 0,
            parameters: 0,
            last_error: Some("not contacted yet".to_owned()),
            last_seen_ms: None,
        }
    }

    /// Health as the membership records it.
    fn with_health(mut self, member: Option<Member>) -> Self {
        let Some(member) = member else { return self };
        self.healthy = member.is_alive();
        self.health = match member.state {
            MemberState::Unknown => "unknown",
            MemberState::Alive => "ok",
            MemberState::Dead => "down",
        };
        if member.state != MemberState::Unknown {
            self.last_error = member.last_error.clone();
        }
        self.last_seen_ms = member
            .since_seen()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    fn update(&mut self, card: &AgentCard) {
        self.node_id = Some(card.node_id.clone());
        self.role = Some(if card.role.is_empty() {
            "worker".to_owned()
        } else {
            card.role.clone()
        });
        self.model = Some(card.model_id.clone());
        self.model_name = Some(card.model_name.clone());
        self.tokens_per_s = card.tokens_per_s;
        self.thermal_penalty = card.thermal_penalty;
        self.weight = agent_weight(card.tokens_per_s, card.thermal_penalty);
        self.busy = card.busy;
        self.parameters = card.parameters;
    }

    fn parsed_role(&self) -> Option<Role> {
        self.role.as_deref().and_then(|r| r.parse().ok())
    }
}

/// `/v1/swarm/status`.
#[derive(Clone, Debug, Serialize)]
pub struct SwarmStatus {
    pub strategy: Strategy,
    pub agents: Vec<AgentStatus>,
    /// The head's own model, which aggregates when no aggregator agent is up.
    pub head_model: Option<String>,
}

/// One answer an agent gave.
#[derive(Clone, Debug, Serialize)]
pub struct AgentAnswer {
    /// Who answered: the node id (or `head`).
    pub agent: String,
    pub addr: String,
    pub role: String,
    pub model: String,
    /// What it was asked to do: `answer`, `sample`, `aggregate`, `correct`, `draft`, `classify`.
    pub task: &'static str,
    pub text: String,
    pub elapsed_ms: u64,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// An agent that was asked and did not answer.
#[derive(Clone, Debug, Serialize)]
pub struct AgentFailure {
    pub agent: String,
    pub addr: String,
    pub role: String,
    pub task: &'static str,
    pub error: String,
}

/// The result of a swarm request (`/v1/swarm/query` returns it as JSON).
#[derive(Clone, Debug, Serialize)]
pub struct SwarmOutcome {
    pub query_type: QueryType,
    /// How the query type was found: `spotter` or `keywords`.
    pub classified_by: &'static str,
    pub strategy: Strategy,
    /// Every answer given, in the order they arrived.
    pub answers: Vec<AgentAnswer>,
    pub failed: Vec<AgentFailure>,
    pub final_answer: String,
    /// How the final answer was chosen.
    pub decided_by: String,
    /// The agents that answered (each once).
    pub agents_responded: Vec<String>,
    pub elapsed_ms: u64,
    /// Tokens of every prompt and answer of the run.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Why a swarm request got no answer at all.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("the request has no user message to answer")]
    NoQuestion,
    #[error("no swarm agent is reachable and this node has no model of its own to answer with")]
    NoAgents,
    #[error("no agent answered: {0}")]
    NoAnswer(String),
}

/// Who is asked: a remote agent, or the head's own model.
#[derive(Clone)]
enum Target {
    Remote {
        index: usize,
        addr: SocketAddr,
        name: String,
        role: Option<Role>,
        model: String,
        weight: f32,
        parameters: u64,
    },
    Local {
        service: Arc<AgentService>,
        weight: f32,
    },
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Remote { name, .. } => name.clone(),
            Target::Local { .. } => "head".to_owned(),
        }
    }

    fn addr(&self) -> String {
        match self {
            Target::Remote { addr, .. } => addr.to_string(),
            Target::Local { .. } => "local".to_owned(),
        }
    }

    fn role(&self) -> Option<Role> {
        match self {
            Target::Remote { role, .. } => *role,
            Target::Local { .. } => None,
        }
    }

    fn role_name(&self) -> String {
        self.role()
            .map(|r| r.as_str().to_owned())
            .unwrap_or_else(|| "worker".to_owned())
    }

    fn model(&self) -> String {
        match self {
            Target::Remote { model, .. } => model.clone(),
            Target::Local { service, .. } => service.config().model_id.clone(),
        }
    }

    fn weight(&self) -> f32 {
        match self {
            Target::Remote { weight, .. } | Target::Local { weight, .. } => *weight,
        }
    }

    fn parameters(&self) -> u64 {
        match self {
            Target::Remote { parameters, .. } => *parameters,
            Target::Local { service, .. } => service.model().parameters(),
        }
    }
}

/// A parameter count in words: `1.54 B parameters`.
fn billions(parameters: u64) -> String {
    if parameters == 0 {
        return "size unknown".to_owned();
    }
    format!("{:.2} B parameters", parameters as f64 / 1e9)
}

/// The swarm as its head sees it.
pub struct Swarm {
    config: SwarmConfig,
    /// What each agent's card says, in the order of `config.agents`.
    agents: Mutex<Vec<AgentStatus>>,
    /// Whether each agent answers: its last `Describe`, and any request that failed to
    /// reach it since.
    members: Membership,
    /// The head's own model as an agent: aggregator of last resort, and the only answerer
    /// when no agent is up.
    local: Option<Arc<AgentService>>,
    next_request: AtomicU64,
}

impl Swarm {
    pub fn new(config: SwarmConfig, local: Option<Arc<AgentService>>) -> Self {
        let agents = config
            .agents
            .iter()
            .map(|&a| AgentStatus::unknown(a))
            .collect();
        Swarm {
            members: Membership::new(config.agents.iter().copied()),
            config,
            agents: Mutex::new(agents),
            local,
            next_request: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &SwarmConfig {
        &self.config
    }

    /// Asks every agent who it is (in parallel) and updates their status.
    pub async fn refresh(&self) {
        let timeout = self.config.describe_timeout;
        let node_id = self.config.node_id.clone();
        let cards = futures::future::join_all(
            self.config
                .agents
                .iter()
                .map(|&addr| agent::describe(addr, &node_id, timeout)),
        )
        .await;
        let mut agents = self.lock_agents();
        for ((status, card), &addr) in agents.iter_mut().zip(cards).zip(&self.config.agents) {
            match card {
                Ok(card) => {
                    status.update(&card);
                    self.members.seen(addr, Some(&card.node_id));
                }
                Err(e) => self.members.failed(addr, &e.to_string()),
            }
        }
    }

    /// Refreshes the agents' status every `period`, for as long as the swarm lives.
    pub fn spawn_monitor(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(swarm) = me.upgrade() else { return };
                swarm.refresh().await;
            }
        })
    }

    /// Every agent with its role, model, health and speed.
    pub fn status(&self) -> SwarmStatus {
        SwarmStatus {
            strategy: self.config.strategy,
            agents: self
                .lock_agents()
                .iter()
                .zip(&self.config.agents)
                .map(|(status, &addr)| status.clone().with_health(self.members.get(addr)))
                .collect(),
            head_model: self.local.as_ref().map(|l| l.config().model_id.clone()),
        }
    }

    fn lock_agents(&self) -> std::sync::MutexGuard<'_, Vec<AgentStatus>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The healthy agents as targets.
    fn targets(&self) -> Vec<Target> {
        self.lock_agents()
            .iter()
            .enumerate()
            .filter(|&(index, _)| {
                let addr = self.config.agents.get(index);
                addr.is_some_and(|&a| self.members.is_alive(a))
            })
            .filter_map(|(index, s)| {
                Some(Target::Remote {
                    index,
                    addr: s.addr.parse().ok()?,
                    name: s.node_id.clone().unwrap_or_else(|| s.addr.clone()),
                    role: s.parsed_role(),
                    model: s.model.clone().unwrap_or_default(),
                    weight: s.weight,
                    parameters: s.parameters,
                })
            })
            .collect()
    }

    /// The healthy agent with `role` and the highest weight, other than the one named
    /// `except`.
    fn best_with_role(&self, role: Role, except: Option<&str>) -> Option<Target> {
        self.targets()
            .into_iter()
            .filter(|t| t.role() == Some(role) && except != Some(t.name().as_str()))
            .max_by(|a, b| a.weight().total_cmp(&b.weight()))
    }

    /// The head's own model doing `role`'s job: the target and that role's system prompt.
    fn local_as(&self, role: Role) -> Option<(Target, Option<String>)> {
        let prompt = self.config.prompts.get(role).to_owned();
        self.local_target().map(|t| (t, Some(prompt)))
    }

    fn local_target(&self) -> Option<Target> {
        self.local.as_ref().map(|service| Target::Local {
            service: service.clone(),
            weight: agent_weight(service.card().tokens_per_s, service.card().thermal_penalty),
        })
    }

    /// Runs a request. Fails only when nobody answered at all.
    pub async fn run(&self, request: SwarmRequest) -> Result<SwarmOutcome, SwarmError> {
        let started = Instant::now();
        let question = request
            .messages
            .iter()
            .rev()
            .find(|t| t.role == "user")
            .map(|t| t.content.clone())
            .ok_or(SwarmError::NoQuestion)?;
        // A head that just started, before its monitor's first round: ask the agents first.
        let contacted = |m: &Member| m.state != MemberState::Unknown;
        if !self.members.members().iter().any(contacted) {
            self.refresh().await;
        }
        let requested = request.strategy.unwrap_or(self.config.strategy);
        let mut run = Run {
            swarm: self,
            request: &request,
            question,
            answers: Vec::new(),
            failed: Vec::new(),
        };
        let (query_type, classified_by) = run.classify().await;
        let timeout = request
            .timeout
            .unwrap_or_else(|| self.config.timeouts.for_query(query_type));
        let answerers = run.answerers(query_type)?;
        let sizes: Vec<u64> = answerers.iter().map(Target::parameters).collect();
        let strategy = requested.resolve(&sizes);
        let (final_answer, decided_by) = match strategy {
            Strategy::Moa => run.moa(&answerers, timeout).await?,
            // `resolve` never returns `Auto`; were it to, `auto`'s fallback is the vote.
            Strategy::Vote | Strategy::Auto => run.vote(&answerers, timeout).await?,
            Strategy::Confidence => run.confidence(&answerers, timeout).await?,
            Strategy::Fastest => run.fastest(&answerers, timeout).await?,
            Strategy::Speed => run.speed(&answerers, timeout).await?,
            Strategy::Strongest => run.strongest(&answerers, timeout).await?,
        };
        let decided_by = if requested == Strategy::Auto {
            format!("auto chose {strategy}: {decided_by}")
        } else {
            decided_by
        };
        let mut agents_responded: Vec<String> = Vec::new();
        for a in &run.answers {
            if !agents_responded.contains(&a.agent) {
                agents_responded.push(a.agent.clone());
            }
        }
        let prompt_tokens = run.answers.iter().map(|a| u64::from(a.prompt_tokens)).sum();
        let completion_tokens = run
            .answers
            .iter()
            .map(|a| u64::from(a.completion_tokens))
            .sum();
        Ok(SwarmOutcome {
            query_type,
            classified_by,
            strategy,
            answers: run.answers,
            failed: run.failed,
            final_answer,
            decided_by,
            agents_responded,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            prompt_tokens,
            completion_tokens,
        })
    }

    fn mark_unhealthy(&self, index: usize, error: &str) {
        if let Some(&addr) = self.config.agents.get(index) {
            self.members.failed(addr, error);
        }
    }
}

/// One request in progress: what was asked, and every answer and failure so far.
struct Run<'a> {
    swarm: &'a Swarm,
    request: &'a SwarmRequest,
    question: String,
    answers: Vec<AgentAnswer>,
    failed: Vec<AgentFailure>,
}

/// What one agent is asked.
struct Job {
    target: Target,
    task: &'static str,
    /// `None`: the agent's own role prompt.
    system: Option<String>,
    messages: Vec<ChatTurn>,
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    seed: u64,
    stop: Vec<String>,
    /// When not empty, the answer must be one of these (the spotter's labels).
    choices: Vec<String>,
}

impl Run<'_> {
    /// The query type: the spotter's label when a spotter is up and gives one, else keywords.
    /// The spotter's answer is constrained to the labels (its sampler can draw nothing
    /// else); the answer is still parsed, tolerantly, in case an agent ignores the choices.
    async fn classify(&mut self) -> (QueryType, &'static str) {
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
    fn answerers(&self, query_type: QueryType) -> Result<Vec<Target>, SwarmError> {
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

    fn answer_job(&self, target: Target, task: &'static str, temperature: f32, seed: u64) -> Job {
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
        }
    }

    /// A job on the request's settings with one user message of the head's making
    /// (aggregate, correct): `system` replaces the agent's role prompt when given.
    fn task_job(
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
        }
    }

    /// Mixture of agents: every picked agent answers; an aggregator (the aggregator agent,
    /// else the head's own model) writes the final answer from theirs. When it is missing or
    /// fails, the answer of the highest-weight agent stands.
    async fn moa(
        &mut self,
        answerers: &[Target],
        timeout: Duration,
    ) -> Result<(String, String), SwarmError> {
        let jobs = answerers
            .iter()
            .map(|t| {
                self.answer_job(
                    t.clone(),
                    "answer",
                    self.request.temperature,
                    self.request.seed,
                )
            })
            .collect();
        let got = self.ask_all(jobs, timeout).await;
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
            if let Some(a) = self.ask_one(job, timeout).await {
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

    /// `vote_samples` answers across the agents (round robin; each agent's first at the
    /// request's temperature, the rest at the sampling temperature), then a vote.
    async fn vote(
        &mut self,
        answerers: &[Target],
        timeout: Duration,
    ) -> Result<(String, String), SwarmError> {
        let n = self.swarm.config.vote_samples.max(1);
        let jobs = (0..n)
            .filter_map(|i| {
                let target = answerers.get(i % answerers.len().max(1))?.clone();
                let first_of_agent = i < answerers.len();
                let temperature = if first_of_agent {
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
            .collect();
        let got = self.ask_all(jobs, timeout).await;
        if got.is_empty() {
            return Err(self.no_answer());
        }
        let texts: Vec<String> = got.iter().map(|(_, a)| a.text.clone()).collect();
        let (winner, how) = self.vote_over(texts).await;
        let a = &got[winner].1;
        Ok((a.text.clone(), format!("{how}; answer of {}", a.agent)))
    }

    /// Each agent samples `confidence_samples` times; the agent whose samples agree most
    /// with each other wins, with the answer its own samples vote for.
    async fn confidence(
        &mut self,
        answerers: &[Target],
        timeout: Duration,
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
        let got = self.ask_all(jobs, timeout).await;
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
    async fn fastest(
        &mut self,
        answerers: &[Target],
        timeout: Duration,
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
                    let result = swarm.send(job, timeout).await;
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
    async fn strongest(
        &mut self,
        answerers: &[Target],
        timeout: Duration,
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
            let result = self.swarm.send(job, timeout).await;
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
    async fn speed(
        &mut self,
        answerers: &[Target],
        timeout: Duration,
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
        let Some(draft) = self.ask_one(job, timeout).await else {
            return Err(self.no_answer());
        };
        let drafter_name = drafter.name();
        let checker = self
            .swarm
            .best_with_role(Role::Reasoner, Some(&drafter_name))
            .or_else(|| {
                answerers
                    .iter()
                    .filter(|t| t.name() != drafter_name)
                    .max_by(by_weight)
                    .cloned()
            })
            .map(|t| (t, None))
            .or_else(|| self.swarm.local_as(Role::Reasoner));
        if let Some((target, system)) = checker {
            let prompt = correction_prompt(&self.question, &draft.text);
            let job = self.task_job(target, "correct", system, prompt);
            if let Some(a) = self.ask_one(job, timeout).await {
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
    async fn vote_over(&self, texts: Vec<String>) -> (usize, String) {
        let question = self.question.clone();
        let code_timeout = self.swarm.config.code_timeout;
        let n = texts.len();
        let outcome =
            tokio::task::spawn_blocking(move || vote(&question, &texts, code_timeout)).await;
        match outcome {
            Ok(Some(o)) => {
                let method = match o.method {
                    VoteMethod::Majority => "majority vote",
                    VoteMethod::CodeExamples => "vote among answers passing the prompt's examples",
                    VoteMethod::Similarity => "similarity vote",
                };
                (o.winner, format!("{method}, {} of {n} agree", o.support))
            }
            _ => (0, "no vote possible; first answer".to_owned()),
        }
    }

    /// Asks every job in parallel; returns the answers that came, in job order.
    async fn ask_all(&mut self, jobs: Vec<Job>, timeout: Duration) -> Vec<(Target, AgentAnswer)> {
        let swarm = self.swarm;
        let results = futures::future::join_all(jobs.into_iter().map(|job| async move {
            let target = job.target.clone();
            let task = job.task;
            (target, task, swarm.send(job, timeout).await)
        }))
        .await;
        let mut got = Vec::new();
        for (target, task, result) in results {
            if let Some(a) = self.accept(&target, task, result) {
                got.push((target, a));
            }
        }
        got
    }

    async fn ask_one(&mut self, job: Job, timeout: Duration) -> Option<AgentAnswer> {
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

    fn record(&mut self, target: &Target, task: &'static str, answer: Answer) -> AgentAnswer {
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
        };
        self.answers.push(a.clone());
        a
    }

    /// Records what an agent sent back: its answer, or — for an error or an empty answer —
    /// a failure, leaving it out.
    fn accept(
        &mut self,
        target: &Target,
        task: &'static str,
        result: Result<Answer, String>,
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

    fn record_failure(&mut self, target: &Target, task: &'static str, error: String) {
        tracing::info!(agent = %target.name(), task, %error, "swarm agent left out");
        self.failed.push(AgentFailure {
            agent: target.name(),
            addr: target.addr(),
            role: target.role_name(),
            task,
            error,
        });
    }

    fn no_answer(&self) -> SwarmError {
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

impl Swarm {
    /// Sends one job to its target and waits at most `timeout`.
    async fn send(&self, job: Job, timeout: Duration) -> Result<Answer, String> {
        let ask = Ask {
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            system: job.system,
            messages: job.messages,
            max_tokens: job.max_tokens,
            temperature: job.temperature,
            top_p: job.top_p,
            seed: job.seed,
            stop: job.stop,
            choices: job.choices,
        };
        match job.target {
            Target::Remote { index, addr, .. } => {
                let result = agent::ask(addr, &self.config.node_id, ask, timeout).await;
                result.map_err(|e| {
                    // An agent that cannot be reached is out until its next good `Describe`.
                    if matches!(
                        e,
                        agent::AgentError::Connect { .. } | agent::AgentError::Disconnected { .. }
                    ) {
                        self.mark_unhealthy(index, &e.to_string());
                    }
                    e.to_string()
                })
            }
            Target::Local { service, .. } => {
                match tokio::time::timeout(timeout, service.answer_here(ask)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!(
                        "the head's own model did not answer within {} ms",
                        timeout.as_millis()
                    )),
                }
            }
        }
    }
}

/// The index of the answer whose agent has the highest weight (the first on ties).
fn best_by_weight(got: &[(Target, AgentAnswer)]) -> usize {
    let mut best = 0;
    for (i, (t, _)) in got.iter().enumerate() {
        if t.weight() > got[best].0.weight() {
            best = i;
        }
    }
    best
}

fn user(content: String) -> ChatTurn {
    ChatTurn {
        role: "user".to_owned(),
        content,
    }
}
