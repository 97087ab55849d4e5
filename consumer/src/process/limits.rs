//! Applies a task's resource limits (`MAX_MEMORY_MB`, `MAX_CPU_CORES`,
//! `DISK_QUOTA_MB`) to its process tree and tells which one it broke.
//!
//! - Memory: a cgroup v2 `memory.max` when the worker may make groups
//!   ([`super::cgroup`]); otherwise `RLIMIT_DATA` on each process plus a
//!   watcher that sums the resident memory of the process group.
//! - CPU: `cpu.max` (throttling) or affinity to `ceil(cores)` CPUs, and in
//!   both cases a CPU-time budget of `cores × timeout` seconds per process
//!   (`RLIMIT_CPU`), so a task cannot burn more than its share.
//! - Disk: a watcher that sizes the working directory every 250 ms, and
//!   `RLIMIT_FSIZE` so one file cannot outgrow the quota between samples.
//!
//! rlimits need the [`crate::launcher`]; without one only the watchers run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use claudecluster_engine::config::ResourceLimits;
use nix::unistd::Pid;

use super::cgroup::{self, TaskCgroup};
use crate::launcher::{self, LaunchLimits};

const MIB: u64 = 1024 * 1024;

/// How often the watchers sample.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// A limit the task went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitHit {
    /// `MAX_MEMORY_MB`.
    Memory,
    /// `DISK_QUOTA_MB`.
    Disk,
    /// The CPU-time budget from `MAX_CPU_CORES`.
    CpuTime,
}

impl LimitHit {
    /// The task error code.
    pub(crate) fn code(self) -> &'static str {
        match self {
            LimitHit::Memory => "memory_limit",
            LimitHit::Disk => "disk_quota",
            LimitHit::CpuTime => "cpu_time_limit",
        }
    }

    /// A sentence naming the limit and its value.
    pub(crate) fn message(self, limits: &ResourceLimits, timeout: Duration) -> String {
        match self {
            LimitHit::Memory => format!(
                "the task exceeded its memory limit of {} MiB (MAX_MEMORY_MB)",
                limits.max_memory_mb.unwrap_or_default()
            ),
            LimitHit::Disk => format!(
                "the task exceeded its disk quota of {} MiB (DISK_QUOTA_MB)",
                limits.disk_quota_mb.unwrap_or_default()
            ),
            LimitHit::CpuTime => format!(
                "the task used more than its CPU time budget of {} s ({} cores for {} s)",
                cpu_seconds(limits.max_cpu_cores.unwrap_or(1.0), timeout),
                limits.max_cpu_cores.unwrap_or(1.0),
                timeout.as_secs()
            ),
        }
    }
}

/// How one task's limits are enforced.
#[derive(Debug)]
pub(crate) struct Enforcement {
    launcher: Option<(PathBuf, LaunchLimits)>,
    cgroup: Option<TaskCgroup>,
    memory_watch: Option<u64>,
    disk_watch: Option<(PathBuf, u64)>,
    memory_limited: bool,
    disk_limited: bool,
    cpu_limited: bool,
}

/// Spreads pinned tasks over the CPUs.
static NEXT_CPU: AtomicUsize = AtomicUsize::new(0);
static WARNED_NO_LAUNCHER: AtomicBool = AtomicBool::new(false);

