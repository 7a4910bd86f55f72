//! Agent roles and their system prompts (issue #5, item 1).
//!
//! A swarm agent runs a whole model with one [`Role`]; the role decides its system prompt.
//! The default prompts live in one table, [`DEFAULT_PROMPTS`], and [`RolePrompts`] layers
//! per-role overrides from the config file on top of it.
//!
//! The head also builds three prompts of its own here: the aggregator's synthesis prompt
//! ([`aggregator_prompt`]), the reasoner's check of a draft in `speed` mode
//! ([`correction_prompt`]) and the spotter's classification prompt ([`spotter_prompt`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::classify::QueryType;

/// The role of a swarm agent: what its system prompt asks the model to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Careful step-by-step reasoning.
    Reasoner,
    /// Clear, well-organised prose.
    Writer,
    /// The shortest correct answer.
    Concise,
    /// Finds flaws and gives a corrected answer.
    Critic,
    /// Verifies claims and gives a corrected answer.
    Factchecker,
    /// A fast first draft (the `speed` strategy's drafter).
    Drafter,
    /// Classifies the query into one label; never answers it.
    Spotter,
    /// Synthesizes one answer from the candidates; never answers the query directly.
    Aggregator,
}

impl Role {
    /// Every role, in the order of [`DEFAULT_PROMPTS`].
    pub const ALL: [Role; 8] = [
        Role::Reasoner,
        Role::Writer,
        Role::Concise,
        Role::Critic,
        Role::Factchecker,
        Role::Drafter,
        Role::Spotter,
        Role::Aggregator,
    ];

    /// The role's lowercase name, as used on the command line, in config and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reasoner => "reasoner",
            Role::Writer => "writer",
            Role::Concise => "concise",
            Role::Critic => "critic",
            Role::Factchecker => "factchecker",
            Role::Drafter => "drafter",
            Role::Spotter => "spotter",
            Role::Aggregator => "aggregator",
        }
    }

    /// Whether agents with this role answer user queries. The spotter only classifies and the
    /// aggregator only combines other answers, so neither is fanned out to.
    pub fn answers_queries(self) -> bool {
        !matches!(self, Role::Spotter | Role::Aggregator)
    }

    /// Index into [`Role::ALL`] and [`DEFAULT_PROMPTS`].
    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown role {given:?}; valid roles: reasoner, writer, concise, critic, factchecker, \
     drafter, spotter, aggregator"
)]
pub struct UnknownRole {
    /// The name as given.
    pub given: String,
}

impl FromStr for Role {
    type Err = UnknownRole;

    /// Case-insensitive; `fact-checker` and `fact_checker` are accepted for `factchecker`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name: String = s
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect();
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == name)
            .ok_or_else(|| UnknownRole {
                given: s.to_string(),
            })
    }
}

