//! The `command` executor: runs the operator's configured program
//! (`TASK_COMMAND`) with the prompt on standard input, never through a
//! shell, in the task's working directory and under its limits.
//!
//! The program sees the worker's environment plus `CLAUDECLUSTER_TASK_ID`
//! and `CLAUDECLUSTER_WORK_DIR`.

use std::ffi::OsString;
use std::path::PathBuf;

use async_trait::async_trait;
use claudecluster_engine::task::{TaskError, TaskMessage, TaskResult};

use super::{ExecContext, ExecError, Executor, ExecutorConfigError};
use crate::process::{ProcessOutput, ProcessSpec, run_process};

/// Runs a configured program per task.
#[derive(Debug, Clone)]
pub struct CommandExecutor {
    program: PathBuf,
    args: Vec<OsString>,
}

impl CommandExecutor {
    /// An executor running `argv[0]` with the rest as arguments.
    ///
    /// # Errors
    /// [`ExecutorConfigError::EmptyCommand`] when `argv` is empty.
    pub fn new(argv: &[String]) -> Result<Self, ExecutorConfigError> {
        let (program, args) = argv
            .split_first()
            .filter(|(p, _)| !p.is_empty())
            .ok_or(ExecutorConfigError::EmptyCommand)?;
        Ok(Self {
            program: PathBuf::from(program),
            args: args.iter().map(OsString::from).collect(),
        })
    }
}

#[async_trait]
impl Executor for CommandExecutor {
    fn name(&self) -> &'static str {
        "command"
    }

    async fn run(&self, task: &TaskMessage, ctx: &ExecContext) -> Result<TaskResult, ExecError> {
        let spec = ProcessSpec {
            program: self.program.clone(),
            args: self.args.clone(),
            env: vec![
                ("CLAUDECLUSTER_TASK_ID".into(), task.id.to_string().into()),
                (
                    "CLAUDECLUSTER_WORK_DIR".into(),
                    ctx.work_dir.clone().into_os_string(),
                ),
            ],
            clear_env: false,
            stdin: task.prompt.as_bytes().to_vec(),
        };
        let output = run_process(spec, ctx).await?;
        outcome(output)
    }
}

/// Turns how the program ended into the attempt's outcome.
fn outcome(output: ProcessOutput) -> Result<TaskResult, ExecError> {
    let exit_code = output.exit_code;
    let signal = output.signal;
    let mut result = output.into_partial_result();
    result.executor = "command".into();
    match (exit_code, signal) {
        (Some(0), _) => Ok(result),
        (Some(code), _) => Err(ExecError::Permanent {
            error: TaskError::new(
                "nonzero_exit",
                format!("the command exited with status {code}"),
            ),
            partial: Some(Box::new(result)),
        }),
        // Killed from outside (not by one of our limits, which run_process
        // reports itself): an OOM killer or an operator; it may work next
        // time.
        (None, sig) => Err(ExecError::Retryable {
            error: TaskError::new(
                "killed_by_signal",
                format!(
                    "the command was killed by signal {}",
                    sig.map_or_else(|| "?".to_owned(), |s| s.to_string())
                ),
            ),
            delay: None,
            partial: Some(Box::new(result)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use claudecluster_engine::config::ResourceLimits;
    use tokio_util::sync::CancellationToken;

    use super::*;

    fn ctx(dir: &std::path::Path) -> ExecContext {
        ExecContext {
            work_dir: dir.to_path_buf(),
            timeout: Duration::from_secs(10),
            cancel: CancellationToken::new(),
            limits: ResourceLimits {
                max_memory_mb: None,
                max_cpu_cores: None,
                disk_quota_mb: None,
            },
            max_output_bytes: 1024,
        }
    }

    fn task(prompt: &str) -> TaskMessage {
        TaskMessage {
            schema_version: 1,
            id: uuid::Uuid::now_v7(),
            prompt: prompt.into(),
            priority: 5,
            timeout_ms: None,
            max_attempts: 3,
            metadata: Default::default(),
            idempotency_key: None,
            created_at: chrono::Utc::now(),
            trace: None,
        }
    }

    fn sh(script: &str) -> CommandExecutor {
        CommandExecutor::new(&["/bin/sh".into(), "-c".into(), script.into()]).unwrap()
    }

    #[test]
    fn empty_command_is_a_configuration_error() {
        assert!(matches!(
            CommandExecutor::new(&[]),
            Err(ExecutorConfigError::EmptyCommand)
        ));
    }

    #[tokio::test]
    async fn prompt_goes_to_stdin_and_stdout_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let exec = CommandExecutor::new(&["cat".into()]).unwrap();
        let result = exec.run(&task("héllo"), &ctx(dir.path())).await.unwrap();
        assert_eq!(result.output, "héllo");
        assert_eq!(result.exit_code, Some(0));
        assert_eq!(result.executor, "command");
    }

    #[tokio::test]
    async fn runs_in_the_work_dir_with_the_task_id() {
        let dir = tempfile::tempdir().unwrap();
        let t = task("x");
        let result = sh("pwd; echo $CLAUDECLUSTER_TASK_ID")
            .run(&t, &ctx(dir.path()))
            .await
            .unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        assert_eq!(
            result.output,
            format!("{}\n{}\n", canonical.display(), t.id)
        );
    }

    #[tokio::test]
    async fn nonzero_exit_is_permanent_and_keeps_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let err = sh("echo partial; echo oops >&2; exit 3")
            .run(&task("x"), &ctx(dir.path()))
            .await
            .unwrap_err();
        let ExecError::Permanent { error, partial } = err else {
            panic!("expected permanent, got {err:?}");
        };
        assert_eq!(error.code, "nonzero_exit");
        let partial = partial.unwrap();
        assert_eq!(partial.exit_code, Some(3));
        assert_eq!(partial.output, "partial\n");
        assert_eq!(partial.stderr.as_deref(), Some("oops\n"));
    }

    #[tokio::test]
    async fn killed_by_a_signal_is_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let err = sh("kill -9 $$")
            .run(&task("x"), &ctx(dir.path()))
            .await
            .unwrap_err();
        let ExecError::Retryable { error, .. } = err else {
            panic!("expected retryable, got {err:?}");
        };
        assert_eq!(error.code, "killed_by_signal");
    }

    #[tokio::test]
    async fn missing_program_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let exec = CommandExecutor::new(&["no-such-program-cc".into()]).unwrap();
        let err = exec.run(&task("x"), &ctx(dir.path())).await.unwrap_err();
        let ExecError::Permanent { error, .. } = err else {
            panic!("expected permanent, got {err:?}");
        };
        assert_eq!(error.code, "executor_not_found");
    }

    #[tokio::test]
    async fn output_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let result = sh("head -c 100000 /dev/zero | tr '\\0' a")
            .run(&task("x"), &ctx(dir.path()))
            .await
            .unwrap();
        assert_eq!(result.output.len(), 1024);
        assert!(result.truncated);
    }

    #[tokio::test]
    async fn cancellation_kills_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        let cancel = c.cancel.clone();
        let run = sh("sleep 30");
        let t = task("x");
        let (res, ()) = tokio::join!(run.run(&t, &c), async { cancel.cancel() });
        assert!(matches!(res, Err(ExecError::Cancelled)), "{res:?}");
    }
}
