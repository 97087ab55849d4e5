//! One attempt at a valid task: start it in the store, run it while keeping
//! the broker lease and watching for a cancel ([`crate::lease`]), decide what
//! its outcome means (done, retry, dead letter, cancelled, hand back), write
//! that to the store, and only then acknowledge.
//!
//! The order matters for "nothing lost": a record is written before the
//! message is acknowledged, and a dead letter before the record says
//! `dead_lettered`. When a write fails after retries the delivery is handed
//! back (`Nak`) and the next delivery picks up from the store's state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use claudecluster_engine::broker::{AckKind, Acker};
use claudecluster_engine::results::{AttemptEnd, EndOutcome, StartOutcome};
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

/// Runs a decoded, valid task message through one attempt.
pub(crate) async fn process(rt: &Runtime, msg: TaskMessage, payload: Bytes, acker: Arc<dyn Acker>) {
    let started = retry("starting the attempt", || {
        rt.store.start_attempt(&msg, &rt.worker_id, Utc::now())
    })
    .await;
    let attempt = match started {
        Ok(StartOutcome::Started { attempt }) => attempt,
        Ok(StartOutcome::AlreadyFinal(state)) => {
            tracing::debug!(%state, "task already final; acknowledging the redelivery");
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
        Box::pin(run_and_record(rt, &msg, &payload, attempt, &stop)),
        acker.as_ref(),
        lease_every,
        watch,
    )
    .await;
    ack(acker.as_ref(), kind).await;
}

/// Runs the attempt (or quarantines it), records the outcome and returns
/// the acknowledgement to send.
async fn run_and_record(
    rt: &Runtime,
    msg: &TaskMessage,
    payload: &Bytes,
    attempt: u32,
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
        let outcome = run(rt, msg, attempt, stop).await;
        decide(rt, msg, attempt, outcome, stop).await
    };
    record(rt, msg, payload, attempt, decision, began.elapsed()).await
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
async fn record(
    rt: &Runtime,
    msg: &TaskMessage,
    payload: &Bytes,
    attempt: u32,
    decision: Decision,
    took: Duration,
) -> AckKind {
    let (end, status, kind) = match decision {
        Decision::Final {
            state,
            result,
            error,
            dead_letter,
        } => {
            if let Some((code, reason)) = dead_letter {
                let written = retry("writing a dead letter", || {
                    rt.consumer.dead_letter(Some(msg.id), payload, &reason)
                })
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
            (end, Status::Final(state), kind)
        }
        Decision::Retry { error, delay } => {
            tracing::info!(code = %error.code, ?delay, "attempt failed; retrying");
            let end = AttemptEnd {
                state: TaskState::Queued,
                result: None,
                error: Some(error),
                at: Utc::now(),
            };
            (end, Status::Retried, AckKind::Nak(Some(delay)))
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
            // The record said `cancelled` before the processes were stopped,
            // so the store answers "already final" and closes the attempt
            // without counting a duplicate execution. Either answer means
            // the message is done with.
            return match write_end(rt, msg, attempt, &end).await {
                Some(_) => {
                    tracing::info!("attempt stopped by a cancel");
                    rt.meters.outcome(Status::Final(TaskState::Cancelled), took);
                    AckKind::Ack
                }
                None => AckKind::Nak(Some(rt.service_retry_delay())),
            };
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
            // Not an outcome of the task: no tasks_total count.
            return match write_end(rt, msg, attempt, &end).await {
                Some(EndOutcome::Written) => AckKind::Nak(None),
                // Cancelled meanwhile: nothing left to hand back.
                Some(EndOutcome::AlreadyFinal(_)) => AckKind::Ack,
                None => AckKind::Nak(Some(rt.service_retry_delay())),
            };
        }
    };
    match write_end(rt, msg, attempt, &end).await {
        Some(EndOutcome::Written) => {
            tracing::info!(state = %end.state, "attempt recorded");
            rt.meters.outcome(status, took);
            kind
        }
        Some(EndOutcome::AlreadyFinal(state)) => {
            // Cancelled meanwhile, or another worker finished a redelivery
            // first: the first final write stands.
            tracing::info!(%state, "task was already final; result not written");
            AckKind::Ack
        }
        None => AckKind::Nak(Some(rt.service_retry_delay())),
    }
}

async fn write_end(
    rt: &Runtime,
    msg: &TaskMessage,
    attempt: u32,
    end: &AttemptEnd,
) -> Option<EndOutcome> {
    match retry("recording the attempt", || {
        rt.store.end_attempt(msg.id, attempt, end)
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
/// handed back at a worker's shutdown do not count; finding them needs the
/// record, read only when the count alone says no.
async fn attempts_left(rt: &Runtime, msg: &TaskMessage, attempt: u32) -> bool {
    if attempt < msg.max_attempts {
        return true;
    }
    let handed_back = match rt.store.get(msg.id).await {
        Ok(Some(record)) => record
            .attempt_history
            .iter()
            .filter(|a| a.number < attempt && is_handed_back(a))
            .count(),
        _ => 0,
    };
    (attempt as usize) < msg.max_attempts as usize + handed_back
}

/// For an attempt number beyond `max_attempts`: how many earlier attempts
/// crashed (started, never ended), when the ones that count exceed the
/// limit; `None` when hand-backs explain the excess and the task may run.
async fn crashed_attempts(rt: &Runtime, msg: &TaskMessage, attempt: u32) -> Option<u32> {
    let record = match rt.store.get(msg.id).await {
        Ok(Some(record)) => record,
        // Without the history, trust the count.
        _ => return Some(attempt - 1),
    };
    let earlier = || record.attempt_history.iter().filter(|a| a.number < attempt);
    let handed_back = earlier().filter(|a| is_handed_back(a)).count();
    let counted = attempt as usize - handed_back;
    if counted <= msg.max_attempts as usize {
        return None;
    }
    let crashed = earlier().filter(|a| a.outcome.is_none()).count();
    Some(u32::try_from(crashed).unwrap_or(u32::MAX))
}

fn is_handed_back(a: &claudecluster_engine::task::Attempt) -> bool {
    a.error.as_ref().is_some_and(|e| e.code == HANDED_BACK)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use claudecluster_engine::backend::Backends;
    use claudecluster_engine::broker::BrokerError;
    use claudecluster_engine::config::Settings;
    use claudecluster_engine::task::NewTask;
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

    /// A runtime on the embedded backends in `dir`.
    fn runtime(dir: &std::path::Path, executor: Arc<UntilStopped>) -> (Runtime, Backends) {
        let mut settings = Settings::default();
        settings.embedded.data_dir = Some(dir.to_path_buf());
        settings.worker.cancel_check_ms = 20;
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

        let run = process(&rt, msg.clone(), Bytes::new(), acker.clone());
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

        let run = process(&rt, msg.clone(), Bytes::new(), acker.clone());
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
}
