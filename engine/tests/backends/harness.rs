//! Fixtures: backends on names no other test uses, cleaned up afterwards
//! (explicitly at the end of a passing test, on `Drop` when it panicked),
//! and builders for the messages and records the cases use.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use claudecluster_engine::backend::{self, Backends, testing};
use claudecluster_engine::broker::{AckKind, Delivery, TaskConsumer};
use claudecluster_engine::config::Settings;
use claudecluster_engine::task::{SCHEMA_VERSION, TaskId, TaskMessage, TaskRecord};
use claudecluster_testkit::services;

/// The lease every fixture uses: short, so redelivery cases finish quickly.
pub const ACK_WAIT: Duration = Duration::from_secs(1);

/// A deadline for things that must happen; it only turns a hang into a
/// failure and never measures anything.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Backends on their own names, removed when the fixture goes away.
pub struct Fixture {
    /// The backends under test.
    pub backends: Backends,
    /// The settings they were opened with.
    pub settings: Settings,
    /// The embedded backends' data directory, removed on drop.
    data_dir: Option<tempfile::TempDir>,
    cleaned: bool,
}

impl Fixture {
    /// NATS JetStream and Redis, on the test servers.
    pub async fn networked() -> Self {
        let settings = networked_settings();
        let backends = backend::connect_networked(&settings)
            .await
            .expect("connect to the test NATS and Redis");
        Self {
            backends,
            settings,
            data_dir: None,
            cleaned: false,
        }
    }

    /// The embedded queue and store, in a fresh temporary directory.
    pub async fn embedded() -> Self {
        let data_dir = tempfile::tempdir().expect("a temporary data directory");
        let mut settings = Settings::default();
        settings.nats.ack_wait_ms = u64::try_from(ACK_WAIT.as_millis()).unwrap();
        settings.embedded.data_dir = Some(data_dir.path().to_path_buf());
        let backends = claudecluster_engine::embedded::open_embedded(&settings)
            .expect("open the embedded backends");
        Self {
            backends,
            settings,
            data_dir: Some(data_dir),
            cleaned: false,
        }
    }

    /// Removes what the fixture created.
    pub async fn cleanup(mut self) {
        if self.data_dir.is_none() {
            testing::cleanup(&self.settings).await;
        }
        self.cleaned = true;
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if !self.cleaned && self.data_dir.is_none() {
            testing::cleanup_blocking(&self.settings);
        }
    }
}

/// Removes what `settings` created when dropped, for tests that open their
/// own clients rather than a [`Fixture`]; a panicking test cleans up too.
pub struct Cleanup(pub Settings);

impl Drop for Cleanup {
    fn drop(&mut self) {
        testing::cleanup_blocking(&self.0);
    }
}

/// Unique settings on the test servers with the short lease.
pub fn networked_settings() -> Settings {
    let mut settings =
        testing::isolated_settings("contract", &services::nats_url(), &services::redis_url());
    settings.nats.ack_wait_ms = u64::try_from(ACK_WAIT.as_millis()).unwrap();
    settings
}

/// A task message with a fresh id.
pub fn message(priority: u8) -> TaskMessage {
    message_at(priority, Utc::now())
}

/// A task message with a fresh id created at `at`.
pub fn message_at(priority: u8, at: DateTime<Utc>) -> TaskMessage {
    TaskMessage {
        schema_version: SCHEMA_VERSION,
        id: uuid::Uuid::now_v7(),
        prompt: format!("say hello ({priority})"),
        priority,
        timeout_ms: None,
        max_attempts: 3,
        metadata: serde_json::Map::new(),
        idempotency_key: None,
        created_at: at,
        trace: None,
    }
}

/// The `queued` record of a fresh task.
pub fn record() -> TaskRecord {
    let msg = message(5);
    TaskRecord::queued(&msg, Utc::now())
}

/// The task id in a delivery's body.
pub fn id_of(delivery: &Delivery) -> TaskId {
    serde_json::from_slice::<TaskMessage>(&delivery.payload)
        .expect("a delivery carries a task message")
        .id
}

/// Waits for `future`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {PATIENCE:?}"))
}

/// Pulls until `n` deliveries have been taken, `max` at a time.
pub async fn take(consumer: &dyn TaskConsumer, n: usize, max: usize) -> Vec<Delivery> {
    within(&format!("taking {n} deliveries"), async {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let batch = consumer
                .next_batch(max.min(n - out.len()))
                .await
                .expect("next_batch");
            assert!(!batch.is_empty(), "next_batch returned nothing");
            out.extend(batch);
        }
        out
    })
    .await
}

/// Acks every delivery.
pub async fn ack_all(deliveries: &[Delivery]) {
    for d in deliveries {
        d.acker.ack(AckKind::Ack).await.expect("ack");
    }
}

/// The ids of the deliveries, checking that none repeats.
pub fn distinct_ids(deliveries: &[Delivery]) -> HashSet<TaskId> {
    let ids: HashSet<TaskId> = deliveries.iter().map(id_of).collect();
    assert_eq!(ids.len(), deliveries.len(), "a task was delivered twice");
    ids
}
