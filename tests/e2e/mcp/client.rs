//! The harness of the MCP tests: runs the client scripts as processes and
//! reads their events, and makes tasks that finish only when a test lets
//! them.

use std::path::Path;
use std::process::Stdio;
use std::sync::Once;
use std::time::Duration;

use claudecluster_engine::config::{ExecutorKind, Settings};
use claudecluster_tests::{TestCluster, workspace_root};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Longest a client may stay silent before the test gives up on it.
pub(super) const CLIENT_SILENCE: Duration = Duration::from_secs(90);

/// Installs the client SDKs once per test process (quick when they are).
pub(super) fn ensure_clients() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let script = workspace_root().join("scripts/install-test-clients");
        let output = std::process::Command::new(&script)
            .output()
            .expect("run scripts/install-test-clients");
        assert!(
            output.status.success(),
            "scripts/install-test-clients failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// A running client script and the events it has printed.
pub(super) struct ClientRun {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    name: String,
}

impl ClientRun {
    pub(super) fn spawn(program: &Path, args: &[&str]) -> Self {
        ensure_clients();
        let mut child = Command::new(program)
            .args(args)
            .current_dir(workspace_root().join("tests/clients"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
            name: format!("{} {}", program.display(), args.join(" ")),
        }
    }

    /// The TypeScript SDK client running `scenario`.
    pub(super) fn typescript(scenario: &str, target: &[&str]) -> Self {
        let script = workspace_root().join("tests/clients/mcp-client.mjs");
        let script = script.to_str().expect("UTF-8 path");
        let args: Vec<&str> = [script, scenario]
            .into_iter()
            .chain(target.iter().copied())
            .collect();
        Self::spawn(Path::new("node"), &args)
    }

    /// The Python SDK client running `scenario`.
    pub(super) fn python(scenario: &str, target: &[&str]) -> Self {
        let script = workspace_root().join("tests/clients/mcp_client.py");
        let script = script.to_str().expect("UTF-8 path");
        let args: Vec<&str> = [script, scenario]
            .into_iter()
            .chain(target.iter().copied())
            .collect();
        Self::spawn(&workspace_root().join("target/test-venv/bin/python"), &args)
    }

    /// The next event; panics when the client fails or goes quiet.
    pub(super) async fn event(&mut self) -> Value {
        let line = tokio::time::timeout(CLIENT_SILENCE, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{}: no event within {CLIENT_SILENCE:?}", self.name))
            .expect("read the client's output")
            .unwrap_or_else(|| panic!("{}: ended without the expected event", self.name));
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", self.name));
        assert_ne!(event["event"], "failed", "{}: {event}", self.name);
        event
    }

    /// The next event, which must be `name`.
    pub(super) async fn expect(&mut self, name: &str) -> Value {
        let event = self.event().await;
        assert_eq!(event["event"], name, "{}: {event}", self.name);
        event
    }

    /// Lets a client that waits for a line on its standard input go on.
    pub(super) async fn proceed(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(b"go on\n")
            .await
            .expect("write to the client");
        stdin.flush().await.expect("write to the client");
    }

    /// Waits for the client to exit successfully.
    pub(super) async fn finish(mut self) {
        let status = self.child.wait().await.expect("wait for the client");
        assert!(status.success(), "{} exited with {status}", self.name);
    }
}

/// The `command` executor running a task only once the test lets it: it
/// waits for a `release` file in `dir`, removes it, and echoes the prompt.
pub(super) fn held_tasks(s: &mut Settings, dir: &Path) {
    let release = dir.join("release");
    let release = release.to_str().expect("UTF-8 path");
    s.worker.executor = Some(ExecutorKind::Command);
    s.worker.command = vec![
        "sh".into(),
        "-c".into(),
        format!("while [ ! -e '{release}' ]; do sleep 0.05; done; rm -f '{release}'; cat"),
    ];
}

/// The endpoint of a cluster's intake.
pub(super) fn mcp_url(cluster: &TestCluster) -> String {
    format!("{}/mcp", cluster.base_url)
}

/// The `claudecluster` command, to run as a stdio MCP server.
pub(super) fn claudecluster_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cc-e2e-node")
}

/// Follows a `flow` scenario to its end: adds a worker pool when the task
/// is reported queued and none runs yet, releases the task when it is
/// reported running. Returns the events `tools`, `submitted` and `done`.
pub(super) async fn follow(
    client: &mut ClientRun,
    cluster: &mut TestCluster,
    dir: &Path,
) -> [Value; 3] {
    let tools = client.expect("tools").await;
    let submitted = client.expect("submitted").await;
    let mut pools = 0;
    loop {
        let event = client.event().await;
        match event["event"].as_str() {
            Some("progress") => {
                let message = event["message"].as_str().unwrap_or_default();
                if message == "queued" && pools == 0 {
                    cluster.add_pool().await;
                    pools += 1;
                } else if message.starts_with("running") {
                    std::fs::write(dir.join("release"), b"").expect("release the task");
                }
            }
            Some("done") => return [tools, submitted, event],
            _ => panic!("unexpected event {event}"),
        }
    }
}

/// The progress messages of a `done` event, checking the progress values
/// only ever grow.
pub(super) fn progress_messages(done: &Value) -> Vec<String> {
    let steps = done["progress"].as_array().expect("progress list");
    let values: Vec<f64> = steps
        .iter()
        .map(|p| p["progress"].as_f64().unwrap())
        .collect();
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "progress must increase: {values:?}"
    );
    steps
        .iter()
        .map(|p| p["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Checks the progress a TypeScript client saw for a task that ran once and
/// succeeded: `queued`, then `running`, then `succeeded`, where the last may
/// be missing. The TypeScript SDK runs notification handlers a microtask
/// later but handles a response at once, dropping the request's progress
/// handler: when the last progress notification and the answer arrive in
/// one read (a busy machine), the client loses it although the intake sent
/// it first. The answer carries the final state either way.
pub(super) fn assert_typescript_progress(messages: &[String], running: &str) {
    let expected = ["queued", running, "succeeded"];
    assert!(
        messages.len() >= 2 && messages.iter().zip(expected).all(|(m, e)| m == e),
        "{messages:?}"
    );
}
