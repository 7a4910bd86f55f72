//! `shoal eval`: measured quality. `shoal eval humaneval` (and `shoal eval mbpp`, the same
//! run over MBPP's problems, `crate::mbpp`) asks a running Shoal API (one model, or a swarm
//! strategy) to solve the benchmark's problems, runs each answer with the problem's own
//! tests in the sandbox (timeout, no network) and reports pass@1. `--check-harness` runs
//! the reference solutions instead, with no server: all must pass, which proves the
//! extraction and the execution. See docs/EVAL.md.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{Client, RequestError};
use crate::exec::{Checker, Verdict};
use crate::{client, cluster, extract, mbpp, ResolveModel};
use shoal_sandbox::Isolation;
use shoal_swarm::routing::Strategy as SwarmStrategy;

#[derive(Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    benchmark: Benchmark,
}

#[derive(Subcommand)]
enum Benchmark {
    /// HumanEval's 164 Python problems: pass@1 against a running Shoal API, each answer run
    /// with the problem's tests in the sandbox, with a timeout and no network.
    Humaneval(BenchmarkArgs),
    /// MBPP's 500 test problems (a sentence and one of its three asserts shown; all three
    /// must pass), the same way.
    Mbpp(BenchmarkArgs),
}

/// Which benchmark a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    HumanEval,
    Mbpp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::HumanEval => "humaneval",
            Kind::Mbpp => "mbpp",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::HumanEval => "HumanEval",
            Kind::Mbpp => "MBPP",
        }
    }

    fn default_data_path(self) -> PathBuf {
        match self {
            Kind::HumanEval => default_data_path(),
            Kind::Mbpp => mbpp::default_data_path(),
        }
    }

    fn load(self, path: &Path) -> anyhow::Result<Vec<Case>> {
        match self {
            Kind::HumanEval => Ok(load_problems(path)?.into_iter().map(Case::from).collect()),
            Kind::Mbpp => mbpp::load_cases(path),
        }
    }
}

/// One problem as a run asks and checks it.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub(crate) task_id: String,
    pub(crate) system: &'static str,
    pub(crate) user: String,
    /// The code a reply's code joins ([`extract::build_program`]): HumanEval's prompt (its
    /// imports, helpers and the function's stub); nothing for MBPP.
    pub(crate) prompt: String,
    /// The reference solution, as a reply would give it.
    pub(crate) canonical: String,
    /// The code run after the program that tests it: HumanEval's `check` and
    /// `check(ENTRY_POINT)`; MBPP's asserts.
    pub(crate) test: String,
    pub(crate) entry_point: String,
}

impl From<Problem> for Case {
    fn from(p: Problem) -> Case {
        Case {
            user: user_message(&p.prompt),
            task_id: p.task_id,
            system: SYSTEM_PROMPT,
            prompt: p.prompt,
            canonical: p.canonical_solution,
            test: format!("{}\n\ncheck({})", p.test, p.entry_point),
            entry_point: p.entry_point,
        }
    }
}

/// How the API is asked: one model, or one of the swarm head's strategies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    /// One model: `--model`, or the first of `GET /v1/models`.
    Single,
    /// `"model": "swarm:STRATEGY"`.
    Swarm(SwarmStrategy),
}

impl Strategy {
    fn as_str(self) -> &'static str {
        match self {
            Strategy::Single => "single",
            Strategy::Swarm(s) => s.as_str(),
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("single") {
            return Ok(Strategy::Single);
        }
        s.parse()
            .map(Strategy::Swarm)
            .map_err(|e| format!("{e} (or single)"))
    }
}

