//! Submitting: one task, idempotent replays, batches, and what happens when
//! the queue refuses.

use std::sync::Arc;

use claudecluster_engine::TaskState;
use claudecluster_engine::backend;
use claudecluster_engine::results::CreateOutcome;
use claudecluster_engine::task::TaskMessage;
use claudecluster_engine::{TaskId, TaskRecord};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    GatedPublisher, RefusingPublisher, json, spawn_app, spawn_app_on, test_settings,
};
use crate::schema::assert_valid;

#[tokio::test]
async fn submit_records_and_publishes_the_task() {
    let app = spawn_app().await;
    let response = app
        .submit(&json!({
            "prompt": "say hello",
            "priority": 9,
            "metadata": {"ticket": "ENG-1"},
            "trace": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        }))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body = json(response).await;
    assert_valid("task-record", &body);
    let record: TaskRecord = serde_json::from_value(body).unwrap();
    assert_eq!(location, format!("/tasks/{}", record.id));
    assert_eq!(record.state, TaskState::Queued);
    assert_eq!(record.priority, 9);
    assert_eq!(record.metadata["ticket"], "ENG-1");
    assert_eq!(record.id.get_version_num(), 7);

    // The store has the same record...
    let stored = app.backends.store.get(record.id).await.unwrap();
    assert_eq!(stored.as_ref().map(|r| r.id), Some(record.id));
    // ...GET returns it...
    let got = json(app.get_task(&record.id.to_string()).await).await;
    assert_valid("task-record", &got);
    assert_eq!(got["id"], record.id.to_string());
    // ...and the message on the stream satisfies the public schema.
    let published = app.receive().await;
    assert_valid("task-message", &published);
    let msg: TaskMessage = serde_json::from_value(published).unwrap();
    assert_eq!(msg.id, record.id);
    assert_eq!(msg.prompt, "say hello");
    assert_eq!(msg.priority, 9);
    assert!(msg.trace.unwrap().traceparent.is_some());
}

