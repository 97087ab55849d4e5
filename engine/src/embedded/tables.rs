//! The tables of the database file and their key and value layouts.
//!
//! Queue: `queue` maps a global, ever-increasing sequence number to the
//! message's band, delivery count and "not before" time (wall clock, so a
//! nak delay survives a restart); `queue_payloads` holds the bodies apart so
//! counting a delivery does not rewrite the body. Leases are not stored: a
//! lease belongs to a running process, and after a restart every message that
//! was in flight is deliverable again. `queue_dedup` remembers published task
//! ids for the duplicate window.
//!
//! Store: `tasks` maps the 16-byte task id (UUIDv7 ids sort by creation
//! time) to a small header (expiry, creation time, state, idempotency key)
//! followed by the record as JSON; the header is enough to maintain the
//! indexes without parsing the record. `task_index` orders records newest
//! first for listing, once under "all" and once under their state.
//!
//! Everything that expires has an `(expires_ms, key)` index so purging reads
//! only what is due.

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};

use super::records;

/// Counters, such as the last queue and dead-letter sequence numbers.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// `seq -> (band, deliveries, not_before_ms)`; `not_before_ms` 0 means now.
pub(crate) const QUEUE: TableDefinition<'static, u64, (u8, u32, u64)> =
    TableDefinition::new("queue");
/// `seq -> message body`.
pub(crate) const PAYLOADS: TableDefinition<'static, u64, &[u8]> =
    TableDefinition::new("queue_payloads");
/// `task id -> expires_ms` of a published id, for duplicate detection.
pub(crate) const DEDUP: TableDefinition<'static, u128, u64> = TableDefinition::new("queue_dedup");
/// `(expires_ms, task id)`, to purge [`DEDUP`].
pub(crate) const DEDUP_EXPIRY: TableDefinition<'static, (u64, u128), ()> =
    TableDefinition::new("queue_dedup_expiry");
/// `seq -> (task id, at_ms, reason, body)`.
pub(crate) const DEAD_LETTERS: TableDefinition<'static, u64, DeadLetterValue> =
    TableDefinition::new("dead_letters");

/// The value of a dead letter: `(task id, at_ms, reason, body)`.
pub(crate) type DeadLetterValue = (Option<u128>, i64, &'static str, &'static [u8]);
/// `task id -> (expires_ms, created_ms, state, idempotency key, record JSON)`.
pub(crate) const TASKS: TableDefinition<'static, u128, records::StoredValue> =
    TableDefinition::new("tasks");
/// `(state code or 0 for all, created_ms, task id)`.
pub(crate) const TASK_INDEX: TableDefinition<'static, (u8, i64, u128), ()> =
    TableDefinition::new("task_index");
/// `(expires_ms, task id)`, to purge [`TASKS`].
pub(crate) const TASK_EXPIRY: TableDefinition<'static, (u64, u128), ()> =
    TableDefinition::new("task_expiry");
/// `idempotency key -> task id`.
pub(crate) const IDEMPOTENCY: TableDefinition<'static, &str, u128> =
    TableDefinition::new("idempotency_keys");
/// `worker id -> (expires_ms, WorkerInfo JSON)`.
pub(crate) const WORKERS: TableDefinition<'static, &str, (u64, &[u8])> =
    TableDefinition::new("workers");

/// Name of the last queue sequence number in [`META`].
pub(crate) const QUEUE_SEQ: &str = "queue_seq";
/// Name of the last dead-letter sequence number in [`META`].
pub(crate) const DEAD_LETTER_SEQ: &str = "dead_letter_seq";

/// Every table, opened once per write transaction and handed to each
/// operation of the group.
pub(crate) struct Tables<'txn> {
    pub meta: Table<'txn, &'static str, u64>,
    pub queue: Table<'txn, u64, (u8, u32, u64)>,
    pub payloads: Table<'txn, u64, &'static [u8]>,
    pub dedup: Table<'txn, u128, u64>,
    pub dedup_expiry: Table<'txn, (u64, u128), ()>,
    pub dead_letters: Table<'txn, u64, DeadLetterValue>,
    pub tasks: Table<'txn, u128, records::StoredValue>,
    pub task_index: Table<'txn, (u8, i64, u128), ()>,
    pub task_expiry: Table<'txn, (u64, u128), ()>,
    pub idempotency: Table<'txn, &'static str, u128>,
    pub workers: Table<'txn, &'static str, (u64, &'static [u8])>,
}

