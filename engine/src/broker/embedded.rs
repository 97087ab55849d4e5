//! The embedded queue: [`TaskPublisher`], [`TaskConsumer`] and
//! [`DeadLetterStore`] over the local database file, with JetStream's
//! semantics (see [`crate::embedded`] for the file and its tables).
//!
//! - A publish returns once its transaction is committed to disk; a task id
//!   published again within `nats.duplicate_window_ms` is dropped, like
//!   JetStream's `Nats-Msg-Id`.
//! - A delivered message is leased for `nats.ack_wait_ms`. `Progress`
//!   extends the lease, `Nak` gives it back (now or after a delay), `Ack` and
//!   `Term` remove it; an expired lease makes it deliverable again with its
//!   delivery count raised. The count is stored at each delivery (in the
//!   background, queued ahead of any ack of it), so a message that keeps
//!   killing the process still reaches the worker's quarantine limit.
//! - Leases live in memory only: after a restart, every message that was in
//!   flight is deliverable at once, so nothing accepted is lost.
//! - Workers waiting for work sleep on a [`Notify`] woken by publishes and
//!   naks, and on a timer for the earliest lease or delay deadline.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use redb::ReadableTable;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::instrument;

use super::{
    AckKind, Acker, BrokerError, DeadLetter, DeadLetterStore, Delivery, PriorityBand, TaskConsumer,
    TaskPublisher, one_line_reason,
};
use crate::config::NatsSettings;
use crate::embedded::lanes::{Lanes, Lease};
use crate::embedded::tables::{self, DEAD_LETTER_SEQ, QUEUE_SEQ, Tables};
use crate::embedded::{Db, DbError};
use crate::task::{TaskId, TaskMessage};

/// The embedded queue. Cloning shares it.
#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    lanes: Mutex<Lanes>,
    /// Woken when a message becomes deliverable or a deadline moves.
    notify: Notify,
    ack_wait: Duration,
    duplicate_window_ms: u64,
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("db", &self.inner.db)
            .field("ack_wait", &self.inner.ack_wait)
            .finish_non_exhaustive()
    }
}

/// A band's code in the `queue` table.
fn band_code(band: PriorityBand) -> u8 {
    match band {
        PriorityBand::Low => 0,
        PriorityBand::Normal => 1,
        PriorityBand::High => 2,
    }
}

fn band_of_code(code: u8) -> PriorityBand {
    match code {
        0 => PriorityBand::Low,
        2 => PriorityBand::High,
        _ => PriorityBand::Normal,
    }
}

