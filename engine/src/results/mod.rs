//! Where task state lives: the [`ResultStore`] trait and its backends,
//! [`redis`] (production) and [`embedded`] (the all-in-one command).
//!
//! The store is the single source of truth for a task's state. Its
//! operations are the state machine's transitions, each applied atomically
//! by the backend, so two workers racing on a redelivered task cannot move a
//! record out of a final state: the first final write wins, later ones are
//! counted as duplicate executions.

pub mod embedded;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::task::{TaskError, TaskId, TaskMessage, TaskRecord, TaskResult, TaskState};

/// Errors from a result store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached.
    #[error("result store unavailable: {0}")]
    Unavailable(String),
    /// A stored document could not be read back.
    #[error("corrupt record for task {id}: {reason}")]
    Corrupt {
        /// The task whose record is unreadable.
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// Anything else the store reported.
    #[error("result store error: {0}")]
    Other(String),
}

/// What [`ResultStore::create`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// The record was stored.
    Created,
    /// The idempotency key already belongs to this task, which is returned
    /// instead; nothing was stored.
    Existing(Box<TaskRecord>),
}

/// What [`ResultStore::start_attempt`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum StartOutcome {
    /// The record now says `running`; this is attempt `attempt`.
    Started {
        /// The attempt number, 1 for the first.
        attempt: u32,
    },
    /// The task is already final (finished, cancelled or dead-lettered):
    /// do not run it.
    AlreadyFinal(TaskState),
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptEnd {
    /// The state the task moves to: `queued` when it will be retried, or a
    /// final state.
    pub state: TaskState,
    /// The output, if any.
    pub result: Option<TaskResult>,
    /// The error, if any.
    pub error: Option<TaskError>,
    /// When the attempt ended.
    pub at: DateTime<Utc>,
}

/// What [`ResultStore::end_attempt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOutcome {
    /// The record was updated.
    Written,
    /// The record was already final; it was left alone and the execution was
    /// counted as a duplicate.
    AlreadyFinal(TaskState),
}

/// What [`ResultStore::cancel`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The record now says `cancelled`.
    Cancelled(Box<TaskRecord>),
    /// The task had already finished; nothing changed.
    AlreadyFinal(Box<TaskRecord>),
    /// No such task.
    NotFound,
}

/// A worker's announcement of itself, refreshed on every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// `WORKER_ID`.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// The ClaudeCluster version.
    pub version: String,
    /// Its concurrency limit.
    pub concurrency: usize,
    /// Tasks it is running now.
    pub in_flight: usize,
    /// The executor it runs tasks with.
    pub executor: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_seen: DateTime<Utc>,
}

/// A page of [`ResultStore::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPage {
    /// Records, newest first.
    pub tasks: Vec<TaskRecord>,
    /// Pass this to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Task state storage.
