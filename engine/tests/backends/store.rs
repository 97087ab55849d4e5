//! Result-store cases: the state machine's transitions, idempotency,
//! listing and worker heartbeats.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use claudecluster_engine::backend::Backends;
use claudecluster_engine::results::{
    AttemptEnd, CancelOutcome, CreateOutcome, EndOutcome, StartOutcome, WorkerInfo,
};
use claudecluster_engine::task::{TaskError, TaskId, TaskRecord, TaskResult, TaskState};

use crate::harness::{message, message_at, record};

fn with_key(mut r: TaskRecord, key: &str) -> TaskRecord {
    r.idempotency_key = Some(key.to_owned());
    r
}

fn result(output: &str) -> TaskResult {
    TaskResult {
        output: output.into(),
        executor: "echo".into(),
        duration_ms: 3,
        ..TaskResult::default()
    }
}

fn end(state: TaskState, result: Option<TaskResult>, error: Option<TaskError>) -> AttemptEnd {
    AttemptEnd {
        state,
        result,
        error,
        at: Utc::now(),
    }
}

/// The record of a task whose second attempt, run by `worker`, ended as
/// `done` with the output "hello".
async fn succeeded_on_the_second_attempt(
    b: &Backends,
    id: TaskId,
    done: &AttemptEnd,
    worker: &str,
) -> TaskRecord {
    let finished = b.store.get(id).await.unwrap().unwrap();
    assert_eq!(finished.state, TaskState::Succeeded);
    assert_eq!(finished.result, Some(result("hello")));
    assert_eq!(finished.error, None);
    assert_eq!(finished.finished_at, Some(done.at));
    assert_eq!(finished.attempts, 2);
    assert_eq!(finished.worker_id.as_deref(), Some(worker));
    finished
}

