//! The head's side of swarm mode: [`Swarm`] knows the agents (from `--peer`), keeps their
//! cards fresh, and runs a query: classify it, pick agents by the routing table, fan out with
//! the query type's timeout, and combine by the chosen [`Strategy`].
//!
//! Agents are reached over the peer protocol, one connection per request ([`crate::agent`]):
//! an agent that fails, times out or answers nothing is left out and named in
//! [`SwarmOutcome::failed`]; a request still answers as long as one agent (or the head's own
//! model) does. Dropping a run closes every connection, which stops the agents' work.
//!
//! Here: the swarm and its agents (`Swarm`, their health in a [`shoal_cluster::Membership`]);
//! `report.rs`: what a run and `/v1/swarm/status` report; `target.rs`: who is asked;
//! `strategies.rs`: one run, and each way of combining answers; `verify.rs`: choosing code
//! by running it.

mod report;
mod strategies;
mod target;
mod verify;
mod wait;

pub use report::{AgentAnswer, AgentFailure, AgentStatus, SwarmError, SwarmOutcome, SwarmStatus};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shoal_cluster::{Member, MemberState, Membership};
use shoal_wire::{Answer, Ask, ChatTurn, Transport};

use crate::agent::{self, AgentService};
use crate::roles::{Role, RolePrompts};
use crate::routing::{Strategy, Timeouts};
use crate::vote::CodeChecks;
use crate::weight::agent_weight;

use report::Failure;
use strategies::{Job, Run};
use target::Target;
use wait::Wait;

/// How a [`Swarm`] works.
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    /// This node's id, sent in handshakes.
    pub node_id: String,
    /// The swarm key, frame limits and deadlines of connections to the agents.
    pub transport: Transport,
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
    /// Whether voting runs code against a prompt's examples (in the sandbox, where there
    /// is one), and for how long each run.
    pub code_checks: CodeChecks,
}

