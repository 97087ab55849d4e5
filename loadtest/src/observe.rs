//! Watching tasks finish: the [`Tracker`] that turns "sent at" and "seen
//! running / finished at" into queue-wait and end-to-end latencies, and the
//! two ways of feeding it.
//!
//! - [`ObserveMode::Redis`] (the default, and what the benchmark uses):
//!   `PSUBSCRIBE <key_prefix>events:*`, the channel on which the Redis
//!   result store announces every state change of a task as
//!   `{"id","state"}`. One subscription costs the intake nothing, so the
//!   throughput measured is the intake's.
//! - [`ObserveMode::Http`]: poll `GET /tasks/{id}` for each task with
//!   exponential backoff. It works against any deployment, but the polls
//!   compete with the submits for the intake's capacity, so throughput comes
//!   out lower than it is.
//!
//! An event may arrive before the submit's answer does (a fast worker
//! finishes a task while the `202` is still in flight); such events are kept
//! aside until the id is registered.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use claudecluster_engine::{TaskId, TaskState};
use futures::StreamExt;
use http::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::api::RecordView;
use crate::http::ConnectionPool;
use crate::stats::LatencyHistogram;

/// How task completion is observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObserveMode {
    /// Only submits are measured.
    None,
    /// Subscribe to the result store's events in Redis.
    Redis {
        /// The Redis the result store uses.
        url: String,
        /// The store's key prefix (`REDIS_KEY_PREFIX`).
        key_prefix: String,
    },
    /// Poll `GET /tasks/{id}`.
    Http,
}

impl ObserveMode {
    /// `none`, `redis` or `http`, for reports.
    pub fn label(&self) -> &'static str {
        match self {
            ObserveMode::None => "none",
            ObserveMode::Redis { .. } => "redis",
            ObserveMode::Http => "http",
        }
    }
}

/// Errors setting up an observer.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// Redis could not be reached or refused the subscription.
    #[error("cannot subscribe to task events in Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Maps the store's wall-clock timestamps onto the generator's monotonic
/// clock, so a `started_at` read from a record can be compared with the
/// instant a request was sent. Exact on one machine; across machines it is
/// off by the clocks' difference.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    instant: Instant,
    wall: DateTime<Utc>,
}

