//! Reading Claude Code's JSON result and deciding what it means for the
//! attempt: a [`TaskResult`], or an [`ExecError`] that says whether to retry.

use claudecluster_engine::task::{TaskError, TaskResult};
use serde_json::Value;

use crate::executor::ExecError;
use crate::process::ProcessOutput;

/// How much of stdout or stderr goes into an error message.
const EXCERPT_CHARS: usize = 600;

/// Claude Code's JSON result, read leniently: a field of an unexpected type
/// counts as absent rather than failing the whole document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CliResult {
    /// `success`, `error_max_turns`, `error_during_execution`, …
    pub subtype: Option<String>,
    /// Whether the CLI says the run failed.
    pub is_error: bool,
    /// The final answer, or the CLI's error text.
    pub result: Option<String>,
    /// The conversation id.
    pub session_id: Option<String>,
    /// Cost in US dollars.
    pub total_cost_usd: Option<f64>,
    /// Turns taken.
    pub num_turns: Option<u32>,
    /// The HTTP status of the model API error that ended the run.
    pub api_error_status: Option<u16>,
    /// Why the conversation ended (`completed`, `api_error`, `max_turns`, …).
    pub terminal_reason: Option<String>,
    /// Error texts some subtypes carry (`errors`).
    pub errors: Vec<String>,
    /// How many tool uses were denied permission.
    pub permission_denials: usize,
}

/// Why stdout is not a Claude Code result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Nothing was printed.
    #[error("no output")]
    Empty,
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON, but not a result (a different message type, or an array
    /// without a result in it).
    #[error("JSON but not a result document ({0})")]
    NotAResult(String),
}

impl CliResult {
    /// Reads the CLI's standard output: the result object, or (as older
    /// versions print with `--verbose`) an array of messages ending in one.
    /// Lines before the JSON, such as warnings, are skipped.
    ///
    /// # Errors
    /// A [`ParseError`] saying what was printed instead.
    pub fn parse(stdout: &[u8]) -> Result<CliResult, ParseError> {
        let text = String::from_utf8_lossy(stdout);
        let text = text.trim();
        if text.is_empty() {
            return Err(ParseError::Empty);
        }
        let value = serde_json::from_str::<Value>(text).or_else(|whole| {
            text.lines()
                .rev()
                .map(str::trim)
                .find(|line| line.starts_with('{') || line.starts_with('['))
                .and_then(|line| serde_json::from_str::<Value>(line).ok())
                .ok_or_else(|| ParseError::NotJson(whole.to_string()))
        })?;
        let doc = match &value {
            Value::Array(items) => items
                .iter()
                .rev()
                .find(|item| item["type"] == "result")
                .ok_or_else(|| ParseError::NotAResult("an array without a result".into()))?,
            Value::Object(_) => &value,
            other => {
                return Err(ParseError::NotAResult(format!(
                    "a JSON {}",
                    json_kind(other)
                )));
            }
        };
        match doc.get("type") {
            Some(Value::String(t)) if t == "result" => {}
            // Without a type, the result's own fields must be there.
            None if doc.get("is_error").is_some() || doc.get("subtype").is_some() => {}
            Some(t) => return Err(ParseError::NotAResult(format!("type {t}"))),
            None => return Err(ParseError::NotAResult("an object without a type".into())),
        }
        let text = |key: &str| doc.get(key).and_then(Value::as_str).map(str::to_owned);
        let subtype = text("subtype");
        let is_error = doc
            .get("is_error")
            .and_then(Value::as_bool)
            .unwrap_or_else(|| subtype.as_deref().is_some_and(|s| s.starts_with("error")));
        Ok(CliResult {
            is_error,
            subtype,
            result: text("result"),
            session_id: text("session_id").filter(|s| !s.is_empty()),
            total_cost_usd: doc.get("total_cost_usd").and_then(Value::as_f64),
            num_turns: doc
                .get("num_turns")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok()),
            terminal_reason: text("terminal_reason"),
            api_error_status: doc
                .get("api_error_status")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok()),
            errors: doc
                .get("errors")
                .and_then(Value::as_array)
                .map(|errors| {
                    errors
                        .iter()
                        .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            permission_denials: doc
                .get("permission_denials")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
        })
    }

