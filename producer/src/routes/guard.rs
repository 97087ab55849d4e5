//! The request guard wrapped around every route: load shedding over
//! `server.max_concurrent_requests` (503 `overloaded`), the request timeout
//! `server.request_timeout_ms` (408), and the HTTP metrics.
//!
//! One middleware rather than three tower layers: each request pays for one
//! boxed future, and the errors come out in the API's JSON format without an
//! error-handling layer in between.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::paths;
use crate::error::ApiError;
use crate::metrics;
use crate::state::AppState;

/// Sheds, times out and measures one request.
pub(super) async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = metrics::method_label(req.method());
    let route = route_label(req.extensions().get::<MatchedPath>());
    // Liveness and metrics stay answerable under overload: an orchestrator
    // must not restart a busy but healthy intake.
    let exempt = route == paths::HEALTH || route == paths::METRICS;
    let response = match state.limiter().try_acquire() {
        Ok(_permit) => run(&state, req, next).await,
        Err(_) if exempt => run(&state, req, next).await,
        Err(_) => ApiError::Overloaded.into_response(),
    };
    metrics::http_request(method, route, response.status().as_u16(), started.elapsed());
    response
}

async fn run(state: &AppState, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.request_timeout(), next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout.into_response(),
    }
}

fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    match matched {
        Some(m) => paths::ALL
            .into_iter()
            .find(|p| *p == m.as_str())
            .unwrap_or("other"),
        None => "unmatched",
    }
}
