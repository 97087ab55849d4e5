//! One attempt at a valid task: start it in the store, run it while keeping
//! the broker lease and watching for a cancel ([`crate::lease`]), decide what
//! its outcome means (done, retry, dead letter, cancelled, hand back), write
//! that to the store, and only then acknowledge.
//!
//! A first delivery's start is not written before it runs: the worker reads
//! the record (is the task still queued?) and writes the start and the end
//! together when the attempt ends, or the start alone once the attempt has
//! run for `record_start_after_ms`. Most short tasks so cost the store one
//! write instead of two. Redeliveries are started in the store before they
//! run, so a task that kills its worker leaves started attempts behind for
//! the crash count.
//!
//! The order matters for "nothing lost": a record is written before the
//! message is acknowledged, and a dead letter before the record says
//! `dead_lettered`. When a write fails after retries the delivery is handed
//! back (`Nak`) and the next delivery picks up from the store's state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use claudecluster_engine::broker::{AckKind, Acker};
use claudecluster_engine::results::{AttemptEnd, EndOutcome, StartOutcome, StoreError};
use claudecluster_engine::task::{TaskError, TaskMessage, TaskResult, TaskState};

use crate::delivery::ack;
use crate::executor::{ExecContext, ExecError};
use crate::lease::{self, CancelWatch, Stop};
use crate::metric::Status;
use crate::pool::Runtime;
use crate::retry::{retry, task_backoff};
use crate::workdir;

/// Error code of an attempt handed back because its worker shut down; such
/// attempts do not count against `max_attempts`.
pub const HANDED_BACK: &str = "worker_shutdown";

/// Error code of an attempt that a later delivery found unrecorded: its
/// worker stopped before recording it. Counts as a crash, not as one of
/// the task's `max_attempts` (it may also be a delivery handed back before
/// it started, for a store outage or a worker's shutdown).
pub const LOST: &str = "worker_lost";

/// Error code of an attempt stopped because a client cancelled the task.
pub const CANCELLED: &str = "cancelled";

/// How long an executor that was told to stop may take to return before
/// the runtime stops waiting for it (dropping it kills its processes).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What an ended attempt means for the task.
#[derive(Debug)]
enum Decision {
    /// A final state; `dead_letter` is the reason when the message goes to
    /// the dead letters.
    Final {
        state: TaskState,
        result: Option<TaskResult>,
        error: Option<TaskError>,
        dead_letter: Option<(String, String)>,
    },
    /// Back to the queue for another attempt after `delay`.
    Retry { error: TaskError, delay: Duration },
    /// A client cancelled the task while it ran; the record already says
    /// `cancelled`, the attempt is closed as such.
    Cancelled,
    /// The worker is stopping: back to the queue for another worker now.
    HandBack,
}

/// Whether an attempt's start is in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Recorded: the record says `running` for this attempt.
    Recorded,
    /// Not yet: the attempt began at this time, and is recorded as a whole
    /// when it ends, unless it runs for `record_start_after_ms` first.
    Deferred(DateTime<Utc>),
}

/// Runs a decoded, valid task message through one attempt.
pub(crate) async fn process(
    rt: &Runtime,
    msg: TaskMessage,
    payload: Bytes,
    acker: Arc<dyn Acker>,
    delivery_count: u32,
) {
    // Boxed, as the attempt below: inline, each await's state adds to this
    // future, which every delivery allocates (see `run_recording_start`).
    let (attempt, start) = match Box::pin(begin(rt, &msg, delivery_count)).await {
        Ok(Begun::Run { attempt, start }) => (attempt, start),
        Ok(Begun::AlreadyFinal(state)) => {
            tracing::debug!(%state, "task already final; acknowledging the delivery");
            ack(acker.as_ref(), AckKind::Ack).await;
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start the attempt; handing the message back");
            ack(acker.as_ref(), AckKind::Nak(Some(rt.service_retry_delay()))).await;
            return;
        }
    };
    tracing::Span::current().record("attempt", attempt);

    let lease_every = Duration::from_millis((rt.settings.nats.ack_wait_ms / 3).max(1));
    let stop = Stop::new(&rt.abort);
    let watch = CancelWatch {
        read: || rt.store.state(msg.id),
        every: Duration::from_millis(rt.settings.worker.cancel_check_ms.max(1)),
        stop: stop.clone(),
    };
    // Boxed: the attempt's future is large, and `keep` would otherwise
    // carry (and move) it by value.
    let kind = lease::keep(
        Box::pin(run_and_record(rt, &msg, &payload, attempt, start, &stop)),
        acker.as_ref(),
        lease_every,
        watch,
    )
    .await;
    ack(acker.as_ref(), kind).await;
}

