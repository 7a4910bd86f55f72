//! The `verify` strategy (issue #18): candidates from the answering agents, tests from the
//! critic and fact-checker, every candidate run against every check, the best group of
//! behaviour chosen (`crate::verify`), and failing candidates repaired from their
//! tracebacks while the request's time lasts.

use std::time::Duration;

use shoal_wire::ChatTurn;

use crate::roles::Role;
use crate::verify::{
    choose, run_behaviours, runnable, Behaviour, Choice, Language, Task, TESTER_SYSTEM,
};

use super::report::{AgentAnswer, SwarmError};
use super::strategies::Run;
use super::target::Target;
use super::wait::Wait;

/// Rounds after the first candidates at most. The first also asks for the rest of the
/// samples; each sends every failing agent its failure once. On all 164 HumanEval problems
/// (docs/EVAL.md) a second round won 2 problems for about 30 that went to it, each at up
/// to six answers more: not where the time pays.
const REPAIR_ROUNDS: usize = 1;
/// Tokens a test writer may use: ten asserts fit; small models that loop on one stop.
const TEST_TOKENS: u32 = 320;

/// One candidate answer in the pool.
struct Candidate {
    target: Target,
    answer: AgentAnswer,
    /// The program that runs (the task's code, then the candidate's); `None` when the
    /// reply defines no entry point.
    program: Option<String>,
    behaviour: Option<Behaviour>,
    /// Which repair round wrote it (0: an original answer).
    round: usize,
}

