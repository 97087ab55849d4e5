//! Router tests without a socket or services: every bad input gets its status
//! and JSON body, and the guard sheds load and times out. The backends here
//! are stand-ins that are down, or that hang until released, so these tests
//! only cover what happens before (or instead of) a real backend call; the
//! integration tests in `tests/api` cover the rest against NATS and Redis.

mod stand_in;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes_body::read_json;
use chrono::{DateTime, Utc};
use claudecluster_engine::config::Settings;
use serde_json::{Value, json};
use stand_in::{StandIn, state_with};
use tower::ServiceExt;

use super::router;

fn app() -> axum::Router {
    router(state_with(Settings::default(), Arc::default()))
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

mod bytes_body {
    use axum::response::Response;
    use serde_json::Value;

    pub async fn read_json(response: Response) -> (axum::http::StatusCode, Value) {
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        (status, value)
    }
}

async fn send(app: axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    read_json(app.oneshot(req).await.unwrap()).await
}

/// Asserts an error answer: status, code and field (None = absent).
#[track_caller]
fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str, field: Option<&str>) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["field"].as_str(), field, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn malformed_json_is_400_with_position() {
    let got = send(app(), post_json("/tasks", "{\"prompt\": \"a\",\n oops}")).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_json", None);
    let message = got.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 2 column 2"), "{message}");
}

