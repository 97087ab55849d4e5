//! The task model: what travels on the queue ([`TaskMessage`]), what a client
//! submits ([`NewTask`]) and what the store keeps and the API returns
//! ([`TaskRecord`]).
//!
//! These types are the Rust side of the public wire contract in `schemas/`;
//! a test in `tests/` proves the two agree. Changing a field here is a change
//! of the contract: bump [`SCHEMA_VERSION`] when it is not backwards compatible.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Version of the task message and task record formats in `schemas/`.
pub const SCHEMA_VERSION: u32 = 1;

/// Lowest and highest priority; 10 runs first.
pub const MIN_PRIORITY: u8 = 1;
/// See [`MIN_PRIORITY`].
pub const MAX_PRIORITY: u8 = 10;
/// Priority of a task that does not say.
pub const DEFAULT_PRIORITY: u8 = 5;

/// A task identifier: a UUID, version 7 when the intake assigns it, so ids
/// sort by creation time.
pub type TaskId = Uuid;

/// W3C trace context carried with a task so a worker's spans join the
/// submitter's trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TraceContext {
    /// The `traceparent` header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The `tracestate` header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// A task as a client submits it (`POST /tasks`, the MCP `submit_task` tool).
/// Everything but the prompt is optional and gets a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// What to run: the prompt for Claude Code, or the standard input of the
    /// configured command.
    pub prompt: String,
    /// 1 to 10; 10 runs first. Default 5.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Hard limit for one attempt, in milliseconds; capped by the worker's
    /// `TASK_TIMEOUT`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// How many attempts before the task is dead-lettered.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// A small JSON object the caller gets back unchanged.
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    /// Submitting twice with the same key returns the first task.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Trace context to propagate to the worker.
    #[serde(default)]
    pub trace: Option<TraceContext>,
}

/// A task as it travels on the queue. Other systems may publish this
/// document directly (see `schemas/task-message.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMessage {
    /// Format version; see [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The task id.
    pub id: TaskId,
    /// What to run.
    pub prompt: String,
    /// 1 to 10; 10 runs first.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Hard limit for one attempt in milliseconds, if the task sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts before the task is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Caller's metadata, returned unchanged.
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// The idempotency key the task was submitted with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// When the task was accepted.
    pub created_at: DateTime<Utc>,
    /// Trace context, if the submitter sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

fn default_priority() -> u8 {
    DEFAULT_PRIORITY
}

fn default_max_attempts() -> u32 {
    3
}

/// The life of a task. `queued` and `running` are the only states a task
/// leaves; the others are final and a record never moves out of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted and waiting on the queue (also between retries).
    Queued,
    /// A worker is running it.
    Running,
    /// Finished without error.
    Succeeded,
    /// Finished with an error that retrying will not fix, or out of attempts
    /// for a task that is not dead-lettered.
    Failed,
    /// The last attempt hit its hard timeout.
    TimedOut,
    /// Cancelled by a client.
    Cancelled,
    /// Could not be processed; its message sits on the dead-letter stream.
    DeadLettered,
}

impl TaskState {
    /// All states, in life-cycle order.
    pub const ALL: [TaskState; 7] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
        TaskState::Cancelled,
        TaskState::DeadLettered,
    ];

    /// Whether the task has reached a final state.
    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }

    /// The wire name (`queued`, `timed_out`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Cancelled => "cancelled",
            TaskState::DeadLettered => "dead_lettered",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong with a task, in a form a program can branch on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskError {
    /// A stable, snake_case code such as `timeout`, `executor_not_found`,
    /// `nonzero_exit`, `claude_error`, `memory_limit`.
    pub code: String,
    /// A sentence for a person.
    pub message: String,
}

impl TaskError {
    /// Builds an error from a code and a message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The output of a finished attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// The main output: Claude's final answer, the command's standard
    /// output, or the echoed prompt.
    pub output: String,
    /// Which executor produced it (`claude`, `command`, `echo`).
    pub executor: String,
    /// The process exit code, for process executors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Standard error, capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// True when `output` or `stderr` was cut at the configured cap.
    #[serde(default)]
    pub truncated: bool,
    /// Wall time of the attempt in milliseconds.
    pub duration_ms: u64,
    /// Claude Code's reported cost in US dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Claude Code's number of turns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_turns: Option<u32>,
    /// Claude Code's session id, to resume the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// One attempt at running a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// The worker that ran it.
    pub worker_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended; absent while running or when the worker died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The state this attempt ended in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<TaskState>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
}