/// The roles of one agent, as a card or a command line lists them: names separated by
/// commas (`"reasoner,critic"`), each once. An agent with several roles answers as each of
/// them, one model serving them all: its head sends each role's prompt with its request.
/// Empty text is no role (a plain worker).
pub fn parse_roles(text: &str) -> Result<Vec<Role>, UnknownRole> {
    let mut roles = Vec::new();
    for name in text.split(',').filter(|n| !n.trim().is_empty()) {
        let role: Role = name.parse()?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    Ok(roles)
}

/// `roles` as [`parse_roles`] reads them.
pub fn roles_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

impl<'de> Deserialize<'de> for Role {
    /// From the same names [`FromStr`] accepts, so config files are as lenient as the CLI.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// The default system prompt of each role, indexed like [`Role::ALL`] (REVIVE-style: each
/// role pulls the same model toward a different kind of answer).
pub const DEFAULT_PROMPTS: [(Role, &str); 8] = [
    (
        Role::Reasoner,
        "You are a careful reasoner. Think through the problem step by step, check each step, \
         and finish with a clearly stated final answer. When the task asks for code, give \
         complete, working code in a single fenced code block.",
    ),
    (
        Role::Writer,
        "You are a skilled writer. Answer in clear, well-organised prose that is accurate and \
         easy to follow. When the task asks for code, give complete, working code in a single \
         fenced code block.",
    ),
    (
        Role::Concise,
        "You give the shortest correct answer. Answer directly, without preamble or \
         explanation unless it is asked for.",
    ),
    (
        Role::Critic,
        "You are a critic. Look for flaws, mistakes and missing cases in the obvious answer to \
         the question, then give a corrected final answer. When the task asks for code, give \
         the corrected, complete code in a single fenced code block.",
    ),
    (
        Role::Factchecker,
        "You are a fact-checker. Verify every claim and every step needed to answer the \
         question, point out anything wrong, and give the corrected final answer. When the \
         task asks for code, check it against the examples and give complete, working code \
         in a single fenced code block.",
    ),
    (
        Role::Drafter,
        "You write a fast first draft. Answer quickly and directly; a later step will check \
         your answer.",
    ),
    (
        Role::Spotter,
        "You are a classifier. Read the user's query and answer with exactly one label from: \
         SIMPLE_FACT, COMPLEX_REASONING, CREATIVE, CODE, MATH, OPINION. Output only the label.",
    ),
    (
        Role::Aggregator,
        "You synthesize the best single answer from several candidate answers to the same \
         question. Keep what is correct, fix what is wrong, and output only the final answer.",
    ),
];

/// The system prompts of all roles: the defaults of [`DEFAULT_PROMPTS`] with overrides (from
/// the config file) on top.
#[derive(Clone, Debug, Default)]
pub struct RolePrompts {
    /// `Some(text)` replaces the default prompt of the role at that index of [`Role::ALL`].
    overrides: [Option<String>; 8],
}

impl RolePrompts {
    /// The default prompts with no overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the prompt of `role` with `text`.
    pub fn with_override(mut self, role: Role, text: impl Into<String>) -> Self {
        self.set_override(role, text);
        self
    }

    /// Replaces the prompt of `role` with `text`, in place.
    pub fn set_override(&mut self, role: Role, text: impl Into<String>) {
        self.overrides[role.index()] = Some(text.into());
    }

    /// The system prompt of `role`: its override if one was set, else the default.
    pub fn get(&self, role: Role) -> &str {
        match &self.overrides[role.index()] {
            Some(text) => text,
            None => DEFAULT_PROMPTS[role.index()].1,
        }
    }
}

/// Whether the question asks for code, so the prompts built from it ask to keep the code in
/// one fenced block (the eval extracts the first block).
fn asks_for_code(question: &str) -> bool {
    QueryType::Code == crate::classify::classify_keywords(question)
}

/// The user prompt for the aggregator: the question, the candidate answers numbered with
/// their labels (e.g. `reasoner (qwen2.5-coder-0.5b)`), and the request for one final answer.
pub fn aggregator_prompt(question: &str, answers: &[(String, String)]) -> String {
    let mut prompt = String::with_capacity(
        question.len()
            + answers
                .iter()
                .map(|(l, a)| l.len() + a.len() + 32)
                .sum::<usize>()
            + 512,
    );
    prompt.push_str("Question:\n");
    prompt.push_str(question.trim());
    prompt.push_str("\n\nCandidate answers from other assistants:\n");
    for (number, (label, answer)) in answers.iter().enumerate() {
        prompt.push_str(&format!(
            "\n[{}] {}:\n{}\n",
            number + 1,
            label,
            answer.trim()
        ));
    }
    prompt.push_str(
        "\nSome candidates may be wrong. Compare them, keep what is correct, fix what is wrong, \
         and write the single best final answer to the question. Do not mention the \
         candidates.",
    );
    if asks_for_code(question) {
        prompt.push_str(" Give the complete code in a single fenced code block.");
    }
    prompt
}

/// The user prompt for `speed` mode: the reasoner checks the drafter's answer and outputs
/// only the corrected final answer.
pub fn correction_prompt(question: &str, draft: &str) -> String {
    let mut prompt = format!(
        "Question:\n{}\n\nDraft answer:\n{}\n\nCheck the draft for mistakes. Output only the \
         corrected final answer (the draft itself if it is already correct), without \
         commentary.",
        question.trim(),
        draft.trim()
    );
    if asks_for_code(question) {
        prompt.push_str(" Give the complete code in a single fenced code block.");
    }
    prompt
}

/// The user prompt for the spotter: classify the query into exactly one of the six labels.
pub fn spotter_prompt(question: &str) -> String {
    let labels: Vec<&str> = QueryType::ALL.iter().map(|q| q.as_str()).collect();
    format!(
        "Classify the following query. Answer with exactly one of these labels and nothing \
         else: {}.\n\nQuery:\n{}\n\nLabel:",
        labels.join(", "),
        question.trim()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn names_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(role.to_string(), role.as_str());
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
    }

    #[test]
    fn parse_is_lenient_about_case_and_fact_checker_spelling() {
        assert_eq!("REASONER".parse::<Role>().unwrap(), Role::Reasoner);
        assert_eq!(" Writer ".parse::<Role>().unwrap(), Role::Writer);
        for name in ["fact-checker", "fact_checker", "FactChecker", "factchecker"] {
            assert_eq!(name.parse::<Role>().unwrap(), Role::Factchecker, "{name}");
            let json = format!("\"{name}\"");
            assert_eq!(
                serde_json::from_str::<Role>(&json).unwrap(),
                Role::Factchecker
            );
        }
    }

    #[test]
    fn parse_error_lists_valid_roles() {
        let error = "poet".parse::<Role>().unwrap_err();
        let message = error.to_string();
        assert!(message.contains("poet"));
        for role in Role::ALL {
            assert!(message.contains(role.as_str()), "{message}");
        }
    }

    #[test]
    fn table_is_indexed_like_all() {
        for (index, role) in Role::ALL.into_iter().enumerate() {
            assert_eq!(DEFAULT_PROMPTS[index].0, role);
            assert_eq!(role.index(), index);
            assert!(!DEFAULT_PROMPTS[index].1.is_empty());
        }
    }

    #[test]
    fn only_spotter_and_aggregator_do_not_answer() {
        let silent: Vec<Role> = Role::ALL
            .into_iter()
            .filter(|r| !r.answers_queries())
            .collect();
        assert_eq!(silent, vec![Role::Spotter, Role::Aggregator]);
    }

    #[test]
    fn overrides_replace_only_their_role() {
        let prompts = RolePrompts::new().with_override(Role::Critic, "Be harsh.");
        assert_eq!(prompts.get(Role::Critic), "Be harsh.");
        assert_eq!(prompts.get(Role::Reasoner), DEFAULT_PROMPTS[0].1);
        assert!(prompts.get(Role::Spotter).contains("SIMPLE_FACT"));
    }

    #[test]
    fn aggregator_prompt_numbers_candidates() {
        let answers = vec![
            (
                "reasoner (qwen2.5-coder-0.5b)".to_string(),
                "Paris".to_string(),
            ),
            ("critic (smollm2-135m)".to_string(), " Lyon \n".to_string()),
        ];
        let prompt = aggregator_prompt("What is the capital of France?", &answers);
        assert!(prompt.contains("What is the capital of France?"));
        assert!(prompt.contains("[1] reasoner (qwen2.5-coder-0.5b):\nParis"));
        assert!(prompt.contains("[2] critic (smollm2-135m):\nLyon"));
        assert!(!prompt.contains("fenced code block"));
    }

    #[test]
    fn code_questions_ask_for_one_fenced_block() {
        let question =
            "def add(a, b):\n    \"\"\"Return a + b.\n    >>> add(1, 2)\n    3\n    \"\"\"\n";
        let answers = vec![(
            "reasoner".to_string(),
            "```python\nreturn a+b\n```".to_string(),
        )];
        assert!(aggregator_prompt(question, &answers).contains("single fenced code block"));
        assert!(correction_prompt(question, "return a+b").contains("single fenced code block"));
    }

    #[test]
    fn correction_prompt_contains_question_and_draft() {
        let prompt = correction_prompt("What is 2+2?", "5");
        assert!(prompt.contains("What is 2+2?"));
        assert!(prompt.contains("Draft answer:\n5"));
        assert!(prompt.contains("corrected final answer"));
    }

    #[test]
    fn spotter_prompt_lists_all_labels() {
        let prompt = spotter_prompt("Write a poem about the sea");
        for q in QueryType::ALL {
            assert!(prompt.contains(q.as_str()));
        }
        assert!(prompt.contains("Write a poem about the sea"));
    }
}
