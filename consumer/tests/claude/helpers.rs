//! The harness: a stand-in model API, the real CLI, and a private temporary
//! directory per test, so the tests run in parallel and leave nothing behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use claudecluster_consumer::executor::claude::ClaudeExecutor;
use claudecluster_consumer::executor::{ExecContext, ExecError, Executor};
use claudecluster_engine::config::{ClaudeSettings, ResourceLimits};
use claudecluster_engine::task::{SCHEMA_VERSION, TaskMessage, TaskResult};
use claudecluster_testkit::model_api::{ModelApi, claude_cli};
use tokio_util::sync::CancellationToken;

/// Long enough for any run that is not meant to time out, on a busy machine.
pub const GENEROUS: Duration = Duration::from_secs(120);

/// One test's world.
pub struct Harness {
    pub api: ModelApi,
    pub settings: ClaudeSettings,
    pub work_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A stand-in model API and settings that point the real CLI at it.
    pub async fn start() -> Harness {
        let api = ModelApi::start().await;
        let settings = ClaudeSettings {
            binary: claude_cli().to_string_lossy().into_owned(),
            env: api.cli_env(),
            ..ClaudeSettings::default()
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let work_dir = dir.path().join("work");
        std::fs::create_dir(&work_dir).expect("a fresh working directory");
        Harness {
            api,
            settings,
            work_dir,
            _dir: dir,
        }
    }

    /// A directory of this test's own for scripts and notes, outside the
    /// working directory.
    pub fn scratch(&self) -> &Path {
        self._dir.path()
    }

    /// An attempt context with the default resource limits.
    pub fn ctx(&self, timeout: Duration) -> ExecContext {
        ExecContext {
            work_dir: self.work_dir.clone(),
            timeout,
            cancel: CancellationToken::new(),
            limits: ResourceLimits::default(),
            max_output_bytes: 1024 * 1024,
        }
    }

    /// Runs `prompt` with the current settings.
    pub async fn run(&self, prompt: &str) -> Result<TaskResult, ExecError> {
        ClaudeExecutor::new(&self.settings)
            .run(&task(prompt), &self.ctx(GENEROUS))
            .await
    }

    /// Writes an executable shell script to the scratch directory and makes
    /// it the CLI the executor starts.
    pub fn use_wrapper(&mut self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.scratch().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("the wrapper script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("an executable wrapper");
        self.settings.binary = path.to_string_lossy().into_owned();
        path
    }
}

/// A task message for `prompt`.
pub fn task(prompt: &str) -> TaskMessage {
    TaskMessage {
        schema_version: SCHEMA_VERSION,
        id: uuid::Uuid::now_v7(),
        prompt: prompt.to_owned(),
        priority: 5,
        timeout_ms: None,
        max_attempts: 1,
        metadata: Default::default(),
        idempotency_key: None,
        created_at: chrono::Utc::now(),
        trace: None,
    }
}

/// A shell word for `path`.
pub fn quoted(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// The processes (other than zombies) whose working directory is `dir`.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect()
}

/// Waits until no process works in `dir` any more, and says which still do
/// if they outlive a generous bound.
pub async fn wait_until_no_processes_in(dir: &Path) -> Result<(), Vec<u32>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_in(dir);
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(left);
        }
        // A killed process needs a moment to be torn down; /proc offers no
        // event to wait on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The error of a failed attempt, whether permanent, and its partial result.
pub fn failure(
    outcome: Result<TaskResult, ExecError>,
) -> (
    bool,
    claudecluster_engine::task::TaskError,
    Option<Box<TaskResult>>,
) {
    match outcome {
        Err(ExecError::Permanent { error, partial }) => (true, error, partial),
        Err(ExecError::Retryable { error, partial, .. }) => (false, error, partial),
        other => panic!("expected a failure with an error code, got {other:?}"),
    }
}
