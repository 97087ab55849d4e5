//! The worker's Prometheus metrics. Handles are registered once per pool so
//! the per-task cost is an atomic add, not a label lookup.
//!
//! - `claudecluster_tasks_total{status,worker_id}`: attempts that ended the
//!   task (status = final state) or sent it back for a retry (`retried`).
//! - `claudecluster_task_duration_seconds{status,worker_id}`: their run time.
//! - `claudecluster_tasks_in_flight{worker_id}`: tasks running now.
//! - `claudecluster_dead_letters_total{reason}`: by reason code.
//! - `claudecluster_redeliveries_total`: deliveries after the first.

use std::time::Duration;

use claudecluster_engine::task::TaskState;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// How an attempt ended, as the `status` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// A final state.
    Final(TaskState),
    /// Sent back to the queue for another attempt.
    Retried,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Final(s) => s.as_str(),
            Status::Retried => "retried",
        }
    }
}

const STATUSES: [Status; 6] = [
    Status::Final(TaskState::Succeeded),
    Status::Final(TaskState::Failed),
    Status::Final(TaskState::TimedOut),
    Status::Final(TaskState::Cancelled),
    Status::Final(TaskState::DeadLettered),
    Status::Retried,
];

/// The pool's metric handles.
#[derive(Debug)]
pub(crate) struct Meters {
    outcomes: Vec<(Status, Counter, Histogram)>,
    in_flight: Gauge,
    redeliveries: Counter,
}

impl Meters {
    /// Registers the metrics of worker `worker_id`.
    pub(crate) fn new(worker_id: &str) -> Self {
        let outcomes = STATUSES
            .iter()
            .map(|&status| {
                let labels = [
                    ("status", status.label().to_owned()),
                    ("worker_id", worker_id.to_owned()),
                ];
                (
                    status,
                    counter!("claudecluster_tasks_total", &labels),
                    histogram!("claudecluster_task_duration_seconds", &labels),
                )
            })
            .collect();
        Self {
            outcomes,
            in_flight: gauge!("claudecluster_tasks_in_flight", "worker_id" => worker_id.to_owned()),
            redeliveries: counter!("claudecluster_redeliveries_total"),
        }
    }

    /// Counts an attempt that ended with `status` after `took`.
    pub(crate) fn outcome(&self, status: Status, took: Duration) {
        if let Some((_, count, time)) = self.outcomes.iter().find(|(s, ..)| *s == status) {
            count.increment(1);
            time.record(took.as_secs_f64());
        }
    }

    /// A task started (`+1`) or ended (`-1`).
    pub(crate) fn in_flight(&self, delta: f64) {
        self.in_flight.increment(delta);
    }

    /// A message came again.
    pub(crate) fn redelivered(&self) {
        self.redeliveries.increment(1);
    }

    /// A message went to the dead letters; `reason` is a short code.
    pub(crate) fn dead_lettered(&self, reason: &str) {
        counter!("claudecluster_dead_letters_total", "reason" => reason.to_owned()).increment(1);
    }
}