    /// Whether the run failed: `is_error`, or an `error_*` subtype.
    pub fn failed(&self) -> bool {
        self.is_error
            || self
                .subtype
                .as_deref()
                .is_some_and(|s| s.starts_with("error"))
    }

    /// A sentence about the failure, naming the subtype.
    pub fn describe_failure(&self) -> String {
        let detail = self
            .result
            .iter()
            .chain(&self.errors)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let detail = excerpt(&detail);
        let mut message = match self.subtype.as_deref() {
            Some("error_max_turns") => format!(
                "Claude Code stopped at its turn limit (error_max_turns) after {} turns; \
                 raise worker.claude.max_turns to allow more",
                self.num_turns.map_or_else(|| "?".into(), |n| n.to_string())
            ),
            Some(subtype) if subtype.starts_with("error") => {
                format!("Claude Code failed ({subtype}): {detail}")
            }
            _ => format!("Claude Code reported an error: {detail}"),
        };
        if let Some(status) = self.api_error_status {
            message.push_str(&format!(" (model API status {status})"));
        }
        if self.permission_denials > 0 {
            message.push_str(&format!(
                "; {} tool use(s) were denied permission (see worker.claude.allowed_tools)",
                self.permission_denials
            ));
        }
        message
    }

    /// Whether the failure came from the model API in a way that may clear
    /// up by itself: overload, rate limit, server errors, or no HTTP answer
    /// at all (connection refused, DNS, TLS; the CLI reports those as an
    /// `api_error` without a status, after retrying for minutes). Such a
    /// failure is retried whatever `errors_are_permanent` says, because the
    /// task itself is not at fault.
    pub fn transient(&self) -> bool {
        match self.api_error_status {
            Some(status) => matches!(status, 408 | 409 | 429 | 500..=599),
            None => self.terminal_reason.as_deref() == Some("api_error"),
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The last [`EXCERPT_CHARS`] characters of `text`, trimmed: the end of an
/// error output says the most.
fn excerpt(text: &str) -> String {
    let text = text.trim();
    let count = text.chars().count();
    if count <= EXCERPT_CHARS {
        return text.to_owned();
    }
    let tail: String = text.chars().skip(count - EXCERPT_CHARS).collect();
    format!("…{tail}")
}

/// Whether stderr is the CLI refusing its arguments (an unknown option, an
/// invalid `--permission-mode`, `bypassPermissions` as root): the same
/// settings will be refused again, so the failure is permanent.
fn rejected_its_command_line(stderr: &str) -> bool {
    let stderr = stderr.trim_start();
    // The CLI's option parser starts its messages with `error: option` or
    // `error: unknown option`.
    stderr.starts_with("error: option")
        || stderr.starts_with("error: unknown option")
        || stderr.contains("cannot be used with root/sudo privileges")
}

/// How the process ended, for messages.
fn exit_description(output: &ProcessOutput) -> String {
    match (output.exit_code, output.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended without an exit status".into(),
    }
}

/// Turns the CLI's process output into the attempt's outcome.
///
/// - A result with `is_error: false` and exit code 0: the [`TaskResult`].
/// - A result that failed: `claude_error`, permanent when
///   `errors_are_permanent` unless the model API failed transiently
///   ([`CliResult::transient`]); the partial result keeps the cost and
///   session id.
/// - A successful result but a non-zero exit: `nonzero_exit`, retryable.
/// - No result and a non-zero exit because the CLI refused its arguments:
///   `nonzero_exit`, permanent.
/// - No result and a non-zero exit otherwise (a crash, a signal): `nonzero_exit`,
///   retryable once the runtime's backoff allows, since a crashed CLI (out of
///   memory, a killed helper, a broken pipe to the API) often runs the next
///   time, and `max_attempts` bounds the cost when it does not.
/// - No result and exit 0: `invalid_output`, permanent: the CLI speaks a
///   format this worker does not understand, which a retry will not change.
///
/// # Errors
/// The [`ExecError`]s above.
pub fn interpret(
    output: ProcessOutput,
    errors_are_permanent: bool,
) -> Result<TaskResult, ExecError> {
    let exited_cleanly = output.exit_code == Some(0);
    let parsed = CliResult::parse(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut result = TaskResult {
        output: String::new(),
        executor: "claude".into(),
        exit_code: output.exit_code,
        stderr: (!stderr.trim().is_empty()).then(|| stderr.clone()),
        truncated: output.stdout_truncated || output.stderr_truncated,
        duration_ms: u64::try_from(output.duration.as_millis()).unwrap_or(u64::MAX),
        ..TaskResult::default()
    };
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let stdout = String::from_utf8_lossy(&output.stdout);
            result.output = stdout.clone().into_owned();
            let partial = Some(Box::new(result));
            if !exited_cleanly {
                let said = excerpt(if stderr.trim().is_empty() {
                    &stdout
                } else {
                    &stderr
                });
                let exit = exit_description(&output);
                if rejected_its_command_line(&stderr) {
                    return Err(ExecError::Permanent {
                        error: TaskError::new(
                            "nonzero_exit",
                            format!(
                                "Claude Code {exit} refusing its command line, \
                                 which comes from the worker's claude settings: {said}"
                            ),
                        ),
                        partial,
                    });
                }
                return Err(ExecError::Retryable {
                    error: TaskError::new(
                        "nonzero_exit",
                        format!("Claude Code {exit} without a result: {said}"),
                    ),
                    delay: None,
                    partial,
                });
            }
            let cut = if output.stdout_truncated {
                " (the output was cut at the worker's output cap, max_output_bytes)"
            } else {
                ""
            };
            return Err(ExecError::Permanent {
                error: TaskError::new(
                    "invalid_output",
                    format!(
                        "Claude Code printed no readable result{cut}: {e}: {}",
                        excerpt(&stdout)
                    ),
                ),
                partial,
            });
        }
    };
    result.output = cli.result.clone().unwrap_or_default();
    result.cost_usd = cli.total_cost_usd;
    result.num_turns = cli.num_turns;
    result.session_id = cli.session_id.clone();
    if cli.failed() {
        let error = TaskError::new("claude_error", cli.describe_failure());
        let partial = Some(Box::new(result));
        return Err(if errors_are_permanent && !cli.transient() {
            ExecError::Permanent { error, partial }
        } else {
            ExecError::Retryable {
                error,
                delay: None,
                partial,
            }
        });
    }
    if !exited_cleanly {
        return Err(ExecError::Retryable {
            error: TaskError::new(
                "nonzero_exit",
                format!(
                    "Claude Code reported success but {}: {}",
                    exit_description(&output),
                    excerpt(&stderr)
                ),
            ),
            delay: None,
            partial: Some(Box::new(result)),
        });
    }
    if cli.permission_denials > 0 {
        tracing::warn!(
            denials = cli.permission_denials,
            "Claude Code was denied some tool uses; worker.claude.allowed_tools may be too narrow"
        );
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    /// Trimmed from a real run of Claude Code 2.1 against the stand-in API.
    fn success_doc() -> Value {
        json!({
            "type": "result", "subtype": "success", "is_error": false,
            "result": "stand-in answer: hi", "session_id": "0d406dce-830f-4504-84ae-0baaadedaf17",
            "total_cost_usd": 0.00014, "num_turns": 1, "duration_ms": 91,
            "usage": { "input_tokens": 10, "output_tokens": 5 }, "permission_denials": [],
            "api_error_status": null, "terminal_reason": "completed"
        })
    }

    fn output(stdout: &str, stderr: &str, exit_code: Option<i32>) -> ProcessOutput {
        ProcessOutput {
            exit_code,
            signal: if exit_code.is_none() { Some(9) } else { None },
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration: Duration::from_millis(420),
        }
    }

    fn error_of(e: ExecError) -> (bool, TaskError, Option<Box<TaskResult>>) {
        match e {
            ExecError::Permanent { error, partial } => (true, error, partial),
            ExecError::Retryable { error, partial, .. } => (false, error, partial),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parses_a_success() {
        let cli = CliResult::parse(success_doc().to_string().as_bytes()).unwrap();
        assert!(!cli.failed());
        assert_eq!(cli.result.as_deref(), Some("stand-in answer: hi"));
        assert_eq!(cli.num_turns, Some(1));
        assert_eq!(cli.total_cost_usd, Some(0.00014));
        assert_eq!(cli.api_error_status, None);
    }

    #[test]
    fn parses_unexpected_shapes_leniently() {
        let mut doc = success_doc();
        doc["num_turns"] = json!("three");
        doc["total_cost_usd"] = json!(null);
        doc["session_id"] = json!("");
        doc["result"] = json!({ "nested": true });
        let cli = CliResult::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!((cli.num_turns, cli.total_cost_usd), (None, None));
        assert_eq!((cli.session_id, cli.result), (None, None));

        // Warnings before the document, and the array form of `--verbose`.
        let noisy = format!("warning: something\n{}\n", success_doc());
        assert!(CliResult::parse(noisy.as_bytes()).is_ok());
        let array = json!([{ "type": "system", "subtype": "init" }, success_doc()]).to_string();
        assert_eq!(
            CliResult::parse(array.as_bytes()).unwrap().num_turns,
            Some(1)
        );
        // No `type`, but the result's own fields.
        let bare = json!({ "subtype": "error_max_turns" }).to_string();
        assert!(CliResult::parse(bare.as_bytes()).unwrap().failed());
    }

    #[test]
    fn rejects_what_is_not_a_result() {
        let kind = |stdout: &str| match CliResult::parse(stdout.as_bytes()) {
            Err(ParseError::Empty) => "empty",
            Err(ParseError::NotJson(_)) => "not json",
            Err(ParseError::NotAResult(_)) => "not a result",
            Ok(_) => "parsed",
        };
        assert_eq!(kind(""), "empty");
        assert_eq!(kind("  \n"), "empty");
        assert_eq!(kind("Error: something broke"), "not json");
        assert_eq!(kind("\"just a string\""), "not a result");
        assert_eq!(kind(r#"{"type":"assistant","message":{}}"#), "not a result");
        assert_eq!(kind(r#"[{"type":"system"}]"#), "not a result");
        let err = CliResult::parse(br#"{"hello":1}"#).unwrap_err();
        assert!(matches!(err, ParseError::NotAResult(_)), "{err:?}");
    }

    #[test]
    fn success_becomes_the_task_result() {
        let result = interpret(output(&success_doc().to_string(), "", Some(0)), true).unwrap();
        assert_eq!(result.output, "stand-in answer: hi");
        assert_eq!(result.executor, "claude");
        assert_eq!(
            result.session_id.as_deref(),
            Some("0d406dce-830f-4504-84ae-0baaadedaf17")
        );
        assert_eq!(
            (result.num_turns, result.cost_usd),
            (Some(1), Some(0.00014))
        );
        assert_eq!((result.exit_code, result.duration_ms), (Some(0), 420));
        assert_eq!((result.stderr, result.truncated), (None, false));
    }

    #[test]
    fn an_api_error_is_a_claude_error_with_the_partial_result() {
        let doc = json!({
            "type": "result", "subtype": "success", "is_error": true,
            "result": "API Error: 400 bad request", "session_id": "s-1", "total_cost_usd": 0,
            "num_turns": 1, "api_error_status": 400, "permission_denials": []
        })
        .to_string();
        let (permanent, error, partial) =
            error_of(interpret(output(&doc, "", Some(1)), true).unwrap_err());
        assert!(permanent);
        assert_eq!(error.code, "claude_error");
        assert!(
            error.message.contains("API Error: 400 bad request"),
            "{}",
            error.message
        );
        assert!(error.message.contains("status 400"), "{}", error.message);
        let partial = partial.unwrap();
        assert_eq!(
            (partial.session_id.as_deref(), partial.cost_usd),
            (Some("s-1"), Some(0.0))
        );

        let (permanent, ..) = error_of(interpret(output(&doc, "", Some(1)), false).unwrap_err());
        assert!(
            !permanent,
            "errors_are_permanent = false makes it retryable"
        );

        let unreachable = json!({
            "type": "result", "subtype": "success", "is_error": true,
            "result": "API Error: Connection refused (ECONNREFUSED)", "api_error_status": null,
            "terminal_reason": "api_error"
        })
        .to_string();
        let (permanent, ..) =
            error_of(interpret(output(&unreachable, "", Some(1)), true).unwrap_err());
        assert!(!permanent, "an unreachable API is worth another attempt");

        let overloaded = doc.replace("400", "529");
        let (permanent, error, _) =
            error_of(interpret(output(&overloaded, "", Some(1)), true).unwrap_err());
        assert!(
            !permanent,
            "an overloaded API is worth another attempt: {error:?}"
        );
    }

    #[test]
    fn the_turn_limit_is_named() {
        let doc = json!({
            "type": "result", "subtype": "error_max_turns", "is_error": true,
            "num_turns": 3, "session_id": "s-2", "errors": ["Reached maximum number of turns (2)"],
            "permission_denials": [{ "tool_name": "Bash" }]
        })
        .to_string();
        let (_, error, partial) = error_of(interpret(output(&doc, "", Some(1)), true).unwrap_err());
        assert_eq!(error.code, "claude_error");
        assert!(
            error.message.contains("error_max_turns"),
            "{}",
            error.message
        );
        assert!(error.message.contains("after 3 turns"), "{}", error.message);
        assert!(error.message.contains("denied"), "{}", error.message);
        assert_eq!(partial.unwrap().session_id.as_deref(), Some("s-2"));
    }

    #[test]
    fn a_crash_is_retryable_and_quotes_stderr() {
        let (permanent, error, partial) =
            error_of(interpret(output("", "fatal: out of memory\n", Some(134)), true).unwrap_err());
        assert!(!permanent);
        assert_eq!(error.code, "nonzero_exit");
        assert!(error.message.contains("code 134"), "{}", error.message);
        assert!(
            error.message.contains("fatal: out of memory"),
            "{}",
            error.message
        );
        assert_eq!(
            partial.unwrap().stderr.as_deref(),
            Some("fatal: out of memory\n")
        );

        let (_, error, _) = error_of(interpret(output("", "", None), true).unwrap_err());
        assert!(error.message.contains("signal 9"), "{}", error.message);

        let long = "x".repeat(10_000);
        let (_, error, _) = error_of(interpret(output("", &long, Some(1)), true).unwrap_err());
        assert!(error.message.len() < 1_000, "the message quotes an excerpt");

        let (permanent, error, _) =
            error_of(interpret(output(&success_doc().to_string(), "", Some(2)), true).unwrap_err());
        assert!(!permanent && error.code == "nonzero_exit", "{error:?}");

        let refused = "error: option '--permission-mode <mode>' argument 'nope' is invalid.\n";
        let (permanent, error, _) =
            error_of(interpret(output("", refused, Some(1)), false).unwrap_err());
        assert!(permanent, "the same arguments will be refused again");
        assert!(error.message.contains("argument 'nope'"), "{error:?}");
        let root = "--dangerously-skip-permissions cannot be used with root/sudo privileges";
        let (permanent, _, _) = error_of(interpret(output("", root, Some(1)), true).unwrap_err());
        assert!(permanent);
    }

    #[test]
    fn unreadable_output_is_invalid_output() {
        let (permanent, error, partial) =
            error_of(interpret(output("Hello!", "", Some(0)), false).unwrap_err());
        assert!(permanent);
        assert_eq!(error.code, "invalid_output");
        assert!(error.message.contains("Hello!"), "{}", error.message);
        assert_eq!(partial.unwrap().output, "Hello!");

        let mut cut = output(r#"{"type":"result","result":"abc"#, "", Some(0));
        cut.stdout_truncated = true;
        let (_, error, partial) = error_of(interpret(cut, true).unwrap_err());
        assert!(
            error.message.contains("max_output_bytes"),
            "{}",
            error.message
        );
        assert!(partial.unwrap().truncated);
    }
}
