//! `spawn_app()`: the intake on `127.0.0.1:0` against the shared NATS and
//! Redis, with a stream, consumers and key prefix no other test uses, removed
//! again when the [`TestApp`] is dropped. One method per endpoint.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use claudecluster_engine::backend::{self, Backends, testing};
use claudecluster_engine::broker::{AckKind, BrokerError, TaskPublisher};
use claudecluster_engine::config::Settings;
use claudecluster_engine::task::TaskMessage;
use claudecluster_producer::Application;
use reqwest::Response;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// How long a test waits for a message it expects on the stream.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running intake and the backends behind it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// The settings it runs with (unique names).
    pub settings: Settings,
    /// The backends it uses, for checking the store and the stream directly.
    pub backends: Backends,
    client: reqwest::Client,
    shutdown: CancellationToken,
}

/// Settings with unique NATS and Redis names.
pub fn test_settings() -> Settings {
    let mut settings = testing::isolated_settings(
        "producer",
        &claudecluster_testkit::services::nats_url(),
        &claudecluster_testkit::services::redis_url(),
    );
    settings.server.port = 0;
    settings.log.level = std::env::var("TEST_LOG").unwrap_or_else(|_| "error".into());
    settings
}

/// The intake with default settings on real NATS and Redis.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The intake with adjusted settings on real NATS and Redis.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    adjust(&mut settings);
    let backends = backend::connect_networked(&settings)
        .await
        .expect("NATS and Redis must be running for the producer's tests (see scripts/test)");
    spawn_app_on(settings, backends).await
}

/// The intake on the given backends (for failure injection). The settings'
/// NATS and Redis names are cleaned up on drop.
pub async fn spawn_app_on(settings: Settings, backends: Backends) -> TestApp {
    init_logging(&settings);
    let app = Application::build(settings.clone(), backends.clone())
        .await
        .expect("the intake binds 127.0.0.1:0");
    let address = format!("http://127.0.0.1:{}", app.port());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        address,
        settings,
        backends,
        client: reqwest::Client::new(),
        shutdown,
    }
}

fn init_logging(settings: &Settings) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| claudecluster_engine::telemetry::init(&settings.log));
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        testing::cleanup_blocking(&self.settings);
    }
}

impl TestApp {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `POST /tasks` with a JSON body.
    pub async fn submit(&self, body: &Value) -> Response {
        self.post_raw("/tasks", Some("application/json"), body.to_string())
            .await
    }

    /// `POST` any body with any (or no) content type.
    pub async fn post_raw(&self, path: &str, content_type: Option<&str>, body: String) -> Response {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        req.send().await.expect("request reaches the intake")
    }

    /// `POST /tasks/batch`.
    pub async fn submit_batch(&self, body: &Value) -> Response {
        self.post_raw("/tasks/batch", Some("application/json"), body.to_string())
            .await
    }

    /// `GET /tasks/{id}`.
    pub async fn get_task(&self, id: &str) -> Response {
        self.get(&format!("/tasks/{id}")).await
    }

    /// `GET /tasks?<query>`.
    pub async fn list_tasks(&self, query: &str) -> Response {
        self.get(&format!("/tasks?{query}")).await
    }

    /// `POST /tasks/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Response {
        self.client
            .post(self.url(&format!("/tasks/{id}/cancel")))
            .send()
            .await
            .expect("request reaches the intake")
    }

    /// `GET /dead-letters?<query>`.
    pub async fn dead_letters(&self, query: &str) -> Response {
        self.get(&format!("/dead-letters?{query}")).await
    }

    /// `POST /dead-letters/{seq}/replay`.
    pub async fn replay(&self, seq: u64) -> Response {
        self.client
            .post(self.url(&format!("/dead-letters/{seq}/replay")))
            .send()
            .await
            .expect("request reaches the intake")
    }

    /// `DELETE /dead-letters/{seq}`.
    pub async fn delete_dead_letter(&self, seq: u64) -> Response {
        self.client
            .delete(self.url(&format!("/dead-letters/{seq}")))
            .send()
            .await
            .expect("request reaches the intake")
    }

    /// `GET /workers`.
    pub async fn workers(&self) -> Response {
        self.get("/workers").await
    }

    /// `GET /health`.
    pub async fn health(&self) -> Response {
        self.get("/health").await
    }

    /// `GET /ready`.
    pub async fn ready(&self) -> Response {
        self.get("/ready").await
    }

    /// `GET /metrics`, as text.
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text")
    }

    /// `GET` any path.
    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request reaches the intake")
    }

    /// Takes the next message off the test's stream, acknowledges it, and
    /// returns its raw JSON.
    pub async fn receive(&self) -> Value {
        let deliveries =
            tokio::time::timeout(RECEIVE_TIMEOUT, self.backends.consumer.next_batch(1))
                .await
                .expect("a message arrives on the stream")
                .expect("the stream can be read");
        let delivery = deliveries.into_iter().next().expect("one delivery");
        delivery
            .acker
            .ack(AckKind::Ack)
            .await
            .expect("the delivery can be acknowledged");
        serde_json::from_slice(&delivery.payload).expect("the payload is JSON")
    }

    /// Tasks waiting on the test's stream.
    pub async fn queue_depth(&self) -> u64 {
        self.backends
            .publisher
            .queue_depth()
            .await
            .expect("queue depth")
    }
}

/// A publisher that refuses the tasks `refuse` picks and passes the rest to
/// the real one: the broker failing at the worst moment, after the store
/// accepted the record.
pub struct RefusingPublisher {
    inner: Arc<dyn TaskPublisher>,
    refuse: fn(&TaskMessage) -> bool,
}

impl RefusingPublisher {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn TaskPublisher>, refuse: fn(&TaskMessage) -> bool) -> Self {
        Self { inner, refuse }
    }

    pub(crate) fn refused() -> BrokerError {
        BrokerError::NotConfirmed("no acknowledgement within 5000 ms".into())
    }
}

#[async_trait]
impl TaskPublisher for RefusingPublisher {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), BrokerError> {
        if (self.refuse)(msg) {
            return Err(Self::refused());
        }
        self.inner.publish(msg).await
    }

    async fn publish_batch(&self, msgs: &[TaskMessage]) -> Vec<Result<(), BrokerError>> {
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            out.push(self.publish(msg).await);
        }
        out
    }

    async fn health(&self) -> Result<(), BrokerError> {
        self.inner.health().await
    }

    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        self.inner.queue_depth().await
    }
}

/// A publisher that holds every publish until the test opens the gate (adds
/// permits): a broker that is slow to confirm.
pub struct GatedPublisher {
    inner: Arc<dyn TaskPublisher>,
    /// One permit lets one publish through.
    pub gate: Arc<tokio::sync::Semaphore>,
}

impl GatedPublisher {
    /// Wraps `inner` with a closed gate.
    pub fn new(inner: Arc<dyn TaskPublisher>) -> Self {
        Self {
            inner,
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

#[async_trait]
impl TaskPublisher for GatedPublisher {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), BrokerError> {
        let permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| RefusingPublisher::refused())?;
        permit.forget();
        self.inner.publish(msg).await
    }

    async fn publish_batch(&self, msgs: &[TaskMessage]) -> Vec<Result<(), BrokerError>> {
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            out.push(self.publish(msg).await);
        }
        out
    }

    async fn health(&self) -> Result<(), BrokerError> {
        self.inner.health().await
    }

    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        self.inner.queue_depth().await
    }
}

/// Reads a JSON body.
pub async fn json(response: Response) -> Value {
    let status = response.status();
    let text = response.text().await.expect("a body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"))
}
