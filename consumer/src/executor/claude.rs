//! The `claude` executor: runs the Claude Code CLI headless, one process per
//! attempt, and turns its JSON result into a [`TaskResult`].
//!
//! The CLI runs as `<binary> -p --output-format json [--model …]
//! [--max-turns …] [--permission-mode …] [--allowedTools …]` in the attempt's
//! fresh working directory. The prompt goes on standard input, never on the
//! command line, where any local user could read it. The environment is
//! cleared: only the variables named in `env_allowlist` pass through from the
//! worker's own, the fixed `env` values are added, and `HOME` points at a
//! directory inside the working directory, so the configuration and session
//! files the CLI writes go away with the attempt.
//!
//! How the result maps onto errors is in [`interpret`]; the result document
//! itself is read by [`CliResult::parse`] (both in [`result`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use claudecluster_engine::config::ClaudeSettings;
use claudecluster_engine::task::{TaskError, TaskMessage, TaskResult};
use tracing::instrument;

pub use self::result::{CliResult, ParseError, interpret};
use crate::executor::{ExecContext, ExecError, Executor};
use crate::process::{ProcessSpec, run_process};

mod result;

/// The directory inside the working directory that the CLI gets as `HOME`.
pub const HOME_DIR: &str = ".claude-home";

/// Runs tasks with the Claude Code CLI.
#[derive(Debug, Clone)]
pub struct ClaudeExecutor {
    settings: ClaudeSettings,
    program: PathBuf,
}

impl ClaudeExecutor {
    /// An executor for `settings`. A `binary` that contains a `/` is a path
    /// (relative ones are taken from the worker's current directory, not the
    /// task's); anything else is looked up on the `PATH` the CLI gets.
    pub fn new(settings: &ClaudeSettings) -> ClaudeExecutor {
        let binary = PathBuf::from(&settings.binary);
        let program = if settings.binary.contains('/') {
            // The task runs in its own directory, so a relative path must be
            // pinned now; if the current directory is gone the path stays
            // relative and the spawn reports it missing.
            std::path::absolute(&binary).unwrap_or(binary)
        } else {
            binary
        };
        ClaudeExecutor {
            settings: settings.clone(),
            program,
        }
    }

    /// The CLI's arguments; the prompt is not among them.
    pub fn args(&self) -> Vec<OsString> {
        let s = &self.settings;
        let mut args: Vec<OsString> = vec!["-p".into(), "--output-format".into(), "json".into()];
        if let Some(model) = &s.model {
            args.extend(["--model".into(), model.into()]);
        }
        if let Some(turns) = s.max_turns {
            args.extend(["--max-turns".into(), turns.to_string().into()]);
        }
        if let Some(mode) = &s.permission_mode {
            args.extend(["--permission-mode".into(), mode.into()]);
        }
        if !s.allowed_tools.is_empty() {
            // One value per tool, the documented form: a rule such as
            // `Bash(git diff *)` has spaces and commas of its own. The option
            // takes values up to the next `-` argument, so it comes last.
            args.push("--allowedTools".into());
            args.extend(s.allowed_tools.iter().map(OsString::from));
        }
        args
    }

    /// The CLI's whole environment: the allow-listed variables the worker
    /// has, then the fixed values, then `HOME`.
    pub fn env(&self, home: &Path) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = self
            .settings
            .env_allowlist
            .iter()
            .filter(|name| !self.settings.env.contains_key(*name) && *name != "HOME")
            .filter_map(|name| std::env::var_os(name).map(|value| (name.into(), value)))
            .collect();
        env.extend(
            self.settings
                .env
                .iter()
                .filter(|(name, _)| *name != "HOME")
                .map(|(name, value)| (name.into(), value.into())),
        );
        env.push(("HOME".into(), home.as_os_str().to_owned()));
        env
    }

    /// Says how to get the CLI when it is missing; other errors pass.
    fn explain(&self, error: ExecError) -> ExecError {
        match error {
            ExecError::Permanent { error, partial } if error.code == "executor_not_found" => {
                ExecError::Permanent {
                    error: TaskError::new(
                        "executor_not_found",
                        format!(
                            "the Claude Code CLI `{}` was not found on the worker: install it \
                             (npm install -g @anthropic-ai/claude-code) or set CLAUDE_BIN to its path",
                            self.settings.binary
                        ),
                    ),
                    partial,
                }
            }
            ExecError::Permanent { error, partial } => ExecError::Permanent {
                error,
                partial: partial.map(with_executor),
            },
            ExecError::Retryable {
                error,
                delay,
                partial,
            } => ExecError::Retryable {
                error,
                delay,
                partial: partial.map(with_executor),
            },
            other => other,
        }
    }
}

