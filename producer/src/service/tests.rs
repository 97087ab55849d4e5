//! The service against a real Redis: what a submit that failed leaves behind.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use claudecluster_engine::embedded::open_embedded_at;
use claudecluster_engine::results::redis::RedisStore;
use claudecluster_engine::results::{
    AttemptEnd, CancelOutcome, CreateOutcome, EndOutcome, ResultStore, StartOutcome, StoreError,
    TaskPage, WorkerInfo,
};
use claudecluster_testkit::services;
use claudecluster_testkit::wait::eventually;

use super::*;

/// A Redis store whose batch creates are written but whose replies are
/// lost, as when Redis dies mid-reply. Only what a submit calls is served.
struct LostReplies {
    redis: RedisStore,
    written: Mutex<Vec<TaskId>>,
}

fn not_served() -> StoreError {
    StoreError::Other("not served by this test store".into())
}

#[async_trait]
impl ResultStore for LostReplies {
    async fn create(&self, _: &TaskRecord) -> Result<CreateOutcome, StoreError> {
        Err(not_served())
    }

    async fn create_many(&self, records: &[TaskRecord]) -> Vec<Result<CreateOutcome, StoreError>> {
        let stored = self.redis.create_many(records).await;
        assert!(stored.iter().all(Result::is_ok), "{stored:?}");
        self.written
            .lock()
            .unwrap()
            .extend(records.iter().map(|r| r.id));
        records
            .iter()
            .map(|_| Err(StoreError::Unavailable("connection lost mid-reply".into())))
            .collect()
    }

    async fn remove(&self, id: TaskId, key: Option<&str>) -> Result<(), StoreError> {
        self.redis.remove(id, key).await
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.redis.get(id).await
    }

    async fn start_attempt(
        &self,
        _: &TaskMessage,
        _: &str,
        _: DateTime<Utc>,
    ) -> Result<StartOutcome, StoreError> {
        Err(not_served())
    }

    async fn end_attempt(
        &self,
        _: TaskId,
        _: u32,
        _: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        Err(not_served())
    }

    async fn reopen(&self, _: &TaskMessage, _: DateTime<Utc>) -> Result<TaskRecord, StoreError> {
        Err(not_served())
    }

    async fn cancel(&self, _: TaskId, _: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        Err(not_served())
    }

    async fn list(
        &self,
        _: Option<TaskState>,
        _: Option<&str>,
        _: usize,
    ) -> Result<TaskPage, StoreError> {
        Err(not_served())
    }

    async fn heartbeat(&self, _: &WorkerInfo, _: Duration) -> Result<(), StoreError> {
        Err(not_served())
    }

    async fn remove_worker(&self, _: &str) -> Result<(), StoreError> {
        Err(not_served())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        Err(not_served())
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.redis.health().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_store_reply_was_lost_leaves_no_record() {
    let mut settings = Settings::default();
    settings.redis.key_prefix = format!("{}:", services::unique("cc-lost-reply"));
    let dir = tempfile::tempdir().unwrap();
    // The queue is never reached: no task of the batch is accepted.
    let mut backends = open_embedded_at(dir.path().join("cc.db"), &settings).unwrap();
    let store = Arc::new(LostReplies {
        redis: RedisStore::connect(&services::redis_url(), &settings.redis)
            .await
            .unwrap(),
        written: Mutex::default(),
    });
    backends.store = store.clone();
    let service = TaskService::new(Arc::new(settings), backends);

    let tasks = (0..3)
        .map(|i| NewTask {
            prompt: format!("task {i}"),
            ..NewTask::default()
        })
        .collect();
    let Err(ServiceError::PartiallyAccepted { accepted, failed }) =
        service.submit_batch(tasks).await
    else {
        panic!("expected a partial failure");
    };
    assert!(accepted.is_empty());
    assert!(
        failed.iter().all(|f| f.code == "store_failed"),
        "{failed:?}"
    );

    let written = store.written.lock().unwrap().clone();
    assert_eq!(written.len(), 3);
    eventually("the records to be rolled back", || async {
        for id in &written {
            if store.redis.get(*id).await.unwrap().is_some() {
                return None;
            }
        }
        Some(())
    })
    .await;
}
