//! The worker pool: pulls deliveries under a concurrency limit, runs each in
//! its own task, announces itself with heartbeats, and shuts down without
//! losing work.
//!
//! A permit of the concurrency semaphore is taken before pulling, and the
//! pool asks the broker for exactly as many messages as it holds permits, so
//! a busy worker holds no messages it cannot start. Each spawned task owns
//! its permit.
//!
//! Shutdown: the pool stops pulling at once, gives running tasks
//! `worker.shutdown_grace_ms` to finish, then cancels the rest, which kill
//! their processes and hand their messages back for another worker.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use claudecluster_engine::backend::Backends;
use claudecluster_engine::broker::{AckKind, Delivery, TaskConsumer};
use claudecluster_engine::config::Settings;
use claudecluster_engine::results::{ResultStore, WorkerInfo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery;
use crate::executor::Executor;
use crate::metric::Meters;
use crate::retry::Backoff;
use crate::workdir;

/// How long cancelled tasks get to kill their processes and hand their
/// messages back once the grace period is over.
const ABORT_WAIT: Duration = Duration::from_secs(15);

/// What every task of the pool shares.
pub(crate) struct Runtime {
    pub(crate) settings: Arc<Settings>,
    pub(crate) consumer: Arc<dyn TaskConsumer>,
    pub(crate) store: Arc<dyn ResultStore>,
    pub(crate) executor: Arc<dyn Executor>,
    pub(crate) worker_id: String,
    pub(crate) work_root: PathBuf,
    /// Cancelled when the grace period is over: running tasks stop.
    pub(crate) abort: CancellationToken,
    pub(crate) meters: Meters,
}

impl Runtime {
    /// How long a message handed back because the store or broker failed
    /// waits before it comes again.
    pub(crate) fn service_retry_delay(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// A live view of a pool, for health endpoints and tests; cheap to clone.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    in_flight: Arc<AtomicUsize>,
    worker_id: Arc<str>,
    started_at: DateTime<Utc>,
}

impl PoolStatus {
    /// Tasks running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The pool's worker id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// When the pool was created.
    pub fn started_at(&self) -> DateTime<Utc> {
        self.started_at
    }
}

/// A pool of task runners sharing one broker consumer and result store.
pub struct WorkerPool {
    rt: Arc<Runtime>,
    status: PoolStatus,
    semaphore: Arc<Semaphore>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("worker_id", &self.rt.worker_id)
            .field("executor", &self.rt.executor.name())
            .field("in_flight", &self.status.in_flight())
            .finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// A pool running tasks from `backends` with `executor`, at most
    /// `settings.worker.concurrency` at once.
    pub fn new(settings: Arc<Settings>, backends: Backends, executor: Arc<dyn Executor>) -> Self {
        // The recorder must exist before the handles below are registered.
        claudecluster_engine::telemetry::prometheus();
        let worker_id = settings.worker.resolved_id();
        let work_root = workdir::worker_root(settings.worker.work_dir.as_deref(), &worker_id);
        let concurrency = settings.worker.concurrency.max(1);
        let rt = Runtime {
            meters: Meters::new(&worker_id),
            consumer: backends.consumer,
            store: backends.store,
            executor,
            work_root,
            abort: CancellationToken::new(),
            worker_id: worker_id.clone(),
            settings,
        };
        Self {
            rt: Arc::new(rt),
            status: PoolStatus {
                in_flight: Arc::new(AtomicUsize::new(0)),
                worker_id: worker_id.into(),
                started_at: Utc::now(),
            },
            semaphore: Arc::new(Semaphore::new(concurrency)),
        }
    }

    /// Tasks running now.
    pub fn in_flight(&self) -> usize {
        self.status.in_flight()
    }

    /// A handle that keeps reporting after [`Self::run`] takes the pool.
    pub fn status(&self) -> PoolStatus {
        self.status.clone()
    }

    /// The worker id the pool runs as.
    pub fn worker_id(&self) -> &str {
        &self.rt.worker_id
    }

    /// Pulls and runs tasks until `shutdown` is cancelled, then shuts down
    /// gracefully (see the module documentation) and returns.
    ///
    /// # Errors
    /// None at present: broker and store failures are retried, never fatal;
    /// the `Result` leaves room for failures that must stop the worker.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let heartbeat_stop = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat_loop(
            self.rt.clone(),
            self.status.clone(),
            heartbeat_stop.clone(),
        ));
        tracing::info!(
            worker_id = %self.rt.worker_id,
            executor = self.rt.executor.name(),
            concurrency = self.semaphore.available_permits(),
            "worker pool started"
        );

        let tracker = TaskTracker::new();
        self.pull_loop(&tracker, &shutdown).await;

        tracker.close();
        let grace = Duration::from_millis(self.rt.settings.worker.shutdown_grace_ms);
        tracing::info!(
            in_flight = self.in_flight(),
            ?grace,
            "stopping: no new tasks"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                in_flight = self.in_flight(),
                "grace period over; handing unfinished tasks back"
            );
            self.rt.abort.cancel();
            if tokio::time::timeout(ABORT_WAIT, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    in_flight = self.in_flight(),
                    "tasks did not stop; their messages come back after the ack wait"
                );
            }
        }

        heartbeat_stop.cancel();
        let _ = heartbeats.await;
        if let Err(e) = self.rt.store.remove_worker(&self.rt.worker_id).await {
            tracing::warn!(error = %e, "could not remove the worker's heartbeat");
        }
        tracing::info!("worker pool stopped");
        Ok(())
    }

    async fn pull_loop(&self, tracker: &TaskTracker, shutdown: &CancellationToken) {
        let mut backoff = Backoff::service();
        loop {
            let Some(mut permits) = self.acquire(shutdown).await else {
                return;
            };
            // Take every other free permit too: one pull for all the room
            // there is.
            let free = self.semaphore.available_permits();
            if free > 0
                && let Ok(more) = self.semaphore.clone().try_acquire_many_owned(free as u32)
            {
                permits.merge(more);
            }
            let want = permits.num_permits();
            let batch = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                batch = self.rt.consumer.next_batch(want) => batch,
            };
            match batch {
                Ok(deliveries) => {
                    backoff.reset();
                    for d in deliveries {
                        let permit = match permits.split(1) {
                            Some(p) => p,
                            // A broker that sent more than asked: wait for
                            // room rather than run over the limit.
                            None => match self.acquire(shutdown).await {
                                Some(p) => p,
                                None => {
                                    // Shutting down: give it to another worker.
                                    tracker.spawn(async move {
                                        delivery::ack(d.acker.as_ref(), AckKind::Nak(None)).await;
                                    });
                                    continue;
                                }
                            },
                        };
                        self.spawn(tracker, d, permit);
                    }
                }
                Err(e) => {
                    drop(permits);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "pulling tasks failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn acquire(&self, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => None,
            // The semaphore is never closed, so acquiring cannot fail.
            permit = self.semaphore.clone().acquire_owned() => permit.ok(),
        }
    }

    /// Runs one delivery in its own task, which owns `permit`.
    fn spawn(&self, tracker: &TaskTracker, d: Delivery, permit: OwnedSemaphorePermit) {
        let rt = self.rt.clone();
        let in_flight = self.status.in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        rt.meters.in_flight(1.0);
        tracker.spawn(async move {
            delivery::handle(&rt, d).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            rt.meters.in_flight(-1.0);
            drop(permit);
        });
    }
}

/// Announces the worker every `heartbeat_interval_ms` (the first at once)
/// until `stop`.
async fn heartbeat_loop(rt: Arc<Runtime>, status: PoolStatus, stop: CancellationToken) {
    let every = Duration::from_millis(rt.settings.worker.heartbeat_interval_ms.max(1));
    let ttl = every * 3;
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let info = WorkerInfo {
            id: rt.worker_id.clone(),
            host: host.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            concurrency: rt.settings.worker.concurrency,
            in_flight: status.in_flight(),
            executor: rt.executor.name().into(),
            started_at: status.started_at,
            last_seen: Utc::now(),
        };
        if let Err(e) = rt.store.heartbeat(&info, ttl).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}
