//! The benchmark's verdict: the figures of one `scripts/bench` run side by
//! side, their ratios to the raw pipeline, and each target met or missed.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::raw::RawReport;
use crate::report::Report;
use crate::rss::ProcessMemory;

/// Batch-submit throughput, as a share of the raw pipeline, at least.
pub const TARGET_BATCH_SHARE_OF_RAW: f64 = 0.25;
/// Single-submit end-to-end throughput at least, tasks per second.
pub const TARGET_SINGLE_PER_S: f64 = 10_000.0;
/// End-to-end p50 at the steady rate at most, milliseconds.
pub const TARGET_P50_MS: f64 = 1.0;
/// End-to-end p99 at the steady rate at most, milliseconds.
pub const TARGET_P99_MS: f64 = 2.5;
/// Resident memory of each process when idle at most, MiB.
pub const TARGET_IDLE_MIB: f64 = 12.0;
/// Peak resident memory of each process under load at most, MiB.
pub const TARGET_LOAD_MIB: f64 = 48.0;

/// The inputs of a summary; a missing one is a step that failed.
#[derive(Debug, Clone, Default)]
pub struct BenchInputs {
    /// The raw pipeline.
    pub raw: Option<RawReport>,
    /// Closed loop, one request per task.
    pub single: Option<Report>,
    /// Closed loop, batch submits.
    pub batch: Option<Report>,
    /// Open loop at the steady rate.
    pub latency: Option<Report>,
    /// Memory of the processes after start-up, before any load.
    pub memory_idle: Vec<ProcessMemory>,
    /// Memory of the processes after all the load.
    pub memory_load: Vec<ProcessMemory>,
}

/// One target and how the run did against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// The figure measured; none when the run produced no data for it.
    pub measured: Option<f64>,
    /// The bound.
    pub target: f64,
    /// `>=` or `<=`.
    pub relation: String,
    /// The unit of both.
    pub unit: String,
    /// Whether the bound holds.
    pub pass: bool,
}

impl Check {
    fn at_least(name: impl Into<String>, measured: Option<f64>, target: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            measured,
            target,
            relation: ">=".into(),
            unit: unit.into(),
            pass: measured.is_some_and(|m| m >= target),
        }
    }

    fn at_most(name: impl Into<String>, measured: Option<f64>, target: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            measured,
            target,
            relation: "<=".into(),
            unit: unit.into(),
            pass: measured.is_some_and(|m| m <= target),
        }
    }
}

/// Everything one benchmark run found, as written to `target/bench/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchSummary {
    /// The raw pipeline.
    pub raw: Option<RawReport>,
    /// Closed loop, one request per task.
    pub single: Option<Report>,
    /// Closed loop, batch submits.
    pub batch: Option<Report>,
    /// Open loop at the steady rate.
    pub latency: Option<Report>,
    /// Memory after start-up.
    pub memory_idle: Vec<ProcessMemory>,
    /// Memory after the load.
    pub memory_load: Vec<ProcessMemory>,
    /// Single-submit end-to-end throughput over the raw limit.
    pub single_share_of_raw: Option<f64>,
    /// Batch-submit end-to-end throughput over the raw limit.
    pub batch_share_of_raw: Option<f64>,
    /// The targets.
    pub checks: Vec<Check>,
}