pub async fn create_and_get(b: &Backends) {
    let mut r = record();
    r.metadata = serde_json::json!({"team": "a", "n": 1})
        .as_object()
        .cloned()
        .unwrap();
    r.timeout_ms = Some(60_000);
    assert_eq!(b.store.create(&r).await.unwrap(), CreateOutcome::Created);
    assert_eq!(b.store.get(r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(b.store.get(uuid::Uuid::now_v7()).await.unwrap(), None);
}

pub async fn idempotency_key_returns_the_first_task(b: &Backends) {
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let first = with_key(record(), &key);
    assert_eq!(
        b.store.create(&first).await.unwrap(),
        CreateOutcome::Created
    );
    let second = with_key(record(), &key);
    match b.store.create(&second).await.unwrap() {
        CreateOutcome::Existing(existing) => assert_eq!(*existing, first),
        other => panic!("expected the first task, got {other:?}"),
    }
    assert_eq!(
        b.store.get(second.id).await.unwrap(),
        None,
        "nothing stored"
    );
}

pub async fn create_many_mixes_new_and_existing(b: &Backends) {
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let holder = with_key(record(), &key);
    b.store.create(&holder).await.unwrap();
    let batch = vec![record(), with_key(record(), &key), record()];
    let outcomes = b.store.create_many(&batch).await;
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[0].as_ref().unwrap(), &CreateOutcome::Created);
    assert!(
        matches!(outcomes[1].as_ref().unwrap(), CreateOutcome::Existing(r) if r.id == holder.id)
    );
    assert_eq!(outcomes[2].as_ref().unwrap(), &CreateOutcome::Created);
    assert!(b.store.get(batch[0].id).await.unwrap().is_some());
    assert!(b.store.get(batch[1].id).await.unwrap().is_none());
    assert!(b.store.get(batch[2].id).await.unwrap().is_some());
    assert!(b.store.create_many(&[]).await.is_empty());
}

pub async fn attempts_move_through_retry_to_success(b: &Backends) {
    let r = record();
    let msg = r.to_message();
    b.store.create(&r).await.unwrap();

    let started = Utc::now();
    let outcome = b.store.start_attempt(&msg, "w1", started).await.unwrap();
    assert_eq!(outcome, StartOutcome::Started { attempt: 1 });
    let running = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(running.state, TaskState::Running);
    assert_eq!(running.attempts, 1);
    assert_eq!(running.worker_id.as_deref(), Some("w1"));
    assert_eq!(running.started_at, Some(started));
    assert_eq!(running.attempt_history.len(), 1);
    assert_eq!(running.attempt_history[0].worker_id, "w1");
    assert_eq!(running.attempt_history[0].finished_at, None);

    let failure = TaskError::new("nonzero_exit", "exit 1 \"quoted\" / é");
    let retry = end(TaskState::Queued, None, Some(failure.clone()));
    assert_eq!(
        b.store.end_attempt(r.id, 1, &retry).await.unwrap(),
        EndOutcome::Written
    );
    let queued = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(queued.state, TaskState::Queued);
    assert_eq!(queued.error.as_ref(), Some(&failure));
    assert_eq!(queued.finished_at, None, "a retry is not a finish");
    assert_eq!(queued.queued_at, Some(retry.at));
    assert_eq!(queued.attempt_history[0].outcome, Some(TaskState::Queued));
    assert_eq!(queued.attempt_history[0].error.as_ref(), Some(&failure));
    assert_eq!(queued.attempt_history[0].finished_at, Some(retry.at));

    // A worker id that JSON must escape takes the script's slow path.
    let odd_worker = "w2 \"odd\" \\ id\t";
    let outcome = b
        .store
        .start_attempt(&msg, odd_worker, Utc::now())
        .await
        .unwrap();
    assert_eq!(outcome, StartOutcome::Started { attempt: 2 });
    let done = end(TaskState::Succeeded, Some(result("hello")), None);
    assert_eq!(
        b.store.end_attempt(r.id, 2, &done).await.unwrap(),
        EndOutcome::Written
    );
    let finished = succeeded_on_the_second_attempt(b, r.id, &done, odd_worker).await;
    assert_eq!(finished.attempt_history[1].worker_id, odd_worker);
    let numbers: Vec<u32> = finished.attempt_history.iter().map(|a| a.number).collect();
    assert_eq!(numbers, [1, 2]);
    assert_eq!(
        finished.attempt_history[1].outcome,
        Some(TaskState::Succeeded)
    );
    assert!(finished.updated_at >= finished.created_at);
}

pub async fn end_after_final_counts_a_duplicate(b: &Backends) {
    let r = record();
    let msg = r.to_message();
    b.store.create(&r).await.unwrap();
    b.store.start_attempt(&msg, "w1", Utc::now()).await.unwrap();
    let done = end(TaskState::Succeeded, Some(result("first")), None);
    b.store.end_attempt(r.id, 1, &done).await.unwrap();

    assert_eq!(
        b.store.start_attempt(&msg, "w2", Utc::now()).await.unwrap(),
        StartOutcome::AlreadyFinal(TaskState::Succeeded)
    );
    let late = end(
        TaskState::Failed,
        Some(result("second")),
        Some(TaskError::new("x", "y")),
    );
    assert_eq!(
        b.store.end_attempt(r.id, 2, &late).await.unwrap(),
        EndOutcome::AlreadyFinal(TaskState::Succeeded)
    );
    let kept = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(kept.state, TaskState::Succeeded);
    assert_eq!(kept.result, Some(result("first")));
    assert_eq!(kept.error, None);
    assert_eq!(kept.duplicate_executions, 1);
    assert_eq!(kept.attempts, 1);
}

pub async fn unstarted_attempts_are_recorded_whole(b: &Backends) {
    assert_eq!(
        b.store.peek(message(5).id).await.unwrap(),
        None,
        "no record"
    );
    let r = record();
    let msg = r.to_message();
    b.store.create(&r).await.unwrap();
    assert_eq!(
        b.store.peek(r.id).await.unwrap(),
        Some((TaskState::Queued, 0))
    );

    // A first attempt that failed and goes back to the queue.
    let started = Utc::now();
    let failure = TaskError::new("nonzero_exit", "exit 1 \"quoted\" / é");
    let retry = end(TaskState::Queued, None, Some(failure.clone()));
    assert_eq!(
        b.store
            .record_unstarted_attempt(&msg, "w1", started, &retry)
            .await
            .unwrap(),
        EndOutcome::Written
    );
    let queued = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(queued.state, TaskState::Queued);
    assert_eq!(queued.attempts, 1);
    assert_eq!(queued.worker_id.as_deref(), Some("w1"));
    assert_eq!(queued.started_at, Some(started));
    assert_eq!(queued.error.as_ref(), Some(&failure));
    assert_eq!(queued.finished_at, None, "a retry is not a finish");
    assert_eq!(queued.queued_at, Some(retry.at));
    let first = &queued.attempt_history[0];
    assert_eq!(first.number, 1);
    assert_eq!(first.worker_id, "w1");
    assert_eq!(first.started_at, started);
    assert_eq!(first.finished_at, Some(retry.at));
    assert_eq!(first.outcome, Some(TaskState::Queued));
    assert_eq!(first.error.as_ref(), Some(&failure));
    assert_eq!(
        b.store.peek(r.id).await.unwrap(),
        Some((TaskState::Queued, 1))
    );

    // The next one succeeds, on a worker whose id JSON must escape (the
    // script's slow path); the error of the first is cleared.
    let odd_worker = "w2 \"odd\" \\ id\t";
    let done = end(TaskState::Succeeded, Some(result("hello")), None);
    assert_eq!(
        b.store
            .record_unstarted_attempt(&msg, odd_worker, Utc::now(), &done)
            .await
            .unwrap(),
        EndOutcome::Written
    );
    let finished = succeeded_on_the_second_attempt(b, r.id, &done, odd_worker).await;
    let second = &finished.attempt_history[1];
    assert_eq!((second.number, second.worker_id.as_str()), (2, odd_worker));
    assert_eq!(second.outcome, Some(TaskState::Succeeded));
    assert_eq!(second.error, None);

    // Once final, another execution is a duplicate and changes nothing else.
    let late = end(TaskState::Failed, None, Some(TaskError::new("x", "y")));
    assert_eq!(
        b.store
            .record_unstarted_attempt(&msg, "w3", Utc::now(), &late)
            .await
            .unwrap(),
        EndOutcome::AlreadyFinal(TaskState::Succeeded)
    );
    let kept = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(kept.result, Some(result("hello")));
    assert_eq!(kept.attempts, 2);
    assert_eq!(kept.duplicate_executions, 1);

    // A record that is gone is an error, not a silent write.
    let ghost = message(5);
    assert!(
        b.store
            .record_unstarted_attempt(&ghost, "w1", Utc::now(), &done)
            .await
            .is_err()
    );
    assert_eq!(b.store.get(ghost.id).await.unwrap(), None, "not created");
}

pub async fn an_unstarted_attempt_of_a_cancelled_task_is_closed_as_cancelled(b: &Backends) {
    let r = record();
    let msg = r.to_message();
    b.store.create(&r).await.unwrap();
    let started = Utc::now();
    b.store.cancel(r.id, Utc::now()).await.unwrap();
    let stopped = end(
        TaskState::Cancelled,
        None,
        Some(TaskError::new("cancelled", "stopped")),
    );
    assert_eq!(
        b.store
            .record_unstarted_attempt(&msg, "w1", started, &stopped)
            .await
            .unwrap(),
        EndOutcome::AlreadyFinal(TaskState::Cancelled)
    );
    let record = b.store.get(r.id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Cancelled);
    assert_eq!(record.duplicate_executions, 0, "not a second execution");
    assert_eq!(record.attempts, 1);
    let attempt = &record.attempt_history[0];
    assert_eq!(attempt.started_at, started);
    assert_eq!(attempt.finished_at, Some(stopped.at));
    assert_eq!(attempt.outcome, Some(TaskState::Cancelled));
    assert_eq!(attempt.error.as_ref().unwrap().code, "cancelled");
}

pub async fn an_unstarted_attempt_sent_again_is_recorded_once(b: &Backends) {
    let store = &b.store;
    let end = |state| end(state, None, None);

    // A retry outcome written twice (the first reply lost): one attempt.
    let r = record();
    store.create(&r).await.unwrap();
    let started = Utc::now();
    for _ in 0..2 {
        store
            .record_unstarted_attempt(&r.to_message(), "w1", started, &end(TaskState::Queued))
            .await
            .unwrap();
    }
    let again = store.get(r.id).await.unwrap().unwrap();
    assert_eq!(again.attempts, 1);
    assert_eq!(again.attempt_history.len(), 1);
    // A final outcome written twice: no duplicate counted.
    let done = end(TaskState::Succeeded);
    let first = store
        .record_unstarted_attempt(&r.to_message(), "w1", started, &done)
        .await
        .unwrap();
    let second = store
        .record_unstarted_attempt(&r.to_message(), "w1", started, &done)
        .await
        .unwrap();
    assert_eq!(first, EndOutcome::Written);
    assert_eq!(second, EndOutcome::AlreadyFinal(TaskState::Succeeded));
    let done_record = store.get(r.id).await.unwrap().unwrap();
    assert_eq!(done_record.attempts, 1);
    assert_eq!(done_record.duplicate_executions, 0);
    assert_eq!(
        done_record.attempt_history[0].outcome,
        Some(TaskState::Succeeded)
    );

    // A start written late whose reply was lost: the end closes that attempt.
    let r = record();
    store.create(&r).await.unwrap();
    let started = Utc::now();
    store
        .start_attempt(&r.to_message(), "w1", started)
        .await
        .unwrap();
    store
        .record_unstarted_attempt(&r.to_message(), "w1", started, &end(TaskState::Succeeded))
        .await
        .unwrap();
    let closed = store.get(r.id).await.unwrap().unwrap();
    assert_eq!(closed.state, TaskState::Succeeded);
    assert_eq!(closed.attempts, 1);
    assert_eq!(
        closed.attempt_history[0].outcome,
        Some(TaskState::Succeeded)
    );
}

pub async fn start_attempt_creates_a_missing_record(b: &Backends) {
    let msg = message(7);
    let outcome = b.store.start_attempt(&msg, "w1", Utc::now()).await.unwrap();
    assert_eq!(outcome, StartOutcome::Started { attempt: 1 });
    let r = b
        .store
        .get(msg.id)
        .await
        .unwrap()
        .expect("created from the message");
    assert_eq!(r.state, TaskState::Running);
    assert_eq!(r.prompt, msg.prompt);
    assert_eq!(r.priority, 7);
    assert_eq!(r.created_at, msg.created_at);
    assert_eq!(r.to_message(), msg);
    let page = b
        .store
        .list(Some(TaskState::Running), None, 10)
        .await
        .unwrap();
    assert!(page.tasks.iter().any(|t| t.id == msg.id), "listed");
}

pub async fn cancel_only_moves_unfinished_tasks(b: &Backends) {
    let r = record();
    b.store.create(&r).await.unwrap();
    let at = Utc::now();
    match b.store.cancel(r.id, at).await.unwrap() {
        CancelOutcome::Cancelled(c) => {
            assert_eq!(c.state, TaskState::Cancelled);
            assert_eq!(c.finished_at, Some(at));
        }
        other => panic!("expected cancelled, got {other:?}"),
    }
    assert!(matches!(
        b.store.cancel(r.id, Utc::now()).await.unwrap(),
        CancelOutcome::AlreadyFinal(c) if c.state == TaskState::Cancelled
    ));
    assert_eq!(
        b.store
            .start_attempt(&r.to_message(), "w1", Utc::now())
            .await
            .unwrap(),
        StartOutcome::AlreadyFinal(TaskState::Cancelled)
    );
    assert_eq!(
        b.store
            .cancel(uuid::Uuid::now_v7(), Utc::now())
            .await
            .unwrap(),
        CancelOutcome::NotFound
    );

    // A running task can be cancelled too. The worker sees the state, stops
    // the attempt and ends it: the attempt is closed as cancelled, the
    // record stays cancelled, and that is not a duplicate execution.
    let running = record();
    b.store.create(&running).await.unwrap();
    b.store
        .start_attempt(&running.to_message(), "w1", Utc::now())
        .await
        .unwrap();
    assert_eq!(
        b.store.state(running.id).await.unwrap(),
        Some(TaskState::Running)
    );
    assert!(matches!(
        b.store.cancel(running.id, Utc::now()).await.unwrap(),
        CancelOutcome::Cancelled(_)
    ));
    assert_eq!(
        b.store.state(running.id).await.unwrap(),
        Some(TaskState::Cancelled)
    );
    let stopped = end(
        TaskState::Cancelled,
        None,
        Some(TaskError::new("cancelled", "stopped")),
    );
    assert_eq!(
        b.store.end_attempt(running.id, 1, &stopped).await.unwrap(),
        EndOutcome::AlreadyFinal(TaskState::Cancelled)
    );
    let got = b.store.get(running.id).await.unwrap().unwrap();
    assert_eq!(got.state, TaskState::Cancelled);
    assert_eq!(got.duplicate_executions, 0);
    assert_eq!(got.attempt_history.len(), 1);
    assert_eq!(got.attempt_history[0].outcome, Some(TaskState::Cancelled));
    assert!(got.attempt_history[0].finished_at.is_some());
    assert_eq!(
        got.attempt_history[0].error.as_ref().unwrap().code,
        "cancelled"
    );
    // Ending the same attempt again is a second execution finishing.
    let done = end(TaskState::Succeeded, Some(result("late")), None);
    assert_eq!(
        b.store.end_attempt(running.id, 1, &done).await.unwrap(),
        EndOutcome::AlreadyFinal(TaskState::Cancelled)
    );
    let got = b.store.get(running.id).await.unwrap().unwrap();
    assert_eq!(got.duplicate_executions, 1);
    assert_eq!(got.result, None);
    assert_eq!(
        b.store.state(uuid::Uuid::now_v7()).await.unwrap(),
        None,
        "no record, no state"
    );
}

pub async fn remove_releases_the_idempotency_key(b: &Backends) {
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let r = with_key(record(), &key);
    b.store.create(&r).await.unwrap();
    b.store.remove(r.id, Some(&key)).await.unwrap();
    assert_eq!(b.store.get(r.id).await.unwrap(), None);
    let page = b.store.list(None, None, 100).await.unwrap();
    assert!(page.tasks.iter().all(|t| t.id != r.id));

    let again = with_key(record(), &key);
    assert_eq!(
        b.store.create(&again).await.unwrap(),
        CreateOutcome::Created
    );
    // Removing a task that no longer owns the key leaves the key alone.
    b.store.remove(r.id, Some(&key)).await.unwrap();
    let third = with_key(record(), &key);
    assert!(matches!(
        b.store.create(&third).await.unwrap(),
        CreateOutcome::Existing(e) if e.id == again.id
    ));
}

pub async fn list_pages_newest_first_with_state_filter(b: &Backends) {
    let base = Utc::now() - TimeDelta::seconds(10);
    let records: Vec<TaskRecord> = (0..5)
        .map(|i| {
            let msg = message_at(5, base + TimeDelta::milliseconds(i * 10));
            TaskRecord::queued(&msg, Utc::now())
        })
        .collect();
    for r in &records {
        b.store.create(r).await.unwrap();
    }
    let newest_first: Vec<_> = records.iter().rev().map(|r| r.id).collect();

    let p1 = b.store.list(None, None, 2).await.unwrap();
    let p2 = b
        .store
        .list(None, p1.next_cursor.as_deref(), 2)
        .await
        .unwrap();
    let p3 = b
        .store
        .list(None, p2.next_cursor.as_deref(), 2)
        .await
        .unwrap();
    assert!(p1.next_cursor.is_some() && p2.next_cursor.is_some());
    assert_eq!(p3.next_cursor, None);
    let seen: Vec<_> = [p1.tasks, p2.tasks, p3.tasks]
        .into_iter()
        .flatten()
        .map(|t| t.id)
        .collect();
    assert_eq!(seen, newest_first);

    for r in &records[..2] {
        b.store
            .start_attempt(&r.to_message(), "w1", Utc::now())
            .await
            .unwrap();
    }
    let running = b
        .store
        .list(Some(TaskState::Running), None, 10)
        .await
        .unwrap();
    let ids: Vec<_> = running.tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids, [records[1].id, records[0].id]);
    assert!(running.tasks.iter().all(|t| t.state == TaskState::Running));
    let queued = b
        .store
        .list(Some(TaskState::Queued), None, 10)
        .await
        .unwrap();
    assert_eq!(queued.tasks.len(), 3);
    assert!(
        b.store
            .list(Some(TaskState::Failed), None, 10)
            .await
            .unwrap()
            .tasks
            .is_empty()
    );

    assert!(b.store.list(None, Some("not a cursor"), 10).await.is_err());
}

