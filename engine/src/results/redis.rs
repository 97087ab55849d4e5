//! The Redis result store: task state for the networked deployment.
//!
//! Every transition of the state machine is one Lua script (see
//! `redis/scripts/`), so it is atomic and costs one round trip: two workers
//! racing on a redelivered task cannot move a record out of a final state.
//! The one write with nothing to check first, a new task without an
//! idempotency key, is sent as the same writes in plain commands in
//! `MULTI`/`EXEC` instead (a whole batch submit in one), which costs Redis
//! about half what the script does (`loadtest/redis-scripts.py`). The
//! starts and ends a worker makes at the same time go as rows of one script
//! call ([`coalesce`]).
//! Records live in one hash per task ([`record`] describes the fields) and
//! expire `result_ttl_secs` after their last change. An index of all tasks
//! and one for each rare outcome (failed, timed out, cancelled, dead
//! lettered) serve `list`; the common states are listed by filtering the
//! index of all tasks, which keeps index writes off the way of a task that
//! succeeds. Indexes are trimmed as they are written.
//! Every transition also publishes `{"id","state"}` on
//! `<prefix>events:<id>`, for clients that want to follow a task.
//!
//! Calls go over a ring of `RedisSettings::pool_size` multiplexed
//! connections ([`connections`]); script calls made at the same time are
//! sent together ([`coalesce`]).

mod coalesce;
mod connections;
mod keys;
mod record;
mod reply;
mod scripts;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionLike;
use ::redis::{ScriptInvocation, Value};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::instrument;

use self::coalesce::Coalescer;
use self::connections::Connections;
use self::keys::{Cursor, Keys};
use self::scripts::scripts;
use super::{
    AttemptEnd, CancelOutcome, CreateOutcome, EndOutcome, ResultStore, StartOutcome, StoreError,
    TaskPage, WorkerInfo,
};
use crate::config::RedisSettings;
use crate::task::{TaskId, TaskMessage, TaskRecord, TaskState};

/// Largest page `list` returns.
const MAX_PAGE: usize = 1000;
/// Index reads per `list` call when expired or moved entries leave holes.
const MAX_LIST_ROUNDS: usize = 8;
/// Index entries read per round when a state without an index of its own is
/// listed by filtering the index of all tasks.
const SCAN_CHUNK: usize = 256;