impl Run<'_> {
    pub(super) async fn verify(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let started = tokio::time::Instant::now();
        let Some(task) = Task::from_question(&self.question) else {
            let (text, how) = self.vote(answerers, wait).await?;
            return Ok((
                text,
                format!(
                    "verify: no Python or JavaScript function in the question to run; \
                     vote: {how}"
                ),
            ));
        };
        let run_timeout = match self
            .swarm
            .config
            .code_checks
            .runnable()
            .and_then(|timeout| runnable(task.language).map(|()| timeout))
        {
            Ok(timeout) => timeout,
            Err(why) => {
                let (text, how) = self.vote(answerers, wait).await?;
                let language = task.language.fence();
                return Ok((
                    text,
                    format!("verify: {language} cannot run: {why}; vote: {how}"),
                ));
            }
        };

        // First one candidate per agent and the tests, at once; past `enough`, one candidate
        // ends the wait. The first candidate is asked without its agent's role prompt: the
        // model's own answer to the request is always in the pool. The rest of the samples
        // come only when these do not settle the task (`settled`).
        let samples = self.swarm.config.vote_samples.max(1);
        let first_samples = answerers.len().min(samples);
        let mut jobs = self.sample_jobs(answerers, 0..first_samples);
        if let Some(first) = jobs.first_mut() {
            first.system = Some(String::new());
        }
        let writers = test_writers(answerers);
        for target in &writers {
            let mut job = self.task_job(
                target.clone(),
                "tests",
                Some(TESTER_SYSTEM.to_owned()),
                task.tests_prompt(),
            );
            job.max_tokens = job.max_tokens.min(TEST_TOKENS);
            job.stop = Vec::new();
            jobs.push(job);
        }
        let got = self
            .ask_all_until(jobs, wait, |task| task == "sample")
            .await;
        let mut pool: Vec<Candidate> = Vec::new();
        let mut tests: Vec<String> = Vec::new();
        let mut seen: Vec<String> = task.examples.iter().map(|e| squeeze(e)).collect();
        let mut wrote: Vec<String> = Vec::new();
        for (target, answer) in got {
            if answer.task == "tests" {
                let mut added = 0;
                for test in task.parse_tests(&answer.text) {
                    let key = squeeze(&test);
                    if !seen.contains(&key) {
                        seen.push(key);
                        tests.push(test);
                        added += 1;
                    }
                }
                wrote.push(format!("{} ({added})", answer.agent));
            } else {
                pool.push(Candidate {
                    program: task.candidate_program(&answer.text),
                    target,
                    answer,
                    behaviour: None,
                    round: 0,
                });
            }
        }
        if pool.is_empty() {
            return Err(self.no_answer());
        }
        let checks: Vec<String> = task.examples.iter().chain(&tests).cloned().collect();
        run_pool(task.language, &mut pool, &checks, run_timeout).await;
        let mut choice = choose_from(&pool, task.examples.len());

        let mut repair_note = String::new();
        for round in 1..=REPAIR_ROUNDS {
            let more_samples = if round == 1 {
                first_samples..samples
            } else {
                samples..samples
            };
            let go_on = if round == 1 {
                !settled(choice.as_ref(), &task, tests.len())
            } else {
                needs_repair(choice.as_ref(), &task, tests.len())
            };
            if !go_on {
                if round == 1 && !more_samples.is_empty() {
                    repair_note = format!(
                        "; the first {} candidates settled it, no more asked",
                        pool.len()
                    );
                }
                break;
            }
            let remaining = wait.limit.saturating_sub(started.elapsed());
            if remaining < typical_answer_time(&pool) {
                repair_note = format!(
                    "; no time left for round {round} ({} ms of the request's {} ms)",
                    remaining.as_millis(),
                    wait.limit.as_millis()
                );
                break;
            }
            let repairs = if self.request.api_request.is_none() {
                self.repair_jobs(&pool, choice.as_ref(), &task, &checks, round)
            } else {
                repair_note = "; whole API answers are not repaired".to_owned();
                Vec::new()
            };
            // The fresh samples that come with repairs count among the samples still due.
            let fresh = repairs.iter().filter(|j| j.task == "resample").count();
            let more_samples = more_samples.start..more_samples.end.saturating_sub(fresh);
            let mut jobs = self.sample_jobs(answerers, more_samples);
            let sampled = jobs.len();
            jobs.extend(repairs);
            if jobs.is_empty() {
                break;
            }
            let asked = jobs.len();
            let budget = Wait {
                enough: remaining,
                limit: remaining,
            };
            let got = self.ask_all(jobs, budget).await;
            let first_new = pool.len();
            let mut changed = 0;
            for (target, answer) in got {
                let program = task.candidate_program(&answer.text);
                if program.is_some() && pool.iter().all(|c| c.program != program) {
                    changed += 1;
                }
                pool.push(Candidate {
                    program,
                    target,
                    answer,
                    behaviour: None,
                    round,
                });
            }
            repair_note.push_str(&format!(
                "; round {round}: {} of {asked} answers came back ({sampled} more samples, {} \
                 repairs and fresh samples asked), {changed} with new code",
                pool.len() - first_new,
                asked - sampled,
            ));
            if changed == 0 {
                // The agents gave their code back unchanged: another round would too.
                break;
            }
            run_pool(task.language, &mut pool[first_new..], &checks, run_timeout).await;
            choice = choose_from(&pool, task.examples.len());
        }

        let Some(choice) = choice else {
            let (text, how) = self.vote_among(pool.iter()).await;
            return Ok((
                text,
                format!(
                    "verify on `{}`: no candidate's code ran{repair_note}; vote: {how}",
                    task.entry_point
                ),
            ));
        };
        if checks.is_empty() {
            // Nothing told the candidates apart but whether they run: vote among those that
            // do (their code, by majority).
            let ran = pool
                .iter()
                .filter(|c| c.behaviour.as_ref().is_some_and(|b| b.defined));
            let runs = ran.clone().count();
            let (text, how) = self.vote_among(ran).await;
            return Ok((
                text,
                format!(
                    "verify on `{}`: no examples in the prompt and no tests written by {}; \
                     vote among the {} candidates whose code runs: {how}",
                    task.entry_point,
                    if wrote.is_empty() {
                        "nobody".to_owned()
                    } else {
                        wrote.join(", ")
                    },
                    runs
                ),
            ));
        }
        let winner = &pool[choice.winner];
        let group = &choice.group;
        let repaired = match (winner.round, winner.answer.task) {
            (0, _) => String::new(),
            (round, "repair") => format!(" (repaired in round {round})"),
            (round, "resample") => format!(" (a fresh sample in round {round})"),
            (round, _) => format!(" (a sample of round {round})"),
        };
        let writers = if wrote.is_empty() {
            "nobody".to_owned()
        } else {
            wrote.join(", ")
        };
        let decided_by = format!(
            "verify on `{entry}`: {size} of {ran} candidates that ran behave alike ({groups} \
             behaviours); they pass {ex} of {n_ex} of the prompt's examples and {t} of {n_t} \
             tests written by {writers}; dual agreement {size} × {t}{repair_note}; answer of \
             {agent}{repaired}",
            entry = task.entry_point,
            size = group.members.len(),
            ran = choice.ran,
            groups = choice.groups,
            ex = group.examples_passed,
            n_ex = task.examples.len(),
            t = group.tests_passed,
            n_t = tests.len(),
            agent = winner.answer.agent,
        );
        Ok((winner.answer.text.clone(), decided_by))
    }

    /// The plain vote ([`Run::vote_over`]) among `candidates`' answers: the winner's text and
    /// how it won.
    async fn vote_among(&self, candidates: impl Iterator<Item = &Candidate>) -> (String, String) {
        let texts: Vec<String> = candidates.map(|c| c.answer.text.clone()).collect();
        let (winner, how) = self.vote_over(texts.clone()).await;
        (texts.into_iter().nth(winner).unwrap_or_default(), how)
    }

    /// Two jobs per agent whose latest candidate fails: a repair (the conversation, its
    /// answer, what failed, at the sampling temperature) and a fresh sample of the request
    /// without its role prompt. Small models asked to repair often give their code back
    /// unchanged, where a fresh sample is new code (Olausson et al., "Is self-repair a
    /// silver bullet for code generation?": resampling matches self-repair for small models
    /// at equal cost); the pool gets both, and the checks judge.
    fn repair_jobs(
        &self,
        pool: &[Candidate],
        choice: Option<&Choice>,
        task: &Task,
        checks: &[String],
        round: usize,
    ) -> Vec<super::strategies::Job> {
        let consensus: Vec<usize> = choice
            .and_then(|c| pool[c.winner].behaviour.as_ref())
            .map(|b| {
                (task.examples.len()..b.checks.len())
                    .filter(|&i| b.checks[i].ok)
                    .collect()
            })
            .unwrap_or_default();
        let mut agents: Vec<String> = Vec::new();
        let mut jobs = Vec::new();
        // Each agent's latest own candidate (not a fresh sample): a repaired one is repaired
        // again (not its original), and an agent whose latest passes is left alone.
        for candidate in pool.iter().rev().filter(|c| c.answer.task != "resample") {
            let agent = candidate.answer.agent.clone();
            if agents.contains(&agent) {
                continue;
            }
            agents.push(agent);
            let Some(failure) = failure(candidate, task, checks, &consensus) else {
                continue;
            };
            let seed = self
                .request
                .seed
                .wrapping_add((100 * round + 2 * jobs.len()) as u64);
            let temperature = self.swarm.config.sample_temperature;
            let mut fresh = self.answer_job(
                candidate.target.clone(),
                "resample",
                temperature,
                seed.wrapping_add(1),
            );
            fresh.system = Some(String::new());
            fresh.api_request = None;
            let mut job = self.answer_job(candidate.target.clone(), "repair", temperature, seed);
            job.api_request = None;
            job.messages.push(ChatTurn {
                role: "assistant".to_owned(),
                content: candidate.answer.text.clone(),
            });
            job.messages.push(ChatTurn {
                role: "user".to_owned(),
                content: format!(
                    "{failure}\nFix the function `{}`. Reply with the complete corrected code \
                     in one ```{} block.",
                    task.entry_point,
                    task.language.fence()
                ),
            });
            jobs.push(job);
            jobs.push(fresh);
        }
        jobs
    }
}

