//! Shared harness of the end-to-end tests: a [`TestCluster`] runs the real
//! intake and worker pools in this process against either the networked
//! backends (NATS JetStream and Redis, under names unique to the test) or the
//! embedded ones (in a temporary directory), and talks to the intake over
//! HTTP like any client.

use std::sync::Arc;
use std::time::Duration;

use claudecluster_engine::backend::{Backends, connect_networked};
use claudecluster_engine::config::{ExecutorKind, Settings};
use claudecluster_testkit::services;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use claudecluster_testkit::model_api::ModelApi;

/// Which backends a test cluster runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// NATS JetStream and Redis.
    Networked,
    /// The embedded queue and store.
    Embedded,
}

/// Settings for a test cluster on `kind`: a free port, names unique to this
/// test, short leases so redelivery tests run quickly.
pub fn test_settings(kind: BackendKind, data_dir: Option<&std::path::Path>) -> Settings {
    let mut s = Settings::default();
    s.server.port = 0;
    s.log.level = "warn".into();
    s.worker.concurrency = 4;
    s.worker.executor = Some(ExecutorKind::Echo);
    s.worker.heartbeat_interval_ms = 500;
    s.worker.shutdown_grace_ms = 5_000;
    s.worker.retry_base_delay_ms = 50;
    s.worker.retry_max_delay_ms = 500;
    let id = services::unique("");
    s.nats.stream = format!("CCTEST_{id}");
    s.nats.subject_prefix = format!("cctest.{id}.tasks");
    s.nats.consumer_prefix = format!("cctest-{id}");
    s.nats.dead_letter_stream = format!("CCTEST_DL_{id}");
    s.nats.dead_letter_subject_prefix = format!("cctest.{id}.dead");
    s.nats.ack_wait_ms = 5_000;
    s.redis.key_prefix = format!("cctest:{id}:");
    match kind {
        BackendKind::Networked => {
            s.nats.url = Some(services::nats_url());
            s.redis.url = Some(services::redis_url());
        }
        BackendKind::Embedded => {
            s.embedded.data_dir = data_dir.map(std::path::Path::to_path_buf);
        }
    }
    s
}

async fn open(kind: BackendKind, settings: &Settings) -> Backends {
    match kind {
        BackendKind::Networked => connect_networked(settings)
            .await
            .expect("connect to the test NATS and Redis"),
        BackendKind::Embedded => claudecluster_engine::embedded::open_embedded(settings)
            .expect("open the embedded backends"),
    }
}

struct RunningPool {
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

/// An intake and any number of worker pools, in this process.
pub struct TestCluster {
    /// The intake's address, `http://127.0.0.1:<port>`.
    pub base_url: String,
    /// An HTTP client for the intake.
    pub http: reqwest::Client,
    /// The settings every part runs with.
    pub settings: Arc<Settings>,
    /// The intake's backends (also handy for looking behind the API).
    pub backends: Backends,
    kind: BackendKind,
    intake_shutdown: CancellationToken,
    intake: Option<JoinHandle<anyhow::Result<()>>>,
    pools: Vec<RunningPool>,
    _data_dir: Option<tempfile::TempDir>,
}

impl TestCluster {
    /// Starts an intake and one worker pool on `kind`, after `tweak` has
    /// adjusted the settings.
    pub async fn start(kind: BackendKind, tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut cluster = Self::start_intake(kind, tweak).await;
        cluster.add_pool().await;
        cluster
    }

    /// Starts an intake with no workers (tasks pile up until [`Self::add_pool`]).
    pub async fn start_intake(kind: BackendKind, tweak: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = (kind == BackendKind::Embedded)
            .then(|| tempfile::tempdir().expect("temporary directory"));
        let mut settings = test_settings(kind, data_dir.as_ref().map(tempfile::TempDir::path));
        tweak(&mut settings);
        let backends = open(kind, &settings).await;
        let app = claudecluster_producer::Application::build(settings.clone(), backends.clone())
            .await
            .expect("start the intake");
        let base_url = format!("http://127.0.0.1:{}", app.port());
        let intake_shutdown = CancellationToken::new();
        let intake = tokio::spawn(app.run_until_stopped(intake_shutdown.clone()));
        Self {
            base_url,
            http: reqwest::Client::new(),
            settings: Arc::new(settings),
            backends,
            kind,
            intake_shutdown,
            intake: Some(intake),
            pools: Vec::new(),
            _data_dir: data_dir,
        }
    }

