//! What survives a restart: queued and in-flight messages, delivery counts,
//! nak delays and results, after a clean drop and after a SIGKILL.

use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{open, prompt_of, settings, task};
use crate::broker::AckKind;
use crate::embedded::{EmbeddedError, open_embedded};
use crate::results::{AttemptEnd, StartOutcome};
use crate::task::{TaskResult, TaskState};

const LONG_LEASE_MS: u64 = 60_000;

/// Tells [`crash_child`] where the database is; unset in a normal test run.
const CRASH_DIR_ENV: &str = "CLAUDECLUSTER_TEST_CRASH_DIR";

fn succeeded() -> AttemptEnd {
    AttemptEnd {
        state: TaskState::Succeeded,
        result: Some(TaskResult {
            output: "ok".into(),
            executor: "echo".into(),
            ..TaskResult::default()
        }),
        error: None,
        at: Utc::now(),
    }
}

#[tokio::test]
async fn a_restart_makes_in_flight_messages_deliverable_and_keeps_results() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    let msgs = [task("done", 5), task("in flight", 5), task("queued", 5)];
    for msg in &msgs {
        b.publisher.publish(msg).await.unwrap();
    }
    let batch = b.consumer.next_batch(2).await.unwrap();
    let started = b
        .store
        .start_attempt(&msgs[0], "w", Utc::now())
        .await
        .unwrap();
    assert_eq!(started, StartOutcome::Started { attempt: 1 });
    b.store
        .end_attempt(msgs[0].id, 1, &succeeded())
        .await
        .unwrap();
    batch[0].acker.ack(AckKind::Ack).await.unwrap();
    // The process goes away with "in flight" still leased for a minute.
    drop(batch);
    drop(b);

    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 2);
    let batch = b.consumer.next_batch(10).await.unwrap();
    let got: Vec<(String, u32)> = batch
        .iter()
        .map(|d| (prompt_of(&d.payload), d.delivery_count))
        .collect();
    assert_eq!(got, [("in flight".into(), 2), ("queued".into(), 1)]);
    let record = b.store.get(msgs[0].id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(record.result.unwrap().output, "ok");
}

#[tokio::test(start_paused = true)]
async fn a_nak_delay_still_holds_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    b.publisher.publish(&task("later", 5)).await.unwrap();
    let d = b.consumer.next_batch(1).await.unwrap().remove(0);
    d.acker
        .ack(AckKind::Nak(Some(Duration::from_secs(3600))))
        .await
        .unwrap();
    drop(d);
    drop(b);

    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 1);
    let early = tokio::time::timeout(Duration::from_secs(60), b.consumer.next_batch(1)).await;
    assert!(early.is_err(), "delivered before its nak delay passed");
}

#[tokio::test]
async fn one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b");
    let mut s = settings(LONG_LEASE_MS);
    s.embedded.data_dir = Some(nested.clone());
    let first = open_embedded(&s).unwrap();
    assert!(nested.join(crate::embedded::DATABASE_FILE).is_file());
    let err = open_embedded(&s).unwrap_err();
    assert!(matches!(err, EmbeddedError::InUse { .. }), "{err}");
    drop(first);
    open_embedded(&s).unwrap();
}

#[tokio::test]
async fn sigkill_loses_nothing_that_was_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "embedded::tests::durability::crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next_line().await.unwrap();
        match line.as_deref() {
            Some("CRASH-CHILD-READY") => break,
            Some(_) => {}
            None => panic!("the child exited before it was ready"),
        }
    }
    // SIGKILL: no destructor, no final commit.
    child.kill().await.unwrap();

    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    let batch = b.consumer.next_batch(100).await.unwrap();
    let got: Vec<(String, u32)> = batch
        .iter()
        .map(|d| (prompt_of(&d.payload), d.delivery_count))
        .collect();
    let mut expected: Vec<(String, u32)> = vec![("task-2".into(), 2), ("task-3".into(), 2)];
    expected.extend((4..10).map(|i| (format!("task-{i}"), 1)));
    assert_eq!(got, expected);

    let done = b
        .store
        .list(Some(TaskState::Succeeded), None, 10)
        .await
        .unwrap();
    let mut prompts: Vec<String> = done.tasks.into_iter().map(|r| r.prompt).collect();
    prompts.sort();
    assert_eq!(prompts, ["task-0", "task-1"]);
    let running = b
        .store
        .list(Some(TaskState::Running), None, 10)
        .await
        .unwrap();
    assert_eq!(running.tasks.len(), 2);
}

/// The process [`sigkill_loses_nothing_that_was_accepted`] kills: publishes
/// ten tasks, finishes two, leaves two running, then waits to be killed.
#[tokio::test]
#[ignore = "started by sigkill_loses_nothing_that_was_accepted"]
async fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let b = open(std::path::Path::new(&dir), &settings(LONG_LEASE_MS));
    let msgs: Vec<_> = (0..10).map(|i| task(&format!("task-{i}"), 5)).collect();
    for result in b.publisher.publish_batch(&msgs).await {
        result.unwrap();
    }
    for msg in &msgs {
        b.store
            .create(&crate::task::TaskRecord::queued(msg, Utc::now()))
            .await
            .unwrap();
    }
    let batch = b.consumer.next_batch(4).await.unwrap();
    for (i, delivery) in batch.iter().enumerate() {
        let msg = &msgs[i];
        assert_eq!(prompt_of(&delivery.payload), msg.prompt);
        b.store
            .start_attempt(msg, "child", Utc::now())
            .await
            .unwrap();
        if i < 2 {
            b.store.end_attempt(msg.id, 1, &succeeded()).await.unwrap();
            delivery.acker.ack(AckKind::Ack).await.unwrap();
        }
    }
    println!("CRASH-CHILD-READY");
    std::future::pending::<()>().await;
}
