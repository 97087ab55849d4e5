//! The worker runtime against the real NATS JetStream and Redis: what a
//! user sees in the task records and the dead letters.

mod helpers;
mod http;
mod limits;

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use claudecluster_engine::task::{NewTask, TaskState};
use helpers::{World, eventually, scratch};

#[tokio::test]
async fn a_task_runs_and_its_record_reaches_succeeded() {
    let world = World::new("wrun", |_| {}).await;
    let pool = world.start_echo_pool();
    let msg = world.submit_prompt("hello worker").await;

    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::Succeeded);
    let result = record.result.expect("a result");
    assert_eq!(result.output, "hello worker");
    assert_eq!(result.executor, "echo");
    assert_eq!(record.attempts, 1);
    assert_eq!(record.attempt_history.len(), 1);
    assert_eq!(
        record.attempt_history[0].outcome,
        Some(TaskState::Succeeded)
    );
    assert_eq!(record.worker_id.as_deref(), Some(pool.status.worker_id()));
    pool.stop().await;
}

#[tokio::test]
async fn a_retryable_failure_is_retried_and_then_succeeds() {
    let world = World::new("wretry", |_| {}).await;
    let dir = scratch();
    let count = dir.path().join("count");
    // The first attempt kills itself (retryable), the second succeeds.
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; \
         if [ $n -lt 2 ]; then kill -9 $$; fi; cat",
        c = count.display()
    );
    let pool = world.start_pool(world.command_settings(&["/bin/sh", "-c", &script]));
    let msg = world.submit_prompt("second time lucky").await;

    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    assert_eq!(record.result.unwrap().output, "second time lucky");
    assert_eq!(record.attempts, 2);
    let first = &record.attempt_history[0];
    assert_eq!(first.outcome, Some(TaskState::Queued));
    assert_eq!(first.error.as_ref().unwrap().code, "killed_by_signal");
    assert_eq!(
        record.attempt_history[1].outcome,
        Some(TaskState::Succeeded)
    );
    pool.stop().await;
}

#[tokio::test]
async fn exhausted_attempts_dead_letter_the_task() {
    let world = World::new("wexhaust", |_| {}).await;
    let pool = world.start_pool(world.command_settings(&["/bin/sh", "-c", "kill -9 $$"]));
    let msg = world
        .submit(NewTask {
            prompt: "doomed".into(),
            max_attempts: Some(2),
            ..NewTask::default()
        })
        .await;

    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::DeadLettered);
    assert_eq!(record.attempts, 2);
    assert_eq!(record.error.unwrap().code, "killed_by_signal");
    let letters = world.dead_letters(1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].task_id, Some(msg.id));
    assert!(
        letters[0].reason.starts_with("killed_by_signal: "),
        "{}",
        letters[0].reason
    );
    pool.stop().await;
}

#[tokio::test]
async fn a_task_whose_workers_crashed_is_quarantined() {
    let world = World::new("wcrash", |_| {}).await;
    let msg = world
        .submit(NewTask {
            prompt: "poison".into(),
            max_attempts: Some(2),
            ..NewTask::default()
        })
        .await;
    // Two workers started it and died before recording anything.
    for _ in 0..2 {
        world
            .backends
            .store
            .start_attempt(&msg, "crashed-worker", Utc::now())
            .await
            .unwrap();
    }
    let dir = scratch();
    let ran = dir.path().join("ran");
    let script = format!("touch {}; cat", ran.display());
    let pool = world.start_pool(world.command_settings(&["/bin/sh", "-c", &script]));

    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::DeadLettered);
    let error = record.error.unwrap();
    assert_eq!(error.code, "attempts_exhausted");
    assert_eq!(error.message, "worker crashed 2 times");
    let letters = world.dead_letters(1).await;
    assert_eq!(
        letters[0].reason,
        "attempts_exhausted: worker crashed 2 times"
    );
    assert!(!ran.exists(), "a quarantined task must not run");
    pool.stop().await;
}

