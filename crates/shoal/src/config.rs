//! The config file of `shoal serve --config FILE` (TOML). Every key is a `serve` flag with
//! the same name (`peer_port` for `--peer-port`, `peers` for the repeatable `--peer`); a
//! flag given on the command line (or by its environment variable) wins over the file.
//! Sections: `[swarm]` for the swarm head's settings and `[prompts]` for role system
//! prompts that replace the built-in ones.
//!
//! ```toml
//! model = "models/qwen2.5-coder-0.5b-instruct.gguf"   # or "auto": the cluster chooses
//! # chat_template_file = "tool-calls.jinja"   # instead of the model's own template
//! host = "0.0.0.0"
//! port = 8080
//! peer_port = 7070
//! peers = ["192.168.1.20:7070", "192.168.1.21:7070"]   # found by mDNS anyway, where it passes
//! # mdns = "off"
//! # dead_after_s = 6                # heartbeat_interval_s = 1, suspect_after_s = 3
//! # peer_idle_timeout_s = 120       # silent peer connections close (announced to diallers)
//! # split = "0-7,8-15,16-23"      # pipeline mode; without it the peers form a swarm
//! # plan_memory_gib = 2            # memory offered to pipeline plans; auto_min_speed = 4
//! # cache_ram = 1024               # MiB of prompt cache (0: off)
//! # pooling = "last"               # how /v1/embeddings pools: mean, cls, last
//! # lookup = true                  # speculative decoding by prompt lookup; draft_max = 12
//! # model_draft = "qwen05"         # ... or with a draft model (and lookup first, if on)
//! role = "reasoner"                # or several: "reasoner,critic" (one model answers as each)
//! swarm_key_file = "swarm.key"     # from `shoal key new`; relative to this file
//!
//! [swarm]
//! strategy = "auto"               # or moa, vote, confidence, fastest, speed, strongest, cluster, verify
//! timeout_simple_s = 6
//! timeout_complex_s = 12
//! vote_samples = 5
//! code_checks = "on"              # vote runs candidates' code in the sandbox; or "off"
//!
//! [prompts]
//! reasoner = "You are a careful reasoner. Think step by step, then answer."
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;
use shoal_swarm::roles::{Role, RolePrompts};

use crate::serve::ServeArgs;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    model: Option<PathBuf>,
    model_id: Option<String>,
    chat_template_file: Option<PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    api_key: Option<String>,
    peer_port: Option<u16>,
    peer_host: Option<String>,
    mdns: Option<crate::cli::Switch>,
    heartbeat_interval_s: Option<f64>,
    suspect_after_s: Option<f64>,
    dead_after_s: Option<f64>,
    peer_idle_timeout_s: Option<f64>,
    peers: Option<Vec<String>>,
    split: Option<String>,
    plan_memory_gib: Option<f64>,
    auto_min_speed: Option<f64>,
    activations: Option<crate::cli::ActivationsArg>,
    stage_only: Option<bool>,
    role: Option<String>,
    node_id: Option<String>,
    /// A file holding the swarm key (the key itself stays out of the config file).
    swarm_key_file: Option<PathBuf>,
    insecure_peers: Option<bool>,
    max_queue: Option<usize>,
    cache_ram: Option<usize>,
    pooling: Option<crate::cli::PoolingArg>,
    lookup: Option<bool>,
    model_draft: Option<PathBuf>,
    draft_max: Option<usize>,
    draft_min: Option<usize>,
    draft_p_min: Option<f32>,
    client_stall_timeout_s: Option<f64>,
    request_timeout_s: Option<f64>,
    max_stop: Option<usize>,
    max_stop_len: Option<usize>,
    #[serde(default)]
    swarm: SwarmSection,
    /// Role name → system prompt.
    #[serde(default)]
    prompts: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwarmSection {
    strategy: Option<String>,
    timeout_simple_s: Option<f64>,
    timeout_complex_s: Option<f64>,
    vote_samples: Option<usize>,
    code_checks: Option<crate::cli::Switch>,
}

impl ConfigFile {
    pub(crate) fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }
}

