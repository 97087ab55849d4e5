//! `GET /openapi.json`: an OpenAPI 3.1 description of the HTTP API.
//!
//! The request and response bodies are the JSON Schemas of `schemas/`,
//! embedded at build time, so the API description and the wire contract
//! cannot drift apart. The document is built once and served as bytes.

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::paths;

const NEW_TASK: &str = include_str!("../../../schemas/new-task.schema.json");
const TASK_MESSAGE: &str = include_str!("../../../schemas/task-message.schema.json");
const TASK_RECORD: &str = include_str!("../../../schemas/task-record.schema.json");
const ERROR: &str = include_str!("../../../schemas/error.schema.json");

/// `GET /openapi.json`.
pub(super) async fn openapi() -> Response {
    static DOCUMENT: OnceLock<Vec<u8>> = OnceLock::new();
    let body = DOCUMENT.get_or_init(|| {
        // Serializing a `Value` cannot fail.
        serde_json::to_vec(&document()).unwrap_or_default()
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.as_slice(),
    )
        .into_response()
}

/// Parses an embedded schema for use as component `name`. Its `$id` and
/// `$schema` are dropped and its internal references (`#/$defs/...`) are
/// rewritten to the component's location, because OpenAPI tools resolve
/// `#` against the whole document rather than the embedded resource. The
/// schemas are checked by the test suite, so a broken one only shows up as
/// `{}` here rather than a panic at run time.
fn embedded(text: &str, name: &str) -> Value {
    let mut schema: Value = serde_json::from_str(text).unwrap_or_else(|e| {
        tracing::error!(error = %e, schema = name, "an embedded schema is not JSON");
        json!({})
    });
    if let Some(map) = schema.as_object_mut() {
        map.remove("$id");
        map.remove("$schema");
    }
    rebase_refs(&mut schema, &format!("#/components/schemas/{name}"));
    schema
}

fn rebase_refs(value: &mut Value, base: &str) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("$ref")
                && let Some(pointer) = r.strip_prefix('#')
            {
                *r = format!("{base}{pointer}");
            }
            map.values_mut().for_each(|v| rebase_refs(v, base));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rebase_refs(v, base)),
        _ => {}
    }
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_body(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn error(description: &str) -> Value {
    json_body(description, reference("Error"))
}

fn unavailable() -> Value {
    let mut r = error(
        "The queue or the store is unavailable, or the intake is overloaded (`overloaded`); see Retry-After.",
    );
    r["headers"] = json!({ "Retry-After": { "schema": { "type": "integer" } } });
    r
}

fn path_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": schema })
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

fn task_id_param() -> Value {
    path_param(
        "id",
        "The task id.",
        json!({"type": "string", "format": "uuid"}),
    )
}

fn seq_param() -> Value {
    path_param(
        "seq",
        "The dead letter's sequence number.",
        json!({"type": "integer", "minimum": 1}),
    )
}

fn limit_param() -> Value {
    query_param(
        "limit",
        "Page size.",
        json!({"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
    )
}

/// The whole document.
pub fn document() -> Value {
    let submit_responses = json!({
        "202": {
            "description": "Accepted and enqueued.",
            "headers": { "Location": { "schema": { "type": "string" }, "description": "/tasks/{id}" } },
            "content": { "application/json": { "schema": reference("TaskRecord") } }
        },
        "200": {
            "description": "The idempotency key was used before: the existing task, nothing enqueued.",
            "headers": { "Idempotent-Replayed": { "schema": { "const": "true" } } },
            "content": { "application/json": { "schema": reference("TaskRecord") } }
        },
        "400": error("Malformed JSON (`invalid_json`)."),
        "413": error("Body over the size limit, or a field over its limit (`payload_too_large`)."),
        "415": error("Not `application/json` (`unsupported_media_type`)."),
        "422": error("A field breaks a rule, has the wrong type, or is unknown (`invalid_field`, `unknown_field`)."),
        "503": unavailable(),
    });
    let mut batch_responses = submit_responses.clone();
    batch_responses["202"] = json_body(
        "All tasks accepted (replays return the existing record).",
        reference("BatchResponse"),
    );
    batch_responses["503"] = {
        let mut r = unavailable();
        r["description"] = json!(
            "Some tasks were not enqueued (`partially_accepted`, with `accepted` and `failed`), or a dependency is unavailable."
        );
        r
    };
    if let Some(map) = batch_responses.as_object_mut() {
        map.remove("200");
    }

    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "ClaudeCluster intake",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Submit tasks to the ClaudeCluster queue and poll their state. Every error answer has the body {\"error\": {\"code\", \"message\", \"field\"}}. The bodies are the JSON Schemas of the repository's schemas/ directory."
        },
        "paths": {
            paths::TASKS: {
                "post": {
                    "operationId": "submitTask",
                    "summary": "Submit a task",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": reference("NewTask") } } },
                    "responses": submit_responses
                },
                "get": {
                    "operationId": "listTasks",
                    "summary": "List tasks, newest first",
                    "description": "A page holds at most `limit` tasks. With a `state` filter a page can hold fewer while `next_cursor` is set: keep paging until `next_cursor` is null.",
                    "parameters": [
                        query_param("state", "Only tasks in this state.", json!({"$ref": "#/components/schemas/TaskRecord/$defs/state"})),
                        query_param("cursor", "next_cursor of the previous page.", json!({"type": "string"})),
                        limit_param()
                    ],
                    "responses": {
                        "200": json_body("A page of tasks.", reference("TaskList")),
                        "400": error("A bad parameter or cursor (`invalid_parameter`)."),
                        "503": unavailable()
                    }
                }
            },
            paths::TASKS_BATCH: {
                "post": {
                    "operationId": "submitBatch",
                    "summary": "Submit many tasks at once",
                    "description": "All tasks are validated first; one invalid task rejects the batch (the error names tasks[i].field).",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": reference("BatchRequest") } } },
                    "responses": batch_responses
                }
            },
            paths::TASK: {
                "get": {
                    "operationId": "getTask",
                    "summary": "A task's state and result",
                    "parameters": [task_id_param()],
                    "responses": {
                        "200": json_body("The task.", reference("TaskRecord")),
                        "400": error("Not a task id (`invalid_parameter`, field `id`)."),
                        "404": error("No such task, or its record expired (`not_found`)."),
                        "503": unavailable()
                    }
                }
            },
            paths::TASK_CANCEL: {
                "post": {
                    "operationId": "cancelTask",
                    "summary": "Cancel a task that has not finished",
                    "parameters": [task_id_param()],
                    "responses": {
                        "200": json_body("The cancelled task.", reference("TaskRecord")),
                        "400": error("Not a task id."),
                        "404": error("No such task."),
                        "409": error("The task already finished (`already_final`, with `state` and `task`)."),
                        "503": unavailable()
                    }
                }
            },
            paths::DEAD_LETTERS: {
                "get": {
                    "operationId": "listDeadLetters",
                    "summary": "Dead letters, oldest first",
                    "parameters": [
                        query_param("after", "Only dead letters after this seq (next_after of the previous page).", json!({"type": "integer", "minimum": 0})),
                        limit_param(),
                        query_param("task_id", "Only this task's dead letters.", json!({"type": "string", "format": "uuid"}))
                    ],
                    "responses": {
                        "200": json_body("A page of dead letters.", reference("DeadLetterList")),
                        "400": error("A bad parameter."),
                        "503": unavailable()
                    }
                }
            },
            paths::DEAD_LETTER: {
                "delete": {
                    "operationId": "deleteDeadLetter",
                    "summary": "Discard a dead letter",
                    "parameters": [seq_param()],
                    "responses": {
                        "204": { "description": "Deleted." },
                        "404": error("No such dead letter."),
                        "503": unavailable()
                    }
                }
            },
            paths::DEAD_LETTER_REPLAY: {
                "post": {
                    "operationId": "replayDeadLetter",
                    "summary": "Put a dead-lettered task back on the queue",
                    "parameters": [seq_param()],
                    "responses": {
                        "202": json_body("Reopened and enqueued; the dead letter is deleted.", reference("Replayed")),
                        "404": error("No such dead letter."),
                        "422": error("The payload is not a valid task message (`unreplayable`)."),
                        "503": unavailable()
                    }
                }
            },
            paths::WORKERS: {
                "get": {
                    "operationId": "listWorkers",
                    "summary": "Workers with a live heartbeat",
                    "responses": {
                        "200": json_body("The workers.", reference("WorkerList")),
                        "503": unavailable()
                    }
                }
            },
            paths::HEALTH: {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: the process is up",
                    "responses": { "200": json_body("Up.", reference("Health")) }
                }
            },
            paths::READY: {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: the queue and the store answer",
                    "responses": {
                        "200": json_body("Ready.", reference("Ready")),
                        "503": json_body("Not ready; error names the dependency.", reference("Ready"))
                    }
                }
            },
            paths::METRICS: {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": { "200": { "description": "Prometheus text format.", "content": { "text/plain": { "schema": { "type": "string" } } } } }
                }
            },
            paths::OPENAPI: {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": { "200": { "description": "OpenAPI 3.1.", "content": { "application/json": { "schema": { "type": "object" } } } } }
                }
            }
        },
        "components": { "schemas": components() }
    })
}