/// What is wrong with `candidate`, told the way its agent can act on: its code does not
/// run, or the first example it fails, or the first consensus test (one the chosen group
/// passes) it fails. `None` when nothing is known to be wrong.
fn failure(
    candidate: &Candidate,
    task: &Task,
    checks: &[String],
    consensus: &[usize],
) -> Option<String> {
    let Some(behaviour) = &candidate.behaviour else {
        return candidate.program.is_none().then(|| {
            format!(
                "Your reply has no definition of `{}` in a ```{} block.",
                task.entry_point,
                task.language.fence()
            )
        });
    };
    if !behaviour.defined {
        return Some(format!(
            "Your code does not run:\n```\n{}\n```",
            behaviour.error.trim()
        ));
    }
    let failed = (0..task.examples.len())
        .chain(consensus.iter().copied())
        .find(|&i| behaviour.checks.get(i).is_some_and(|c| !c.ok))?;
    let check = behaviour.checks.get(failed)?;
    Some(format!(
        "Your code fails this check:\n```{}\n{}\n```\n{}",
        task.language.fence(),
        checks.get(failed)?,
        check.err.trim()
    ))
}

/// Whether the first candidates settle the task: at least two ran, all alike (more samples
/// could only join that group or split from it), and their group leaves nothing to repair.
/// On HumanEval, 54 of the 55 problems where every candidate behaved alike passed.
fn settled(choice: Option<&Choice>, task: &Task, tests: usize) -> bool {
    choice.is_some_and(|c| c.ran >= 2 && c.groups == 1) && !needs_repair(choice, task, tests)
}