impl BenchSummary {
    /// Compares the inputs with the targets.
    pub fn new(inputs: BenchInputs) -> Self {
        let raw_rate = inputs
            .raw
            .as_ref()
            .map(|r| r.end_to_end_per_s)
            .filter(|r| *r > 0.0);
        let share = |run: &Option<Report>| {
            run.as_ref()
                .zip(raw_rate)
                .map(|(r, raw)| r.throughput.end_to_end_per_s / raw)
        };
        let single_share_of_raw = share(&inputs.single);
        let batch_share_of_raw = share(&inputs.batch);
        let mut checks = Vec::new();
        for run in [&inputs.single, &inputs.batch, &inputs.latency]
            .into_iter()
            .flatten()
        {
            // A run cut short by its time bound sends fewer than requested;
            // what was sent must all have succeeded.
            let succeeded = run.tasks.states.get("succeeded").copied().unwrap_or(0);
            checks.push(Check::at_least(
                format!("{}: sent tasks that succeeded", run.label),
                (run.tasks.sent > 0).then_some(succeeded as f64),
                run.tasks.sent as f64,
                "tasks",
            ));
        }
        if let Some(share) = batch_share_of_raw {
            checks.push(Check::at_least(
                "batch submits, end-to-end share of raw",
                Some(share * 100.0),
                TARGET_BATCH_SHARE_OF_RAW * 100.0,
                "%",
            ));
        }
        if let Some(single) = &inputs.single {
            checks.push(Check::at_least(
                "single submits, end-to-end throughput",
                Some(single.throughput.end_to_end_per_s),
                TARGET_SINGLE_PER_S,
                "tasks/s",
            ));
        }
        if let Some(latency) = &inputs.latency {
            let e2e = &latency.latency.end_to_end;
            let observed = e2e.count > 0;
            checks.push(Check::at_most(
                "steady rate, end-to-end p50",
                observed.then_some(e2e.p50_ms),
                TARGET_P50_MS,
                "ms",
            ));
            checks.push(Check::at_most(
                "steady rate, end-to-end p99",
                observed.then_some(e2e.p99_ms),
                TARGET_P99_MS,
                "ms",
            ));
        }
        for m in &inputs.memory_idle {
            checks.push(Check::at_most(
                format!("{} RSS idle", m.name),
                Some(m.rss_mib()),
                TARGET_IDLE_MIB,
                "MiB",
            ));
        }
        for m in &inputs.memory_load {
            checks.push(Check::at_most(
                format!("{} peak RSS under load", m.name),
                Some(m.hwm_mib()),
                TARGET_LOAD_MIB,
                "MiB",
            ));
        }
        Self {
            raw: inputs.raw,
            single: inputs.single,
            batch: inputs.batch,
            latency: inputs.latency,
            memory_idle: inputs.memory_idle,
            memory_load: inputs.memory_load,
            single_share_of_raw,
            batch_share_of_raw,
            checks,
        }
    }

