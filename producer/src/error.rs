//! The one error type of the HTTP API and its JSON body.
//!
//! Every failure, from a malformed body to an unreachable Redis, leaves the
//! intake as `{"error": {"code", "message", "field"}}` (see
//! `schemas/error.schema.json`) with a status code that tells the client
//! whether to fix the request (4xx) or try again later (503, with
//! `Retry-After`). Internal details are logged here, never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use claudecluster_engine::broker::BrokerError;
use claudecluster_engine::results::StoreError;
use claudecluster_engine::task::{ValidationError, ValidationKind};
use claudecluster_engine::{TaskRecord, TaskState};
use serde::{Deserialize, Serialize};

use crate::service::{BatchFailure, ServiceError};

/// Seconds a client should wait before retrying after a dependency failed.
const RETRY_AFTER_UNAVAILABLE_SECS: u64 = 2;
/// Seconds a client should wait before retrying after load shedding.
const RETRY_AFTER_OVERLOADED_SECS: u64 = 1;

/// Everything the HTTP API can answer instead of a success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON (400 `invalid_json`).
    #[error("malformed JSON at line {line} column {column}: {message}")]
    InvalidJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// A field has the wrong type or a value outside its rules (422
    /// `invalid_field`); `field` is a JSON path such as `tasks[3].priority`.
    #[error("{message}")]
    InvalidField {
        /// The offending field, absent when the document as a whole is wrong.
        field: Option<String>,
        /// Which rule it broke.
        message: String,
    },
    /// A field the contract does not know (422 `unknown_field`).
    #[error("unknown field `{field}`")]
    UnknownField {
        /// The path of the unknown field.
        field: String,
    },
    /// The body, or one field of it, is larger than allowed (413
    /// `payload_too_large`).
    #[error("{message}")]
    PayloadTooLarge {
        /// The field over its limit; absent when the whole body is.
        field: Option<String>,
        /// The limit.
        message: String,
    },
    /// The request body is not `application/json` (415
    /// `unsupported_media_type`).
    #[error("the request body must be JSON: send Content-Type: application/json")]
    UnsupportedMediaType,
    /// A path or query parameter is malformed (400 `invalid_parameter`).
    #[error("{message}")]
    InvalidParameter {
        /// The parameter's name (`id`, `limit`, `state`, ...).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No such resource or route (404 `not_found`).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method (405
    /// `method_not_allowed`).
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The task has already reached a final state (409 `already_final`).
    #[error("task {} is already {}", .0.id, .0.state)]
    AlreadyFinal(Box<TaskRecord>),
    /// A dead letter whose payload is not a valid task message (422
    /// `unreplayable`).
    #[error("{0}")]
    Unreplayable(String),
    /// The request took longer than `server.request_timeout_ms` (408
    /// `request_timeout`).
    #[error("the request took too long and was abandoned")]
    RequestTimeout,
    /// Too many requests in progress (503 `overloaded`).
    #[error("the intake is at its concurrent request limit; retry shortly")]
    Overloaded,
    /// The queue or the store is unreachable (503 `unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// Part of a batch was accepted, the rest was not (503
    /// `partially_accepted`).
    #[error("{} of the batch's tasks were not accepted; resubmit those", failed.len())]
    PartiallyAccepted {
        /// The tasks that are on the queue, in request order.
        accepted: Vec<TaskRecord>,
        /// The ones that are not, by their index in the request.
        failed: Vec<BatchFailure>,
    },
    /// A bug or corrupt data; details are in the log (500 `internal`).
    #[error("internal error; see the intake's log")]
    Internal,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson { .. } | ApiError::InvalidParameter { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::InvalidField { .. }
            | ApiError::UnknownField { .. }
            | ApiError::Unreplayable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AlreadyFinal(_) => StatusCode::CONFLICT,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded
            | ApiError::Unavailable(_)
            | ApiError::PartiallyAccepted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, snake_case code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. } => "invalid_json",
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::UnknownField { .. } => "unknown_field",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::InvalidParameter { .. } => "invalid_parameter",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::AlreadyFinal(_) => "already_final",
            ApiError::Unreplayable(_) => "unreplayable",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Overloaded => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::PartiallyAccepted { .. } => "partially_accepted",
            ApiError::Internal => "internal",
        }
    }

    /// The field or parameter at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::InvalidField { field, .. } | ApiError::PayloadTooLarge { field, .. } => {
                field.as_deref()
            }
            ApiError::UnknownField { field } | ApiError::InvalidParameter { field, .. } => {
                Some(field)
            }
            _ => None,
        }
    }

    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded => Some(RETRY_AFTER_OVERLOADED_SECS),
            ApiError::Unavailable(_) | ApiError::PartiallyAccepted { .. } => {
                Some(RETRY_AFTER_UNAVAILABLE_SECS)
            }
            _ => None,
        }
    }

    /// A 422 or 413 from a broken validation rule.
    pub fn from_validation(err: ValidationError) -> Self {
        match err.kind {
            ValidationKind::Invalid => ApiError::InvalidField {
                field: Some(err.field),
                message: err.message,
            },
            ValidationKind::TooLarge => ApiError::PayloadTooLarge {
                field: Some(err.field),
                message: err.message,
            },
        }
    }

    /// A 400 naming a path or query parameter.
    pub fn parameter(field: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidParameter {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// The JSON body of every error answer (`schemas/error.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorDetail,
    /// For `already_final`: the task, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRecord>,
    /// For `partially_accepted`: the tasks of the batch that were enqueued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Vec<TaskRecord>>,
    /// For `partially_accepted`: the ones that were not, by index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Vec<BatchFailure>>,
}

/// The `error` object of an [`ErrorResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable snake_case code (`invalid_field`, `not_found`, ...).
    pub code: String,
    /// A sentence for a person.
    pub message: String,
    /// The field or parameter at fault, as a JSON path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For `already_final`: the task's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
}

