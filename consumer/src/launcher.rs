//! The limit launcher: a hidden subcommand of every ClaudeCluster binary
//! that applies resource limits to itself and then becomes the task's
//! program.
//!
//! Limits must be set between `fork` and `exec`, which in Rust needs
//! `pre_exec` and therefore `unsafe`. Instead the worker starts its own
//! executable as `<exe> __cc_launch [options] -- program args…`; that process
//! (already the leader of the task's process group) joins the task's cgroup,
//! sets its rlimits and CPU affinity with safe calls, and `execvp`s the
//! program, which inherits all of it.
//!
//! Every binary calls [`run_if_requested`] first thing in `main`. Binaries
//! that never call it (test harnesses) cannot launch; the process runner then
//! applies only the limits it can watch from outside, unless a launcher
//! program is named with [`set_program`].

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::Pid;

/// The hidden subcommand.
pub const SUBCOMMAND: &str = "__cc_launch";

/// Exit code of a launcher that could not set up or start the program. Its
/// standard error then starts with [`ERROR_PREFIX`].
pub const EXIT_LAUNCH_FAILED: i32 = 127;

/// How the launcher's own error messages start, so the runner can tell them
/// from the program's output.
pub const ERROR_PREFIX: &str = "claudecluster-launch: ";

/// Set when this process's `main` called [`run_if_requested`], which means
/// its executable understands [`SUBCOMMAND`].
static SELF_LAUNCHES: AtomicBool = AtomicBool::new(false);

/// An explicitly named launcher program.
static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Limits the launcher applies before it starts the program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchLimits {
    /// `RLIMIT_DATA`: private writable memory per process, in bytes. (Not
    /// `RLIMIT_AS`: Node.js reserves large address ranges for WebAssembly
    /// and fails to start under an address-space cap.) The Claude Code CLI
    /// (a Bun binary) needs somewhat over 512 MiB of it just to start.
    pub data_bytes: Option<u64>,
    /// `RLIMIT_CPU`: CPU seconds per process; `SIGXCPU` when exceeded.
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file the program may write, in bytes;
    /// `SIGXFSZ` (or `EFBIG`) when exceeded.
    pub file_bytes: Option<u64>,
    /// Pin to this many CPUs of the worker's allowed set…
    pub cpus: Option<usize>,
    /// …starting at this position in that set (wrapping), so concurrent
    /// tasks spread over the machine.
    pub cpu_offset: usize,
    /// Join this cgroup (its directory) before anything else.
    pub cgroup: Option<PathBuf>,
}

impl LaunchLimits {
    /// The arguments that make the launcher apply these limits and run
    /// `program` with `args`.
    pub fn to_args(&self, program: &Path, args: &[OsString]) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![SUBCOMMAND.into()];
        let mut num = |flag: &str, value: Option<u64>| {
            if let Some(v) = value {
                out.push(flag.into());
                out.push(v.to_string().into());
            }
        };
        num("--data-bytes", self.data_bytes);
        num("--cpu-seconds", self.cpu_seconds);
        num("--file-bytes", self.file_bytes);
        num("--cpus", self.cpus.map(|c| c as u64));
        if self.cpus.is_some() {
            num("--cpu-offset", Some(self.cpu_offset as u64));
        }
        if let Some(cg) = &self.cgroup {
            out.push("--cgroup".into());
            out.push(cg.clone().into_os_string());
        }
        out.push("--".into());
        out.push(program.as_os_str().to_owned());
        out.extend(args.iter().cloned());
        out
    }
}

/// If this process was started as the launcher, applies the limits and
/// becomes the program; it never returns then (on failure it exits with
/// [`EXIT_LAUNCH_FAILED`]). Otherwise it notes that this executable can
/// launch and returns.
pub fn run_if_requested() {
    let mut argv = std::env::args_os();
    let _exe = argv.next();
    if argv.next().as_deref() != Some(OsStr::new(SUBCOMMAND)) {
        SELF_LAUNCHES.store(true, Ordering::Relaxed);
        return;
    }
    let rest: Vec<OsString> = argv.collect();
    let err = match parse(&rest) {
        Ok((limits, program)) => launch(&limits, &program),
        Err(e) => e,
    };
    eprintln!("{ERROR_PREFIX}{err}");
    std::process::exit(EXIT_LAUNCH_FAILED);
}

/// Names the program to start as the launcher, instead of this process's
/// own executable. For test binaries, which cannot launch themselves: they
/// pass a built ClaudeCluster binary. The first call wins.
pub fn set_program(path: impl Into<PathBuf>) {
    let _ = PROGRAM.set(path.into());
}

/// The program to start as the launcher, if there is one.
pub fn program() -> Option<PathBuf> {
    if let Some(p) = PROGRAM.get() {
        return Some(p.clone());
    }
    if SELF_LAUNCHES.load(Ordering::Relaxed) {
        return std::env::current_exe().ok();
    }
    None
}

/// Why the launcher could not start the program.
#[derive(Debug, thiserror::Error)]
enum LaunchError {
    #[error("bad arguments: {0}")]
    Usage(String),
    #[error("cannot join cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot set {what}: {source}")]
    Limit {
        what: &'static str,
        source: nix::Error,
    },
    #[error("cannot run {program}: {source}")]
    Exec { program: String, source: nix::Error },
}