/// A task's state as the store keeps it and the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRecord {
    /// Format version; see [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The task id.
    pub id: TaskId,
    /// Where the task is in its life.
    pub state: TaskState,
    /// The task as submitted.
    pub prompt: String,
    /// 1 to 10; 10 runs first.
    pub priority: u8,
    /// Hard limit for one attempt in milliseconds, if the task set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts before the task is dead-lettered.
    pub max_attempts: u32,
    /// Caller's metadata.
    pub metadata: Map<String, Value>,
    /// The idempotency key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// When the task was accepted.
    pub created_at: DateTime<Utc>,
    /// When the task was last put on the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<DateTime<Utc>>,
    /// When the current or last attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the task reached its final state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// When the record last changed.
    pub updated_at: DateTime<Utc>,
    /// Number of attempts started so far.
    pub attempts: u32,
    /// Every attempt, oldest first.
    #[serde(default)]
    pub attempt_history: Vec<Attempt>,
    /// The worker running, or that last ran, the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// The output, once the task succeeded (or failed with output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    /// Why the task did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// Executions that finished after the record was already final (a
    /// redelivery after a crash): counted, never written over the result.
    #[serde(default)]
    pub duplicate_executions: u32,
    /// Trace context, if the submitter sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

impl TaskRecord {
    /// The `queued` record of a freshly accepted task.
    pub fn queued(msg: &TaskMessage, now: DateTime<Utc>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            id: msg.id,
            state: TaskState::Queued,
            prompt: msg.prompt.clone(),
            priority: msg.priority,
            timeout_ms: msg.timeout_ms,
            max_attempts: msg.max_attempts,
            metadata: msg.metadata.clone(),
            idempotency_key: msg.idempotency_key.clone(),
            created_at: msg.created_at,
            queued_at: Some(now),
            started_at: None,
            finished_at: None,
            updated_at: now,
            attempts: 0,
            attempt_history: Vec::new(),
            worker_id: None,
            result: None,
            error: None,
            duplicate_executions: 0,
            trace: msg.trace.clone(),
        }
    }

    /// The message that (re)enqueues this task.
    pub fn to_message(&self) -> TaskMessage {
        TaskMessage {
            schema_version: SCHEMA_VERSION,
            id: self.id,
            prompt: self.prompt.clone(),
            priority: self.priority,
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts,
            metadata: self.metadata.clone(),
            idempotency_key: self.idempotency_key.clone(),
            created_at: self.created_at,
            trace: self.trace.clone(),
        }
    }
}

/// The limits a task must respect, from configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskLimits {
    /// Longest prompt, in characters (Unicode scalar values).
    pub max_prompt_chars: usize,
    /// Largest metadata object, in bytes of compact JSON.
    pub max_metadata_bytes: usize,
    /// Longest idempotency key, in bytes.
    pub max_idempotency_key_len: usize,
    /// Attempts for a task that does not say.
    pub default_max_attempts: u32,
    /// Most attempts a task may ask for.
    pub max_attempts_limit: u32,
    /// Longest per-task timeout a task may ask for, in milliseconds.
    pub max_timeout_ms: u64,
    /// Most tasks in one batch submit.
    pub max_batch: usize,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            max_prompt_chars: 100_000,
            max_metadata_bytes: 16 * 1024,
            max_idempotency_key_len: 256,
            default_max_attempts: 3,
            max_attempts_limit: 25,
            max_timeout_ms: 24 * 60 * 60 * 1000,
            max_batch: 1000,
        }
    }
}

/// A rule a submitted or published task broke, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The offending field, as a JSON path (`prompt`, `tasks[3].priority`).
    pub field: String,
    /// Which rule it broke.
    pub message: String,
    /// What kind of rule, for the HTTP status.
    pub kind: ValidationKind,
}

/// Kinds of validation failure; the intake maps them to status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationKind {
    /// A value outside its allowed range or shape (422).
    Invalid,
    /// A value larger than its limit (413).
    TooLarge,
}

impl ValidationError {
    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
            kind: ValidationKind::Invalid,
        }
    }

    fn too_large(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
            kind: ValidationKind::TooLarge,
        }
    }

    /// Prefixes the field with a parent path, for batch items.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl NewTask {
    /// Checks the submitted task against `limits` and turns it into the
    /// message to publish, with a fresh UUIDv7 id.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the first field that breaks a rule.
    pub fn into_message(
        self,
        limits: &TaskLimits,
        now: DateTime<Utc>,
    ) -> Result<TaskMessage, ValidationError> {
        let msg = TaskMessage {
            schema_version: SCHEMA_VERSION,
            id: Uuid::now_v7(),
            prompt: self.prompt,
            priority: self.priority.unwrap_or(DEFAULT_PRIORITY),
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts.unwrap_or(limits.default_max_attempts),
            metadata: self.metadata.unwrap_or_default(),
            idempotency_key: self.idempotency_key,
            created_at: now,
            trace: self.trace,
        };
        msg.validate(limits)?;
        Ok(msg)
    }
}