/// Task state in Redis.
pub struct RedisStore {
    connections: Arc<Connections>,
    calls: Coalescer,
    keys: Keys,
    ttl_secs: u64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: only the prefix is shown.
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.keys.prefix())
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store over a ring of connections to `url`; connections open on
    /// first use. Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the URL is not a Redis URL.
    pub fn new(url: &str, settings: &RedisSettings) -> Result<Self, StoreError> {
        let connections = Arc::new(Connections::new(url, settings.pool_size)?);
        Ok(Self {
            calls: Coalescer::start(connections.clone()),
            connections,
            keys: Keys::new(&settings.key_prefix),
            // EXPIRE 0 would delete the record at once.
            ttl_secs: settings.result_ttl_secs.max(1),
        })
    }

    /// [`Self::new`], then a `PING` to prove Redis answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub async fn connect(url: &str, settings: &RedisSettings) -> Result<Self, StoreError> {
        let store = Self::new(url, settings)?;
        store.health().await?;
        Ok(store)
    }

    fn conn(&self) -> ::redis::aio::ConnectionManager {
        self.connections.get()
    }

    /// Index entries created before this (ms) belong to expired records.
    fn cutoff_ms(&self) -> i64 {
        let ttl_ms = i64::try_from(self.ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        Utc::now().timestamp_millis().saturating_sub(ttl_ms)
    }

    async fn eval(&self, invocation: ScriptInvocation<'static>) -> Result<Value, StoreError> {
        self.calls.eval(invocation).await
    }

    fn create_invocation(
        &self,
        record: &TaskRecord,
        cutoff: i64,
    ) -> Result<ScriptInvocation<'static>, StoreError> {
        let fields = record::encode(record)?;
        let mut invocation = scripts().create.prepare_invoke();
        invocation
            .key(self.keys.task(record.id))
            .arg(self.keys.prefix())
            .arg(record.id.to_string())
            .arg(record.idempotency_key.as_deref().unwrap_or(""))
            .arg(self.ttl_secs)
            .arg(record.created_at.timestamp_millis())
            .arg(cutoff)
            .arg(record.state.as_str())
            .arg(fields);
        Ok(invocation)
    }

    /// Whether `record` is stored with plain commands: without an
    /// idempotency key to claim, a new record has nothing to check first.
    /// (Its id is new: the intake creates a record before it publishes the
    /// task, so no worker can have moved it on.)
    fn plainly_created(record: &TaskRecord) -> bool {
        record.idempotency_key.is_none() && !keys::has_own_index(record.state)
    }

    /// Stores records that are [`Self::plainly_created`]: `create.lua`'s
    /// writes as plain commands, all in one `MULTI`/`EXEC`, so a record
    /// never exists without its TTL and a batch is stored whole or not at
    /// all. The index of all tasks takes the whole batch in one `ZADD`.
    async fn create_plainly(&self, records: &[&TaskRecord]) -> Result<(), StoreError> {
        let index = self.keys.index(None);
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        let mut members = Vec::with_capacity(records.len());
        let mut trim = false;
        for record in records {
            let fields = record::encode(record)?;
            let id = record.id.to_string();
            let key = self.keys.task(record.id);
            pipe.cmd("HSET").arg(&key).arg(fields).ignore();
            pipe.cmd("EXPIRE").arg(&key).arg(self.ttl_secs).ignore();
            pipe.cmd("PUBLISH")
                .arg(self.keys.events(&id))
                .arg(format!(
                    r#"{{"id":"{id}","state":"{}"}}"#,
                    record.state.as_str()
                ))
                .ignore();
            // The scripts' trimming rule (`trim` in `prelude.lua`): one id
            // in sixteen trims the index of entries older than the TTL.
            trim |= id.ends_with('0');
            members.push((record.created_at.timestamp_millis(), id));
        }
        pipe.cmd("ZADD").arg(&index).arg(members).ignore();
        if trim {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&index)
                .arg("-inf")
                .arg(format!("({}", self.cutoff_ms()))
                .ignore();
        }
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(reply::redis_error)
    }

    /// Stores a record through `create.lua`.
    async fn create_scripted(
        &self,
        record: &TaskRecord,
        cutoff: i64,
    ) -> Result<CreateOutcome, StoreError> {
        let invocation = self.create_invocation(record, cutoff)?;
        Self::create_outcome(self.eval(invocation).await?)
    }

    fn create_outcome(value: Value) -> Result<CreateOutcome, StoreError> {
        let (code, mut rest) = reply::coded("create", value)?;
        if code == 1 {
            return Ok(CreateOutcome::Created);
        }
        let (Some(owner), Some(fields)) = (rest.next(), rest.next()) else {
            return Err(StoreError::Other("short reply to create".into()));
        };
        let owner = reply::text("create", owner)?;
        let fields = reply::pairs("create", fields)?;
        Ok(CreateOutcome::Existing(Box::new(record::decode(
            &owner, fields,
        )?)))
    }

    fn decode_fields(id: TaskId, what: &str, value: Value) -> Result<TaskRecord, StoreError> {
        record::decode(&id.to_string(), reply::pairs(what, value)?)
    }

    async fn list_round(
        &self,
        conn: &mut impl ConnectionLike,
        index: &str,
        cursor: Option<&Cursor>,
        want: usize,
        cutoff: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let max = cursor.map_or_else(|| "+inf".to_owned(), |c| c.score.to_string());
        let after = cursor.map_or("", |c| c.id.as_str());
        let value: Value = scripts()
            .list
            .key(index)
            .arg(max)
            .arg(after)
            .arg(want)
            .arg(cutoff)
            .invoke_async(conn)
            .await
            .map_err(reply::redis_error)?;
        let mut items = reply::array("list", value)?.into_iter();
        let mut out = Vec::new();
        while let (Some(id), Some(score)) = (items.next(), items.next()) {
            out.push((reply::text("list", id)?, reply::int("list", &score)?));
        }
        Ok(out)
    }
    /// A call of a transition script with the arguments they all start with:
    /// the task hash as the key, then the key prefix, the task id, the TTL
    /// and the index cutoff.
    fn transition<'a>(&self, script: &'a ::redis::Script, id: TaskId) -> ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.keys.task(id))
            .arg(self.keys.prefix())
            .arg(id.to_string())
            .arg(self.ttl_secs)
            .arg(self.cutoff_ms());
        invocation
    }

    /// The arguments every row of `start_attempt.lua` and `end_attempt.lua`
    /// shares: the key prefix, the TTL and the index cutoff. The cutoff
    /// only trims indexes, so it is taken to the second, which lets the
    /// rows of a whole second share it.
    fn shared_args(&self) -> Vec<Vec<u8>> {
        let cutoff = self.cutoff_ms() / 1000 * 1000;
        vec![
            self.keys.prefix().as_bytes().to_vec(),
            self.ttl_secs.to_string().into_bytes(),
            cutoff.to_string().into_bytes(),
        ]
    }

    /// [`Self::shared_args`] and the worker id: what the rows of the scripts
    /// that start attempts share.
    fn worker_args(&self, worker_id: &str) -> Vec<Vec<u8>> {
        let mut shared = self.shared_args();
        shared.push(worker_id.as_bytes().to_vec());
        shared
    }

    /// One row of `start_attempt.lua`; `message` is the task message JSON
    /// to create a missing record from, or empty.
    async fn start_call(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        at: DateTime<Utc>,
        message: &str,
    ) -> Result<Value, StoreError> {
        let args = vec![
            msg.id.to_string().into_bytes(),
            record::timestamp(at).into_bytes(),
            message.as_bytes().to_vec(),
            msg.created_at.timestamp_millis().to_string().into_bytes(),
        ];
        self.calls
            .row(
                &scripts().start_attempt,
                self.worker_args(worker_id),
                self.keys.task(msg.id),
                args,
            )
            .await
    }

    /// The hashes of the listed tasks `ids`, in order, in one round trip; a
    /// record that has expired comes back empty.
    async fn read_listed<'a>(
        &self,
        conn: &mut impl ConnectionLike,
        ids: impl ExactSizeIterator<Item = &'a str>,
    ) -> Result<Vec<HashMap<String, String>>, StoreError> {
        if ids.len() == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.keys.task_named(id));
        }
        pipe.query_async(conn).await.map_err(reply::redis_error)
    }

    /// Drops the entries of expired records `gone` from `indexes`.
    async fn drop_from_indexes(
        conn: &mut impl ConnectionLike,
        indexes: &[&str],
        gone: &[String],
    ) -> Result<(), StoreError> {
        if gone.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        for index in indexes {
            pipe.cmd("ZREM").arg(*index).arg(gone).ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(reply::redis_error)
    }

    /// A listed record to show: `None` when it is not in `state` (the index
    /// and the hash are read in two steps, so it may have moved on) or does
    /// not decode (logged).
    fn listed(
        id: &str,
        fields: HashMap<String, String>,
        state: Option<TaskState>,
    ) -> Option<TaskRecord> {
        match record::decode(id, fields) {
            Ok(record) if state.is_some_and(|s| s != record.state) => None,
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "skipping unreadable task record");
                None
            }
        }
    }

    /// [`ResultStore::list`] for a state without an index of its own: walks
    /// the index of all tasks, reads each entry's state, and fetches the
    /// records of those that match. A call reads at most
    /// `MAX_LIST_ROUNDS * SCAN_CHUNK` entries, so a page may come back short
    /// with a `next_cursor` to go on from.
    async fn list_filtered(
        &self,
        state: TaskState,
        mut cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<TaskPage, StoreError> {
        let index = self.keys.index(None);
        let cutoff = self.cutoff_ms();
        let mut conn = self.conn();
        let mut tasks = Vec::with_capacity(limit);
        for _ in 0..MAX_LIST_ROUNDS {
            let entries = self
                .list_round(&mut conn, &index, cursor.as_ref(), SCAN_CHUNK, cutoff)
                .await?;
            let more = entries.len() > SCAN_CHUNK;
            let page = &entries[..entries.len().min(SCAN_CHUNK)];
            if page.is_empty() {
                return Ok(TaskPage {
                    tasks,
                    next_cursor: None,
                });
            }
            let mut pipe = ::redis::pipe();
            for (id, _) in page {
                pipe.cmd("HGET").arg(self.keys.task_named(id)).arg("state");
            }
            let states: Vec<Option<String>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(reply::redis_error)?;

            let mut matching = Vec::new();
            let mut gone = Vec::new();
            let mut full = false;
            for ((id, score), found) in page.iter().zip(states) {
                match found {
                    None => gone.push(id.clone()),
                    Some(s) if s == state.as_str() => {
                        if tasks.len() + matching.len() == limit {
                            full = true;
                            break;
                        }
                        matching.push(id.clone());
                    }
                    Some(_) => {}
                }
                cursor = Some(Cursor {
                    score: *score,
                    id: id.clone(),
                });
            }
            Self::drop_from_indexes(&mut conn, &[&index], &gone).await?;
            let hashes = self
                .read_listed(&mut conn, matching.iter().map(String::as_str))
                .await?;
            for (id, fields) in matching.iter().zip(hashes) {
                // Empty: expired since its state was read.
                if !fields.is_empty() {
                    tasks.extend(Self::listed(id, fields, Some(state)));
                }
            }
            if full || (more && tasks.len() >= limit) {
                break;
            }
            if !more {
                return Ok(TaskPage {
                    tasks,
                    next_cursor: None,
                });
            }
        }
        Ok(TaskPage {
            tasks,
            next_cursor: cursor.map(|c| c.encode()),
        })
    }
}

