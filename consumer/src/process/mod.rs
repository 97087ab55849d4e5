//! Runs a task's program as the leader of its own process group, so a
//! timeout or a cancellation kills everything it started, not just the
//! direct child. Captures stdout and stderr up to a cap, draining the rest so
//! the child never blocks on a full pipe. Resource limits are applied to the
//! whole tree and reported by name ([`limits`]).

mod cgroup;
mod limits;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use claudecluster_engine::task::{TaskError, TaskResult};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use self::limits::{Enforcement, LimitHit};
use crate::executor::{ExecContext, ExecError};
use crate::launcher;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The program: a path, or a name looked up on `PATH`.
    pub program: PathBuf,
    /// Its arguments; never passed through a shell.
    pub args: Vec<OsString>,
    /// Environment variables to set.
    pub env: Vec<(OsString, OsString)>,
    /// Start from an empty environment (then only `env` is set).
    pub clear_env: bool,
    /// Written to standard input, which is then closed.
    pub stdin: Vec<u8>,
}

/// How the program ended.
#[derive(Debug, Clone)]
pub struct ProcessOutput {
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Standard output, up to the cap.
    pub stdout: Vec<u8>,
    /// Standard error, up to the cap.
    pub stderr: Vec<u8>,
    /// Whether stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Wall time.
    pub duration: Duration,
}

/// Runs `spec` in `ctx.work_dir` under `ctx`'s timeout, cancellation and
/// resource limits.
///
/// # Errors
/// - [`ExecError::Permanent`] with code `executor_not_found` when the program
///   does not exist, `spawn_failed` when it cannot be started;
/// - [`ExecError::Permanent`] with code `memory_limit`, `disk_quota` or
///   `cpu_time_limit` when the task went over that limit (the partial result
///   keeps its output);
/// - [`ExecError::TimedOut`] or [`ExecError::Cancelled`] after the process
///   group was killed.
pub async fn run_process(spec: ProcessSpec, ctx: &ExecContext) -> Result<ProcessOutput, ExecError> {
    let program = resolve_program(&spec)?;
    let enforcement = Enforcement::plan(&ctx.limits, ctx.timeout, &ctx.work_dir);
    let result = run_enforced(spec, &program, ctx, &enforcement).await;
    enforcement.cleanup().await;
    result
}

