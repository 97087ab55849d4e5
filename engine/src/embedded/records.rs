//! How a task record is laid out in the `tasks` table and kept in step with
//! its indexes (listing order, state, expiry, idempotency key). Every write
//! of a record goes through [`put`] and every removal through [`delete`], so
//! the indexes cannot drift from the records.

use redb::ReadableTable;

use super::tables::Tables;
use crate::results::StoreError;
use crate::task::{TaskId, TaskRecord, TaskState};

/// The value of a record: `(expires_ms, created_ms, state code, idempotency
/// key, record JSON)`.
pub(crate) type StoredValue = (u64, i64, u8, Option<&'static str>, &'static [u8]);

/// Index code of "every state" in `task_index`.
pub(crate) const ALL_STATES: u8 = 0;

/// Index code of a state: its position in [`TaskState::ALL`], plus one.
pub(crate) fn state_code(state: TaskState) -> u8 {
    let position = TaskState::ALL
        .iter()
        .position(|s| *s == state)
        .unwrap_or_default();
    // ALL has seven entries, so the position always fits.
    u8::try_from(position).unwrap_or(u8::MAX - 1) + 1
}

/// A record's creation time as stored in the listing index.
pub(crate) fn created_ms(record: &TaskRecord) -> i64 {
    record.created_at.timestamp_millis()
}

/// A record read back, or why it could not be.
pub(crate) type Loaded = Result<Option<TaskRecord>, StoreError>;

/// Reads the record of `id` unless it is missing or has expired at `now_ms`
/// (an expired record is gone for every caller, even before it is purged).
///
/// # Errors
/// When the table cannot be read; an unreadable record is the inner error.
pub(crate) fn load(
    table: &impl ReadableTable<u128, StoredValue>,
    id: TaskId,
    now_ms: u64,
) -> Result<Loaded, redb::Error> {
    let Some(guard) = table.get(id.as_u128())? else {
        return Ok(Ok(None));
    };
    let (expires_ms, _, _, _, json) = guard.value();
    if expires_ms <= now_ms {
        return Ok(Ok(None));
    }
    Ok(decode(id, json).map(Some))
}

/// Reads only the state of the record of `id` from its header, unless it is
/// missing or has expired at `now_ms`.
///
/// # Errors
/// When the table cannot be read.
pub(crate) fn load_state(
    table: &impl ReadableTable<u128, StoredValue>,
    id: TaskId,
    now_ms: u64,
) -> Result<Option<TaskState>, redb::Error> {
    let Some(guard) = table.get(id.as_u128())? else {
        return Ok(None);
    };
    let (expires_ms, _, code, _, _) = guard.value();
    Ok((expires_ms > now_ms).then(|| state_of_code(code)).flatten())
}

/// The state of an index code from [`state_code`].
pub(crate) fn state_of_code(code: u8) -> Option<TaskState> {
    TaskState::ALL
        .get(usize::from(code).checked_sub(1)?)
        .copied()
}

/// Parses a stored record.
///
/// # Errors
/// [`StoreError::Corrupt`] when the JSON is not a task record.
pub(crate) fn decode(id: TaskId, json: &[u8]) -> Result<TaskRecord, StoreError> {
    serde_json::from_slice(json).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        reason: e.to_string(),
    })
}

/// Serializes a record for [`put`].
///
/// # Errors
/// [`StoreError::Other`] if the record cannot be written as JSON (it always
/// can: every map in it has string keys).
pub(crate) fn encode(record: &TaskRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Other(format!("cannot encode record: {e}")))
}