pub async fn list_pages_through_identical_timestamps(b: &Backends) {
    let at = Utc::now();
    let records: Vec<TaskRecord> = (0..4)
        .map(|_| TaskRecord::queued(&message_at(5, at), at))
        .collect();
    let outcomes = b.store.create_many(&records).await;
    assert!(outcomes.iter().all(Result::is_ok));
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let page = b.store.list(None, cursor.as_deref(), 1).await.unwrap();
        for t in &page.tasks {
            assert!(seen.insert(t.id), "{} listed twice", t.id);
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(cursor, None);
    assert_eq!(seen, records.iter().map(|r| r.id).collect());
}

/// Pages through `state` until the last page, checking no task comes twice.
async fn list_all(b: &Backends, state: TaskState, limit: usize) -> Vec<TaskRecord> {
    let mut out: Vec<TaskRecord> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let page = b
            .store
            .list(Some(state), cursor.as_deref(), limit)
            .await
            .unwrap();
        assert!(page.tasks.len() <= limit);
        assert!(page.tasks.iter().all(|t| t.state == state));
        out.extend(page.tasks);
        cursor = page.next_cursor;
        if cursor.is_none() {
            let ids: HashSet<_> = out.iter().map(|t| t.id).collect();
            assert_eq!(ids.len(), out.len(), "a task was listed twice");
            return out;
        }
    }
    panic!("listing {state} did not end");
}

