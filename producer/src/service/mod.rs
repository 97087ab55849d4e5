//! The intake's operations, independent of the transport: submit, batch
//! submit, get, list, cancel, workers, readiness, and the dead letters
//! ([`dead_letters`]). The HTTP handlers in `routes` are thin adapters over
//! [`TaskService`]; an MCP server calls the same methods.
//!
//! The submit path is one store round trip (claim the idempotency key and
//! write the `queued` record) and one publish round trip. The record is
//! written first so a worker can never start a task the store does not know;
//! when the publish fails the record is removed again, so a client that got
//! an error never finds an orphan `queued` task.

pub mod dead_letters;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use claudecluster_engine::backend::Backends;
use claudecluster_engine::broker::BrokerError;
use claudecluster_engine::config::Settings;
use claudecluster_engine::results::{
    CancelOutcome, CreateOutcome, StoreError, TaskPage, WorkerInfo,
};
use claudecluster_engine::task::{NewTask, TaskMessage, ValidationError};
use claudecluster_engine::{TaskId, TaskRecord, TaskState};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::metrics;

/// Largest page of a list.
pub const MAX_PAGE: usize = 500;
/// Page size when the caller does not say.
pub const DEFAULT_PAGE: usize = 50;

/// Why an operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The task breaks a rule of the contract.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A batch with no tasks.
    #[error("a batch must hold at least one task")]
    EmptyBatch,
    /// A batch over `tasks.max_batch`.
    #[error("a batch holds at most {max} tasks, this one has {got}")]
    BatchTooLarge {
        /// The limit.
        max: usize,
        /// The batch's size.
        got: usize,
    },
    /// No task with this id (or its record expired).
    #[error("no task {0}")]
    TaskNotFound(TaskId),
    /// No dead letter with this sequence number.
    #[error("no dead letter {0}")]
    DeadLetterNotFound(u64),
    /// The task already reached a final state; it is returned unchanged.
    #[error("task {} is already {}", .0.id, .0.state)]
    AlreadyFinal(Box<TaskRecord>),
    /// A list cursor the store did not issue.
    #[error("invalid cursor")]
    InvalidCursor,
    /// A dead letter whose payload is not a valid task message.
    #[error("dead letter {seq} cannot be replayed: {reason}")]
    Unreplayable {
        /// The dead letter.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// The queue did not confirm the publish; nothing was accepted.
    #[error("publish failed: {0}")]
    Publish(#[source] BrokerError),
    /// Some tasks of a batch were accepted, others were not.
    #[error("{} tasks of the batch were not accepted", failed.len())]
    PartiallyAccepted {
        /// The accepted tasks, in request order.
        accepted: Vec<Submitted>,
        /// The others.
        failed: Vec<BatchFailure>,
    },
    /// The queue failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A dependency did not answer within the operation's time limit.
    #[error("the {dependency} did not answer in time")]
    Timeout {
        /// `task queue` or `result store`.
        dependency: &'static str,
    },
    /// The operation's task panicked or was aborted (a bug, or the runtime
    /// shutting down).
    #[error("the operation was interrupted: {0}")]
    Interrupted(String),
}

/// An accepted task.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// Its record: the new one, or the existing one for an idempotent
    /// replay.
    pub record: TaskRecord,
    /// True when the idempotency key was already taken and nothing new was
    /// enqueued.
    pub replayed: bool,
}

/// A task of a batch that was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFailure {
    /// Its position in the request, from 0.
    pub index: usize,
    /// `publish_failed` or `store_failed`.
    pub code: String,
    /// A sentence for a person.
    pub message: String,
}

/// What [`TaskService::readiness`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Workers with a live heartbeat.
    pub workers: usize,
}

/// The intake's operations over the configured backends.
#[derive(Clone)]
pub struct TaskService {
    settings: Arc<Settings>,
    backends: Arc<Backends>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

impl TaskService {
    /// A service over `backends` with the limits in `settings`.
    pub fn new(settings: Arc<Settings>, backends: Backends) -> Self {
        Self {
            settings,
            backends: Arc::new(backends),
        }
    }

