//! The chaos test: three worker processes work through a couple of
//! thousand tasks while a random one is killed with SIGKILL every one to
//! two seconds and started again. Nothing may be lost: every accepted task
//! ends `succeeded` with its own output. The figures of the run (kills,
//! redeliveries, duplicate executions, final states) are printed.
//!
//! Bounded: a fixed number of tasks, a deadline for the whole run, and the
//! kill loop ends as soon as every task is final.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use claudecluster_engine::TaskRecord;
use claudecluster_engine::config::ExecutorKind;
use claudecluster_engine::task::{TaskId, TaskState};
use claudecluster_tests::{BackendKind, TestCluster};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::fleet::{Fleet, worker_env};

const TASKS: usize = 2000;
const BATCH: usize = 500;
const WORKERS: usize = 3;
/// The whole run, submit to last final record.
const DEADLINE: Duration = Duration::from_secs(50);

/// A small xorshift generator: enough randomness to pick victims and
/// pauses, seeded per run and printed so a run can be replayed.
struct Dice(u64);

impl Dice {
    fn new() -> Self {
        let seed = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
        println!("chaos seed: {seed}");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_workers_at_random_loses_no_task() {
    let cluster = TestCluster::start_intake(BackendKind::Networked, |s| {
        // Tasks of a killed worker come back after this lease.
        s.nats.ack_wait_ms = 2000;
        s.worker.executor = Some(ExecutorKind::Command);
    })
    .await;
    let mut env = worker_env(&cluster.settings);
    // Each task waits 50 ms (so kills land on running
    // tasks, at little CPU cost) and echoes its prompt.
    env.push(("TASK_COMMAND".into(), "sh -c 'sleep 0.05; cat'".into()));
    env.push(("WORKER_CONCURRENCY".into(), "4".into()));
    let mut fleet = Fleet::new("chaos", WORKERS, env).without_limits();
    fleet.start_all();
    let started = Instant::now();

    let mut ids: Vec<(TaskId, String)> = Vec::with_capacity(TASKS);
    for chunk in 0..TASKS / BATCH {
        let tasks: Vec<Value> = (0..BATCH)
            .map(|i| json!({"prompt": format!("chaos {}", chunk * BATCH + i), "max_attempts": 10}))
            .collect();
        let (status, body) = cluster.submit_batch(&tasks).await;
        assert_eq!(status, 202, "{body}");
        for record in body["tasks"].as_array().unwrap() {
            ids.push((
                record["id"].as_str().unwrap().parse().unwrap(),
                record["prompt"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(ids.len(), TASKS);

    // Kill first, then look: every run has at least one kill.
    let mut dice = Dice::new();
    let mut pending: Vec<TaskId> = ids.iter().map(|(id, _)| *id).collect();
    while !pending.is_empty() {
        assert!(
            started.elapsed() < DEADLINE,
            "{} tasks not final after {DEADLINE:?} ({} kills)\n{}",
            pending.len(),
            fleet.kills,
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(1000 + dice.below(1000))).await;
        let victim = dice.below(WORKERS as u64) as usize;
        fleet.kill(victim);
        fleet.start(victim);
        fleet.restart_dead();
        let records = read_all(&cluster, &pending).await;
        pending = records
            .into_iter()
            .filter(|r| !r.state.is_final())
            .map(|r| r.id)
            .collect();
    }
    let took = started.elapsed();
    fleet.stop();

    let all: Vec<TaskId> = ids.iter().map(|(id, _)| *id).collect();
    let records = read_all(&cluster, &all).await;
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    let mut redeliveries = 0_u64;
    let mut duplicates = 0_u64;
    let mut crashed_attempts = 0_usize;
    for record in &records {
        *states.entry(record.state.as_str()).or_default() += 1;
        redeliveries += u64::from(record.attempts.saturating_sub(1));
        duplicates += u64::from(record.duplicate_executions);
        crashed_attempts += record
            .attempt_history
            .iter()
            .filter(|a| a.outcome.is_none())
            .count();
    }
    println!(
        "chaos: {TASKS} tasks, {WORKERS} workers, {} kills in {took:.1?}; \
         redeliveries (sum of attempts - 1) {redeliveries}, attempts cut short by a kill \
         {crashed_attempts}, duplicate executions {duplicates}, final states {states:?}",
        fleet.kills
    );

    let by_id: BTreeMap<TaskId, &TaskRecord> = records.iter().map(|r| (r.id, r)).collect();
    for (id, prompt) in &ids {
        let record = by_id[id];
        assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
        let output = record.result.as_ref().map(|r| r.output.as_str());
        assert_eq!(output, Some(prompt.as_str()), "{record:?}");
    }
    assert_eq!(states.get("succeeded"), Some(&TASKS), "{states:?}");
    cluster.stop().await;
}

/// Reads every record, many at a time; a record that is missing fails the
/// test (an accepted task must never lose its record).
async fn read_all(cluster: &TestCluster, ids: &[TaskId]) -> Vec<TaskRecord> {
    let store = cluster.backends.store.clone();
    futures::stream::iter(ids.iter().copied())
        .map(|id| {
            let store = store.clone();
            async move {
                store
                    .get(id)
                    .await
                    .expect("read a record")
                    .unwrap_or_else(|| panic!("task {id} has no record"))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}