pub async fn list_filters_many_tasks_by_state(b: &Backends) {
    // More tasks than one listing call of the Redis store reads for a state
    // without an index of its own, with the rare ones at the oldest end.
    let base = Utc::now() - TimeDelta::seconds(60);
    let records: Vec<TaskRecord> = (0..2300)
        .map(|i| TaskRecord::queued(&message_at(5, base + TimeDelta::milliseconds(i)), base))
        .collect();
    assert!(
        b.store
            .create_many(&records)
            .await
            .iter()
            .all(Result::is_ok)
    );
    let running = [0, 1, 7, 1500, 2299];
    for i in running {
        let started = b
            .store
            .start_attempt(&records[i].to_message(), "w1", Utc::now())
            .await
            .unwrap();
        assert_eq!(started, StartOutcome::Started { attempt: 1 });
    }
    let listed: Vec<_> = list_all(b, TaskState::Running, 3)
        .await
        .iter()
        .map(|t| t.id)
        .collect();
    let newest_first: Vec<_> = running.iter().rev().map(|&i| records[i].id).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(
        list_all(b, TaskState::Queued, 500).await.len(),
        records.len() - running.len()
    );

    // A rare outcome has an index of its own, which a replay leaves.
    let dead = end(
        TaskState::DeadLettered,
        None,
        Some(TaskError::new("nonzero_exit", "exit 1")),
    );
    b.store.end_attempt(records[7].id, 1, &dead).await.unwrap();
    let listed = list_all(b, TaskState::DeadLettered, 10).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, records[7].id);
    b.store
        .reopen(&records[7].to_message(), Utc::now())
        .await
        .unwrap();
    assert!(list_all(b, TaskState::DeadLettered, 10).await.is_empty());
    assert_eq!(list_all(b, TaskState::Running, 10).await.len(), 4);
}

