//! What runs alongside an attempt: the broker lease is extended while the
//! task works, and the task's record is watched for a client's cancel.
//!
//! Cancellation is noticed by reading the task's state from the result
//! store every `worker.cancel_check_ms` (500 ms by default) while the
//! attempt runs. Polling the store rather than listening for a push works
//! the same on every backend and with any number of workers, needs no
//! connection of its own, and cannot miss a cancel that happened while the
//! store or the worker was reconnecting: the next read sees it. The cost is
//! one small read (a Redis `HGET`) per running task per period, and none
//! for a task that finishes within the first period.
//!
//! A cancel by a client and the pool's shutdown both stop the attempt's
//! processes, through the same [`ExecContext::cancel`] token; [`Stop`]
//! remembers which one it was, because the outcomes differ: a cancelled task
//! is final, a task interrupted by a shutdown goes back to the queue.
//!
//! [`ExecContext::cancel`]: crate::executor::ExecContext::cancel

use std::time::Duration;

use claudecluster_engine::broker::{AckKind, Acker, BrokerError};
use claudecluster_engine::results::StoreError;
use claudecluster_engine::task::TaskState;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// Why an attempt is being stopped, and the token that stops it.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    /// Handed to the executor: cancelled by a client's cancel or the pool's
    /// abort at the end of the shutdown grace period.
    exec: CancellationToken,
    /// Cancelled only by a client's cancel.
    by_client: CancellationToken,
}

impl Stop {
    /// A stop for one attempt of a pool whose abort token is `abort`.
    pub(crate) fn new(abort: &CancellationToken) -> Self {
        Self {
            exec: abort.child_token(),
            by_client: CancellationToken::new(),
        }
    }

    /// The token the executor watches.
    pub(crate) fn exec_token(&self) -> CancellationToken {
        self.exec.clone()
    }

    /// The task was cancelled by a client: stop it.
    pub(crate) fn cancel_by_client(&self) {
        self.by_client.cancel();
        self.exec.cancel();
    }

    /// Whether a client cancelled the task (as opposed to the pool shutting
    /// down).
    pub(crate) fn by_client(&self) -> bool {
        self.by_client.is_cancelled()
    }
}

/// How the attempt's task record is watched for a cancel.
pub(crate) struct CancelWatch<R> {
    /// Reads the task's state.
    pub(crate) read: R,
    /// How often.
    pub(crate) every: Duration,
    /// Stopped when the read says `cancelled`.
    pub(crate) stop: Stop,
}