    /// Starts another worker pool. On the networked backends it gets its own
    /// connections, like a separate consumer process.
    pub async fn add_pool(&mut self) -> usize {
        self.add_pool_with(|_| {}).await
    }

    /// [`Self::add_pool`] with settings of its own (another worker id, say).
    pub async fn add_pool_with(&mut self, tweak: impl FnOnce(&mut Settings)) -> usize {
        let mut settings = (*self.settings).clone();
        settings.worker.id = Some(format!("test-worker-{}", self.pools.len() + 1));
        tweak(&mut settings);
        let backends = match self.kind {
            BackendKind::Networked => open(self.kind, &settings).await,
            // One process owns the embedded database file.
            BackendKind::Embedded => self.backends.clone(),
        };
        let settings = Arc::new(settings);
        let executor = claudecluster_consumer::executor::from_settings(&settings)
            .expect("set up the executor");
        let pool = claudecluster_consumer::WorkerPool::new(settings, backends, executor);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(pool.run(shutdown.clone()));
        self.pools.push(RunningPool { shutdown, handle });
        self.pools.len() - 1
    }

    /// Stops worker pool `index` gracefully and waits for it.
    pub async fn stop_pool(&mut self, index: usize) {
        let pool = &mut self.pools[index];
        pool.shutdown.cancel();
        let handle = std::mem::replace(&mut pool.handle, tokio::spawn(async { Ok(()) }));
        handle
            .await
            .expect("worker pool task")
            .expect("worker pool stopped cleanly");
    }

    /// `POST /tasks` with `body`; the status and the JSON answer.
    pub async fn submit(&self, body: Value) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}/tasks", self.base_url))
                .json(&body),
        )
        .await
    }

    /// `POST /tasks` of `{"prompt": prompt}`, expecting 202; the record.
    pub async fn submit_prompt(&self, prompt: &str) -> Value {
        let (status, body) = self.submit(serde_json::json!({ "prompt": prompt })).await;
        assert_eq!(status, 202, "submit answered {status}: {body}");
        body
    }

    /// `POST /tasks/batch` of `tasks`; the status and the JSON answer.
    pub async fn submit_batch(&self, tasks: &[Value]) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}/tasks/batch", self.base_url))
                .json(&serde_json::json!({ "tasks": tasks })),
        )
        .await
    }

    /// `GET /tasks/{id}`.
    pub async fn get(&self, id: &str) -> (u16, Value) {
        self.get_path(&format!("/tasks/{id}")).await
    }

    /// `GET` of `path` (from the first `/`, query included).
    pub async fn get_path(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base_url)))
            .await
    }

    /// `POST` of `path` with no body.
    pub async fn post_path(&self, path: &str) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base_url)))
            .await
    }

    /// Any request; the status and the body as JSON (or a JSON string).
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("request to the intake");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// Polls `GET /tasks/{id}` until the task is final; panics after `limit`.
    pub async fn wait_final(&self, id: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        let mut delay = Duration::from_millis(10);
        loop {
            let (status, record) = self.get(id).await;
            assert_eq!(status, 200, "GET /tasks/{id} answered {status}: {record}");
            let state = record["state"].as_str().unwrap_or_default();
            if !matches!(state, "queued" | "running") {
                return record;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} still {state} after {limit:?}: {record}"
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Stops everything and removes what the test left in NATS and Redis.
    pub async fn stop(mut self) {
        for pool in std::mem::take(&mut self.pools) {
            pool.shutdown.cancel();
            let _ = pool.handle.await;
        }
        self.intake_shutdown.cancel();
        if let Some(intake) = self.intake.take() {
            let _ = intake.await;
        }
        if self.kind == BackendKind::Networked {
            claudecluster_engine::backend::testing::cleanup(&self.settings).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // A test that panicked never reached `stop`: stop the tasks at least.
        // Its uniquely named stream is left behind (it collides with no other
        // test) and its Redis keys expire with their TTL.
        for pool in &self.pools {
            pool.shutdown.cancel();
        }
        self.intake_shutdown.cancel();
    }
}

/// The workspace root (where `tests/clients` and the README live).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the workspace")
        .to_path_buf()
}

/// The real Claude Code CLI installed by `scripts/install-test-clients`.
pub fn claude_cli() -> std::path::PathBuf {
    let path = workspace_root().join("tests/clients/node_modules/.bin/claude");
    assert!(
        path.exists(),
        "the Claude Code CLI is not installed at {}: run scripts/install-test-clients (scripts/test does)",
        path.display()
    );
    path
}