    /// The backends.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Validates and enqueues one task, or returns the existing task when its
    /// idempotency key was used before.
    ///
    /// # Errors
    /// [`ServiceError::Invalid`] for a task that breaks a rule,
    /// [`ServiceError::Publish`] when the queue did not confirm (the record is
    /// removed again), [`ServiceError::Store`] when the store failed.
    #[tracing::instrument(skip_all, fields(task_id))]
    pub async fn submit(&self, task: NewTask) -> Result<Submitted, ServiceError> {
        let now = Utc::now();
        let msg = task
            .into_message(&self.settings.tasks, now)
            .inspect_err(|_| metrics::tasks_rejected(1))?;
        tracing::Span::current().record("task_id", tracing::field::display(msg.id));
        let this = self.clone();
        detached(async move { this.enqueue(msg, now).await }).await
    }

    /// Stores, then publishes (or rolls back) one validated task.
    async fn enqueue(
        &self,
        msg: TaskMessage,
        now: DateTime<Utc>,
    ) -> Result<Submitted, ServiceError> {
        let record = TaskRecord::queued(&msg, now);
        let created = match self.backends.store.create(&record).await {
            Ok(created) => created,
            Err(e) => {
                // The store may have written the record before it failed to
                // answer (a Redis that died mid-reply): make sure no queued
                // record is left behind for a task that was never published.
                self.roll_back_in_background(&msg);
                return Err(e.into());
            }
        };
        if let CreateOutcome::Existing(existing) = created {
            metrics::tasks_duplicate(1);
            self.republish_if_unstarted(&existing, now).await;
            return Ok(Submitted {
                record: *existing,
                replayed: true,
            });
        }
        if let Err(e) = self.publish(&msg).await {
            self.roll_back(&msg).await;
            return Err(ServiceError::Publish(e));
        }
        metrics::tasks_queued(1);
        Ok(Submitted {
            record,
            replayed: false,
        })
    }

