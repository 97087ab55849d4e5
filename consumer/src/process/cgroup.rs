//! cgroup v2 groups for task process trees, when the worker may make them.
//!
//! A group limits the whole tree, including processes that left the process
//! group, and the kernel reports its OOM kills, so a memory limit hit is
//! known for certain. The worker needs a delegated cgroup v2 hierarchy
//! (`/sys/fs/cgroup` mounted as `cgroup2` and writable, as in a privileged
//! container or a systemd unit with `Delegate=yes`). Otherwise
//! [`parent`] returns `None` and tasks run under rlimits instead.
//!
//! cgroup v2 forbids processes in a group that hands controllers to its
//! children, so the probe moves the worker itself into a leaf group
//! (`claudecluster-worker-<pid>`) next to the task groups it creates.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// Where cgroup v2 is mounted.
const MOUNT: &str = "/sys/fs/cgroup";

/// The group task groups are created in.
#[derive(Debug)]
pub(crate) struct CgroupParent {
    dir: PathBuf,
}

static PARENT: OnceLock<Option<CgroupParent>> = OnceLock::new();

/// The parent of task groups, probed once per process; `None` when cgroups
/// cannot be used here.
pub(crate) fn parent() -> Option<&'static CgroupParent> {
    PARENT
        .get_or_init(|| match CgroupParent::probe() {
            Ok(parent) => {
                tracing::info!(dir = %parent.dir.display(), "task limits use cgroup v2");
                Some(parent)
            }
            Err(reason) => {
                tracing::info!(%reason, "cgroup v2 not usable; task limits use rlimits");
                None
            }
        })
        .as_ref()
}

impl CgroupParent {
    fn probe() -> Result<Self, String> {
        let fs = nix::sys::statfs::statfs(MOUNT).map_err(|e| format!("statfs {MOUNT}: {e}"))?;
        if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Err(format!("{MOUNT} is not a cgroup2 mount"));
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
        let rel = own_group(&own).ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
        let dir = Path::new(MOUNT).join(rel.trim_start_matches('/'));
        let controllers = read(&dir.join("cgroup.controllers"))?;
        if !has_controllers(&controllers) {
            return Err(format!(
                "memory and cpu controllers not available in {}",
                dir.display()
            ));
        }
        let parent = CgroupParent { dir };
        if parent.enable_controllers().is_err() {
            parent.move_self_to_leaf()?;
            if let Err(e) = parent.enable_controllers() {
                parent.undo_leaf();
                return Err(e);
            }
        }
        Ok(parent)
    }

    fn enable_controllers(&self) -> Result<(), String> {
        let control = self.dir.join("cgroup.subtree_control");
        let current = read(&control)?;
        if has_controllers(&current) {
            return Ok(());
        }
        std::fs::write(&control, "+memory +cpu")
            .map_err(|e| format!("enable controllers in {}: {e}", control.display()))
    }

    fn leaf(&self) -> PathBuf {
        self.dir
            .join(format!("claudecluster-worker-{}", std::process::id()))
    }

    fn move_self_to_leaf(&self) -> Result<(), String> {
        let leaf = self.leaf();
        std::fs::create_dir_all(&leaf).map_err(|e| format!("create {}: {e}", leaf.display()))?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()).map_err(|e| {
            let _ = std::fs::remove_dir(&leaf);
            format!("move the worker into {}: {e}", leaf.display())
        })
    }

    fn undo_leaf(&self) {
        let _ = std::fs::write(
            self.dir.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(self.leaf());
    }

    /// Creates a group for one task with these limits.
    ///
    /// # Errors
    /// When the group cannot be created or a limit cannot be written; the
    /// group is removed again then.
    pub(crate) fn create_task_group(
        &self,
        name: &str,
        memory_bytes: Option<u64>,
        cpu_cores: Option<f64>,
    ) -> std::io::Result<TaskCgroup> {
        let dir = self.dir.join(format!("claudecluster-task-{name}"));
        std::fs::create_dir(&dir)?;
        let group = TaskCgroup { dir };
        let configure = || -> std::io::Result<()> {
            if let Some(bytes) = memory_bytes {
                std::fs::write(group.dir.join("memory.max"), bytes.to_string())?;
                // Swapping would hide the limit; not every kernel has swap
                // accounting, so this one is best effort.
                let _ = std::fs::write(group.dir.join("memory.swap.max"), "0");
            }
            if let Some(cores) = cpu_cores {
                std::fs::write(group.dir.join("cpu.max"), cpu_max(cores))?;
            }
            Ok(())
        };
        if let Err(e) = configure() {
            let _ = std::fs::remove_dir(&group.dir);
            return Err(e);
        }
        Ok(group)
    }
}

/// One task's group.
#[derive(Debug)]
pub(crate) struct TaskCgroup {
    dir: PathBuf,
}

impl TaskCgroup {
    /// The group's directory, which the launcher joins.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the kernel killed a process of the group for exceeding
    /// `memory.max`.
    pub(crate) fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .map(|events| oom_kills(&events) > 0)
            .unwrap_or(false)
    }

    /// Kills whatever is left in the group and removes it.
    pub(crate) async fn remove(self) {
        // cgroup.kill exists from Linux 5.14; the process group was killed
        // already, so this only catches processes that escaped it.
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..40 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                // Busy until the killed processes are reaped.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        tracing::warn!(dir = %self.dir.display(), "could not remove a task cgroup");
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// The cgroup v2 path in the contents of `/proc/self/cgroup` (`0::/path`).
fn own_group(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
}

/// Whether a controller list names both `memory` and `cpu`.
fn has_controllers(list: &str) -> bool {
    let names: Vec<&str> = list.split_whitespace().collect();
    names.contains(&"memory") && names.contains(&"cpu")
}

/// `cpu.max` for a number of cores: quota and period in microseconds.
fn cpu_max(cores: f64) -> String {
    const PERIOD: u64 = 100_000;
    // The kernel's smallest quota is 1 ms.
    let quota = ((cores * PERIOD as f64).round() as u64).max(1_000);
    format!("{quota} {PERIOD}")
}

/// The `oom_kill` count in `memory.events`.
fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_entry() {
        let hybrid = "4:memory:/a\n0::/system.slice/cc.service\n";
        assert_eq!(own_group(hybrid), Some("/system.slice/cc.service"));
        assert_eq!(own_group("4:memory:/a\n"), None);
    }

    #[test]
    fn parses_controllers_and_events() {
        assert!(has_controllers("cpuset cpu io memory pids"));
        assert!(!has_controllers("cpuset io memory"));
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"), 1);
        assert_eq!(oom_kills("oom 0\n"), 0);
    }

    #[test]
    fn cpu_quota_per_period() {
        assert_eq!(cpu_max(1.5), "150000 100000");
        assert_eq!(cpu_max(0.001), "1000 100000");
    }
}