    /// Whether every check passed (and there was something to check).
    pub fn all_pass(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<42} {:>10} {:>8} {:>9} {:>9}",
            "run", "tasks/s", "% raw", "p50 ms", "p99 ms"
        );
        if let Some(raw) = &self.raw {
            let _ = writeln!(
                out,
                "{:<42} {:>10.0} {:>8} {:>9} {:>9}",
                "raw pipeline (end to end)", raw.end_to_end_per_s, "100.0", "-", "-"
            );
        }
        let raw_rate = self.raw.as_ref().map(|r| r.end_to_end_per_s);
        for (name, run) in [
            ("single submits (closed loop)", &self.single),
            ("batch submits (closed loop)", &self.batch),
            ("steady rate (open loop)", &self.latency),
        ] {
            let Some(run) = run else {
                let _ = writeln!(out, "{name:<42} {:>10}", "(not run)");
                continue;
            };
            let rate = run.throughput.end_to_end_per_s;
            let share = raw_rate
                .filter(|r| *r > 0.0)
                .map_or("-".to_owned(), |r| format!("{:.1}", rate / r * 100.0));
            let e2e = &run.latency.end_to_end;
            let _ = writeln!(
                out,
                "{:<42} {:>10.0} {:>8} {:>9.3} {:>9.3}",
                format!("{name} [{}]", run.api),
                rate,
                share,
                e2e.p50_ms,
                e2e.p99_ms
            );
        }
        if !self.memory_idle.is_empty() || !self.memory_load.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<34} {:>12} {:>12}",
                "memory", "idle MiB", "peak MiB"
            );
            for idle in &self.memory_idle {
                let peak = self
                    .memory_load
                    .iter()
                    .find(|m| m.name == idle.name)
                    .map_or("-".to_owned(), |m| format!("{:.1}", m.hwm_mib()));
                let _ = writeln!(
                    out,
                    "{:<42} {:>10.1} {:>10}",
                    idle.name,
                    idle.rss_mib(),
                    peak
                );
            }
        }
        let cpu_runs = [
            (
                "raw pipeline",
                self.raw.as_ref().map(|r| (&r.cpu, r.steal_percent)),
            ),
            (
                "single submits",
                self.single.as_ref().map(|r| (&r.cpu, r.steal_percent)),
            ),
            (
                "batch submits",
                self.batch.as_ref().map(|r| (&r.cpu, r.steal_percent)),
            ),
            (
                "steady rate",
                self.latency.as_ref().map(|r| (&r.cpu, r.steal_percent)),
            ),
        ];
        if cpu_runs
            .iter()
            .any(|(_, c)| c.is_some_and(|(c, _)| !c.is_empty()))
        {
            let _ = writeln!(
                out,
                "\nCPU µs per task (per message for raw); steal: the host's share of the machine's CPU time"
            );
            for (name, (cpu, steal)) in cpu_runs
                .into_iter()
                .filter_map(|(name, run)| Some((name, run?)))
            {
                if cpu.is_empty() {
                    continue;
                }
                let total: f64 = cpu.iter().map(|c| c.us_per_task).sum();
                let steal = steal.map_or_else(String::new, |s| format!("; steal {s:.1} %"));
                let _ = writeln!(
                    out,
                    "  {name:<16} total {total:>7.1}: {}{steal}",
                    crate::raw::cpu_line(cpu)
                );
            }
        }
        let _ = writeln!(out, "\ntargets");
        for c in &self.checks {
            let measured = c
                .measured
                .map_or_else(|| "no data".to_owned(), |m| format!("{m:.2}"));
            let _ = writeln!(
                out,
                "  [{}] {:<44} {:>10} {} {:>8.2} {}",
                if c.pass { "pass" } else { "MISS" },
                c.name,
                measured,
                c.relation,
                c.target,
                c.unit
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{LoadShape, TaskCounts, Throughput};

    fn run(label: &str, rate: f64, p50: f64, p99: f64) -> Report {
        let mut r = Report {
            label: label.into(),
            target: "http://127.0.0.1:3000".into(),
            api: "single".into(),
            load: LoadShape::Closed {
                count: 10,
                concurrency: 1,
            },
            observe: "redis".into(),
            started_at: chrono::Utc::now(),
            requests: 10,
            tasks: TaskCounts {
                requested: 10,
                sent: 10,
                accepted: 10,
                finished: 10,
                states: [("succeeded".to_owned(), 10)].into(),
                ..TaskCounts::default()
            },
            throughput: Throughput {
                end_to_end_per_s: rate,
                ..Throughput::default()
            },
            latency: Default::default(),
            cpu: Vec::new(),
            steal_percent: None,
            last_error: None,
        };
        r.latency.end_to_end.count = 10;
        r.latency.end_to_end.p50_ms = p50;
        r.latency.end_to_end.p99_ms = p99;
        r
    }

    fn raw(rate: f64) -> RawReport {
        RawReport {
            started_at: chrono::Utc::now(),
            count: 1,
            published: 1,
            consumed: 1,
            window: 1,
            batch: 1,
            consumers: 1,
            double_ack: false,
            msg_ids: false,
            republish: false,
            message_bytes: 1,
            value_bytes: 1,
            publish_secs: 1.0,
            publish_per_s: rate,
            end_to_end_secs: 1.0,
            end_to_end_per_s: rate,
            cpu: Vec::new(),
            steal_percent: None,
        }
    }

    fn memory(name: &str, rss_mib: u64, hwm_mib: u64) -> ProcessMemory {
        ProcessMemory {
            name: name.into(),
            pid: 1,
            vm_rss_kib: rss_mib * 1024,
            vm_hwm_kib: hwm_mib * 1024,
        }
    }

    #[test]
    fn targets_are_checked_against_the_same_run() {
        let summary = BenchSummary::new(BenchInputs {
            raw: Some(raw(80_000.0)),
            single: Some(run("single", 12_000.0, 3.0, 9.0)),
            batch: Some(run("batch", 30_000.0, 50.0, 90.0)),
            latency: Some(run("steady", 500.0, 0.8, 2.0)),
            memory_idle: vec![memory("producer", 8, 9)],
            memory_load: vec![memory("producer", 20, 40)],
        });
        assert_eq!(summary.batch_share_of_raw, Some(0.375));
        assert!(summary.all_pass(), "{}", summary.table());

        let missed = BenchSummary::new(BenchInputs {
            raw: Some(raw(200_000.0)),
            single: Some(run("single", 9_000.0, 3.0, 9.0)),
            latency: Some(run("steady", 500.0, 1.5, 2.0)),
            memory_load: vec![memory("consumer", 20, 60)],
            ..BenchInputs::default()
        });
        let failed: Vec<_> = missed
            .checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            failed,
            [
                "single submits, end-to-end throughput",
                "steady rate, end-to-end p50",
                "consumer peak RSS under load"
            ]
        );
        assert!(missed.table().contains("(not run)"));
    }

    #[test]
    fn a_run_without_data_misses_its_targets() {
        let mut steady = run("steady", 0.0, 0.0, 0.0);
        steady.latency.end_to_end.count = 0;
        steady.tasks.states.clear();
        let summary = BenchSummary::new(BenchInputs {
            latency: Some(steady),
            ..BenchInputs::default()
        });
        assert!(
            summary.checks.iter().all(|c| !c.pass),
            "{}",
            summary.table()
        );
        assert!(summary.table().contains("no data"));
    }

    #[test]
    fn nothing_to_check_is_not_a_pass() {
        assert!(!BenchSummary::new(BenchInputs::default()).all_pass());
    }
}
