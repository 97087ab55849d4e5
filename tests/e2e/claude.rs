//! The `claude` executor through the whole pipeline: the real Claude Code CLI
//! (installed by `scripts/install-test-clients`) talking to a stand-in model
//! API on loopback, on both backends.

use std::time::Duration;

use claudecluster_engine::config::{ExecutorKind, Settings};
use claudecluster_tests::{BackendKind, ModelApi, TestCluster, claude_cli};
use serde_json::json;

crate::on_both_backends!(
    claude_answers_through_the_pipeline,
    claude_model_error_fails_the_task
);

fn use_claude(s: &mut Settings, api: &ModelApi) {
    s.worker.executor = Some(ExecutorKind::Claude);
    s.worker.claude.binary = claude_cli().to_string_lossy().into_owned();
    s.worker.task_timeout_ms = 60_000;
    for (k, v) in [
        ("ANTHROPIC_BASE_URL", api.base_url()),
        ("ANTHROPIC_API_KEY", "sk-test-stand-in".to_owned()),
        ("DISABLE_TELEMETRY", "1".to_owned()),
        ("DISABLE_AUTOUPDATER", "1".to_owned()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_owned()),
    ] {
        s.worker.claude.env.insert(k.to_owned(), v);
    }
}

async fn claude_answers_through_the_pipeline(kind: BackendKind) {
    let api = ModelApi::start().await;
    let cluster = TestCluster::start(kind, |s| use_claude(s, &api)).await;
    let id = cluster.submit_prompt("Write a haiku about queues").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = cluster.wait_final(&id, Duration::from_secs(90)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let result = &done["result"];
    assert_eq!(result["executor"], "claude");
    assert!(
        result["output"]
            .as_str()
            .unwrap()
            .contains("stand-in answer"),
        "{result}"
    );
    assert!(
        result["session_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{result}"
    );
    assert!(
        result["num_turns"].as_u64().is_some_and(|n| n >= 1),
        "{result}"
    );
    assert!(api.requests() >= 1);
    cluster.stop().await;
}

async fn claude_model_error_fails_the_task(kind: BackendKind) {
    let api = ModelApi::start().await;
    let cluster = TestCluster::start(kind, |s| use_claude(s, &api)).await;
    let (status, body) = cluster
        .submit(json!({"prompt": "please fail [[api-error]]", "max_attempts": 1}))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = cluster
        .wait_final(body["id"].as_str().unwrap(), Duration::from_secs(90))
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "claude_error", "{done}");
    cluster.stop().await;
}