/// Stores `record` (as `json`, from [`encode`]) until `expires_ms`, replacing
/// any earlier version and its index entries. Claims the record's
/// idempotency key unless another task holds it.
///
/// # Errors
/// When the tables cannot be written.
pub(crate) fn put(
    t: &mut Tables<'_>,
    record: &TaskRecord,
    json: &[u8],
    expires_ms: u64,
) -> Result<(), redb::Error> {
    let id = record.id.as_u128();
    delete(t, id)?;
    let created = created_ms(record);
    let code = state_code(record.state);
    let key = record.idempotency_key.as_deref();
    t.tasks.insert(id, (expires_ms, created, code, key, json))?;
    t.task_index.insert((ALL_STATES, created, id), ())?;
    t.task_index.insert((code, created, id), ())?;
    t.task_expiry.insert((expires_ms, id), ())?;
    if let Some(key) = key {
        let owner = t.idempotency.get(key)?.map(|v| v.value());
        if owner.is_none_or(|owner| owner == id) {
            t.idempotency.insert(key, id)?;
        }
    }
    Ok(())
}

/// Removes the record of `id` with its index entries and its idempotency
/// key (when the key still points at it). `false` when there was none.
///
/// # Errors
/// When the tables cannot be written.
pub(crate) fn delete(t: &mut Tables<'_>, id: u128) -> Result<bool, redb::Error> {
    let header = t.tasks.remove(id)?.map(|guard| {
        let (expires, created, code, key, _) = guard.value();
        (expires, created, code, key.map(str::to_owned))
    });
    let Some((expires, created, code, key)) = header else {
        return Ok(false);
    };
    t.task_index.remove((ALL_STATES, created, id))?;
    t.task_index.remove((code, created, id))?;
    t.task_expiry.remove((expires, id))?;
    if let Some(key) = key {
        release_key(t, &key, id)?;
    }
    Ok(true)
}

/// Removes the idempotency key when it belongs to `id`.
///
/// # Errors
/// When the table cannot be written.
pub(crate) fn release_key(t: &mut Tables<'_>, key: &str, id: u128) -> Result<(), redb::Error> {
    let owner = t.idempotency.get(key)?.map(|v| v.value());
    if owner == Some(id) {
        t.idempotency.remove(key)?;
    }
    Ok(())
}

/// When the stored record of `id` expires, if there is one.
///
/// # Errors
/// When the table cannot be read.
pub(crate) fn expires_ms(t: &Tables<'_>, id: u128) -> Result<Option<u64>, redb::Error> {
    Ok(t.tasks.get(id)?.map(|guard| guard.value().0))
}

/// An opaque listing cursor: the index position of the last record of a
/// page.
pub(crate) fn encode_cursor(created_ms: i64, id: u128) -> String {
    format!("{created_ms}.{id:032x}")
}

/// Reads a cursor made by [`encode_cursor`].
///
/// # Errors
/// [`StoreError::Other`] when the cursor is not one the store issued.
pub(crate) fn decode_cursor(cursor: &str) -> Result<(i64, u128), StoreError> {
    let invalid = || StoreError::Other(format!("invalid cursor {cursor:?}"));
    let (created, id) = cursor.split_once('.').ok_or_else(invalid)?;
    if id.len() != 32 {
        return Err(invalid());
    }
    let created = created.parse().map_err(|_| invalid())?;
    let id = u128::from_str_radix(id, 16).map_err(|_| invalid())?;
    Ok((created, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_codes_are_distinct_and_never_the_all_code() {
        let codes: std::collections::HashSet<u8> =
            TaskState::ALL.into_iter().map(state_code).collect();
        assert_eq!(codes.len(), TaskState::ALL.len());
        assert!(!codes.contains(&ALL_STATES));
        for state in TaskState::ALL {
            assert_eq!(state_of_code(state_code(state)), Some(state));
        }
        assert_eq!(state_of_code(ALL_STATES), None);
    }

    #[test]
    fn cursors_round_trip_and_reject_foreign_strings() {
        let id = uuid::Uuid::now_v7().as_u128();
        let cursor = encode_cursor(-5, id);
        assert_eq!(decode_cursor(&cursor).unwrap(), (-5, id));
        for bad in ["", "12", "x.y", "1.abc", &format!("1.{:032x}z", 1)] {
            assert!(decode_cursor(bad).is_err(), "{bad:?} accepted");
        }
    }
}
