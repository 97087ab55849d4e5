//! `claudecluster-rawbench`: measures the raw JetStream + Redis pipeline
//! (the ceiling ClaudeCluster is compared with), and deletes benchmark
//! streams and keys. See `loadtest/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use claudecluster_loadtest::cli::{parse_duration, write_json};
use claudecluster_loadtest::raw::{self, RawConfig};
use claudecluster_loadtest::target::{check_target, check_targets};

/// The raw pipeline benchmark.
#[derive(Debug, Parser)]
#[command(name = "claudecluster-rawbench", version)]
struct Cli {
    /// NATS server.
    #[arg(
        long,
        global = true,
        default_value = "nats://127.0.0.1:4222",
        env = "NATS_URL"
    )]
    nats_url: String,
    /// Redis server.
    #[arg(
        long,
        global = true,
        default_value = "redis://127.0.0.1:6379",
        env = "REDIS_URL"
    )]
    redis_url: String,
    /// Allow non-loopback servers.
    #[arg(long, global = true)]
    allow_remote: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pushes COUNT messages through publish -> pull -> Redis SET -> ack,
    /// publishing and consuming at once, and reports the rates.
    Run {
        /// Messages.
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        /// Unconfirmed publishes at most.
        #[arg(long, default_value_t = 1024)]
        window: usize,
        /// Messages per pull and per Redis pipeline.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Concurrent pull loops.
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        /// Wait for the server to confirm every ack.
        #[arg(long)]
        double_ack: bool,
        /// Give every publish a `Nats-Msg-Id` (the stream's duplicate
        /// window then tracks it), as the intake does.
        #[arg(long)]
        msg_ids: bool,
        /// Have the stream republish each stored message's headers (an
        /// announcement per message), to measure what that costs the server.
        #[arg(long)]
        republish: bool,
        /// Give up after this long.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        max_duration: Duration,
        /// Report the CPU time of this process per message, as NAME=PID;
        /// repeat for several.
        #[arg(long = "watch-pid")]
        watch: Vec<String>,
        /// Name of the stream and key prefix (default: a unique one).
        #[arg(long)]
        name: Option<String>,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Waits until work-queue streams are empty (every message acked);
    /// exits 1 if some are left after the timeout.
    WaitDrained {
        /// A stream to watch; repeat for several.
        #[arg(long = "stream", required = true)]
        streams: Vec<String>,
        /// Give up after this long.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Deletes streams and every key under the given prefixes.
    Cleanup {
        /// A stream to delete; repeat for several.
        #[arg(long = "stream")]
        streams: Vec<String>,
        /// A Redis key prefix whose keys to delete; repeat for several.
        #[arg(long = "key-prefix")]
        key_prefixes: Vec<String>,
    },
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    check_targets(&cli.nats_url, cli.allow_remote)?;
    check_target(&cli.redis_url, cli.allow_remote)?;
    match cli.command {
        Command::Run {
            count,
            window,
            batch,
            consumers,
            double_ack,
            msg_ids,
            republish,
            max_duration,
            watch,
            name,
            json,
        } => {
            let name = name.unwrap_or_else(|| {
                let id = uuid::Uuid::new_v4().simple().to_string();
                format!("CCRAW_{}", &id[..12])
            });
            let config = RawConfig {
                nats_url: cli.nats_url,
                redis_url: cli.redis_url,
                name,
                count,
                window,
                batch,
                consumers,
                double_ack,
                msg_ids,
                republish,
                max_duration,
                watch,
            };
            let report = raw::run(&config)
                .await
                .context("the raw benchmark failed")?;
            print!("{}", report.table());
            if let Some(path) = json {
                write_json(&path, &report)?;
            }
        }
        Command::WaitDrained { streams, timeout } => {
            let left = raw::wait_drained(&cli.nats_url, &streams, timeout)
                .await
                .context("cannot read the streams")?;
            if left > 0 {
                anyhow::bail!("{left} message(s) still queued after {timeout:?}");
            }
        }
        Command::Cleanup {
            streams,
            key_prefixes,
        } => {
            let cleaned = raw::cleanup(&cli.nats_url, &cli.redis_url, &streams, &key_prefixes)
                .await
                .context("cleanup failed")?;
            println!(
                "deleted {} stream(s) and {} key(s)",
                cleaned.streams, cleaned.keys
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
        .and_then(|rt| rt.block_on(execute(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("claudecluster-rawbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
