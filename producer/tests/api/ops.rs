//! Liveness, readiness (and its failure when Redis is unreachable), metrics,
//! the worker list, unknown routes.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use claudecluster_engine::backend;
use claudecluster_engine::results::WorkerInfo;
use claudecluster_engine::results::redis::RedisStore;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{json, spawn_app, spawn_app_on, test_settings};
use crate::schema::assert_valid;

#[tokio::test]
async fn health_and_ready_answer() {
    let app = spawn_app().await;
    let response = app.health().await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    assert_eq!(body["status"], "healthy");
    assert!(body["uptime"].is_number());
    assert!(body["timestamp"].is_string());
    assert!(body["version"].is_string());

    let response = app.ready().await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["workers"], 0);
}

/// Redis goes away (here: a URL pointing at a closed port): `/ready` says
/// 503 and names the store; `/health` stays 200.
#[tokio::test]
async fn ready_is_503_when_redis_is_unreachable() {
    let settings = test_settings();
    let mut backends = backend::connect_networked(&settings).await.unwrap();
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("redis://127.0.0.1:{closed_port}");
    backends.store = Arc::new(RedisStore::new(&url, &settings.redis).unwrap());
    let app = spawn_app_on(settings, backends).await;

    let response = app.ready().await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = json(response).await;
    assert_eq!(body["status"], "not ready");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("result store"), "{error}");
    assert!(body["timestamp"].is_string());
    assert_eq!(app.health().await.status(), StatusCode::OK);

    // Submitting is refused with the error format and Retry-After.
    let response = app.submit(&json!({"prompt": "a"})).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_valid("error", &json(response).await);
}

#[tokio::test]
async fn metrics_name_every_family() {
    let app = spawn_app().await;
    assert_eq!(
        app.submit(&json!({"prompt": "count me"})).await.status(),
        StatusCode::ACCEPTED
    );
    let text = app.metrics().await;
    for name in [
        "claudecluster_tasks_total",
        "claudecluster_publish_latency_seconds",
        "claudecluster_queue_depth",
        "claudecluster_http_requests_total",
        "claudecluster_http_request_duration_seconds",
        "claudecluster_task_duration_seconds",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(text.contains(r#"claudecluster_tasks_total{status="queued"}"#));
    assert!(
        text.contains(
            r#"claudecluster_http_requests_total{method="POST",route="/tasks",status="202"}"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn workers_are_listed_from_heartbeats() {
    let app = spawn_app().await;
    let info = WorkerInfo {
        id: "worker-test-1".into(),
        host: "localhost".into(),
        version: "0.1.0".into(),
        concurrency: 4,
        in_flight: 1,
        executor: "echo".into(),
        started_at: Utc::now(),
        last_seen: Utc::now(),
    };
    app.backends
        .store
        .heartbeat(&info, Duration::from_secs(30))
        .await
        .unwrap();
    let response = app.workers().await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    assert_eq!(body["workers"][0]["id"], "worker-test-1");
    assert_eq!(body["workers"][0]["concurrency"], 4);
    let ready = json(app.ready().await).await;
    assert_eq!(ready["workers"], 1);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let app = spawn_app().await;
    let response = app.get("/no/such/route").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_valid("error", &json(response).await);
    let response = app.get("/tasks/batch").await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["code"], "method_not_allowed");
}