async fn run_enforced(
    spec: ProcessSpec,
    program: &Path,
    ctx: &ExecContext,
    enforcement: &Enforcement,
) -> Result<ProcessOutput, ExecError> {
    let started = Instant::now();
    let (exe, args) = enforcement.command(program, &spec.args);
    let mut cmd = Command::new(&exe);
    cmd.args(&args)
        .current_dir(&ctx.work_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if spec.clear_env {
        cmd.env_clear();
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));

    let mut child = cmd.spawn().map_err(|e| {
        let (code, what) = if e.kind() == std::io::ErrorKind::NotFound {
            ("executor_not_found", "not found")
        } else {
            ("spawn_failed", "could not be started")
        };
        permanent(code, format!("program {} {what}: {e}", exe.display()), None)
    })?;
    // The child leads its own group, so its pid is the group id. A pid fits
    // in i32 on every platform tokio supports.
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));

    // Feed stdin concurrently: a large prompt must not deadlock against a
    // child that writes before it reads.
    let stdin = child.stdin.take();
    let input = spec.stdin;
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A child that exits without reading its input is not an error.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
    };
    let stdout = read_capped(child.stdout.take(), ctx.max_output_bytes);
    let stderr = read_capped(child.stderr.take(), ctx.max_output_bytes);
    let run = async {
        let ((), out, err, status) = tokio::join!(feed, stdout, stderr, child.wait());
        (out, err, status)
    };
    tokio::pin!(run);

    let limit_error = |hit: LimitHit, output: Option<ProcessOutput>| {
        let partial = output.map(|o| Box::new(o.into_partial_result()));
        permanent(hit.code(), hit.message(&ctx.limits, ctx.timeout), partial)
    };

    tokio::select! {
        (out, err, status) = &mut run => {
            // Whatever the leader left behind in its group goes too.
            kill_group(pgid);
            let status = status.map_err(|e| ExecError::Retryable {
                error: TaskError::new("wait_failed", format!("waiting for the task process failed: {e}")),
                delay: None,
                partial: None,
            })?;
            let output = ProcessOutput::new(status, out, err, started.elapsed());
            if output.exit_code == Some(launcher::EXIT_LAUNCH_FAILED)
                && output.stderr.starts_with(launcher::ERROR_PREFIX.as_bytes())
            {
                let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
                return Err(permanent("spawn_failed", message, None));
            }
            match enforcement.classify(output.exit_code, output.signal, &output.stderr) {
                Some(hit) => Err(limit_error(hit, Some(output))),
                None => Ok(output),
            }
        }
        hit = enforcement.watch(pgid) => {
            kill_group(pgid);
            // The pipes close once the group is gone; keep what it wrote, but
            // do not wait on a process that escaped the group and holds them.
            let output = tokio::time::timeout(Duration::from_secs(1), &mut run)
                .await
                .ok()
                .and_then(|(out, err, status)| {
                    status.ok().map(|s| ProcessOutput::new(s, out, err, started.elapsed()))
                });
            Err(limit_error(hit, output))
        }
        () = tokio::time::sleep(ctx.timeout) => {
            kill_group(pgid);
            Err(ExecError::TimedOut(ctx.timeout))
        }
        () = ctx.cancel.cancelled() => {
            kill_group(pgid);
            Err(ExecError::Cancelled)
        }
    }
}

impl ProcessOutput {
    fn new(
        status: std::process::ExitStatus,
        out: (Vec<u8>, bool),
        err: (Vec<u8>, bool),
        duration: Duration,
    ) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ProcessOutput {
            exit_code: status.code(),
            signal: status.signal(),
            stdout: out.0,
            stdout_truncated: out.1,
            stderr: err.0,
            stderr_truncated: err.1,
            duration,
        }
    }

    /// The output as a task result (stdout as the output, lossy UTF-8), for
    /// failures that keep what the program printed. The executor name is
    /// left empty for the caller to fill in.
    pub fn into_partial_result(self) -> TaskResult {
        TaskResult {
            output: String::from_utf8_lossy(&self.stdout).into_owned(),
            executor: String::new(),
            exit_code: self.exit_code,
            stderr: Some(String::from_utf8_lossy(&self.stderr).into_owned()),
            truncated: self.stdout_truncated || self.stderr_truncated,
            duration_ms: u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            ..TaskResult::default()
        }
    }
}

fn permanent(code: &str, message: String, partial: Option<Box<TaskResult>>) -> ExecError {
    ExecError::Permanent {
        error: TaskError::new(code, message),
        partial,
    }
}

/// Finds the program the way `execvp` would, with the child's `PATH`, so a
/// missing program is reported before anything starts (the launcher would
/// otherwise find out only after the spawn).
fn resolve_program(spec: &ProcessSpec) -> Result<PathBuf, ExecError> {
    let not_found = || {
        permanent(
            "executor_not_found",
            format!("program {} not found", spec.program.display()),
            None,
        )
    };
    if spec.program.as_os_str().as_bytes().contains(&b'/') {
        return if spec.program.exists() {
            Ok(spec.program.clone())
        } else {
            Err(not_found())
        };
    }
    let path_var = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| {
            if spec.clear_env {
                None
            } else {
                std::env::var_os("PATH")
            }
        })
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(&spec.program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(not_found)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn kill_group(pgid: Option<Pid>) {
    if let Some(pgid) = pgid {
        // ESRCH means the group is already gone, which is what we want.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

/// Reads a pipe to its end, keeping at most `cap` bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}
