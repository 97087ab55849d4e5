//! `POST /tasks/{id}/cancel` as a client sees it, on both backends: a
//! queued task never starts, and a running task's processes are stopped by
//! whichever worker holds it, its record saying `cancelled` with the
//! attempt closed as such and no duplicate execution counted.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use claudecluster_engine::config::ExecutorKind;
use claudecluster_engine::results::StartOutcome;
use claudecluster_engine::task::{TaskId, TaskState};
use claudecluster_testkit::wait::eventually;
use claudecluster_tests::{BackendKind, TestCluster};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

crate::on_both_backends!(
    a_cancelled_queued_task_never_starts,
    cancelling_a_running_task_stops_its_processes,
);

async fn cancel(cluster: &TestCluster, id: &str) -> (u16, Value) {
    cluster.post_path(&format!("/tasks/{id}/cancel")).await
}

async fn a_cancelled_queued_task_never_starts(kind: BackendKind) {
    let mut cluster = TestCluster::start_intake(kind, |s| s.worker.concurrency = 1).await;
    let cancelled = cluster.submit_prompt("never run me").await;
    let id = cancelled["id"].as_str().unwrap().to_owned();
    let (status, body) = cancel(&cluster, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "cancelled");
    assert!(body["finished_at"].is_string(), "{body}");

    // The store refuses to start a final record: this is what a worker
    // that receives the message runs into.
    let store = &cluster.backends.store;
    let task_id: TaskId = id.parse().unwrap();
    let record = store.get(task_id).await.unwrap().unwrap();
    assert_eq!(
        store
            .start_attempt(&record.to_message(), "probe", Utc::now())
            .await
            .unwrap(),
        StartOutcome::AlreadyFinal(TaskState::Cancelled)
    );

    // A worker with one slot takes the normal band (the cancelled task)
    // before the low band, so once the low-priority task has run, the
    // cancelled one has been delivered and passed over.
    let (status, later) = cluster
        .submit(json!({"prompt": "run me", "priority": 1}))
        .await;
    assert_eq!(status, 202, "{later}");
    cluster.add_pool().await;
    let done = cluster
        .wait_final(later["id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");

    let (_, after) = cluster.get(&id).await;
    assert_eq!(after["state"], "cancelled", "{after}");
    assert_eq!(
        after["attempts"], 0,
        "a cancelled task never starts: {after}"
    );
    assert!(after.get("started_at").is_none(), "{after}");
    assert!(after.get("worker_id").is_none(), "{after}");

    let (status, body) = cancel(&cluster, &id).await;
    assert_eq!(status, 409, "{body}");
    cluster.stop().await;
}

async fn cancelling_a_running_task_stops_its_processes(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // Prompts starting with "hang" write their pid and sleep far longer
    // than the test; anything else is echoed back.
    let script = format!(
        r#"p=$(cat); case "$p" in hang*) echo $$ > "{}"; exec sleep 600;; esac; printf %s "$p""#,
        pids.display()
    );
    let cluster = TestCluster::start(kind, |s| {
        s.worker.executor = Some(ExecutorKind::Command);
        s.worker.command = vec!["sh".into(), "-c".into(), script];
    })
    .await;

    let task = cluster.submit_prompt("hang until cancelled").await;
    let id = task["id"].as_str().unwrap().to_owned();
    let pid = wait_for_pid(&pids).await;
    // The start is recorded once the attempt has run for
    // `record_start_after_ms`.
    let running = wait_record(&cluster, &id, "the task recorded as running", |r| {
        r["state"] == "running"
    })
    .await;
    assert_eq!(running["attempts"], 1, "{running}");
    assert!(process_alive(pid), "the task's process runs");

    let cancelled_at = Instant::now();
    let (status, body) = cancel(&cluster, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "cancelled");

    // The worker notices and kills the process group.
    let deadline = Instant::now() + WAIT;
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still runs after the cancel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{kind:?}: the cancelled task's process was gone {:?} after the cancel",
        cancelled_at.elapsed()
    );

    // The attempt is closed as cancelled; the record stays cancelled.
    let record = wait_record(&cluster, &id, "the cancelled attempt closed", |r| {
        r["attempt_history"][0]["finished_at"].is_string()
    })
    .await;
    assert_eq!(record["state"], "cancelled", "{record}");
    assert_eq!(record["attempts"], 1, "{record}");
    let attempt = &record["attempt_history"][0];
    assert_eq!(attempt["outcome"], "cancelled", "{record}");
    assert_eq!(attempt["error"]["code"], "cancelled", "{record}");
    assert_eq!(
        record["duplicate_executions"].as_u64().unwrap_or(0),
        0,
        "stopping the attempt is not a second execution: {record}"
    );
    assert!(record.get("result").is_none(), "{record}");

    // The worker's slot is free again and the pool carries on.
    let next = cluster.submit_prompt("after the cancel").await;
    let done = cluster.wait_final(next["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["output"], "after the cancel");
    let (_, again) = cluster.get(&id).await;
    assert_eq!(
        again["attempts"], 1,
        "the cancelled task came back: {again}"
    );

    let (status, body) = cancel(&cluster, &id).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "already_final", "{body}");
    cluster.stop().await;
}

async fn wait_for_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts
/// as gone: it runs nothing).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The task's record, once `done` holds for it.
async fn wait_record(
    cluster: &TestCluster,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, || async {
        let (_, record) = cluster.get(id).await;
        done(&record).then_some(record)
    })
    .await
}
