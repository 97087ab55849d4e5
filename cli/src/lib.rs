//! The all-in-one `claudecluster` command.
//!
//! - `serve` runs the intake and a worker pool in one process, on the
//!   embedded queue and store unless `NATS_URL` and `REDIS_URL` point at real
//!   ones ([`serve`]).
//! - `producer` and `consumer` run one role each against NATS and Redis, so
//!   one binary serves every deployment.
//! - `submit`, `get`, `wait`, `cancel`, `list`, `workers` and `dead-letters`
//!   talk to a running intake over HTTP ([`client`]).
//! - `mcp` serves the intake's MCP tools on standard input and output, for
//!   MCP clients that start their servers as a command ([`mcp`]).

pub mod client;
pub mod mcp;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command-line interface of `claudecluster`.
#[derive(Debug, Parser)]
#[command(
    name = "claudecluster",
    version,
    about = "Run Claude Code tasks on a pool of workers"
)]
pub struct Cli {
    /// YAML configuration file (also `CONFIG_FILE`).
    #[arg(long, global = true, env = "CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the intake and a worker pool in one process.
    Serve(serve::ServeArgs),
    /// Run the intake only (HTTP API and MCP), against NATS and Redis.
    Producer,
    /// Run a worker pool only, against NATS and Redis.
    Consumer,
    /// Submit a task.
    Submit(client::SubmitArgs),
    /// Show a task.
    Get(client::TaskArgs),
    /// Wait until a task finishes and show it.
    Wait(client::WaitArgs),
    /// Cancel a task.
    Cancel(client::TaskArgs),
    /// List recent tasks.
    List(client::ListArgs),
    /// List live workers.
    Workers(client::Conn),
    /// Inspect, replay or discard dead letters.
    #[command(subcommand)]
    DeadLetters(client::DeadLetterCommand),
    /// Serve the MCP tools on standard input and output (for
    /// `claude mcp add claudecluster -- claudecluster mcp`), relayed to the
    /// intake at `--url`.
    Mcp(mcp::McpArgs),
}

/// Entry point shared by the `claudecluster` binary and the end-to-end test
/// harness: parses the command line and runs it.
pub fn main() -> ExitCode {
    claudecluster_consumer::launcher::run_if_requested();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = claudecluster_engine::runtime::block_on_workers(&runtime, run(cli))
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the command's task panicked: {e}")));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the subcommand failed with, with context.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_file = cli.config_file.as_deref();
    match cli.command {
        Command::Serve(args) => serve::serve(config_file, args).await,
        Command::Producer => serve::producer(config_file).await,
        Command::Consumer => serve::consumer(config_file).await,
        Command::Submit(args) => client::submit(args).await,
        Command::Get(args) => client::get(args).await,
        Command::Wait(args) => client::wait(args).await,
        Command::Cancel(args) => client::cancel(args).await,
        Command::List(args) => client::list(args).await,
        Command::Workers(conn) => client::workers(conn).await,
        Command::DeadLetters(cmd) => client::dead_letters(cmd).await,
        Command::Mcp(args) => mcp::mcp(config_file, args).await,
    }
}
