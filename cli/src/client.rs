//! The client subcommands: talk to a running intake over its HTTP API.
//!
//! Human-readable output by default, the API's JSON with `--json`. The exit
//! status says how the task ended: 0 succeeded, 1 any other final state or an
//! error, 3 when `--wait`/`wait` gave up before the task finished.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// Where the intake is, and how to print.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// The intake's address.
    #[arg(
        long,
        env = "CLAUDECLUSTER_URL",
        default_value = "http://127.0.0.1:3000",
        global = true
    )]
    pub url: String,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `claudecluster submit`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// The prompt (use `-` to read it from standard input).
    pub prompt: String,
    /// 1 to 10; 10 runs first.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Hard limit for one attempt, in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Attempts before the task is dead-lettered.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// A JSON object returned with the task.
    #[arg(long)]
    pub metadata: Option<String>,
    /// Submitting again with the same key returns the same task.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait for the result, showing the task's state meanwhile.
    #[arg(long)]
    pub wait: bool,
    /// With `--wait`: give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub wait_secs: u64,
    #[command(flatten)]
    conn: Conn,
}

/// A subcommand that names one task.
#[derive(Debug, Clone, clap::Args)]
pub struct TaskArgs {
    /// The task id.
    pub id: String,
    #[command(flatten)]
    conn: Conn,
}

/// `claudecluster wait`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// The task id.
    pub id: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub wait_secs: u64,
    #[command(flatten)]
    conn: Conn,
}

/// `claudecluster list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only tasks in this state.
    #[arg(long)]
    pub state: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Continue from a previous page.
    #[arg(long)]
    pub cursor: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// `claudecluster dead-letters ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, oldest first.
    List {
        /// Only those after this sequence number.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        conn: Conn,
    },
    /// Put a dead letter back on the queue as a new attempt.
    Replay {
        /// Its sequence number.
        seq: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Discard a dead letter.
    Delete {
        /// Its sequence number.
        seq: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

const FINAL_STATES: &[&str] = &[
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "dead_lettered",
];

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .context("failed to set up the HTTP client")
}

/// Sends a request and returns the status and JSON body; an error body from
/// the API becomes an error naming its code, field and message.
async fn call(req: reqwest::RequestBuilder) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let resp = req
        .send()
        .await
        .context("cannot reach the intake (is `claudecluster serve` running? see --url)")?;
    let status = resp.status();
    let text = resp.text().await.context("failed to read the response")?;
    let body: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    if status.is_client_error() || status.is_server_error() {
        let err = &body["error"];
        let field = err["field"]
            .as_str()
            .map(|f| format!(" (field `{f}`)"))
            .unwrap_or_default();
        bail!(
            "{} {}{}: {}",
            status.as_u16(),
            err["code"].as_str().unwrap_or("error"),
            field,
            err["message"]
                .as_str()
                .map_or_else(|| body.to_string(), str::to_owned)
        );
    }
    Ok((status, body))
}

/// `submit`: posts the task, optionally waits.
///
/// # Errors
/// Unreachable intake, a rejected task, unreadable input.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let prompt = if args.prompt == "-" {
        std::io::read_to_string(std::io::stdin())
            .context("failed to read the prompt from standard input")?
    } else {
        args.prompt.clone()
    };
    let mut body = json!({ "prompt": prompt });
    if let Some(p) = args.priority {
        body["priority"] = p.into();
    }
    if let Some(t) = args.timeout_ms {
        body["timeout_ms"] = t.into();
    }
    if let Some(m) = args.max_attempts {
        body["max_attempts"] = m.into();
    }
    if let Some(m) = &args.metadata {
        body["metadata"] = serde_json::from_str(m).context("--metadata must be a JSON object")?;
    }
    if let Some(k) = &args.idempotency_key {
        body["idempotency_key"] = k.clone().into();
    }
    let client = http()?;
    let (_, record) = call(client.post(format!("{}/tasks", args.conn.url)).json(&body)).await?;
    let id = record["id"]
        .as_str()
        .context("the intake answered without a task id")?
        .to_owned();
    if !args.wait {
        if args.conn.json {
            println!("{record:#}");
        } else {
            println!("{id} {}", record["state"].as_str().unwrap_or("?"));
        }
        return Ok(ExitCode::SUCCESS);
    }
    wait_for(
        &client,
        &args.conn,
        &id,
        Duration::from_secs(args.wait_secs),
    )
    .await
}

/// `get`: shows a task.
///
/// # Errors
/// Unreachable intake, unknown task.
pub async fn get(args: TaskArgs) -> anyhow::Result<ExitCode> {
    let (_, record) = call(http()?.get(format!("{}/tasks/{}", args.conn.url, args.id))).await?;
    print_record(&record, args.conn.json);
    Ok(exit_for(&record))
}

/// `wait`: polls until the task is final.
///
/// # Errors
/// Unreachable intake, unknown task.
pub async fn wait(args: WaitArgs) -> anyhow::Result<ExitCode> {
    wait_for(
        &http()?,
        &args.conn,
        &args.id,
        Duration::from_secs(args.wait_secs),
    )
    .await
}

