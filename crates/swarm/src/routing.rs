//! Routing: which roles answer which query type, the timeout per type, the combining
//! strategies, and the choice of agents for a query (issue #5, items 3 and 4).
//!
//! The routing table is REVIVE's ([`roles_for`]). [`pick`] turns it into a list of agents:
//! those whose role the table names, or, when no agent has such a role, every agent that
//! answers queries at all (plain workers and the other answering roles), best weight first.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::classify::QueryType;
use crate::roles::Role;

/// The roles that answer a query of type `q`, most important first (REVIVE's table).
///
/// Spotter and aggregator never appear: they classify and combine, they do not answer.
pub fn roles_for(q: QueryType) -> &'static [Role] {
    match q {
        QueryType::SimpleFact => &[Role::Concise, Role::Factchecker],
        QueryType::ComplexReasoning => &[Role::Reasoner, Role::Critic, Role::Writer],
        QueryType::Creative => &[Role::Writer, Role::Critic],
        QueryType::Code => &[Role::Reasoner, Role::Factchecker, Role::Critic],
        QueryType::Math => &[Role::Reasoner, Role::Factchecker, Role::Critic],
        QueryType::Opinion => &[Role::Writer, Role::Reasoner, Role::Critic],
    }
}

/// How long the head waits for agents' answers, by query type (configurable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// For [`QueryType::SimpleFact`].
    pub simple: Duration,
    /// For every other query type.
    pub complex: Duration,
}

impl Default for Timeouts {
    /// 6 s for simple facts, 12 s for the rest (issue #5).
    fn default() -> Self {
        Timeouts {
            simple: Duration::from_secs(6),
            complex: Duration::from_secs(12),
        }
    }
}

impl Timeouts {
    /// The timeout for a query of type `q`.
    pub fn for_query(&self, q: QueryType) -> Duration {
        match q {
            QueryType::SimpleFact => self.simple,
            _ => self.complex,
        }
    }
}

/// How the head combines the agents' answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Mixture of agents: fan out, then an aggregator synthesizes one answer.
    Moa,
    /// N samples, majority over extracted final answers or a similarity vote.
    Vote,
    /// Each model samples k times; the model whose samples agree most wins.
    Confidence,
    /// The first answer that arrives.
    Fastest,
    /// A drafter answers; the highest-weight reasoner checks and corrects the draft.
    Speed,
    /// The agent with the largest model answers alone (the next largest if it fails).
    Strongest,
    /// Cross-swarm vote (Local Swarm's federation): every member that answers queries —
    /// whatever the query type's roles, the head's own model too — answers once, and they
    /// vote. Any node can head it.
    Cluster,
    /// Code chosen by running it (issue #18): the agents write candidates, the critic and
    /// fact-checker write tests, candidates are grouped by behaviour and scored by the
    /// prompt's examples and dual agreement with the tests; the agents of failing candidates
    /// answer again, told the check to pass (`crate::verify`). Not code, or no sandbox:
    /// `vote`.
    Verify,
    /// The default: `strongest` when one agent's model is far larger than every other's,
    /// else `vote` — what measured best for each kind of swarm (docs/EVAL.md); see
    /// [`Strategy::resolve`].
    Auto,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 9] = [
        Strategy::Moa,
        Strategy::Vote,
        Strategy::Confidence,
        Strategy::Fastest,
        Strategy::Speed,
        Strategy::Strongest,
        Strategy::Cluster,
        Strategy::Verify,
        Strategy::Auto,
    ];

    /// The lowercase name, as in `"model": "swarm:NAME"`, on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Moa => "moa",
            Strategy::Vote => "vote",
            Strategy::Confidence => "confidence",
            Strategy::Fastest => "fastest",
            Strategy::Speed => "speed",
            Strategy::Strongest => "strongest",
            Strategy::Cluster => "cluster",
            Strategy::Verify => "verify",
            Strategy::Auto => "auto",
        }
    }

    /// What `auto` becomes for agents whose models have `parameters` (one entry per agent
    /// that would answer): `strongest` when there are two or more and the largest model has
    /// at least [`STRONGEST_FACTOR`] times the parameters of every other, else `verify`
    /// (which is `vote` for questions with no code to run). Any other strategy is itself.
    ///
    /// Why: on all 164 HumanEval problems (docs/EVAL.md) three Qwen2.5-Coder-0.5B agents
    /// passed 117 and 115 with `verify` (two runs) and 106 with `vote`, against 96 for the
    /// 0.5B alone and 117 for the 1.5B alone; while on the first 40 a 1.5B among two 0.5Bs was outvoted and did
    /// worse than the 1.5B alone (33/40 against 34/40). When any size is unknown (0) there
    /// is nothing to judge by: `verify`.
    pub fn resolve(self, parameters: &[u64]) -> Strategy {
        if self != Strategy::Auto {
            return self;
        }
        let Some((largest_at, &largest)) = parameters.iter().enumerate().max_by_key(|(_, p)| **p)
        else {
            return Strategy::Verify;
        };
        let dominates = parameters.len() >= 2
            && parameters.iter().all(|&p| p > 0)
            && parameters
                .iter()
                .enumerate()
                .all(|(i, &p)| i == largest_at || largest >= p.saturating_mul(STRONGEST_FACTOR));
        if dominates {
            Strategy::Strongest
        } else {
            Strategy::Verify
        }
    }
}

