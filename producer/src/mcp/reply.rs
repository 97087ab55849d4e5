//! Tool results, and errors in the shape MCP clients show to their user.
//!
//! A successful call returns the JSON as `structuredContent` (matching the
//! tool's output schema) and the same JSON as text, for clients that only
//! read text. A failed call is a result with `isError: true` whose text is
//! the HTTP API's error body (`{"error": {"code", "message", "field"}}`),
//! with the field named in the message too: MCP clients show tool errors to
//! the model, while they reduce JSON-RPC errors to a generic failure. Only a
//! call that cannot be routed (an unknown tool) is a JSON-RPC error.

use rmcp::model::{CallToolResult, ContentBlock, MetaObject};
use serde::Serialize;
use serde_json::Value;

use super::metrics::Outcome;
use crate::error::ApiError;
use crate::service::ServiceError;

/// `_meta` key set on a `submit_task` result that returned an existing task
/// for its idempotency key.
pub const REPLAYED_META: &str = "claudecluster/replayed";

/// Why a tool call did not produce its result.
#[derive(Debug)]
pub enum ToolError {
    /// The same failure the HTTP API would answer with.
    Api(ApiError),
    /// The client cancelled the request or went away; nobody reads the
    /// answer.
    Cancelled,
}

impl From<ApiError> for ToolError {
    fn from(err: ApiError) -> Self {
        ToolError::Api(err)
    }
}

impl From<ServiceError> for ToolError {
    fn from(err: ServiceError) -> Self {
        ToolError::Api(ApiError::from(err))
    }
}

/// A successful tool answer: structured JSON and optional result `_meta`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    value: Value,
    meta: Option<MetaObject>,
}

impl Reply {
    /// A reply of `value`'s JSON.
    pub fn of(value: &impl Serialize) -> Self {
        Self {
            // Records and pages are plain data: serializing them cannot fail.
            value: serde_json::to_value(value).unwrap_or(Value::Null),
            meta: None,
        }
    }

    /// Sets `key` in the result's `_meta`.
    pub fn with_meta(mut self, key: &str, value: Value) -> Self {
        self.meta
            .get_or_insert_with(MetaObject::default)
            .0
            .insert(key.to_owned(), value);
        self
    }
}

/// The tool result for `outcome`, and its metrics label.
pub fn result(outcome: Result<Reply, ToolError>) -> (CallToolResult, Outcome) {
    match outcome {
        Ok(Reply { value, meta }) => (
            CallToolResult::structured(value).with_meta(meta),
            Outcome::Ok,
        ),
        Err(ToolError::Api(err)) => {
            let label = if err.status().is_server_error() {
                Outcome::Failed
            } else {
                Outcome::Rejected
            };
            (error_result(&err), label)
        }
        Err(ToolError::Cancelled) => (
            CallToolResult::error(vec![ContentBlock::text(
                r#"{"error":{"code":"cancelled","message":"the request was cancelled"}}"#,
            )]),
            Outcome::Cancelled,
        ),
    }
}

/// An `isError` result carrying the HTTP error body as text. No
/// `structuredContent`: clients validate it against the tool's output
/// schema even on errors.
pub fn error_result(err: &ApiError) -> CallToolResult {
    let mut body = err.to_body();
    if let Some(field) = &body.error.field
        && !body.error.message.starts_with(field.as_str())
        && !body.error.message.contains(&format!("`{field}`"))
    {
        body.error.message = format!("{field}: {}", body.error.message);
    }
    if err.status().is_server_error() {
        tracing::debug!(code = %body.error.code, "tool call failed");
    }
    // An error body is plain data: serializing it cannot fail.
    let text = serde_json::to_string(&body).unwrap_or_default();
    CallToolResult::error(vec![ContentBlock::text(text)])
}

#[cfg(test)]
mod tests {
    use claudecluster_engine::TaskId;
    use serde_json::json;

    use super::*;

    fn text_of(result: &CallToolResult) -> Value {
        let text = &result.content[0].as_text().expect("a text block").text;
        serde_json::from_str(text).expect("the text is JSON")
    }

    #[test]
    fn success_carries_the_same_json_twice() {
        let (result, outcome) = result(Ok(
            Reply::of(&json!({"id": 1})).with_meta(REPLAYED_META, json!(true))
        ));
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(result.structured_content, Some(json!({"id": 1})));
        assert_eq!(text_of(&result), json!({"id": 1}));
        assert_eq!(result.is_error, Some(false));
        assert_eq!(result.meta.unwrap().0[REPLAYED_META], true);
    }

    #[test]
    fn errors_name_their_field_and_keep_the_http_code() {
        let err = ApiError::InvalidField {
            field: Some("priority".into()),
            message: "must be between 1 and 10".into(),
        };
        let (result, outcome) = result(Err(err.into()));
        assert_eq!(outcome, Outcome::Rejected);
        assert_eq!(result.is_error, Some(true));
        assert!(result.structured_content.is_none());
        let body = text_of(&result);
        assert_eq!(body["error"]["code"], "invalid_field");
        assert_eq!(body["error"]["field"], "priority");
        assert_eq!(
            body["error"]["message"],
            "priority: must be between 1 and 10"
        );

        // A message that merely contains the name still gets it in front.
        let err = ApiError::parameter("id", "must be a task id (a UUID)");
        let body = text_of(&error_result(&err));
        assert_eq!(body["error"]["message"], "id: must be a task id (a UUID)");
        // One that quotes it does not.
        let err = ApiError::UnknownField {
            field: "prio".into(),
        };
        let body = text_of(&error_result(&err));
        assert_eq!(body["error"]["message"], "unknown field `prio`");
    }

    #[test]
    fn unknown_tasks_and_outages_are_labelled() {
        let id = TaskId::nil();
        let (result, outcome) = result(Err(ServiceError::TaskNotFound(id).into()));
        assert_eq!(outcome, Outcome::Rejected);
        assert_eq!(text_of(&result)["error"]["code"], "not_found");
        assert!(
            text_of(&result)["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&id.to_string())
        );
        let (_, outcome) = result_of_unavailable();
        assert_eq!(outcome, Outcome::Failed);
    }

    fn result_of_unavailable() -> (CallToolResult, Outcome) {
        result(Err(ApiError::Unavailable("down".into()).into()))
    }
}
