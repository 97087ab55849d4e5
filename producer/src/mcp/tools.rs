//! The tool catalogue: names, descriptions, annotations, and input and
//! output schemas.
//!
//! The task schemas are the wire contract's (`schemas/`, embedded at build
//! time), so the MCP tools, the HTTP API and the queue describe a task the
//! same way. The limits in them are replaced by the ones this deployment
//! enforces. Output schemas are plain draft-07-compatible JSON Schema (no
//! `$schema`/`$id`), which is what MCP clients compile with.

use std::sync::Arc;

use claudecluster_engine::task::{MAX_PRIORITY, MIN_PRIORITY, TaskLimits, TaskState};
use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde_json::{Map, Value, json};

use crate::service::{DEFAULT_PAGE, MAX_PAGE};

const NEW_TASK: &str = include_str!("../../../schemas/new-task.schema.json");
const TASK_RECORD: &str = include_str!("../../../schemas/task-record.schema.json");

/// Longest a `wait_for_task` call blocks, in seconds.
pub const MAX_WAIT_SECS: u64 = 600;
/// How long `wait_for_task` blocks when the caller does not say, in seconds.
/// Shorter than the 60 s request timeout common MCP clients default to.
pub const DEFAULT_WAIT_SECS: u64 = 30;

/// The tools this server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolName {
    /// Queue one task.
    SubmitTask,
    /// Queue a batch.
    SubmitTasks,
    /// Read a task.
    GetTask,
    /// Block until a task finishes.
    WaitForTask,
    /// Cancel a task.
    CancelTask,
    /// List tasks.
    ListTasks,
}

impl ToolName {
    /// Every tool, in the order `tools/list` shows them.
    pub const ALL: [ToolName; 6] = [
        ToolName::SubmitTask,
        ToolName::SubmitTasks,
        ToolName::GetTask,
        ToolName::WaitForTask,
        ToolName::CancelTask,
        ToolName::ListTasks,
    ];

    /// The tool's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::SubmitTask => "submit_task",
            ToolName::SubmitTasks => "submit_tasks",
            ToolName::GetTask => "get_task",
            ToolName::WaitForTask => "wait_for_task",
            ToolName::CancelTask => "cancel_task",
            ToolName::ListTasks => "list_tasks",
        }
    }

    /// The tool called `name`, if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// Instructions sent to clients at initialization.
pub const INSTRUCTIONS: &str = "ClaudeCluster runs prompts as Claude Code tasks on a pool of \
workers. Queue work with submit_task (or submit_tasks for many at once); it returns at once \
with the task's id and state `queued`. Then call wait_for_task with the id to block until the \
task finishes (it reports progress as the task moves from queued to running to finished) and \
read `result.output`, or poll with get_task. cancel_task stops a task that has not finished; \
list_tasks shows recent tasks, newest first.";