#[async_trait]
impl ResultStore for RedisStore {
    #[instrument(level = "debug", skip_all, fields(task_id = %record.id))]
    async fn create(&self, record: &TaskRecord) -> Result<CreateOutcome, StoreError> {
        if Self::plainly_created(record) {
            return self
                .create_plainly(&[record])
                .await
                .map(|()| CreateOutcome::Created);
        }
        self.create_scripted(record, self.cutoff_ms()).await
    }

    #[instrument(level = "debug", skip_all, fields(count = records.len()))]
    async fn create_many(&self, records: &[TaskRecord]) -> Vec<Result<CreateOutcome, StoreError>> {
        // Records without an idempotency key go in one MULTI/EXEC of plain
        // commands: for a batch of 100, about 9 µs of Redis CPU per task
        // against 22 for the script (`loadtest/redis-scripts.py`). The rest
        // queue on the script together and leave in one pipeline.
        let cutoff = self.cutoff_ms();
        let plain: Vec<&TaskRecord> = records
            .iter()
            .filter(|r| Self::plainly_created(r))
            .collect();
        let scripted = futures::future::join_all(
            records
                .iter()
                .filter(|r| !Self::plainly_created(r))
                .map(|r| self.create_scripted(r, cutoff)),
        );
        let stored = async {
            if plain.is_empty() {
                Ok(())
            } else {
                self.create_plainly(&plain).await
            }
        };
        let (stored, scripted) = futures::future::join(stored, scripted).await;
        let mut scripted = scripted.into_iter();
        records
            .iter()
            .map(|r| {
                if Self::plainly_created(r) {
                    stored.clone().map(|()| CreateOutcome::Created)
                } else {
                    scripted
                        .next()
                        .unwrap_or_else(|| Err(StoreError::Other("missing reply to create".into())))
                }
            })
            .collect()
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn remove(&self, id: TaskId, idempotency_key: Option<&str>) -> Result<(), StoreError> {
        let mut invocation = scripts().remove.prepare_invoke();
        invocation
            .key(self.keys.task(id))
            .arg(self.keys.prefix())
            .arg(id.to_string())
            .arg(idempotency_key.unwrap_or(""));
        self.eval(invocation).await.map(drop)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let mut conn = self.conn();
        let value: Value = ::redis::cmd("HGETALL")
            .arg(self.keys.task(id))
            .query_async(&mut conn)
            .await
            .map_err(reply::redis_error)?;
        let fields = reply::pairs("HGETALL", value)?;
        if fields.is_empty() {
            return Ok(None);
        }
        record::decode(&id.to_string(), fields).map(Some)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn state(&self, id: TaskId) -> Result<Option<TaskState>, StoreError> {
        let mut conn = self.conn();
        let state: Option<String> = ::redis::cmd("HGET")
            .arg(self.keys.task(id))
            .arg("state")
            .query_async(&mut conn)
            .await
            .map_err(reply::redis_error)?;
        state.map(|s| parse_state(id, &s)).transpose()
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn start_attempt(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        at: DateTime<Utc>,
    ) -> Result<StartOutcome, StoreError> {
        // The message goes along only when the record turns out to be
        // missing (a task published straight onto the queue): shipping it
        // with every start would cost each task a serialisation and the
        // bytes on the wire.
        let mut value = self.start_call(msg, worker_id, at, "").await?;
        if reply::is_code(&value, -1) {
            let json = record::to_json(msg)?;
            value = self.start_call(msg, worker_id, at, &json).await?;
        }
        let (code, mut rest) = reply::coded("start_attempt", value)?;
        let detail = rest
            .next()
            .ok_or_else(|| StoreError::Other("short reply to start_attempt".into()))?;
        if code == 1 {
            let attempt = reply::int("start_attempt", &detail)?;
            let attempt = u32::try_from(attempt)
                .map_err(|_| StoreError::Other(format!("attempt number {attempt} out of range")))?;
            return Ok(StartOutcome::Started { attempt });
        }
        let state = reply::text("start_attempt", detail)?;
        parse_state(msg.id, &state).map(StartOutcome::AlreadyFinal)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id, attempt, state = %end.state))]
    async fn end_attempt(
        &self,
        id: TaskId,
        attempt: u32,
        end: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        let mut args = vec![
            id.to_string().into_bytes(),
            attempt.to_string().into_bytes(),
        ];
        args.extend(end_args(end)?);
        let value = self
            .calls
            .row(
                &scripts().end_attempt,
                self.shared_args(),
                self.keys.task(id),
                args,
            )
            .await?;
        end_outcome(id, "end_attempt", value)
    }

    async fn peek(&self, id: TaskId) -> Result<Option<(TaskState, u32)>, StoreError> {
        // Through the coalescer, not a connection of its own: a worker peeks
        // at every delivery of a pull, and the commands queued together go
        // out in one pipeline. Sent one by one, they cost a busy worker an
        // eighth of its CPU.
        let mut cmd = ::redis::cmd("HMGET");
        cmd.arg(self.keys.task(id)).arg("state").arg("attempts");
        let value = self.calls.command(cmd).await?;
        let (state, attempts): (Option<String>, Option<u32>) = ::redis::from_redis_value(value)
            .map_err(|e| StoreError::Other(format!("unexpected reply to HMGET: {e}")))?;
        state
            .map(|s| Ok((parse_state(id, &s)?, attempts.unwrap_or(0))))
            .transpose()
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id, state = %end.state))]
    async fn record_unstarted_attempt(
        &self,
        msg: &TaskMessage,
        worker_id: &str,
        started_at: DateTime<Utc>,
        end: &AttemptEnd,
    ) -> Result<EndOutcome, StoreError> {
        let mut args = vec![
            msg.id.to_string().into_bytes(),
            record::timestamp(started_at).into_bytes(),
        ];
        args.extend(end_args(end)?);
        let value = self
            .calls
            .row(
                &scripts().record_unstarted_attempt,
                self.worker_args(worker_id),
                self.keys.task(msg.id),
                args,
            )
            .await?;
        end_outcome(msg.id, "record_unstarted_attempt", value)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn reopen(&self, msg: &TaskMessage, at: DateTime<Utc>) -> Result<TaskRecord, StoreError> {
        let mut invocation = self.transition(&scripts().reopen, msg.id);
        invocation
            .arg(record::timestamp(at))
            .arg(record::to_json(msg)?)
            .arg(msg.created_at.timestamp_millis());
        let value = self.eval(invocation).await?;
        Self::decode_fields(msg.id, "reopen", value)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %id))]
    async fn cancel(&self, id: TaskId, at: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        let mut invocation = self.transition(&scripts().cancel, id);
        invocation.arg(record::timestamp(at));
        let (code, mut rest) = reply::coded("cancel", self.eval(invocation).await?)?;
        if code < 0 {
            return Ok(CancelOutcome::NotFound);
        }
        let fields = rest
            .next()
            .ok_or_else(|| StoreError::Other("short reply to cancel".into()))?;
        let record = Box::new(Self::decode_fields(id, "cancel", fields)?);
        Ok(if code == 1 {
            CancelOutcome::Cancelled(record)
        } else {
            CancelOutcome::AlreadyFinal(record)
        })
    }

    #[instrument(level = "debug", skip_all, fields(state = ?state, limit))]
    async fn list(
        &self,
        state: Option<TaskState>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut cursor = cursor.map(Cursor::parse).transpose()?;
        let index = self.keys.index(state);
        let all_index = self.keys.index(None);
        if let Some(state) = state
            && index == all_index
        {
            return self.list_filtered(state, cursor, limit).await;
        }
        let cutoff = self.cutoff_ms();
        let mut conn = self.conn();
        let mut tasks = Vec::with_capacity(limit);

        for _ in 0..MAX_LIST_ROUNDS {
            let want = limit - tasks.len();
            let entries = self
                .list_round(&mut conn, &index, cursor.as_ref(), want, cutoff)
                .await?;
            let more = entries.len() > want;
            let page = &entries[..entries.len().min(want)];

            let hashes = self
                .read_listed(&mut conn, page.iter().map(|(id, _)| id.as_str()))
                .await?;
            let mut gone = Vec::new();
            for ((id, score), fields) in page.iter().zip(hashes) {
                cursor = Some(Cursor {
                    score: *score,
                    id: id.clone(),
                });
                if fields.is_empty() {
                    gone.push(id.clone());
                } else {
                    tasks.extend(Self::listed(id, fields, state));
                }
            }
            let indexes: &[&str] = if state.is_some() {
                &[&index, &all_index]
            } else {
                &[&index]
            };
            Self::drop_from_indexes(&mut conn, indexes, &gone).await?;
            if !more {
                return Ok(TaskPage {
                    tasks,
                    next_cursor: None,
                });
            }
            if tasks.len() >= limit {
                break;
            }
        }
        Ok(TaskPage {
            tasks,
            next_cursor: cursor.map(|c| c.encode()),
        })
    }

    #[instrument(level = "debug", skip_all, fields(worker_id = %info.id))]
    async fn heartbeat(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), StoreError> {
        let mut invocation = scripts().heartbeat.prepare_invoke();
        invocation
            .key(self.keys.workers())
            .key(self.keys.workers_expiry())
            .arg(&info.id)
            .arg(record::to_json(info)?)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.eval(invocation).await.map(drop)
    }

    #[instrument(level = "debug", skip_all, fields(worker_id = %id))]
    async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        ::redis::pipe()
            .cmd("HDEL")
            .arg(self.keys.workers())
            .arg(id)
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.workers_expiry())
            .arg(id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(reply::redis_error)
    }

    #[instrument(level = "debug", skip_all)]
    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        let mut invocation = scripts().workers.prepare_invoke();
        invocation
            .key(self.keys.workers())
            .key(self.keys.workers_expiry());
        let items = reply::array("workers", self.eval(invocation).await?)?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let json = reply::text("workers", item)?;
            match serde_json::from_str::<WorkerInfo>(&json) {
                Ok(info) => out.push(info),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable worker heartbeat"),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn health(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(reply::redis_error)
    }
}

