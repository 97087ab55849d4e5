//! How a task record is laid out in its Redis hash, and how it is read back.
//!
//! One hash per task, `<prefix>task:<id>`:
//!
//! | field | value |
//! |---|---|
//! | `message` | the [`TaskMessage`] JSON, written once |
//! | `state` | the [`TaskState`] wire name |
//! | `attempts`, `duplicates` | counters |
//! | `worker_id` | the worker running, or that last ran, the task |
//! | `queued_at`, `started_at`, `finished_at`, `updated_at` | RFC 3339 |
//! | `result`, `error` | [`TaskResult`] and [`TaskError`] JSON |
//! | `attempt:<n>` | [`Attempt`] JSON, one per attempt |
//! | `created_ms` | `created_at` in milliseconds, the index score |
//!
//! The scripts update single fields in place, so a transition never reads,
//! rewrites and races on a whole document; reading is one `HGETALL`
//! assembled here.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;

use crate::results::StoreError;
use crate::task::{Attempt, TaskError, TaskMessage, TaskRecord, TaskResult, TaskState};

/// Hash field names.
pub(super) mod field {
    pub const MESSAGE: &str = "message";
    pub const STATE: &str = "state";
    pub const ATTEMPTS: &str = "attempts";
    pub const DUPLICATES: &str = "duplicates";
    pub const WORKER_ID: &str = "worker_id";
    pub const QUEUED_AT: &str = "queued_at";
    pub const STARTED_AT: &str = "started_at";
    pub const FINISHED_AT: &str = "finished_at";
    pub const UPDATED_AT: &str = "updated_at";
    pub const RESULT: &str = "result";
    pub const ERROR: &str = "error";
    pub const CREATED_MS: &str = "created_ms";
    /// Followed by the attempt number.
    pub const ATTEMPT_PREFIX: &str = "attempt:";
}

/// A timestamp as stored: RFC 3339 in UTC, the same form serde gives it in
/// the JSON fields, so the scripts can copy it into attempt documents.
pub(super) fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Serializes a value stored as JSON.
pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Other(format!("cannot encode JSON: {e}")))
}

/// The field/value pairs of a new record's hash, flattened for `HSET`.
///
/// # Errors
/// When a part of the record cannot be encoded as JSON.
pub(super) fn encode(record: &TaskRecord) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::with_capacity(24);
    let mut put = |name: &str, value: String| {
        out.push(name.to_owned());
        out.push(value);
    };
    put(field::MESSAGE, to_json(&record.to_message())?);
    put(field::STATE, record.state.as_str().to_owned());
    // Fields equal to what [`decode`] assumes when they are missing are left
    // out: every task is created, and each argument costs the create script.
    if record.attempts > 0 {
        put(field::ATTEMPTS, record.attempts.to_string());
    }
    if record.duplicate_executions > 0 {
        put(field::DUPLICATES, record.duplicate_executions.to_string());
    }
    if record.updated_at != record.created_at {
        put(field::UPDATED_AT, timestamp(record.updated_at));
    }
    put(
        field::CREATED_MS,
        record.created_at.timestamp_millis().to_string(),
    );
    if let Some(at) = record.queued_at {
        put(field::QUEUED_AT, timestamp(at));
    }
    if let Some(at) = record.started_at {
        put(field::STARTED_AT, timestamp(at));
    }
    if let Some(at) = record.finished_at {
        put(field::FINISHED_AT, timestamp(at));
    }
    if let Some(worker) = &record.worker_id {
        put(field::WORKER_ID, worker.clone());
    }
    if let Some(result) = &record.result {
        put(field::RESULT, to_json(result)?);
    }
    if let Some(error) = &record.error {
        put(field::ERROR, to_json(error)?);
    }
    for attempt in &record.attempt_history {
        put(
            &format!("{}{}", field::ATTEMPT_PREFIX, attempt.number),
            to_json(attempt)?,
        );
    }
    Ok(out)
}