#[tokio::test]
async fn wrong_types_and_unknown_fields_are_422_naming_the_field() {
    let got = send(
        app(),
        post_json("/tasks", r#"{"prompt":"a","priority":"high"}"#),
    )
    .await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("priority"),
    );
    let got = send(app(), post_json("/tasks", r#"{"prompt":"a","prio":3}"#)).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_field",
        Some("prio"),
    );
    let got = send(app(), post_json("/tasks", r#"{"priority":3}"#)).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("prompt"),
    );
    let got = send(app(), post_json("/tasks", r#"["a"]"#)).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        None,
    );
}

#[tokio::test]
async fn rule_violations_are_422_or_413() {
    let got = send(
        app(),
        post_json("/tasks", r#"{"prompt":"a","priority":11}"#),
    )
    .await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("priority"),
    );
    let got = send(app(), post_json("/tasks", r#"{"prompt":"   "}"#)).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("prompt"),
    );
    let long = json!({ "prompt": "x".repeat(100_001) }).to_string();
    let got = send(app(), post_json("/tasks", &long)).await;
    assert_error(
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        Some("prompt"),
    );
}

#[tokio::test]
async fn content_type_must_be_json() {
    let req = Request::post("/tasks")
        .body(Body::from(r#"{"prompt":"a"}"#))
        .unwrap();
    let got = send(app(), req).await;
    assert_error(
        &got,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
    let req = Request::post("/tasks")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(r#"{"prompt":"a"}"#))
        .unwrap();
    let got = send(app(), req).await;
    assert_error(
        &got,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_json() {
    let mut settings = Settings::default();
    settings.server.max_body_bytes = 64;
    let app = router(state_with(settings, Arc::default()));
    let body = json!({ "prompt": "y".repeat(100) }).to_string();
    let got = send(app.clone(), post_json("/tasks", &body)).await;
    assert_error(
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        None,
    );
    // Without a Content-Length (chunked), the limit applies while reading.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(body.into_bytes())]);
    let req = Request::post("/tasks")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    let got = send(app, req).await;
    assert_error(
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        None,
    );
}

#[tokio::test]
async fn batch_errors_name_the_item() {
    let body = r#"{"tasks":[{"prompt":"a"},{"prompt":"b","priority":0}]}"#;
    let got = send(app(), post_json("/tasks/batch", body)).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("tasks[1].priority"),
    );
    let body = r#"{"tasks":[{"prompt":"a"},{"prompt":"b","prio":1}]}"#;
    let got = send(app(), post_json("/tasks/batch", body)).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_field",
        Some("tasks[1].prio"),
    );
    let got = send(app(), post_json("/tasks/batch", r#"{"tasks":[]}"#)).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        Some("tasks"),
    );

    let mut settings = Settings::default();
    settings.tasks.max_batch = 2;
    let app = router(state_with(settings, Arc::default()));
    let body = r#"{"tasks":[{"prompt":"a"},{"prompt":"b"},{"prompt":"c"}]}"#;
    let got = send(app, post_json("/tasks/batch", body)).await;
    assert_error(
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        Some("tasks"),
    );
}

#[tokio::test]
async fn parameters_are_checked() {
    let got = send(app(), get("/tasks/not-a-uuid")).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("id"),
    );
    let req = Request::post("/tasks/123/cancel")
        .body(Body::empty())
        .unwrap();
    let got = send(app(), req).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("id"),
    );
    let got = send(app(), get("/tasks?limit=0")).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("limit"),
    );
    let got = send(app(), get("/tasks?limit=501")).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("limit"),
    );
    let got = send(app(), get("/tasks?state=done")).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("state"),
    );
    let got = send(app(), get("/tasks?stat=queued")).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("stat"),
    );
    let got = send(app(), get("/dead-letters?task_id=x")).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("task_id"),
    );
    let req = Request::delete("/dead-letters/abc")
        .body(Body::empty())
        .unwrap();
    let got = send(app(), req).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        Some("seq"),
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let got = send(app(), get("/nope")).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found", None);
    let req = Request::delete("/tasks").body(Body::empty()).unwrap();
    let got = send(app(), req).await;
    assert_error(
        &got,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        None,
    );
}

#[tokio::test]
async fn unreachable_backends_are_503_with_retry_after() {
    let response = app()
        .oneshot(post_json("/tasks", r#"{"prompt":"a"}"#))
        .await
        .unwrap();
    assert!(response.headers().contains_key(header::RETRY_AFTER));
    let got = read_json(response).await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "unavailable", None);
    assert!(
        !got.1.to_string().contains("connection refused"),
        "{}",
        got.1
    );

    let got = send(app(), get("/workers")).await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "unavailable", None);
}

#[tokio::test]
async fn health_is_up_and_ready_names_the_dependency() {
    let (status, body) = send(app(), get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "healthy");
    assert!(body["uptime"].as_f64().is_some());
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        body["timestamp"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .is_ok()
    );

    let (status, body) = send(app(), get("/ready")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not ready");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("broker unavailable"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn slow_requests_time_out_with_408() {
    let mut settings = Settings::default();
    settings.server.request_timeout_ms = 50;
    let stand_in = Arc::new(StandIn {
        hang: true,
        ..StandIn::default()
    });
    let app = router(state_with(settings, stand_in));
    let got = send(app, post_json("/tasks", r#"{"prompt":"a"}"#)).await;
    assert_error(&got, StatusCode::REQUEST_TIMEOUT, "request_timeout", None);
}

#[tokio::test]
async fn requests_over_the_limit_are_shed() {
    let mut settings = Settings::default();
    settings.server.max_concurrent_requests = 1;
    let stand_in = Arc::new(StandIn {
        hang: true,
        ..StandIn::default()
    });
    let app = router(state_with(settings, stand_in.clone()));
    let first = tokio::spawn(
        app.clone()
            .oneshot(post_json("/tasks", r#"{"prompt":"a"}"#)),
    );
    // Wait until the first request holds the only slot.
    stand_in.entered.notified().await;
    let response = app.clone().oneshot(get("/workers")).await.unwrap();
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let got = read_json(response).await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "overloaded", None);
    // Liveness is still answered.
    let (status, _) = send(app, get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    first.abort();
}

#[tokio::test]
async fn metrics_are_exposed() {
    let app = app();
    let _ = send(app.clone(), get("/tasks/not-a-uuid")).await;
    let response = app.oneshot(get("/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    for name in [
        "claudecluster_http_requests_total",
        "claudecluster_http_request_duration_seconds",
        "claudecluster_task_duration_seconds",
        "claudecluster_publish_latency_seconds",
        "claudecluster_queue_depth",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        text.contains(r#"route="/tasks/{id}""#),
        "route label is the template:\n{text}"
    );
    // Histograms, not summaries: they aggregate across replicas.
    assert!(
        text.contains("claudecluster_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("claudecluster_task_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn openapi_describes_every_route_with_resolvable_refs() {
    let (status, doc) = send(app(), get("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in super::paths::ALL {
        assert!(doc["paths"].get(path).is_some(), "{path} is not described");
    }
    assert_eq!(
        doc["paths"].as_object().unwrap().len(),
        super::paths::ALL.len()
    );
    // Every reference points at something that exists.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&doc["paths"], &mut found);
    refs(&doc["components"], &mut found);
    assert!(found.len() > 20);
    for r in found {
        let Some(pointer) = r.strip_prefix('#') else {
            panic!("external reference {r}");
        };
        assert!(doc.pointer(pointer).is_some(), "unresolved reference {r}");
    }
    for name in ["NewTask", "TaskMessage", "TaskRecord", "Error"] {
        assert_eq!(
            doc["components"]["schemas"][name]["schema_version"], 1,
            "{name}"
        );
    }
}
