//! The swarm key on the command line: `shoal key new`, and where `serve` and `run` take it
//! from (`docs/SECURITY.md`).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use shoal_wire::SwarmKey;

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// Print a new random swarm key (give the same one to every node of the swarm).
    New,
}

/// The swarm key flags of `serve` and `run`.
#[derive(Args, Clone, Default)]
pub(crate) struct KeyArgs {
    /// The swarm key (64 hex digits from `shoal key new`), the same on every node: every
    /// peer connection is then authenticated and encrypted with it.
    #[arg(long, env = "SHOAL_SWARM_KEY", hide_env_values = true)]
    pub(crate) swarm_key: Option<String>,
    /// Read the swarm key from this file instead.
    #[arg(long, env = "SHOAL_SWARM_KEY_FILE", conflicts_with = "swarm_key")]
    pub(crate) swarm_key_file: Option<PathBuf>,
    /// Allow plain peer connections beyond this machine without a swarm key (anyone on
    /// the network could then use this node's peer port and read its traffic).
    #[arg(long)]
    pub(crate) insecure_peers: bool,
}

impl KeyArgs {
    /// The key given, if any.
    pub(crate) fn key(&self) -> anyhow::Result<Option<SwarmKey>> {
        if let Some(text) = &self.swarm_key {
            return Ok(Some(
                text.parse()
                    .map_err(|e| anyhow::anyhow!("--swarm-key: {e}"))?,
            ));
        }
        Ok(self
            .swarm_key_file
            .as_deref()
            .map(SwarmKey::read_file)
            .transpose()?)
    }
}

pub(crate) fn run(KeyCommand::New: KeyCommand) -> anyhow::Result<std::process::ExitCode> {
    let key = SwarmKey::generate()?;
    println!("{}", key.reveal());
    eprintln!(
        "swarm key id {}: give it to every node (--swarm-key, SHOAL_SWARM_KEY or swarm_key_file \
         in the config file) and keep it secret",
        key.id()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