/// Parses `[--flag value]… -- program args…`.
fn parse(args: &[OsString]) -> Result<(LaunchLimits, Vec<OsString>), LaunchError> {
    let mut limits = LaunchLimits::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--" {
            let program: Vec<OsString> = it.cloned().collect();
            if program.is_empty() {
                return Err(LaunchError::Usage("no program after --".into()));
            }
            return Ok((limits, program));
        }
        let value = it
            .next()
            .ok_or_else(|| LaunchError::Usage(format!("{} needs a value", flag.display())))?;
        let number = || {
            value
                .to_str()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| LaunchError::Usage(format!("{} needs a number", flag.display())))
        };
        match flag.to_str() {
            Some("--data-bytes") => limits.data_bytes = Some(number()?),
            Some("--cpu-seconds") => limits.cpu_seconds = Some(number()?),
            Some("--file-bytes") => limits.file_bytes = Some(number()?),
            Some("--cpus") => limits.cpus = Some(number()? as usize),
            Some("--cpu-offset") => limits.cpu_offset = number()? as usize,
            Some("--cgroup") => limits.cgroup = Some(PathBuf::from(value)),
            _ => {
                return Err(LaunchError::Usage(format!(
                    "unknown option {}",
                    flag.display()
                )));
            }
        }
    }
    Err(LaunchError::Usage("missing -- before the program".into()))
}

/// Applies `limits` to this process and execs `program`; returns only on
/// failure.
fn launch(limits: &LaunchLimits, program: &[OsString]) -> LaunchError {
    match apply(limits) {
        Ok(()) => exec(program),
        Err(e) => e,
    }
}

fn apply(limits: &LaunchLimits) -> Result<(), LaunchError> {
    if let Some(cg) = &limits.cgroup {
        // Joining first puts everything the program starts in the group.
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).map_err(
            |source| LaunchError::Cgroup {
                path: cg.display().to_string(),
                source,
            },
        )?;
    }
    let set = |resource, what, soft: u64, hard: u64| {
        setrlimit(resource, soft, hard).map_err(|source| LaunchError::Limit { what, source })
    };
    if let Some(bytes) = limits.data_bytes {
        set(Resource::RLIMIT_DATA, "RLIMIT_DATA", bytes, bytes)?;
    }
    if let Some(secs) = limits.cpu_seconds {
        // The soft limit sends SIGXCPU, which a program may catch; the hard
        // one, a second later, is SIGKILL.
        set(Resource::RLIMIT_CPU, "RLIMIT_CPU", secs, secs + 1)?;
    }
    if let Some(bytes) = limits.file_bytes {
        set(Resource::RLIMIT_FSIZE, "RLIMIT_FSIZE", bytes, bytes)?;
    }
    if let Some(n) = limits.cpus {
        pin_cpus(n, limits.cpu_offset)?;
    }
    Ok(())
}

/// Restricts this process to `n` of the CPUs it may use now, starting at
/// `offset` (wrapping).
fn pin_cpus(n: usize, offset: usize) -> Result<(), LaunchError> {
    let limit = |source| LaunchError::Limit {
        what: "CPU affinity",
        source,
    };
    let current = sched_getaffinity(Pid::from_raw(0)).map_err(limit)?;
    let allowed: Vec<usize> = (0..CpuSet::count())
        .filter(|&i| current.is_set(i).unwrap_or(false))
        .collect();
    if allowed.is_empty() || n >= allowed.len() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for k in 0..n {
        set.set(allowed[(offset + k) % allowed.len()])
            .map_err(limit)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).map_err(limit)
}

fn exec(program: &[OsString]) -> LaunchError {
    let to_c = |s: &OsString| CString::new(s.as_bytes());
    let argv: Result<Vec<CString>, _> = program.iter().map(to_c).collect();
    let name = program[0].to_string_lossy().into_owned();
    let argv = match argv {
        Ok(argv) => argv,
        Err(_) => return LaunchError::Usage(format!("{name}: argument contains a NUL byte")),
    };
    // execvp only returns on failure.
    match nix::unistd::execvp(&argv[0], &argv) {
        Err(source) => LaunchError::Exec {
            program: name,
            source,
        },
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let limits = LaunchLimits {
            data_bytes: Some(100),
            cpu_seconds: Some(3),
            file_bytes: Some(7),
            cpus: Some(2),
            cpu_offset: 5,
            cgroup: Some("/sys/fs/cgroup/x".into()),
        };
        let args = limits.to_args(Path::new("cat"), &["-n".into(), "--".into()]);
        assert_eq!(args[0], SUBCOMMAND);
        let (parsed, program) = parse(&args[1..]).unwrap();
        assert_eq!(parsed, limits);
        assert_eq!(
            program,
            vec![OsString::from("cat"), "-n".into(), "--".into()]
        );
    }

    #[test]
    fn bad_arguments_are_reported() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(parse(&args(&["--data-bytes", "x", "--", "cat"])).is_err());
        assert!(parse(&args(&["--bogus", "1", "--", "cat"])).is_err());
        assert!(parse(&args(&["--data-bytes", "1"])).is_err());
        assert!(parse(&args(&["--"])).is_err());
    }
}