impl SwarmConfig {
    /// Defaults: `auto` (`strongest` or `vote`, whichever measured best on HumanEval for
    /// swarms like this one, docs/EVAL.md),
    /// 6 s / 12 s timeouts, 5 vote samples, 3 confidence samples.
    pub fn new(node_id: impl Into<String>, agents: Vec<SocketAddr>) -> Self {
        SwarmConfig {
            node_id: node_id.into(),
            transport: Transport::default(),
            agents,
            timeouts: Timeouts::default(),
            strategy: Strategy::Auto,
            prompts: RolePrompts::new(),
            vote_samples: 5,
            confidence_samples: 3,
            sample_temperature: 0.7,
            describe_timeout: Duration::from_secs(2),
            code_checks: CodeChecks::On {
                timeout: Duration::from_secs(10),
            },
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
    /// The client's whole chat API request (a JSON object), for what plain text cannot
    /// carry: tools, `response_format`, log-probabilities, `n`. Each agent answers it
    /// through its own chat API (with the temperature and seed of its sample), and the
    /// outcome's `response` is the chosen agent's answer. A whole answer cannot be merged,
    /// so `moa` and `speed` choose among the agents' answers as `vote` does.
    pub api_request: Option<serde_json::Value>,
}

/// The swarm as its head sees it.
pub struct Swarm {
    config: SwarmConfig,
    /// The agents' peer addresses: `config.agents`, then those added since (members of the
    /// cluster found after start). Only ever appended to, so an index names one agent.
    addrs: Mutex<Vec<SocketAddr>>,
    /// What each agent's card says, in the order of `addrs`.
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
            addrs: Mutex::new(config.agents.clone()),
            config,
            agents: Mutex::new(agents),
            local,
            next_request: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &SwarmConfig {
        &self.config
    }

    /// Adds an agent (a member of the cluster that joined after the head started); it is
    /// asked who it is at the monitor's next round and used once it answers. `false` when
    /// it is an agent already.
    pub fn add_agent(&self, addr: SocketAddr) -> bool {
        let mut agents = self.lock_agents();
        let mut addrs = self.addrs.lock().unwrap_or_else(PoisonError::into_inner);
        if addrs.contains(&addr) {
            return false;
        }
        addrs.push(addr);
        agents.push(AgentStatus::unknown(addr));
        self.members.add(addr);
        true
    }

    /// The agents' addresses, in the order of their statuses.
    fn agent_addrs(&self) -> Vec<SocketAddr> {
        self.addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Who this head is to its agents, and how it reaches them.
    fn caller(&self) -> agent::Caller {
        agent::Caller {
            node_id: self.config.node_id.clone(),
            transport: self.config.transport.clone(),
        }
    }

    /// Asks every agent who it is (in parallel) and updates their status.
    pub async fn refresh(&self) {
        let timeout = self.config.describe_timeout;
        let caller = self.caller();
        let addrs = self.agent_addrs();
        let cards = futures::future::join_all(
            addrs
                .iter()
                .map(|&addr| agent::describe(addr, &caller, timeout)),
        )
        .await;
        let mut agents = self.lock_agents();
        for ((status, card), &addr) in agents.iter_mut().zip(cards).zip(&addrs) {
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
                .zip(&self.agent_addrs())
                .map(|(status, &addr)| status.clone().with_health(self.members.get(addr)))
                .collect(),
            head_model: self.local.as_ref().map(|l| l.config().model_id.clone()),
        }
    }

    fn lock_agents(&self) -> std::sync::MutexGuard<'_, Vec<AgentStatus>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The healthy agents as targets: one per role of an agent that serves several (named
    /// `node/role`, asked with the role's prompt from this head), one per agent otherwise.
    fn targets(&self) -> Vec<Target> {
        let addrs = self.agent_addrs();
        let mut targets = Vec::new();
        for (index, s) in self.lock_agents().iter().enumerate() {
            let alive = addrs.get(index).is_some_and(|&a| self.members.is_alive(a));
            let Some(addr) = s.addr.parse().ok().filter(|_| alive) else {
                continue;
            };
            let name = s.node_id.clone().unwrap_or_else(|| s.addr.clone());
            let roles = s.parsed_roles();
            let target =
                |role: Option<Role>, name: String, role_prompt: Option<String>| Target::Remote {
                    index,
                    addr,
                    name,
                    role,
                    role_prompt,
                    model: s.model.clone().unwrap_or_default(),
                    weight: s.weight,
                    parameters: s.parameters,
                    tokens_per_s: s.tokens_per_s,
                };
            match roles.as_slice() {
                [] => targets.push(target(None, name, None)),
                [role] => targets.push(target(Some(*role), name, None)),
                several => targets.extend(several.iter().map(|&role| {
                    let prompt = self.config.prompts.get(role).to_owned();
                    target(Some(role), format!("{name}/{role}"), Some(prompt))
                })),
            }
        }
        targets
    }

    /// The healthy agent with `role` and the highest weight, other than those at the
    /// address `except` (an agent of several roles is at one address).
    fn best_with_role(&self, role: Role, except: Option<&str>) -> Option<Target> {
        self.targets()
            .into_iter()
            .filter(|t| t.role() == Some(role) && except != Some(t.addr().as_str()))
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
        let answerers = match requested {
            Strategy::Cluster => run.every_member()?,
            _ => run.answerers(query_type)?,
        };
        let timeout = match request.timeout {
            Some(t) => Wait {
                enough: t,
                limit: t,
            },
            None => Wait::for_request(
                self.config.timeouts.for_query(query_type),
                &answerers,
                request.max_tokens,
                // The most answers one agent may owe this request, one after another.
                (self.config.vote_samples)
                    .div_ceil(answerers.len().max(1))
                    .max(self.config.confidence_samples),
            ),
        };
        let sizes: Vec<u64> = answerers.iter().map(Target::parameters).collect();
        let mut strategy = requested.resolve(&sizes);
        let mut merged_instead = None;
        if request.api_request.is_some() && matches!(strategy, Strategy::Moa | Strategy::Speed) {
            merged_instead = Some(strategy);
            strategy = Strategy::Vote;
        }
        let (final_answer, decided_by) = match strategy {
            Strategy::Moa => run.moa(&answerers, timeout).await?,
            Strategy::Vote => run.vote(&answerers, timeout).await?,
            Strategy::Confidence => run.confidence(&answerers, timeout).await?,
            Strategy::Fastest => run.fastest(&answerers, timeout).await?,
            Strategy::Speed => run.speed(&answerers, timeout).await?,
            Strategy::Strongest => run.strongest(&answerers, timeout).await?,
            Strategy::Cluster => run.cluster(&answerers, timeout).await?,
            // `resolve` never returns `Auto`; were it to, `auto`'s fallback is `verify`.
            Strategy::Verify | Strategy::Auto => run.verify(&answerers, timeout).await?,
        };
        let decided_by = match merged_instead {
            Some(s) => format!("{s} cannot merge whole API answers; vote: {decided_by}"),
            None if requested == Strategy::Auto => format!("auto chose {strategy}: {decided_by}"),
            None => decided_by,
        };
        // Every final answer of a run with an API request is one agent's answer as given
        // (no strategy merges them): its response goes back to the client.
        let response = match &request.api_request {
            None => None,
            Some(_) => Some(
                run.answers
                    .iter()
                    .filter(|a| a.text == final_answer)
                    .find_map(|a| a.response.as_deref())
                    .and_then(|r| serde_json::from_str(r).ok())
                    .ok_or_else(|| {
                        SwarmError::NoAnswer(
                            "the chosen answer came without the API's response".to_owned(),
                        )
                    })?,
            ),
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
            response,
        })
    }

    fn mark_unhealthy(&self, index: usize, error: &str) {
        if let Some(&addr) = self.agent_addrs().get(index) {
            self.members.failed(addr, error);
        }
    }
}

impl Swarm {
    /// Sends one job to its target and waits at most `timeout` (the request's limit).
    async fn send(&self, job: Job, timeout: Duration) -> Result<Answer, Failure> {
        // An agent of several roles is told which one it answers as.
        let role_prompt = match &job.target {
            Target::Remote { role_prompt, .. } => role_prompt.clone(),
            Target::Local { .. } => None,
        };
        let ask = Ask {
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            system: job.system.or(role_prompt),
            messages: job.messages,
            max_tokens: job.max_tokens,
            temperature: job.temperature,
            top_p: job.top_p,
            seed: job.seed,
            stop: job.stop,
            choices: job.choices,
            request: job.api_request,
        };
        match job.target {
            Target::Remote { index, addr, .. } => {
                let result = agent::ask(addr, &self.caller(), ask, timeout).await;
                result.map_err(|e| {
                    // An agent that cannot be reached is out until its next good `Describe`.
                    if matches!(
                        e,
                        agent::AgentError::Connect { .. } | agent::AgentError::Disconnected { .. }
                    ) {
                        self.mark_unhealthy(index, &e.to_string());
                    }
                    match e {
                        agent::AgentError::Remote { code, .. } => {
                            Failure::refused(code, e.to_string())
                        }
                        e => Failure::from(e.to_string()),
                    }
                })
            }
            Target::Local { service, .. } => {
                match tokio::time::timeout(timeout, service.answer_here(ask)).await {
                    Ok(result) => {
                        result.map_err(|refused| Failure::refused(refused.code, refused.message))
                    }
                    Err(_) => Err(Failure::from(format!(
                        "the head's own model did not answer within {} ms",
                        timeout.as_millis()
                    ))),
                }
            }
        }
    }
}