    /// Validates every task of a batch first (nothing is enqueued when one is
    /// invalid), then stores all records in one round trip and publishes them
    /// pipelined. Tasks whose idempotency key was used before come back as
    /// replays.
    ///
    /// # Errors
    /// [`ServiceError::Invalid`] naming `tasks[i].<field>`,
    /// [`ServiceError::EmptyBatch`], [`ServiceError::BatchTooLarge`], and
    /// [`ServiceError::PartiallyAccepted`] when some tasks could not be
    /// stored or published (those were rolled back; the rest are queued).
    #[tracing::instrument(skip_all, fields(tasks = tasks.len()))]
    pub async fn submit_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<Submitted>, ServiceError> {
        let limits = &self.settings.tasks;
        if tasks.is_empty() {
            metrics::tasks_rejected(1);
            return Err(ServiceError::EmptyBatch);
        }
        if tasks.len() > limits.max_batch {
            metrics::tasks_rejected(tasks.len() as u64);
            return Err(ServiceError::BatchTooLarge {
                max: limits.max_batch,
                got: tasks.len(),
            });
        }
        let now = Utc::now();
        let count = tasks.len();
        let msgs = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.into_message(limits, now)
                    .map_err(|e| e.within(&format!("tasks[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|_| metrics::tasks_rejected(count as u64))?;
        let this = self.clone();
        detached(async move { this.enqueue_batch(msgs, now).await }).await
    }

    /// Stores, then publishes (or rolls back) validated tasks.
    async fn enqueue_batch(
        &self,
        msgs: Vec<TaskMessage>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Submitted>, ServiceError> {
        let count = msgs.len();
        let records: Vec<TaskRecord> = msgs.iter().map(|m| TaskRecord::queued(m, now)).collect();

        let created = self.backends.store.create_many(&records).await;
        // Each slot ends as accepted (Some) or failed (None).
        let mut slots: Vec<Option<Submitted>> = Vec::with_capacity(count);
        let mut failed = Vec::new();
        let mut to_publish = Vec::new();
        let mut publish_index = Vec::new();
        for (i, ((msg, record), outcome)) in msgs.into_iter().zip(records).zip(created).enumerate()
        {
            match outcome {
                Ok(CreateOutcome::Created) => {
                    slots.push(Some(Submitted {
                        record,
                        replayed: false,
                    }));
                    to_publish.push(msg);
                    publish_index.push(i);
                }
                Ok(CreateOutcome::Existing(existing)) => slots.push(Some(Submitted {
                    record: *existing,
                    replayed: true,
                })),
                Err(e) => {
                    tracing::warn!(error = %e, index = i, "storing a batch task failed");
                    // As for a single submit: Redis may have written the
                    // record before the reply was lost.
                    self.roll_back_in_background(&msg);
                    slots.push(None);
                    failed.push(BatchFailure {
                        index: i,
                        code: "store_failed".into(),
                        message: "the result store did not store the task; it was not accepted"
                            .into(),
                    });
                }
            }
        }
        let replays = (count - failed.len() - to_publish.len()) as u64;
        metrics::tasks_duplicate(replays);

        if !to_publish.is_empty() {
            let started = Instant::now();
            let results = self.backends.publisher.publish_batch(&to_publish).await;
            metrics::publish_latency(started.elapsed());
            let mut rollbacks = Vec::new();
            for ((msg, i), result) in to_publish.iter().zip(publish_index).zip(results) {
                if let Err(e) = result {
                    tracing::warn!(error = %e, task_id = %msg.id, "publishing a batch task failed");
                    slots[i] = None;
                    failed.push(BatchFailure {
                        index: i,
                        code: "publish_failed".into(),
                        message: "the task queue did not confirm the task; it was not accepted"
                            .into(),
                    });
                    rollbacks.push(self.roll_back(msg));
                }
            }
            futures::future::join_all(rollbacks).await;
        }
        let accepted: Vec<Submitted> = slots.into_iter().flatten().collect();
        metrics::tasks_queued(accepted.len() as u64 - replays);
        if failed.is_empty() {
            Ok(accepted)
        } else {
            failed.sort_by_key(|f| f.index);
            Err(ServiceError::PartiallyAccepted { accepted, failed })
        }
    }

    /// One task's record.
    ///
    /// # Errors
    /// [`ServiceError::TaskNotFound`], or a store failure.
    pub async fn get(&self, id: TaskId) -> Result<TaskRecord, ServiceError> {
        self.backends
            .store
            .get(id)
            .await?
            .ok_or(ServiceError::TaskNotFound(id))
    }

    /// A page of records, newest first; `limit` is clamped to
    /// 1..=[`MAX_PAGE`].
    ///
    /// # Errors
    /// [`ServiceError::InvalidCursor`] for a cursor the store did not issue,
    /// or a store failure.
    pub async fn list(
        &self,
        state: Option<TaskState>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage, ServiceError> {
        let limit = limit.clamp(1, MAX_PAGE);
        self.backends
            .store
            .list(state, cursor, limit)
            .await
            .map_err(|e| match e {
                // The store reports a cursor it cannot decode as `Other`;
                // anything else about a cursor is the caller's mistake too.
                StoreError::Other(_) | StoreError::Corrupt { .. } if cursor.is_some() => {
                    tracing::debug!(error = %e, "list with a bad cursor");
                    ServiceError::InvalidCursor
                }
                e => ServiceError::Store(e),
            })
    }

    /// Cancels a task that has not finished. A queued task is never started;
    /// a running task's worker reads the state every
    /// `worker.cancel_check_ms` and stops its processes when it sees
    /// `cancelled`.
    ///
    /// # Errors
    /// [`ServiceError::AlreadyFinal`] with the record when it already
    /// finished, [`ServiceError::TaskNotFound`], or a store failure.
    #[tracing::instrument(skip_all, fields(task_id = %id))]
    pub async fn cancel(&self, id: TaskId) -> Result<TaskRecord, ServiceError> {
        match self.backends.store.cancel(id, Utc::now()).await? {
            CancelOutcome::Cancelled(record) => Ok(*record),
            CancelOutcome::AlreadyFinal(record) => Err(ServiceError::AlreadyFinal(record)),
            CancelOutcome::NotFound => Err(ServiceError::TaskNotFound(id)),
        }
    }

    /// Workers with a live heartbeat.
    ///
    /// # Errors
    /// A store failure.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ServiceError> {
        Ok(self.backends.store.workers().await?)
    }

    /// Checks the queue and the store concurrently, each within `timeout`,
    /// and counts the live workers.
    ///
    /// # Errors
    /// The first dependency that failed or did not answer, by name.
    pub async fn readiness(&self, timeout: Duration) -> Result<Readiness, ServiceError> {
        let broker = within(timeout, "task queue", async {
            self.backends.publisher.health().await.map_err(Into::into)
        });
        let store = within(timeout, "result store", async {
            self.backends.store.health().await?;
            Ok(self.backends.store.workers().await?.len())
        });
        let (broker, store) = tokio::join!(broker, store);
        broker?;
        Ok(Readiness { workers: store? })
    }

    /// Tasks waiting on the queue, asked within `timeout`.
    ///
    /// # Errors
    /// A broker failure or [`ServiceError::Timeout`].
    pub async fn queue_depth(&self, timeout: Duration) -> Result<u64, ServiceError> {
        within(timeout, "task queue", async {
            Ok(self.backends.publisher.queue_depth().await?)
        })
        .await
    }

    async fn publish(&self, msg: &TaskMessage) -> Result<(), BrokerError> {
        let started = Instant::now();
        let result = self.backends.publisher.publish(msg).await;
        metrics::publish_latency(started.elapsed());
        result
    }

    /// An idempotent replay of a task that has not started yet publishes it
    /// again. Normally the broker drops the copy as a duplicate (same message
    /// id, inside its duplicate window); but when the first submit stored the
    /// record and then lost its publish, this is what gets the task onto the
    /// queue, so a client retrying with its key never waits on a task that
    /// nothing will run. Outside the window a copy could run twice, so the
    /// task is left alone there.
    async fn republish_if_unstarted(&self, existing: &TaskRecord, now: DateTime<Utc>) {
        let window = chrono::Duration::milliseconds(
            i64::try_from(self.settings.nats.duplicate_window_ms).unwrap_or(i64::MAX),
        );
        if existing.state != TaskState::Queued
            || existing.attempts > 0
            || now - existing.created_at >= window
        {
            return;
        }
        if let Err(e) = self.publish(&existing.to_message()).await {
            tracing::warn!(error = %e, task_id = %existing.id, "republishing a replayed task failed");
        }
    }

    /// [`Self::roll_back`] retried in the background for a while, for a store
    /// that is down right now.
    fn roll_back_in_background(&self, msg: &TaskMessage) {
        let this = self.clone();
        let (id, key) = (msg.id, msg.idempotency_key.clone());
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            for _ in 0..10 {
                match this.backends.store.remove(id, key.as_deref()).await {
                    Ok(()) => return,
                    Err(_) => tokio::time::sleep(delay).await,
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            tracing::error!(
                task_id = %id,
                "could not make sure a task whose submit failed left no record; \
                 a queued record may stay until it expires"
            );
        });
    }

    /// Removes the record of a task whose publish failed; when the store
    /// cannot be reached right now, keeps trying in the background.
    async fn roll_back(&self, msg: &TaskMessage) {
        if let Err(e) = self
            .backends
            .store
            .remove(msg.id, msg.idempotency_key.as_deref())
            .await
        {
            tracing::warn!(error = %e, task_id = %msg.id, "removing the record of an unpublished task failed; retrying");
            self.roll_back_in_background(msg);
        }
    }
}

/// Runs the rest of an operation on a task of its own, so it finishes even
/// when the caller is dropped (a client that disconnects, a request
/// timeout): stopping between the store write and the publish would leave a
/// stored task that is on no queue.
async fn detached<T: Send + 'static>(
    operation: impl Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    match tokio::spawn(operation.instrument(tracing::Span::current())).await {
        Ok(result) => result,
        Err(e) => Err(ServiceError::Interrupted(e.to_string())),
    }
}

async fn within<T>(
    timeout: Duration,
    dependency: &'static str,
    fut: impl Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(ServiceError::Timeout { dependency }))
}

#[cfg(test)]
mod tests;
