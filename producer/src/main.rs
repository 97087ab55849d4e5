//! `claudecluster-producer`: the intake on its own, against NATS and Redis.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use claudecluster_engine::{backend, config::Settings, shutdown, telemetry};
use claudecluster_producer::Application;

/// The ClaudeCluster intake (HTTP API).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// YAML configuration file; environment variables override it.
    #[arg(long, env = "CONFIG_FILE")]
    config_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Spawned: `#[tokio::main]` polls this future on the main thread, off
    // the scheduler's threads, and every wake-up of it would cross threads.
    tokio::spawn(run(Args::parse()))
        .await
        .context("the intake's main task panicked")?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let settings =
        Settings::load(args.config_file.as_deref()).context("failed to load settings")?;
    telemetry::init(&settings.log);
    let backends = backend::connect_networked(&settings)
        .await
        .context("failed to connect to NATS and Redis")?;
    let app = Application::build(settings, backends).await?;
    app.run_until_stopped(shutdown::on_signal()).await
}