fn with_executor(mut partial: Box<TaskResult>) -> Box<TaskResult> {
    partial.executor = "claude".into();
    partial
}

#[async_trait]
impl Executor for ClaudeExecutor {
    fn name(&self) -> &'static str {
        "claude"
    }

    #[instrument(skip_all, fields(task_id = %task.id))]
    async fn run(&self, task: &TaskMessage, ctx: &ExecContext) -> Result<TaskResult, ExecError> {
        let home = ctx.work_dir.join(HOME_DIR);
        tokio::fs::create_dir_all(&home)
            .await
            .map_err(|e| ExecError::Retryable {
                error: TaskError::new(
                    "work_dir_failed",
                    format!("could not create {}: {e}", home.display()),
                ),
                delay: None,
                partial: None,
            })?;
        let spec = ProcessSpec {
            program: self.program.clone(),
            args: self.args(),
            env: self.env(&home),
            clear_env: true,
            stdin: task.prompt.as_bytes().to_vec(),
        };
        let output = run_process(spec, ctx).await.map_err(|e| self.explain(e))?;
        let outcome = interpret(output, self.settings.errors_are_permanent);
        match &outcome {
            Ok(result) => tracing::debug!(
                cost_usd = result.cost_usd,
                num_turns = result.num_turns,
                "Claude Code finished"
            ),
            Err(e) => tracing::debug!(error = %e, "Claude Code failed"),
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_carry_the_settings_but_never_the_prompt() {
        let settings = ClaudeSettings {
            model: Some("claude-test".into()),
            max_turns: Some(4),
            permission_mode: Some("acceptEdits".into()),
            allowed_tools: vec!["Read".into(), "Bash(git diff *)".into()],
            ..ClaudeSettings::default()
        };
        let args = ClaudeExecutor::new(&settings).args();
        let expected = [
            "-p",
            "--output-format",
            "json",
            "--model",
            "claude-test",
            "--max-turns",
            "4",
            "--permission-mode",
            "acceptEdits",
            "--allowedTools",
            "Read",
            "Bash(git diff *)",
        ];
        assert_eq!(args, expected.map(OsString::from));
        assert_eq!(
            ClaudeExecutor::new(&ClaudeSettings::default()).args().len(),
            3
        );
    }

    #[test]
    fn the_environment_is_the_allow_list_the_fixed_values_and_home() {
        let mut settings = ClaudeSettings {
            env_allowlist: vec![
                "PATH".into(),
                "CC_SURELY_UNSET_VARIABLE".into(),
                "HOME".into(),
            ],
            ..ClaudeSettings::default()
        };
        settings
            .env
            .insert("ANTHROPIC_BASE_URL".into(), "http://127.0.0.1:1".into());
        settings.env.insert("HOME".into(), "/elsewhere".into());
        let env = ClaudeExecutor::new(&settings).env(Path::new("/w/.claude-home"));
        let names: Vec<_> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        let mut expected = vec!["ANTHROPIC_BASE_URL", "HOME"];
        if std::env::var_os("PATH").is_some() {
            expected.insert(0, "PATH");
        }
        assert_eq!(names, expected);
        assert_eq!(env.last().unwrap().1, "/w/.claude-home");
    }

    #[test]
    fn a_relative_binary_path_is_pinned_to_the_worker_directory() {
        let settings = ClaudeSettings {
            binary: "bin/claude".into(),
            ..ClaudeSettings::default()
        };
        assert!(ClaudeExecutor::new(&settings).program.is_absolute());
        let settings = ClaudeSettings {
            binary: "claude".into(),
            ..ClaudeSettings::default()
        };
        assert_eq!(
            ClaudeExecutor::new(&settings).program,
            PathBuf::from("claude")
        );
    }
}