/// Whether the chosen group leaves something to repair: no candidate's code ran, the group
/// fails one of the prompt's examples, or (where the prompt has none) it passes under half
/// of the written tests.
fn needs_repair(choice: Option<&Choice>, task: &Task, tests: usize) -> bool {
    match choice {
        None => true,
        Some(c) if !task.examples.is_empty() => c.group.examples_passed < task.examples.len(),
        Some(c) => c.group.tests_passed * 2 < tests,
    }
}

/// The critic and fact-checker among `answerers`; when there is neither, up to two of the
/// answerers (best first). One per model: a writer is asked without its role prompt, so two
/// of one model write the same tests (on all 164 HumanEval problems the second of two
/// Qwen2.5-Coder-0.5B writers added none).
fn test_writers(answerers: &[Target]) -> Vec<Target> {
    let mut writers: Vec<Target> = answerers
        .iter()
        .filter(|t| matches!(t.role(), Some(Role::Critic | Role::Factchecker)))
        .cloned()
        .collect();
    if writers.is_empty() {
        writers = answerers.to_vec();
    }
    let mut models: Vec<String> = Vec::new();
    writers.retain(|t| {
        let model = t.model();
        let new = !models.contains(&model);
        models.push(model);
        new
    });
    writers.truncate(2);
    writers
}

/// How long one answer took, the median of the pool's: what a repair round needs at least.
fn typical_answer_time(pool: &[Candidate]) -> Duration {
    let mut times: Vec<u64> = pool.iter().map(|c| c.answer.elapsed_ms).collect();
    times.sort_unstable();
    Duration::from_millis(times.get(times.len() / 2).copied().unwrap_or(0))
}

