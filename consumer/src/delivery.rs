//! The first look at a delivery: is it a task at all? A message that is too
//! large, not JSON, or breaks the task contract goes to the dead letters
//! with a reason naming the field, and the worker moves on; it never
//! crashes or stalls on a bad message.

use bytes::Bytes;
use chrono::Utc;
use claudecluster_engine::broker::{AckKind, Acker, Delivery};
use claudecluster_engine::results::{AttemptEnd, StartOutcome};
use claudecluster_engine::task::{TaskError, TaskId, TaskMessage, TaskState};
use serde::Deserialize;
use tracing::Instrument;

use crate::attempt;
use crate::pool::Runtime;
use crate::retry::retry;

/// A message the worker will not run, and why.
#[derive(Debug)]
pub(crate) struct Rejection {
    /// The reason code: `too_large`, `invalid_json` or `invalid_task`.
    pub code: &'static str,
    /// The full reason, `<code>: <detail>`, naming the field when there is
    /// one.
    pub reason: String,
    /// The task id, when it could be read.
    pub task_id: Option<TaskId>,
    /// The message, when it parsed but broke a rule.
    pub task: Option<Box<TaskMessage>>,
}

/// Handles one delivery from start to acknowledgement.
pub(crate) async fn handle(rt: &Runtime, delivery: Delivery) {
    let Delivery {
        payload,
        delivery_count,
        acker,
        ..
    } = delivery;
    if delivery_count > 1 {
        rt.meters.redelivered();
    }
    let msg = match decode(&payload, rt) {
        Ok(msg) => msg,
        Err(rejection) => {
            let span = tracing::info_span!(
                "rejected",
                task_id = rejection.task_id.map(tracing::field::display)
            );
            // Boxed: rare, and held inline it would make every task's
            // future larger (see `attempt::run_recording_start`).
            Box::pin(reject(rt, rejection, &payload, acker.as_ref()))
                .instrument(span)
                .await;
            return;
        }
    };
    let span = tracing::info_span!(
        "task",
        task_id = %msg.id,
        attempt = tracing::field::Empty,
        delivery = delivery_count
    );
    // Boxed: this future is what the worker spawns for each delivery,
    // and with the attempt inline it outgrew the allocator's per-thread
    // cache (see `attempt::run_recording_start`).
    Box::pin(attempt::process(
        rt,
        msg,
        payload,
        acker.into(),
        delivery_count,
    ))
    .instrument(span)
    .await;
}

/// Parses and validates a message.
///
/// # Errors
/// A [`Rejection`] saying what is wrong with it.
pub(crate) fn decode(payload: &[u8], rt: &Runtime) -> Result<TaskMessage, Rejection> {
    let limit = rt.settings.worker.max_message_bytes;
    if payload.len() > limit {
        return Err(Rejection {
            code: "too_large",
            reason: format!(
                "too_large: the message is {} bytes, the limit is {limit} (MAX_MESSAGE_BYTES)",
                payload.len()
            ),
            task_id: peek_id(payload),
            task: None,
        });
    }
    let msg = parse(payload)?;
    if let Err(e) = msg.validate(&rt.settings.tasks) {
        return Err(Rejection {
            code: "invalid_task",
            reason: format!("invalid_task: {e}"),
            task_id: Some(msg.id),
            task: Some(Box::new(msg)),
        });
    }
    Ok(msg)
}

/// JSON into a [`TaskMessage`], telling bad JSON from a document that is not
/// a task, and naming the offending field in the second case.
fn parse(payload: &[u8]) -> Result<TaskMessage, Rejection> {
    // Nearly every message is valid: parse it plainly, and only a message
    // that fails pays for the second parse that tracks the field path.
    if let Ok(msg) = serde_json::from_slice::<TaskMessage>(payload) {
        return Ok(msg);
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    let parsed = serde_path_to_error::deserialize::<_, TaskMessage>(&mut de)
        .map_err(|e| {
            let path = e.path().to_string();
            (path, e.into_inner())
        })
        .and_then(|msg| de.end().map(|()| msg).map_err(|e| (".".into(), e)));
    parsed.map_err(|(path, e)| {
        use serde_json::error::Category;
        if matches!(e.classify(), Category::Data) {
            let reason = if path == "." {
                format!("invalid_task: {e}")
            } else {
                format!("invalid_task: {path}: {e}")
            };
            Rejection {
                code: "invalid_task",
                reason,
                task_id: peek_id(payload),
                task: None,
            }
        } else {
            Rejection {
                code: "invalid_json",
                reason: format!("invalid_json: {e}"),
                task_id: None,
                task: None,
            }
        }
    })
}

/// The `id` of a JSON object, if it has a valid one.
fn peek_id(payload: &[u8]) -> Option<TaskId> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: TaskId,
    }
    serde_json::from_slice::<IdOnly>(payload).ok().map(|m| m.id)
}

