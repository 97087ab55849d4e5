//! Command-line interface of `claudecluster-loadgen`: the arguments, and
//! what each subcommand does with them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use claudecluster_engine::task::NewTask;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::SubmitApi;
use crate::drive::{Load, RunConfig};
use crate::http::Endpoint;
use crate::observe::ObserveMode;
use crate::rss::ProcessMemory;
use crate::summary::{BenchInputs, BenchSummary};
use crate::target::check_target;

/// Drives a running ClaudeCluster intake over HTTP and reports throughput
/// and latency (submit, queue wait, end to end) with HDR percentiles.
#[derive(Debug, Parser)]
#[command(name = "claudecluster-loadgen", version)]
pub struct Cli {
    /// Worker threads of the generator's runtime. One keeps the generator
    /// from taking more than one core from the system it measures.
    #[arg(long, global = true, default_value_t = 1, env = "LOADGEN_THREADS")]
    pub threads: usize,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Closed loop: COUNT tasks as fast as CONCURRENCY senders go.
    Closed {
        /// Tasks to submit.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Requests in flight at once (one connection each).
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Settings shared by both loops.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Open loop: RATE tasks per second for DURATION, latency measured from
    /// each request's intended send time.
    Open {
        /// Tasks per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// How long to send (`10s`, `500ms`, `2m`).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Requests in flight at most.
        #[arg(long, default_value_t = 1024)]
        max_in_flight: usize,
        /// Settings shared by both loops.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Prints the memory (VmRSS, VmHWM) of processes, as JSON.
    Rss {
        /// A process to read, as NAME=PID; repeat for several.
        #[arg(long = "pid", required = true)]
        pids: Vec<String>,
        /// Also write the JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Combines the JSON files of one benchmark run into the summary table
    /// with ratios and targets.
    Summarize {
        /// `claudecluster-rawbench --json` output.
        #[arg(long)]
        raw: Option<PathBuf>,
        /// Closed-loop single-submit report.
        #[arg(long)]
        single: Option<PathBuf>,
        /// Closed-loop batch-submit report.
        #[arg(long)]
        batch: Option<PathBuf>,
        /// Open-loop report at the steady rate.
        #[arg(long)]
        latency: Option<PathBuf>,
        /// `rss` output taken before the load.
        #[arg(long)]
        memory_idle: Option<PathBuf>,
        /// `rss` output taken after the load.
        #[arg(long)]
        memory_load: Option<PathBuf>,
        /// Write the combined JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// How completion is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObserveArg {
    /// Subscribe to the result store's task events in Redis (no load on the
    /// intake).
    Redis,
    /// Poll GET /tasks/{id} (loads the intake; throughput reads lower).
    Http,
    /// Measure submits only.
    None,
}

/// Settings shared by the closed and open loops.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Base URL of the intake.
    #[arg(long, default_value = "http://127.0.0.1:3000", env = "LOADGEN_URL")]
    pub url: String,
    /// Submit through POST /tasks/batch with this many tasks per request
    /// (default: POST /tasks, one task per request).
    #[arg(long)]
    pub batch: Option<usize>,
    /// The prompt of every task.
    #[arg(long, default_value = "loadgen")]
    pub prompt: String,
    /// The priority of every task (1 to 10).
    #[arg(long, default_value_t = 5)]
    pub priority: u8,
    /// How completion is observed.
    #[arg(long, value_enum, default_value_t = ObserveArg::Redis)]
    pub observe: ObserveArg,
    /// The Redis of the result store (for `--observe redis`).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The result store's key prefix (`REDIS_KEY_PREFIX` of the system).
    #[arg(long, default_value = "claudecluster:")]
    pub key_prefix: String,
    /// Stop sending after this long, whatever is left.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub max_duration: Duration,
    /// Closed loop: pause sending while this many accepted tasks are
    /// unfinished (measures the sustained rate instead of filling a queue).
    #[arg(long)]
    pub max_backlog: Option<u64>,
    /// After the last send, wait this long for tasks to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for the run in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// Allow non-loopback targets (only against systems you own).
    #[arg(long)]
    pub allow_remote: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Exit with status 1 unless every task was accepted and succeeded.
    #[arg(long)]
    pub require_success: bool,
    /// Report the CPU time this process used per task, as NAME=PID; repeat
    /// for several (the generator's own is always reported).
    #[arg(long = "watch-pid")]
    pub watch: Vec<String>,
}

/// A duration that is not `<number><unit>`.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {0:?}: expected a number with a unit, like 500ms, 10s or 2m")]
pub struct DurationError(String);

/// Parses `250ms`, `10s`, `1.5s`, `2m`, `1h` (a bare number is seconds).
///
/// # Errors
/// [`DurationError`] for anything else.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| DurationError(s.to_owned()))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(DurationError(s.to_owned())),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| DurationError(s.to_owned()))
}

/// Runs a subcommand; the result is the process exit status.
///
/// # Errors
/// Whatever stopped the command: an unreachable target, a refused remote
/// URL, an unreadable or unwritable file.
pub async fn execute(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Closed {
            count,
            concurrency,
            common,
        } => load(common, Load::Closed { count, concurrency }).await,
        Command::Open {
            rate,
            duration,
            max_in_flight,
            common,
        } => {
            load(
                common,
                Load::Open {
                    rate_per_s: rate,
                    duration,
                    max_in_flight,
                },
            )
            .await
        }
        Command::Rss { pids, json } => {
            let mut out = Vec::new();
            for spec in &pids {
                let (name, pid) = crate::rss::parse_spec(spec)?;
                out.push(ProcessMemory::read(&name, pid)?);
            }
            let text = serde_json::to_string_pretty(&out)?;
            println!("{text}");
            if let Some(path) = json {
                write_json(&path, &out)?;
            }
            Ok(0)
        }
        Command::Summarize {
            raw,
            single,
            batch,
            latency,
            memory_idle,
            memory_load,
            json,
        } => {
            let summary = BenchSummary::new(BenchInputs {
                raw: read_optional(raw.as_deref())?,
                single: read_optional(single.as_deref())?,
                batch: read_optional(batch.as_deref())?,
                latency: read_optional(latency.as_deref())?,
                memory_idle: read_optional(memory_idle.as_deref())?.unwrap_or_default(),
                memory_load: read_optional(memory_load.as_deref())?.unwrap_or_default(),
            });
            print!("{}", summary.table());
            if let Some(path) = json {
                write_json(&path, &summary)?;
            }
            Ok(if summary.all_pass() { 0 } else { 1 })
        }
    }
}

async fn load(common: CommonArgs, load: Load) -> anyhow::Result<u8> {
    check_target(&common.url, common.allow_remote)?;
    let observe = match common.observe {
        ObserveArg::Redis => {
            check_target(&common.redis_url, common.allow_remote)?;
            ObserveMode::Redis {
                url: common.redis_url.clone(),
                key_prefix: common.key_prefix.clone(),
            }
        }
        ObserveArg::Http => ObserveMode::Http,
        ObserveArg::None => ObserveMode::None,
    };
    let endpoint = Endpoint::resolve(&common.url)
        .await
        .with_context(|| format!("failed to use {}", common.url))?;
    let api = match common.batch {
        Some(size) => SubmitApi::Batch { size },
        None => SubmitApi::Single,
    };
    let label = common.label.clone().unwrap_or_else(|| match &load {
        Load::Closed { .. } => format!("closed-{}", api.label()),
        Load::Open { .. } => format!("open-{}", api.label()),
    });
    let config = RunConfig {
        label,
        endpoint: Arc::new(endpoint),
        api,
        task: NewTask {
            prompt: common.prompt.clone(),
            priority: Some(common.priority),
            ..NewTask::default()
        },
        load,
        max_duration: common.max_duration,
        max_backlog: common.max_backlog,
        drain_timeout: common.drain_timeout,
        observe,
        progress: !common.quiet,
        watch: common.watch.clone(),
    };
    let report = crate::drive::run(config)
        .await
        .context("the load test could not run")?;
    print!("{}", report.table());
    if let Some(path) = &common.json {
        write_json(path, &report)?;
    }
    Ok(if common.require_success && !report.all_succeeded() {
        1
    } else {
        0
    })
}

fn read_optional<T: DeserializeOwned>(path: Option<&Path>) -> anyhow::Result<Option<T>> {
    let Some(path) = path else {
        return Ok(None);
    };
    if !path.exists() {
        // A step of the benchmark that failed leaves no file; the summary
        // shows it as not run instead of failing altogether.
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let value = serde_json::from_str(&text)
        .with_context(|| format!("failed to parse {}", path.display()))?;
    Ok(Some(value))
}

/// Writes `value` as pretty JSON, creating the parent directory.
///
/// # Errors
/// When the file cannot be written.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("failed to write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn arguments_parse() {
        Cli::command_for_tests().debug_assert();
        let cli = Cli::try_parse_from([
            "claudecluster-loadgen",
            "open",
            "--rate",
            "500",
            "--duration",
            "10s",
            "--batch",
            "100",
            "--observe",
            "http",
        ])
        .unwrap();
        match cli.command {
            Command::Open { rate, common, .. } => {
                assert_eq!(rate, 500.0);
                assert_eq!(common.batch, Some(100));
                assert_eq!(common.observe, ObserveArg::Http);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    impl Cli {
        fn command_for_tests() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
