//! Operational endpoints: liveness, readiness, metrics and the worker list.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use claudecluster_engine::results::WorkerInfo;
use serde::Serialize;

use crate::error::ApiError;
use crate::metrics;
use crate::state::AppState;

/// How long `/ready` waits for each dependency.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a scrape waits for the queue depth before rendering without it.
const QUEUE_DEPTH_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Serialize)]
pub(super) struct Health {
    status: &'static str,
    timestamp: DateTime<Utc>,
    /// Seconds since start.
    uptime: f64,
    version: &'static str,
}

/// `GET /health`: the process is up (no dependency is checked).
pub(super) async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "healthy",
        timestamp: Utc::now(),
        uptime: state.uptime().as_secs_f64(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

#[derive(Serialize)]
pub(super) struct Ready {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    timestamp: DateTime<Utc>,
}

/// `GET /ready`: 200 when the queue and the store answer, else 503 naming
/// the dependency that did not.
pub(super) async fn ready(State(state): State<AppState>) -> Response {
    match state.service().readiness(READY_TIMEOUT).await {
        Ok(r) => Json(Ready {
            status: "ready",
            workers: Some(r.workers),
            error: None,
            timestamp: Utc::now(),
        })
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Ready {
                    status: "not ready",
                    workers: None,
                    // For operators: which dependency, and the reason.
                    error: Some(e.to_string()),
                    timestamp: Utc::now(),
                }),
            )
                .into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text, with the queue depth refreshed.
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    match state.service().queue_depth(QUEUE_DEPTH_TIMEOUT).await {
        Ok(depth) => metrics::queue_depth(depth),
        // The gauge keeps its last value; the scrape still succeeds.
        Err(e) => tracing::debug!(error = %e, "queue depth unavailable"),
    }
    let body = claudecluster_engine::telemetry::prometheus().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

#[derive(Serialize)]
pub(super) struct Workers {
    workers: Vec<WorkerInfo>,
}

/// `GET /workers`: workers with a live heartbeat.
pub(super) async fn workers(State(state): State<AppState>) -> Result<Json<Workers>, ApiError> {
    Ok(Json(Workers {
        workers: state.service().workers().await?,
    }))
}
