//! Task endpoints: submit, batch submit, get, list, cancel.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use claudecluster_engine::task::NewTask;
use claudecluster_engine::{TaskRecord, TaskState};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::extract::{self, ApiJson, Object};
use crate::metrics;
use crate::service::{DEFAULT_PAGE, MAX_PAGE, Submitted};
use crate::state::AppState;

/// Set on a `200` answer to a submit whose idempotency key was used before.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `POST /tasks/batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    tasks: Vec<Object<NewTask>>,
}

/// `POST /tasks/batch` answer.
#[derive(Serialize)]
pub(super) struct BatchResponse {
    tasks: Vec<TaskRecord>,
}

/// `GET /tasks` answer.
#[derive(Serialize)]
pub(super) struct ListResponse {
    tasks: Vec<TaskRecord>,
    next_cursor: Option<String>,
}

/// `POST /tasks`: 202 with the record and `Location`, or 200 with the
/// existing record and `Idempotent-Replayed: true`.
pub(super) async fn submit(
    State(state): State<AppState>,
    body: Result<ApiJson<NewTask>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(task) = body.inspect_err(|_| metrics::tasks_rejected(1))?;
    let submitted = state.service().submit(task).await?;
    Ok(submitted_response(submitted))
}

fn submitted_response(submitted: Submitted) -> Response {
    let location = location(&submitted.record);
    if submitted.replayed {
        (
            StatusCode::OK,
            [
                (header::LOCATION, location),
                (IDEMPOTENT_REPLAYED, HeaderValue::from_static("true")),
            ],
            Json(submitted.record),
        )
            .into_response()
    } else {
        (
            StatusCode::ACCEPTED,
            [(header::LOCATION, location)],
            Json(submitted.record),
        )
            .into_response()
    }
}

fn location(record: &TaskRecord) -> HeaderValue {
    // A hyphenated UUID is plain ASCII, always a valid header value.
    HeaderValue::try_from(format!("/tasks/{}", record.id))
        .unwrap_or_else(|_| HeaderValue::from_static("/tasks"))
}

/// `POST /tasks/batch`: 202 `{"tasks": [...]}`, or 503 with the accepted
/// part when some tasks could not be enqueued.
pub(super) async fn submit_batch(
    State(state): State<AppState>,
    body: Result<ApiJson<BatchRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(batch) = body.inspect_err(|_| metrics::tasks_rejected(1))?;
    let tasks = batch.tasks.into_iter().map(|Object(t)| t).collect();
    let submitted = state.service().submit_batch(tasks).await?;
    let tasks = submitted.into_iter().map(|s| s.record).collect();
    Ok((StatusCode::ACCEPTED, Json(BatchResponse { tasks })).into_response())
}

/// `GET /tasks/{id}`.
pub(super) async fn get(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TaskRecord>, ApiError> {
    let id = path_id(id)?;
    Ok(Json(state.service().get(id).await?))
}

/// `POST /tasks/{id}/cancel`: 200 with the cancelled record, 409 when the
/// task already finished.
pub(super) async fn cancel(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TaskRecord>, ApiError> {
    let id = path_id(id)?;
    Ok(Json(state.service().cancel(id).await?))
}

/// `GET /tasks?state=&cursor=&limit=`: newest first.
pub(super) async fn list(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(pairs) = query.map_err(|_| ApiError::parameter("query", "is not URL-encoded"))?;
    let mut task_state = None;
    let mut cursor = None;
    let mut limit = DEFAULT_PAGE;
    for (key, value) in pairs {
        match key.as_str() {
            "state" => {
                task_state = Some(TaskState::parse(&value).ok_or_else(|| {
                    let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::parameter("state", format!("must be one of {}", names.join(", ")))
                })?);
            }
            "cursor" if !value.is_empty() => cursor = Some(value),
            "cursor" => {}
            "limit" => limit = extract::number_in("limit", &value, 1, MAX_PAGE as u64)? as usize,
            other => {
                return Err(ApiError::parameter(
                    other,
                    "is not a parameter of this route (state, cursor, limit)",
                ));
            }
        }
    }
    let page = state
        .service()
        .list(task_state, cursor.as_deref(), limit)
        .await?;
    Ok(Json(ListResponse {
        tasks: page.tasks,
        next_cursor: page.next_cursor,
    }))
}

fn path_id(id: Result<Path<String>, PathRejection>) -> Result<uuid::Uuid, ApiError> {
    let Path(raw) = id.map_err(|_| ApiError::parameter("id", "must be a task id (a UUID)"))?;
    extract::task_id("id", &raw)
}