fn unavailable(e: DbError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// A delay as whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl EmbeddedQueue {
    /// Loads the queue from `db`: every stored message becomes deliverable
    /// (or waits out the nak delay it was given), whatever lease it had.
    /// Uses `ack_wait_ms` and `duplicate_window_ms` from `settings`.
    ///
    /// # Errors
    /// When the queue tables cannot be read.
    pub fn open(db: &Db, settings: &NatsSettings) -> Result<Self, DbError> {
        let now_ms = tables::now_ms();
        let now = Instant::now();
        let lanes = db.read_now(|txn| {
            let queue = txn.open_table(tables::QUEUE)?;
            let mut lanes = Lanes::default();
            for entry in queue.iter()? {
                let (seq, meta) = entry?;
                let (band, deliveries, not_before_ms) = meta.value();
                let visible_at = (not_before_ms > now_ms)
                    .then(|| now + Duration::from_millis(not_before_ms - now_ms));
                lanes.insert(seq.value(), band_of_code(band), deliveries, visible_at);
            }
            Ok(lanes)
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                db: db.clone(),
                lanes: Mutex::new(lanes),
                notify: Notify::new(),
                ack_wait: Duration::from_millis(settings.ack_wait_ms),
                duplicate_window_ms: settings.duplicate_window_ms,
            }),
        })
    }

    /// Messages waiting to be delivered (ready, or waiting out a nak delay).
    pub fn depth(&self) -> u64 {
        let mut lanes = self.inner.lanes();
        lanes.promote_due(Instant::now());
        u64::try_from(lanes.waiting()).unwrap_or(u64::MAX)
    }

    /// Stores `msgs` in one transaction; `Some(seq)` for each one stored,
    /// `None` for a duplicate.
    /// A replay (`honour_duplicates` false) is stored even inside the
    /// duplicate window of its task's first publish.
    async fn store(
        &self,
        msgs: &[TaskMessage],
        honour_duplicates: bool,
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        let items = msgs
            .iter()
            .map(|msg| {
                let body = serde_json::to_vec(msg)
                    .map_err(|e| BrokerError::Other(format!("cannot encode task: {e}")))?;
                Ok((
                    msg.id.as_u128(),
                    band_code(PriorityBand::of(msg.priority)),
                    body,
                ))
            })
            .collect::<Result<Vec<_>, BrokerError>>()?;
        let window_ms = self.inner.duplicate_window_ms;
        let stored = self
            .inner
            .db
            .write(move |t| publish_op(t, &items, window_ms, honour_duplicates))
            .await
            .map_err(|e| BrokerError::NotConfirmed(e.to_string()))?;
        let mut lanes = self.inner.lanes();
        for (msg, seq) in msgs.iter().zip(&stored) {
            match seq {
                Some(seq) => lanes.insert(*seq, PriorityBand::of(msg.priority), 0, None),
                None => tracing::debug!(task_id = %msg.id, "duplicate publish dropped"),
            }
        }
        drop(lanes);
        self.inner.notify.notify_waiters();
        Ok(stored)
    }
}

impl Inner {
    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        // The lanes are updated in small steps that leave them consistent;
        // a panic elsewhere while the lock was held does not break them.
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes new messages, dropping ids published within the duplicate window
/// unless `honour_duplicates` is false (a replay).
fn publish_op(
    t: &mut Tables<'_>,
    items: &[(u128, u8, Vec<u8>)],
    window_ms: u64,
    honour_duplicates: bool,
) -> Result<Vec<Option<u64>>, redb::Error> {
    let now = tables::now_ms();
    let mut stored = Vec::with_capacity(items.len());
    for (id, band, body) in items {
        let seen = t.dedup.get(*id)?.map(|v| v.value());
        if honour_duplicates && seen.is_some_and(|expires| expires > now) {
            stored.push(None);
            continue;
        }
        let seq = t.next_seq(QUEUE_SEQ)?;
        t.queue.insert(seq, (*band, 0, 0))?;
        t.payloads.insert(seq, body.as_slice())?;
        if window_ms > 0 {
            let expires = now.saturating_add(window_ms);
            if let Some(old) = t.dedup.insert(*id, expires)?.map(|v| v.value()) {
                t.dedup_expiry.remove((old, *id))?;
            }
            t.dedup_expiry.insert((expires, *id), ())?;
        }
        stored.push(Some(seq));
    }
    Ok(stored)
}

/// Leases taken from the lanes but not yet handed to the caller; given back
/// if the caller stops waiting or the bodies cannot be read.
struct Taken<'a> {
    inner: &'a Inner,
    leases: Vec<Lease>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        let mut lanes = self.inner.lanes();
        for lease in self.leases.drain(..) {
            lanes.release(lease.seq, lease.token, None);
        }
        drop(lanes);
        self.inner.notify.notify_waiters();
    }
}

#[async_trait]
impl TaskPublisher for EmbeddedQueue {
    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn publish(&self, msg: &TaskMessage) -> Result<(), BrokerError> {
        self.store(std::slice::from_ref(msg), true).await.map(drop)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn republish(&self, msg: &TaskMessage, _replay_id: &str) -> Result<(), BrokerError> {
        self.store(std::slice::from_ref(msg), false).await.map(drop)
    }

    async fn publish_batch(&self, msgs: &[TaskMessage]) -> Vec<Result<(), BrokerError>> {
        match self.store(msgs, true).await {
            Ok(_) => msgs.iter().map(|_| Ok(())).collect(),
            Err(e) => {
                let reason = e.to_string();
                msgs.iter()
                    .map(|_| Err(BrokerError::NotConfirmed(reason.clone())))
                    .collect()
            }
        }
    }

    async fn health(&self) -> Result<(), BrokerError> {
        self.inner.db.ping().await.map_err(unavailable)
    }

    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        Ok(self.depth())
    }
}