/// Runs `fut`, telling the broker every `lease_every` that the message is
/// still being worked on (so a long task is not redelivered), and reading
/// the task's state every `watch.every` to stop it when a client cancels
/// it. Neither the progress acknowledgement nor the read ever blocks the
/// work: each runs alongside it, one at a time.
pub(crate) async fn keep<F, R, RF>(
    fut: F,
    acker: &dyn Acker,
    lease_every: Duration,
    mut watch: CancelWatch<R>,
) -> F::Output
where
    F: Future,
    R: FnMut() -> RF,
    RF: Future<Output = Result<Option<TaskState>, StoreError>>,
{
    let mut fut = std::pin::pin!(fut);
    let start = tokio::time::Instant::now();
    let mut lease = tokio::time::interval_at(start + lease_every, lease_every);
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval_at(start + watch.every, watch.every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress: Option<BoxFuture<'_, Result<(), BrokerError>>> = None;
    let mut read: Option<std::pin::Pin<Box<RF>>> = None;
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            res = async {
                match progress.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if progress.is_some() => {
                progress = None;
                if let Err(e) = res {
                    tracing::warn!(error = %e, "could not extend the lease");
                }
            }
            res = async {
                match read.as_mut() {
                    Some(r) => r.await,
                    None => std::future::pending().await,
                }
            }, if read.is_some() => {
                read = None;
                match res {
                    Ok(Some(TaskState::Cancelled)) => {
                        tracing::info!("the task was cancelled; stopping it");
                        watching = false;
                        watch.stop.cancel_by_client();
                    }
                    Ok(_) => {}
                    // A store hiccup: the next period reads again.
                    Err(e) => tracing::debug!(error = %e, "could not read the task's state"),
                }
            }
            _ = lease.tick(), if progress.is_none() => {
                progress = Some(acker.ack(AckKind::Progress));
            }
            _ = check.tick(), if watching && read.is_none() => {
                read = Some(Box::pin((watch.read)()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(tokio::time::Instant, AckKind)>>);

    #[async_trait]
    impl Acker for Recorder {
        async fn ack(&self, kind: AckKind) -> Result<(), BrokerError> {
            self.0
                .lock()
                .unwrap()
                .push((tokio::time::Instant::now(), kind));
            Ok(())
        }
    }

    type Read = BoxFuture<'static, Result<Option<TaskState>, StoreError>>;

    /// A watch whose reads say `running` until `cancel_on_read`, then
    /// `cancelled`, counting the reads.
    fn watch(
        cancel_on_read: u32,
        reads: &AtomicU32,
    ) -> (CancelWatch<impl FnMut() -> Read + '_>, Stop) {
        let stop = Stop::new(&CancellationToken::new());
        let read = move || -> Read {
            let n = reads.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                Ok(Some(if n >= cancel_on_read {
                    TaskState::Cancelled
                } else {
                    TaskState::Running
                }))
            })
        };
        (
            CancelWatch {
                read,
                every: Duration::from_millis(500),
                stop: stop.clone(),
            },
            stop,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn lease_is_extended_every_third_of_ack_wait() {
        let acker = Recorder::default();
        let reads = AtomicU32::new(0);
        let (w, stop) = watch(u32::MAX, &reads);
        let start = tokio::time::Instant::now();
        let out = keep(
            async {
                tokio::time::sleep(Duration::from_millis(3500)).await;
                7
            },
            &acker,
            Duration::from_secs(1),
            w,
        )
        .await;
        assert_eq!(out, 7);
        let acks = acker.0.lock().unwrap();
        let at: Vec<u64> = acks
            .iter()
            .map(|(t, k)| {
                assert_eq!(*k, AckKind::Progress);
                (*t - start).as_millis() as u64
            })
            .collect();
        assert_eq!(at, [1000, 2000, 3000]);
        // 500 ms to 3000 ms; at 3500 ms the task has finished, which wins.
        assert_eq!(reads.load(Ordering::SeqCst), 6, "one read per 500 ms");
        assert!(!stop.by_client() && !stop.exec_token().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_task_sends_no_progress_and_reads_nothing() {
        let acker = Recorder::default();
        let reads = AtomicU32::new(0);
        let (w, _) = watch(1, &reads);
        keep(async {}, &acker, Duration::from_secs(1), w).await;
        assert!(acker.0.lock().unwrap().is_empty());
        assert_eq!(reads.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_stops_the_attempt_and_says_it_was_the_client() {
        let acker = Recorder::default();
        let reads = AtomicU32::new(0);
        let (w, stop) = watch(3, &reads);
        let token = stop.exec_token();
        let start = tokio::time::Instant::now();
        let stopped_at = keep(
            async {
                token.cancelled().await;
                tokio::time::Instant::now()
            },
            &acker,
            Duration::from_secs(10),
            w,
        )
        .await;
        assert_eq!((stopped_at - start).as_millis(), 1500, "the third read");
        assert!(stop.by_client());
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_is_not_a_client_cancel() {
        let abort = CancellationToken::new();
        let stop = Stop::new(&abort);
        abort.cancel();
        assert!(stop.exec_token().is_cancelled());
        assert!(!stop.by_client());
    }

    #[tokio::test(start_paused = true)]
    async fn store_errors_do_not_stop_the_task_and_reads_go_on() {
        let acker = Recorder::default();
        let reads = AtomicU32::new(0);
        let stop = Stop::new(&CancellationToken::new());
        let w = CancelWatch {
            read: || {
                let n = reads.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if n < 4 {
                        Err(StoreError::Unavailable("down".into()))
                    } else {
                        Ok(Some(TaskState::Cancelled))
                    }
                }
            },
            every: Duration::from_millis(500),
            stop: stop.clone(),
        };
        let token = stop.exec_token();
        keep(token.cancelled(), &acker, Duration::from_secs(10), w).await;
        assert!(stop.by_client());
        assert_eq!(reads.load(Ordering::SeqCst), 4);
    }
}