/// What [`begin`] found.
enum Begun {
    /// Run attempt `attempt`.
    Run { attempt: u32, start: Start },
    /// The task is final (cancelled while queued, or a redelivery of a
    /// finished task): do not run it.
    AlreadyFinal(TaskState),
}

/// Decides whether the task runs, and as which attempt. A first delivery of
/// a task that never ran only has its record read: its start is recorded
/// with its end, in one write, if it ends soon enough ([`Start::Deferred`]).
/// Anything else is recorded as started before it runs, so that a task which
/// crashes its worker leaves a started attempt behind.
async fn begin(rt: &Runtime, msg: &TaskMessage, delivery_count: u32) -> Result<Begun, StoreError> {
    if rt.settings.worker.record_start_after_ms > 0 {
        match rt.store.peek(msg.id).await {
            Ok(Some((TaskState::Queued, 0))) if delivery_count == 1 => {
                return Ok(Begun::Run {
                    attempt: 1,
                    start: Start::Deferred(Utc::now()),
                });
            }
            Ok(Some((TaskState::Queued, 0))) => record_lost_delivery(rt, msg).await,
            Ok(Some((state, _))) if state.is_final() => return Ok(Begun::AlreadyFinal(state)),
            // No record yet (published straight onto the queue), a replay,
            // or a failed read: the start write below handles all of them.
            Ok(_) | Err(_) => {}
        }
    }
    Ok(match write_start(rt, msg, Utc::now()).await? {
        StartOutcome::Started { attempt } => Begun::Run {
            attempt,
            start: Start::Recorded,
        },
        StartOutcome::AlreadyFinal(state) => Begun::AlreadyFinal(state),
    })
}

/// Records the attempt as started at `at`, retrying while the store is
/// unavailable.
async fn write_start(
    rt: &Runtime,
    msg: &TaskMessage,
    at: DateTime<Utc>,
) -> Result<StartOutcome, StoreError> {
    retry("starting the attempt", || {
        rt.store.start_attempt(msg, &rt.worker_id, at)
    })
    .await
}

/// A redelivery of a task that has never recorded an attempt: the delivery
/// before it ran without a recorded start and its worker stopped before the
/// end (it crashed, most likely because of the task), or could not reach
/// the store at all. It is recorded as an attempt ended with [`LOST`], which
/// counts as a crash when deciding whether the task kills its workers.
async fn record_lost_delivery(rt: &Runtime, msg: &TaskMessage) {
    let now = Utc::now();
    let end = AttemptEnd {
        state: TaskState::Queued,
        result: None,
        error: Some(TaskError::new(
            LOST,
            "an earlier delivery of this task ended without a record of its attempt: \
             its worker stopped (or lost the store) before recording it",
        )),
        at: now,
    };
    if let Err(e) = rt
        .store
        .record_unstarted_attempt(msg, "unknown", now, &end)
        .await
    {
        tracing::warn!(error = %e, "cannot record the lost delivery");
    }
}

/// Runs the attempt (or quarantines it), records the outcome and returns
/// the acknowledgement to send.
async fn run_and_record(
    rt: &Runtime,
    msg: &TaskMessage,
    payload: &Bytes,
    mut attempt: u32,
    mut start: Start,
    stop: &Stop,
) -> AckKind {
    let began = Instant::now();
    let decision = if attempt > msg.max_attempts
        && let Some(crashed) = crashed_attempts(rt, msg, attempt).await
    {
        // Earlier deliveries started but never finished: their workers
        // died. Running it again could kill this one too.
        let times = if crashed == 1 { "time" } else { "times" };
        let error = TaskError::new(
            "attempts_exhausted",
            format!("worker crashed {crashed} {times}"),
        );
        let reason = format!("attempts_exhausted: worker crashed {crashed} {times}");
        Decision::Final {
            state: TaskState::DeadLettered,
            result: None,
            error: Some(error),
            dead_letter: Some(("attempts_exhausted".into(), reason)),
        }
    } else {
        let outcome = run_recording_start(rt, msg, &mut attempt, &mut start, stop).await;
        decide(rt, msg, attempt, outcome, stop).await
    };
    // Boxed, as in `run_recording_start`.
    Box::pin(record(
        rt,
        msg,
        payload,
        attempt,
        start,
        decision,
        began.elapsed(),
    ))
    .await
}