impl Enforcement {
    /// Decides how to enforce `limits` for a task running `timeout` in
    /// `work_dir`, creating its cgroup if cgroups are used.
    pub(crate) fn plan(limits: &ResourceLimits, timeout: Duration, work_dir: &Path) -> Self {
        let memory = limits.max_memory_mb.map(|mb| mb.saturating_mul(MIB));
        let disk = limits.disk_quota_mb.map(|mb| mb.saturating_mul(MIB));
        let cores = limits.max_cpu_cores.filter(|c| *c > 0.0);
        let mut plan = Enforcement {
            launcher: None,
            cgroup: None,
            memory_watch: None,
            disk_watch: disk.map(|d| (work_dir.to_path_buf(), d)),
            memory_limited: memory.is_some(),
            disk_limited: disk.is_some(),
            cpu_limited: cores.is_some(),
        };
        if memory.is_none() && disk.is_none() && cores.is_none() {
            return plan;
        }
        let Some(program) = launcher::program() else {
            if !WARNED_NO_LAUNCHER.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "this executable cannot launch tasks under rlimits; \
                     only the memory and disk watchers apply"
                );
            }
            plan.memory_watch = memory;
            return plan;
        };
        let mut launch = LaunchLimits {
            file_bytes: disk,
            cpu_seconds: cores.map(|c| cpu_seconds(c, timeout)),
            ..LaunchLimits::default()
        };
        let group = cgroup::parent().and_then(|parent| {
            let name = uuid::Uuid::now_v7().simple().to_string();
            parent
                .create_task_group(&name, memory, cores)
                .inspect_err(
                    |e| tracing::warn!(error = %e, "cannot create a task cgroup; using rlimits"),
                )
                .ok()
        });
        match &group {
            Some(group) => launch.cgroup = Some(group.dir().to_path_buf()),
            None => {
                launch.data_bytes = memory;
                plan.memory_watch = memory;
                launch.cpus = cores.map(|c| (c.ceil() as usize).max(1));
                launch.cpu_offset = NEXT_CPU.fetch_add(1, Ordering::Relaxed);
            }
        }
        plan.cgroup = group;
        plan.launcher = Some((program, launch));
        plan
    }

    /// The program and arguments to spawn for `program args…`.
    pub(crate) fn command(
        &self,
        program: &Path,
        args: &[std::ffi::OsString],
    ) -> (PathBuf, Vec<std::ffi::OsString>) {
        match &self.launcher {
            Some((launcher, limits)) => (launcher.clone(), limits.to_args(program, args)),
            None => (program.to_path_buf(), args.to_vec()),
        }
    }

    /// Resolves when the running task goes over a watched limit; never
    /// resolves when nothing is watched.
    pub(crate) async fn watch(&self, pgid: Option<Pid>) -> LimitHit {
        let memory = self.memory_watch.zip(pgid);
        if memory.is_none() && self.disk_watch.is_none() {
            return std::future::pending().await;
        }
        let mut next_memory = Instant::now();
        let mut next_disk = Instant::now();
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Some((limit, pgid)) = memory
                && Instant::now() >= next_memory
            {
                let (used, next) = sampled(move || group_rss_bytes(pgid)).await;
                if used > limit {
                    return LimitHit::Memory;
                }
                next_memory = next;
            }
            if let Some((dir, quota)) = &self.disk_watch
                && Instant::now() >= next_disk
            {
                let dir = dir.clone();
                let (used, next) = sampled(move || dir_size(&dir)).await;
                if used > *quota {
                    return LimitHit::Disk;
                }
                next_disk = next;
            }
        }
    }

    /// Which limit, if any, ended a process that exited on its own with this
    /// exit code or signal and standard error.
    pub(crate) fn classify(
        &self,
        exit_code: Option<i32>,
        signal: Option<i32>,
        stderr: &[u8],
    ) -> Option<LimitHit> {
        // A shell reports a child killed by signal N as exit code 128 + N.
        let by = |sig: i32| signal == Some(sig) || exit_code == Some(128 + sig);
        if self.cpu_limited && by(nix::libc::SIGXCPU) {
            return Some(LimitHit::CpuTime);
        }
        if self.disk_limited && by(nix::libc::SIGXFSZ) {
            return Some(LimitHit::Disk);
        }
        if let Some(group) = &self.cgroup
            && self.memory_limited
            && group.oom_killed()
        {
            return Some(LimitHit::Memory);
        }
        if exit_code == Some(0) {
            return None;
        }
        // Under rlimits an allocation or a write just fails; programs report
        // that in a few well-known ways.
        let tail = &stderr[stderr.len().saturating_sub(4096)..];
        let tail = String::from_utf8_lossy(tail).to_ascii_lowercase();
        if self.memory_limited && self.cgroup.is_none() && mentions_out_of_memory(&tail) {
            return Some(LimitHit::Memory);
        }
        if self.disk_limited && tail.contains("file too large") {
            return Some(LimitHit::Disk);
        }
        None
    }

    /// Removes the task's cgroup, if it has one.
    pub(crate) async fn cleanup(self) {
        if let Some(group) = self.cgroup {
            group.remove().await;
        }
    }
}