/// How many times the parameters of every other agent's model the largest must have for
/// `auto` to ask it alone (swarm B of docs/EVAL.md: a 1.5B among 0.5Bs, about 3×).
pub const STRONGEST_FACTOR: u64 = 2;

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A strategy name that is not one of [`Strategy::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown swarm strategy {given:?}; valid strategies: moa, vote, confidence, fastest, speed, strongest, cluster, verify, auto"
)]
pub struct UnknownStrategy {
    /// The name as given.
    pub given: String,
}

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    /// Case-insensitive, surrounding whitespace ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownStrategy {
                given: s.to_string(),
            })
    }
}

impl<'de> Deserialize<'de> for Strategy {
    /// From the same names [`FromStr`] accepts, so config files are as lenient as the CLI.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads the `model` field of a request:
///
/// - `Ok(None)`: not a swarm model (anything other than `swarm` or `swarm:…`, e.g. a model
///   name like `swarm-7b`); serve it as a normal model.
/// - `Ok(Some(None))`: `swarm`; run the swarm with the default strategy.
/// - `Ok(Some(Some(strategy)))`: `swarm:moa`, `swarm:vote`, …
/// - `Err`: `swarm:` followed by an unknown strategy; a client error, reported as such
///   rather than silently falling back.
///
/// `swarm` is matched case-insensitively, as are strategy names.
pub fn parse_swarm_model(model: &str) -> Result<Option<Option<Strategy>>, UnknownStrategy> {
    let model = model.trim();
    let Some(prefix) = model.get(..5) else {
        return Ok(None);
    };
    if !prefix.eq_ignore_ascii_case("swarm") {
        return Ok(None);
    }
    let rest = &model[5..];
    if rest.is_empty() {
        return Ok(Some(None));
    }
    match rest.strip_prefix(':') {
        Some(strategy) => strategy.parse().map(|s| Some(Some(s))),
        None => Ok(None),
    }
}

/// An agent as [`pick`] sees it: its role (`None` for a plain worker) and its weight
/// ([`crate::weight::agent_weight`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// The agent's role; `None` for a plain worker.
    pub role: Option<Role>,
    /// The agent's weight; higher is better. Non-finite weights count as 0.
    pub weight: f32,
}

/// The agents (indices into `agents`) that answer a query of type `q`, best weight first,
/// ties by index.
///
/// Those whose role [`roles_for`] names; when no agent has such a role, every agent that
/// answers queries at all: plain workers and the other answering roles. Spotters and
/// aggregators are never picked. Empty only when no agent answers queries.
pub fn pick(q: QueryType, agents: &[Candidate]) -> Vec<usize> {
    let routed = roles_for(q);
    let mut picked: Vec<usize> = (0..agents.len())
        .filter(|&i| agents[i].role.is_some_and(|role| routed.contains(&role)))
        .collect();
    if picked.is_empty() {
        picked = (0..agents.len())
            .filter(|&i| agents[i].role.is_none_or(Role::answers_queries))
            .collect();
    }
    let weight = |i: usize| {
        let w = agents[i].weight;
        if w.is_finite() {
            w
        } else {
            0.0
        }
    };
    // Stable sort: equal weights keep index order.
    picked.sort_by(|&a, &b| weight(b).total_cmp(&weight(a)));
    picked
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn agent(role: Option<Role>, weight: f32) -> Candidate {
        Candidate { role, weight }
    }

    #[test]
    fn routing_table_matches_the_issue() {
        assert_eq!(
            roles_for(QueryType::Code),
            &[Role::Reasoner, Role::Factchecker, Role::Critic]
        );
        assert_eq!(
            roles_for(QueryType::SimpleFact),
            &[Role::Concise, Role::Factchecker]
        );
        for q in QueryType::ALL {
            assert!(!roles_for(q).is_empty());
            assert!(roles_for(q).iter().all(|r| r.answers_queries()), "{q}");
        }
    }

    #[test]
    fn timeouts_by_type() {
        let timeouts = Timeouts::default();
        assert_eq!(
            timeouts.for_query(QueryType::SimpleFact),
            Duration::from_secs(6)
        );
        for q in QueryType::ALL
            .into_iter()
            .filter(|q| *q != QueryType::SimpleFact)
        {
            assert_eq!(timeouts.for_query(q), Duration::from_secs(12), "{q}");
        }
        let custom = Timeouts {
            simple: Duration::from_secs(1),
            complex: Duration::from_secs(2),
        };
        assert_eq!(custom.for_query(QueryType::Math), Duration::from_secs(2));
    }

    #[test]
    fn strategy_names() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.as_str().parse::<Strategy>().unwrap(), strategy);
            assert_eq!(
                strategy
                    .as_str()
                    .to_uppercase()
                    .parse::<Strategy>()
                    .unwrap(),
                strategy
            );
            let json = serde_json::to_string(&strategy).unwrap();
            assert_eq!(json, format!("\"{strategy}\""));
            assert_eq!(serde_json::from_str::<Strategy>(&json).unwrap(), strategy);
        }
        let error = "best".parse::<Strategy>().unwrap_err().to_string();
        assert!(
            error.contains("best") && error.contains("confidence"),
            "{error}"
        );
        assert!(serde_json::from_str::<Strategy>("\"bogus\"").is_err());
    }

    #[test]
    fn auto_asks_a_far_larger_model_alone_and_votes_otherwise() {
        const B: u64 = 1_000_000_000;
        // About what the agents report for the files of docs/EVAL.md (the Qwen files store
        // their tied output matrix twice).
        let qwen15 = 1_780_000_000;
        let qwen05 = 630_167_424;
        let smol = 134_515_008;
        // Swarm B of docs/EVAL.md: the 1.5B among two 0.5Bs answers alone.
        assert_eq!(
            Strategy::Auto.resolve(&[qwen15, qwen05, qwen05]),
            Strategy::Strongest
        );
        // Swarm A: two 0.5Bs (and a SmolLM2) run their code.
        assert_eq!(
            Strategy::Auto.resolve(&[qwen05, qwen05, smol]),
            Strategy::Verify
        );
        // Just under twice, or a tie at the top: verify.
        assert_eq!(
            Strategy::Auto.resolve(&[2 * B - 1, B, B / 2]),
            Strategy::Verify
        );
        assert_eq!(Strategy::Auto.resolve(&[2 * B, B]), Strategy::Strongest);
        assert_eq!(Strategy::Auto.resolve(&[3 * B, 3 * B, B]), Strategy::Verify);
        // One agent, none, or sizes unknown: verify.
        assert_eq!(Strategy::Auto.resolve(&[qwen15]), Strategy::Verify);
        assert_eq!(Strategy::Auto.resolve(&[]), Strategy::Verify);
        assert_eq!(Strategy::Auto.resolve(&[0, 0]), Strategy::Verify);
        // An unknown size beside known ones: nothing to judge by.
        assert_eq!(Strategy::Auto.resolve(&[0, qwen05]), Strategy::Verify);
        // Other strategies are themselves.
        for s in Strategy::ALL.into_iter().filter(|&s| s != Strategy::Auto) {
            assert_eq!(s.resolve(&[qwen15, qwen05]), s);
        }
    }

    #[test]
    fn swarm_model_names() {
        assert_eq!(parse_swarm_model("swarm"), Ok(Some(None)));
        assert_eq!(parse_swarm_model("Swarm"), Ok(Some(None)));
        assert_eq!(
            parse_swarm_model("swarm:moa"),
            Ok(Some(Some(Strategy::Moa)))
        );
        assert_eq!(
            parse_swarm_model("swarm:VOTE"),
            Ok(Some(Some(Strategy::Vote)))
        );
        assert_eq!(
            parse_swarm_model("swarm:speed"),
            Ok(Some(Some(Strategy::Speed)))
        );
        assert_eq!(parse_swarm_model("qwen2.5-coder-0.5b"), Ok(None));
        assert_eq!(parse_swarm_model("swarm-7b"), Ok(None));
        assert_eq!(parse_swarm_model(""), Ok(None));
        assert_eq!(parse_swarm_model("swa"), Ok(None));
        assert_eq!(parse_swarm_model("ßwarm:moa"), Ok(None));
        assert!(parse_swarm_model("swarm:bogus").is_err());
        assert!(parse_swarm_model("swarm:").is_err());
    }

    #[test]
    fn pick_routed_roles_by_weight() {
        let agents = [
            agent(Some(Role::Writer), 1.0),
            agent(Some(Role::Critic), 0.5),
            agent(Some(Role::Reasoner), 0.9),
            agent(None, 1.0),
            agent(Some(Role::Factchecker), 0.9),
            agent(Some(Role::Aggregator), 1.0),
            agent(Some(Role::Spotter), 1.0),
        ];
        // Reasoner and factchecker tie at 0.9: index order.
        assert_eq!(pick(QueryType::Code, &agents), vec![2, 4, 1]);
        assert_eq!(pick(QueryType::Creative, &agents), vec![0, 1]);
    }

    #[test]
    fn pick_falls_back_to_every_answering_agent() {
        let agents = [
            agent(Some(Role::Spotter), 1.0),
            agent(None, 0.2),
            agent(Some(Role::Drafter), 0.7),
            agent(None, f32::NAN),
            agent(Some(Role::Aggregator), 1.0),
            agent(None, 0.7),
        ];
        assert_eq!(pick(QueryType::Math, &agents), vec![2, 5, 1, 3]);
    }

    #[test]
    fn pick_with_no_answering_agent_is_empty() {
        assert!(pick(QueryType::Code, &[]).is_empty());
        let agents = [
            agent(Some(Role::Spotter), 1.0),
            agent(Some(Role::Aggregator), 1.0),
        ];
        assert!(pick(QueryType::Code, &agents).is_empty());
    }
}
