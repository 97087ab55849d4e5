//! `wait_for_task`'s loop driven step by step, and a blocking wait across
//! the intake's graceful shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use claudecluster_engine::config::Settings;
use claudecluster_engine::results::AttemptEnd;
use claudecluster_engine::task::{NewTask, TaskResult};
use claudecluster_engine::{TaskRecord, TaskState};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Fixture;
use crate::mcp::wait::{self, NoProgress, Progress, Waited};
use crate::service::ServiceError;

/// Progress that hands every report to the test.
struct Recorder(mpsc::UnboundedSender<(u32, TaskState, String)>);

impl Progress for Recorder {
    async fn report(&self, step: u32, record: &TaskRecord) {
        let _ = self.0.send((step, record.state, wait::describe(record)));
    }
}

#[tokio::test]
async fn a_wait_reports_each_state_and_returns_the_result() {
    let fixture = Fixture::new(|_| {});
    let record = fixture.queued("follow me").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let service = fixture.service().clone();
    let id = record.id;
    let waiting = tokio::spawn(async move {
        wait::wait_for(
            &service,
            id,
            Duration::from_secs(60),
            &Recorder(tx),
            &CancellationToken::new(),
            &CancellationToken::new(),
        )
        .await
    });

    // Each transition happens only after the wait reported the one before,
    // so no state can be skipped between two reads.
    assert_eq!(rx.recv().await.unwrap().1, TaskState::Queued);
    let store = &fixture.backends().store;
    store
        .start_attempt(&record.to_message(), "worker-7", Utc::now())
        .await
        .unwrap();
    let (step, state, message) = rx.recv().await.unwrap();
    assert_eq!((step, state), (2, TaskState::Running));
    assert_eq!(message, "running (attempt 1 of 3) on worker-7");
    let end = AttemptEnd {
        state: TaskState::Succeeded,
        result: Some(TaskResult {
            output: "done".into(),
            executor: "echo".into(),
            ..TaskResult::default()
        }),
        error: None,
        at: Utc::now(),
    };
    store.end_attempt(id, 1, &end).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().0, 3);

    match waiting.await.unwrap().unwrap() {
        Waited::Finished(done) => {
            assert_eq!(done.state, TaskState::Succeeded);
            assert_eq!(done.result.unwrap().output, "done");
        }
        other => panic!("{other:?}"),
    }
    assert!(rx.recv().await.is_none(), "no report after the final state");
}

#[tokio::test(start_paused = true)]
async fn a_wait_ends_after_its_limit_with_the_task_as_it_is() {
    let fixture = Fixture::new(|_| {});
    let record = fixture.queued("nobody runs me").await;
    let reports = Arc::new(Mutex::new(0));
    struct Count(Arc<Mutex<u32>>);
    impl Progress for Count {
        async fn report(&self, _: u32, _: &TaskRecord) {
            *self.0.lock().unwrap() += 1;
        }
    }
    let started = tokio::time::Instant::now();
    let waited = wait::wait_for(
        fixture.service(),
        record.id,
        Duration::from_secs(600),
        &Count(reports.clone()),
        &CancellationToken::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(matches!(waited, Waited::NotYet(r) if r.state == TaskState::Queued));
    assert!(started.elapsed() >= Duration::from_secs(600));
    assert_eq!(*reports.lock().unwrap(), 1, "one report: nothing changed");
}

#[tokio::test]
async fn cancelling_or_stopping_ends_a_wait_at_once() {
    let fixture = Fixture::new(|_| {});
    let record = fixture.queued("wait on me").await;
    for stop in [false, true] {
        let cancel = CancellationToken::new();
        let stopping = CancellationToken::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let service = fixture.service().clone();
        let (c, s) = (cancel.clone(), stopping.clone());
        let waiting = tokio::spawn(async move {
            wait::wait_for(
                &service,
                record.id,
                Duration::from_secs(600),
                &Recorder(tx),
                &c,
                &s,
            )
            .await
        });
        rx.recv().await.unwrap();
        if stop {
            stopping.cancel();
        } else {
            cancel.cancel();
        }
        let waited = waiting.await.unwrap().unwrap();
        if stop {
            assert!(matches!(waited, Waited::NotYet(r) if r.id == record.id));
        } else {
            assert_eq!(waited, Waited::Cancelled);
        }
    }
}

#[tokio::test]
async fn waiting_on_an_unknown_task_says_so() {
    let fixture = Fixture::new(|_| {});
    let id = uuid::Uuid::now_v7();
    let err = wait::wait_for(
        fixture.service(),
        id,
        Duration::from_secs(1),
        &NoProgress,
        &CancellationToken::new(),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ServiceError::TaskNotFound(unknown) if unknown == id));
}

#[tokio::test]
async fn shutdown_answers_a_blocking_wait_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.embedded.data_dir = Some(dir.path().to_path_buf());
    let backends = claudecluster_engine::embedded::open_embedded(&settings).unwrap();
    let app = crate::Application::build(settings, backends).await.unwrap();
    let url = format!("http://127.0.0.1:{}/mcp", app.port());
    let record = app
        .state()
        .service()
        .submit(NewTask {
            prompt: "nobody runs me".into(),
            ..NewTask::default()
        })
        .await
        .unwrap()
        .record;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {
            "name": "wait_for_task",
            "arguments": {"id": record.id, "max_wait_secs": 600},
            "_meta": {"progressToken": "p"}
        }
    });
    let mut response = reqwest::Client::new()
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    // Read until the wait has reported the task queued: it is blocking now.
    while !seen.contains("notifications/progress") {
        let chunk = response
            .chunk()
            .await
            .unwrap()
            .expect("the wait is streaming");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    shutdown.cancel();
    while let Some(chunk) = response.chunk().await.unwrap() {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let answer: Value = seen
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .find(|m: &Value| m["id"] == 1)
        .expect("the wait answered");
    assert_eq!(answer["result"]["structuredContent"]["state"], "queued");
    assert_eq!(answer["result"]["isError"], false);
    server.await.unwrap().unwrap();
}