#[derive(Args)]
struct BenchmarkArgs {
    /// The Shoal API (`/v1` may be included).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The model id for --strategy single (default: the first of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// `single` (one model), or a swarm strategy sent as `"model": "swarm:STRATEGY"`: moa,
    /// vote, confidence, fastest, speed, strongest, cluster, verify or auto.
    #[arg(long, default_value = "single")]
    strategy: Strategy,
    /// Only this many problems (after --offset).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip this many problems first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy, the pass@1 convention here).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// The seed every request carries. A swarm samples beyond greedy answers even at
    /// `--temperature 0` (`vote`'s extra samples, `verify`'s hinted and fresh samples, at
    /// 0.7) from the request's seed; without one the server draws a new seed per request,
    /// and two runs of one swarm differ by a few problems.
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds each program may run with its tests before it is killed.
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    /// Seconds one API request may take.
    #[arg(long, default_value_t = 600.0)]
    request_timeout_s: f64,
    /// Seconds to wait for the server's model to load (GET /health) before starting.
    #[arg(long, default_value_t = 300.0)]
    wait_s: f64,
    /// Write one JSON line per problem here (the answer, the code run, the verdict, and
    /// the head's swarm report when it gives one).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Run the canonical solutions instead of asking the API (no server needed): proves
    /// the harness, which must pass every problem.
    #[arg(long)]
    check_harness: bool,
    /// The problems, JSON lines, gzipped or not (default: HumanEval.jsonl.gz or
    /// mbpp.jsonl.gz in $SHOAL_MODELS_DIR or ./models).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The Python 3 interpreter that runs the programs.
    #[arg(long, default_value = "python3")]
    python: String,
    /// How programs are isolated: `unshare` (the sandbox: namespaces of their own, no
    /// network, a private read-only root, OS limits), `python-guard` (no sandbox, only a
    /// Python-level guard; for machines without user namespaces), or `auto` (the sandbox
    /// where it works, else the guard with a warning).
    #[arg(long, value_enum, default_value_t = IsolationArg::Auto)]
    isolation: IsolationArg,
    /// Bearer token for the API.
    #[arg(long, env = "SHOAL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Start the swarm to measure instead of using --url: the agents `MODEL[:ROLE]` (a file
    /// or a known model's name; the roles of one model served by one process, as one device
    /// serves them) and a head over them, on 127.0.0.1; all stopped at the end. With
    /// --strategy single: one server for the one MODEL.
    #[arg(long, value_name = "MODEL[:ROLE],…")]
    agents: Option<String>,
    /// With --agents: one process per agent, as if each had a device of its own (on one
    /// machine they then share its cores, each with its own copy of the weights).
    #[arg(long, requires = "agents")]
    process_per_agent: bool,
    /// With --agents: the head's own model (default: the first agent's).
    #[arg(long, requires = "agents")]
    head_model: Option<PathBuf>,
    /// With --agents: leave the head's swarm timeouts at `shoal serve`'s defaults (6 s and
    /// 12 s, after which it stops waiting for more answers) instead of --request-timeout-s.
    #[arg(long, requires = "agents")]
    swarm_defaults: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum IsolationArg {
    Auto,
    Unshare,
    PythonGuard,
}

/// Runs `shoal eval`; `resolve` finds the models `--agents` names.
pub fn run(a: EvalArgs, resolve: ResolveModel<'_>) -> anyhow::Result<ExitCode> {
    match a.benchmark {
        Benchmark::Humaneval(args) => evaluate(Kind::HumanEval, args, resolve),
        Benchmark::Mbpp(args) => evaluate(Kind::Mbpp, args, resolve),
    }
}

/// One HumanEval problem, as in the data file.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Problem {
    pub(crate) task_id: String,
    pub(crate) prompt: String,
    pub(crate) canonical_solution: String,
    pub(crate) test: String,
    pub(crate) entry_point: String,
}

const FETCH_HINT: &str = "fetch it with `scripts/fetch-models.sh humaneval`, or pass --data FILE";

pub(crate) fn default_data_path() -> PathBuf {
    shoal_models::models_dir().join("HumanEval.jsonl.gz")
}

/// The records of a JSON-lines data file, gzipped (`.gz`) or not, each with its line
/// number (from 1); blank lines are skipped. `data` names the data set and `record` one of
/// its records ("a HumanEval problem") in the errors, which end with `fetch_hint`.
pub(crate) fn read_json_lines<T: DeserializeOwned>(
    path: &Path,
    data: &str,
    record: &str,
    fetch_hint: &str,
) -> anyhow::Result<Vec<(usize, T)>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{data} data {} is missing: {fetch_hint}", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut records = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| {
            format!(
                "cannot read {} (a damaged download? {fetch_hint})",
                path.display()
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: T = serde_json::from_str(&line)
            .with_context(|| format!("line {} of {} is not {record}", i + 1, path.display()))?;
        records.push((i + 1, parsed));
    }
    if records.is_empty() {
        bail!("{} holds no problems ({fetch_hint})", path.display());
    }
    Ok(records)
}

