//! Tool arguments: their types and how they are parsed.
//!
//! Arguments go through the HTTP API's JSON parser
//! ([`extract::parse_json`]), so a wrong type, a missing field or an unknown
//! one is reported with the same code and the same field path
//! (`tasks[1].priority`) over MCP as over HTTP.

use std::time::Duration;

use claudecluster_engine::task::{NewTask, TraceContext};
use claudecluster_engine::{TaskId, TaskState};
use rmcp::model::{JsonObject, RequestMetaObject};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::tools::{DEFAULT_WAIT_SECS, MAX_WAIT_SECS};
use crate::error::ApiError;
use crate::extract::{self, Object};
use crate::service::{DEFAULT_PAGE, MAX_PAGE};

/// `submit_tasks` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitTasks {
    /// The tasks.
    pub tasks: Vec<Object<NewTask>>,
}

/// `get_task` and `cancel_task` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRef {
    id: String,
}

impl TaskRef {
    /// The task id.
    ///
    /// # Errors
    /// `invalid_parameter` naming `id` when it is not a UUID.
    pub fn id(&self) -> Result<TaskId, ApiError> {
        extract::task_id("id", &self.id)
    }
}

/// `wait_for_task` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitFor {
    id: String,
    #[serde(default)]
    max_wait_secs: Option<u64>,
}

impl WaitFor {
    /// The task id.
    ///
    /// # Errors
    /// `invalid_parameter` naming `id` when it is not a UUID.
    pub fn id(&self) -> Result<TaskId, ApiError> {
        extract::task_id("id", &self.id)
    }

    /// How long to block at most.
    ///
    /// # Errors
    /// `invalid_parameter` naming `max_wait_secs` when it is over
    /// [`MAX_WAIT_SECS`].
    pub fn max_wait(&self) -> Result<Duration, ApiError> {
        match self.max_wait_secs {
            None => Ok(Duration::from_secs(DEFAULT_WAIT_SECS)),
            Some(secs) if secs <= MAX_WAIT_SECS => Ok(Duration::from_secs(secs)),
            Some(_) => Err(ApiError::parameter(
                "max_wait_secs",
                format!("must be a number of seconds from 0 to {MAX_WAIT_SECS}"),
            )),
        }
    }
}

/// `list_tasks` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListTasks {
    /// Only tasks in this state.
    #[serde(default)]
    pub state: Option<TaskState>,
    /// Where the previous page ended.
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
}

impl ListTasks {
    /// The page size.
    ///
    /// # Errors
    /// `invalid_parameter` naming `limit` when it is outside 1 to
    /// [`MAX_PAGE`].
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_PAGE),
            Some(n) if (1..=MAX_PAGE as u64).contains(&n) => Ok(n as usize),
            Some(_) => Err(ApiError::parameter(
                "limit",
                format!("must be a number from 1 to {MAX_PAGE}"),
            )),
        }
    }

    /// The cursor, with an empty string meaning the first page (as over
    /// HTTP).
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref().filter(|c| !c.is_empty())
    }
}

/// Parses a tool's arguments (absent arguments are an empty object).
///
/// # Errors
/// [`ApiError::InvalidField`] or [`ApiError::UnknownField`] naming the field.
pub fn parse<T: DeserializeOwned>(arguments: Option<JsonObject>) -> Result<T, ApiError> {
    let arguments = serde_json::Value::Object(arguments.unwrap_or_default());
    // A JSON object always serializes; the bytes then take exactly the HTTP
    // body's path, so both transports report the same codes and paths.
    let bytes = serde_json::to_vec(&arguments).unwrap_or_default();
    extract::parse_json::<Object<T>>(&bytes).map(|Object(value)| value)
}

/// The W3C trace context a client put in the request's `_meta` (SEP-414),
/// used for a task that does not carry its own.
pub fn trace_context(meta: &RequestMetaObject) -> Option<TraceContext> {
    let traceparent = meta.get_traceparent()?.to_owned();
    Some(TraceContext {
        traceparent: Some(traceparent),
        tracestate: meta.get_tracestate().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: serde_json::Value) -> Option<JsonObject> {
        match value {
            serde_json::Value::Object(map) => Some(map),
            _ => None,
        }
    }

    #[test]
    fn wrong_types_and_unknown_fields_name_the_field() {
        let err = parse::<NewTask>(object(json!({"prompt": "a", "priority": "high"}))).unwrap_err();
        assert_eq!(
            (err.code(), err.field()),
            ("invalid_field", Some("priority"))
        );
        let err = parse::<SubmitTasks>(object(json!({"tasks": [{"prompt": "a", "prio": 1}]})))
            .unwrap_err();
        assert_eq!(
            (err.code(), err.field()),
            ("unknown_field", Some("tasks[0].prio"))
        );
        let err = parse::<TaskRef>(None).unwrap_err();
        assert_eq!(err.field(), Some("id"));
        let err = parse::<ListTasks>(object(json!({"state": "done"}))).unwrap_err();
        assert_eq!(err.field(), Some("state"));
        assert!(err.to_string().contains("queued"), "{err}");
    }

    #[test]
    fn ranges_name_the_parameter() {
        let wait: WaitFor = parse(object(json!({"id": "x", "max_wait_secs": 601}))).unwrap();
        assert_eq!(wait.max_wait().unwrap_err().field(), Some("max_wait_secs"));
        assert_eq!(wait.id().unwrap_err().field(), Some("id"));
        let wait: WaitFor = parse(object(json!({"id": "x"}))).unwrap();
        assert_eq!(
            wait.max_wait().unwrap(),
            Duration::from_secs(DEFAULT_WAIT_SECS)
        );
        let list: ListTasks = parse(object(json!({"limit": 0, "cursor": ""}))).unwrap();
        assert_eq!(list.limit().unwrap_err().field(), Some("limit"));
        assert_eq!(list.cursor(), None);
    }

    #[test]
    fn trace_context_comes_from_meta() {
        let mut meta = RequestMetaObject::new();
        assert_eq!(trace_context(&meta), None);
        meta.set_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let trace = trace_context(&meta).unwrap();
        assert!(trace.traceparent.unwrap().starts_with("00-0af7"));
        assert_eq!(trace.tracestate, None);
    }
}
