//! A stand-in for the Anthropic Messages API, so the real Claude Code CLI can
//! run fully offline in tests.
//!
//! [`ModelApi::start`] serves `POST /v1/messages` on a loopback port, both
//! streamed (server-sent events, which the CLI uses) and as plain JSON.
//! What it answers is chosen by markers in the prompt, the text of the latest
//! user message, so one server serves many tests at once:
//!
//! - no marker: a text answer, `stand-in answer: <first 80 characters of the
//!   prompt>`, so a test can tell its answer from another's;
//! - `[[api-error]]`: HTTP 400 `invalid_request_error`, which the CLI does not
//!   retry (it tries again without its beta headers, then gives up) and
//!   reports as `is_error: true`; `[[api-error:<status>]]` picks the status
//!   (403 also fails on the first request; 429 and 5xx make the CLI retry
//!   for a long time);
//! - `[[slow:<ms>]]`: waits that long before answering (ends early when the
//!   server stops);
//! - `[[tool-loop]]`: always asks to run a harmless read-only tool (`Glob`),
//!   so the conversation ends only at the CLI's `--max-turns`;
//! - `[[bash:<command>]]`: asks to run `<command>` with the `Bash` tool, then
//!   answers with the default text plus `tool result: <what the tool said>`
//!   (the output, or why permission was denied).
//!
//! `POST /v1/messages/count_tokens` gets an estimate; any other path gets an
//! Anthropic-shaped 404 at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::reply::{Content, Usage, api_error, plain, streamed, tokens};

mod reply;

/// The API key [`ModelApi::cli_env`] gives the CLI; the stand-in accepts any.
pub const API_KEY: &str = "sk-ant-stand-in";

/// How many characters of the prompt the default answer repeats.
const ECHO_CHARS: usize = 80;

/// A running stand-in model API; it stops when dropped.
#[derive(Debug)]
pub struct ModelApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// One `/v1/messages` call as the stand-in saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// The request path and query (`/v1/messages?beta=true`).
    pub uri: String,
    /// The `model` the client asked for.
    pub model: Option<String>,
    /// Whether the client asked for a streamed answer.
    pub stream: bool,
    /// The prompt as the stand-in read it (see the module docs).
    pub prompt: String,
    /// The `x-api-key` header.
    pub api_key: Option<String>,
}

#[derive(Debug)]
struct Shared {
    /// Count of `/v1/messages` calls, published so tests can await it.
    calls: watch::Sender<usize>,
    log: Mutex<Vec<RecordedRequest>>,
    tool_ids: AtomicUsize,
    stop: CancellationToken,
}

impl ModelApi {
    /// Starts the stand-in on `127.0.0.1` at a free port, serving from a
    /// background task of the current runtime.
    ///
    /// # Panics
    /// When no loopback port can be bound, which leaves the test nothing to
    /// run against.
    pub async fn start() -> ModelApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the stand-in model API needs a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            calls: watch::Sender::new(0),
            log: Mutex::new(Vec::new()),
            tool_ids: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .fallback(not_found)
            // The CLI sends its whole conversation and tool list each turn.
            .layer(DefaultBodyLimit::max(32 * 1024 * 1024))
            .with_state(shared.clone());
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            // A failing accept loop only means the tests using it fail with
            // connection errors, which say more than a panic here would.
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        ModelApi { addr, shared }
    }

    /// The URL to give the CLI as `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The variables that make the Claude Code CLI talk to this stand-in,
    /// fully offline: the base URL, a dummy key, and telemetry, update
    /// checks and other background traffic off.
    pub fn cli_env(&self) -> BTreeMap<String, String> {
        [
            ("ANTHROPIC_BASE_URL", self.base_url()),
            ("ANTHROPIC_API_KEY", API_KEY.to_owned()),
            ("DISABLE_TELEMETRY", "1".to_owned()),
            ("DISABLE_AUTOUPDATER", "1".to_owned()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// How many `/v1/messages` calls arrived so far.
    pub fn requests(&self) -> usize {
        *self.shared.calls.borrow()
    }

    /// Every `/v1/messages` call so far, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until at least `n` `/v1/messages` calls have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.shared.calls.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|count| *count >= n).await;
    }
}

impl Drop for ModelApi {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// The real Claude Code CLI from `tests/clients`, installed by
/// `scripts/install-test-clients` (run here once per process when the CLI is
/// missing or stale; the script is quick when there is nothing to do).
///
/// # Panics
/// When the CLI cannot be installed, with the installer's message: the tests
/// that need it cannot run without it.
pub fn claude_cli() -> PathBuf {
    static CLI: OnceLock<PathBuf> = OnceLock::new();
    CLI.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the testkit sits in the workspace")
            .to_path_buf();
        let status = std::process::Command::new(root.join("scripts/install-test-clients"))
            .status()
            .expect("scripts/install-test-clients could not be started");
        assert!(
            status.success(),
            "scripts/install-test-clients failed ({status}): the tests need Node.js and npm"
        );
        root.join("tests/clients/node_modules/.bin/claude")
    })
    .clone()
}

