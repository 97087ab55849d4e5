//! The worker's HTTP endpoints, over a real socket, with the pool running.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use claudecluster_consumer::Application;
use claudecluster_engine::backend::Backends;
use claudecluster_engine::results::{
    AttemptEnd, CancelOutcome, CreateOutcome, EndOutcome, ResultStore, StartOutcome, StoreError,
    TaskPage, WorkerInfo,
};
use claudecluster_engine::task::{TaskId, TaskMessage, TaskRecord, TaskState};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::World;

/// A running worker application.
struct TestApp {
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    async fn health(&self) -> reqwest::Response {
        self.get("/health").await
    }

    async fn ready(&self) -> reqwest::Response {
        self.get("/ready").await
    }

    async fn metrics(&self) -> reqwest::Response {
        self.get("/metrics").await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// Starts the worker application on a free port.
async fn spawn_app(world: &World, backends: Backends) -> TestApp {
    let mut settings = world.settings.clone();
    settings.server.host = "127.0.0.1".into();
    settings.worker.port = 0;
    settings.worker.id = Some("http-worker".into());
    let app = Application::build(settings, backends).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        base,
        client: reqwest::Client::new(),
        shutdown,
        handle,
    }
}

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let world = World::new("whttp", |_| {}).await;
    let app = spawn_app(&world, world.backends.clone()).await;

    let health = app.health().await;
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["worker_id"], "http-worker");
    assert!(body["uptime"].as_f64().is_some());
    assert!(body["version"].is_string());
    assert!(
        body["timestamp"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .is_ok()
    );

    let ready = app.ready().await;
    assert_eq!(ready.status(), 200);

    // A task through the running pool shows up in the metrics.
    let msg = world.submit_prompt("count me").await;
    assert_eq!(world.final_record(msg.id).await.state, TaskState::Succeeded);
    let metrics = app.metrics().await;
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("claudecluster_tasks_total{")
                && l.contains(r#"status="succeeded""#)
                && l.contains(r#"worker_id="http-worker""#)),
        "{text}"
    );
    assert!(
        text.contains("claudecluster_task_duration_seconds_bucket"),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn ready_is_503_with_the_reason_when_the_store_is_unreachable() {
    let world = World::new("wready", |_| {}).await;
    let backends = Backends {
        store: Arc::new(Unreachable(world.backends.store.clone())),
        ..world.backends.clone()
    };
    let app = spawn_app(&world, backends).await;
    let ready = app.ready().await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert!(
        body["reason"].as_str().unwrap().starts_with("store: "),
        "{body}"
    );
    // Still alive, though.
    assert_eq!(app.health().await.status(), 200);
    tokio::time::timeout(Duration::from_secs(30), app.stop())
        .await
        .unwrap();
}

/// A store whose health check fails; everything else goes to the real one.
struct Unreachable(Arc<dyn ResultStore>);

#[async_trait]
impl ResultStore for Unreachable {
    async fn create(&self, record: &TaskRecord) -> Result<CreateOutcome, StoreError> {
        self.0.create(record).await
    }
    async fn create_many(&self, records: &[TaskRecord]) -> Vec<Result<CreateOutcome, StoreError>> {
        self.0.create_many(records).await
    }
    async fn remove(&self, id: TaskId, key: Option<&str>) -> Result<(), StoreError> {
        self.0.remove(id, key).await
    }
    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.0.get(id).await
    }
    async fn start_attempt(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        at: DateTime<Utc>,
    ) -> Result<StartOutcome, StoreError> {
        self.0.start_attempt(msg, worker_id, at).await
    }
    async fn end_attempt(
        &self,
        id: TaskId,
        attempt: u32,
        end: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        self.0.end_attempt(id, attempt, end).await
    }
    async fn reopen(&self, msg: &TaskMessage, at: DateTime<Utc>) -> Result<TaskRecord, StoreError> {
        self.0.reopen(msg, at).await
    }
    async fn cancel(&self, id: TaskId, at: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        self.0.cancel(id, at).await
    }
    async fn list(
        &self,
        state: Option<TaskState>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage, StoreError> {
        self.0.list(state, cursor, limit).await
    }
    async fn heartbeat(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), StoreError> {
        self.0.heartbeat(info, ttl).await
    }
    async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        self.0.remove_worker(id).await
    }
    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        self.0.workers().await
    }
    async fn health(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused (test)".into()))
    }
}
