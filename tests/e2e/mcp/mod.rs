//! The MCP intake driven by MCP clients nobody here wrote: the official
//! TypeScript SDK (`tests/clients/mcp-client.mjs`, Streamable HTTP and
//! stdio) and the official Python SDK (`tests/clients/mcp_client.py`), on
//! NATS JetStream and Redis, and the real Claude Code CLI. The client
//! scripts print one JSON event per line; the tests react to the events (add
//! a worker pool once the task was seen queued, let the task finish once it
//! was seen running) and assert on what the clients got.
//!
//! - here: the happy paths over HTTP, stdio and two replicas;
//! - [`faults`]: malformed messages, wrong calls, cancellation;
//! - [`client`]: the harness.

mod client;
mod faults;

use std::path::PathBuf;

use claudecluster_tests::{BackendKind, TestCluster};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use client::{
    ClientRun, assert_typescript_progress, claudecluster_bin, ensure_clients, follow, held_tasks,
    mcp_url, progress_messages,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_client_follows_a_task_from_queued_to_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster =
        TestCluster::start_intake(BackendKind::Networked, |s| held_tasks(s, dir.path())).await;
    let mut client = ClientRun::typescript("flow", &[&mcp_url(&cluster)]);
    let [tools, submitted, done] = follow(&mut client, &mut cluster, dir.path()).await;
    client.finish().await;

    assert_eq!(tools["protocolVersion"], "2025-11-25");
    assert_eq!(
        tools["sessionId"],
        Value::Null,
        "the intake keeps no session"
    );
    let tools = tools["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "submit_task",
            "submit_tasks",
            "get_task",
            "wait_for_task",
            "cancel_task",
            "list_tasks"
        ]
    );
    for tool in tools {
        assert!(tool["description"].as_str().unwrap().len() > 80, "{tool}");
        assert_eq!(tool["input"]["type"], "object", "{tool}");
        assert_eq!(tool["output"]["type"], "object", "{tool}");
    }

    let record = &submitted["record"];
    assert_eq!(record["state"], "queued");
    assert_eq!(record["priority"], 7);
    assert_eq!(
        &submitted["text"], record,
        "the text block carries the same JSON"
    );

    assert_typescript_progress(
        &progress_messages(&done),
        "running (attempt 1 of 3) on test-worker-1",
    );
    assert_eq!(done["isError"], false);
    let waited = &done["waited"];
    assert_eq!(waited["id"], record["id"]);
    assert_eq!(waited["state"], "succeeded");
    assert_eq!(waited["result"]["output"], "hello from typescript");
    assert_eq!(waited["metadata"], json!({"via": "ts"}));
    assert_eq!(done["got"], *waited);
    assert_eq!(done["listed"]["tasks"][0]["id"], record["id"]);
    assert_eq!(done["listed"]["next_cursor"], Value::Null);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_follows_a_task_on_the_newest_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster =
        TestCluster::start_intake(BackendKind::Networked, |s| held_tasks(s, dir.path())).await;
    let mut client = ClientRun::python("flow", &[&mcp_url(&cluster)]);
    let [tools, submitted, done] = follow(&mut client, &mut cluster, dir.path()).await;
    client.finish().await;

    // The Python SDK discovers the server and picks the newest version.
    assert_eq!(tools["protocolVersion"], "2026-07-28");
    assert!(
        tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["hasOutputSchema"] == true),
        "{tools}"
    );
    assert_eq!(&submitted["text"], &submitted["record"]);
    assert_eq!(
        progress_messages(&done),
        [
            "queued",
            "running (attempt 1 of 3) on test-worker-1",
            "succeeded"
        ]
    );
    assert_eq!(done["waited"]["state"], "succeeded");
    assert_eq!(done["waited"]["result"]["output"], "hello from python");
    assert_eq!(done["got"]["result"]["output"], "hello from python");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_command_serves_both_sdks_through_the_intake() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster =
        TestCluster::start_intake(BackendKind::Networked, |s| held_tasks(s, dir.path())).await;
    let base_url = cluster.base_url.clone();
    let stdio = ["stdio", claudecluster_bin(), base_url.as_str()];

    let mut client = ClientRun::typescript("flow", &stdio);
    let [_, _, done] = follow(&mut client, &mut cluster, dir.path()).await;
    client.finish().await;
    assert_typescript_progress(
        &progress_messages(&done),
        "running (attempt 1 of 3) on test-worker-1",
    );
    assert_eq!(done["waited"]["state"], "succeeded");
    assert_eq!(done["waited"]["result"]["output"], "hello from typescript");

    let mut client = ClientRun::python("flow", &stdio);
    let [tools, _, done] = follow(&mut client, &mut cluster, dir.path()).await;
    client.finish().await;
    assert_eq!(
        tools["protocolVersion"], "2026-07-28",
        "discovery relayed over stdio"
    );
    let messages = progress_messages(&done);
    assert!(
        messages.iter().any(|m| m.starts_with("running")),
        "{messages:?}"
    );
    assert_eq!(done["waited"]["result"]["output"], "hello from python");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_alternating_between_two_replicas_is_served_by_both() {
    let cluster = TestCluster::start(BackendKind::Networked, |_| {}).await;
    // A second intake on the same settings, with connections of its own,
    // like another pod behind the same Service.
    let backends = claudecluster_engine::backend::connect_networked(&cluster.settings)
        .await
        .expect("connect the second replica");
    let replica = claudecluster_producer::Application::build((*cluster.settings).clone(), backends)
        .await
        .expect("start the second replica");
    let second_url = format!("http://127.0.0.1:{}/mcp", replica.port());
    let stop_second = CancellationToken::new();
    let second = tokio::spawn(replica.run_until_stopped(stop_second.clone()));

    let mut client = ClientRun::typescript("alternate", &[&mcp_url(&cluster), &second_url]);
    let alternated = client.expect("alternated").await;
    client.finish().await;

    let served: Vec<u64> = alternated["served"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert!(
        served.iter().all(|&n| n >= 6),
        "both replicas answered calls: {served:?}"
    );
    assert_eq!(
        alternated["sessionIds"],
        json!([]),
        "no replica handed out a session"
    );
    let results = alternated["results"].as_array().unwrap();
    assert_eq!(results.len(), 14, "{alternated}");
    assert!(
        results.iter().all(|r| r["isError"] == false),
        "{alternated}"
    );
    for (i, task) in alternated["finished"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(task["state"], "succeeded", "{task}");
        assert_eq!(task["output"], format!("alternate {i}"));
    }
    stop_second.cancel();
    second.await.unwrap().unwrap();
    cluster.stop().await;
}

/// The README's instructions for Claude Code, run with the real CLI: it
/// connects to the intake over HTTP and to `claudecluster mcp` over stdio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_connects_over_http_and_stdio() {
    ensure_clients();
    let cluster = TestCluster::start_intake(BackendKind::Networked, |_| {}).await;
    let home = tempfile::tempdir().unwrap();
    let claude = claudecluster_tests::claude_cli();
    let run = |args: Vec<String>| {
        let claude: PathBuf = claude.clone();
        let home = home.path().to_path_buf();
        async move {
            let output = Command::new(&claude)
                .args(&args)
                .env("HOME", &home)
                .env("DISABLE_TELEMETRY", "1")
                .env("DISABLE_AUTOUPDATER", "1")
                .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
                .env("ANTHROPIC_API_KEY", "unused")
                .current_dir(&home)
                .output()
                .await
                .expect("run the Claude Code CLI");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "claude {args:?}: {text}");
            text
        }
    };
    let url = mcp_url(&cluster);
    run(["mcp", "add", "--transport", "http", "cc-http", &url]
        .map(String::from)
        .to_vec())
    .await;
    run([
        "mcp",
        "add",
        "cc-stdio",
        "--",
        claudecluster_bin(),
        "mcp",
        "--url",
        &cluster.base_url,
    ]
    .map(String::from)
    .to_vec())
    .await;
    let listed = run(vec!["mcp".into(), "list".into()]).await;
    for name in ["cc-http", "cc-stdio"] {
        let line = listed
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing: {listed}"));
        assert!(line.contains("Connected"), "{line}");
    }
    cluster.stop().await;
}
