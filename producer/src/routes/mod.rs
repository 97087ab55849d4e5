//! The HTTP API: route table, fallbacks and the request guard.
//!
//! | Route | |
//! |---|---|
//! | `POST /tasks`, `POST /tasks/batch` | submit |
//! | `GET /tasks`, `GET /tasks/{id}`, `POST /tasks/{id}/cancel` | read, cancel |
//! | `GET /dead-letters`, `POST /dead-letters/{seq}/replay`, `DELETE /dead-letters/{seq}` | operate |
//! | `GET /workers`, `GET /health`, `GET /ready`, `GET /metrics` | observe |
//! | `GET /openapi.json` | describe |
//!
//! Handlers are thin: they parse the request, call the
//! [`TaskService`](crate::service::TaskService) and shape the response.

mod dead_letters;
mod guard;
mod openapi;
mod ops;
mod tasks;
#[cfg(test)]
mod tests;

use axum::Router;
use axum::routing::{get, post};

use crate::error::ApiError;
use crate::state::AppState;

pub use openapi::document as openapi_document;
pub use tasks::IDEMPOTENT_REPLAYED;

/// Route templates, also the `route` label of the HTTP metrics.
pub mod paths {
    /// Submit one task; list tasks.
    pub const TASKS: &str = "/tasks";
    /// Submit a batch.
    pub const TASKS_BATCH: &str = "/tasks/batch";
    /// One task.
    pub const TASK: &str = "/tasks/{id}";
    /// Cancel a task.
    pub const TASK_CANCEL: &str = "/tasks/{id}/cancel";
    /// List dead letters.
    pub const DEAD_LETTERS: &str = "/dead-letters";
    /// One dead letter.
    pub const DEAD_LETTER: &str = "/dead-letters/{seq}";
    /// Replay a dead letter.
    pub const DEAD_LETTER_REPLAY: &str = "/dead-letters/{seq}/replay";
    /// Live workers.
    pub const WORKERS: &str = "/workers";
    /// Liveness.
    pub const HEALTH: &str = "/health";
    /// Readiness.
    pub const READY: &str = "/ready";
    /// Prometheus metrics.
    pub const METRICS: &str = "/metrics";
    /// The OpenAPI document.
    pub const OPENAPI: &str = "/openapi.json";

    /// Every template, for the metrics' route label.
    pub const ALL: [&str; 12] = [
        TASKS,
        TASKS_BATCH,
        TASK,
        TASK_CANCEL,
        DEAD_LETTERS,
        DEAD_LETTER,
        DEAD_LETTER_REPLAY,
        WORKERS,
        HEALTH,
        READY,
        METRICS,
        OPENAPI,
    ];
}

/// The intake's HTTP API with its guard (load shedding, request timeout,
/// metrics) and JSON 404/405 answers.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(paths::TASKS, post(tasks::submit).get(tasks::list))
        .route(paths::TASKS_BATCH, post(tasks::submit_batch))
        .route(paths::TASK, get(tasks::get))
        .route(paths::TASK_CANCEL, post(tasks::cancel))
        .route(paths::DEAD_LETTERS, get(dead_letters::list))
        .route(
            paths::DEAD_LETTER,
            axum::routing::delete(dead_letters::delete),
        )
        .route(paths::DEAD_LETTER_REPLAY, post(dead_letters::replay))
        .route(paths::WORKERS, get(ops::workers))
        .route(paths::HEALTH, get(ops::health))
        .route(paths::READY, get(ops::ready))
        .route(paths::METRICS, get(ops::metrics))
        .route(paths::OPENAPI, get(openapi::openapi))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