impl Clock {
    /// Pins the two clocks together now.
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            wall: Utc::now(),
        }
    }

    /// The monotonic instant of a wall-clock time.
    pub fn to_instant(&self, wall: DateTime<Utc>) -> Instant {
        match (wall - self.wall).to_std() {
            Ok(after) => self.instant + after,
            Err(_) => {
                let before = (self.wall - wall).to_std().unwrap_or_default();
                self.instant.checked_sub(before).unwrap_or(self.instant)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    sent: Instant,
    started: Option<Instant>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Early {
    started: Option<Instant>,
    finished: Option<(Instant, TaskState)>,
}

#[derive(Debug, Default)]
struct Inner {
    pending: HashMap<TaskId, Pending>,
    early: HashMap<TaskId, Early>,
    queue_wait: LatencyHistogram,
    end_to_end: LatencyHistogram,
    states: BTreeMap<String, u64>,
    registered: u64,
    finished: u64,
    last_finish: Option<Instant>,
    submissions_done: bool,
}

impl Inner {
    fn finish(&mut self, sent: Instant, started: Option<Instant>, at: Instant, state: TaskState) {
        if let Some(started) = started {
            self.queue_wait
                .record(started.saturating_duration_since(sent));
        }
        self.end_to_end.record(at.saturating_duration_since(sent));
        *self.states.entry(state.as_str().to_owned()).or_default() += 1;
        self.finished += 1;
        self.last_finish = Some(self.last_finish.map_or(at, |t| t.max(at)));
    }

    fn all_done(&self) -> bool {
        self.submissions_done && self.pending.is_empty()
    }
}

/// What the [`Tracker`] measured.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    /// Send → first seen running.
    pub queue_wait: LatencyHistogram,
    /// Send → seen in a final state.
    pub end_to_end: LatencyHistogram,
    /// Final states seen, by wire name.
    pub states: BTreeMap<String, u64>,
    /// Tasks registered.
    pub registered: u64,
    /// Tasks seen in a final state.
    pub finished: u64,
    /// When the last task was seen finishing.
    pub last_finish: Option<Instant>,
}

/// Follows every accepted task from its send to its final state.
#[derive(Debug, Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
    all_done: Notify,
    finished_one: Notify,
}

impl Tracker {
    /// A tracker with nothing registered.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under this lock can panic halfway through an update except
        // an allocation failure; the maps stay usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers tasks the intake accepted from a request sent at `sent`.
    pub fn register(&self, ids: &[TaskId], sent: Instant) {
        let mut inner = self.lock();
        inner.registered += ids.len() as u64;
        for id in ids {
            match inner.early.remove(id) {
                Some(Early {
                    started,
                    finished: Some((at, state)),
                }) => inner.finish(sent, started, at, state),
                Some(Early { started, .. }) => {
                    inner.pending.insert(*id, Pending { sent, started });
                }
                None => {
                    inner.pending.insert(
                        *id,
                        Pending {
                            sent,
                            started: None,
                        },
                    );
                }
            }
        }
    }

    /// A task was seen in `state` at `at`.
    pub fn observe(&self, id: TaskId, state: TaskState, at: Instant) {
        let mut inner = self.lock();
        if state.is_final() {
            if let Some(p) = inner.pending.remove(&id) {
                inner.finish(p.sent, p.started, at, state);
                if inner.all_done() {
                    self.all_done.notify_waiters();
                }
                self.finished_one.notify_waiters();
            } else {
                let early = inner.early.entry(id).or_default();
                early.finished.get_or_insert((at, state));
            }
        } else if state == TaskState::Running {
            if let Some(p) = inner.pending.get_mut(&id) {
                p.started.get_or_insert(at);
            } else {
                inner.early.entry(id).or_default().started.get_or_insert(at);
            }
        }
    }

    /// Records when a task started, from its record, if nothing earlier was
    /// seen.
    pub fn observe_started(&self, id: TaskId, at: Instant) {
        if let Some(p) = self.lock().pending.get_mut(&id) {
            p.started.get_or_insert(at);
        }
    }

    /// No more tasks will be registered.
    pub fn finish_submissions(&self) {
        let mut inner = self.lock();
        inner.submissions_done = true;
        if inner.all_done() {
            self.all_done.notify_waiters();
        }
    }

    /// Tasks registered and tasks finished so far.
    pub fn progress(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.registered, inner.finished)
    }

    /// Waits until every registered task has finished (after
    /// [`Self::finish_submissions`]) or `deadline` passes; true when all
    /// finished.
    pub async fn wait_all(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.all_done.notified();
            tokio::pin!(notified);
            // Registering interest before checking means a notification sent
            // between the check and the await is not lost.
            notified.as_mut().enable();
            if self.lock().all_done() {
                return true;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline.into()) => return self.lock().all_done(),
            }
        }
    }

    /// Waits until fewer than `limit` registered tasks are unfinished, so a
    /// closed loop that submits faster than the system finishes does not
    /// pile up a backlog that outlives the run.
    pub async fn wait_backlog_below(&self, limit: u64) {
        loop {
            let notified = self.finished_one.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if (self.lock().pending.len() as u64) < limit {
                return;
            }
            notified.await;
        }
    }

    /// The measurements so far.
    pub fn completion(&self) -> Completion {
        let inner = self.lock();
        Completion {
            queue_wait: inner.queue_wait.clone(),
            end_to_end: inner.end_to_end.clone(),
            states: inner.states.clone(),
            registered: inner.registered,
            finished: inner.finished,
            last_finish: inner.last_finish,
        }
    }
}