/// The tool definitions, with the limits of `limits`.
pub fn catalogue(limits: &TaskLimits) -> Vec<Tool> {
    let record = Arc::new(record_schema());
    let new_task = new_task_schema(limits);
    let states: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
    let id = json!({
        "type": "string",
        "format": "uuid",
        "description": "The task id (the `id` of the record submit_task returned)."
    });

    vec![
        tool(
            ToolName::SubmitTask,
            "Submit a task",
            &format!(
                "Queue one task on the ClaudeCluster worker pool and return its record (state \
                 `queued`) right away; a worker runs it later. `prompt` is what Claude Code \
                 runs. Optional: `priority` {MIN_PRIORITY}-{MAX_PRIORITY} ({MAX_PRIORITY} runs \
                 first, default 5), `timeout_ms` per attempt, `max_attempts`, `metadata` (a JSON \
                 object returned unchanged) and `idempotency_key` (submitting again with the same \
                 key returns the first task instead of queueing another; the result's \
                 `_meta.claudecluster/replayed` is true then). Follow the task with \
                 wait_for_task or get_task."
            ),
            new_task.clone(),
            (*record).clone(),
            ToolAnnotations::new()
                .read_only(false)
                .destructive(false)
                .idempotent(false)
                .open_world(false),
        ),
        tool(
            ToolName::SubmitTasks,
            "Submit several tasks",
            &format!(
                "Queue up to {} tasks in one call and return their records in request order. \
                 Every task is checked first: if one is invalid nothing is queued and the error \
                 names it (`tasks[3].priority`). Each task takes the fields of submit_task.",
                limits.max_batch
            ),
            object(
                json!({
                    "tasks": {
                        "type": "array",
                        "description": "The tasks, each like submit_task's arguments.",
                        "minItems": 1,
                        "maxItems": limits.max_batch,
                        "items": new_task
                    }
                }),
                &["tasks"],
            ),
            list_of_records(&record, false),
            ToolAnnotations::new()
                .read_only(false)
                .destructive(false)
                .idempotent(false)
                .open_world(false),
        ),
        tool(
            ToolName::GetTask,
            "Get a task",
            "Return a task's current record without waiting: its `state` (queued, running, \
             succeeded, failed, timed_out, cancelled, dead_lettered), attempts and, once it has \
             finished, `result.output` (Claude's answer) or `error`. Records expire 24 hours \
             after their last change by default.",
            object(json!({ "id": id }), &["id"]),
            (*record).clone(),
            read_only(),
        ),
        tool(
            ToolName::WaitForTask,
            "Wait for a task",
            &format!(
                "Block until the task finishes (succeeded, failed, timed_out, cancelled or \
                 dead_lettered) or `max_wait_secs` pass (default {DEFAULT_WAIT_SECS}, at most \
                 {MAX_WAIT_SECS}), then return its record with the result. If the returned \
                 `state` is still queued or running the wait ended first: call again. With a \
                 progress token it sends notifications/progress as the task moves (queued, \
                 running, finished); cancelling the request stops the wait (the task keeps \
                 running; use cancel_task to stop it)."
            ),
            object(
                json!({
                    "id": id,
                    "max_wait_secs": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": MAX_WAIT_SECS,
                        "default": DEFAULT_WAIT_SECS,
                        "description": format!(
                            "Longest time to block, in seconds (0 to {MAX_WAIT_SECS}); 0 returns at once."
                        )
                    }
                }),
                &["id"],
            ),
            (*record).clone(),
            read_only(),
        ),
        tool(
            ToolName::CancelTask,
            "Cancel a task",
            "Cancel a task that has not finished and return its record, now `cancelled`. A \
             queued task will not run; a running task's outcome is discarded. Cancelling a task \
             that already finished is an error (`already_final`) that carries the record.",
            object(json!({ "id": id }), &["id"]),
            (*record).clone(),
            ToolAnnotations::new()
                .read_only(false)
                .destructive(true)
                .idempotent(true)
                .open_world(false),
        ),
        tool(
            ToolName::ListTasks,
            "List tasks",
            &format!(
                "List tasks newest first, at most `limit` per page (default {DEFAULT_PAGE}, at \
                 most {MAX_PAGE}), optionally only those in `state`. Pass the returned \
                 `next_cursor` as `cursor` to get the next page; it is null on the last page. \
                 With a `state` filter a page can hold fewer tasks while `next_cursor` is set."
            ),
            object(
                json!({
                    "state": {
                        "type": "string",
                        "enum": states,
                        "description": "Only tasks in this state."
                    },
                    "cursor": {
                        "type": "string",
                        "description": "`next_cursor` of the previous page."
                    },
                    "limit": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE,
                        "default": DEFAULT_PAGE,
                        "description": "Page size."
                    }
                }),
                &[],
            ),
            list_of_records(&record, true),
            read_only(),
        ),
    ]
}

fn tool(
    name: ToolName,
    title: &str,
    description: &str,
    input: Value,
    output: Value,
    mut annotations: ToolAnnotations,
) -> Tool {
    annotations.title = Some(title.to_owned());
    Tool::new(name.as_str(), description.to_owned(), into_object(input))
        .with_title(title)
        .with_raw_output_schema(Arc::new(into_object(output)))
        .with_annotations(annotations)
}

/// Annotations of a tool that changes nothing.
fn read_only() -> ToolAnnotations {
    ToolAnnotations::new()
        .read_only(true)
        .destructive(false)
        .idempotent(true)
        .open_world(false)
}

/// An object schema with `properties`, `required`, and no other members.
fn object(properties: Value, required: &[&str]) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
        "required": required,
    })
}

fn into_object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map,
        // Every schema built here is an object literal.
        _ => JsonObject::new(),
    }
}

/// Parses an embedded contract schema and drops the members that make it a
/// standalone 2020-12 resource (`$schema`, `$id`, `schema_version`): MCP
/// clients compile tool schemas with a default-dialect validator, and a
/// `$schema` it does not know would make it refuse the tool. The schemas are
/// checked by the test suite, so a broken one shows up as `{}` here, not as
/// a panic at run time.
fn contract(text: &str, name: &str) -> Map<String, Value> {
    let mut map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        other => {
            tracing::error!(
                schema = name,
                ?other,
                "an embedded schema is not a JSON object"
            );
            Map::new()
        }
    };
    for key in ["$schema", "$id", "schema_version"] {
        map.remove(key);
    }
    map
}