/// Assembles a record from the fields of its hash (an `HGETALL`).
///
/// # Errors
/// [`StoreError::Corrupt`] when a field is missing or unreadable.
pub(super) fn decode(
    id: &str,
    mut fields: HashMap<String, String>,
) -> Result<TaskRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.to_owned(),
        reason,
    };
    let message_json = fields
        .remove(field::MESSAGE)
        .ok_or_else(|| corrupt("no message field".into()))?;
    let message: TaskMessage = parse_json(id, field::MESSAGE, &message_json)?;

    let state_name = fields
        .remove(field::STATE)
        .ok_or_else(|| corrupt("no state field".into()))?;
    let state = TaskState::parse(&state_name)
        .ok_or_else(|| corrupt(format!("unknown state {state_name:?}")))?;
    let updated_at = match fields.remove(field::UPDATED_AT) {
        Some(s) => parse_time(id, field::UPDATED_AT, &s)?,
        None => message.created_at,
    };

    let mut record = TaskRecord::queued(&message, updated_at);
    record.state = state;
    record.queued_at = optional_time(id, &mut fields, field::QUEUED_AT)?;
    record.started_at = optional_time(id, &mut fields, field::STARTED_AT)?;
    record.finished_at = optional_time(id, &mut fields, field::FINISHED_AT)?;
    record.attempts = counter(id, &mut fields, field::ATTEMPTS)?;
    record.duplicate_executions = counter(id, &mut fields, field::DUPLICATES)?;
    record.worker_id = fields.remove(field::WORKER_ID);
    record.result = fields
        .remove(field::RESULT)
        .map(|s| parse_json::<TaskResult>(id, field::RESULT, &s))
        .transpose()?;
    record.error = fields
        .remove(field::ERROR)
        .map(|s| parse_json::<TaskError>(id, field::ERROR, &s))
        .transpose()?;

    let mut history = Vec::new();
    for (name, value) in &fields {
        if name.starts_with(field::ATTEMPT_PREFIX) {
            history.push(parse_json::<Attempt>(id, name, value)?);
        }
    }
    history.sort_by_key(|a| a.number);
    record.attempt_history = history;
    Ok(record)
}

fn parse_json<T: DeserializeOwned>(id: &str, name: &str, value: &str) -> Result<T, StoreError> {
    serde_json::from_str(value).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        reason: format!("field {name}: {e}"),
    })
}

fn parse_time(id: &str, name: &str, value: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt {
            id: id.to_owned(),
            reason: format!("field {name}: {e}"),
        })
}

fn optional_time(
    id: &str,
    fields: &mut HashMap<String, String>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    fields
        .remove(name)
        .map(|s| parse_time(id, name, &s))
        .transpose()
}

fn counter(id: &str, fields: &mut HashMap<String, String>, name: &str) -> Result<u32, StoreError> {
    match fields.remove(name) {
        None => Ok(0),
        Some(s) => s.parse().map_err(|e| StoreError::Corrupt {
            id: id.to_owned(),
            reason: format!("field {name}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::SCHEMA_VERSION;

    fn message() -> TaskMessage {
        TaskMessage {
            schema_version: SCHEMA_VERSION,
            id: uuid::Uuid::now_v7(),
            prompt: "hello".into(),
            priority: 8,
            timeout_ms: Some(1000),
            max_attempts: 3,
            metadata: serde_json::json!({"k": "v"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            idempotency_key: Some("key".into()),
            created_at: Utc::now(),
            trace: None,
        }
    }

    fn pairs(flat: Vec<String>) -> HashMap<String, String> {
        let mut it = flat.into_iter();
        let mut map = HashMap::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            map.insert(k, v);
        }
        map
    }

    #[test]
    fn a_full_record_round_trips() {
        let now = Utc::now();
        let mut record = TaskRecord::queued(&message(), now);
        record.state = TaskState::Failed;
        record.started_at = Some(now);
        record.finished_at = Some(now);
        record.attempts = 2;
        record.duplicate_executions = 1;
        record.worker_id = Some("w1".into());
        record.error = Some(TaskError::new("nonzero_exit", "exit 1"));
        record.result = Some(TaskResult {
            output: "out".into(),
            executor: "command".into(),
            exit_code: Some(1),
            duration_ms: 5,
            ..TaskResult::default()
        });
        record.attempt_history = vec![
            Attempt {
                number: 2,
                worker_id: "w1".into(),
                started_at: now,
                finished_at: Some(now),
                outcome: Some(TaskState::Failed),
                error: record.error.clone(),
            },
            Attempt {
                number: 1,
                worker_id: "w0".into(),
                started_at: now,
                finished_at: None,
                outcome: None,
                error: None,
            },
        ];
        let fields = pairs(encode(&record).unwrap());
        let back = decode(&record.id.to_string(), fields).unwrap();
        record.attempt_history.sort_by_key(|a| a.number);
        assert_eq!(back, record);
    }

    #[test]
    fn unreadable_fields_are_reported_as_corrupt() {
        let record = TaskRecord::queued(&message(), Utc::now());
        let mut fields = pairs(encode(&record).unwrap());
        fields.insert(field::STATE.into(), "sleeping".into());
        let err = decode("x", fields).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");

        let mut fields = pairs(encode(&record).unwrap());
        fields.insert(field::ATTEMPTS.into(), "many".into());
        assert!(matches!(
            decode("x", fields),
            Err(StoreError::Corrupt { .. })
        ));

        let mut fields = pairs(encode(&record).unwrap());
        fields.remove(field::MESSAGE);
        assert!(matches!(
            decode("x", fields),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
