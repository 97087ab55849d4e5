//! Dead-letter endpoints: list, replay, delete.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ApiError;
use crate::extract;
use crate::service::dead_letters::DeadLetterView;
use crate::service::{DEFAULT_PAGE, MAX_PAGE};
use crate::state::AppState;

/// `GET /dead-letters` answer.
#[derive(Serialize)]
pub(super) struct ListResponse {
    dead_letters: Vec<DeadLetterView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<u64>,
}

/// `GET /dead-letters?after=&limit=&task_id=`: oldest first.
pub(super) async fn list(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(pairs) = query.map_err(|_| ApiError::parameter("query", "is not URL-encoded"))?;
    let mut after = None;
    let mut limit = DEFAULT_PAGE;
    let mut task_id = None;
    for (key, value) in pairs {
        match key.as_str() {
            "after" => after = Some(extract::number_in("after", &value, 0, u64::MAX)?),
            "limit" => limit = extract::number_in("limit", &value, 1, MAX_PAGE as u64)? as usize,
            "task_id" => task_id = Some(extract::task_id("task_id", &value)?),
            other => {
                return Err(ApiError::parameter(
                    other,
                    "is not a parameter of this route (after, limit, task_id)",
                ));
            }
        }
    }
    let dead_letters = state.service().dead_letters(after, limit, task_id).await?;
    let next_after = if dead_letters.len() == limit {
        dead_letters.last().map(|d| d.seq)
    } else {
        None
    };
    Ok(Json(ListResponse {
        dead_letters,
        next_after,
    }))
}

/// `POST /dead-letters/{seq}/replay`: 202 with the reopened record.
pub(super) async fn replay(
    State(state): State<AppState>,
    seq: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let seq = path_seq(seq)?;
    let replayed = state.service().replay_dead_letter(seq).await?;
    let location = HeaderValue::try_from(format!("/tasks/{}", replayed.task.id))
        // A hyphenated UUID is plain ASCII, always a valid header value.
        .unwrap_or_else(|_| HeaderValue::from_static("/tasks"));
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(replayed),
    )
        .into_response())
}

/// `DELETE /dead-letters/{seq}`: 204, or 404.
pub(super) async fn delete(
    State(state): State<AppState>,
    seq: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let seq = path_seq(seq)?;
    state.service().delete_dead_letter(seq).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn path_seq(seq: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(raw) = seq.map_err(|_| ApiError::parameter("seq", "must be a number"))?;
    extract::number_in("seq", &raw, 1, u64::MAX)
}