impl TaskMessage {
    /// Checks every rule of the wire contract that JSON typing alone does not.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the first field that breaks a rule.
    pub fn validate(&self, limits: &TaskLimits) -> Result<(), ValidationError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(ValidationError::invalid(
                "schema_version",
                format!("must be {SCHEMA_VERSION}"),
            ));
        }
        if self.prompt.trim().is_empty() {
            return Err(ValidationError::invalid(
                "prompt",
                "must not be empty or only whitespace",
            ));
        }
        // Count characters only when the byte length could exceed the limit:
        // a UTF-8 character is at least one byte.
        if self.prompt.len() > limits.max_prompt_chars
            && self.prompt.chars().count() > limits.max_prompt_chars
        {
            return Err(ValidationError::too_large(
                "prompt",
                format!("must be at most {} characters", limits.max_prompt_chars),
            ));
        }
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(ValidationError::invalid(
                "priority",
                format!("must be between {MIN_PRIORITY} and {MAX_PRIORITY}"),
            ));
        }
        if let Some(t) = self.timeout_ms
            && (t == 0 || t > limits.max_timeout_ms)
        {
            return Err(ValidationError::invalid(
                "timeout_ms",
                format!("must be between 1 and {}", limits.max_timeout_ms),
            ));
        }
        if self.max_attempts == 0 || self.max_attempts > limits.max_attempts_limit {
            return Err(ValidationError::invalid(
                "max_attempts",
                format!("must be between 1 and {}", limits.max_attempts_limit),
            ));
        }
        if !self.metadata.is_empty() {
            // Serializing a Map<String, Value> cannot fail.
            let size = serde_json::to_vec(&self.metadata).map_or(0, |v| v.len());
            if size > limits.max_metadata_bytes {
                return Err(ValidationError::too_large(
                    "metadata",
                    format!(
                        "must be at most {} bytes of JSON",
                        limits.max_metadata_bytes
                    ),
                ));
            }
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > limits.max_idempotency_key_len)
        {
            return Err(ValidationError::invalid(
                "idempotency_key",
                format!("must be 1 to {} bytes long", limits.max_idempotency_key_len),
            ));
        }
        Ok(())
    }

    /// The effective hard timeout for an attempt: the task's own, when it is
    /// smaller than the worker's maximum.
    pub fn effective_timeout_ms(&self, worker_max_ms: u64) -> u64 {
        self.timeout_ms
            .map_or(worker_max_ms, |t| t.min(worker_max_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_task(prompt: &str) -> NewTask {
        NewTask {
            prompt: prompt.to_owned(),
            ..NewTask::default()
        }
    }

    #[test]
    fn defaults_are_applied() {
        let msg = new_task("hi")
            .into_message(&TaskLimits::default(), Utc::now())
            .unwrap();
        assert_eq!(msg.priority, DEFAULT_PRIORITY);
        assert_eq!(msg.max_attempts, 3);
        assert_eq!(msg.id.get_version_num(), 7);
    }

    #[test]
    fn each_rule_names_its_field() {
        let limits = TaskLimits {
            max_prompt_chars: 5,
            ..TaskLimits::default()
        };
        let cases = [
            (new_task(" "), "prompt"),
            (new_task("toolong"), "prompt"),
            (
                NewTask {
                    priority: Some(11),
                    ..new_task("a")
                },
                "priority",
            ),
            (
                NewTask {
                    priority: Some(0),
                    ..new_task("a")
                },
                "priority",
            ),
            (
                NewTask {
                    timeout_ms: Some(0),
                    ..new_task("a")
                },
                "timeout_ms",
            ),
            (
                NewTask {
                    max_attempts: Some(0),
                    ..new_task("a")
                },
                "max_attempts",
            ),
            (
                NewTask {
                    idempotency_key: Some(String::new()),
                    ..new_task("a")
                },
                "idempotency_key",
            ),
        ];
        for (task, field) in cases {
            let err = task.into_message(&limits, Utc::now()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn prompt_limit_counts_characters_not_bytes() {
        let limits = TaskLimits {
            max_prompt_chars: 3,
            ..TaskLimits::default()
        };
        assert!(new_task("ééé").into_message(&limits, Utc::now()).is_ok());
        let err = new_task("éééé")
            .into_message(&limits, Utc::now())
            .unwrap_err();
        assert_eq!(err.kind, ValidationKind::TooLarge);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<NewTask>(r#"{"prompt":"a","prio":3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `prio`"));
    }

    #[test]
    fn final_states() {
        assert!(!TaskState::Queued.is_final());
        assert!(!TaskState::Running.is_final());
        for s in &TaskState::ALL[2..] {
            assert!(s.is_final());
            assert_eq!(TaskState::parse(s.as_str()), Some(*s));
        }
    }
}
