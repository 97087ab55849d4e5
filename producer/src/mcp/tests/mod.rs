//! The MCP endpoint in process, on the embedded backends in a temporary
//! directory: the router answered with `oneshot` (no socket) here, the wait
//! loop and shutdown in [`wait`]. Real MCP clients against NATS and Redis
//! are in the end-to-end suite (`tests/e2e/mcp/`).

mod wait;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use claudecluster_engine::TaskRecord;
use claudecluster_engine::backend::Backends;
use claudecluster_engine::config::Settings;
use claudecluster_engine::task::NewTask;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::service::TaskService;
use crate::state::AppState;

/// Embedded backends in a directory that lives as long as the value.
struct Fixture {
    state: AppState,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(adjust: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut settings = Settings::default();
        settings.embedded.data_dir = Some(dir.path().to_path_buf());
        adjust(&mut settings);
        let backends = claudecluster_engine::embedded::open_embedded(&settings)
            .expect("open the embedded backends");
        Self {
            state: AppState::new(settings, backends),
            _dir: dir,
        }
    }

    fn router(&self) -> Router {
        super::router(&self.state, CancellationToken::new())
    }

    fn service(&self) -> &TaskService {
        self.state.service()
    }

    fn backends(&self) -> &Backends {
        self.state.backends()
    }

    async fn queued(&self, prompt: &str) -> TaskRecord {
        self.service()
            .submit(NewTask {
                prompt: prompt.into(),
                ..NewTask::default()
            })
            .await
            .expect("submit")
            .record
    }
}

/// POSTs `body` to `/mcp` with the headers a client sends; the status, the
/// response headers and the JSON-RPC messages of the answer (one for a JSON
/// answer, each `data:` line of an event stream).
async fn post(
    router: &Router,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, Vec<Value>) {
    let mut request = Request::post("/mcp")
        .header("host", "127.0.0.1:3000")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let messages = if headers
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"))
    {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_json::from_str(d.trim()).unwrap())
            .collect()
    } else {
        serde_json::from_str(&text).map_or_else(|_| vec![json!(text)], |v| vec![v])
    };
    (status, headers, messages)
}

fn initialize(version: &str) -> String {
    json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "unit", "version": "1"}
        }
    })
    .to_string()
}

fn call(id: u32, tool: &str, arguments: Value) -> String {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}
    })
    .to_string()
}

#[tokio::test]
async fn every_handshake_version_is_negotiated_without_a_session() {
    let fixture = Fixture::new(|_| {});
    let router = fixture.router();
    for version in ["2025-03-26", "2025-06-18", "2025-11-25"] {
        let (status, headers, messages) = post(&router, &[], &initialize(version)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.get("mcp-session-id").is_none(), "stateless");
        let result = &messages[0]["result"];
        assert_eq!(result["protocolVersion"], version);
        assert_eq!(result["serverInfo"]["name"], "claudecluster");
        assert!(result["capabilities"]["tools"].is_object());
    }
    // A version from the future gets the newest handshake version.
    let (_, _, messages) = post(&router, &[], &initialize("2099-01-01")).await;
    assert_eq!(messages[0]["result"]["protocolVersion"], "2025-11-25");
}

#[tokio::test]
async fn the_newest_protocol_is_offered_through_discovery() {
    let fixture = Fixture::new(|_| {});
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "unit", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "server/discover"),
    ];
    let body =
        json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}});
    let (status, _, messages) = post(&fixture.router(), &headers, &body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{messages:?}");
    let versions = messages[0]["result"]["supportedVersions"]
        .as_array()
        .unwrap();
    for version in ["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"] {
        assert!(versions.contains(&json!(version)), "{versions:?}");
    }

    // A tool call in that version carries its metadata on every request.
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "list_tasks"),
    ];
    let body = json!({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "list_tasks", "arguments": {}, "_meta": meta}
    });
    let (status, _, messages) = post(&fixture.router(), &headers, &body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{messages:?}");
    assert_eq!(
        messages[0]["result"]["structuredContent"],
        json!({"tasks": [], "next_cursor": null})
    );
}