/// Runs a blocking measurement and says when the next one may start: a
/// large process table or file tree must not turn the watcher into the main
/// load, so it samples at most a tenth of the time.
async fn sampled(measure: impl FnOnce() -> u64 + Send + 'static) -> (u64, Instant) {
    let began = Instant::now();
    let value = tokio::task::spawn_blocking(measure).await.unwrap_or(0);
    (value, Instant::now() + began.elapsed() * 10)
}

/// `cores × timeout` seconds, at least one.
fn cpu_seconds(cores: f64, timeout: Duration) -> u64 {
    ((cores * timeout.as_secs_f64()).ceil() as u64).max(1)
}

fn mentions_out_of_memory(stderr_lower: &str) -> bool {
    const SIGNS: &[&str] = &[
        "out of memory",
        "cannot allocate memory",
        "memory exhausted",
        "memoryerror",
        "bad_alloc",
        "memory allocation of",
    ];
    SIGNS.iter().any(|s| stderr_lower.contains(s))
}

/// Resident memory of every process in process group `pgid`, in bytes.
fn group_rss_bytes(pgid: Pid) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat_pgrp(&stat) != Some(pgid.as_raw()) {
            continue;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            total += status_rss_kib(&status) * 1024;
        }
    }
    total
}

/// The process group in a `/proc/<pid>/stat` line. The command name may
/// contain spaces and parentheses, so fields are counted after the last `)`.
fn stat_pgrp(stat: &str) -> Option<i32> {
    let after = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp
    after.split_whitespace().nth(2)?.parse().ok()
}

/// `VmRSS` in a `/proc/<pid>/status`, in KiB.
fn status_rss_kib(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Bytes in the files under `dir`, not following symbolic links.
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (my (odd) prog) S 1 4240 4240 0 -1 4194560 ...";
        assert_eq!(stat_pgrp(stat), Some(4240));
        let status = "Name:\tcat\nVmPeak:\t  9000 kB\nVmRSS:\t  1234 kB\n";
        assert_eq!(status_rss_kib(status), 1234);
        assert_eq!(status_rss_kib("Name:\tkthreadd\n"), 0);
    }

    #[test]
    fn sizes_a_directory_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 500]).unwrap();
        assert_eq!(dir_size(dir.path()), 1500);
    }

    #[test]
    fn cpu_budget_is_cores_times_timeout() {
        assert_eq!(cpu_seconds(0.5, Duration::from_secs(10)), 5);
        assert_eq!(cpu_seconds(0.01, Duration::from_secs(10)), 1);
        assert_eq!(cpu_seconds(2.0, Duration::from_millis(1500)), 3);
    }

    #[test]
    fn classifies_limit_signals_and_messages() {
        let limits = ResourceLimits::default();
        let plan = Enforcement::plan(&limits, Duration::from_secs(1), Path::new("/nonexistent"));
        let xcpu = nix::libc::SIGXCPU;
        let xfsz = nix::libc::SIGXFSZ;
        assert_eq!(
            plan.classify(None, Some(xcpu), b""),
            Some(LimitHit::CpuTime)
        );
        assert_eq!(
            plan.classify(Some(128 + xcpu), None, b""),
            Some(LimitHit::CpuTime)
        );
        assert_eq!(plan.classify(None, Some(xfsz), b""), Some(LimitHit::Disk));
        assert_eq!(
            plan.classify(Some(128 + xfsz), None, b""),
            Some(LimitHit::Disk)
        );
        assert_eq!(
            plan.classify(Some(1), None, b"Traceback...\nMemoryError\n"),
            Some(LimitHit::Memory)
        );
        assert_eq!(
            plan.classify(Some(1), None, b"write: File too large"),
            Some(LimitHit::Disk)
        );
        assert_eq!(plan.classify(Some(0), None, b"out of memory"), None);
        assert_eq!(plan.classify(Some(1), None, b"no such file"), None);
        let none = Enforcement::plan(
            &ResourceLimits {
                max_memory_mb: None,
                max_cpu_cores: None,
                disk_quota_mb: None,
            },
            Duration::from_secs(1),
            Path::new("/nonexistent"),
        );
        assert_eq!(none.classify(None, Some(xcpu), b"out of memory"), None);
    }
}