/// The input schema of one new task, with this deployment's limits.
fn new_task_schema(limits: &TaskLimits) -> Value {
    let mut schema = Value::Object(contract(NEW_TASK, "new-task"));
    let mut set = |pointer: &str, value: Value| {
        if let Some(slot) = schema.pointer_mut(pointer) {
            *slot = value;
        }
    };
    set(
        "/properties/prompt/maxLength",
        json!(limits.max_prompt_chars),
    );
    set(
        "/properties/timeout_ms/maximum",
        json!(limits.max_timeout_ms),
    );
    set(
        "/properties/max_attempts/maximum",
        json!(limits.max_attempts_limit),
    );
    set(
        "/properties/idempotency_key/maxLength",
        json!(limits.max_idempotency_key_len),
    );
    schema
}

/// The task record schema, as the output of the one-record tools.
fn record_schema() -> Value {
    Value::Object(contract(TASK_RECORD, "task-record"))
}

/// `{"tasks": [record, ...]}` (and `next_cursor` for a page): the record's
/// definitions move to the root, where its `#/$defs/...` references point,
/// and the record itself becomes `#/$defs/task_record`.
fn list_of_records(record: &Value, paged: bool) -> Value {
    let mut record = record.clone();
    let mut defs = record
        .as_object_mut()
        .and_then(|m| m.remove("$defs"))
        .and_then(|d| match d {
            Value::Object(map) => Some(map),
            _ => None,
        })
        .unwrap_or_default();
    defs.insert("task_record".into(), record);
    let mut properties = json!({
        "tasks": {
            "type": "array",
            "description": "Task records, in request order (newest first for a list).",
            "items": { "$ref": "#/$defs/task_record" }
        }
    });
    let mut required = vec!["tasks"];
    if paged {
        properties["next_cursor"] = json!({
            "type": ["string", "null"],
            "description": "Pass as `cursor` for the next page; null on the last page."
        });
        required.push("next_cursor");
    }
    let mut schema = object(properties, &required);
    schema["$defs"] = Value::Object(defs);
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_catalogue() {
        let tools = catalogue(&TaskLimits::default());
        assert_eq!(tools.len(), ToolName::ALL.len());
        for (tool, name) in tools.iter().zip(ToolName::ALL) {
            assert_eq!(tool.name, name.as_str());
            assert_eq!(ToolName::parse(name.as_str()), Some(name));
            assert!(tool.description.as_ref().is_some_and(|d| d.len() > 40));
            let output = tool
                .output_schema
                .as_ref()
                .expect("every tool has an output schema");
            assert_eq!(output["type"], "object", "{}", tool.name);
            assert_eq!(tool.input_schema["type"], "object", "{}", tool.name);
            assert!(!output.contains_key("$schema"));
        }
        assert_eq!(ToolName::parse("submit"), None);
    }

    #[test]
    fn limits_come_from_the_configuration() {
        let limits = TaskLimits {
            max_prompt_chars: 77,
            max_batch: 9,
            ..TaskLimits::default()
        };
        let tools = catalogue(&limits);
        let submit = &tools[0].input_schema;
        assert_eq!(submit["properties"]["prompt"]["maxLength"], 77);
        assert_eq!(submit["required"], json!(["prompt"]));
        let batch = &tools[1].input_schema;
        assert_eq!(batch["properties"]["tasks"]["maxItems"], 9);
        assert_eq!(
            batch["properties"]["tasks"]["items"]["properties"]["prompt"]["maxLength"],
            77
        );
    }

    #[test]
    fn list_schemas_resolve_their_references() {
        let tools = catalogue(&TaskLimits::default());
        let list = tools[5].output_schema.as_ref().unwrap();
        let defs = list["$defs"].as_object().unwrap();
        for name in [
            "task_record",
            "state",
            "timestamp",
            "result",
            "error",
            "attempt",
        ] {
            assert!(defs.contains_key(name), "missing $defs/{name}");
        }
        assert!(defs["task_record"].get("$defs").is_none());
        assert_eq!(
            list["properties"]["tasks"]["items"]["$ref"],
            "#/$defs/task_record"
        );
    }
}