#[async_trait]
impl TaskConsumer for EmbeddedQueue {
    async fn next_batch(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let inner = &*self.inner;
        loop {
            // Registered before looking, so a publish between the look and
            // the wait is not missed.
            let notified = inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let (leases, deadline) = {
                let mut lanes = inner.lanes();
                let leases = lanes.take(max, Instant::now(), inner.ack_wait);
                (leases, lanes.next_deadline())
            };
            if leases.is_empty() {
                match deadline {
                    Some(at) => {
                        tokio::select! {
                            () = &mut notified => {}
                            () = tokio::time::sleep_until(at) => {}
                        }
                    }
                    None => notified.await,
                }
                continue;
            }

            let mut taken = Taken { inner, leases };
            let seqs: Vec<u64> = taken.leases.iter().map(|l| l.seq).collect();
            let bodies = inner
                .db
                .read(move |txn| read_bodies(txn, &seqs))
                .await
                .map_err(unavailable)?;
            // The counts are stored without waiting for the disk: the write
            // is queued ahead of any ack or nak of these deliveries, and if
            // the process dies before it commits, a message is merely
            // delivered once more than its count says.
            let counts: Vec<(u64, u32)> =
                taken.leases.iter().map(|l| (l.seq, l.deliveries)).collect();
            inner
                .db
                .write_detached("delivery counts", move |t| store_counts(t, &counts));
            let deliveries: Vec<Delivery> = std::mem::take(&mut taken.leases)
                .into_iter()
                .zip(bodies)
                // A missing body: a stale delivery acked the message while it
                // was being handed out again; it is done.
                .filter_map(|(lease, body)| {
                    body.map(|body| Delivery {
                        payload: Bytes::from(body),
                        delivery_count: lease.deliveries,
                        band: lease.band,
                        acker: Box::new(EmbeddedAcker {
                            queue: self.clone(),
                            seq: lease.seq,
                            token: lease.token,
                        }),
                    })
                })
                .collect();
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
        }
    }

    #[instrument(level = "debug", skip_all, fields(task_id = ?task_id))]
    async fn dead_letter(
        &self,
        task_id: Option<TaskId>,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let id = task_id.map(|id| id.as_u128());
        let at_ms = Utc::now().timestamp_millis();
        let reason = one_line_reason(reason);
        let payload = payload.clone();
        self.inner
            .db
            .write(move |t| {
                let seq = t.next_seq(DEAD_LETTER_SEQ)?;
                t.dead_letters
                    .insert(seq, (id, at_ms, reason.as_str(), payload.as_ref()))?;
                Ok(seq)
            })
            .await
            .map(drop)
            .map_err(unavailable)
    }
}

/// Reads the bodies of leased messages; `None` for one acked meanwhile.
fn read_bodies(
    txn: &redb::ReadTransaction,
    seqs: &[u64],
) -> Result<Vec<Option<Vec<u8>>>, redb::Error> {
    let payloads = txn.open_table(tables::PAYLOADS)?;
    seqs.iter()
        .map(|&seq| Ok(payloads.get(seq)?.map(|v| v.value().to_vec())))
        .collect()
}

/// Stores the delivery counts of leased messages that are still queued.
fn store_counts(t: &mut Tables<'_>, counts: &[(u64, u32)]) -> Result<(), redb::Error> {
    for &(seq, deliveries) in counts {
        let meta = t.queue.get(seq)?.map(|v| v.value());
        if let Some((band, _, not_before)) = meta {
            t.queue.insert(seq, (band, deliveries, not_before))?;
        }
    }
    Ok(())
}

