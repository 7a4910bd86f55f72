//! `shoal mcp`: flags into an [`McpConfig`], then the MCP server on stdio.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use shoal_mcp::McpConfig;

#[derive(Args)]
pub(crate) struct McpArgs {
    /// The Shoal node to answer through (its HTTP API).
    #[arg(long, env = "SHOAL_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The node's API key, when it has one.
    #[arg(long, env = "SHOAL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Longest a call to the node may take, a whole chat answer included (seconds).
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

pub(crate) fn run(a: McpArgs) -> anyhow::Result<ExitCode> {
    // stdout carries the protocol: nothing else may be printed there (logs go to stderr).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = McpConfig {
        url: a.url,
        api_key: a.api_key,
        timeout: Duration::from_secs(a.timeout_s),
    };
    runtime.block_on(shoal_mcp::serve_stdio(config))?;
    Ok(ExitCode::SUCCESS)
}
