//! What goes wrong, as MCP clients see it: malformed JSON-RPC, wrong tool
//! calls and oversized prompts get errors that say what is wrong and leave
//! the intake healthy; a cancelled wait ends on the intake.

use std::time::Duration;

use claudecluster_tests::{BackendKind, TestCluster};
use serde_json::{Value, json};

use super::client::{CLIENT_SILENCE, ClientRun, claudecluster_bin, mcp_url};

/// POSTs a raw body to `/mcp`; the status and the body as JSON (or a
/// string).
async fn post_raw(
    cluster: &TestCluster,
    host: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut request = cluster
        .http
        .post(mcp_url(cluster))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    cluster.send(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_and_wrong_calls_get_clear_errors() {
    let cluster = TestCluster::start(BackendKind::Networked, |s| {
        s.server.max_body_bytes = 1 << 20
    })
    .await;

    let (status, body) = post_raw(&cluster, None, "{\"jsonrpc\":\"2.0\",\"id\":1,").await;
    assert_eq!(
        (status, body["error"]["code"].as_i64()),
        (400, Some(-32700)),
        "{body}"
    );
    let (status, body) = post_raw(
        &cluster,
        None,
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_i64()),
        (400, Some(-32600)),
        "{body}"
    );
    assert!(
        body["error"]["message"].as_str().unwrap().contains("batch"),
        "{body}"
    );
    let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_task","arguments":"x"}}"#;
    let (status, body) = post_raw(&cluster, None, call).await;
    assert_eq!(
        (status, body["error"]["code"].as_i64(), body["id"].as_i64()),
        (400, Some(-32602), Some(7))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("params.arguments"),
        "{body}"
    );
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{{"name":"submit_task","arguments":{{"prompt":"{}"}}}}}}"#,
        "x".repeat(2 << 20)
    );
    let (status, body) = post_raw(&cluster, None, huge).await;
    assert_eq!(status, 413, "{body}");
    let (status, _) = post_raw(
        &cluster,
        Some("attacker.example"),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await;
    assert_eq!(
        status, 403,
        "a foreign Host header is refused (DNS rebinding)"
    );

    // The official client, on the same intake, after all that.
    let mut client = ClientRun::typescript("errors", &[&mcp_url(&cluster)]);
    let errors = client.expect("errors").await;
    client.finish().await;
    let unknown = &errors["unknownTool"];
    assert_eq!(
        (unknown["thrown"].as_bool(), unknown["code"].as_i64()),
        (Some(true), Some(-32602))
    );
    assert!(
        unknown["message"]
            .as_str()
            .unwrap()
            .contains("no_such_tool"),
        "{unknown}"
    );
    for (case, code, field) in [
        ("wrongType", "invalid_field", "priority"),
        ("missingField", "invalid_field", "prompt"),
        ("unknownField", "unknown_field", "prio"),
        ("oversizedPrompt", "payload_too_large", "prompt"),
        ("badBatchItem", "invalid_field", "tasks[1].timeout_ms"),
        ("badId", "invalid_parameter", "id"),
        ("waitTooLong", "invalid_parameter", "max_wait_secs"),
        ("badState", "invalid_field", "state"),
    ] {
        let outcome = &errors[case];
        assert_eq!(outcome["isError"], true, "{case}: {outcome}");
        assert_eq!(outcome["body"]["error"]["code"], code, "{case}: {outcome}");
        assert_eq!(
            outcome["body"]["error"]["field"], field,
            "{case}: {outcome}"
        );
        let message = outcome["body"]["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{case}: the message names the field: {message}"
        );
    }
    let unknown_task = &errors["unknownTask"]["body"]["error"];
    assert_eq!(unknown_task["code"], "not_found");
    assert!(
        unknown_task["message"]
            .as_str()
            .unwrap()
            .contains("0190b3a6-2f6e-7cc3-a2c1-4a3f6e0c9d11")
    );
    assert_eq!(
        errors["afterwards"],
        json!({"isError": false, "state": "queued"})
    );

    let (status, _) = cluster
        .send(cluster.http.get(format!("{}/health", cluster.base_url)))
        .await;
    assert_eq!(status, 200, "the intake stays healthy");
    cluster.stop().await;
}

/// `wait_for_task` calls that ended because their client cancelled, over
/// the whole test process.
async fn cancelled_waits(cluster: &TestCluster) -> u64 {
    let (_, body) = cluster
        .send(cluster.http.get(format!("{}/metrics", cluster.base_url)))
        .await;
    body.as_str()
        .unwrap_or_default()
        .lines()
        .find(|l| {
            l.starts_with("claudecluster_mcp_tool_calls_total{")
                && l.contains(r#"tool="wait_for_task""#)
                && l.contains(r#"outcome="cancelled""#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse::<f64>().unwrap() as u64)
}

/// Waits until the intake has counted `n` cancelled waits in all.
async fn await_cancelled_waits(cluster: &TestCluster, n: u64, how: &str) {
    let deadline = tokio::time::Instant::now() + CLIENT_SILENCE;
    let mut pause = Duration::from_millis(20);
    while cancelled_waits(cluster).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{how}: the intake never ended the cancelled wait"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Every cancellation test is in this one function, one after the other, so
/// the process-wide counter it reads moves for one cause at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_wait_ends_it_on_the_intake() {
    // No workers: the tasks stay queued and every wait would run its full
    // ten minutes unless cancelled.
    let cluster = TestCluster::start_intake(BackendKind::Networked, |_| {}).await;
    let url = mcp_url(&cluster);
    let stdio = ["stdio", claudecluster_bin(), cluster.base_url.as_str()];
    let before = cancelled_waits(&cluster).await;

    let scenarios: [(&str, ClientRun); 3] = [
        // 2026-07-28 over HTTP: the client closes the request's stream.
        ("python over HTTP", ClientRun::python("cancel", &[&url])),
        // notifications/cancelled over stdio: the relay closes the stream.
        (
            "typescript over stdio",
            ClientRun::typescript("cancel", &stdio),
        ),
        ("python over stdio", ClientRun::python("cancel", &stdio)),
    ];
    for (n, (how, mut client)) in (1..).zip(scenarios) {
        let progress = client.expect("progress").await;
        assert_eq!(progress["message"], "queued", "{how}");
        let cancelled = client.expect("cancelled").await;
        assert_ne!(cancelled["finished"], true, "{how}: {cancelled}");
        // The client is still connected: only the cancellation can have
        // ended the wait.
        await_cancelled_waits(&cluster, before + n, how).await;
        client.proceed().await;
        let done = client.expect("done").await;
        assert_eq!(
            done["state"], "queued",
            "{how}: the task itself is untouched"
        );
        client.finish().await;
    }
    cluster.stop().await;
}