fn components() -> Value {
    json!({
        "NewTask": embedded(NEW_TASK, "NewTask"),
        "TaskMessage": embedded(TASK_MESSAGE, "TaskMessage"),
        "TaskRecord": embedded(TASK_RECORD, "TaskRecord"),
        "Error": embedded(ERROR, "Error"),
        "BatchRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["tasks"],
            "properties": { "tasks": { "type": "array", "minItems": 1, "maxItems": 1000, "items": reference("NewTask"), "description": "At most MAX_BATCH_SIZE (default 1000) tasks." } }
        },
        "BatchResponse": {
            "type": "object",
            "required": ["tasks"],
            "properties": { "tasks": { "type": "array", "items": reference("TaskRecord"), "description": "In request order." } }
        },
        "TaskList": {
            "type": "object",
            "required": ["tasks", "next_cursor"],
            "properties": {
                "tasks": { "type": "array", "items": reference("TaskRecord") },
                "next_cursor": { "type": ["string", "null"], "description": "Pass as cursor for the next page; null on the last page." }
            }
        },
        "DeadLetter": {
            "type": "object",
            "required": ["seq", "task_id", "reason", "at", "payload"],
            "properties": {
                "seq": { "type": "integer", "minimum": 1 },
                "task_id": { "type": ["string", "null"], "format": "uuid" },
                "reason": { "type": "string" },
                "at": { "type": "string", "format": "date-time" },
                "payload": { "description": "The original message: JSON when it parses, else its text." }
            }
        },
        "DeadLetterList": {
            "type": "object",
            "required": ["dead_letters"],
            "properties": {
                "dead_letters": { "type": "array", "items": reference("DeadLetter") },
                "next_after": { "type": "integer", "description": "Pass as after for the next page; absent on the last page." }
            }
        },
        "Replayed": {
            "type": "object",
            "required": ["task", "seq", "dead_letter_removed"],
            "properties": {
                "task": reference("TaskRecord"),
                "seq": { "type": "integer" },
                "dead_letter_removed": { "type": "boolean", "description": "False when the dead letter could not be deleted after the publish: delete it, do not replay it again." }
            }
        },
        "WorkerInfo": {
            "type": "object",
            "required": ["id", "host", "version", "concurrency", "in_flight", "executor", "started_at", "last_seen"],
            "properties": {
                "id": { "type": "string" },
                "host": { "type": "string" },
                "version": { "type": "string" },
                "concurrency": { "type": "integer", "minimum": 0 },
                "in_flight": { "type": "integer", "minimum": 0 },
                "executor": { "type": "string" },
                "started_at": { "type": "string", "format": "date-time" },
                "last_seen": { "type": "string", "format": "date-time" }
            }
        },
        "WorkerList": {
            "type": "object",
            "required": ["workers"],
            "properties": { "workers": { "type": "array", "items": reference("WorkerInfo") } }
        },
        "Health": {
            "type": "object",
            "required": ["status", "timestamp", "uptime", "version"],
            "properties": {
                "status": { "const": "healthy" },
                "timestamp": { "type": "string", "format": "date-time" },
                "uptime": { "type": "number", "description": "Seconds since start." },
                "version": { "type": "string" }
            }
        },
        "Ready": {
            "type": "object",
            "required": ["status", "timestamp"],
            "properties": {
                "status": { "enum": ["ready", "not ready"] },
                "workers": { "type": "integer", "description": "Workers with a live heartbeat (when ready)." },
                "error": { "type": "string", "description": "Which dependency failed, and why (when not ready)." },
                "timestamp": { "type": "string", "format": "date-time" }
            }
        }
    })
}
