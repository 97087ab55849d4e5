//! Resource limits for real: programs that allocate, write or spin too
//! much fail with an error naming the limit they broke.

use std::time::Duration;

use claudecluster_consumer::executor::command::CommandExecutor;
use claudecluster_consumer::executor::{ExecContext, ExecError, Executor};
use claudecluster_consumer::launcher;
use claudecluster_engine::config::ResourceLimits;
use claudecluster_engine::task::{NewTask, TaskState};
use tokio_util::sync::CancellationToken;

use crate::helpers::{World, scratch};

const NO_LIMITS: ResourceLimits = ResourceLimits {
    max_memory_mb: None,
    max_cpu_cores: None,
    disk_quota_mb: None,
};

/// Runs `script` under `limits` and returns the error code it failed with.
async fn failure_code(script: &str, limits: ResourceLimits) -> String {
    launcher::set_program(env!("CARGO_BIN_EXE_claudecluster-consumer"));
    let dir = scratch();
    let ctx = ExecContext {
        work_dir: dir.path().to_path_buf(),
        timeout: Duration::from_secs(20),
        cancel: CancellationToken::new(),
        limits,
        max_output_bytes: 64 * 1024,
    };
    let task = NewTask {
        prompt: "limits".into(),
        ..NewTask::default()
    }
    .into_message(&Default::default(), chrono::Utc::now())
    .unwrap();
    let exec = CommandExecutor::new(&["/bin/sh".into(), "-c".into(), script.into()]).unwrap();
    match exec.run(&task, &ctx).await {
        Err(ExecError::Permanent { error, .. } | ExecError::Retryable { error, .. }) => error.code,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn one_process_allocating_too_much_hits_the_memory_limit() {
    let limits = ResourceLimits {
        max_memory_mb: Some(64),
        ..NO_LIMITS
    };
    // tail keeps a line without newlines in memory: 300 MB of it.
    let code = failure_code("head -c 300000000 /dev/zero | tail > /dev/null", limits).await;
    assert_eq!(code, "memory_limit");
}

#[tokio::test]
async fn a_process_tree_over_the_memory_limit_together_is_stopped() {
    let limits = ResourceLimits {
        max_memory_mb: Some(64),
        ..NO_LIMITS
    };
    // Each process stays under the limit; the two together do not.
    let hog = "(head -c 40000000 /dev/zero; sleep 30) | tail > /dev/null";
    let code = failure_code(&format!("{hog} & {hog} & wait"), limits).await;
    assert_eq!(code, "memory_limit");
}

#[tokio::test]
async fn one_big_file_hits_the_disk_quota() {
    let limits = ResourceLimits {
        disk_quota_mb: Some(10),
        ..NO_LIMITS
    };
    let code = failure_code("dd if=/dev/zero of=big bs=1M count=50 2>/dev/null", limits).await;
    assert_eq!(code, "disk_quota");
}

#[tokio::test]
async fn many_small_files_hit_the_disk_quota() {
    let limits = ResourceLimits {
        disk_quota_mb: Some(10),
        ..NO_LIMITS
    };
    let script = "for i in $(seq 1 40); do head -c 1000000 /dev/zero > f$i; done; sleep 30";
    assert_eq!(failure_code(script, limits).await, "disk_quota");
}

#[tokio::test]
async fn spinning_past_the_cpu_budget_hits_the_cpu_time_limit() {
    // A tenth of a core for the 20 s timeout: two CPU seconds.
    let limits = ResourceLimits {
        max_cpu_cores: Some(0.1),
        ..NO_LIMITS
    };
    assert_eq!(
        failure_code("while :; do :; done", limits).await,
        "cpu_time_limit"
    );
}

#[tokio::test]
async fn a_task_within_its_limits_is_unaffected() {
    launcher::set_program(env!("CARGO_BIN_EXE_claudecluster-consumer"));
    let dir = scratch();
    let ctx = ExecContext {
        work_dir: dir.path().to_path_buf(),
        timeout: Duration::from_secs(20),
        cancel: CancellationToken::new(),
        limits: ResourceLimits {
            max_memory_mb: Some(256),
            max_cpu_cores: Some(1.0),
            disk_quota_mb: Some(10),
        },
        max_output_bytes: 64 * 1024,
    };
    let task = NewTask {
        prompt: "fine".into(),
        ..NewTask::default()
    }
    .into_message(&Default::default(), chrono::Utc::now())
    .unwrap();
    let exec = CommandExecutor::new(&[
        "/bin/sh".into(),
        "-c".into(),
        "head -c 1000000 /dev/zero > f; cat".into(),
    ])
    .unwrap();
    let result = exec.run(&task, &ctx).await.unwrap();
    assert_eq!(result.output, "fine");
}

#[tokio::test]
async fn a_limit_failure_is_recorded_as_failed_with_the_limit_named() {
    let world = World::new("wmem", |_| {}).await;
    let mut settings =
        world.command_settings(&["/bin/sh", "-c", "head -c 300000000 /dev/zero | tail"]);
    settings.worker.limits.max_memory_mb = Some(64);
    let pool = world.start_pool(settings);
    let msg = world.submit_prompt("hungry").await;

    let record = world.final_record(msg.id).await;
    assert_eq!(record.state, TaskState::Failed);
    let error = record.error.unwrap();
    assert_eq!(error.code, "memory_limit");
    assert!(error.message.contains("64 MiB"), "{}", error.message);
    let partial = record.result.expect("the partial result is kept");
    assert!(
        partial.stderr.unwrap().contains("memory exhausted"),
        "tail's own message is kept"
    );
    pool.stop().await;
}
