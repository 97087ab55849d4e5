//! `wait_for_task`: follow a task in the store until it finishes, the wait
//! runs out, the client cancels, or the intake shuts down.
//!
//! The store is the single source of truth, so the wait polls it: quickly at
//! first and after every change (a task that just started often finishes
//! soon), then backing off to [`MAX_POLL`] so a long wait costs a few store
//! reads a second. Nothing is kept in the process between requests: a client
//! whose wait ended can wait again on any replica.

use std::future::Future;
use std::time::Duration;

use claudecluster_engine::{TaskId, TaskRecord, TaskState};
use rmcp::RoleServer;
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::Peer;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::service::{ServiceError, TaskService};

/// First pause between store reads, and the pause after a change.
pub const FIRST_POLL: Duration = Duration::from_millis(20);
/// Longest pause between store reads.
pub const MAX_POLL: Duration = Duration::from_millis(500);

/// Where progress goes as the task moves.
pub trait Progress: Sync {
    /// Reports the `step`-th state seen (1 for the state at the start of the
    /// wait); `record` is the task in that state.
    fn report(&self, step: u32, record: &TaskRecord) -> impl Future<Output = ()> + Send;
}

/// No progress token: nothing to report to.
#[derive(Debug, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    async fn report(&self, _step: u32, _record: &TaskRecord) {}
}

/// `notifications/progress` to the client that asked with `token`.
#[derive(Debug, Clone)]
pub struct PeerProgress {
    /// The requesting client.
    pub peer: Peer<RoleServer>,
    /// Its progress token.
    pub token: ProgressToken,
}

impl Progress for PeerProgress {
    async fn report(&self, step: u32, record: &TaskRecord) {
        let mut param = ProgressNotificationParam::new(self.token.clone(), f64::from(step));
        param.message = Some(describe(record));
        // A client that went away cannot be told; its request is cancelled
        // by the transport and the wait ends at its next step.
        if let Err(e) = self.peer.notify_progress(param).await {
            tracing::debug!(error = %e, "progress notification not delivered");
        }
    }
}

impl<P: Progress> Progress for Option<P> {
    async fn report(&self, step: u32, record: &TaskRecord) {
        if let Some(progress) = self {
            progress.report(step, record).await;
        }
    }
}

/// The progress message for a task in its current state.
pub fn describe(record: &TaskRecord) -> String {
    match record.state {
        TaskState::Queued if record.attempts > 0 => format!(
            "queued for attempt {} of {}",
            record.attempts + 1,
            record.max_attempts
        ),
        TaskState::Running => {
            let worker = record.worker_id.as_deref().unwrap_or("a worker");
            format!(
                "running (attempt {} of {}) on {worker}",
                record.attempts, record.max_attempts
            )
        }
        state => state.as_str().to_owned(),
    }
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Waited {
    /// The task is in a final state.
    Finished(TaskRecord),
    /// The wait ran out, or the intake is shutting down; the task is still
    /// queued or running.
    NotYet(TaskRecord),
    /// The client cancelled the request (or its stream closed).
    Cancelled,
}

/// Follows task `id` for at most `max_wait`, reporting each state it sees
/// to `progress`.
///
/// `cancel` is the request's cancellation; `stopping` is the intake's
/// shutdown, which ends the wait with the task as it is.
///
/// # Errors
/// [`ServiceError::TaskNotFound`] when there is no such task (also when its
/// record expires during the wait), or a store failure.
pub async fn wait_for(
    service: &TaskService,
    id: TaskId,
    max_wait: Duration,
    progress: &impl Progress,
    cancel: &CancellationToken,
    stopping: &CancellationToken,
) -> Result<Waited, ServiceError> {
    let deadline = Instant::now() + max_wait;
    let mut pause = FIRST_POLL;
    let mut seen: Option<(TaskState, u32)> = None;
    let mut step = 0;
    loop {
        let record = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(Waited::Cancelled),
            record = service.get(id) => record?,
        };
        // The attempt number tells a retry (running, queued, running again)
        // apart from no change.
        let now_seen = (record.state, record.attempts);
        if seen != Some(now_seen) {
            seen = Some(now_seen);
            step += 1;
            pause = FIRST_POLL;
            progress.report(step, &record).await;
        }
        if record.state.is_final() {
            return Ok(Waited::Finished(record));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Waited::NotYet(record));
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(Waited::Cancelled),
            () = stopping.cancelled() => return Ok(Waited::NotYet(record)),
            // The last read lands on the deadline, so the answer is as fresh
            // as the wait allows.
            () = tokio::time::sleep(pause.min(deadline - now)) => {}
        }
        pause = (pause * 2).min(MAX_POLL);
    }
}
