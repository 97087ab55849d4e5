//! What one load-generator run measured ([`Report`]), as the table a person
//! reads and the JSON a script reads (`--json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cpu::CpuUse;
use crate::stats::LatencySummary;

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// A name for the run (`--label`).
    pub label: String,
    /// The intake's base URL.
    pub target: String,
    /// `single` or `batch:<size>`.
    pub api: String,
    /// The load shape.
    pub load: LoadShape,
    /// How completion was observed: `redis`, `http` or `none`.
    pub observe: String,
    /// When the run started.
    pub started_at: DateTime<Utc>,
    /// HTTP requests sent.
    pub requests: u64,
    /// What happened to the tasks.
    pub tasks: TaskCounts,
    /// Rates.
    pub throughput: Throughput,
    /// Latency percentiles.
    pub latency: Latencies,
    /// CPU the watched processes (and the generator) used during the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu: Vec<CpuUse>,
    /// The share of the machine's CPU time its host took during the run
    /// (steal), in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_percent: Option<f64>,
    /// The last error seen, if any, to explain non-zero error counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Closed or open loop, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum LoadShape {
    /// A fixed number of tasks as fast as `concurrency` senders can go.
    Closed {
        /// Tasks to submit.
        count: u64,
        /// Requests in flight at once.
        concurrency: usize,
    },
    /// Requests at a fixed rate, latency measured from the intended send
    /// time.
    Open {
        /// Tasks per second.
        rate_per_s: f64,
        /// How long the schedule runs, in seconds.
        duration_s: f64,
    },
}

/// What happened to the tasks of a run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Tasks the generator tried to submit.
    pub requested: u64,
    /// Tasks actually sent (fewer than requested when `max_duration` cut
    /// the run short).
    pub sent: u64,
    /// Tasks the intake accepted.
    pub accepted: u64,
    /// Tasks the intake answered with another status, by status.
    pub rejected: BTreeMap<String, u64>,
    /// Tasks lost to connection errors or unreadable answers.
    pub errors: u64,
    /// Accepted tasks seen in a final state.
    pub finished: u64,
    /// Accepted tasks not seen finishing before the drain timeout (0 when
    /// completion is not observed).
    pub unfinished: u64,
    /// Final states seen, by wire name.
    pub states: BTreeMap<String, u64>,
}

/// Rates over the run.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Seconds from the first send to the last submit answer.
    pub submit_secs: f64,
    /// Accepted tasks per second over `submit_secs`.
    pub submit_per_s: f64,
    /// Seconds from the first send to the last task seen finishing.
    pub end_to_end_secs: f64,
    /// Finished tasks per second over `end_to_end_secs`.
    pub end_to_end_per_s: f64,
}

/// Latency percentiles. `queue_wait` and `end_to_end` are per task and
/// empty when completion is not observed; `submit` is per request.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latencies {
    /// Send → submit answer received.
    pub submit: LatencySummary,
    /// Send → task seen running.
    pub queue_wait: LatencySummary,
    /// Send → task seen in its final state.
    pub end_to_end: LatencySummary,
}

impl Report {
    /// Whether every requested task was accepted and seen succeeding.
    pub fn all_succeeded(&self) -> bool {
        let succeeded = self.tasks.states.get("succeeded").copied().unwrap_or(0);
        self.tasks.accepted == self.tasks.requested && succeeded == self.tasks.requested
    }

    /// The human-readable summary printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let shape = match &self.load {
            LoadShape::Closed { count, concurrency } => {
                format!("closed loop, {count} tasks, concurrency {concurrency}")
            }
            LoadShape::Open {
                rate_per_s,
                duration_s,
            } => format!("open loop, {rate_per_s} tasks/s for {duration_s} s"),
        };
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "{}: {shape}, {} submits to {} (completion observed via {})",
            self.label, self.api, self.target, self.observe
        );
        let t = &self.tasks;
        let rejected: u64 = t.rejected.values().sum();
        let states = t
            .states
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "  tasks       requested {}, sent {}, accepted {}, rejected {rejected}, errors {}, finished {} ({}), unfinished {}",
            t.requested,
            t.sent,
            t.accepted,
            t.errors,
            t.finished,
            if states.is_empty() { "-" } else { &states },
            t.unfinished
        );
        if !t.rejected.is_empty() {
            let _ = writeln!(out, "  rejected    {:?}", t.rejected);
        }
        let th = &self.throughput;
        let _ = writeln!(
            out,
            "  throughput  submit {:.0} tasks/s over {:.2} s; end to end {:.0} tasks/s over {:.2} s",
            th.submit_per_s, th.submit_secs, th.end_to_end_per_s, th.end_to_end_secs
        );
        let _ = writeln!(
            out,
            "  {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency ms", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        for (name, s) in [
            ("submit", &self.latency.submit),
            ("queue wait", &self.latency.queue_wait),
            ("end to end", &self.latency.end_to_end),
        ] {
            let _ = writeln!(
                out,
                "  {:<12} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms, s.mean_ms
            );
        }
        if !self.cpu.is_empty() {
            let _ = writeln!(
                out,
                "  cpu         µs per finished task: {}",
                crate::raw::cpu_line(&self.cpu)
            );
        }
        if let Some(steal) = self.steal_percent {
            let _ = writeln!(out, "  machine     {}", crate::raw::steal_line(steal));
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(out, "  last error  {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            label: "t".into(),
            target: "http://127.0.0.1:3000".into(),
            api: "single".into(),
            load: LoadShape::Closed {
                count: 2,
                concurrency: 1,
            },
            observe: "redis".into(),
            started_at: Utc::now(),
            requests: 2,
            tasks: TaskCounts {
                requested: 2,
                sent: 2,
                accepted: 2,
                finished: 2,
                states: BTreeMap::from([("succeeded".into(), 2)]),
                ..TaskCounts::default()
            },
            throughput: Throughput::default(),
            latency: Latencies::default(),
            cpu: Vec::new(),
            steal_percent: None,
            last_error: None,
        }
    }

    #[test]
    fn success_needs_every_requested_task_to_succeed() {
        let mut r = report();
        assert!(r.all_succeeded());
        r.tasks.states.insert("succeeded".into(), 1);
        r.tasks.states.insert("failed".into(), 1);
        assert!(!r.all_succeeded());
    }

    #[test]
    fn json_round_trips_and_table_names_the_figures() {
        let r = report();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""mode":"closed""#));
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);
        let table = r.table();
        assert!(table.contains("end to end"));
        assert!(table.contains("succeeded 2"));
    }
}