/// The problems of a HumanEval JSON-lines file, gzipped (`.gz`) or not.
pub(crate) fn load_problems(path: &Path) -> anyhow::Result<Vec<Problem>> {
    let records: Vec<(usize, Problem)> =
        read_json_lines(path, "HumanEval", "a HumanEval problem", FETCH_HINT)?;
    let mut problems = Vec::with_capacity(records.len());
    for (line, p) in records {
        if p.entry_point.is_empty()
            || !p
                .entry_point
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            bail!(
                "line {line} of {}: entry_point {:?} is not a Python name",
                path.display(),
                p.entry_point
            );
        }
        problems.push(p);
    }
    Ok(problems)
}

pub(crate) const SYSTEM_PROMPT: &str = "You are an expert Python programmer. Complete the Python function the user gives you. Reply with the complete implementation (the imports and the whole function definition) in a single ```python code block, and nothing else.";

/// The user's message of one problem.
pub(crate) fn user_message(prompt: &str) -> String {
    format!(
        "Complete this Python function:\n```python\n{}\n```",
        prompt.trim_end()
    )
}

/// The chat completion request for one problem.
fn request_body(
    model: &str,
    case: &Case,
    max_tokens: usize,
    temperature: f32,
    seed: Option<u64>,
) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": case.system},
            {"role": "user", "content": case.user},
        ],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": false,
    });
    if let Some(seed) = seed {
        body["seed"] = json!(seed);
    }
    body
}

/// What happened to one problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Passed,
    Failed,
    TimedOut,
    /// The API gave no answer (the problem counts as failed).
    RequestError,
}

/// One line of `--out`.
#[derive(Serialize)]
struct Record<'a> {
    task_id: &'a str,
    passed: bool,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    request_s: f64,
    exec_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<u64>,
    /// The model's reply as it came.
    completion: String,
    /// The code taken from it, and whether it defined the entry point.
    code: String,
    full_definition: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "String::is_empty")]
    stderr_tail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    swarm: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agents_responded: Option<Value>,
}

/// The report.
#[derive(Serialize)]
struct Summary {
    benchmark: &'static str,
    /// `canonical` for --check-harness.
    strategy: String,
    /// The `model` sent (`swarm:…` for a swarm); null for --check-harness.
    model: Option<String>,
    url: Option<String>,
    problems: usize,
    offset: usize,
    passed: usize,
    failed: usize,
    timed_out: usize,
    request_errors: usize,
    pass_at_1: f64,
    wall_s: f64,
    mean_s_per_problem: f64,
    mean_request_s: f64,
    mean_exec_s: f64,
    max_tokens: usize,
    temperature: f32,
    /// `None`: each request's seed was the server's choice.
    seed: Option<u64>,
    exec_timeout_s: f64,
    isolation: &'static str,
    data: String,
    /// Task ids that did not pass.
    not_passed: Vec<String>,
}

fn seconds(what: &str, s: f64) -> anyhow::Result<Duration> {
    if s.is_nan() || s <= 0.0 {
        bail!("{what} must be a positive number of seconds");
    }
    Duration::try_from_secs_f64(s).with_context(|| format!("{what}: {s} is not a duration"))
}

/// After this many request errors in a row the run stops: the server is not well.
const MAX_CONSECUTIVE_ERRORS: usize = 3;

