//! `claudecluster-loadgen`: drives a running ClaudeCluster intake and
//! reports what it measured. See `loadtest/README.md`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use claudecluster_loadtest::cli::{Cli, execute};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let result = runtime
        .context("failed to start the async runtime")
        .and_then(|rt| {
            rt.block_on(async {
                tokio::select! {
                    result = execute(cli.command) => result,
                    _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
                }
            })
        });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("claudecluster-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}