/// Runs the attempt. A deferred start is recorded once the attempt has run
/// for `record_start_after_ms`, while it goes on; `attempt` and `start`
/// then say what was recorded. A start that cannot be recorded stays
/// deferred: the end records the whole attempt.
async fn run_recording_start(
    rt: &Runtime,
    msg: &TaskMessage,
    attempt: &mut u32,
    start: &mut Start,
    stop: &Stop,
) -> Result<TaskResult, ExecError> {
    let Start::Deferred(at) = *start else {
        return run(rt, msg, *attempt, stop).await;
    };
    // Both futures boxed: held inline, they made the attempt's future
    // larger than the allocator's per-thread cache serves (1 KiB), and a
    // larger block costs the allocator many times more on every task.
    let mut running = Box::pin(run(rt, msg, *attempt, stop));
    let long = Duration::from_millis(rt.settings.worker.record_start_after_ms);
    tokio::select! {
        biased;
        outcome = &mut running => return outcome,
        () = tokio::time::sleep(long) => {}
    }
    let (outcome, recorded) = tokio::join!(&mut running, Box::pin(write_start(rt, msg, at)));
    match recorded {
        Ok(StartOutcome::Started { attempt: number }) => {
            if number != *attempt {
                tracing::warn!(
                    number,
                    "another delivery of the task started meanwhile; recording this as attempt {number}"
                );
                *attempt = number;
            }
            *start = Start::Recorded;
        }
        // Cancelled meanwhile: the cancel watch stops the attempt, and its
        // end is recorded as a cancelled attempt.
        Ok(StartOutcome::AlreadyFinal(state)) => {
            tracing::debug!(%state, "task became final before its start was recorded");
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the start; recording the attempt when it ends");
        }
    }
    outcome
}

