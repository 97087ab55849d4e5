//! `claudecluster mcp`: ClaudeCluster's MCP tools on standard input and
//! output, for clients that start their MCP servers as a command:
//!
//! ```text
//! claude mcp add claudecluster -- claudecluster mcp --url http://intake:3000
//! ```
//!
//! It relays to a running intake's `/mcp` endpoint rather than being a
//! second server over NATS and Redis: each JSON-RPC request read from
//! standard input is POSTed there, and every message of the answer
//! (progress notifications, then the result) is written to standard output,
//! one per line. The intake stays the single source of truth for what the
//! tools are and do (schemas, validation, limits, the wait loop), so the
//! two transports cannot drift apart; it works the same against
//! `claudecluster serve`, whose embedded database only that process may
//! open, and against a cluster; and a developer's machine needs the intake's
//! URL, not broker and store credentials.
//!
//! The intake keeps no session, so a client's `notifications/cancelled` is
//! turned into closing the HTTP request it names, which the intake treats as
//! the cancellation of that call. At the end of standard input the relay
//! lets the calls in progress finish and exits; on SIGTERM or Ctrl-C it
//! abandons them.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use claudecluster_engine::config::Settings;
use claudecluster_engine::{shutdown, telemetry};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest message accepted on standard input (the intake's default body
/// limit).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Requests relayed at once; reading standard input pauses beyond this.
pub const MAX_IN_FLIGHT: usize = 64;

/// JSON-RPC: the line is not JSON.
const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: not a valid request.
const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC: the intake could not be asked.
const INTERNAL_ERROR: i64 = -32603;
/// `_meta` key of a request's protocol version (2026-07-28 and later).
const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// Options of `claudecluster mcp`.
#[derive(Debug, Clone, clap::Args)]
pub struct McpArgs {
    /// The intake's address; its `/mcp` endpoint is used.
    #[arg(
        long,
        env = "CLAUDECLUSTER_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub url: String,
}

/// Relays standard input and output to the intake until standard input
/// ends (after the calls in progress finish) or a signal arrives.
///
/// # Errors
/// Bad configuration, an unusable URL, or standard output closing.
pub async fn mcp(config_file: Option<&Path>, args: McpArgs) -> anyhow::Result<ExitCode> {
    // Logs go to standard error; standard output carries only MCP messages.
    let settings = Settings::load(config_file)?;
    telemetry::init(&settings.log);
    let relay = Relay::new(&args.url)?;
    tracing::info!(endpoint = %relay.endpoint, "relaying MCP over standard input and output");
    relay
        .run(
            tokio::io::stdin(),
            tokio::io::stdout(),
            shutdown::on_signal(),
        )
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// The MCP endpoint of the intake at `url` (`http://host:port` or the
/// endpoint itself).
///
/// # Errors
/// When `url` is not an http(s) URL.
pub fn endpoint(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    anyhow::ensure!(
        url.starts_with("http://") || url.starts_with("https://"),
        "--url must be the intake's http:// address, not {url:?}"
    );
    Ok(if url.ends_with("/mcp") {
        url.to_owned()
    } else {
        format!("{url}/mcp")
    })
}

/// Relays JSON-RPC lines to one intake.
#[derive(Debug, Clone)]
pub struct Relay {
    http: reqwest::Client,
    endpoint: String,
    /// The protocol version the client and the intake agreed at
    /// `initialize`; later requests carry it as `MCP-Protocol-Version`.
    version: Arc<Mutex<Option<String>>>,
    /// Requests in progress by id (`Value::to_string`), to cancel them.
    in_flight: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl Relay {
    /// A relay to the intake at `url`.
    ///
    /// # Errors
    /// When `url` is not usable or the HTTP client cannot be built.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            // No overall timeout: wait_for_task blocks for minutes; the
            // intake bounds every call.
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Self {
            http,
            endpoint: endpoint(url)?,
            version: Arc::default(),
            in_flight: Arc::default(),
        })
    }

    /// Reads messages from `input` and writes answers to `output` until
    /// `input` ends and the calls in progress finish, or `stop` is
    /// cancelled.
    ///
    /// # Errors
    /// When `input` cannot be read or `output` cannot be written.
    pub async fn run(
        &self,
        input: impl AsyncRead + Unpin,
        output: impl AsyncWrite + Unpin + Send + 'static,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let (out, lines) = mpsc::channel::<String>(256);
        let writer = tokio::spawn(write_lines(output, lines));
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let tasks = TaskTracker::new();
        let mut input = BufReader::new(input);
        let read = loop {
            let line = tokio::select! {
                () = stop.cancelled() => break Ok(()),
                line = read_line(&mut input) => line,
            };
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let Some(request) = self.dispatch(line, &out).await else {
                continue;
            };
            let permit = tokio::select! {
                () = stop.cancelled() => break Ok(()),
                permit = Arc::clone(&limit).acquire_owned() => permit?,
            };
            let relay = self.clone();
            let out = out.clone();
            tasks.spawn(async move {
                relay.forward(request, &out).await;
                drop(permit);
            });
        };
        if stop.is_cancelled() {
            self.cancel_all();
        }
        tasks.close();
        tokio::select! {
            () = tasks.wait() => {}
            () = stop.cancelled() => {
                self.cancel_all();
                tasks.wait().await;
            }
        }
        drop(out);
        writer.await.context("the output writer panicked")??;
        read
    }

    /// Handles one line: answers what needs no intake, and returns the
    /// requests to forward.
    async fn dispatch(&self, line: Vec<u8>, out: &mpsc::Sender<String>) -> Option<Request> {
        let message: Value = match serde_json::from_slice(&line) {
            Ok(message) => message,
            Err(e) => {
                emit(
                    out,
                    error(&Value::Null, PARSE_ERROR, format!("parse error: {e}")),
                )
                .await;
                return None;
            }
        };
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let id = message.get("id").cloned().filter(|id| !id.is_null());
        match (method, id) {
            (Some(method), Some(id)) => {
                let cancel = CancellationToken::new();
                self.lock_in_flight().insert(id.to_string(), cancel.clone());
                Some(Request {
                    id,
                    method,
                    message,
                    cancel,
                })
            }
            (Some(method), None) if method == "notifications/cancelled" => {
                let id = message.pointer("/params/requestId").cloned();
                if let Some(cancel) =
                    id.and_then(|id| self.lock_in_flight().remove(&id.to_string()))
                {
                    cancel.cancel();
                }
                None
            }
            (Some(method), None) => {
                // Other notifications go on; nobody waits for an answer.
                let relay = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay.post(&message, &method).await {
                        tracing::debug!(error = %e, method, "notification not delivered");
                    }
                });
                None
            }
            (None, Some(id))
                if message.get("result").is_some() || message.get("error").is_some() =>
            {
                tracing::debug!(%id, "dropping a response: the intake sends no requests");
                None
            }
            (None, id) => {
                let id = id.unwrap_or(Value::Null);
                let text = "invalid request: a JSON-RPC message needs a method";
                emit(out, error(&id, INVALID_REQUEST, text.into())).await;
                None
            }
        }
    }

    /// Sends one request and relays its answer; on a failure, answers with
    /// a JSON-RPC error naming the intake; when cancelled, answers nothing.
    async fn forward(&self, request: Request, out: &mpsc::Sender<String>) {
        let Request {
            id,
            method,
            message,
            cancel,
        } = request;
        let outcome = tokio::select! {
            // Dropping the exchange closes the request, which cancels the
            // call on the intake.
            () = cancel.cancelled() => None,
            outcome = self.exchange(&id, &method, &message, out) => Some(outcome),
        };
        self.lock_in_flight().remove(&id.to_string());
        match outcome {
            None | Some(Ok(true)) => {}
            Some(Ok(false)) => {
                let text = format!(
                    "the intake at {} ended its answer without a result",
                    self.endpoint
                );
                emit(out, error(&id, INTERNAL_ERROR, text)).await;
            }
            Some(Err(e)) => {
                let text = format!("the intake at {} did not answer: {e:#}", self.endpoint);
                emit(out, error(&id, INTERNAL_ERROR, text)).await;
            }
        }
    }

    /// POSTs `message` and writes each message of the answer; `true` when
    /// the answer to `id` was among them.
    async fn exchange(
        &self,
        id: &Value,
        method: &str,
        message: &Value,
        out: &mpsc::Sender<String>,
    ) -> anyhow::Result<bool> {
        let mut response = self.post(message, method).await?;
        let status = response.status();
        let is_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut answered = false;
        let mut relay = |mut message: Value| {
            let is_answer = message.get("result").is_some() || message.get("error").is_some();
            if is_answer {
                // An error answer to a malformed request may carry no id.
                if message.get("id").is_none_or(Value::is_null) {
                    message["id"] = id.clone();
                }
                answered |= message.get("id") == Some(id);
                if method == "initialize"
                    && let Some(version) = message.pointer("/result/protocolVersion")
                {
                    *self.lock_version() = version.as_str().map(str::to_owned);
                }
            }
            message.to_string()
        };
        if is_stream && status.is_success() {
            let mut events = SseEvents::default();
            while let Some(chunk) = response.chunk().await.context("the answer broke off")? {
                for data in events.push(&chunk) {
                    match serde_json::from_str::<Value>(&data) {
                        Ok(message) => emit(out, relay(message)).await,
                        Err(e) => tracing::warn!(error = %e, "skipping an event that is not JSON"),
                    }
                }
            }
            return Ok(answered);
        }
        let body = response.text().await.context("the answer broke off")?;
        match serde_json::from_str::<Value>(&body) {
            Ok(message) if message.get("jsonrpc").is_some() => {
                emit(out, relay(message)).await;
                Ok(answered)
            }
            _ => anyhow::bail!("HTTP {status}: {}", body.trim()),
        }
    }

    /// POSTs one message with the headers the Streamable HTTP transport
    /// asks for.
    async fn post(&self, message: &Value, method: &str) -> anyhow::Result<reqwest::Response> {
        let mut request = self
            .http
            .post(&self.endpoint)
            .header(
                reqwest::header::ACCEPT,
                "application/json, text/event-stream",
            )
            .json(message);
        let version = message
            .pointer(&format!(
                "/params/_meta/{}",
                META_PROTOCOL_VERSION.replace('/', "~1")
            ))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                (method != "initialize")
                    .then(|| self.lock_version().clone())
                    .flatten()
            });
        if let Some(version) = version {
            request = request.header("MCP-Protocol-Version", version);
        }
        for (name, value) in standard_headers(method, message) {
            request = request.header(name, value);
        }
        request.send().await.context("cannot reach it")
    }

    fn cancel_all(&self) {
        for (_, cancel) in self.lock_in_flight().drain() {
            cancel.cancel();
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        // A panic while holding the lock leaves a map that is still valid.
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_version(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A request read from standard input, on its way to the intake.
#[derive(Debug)]
struct Request {
    id: Value,
    method: String,
    message: Value,
    cancel: CancellationToken,
}

/// The SEP-2243 headers (`Mcp-Method`, `Mcp-Name`) that the 2026-07-28
/// protocol requires on each request and older ones ignore. A value that is
/// not plain visible ASCII is left out; the intake's tool names never are.
fn standard_headers(method: &str, message: &Value) -> Vec<(&'static str, String)> {
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    let mut headers = Vec::new();
    if plain(method) {
        headers.push(("Mcp-Method", method.to_owned()));
    }
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
        _ => return headers,
    };
    if let Some(name) = message
        .pointer(&format!("/params/{key}"))
        .and_then(Value::as_str)
        .filter(|n| plain(n))
    {
        headers.push(("Mcp-Name", name.to_owned()));
    }
    headers
}

/// Splits a server-sent event stream into the `data` of its events.
#[derive(Debug, Default)]
struct SseEvents {
    buffer: Vec<u8>,
    data: Vec<String>,
}

impl SseEvents {
    /// Adds `chunk` and returns the data of every event it completed.
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(chunk);
        let mut done = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                // A blank line ends the event.
                if !self.data.is_empty() {
                    done.push(std::mem::take(&mut self.data).join("\n"));
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                self.data
                    .push(value.strip_prefix(' ').unwrap_or(value).to_owned());
            }
            // Comments (keep-alives), `id:`, `event:` and `retry:` carry no
            // message.
        }
        done
    }
}

