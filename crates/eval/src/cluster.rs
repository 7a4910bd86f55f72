//! `--agents`: the eval starts the swarm it measures — `shoal serve` agent processes for the
//! `MODEL[:ROLE]`s and a head with `--peer` for each — on 127.0.0.1, and stops them all
//! when it is done (or fails). Agents of one model share one process (`--role a,b,…`), as
//! one device would serve them: the weights once, the roles' answers in shared passes;
//! `--process-per-agent` starts one process each, as if each had a device of its own.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

use shoal_swarm::roles::Role;

use crate::ResolveModel;

/// One agent to start: its model (a file or a known model's name) and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AgentSpec {
    pub(crate) model: PathBuf,
    pub(crate) role: Option<String>,
}

/// Parses `MODEL[:ROLE],MODEL[:ROLE],…` (a Windows-style `C:\…` path is not expected here).
pub(crate) fn parse_agents(text: &str) -> anyhow::Result<Vec<AgentSpec>> {
    let specs: Vec<AgentSpec> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.rsplit_once(':') {
            Some((model, role)) if !role.contains('/') => AgentSpec {
                model: PathBuf::from(model),
                role: Some(role.to_owned()),
            },
            _ => AgentSpec {
                model: PathBuf::from(s),
                role: None,
            },
        })
        .collect();
    if specs.is_empty() {
        bail!("--agents: expected MODEL[:ROLE],… (e.g. qwen05:reasoner,smollm2:critic)");
    }
    Ok(specs)
}

