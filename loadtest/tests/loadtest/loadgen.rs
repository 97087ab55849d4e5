//! The load generator against an in-process intake and worker pool: every
//! task it submits is accepted, observed and succeeds, in both loops, with
//! single and batch submits, observing through Redis and over HTTP.

use std::sync::Arc;
use std::time::Duration;

use claudecluster_engine::task::NewTask;
use claudecluster_loadtest::api::SubmitApi;
use claudecluster_loadtest::drive::{self, Load, RunConfig, RunError};
use claudecluster_loadtest::http::Endpoint;
use claudecluster_loadtest::observe::ObserveMode;
use claudecluster_loadtest::report::Report;

use crate::helpers::{TestSystem, spawn_system};

async fn run(
    system: &TestSystem,
    api: SubmitApi,
    load: Load,
    observe: ObserveMode,
    max_backlog: Option<u64>,
) -> Report {
    let config = RunConfig {
        label: "smoke".into(),
        endpoint: Arc::new(Endpoint::resolve(&system.url).await.unwrap()),
        api,
        task: NewTask {
            prompt: "smoke".into(),
            priority: Some(5),
            ..NewTask::default()
        },
        load,
        max_duration: Duration::from_secs(60),
        max_backlog,
        drain_timeout: Duration::from_secs(60),
        observe,
        progress: false,
        watch: Vec::new(),
    };
    drive::run(config).await.unwrap()
}

fn redis(system: &TestSystem) -> ObserveMode {
    ObserveMode::Redis {
        url: system.settings.redis_url().to_owned(),
        key_prefix: system.settings.redis.key_prefix.clone(),
    }
}

fn assert_all_succeeded(report: &Report, tasks: u64) {
    assert!(report.all_succeeded(), "{}", report.table());
    assert_eq!(report.tasks.requested, tasks);
    assert_eq!(report.tasks.finished, tasks);
    assert_eq!(report.tasks.unfinished, 0);
    assert_eq!(report.latency.end_to_end.count, tasks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_single_submits_all_succeed() {
    let system = spawn_system(16).await;
    let report = run(
        &system,
        SubmitApi::Single,
        Load::Closed {
            count: 200,
            concurrency: 8,
        },
        redis(&system),
        None,
    )
    .await;
    assert_all_succeeded(&report, 200);
    assert_eq!(report.requests, 200);
    assert_eq!(report.latency.submit.count, 200);
    // Every task was seen running before it finished.
    assert_eq!(report.latency.queue_wait.count, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_batch_submits_all_succeed() {
    let system = spawn_system(16).await;
    let report = run(
        &system,
        SubmitApi::Batch { size: 30 },
        Load::Closed {
            count: 250,
            concurrency: 2,
        },
        redis(&system),
        // Smaller than two batches: senders take turns waiting for the
        // workers, and every task still gets through.
        Some(40),
    )
    .await;
    assert_all_succeeded(&report, 250);
    // 8 full batches and one of 10.
    assert_eq!(report.requests, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_observed_over_http_all_succeed() {
    let system = spawn_system(16).await;
    let report = run(
        &system,
        SubmitApi::Single,
        Load::Open {
            rate_per_s: 200.0,
            duration: Duration::from_secs(1),
            max_in_flight: 64,
        },
        ObserveMode::Http,
        None,
    )
    .await;
    assert_all_succeeded(&report, 200);
    assert_eq!(report.observe, "http");
}

#[tokio::test]
async fn an_unreachable_intake_is_an_error_not_a_report() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let config = RunConfig {
        label: "unreachable".into(),
        endpoint: Arc::new(Endpoint::resolve(&url).await.unwrap()),
        api: SubmitApi::Single,
        task: NewTask::default(),
        load: Load::Closed {
            count: 1,
            concurrency: 1,
        },
        max_duration: Duration::from_secs(5),
        max_backlog: None,
        drain_timeout: Duration::from_secs(1),
        observe: ObserveMode::None,
        progress: false,
        watch: Vec::new(),
    };
    assert!(matches!(
        drive::run(config).await,
        Err(RunError::Unreachable(_))
    ));
}
