//! The core pipeline over HTTP: submit, poll to a result, batches,
//! idempotency, priority under backlog, sharing work between pools, and
//! bad input. Every case runs on both backends.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use claudecluster_engine::config::ExecutorKind;
use claudecluster_tests::{BackendKind, TestCluster};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

crate::on_both_backends!(
    submit_and_poll_to_succeeded,
    batch_submit_runs_every_task,
    idempotency_key_returns_the_same_task,
    unknown_and_malformed_ids,
    bad_input_names_the_field,
    priority_overtakes_a_backlog,
    two_pools_share_the_work_once_each,
    command_failure_is_recorded,
    a_retried_submit_publishes_a_task_whose_first_publish_was_lost,
    a_dead_letter_is_replayed_right_after_its_first_publish,
);

async fn submit_and_poll_to_succeeded(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |_| {}).await;
    let resp = cluster
        .http
        .post(format!("{}/tasks", cluster.base_url))
        .json(&json!({"prompt": "hello pipeline", "priority": 7, "metadata": {"team": "qa"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let record: Value = resp.json().await.unwrap();
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/tasks/{id}"));
    assert_eq!(record["state"], "queued");
    assert_eq!(record["priority"], 7);

    let done = cluster.wait_final(&id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["output"], "hello pipeline");
    assert_eq!(done["result"]["executor"], "echo");
    assert_eq!(done["metadata"], json!({"team": "qa"}));
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["attempt_history"][0]["outcome"], "succeeded");
    assert!(
        done["worker_id"]
            .as_str()
            .unwrap()
            .starts_with("test-worker-")
    );
    for field in ["queued_at", "started_at", "finished_at"] {
        assert!(done[field].is_string(), "{field} missing: {done}");
    }
    cluster.stop().await;
}

async fn batch_submit_runs_every_task(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |_| {}).await;
    let tasks: Vec<Value> = (0..50)
        .map(|i| json!({"prompt": format!("item {i}")}))
        .collect();
    let (status, body) = cluster.submit_batch(&tasks).await;
    assert_eq!(status, 202, "{body}");
    let records = body["tasks"].as_array().unwrap();
    assert_eq!(records.len(), 50);
    let ids: HashSet<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 50, "every task gets its own id");
    for (i, r) in records.iter().enumerate() {
        let done = cluster.wait_final(r["id"].as_str().unwrap(), WAIT).await;
        assert_eq!(done["state"], "succeeded");
        assert_eq!(done["result"]["output"], format!("item {i}"));
    }
    cluster.stop().await;
}

async fn idempotency_key_returns_the_same_task(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |_| {}).await;
    let body = json!({"prompt": "only once", "idempotency_key": "order-42"});
    let (first_status, first) = cluster.submit(body.clone()).await;
    assert_eq!(first_status, 202, "{first}");
    let (second_status, second) = cluster.submit(body).await;
    assert_eq!(second_status, 200, "a replay answers 200: {second}");
    assert_eq!(first["id"], second["id"]);
    let done = cluster
        .wait_final(first["id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["attempts"], 1, "the task ran once: {done}");
    cluster.stop().await;
}

async fn unknown_and_malformed_ids(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |_| {}).await;
    let (status, body) = cluster.get(&uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = cluster.get("not-a-uuid").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "id");
    cluster.stop().await;
}

async fn bad_input_names_the_field(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |s| s.tasks.max_prompt_chars = 50).await;
    let post = |body: &'static str, content_type: &'static str| {
        cluster
            .http
            .post(format!("{}/tasks", cluster.base_url))
            .header("content-type", content_type)
            .body(body)
    };
    let cases: [(&str, &str, u16, &str, Option<&str>); 8] = [
        (
            "{\"prompt\": ",
            "application/json",
            400,
            "invalid_json",
            None,
        ),
        (
            "{\"prompt\": 5}",
            "application/json",
            422,
            "invalid_field",
            Some("prompt"),
        ),
        (
            "{\"prompt\": \"a\", \"prio\": 1}",
            "application/json",
            422,
            "unknown_field",
            Some("prio"),
        ),
        (
            "{\"prompt\": \"a\", \"priority\": 11}",
            "application/json",
            422,
            "invalid_field",
            Some("priority"),
        ),
        (
            "{\"prompt\": \"a\", \"priority\": \"high\"}",
            "application/json",
            422,
            "invalid_field",
            Some("priority"),
        ),
        (
            "{\"prompt\": \"\"}",
            "application/json",
            422,
            "invalid_field",
            Some("prompt"),
        ),
        (
            "{\"prompt\": \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}",
            "application/json",
            413,
            "payload_too_large",
            Some("prompt"),
        ),
        (
            "{\"prompt\": \"a\"}",
            "text/plain",
            415,
            "unsupported_media_type",
            None,
        ),
    ];
    for (body, content_type, status, code, field) in cases {
        let (got_status, got) = cluster.send(post(body, content_type)).await;
        assert_eq!(got_status, status, "{body}: {got}");
        assert_eq!(got["error"]["code"], code, "{body}: {got}");
        if let Some(field) = field {
            assert_eq!(got["error"]["field"], field, "{body}: {got}");
        }
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // The intake is still healthy and nothing was enqueued.
    let (status, _) = cluster
        .send(cluster.http.get(format!("{}/health", cluster.base_url)))
        .await;
    assert_eq!(status, 200);
    let page = cluster.backends.store.list(None, None, 10).await.unwrap();
    assert!(
        page.tasks.is_empty(),
        "rejected input left records: {:?}",
        page.tasks
    );
    cluster.stop().await;
}