impl ApiError {
    /// The body this error is answered with.
    pub fn to_body(&self) -> ErrorResponse {
        let mut body = ErrorResponse {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
                field: self.field().map(str::to_owned),
                state: None,
            },
            task: None,
            accepted: None,
            failed: None,
        };
        match self {
            ApiError::AlreadyFinal(record) => {
                body.error.state = Some(record.state);
                body.task = Some((**record).clone());
            }
            ApiError::PartiallyAccepted { accepted, failed } => {
                body.accepted = Some(accepted.clone());
                body.failed = Some(failed.clone());
            }
            _ => {}
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.to_body())).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::Invalid(e) => ApiError::from_validation(e),
            ServiceError::EmptyBatch => ApiError::InvalidField {
                field: Some("tasks".into()),
                message: "must hold at least one task".into(),
            },
            ServiceError::BatchTooLarge { max, got } => ApiError::PayloadTooLarge {
                field: Some("tasks".into()),
                message: format!("a batch holds at most {max} tasks, this one has {got}"),
            },
            ServiceError::TaskNotFound(id) => ApiError::NotFound(format!("no task {id}")),
            ServiceError::DeadLetterNotFound(seq) => {
                ApiError::NotFound(format!("no dead letter {seq}"))
            }
            ServiceError::AlreadyFinal(record) => ApiError::AlreadyFinal(record),
            ServiceError::InvalidCursor => ApiError::parameter(
                "cursor",
                "is not a cursor this API issued (or it has expired)",
            ),
            ServiceError::Unreplayable { seq, reason } => {
                ApiError::Unreplayable(format!("dead letter {seq} cannot be replayed: {reason}"))
            }
            ServiceError::PartiallyAccepted { accepted, failed } => ApiError::PartiallyAccepted {
                accepted: accepted.into_iter().map(|s| s.record).collect(),
                failed,
            },
            ServiceError::Publish(e) => {
                tracing::warn!(error = %e, "publish failed");
                ApiError::Unavailable(
                    "the task queue did not confirm the task; it was not accepted, retry".into(),
                )
            }
            ServiceError::Broker(e) => broker_unavailable(&e),
            ServiceError::Store(e) => store_error(&e),
            ServiceError::Interrupted(reason) => {
                tracing::error!(reason, "operation interrupted");
                ApiError::Internal
            }
            ServiceError::Timeout { dependency } => {
                tracing::warn!(dependency, "dependency timed out");
                ApiError::Unavailable(format!("the {dependency} did not answer in time; retry"))
            }
        }
    }
}

fn broker_unavailable(e: &BrokerError) -> ApiError {
    tracing::warn!(error = %e, "task queue error");
    ApiError::Unavailable("the task queue is unavailable; retry".into())
}

fn store_error(e: &StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "result store unavailable");
            ApiError::Unavailable("the result store is unavailable; retry".into())
        }
        StoreError::Corrupt { .. } | StoreError::Other(_) => {
            tracing::error!(error = %e, "result store error");
            ApiError::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(err: ApiError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn field_is_omitted_when_there_is_none() {
        let (status, retry, body) = body_of(ApiError::Overloaded).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(body["error"]["code"], "overloaded");
        assert!(body["error"].get("field").is_none(), "{body}");
    }

    #[tokio::test]
    async fn validation_kinds_map_to_422_and_413() {
        let (status, _, body) = body_of(ApiError::parameter("id", "bad")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["field"], "id");
        let err = ApiError::from(ServiceError::BatchTooLarge { max: 2, got: 3 });
        let (status, _, body) = body_of(err).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["field"], "tasks");
    }

    #[tokio::test]
    async fn internal_details_are_not_sent() {
        let err = ApiError::from(ServiceError::Store(StoreError::Other(
            "WRONGTYPE secret-key-name".into(),
        )));
        let (status, _, body) = body_of(err).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!body.to_string().contains("secret-key-name"), "{body}");
    }
}