/// What the prompt asks the stand-in to do.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Behaviour {
    delay: Option<Duration>,
    error_status: Option<u16>,
    tool_loop: bool,
    bash: Option<String>,
}

impl Behaviour {
    fn from_prompt(prompt: &str) -> Self {
        let mut behaviour = Behaviour {
            delay: None,
            error_status: None,
            tool_loop: prompt.contains("[[tool-loop]]"),
            bash: None,
        };
        for marker in markers(prompt) {
            if marker == "api-error" {
                behaviour.error_status = Some(400);
            } else if let Some(status) = marker.strip_prefix("api-error:") {
                behaviour.error_status = status.trim().parse().ok().or(Some(400));
            } else if let Some(command) = marker.strip_prefix("bash:") {
                behaviour.bash = Some(command.to_owned());
            } else if let Some(ms) = marker.strip_prefix("slow:") {
                behaviour.delay = ms.trim().parse().ok().map(Duration::from_millis);
            }
        }
        behaviour
    }
}

/// The contents of every `[[...]]` in `text`.
fn markers(text: &str) -> impl Iterator<Item = &str> {
    text.split("[[")
        .skip(1)
        .filter_map(|rest| rest.split_once("]]").map(|(inner, _)| inner))
}

/// The prompt: the text of the latest user message that has any, leaving out
/// the `<system-reminder>` blocks the CLI adds and skipping messages that only
/// carry tool results.
fn prompt_of(body: &Value) -> String {
    let messages = body["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for message in messages.iter().rev() {
        if message["role"] != "user" {
            continue;
        }
        let text = match &message["content"] {
            Value::String(s) => s.clone(),
            Value::Array(blocks) => blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .filter(|t| !t.trim_start().starts_with("<system-reminder>"))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        if !text.trim().is_empty() {
            return text;
        }
    }
    String::new()
}

/// The text of the tool results in the conversation's last message, when
/// that message carries any (the CLI's answer to a tool use).
fn tool_result_of(body: &Value) -> Option<String> {
    let last = body["messages"].as_array()?.last()?;
    let results: Vec<String> = last["content"]
        .as_array()?
        .iter()
        .filter(|b| b["type"] == "tool_result")
        .map(|b| match &b["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            other => other.to_string(),
        })
        .collect();
    (last["role"] == "user" && !results.is_empty()).then(|| results.join("\n"))
}

/// The default answer for `prompt`.
pub fn answer_for(prompt: &str) -> String {
    let head: String = prompt.trim().chars().take(ECHO_CHARS).collect();
    format!("stand-in answer: {head}")
}

async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return api_error(400, "the request body is not JSON");
    };
    let prompt = prompt_of(&request);
    let stream = request["stream"].as_bool().unwrap_or(false);
    let model = request["model"].as_str().unwrap_or("stand-in").to_owned();
    shared
        .log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(RecordedRequest {
            uri: uri.to_string(),
            model: request["model"].as_str().map(str::to_owned),
            stream,
            prompt: prompt.clone(),
            api_key: headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
    shared.calls.send_modify(|n| *n += 1);

    let behaviour = Behaviour::from_prompt(&prompt);
    if let Some(delay) = behaviour.delay {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.stop.cancelled() => return api_error(503, "the stand-in model API is shutting down"),
        }
    }
    if let Some(status) = behaviour.error_status {
        return api_error(
            status,
            "the stand-in model API rejected this request as asked ([[api-error]])",
        );
    }
    let tool_id = || {
        format!(
            "toolu_standin{:06}",
            shared.tool_ids.fetch_add(1, Ordering::Relaxed)
        )
    };
    let content = match (&behaviour, tool_result_of(&request)) {
        (
            Behaviour {
                tool_loop: true, ..
            },
            _,
        ) => Content::Tool {
            id: tool_id(),
            name: "Glob",
            input: json!({ "pattern": "*.stand-in-tool-loop" }),
        },
        (Behaviour { bash: Some(_), .. }, Some(result)) => {
            Content::Text(format!("{}\ntool result: {result}", answer_for(&prompt)))
        }
        (
            Behaviour {
                bash: Some(command),
                ..
            },
            None,
        ) => Content::Tool {
            id: tool_id(),
            name: "Bash",
            input: json!({ "command": command, "description": "Run the command the prompt names" }),
        },
        _ => Content::Text(answer_for(&prompt)),
    };
    let usage = Usage {
        input: tokens(&prompt),
        output: match &content {
            Content::Text(text) => tokens(text),
            Content::Tool { .. } => 10,
        },
    };
    if stream {
        streamed(&model, &content, usage)
    } else {
        plain(&model, &content, usage)
    }
}

