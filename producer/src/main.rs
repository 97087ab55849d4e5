//! `claudecluster-producer`: the intake on its own, against NATS and Redis.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use claudecluster_engine::{backend, config::Settings, runtime, shutdown, telemetry};
use claudecluster_producer::Application;

/// The ClaudeCluster intake (HTTP API).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// YAML configuration file; environment variables override it.
    #[arg(long, env = "CONFIG_FILE")]
    config_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime::block_on_workers(&runtime, run(args)).context("the intake's main task panicked")?
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
