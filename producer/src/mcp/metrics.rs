//! Metrics of the MCP tools, on the process-wide recorder next to the
//! intake's HTTP metrics.
//!
//! - `claudecluster_mcp_tool_calls_total{tool,outcome}`: `outcome` is `ok`,
//!   `rejected` (the caller's mistake: bad arguments, unknown task),
//!   `failed` (a dependency failed) or `cancelled` (the client went away or
//!   cancelled the request). Unknown tool names count as `tool="unknown"`,
//!   so a client cannot grow the number of series.
//! - `claudecluster_mcp_waits_in_progress`: `wait_for_task` calls blocking
//!   right now in this process.

use std::sync::Once;

use metrics::{counter, describe_counter, describe_gauge, gauge};

use super::tools::ToolName;

/// Tool calls by tool and outcome.
pub const TOOL_CALLS: &str = "claudecluster_mcp_tool_calls_total";
/// `wait_for_task` calls in progress.
pub const WAITS_IN_PROGRESS: &str = "claudecluster_mcp_waits_in_progress";

/// How a tool call ended, for [`TOOL_CALLS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The tool did what was asked.
    Ok,
    /// The caller's mistake: bad arguments, an unknown task or tool.
    Rejected,
    /// The queue or the store failed.
    Failed,
    /// The client cancelled the request or went away.
    Cancelled,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

static DESCRIBE: Once = Once::new();

/// Describes the MCP metrics once per process and makes them appear on the
/// first scrape.
pub fn describe() {
    DESCRIBE.call_once(|| {
        describe_counter!(
            TOOL_CALLS,
            "MCP tool calls by tool and outcome (ok, rejected, failed, cancelled)."
        );
        describe_gauge!(
            WAITS_IN_PROGRESS,
            "wait_for_task calls blocking in this process."
        );
        gauge!(WAITS_IN_PROGRESS).set(0.0);
    });
}

/// Counts one tool call; `None` is a tool this server does not have.
pub fn tool_call(tool: Option<ToolName>, outcome: Outcome) {
    let tool = tool.map_or("unknown", ToolName::as_str);
    counter!(TOOL_CALLS, "tool" => tool, "outcome" => outcome.as_str()).increment(1);
}

/// Marks a `wait_for_task` call as blocking until the guard is dropped.
pub fn wait_started() -> WaitGuard {
    gauge!(WAITS_IN_PROGRESS).increment(1.0);
    WaitGuard(())
}

/// Decrements [`WAITS_IN_PROGRESS`] when dropped, however the wait ends
/// (including the request future being dropped).
#[derive(Debug)]
pub struct WaitGuard(());

impl Drop for WaitGuard {
    fn drop(&mut self) {
        gauge!(WAITS_IN_PROGRESS).decrement(1.0);
    }
}