async fn count_tokens(body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return api_error(400, "the request body is not JSON");
    };
    axum::Json(json!({ "input_tokens": tokens(&request.to_string()) })).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    api_error(
        404,
        &format!("the stand-in model API has no {method} {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use axum::http::{StatusCode, header};

    use super::*;

    fn user(content: Value) -> Value {
        json!({ "role": "user", "content": content })
    }

    #[test]
    fn prompt_skips_reminders_tool_results_and_system_messages() {
        let body = json!({ "messages": [
            user(json!([
                { "type": "text", "text": "<system-reminder>\nnoise\n</system-reminder>" },
                { "type": "text", "text": "the question [[tool-loop]]" },
            ])),
            { "role": "assistant", "content": [{ "type": "tool_use", "id": "t", "name": "Glob", "input": {} }] },
            user(json!([{ "type": "tool_result", "tool_use_id": "t", "content": "no files" }])),
            { "role": "system", "content": [{ "type": "text", "text": "# Environment" }] },
        ]});
        assert_eq!(prompt_of(&body), "the question [[tool-loop]]");
        assert_eq!(
            tool_result_of(&body),
            None,
            "the last message is not the user's"
        );
        let messages = body["messages"].as_array().unwrap()[..3].to_vec();
        let body = json!({ "messages": messages });
        assert_eq!(tool_result_of(&body).as_deref(), Some("no files"));
        assert_eq!(
            prompt_of(&json!({ "messages": [user(json!("plain"))] })),
            "plain"
        );
        assert_eq!(prompt_of(&json!({})), "");
    }

    #[test]
    fn markers_choose_the_behaviour() {
        let b = Behaviour::from_prompt("hello");
        assert_eq!((b.delay, b.error_status, b.tool_loop), (None, None, false));
        let b = Behaviour::from_prompt("x [[api-error]] y [[slow:250]]");
        assert_eq!(b.error_status, Some(400));
        assert_eq!(b.delay, Some(Duration::from_millis(250)));
        assert_eq!(
            Behaviour::from_prompt("[[api-error:529]]").error_status,
            Some(529)
        );
        assert!(Behaviour::from_prompt("go [[tool-loop]]").tool_loop);
        let b = Behaviour::from_prompt("[[bash:touch a b]]");
        assert_eq!(b.bash.as_deref(), Some("touch a b"));
        assert_eq!(Behaviour::from_prompt("[[slow:soon]]").delay, None);
    }

    #[test]
    fn answer_repeats_the_start_of_the_prompt() {
        assert_eq!(answer_for("  Hi there \n"), "stand-in answer: Hi there");
        let long = "é".repeat(200);
        assert_eq!(
            answer_for(&long).chars().count(),
            "stand-in answer: ".len() + ECHO_CHARS
        );
    }

    async fn post(api: &ModelApi, path: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}{path}", api.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn answers_plain_json_and_counts_calls() {
        let api = ModelApi::start().await;
        let res = post(
            &api,
            "/v1/messages",
            json!({ "model": "m", "messages": [user(json!("What is up?"))] }),
        )
        .await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["content"][0]["text"], "stand-in answer: What is up?");
        assert_eq!(body["stop_reason"], "end_turn");
        assert_eq!(api.requests(), 1);
        assert_eq!(api.recorded()[0].model.as_deref(), Some("m"));
    }

    #[tokio::test]
    async fn streams_the_event_sequence() {
        let api = ModelApi::start().await;
        let req = json!({ "model": "m", "stream": true, "messages": [user(json!("stream me"))] });
        let res = post(&api, "/v1/messages?beta=true", req).await;
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
        let text = res.text().await.unwrap();
        let events: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            events,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(text.contains("stand-in answer: stream me"), "{text}");
        assert!(api.recorded()[0].stream);
    }

    #[tokio::test]
    async fn errors_tools_and_other_paths() {
        let api = ModelApi::start().await;
        let res = post(
            &api,
            "/v1/messages",
            json!({ "messages": [user(json!("[[api-error]]"))] }),
        )
        .await;
        assert_eq!(res.status(), 400);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");

        let res = post(
            &api,
            "/v1/messages",
            json!({ "messages": [user(json!("[[tool-loop]]"))] }),
        )
        .await;
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["content"][0]["type"], "tool_use");
        assert_eq!(body["stop_reason"], "tool_use");

        let res = post(&api, "/v1/messages/count_tokens", json!({ "messages": [] })).await;
        assert_eq!(res.status(), 200);
        let res = post(&api, "/v1/other", json!({})).await;
        assert_eq!(res.status(), 404);
        assert_eq!(api.requests(), 2, "only /v1/messages calls count");
    }

    #[tokio::test]
    async fn slow_answers_end_when_the_server_stops() {
        let api = ModelApi::start().await;
        let url = format!("{}/v1/messages", api.base_url());
        let call = tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({ "messages": [user(json!("[[slow:600000]]"))] }))
                .send()
                .await
                .map(|r| r.status())
        });
        api.wait_for_requests(1).await;
        drop(api);
        let status = call.await.unwrap();
        assert!(
            matches!(status, Err(_) | Ok(StatusCode::SERVICE_UNAVAILABLE)),
            "{status:?}"
        );
    }
}
