//! `claudecluster serve`, `producer` and `consumer`: the long-running roles.
//!
//! `serve` is the one-command start: with neither `NATS_URL` nor `REDIS_URL`
//! configured it keeps tasks and results in an embedded database file under
//! the data directory, so nothing else needs installing; with both it runs a
//! small production node against them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use claudecluster_engine::backend::{Backends, connect_networked};
use claudecluster_engine::config::{ExecutorKind, Settings};
use claudecluster_engine::{shutdown, telemetry};

/// Options of `claudecluster serve`; each overrides the configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (0 picks a free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// Where the embedded queue and store keep their file.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Tasks run at once (default: the number of CPUs).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Executor: claude, command or echo (default: claude when the CLI is on
    /// PATH, otherwise echo).
    #[arg(long, value_parser = parse_executor)]
    pub executor: Option<ExecutorKind>,
}

fn parse_executor(s: &str) -> Result<ExecutorKind, String> {
    match s {
        "claude" => Ok(ExecutorKind::Claude),
        "command" => Ok(ExecutorKind::Command),
        "echo" => Ok(ExecutorKind::Echo),
        other => Err(format!(
            "unknown executor {other:?}: use claude, command or echo"
        )),
    }
}

/// Runs the intake and a worker pool in this process until SIGTERM or Ctrl-C.
///
/// # Errors
/// Bad configuration, a backend that cannot be opened, a port in use.
pub async fn serve(config_file: Option<&Path>, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(config_file)?;
    telemetry::init(&settings.log);
    apply_args(&mut settings, &args);
    let executor_note = choose_executor(&mut settings);

    let (backends, where_) = open_backends(&settings).await?;
    let settings = Arc::new(settings);
    let executor = claudecluster_consumer::executor::from_settings(&settings)
        .context("failed to set up the executor")?;
    let pool =
        claudecluster_consumer::WorkerPool::new(settings.clone(), backends.clone(), executor);
    let app = claudecluster_producer::Application::build((*settings).clone(), backends)
        .await
        .context("failed to start the intake")?;
    let url = format!(
        "http://{}:{}",
        display_host(&settings.server.host),
        app.port()
    );

    println!("ClaudeCluster listening on {url}");
    println!("  tasks:    {where_}");
    println!(
        "  workers:  {} running the {} executor",
        settings.worker.concurrency,
        settings.worker.executor.unwrap_or_default().as_str()
    );
    if let Some(note) = executor_note {
        println!("  note:     {note}");
    }
    println!("Try it:  claudecluster submit --url {url} --wait \"Say hello\"");
    println!(
        "    or:  curl -s -X POST {url}/tasks -H 'content-type: application/json' -d '{{\"prompt\":\"Say hello\"}}'"
    );

    let token = shutdown::on_signal();
    let (intake, workers) = tokio::join!(
        app.run_until_stopped(token.clone()),
        pool.run(token.clone())
    );
    intake.context("the intake stopped with an error")?;
    workers.context("the worker pool stopped with an error")?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the intake only, against NATS and Redis.
///
/// # Errors
/// Bad configuration, unreachable backends, a port in use.
pub async fn producer(config_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config_file)?;
    telemetry::init(&settings.log);
    let backends = connect_networked(&settings).await?;
    let app = claudecluster_producer::Application::build(settings, backends).await?;
    tracing::info!(port = app.port(), "intake listening");
    app.run_until_stopped(shutdown::on_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a worker pool only, against NATS and Redis.
///
/// # Errors
/// Bad configuration, unreachable backends, a port in use.
pub async fn consumer(config_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config_file)?;
    telemetry::init(&settings.log);
    let backends = connect_networked(&settings).await?;
    let app = claudecluster_consumer::Application::build(settings, backends).await?;
    tracing::info!(port = app.port(), "worker listening");
    app.run_until_stopped(shutdown::on_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

fn apply_args(settings: &mut Settings, args: &ServeArgs) {
    if let Some(host) = &args.host {
        settings.server.host.clone_from(host);
    }
    if let Some(port) = args.port {
        settings.server.port = port;
    }
    if let Some(dir) = &args.data_dir {
        settings.embedded.data_dir = Some(dir.clone());
    }
    if let Some(executor) = args.executor {
        settings.worker.executor = Some(executor);
    }
    match args.workers {
        Some(n) => settings.worker.concurrency = n,
        // A single node uses the whole machine unless told otherwise.
        None if !concurrency_configured() => {
            settings.worker.concurrency =
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        }
        None => {}
    }
}

fn concurrency_configured() -> bool {
    [
        "WORKER_CONCURRENCY",
        "MAX_CONCURRENT_TASKS",
        "CLAUDECLUSTER_WORKER__CONCURRENCY",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Picks `claude` when the CLI is installed and no executor is configured,
/// `echo` otherwise; returns a note for the start-up banner.
fn choose_executor(settings: &mut Settings) -> Option<String> {
    if settings.worker.executor.is_some() {
        return None;
    }
    if find_on_path(&settings.worker.claude.binary).is_some() {
        settings.worker.executor = Some(ExecutorKind::Claude);
        None
    } else {
        settings.worker.executor = Some(ExecutorKind::Echo);
        Some(format!(
            "the Claude Code CLI ({}) is not on PATH, so tasks are echoed back. \
             Install it (npm install -g @anthropic-ai/claude-code), set ANTHROPIC_API_KEY, \
             and restart, or set CLAUDE_BIN to its path and TASK_EXECUTOR=claude.",
            settings.worker.claude.binary
        ))
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let candidate = Path::new(program);
    if candidate.components().count() > 1 {
        return candidate.is_file().then(|| candidate.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

async fn open_backends(settings: &Settings) -> anyhow::Result<(Backends, String)> {
    match (&settings.nats.url, &settings.redis.url) {
        (Some(_), Some(_)) => {
            let backends = connect_networked(settings).await?;
            let description = backends.description.clone();
            Ok((backends, description))
        }
        (None, None) => {
            let backends = claudecluster_engine::embedded::open_embedded(settings)
                .context("failed to open the embedded queue and store")?;
            let description = format!("embedded, {}", backends.description);
            Ok((backends, description))
        }
        (Some(_), None) => anyhow::bail!(
            "NATS_URL is set but REDIS_URL is not: set both to use NATS and Redis, or neither for the embedded queue and store"
        ),
        (None, Some(_)) => anyhow::bail!(
            "REDIS_URL is set but NATS_URL is not: set both to use NATS and Redis, or neither for the embedded queue and store"
        ),
    }
}

fn display_host(host: &str) -> &str {
    match host {
        "0.0.0.0" | "::" => "127.0.0.1",
        other => other,
    }
}