async fn priority_overtakes_a_backlog(kind: BackendKind) {
    let mut cluster = TestCluster::start_intake(kind, |s| s.worker.concurrency = 1).await;
    let backlog: Vec<Value> = (0..1000)
        .map(|i| json!({"prompt": format!("low {i}"), "priority": 1}))
        .collect();
    for chunk in backlog.chunks(500) {
        let (status, body) = cluster.submit_batch(chunk).await;
        assert_eq!(status, 202, "{body}");
    }
    let urgent = cluster
        .submit(json!({"prompt": "urgent", "priority": 10}))
        .await
        .1;
    cluster.add_pool().await;
    let done = cluster
        .wait_final(urgent["id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(done["state"], "succeeded");
    // When the urgent task finished, most of the backlog had not even started.
    let urgent_finish: chrono::DateTime<chrono::Utc> =
        done["finished_at"].as_str().unwrap().parse().unwrap();
    let mut low_done_before = 0;
    let mut cursor: Option<String> = None;
    loop {
        let page = cluster
            .backends
            .store
            .list(None, cursor.as_deref(), 200)
            .await
            .unwrap();
        low_done_before += page
            .tasks
            .iter()
            .filter(|t| t.priority == 1)
            .filter(|t| t.finished_at.is_some_and(|f| f < urgent_finish))
            .count();
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert!(
        low_done_before < 100,
        "{low_done_before} low-priority tasks finished before the urgent one"
    );
    cluster.stop().await;
}

async fn two_pools_share_the_work_once_each(kind: BackendKind) {
    let mut cluster = TestCluster::start(kind, |s| {
        s.worker.executor = Some(ExecutorKind::Command);
        // Slow enough that both pools get work.
        s.worker.command = vec!["sh".into(), "-c".into(), "sleep 0.05; cat".into()];
        s.worker.concurrency = 2;
    })
    .await;
    cluster.add_pool().await;
    let tasks: Vec<Value> = (0..40)
        .map(|i| json!({"prompt": format!("job {i}")}))
        .collect();
    let (status, body) = cluster.submit_batch(&tasks).await;
    assert_eq!(status, 202, "{body}");
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for r in body["tasks"].as_array().unwrap() {
        let done = cluster.wait_final(r["id"].as_str().unwrap(), WAIT).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["attempts"], 1, "ran more than once: {done}");
        assert_eq!(done["duplicate_executions"], 0);
        *by_worker
            .entry(done["worker_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        by_worker.len(),
        2,
        "both pools should have worked: {by_worker:?}"
    );
    cluster.stop().await;
}

async fn command_failure_is_recorded(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |s| {
        s.worker.executor = Some(ExecutorKind::Command);
        s.worker.command = vec!["sh".into(), "-c".into(), "echo broken >&2; exit 3".into()];
    })
    .await;
    let id = cluster.submit_prompt("fail please").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = cluster.wait_final(&id, WAIT).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "nonzero_exit");
    assert_eq!(done["result"]["exit_code"], 3);
    assert!(
        done["result"]["stderr"]
            .as_str()
            .unwrap()
            .contains("broken")
    );
    cluster.stop().await;
}

async fn a_retried_submit_publishes_a_task_whose_first_publish_was_lost(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |_| {}).await;
    // A first submit that stored its record and then lost its publish (the
    // intake crashed in between): the record is there, no message is.
    let msg = claudecluster_engine::task::NewTask {
        prompt: "stored but never published".into(),
        idempotency_key: Some("lost-publish".into()),
        ..Default::default()
    }
    .into_message(&cluster.settings.tasks, chrono::Utc::now())
    .unwrap();
    let record = claudecluster_engine::TaskRecord::queued(&msg, chrono::Utc::now());
    cluster.backends.store.create(&record).await.unwrap();

    // The client retries with its key: it gets the same task, and it runs.
    let (status, body) = cluster
        .submit(json!({"prompt": "stored but never published", "idempotency_key": "lost-publish"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], msg.id.to_string());
    let done = cluster.wait_final(&msg.id.to_string(), WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    cluster.stop().await;
}

async fn a_dead_letter_is_replayed_right_after_its_first_publish(kind: BackendKind) {
    let cluster = TestCluster::start(kind, |_| {}).await;
    let id = cluster.submit_prompt("replay me soon").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = cluster.wait_final(&id, WAIT).await;
    assert_eq!(first["state"], "succeeded");
    // An operator puts the task's message on the dead letters, seconds after
    // its first publish, well inside the broker's duplicate window.
    let msg = claudecluster_engine::TaskRecord::to_message(
        &cluster
            .backends
            .store
            .get(id.parse().unwrap())
            .await
            .unwrap()
            .unwrap(),
    );
    let payload = bytes::Bytes::from(serde_json::to_vec(&msg).unwrap());
    cluster
        .backends
        .consumer
        .dead_letter(Some(msg.id), &payload, "operator test")
        .await
        .unwrap();
    let (status, page) = cluster
        .get_path(&format!("/dead-letters?task_id={id}"))
        .await;
    assert_eq!(status, 200, "{page}");
    let seq = page["dead_letters"][0]["seq"].as_u64().unwrap();

    let (status, body) = cluster
        .post_path(&format!("/dead-letters/{seq}/replay"))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = cluster.wait_final(&id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "the replay ran the task again: {done}");
    cluster.stop().await;
}