fn evaluate(kind: Kind, a: BenchmarkArgs, resolve: ResolveModel<'_>) -> anyhow::Result<ExitCode> {
    let exec_timeout = seconds("--timeout-s", a.timeout_s)?;
    let request_timeout = seconds("--request-timeout-s", a.request_timeout_s)?;
    let wait = seconds("--wait-s", a.wait_s)?;
    if !(0.0..=2.0).contains(&a.temperature) {
        bail!("--temperature must be within 0..=2");
    }
    if a.model.is_some() && a.strategy != Strategy::Single && !a.check_harness {
        bail!(
            "--model is for --strategy single; --strategy {} sends `\"model\": \"swarm:{}\"`",
            a.strategy.as_str(),
            a.strategy.as_str()
        );
    }
    let data = a.data.clone().unwrap_or_else(|| kind.default_data_path());
    let all = kind.load(&data)?;
    if a.offset >= all.len() {
        bail!(
            "--offset {} is past the last of the {} problems",
            a.offset,
            all.len()
        );
    }
    let end = a
        .limit
        .map_or(all.len(), |l| a.offset.saturating_add(l).min(all.len()));
    let problems = &all[a.offset..end];
    if problems.is_empty() {
        bail!("--limit 0: nothing to evaluate");
    }
    let sandbox = match a.isolation {
        IsolationArg::Auto => Checker::with_isolation(&a.python, exec_timeout, Isolation::Unshare)
            .or_else(|e| {
                eprintln!(
                    "warning: {e:#}\n  programs run with --isolation python-guard, which is no \
                     sandbox: only a Python-level guard"
                );
                Checker::with_isolation(&a.python, exec_timeout, Isolation::PythonGuard)
            })?,
        IsolationArg::PythonGuard => {
            Checker::with_isolation(&a.python, exec_timeout, Isolation::PythonGuard)?
        }
        IsolationArg::Unshare => {
            Checker::with_isolation(&a.python, exec_timeout, Isolation::Unshare)?
        }
    };

    // `--agents`: this run starts (and at the end stops) what it measures.
    let cluster = match (&a.agents, a.check_harness) {
        (Some(list), false) => Some(cluster::LocalCluster::start(
            &cluster::parse_agents(list)?,
            a.head_model.as_deref(),
            a.strategy == Strategy::Single,
            a.process_per_agent,
            request_timeout,
            (!a.swarm_defaults).then_some(request_timeout),
            resolve,
        )?),
        _ => None,
    };
    let url = cluster.as_ref().map_or(a.url.clone(), |c| c.url.clone());
    let api = if a.check_harness {
        None
    } else {
        let client = Client::new(&url, a.api_key.clone(), request_timeout);
        client.wait_ready(wait, || {
            eprintln!("waiting for the model at {url} to load…");
        })?;
        let model = match a.strategy {
            Strategy::Single => match &a.model {
                Some(m) => m.clone(),
                None => client.first_model()?,
            },
            Strategy::Swarm(s) => format!("swarm:{s}"),
        };
        Some((client, model))
    };

    let mut out = match &a.out {
        Some(p) => Some(BufWriter::new(
            File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };

    let bar = ProgressBar::new(problems.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{}: 0 passed", kind.as_str()));

    let started = Instant::now();
    let (mut passed, mut failed, mut timed_out, mut request_errors) = (0, 0, 0, 0);
    let (mut request_total, mut exec_total) = (0.0, 0.0);
    let mut consecutive_errors = 0;
    let mut not_passed = Vec::new();
    for p in problems {
        let asked = Instant::now();
        let reply = match &api {
            None => Ok(client::ChatReply {
                content: p.canonical.clone(),
                ..Default::default()
            }),
            Some((client, model)) => {
                client.chat(&request_body(model, p, a.max_tokens, a.temperature, a.seed))
            }
        };
        let request_s = if api.is_some() {
            asked.elapsed().as_secs_f64()
        } else {
            0.0
        };
        request_total += request_s;
        let record = match reply {
            Ok(reply) => {
                consecutive_errors = 0;
                let program = extract::build_program(&p.prompt, &reply.content, &p.entry_point);
                let run = sandbox
                    .run_check(&program.source, &p.test)
                    .with_context(|| format!("running {}", p.task_id))?;
                exec_total += run.seconds;
                let outcome = match run.verdict {
                    Verdict::Passed => Outcome::Passed,
                    Verdict::Failed => Outcome::Failed,
                    Verdict::TimedOut => Outcome::TimedOut,
                };
                Record {
                    task_id: &p.task_id,
                    passed: outcome == Outcome::Passed,
                    outcome,
                    error: None,
                    request_s,
                    exec_s: run.seconds,
                    finish_reason: reply.finish_reason,
                    prompt_tokens: reply.prompt_tokens,
                    completion_tokens: reply.completion_tokens,
                    completion: reply.content,
                    code: program.code,
                    full_definition: program.full_definition,
                    exit_code: run.exit_code,
                    stderr_tail: run.stderr_tail,
                    swarm: reply.swarm,
                    agents_responded: reply.agents_responded,
                }
            }
            Err(e) => {
                let fatal = match &e {
                    RequestError::Unreachable(_) => true,
                    // A request the server refuses (bad model name, bad key) will be
                    // refused every time.
                    RequestError::Status { status, .. } => (400..500).contains(status),
                    RequestError::Timeout(_) | RequestError::Invalid(_) => false,
                };
                consecutive_errors += 1;
                if fatal || consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    bar.abandon();
                    if let Some(w) = out.as_mut() {
                        w.flush()?;
                    }
                    let model = api.as_ref().map(|(_, m)| m.as_str()).unwrap_or("");
                    let hint = match &e {
                        RequestError::Unreachable(_) => {
                            " (is `shoal serve` still running there?)".to_string()
                        }
                        RequestError::Status { status: 401, .. } => {
                            " (pass --api-key or set SHOAL_API_KEY)".to_string()
                        }
                        RequestError::Status { status: 404, .. } => {
                            format!(" (does the server offer model `{model}`?)")
                        }
                        _ => String::new(),
                    };
                    bail!(
                        "{}: POST {}/v1/chat/completions (model `{model}`): {e}{hint}",
                        p.task_id,
                        api.as_ref().map(|(c, _)| c.base()).unwrap_or(""),
                    );
                }
                bar.suspend(|| eprintln!("{}: {e}; counted as failed", p.task_id));
                Record {
                    task_id: &p.task_id,
                    passed: false,
                    outcome: Outcome::RequestError,
                    error: Some(e.to_string()),
                    request_s,
                    exec_s: 0.0,
                    finish_reason: None,
                    prompt_tokens: None,
                    completion_tokens: None,
                    completion: String::new(),
                    code: String::new(),
                    full_definition: false,
                    exit_code: None,
                    stderr_tail: String::new(),
                    swarm: None,
                    agents_responded: None,
                }
            }
        };
        match record.outcome {
            Outcome::Passed => passed += 1,
            Outcome::Failed => failed += 1,
            Outcome::TimedOut => timed_out += 1,
            Outcome::RequestError => request_errors += 1,
        }
        if !record.passed {
            not_passed.push(p.task_id.clone());
        }
        if let Some(w) = out.as_mut() {
            serde_json::to_writer(&mut *w, &record)?;
            w.write_all(b"\n")?;
            w.flush()?;
        }
        bar.set_message(format!("{}: {passed} passed", kind.as_str()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
    let n = problems.len();
    let summary = Summary {
        benchmark: kind.as_str(),
        strategy: if a.check_harness {
            "canonical".into()
        } else {
            a.strategy.as_str().into()
        },
        model: api.as_ref().map(|(_, m)| m.clone()),
        url: api.as_ref().map(|(c, _)| c.base().to_string()),
        problems: n,
        offset: a.offset,
        passed,
        failed,
        timed_out,
        request_errors,
        pass_at_1: passed as f64 / n as f64,
        wall_s,
        mean_s_per_problem: wall_s / n as f64,
        mean_request_s: request_total / n as f64,
        mean_exec_s: exec_total / n as f64,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        exec_timeout_s: a.timeout_s,
        isolation: sandbox.isolation().as_str(),
        data: data.display().to_string(),
        not_passed,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(kind, &summary, a.check_harness);
    }
    if a.check_harness && summary.passed < n {
        eprintln!(
            "shoal: the harness failed {} canonical solution(s): {}",
            n - summary.passed,
            summary.not_passed.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(kind: Kind, s: &Summary, check_harness: bool) {
    if check_harness {
        println!("{} harness check (reference solutions)", kind.title());
    } else {
        println!("{}", kind.title());
    }
    let rows: Vec<(&str, String)> = vec![
        (
            "problems",
            format!("{} (from number {} of the file)", s.problems, s.offset),
        ),
        ("strategy", s.strategy.clone()),
        ("model", s.model.clone().unwrap_or_else(|| "-".into())),
        ("url", s.url.clone().unwrap_or_else(|| "-".into())),
        ("passed", format!("{}/{}", s.passed, s.problems)),
        ("pass@1", format!("{:.1}%", s.pass_at_1 * 100.0)),
        (
            "failed",
            format!(
                "{} (timed out {}, request errors {})",
                s.failed + s.timed_out + s.request_errors,
                s.timed_out,
                s.request_errors
            ),
        ),
        ("wall time", format!("{:.1} s", s.wall_s)),
        (
            "per problem",
            format!(
                "{:.2} s (request {:.2} s, tests {:.2} s)",
                s.mean_s_per_problem, s.mean_request_s, s.mean_exec_s
            ),
        ),
        (
            "sampling",
            match s.seed {
                Some(seed) => format!(
                    "max_tokens {}, temperature {}, seed {seed}",
                    s.max_tokens, s.temperature
                ),
                None => format!(
                    "max_tokens {}, temperature {}, seed the server's",
                    s.max_tokens, s.temperature
                ),
            },
        ),
        (
            "sandbox",
            format!("{}, {} s per program", s.isolation, s.exec_timeout_s),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<12} {v}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The swarm's `verify` reads each problem's examples from the question the eval sends
    /// (`shoal_swarm::verify::Task`). The canonical solutions must pass them all, but for
    /// the four prompts whose own examples are wrong: an example misread costs every
    /// candidate a check and sends the problem to a repair round with the misreading as the
    /// failure to fix. Needs the data (`scripts/fetch-models.sh humaneval`, or in
    /// `$SHOAL_MODELS_DIR`) and the sandbox.
    #[test]
    fn the_canonical_solutions_pass_the_examples_the_swarm_reads() {
        use shoal_swarm::verify::{run_behaviours, Task};
        let models = std::env::var_os("SHOAL_MODELS_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"),
            PathBuf::from,
        );
        let problems =
            load_problems(&models.join("HumanEval.jsonl.gz")).expect("HumanEval's problems");
        let (mut with_examples, mut examples) = (0, 0);
        let mut dropped: Vec<(String, usize)> = Vec::new();
        let mut failing: Vec<String> = Vec::new();
        for p in &problems {
            let mut task = Task::from_question(&user_message(&p.prompt)).expect("a task");
            assert_eq!(task.entry_point, p.entry_point, "{}", p.task_id);
            let left_out = task.drop_unsound_examples(Duration::from_secs(10));
            if left_out > 0 {
                dropped.push((p.task_id.clone(), left_out));
            }
            if task.examples.is_empty() {
                continue;
            }
            with_examples += 1;
            examples += task.examples.len();
            let reply = format!("```python\n{}{}\n```", p.prompt, p.canonical_solution);
            let program = task.candidate_program(&reply);
            let behaviour = run_behaviours(
                task.language,
                &[program],
                &task.examples,
                Duration::from_secs(10),
            )
            .remove(0)
            .expect("the sandbox runs the canonical solution");
            assert!(behaviour.defined, "{}: {}", p.task_id, behaviour.error);
            assert_eq!(behaviour.checks.len(), task.examples.len(), "{}", p.task_id);
            for (example, check) in task.examples.iter().zip(&behaviour.checks) {
                if !check.ok && !failing.contains(&p.task_id) {
                    eprintln!("{}: {example}: {}", p.task_id, check.err.trim());
                    failing.push(p.task_id.clone());
                }
            }
        }
        assert_eq!(
            failing,
            [
                "HumanEval/47",
                "HumanEval/116",
                "HumanEval/130",
                "HumanEval/148"
            ],
            "the prompts whose own examples are wrong, and no more"
        );
        // /80's six unquoted calls, two of /130's recurrences in words, /158's typo.
        let dropped: Vec<(&str, usize)> = dropped.iter().map(|(t, n)| (t.as_str(), *n)).collect();
        assert_eq!(
            dropped,
            [
                ("HumanEval/80", 6),
                ("HumanEval/130", 2),
                ("HumanEval/158", 1)
            ]
        );
        assert_eq!((with_examples, examples), (135, 384));
    }

    #[test]
    fn the_request_asks_for_one_fenced_block() {
        let problem = Problem {
            task_id: "T/0".into(),
            prompt: "def f():\n    \"\"\"x\"\"\"\n".into(),
            canonical_solution: "    return 1\n".into(),
            test: String::new(),
            entry_point: "f".into(),
        };
        let b = request_body("m", &Case::from(problem.clone()), 64, 0.0, None);
        assert!(b.get("seed").is_none(), "the server chooses: {b}");
        assert_eq!(
            request_body("m", &Case::from(problem), 64, 0.0, Some(7))["seed"],
            7
        );
        assert_eq!(b["model"], "m");
        assert_eq!(b["stream"], false);
        assert_eq!(b["max_tokens"], 64);
        assert_eq!(b["messages"][0]["role"], "system");
        assert!(b["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("```python"));
        assert!(b["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains("def f():"));
    }

    #[test]
    fn a_missing_data_file_says_how_to_fetch_it() {
        let e = load_problems(Path::new("/nonexistent/HumanEval.jsonl.gz")).unwrap_err();
        assert!(
            e.to_string().contains("scripts/fetch-models.sh humaneval"),
            "{e}"
        );
    }

    #[test]
    fn plain_jsonl_loads_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("shoal-eval-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"task_id\":\"T/0\",\"prompt\":\"p\",\"canonical_solution\":\"c\",\"test\":\"t\",\"entry_point\":\"f\"}\n\n",
        )
        .unwrap();
        assert_eq!(load_problems(&good).unwrap()[0].task_id, "T/0");
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"task_id\":1}\n").unwrap();
        let e = load_problems(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