/// The payload the result store publishes on `<prefix>events:<id>`.
#[derive(Debug, Deserialize)]
struct StoreEvent {
    id: TaskId,
    state: TaskState,
}

/// A running observer; stops when dropped.
#[derive(Debug)]
pub enum Observer {
    /// Nothing is observed.
    None,
    /// Task events arrive from Redis.
    Redis(JoinHandle<()>),
    /// Each task is polled over HTTP.
    Http(HttpPoller),
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Observer::Redis(handle) = self {
            handle.abort();
        }
    }
}

impl Observer {
    /// Starts observing as `mode` says. For Redis this returns once the
    /// subscription is confirmed, so no event of the run can be missed.
    ///
    /// # Errors
    /// [`ObserveError::Redis`] when the subscription fails.
    pub async fn start(
        mode: &ObserveMode,
        tracker: Arc<Tracker>,
        pool: &ConnectionPool,
        clock: Clock,
    ) -> Result<Self, ObserveError> {
        match mode {
            ObserveMode::None => Ok(Observer::None),
            ObserveMode::Http => Ok(Observer::Http(HttpPoller::new(
                pool.clone(),
                tracker,
                clock,
            ))),
            ObserveMode::Redis { url, key_prefix } => {
                let client = redis::Client::open(url.as_str())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.psubscribe(format!("{key_prefix}events:*")).await?;
                let mut messages = pubsub.into_on_message();
                let handle = tokio::spawn(async move {
                    while let Some(msg) = messages.next().await {
                        let at = Instant::now();
                        if let Ok(event) =
                            serde_json::from_slice::<StoreEvent>(msg.get_payload_bytes())
                        {
                            tracker.observe(event.id, event.state, at);
                        }
                    }
                });
                Ok(Observer::Redis(handle))
            }
        }
    }

    /// Starts following newly accepted tasks (only the HTTP poller needs to
    /// be told).
    pub fn watch(&self, ids: &[TaskId]) {
        if let Observer::Http(poller) = self {
            for id in ids {
                poller.spawn(*id);
            }
        }
    }
}

/// Polls each task's record until it is final.
#[derive(Debug, Clone)]
pub struct HttpPoller {
    pool: ConnectionPool,
    tracker: Arc<Tracker>,
    clock: Clock,
    /// Polls in flight at once, so thousands of waiting tasks do not open
    /// thousands of connections.
    in_flight: Arc<Semaphore>,
}

/// First delay between polls of one task; doubles up to [`MAX_POLL_DELAY`].
const FIRST_POLL_DELAY: Duration = Duration::from_millis(1);
/// Longest delay between polls of one task.
const MAX_POLL_DELAY: Duration = Duration::from_millis(100);
/// Concurrent poll requests.
const MAX_POLLS_IN_FLIGHT: usize = 32;

impl HttpPoller {
    fn new(pool: ConnectionPool, tracker: Arc<Tracker>, clock: Clock) -> Self {
        Self {
            pool,
            tracker,
            clock,
            in_flight: Arc::new(Semaphore::new(MAX_POLLS_IN_FLIGHT)),
        }
    }

    fn spawn(&self, id: TaskId) {
        let poller = self.clone();
        tokio::spawn(async move { poller.follow(id).await });
    }