#[tokio::test]
async fn bad_messages_are_dead_lettered_and_the_worker_keeps_going() {
    let world = World::new("wbad", |s| s.worker.max_message_bytes = 4096).await;
    let pool = world.start_echo_pool();
    let id = uuid::Uuid::now_v7();
    let now = Utc::now().to_rfc3339();

    world.publish_raw("{this is not json").await;
    world
        .publish_raw(format!(
            r#"{{"schema_version":1,"id":"{}","prompt":"x","priority":"high","created_at":"{now}"}}"#,
            uuid::Uuid::now_v7()
        ))
        .await;
    world
        .publish_raw(format!(
            r#"{{"schema_version":1,"id":"{id}","prompt":"x","priority":11,"created_at":"{now}"}}"#
        ))
        .await;
    world
        .publish_raw(format!(
            r#"{{"schema_version":1,"id":"{}","prompt":"{}","created_at":"{now}"}}"#,
            uuid::Uuid::now_v7(),
            "y".repeat(5000)
        ))
        .await;
    let good = world.submit_prompt("still here").await;

    assert_eq!(
        world.final_record(good.id).await.state,
        TaskState::Succeeded
    );
    let letters = world.dead_letters(4).await;
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    let has = |prefix: &str| reasons.iter().any(|r| r.starts_with(prefix));
    assert!(has("invalid_json: "), "{reasons:?}");
    assert!(has("invalid_task: priority: invalid type"), "{reasons:?}");
    assert!(
        has("invalid_task: priority: must be between 1 and 10"),
        "{reasons:?}"
    );
    assert!(has("too_large: "), "{reasons:?}");

    // The rule-breaking task had an id: its record says why.
    let record = world.final_record(id).await;
    assert_eq!(record.state, TaskState::DeadLettered);
    assert_eq!(record.error.unwrap().code, "invalid_task");
    pool.stop().await;
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let world = World::new("wtimeout", |_| {}).await;
    let dir = scratch();
    let pid_file = dir.path().join("grandchild");
    // The grandchild outlives its parent's exec unless the group is killed.
    let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
    let pool = world.start_pool(world.command_settings(&["/bin/sh", "-c", &script]));
    let msg = world
        .submit(NewTask {
            prompt: "slow".into(),
            timeout_ms: Some(500),
            ..NewTask::default()
        })
        .await;

    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::TimedOut);
    let error = record.error.unwrap();
    assert_eq!(error.code, "timeout");
    assert!(error.message.contains("500 ms"), "{}", error.message);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually("the grandchild sleep to be gone", || async {
        // Gone, or a zombie waiting for a reaper: either way not running.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Some(()),
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|state| *state == "Z")
                .map(|_| ()),
        }
    })
    .await;
    pool.stop().await;
}

#[tokio::test]
async fn a_long_task_keeps_its_lease_and_is_not_redelivered() {
    let world = World::new("wlease", |s| s.nats.ack_wait_ms = 1_000).await;
    let pool = world.start_pool(world.command_settings(&["/bin/sh", "-c", "sleep 3; cat"]));
    let msg = world.submit_prompt("patience").await;

    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(record.attempts, 1, "{:?}", record.attempt_history);
    assert_eq!(record.duplicate_executions, 0);
    pool.stop().await;
}

#[tokio::test]
async fn two_pools_share_the_work_and_every_task_runs_once() {
    let world = World::new("wshare", |_| {}).await;
    let dir = scratch();
    let log = dir.path().join("runs");
    let script = format!(
        "echo $CLAUDECLUSTER_TASK_ID >> {}; sleep 0.1; cat",
        log.display()
    );
    let mut a = world.command_settings(&["/bin/sh", "-c", &script]);
    a.worker.id = Some("pool-a".into());
    let mut b = a.clone();
    b.worker.id = Some("pool-b".into());
    let pool_a = world.start_pool(a);
    let pool_b = world.start_pool(b);

    let mut ids = Vec::new();
    for i in 0..24 {
        ids.push(world.submit_prompt(&format!("task {i}")).await.id);
    }
    let mut workers = HashSet::new();
    for id in &ids {
        let record = world.final_record(*id).await;
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.attempts, 1);
        assert_eq!(record.duplicate_executions, 0);
        workers.insert(record.worker_id.unwrap());
    }
    assert_eq!(
        workers,
        HashSet::from(["pool-a".to_owned(), "pool-b".to_owned()])
    );
    let runs = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        runs.lines().count(),
        ids.len(),
        "each task ran exactly once"
    );
    pool_a.stop().await;
    pool_b.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_hands_unfinished_tasks_to_another_pool() {
    let world = World::new("wdrain", |_| {}).await;
    let mut slow = world.command_settings(&["/bin/sh", "-c", "sleep 300; cat"]);
    slow.worker.shutdown_grace_ms = 200;
    slow.worker.id = Some("stopping".into());
    let stopping = world.start_pool(slow);
    let first = world.submit_prompt("one").await;
    let second = world.submit_prompt("two").await;
    eventually("both tasks to be running", || async {
        (stopping.status.in_flight() == 2).then_some(())
    })
    .await;

    stopping.stop().await;
    for id in [first.id, second.id] {
        let record = world.record(id).await;
        assert_eq!(record.state, TaskState::Queued, "{record:?}");
        assert_eq!(
            record.attempt_history[0].error.as_ref().unwrap().code,
            "worker_shutdown"
        );
    }

    let taking_over = world.start_echo_pool();
    for (msg, prompt) in [(first, "one"), (second, "two")] {
        let record = world.final_record(msg.id).await;
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.result.unwrap().output, prompt);
        assert_eq!(record.attempts, 2);
    }
    taking_over.stop().await;
}

