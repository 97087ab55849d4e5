//! The embedded result store: [`ResultStore`] over the local database file
//! (see [`crate::embedded`]), with the rules of the Redis store.
//!
//! Every transition is one write transaction that reads the record, checks
//! the rule and writes the new version, so it is atomic the way the Redis
//! store's scripts are: a final record is never overwritten, and a late
//! finish is counted as a duplicate execution. Records expire
//! `redis.result_ttl_secs` after their last change: an expired record is
//! invisible at once and removed by the writer's periodic purge.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::ReadableTable;
use tracing::instrument;

use super::{
    AttemptEnd, CancelOutcome, CreateOutcome, EndOutcome, ResultStore, StartOutcome, StoreError,
    TaskPage, WorkerInfo,
};
use crate::config::RedisSettings;
use crate::embedded::records::{self, ALL_STATES, Loaded};
use crate::embedded::tables::{self, Tables};
use crate::embedded::{Db, DbError};
use crate::task::{Attempt, TaskId, TaskMessage, TaskRecord, TaskState};

/// The embedded result store. Cloning shares it.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Db,
    ttl_ms: u64,
}

fn unavailable(e: DbError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A write's answer: the store's outcome, or a rule-level error (an
/// unreadable record) found before anything was written.
type Answer<T> = Result<T, StoreError>;

impl EmbeddedStore {
    /// A store over `db` whose records live `result_ttl_secs` from
    /// `settings` after their last change.
    pub fn new(db: &Db, settings: &RedisSettings) -> Self {
        Self {
            db: db.clone(),
            ttl_ms: settings.result_ttl_secs.saturating_mul(1000),
        }
    }

    /// Runs a read-check-write transition in one transaction.
    async fn transition<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnMut(&mut Tables<'_>, u64, u64) -> Result<Answer<T>, redb::Error> + Send + 'static,
        T: Send + 'static,
    {
        let ttl_ms = self.ttl_ms;
        let mut f = f;
        self.db
            .write(move |t| {
                let now = tables::now_ms();
                f(t, now, now.saturating_add(ttl_ms))
            })
            .await
            .map_err(unavailable)?
    }
}

/// Loads a record for a transition, turning an unreadable one into the
/// transition's answer.
macro_rules! load_or_answer {
    ($t:expr, $id:expr, $now:expr) => {
        match records::load(&$t.tasks, $id, $now)? {
            Ok(found) => found,
            Err(corrupt) => return Ok(Err(corrupt)),
        }
    };
}

/// Writes `record` and answers `answer`, or answers the encoding error.
fn save<T>(
    t: &mut Tables<'_>,
    record: &TaskRecord,
    expires: u64,
    answer: T,
) -> Result<Answer<T>, redb::Error> {
    let json = match records::encode(record) {
        Ok(json) => json,
        Err(e) => return Ok(Err(e)),
    };
    records::put(t, record, &json, expires)?;
    Ok(Ok(answer))
}

/// The create rule: an idempotency key held by a live record returns that
/// record; an id that is already stored is never overwritten (and a repeated
/// create of it answers `Created`).
fn create_op(
    t: &mut Tables<'_>,
    record: &TaskRecord,
    now: u64,
    expires: u64,
) -> Result<Answer<CreateOutcome>, redb::Error> {
    if let Some(key) = &record.idempotency_key {
        let owner = t.idempotency.get(key.as_str())?.map(|v| v.value());
        if let Some(owner) = owner.filter(|owner| *owner != record.id.as_u128())
            && let Some(existing) = load_or_answer!(t, TaskId::from_u128(owner), now)
        {
            return Ok(Ok(CreateOutcome::Existing(Box::new(existing))));
        }
        // A key whose task has expired or been removed is free again.
    }
    if load_or_answer!(t, record.id, now).is_some() {
        // A repeated create of the same task (a retried request) is not a
        // conflict; the stored record is kept as it is.
        return Ok(Ok(CreateOutcome::Created));
    }
    if let Some(key) = &record.idempotency_key {
        // Take the key over from an expired owner before `put` claims it.
        t.idempotency.remove(key.as_str())?;
    }
    save(t, record, expires, CreateOutcome::Created)
}

/// Moves a record to `running` for a new attempt.
fn start_op(
    t: &mut Tables<'_>,
    msg: &TaskMessage,
    worker_id: &str,
    at: DateTime<Utc>,
    now: u64,
    expires: u64,
) -> Result<Answer<StartOutcome>, redb::Error> {
    let mut record = load_or_answer!(t, msg.id, now).unwrap_or_else(|| TaskRecord::queued(msg, at));
    if record.state.is_final() {
        return Ok(Ok(StartOutcome::AlreadyFinal(record.state)));
    }
    record.attempts += 1;
    record.state = TaskState::Running;
    record.started_at = Some(at);
    record.updated_at = at;
    record.worker_id = Some(worker_id.to_owned());
    record.attempt_history.push(Attempt {
        number: record.attempts,
        worker_id: worker_id.to_owned(),
        started_at: at,
        finished_at: None,
        outcome: None,
        error: None,
    });
    let attempt = record.attempts;
    save(t, &record, expires, StartOutcome::Started { attempt })
}

/// Records a whole attempt that was never recorded as started: a start and
/// an end in one transaction, with the rules of
/// [`ResultStore::record_unstarted_attempt`].
fn unstarted_op(
    t: &mut Tables<'_>,
    msg: &TaskMessage,
    worker_id: &str,
    started_at: DateTime<Utc>,
    end: &AttemptEnd,
    now: u64,
    expires: u64,
) -> Result<Answer<EndOutcome>, redb::Error> {
    let Some(mut record) = load_or_answer!(t, msg.id, now) else {
        return Ok(Err(StoreError::Other(format!(
            "task {} has no record (expired or removed)",
            msg.id
        ))));
    };
    // The latest attempt is this very execution when its worker and start
    // time match (a call made again, or a start written after all).
    let mine = record
        .attempt_history
        .last()
        .filter(|a| a.worker_id == worker_id && a.started_at == started_at)
        .map(|a| a.number);
    match (record.state, mine) {
        // Cancelled while this attempt ran: the execution is recorded,
        // closed as cancelled, rather than counted as a duplicate.
        (TaskState::Cancelled, _) => {
            let closed = Attempt {
                number: mine.unwrap_or(record.attempts + 1),
                worker_id: worker_id.to_owned(),
                started_at,
                finished_at: Some(end.at),
                outcome: Some(TaskState::Cancelled),
                error: end.error.clone(),
            };
            if mine.is_some() {
                record.attempt_history.pop();
            }
            record.attempts = closed.number;
            record.attempt_history.push(closed);
            record.updated_at = end.at;
            save(
                t,
                &record,
                expires,
                EndOutcome::AlreadyFinal(TaskState::Cancelled),
            )
        }
        (state, Some(_)) if state.is_final() => Ok(Ok(EndOutcome::AlreadyFinal(state))),
        (state, None) if state.is_final() => {
            record.duplicate_executions += 1;
            save(t, &record, expires, EndOutcome::AlreadyFinal(state))
        }
        (_, Some(attempt)) => end_op(t, msg.id, attempt, end, now, expires),
        (_, None) => match start_op(t, msg, worker_id, started_at, now, expires)? {
            Ok(StartOutcome::Started { attempt }) => end_op(t, msg.id, attempt, end, now, expires),
            Ok(StartOutcome::AlreadyFinal(state)) => Ok(Ok(EndOutcome::AlreadyFinal(state))),
            Err(e) => Ok(Err(e)),
        },
    }
}

/// Records the end of attempt `attempt`.
fn end_op(
    t: &mut Tables<'_>,
    id: TaskId,
    attempt: u32,
    end: &AttemptEnd,
    now: u64,
    expires: u64,
) -> Result<Answer<EndOutcome>, redb::Error> {
    let Some(mut record) = load_or_answer!(t, id, now) else {
        return Ok(Err(StoreError::Other(format!(
            "task {id} has no record (expired or removed)"
        ))));
    };
    if record.state.is_final() {
        let state = record.state;
        let open = record
            .attempt_history
            .iter_mut()
            .find(|a| a.number == attempt && a.finished_at.is_none());
        match open {
            // Cancelled while this attempt ran: this is that execution
            // stopping, not a second one.
            Some(entry) if state == TaskState::Cancelled => {
                entry.finished_at = Some(end.at);
                entry.outcome = Some(TaskState::Cancelled);
                entry.error.clone_from(&end.error);
                record.updated_at = end.at;
            }
            _ => record.duplicate_executions += 1,
        }
        return save(t, &record, expires, EndOutcome::AlreadyFinal(state));
    }
    let index = match record
        .attempt_history
        .iter()
        .position(|a| a.number == attempt)
    {
        Some(index) => index,
        None => {
            // An attempt this record never saw start (it was recreated):
            // keep what is known of it.
            record.attempt_history.push(Attempt {
                number: attempt,
                worker_id: record.worker_id.clone().unwrap_or_default(),
                started_at: record.started_at.unwrap_or(end.at),
                finished_at: None,
                outcome: None,
                error: None,
            });
            record.attempt_history.len() - 1
        }
    };
    let entry = &mut record.attempt_history[index];
    entry.finished_at = Some(end.at);
    entry.outcome = Some(end.state);
    entry.error.clone_from(&end.error);
    // An older attempt that is merely handing the task back must not move
    // the task out from under the newer attempt that is running it now.
    let superseded = attempt < record.attempts && !end.state.is_final();
    if !superseded {
        record.state = end.state;
        record.result.clone_from(&end.result);
        record.error.clone_from(&end.error);
        if end.state.is_final() {
            record.finished_at = Some(end.at);
        } else {
            record.queued_at = Some(end.at);
            record.finished_at = None;
        }
    }
    record.updated_at = end.at;
    save(t, &record, expires, EndOutcome::Written)
}

/// Lists records from the index, newest first, skipping expired ones.
fn list_page(
    txn: &redb::ReadTransaction,
    state: Option<TaskState>,
    cursor: Option<(i64, u128)>,
    limit: usize,
    now: u64,
) -> Result<Answer<TaskPage>, redb::Error> {
    let index = txn.open_table(tables::TASK_INDEX)?;
    let tasks = txn.open_table(tables::TASKS)?;
    let code = state.map_or(ALL_STATES, records::state_code);
    let start = (code, i64::MIN, 0_u128);
    let range = match cursor {
        Some((created, id)) => index.range(start..(code, created, id))?,
        None => index.range(start..=(code, i64::MAX, u128::MAX))?,
    };
    let mut page = Vec::new();
    let mut last = None;
    let mut more = false;
    for entry in range.rev() {
        let (key, _) = entry?;
        let (_, created, id) = key.value();
        let task_id = TaskId::from_u128(id);
        let record: Loaded = records::load(&tasks, task_id, now)?;
        let record = match record {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(e) => {
                // One unreadable record must not hide all the others.
                tracing::warn!(task_id = %task_id, error = %e, "skipping unreadable task record");
                continue;
            }
        };
        if page.len() == limit {
            more = true;
            break;
        }
        page.push(record);
        last = Some((created, id));
    }
    let next_cursor = if more {
        last.map(|(created, id)| records::encode_cursor(created, id))
    } else {
        None
    };
    Ok(Ok(TaskPage {
        tasks: page,
        next_cursor,
    }))
}

#[async_trait]
impl ResultStore for EmbeddedStore {
    #[instrument(level = "debug", skip_all, fields(task_id = %record.id))]
    async fn create(&self, record: &TaskRecord) -> Result<CreateOutcome, StoreError> {
        let record = record.clone();
        self.transition(move |t, now, expires| create_op(t, &record, now, expires))
            .await
    }

    async fn create_many(&self, records: &[TaskRecord]) -> Vec<Result<CreateOutcome, StoreError>> {
        let batch = records.to_vec();
        let count = records.len();
        let ttl_ms = self.ttl_ms;
        let written = self
            .db
            .write(move |t| {
                let now = tables::now_ms();
                let expires = now.saturating_add(ttl_ms);
                batch
                    .iter()
                    .map(|record| create_op(t, record, now, expires))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
        match written {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let reason = e.to_string();
                (0..count)
                    .map(|_| Err(StoreError::Unavailable(reason.clone())))
                    .collect()
            }
        }
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn remove(&self, id: TaskId, idempotency_key: Option<&str>) -> Result<(), StoreError> {
        let key = idempotency_key.map(str::to_owned);
        self.transition(move |t, _, _| {
            let id = id.as_u128();
            records::delete(t, id)?;
            if let Some(key) = &key {
                records::release_key(t, key, id)?;
            }
            Ok(Ok(()))
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.db
            .read(move |txn| {
                let tasks = txn.open_table(tables::TASKS)?;
                records::load(&tasks, id, tables::now_ms())
            })
            .await
            .map_err(unavailable)?
    }

    async fn state(&self, id: TaskId) -> Result<Option<TaskState>, StoreError> {
        self.db
            .read(move |txn| {
                let tasks = txn.open_table(tables::TASKS)?;
                records::load_state(&tasks, id, tables::now_ms())
            })
            .await
            .map_err(unavailable)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn start_attempt(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        at: DateTime<Utc>,
    ) -> Result<StartOutcome, StoreError> {
        let msg = msg.clone();
        let worker_id = worker_id.to_owned();
        self.transition(move |t, now, expires| start_op(t, &msg, &worker_id, at, now, expires))
            .await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn end_attempt(
        &self,
        id: TaskId,
        attempt: u32,
        end: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        let end = end.clone();
        self.transition(move |t, now, expires| end_op(t, id, attempt, &end, now, expires))
            .await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id, state = %end.state))]
    async fn record_unstarted_attempt(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        started_at: DateTime<Utc>,
        end: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        let msg = msg.clone();
        let worker_id = worker_id.to_owned();
        let end = end.clone();
        self.transition(move |t, now, expires| {
            unstarted_op(t, &msg, &worker_id, started_at, &end, now, expires)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn reopen(&self, msg: &TaskMessage, at: DateTime<Utc>) -> Result<TaskRecord, StoreError> {
        let msg = msg.clone();
        self.transition(move |t, now, expires| {
            let record = match load_or_answer!(t, msg.id, now) {
                Some(mut record) => {
                    record.state = TaskState::Queued;
                    record.result = None;
                    record.error = None;
                    record.finished_at = None;
                    record.queued_at = Some(at);
                    record.updated_at = at;
                    record
                }
                None => TaskRecord::queued(&msg, at),
            };
            save(t, &record, expires, record.clone())
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn cancel(&self, id: TaskId, at: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        self.transition(move |t, now, expires| {
            let Some(mut record) = load_or_answer!(t, id, now) else {
                return Ok(Ok(CancelOutcome::NotFound));
            };
            if record.state.is_final() {
                return Ok(Ok(CancelOutcome::AlreadyFinal(Box::new(record))));
            }
            record.state = TaskState::Cancelled;
            record.finished_at = Some(at);
            record.updated_at = at;
            save(
                t,
                &record,
                expires,
                CancelOutcome::Cancelled(Box::new(record.clone())),
            )
        })
        .await
    }

    async fn list(
        &self,
        state: Option<TaskState>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage, StoreError> {
        let cursor = cursor.map(records::decode_cursor).transpose()?;
        self.db
            .read(move |txn| list_page(txn, state, cursor, limit, tables::now_ms()))
            .await
            .map_err(unavailable)?
    }

    async fn heartbeat(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), StoreError> {
        let json = serde_json::to_vec(info)
            .map_err(|e| StoreError::Other(format!("cannot encode worker info: {e}")))?;
        let id = info.id.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.transition(move |t, now, _| {
            let expires = now.saturating_add(ttl_ms);
            t.workers.insert(id.as_str(), (expires, json.as_slice()))?;
            Ok(Ok(()))
        })
        .await
    }

    async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.transition(move |t, _, _| {
            t.workers.remove(id.as_str())?;
            Ok(Ok(()))
        })
        .await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        self.db
            .read(|txn| {
                let now = tables::now_ms();
                let table = txn.open_table(tables::WORKERS)?;
                let mut workers = Vec::new();
                for entry in table.iter()? {
                    let (id, value) = entry?;
                    let (expires, json) = value.value();
                    if expires <= now {
                        continue;
                    }
                    match serde_json::from_slice::<WorkerInfo>(json) {
                        Ok(info) => workers.push(info),
                        Err(e) => {
                            tracing::warn!(worker = id.value(), error = %e, "skipping unreadable heartbeat");
                        }
                    }
                }
                Ok(workers)
            })
            .await
            .map_err(unavailable)
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.db.ping().await.map_err(unavailable)
    }
}