#[tokio::test]
async fn tools_round_trip_over_the_router() {
    let fixture = Fixture::new(|_| {});
    let router = fixture.router();
    let (_, _, messages) = post(
        &router,
        &[],
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await;
    let tools = messages[0]["result"]["tools"].as_array().unwrap();
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

    let (_, _, messages) = post(
        &router,
        &[],
        &call(
            2,
            "submit_task",
            json!({"prompt": "p", "idempotency_key": "k1"}),
        ),
    )
    .await;
    let record = &messages[0]["result"]["structuredContent"];
    assert_eq!(record["state"], "queued");
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(
        messages[0]["result"]["content"][0]["text"]
            .as_str()
            .map(|t| serde_json::from_str::<Value>(t).unwrap()),
        Some(record.clone()),
        "the text is the same JSON"
    );
    let (_, _, messages) = post(
        &router,
        &[],
        &call(
            3,
            "submit_task",
            json!({"prompt": "p", "idempotency_key": "k1"}),
        ),
    )
    .await;
    assert_eq!(
        messages[0]["result"]["structuredContent"]["id"],
        id.as_str()
    );
    assert_eq!(
        messages[0]["result"]["_meta"]["claudecluster/replayed"],
        true
    );

    let (_, _, messages) = post(&router, &[], &call(4, "cancel_task", json!({"id": id}))).await;
    assert_eq!(
        messages[0]["result"]["structuredContent"]["state"],
        "cancelled"
    );
    let (_, _, messages) = post(&router, &[], &call(5, "cancel_task", json!({"id": id}))).await;
    let error: Value = serde_json::from_str(
        messages[0]["result"]["content"][0]["text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(messages[0]["result"]["isError"], true);
    assert_eq!(error["error"]["code"], "already_final");
    assert_eq!(error["task"]["id"], id.as_str());

    let (_, _, messages) = post(
        &router,
        &[],
        &call(6, "wait_for_task", json!({"id": id, "max_wait_secs": 0})),
    )
    .await;
    assert_eq!(
        messages[0]["result"]["structuredContent"]["state"],
        "cancelled"
    );
}

#[tokio::test]
async fn mistakes_get_errors_that_say_what_is_wrong() {
    let fixture = Fixture::new(|s| s.tasks.max_prompt_chars = 10);
    let router = fixture.router();
    let tool_error = |messages: &[Value]| -> Value {
        assert_eq!(messages[0]["result"]["isError"], true, "{messages:?}");
        serde_json::from_str(
            messages[0]["result"]["content"][0]["text"]
                .as_str()
                .unwrap(),
        )
        .unwrap()
    };

    let (_, _, m) = post(
        &router,
        &[],
        &call(1, "submit_task", json!({"prompt": "x".repeat(11)})),
    )
    .await;
    let e = tool_error(&m);
    assert_eq!(
        (e["error"]["code"].as_str(), e["error"]["field"].as_str()),
        (Some("payload_too_large"), Some("prompt"))
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("prompt: ")
    );

    let (_, _, m) = post(
        &router,
        &[],
        &call(
            2,
            "submit_tasks",
            json!({"tasks": [{"prompt": "a"}, {"prompt": "b", "priority": 0}]}),
        ),
    )
    .await;
    assert_eq!(tool_error(&m)["error"]["field"], "tasks[1].priority");

    let (_, _, m) = post(
        &router,
        &[],
        &call(3, "get_task", json!({"id": "not-a-uuid"})),
    )
    .await;
    assert_eq!(tool_error(&m)["error"]["field"], "id");

    let unknown = uuid::Uuid::now_v7();
    let (_, _, m) = post(&router, &[], &call(4, "get_task", json!({"id": unknown}))).await;
    let e = tool_error(&m);
    assert_eq!(e["error"]["code"], "not_found");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&unknown.to_string())
    );

    let (status, _, m) = post(&router, &[], &call(5, "no_such_tool", json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m[0]["error"]["code"], -32602);
    assert!(
        m[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no_such_tool")
    );

    let (status, _, m) = post(&router, &[], "{\"jsonrpc\": \"2.0\", ").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(m[0]["error"]["code"], -32700);

    // Still answering.
    let (status, _, m) = post(&router, &[], &call(6, "list_tasks", json!({"limit": 1}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m[0]["result"]["isError"], false);
}

#[tokio::test]
async fn host_and_origin_checks_guard_against_dns_rebinding() {
    let local = Fixture::new(|_| {});
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let status_with = |fixture: &Fixture, headers: Vec<(&'static str, &'static str)>| {
        let router = fixture.router();
        async move {
            let mut request = Request::post("/mcp")
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream");
            for (name, value) in headers {
                request = request.header(name, value);
            }
            router
                .oneshot(request.body(Body::from(list)).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        status_with(&local, vec![("host", "localhost:3000")]).await,
        StatusCode::OK
    );
    assert_eq!(
        status_with(&local, vec![("host", "evil.example:3000")]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_with(
            &local,
            vec![
                ("host", "127.0.0.1:3000"),
                ("origin", "http://evil.example")
            ]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_with(
            &local,
            vec![
                ("host", "127.0.0.1:3000"),
                ("origin", "http://localhost:5173")
            ]
        )
        .await,
        StatusCode::OK
    );

    let deployed = Fixture::new(|s| {
        s.server.allowed_hosts = vec!["cc.example.com".into(), "10.0.0.7:8080".into()]
    });
    assert_eq!(
        status_with(&deployed, vec![("host", "cc.example.com")]).await,
        StatusCode::OK
    );
    assert_eq!(
        status_with(&deployed, vec![("host", "10.0.0.7:8080")]).await,
        StatusCode::OK
    );
    assert_eq!(
        status_with(&deployed, vec![("host", "10.0.0.7:9090")]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_with(
            &deployed,
            vec![
                ("host", "cc.example.com"),
                ("origin", "https://cc.example.com")
            ]
        )
        .await,
        StatusCode::OK
    );

    let open = Fixture::new(|s| s.server.allowed_hosts = vec!["*".into()]);
    assert_eq!(
        status_with(
            &open,
            vec![
                ("host", "anything.example"),
                ("origin", "https://x.example")
            ]
        )
        .await,
        StatusCode::OK
    );
}
