//! The store: the state machine's transitions, idempotency keys, listing,
//! expiry and heartbeats.

use std::time::Duration;

use chrono::{TimeDelta, Utc};

use super::{open, settings, task};
use crate::config::Settings;
use crate::embedded::{self, tables};
use crate::results::{
    AttemptEnd, CancelOutcome, CreateOutcome, EndOutcome, StartOutcome, StoreError, WorkerInfo,
};
use crate::task::{TaskError, TaskRecord, TaskResult, TaskState};

fn record(prompt: &str, key: Option<&str>) -> TaskRecord {
    let mut msg = task(prompt, 5);
    msg.idempotency_key = key.map(str::to_owned);
    TaskRecord::queued(&msg, Utc::now())
}

fn end(state: TaskState) -> AttemptEnd {
    AttemptEnd {
        state,
        result: (state == TaskState::Succeeded).then(|| TaskResult {
            output: "done".into(),
            executor: "echo".into(),
            ..TaskResult::default()
        }),
        error: (state != TaskState::Succeeded).then(|| TaskError::new("nonzero_exit", "exit 1")),
        at: Utc::now(),
    }
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_task() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    let first = record("first", Some("key-1"));
    let second = record("second", Some("key-1"));
    assert_eq!(
        b.store.create(&first).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        b.store.create(&second).await.unwrap(),
        CreateOutcome::Existing(Box::new(first.clone()))
    );
    assert!(b.store.get(second.id).await.unwrap().is_none());

    // In one batch, the second claim of a key sees the first.
    let (third, fourth) = (
        record("third", Some("key-2")),
        record("fourth", Some("key-2")),
    );
    let outcomes = b.store.create_many(&[third.clone(), fourth]).await;
    assert_eq!(outcomes[0].as_ref().unwrap(), &CreateOutcome::Created);
    assert_eq!(
        outcomes[1].as_ref().unwrap(),
        &CreateOutcome::Existing(Box::new(third))
    );

    // Removing a task whose publish failed frees its key.
    b.store.remove(first.id, Some("key-1")).await.unwrap();
    assert!(b.store.get(first.id).await.unwrap().is_none());
    assert_eq!(
        b.store.create(&second).await.unwrap(),
        CreateOutcome::Created
    );
}

#[tokio::test]
async fn attempts_run_to_a_final_state_that_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    let msg = task("work", 5);
    // No record yet: a message published straight onto the queue.
    let started = b.store.start_attempt(&msg, "w1", Utc::now()).await.unwrap();
    assert_eq!(started, StartOutcome::Started { attempt: 1 });
    let running = b.store.get(msg.id).await.unwrap().unwrap();
    assert_eq!(running.state, TaskState::Running);
    assert_eq!(running.worker_id.as_deref(), Some("w1"));

    // A retryable failure puts it back to queued.
    let retry = end(TaskState::Queued);
    assert_eq!(
        b.store.end_attempt(msg.id, 1, &retry).await.unwrap(),
        EndOutcome::Written
    );
    let queued = b.store.get(msg.id).await.unwrap().unwrap();
    assert_eq!(queued.state, TaskState::Queued);
    assert_eq!(queued.queued_at, Some(retry.at));

    let started = b.store.start_attempt(&msg, "w2", Utc::now()).await.unwrap();
    assert_eq!(started, StartOutcome::Started { attempt: 2 });
    let done = end(TaskState::Succeeded);
    assert_eq!(
        b.store.end_attempt(msg.id, 2, &done).await.unwrap(),
        EndOutcome::Written
    );

    // A redelivered copy finishing later is counted, not written.
    let late = end(TaskState::Failed);
    assert_eq!(
        b.store.end_attempt(msg.id, 2, &late).await.unwrap(),
        EndOutcome::AlreadyFinal(TaskState::Succeeded)
    );
    assert_eq!(
        b.store.start_attempt(&msg, "w3", Utc::now()).await.unwrap(),
        StartOutcome::AlreadyFinal(TaskState::Succeeded)
    );
    let record = b.store.get(msg.id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(record.result, done.result);
    assert_eq!(record.finished_at, Some(done.at));
    assert_eq!(record.duplicate_executions, 1);
    assert_eq!(record.attempts, 2);
    let outcomes: Vec<Option<TaskState>> =
        record.attempt_history.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [Some(TaskState::Queued), Some(TaskState::Succeeded)]
    );
}

#[tokio::test]
async fn an_old_attempt_does_not_requeue_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    let msg = task("raced", 5);
    b.store.start_attempt(&msg, "w1", Utc::now()).await.unwrap();
    b.store.start_attempt(&msg, "w2", Utc::now()).await.unwrap();
    b.store
        .end_attempt(msg.id, 1, &end(TaskState::Queued))
        .await
        .unwrap();
    let record = b.store.get(msg.id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Running);
    assert_eq!(record.attempt_history[0].outcome, Some(TaskState::Queued));
    assert_eq!(record.attempt_history[1].outcome, None);
}

#[tokio::test]
async fn ending_an_unknown_task_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    let err = b
        .store
        .end_attempt(task("ghost", 5).id, 1, &end(TaskState::Succeeded))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Other(_)), "{err}");
}