/// Reads one line (without its newline) of at most [`MAX_MESSAGE_BYTES`];
/// `None` at the end of input. A longer line is skipped and reported as an
/// empty one, which then fails to parse as JSON.
async fn read_line(input: &mut (impl AsyncBufReadExt + Unpin)) -> anyhow::Result<Option<Vec<u8>>> {
    loop {
        let mut line = Vec::new();
        let read = (&mut *input)
            .take(MAX_MESSAGE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .context("failed to read standard input")?;
        if read == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_MESSAGE_BYTES {
            // Discard the rest of the over-long line.
            let mut rest = Vec::new();
            input.read_until(b'\n', &mut rest).await?;
            tracing::warn!(
                limit = MAX_MESSAGE_BYTES,
                "skipping a message over the size limit"
            );
            return Ok(Some(Vec::new()));
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            return Ok(Some(line));
        }
    }
}

async fn write_lines(
    mut output: impl AsyncWrite + Unpin,
    mut lines: mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    while let Some(line) = lines.recv().await {
        output.write_all(line.as_bytes()).await?;
        output.write_all(b"\n").await?;
        output
            .flush()
            .await
            .context("failed to write standard output")?;
    }
    Ok(())
}

async fn emit(out: &mpsc::Sender<String>, line: String) {
    // The writer only goes away when standard output is closed; nobody is
    // left to read the line then.
    let _ = out.send(line).await;
}

fn error(id: &Value, code: i64, message: String) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("http://h:3000").unwrap(), "http://h:3000/mcp");
        assert_eq!(endpoint("http://h:3000/").unwrap(), "http://h:3000/mcp");
        assert_eq!(endpoint("http://h/mcp").unwrap(), "http://h/mcp");
        assert!(endpoint("h:3000").is_err());
    }

    #[test]
    fn events_split_across_chunks() {
        let mut events = SseEvents::default();
        assert!(events.push(b"data: {\"a\":").is_empty());
        assert!(events.push(b"1}\r\n").is_empty());
        assert_eq!(
            events.push(b"\r\n: keep-alive\n\nid: 3\ndata: 2\n\n"),
            ["{\"a\":1}", "2"]
        );
    }

    #[test]
    fn standard_headers_name_the_tool() {
        let call = json!({"params": {"name": "get_task"}});
        assert_eq!(
            standard_headers("tools/call", &call),
            [
                ("Mcp-Method", "tools/call".to_owned()),
                ("Mcp-Name", "get_task".to_owned())
            ]
        );
        let odd = json!({"params": {"name": "é x"}});
        assert_eq!(standard_headers("tools/call", &odd).len(), 1);
        assert_eq!(standard_headers("ping", &json!({})).len(), 1);
    }

    #[tokio::test]
    async fn lines_are_bounded_and_blank_ones_skipped() {
        let input = b"\n  \n{\"a\":1}\r\n".to_vec();
        let mut reader = BufReader::new(&input[..]);
        assert_eq!(read_line(&mut reader).await.unwrap().unwrap(), b"{\"a\":1}");
        assert!(read_line(&mut reader).await.unwrap().is_none());
    }
}
