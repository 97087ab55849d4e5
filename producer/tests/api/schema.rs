//! The wire contract in `schemas/` and the Rust types agree: every example
//! validates and deserializes, every `invalid-*` example fails both, and the
//! limits written in the schemas are the ones the code enforces.

use std::path::PathBuf;

use chrono::Utc;
use claudecluster_engine::task::{
    DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, NewTask, SCHEMA_VERSION, TaskLimits, TaskMessage,
};
use claudecluster_engine::{TaskRecord, TaskState};
use claudecluster_producer::ErrorResponse;
use serde_json::Value;

/// The four schemas, by file stem.
const SCHEMAS: [&str; 4] = ["task-message", "new-task", "task-record", "error"];

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The schema document `name`.
pub fn schema(name: &str) -> Value {
    read_json(&schemas_dir().join(format!("{name}.schema.json")))
}

/// A validator for schema `name`, with `format` checked too.
pub fn validator(name: &str) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema(name))
        .unwrap_or_else(|e| panic!("{name}.schema.json is not a valid schema: {e}"))
}

/// Panics, listing every violation, unless `doc` satisfies schema `name`.
#[track_caller]
pub fn assert_valid(name: &str, doc: &Value) {
    let validator = validator(name);
    let errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "document does not satisfy {name}.schema.json:\n{}\n{doc:#}",
        errors.join("\n")
    );
}

/// Whether the Rust side accepts `doc` as a `name` document: it
/// deserializes and, for what clients and publishers send, passes the
/// contract's rules with the default limits.
fn rust_accepts(name: &str, doc: &Value) -> Result<Value, String> {
    let limits = TaskLimits::default();
    let reencoded = match name {
        "task-message" => {
            let msg: TaskMessage =
                serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            msg.validate(&limits).map_err(|e| e.to_string())?;
            serde_json::to_value(&msg)
        }
        "new-task" => {
            let task: NewTask = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            let msg = task
                .clone()
                .into_message(&limits, Utc::now())
                .map_err(|e| e.to_string())?;
            // What the intake makes of it must be a valid task message.
            assert_valid("task-message", &serde_json::to_value(&msg).unwrap());
            serde_json::to_value(&task)
        }
        "task-record" => {
            let record: TaskRecord =
                serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            serde_json::to_value(&record)
        }
        "error" => {
            let body: ErrorResponse =
                serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            serde_json::to_value(&body)
        }
        other => panic!("no Rust type for schema {other}"),
    };
    Ok(reencoded.expect("a Rust value serializes"))
}

#[test]
fn examples_agree_with_schemas_and_rust_types() {
    for name in SCHEMAS {
        let validator = validator(name);
        let dir = schemas_dir().join("examples").join(name);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        entries.sort();
        let (mut valid, mut invalid) = (0, 0);
        for path in entries {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let expect_valid = !file.starts_with("invalid-");
            let doc = read_json(&path);
            let schema_ok = validator.is_valid(&doc);
            let rust = rust_accepts(name, &doc);
            if expect_valid {
                valid += 1;
                assert!(schema_ok, "{name}/{file} should satisfy the schema");
                let reencoded = rust.unwrap_or_else(|e| panic!("{name}/{file}: Rust rejects: {e}"));
                // A document written back by Rust still satisfies the schema.
                assert_valid(name, &reencoded);
            } else {
                invalid += 1;
                assert!(!schema_ok, "{name}/{file} should violate the schema");
                assert!(rust.is_err(), "{name}/{file}: Rust should reject it");
            }
        }
        assert!(valid >= 2 && invalid >= 2, "{name}: too few examples");
    }
}

#[test]
fn schemas_carry_id_and_version() {
    for name in SCHEMAS {
        let s = schema(name);
        assert_eq!(
            s["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        assert_eq!(
            s["$id"],
            format!("urn:claudecluster:schema:{name}:{SCHEMA_VERSION}"),
            "{name}"
        );
        assert_eq!(s["schema_version"], SCHEMA_VERSION, "{name}");
    }
}

#[test]
fn schema_limits_match_the_code() {
    let limits = TaskLimits::default();
    for name in ["task-message", "new-task"] {
        let p = &schema(name)["properties"];
        assert_eq!(p["prompt"]["maxLength"], limits.max_prompt_chars, "{name}");
        assert_eq!(p["priority"]["minimum"], MIN_PRIORITY, "{name}");
        assert_eq!(p["priority"]["maximum"], MAX_PRIORITY, "{name}");
        assert_eq!(
            p["max_attempts"]["maximum"], limits.max_attempts_limit,
            "{name}"
        );
        assert_eq!(p["timeout_ms"]["maximum"], limits.max_timeout_ms, "{name}");
        assert_eq!(
            p["idempotency_key"]["maxLength"], limits.max_idempotency_key_len,
            "{name}"
        );
    }
    let p = &schema("task-message")["properties"];
    assert_eq!(p["priority"]["default"], DEFAULT_PRIORITY);
    assert_eq!(p["max_attempts"]["default"], limits.default_max_attempts);
    assert_eq!(p["schema_version"]["const"], SCHEMA_VERSION);

    let states: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
    let record = schema("task-record");
    assert_eq!(record["$defs"]["state"]["enum"], serde_json::json!(states));
    let error = schema("error");
    assert_eq!(
        error["properties"]["error"]["properties"]["state"]["enum"],
        serde_json::json!(states)
    );
}

#[test]
fn every_new_task_field_is_in_the_schema() {
    let full = NewTask {
        prompt: "p".into(),
        priority: Some(1),
        timeout_ms: Some(1),
        max_attempts: Some(1),
        metadata: Some(Default::default()),
        idempotency_key: Some("k".into()),
        trace: Some(Default::default()),
    };
    let fields = serde_json::to_value(full).unwrap();
    let props = schema("new-task")["properties"].clone();
    for key in fields.as_object().unwrap().keys() {
        assert!(props.get(key).is_some(), "new-task.schema.json lacks {key}");
    }
    assert_eq!(
        fields.as_object().unwrap().len(),
        props.as_object().unwrap().len()
    );
}