/// Acknowledges one delivery of the embedded queue.
struct EmbeddedAcker {
    queue: EmbeddedQueue,
    seq: u64,
    token: u64,
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self, kind: AckKind) -> Result<(), BrokerError> {
        let inner = &*self.queue.inner;
        let (seq, token) = (self.seq, self.token);
        match kind {
            AckKind::Ack | AckKind::Term => {
                // Whoever finishes the work removes the message, even a
                // delivery whose lease ran out.
                let Some(entry) = inner.lanes().remove(seq) else {
                    return Ok(());
                };
                let removed = inner
                    .db
                    .write(move |t| {
                        t.queue.remove(seq)?;
                        t.payloads.remove(seq)?;
                        Ok(())
                    })
                    .await;
                if let Err(e) = removed {
                    inner.lanes().restore(seq, entry);
                    return Err(unavailable(e));
                }
            }
            AckKind::Progress => {
                let until = Instant::now() + inner.ack_wait;
                if !inner.lanes().extend(seq, token, until) {
                    tracing::debug!(seq, "progress on a delivery whose lease has passed");
                }
            }
            AckKind::Nak(delay) => {
                let visible_at = delay.map(|d| Instant::now() + d);
                if !inner.lanes().release(seq, token, visible_at) {
                    tracing::debug!(seq, "nak on a delivery whose lease has passed");
                    return Ok(());
                }
                inner.notify.notify_waiters();
                if let Some(delay) = delay {
                    // Stored so the delay still holds after a restart.
                    let not_before = tables::now_ms().saturating_add(millis(delay));
                    inner
                        .db
                        .write(move |t| {
                            let meta = t.queue.get(seq)?.map(|v| v.value());
                            if let Some((band, deliveries, _)) = meta {
                                t.queue.insert(seq, (band, deliveries, not_before))?;
                            }
                            Ok(())
                        })
                        .await
                        .map_err(unavailable)?;
                }
            }
        }
        Ok(())
    }
}

/// A dead letter as read from its table.
type DeadLetterRow<'a> = (Option<u128>, i64, &'a str, &'a [u8]);

fn dead_letter_of(seq: u64, (id, at_ms, reason, payload): DeadLetterRow<'_>) -> DeadLetter {
    DeadLetter {
        seq,
        task_id: id.map(TaskId::from_u128),
        reason: reason.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        at: DateTime::from_timestamp_millis(at_ms).unwrap_or_default(),
    }
}

#[async_trait]
impl DeadLetterStore for EmbeddedQueue {
    async fn list(
        &self,
        after: Option<u64>,
        limit: usize,
        task_id: Option<TaskId>,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let from = after.map_or(0, |after| after.saturating_add(1));
        let wanted = task_id.map(|id| id.as_u128());
        self.inner
            .db
            .read(move |txn| {
                let table = txn.open_table(tables::DEAD_LETTERS)?;
                let mut found = Vec::new();
                for entry in table.range(from..)? {
                    if found.len() >= limit {
                        break;
                    }
                    let (seq, value) = entry?;
                    let value = value.value();
                    if wanted.is_none_or(|wanted| value.0 == Some(wanted)) {
                        found.push(dead_letter_of(seq.value(), value));
                    }
                }
                Ok(found)
            })
            .await
            .map_err(unavailable)
    }

    async fn get(&self, seq: u64) -> Result<Option<DeadLetter>, BrokerError> {
        self.inner
            .db
            .read(move |txn| {
                let table = txn.open_table(tables::DEAD_LETTERS)?;
                Ok(table.get(seq)?.map(|v| dead_letter_of(seq, v.value())))
            })
            .await
            .map_err(unavailable)
    }

    async fn delete(&self, seq: u64) -> Result<bool, BrokerError> {
        self.inner
            .db
            .write(move |t| Ok(t.dead_letters.remove(seq)?.is_some()))
            .await
            .map_err(unavailable)
    }
}
