//! Executors run one attempt of a task and say how it went.
//!
//! [`Executor`] is the seam between the worker runtime (which owns leases,
//! retries and the result store) and the thing that does the work:
//! [`echo`] (tests, benchmarks), [`command`] (a configured program) and
//! [`claude`] (the Claude Code CLI in headless mode). Process executors share
//! [`crate::process`], which applies the timeout, cancellation and resource
//! limits to the task's whole process group.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use claudecluster_engine::config::{ExecutorKind, ResourceLimits, Settings};
use claudecluster_engine::task::{TaskError, TaskMessage, TaskResult};
use tokio_util::sync::CancellationToken;

/// What an attempt gets to work with.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// A fresh, empty directory for this attempt; the runtime removes it
    /// afterwards unless configured to keep it.
    pub work_dir: PathBuf,
    /// The hard timeout of this attempt.
    pub timeout: Duration,
    /// Cancelled when the task is cancelled or the worker must stop now.
    pub cancel: CancellationToken,
    /// Limits for the task's processes.
    pub limits: ResourceLimits,
    /// Cap on captured stdout and stderr, in bytes each.
    pub max_output_bytes: usize,
}

/// Why an attempt did not produce a result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    /// Worth trying again (after `delay`, if given; otherwise the runtime's
    /// backoff).
    #[error("retryable: {error:?}")]
    Retryable {
        /// What went wrong.
        error: TaskError,
        /// A delay the executor asks for (for example a rate limit).
        delay: Option<Duration>,
        /// Output captured before the failure, if any.
        partial: Option<Box<TaskResult>>,
    },
    /// Trying again will not help.
    #[error("permanent: {error:?}")]
    Permanent {
        /// What went wrong.
        error: TaskError,
        /// Output captured before the failure, if any.
        partial: Option<Box<TaskResult>>,
    },
    /// The hard timeout expired; the process group was killed.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// [`ExecContext::cancel`] fired; the process group was killed.
    #[error("cancelled")]
    Cancelled,
}

/// Runs one attempt of a task.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// The configuration name (`echo`, `command`, `claude`).
    fn name(&self) -> &'static str;

    /// Whether the task needs a fresh working directory. Executors that
    /// start no process say no, and the runtime skips creating one; their
    /// [`ExecContext::work_dir`] then names a directory that does not exist.
    fn needs_work_dir(&self) -> bool {
        true
    }

    /// Runs the task once.
    ///
    /// # Errors
    /// An [`ExecError`] saying whether a retry may help.
    async fn run(&self, task: &TaskMessage, ctx: &ExecContext) -> Result<TaskResult, ExecError>;
}

pub mod claude;
pub mod command;
pub mod echo;

/// A worker configuration that names an executor it cannot build.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorConfigError {
    /// `worker.executor` is `command` but `worker.command` (`TASK_COMMAND`)
    /// is empty.
    #[error("the command executor needs a program: set TASK_COMMAND (worker.command)")]
    EmptyCommand,
}

/// The executor `settings.worker.executor` names; `echo` when it names none
/// (the all-in-one command decides between `claude` and `echo` itself).
///
/// # Errors
/// An [`ExecutorConfigError`] when the configuration is incomplete.
pub fn from_settings(settings: &Settings) -> Result<Arc<dyn Executor>, ExecutorConfigError> {
    match settings.worker.executor.unwrap_or_default() {
        ExecutorKind::Echo => Ok(Arc::new(echo::EchoExecutor)),
        ExecutorKind::Command => Ok(Arc::new(command::CommandExecutor::new(
            &settings.worker.command,
        )?)),
        ExecutorKind::Claude => Ok(Arc::new(claude::ClaudeExecutor::new(
            &settings.worker.claude,
        ))),
    }
}