pub async fn reopen_clears_the_outcome_and_keeps_history(b: &Backends) {
    let r = record();
    let msg = r.to_message();
    b.store.create(&r).await.unwrap();
    b.store.start_attempt(&msg, "w1", Utc::now()).await.unwrap();
    let dead = end(
        TaskState::DeadLettered,
        Some(result("partial")),
        Some(TaskError::new("nonzero_exit", "exit 1")),
    );
    b.store.end_attempt(r.id, 1, &dead).await.unwrap();

    let at = Utc::now();
    let reopened = b.store.reopen(&msg, at).await.unwrap();
    assert_eq!(reopened.state, TaskState::Queued);
    assert_eq!(reopened.result, None);
    assert_eq!(reopened.error, None);
    assert_eq!(reopened.finished_at, None);
    assert_eq!(reopened.queued_at, Some(at));
    assert_eq!(reopened.attempts, 1);
    assert_eq!(reopened.attempt_history.len(), 1);
    assert_eq!(b.store.get(r.id).await.unwrap(), Some(reopened));
    assert_eq!(
        b.store.start_attempt(&msg, "w2", Utc::now()).await.unwrap(),
        StartOutcome::Started { attempt: 2 }
    );

    // An expired (here: never stored) record comes back from the message.
    let lost = message(3);
    let recreated = b.store.reopen(&lost, Utc::now()).await.unwrap();
    assert_eq!(recreated.state, TaskState::Queued);
    assert_eq!(recreated.to_message(), lost);
    assert_eq!(recreated.attempts, 0);
}

fn worker(id: &str, in_flight: usize) -> WorkerInfo {
    let now = Utc::now();
    WorkerInfo {
        id: id.into(),
        host: "test-host".into(),
        version: "0.0.0".into(),
        concurrency: 4,
        in_flight,
        executor: "echo".into(),
        started_at: now,
        last_seen: now,
    }
}

pub async fn workers_expire_and_can_be_removed(b: &Backends) {
    let alive = worker("w-alive", 1);
    b.store
        .heartbeat(&alive, Duration::from_secs(60))
        .await
        .unwrap();
    // A heartbeat with no time to live has expired by the next read.
    b.store
        .heartbeat(&worker("w-gone", 0), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(b.store.workers().await.unwrap(), [alive]);

    let busier = worker("w-alive", 3);
    b.store
        .heartbeat(&busier, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(b.store.workers().await.unwrap(), [busier]);
    b.store.remove_worker("w-alive").await.unwrap();
    assert!(b.store.workers().await.unwrap().is_empty());
    b.store.remove_worker("never-seen").await.unwrap();
}

pub async fn health_answers(b: &Backends) {
    b.store.health().await.expect("store health");
    b.publisher.health().await.expect("broker health");
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
}
