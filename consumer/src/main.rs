//! `claudecluster-consumer`: a worker process. Pulls tasks from NATS
//! JetStream, runs them, records results in Redis, and serves `/health`,
//! `/ready` and `/metrics` on `WORKER_PORT` until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use claudecluster_consumer::{Application, launcher};
use claudecluster_engine::config::Settings;
use claudecluster_engine::{backend, runtime, shutdown, telemetry};

/// A ClaudeCluster worker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A YAML configuration file; environment variables override it.
    #[arg(long, env = "CONFIG_FILE")]
    config_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    // Before anything else: this process may be a task's limit launcher.
    launcher::run_if_requested();
    let args = Args::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // One scheduler thread unless TOKIO_WORKER_THREADS says otherwise. A
    // worker's own work per task is small (the task itself runs in a child
    // process), and with a second thread most of a task's wake-ups crossed
    // threads: in a batch benchmark one thread cut the worker's CPU per task
    // by about a seventh, and at 500 tasks/s by a fifth, with the same
    // throughput and latency.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime::block_on_workers(&runtime, run(args)).context("the worker's main task panicked")?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::load(args.config_file.as_deref())?;
    telemetry::init(&settings.log);
    let backends = backend::connect_networked(&settings)
        .await
        .context("failed to connect to NATS and Redis")?;
    tracing::info!(backends = %backends.description, "connected");
    let app = Application::build(settings, backends).await?;
    app.run_until_stopped(shutdown::on_signal()).await
}