/// Dead-letters a rejected message, marks its record when it has one, and
/// terminates the delivery. When the dead letter cannot be written, the
/// delivery is handed back instead so the message is not lost.
///
/// A message that parsed as a task but broke a rule also gets its record
/// moved to `dead_lettered` (created if missing), so a client polling the
/// task sees why. Messages that did not parse have no usable record.
pub(crate) async fn reject(rt: &Runtime, rejection: Rejection, payload: &Bytes, acker: &dyn Acker) {
    tracing::warn!(reason = %rejection.reason, "dead-lettering a message");
    let written = retry("writing a dead letter", || {
        rt.consumer
            .dead_letter(rejection.task_id, payload, &rejection.reason)
    })
    .await;
    if let Err(e) = written {
        tracing::error!(error = %e, "cannot dead-letter a message; handing it back");
        ack(acker, AckKind::Nak(Some(rt.service_retry_delay()))).await;
        return;
    }
    rt.meters.dead_lettered(rejection.code);
    if let Some(msg) = rejection.task
        && let Err(e) = mark_dead_lettered(rt, &msg, rejection.code, &rejection.reason).await
    {
        // The dead letter exists; redelivery would write a second one but
        // also retry the record, which a client is waiting on.
        tracing::error!(error = %e, "cannot record the dead letter; handing the message back");
        ack(acker, AckKind::Nak(Some(rt.service_retry_delay()))).await;
        return;
    }
    ack(acker, AckKind::Term).await;
}

async fn mark_dead_lettered(
    rt: &Runtime,
    msg: &TaskMessage,
    code: &str,
    reason: &str,
) -> Result<(), claudecluster_engine::results::StoreError> {
    let start = retry("starting the attempt", || {
        rt.store.start_attempt(msg, &rt.worker_id, Utc::now())
    })
    .await?;
    let StartOutcome::Started { attempt } = start else {
        return Ok(());
    };
    let end = AttemptEnd {
        state: TaskState::DeadLettered,
        result: None,
        error: Some(TaskError::new(code, reason)),
        at: Utc::now(),
    };
    retry("recording the attempt", || {
        rt.store.end_attempt(msg.id, attempt, &end)
    })
    .await?;
    Ok(())
}

/// Sends an acknowledgement; a failure is logged (the broker redelivers the
/// message after its lease, and the store makes that harmless).
pub(crate) async fn ack(acker: &dyn Acker, kind: AckKind) {
    if let Err(e) = acker.ack(kind).await {
        tracing::warn!(error = %e, ?kind, "acknowledgement failed; the message will come back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(payload: &str) -> (String, Option<TaskId>) {
        let r = parse(payload.as_bytes()).unwrap_err();
        (r.reason, r.task_id)
    }

    const ID: &str = "0190f5a0-0000-7000-8000-000000000001";

    #[test]
    fn syntax_errors_are_invalid_json() {
        assert!(reason("{not json").0.starts_with("invalid_json: "));
        assert!(reason("").0.starts_with("invalid_json: "));
        let trailing = format!(
            r#"{{"schema_version":1,"id":"{ID}","prompt":"a","created_at":"2026-01-01T00:00:00Z"}} x"#
        );
        assert!(
            reason(&trailing).0.starts_with("invalid_json: "),
            "{}",
            reason(&trailing).0
        );
    }

    #[test]
    fn schema_errors_name_the_field() {
        let (r, id) = reason(&format!(
            r#"{{"schema_version":1,"id":"{ID}","prompt":"a","priority":"high","created_at":"2026-01-01T00:00:00Z"}}"#
        ));
        assert!(r.starts_with("invalid_task: priority: "), "{r}");
        assert_eq!(id.map(|i| i.to_string()).as_deref(), Some(ID));

        let (r, _) = reason(r#"{"schema_version":1,"prompt":"a"}"#);
        assert!(r.starts_with("invalid_task: ") && r.contains("`id`"), "{r}");

        let (r, _) = reason(&format!(
            r#"{{"schema_version":1,"id":"{ID}","prompt":"a","created_at":"2026-01-01T00:00:00Z","colour":1}}"#
        ));
        assert!(r.contains("colour"), "{r}");
    }

    #[test]
    fn a_valid_message_parses() {
        let msg = parse(
            format!(
                r#"{{"schema_version":1,"id":"{ID}","prompt":"a","created_at":"2026-01-01T00:00:00Z"}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(msg.prompt, "a");
        assert_eq!(msg.max_attempts, 3);
    }
}
