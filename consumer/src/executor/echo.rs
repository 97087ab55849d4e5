//! The `echo` executor: answers with the prompt. No process, no working
//! directory; it measures the runtime and the backends, and tests them.

use async_trait::async_trait;
use claudecluster_engine::task::{TaskMessage, TaskResult};

use super::{ExecContext, ExecError, Executor};

/// Answers every task with its prompt.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoExecutor;

#[async_trait]
impl Executor for EchoExecutor {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    async fn run(&self, task: &TaskMessage, _ctx: &ExecContext) -> Result<TaskResult, ExecError> {
        Ok(TaskResult {
            output: task.prompt.clone(),
            executor: "echo".into(),
            ..TaskResult::default()
        })
    }
}
