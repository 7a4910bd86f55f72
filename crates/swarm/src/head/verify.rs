//! The `verify` strategy (issue #18): candidates from the answering agents, tests from the
//! critic and fact-checker, every candidate run against every check, the best group of
//! behaviour chosen (`crate::verify`), and the agents of failing candidates asked again,
//! told the check they fail (their code repaired only where it does not run), while the
//! request's time lasts.

use std::time::Duration;

use shoal_wire::ChatTurn;

use crate::roles::Role;
use crate::verify::{
    choose, run_behaviours, runnable, Behaviour, Choice, Language, Task, TESTER_SYSTEM,
};

use super::report::{AgentAnswer, SwarmError};
use super::strategies::{user, Job, Run};
use super::target::Target;
use super::wait::{gathering, Wait};

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
    /// Asked in the repair round (false: one of the first candidates).
    late: bool,
}

impl Run<'_> {
    pub(super) async fn verify(
        &mut self,
        answerers: &[Target],
        wait: Wait,
    ) -> Result<(String, String), SwarmError> {
        let started = tokio::time::Instant::now();
        let Some(mut task) = Task::from_question(&self.question) else {
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
        // Off the runtime: it waits on the interpreter (tens of milliseconds).
        let original = task.clone();
        let (task, unsound) = tokio::task::spawn_blocking(move || {
            let unsound = task.drop_unsound_examples(run_timeout);
            (task, unsound)
        })
        .await
        .unwrap_or((original, 0));

        // First one candidate per agent and the tests, at once; past `enough`, one candidate
        // ends the wait. The first candidate is asked without its agent's role prompt: the
        // model's own answer to the request is always in the pool. When these do not settle
        // the task (`settled`), one repair round follows (`Run::repair_round`).
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
                    late: false,
                });
            }
        }
        if pool.is_empty() {
            return Err(self.no_answer());
        }
        let checks: Vec<String> = task.examples.iter().chain(&tests).cloned().collect();
        run_pool(task.language, &mut pool, &checks, run_timeout).await;
        let mut choice = choose_from(&pool, task.examples.len());

        let round_note = if settled(choice.as_ref(), &task, tests.len()) {
            format!(
                "; the first {} candidates settled it, nothing more asked",
                pool.len()
            )
        } else {
            let remaining = wait.limit.saturating_sub(started.elapsed());
            if remaining < typical_answer_time(&pool) {
                format!(
                    "; no time left for a repair round ({} ms of the request's {} ms)",
                    remaining.as_millis(),
                    wait.limit.as_millis()
                )
            } else {
                // Whole API answers (tool calls, JSON) are not repaired: the rest of the
                // samples instead.
                let trusted = trusted_checks(&pool, choice.as_ref(), &task, tests.len());
                let (jobs, what) = if self.request.api_request.is_none() {
                    let jobs = self.repair_jobs(&pool, &task, &checks, &trusted);
                    let what = round_jobs_named(&jobs);
                    (jobs, what)
                } else {
                    let jobs = self.sample_jobs(answerers, first_samples..samples);
                    (
                        jobs,
                        "more samples (whole API answers are not repaired)".to_owned(),
                    )
                };
                let every_test = every_test_held(choice.as_ref(), &task, tests.len());
                let held_to = held_to(&task, &trusted, every_test);
                if jobs.is_empty() {
                    format!("; no candidate fails {held_to}: nothing to repair")
                } else {
                    let asked = jobs.len();
                    let round = self
                        .repair_round(
                            jobs,
                            remaining,
                            &mut pool,
                            &task,
                            &checks,
                            &trusted,
                            run_timeout,
                        )
                        .await;
                    // Answers with known code join its group too (they carry its
                    // behaviour), so any answer may change the choice.
                    if round.came_back > 0 {
                        choice = choose_from(&pool, task.examples.len());
                    }
                    let ended = match round.passed_all {
                        Some(i) if round.dropped > 0 => format!(
                            "; it ended when the answer of {} passed {held_to} and agreed \
                             with another, {} more no longer awaited",
                            pool[i].answer.agent, round.dropped
                        ),
                        _ => String::new(),
                    };
                    format!(
                        "; repair round asked {what}: {} of {asked} came back, {} with new \
                         code{ended}",
                        round.came_back, round.new_code,
                    )
                }
            }
        };

        let Some(choice) = choice else {
            let (text, how) = self.vote_among(pool.iter()).await;
            return Ok((
                text,
                format!(
                    "verify on `{}`: no candidate's code ran{round_note}; vote: {how}",
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
                    "verify on `{}`: no examples in the prompt{} and no tests written by {}; \
                     vote among the {} candidates whose code runs: {how}",
                    task.entry_point,
                    left_out_note(unsound, ""),
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
        let repaired = match (winner.late, winner.answer.task) {
            (false, _) => "",
            (true, "repair") => " (repaired)",
            (true, "hinted") => " (a sample of the repair round told the check to pass)",
            (true, "resample") => " (a fresh sample of the repair round)",
            (true, _) => " (a sample of the repair round)",
        };
        let writers = if wrote.is_empty() {
            "nobody".to_owned()
        } else {
            wrote.join(", ")
        };
        let decided_by = format!(
            "verify on `{entry}`: {size} of {ran} candidates that ran behave alike ({groups} \
             behaviours); they pass {ex} of {n_ex} of the prompt's examples{left_out} and {t} \
             of {n_t} tests written by {writers}; score {size} × {t}² = {score}{round_note}; \
             answer of {agent}{repaired}",
            score = group.score(),
            entry = task.entry_point,
            size = group.members.len(),
            ran = choice.ran,
            groups = choice.groups,
            ex = group.examples_passed,
            n_ex = task.examples.len(),
            t = group.tests_passed,
            n_t = tests.len(),
            agent = winner.answer.agent,
            left_out = left_out_note(unsound, " more"),
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

    /// Two jobs per agent whose latest candidate fails, both at the sampling temperature: a
    /// fresh sample of the request without its role prompt, and one told what went wrong.
    /// Where the candidate's code fails a check, that is a *hinted* sample: the request again,
    /// with the check it must pass and what the earlier attempt got, but not that attempt's
    /// code. Small models shown their code and asked to repair it mostly give it back
    /// unchanged (Olausson et al., "Is self-repair a silver bullet for code generation?":
    /// resampling matches self-repair for small models at equal cost; on all 164 HumanEval
    /// problems, before hinted samples, a repair gave the chosen answer once in 36 won
    /// rounds, a fresh sample 8 times). Where the code does not run or is missing, the error is about that code, so
    /// the agent gets the conversation, its answer and the error: a repair. The pool gets
    /// both answers, and the checks judge.
    fn repair_jobs(
        &self,
        pool: &[Candidate],
        task: &Task,
        checks: &[String],
        trusted: &[usize],
    ) -> Vec<Job> {
        let mut agents: Vec<String> = Vec::new();
        let mut jobs = Vec::new();
        // Each agent's candidate (an agent asked for several samples is told of its last);
        // an agent whose candidate passes what is trusted is left alone.
        for candidate in pool.iter().rev() {
            let agent = candidate.answer.agent.clone();
            if agents.contains(&agent) {
                continue;
            }
            agents.push(agent);
            let Some(failure) = failure(candidate, task, checks, trusted) else {
                continue;
            };
            let seed = self
                .request
                .seed
                .wrapping_add((100 + 2 * jobs.len()) as u64);
            let temperature = self.swarm.config.sample_temperature;
            let mut fresh = self.answer_job(
                candidate.target.clone(),
                "resample",
                temperature,
                seed.wrapping_add(1),
            );
            fresh.system = Some(String::new());
            fresh.api_request = None;
            let mut job = self.answer_job(candidate.target.clone(), "hinted", temperature, seed);
            job.api_request = None;
            job.task = tell_failure(&mut job.messages, failure, &candidate.answer.text, task);
            jobs.push(job);
            jobs.push(fresh);
        }
        jobs
    }

    /// The repair round: `jobs` together, each answer joining the pool and run as it comes.
    /// The round ends at `limit`, or as soon as an answer passes every trusted check and
    /// another candidate behaves exactly as it does ([`agreed_and_passed`]): the answers
    /// still coming are dropped, which stops their agents' work. The round's answers come
    /// one after another from agents that share the cores; those after such an answer could
    /// only join its group or form a smaller one.
    #[allow(clippy::too_many_arguments)]
    async fn repair_round(
        &mut self,
        jobs: Vec<Job>,
        limit: Duration,
        pool: &mut Vec<Candidate>,
        task: &Task,
        checks: &[String],
        trusted: &[usize],
        run_timeout: Duration,
    ) -> Round {
        let swarm = self.swarm;
        let asked: Vec<(Target, &'static str)> =
            jobs.iter().map(|j| (j.target.clone(), j.task)).collect();
        let sends = jobs.into_iter().map(|job| swarm.send(job, limit)).collect();
        let everyone = Wait {
            enough: limit,
            limit,
        };
        let mut answers = gathering(sends, everyone, |_| true, |_| true);
        let mut round = Round::default();
        while round.passed_all.is_none() {
            let Some((i, result)) = answers.next().await else {
                break;
            };
            let (target, job) = &asked[i];
            let Some(answer) = self.accept(target, job, result) else {
                continue;
            };
            round.came_back += 1;
            let program = task.candidate_program(&answer.text);
            let same = pool.iter().find(|c| c.program == program);
            let mut candidate = Candidate {
                behaviour: same.and_then(|c| c.behaviour.clone()),
                program,
                target: target.clone(),
                answer,
                late: true,
            };
            if same.is_none() && candidate.program.is_some() {
                round.new_code += 1;
                run_pool(
                    task.language,
                    std::slice::from_mut(&mut candidate),
                    checks,
                    run_timeout,
                )
                .await;
            }
            if agreed_and_passed(&candidate, pool, trusted) {
                round.passed_all = Some(pool.len());
            }
            pool.push(candidate);
        }
        let unanswered = answers.unanswered();
        drop(answers);
        let why = if round.passed_all.is_some() {
            "not needed: an answer of the repair round passed every trusted check, and another \
             candidate behaved as it did"
        } else {
            "did not answer in time: the request's limit"
        };
        for i in unanswered {
            let (target, job) = &asked[i];
            self.record_failure(target, job, why.to_owned());
            round.dropped += 1;
        }
        round
    }
}

/// What a repair round got.
#[derive(Default)]
struct Round {
    /// Answers that came back (not empty, not failed).
    came_back: usize,
    /// Those whose code no candidate had.
    new_code: usize,
    /// The pool index of the answer that passed every trusted check and ended the round.
    passed_all: Option<usize>,
    /// Answers no longer awaited when the round ended.
    dropped: usize,
}

/// The checks a candidate is held to (their indices in the checks): the prompt's examples,
/// and the written tests that the chosen group passes (consensus tests). Where the prompt
/// has no examples and the chosen group passes under half of the `tests` written
/// ([`needs_repair`]), no test has the candidates' consensus and every written test is held
/// to: each agent is told the first it fails, and only an answer that passes them all ends
/// the round early. (Held to the tests the group passes, every candidate passed what it was
/// held to and nothing was repaired: HumanEval/38 and /50, `decode_cyclic` and
/// `decode_shift` with their encoders' code copied, failing every written test.)
fn trusted_checks(
    pool: &[Candidate],
    choice: Option<&Choice>,
    task: &Task,
    tests: usize,
) -> Vec<usize> {
    if every_test_held(choice, task, tests) {
        return (0..tests).collect();
    }
    let consensus = choice
        .and_then(|c| pool[c.winner].behaviour.as_ref())
        .map(|b| {
            (task.examples.len()..b.checks.len())
                .filter(|&i| b.checks[i].ok)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    (0..task.examples.len()).chain(consensus).collect()
}

/// Whether every one of the `tests` written is held to ([`trusted_checks`]): the prompt has
/// no examples and the chosen group passes under half of them.
fn every_test_held(choice: Option<&Choice>, task: &Task, tests: usize) -> bool {
    task.examples.is_empty() && needs_repair(choice, task, tests)
}

/// How many of the prompt's examples were left out, for `decided_by` (empty when none).
fn left_out_note(unsound: usize, more: &str) -> String {
    if unsound == 0 {
        return String::new();
    }
    format!(
        " ({unsound}{more} left out: they do not parse, or name what the prompt does not define)"
    )
}

/// What the candidates are held to ([`trusted_checks`]), in words for `decided_by`.
fn held_to(task: &Task, trusted: &[usize], every_test: bool) -> &'static str {
    let examples = task.examples.len();
    if every_test {
        "every written test (the chosen group passes under half)"
    } else if trusted.len() > examples && examples > 0 {
        "every example and every test the chosen group passes"
    } else if trusted.len() > examples {
        "every test the chosen group passes"
    } else {
        "every example"
    }
}

/// Whether `candidate` ends a repair round: it passes every trusted check and another
/// candidate of `pool` behaves exactly as it does. One alone is not enough: with a prompt's
/// one example and a few written tests, a single passing answer is often wrong (on
/// HumanEval/9 the first such fresh sample failed the hidden tests, where the three that
/// would have come and agreed passed).
fn agreed_and_passed(candidate: &Candidate, pool: &[Candidate], trusted: &[usize]) -> bool {
    let Some(behaviour) = candidate.behaviour.as_ref() else {
        return false;
    };
    passes_trusted(Some(behaviour), trusted)
        && pool.iter().any(|c| {
            c.behaviour
                .as_ref()
                .is_some_and(|b| b.signature() == behaviour.signature())
        })
}

/// Whether `behaviour` passes every trusted check (and there is one).
fn passes_trusted(behaviour: Option<&Behaviour>, trusted: &[usize]) -> bool {
    behaviour.is_some_and(|b| {
        b.defined
            && !trusted.is_empty()
            && trusted
                .iter()
                .all(|&i| b.checks.get(i).is_some_and(|c| c.ok))
    })
}

/// `messages` (the request's conversation) told what failed, for the agent whose candidate
/// it is ([`Run::repair_jobs`]); returns the job's task. A failed check makes a hinted
/// sample ([`add_hint`]: the check and what was got, not the code); code that is missing or
/// does not run makes a repair: the candidate's `answer` as the assistant's turn, then the
/// error and the request to fix it.
fn tell_failure(
    messages: &mut Vec<ChatTurn>,
    failure: Failure,
    answer: &str,
    task: &Task,
) -> &'static str {
    match failure {
        Failure::Check { check, got } => {
            add_hint(messages, task.language, &check, &got);
            "hinted"
        }
        Failure::Code(told) => {
            messages.push(ChatTurn {
                role: "assistant".to_owned(),
                content: answer.to_owned(),
            });
            messages.push(user(format!(
                "{told}\nFix the function `{}`. Reply with the complete corrected code in one \
                 ```{} block.",
                task.entry_point,
                task.language.fence()
            )));
            "repair"
        }
    }
}

/// The repair round's jobs in words for `decided_by`: `2 hinted samples, 1 repair and 3
/// fresh samples`.
fn round_jobs_named(jobs: &[Job]) -> String {
    let parts: Vec<String> = [
        ("hinted", "hinted sample", "hinted samples"),
        ("repair", "repair", "repairs"),
        ("resample", "fresh sample", "fresh samples"),
    ]
    .into_iter()
    .filter_map(
        |(task, one, many)| match jobs.iter().filter(|j| j.task == task).count() {
            0 => None,
            1 => Some(format!("1 {one}")),
            n => Some(format!("{n} {many}")),
        },
    )
    .collect();
    match parts.as_slice() {
        [] => "nothing".to_owned(),
        [only] => only.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The request told the check its code must pass, after its last user message: a hinted
/// sample ([`Run::repair_jobs`]). The earlier attempt's code is not shown; what it got is.
fn add_hint(messages: &mut Vec<ChatTurn>, language: Language, check: &str, got: &str) {
    let hint = format!(
        "Your code must pass this check:\n```{}\n{check}\n```\n(An earlier attempt failed it: \
         {got}.)",
        language.fence()
    );
    match messages.iter_mut().rev().find(|m| m.role == "user") {
        Some(last) => {
            last.content.push_str("\n\n");
            last.content.push_str(&hint);
        }
        None => messages.push(user(hint)),
    }
}

/// What is wrong with a candidate ([`failure`]).
#[derive(Debug, PartialEq)]
enum Failure {
    /// Its code is missing or does not run: told to its agent in these words, with its code.
    Code(String),
    /// It fails this trusted check; `got` is the line that says how (`got 3, expected 4`,
    /// or the exception's name and message).
    Check { check: String, got: String },
}

/// What is wrong with `candidate`: its code is missing or does not run, or the first trusted
/// check ([`trusted_checks`]) it fails. `None` when nothing is known to be wrong.
fn failure(
    candidate: &Candidate,
    task: &Task,
    checks: &[String],
    trusted: &[usize],
) -> Option<Failure> {
    let Some(behaviour) = &candidate.behaviour else {
        return candidate.program.is_none().then(|| {
            Failure::Code(format!(
                "Your reply has no definition of `{}` in a ```{} block.",
                task.entry_point,
                task.language.fence()
            ))
        });
    };
    if !behaviour.defined {
        return Some(Failure::Code(format!(
            "Your code does not run:\n```\n{}\n```",
            behaviour.error.trim()
        )));
    }
    let failed = trusted
        .iter()
        .copied()
        .find(|&i| behaviour.checks.get(i).is_some_and(|c| !c.ok))?;
    let result = behaviour.checks.get(failed)?;
    // The line that names the exception: a Python traceback's last, a JavaScript stack's
    // first; the frames are of code the hinted agent does not see.
    let mut lines = result.err.trim().lines();
    let got = match task.language {
        Language::Python => lines.next_back(),
        Language::JavaScript => lines.next(),
    }
    .unwrap_or("")
    .trim();
    Some(Failure::Check {
        check: checks.get(failed)?.clone(),
        got: if got.is_empty() {
            "it did not hold".to_owned()
        } else {
            got.to_owned()
        },
    })
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
            role_prompt: None,
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
            late: false,
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
        let fails = |check: &str, got: &str| Failure::Check {
            check: check.into(),
            got: got.into(),
        };
        // Fails the example: that is what it is told.
        let c = candidate(Some("p"), Some(ran(&[false, true, false])), 1);
        assert_eq!(
            failure(&c, &t, &checks, &[0, 2]),
            Some(fails("assert f(0) == 0", "got 1, expected 2"))
        );
        // Passes the example, fails a consensus test.
        let c = candidate(Some("p"), Some(ran(&[true, true, false])), 1);
        assert_eq!(
            failure(&c, &t, &checks, &[0, 2]),
            Some(fails("assert f(7) == 8", "got 1, expected 2"))
        );
        // A test nobody agreed on is no reason to repair.
        assert_eq!(failure(&c, &t, &checks, &[0, 1]), None);
        // An exception: its last line, not the frames of code the hinted agent won't see.
        let mut raised = ran(&[false]);
        raised.checks[0].err = "Traceback (most recent call last):\n  File \"<candidate>\", \
                                line 3, in f\nZeroDivisionError: division by zero\n"
            .into();
        let c = candidate(Some("p"), Some(raised), 1);
        assert_eq!(
            failure(&c, &t, &checks, &[0]),
            Some(fails(
                "assert f(0) == 0",
                "ZeroDivisionError: division by zero"
            ))
        );
        // A JavaScript stack names the error on its first line; the rest are frames.
        let mut thrown = ran(&[false]);
        thrown.checks[0].err =
            "TypeError: s.split is not a function\n    at f (check.js:3:9)\n    \
                                at Script.runInThisContext (node:vm:129:12)"
                .into();
        let c = candidate(Some("p"), Some(thrown), 1);
        let js = Task {
            language: Language::JavaScript,
            ..task(1)
        };
        assert_eq!(
            failure(&c, &js, &checks, &[0]),
            Some(fails(
                "assert f(0) == 0",
                "TypeError: s.split is not a function"
            ))
        );
        // Code that does not run; a reply without the function: told with the code.
        let broken = Behaviour {
            defined: false,
            error: "SyntaxError: invalid syntax".into(),
            checks: Vec::new(),
        };
        let c = candidate(Some("p"), Some(broken), 1);
        let Some(Failure::Code(told)) = failure(&c, &t, &checks, &[]) else {
            panic!("code that does not run is a repair");
        };
        assert!(told.contains("SyntaxError"), "{told}");
        let c = candidate(None, None, 1);
        let Some(Failure::Code(told)) = failure(&c, &t, &checks, &[]) else {
            panic!("a missing function is a repair");
        };
        assert!(
            told.contains("no definition of `f` in a ```python block"),
            "{told}"
        );
    }

    fn turn(role: &str, content: &str) -> ChatTurn {
        ChatTurn {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn a_failed_check_is_hinted_without_the_code_and_code_that_does_not_run_repaired() {
        let conversation = vec![
            turn("system", "Be brief."),
            turn("user", "Write f."),
            turn("assistant", "What should f do?"),
            turn("user", "Complete this Python function: def f(x): ..."),
        ];
        let answer = "```python\ndef f(x):\n    return x - 1\n```";
        let t = task(1);
        // A failed check: the last user turn gets the hint; nothing else changes, and the
        // earlier answer's code is nowhere in the conversation.
        let mut messages = conversation.clone();
        let check = Failure::Check {
            check: "assert f(3) == 4".into(),
            got: "got 2, expected 4".into(),
        };
        assert_eq!(tell_failure(&mut messages, check, answer, &t), "hinted");
        assert_eq!(messages.len(), 4);
        assert_eq!(messages[..3], conversation[..3]);
        assert_eq!(
            messages[3].content,
            "Complete this Python function: def f(x): ...\n\nYour code must pass this \
             check:\n```python\nassert f(3) == 4\n```\n(An earlier attempt failed it: got 2, \
             expected 4.)"
        );
        assert!(messages.iter().all(|m| !m.content.contains("x - 1")));
        // Code that does not run: a repair, the answer then the error after the conversation.
        let mut messages = conversation.clone();
        let broken = Failure::Code("Your code does not run:\nSyntaxError".into());
        assert_eq!(tell_failure(&mut messages, broken, answer, &t), "repair");
        assert_eq!(messages[..4], conversation[..]);
        assert_eq!(messages[4], turn("assistant", answer));
        assert_eq!(messages[5].role, "user");
        assert!(
            messages[5].content.starts_with(
                "Your code does not run:\nSyntaxError\nFix the \
                                              function `f`."
            ),
            "{}",
            messages[5].content
        );
    }

    #[test]
    fn the_round_says_what_it_asked() {
        let job = |task: &'static str| Job {
            target: target("a", None),
            task,
            system: None,
            messages: Vec::new(),
            max_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            choices: Vec::new(),
            api_request: None,
        };
        let named = |tasks: &[&'static str]| {
            round_jobs_named(&tasks.iter().map(|&t| job(t)).collect::<Vec<_>>())
        };
        assert_eq!(
            named(&["hinted", "resample", "repair", "resample", "hinted", "resample"]),
            "2 hinted samples, 1 repair and 3 fresh samples"
        );
        assert_eq!(
            named(&["hinted", "resample"]),
            "1 hinted sample and 1 fresh sample"
        );
        assert_eq!(named(&["repair"]), "1 repair");
        assert_eq!(named(&[]), "nothing");
    }

    #[test]
    fn a_conversation_without_a_user_message_gets_the_hint_as_one() {
        let mut alone = vec![turn("system", "s")];
        add_hint(
            &mut alone,
            Language::Python,
            "assert f(1) == 1",
            "it did not hold",
        );
        assert_eq!(alone.len(), 2);
        assert_eq!(alone[1].role, "user");
        assert!(alone[1]
            .content
            .starts_with("Your code must pass this check:"));
    }

    #[test]
    fn trusted_checks_are_the_examples_and_the_tests_the_chosen_group_passes() {
        let t = task(1);
        let pool = [
            candidate(Some("a"), Some(ran(&[true, true, false])), 1),
            candidate(Some("b"), Some(ran(&[true, true, false])), 1),
            candidate(Some("c"), Some(ran(&[false, false, true])), 1),
        ];
        let choice = choose_from(&pool, 1);
        let trusted = trusted_checks(&pool, choice.as_ref(), &t, 2);
        assert_eq!(trusted, [0, 1]);
        assert_eq!(trusted_checks(&pool, None, &t, 2), [0]);
        // No examples: the tests the chosen group passes, when it passes half or more;
        // otherwise every test (none has the candidates' consensus).
        let untold = task(0);
        let untold_pool = [
            candidate(Some("a"), Some(ran(&[true, true, false])), 1),
            candidate(Some("b"), Some(ran(&[true, true, false])), 1),
            candidate(Some("c"), Some(ran(&[false, false, true])), 1),
        ];
        let choice = choose_from(&untold_pool, 0);
        assert_eq!(
            trusted_checks(&untold_pool, choice.as_ref(), &untold, 3),
            [0, 1]
        );
        let untold_pool = [
            candidate(Some("a"), Some(ran(&[true, false, false])), 1),
            candidate(Some("b"), Some(ran(&[true, false, false])), 1),
            candidate(Some("c"), Some(ran(&[false, false, true])), 1),
        ];
        let choice = choose_from(&untold_pool, 0);
        assert_eq!(choice.as_ref().unwrap().group.tests_passed, 1);
        assert_eq!(
            trusted_checks(&untold_pool, choice.as_ref(), &untold, 3),
            [0, 1, 2]
        );
        assert_eq!(trusted_checks(&untold_pool, None, &untold, 3), [0, 1, 2]);
        // What ends a repair round: every trusted check passed, by code that runs.
        assert!(passes_trusted(Some(&ran(&[true, true, false])), &trusted));
        assert!(!passes_trusted(Some(&ran(&[true, false, true])), &trusted));
        assert!(!passes_trusted(None, &trusted));
        let broken = Behaviour {
            defined: false,
            ..Behaviour::default()
        };
        assert!(!passes_trusted(Some(&broken), &trusted));
        // Nothing trusted: nothing can say a candidate is right.
        assert!(!passes_trusted(Some(&ran(&[true, true, true])), &[]));
        // A repair round ends on a passing answer only when another candidate agrees.
        let passing = candidate(Some("d"), Some(ran(&[true, true, false])), 1);
        assert!(agreed_and_passed(&passing, &pool, &trusted));
        let alone = candidate(Some("e"), Some(ran(&[true, true, true])), 1);
        assert!(!agreed_and_passed(&alone, &pool, &trusted));
        let with_it = [candidate(Some("f"), Some(ran(&[true, true, true])), 1)];
        assert!(agreed_and_passed(&alone, &with_it, &trusted));
        let failing = candidate(Some("g"), Some(ran(&[false, false, true])), 1);
        assert!(!agreed_and_passed(&failing, &pool, &trusted));
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