impl<'txn> Tables<'txn> {
    /// Opens every table in `txn`.
    ///
    /// # Errors
    /// When a table cannot be opened (a corrupt file, a type mismatch).
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            meta: txn.open_table(META)?,
            queue: txn.open_table(QUEUE)?,
            payloads: txn.open_table(PAYLOADS)?,
            dedup: txn.open_table(DEDUP)?,
            dedup_expiry: txn.open_table(DEDUP_EXPIRY)?,
            dead_letters: txn.open_table(DEAD_LETTERS)?,
            tasks: txn.open_table(TASKS)?,
            task_index: txn.open_table(TASK_INDEX)?,
            task_expiry: txn.open_table(TASK_EXPIRY)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
            workers: txn.open_table(WORKERS)?,
        })
    }

    /// Increments and returns the counter `name`; the first value is 1.
    ///
    /// # Errors
    /// When the table cannot be read or written.
    pub(crate) fn next_seq(&mut self, name: &str) -> Result<u64, redb::Error> {
        let next = self.meta.get(name)?.map_or(0, |v| v.value()) + 1;
        self.meta.insert(name, next)?;
        Ok(next)
    }
}

/// Creates every table that does not exist yet (opening a table in a write
/// transaction creates it).
///
/// # Errors
/// When a table cannot be created.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), redb::Error> {
    Tables::open(txn).map(drop)
}

/// Milliseconds since the Unix epoch, the unit of every stored deadline.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// What [`purge_expired`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Purged {
    /// Entries removed.
    pub removed: usize,
    /// Whether more expired entries are left than one batch allowed.
    pub more: bool,
}

/// Up to `batch` entries of an expiry table that are due at `now_ms`,
/// oldest first; notes in `purged` when more are due.
fn due(
    expiry: &Table<'_, (u64, u128), ()>,
    now_ms: u64,
    batch: usize,
    purged: &mut Purged,
) -> Result<Vec<(u64, u128)>, redb::Error> {
    let mut due: Vec<(u64, u128)> = expiry
        .range(..(now_ms, u128::MAX))?
        .take(batch + 1)
        .map(|entry| entry.map(|(key, _)| key.value()))
        .collect::<Result<_, _>>()?;
    purged.more |= due.len() > batch;
    due.truncate(batch);
    Ok(due)
}

/// Removes up to `batch` expired task records, and up to `batch` expired
/// duplicate markers and worker heartbeats.
///
/// # Errors
/// When the tables cannot be read or written.
pub(crate) fn purge_expired(
    t: &mut Tables<'_>,
    now_ms: u64,
    batch: usize,
) -> Result<Purged, redb::Error> {
    let mut purged = Purged::default();

    for (expires, id) in due(&t.task_expiry, now_ms, batch, &mut purged)? {
        // Only a record whose own header says it is due goes; an index entry
        // that disagrees with its record is stale and is dropped alone.
        match records::expires_ms(t, id)? {
            Some(current) if current <= now_ms => {
                records::delete(t, id)?;
            }
            _ => {
                t.task_expiry.remove((expires, id))?;
            }
        }
        purged.removed += 1;
    }

    for (expires, id) in due(&t.dedup_expiry, now_ms, batch, &mut purged)? {
        t.dedup_expiry.remove((expires, id))?;
        // The marker may have been renewed by a later publish of the same id.
        let current = t.dedup.get(id)?.map(|v| v.value());
        if current == Some(expires) {
            t.dedup.remove(id)?;
        }
        purged.removed += 1;
    }

    let before = t.workers.len()?;
    t.workers.retain(|_, (expires, _)| expires > now_ms)?;
    purged.removed += usize::try_from(before - t.workers.len()?).unwrap_or(0);

    Ok(purged)
}