#[async_trait]
pub trait ResultStore: Send + Sync + 'static {
    /// Stores a new `queued` record. With an idempotency key, the key is
    /// claimed atomically: when another task holds it, that task's record is
    /// returned and nothing is stored.
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn create(&self, record: &TaskRecord) -> Result<CreateOutcome, StoreError>;

    /// [`Self::create`] for many records in one round trip where the backend
    /// allows it. One result per record, in order.
    async fn create_many(&self, records: &[TaskRecord]) -> Vec<Result<CreateOutcome, StoreError>>;

    /// Removes a record (and its idempotency key) that was created but whose
    /// publish failed, so no orphan `queued` record is left behind.
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn remove(&self, id: TaskId, idempotency_key: Option<&str>) -> Result<(), StoreError>;

    /// Reads a record.
    ///
    /// # Errors
    /// When the store is unreachable or the record unreadable.
    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError>;

    /// Reads only a task's state: the small read a worker repeats while a
    /// task runs, to notice a cancellation. `None` when there is no record.
    /// The default reads the whole record; backends where that is costly
    /// override it.
    ///
    /// # Errors
    /// When the store is unreachable or the record unreadable.
    async fn state(&self, id: TaskId) -> Result<Option<TaskState>, StoreError> {
        Ok(self.get(id).await?.map(|record| record.state))
    }

    /// A task's state and how many attempts it has had, without changing
    /// anything: what a worker checks before running a first delivery whose
    /// start it records later ([`Self::record_unstarted_attempt`]). `None`
    /// when there is no record.
    ///
    /// # Errors
    /// When the store is unreachable or the record unreadable.
    async fn peek(&self, id: TaskId) -> Result<Option<(TaskState, u32)>, StoreError> {
        Ok(self
            .get(id)
            .await?
            .map(|record| (record.state, record.attempts)))
    }

    /// Records a whole attempt that was not recorded as started: it began
    /// at `started_at` on `worker_id` and ended as `end` says. One write for
    /// what [`Self::start_attempt`] and [`Self::end_attempt`] do in two: the
    /// attempt gets the next number, the record goes through `running` (its
    /// event is published) to `end.state`. When the task became final
    /// meanwhile, the answer is [`EndOutcome::AlreadyFinal`]; a task
    /// cancelled meanwhile has the execution recorded as an attempt closed
    /// as `cancelled`, another final state counts it as a duplicate. When the
    /// latest attempt has this worker and start time (the call made again
    /// after a lost reply, or a start written after all), that attempt is
    /// written, not a new one.
    ///
    /// The default starts and ends the attempt in two writes.
    ///
    /// # Errors
    /// When the store is unreachable or the record is gone.
    async fn record_unstarted_attempt(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        started_at: DateTime<Utc>,
        end: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        match self.start_attempt(msg, worker_id, started_at).await? {
            StartOutcome::Started { attempt } => self.end_attempt(msg.id, attempt, end).await,
            StartOutcome::AlreadyFinal(state) => Ok(EndOutcome::AlreadyFinal(state)),
        }
    }

    /// Marks the task `running` on `worker_id` and records a new attempt.
    /// Creates the record from the message when there is none (a message
    /// published straight onto the queue by another system).
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn start_attempt(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        at: DateTime<Utc>,
    ) -> Result<StartOutcome, StoreError>;

    /// Records how attempt `attempt` ended, unless the record is already
    /// final. One exception to "already final": a task cancelled while this
    /// attempt ran has the attempt closed as `cancelled` (its finish time and
    /// error recorded), which is the end of that execution and not a
    /// duplicate; the answer is still [`EndOutcome::AlreadyFinal`].
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn end_attempt(
        &self,
        id: TaskId,
        attempt: u32,
        end: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError>;

    /// Puts a task back to `queued` for a replay from the dead letters (an
    /// operator's explicit decision, the one way out of a final state): clears
    /// the result, error and finish time, keeps the attempt history. Creates
    /// the record from the message when it has expired.
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn reopen(&self, msg: &TaskMessage, at: DateTime<Utc>) -> Result<TaskRecord, StoreError>;

    /// Moves a task that is not final to `cancelled`.
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn cancel(&self, id: TaskId, at: DateTime<Utc>) -> Result<CancelOutcome, StoreError>;

    /// Lists records, newest first, optionally only those in `state`.
    ///
    /// # Errors
    /// When the store is unreachable or the cursor is not one it issued.
    async fn list(
        &self,
        state: Option<TaskState>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage, StoreError>;

    /// Records a worker heartbeat that expires after `ttl`.
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn heartbeat(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), StoreError>;

    /// Removes a worker's heartbeat at shutdown.
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn remove_worker(&self, id: &str) -> Result<(), StoreError>;

    /// Workers whose heartbeat has not expired.
    ///
    /// # Errors
    /// When the store is unreachable.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError>;

    /// Checks that the store is reachable.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] with the reason.
    async fn health(&self) -> Result<(), StoreError>;
}
