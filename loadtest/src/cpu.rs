//! CPU time the processes of a run used, from `/proc/<pid>/stat`, turned
//! into microseconds per task.
//!
//! On a small machine the intake, the workers, NATS, Redis and the
//! generator share the same cores, so throughput alone cannot say which of
//! them to make cheaper; CPU per task can, and unlike latency it hardly
//! changes when other work competes for the machine.
//!
//! What a virtual machine's host takes from it shows here too: the share of
//! the run's CPU time "stolen" (`/proc/stat`), which explains runs where
//! throughput fell or latency spiked with no change in CPU per task.

use serde::{Deserialize, Serialize};

use crate::rss::{RssError, parse_spec};

/// CPU a process used during a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    /// What the process is (`producer`, `consumer`, `nats`, `redis`,
    /// `loadgen`).
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// User plus system CPU seconds used during the run.
    pub cpu_secs: f64,
    /// `cpu_secs` over the tasks (or messages) of the run, in microseconds.
    pub us_per_task: f64,
}

/// CPU counters read at the start of a run.
#[derive(Debug, Clone)]
pub struct CpuWatch {
    start: Vec<(String, u32, Option<u64>)>,
    machine: Option<MachineTicks>,
}

impl CpuWatch {
    /// Reads the counters of the `NAME=PID` processes, plus this process as
    /// `self_name`.
    ///
    /// # Errors
    /// [`RssError::BadSpec`] for a malformed spec. A process that cannot be
    /// read is skipped in the result instead.
    pub fn start(specs: &[String], self_name: &str) -> Result<Self, RssError> {
        let mut start = vec![(
            self_name.to_owned(),
            std::process::id(),
            cpu_ticks(std::process::id()),
        )];
        for spec in specs {
            let (name, pid) = parse_spec(spec)?;
            start.push((name, pid, cpu_ticks(pid)));
        }
        Ok(Self {
            start,
            machine: machine_ticks(),
        })
    }

    /// The share of the machine's CPU time since [`Self::start`] that its
    /// host took (steal), in percent; `None` where `/proc/stat` cannot be
    /// read.
    pub fn steal_percent(&self) -> Option<f64> {
        let before = self.machine?;
        let now = machine_ticks()?;
        let total = now.total.checked_sub(before.total)?;
        let steal = now.steal.checked_sub(before.steal)?;
        (total > 0).then(|| steal as f64 * 100.0 / total as f64)
    }

    /// The CPU used since [`Self::start`], per process, spread over `tasks`.
    pub fn finish(&self, tasks: u64) -> Vec<CpuUse> {
        let hz = ticks_per_second();
        self.start
            .iter()
            .filter_map(|(name, pid, before)| {
                let used = cpu_ticks(*pid)?.checked_sub((*before)?)?;
                let cpu_secs = used as f64 / hz;
                Some(CpuUse {
                    name: name.clone(),
                    pid: *pid,
                    cpu_secs,
                    us_per_task: if tasks > 0 {
                        cpu_secs * 1e6 / tasks as f64
                    } else {
                        0.0
                    },
                })
            })
            .collect()
    }
}

/// The clock ticks `/proc/<pid>/stat` counts in. Linux reports them in
/// `USER_HZ`, which is 100 on every architecture Rust targets.
fn ticks_per_second() -> f64 {
    100.0
}

/// The machine's CPU ticks (all CPUs): every kind together, and steal.
#[derive(Debug, Clone, Copy)]
struct MachineTicks {
    total: u64,
    steal: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine(&stat)
}

/// The first line of `/proc/stat`: `cpu user nice system idle iowait irq
/// softirq steal guest guest_nice`. Guest time is already counted in user
/// time, so the total stops at steal.
fn parse_machine(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some(MachineTicks {
        total: ticks.iter().sum(),
        steal: *ticks.get(7)?,
    })
}

/// User plus system ticks of a process (fields 14 and 15 of its stat line).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces,
    // so fields are counted from after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_parsed_past_the_command_name() {
        let line = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat(line), Some(300));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn machine_lines_give_total_and_steal() {
        let stat = "cpu  100 5 20 800 10 1 2 12 0 0\ncpu0 50 2 10 400 5 0 1 6 0 0\n";
        let ticks = parse_machine(stat).unwrap();
        assert_eq!(ticks.total, 950);
        assert_eq!(ticks.steal, 12);
        // Kernels before steal was counted have seven fields.
        assert!(parse_machine("cpu  1 2 3 4 5 6 7\n").is_none());
        assert!(parse_machine("intr 1 2 3\n").is_none());
    }

    #[test]
    fn this_process_is_watched() {
        let watch = CpuWatch::start(&[], "me").unwrap();
        // Burn a little CPU so there is something to count.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let used = watch.finish(10);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].name, "me");
        assert!(used[0].cpu_secs >= 0.0);
        let steal = watch.steal_percent().expect("Linux has /proc/stat");
        assert!((0.0..=100.0).contains(&steal));
        assert!(CpuWatch::start(&["nope".into()], "me").is_err());
    }
}