/// Runs every candidate of `pool` against `checks` (off the runtime: it waits on the
/// interpreter).
async fn run_pool(
    language: Language,
    pool: &mut [Candidate],
    checks: &[String],
    timeout: Duration,
) {
    let programs: Vec<Option<String>> = pool.iter().map(|c| c.program.clone()).collect();
    let checks = checks.to_vec();
    let behaviours =
        tokio::task::spawn_blocking(move || run_behaviours(language, &programs, &checks, timeout))
            .await
            .unwrap_or_default();
    for (candidate, behaviour) in pool.iter_mut().zip(behaviours) {
        candidate.behaviour = behaviour;
    }
}

fn choose_from(pool: &[Candidate], examples: usize) -> Option<Choice> {
    let scored: Vec<(Option<&Behaviour>, f32)> = pool
        .iter()
        .map(|c| (c.behaviour.as_ref(), c.target.weight()))
        .collect();
    choose(&scored, examples)
}

/// `text` without whitespace: tests that differ only in spacing are one.
fn squeeze(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::verify::CheckResult;

    fn target(name: &str, role: Option<Role>) -> Target {
        serving(name, role, "m")
    }

    fn serving(name: &str, role: Option<Role>, model: &str) -> Target {
        Target::Remote {
            index: 0,
            addr: "127.0.0.1:1".parse().unwrap(),
            name: name.into(),
            role,
            model: model.into(),
            weight: 1.0,
            parameters: 0,
            tokens_per_s: 10.0,
        }
    }

    fn candidate(program: Option<&str>, behaviour: Option<Behaviour>, ms: u64) -> Candidate {
        Candidate {
            target: target("a", None),
            answer: AgentAnswer {
                agent: "a".into(),
                addr: "127.0.0.1:1".into(),
                role: "worker".into(),
                model: "m".into(),
                task: "sample",
                text: String::new(),
                elapsed_ms: ms,
                prompt_tokens: 0,
                completion_tokens: 0,
                response: None,
            },
            program: program.map(str::to_owned),
            behaviour,
            round: 0,
        }
    }

    /// A candidate that ran, passing the checks `oks` says (what it returned: 2 where it
    /// passed, 1 where it did not).
    fn ran(oks: &[bool]) -> Behaviour {
        Behaviour {
            defined: true,
            error: String::new(),
            checks: oks
                .iter()
                .map(|&ok| CheckResult {
                    ok,
                    out: if ok { "2" } else { "1" }.into(),
                    err: if ok {
                        String::new()
                    } else {
                        "got 1, expected 2".into()
                    },
                })
                .collect(),
        }
    }

    fn task(examples: usize) -> Task {
        Task {
            language: Language::Python,
            entry_point: "f".into(),
            prompt_code: "def f(x):\n    pass\n".into(),
            examples: (0..examples)
                .map(|i| format!("assert f({i}) == {i}"))
                .collect(),
            told_in_words: None,
        }
    }

    #[test]
    fn a_failure_names_the_first_failing_example_or_consensus_test() {
        let checks: Vec<String> = ["assert f(0) == 0", "assert f(5) == 6", "assert f(7) == 8"]
            .map(str::to_owned)
            .to_vec();
        let t = task(1);
        // Fails the example: that is what it is told.
        let c = candidate(Some("p"), Some(ran(&[false, true, false])), 1);
        let told = failure(&c, &t, &checks, &[2]).unwrap();
        assert!(
            told.contains("assert f(0) == 0") && told.contains("got 1, expected 2"),
            "{told}"
        );
        // Passes the example, fails a consensus test.
        let c = candidate(Some("p"), Some(ran(&[true, true, false])), 1);
        assert!(failure(&c, &t, &checks, &[2])
            .unwrap()
            .contains("assert f(7) == 8"));
        // A test nobody agreed on is no reason to repair.
        assert_eq!(failure(&c, &t, &checks, &[1]), None);
        // Code that does not run; a reply without the function.
        let broken = Behaviour {
            defined: false,
            error: "SyntaxError: invalid syntax".into(),
            checks: Vec::new(),
        };
        let c = candidate(Some("p"), Some(broken), 1);
        assert!(failure(&c, &t, &checks, &[])
            .unwrap()
            .contains("SyntaxError"));
        let c = candidate(None, None, 1);
        assert!(failure(&c, &t, &checks, &[])
            .unwrap()
            .contains("no definition of `f` in a ```python block"));
    }

    #[test]
    fn repairs_are_needed_when_the_best_group_fails_what_is_trusted() {
        let pool = [
            candidate(Some("p"), Some(ran(&[true, false, true])), 1),
            candidate(Some("q"), Some(ran(&[false, true, true])), 1),
        ];
        let choice = choose_from(&pool, 1).unwrap();
        assert_eq!(choice.winner, 0);
        assert!(!needs_repair(Some(&choice), &task(1), 2));
        // With two examples the best group fails one of them.
        let choice = choose_from(&pool, 2).unwrap();
        assert!(needs_repair(Some(&choice), &task(2), 1));
        // No examples: under half the tests passed.
        let choice = choose_from(&pool[..1], 0).unwrap();
        assert!(!needs_repair(Some(&choice), &task(0), 3));
        assert!(needs_repair(Some(&choice), &task(0), 5));
        assert!(needs_repair(None, &task(0), 0));
    }

    #[test]
    fn tests_come_from_the_critic_and_factchecker_else_the_best_two_one_per_model() {
        let names = |answerers: &[Target]| -> Vec<String> {
            test_writers(answerers).iter().map(Target::name).collect()
        };
        let answerers = [
            serving("r", Some(Role::Reasoner), "a"),
            serving("f", Some(Role::Factchecker), "b"),
            serving("c", Some(Role::Critic), "c"),
        ];
        assert_eq!(names(&answerers), ["f", "c"]);
        assert_eq!(names(&answerers[..1]), ["r"]);
        // Without critic or fact-checker: the best two, of two models.
        let plain = [
            serving("x", None, "a"),
            serving("y", None, "a"),
            serving("z", None, "b"),
        ];
        assert_eq!(names(&plain), ["x", "z"]);
        // One writer per model: a second of the same model writes the same tests.
        let same = [
            serving("r", Some(Role::Reasoner), "a"),
            serving("f", Some(Role::Factchecker), "a"),
            serving("c", Some(Role::Critic), "a"),
        ];
        assert_eq!(names(&same), ["f"]);
    }

    #[test]
    fn the_first_candidates_settle_only_when_at_least_two_agree_and_pass() {
        let t = task(1);
        let alike = [
            candidate(Some("p"), Some(ran(&[true, true])), 1),
            candidate(Some("q"), Some(ran(&[true, true])), 1),
        ];
        assert!(settled(choose_from(&alike, 1).as_ref(), &t, 1));
        // One candidate alone is no agreement.
        assert!(!settled(choose_from(&alike[..1], 1).as_ref(), &t, 1));
        // Two behaviours: more samples and repairs may tell them apart.
        let split = [
            candidate(Some("p"), Some(ran(&[true, true])), 1),
            candidate(Some("q"), Some(ran(&[true, false])), 1),
        ];
        assert!(!settled(choose_from(&split, 1).as_ref(), &t, 1));
        // Alike but failing the example: repair.
        let wrong = [
            candidate(Some("p"), Some(ran(&[false, true])), 1),
            candidate(Some("q"), Some(ran(&[false, true])), 1),
        ];
        assert!(!settled(choose_from(&wrong, 1).as_ref(), &t, 1));
        assert!(!settled(None, &t, 1));
    }

    #[test]
    fn a_repair_round_needs_the_time_of_a_typical_answer() {
        let pool = [
            candidate(None, None, 9_000),
            candidate(None, None, 1_000),
            candidate(None, None, 4_000),
        ];
        assert_eq!(typical_answer_time(&pool), Duration::from_secs(4));
        assert_eq!(typical_answer_time(&[]), Duration::ZERO);
    }
}
