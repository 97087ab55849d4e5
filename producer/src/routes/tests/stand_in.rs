//! Stand-in backends for the router tests: unreachable, or with a store
//! that hangs in `create` until the test is done (to hold a request in
//! flight).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use claudecluster_engine::backend::Backends;
use claudecluster_engine::broker::{
    BrokerError, DeadLetter, DeadLetterStore, Delivery, TaskConsumer, TaskPublisher,
};
use claudecluster_engine::config::Settings;
use claudecluster_engine::results::{
    AttemptEnd, CancelOutcome, CreateOutcome, EndOutcome, ResultStore, StartOutcome, StoreError,
    TaskPage, WorkerInfo,
};
use claudecluster_engine::task::TaskMessage;
use claudecluster_engine::{TaskId, TaskRecord, TaskState};
use tokio::sync::Notify;

use crate::state::AppState;

/// Backends that are unreachable, or whose store hangs in `create` after
/// signalling `entered` (to hold a request in flight).
#[derive(Default)]
pub(super) struct StandIn {
    pub(super) hang: bool,
    pub(super) entered: Notify,
}

fn down() -> StoreError {
    StoreError::Unavailable("connection refused".into())
}

fn broker_down() -> BrokerError {
    BrokerError::Unavailable("connection refused".into())
}

#[async_trait]
impl TaskPublisher for StandIn {
    async fn publish(&self, _: &TaskMessage) -> Result<(), BrokerError> {
        Err(broker_down())
    }
    async fn publish_batch(&self, msgs: &[TaskMessage]) -> Vec<Result<(), BrokerError>> {
        msgs.iter().map(|_| Err(broker_down())).collect()
    }
    async fn health(&self) -> Result<(), BrokerError> {
        Err(broker_down())
    }
    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        Err(broker_down())
    }
}

#[async_trait]
impl TaskConsumer for StandIn {
    async fn next_batch(&self, _: usize) -> Result<Vec<Delivery>, BrokerError> {
        Err(broker_down())
    }
    async fn dead_letter(
        &self,
        _: Option<TaskId>,
        _: &axum::body::Bytes,
        _: &str,
    ) -> Result<(), BrokerError> {
        Err(broker_down())
    }
}

#[async_trait]
impl DeadLetterStore for StandIn {
    async fn list(
        &self,
        _: Option<u64>,
        _: usize,
        _: Option<TaskId>,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        Err(broker_down())
    }
    async fn get(&self, _: u64) -> Result<Option<DeadLetter>, BrokerError> {
        Err(broker_down())
    }
    async fn delete(&self, _: u64) -> Result<bool, BrokerError> {
        Err(broker_down())
    }
}

#[async_trait]
impl ResultStore for StandIn {
    async fn create(&self, _: &TaskRecord) -> Result<CreateOutcome, StoreError> {
        if self.hang {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        Err(down())
    }
    async fn create_many(&self, r: &[TaskRecord]) -> Vec<Result<CreateOutcome, StoreError>> {
        r.iter().map(|_| Err(down())).collect()
    }
    async fn remove(&self, _: TaskId, _: Option<&str>) -> Result<(), StoreError> {
        Err(down())
    }
    async fn get(&self, _: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        Err(down())
    }
    async fn start_attempt(
        &self,
        _: &TaskMessage,
        _: &str,
        _: DateTime<Utc>,
    ) -> Result<StartOutcome, StoreError> {
        Err(down())
    }
    async fn end_attempt(
        &self,
        _: TaskId,
        _: u32,
        _: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        Err(down())
    }
    async fn reopen(&self, _: &TaskMessage, _: DateTime<Utc>) -> Result<TaskRecord, StoreError> {
        Err(down())
    }
    async fn cancel(&self, _: TaskId, _: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        Err(down())
    }
    async fn list(
        &self,
        _: Option<TaskState>,
        _: Option<&str>,
        _: usize,
    ) -> Result<TaskPage, StoreError> {
        Err(down())
    }
    async fn heartbeat(&self, _: &WorkerInfo, _: Duration) -> Result<(), StoreError> {
        Err(down())
    }
    async fn remove_worker(&self, _: &str) -> Result<(), StoreError> {
        Err(down())
    }
    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        Err(down())
    }
    async fn health(&self) -> Result<(), StoreError> {
        Err(down())
    }
}

pub(super) fn state_with(settings: Settings, stand_in: Arc<StandIn>) -> AppState {
    let backends = Backends {
        publisher: stand_in.clone(),
        consumer: stand_in.clone(),
        store: stand_in.clone(),
        dead_letters: stand_in,
        description: "stand-in".into(),
    };
    AppState::new(settings, backends)
}
