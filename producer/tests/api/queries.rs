//! Reading and cancelling: get, list with pagination and state filter,
//! cancel and its conflict.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{json, spawn_app};
use crate::schema::assert_valid;

#[tokio::test]
async fn an_unknown_task_is_404_and_a_malformed_id_400() {
    let app = spawn_app().await;
    let response = app.get_task(&uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["code"], "not_found");

    let response = app.get_task("12345").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["field"], "id");
}

#[tokio::test]
async fn lists_are_newest_first_and_paginate() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let body = json(app.submit(&json!({"prompt": format!("task {n}")})).await).await;
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids.reverse(); // newest first

    let mut seen = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let response = app.list_tasks(&query).await;
        assert_eq!(response.status(), StatusCode::OK);
        let page = json(response).await;
        for t in page["tasks"].as_array().unwrap() {
            assert_valid("task-record", t);
            seen.push(t["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("limit=2&cursor={cursor}"),
            None => break,
        }
        assert!(seen.len() <= 5, "pagination does not end");
    }
    assert_eq!(seen, ids);

    // Filter by state.
    let cancelled = app.cancel(&ids[1]).await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    let page = json(app.list_tasks("state=cancelled").await).await;
    let only: Vec<&Value> = page["tasks"].as_array().unwrap().iter().collect();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["id"], ids[1].as_str());
    let page = json(app.list_tasks("state=queued&limit=50").await).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn a_bogus_cursor_is_a_400() {
    let app = spawn_app().await;
    let response = app.list_tasks("cursor=not-a-cursor").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["field"], "cursor");
}

#[tokio::test]
async fn cancel_then_cancel_again_is_a_conflict() {
    let app = spawn_app().await;
    let task = json(app.submit(&json!({"prompt": "stop me"})).await).await;
    let id = task["id"].as_str().unwrap();

    let response = app.cancel(id).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    assert_valid("task-record", &body);
    assert_eq!(body["state"], "cancelled");
    assert!(body["finished_at"].is_string());

    let response = app.cancel(id).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body = json(response).await;
    assert_valid("error", &body);
    assert_eq!(body["error"]["code"], "already_final");
    assert_eq!(body["error"]["state"], "cancelled");
    assert_valid("task-record", &body["task"]);

    let response = app.cancel(&uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_valid("error", &json(response).await);
}