/// Runs the executor in a fresh work directory under the task's timeout,
/// until it finishes or `stop` stops it.
async fn run(
    rt: &Runtime,
    msg: &TaskMessage,
    attempt: u32,
    stop: &Stop,
) -> Result<TaskResult, ExecError> {
    let worker = &rt.settings.worker;
    let work_dir = workdir::attempt_dir(&rt.work_root, msg.id, attempt);
    let needs_dir = rt.executor.needs_work_dir();
    if needs_dir && let Err(e) = workdir::create_fresh(&work_dir).await {
        return Err(ExecError::Retryable {
            error: TaskError::new(
                "work_dir_failed",
                format!("cannot create {}: {e}", work_dir.display()),
            ),
            delay: None,
            partial: None,
        });
    }
    let ctx = ExecContext {
        work_dir,
        timeout: Duration::from_millis(msg.effective_timeout_ms(worker.task_timeout_ms)),
        cancel: stop.exec_token(),
        limits: worker.limits.clone(),
        max_output_bytes: worker.max_output_bytes,
    };
    let started = Instant::now();
    // The executor's own timeout and cancel handling kill its processes;
    // these outer bounds also stop executors that watch neither the clock
    // nor the token (dropping one kills the processes it started).
    let bounded = tokio::time::timeout(
        ctx.timeout + Duration::from_secs(1),
        rt.executor.run(msg, &ctx),
    );
    let stopped = async {
        ctx.cancel.cancelled().await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    let mut outcome = tokio::select! {
        outcome = bounded => outcome.unwrap_or(Err(ExecError::TimedOut(ctx.timeout))),
        () = stopped => Err(ExecError::Cancelled),
    };
    if needs_dir && !worker.keep_work_dirs {
        workdir::remove(&ctx.work_dir).await;
    }
    let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let name = rt.executor.name();
    let fill = |r: &mut TaskResult| {
        if r.executor.is_empty() {
            r.executor = name.into();
        }
        if r.duration_ms == 0 {
            r.duration_ms = took;
        }
    };
    match &mut outcome {
        Ok(result) => fill(result),
        Err(
            ExecError::Permanent {
                partial: Some(p), ..
            }
            | ExecError::Retryable {
                partial: Some(p), ..
            },
        ) => fill(p),
        Err(_) => {}
    }
    outcome
}

/// What the executor's outcome means for the task.
async fn decide(
    rt: &Runtime,
    msg: &TaskMessage,
    attempt: u32,
    outcome: Result<TaskResult, ExecError>,
    stop: &Stop,
) -> Decision {
    let worker = &rt.settings.worker;
    let final_ = |state, result, error| Decision::Final {
        state,
        result,
        error,
        dead_letter: None,
    };
    match outcome {
        Ok(result) => final_(TaskState::Succeeded, Some(result), None),
        Err(ExecError::Permanent { error, partial }) => {
            final_(TaskState::Failed, partial.map(|p| *p), Some(error))
        }
        Err(ExecError::Retryable {
            error,
            delay,
            partial,
        }) => {
            if attempts_left(rt, msg, attempt).await {
                let delay = delay.unwrap_or_else(|| backoff(rt, attempt));
                Decision::Retry { error, delay }
            } else {
                let reason = format!("{}: {}", error.code, error.message);
                Decision::Final {
                    state: TaskState::DeadLettered,
                    result: partial.map(|p| *p),
                    dead_letter: Some((error.code.clone(), reason)),
                    error: Some(error),
                }
            }
        }
        Err(ExecError::TimedOut(limit)) => {
            let error = TaskError::new(
                "timeout",
                format!(
                    "the attempt exceeded its time limit of {} ms and was killed",
                    limit.as_millis()
                ),
            );
            if worker.retry_timeouts && attempts_left(rt, msg, attempt).await {
                Decision::Retry {
                    error,
                    delay: backoff(rt, attempt),
                }
            } else {
                final_(TaskState::TimedOut, None, Some(error))
            }
        }
        // A client's cancel wins over a shutdown that happened alongside: the
        // task is final either way.
        Err(ExecError::Cancelled) if stop.by_client() => Decision::Cancelled,
        Err(ExecError::Cancelled) => Decision::HandBack,
    }
}

fn backoff(rt: &Runtime, attempt: u32) -> Duration {
    let w = &rt.settings.worker;
    task_backoff(
        attempt,
        Duration::from_millis(w.retry_base_delay_ms),
        Duration::from_millis(w.retry_max_delay_ms),
        &mut rand::rng(),
    )
}

/// Writes the decision (dead letter first, then the record) and returns the
/// acknowledgement that matches what was written.
///
/// The writes are boxed: this future sits in every task's attempt, which
/// must stay within the allocator's per-thread cache (see
/// [`run_recording_start`]).
async fn record(
    rt: &Runtime,
    msg: &TaskMessage,
    payload: &Bytes,
    attempt: u32,
    start: Start,
    decision: Decision,
    took: Duration,
) -> AckKind {
    let (end, then) = match decision {
        Decision::Final {
            state,
            result,
            error,
            dead_letter,
        } => {
            if let Some((code, reason)) = dead_letter {
                let written = Box::pin(retry("writing a dead letter", || {
                    rt.consumer.dead_letter(Some(msg.id), payload, &reason)
                }))
                .await;
                if let Err(e) = written {
                    tracing::error!(error = %e, "cannot dead-letter the task; handing it back");
                    return AckKind::Nak(Some(rt.service_retry_delay()));
                }
                rt.meters.dead_lettered(&code);
            }
            let kind = if state == TaskState::DeadLettered {
                AckKind::Term
            } else {
                AckKind::Ack
            };
            let end = AttemptEnd {
                state,
                result,
                error,
                at: Utc::now(),
            };
            (end, Then::Count(Status::Final(state), kind))
        }
        Decision::Retry { error, delay } => {
            tracing::info!(code = %error.code, ?delay, "attempt failed; retrying");
            let end = AttemptEnd {
                state: TaskState::Queued,
                result: None,
                error: Some(error),
                at: Utc::now(),
            };
            (end, Then::Count(Status::Retried, AckKind::Nak(Some(delay))))
        }
        Decision::Cancelled => {
            let end = AttemptEnd {
                state: TaskState::Cancelled,
                result: None,
                error: Some(TaskError::new(
                    CANCELLED,
                    "the task was cancelled while this attempt ran; its processes were stopped",
                )),
                at: Utc::now(),
            };
            (end, Then::Cancelled)
        }
        Decision::HandBack => {
            tracing::info!("worker stopping; handing the task back");
            let end = AttemptEnd {
                state: TaskState::Queued,
                result: None,
                error: Some(TaskError::new(
                    HANDED_BACK,
                    "the worker shut down before the attempt finished",
                )),
                at: Utc::now(),
            };
            (end, Then::HandBack)
        }
    };
    let Some(outcome) = Box::pin(write_end(rt, msg, attempt, start, &end)).await else {
        return AckKind::Nak(Some(rt.service_retry_delay()));
    };
    match (then, outcome) {
        (Then::Count(status, kind), EndOutcome::Written) => {
            tracing::info!(state = %end.state, "attempt recorded");
            rt.meters.outcome(status, took);
            kind
        }
        // The record said `cancelled` before the processes were stopped,
        // so the store answers "already final" and closes the attempt
        // without counting a duplicate execution. Either answer means the
        // message is done with.
        (Then::Cancelled, _) => {
            tracing::info!("attempt stopped by a cancel");
            rt.meters.outcome(Status::Final(TaskState::Cancelled), took);
            AckKind::Ack
        }
        // Not an outcome of the task: no tasks_total count.
        (Then::HandBack, EndOutcome::Written) => AckKind::Nak(None),
        (Then::Count(..), EndOutcome::AlreadyFinal(state)) => {
            // Cancelled meanwhile, or another worker finished a redelivery
            // first: the first final write stands.
            tracing::info!(%state, "task was already final; result not written");
            AckKind::Ack
        }
        // Cancelled meanwhile: nothing left to hand back.
        (Then::HandBack, EndOutcome::AlreadyFinal(_)) => AckKind::Ack,
    }
}

/// What [`record`] does once the end is written.
enum Then {
    /// Count the outcome, then settle the message with this.
    Count(Status, AckKind),
    /// The attempt was stopped by a client's cancel.
    Cancelled,
    /// The worker is stopping and hands the task back.
    HandBack,
}

async fn write_end(
    rt: &Runtime,
    msg: &TaskMessage,
    attempt: u32,
    start: Start,
    end: &AttemptEnd,
) -> Option<EndOutcome> {
    match retry("recording the attempt", || match start {
        Start::Recorded => rt.store.end_attempt(msg.id, attempt, end),
        Start::Deferred(at) => rt
            .store
            .record_unstarted_attempt(msg, &rt.worker_id, at, end),
    })
    .await
    {
        Ok(outcome) => Some(outcome),
        Err(e) => {
            tracing::error!(error = %e, "cannot record the attempt; handing the message back");
            None
        }
    }
}

/// Whether the task may be tried again after attempt `attempt`. Attempts
/// handed back at a worker's shutdown do not count, nor lost ones (which
/// may be deliveries handed back before they started); finding them needs
/// the record, read only when the count alone says no.
async fn attempts_left(rt: &Runtime, msg: &TaskMessage, attempt: u32) -> bool {
    if attempt < msg.max_attempts {
        return true;
    }
    let not_counted = match rt.store.get(msg.id).await {
        Ok(Some(record)) => record
            .attempt_history
            .iter()
            .filter(|a| a.number < attempt && (is_handed_back(a) || is_lost(a)))
            .count(),
        _ => 0,
    };
    (attempt as usize) < msg.max_attempts as usize + not_counted
}

/// For an attempt number beyond `max_attempts`: how many earlier attempts
/// crashed (started and never ended, or lost), when the task must not run
/// again: the executions that count (not handed back, not lost) exceed
/// the limit, or the crashes reach it. `None` when the task may run.
async fn crashed_attempts(rt: &Runtime, msg: &TaskMessage, attempt: u32) -> Option<u32> {
    let record = match rt.store.get(msg.id).await {
        Ok(Some(record)) => record,
        // Without the history, trust the count.
        _ => return Some(attempt - 1),
    };
    let earlier = || record.attempt_history.iter().filter(|a| a.number < attempt);
    let not_counted = earlier()
        .filter(|a| is_handed_back(a) || is_lost(a))
        .count();
    let crashed = earlier()
        .filter(|a| a.outcome.is_none() || is_lost(a))
        .count();
    let counted = attempt as usize - not_counted;
    let max = msg.max_attempts as usize;
    if counted <= max && crashed < max {
        return None;
    }
    Some(u32::try_from(crashed).unwrap_or(u32::MAX))
}

fn is_handed_back(a: &claudecluster_engine::task::Attempt) -> bool {
    a.error.as_ref().is_some_and(|e| e.code == HANDED_BACK)
}

/// A delivery found unrecorded by the next one ([`LOST`]): most likely a
/// crash, but possibly a delivery handed back before it started.
fn is_lost(a: &claudecluster_engine::task::Attempt) -> bool {
    a.error.as_ref().is_some_and(|e| e.code == LOST)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use claudecluster_engine::backend::Backends;
    use claudecluster_engine::broker::{BrokerError, Delivery, PriorityBand};
    use claudecluster_engine::config::Settings;
    use claudecluster_engine::task::{NewTask, TaskRecord};
    use claudecluster_testkit::ALLOCATOR_THREAD_CACHE_MAX;
    use claudecluster_testkit::wait::eventually;
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::executor::Executor;
    use crate::metric::Meters;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<AckKind>>);

    impl Recorder {
        /// The acknowledgements that settle the message (not lease extensions).
        fn settling(&self) -> Vec<AckKind> {
            let acks = self.0.lock().unwrap();
            acks.iter()
                .copied()
                .filter(|k| *k != AckKind::Progress)
                .collect()
        }
    }

    #[async_trait]
    impl Acker for Recorder {
        async fn ack(&self, kind: AckKind) -> Result<(), BrokerError> {
            self.0.lock().unwrap().push(kind);
            Ok(())
        }
    }

    /// Runs until its attempt is told to stop, as a process executor does.
    #[derive(Default)]
    struct UntilStopped {
        started: Notify,
    }

    #[async_trait]
    impl Executor for UntilStopped {
        fn name(&self) -> &'static str {
            "until-stopped"
        }

        fn needs_work_dir(&self) -> bool {
            false
        }

        async fn run(&self, _: &TaskMessage, ctx: &ExecContext) -> Result<TaskResult, ExecError> {
            self.started.notify_one();
            ctx.cancel.cancelled().await;
            Err(ExecError::Cancelled)
        }
    }

    /// Runs until released, for looking at the record mid-attempt.
    #[derive(Default)]
    struct Gate {
        started: Notify,
        release: Notify,
    }

    #[async_trait]
    impl Executor for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }

        fn needs_work_dir(&self) -> bool {
            false
        }

        async fn run(&self, _: &TaskMessage, _: &ExecContext) -> Result<TaskResult, ExecError> {
            self.started.notify_one();
            self.release.notified().await;
            Ok(TaskResult {
                output: "released".into(),
                ..TaskResult::default()
            })
        }
    }

    /// A runtime on the embedded backends in `dir`.
    fn runtime(dir: &std::path::Path, executor: Arc<dyn Executor>) -> (Runtime, Backends) {
        runtime_with(dir, executor, |_| {})
    }

    /// [`runtime`] with settings changed by `adjust`.
    fn runtime_with(
        dir: &std::path::Path,
        executor: Arc<dyn Executor>,
        adjust: impl FnOnce(&mut Settings),
    ) -> (Runtime, Backends) {
        let mut settings = Settings::default();
        settings.embedded.data_dir = Some(dir.to_path_buf());
        settings.worker.cancel_check_ms = 20;
        adjust(&mut settings);
        let backends = claudecluster_engine::embedded::open_embedded(&settings).unwrap();
        let rt = Runtime {
            settings: Arc::new(settings),
            consumer: backends.consumer.clone(),
            store: backends.store.clone(),
            executor,
            worker_id: "w1".into(),
            work_root: dir.join("work"),
            abort: CancellationToken::new(),
            meters: Meters::new("w1"),
        };
        (rt, backends)
    }

    /// A task message whose `queued` record is stored, as the intake leaves it.
    async fn queued_message(rt: &Runtime, backends: &Backends) -> TaskMessage {
        let msg = message(rt);
        backends
            .store
            .create(&TaskRecord::queued(&msg, Utc::now()))
            .await
            .unwrap();
        msg
    }

    /// Processes delivery `delivery` of `msg` on the gate, and returns the
    /// record as it stood while the executor ran.
    async fn process_gated(
        rt: &Runtime,
        backends: &Backends,
        executor: &Gate,
        msg: &TaskMessage,
        acker: Arc<Recorder>,
        delivery: u32,
    ) -> TaskRecord {
        let run = process(rt, msg.clone(), Bytes::new(), acker, delivery);
        let look = async {
            executor.started.notified().await;
            let mid = backends.store.get(msg.id).await.unwrap().unwrap();
            executor.release.notify_one();
            mid
        };
        tokio::join!(run, look).1
    }

    fn message(rt: &Runtime) -> TaskMessage {
        NewTask {
            prompt: "run until stopped".into(),
            ..NewTask::default()
        }
        .into_message(&rt.settings.tasks, Utc::now())
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_cancel_is_recorded_as_cancelled_and_acked() {
        let dir = tempfile::tempdir().unwrap();
        let executor = Arc::new(UntilStopped::default());
        let (rt, backends) = runtime(dir.path(), executor.clone());
        let msg = message(&rt);
        let acker = Arc::new(Recorder::default());

        let run = process(&rt, msg.clone(), Bytes::new(), acker.clone(), 1);
        let cancel = async {
            executor.started.notified().await;
            backends.store.cancel(msg.id, Utc::now()).await.unwrap();
        };
        tokio::join!(run, cancel);

        assert_eq!(acker.settling(), [AckKind::Ack], "acked, not handed back");
        let record = backends.store.get(msg.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Cancelled);
        assert_eq!(record.duplicate_executions, 0);
        let attempt = &record.attempt_history[0];
        assert_eq!(attempt.outcome, Some(TaskState::Cancelled));
        assert_eq!(attempt.error.as_ref().unwrap().code, CANCELLED);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_hands_the_task_back() {
        let dir = tempfile::tempdir().unwrap();
        let executor = Arc::new(UntilStopped::default());
        let (rt, backends) = runtime(dir.path(), executor.clone());
        let msg = message(&rt);
        let acker = Arc::new(Recorder::default());

        let run = process(&rt, msg.clone(), Bytes::new(), acker.clone(), 1);
        let abort = async {
            executor.started.notified().await;
            rt.abort.cancel();
        };
        tokio::join!(run, abort);

        assert_eq!(acker.settling(), [AckKind::Nak(None)]);
        let record = backends.store.get(msg.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Queued);
        assert_eq!(
            record.attempt_history[0].error.as_ref().unwrap().code,
            HANDED_BACK
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_first_attempt_is_recorded_once_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let executor = Arc::new(Gate::default());
        let (rt, backends) = runtime_with(dir.path(), executor.clone(), |s| {
            s.worker.record_start_after_ms = 60_000;
        });
        let msg = queued_message(&rt, &backends).await;
        let acker = Arc::new(Recorder::default());

        let mid = process_gated(&rt, &backends, &executor, &msg, acker.clone(), 1).await;

        assert_eq!(mid.state, TaskState::Queued, "no start written yet");
        assert_eq!(mid.attempts, 0);
        assert_eq!(acker.settling(), [AckKind::Ack]);
        let record = backends.store.get(msg.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.result.unwrap().output, "released");
        assert_eq!(record.attempts, 1);
        assert_eq!(record.worker_id.as_deref(), Some("w1"));
        let attempt = &record.attempt_history[0];
        assert_eq!(attempt.outcome, Some(TaskState::Succeeded));
        assert!(attempt.started_at <= attempt.finished_at.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_attempt_that_runs_long_is_recorded_as_running() {
        let dir = tempfile::tempdir().unwrap();
        let executor = Arc::new(Gate::default());
        let (rt, backends) = runtime_with(dir.path(), executor.clone(), |s| {
            s.worker.record_start_after_ms = 30;
        });
        let msg = queued_message(&rt, &backends).await;
        let acker = Arc::new(Recorder::default());

        let run = process(&rt, msg.clone(), Bytes::new(), acker.clone(), 1);
        let look = async {
            executor.started.notified().await;
            let running = eventually("the start is recorded", || async {
                let record = backends.store.get(msg.id).await.unwrap().unwrap();
                (record.state == TaskState::Running).then_some(record)
            })
            .await;
            executor.release.notify_one();
            running
        };
        let ((), running) = tokio::join!(run, look);

        assert_eq!(running.attempts, 1);
        assert_eq!(running.attempt_history[0].finished_at, None);
        assert_eq!(acker.settling(), [AckKind::Ack]);
        let record = backends.store.get(msg.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.attempts, 1, "one attempt, started then ended");
        assert_eq!(record.duplicate_executions, 0);
        assert_eq!(record.attempt_history.len(), 1);
        assert_eq!(
            record.attempt_history[0].outcome,
            Some(TaskState::Succeeded)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivery_records_the_lost_delivery_and_starts_before_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let executor = Arc::new(Gate::default());
        let (rt, backends) = runtime_with(dir.path(), executor.clone(), |s| {
            s.worker.record_start_after_ms = 60_000;
        });
        let msg = queued_message(&rt, &backends).await;
        let acker = Arc::new(Recorder::default());

        // Delivery 2 of a task with no attempt recorded: delivery 1 ran
        // unrecorded and its worker died.
        let mid = process_gated(&rt, &backends, &executor, &msg, acker.clone(), 2).await;

        assert_eq!(mid.state, TaskState::Running, "started before it ran");
        assert_eq!(mid.attempts, 2);
        let lost = &mid.attempt_history[0];
        assert_eq!(lost.error.as_ref().unwrap().code, LOST);
        assert_eq!(lost.outcome, Some(TaskState::Queued));
        assert_eq!(mid.attempt_history[1].finished_at, None);
        let record = backends.store.get(msg.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.attempts, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_delivery_counts_as_a_crash_but_not_as_an_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, backends) = runtime(dir.path(), Arc::new(Gate::default()));
        let mut msg = queued_message(&rt, &backends).await;
        msg.max_attempts = 2;
        let store = &backends.store;
        let failed = |at| AttemptEnd {
            state: TaskState::Queued,
            result: None,
            error: Some(TaskError::new("nonzero_exit", "exit 1")),
            at,
        };
        // Delivery 1 was lost, attempt 2 failed and was retried.
        record_lost_delivery(&rt, &msg).await;
        store.start_attempt(&msg, "w1", Utc::now()).await.unwrap();
        store
            .end_attempt(msg.id, 2, &failed(Utc::now()))
            .await
            .unwrap();
        assert!(
            attempts_left(&rt, &msg, 2).await,
            "one execution so far: one left"
        );
        assert_eq!(
            crashed_attempts(&rt, &msg, 3).await,
            None,
            "one crash of two allowed: attempt 3 runs"
        );

        // Attempt 3 crashed (never ended): two crashes, the limit.
        store.start_attempt(&msg, "w1", Utc::now()).await.unwrap();
        assert_eq!(crashed_attempts(&rt, &msg, 4).await, Some(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_delivery_of_a_cancelled_task_does_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let executor = Arc::new(Gate::default());
        let (rt, backends) = runtime(dir.path(), executor.clone());
        let msg = queued_message(&rt, &backends).await;
        backends.store.cancel(msg.id, Utc::now()).await.unwrap();
        let acker = Arc::new(Recorder::default());

        process(&rt, msg.clone(), Bytes::new(), acker.clone(), 1).await;

        assert_eq!(acker.settling(), [AckKind::Ack]);
        let record = backends.store.get(msg.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Cancelled);
        assert_eq!(record.attempts, 0, "never ran");
    }

    /// Every delivery allocates these futures anew.
    #[tokio::test]
    async fn each_deliverys_futures_fit_the_allocators_thread_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, _backends) = runtime(dir.path(), Arc::new(Gate::default()));
        let msg = message(&rt);
        let payload = Bytes::new();
        let stop = Stop::new(&rt.abort);
        let end = AttemptEnd {
            state: TaskState::Succeeded,
            result: None,
            error: None,
            at: Utc::now(),
        };
        let delivery = Delivery {
            payload: payload.clone(),
            delivery_count: 1,
            band: PriorityBand::Normal,
            acker: Box::new(Recorder::default()),
        };
        let acker: Arc<dyn Acker> = Arc::new(Recorder::default());
        let sizes = [
            (
                "delivery::handle",
                std::mem::size_of_val(&crate::delivery::handle(&rt, delivery)),
            ),
            (
                "process",
                std::mem::size_of_val(&process(&rt, msg.clone(), payload.clone(), acker, 1)),
            ),
            ("begin", std::mem::size_of_val(&begin(&rt, &msg, 1))),
            (
                "run_and_record",
                std::mem::size_of_val(&run_and_record(
                    &rt,
                    &msg,
                    &payload,
                    1,
                    Start::Recorded,
                    &stop,
                )),
            ),
            ("run", std::mem::size_of_val(&run(&rt, &msg, 1, &stop))),
            (
                "record",
                std::mem::size_of_val(&record(
                    &rt,
                    &msg,
                    &payload,
                    1,
                    Start::Recorded,
                    Decision::Cancelled,
                    Duration::ZERO,
                )),
            ),
            (
                "write_end",
                std::mem::size_of_val(&write_end(&rt, &msg, 1, Start::Recorded, &end)),
            ),
        ];
        let too_large: Vec<_> = sizes
            .iter()
            .filter(|(_, size)| *size > ALLOCATOR_THREAD_CACHE_MAX)
            .collect();
        assert!(
            too_large.is_empty(),
            "futures over {ALLOCATOR_THREAD_CACHE_MAX} bytes (box what they hold inline): {too_large:?}"
        );
    }
}