#[tokio::test]
async fn same_idempotency_key_returns_the_first_task() {
    let app = spawn_app().await;
    let body = json!({"prompt": "once", "idempotency_key": "deploy-42"});
    let first = app.submit(&body).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = json(first).await;

    let second = app.submit(&body).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second = json(second).await;
    assert_valid("task-record", &second);
    assert_eq!(second["id"], first["id"]);
    assert_eq!(app.queue_depth().await, 1, "enqueued once");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"claudecluster_tasks_total{status="duplicate"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_batch_is_enqueued_in_order_with_replays() {
    let app = spawn_app().await;
    let earlier = json(
        app.submit(&json!({"prompt": "earlier", "idempotency_key": "k1"}))
            .await,
    )
    .await;
    let response = app
        .submit_batch(&json!({"tasks": [
            {"prompt": "one", "priority": 1},
            {"prompt": "again", "idempotency_key": "k1"},
            {"prompt": "three", "priority": 10},
        ]}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body = json(response).await;
    let tasks = body["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    for t in tasks {
        assert_valid("task-record", t);
    }
    assert_eq!(tasks[0]["prompt"], "one");
    assert_eq!(
        tasks[1]["id"], earlier["id"],
        "the replay is the earlier task"
    );
    assert_eq!(tasks[2]["priority"], 10);
    for t in [&tasks[0], &tasks[2]] {
        let id: TaskId = t["id"].as_str().unwrap().parse().unwrap();
        assert!(app.backends.store.get(id).await.unwrap().is_some());
    }
    // The earlier task and two new ones; the replay added nothing.
    assert_eq!(app.queue_depth().await, 3);
    // The highest priority comes off the queue first.
    let first = app.receive().await;
    assert_eq!(first["prompt"], "three");
}

#[tokio::test]
async fn an_invalid_batch_item_enqueues_nothing() {
    let app = spawn_app().await;
    let response = app
        .submit_batch(&json!({"tasks": [
            {"prompt": "fine"},
            {"prompt": "fine too"},
            {"prompt": "bad", "priority": 42},
        ]}))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["field"], "tasks[2].priority");
    assert_eq!(app.queue_depth().await, 0);
    let page = app.backends.store.list(None, None, 10).await.unwrap();
    assert!(page.tasks.is_empty());
}

/// The broker refuses every publish: 503 with Retry-After, and no record is
/// left behind (the idempotency key is free again).
#[tokio::test]
async fn a_refused_publish_is_503_and_leaves_no_orphan() {
    let settings = test_settings();
    let mut backends = backend::connect_networked(&settings).await.unwrap();
    backends.publisher = Arc::new(RefusingPublisher::new(backends.publisher.clone(), |_| true));
    let app = spawn_app_on(settings, backends).await;

    let response = app
        .submit(&json!({"prompt": "doomed", "idempotency_key": "retry-me"}))
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["code"], "unavailable");

    let page = app.backends.store.list(None, None, 10).await.unwrap();
    assert!(page.tasks.is_empty(), "orphan records: {:?}", page.tasks);
    // The key was released: a new task can claim it.
    let msg = claudecluster_engine::task::NewTask {
        prompt: "retry".into(),
        idempotency_key: Some("retry-me".into()),
        ..Default::default()
    }
    .into_message(&app.settings.tasks, chrono::Utc::now())
    .unwrap();
    let outcome = app
        .backends
        .store
        .create(&TaskRecord::queued(&msg, chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(outcome, CreateOutcome::Created);
}

/// The request times out while the broker has not confirmed yet: the client
/// gets 408, but the submit still finishes on its own, so the task is both
/// stored and on the queue (and a retry with the same key finds it) rather
/// than stored and lost.
#[tokio::test]
async fn an_abandoned_request_still_completes_its_submit() {
    let mut settings = test_settings();
    settings.server.request_timeout_ms = 200;
    let mut backends = backend::connect_networked(&settings).await.unwrap();
    let gated = Arc::new(GatedPublisher::new(backends.publisher.clone()));
    backends.publisher = gated.clone();
    let app = spawn_app_on(settings, backends).await;

    let body = json!({"prompt": "slow broker", "idempotency_key": "slow-1"});
    let response = app.submit(&body).await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_valid("error", &json(response).await);

    gated.gate.add_permits(1);
    let published = app.receive().await;
    let id: TaskId = published["id"].as_str().unwrap().parse().unwrap();
    let stored = app.backends.store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.state, TaskState::Queued);

    // A replay of a task that has not started publishes it again (the broker
    // drops the copy as a duplicate of the first), so let that through too.
    gated.gate.add_permits(1);
    let retry = app.submit(&body).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(json(retry).await["id"], id.to_string());
}

/// Part of a batch is refused: 503 with the accepted records and the
/// indexes to resubmit; only the accepted ones exist.
#[tokio::test]
async fn a_partly_refused_batch_reports_both_parts() {
    let settings = test_settings();
    let mut backends = backend::connect_networked(&settings).await.unwrap();
    backends.publisher = Arc::new(RefusingPublisher::new(backends.publisher.clone(), |m| {
        m.prompt.contains("refuse")
    }));
    let app = spawn_app_on(settings, backends).await;

    let response = app
        .submit_batch(&json!({"tasks": [
            {"prompt": "a"},
            {"prompt": "refuse me"},
            {"prompt": "c"},
        ]}))
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["code"], "partially_accepted");
    let accepted = body["accepted"].as_array().unwrap();
    assert_eq!(accepted.len(), 2);
    for t in accepted {
        assert_valid("task-record", t);
    }
    assert_eq!(accepted[0]["prompt"], "a");
    assert_eq!(accepted[1]["prompt"], "c");
    assert_eq!(body["failed"][0]["index"], 1);
    assert_eq!(body["failed"][0]["code"], "publish_failed");

    let page = app.backends.store.list(None, None, 10).await.unwrap();
    let mut prompts: Vec<_> = page.tasks.iter().map(|t| t.prompt.as_str()).collect();
    prompts.sort_unstable();
    assert_eq!(prompts, ["a", "c"]);
    assert_eq!(app.queue_depth().await, 2);
}

#[tokio::test]
async fn bad_input_over_the_wire_gets_the_json_error_format() {
    let app = spawn_app_with_small_body().await;
    let cases: [(Option<&str>, String, StatusCode, &str); 5] = [
        (
            Some("application/json"),
            "{\"prompt\": ".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            None,
            r#"{"prompt":"a"}"#.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Some("application/json"),
            json!({"prompt": "x".repeat(300)}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Some("application/json"),
            r#"{"prompt":"a","priority":0}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            Some("application/json"),
            r#"{"prompt":"a","queue":"x"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_field",
        ),
    ];
    for (content_type, body, status, code) in cases {
        let response = app.post_raw("/tasks", content_type, body).await;
        assert_eq!(response.status(), status, "{code}");
        let body = json(response).await;
        assert_valid("error", &body);
        assert_eq!(body["error"]["code"], code);
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"claudecluster_tasks_total{status="rejected"}"#),
        "{metrics}"
    );
}

async fn spawn_app_with_small_body() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(|s| s.server.max_body_bytes = 256).await
}