    async fn follow(self, id: TaskId) {
        let path = self.pool.endpoint().path(&format!("/tasks/{id}"));
        let mut delay = FIRST_POLL_DELAY;
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_POLL_DELAY);
            let Some(record) = self.poll(&path).await else {
                continue;
            };
            let Some(state) = TaskState::parse(&record.state) else {
                continue;
            };
            let at = Instant::now();
            if let Some(started) = record.started_at {
                self.tracker
                    .observe_started(id, self.clock.to_instant(started));
            }
            self.tracker.observe(id, state, at);
            if state.is_final() {
                return;
            }
        }
    }

    async fn poll(&self, path: &str) -> Option<RecordView> {
        // The semaphore is never closed, so acquiring only fails if it were.
        let _permit = self.in_flight.acquire().await.ok()?;
        let mut conn = self.pool.take().await.ok()?;
        let (status, body) = conn.send(Method::GET, path, None).await.ok()?;
        self.pool.give_back(conn);
        if status != StatusCode::OK {
            return None;
        }
        serde_json::from_slice(&body).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> TaskId {
        uuid::Uuid::now_v7()
    }

    #[test]
    fn latencies_run_from_send_to_events() {
        let tracker = Tracker::new();
        let t0 = Instant::now();
        let a = id();
        tracker.register(&[a], t0);
        tracker.observe(a, TaskState::Running, t0 + Duration::from_millis(2));
        tracker.observe(a, TaskState::Succeeded, t0 + Duration::from_millis(5));
        let c = tracker.completion();
        assert_eq!(c.finished, 1);
        assert_eq!(c.states["succeeded"], 1);
        assert!((c.queue_wait.summary().p50_ms - 2.0).abs() < 0.01);
        assert!((c.end_to_end.summary().p50_ms - 5.0).abs() < 0.01);
    }

    #[test]
    fn events_before_registration_are_kept() {
        let tracker = Tracker::new();
        let t0 = Instant::now();
        let a = id();
        tracker.observe(a, TaskState::Running, t0 + Duration::from_millis(1));
        tracker.observe(a, TaskState::Failed, t0 + Duration::from_millis(3));
        assert_eq!(tracker.progress(), (0, 0));
        tracker.register(&[a], t0);
        let c = tracker.completion();
        assert_eq!((c.registered, c.finished), (1, 1));
        assert_eq!(c.states["failed"], 1);
        assert_eq!(c.queue_wait.len(), 1);
    }

    #[test]
    fn only_the_first_final_state_counts() {
        let tracker = Tracker::new();
        let t0 = Instant::now();
        let a = id();
        tracker.register(&[a], t0);
        tracker.observe(a, TaskState::Queued, t0);
        tracker.observe(a, TaskState::Succeeded, t0 + Duration::from_millis(1));
        tracker.observe(a, TaskState::Succeeded, t0 + Duration::from_millis(9));
        let c = tracker.completion();
        assert_eq!(c.finished, 1);
        assert!(c.queue_wait.is_empty());
    }

    #[tokio::test]
    async fn wait_all_returns_when_the_last_task_finishes() {
        let tracker = Arc::new(Tracker::new());
        let a = id();
        tracker.register(&[a], Instant::now());
        tracker.finish_submissions();
        let waiter = {
            let tracker = tracker.clone();
            tokio::spawn(async move {
                tracker
                    .wait_all(Instant::now() + Duration::from_secs(60))
                    .await
            })
        };
        tracker.observe(a, TaskState::Succeeded, Instant::now());
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn backlog_waits_for_a_task_to_finish() {
        let tracker = Arc::new(Tracker::new());
        let (a, b) = (id(), id());
        tracker.register(&[a, b], Instant::now());
        tracker.wait_backlog_below(3).await;
        let waiter = {
            let tracker = tracker.clone();
            tokio::spawn(async move { tracker.wait_backlog_below(2).await })
        };
        tracker.observe(a, TaskState::Succeeded, Instant::now());
        waiter.await.unwrap();
        assert_eq!(tracker.progress(), (2, 1));
    }

    #[tokio::test]
    async fn wait_all_gives_up_at_the_deadline() {
        let tracker = Tracker::new();
        tracker.register(&[id()], Instant::now());
        tracker.finish_submissions();
        assert!(!tracker.wait_all(Instant::now()).await);
    }

    #[test]
    fn wall_times_map_onto_instants() {
        let clock = Clock::now();
        let later = clock.wall + chrono::Duration::milliseconds(5);
        assert_eq!(
            clock.to_instant(later).duration_since(clock.instant),
            Duration::from_millis(5)
        );
        let earlier = clock.wall - chrono::Duration::milliseconds(5);
        assert!(clock.to_instant(earlier) <= clock.instant);
    }
}