/// Fills every `serve` setting not given on the command line from the config file (if
/// any); returns the role prompts with the file's overrides.
pub(crate) fn apply(
    a: &mut ServeArgs,
    matches: Option<&ArgMatches>,
) -> anyhow::Result<RolePrompts> {
    let Some(path) = a.config.clone() else {
        return Ok(RolePrompts::new());
    };
    let file = ConfigFile::read(&path)?;
    // Relative paths in the file are relative to the file.
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let given = |id: &str| {
        matches.is_some_and(|m| {
            matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
    };
    macro_rules! take {
        ($field:ident) => {
            take!($field, file.$field)
        };
        ($field:ident, $value:expr) => {
            if !given(stringify!($field)) {
                if let Some(v) = $value {
                    a.$field = v.into();
                }
            }
        };
        // A flag of a flattened group: its id is the field's own name.
        ($group:ident . $field:ident, $value:expr) => {
            if !given(stringify!($field)) {
                if let Some(v) = $value {
                    a.$group.$field = v.into();
                }
            }
        };
    }
    // A bare name is a known model's; a relative path is relative to the file.
    let model_path = |m: PathBuf| {
        if m.is_relative() && m.components().count() > 1 {
            base.join(m)
        } else {
            m
        }
    };
    if !given("model") {
        if let Some(m) = file.model {
            a.model.model = Some(model_path(m));
        }
    }
    if !given("model_draft") {
        if let Some(m) = file.model_draft {
            a.speculation.model_draft = Some(model_path(m));
        }
    }
    take!(model_id);
    take!(
        chat_template_file,
        file.chat_template_file
            .map(|f| if f.is_relative() { base.join(f) } else { f })
    );
    take!(host);
    take!(port);
    take!(api_key);
    take!(peer_port);
    take!(peer_host);
    take!(mdns);
    take!(heartbeat_interval_s);
    take!(suspect_after_s);
    take!(dead_after_s);
    take!(peer_idle_timeout_s);
    take!(split);
    take!(plan_memory_gib);
    take!(auto_min_speed);
    take!(activations);
    take!(stage_only);
    take!(role);
    take!(node_id);
    if !given("swarm_key") && !given("swarm_key_file") {
        if let Some(f) = file.swarm_key_file {
            a.key.swarm_key_file = Some(if f.is_relative() { base.join(f) } else { f });
        }
    }
    if !given("insecure_peers") {
        if let Some(v) = file.insecure_peers {
            a.key.insecure_peers = v;
        }
    }
    take!(peers);
    take!(max_queue);
    take!(cache_ram);
    take!(pooling);
    take!(speculation.lookup, file.lookup);
    take!(speculation.draft_max, file.draft_max);
    take!(speculation.draft_min, file.draft_min);
    take!(speculation.draft_p_min, file.draft_p_min);
    take!(client_stall_timeout_s);
    take!(request_timeout_s);
    take!(max_stop);
    take!(max_stop_len);
    let s = file.swarm;
    take!(swarm_strategy, s.strategy);
    take!(swarm_timeout_simple, s.timeout_simple_s);
    take!(swarm_timeout_complex, s.timeout_complex_s);
    take!(swarm_samples, s.vote_samples);
    take!(swarm_code_checks, s.code_checks);
    let mut prompts = RolePrompts::new();
    for (role, text) in file.prompts {
        let role: Role = role
            .parse()
            .map_err(|e| anyhow::anyhow!("config file [prompts]: {e}"))?;
        prompts.set_override(role, text);
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::serve::ServeArgs;

    fn serve_with(args: &[&str], file: &str) -> (ServeArgs, RolePrompts) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv = vec!["shoal", "serve", "--config", path.to_str().unwrap()];
        argv.extend(args);
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let Command::Serve(mut a) = cli.command else {
            panic!("not serve")
        };
        let prompts = apply(&mut a, matches.subcommand_matches("serve")).unwrap();
        (*a, prompts)
    }

    #[test]
    fn the_file_fills_what_the_command_line_leaves_out() {
        let file = r#"
            host = "0.0.0.0"
            port = 9000
            peer_port = 7070
            peers = ["10.0.0.2:7070", "10.0.0.3:7070"]
            role = "critic"
            lookup = true
            model_draft = "qwen05"
            chat_template_file = "tools.jinja"
            draft_max = 12
            draft_p_min = 0.5
            pooling = "last"
            peer_idle_timeout_s = 30
            [swarm]
            strategy = "vote"
            vote_samples = 7
            code_checks = "off"
            [prompts]
            critic = "Find the flaw."
        "#;
        let (a, prompts) = serve_with(&["--port", "8081"], file);
        assert_eq!(a.host, "0.0.0.0");
        assert_eq!(a.port, 8081, "the command line wins");
        assert_eq!(a.peer_port, Some(7070));
        assert_eq!(a.peers, ["10.0.0.2:7070", "10.0.0.3:7070"]);
        assert_eq!(a.role.as_deref(), Some("critic"));
        assert!(a.speculation.lookup);
        assert_eq!(
            a.speculation.model_draft.as_deref(),
            Some(std::path::Path::new("qwen05"))
        );
        let template = a.chat_template_file.as_deref().unwrap();
        assert!(
            template.ends_with("tools.jinja") && template.is_absolute(),
            "relative to the file: {template:?}"
        );
        assert_eq!(
            (a.speculation.draft_max, a.speculation.draft_p_min),
            (12, 0.5)
        );
        assert_eq!(a.pooling, Some(crate::cli::PoolingArg::Last));
        assert_eq!(a.peer_idle_timeout_s, 30.0);
        assert_eq!(a.swarm_strategy, "vote");
        assert_eq!(a.swarm_samples, 7);
        assert_eq!(a.swarm_code_checks, crate::cli::Switch::Off);
        assert_eq!(prompts.get(Role::Critic), "Find the flaw.");
        assert_ne!(prompts.get(Role::Reasoner), "Find the flaw.");
    }

    #[test]
    fn unknown_keys_and_roles_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "prot = 1\n").unwrap();
        let e = format!("{:#}", ConfigFile::read(&path).unwrap_err());
        assert!(e.contains("prot"), "{e}");
        let path_str = path.to_str().unwrap().to_owned();
        std::fs::write(&path, "[prompts]\nwizard = \"x\"\n").unwrap();
        let matches = Cli::command()
            .try_get_matches_from(["shoal", "serve", "--config", path_str.as_str()])
            .unwrap();
        let Command::Serve(mut a) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!()
        };
        let e = apply(&mut a, matches.subcommand_matches("serve"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown role"), "{e}");
    }
}