#[tokio::test]
async fn a_hand_back_does_not_use_up_the_last_attempt() {
    let world = World::new("whandback", |_| {}).await;
    let mut slow = world.command_settings(&["/bin/sh", "-c", "sleep 300; cat"]);
    slow.worker.shutdown_grace_ms = 100;
    let stopping = world.start_pool(slow);
    let msg = world
        .submit(NewTask {
            prompt: "only one try".into(),
            max_attempts: Some(1),
            ..NewTask::default()
        })
        .await;
    eventually("the task to be running", || async {
        (stopping.status.in_flight() == 1).then_some(())
    })
    .await;
    stopping.stop().await;

    let taking_over = world.start_echo_pool();
    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    taking_over.stop().await;
}

#[tokio::test]
async fn the_concurrency_limit_is_respected() {
    let world = World::new("wlimit", |s| s.worker.concurrency = 3).await;
    let dir = scratch();
    let running = dir.path().join("running");
    std::fs::create_dir(&running).unwrap();
    let seen = dir.path().join("seen");
    // Each task announces itself, waits until three are running (or gives up
    // after ten seconds), notes how many it saw, and leaves.
    let script = format!(
        "touch {r}/$CLAUDECLUSTER_TASK_ID; i=0; \
         while [ $(ls {r} | wc -l) -lt 3 ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done; \
         ls {r} | wc -l >> {s}; sleep 0.2; rm {r}/$CLAUDECLUSTER_TASK_ID; cat",
        r = running.display(),
        s = seen.display()
    );
    let pool = world.start_pool(world.command_settings(&["/bin/sh", "-c", &script]));
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(world.submit_prompt(&format!("t{i}")).await.id);
    }
    for id in ids {
        assert_eq!(world.final_record(id).await.state, TaskState::Succeeded);
    }
    let counts: Vec<usize> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 9);
    assert_eq!(counts.iter().max(), Some(&3), "{counts:?}");
    pool.stop().await;
}

#[tokio::test]
async fn the_heartbeat_appears_and_goes_away_at_shutdown() {
    let world = World::new("wbeat", |s| s.worker.id = Some("beating".into())).await;
    let pool = world.start_echo_pool();
    let info = eventually("the heartbeat", || async {
        world
            .backends
            .store
            .workers()
            .await
            .unwrap()
            .into_iter()
            .find(|w| w.id == "beating")
    })
    .await;
    assert_eq!(info.executor, "echo");
    assert_eq!(info.concurrency, 4);
    assert_eq!(info.in_flight, 0);

    pool.stop().await;
    let workers = world.backends.store.workers().await.unwrap();
    assert!(workers.iter().all(|w| w.id != "beating"), "{workers:?}");
}

#[tokio::test]
async fn a_pool_with_nothing_to_do_stops_promptly() {
    // A grace period far longer than the bound below: stopping must not
    // wait for it when nothing runs.
    let world = World::new("widle", |s| s.worker.shutdown_grace_ms = 600_000).await;
    let pool = world.start_echo_pool();
    eventually("the pool to announce itself", || async {
        let workers = world.backends.store.workers().await.unwrap();
        (!workers.is_empty()).then_some(())
    })
    .await;
    tokio::time::timeout(Duration::from_secs(60), pool.stop())
        .await
        .expect("an idle pool stops without waiting for its grace period");
}
