//! Runs a task's program as the leader of its own process group, so a
//! timeout or a cancellation kills everything it started, not just the
//! direct child. Captures stdout and stderr up to a cap, draining the rest so
//! the child never blocks on a full pipe.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use claudecluster_engine::task::TaskError;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::executor::{ExecContext, ExecError};

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

/// Runs `spec` in `ctx.work_dir` under `ctx`'s timeout and cancellation.
///
/// # Errors
/// - [`ExecError::Permanent`] with code `executor_not_found` when the program
///   does not exist, `spawn_failed` when it cannot be started;
/// - [`ExecError::TimedOut`] or [`ExecError::Cancelled`] after the process
///   group was killed.
pub async fn run_process(spec: ProcessSpec, ctx: &ExecContext) -> Result<ProcessOutput, ExecError> {
    let started = Instant::now();
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
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
        ExecError::Permanent {
            error: TaskError::new(
                code,
                format!("program {} {what}: {e}", spec.program.display()),
            ),
            partial: None,
        }
    })?;
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

    tokio::select! {
        (out, err, status) = run => {
            let status = status.map_err(|e| ExecError::Retryable {
                error: TaskError::new("wait_failed", format!("waiting for the task process failed: {e}")),
                delay: None,
                partial: None,
            })?;
            // Whatever the leader left behind in its group goes too.
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            use std::os::unix::process::ExitStatusExt;
            Ok(ProcessOutput {
                exit_code: status.code(),
                signal: status.signal(),
                stdout: out.0,
                stdout_truncated: out.1,
                stderr: err.0,
                stderr_truncated: err.1,
                duration: started.elapsed(),
            })
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
