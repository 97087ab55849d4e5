//! Leases with real worker processes on NATS and Redis: a worker killed
//! with SIGKILL mid-task loses its lease and another worker finishes the
//! task after the ack wait; a task that kills every worker that runs it is
//! quarantined to the dead letters instead of taking the pool down.

use std::time::{Duration, Instant};

use claudecluster_engine::config::ExecutorKind;
use claudecluster_tests::{BackendKind, TestCluster};
use serde_json::{Value, json};

use crate::fleet::{Fleet, worker_env};

const WAIT: Duration = Duration::from_secs(60);

/// The task program: prompts starting with `slow` take two seconds,
/// `poison` kills the worker process that runs it (its parent), anything
/// else is echoed back at once.
const TASK_COMMAND: &str = r#"sh -c 'p=$(cat); case "$p" in slow*) sleep 2;; poison*) kill -9 $PPID; sleep 5;; esac; printf %s "$p"'"#;

async fn cluster() -> (TestCluster, Vec<(String, String)>) {
    let cluster = TestCluster::start_intake(BackendKind::Networked, |s| {
        // A short lease, so the tasks of a dead worker come back quickly.
        s.nats.ack_wait_ms = 1500;
        s.worker.executor = Some(ExecutorKind::Command);
    })
    .await;
    let mut env = worker_env(&cluster.settings);
    env.push(("TASK_COMMAND".into(), TASK_COMMAND.into()));
    env.push(("WORKER_CONCURRENCY".into(), "2".into()));
    (cluster, env)
}

async fn get(cluster: &TestCluster, id: &str) -> Value {
    let (status, record) = cluster.get(id).await;
    assert_eq!(status, 200, "{record}");
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_its_lease_to_another() {
    let (cluster, env) = cluster().await;
    let mut fleet = Fleet::new("lease", 2, env);
    fleet.start(0);
    let task = cluster.submit_prompt("slow task").await;
    let id = task["id"].as_str().unwrap().to_owned();

    let deadline = Instant::now() + WAIT;
    loop {
        let record = get(&cluster, &id).await;
        if record["state"] == "running" {
            assert_eq!(record["worker_id"], fleet.worker_id(0));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first worker never started the task: {record}\n{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fleet.kill(0));
    fleet.start(1);

    let done = cluster.wait_final(&id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", fleet.log_tails());
    assert_eq!(done["result"]["output"], "slow task");
    assert_eq!(done["attempts"], 2, "{done}");
    let history = done["attempt_history"].as_array().unwrap();
    assert_eq!(history[0]["worker_id"], fleet.worker_id(0));
    assert!(
        history[0].get("outcome").is_none(),
        "the killed worker recorded nothing: {done}"
    );
    assert_eq!(history[1]["worker_id"], fleet.worker_id(1));
    assert_eq!(history[1]["outcome"], "succeeded");
    assert_eq!(done["worker_id"], fleet.worker_id(1));
    fleet.stop();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_workers_is_quarantined() {
    let (cluster, env) = cluster().await;
    let mut fleet = Fleet::new("poison", 2, env);
    fleet.start_all();

    let (status, poison) = cluster
        .submit(json!({"prompt": "poison pill", "max_attempts": 2}))
        .await;
    assert_eq!(status, 202, "{poison}");
    let poison_id = poison["id"].as_str().unwrap().to_owned();
    let mut others = Vec::new();
    for i in 0..6 {
        let task = cluster.submit_prompt(&format!("healthy {i}")).await;
        others.push(task["id"].as_str().unwrap().to_owned());
    }

    // Supervise like an orchestrator: restart whatever died, until every
    // task is final.
    let deadline = Instant::now() + WAIT;
    let mut pending: Vec<String> = others.iter().chain([&poison_id]).cloned().collect();
    while !pending.is_empty() {
        fleet.restart_dead();
        let mut still = Vec::new();
        for id in pending {
            let state = get(&cluster, &id).await["state"].clone();
            if state == "queued" || state == "running" {
                still.push(id);
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "tasks {pending:?} never finished\n{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let record = get(&cluster, &poison_id).await;
    assert_eq!(record["state"], "dead_lettered", "{record}");
    assert_eq!(record["error"]["code"], "attempts_exhausted", "{record}");
    assert_eq!(record["error"]["message"], "worker crashed 2 times");
    assert_eq!(fleet.deaths, 2, "the poison ran exactly twice");
    for id in &others {
        let record = get(&cluster, id).await;
        assert_eq!(record["state"], "succeeded", "{record}");
    }
    let (status, letters) = cluster
        .send(cluster.http.get(format!(
            "{}/dead-letters?task_id={poison_id}",
            cluster.base_url
        )))
        .await;
    assert_eq!(status, 200, "{letters}");
    assert_eq!(
        letters["dead_letters"][0]["reason"], "attempts_exhausted: worker crashed 2 times",
        "{letters}"
    );
    assert_eq!(
        letters["dead_letters"][0]["payload"]["prompt"],
        "poison pill"
    );
    fleet.stop();
    cluster.stop().await;
}