async fn wait_for(
    client: &reqwest::Client,
    conn: &Conn,
    id: &str,
    limit: Duration,
) -> anyhow::Result<ExitCode> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let mut delay = Duration::from_millis(25);
    loop {
        let (_, record) = call(client.get(format!("{}/tasks/{id}", conn.url))).await?;
        let state = record["state"].as_str().unwrap_or("?");
        spinner.set_message(format!("task {id} {state}"));
        if FINAL_STATES.contains(&state) {
            spinner.finish_and_clear();
            print_record(&record, conn.json);
            return Ok(exit_for(&record));
        }
        if started.elapsed() >= limit {
            spinner.finish_and_clear();
            eprintln!(
                "gave up waiting after {}s; task {id} is {state}",
                limit.as_secs()
            );
            return Ok(ExitCode::from(3));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// `cancel`: cancels a task.
///
/// # Errors
/// Unreachable intake, unknown or finished task.
pub async fn cancel(args: TaskArgs) -> anyhow::Result<ExitCode> {
    let (_, record) =
        call(http()?.post(format!("{}/tasks/{}/cancel", args.conn.url, args.id))).await?;
    print_record(&record, args.conn.json);
    Ok(ExitCode::SUCCESS)
}

/// `list`: recent tasks, newest first.
///
/// # Errors
/// Unreachable intake, a bad filter.
pub async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let mut query = vec![("limit", args.limit.to_string())];
    if let Some(s) = &args.state {
        query.push(("state", s.clone()));
    }
    if let Some(c) = &args.cursor {
        query.push(("cursor", c.clone()));
    }
    let (_, page) = call(
        http()?
            .get(format!("{}/tasks", args.conn.url))
            .query(&query),
    )
    .await?;
    if args.conn.json {
        println!("{page:#}");
    } else {
        for t in page["tasks"].as_array().into_iter().flatten() {
            println!(
                "{}  {:<13} p{:<2} {}",
                t["id"].as_str().unwrap_or("?"),
                t["state"].as_str().unwrap_or("?"),
                t["priority"],
                one_line(t["prompt"].as_str().unwrap_or(""), 60)
            );
        }
        if let Some(next) = page["next_cursor"].as_str() {
            println!("more: --cursor {next}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `workers`: live workers.
///
/// # Errors
/// Unreachable intake.
pub async fn workers(conn: Conn) -> anyhow::Result<ExitCode> {
    let (_, body) = call(http()?.get(format!("{}/workers", conn.url))).await?;
    if conn.json {
        println!("{body:#}");
    } else {
        for w in body["workers"].as_array().into_iter().flatten() {
            println!(
                "{}  {}  {}/{} busy  {}  since {}",
                w["id"].as_str().unwrap_or("?"),
                w["host"].as_str().unwrap_or("?"),
                w["in_flight"],
                w["concurrency"],
                w["executor"].as_str().unwrap_or("?"),
                w["started_at"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dead-letters list|replay|delete`.
///
/// # Errors
/// Unreachable intake, unknown dead letter.
pub async fn dead_letters(cmd: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    let client = http()?;
    match cmd {
        DeadLetterCommand::List { after, limit, conn } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(a) = after {
                query.push(("after", a.to_string()));
            }
            let (_, body) = call(
                client
                    .get(format!("{}/dead-letters", conn.url))
                    .query(&query),
            )
            .await?;
            if conn.json {
                println!("{body:#}");
            } else {
                for d in body["dead_letters"].as_array().into_iter().flatten() {
                    println!(
                        "{:>6}  {}  {}  {}",
                        d["seq"],
                        d["task_id"].as_str().unwrap_or("-"),
                        d["at"].as_str().unwrap_or("?"),
                        d["reason"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        DeadLetterCommand::Replay { seq, conn } => {
            let (_, body) =
                call(client.post(format!("{}/dead-letters/{seq}/replay", conn.url))).await?;
            if conn.json {
                println!("{body:#}");
            } else {
                println!("replayed dead letter {seq}");
            }
        }
        DeadLetterCommand::Delete { seq, conn } => {
            call(client.delete(format!("{}/dead-letters/{seq}", conn.url))).await?;
            if !conn.json {
                println!("deleted dead letter {seq}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_for(record: &Value) -> ExitCode {
    if record["state"] == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_record(record: &Value, json: bool) {
    if json {
        println!("{record:#}");
        return;
    }
    let id = record["id"].as_str().unwrap_or("?");
    let state = record["state"].as_str().unwrap_or("?");
    println!("task {id}: {state} (attempts: {})", record["attempts"]);
    if let Some(err) = record.get("error").filter(|e| !e.is_null()) {
        println!(
            "error: {}: {}",
            err["code"].as_str().unwrap_or("?"),
            err["message"].as_str().unwrap_or("")
        );
    }
    if let Some(out) = record["result"]["output"].as_str() {
        println!("{out}");
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}