/// The agent processes for `agents`: the roles of each process, by model. Agents of one
/// model with distinct roles share a process (with `one_each`, never); an agent without a
/// role, or with a role its model's process already has, gets another.
fn agent_processes(agents: &[AgentSpec], one_each: bool) -> Vec<(PathBuf, Vec<String>)> {
    // As `serve` reads them (`fact-checker` is `factchecker`).
    let same = |a: &str, b: &str| match (a.parse::<Role>(), b.parse::<Role>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let mut processes: Vec<(PathBuf, Vec<String>)> = Vec::new();
    for a in agents {
        let joins = |(model, roles): &&mut (PathBuf, Vec<String>)| {
            !one_each
                && *model == a.model
                && !roles.is_empty()
                && a.role.as_ref().is_some_and(|r| {
                    !roles.iter().any(|had| same(had, r))
                        && roles.join(",").len() + 1 + r.len() <= shoal_wire::MAX_ROLE
                })
        };
        match (processes.iter_mut().find(joins), &a.role) {
            (Some((_, roles)), Some(role)) => roles.push(role.clone()),
            _ => processes.push((a.model.clone(), a.role.iter().cloned().collect())),
        }
    }
    processes
}

/// The processes of a local swarm (or of one server); all killed when dropped.
pub(crate) struct LocalCluster {
    children: Vec<Child>,
    /// The API to evaluate: the head's, or the single server's.
    pub(crate) url: String,
    /// The agents' own APIs (their `/health` says when their model is ready).
    pub(crate) agent_urls: Vec<String>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes the child end when this process does, however it ends: `Drop` covers a normal end
/// and errors, but a run stopped with SIGTERM or SIGKILL (a long eval cut short) would
/// leave its servers running. The kernel sends the signal when the *thread* that started
/// the child ends; clusters are started from the main thread, which lives as long as the
/// run.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn end_with_this_process(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // Safety: the closure runs in the child between fork and exec; it only calls `prctl`
    // and `getppid`, which are async-signal-safe, and allocates nothing (the errors are
    // bare OS codes).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have ended before the call: then nobody would signal.
            if libc::getppid() == 1 {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn end_with_this_process(_: &mut Command) {}

/// This very program, which the cluster's processes run.
fn shoal_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the shoal executable")
}

/// Addresses a `shoal serve` printed.
struct Started {
    http: String,
    peer: Option<String>,
}

impl LocalCluster {
    /// `single`: one server for `agents[0]` (exactly one agent allowed). Otherwise: the
    /// agents with their roles (those of one model in one process unless
    /// `process_per_agent`), and a head on `head_model` (default: the first agent's model)
    /// with `--peer` for each process, whose swarm timeouts are `swarm_timeout` (`None`:
    /// serve's defaults); `timeout` bounds the wait for each agent's API.
    pub(crate) fn start(
        agents: &[AgentSpec],
        head_model: Option<&Path>,
        single: bool,
        process_per_agent: bool,
        timeout: Duration,
        swarm_timeout: Option<Duration>,
        resolve_model: ResolveModel<'_>,
    ) -> anyhow::Result<Self> {
        let exe = shoal_exe()?;
        let mut cluster = LocalCluster::empty();
        let resolve = |m: &Path| resolve_model(Some(m));
        if single {
            let [agent] = agents else {
                bail!("--strategy single with --agents takes exactly one MODEL");
            };
            let model = resolve(&agent.model)?;
            let s = cluster.spawn(&exe, vec!["--model".into(), model.into()], false)?;
            cluster.url = format!("http://{}", s.http);
            return Ok(cluster);
        }
        let mut peers = Vec::new();
        for (model, roles) in agent_processes(agents, process_per_agent) {
            let model = resolve(&model)?;
            let mut args: Vec<OsString> = vec![
                "--model".into(),
                model.into(),
                "--peer-port".into(),
                "0".into(),
            ];
            if !roles.is_empty() {
                args.extend(["--role".into(), roles.join(",").into()]);
            }
            let s = cluster.spawn(&exe, args, true)?;
            cluster.agent_urls.push(format!("http://{}", s.http));
            peers.extend(s.peer);
        }
        // The head counts only agents that answer its first `Describe`: start it once every
        // agent's model has loaded.
        for url in &cluster.agent_urls {
            crate::client::Client::new(url, None, timeout).wait_ready(
                Duration::from_secs(300),
                || {
                    eprintln!("waiting for the agent at {url} to load…");
                },
            )?;
        }
        let head = resolve(head_model.unwrap_or(&agents[0].model))?;
        cluster.spawn_head(&exe, &head, &peers, swarm_timeout)?;
        Ok(cluster)
    }

    /// A head alone: `shoal serve --model HEAD --peer P …` with swarm timeouts of `timeout`,
    /// for agents that are already up (they must answer its first `Describe`).
    pub(crate) fn start_head(
        head: &Path,
        peers: &[SocketAddr],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut cluster = LocalCluster::empty();
        let peers: Vec<String> = peers.iter().map(ToString::to_string).collect();
        cluster.spawn_head(&shoal_exe()?, head, &peers, Some(timeout))?;
        Ok(cluster)
    }

    fn empty() -> Self {
        LocalCluster {
            children: Vec::new(),
            url: String::new(),
            agent_urls: Vec::new(),
        }
    }

    /// Starts the head and makes its API the one evaluated (`url`).
    fn spawn_head(
        &mut self,
        exe: &Path,
        head: &Path,
        peers: &[String],
        swarm_timeout: Option<Duration>,
    ) -> anyhow::Result<()> {
        let mut args: Vec<OsString> = vec!["--model".into(), head.into()];
        for p in peers {
            args.extend(["--peer".into(), p.into()]);
        }
        if let Some(timeout) = swarm_timeout {
            let secs = format!("{}", timeout.as_secs_f64());
            args.extend([
                "--swarm-timeout-simple".into(),
                secs.clone().into(),
                "--swarm-timeout-complex".into(),
                secs.into(),
            ]);
        }
        let s = self.spawn(exe, args, false)?;
        self.url = format!("http://{}", s.http);
        Ok(())
    }

    /// Starts `shoal serve ARGS --host 127.0.0.1 --port 0` and waits for its addresses.
    fn spawn(
        &mut self,
        exe: &Path,
        args: Vec<OsString>,
        wants_peer: bool,
    ) -> anyhow::Result<Started> {
        let mut command = Command::new(exe);
        end_with_this_process(&mut command);
        let mut child = command
            .arg("serve")
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .env_remove("SHOAL_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start shoal serve")?;
        let stderr = child.stderr.take();
        self.children.push(child);
        let Some(stderr) = stderr else {
            bail!("shoal serve has no stderr");
        };
        let (tx, rx) = mpsc::channel();
        // Drain stderr for the life of the process, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut http = None;
        let mut peer = None;
        while http.is_none() || (wants_peer && peer.is_none()) {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .context("shoal serve did not print its addresses")?;
            if let Some(a) = line.trim().strip_prefix("listening on http://") {
                http = Some(a.to_owned());
            } else if let Some(a) = line.trim().strip_prefix("peer port listening on ") {
                peer = Some(a.to_owned());
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Ok(Started {
            http: http.unwrap_or_default(),
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn agent_lists_parse() {
        let a = parse_agents("qwen05:reasoner, models/x.gguf ,smollm2:critic").unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].model, PathBuf::from("qwen05"));
        assert_eq!(a[0].role.as_deref(), Some("reasoner"));
        assert_eq!(a[1].model, PathBuf::from("models/x.gguf"));
        assert_eq!(a[1].role, None);
        assert!(parse_agents(" , ").is_err());
    }

    #[test]
    fn agents_of_one_model_share_a_process_with_distinct_roles() {
        let a = parse_agents(
            "qwen05:reasoner,qwen05:critic,smollm2:critic,qwen05,qwen05:Critic,qwen05:writer",
        )
        .unwrap();
        let p = |model: &str, roles: &[&str]| {
            (
                PathBuf::from(model),
                roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            agent_processes(&a, false),
            vec![
                p("qwen05", &["reasoner", "critic", "writer"]),
                p("smollm2", &["critic"]),
                p("qwen05", &[]),
                p("qwen05", &["Critic"]),
            ]
        );
        assert_eq!(agent_processes(&a, true).len(), 6);
        // A card carries at most MAX_ROLE bytes of roles: the rest go to another process.
        let all = parse_agents(
            "m:reasoner,m:writer,m:concise,m:critic,m:factchecker,m:drafter,m:spotter,m:aggregator",
        )
        .unwrap();
        let processes = agent_processes(&all, false);
        assert_eq!(processes.len(), 2);
        assert!(processes
            .iter()
            .all(|(_, roles)| roles.join(",").len() <= shoal_wire::MAX_ROLE));
    }
}