#[tokio::test]
async fn cancel_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    let rec = record("cancel me", None);
    assert_eq!(
        b.store.cancel(rec.id, Utc::now()).await.unwrap(),
        CancelOutcome::NotFound
    );
    b.store.create(&rec).await.unwrap();
    let CancelOutcome::Cancelled(cancelled) = b.store.cancel(rec.id, Utc::now()).await.unwrap()
    else {
        panic!("not cancelled");
    };
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert!(cancelled.finished_at.is_some());
    assert!(matches!(
        b.store.cancel(rec.id, Utc::now()).await.unwrap(),
        CancelOutcome::AlreadyFinal(r) if r.state == TaskState::Cancelled
    ));

    // A replay is the one way out of a final state; it keeps the history.
    let msg = rec.to_message();
    assert_eq!(
        b.store.start_attempt(&msg, "w", Utc::now()).await.unwrap(),
        StartOutcome::AlreadyFinal(TaskState::Cancelled)
    );
    let reopened = b.store.reopen(&msg, Utc::now()).await.unwrap();
    assert_eq!(reopened.state, TaskState::Queued);
    assert_eq!(reopened.finished_at, None);
    assert_eq!(b.store.get(rec.id).await.unwrap(), Some(reopened));
    assert_eq!(
        b.store.start_attempt(&msg, "w", Utc::now()).await.unwrap(),
        StartOutcome::Started { attempt: 1 }
    );

    // Reopening a task whose record is gone recreates it.
    let gone = task("expired", 5);
    let recreated = b.store.reopen(&gone, Utc::now()).await.unwrap();
    assert_eq!(recreated.state, TaskState::Queued);
    assert_eq!(recreated.prompt, "expired");
}

#[tokio::test]
async fn list_pages_newest_first_with_a_state_filter() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    let base = Utc::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut rec = record(&format!("t{i}"), None);
        rec.created_at = base + TimeDelta::seconds(i);
        b.store.create(&rec).await.unwrap();
        ids.push(rec.id);
    }
    b.store.cancel(ids[1], Utc::now()).await.unwrap();
    b.store.cancel(ids[3], Utc::now()).await.unwrap();

    let page = b.store.list(None, None, 2).await.unwrap();
    let got: Vec<_> = page.tasks.iter().map(|r| r.id).collect();
    assert_eq!(got, [ids[4], ids[3]]);
    let cursor = page.next_cursor.expect("more pages");
    let page = b.store.list(None, Some(&cursor), 2).await.unwrap();
    let got: Vec<_> = page.tasks.iter().map(|r| r.id).collect();
    assert_eq!(got, [ids[2], ids[1]]);
    let page = b
        .store
        .list(None, page.next_cursor.as_deref(), 2)
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 1);
    assert_eq!(page.next_cursor, None);

    let cancelled = b
        .store
        .list(Some(TaskState::Cancelled), None, 10)
        .await
        .unwrap();
    let got: Vec<_> = cancelled.tasks.iter().map(|r| r.id).collect();
    assert_eq!(got, [ids[3], ids[1]]);
    let queued = b
        .store
        .list(Some(TaskState::Queued), None, 10)
        .await
        .unwrap();
    assert_eq!(queued.tasks.len(), 3);
    assert!(
        b.store
            .list(Some(TaskState::Running), None, 10)
            .await
            .unwrap()
            .tasks
            .is_empty()
    );

    assert!(b.store.list(None, Some("not-a-cursor"), 10).await.is_err());
}

#[tokio::test]
async fn expired_records_vanish_and_free_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(30_000);
    s.redis.result_ttl_secs = 0;
    let b = open(dir.path(), &s);
    let first = record("short-lived", Some("k"));
    b.store.create(&first).await.unwrap();
    assert!(b.store.get(first.id).await.unwrap().is_none());
    assert!(b.store.list(None, None, 10).await.unwrap().tasks.is_empty());
    let second = record("next", Some("k"));
    assert_eq!(
        b.store.create(&second).await.unwrap(),
        CreateOutcome::Created
    );
}

#[tokio::test]
async fn the_purge_removes_expired_records_with_their_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    b.store.create(&record("a", Some("ka"))).await.unwrap();
    b.store.create(&record("b", None)).await.unwrap();
    drop(b);

    let db = embedded::open_db(&dir.path().join(embedded::DATABASE_FILE)).unwrap();
    let day_later = tables::now_ms() + 2 * 24 * 3600 * 1000;
    let purged = db
        .write(move |t| tables::purge_expired(t, day_later, 100))
        .await
        .unwrap();
    assert_eq!(purged.removed, 2);
    assert!(!purged.more);
    let left = db
        .write(|t| {
            use redb::ReadableTableMetadata;
            Ok((
                t.tasks.len()?,
                t.task_index.len()?,
                t.task_expiry.len()?,
                t.idempotency.len()?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(left, (0, 0, 0, 0));
}

#[tokio::test]
async fn heartbeats_list_live_workers() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &Settings::default());
    let info = |id: &str| WorkerInfo {
        id: id.into(),
        host: "h".into(),
        version: "0".into(),
        concurrency: 2,
        in_flight: 0,
        executor: "echo".into(),
        started_at: Utc::now(),
        last_seen: Utc::now(),
    };
    b.store
        .heartbeat(&info("alive"), Duration::from_secs(60))
        .await
        .unwrap();
    b.store
        .heartbeat(&info("gone"), Duration::from_secs(60))
        .await
        .unwrap();
    b.store
        .heartbeat(&info("silent"), Duration::ZERO)
        .await
        .unwrap();
    b.store.remove_worker("gone").await.unwrap();
    let ids: Vec<String> = b
        .store
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, ["alive"]);
}