/// The last four row arguments of a script that ends an attempt: the new
/// state, the end time, the result JSON and the error JSON ('' for none).
fn end_args(end: &AttemptEnd) -> Result<[Vec<u8>; 4], StoreError> {
    if end.state == TaskState::Running {
        return Err(StoreError::Other(
            "an attempt ends in queued (retry) or a final state, not running".into(),
        ));
    }
    let result = end.result.as_ref().map(record::to_json).transpose()?;
    let error = end.error.as_ref().map(record::to_json).transpose()?;
    Ok([
        end.state.as_str().as_bytes().to_vec(),
        record::timestamp(end.at).into_bytes(),
        result.unwrap_or_default().into_bytes(),
        error.unwrap_or_default().into_bytes(),
    ])
}

/// A stored state name, or [`StoreError::Corrupt`] for one this version
/// does not know.
fn parse_state(id: TaskId, name: &str) -> Result<TaskState, StoreError> {
    TaskState::parse(name).ok_or_else(|| StoreError::Corrupt {
        id: id.to_string(),
        reason: format!("unknown state {name:?}"),
    })
}

/// The answer of a script that ends an attempt (`end_attempt.lua`,
/// `record_unstarted_attempt.lua`): `{1}`, `{0, state}` or `{-1}`.
fn end_outcome(id: TaskId, script: &str, value: Value) -> Result<EndOutcome, StoreError> {
    let (code, mut rest) = reply::coded(script, value)?;
    match code {
        1 => Ok(EndOutcome::Written),
        0 => {
            let state = rest
                .next()
                .ok_or_else(|| StoreError::Other(format!("short reply to {script}")))?;
            let state = reply::text(script, state)?;
            parse_state(id, &state).map(EndOutcome::AlreadyFinal)
        }
        _ => Err(StoreError::Other(format!(
            "task {id} has no record (expired or removed)"
        ))),
    }
}
