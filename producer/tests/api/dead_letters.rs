//! The dead letters: list, replay (and its refusals), delete.

use axum::body::Bytes;
use chrono::{Duration as ChronoDuration, Utc};
use claudecluster_engine::TaskState;
use claudecluster_engine::task::{NewTask, TaskMessage};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, json, spawn_app};
use crate::schema::assert_valid;

/// A valid task message created `age` ago.
fn message(prompt: &str, age: ChronoDuration, app: &TestApp) -> TaskMessage {
    NewTask {
        prompt: prompt.into(),
        ..NewTask::default()
    }
    .into_message(&app.settings.tasks, Utc::now() - age)
    .unwrap()
}

/// Dead-letters `payload` the way a worker does, and returns its seq.
async fn dead_letter(app: &TestApp, task: Option<&TaskMessage>, payload: Bytes) -> u64 {
    app.backends
        .consumer
        .dead_letter(task.map(|t| t.id), &payload, "executor_not_found")
        .await
        .unwrap();
    let query = task.map_or(String::new(), |t| format!("task_id={}", t.id));
    let page = json(app.dead_letters(&query).await).await;
    page["dead_letters"].as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn an_old_dead_letter_is_replayed_onto_the_queue() {
    let app = spawn_app().await;
    let msg = message("replay me", ChronoDuration::hours(1), &app);
    let payload = Bytes::from(serde_json::to_vec(&msg).unwrap());
    let seq = dead_letter(&app, Some(&msg), payload).await;

    let page = json(app.dead_letters(&format!("task_id={}", msg.id)).await).await;
    let listed = &page["dead_letters"][0];
    assert_eq!(listed["task_id"], msg.id.to_string());
    assert_eq!(listed["reason"], "executor_not_found");
    assert_eq!(
        listed["payload"]["prompt"], "replay me",
        "payload shown as JSON"
    );

    let response = app.replay(seq).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body = json(response).await;
    assert_valid("task-record", &body["task"]);
    assert_eq!(body["task"]["state"], "queued");
    assert_eq!(body["dead_letter_removed"], true);

    let record = app.backends.store.get(msg.id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Queued);
    let published = app.receive().await;
    assert_eq!(published["id"], msg.id.to_string());
    let page = json(app.dead_letters(&format!("task_id={}", msg.id)).await).await;
    assert!(page["dead_letters"].as_array().unwrap().is_empty());
}

/// A replay soon after the task's first publish still reaches the queue: it
/// goes out under a message id of its own, which the duplicate window of the
/// first publish does not cover.
#[tokio::test]
async fn a_fresh_dead_letter_is_replayed_at_once() {
    let app = spawn_app().await;
    let msg = message("fresh", ChronoDuration::zero(), &app);
    // The first publish, as the intake made it; a worker took it off the
    // queue and dead-lettered it.
    app.backends.publisher.publish(&msg).await.unwrap();
    assert_eq!(app.receive().await["id"], msg.id.to_string());
    let seq = dead_letter(
        &app,
        Some(&msg),
        Bytes::from(serde_json::to_vec(&msg).unwrap()),
    )
    .await;

    let response = app.replay(seq).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(app.receive().await["id"], msg.id.to_string());
    let record = app.backends.store.get(msg.id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Queued);
}

#[tokio::test]
async fn an_unreadable_dead_letter_can_be_listed_and_deleted_not_replayed() {
    let app = spawn_app().await;
    let seq = dead_letter(&app, None, Bytes::from_static(b"not json \xff")).await;

    let page = json(app.dead_letters("").await).await;
    let listed = &page["dead_letters"][0];
    assert_eq!(listed["seq"], seq);
    assert!(listed["task_id"].is_null());
    assert!(listed["payload"].as_str().unwrap().starts_with("not json"));

    let response = app.replay(seq).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["code"], "unreplayable");

    assert_eq!(
        app.delete_dead_letter(seq).await.status(),
        StatusCode::NO_CONTENT
    );
    let response = app.delete_dead_letter(seq).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_valid("error", &json(response).await);
    let response = app.replay(seq).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn dead_letters_paginate_oldest_first() {
    let app = spawn_app().await;
    let mut seqs = Vec::new();
    for n in 0..3 {
        let payload = Bytes::from(format!("{{\"n\": {n}}}"));
        seqs.push(dead_letter(&app, None, payload).await);
    }
    let page = json(app.dead_letters("limit=2").await).await;
    let first: Vec<u64> = page["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(first, seqs[..2]);
    let after = page["next_after"].as_u64().unwrap();
    let page = json(app.dead_letters(&format!("limit=2&after={after}")).await).await;
    let rest: Vec<&Value> = page["dead_letters"].as_array().unwrap().iter().collect();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["seq"], seqs[2]);
    assert_eq!(rest[0]["payload"]["n"], 2);
    assert!(page.get("next_after").is_none());
}
