//! The two load shapes and the run around them.
//!
//! - Closed loop ([`Load::Closed`]): `concurrency` senders, each with its own
//!   connection, submit back to back until `count` tasks are sent. It finds
//!   the most the system takes; latency is measured from each actual send,
//!   so a slow answer also delays the sends behind it (coordinated
//!   omission), which is why latency targets are checked in open loop.
//! - Open loop ([`Load::Open`]): a scheduler thread fires requests at fixed
//!   intended times; each is sent on a free pooled connection, and every
//!   latency is measured from the intended time, so a stall shows up in the
//!   figures of all the requests it delayed. The scheduler is an OS thread
//!   sleeping with the kernel's timer (tens of microseconds of slack)
//!   because the async runtime's timer rounds to whole milliseconds, which
//!   would add up to a millisecond of generator lateness to every
//!   measurement.
//!
//! Both are bounded by count and by `max_duration`; afterwards the run waits
//! up to `drain_timeout` for accepted tasks to finish.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use claudecluster_engine::task::NewTask;
use http::Method;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::api::{SubmitApi, SubmitOutcome};
use crate::cpu::CpuWatch;
use crate::http::{ConnectionPool, Endpoint, HttpConnection, HttpError};
use crate::observe::{Clock, ObserveError, ObserveMode, Observer, Tracker};
use crate::report::{Latencies, LoadShape, Report, TaskCounts, Throughput};
use crate::stats::LatencyHistogram;

/// The load to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    /// `count` tasks as fast as `concurrency` senders go.
    Closed {
        /// Tasks to submit.
        count: u64,
        /// Requests in flight at once.
        concurrency: usize,
    },
    /// `rate_per_s` tasks per second for `duration`.
    Open {
        /// Tasks per second (requests per second times tasks per request).
        rate_per_s: f64,
        /// How long to keep sending.
        duration: Duration,
        /// Requests in flight at most; beyond it sends wait (and their
        /// latency, counted from the intended time, shows it).
        max_in_flight: usize,
    },
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// A name for the report.
    pub label: String,
    /// Where the intake is.
    pub endpoint: Arc<Endpoint>,
    /// How tasks are submitted.
    pub api: SubmitApi,
    /// The task submitted, over and over.
    pub task: NewTask,
    /// The load shape.
    pub load: Load,
    /// Sending stops at this age of the run, whatever is left.
    pub max_duration: Duration,
    /// Closed loop only: senders pause while this many accepted tasks are
    /// unfinished, so the figure is the rate the system sustains rather
    /// than how fast a queue can be filled. Needs completion to be observed.
    pub max_backlog: Option<u64>,
    /// How long to wait for accepted tasks to finish after the last send.
    pub drain_timeout: Duration,
    /// How completion is observed.
    pub observe: ObserveMode,
    /// Draw a progress bar on standard error (hidden when it is not a
    /// terminal).
    pub progress: bool,
    /// Processes (`NAME=PID`) whose CPU time to report per task.
    pub watch: Vec<String>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting is out of range.
    #[error("invalid run settings: {0}")]
    Invalid(&'static str),
    /// The request body could not be built.
    #[error("cannot build the request body: {0}")]
    Body(#[from] serde_json::Error),
    /// The intake could not be reached before the run.
    #[error("the intake is not reachable: {0}")]
    Unreachable(#[from] HttpError),
    /// The completion observer could not start.
    #[error(transparent)]
    Observe(#[from] ObserveError),
    /// A process to watch is not given as `NAME=PID`.
    #[error(transparent)]
    Watch(#[from] crate::rss::RssError),
}

/// Submit-side figures, shared by all senders.
#[derive(Debug, Default)]
struct SubmitStats {
    latency: LatencyHistogram,
    requests: u64,
    sent: u64,
    accepted: u64,
    rejected: BTreeMap<String, u64>,
    errors: u64,
    first_send: Option<Instant>,
    last_answer: Option<Instant>,
    last_error: Option<String>,
}

impl SubmitStats {
    fn sent(&mut self, intended: Instant, tasks: usize) {
        self.requests += 1;
        self.sent += tasks as u64;
        self.first_send = Some(self.first_send.map_or(intended, |t| t.min(intended)));
    }
}

/// What every sender needs.
struct Shared {
    api: SubmitApi,
    task: NewTask,
    full_body: Bytes,
    path: String,
    observed: bool,
    tracker: Arc<Tracker>,
    observer: Observer,
    stats: Mutex<SubmitStats>,
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, SubmitStats> {
        // Updates under this lock are plain arithmetic and map inserts; a
        // poisoned lock still holds consistent counts.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one request of `n` tasks whose latency counts from `intended`.
    async fn submit(
        &self,
        conn: &mut HttpConnection,
        n: usize,
        intended: Instant,
    ) -> Result<(), HttpError> {
        let body = if n == self.api.tasks_per_request() {
            self.full_body.clone()
        } else {
            // Only the last request of a run is short; building it here is
            // cheaper than keeping a body per size.
            match self.api.body(&self.task, n) {
                Ok(body) => body,
                Err(e) => {
                    self.lose(intended, n, &e.to_string());
                    return Ok(());
                }
            }
        };
        let result = conn.send(Method::POST, &self.path, Some(body)).await;
        let answered = Instant::now();
        let (status, body) = match result {
            Ok(answer) => answer,
            Err(e) => {
                self.lose(intended, n, &e.to_string());
                return Err(e);
            }
        };
        let outcome = self.api.parse(status, &body, n);
        if let SubmitOutcome::Accepted(ids) = &outcome
            && self.observed
        {
            self.tracker.register(ids, intended);
            self.observer.watch(ids);
        }
        let mut stats = self.stats();
        stats.sent(intended, n);
        stats
            .latency
            .record(answered.saturating_duration_since(intended));
        stats.last_answer = Some(stats.last_answer.map_or(answered, |t| t.max(answered)));
        match outcome {
            SubmitOutcome::Accepted(ids) => stats.accepted += ids.len() as u64,
            SubmitOutcome::Rejected { status, tasks } => {
                *stats.rejected.entry(status.to_string()).or_default() += tasks as u64;
                stats.last_error =
                    Some(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
            }
            SubmitOutcome::Malformed(reason) => {
                stats.errors += n as u64;
                stats.last_error = Some(format!("unreadable answer: {reason}"));
            }
        }
        Ok(())
    }

    /// Counts `n` tasks lost to an error before or while sending.
    fn lose(&self, intended: Instant, n: usize, error: &str) {
        let mut stats = self.stats();
        stats.sent(intended, n);
        stats.errors += n as u64;
        stats.last_error = Some(error.to_owned());
    }
}

/// Runs one load test and reports what it measured.
///
/// # Errors
/// [`RunError`] when the settings are invalid, the intake is unreachable at
/// the start, or the observer cannot start. Errors during the run are
/// counted in the report instead.
pub async fn run(config: RunConfig) -> Result<Report, RunError> {
    let planned = validate(&config)?;
    let pool = ConnectionPool::new(config.endpoint.clone());
    // One connection up front turns "nothing listens there" into a clear
    // error instead of a report full of failures; it is then reused.
    pool.give_back(pool.take().await?);

    let clock = Clock::now();
    let tracker = Arc::new(Tracker::new());
    let observer = Observer::start(&config.observe, tracker.clone(), &pool, clock).await?;
    let shared = Arc::new(Shared {
        api: config.api,
        full_body: config
            .api
            .body(&config.task, config.api.tasks_per_request())?,
        task: config.task.clone(),
        path: config.endpoint.path(config.api.path()),
        observed: config.observe != ObserveMode::None,
        tracker: tracker.clone(),
        observer,
        stats: Mutex::new(SubmitStats::default()),
    });

    let cpu = CpuWatch::start(&config.watch, "loadgen")?;
    let started_at = Utc::now();
    let start = Instant::now();
    let progress = Progress::start(config.progress, planned, shared.clone());
    let deadline = start + config.max_duration;
    match &config.load {
        Load::Closed { count, concurrency } => {
            let backlog = config.max_backlog.filter(|_| shared.observed);
            closed_loop(
                &shared,
                &config.endpoint,
                *count,
                *concurrency,
                backlog,
                deadline,
            )
            .await;
        }
        Load::Open {
            rate_per_s,
            duration,
            max_in_flight,
        } => {
            open_loop(
                &shared,
                &pool,
                planned,
                *rate_per_s,
                (*duration).min(config.max_duration),
                *max_in_flight,
            )
            .await;
        }
    }
    tracker.finish_submissions();
    let all_finished = if shared.observed {
        tracker
            .wait_all(Instant::now() + config.drain_timeout)
            .await
    } else {
        true
    };
    progress.stop();

    let completion = tracker.completion();
    let stats = shared.stats();
    let first = stats.first_send.unwrap_or(start);
    let submit_secs = stats
        .last_answer
        .map_or(0.0, |t| t.saturating_duration_since(first).as_secs_f64());
    let end_to_end_secs = completion
        .last_finish
        .map_or(0.0, |t| t.saturating_duration_since(first).as_secs_f64());
    let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    Ok(Report {
        label: config.label.clone(),
        target: config.endpoint.url().to_owned(),
        api: config.api.label(),
        load: match config.load {
            Load::Closed { count, concurrency } => LoadShape::Closed { count, concurrency },
            Load::Open {
                rate_per_s,
                duration,
                ..
            } => LoadShape::Open {
                rate_per_s,
                duration_s: duration.as_secs_f64(),
            },
        },
        observe: config.observe.label().to_owned(),
        started_at,
        requests: stats.requests,
        tasks: TaskCounts {
            requested: planned,
            sent: stats.sent,
            accepted: stats.accepted,
            rejected: stats.rejected.clone(),
            errors: stats.errors,
            finished: completion.finished,
            unfinished: if all_finished || !shared.observed {
                0
            } else {
                completion.registered - completion.finished
            },
            states: completion.states.clone(),
        },
        throughput: Throughput {
            submit_secs,
            submit_per_s: per_s(stats.accepted, submit_secs),
            end_to_end_secs,
            end_to_end_per_s: per_s(completion.finished, end_to_end_secs),
        },
        latency: Latencies {
            submit: stats.latency.summary(),
            queue_wait: completion.queue_wait.summary(),
            end_to_end: completion.end_to_end.summary(),
        },
        cpu: cpu.finish(if shared.observed {
            completion.finished
        } else {
            stats.accepted
        }),
        steal_percent: cpu.steal_percent(),
        last_error: stats.last_error.clone(),
    })
}

/// Checks the settings and returns the number of tasks planned.
fn validate(config: &RunConfig) -> Result<u64, RunError> {
    if config.api.tasks_per_request() == 0 {
        return Err(RunError::Invalid("batch size must be at least 1"));
    }
    match &config.load {
        Load::Closed { count, concurrency } => {
            if *concurrency == 0 {
                return Err(RunError::Invalid("concurrency must be at least 1"));
            }
            Ok(*count)
        }
        Load::Open {
            rate_per_s,
            duration,
            max_in_flight,
        } => {
            if !(rate_per_s.is_finite() && *rate_per_s > 0.0) {
                return Err(RunError::Invalid("rate must be a positive number"));
            }
            if *max_in_flight == 0 {
                return Err(RunError::Invalid("max in flight must be at least 1"));
            }
            let secs = duration.min(&config.max_duration).as_secs_f64();
            Ok((rate_per_s * secs).round() as u64)
        }
    }
}

/// Takes up to `per_request` tasks from `remaining`; 0 when none are left.
fn claim(remaining: &AtomicU64, per_request: usize) -> usize {
    let want = per_request as u64;
    match remaining.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
        (left > 0).then(|| left - left.min(want))
    }) {
        // At most `per_request`, which is a usize.
        Ok(left) => left.min(want) as usize,
        Err(_) => 0,
    }
}

async fn closed_loop(
    shared: &Arc<Shared>,
    endpoint: &Arc<Endpoint>,
    count: u64,
    concurrency: usize,
    max_backlog: Option<u64>,
    deadline: Instant,
) {
    let remaining = Arc::new(AtomicU64::new(count));
    let per_request = shared.api.tasks_per_request();
    let mut senders = JoinSet::new();
    for _ in 0..concurrency {
        let shared = shared.clone();
        let endpoint = endpoint.clone();
        let remaining = remaining.clone();
        senders.spawn(async move {
            let mut conn: Option<HttpConnection> = None;
            while Instant::now() < deadline {
                if let Some(limit) = max_backlog {
                    tokio::select! {
                        () = shared.tracker.wait_backlog_below(limit) => {}
                        () = tokio::time::sleep_until(deadline.into()) => break,
                    }
                }
                let n = claim(&remaining, per_request);
                if n == 0 {
                    break;
                }
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => match HttpConnection::connect(endpoint.clone()).await {
                        Ok(c) => c,
                        Err(e) => {
                            shared.lose(Instant::now(), n, &e.to_string());
                            continue;
                        }
                    },
                };
                if shared.submit(&mut c, n, Instant::now()).await.is_ok() {
                    conn = Some(c);
                }
            }
        });
    }
    while senders.join_next().await.is_some() {}
}

async fn open_loop(
    shared: &Arc<Shared>,
    pool: &ConnectionPool,
    planned: u64,
    rate_per_s: f64,
    duration: Duration,
    max_in_flight: usize,
) {
    let per_request = shared.api.tasks_per_request() as u64;
    let requests = planned.div_ceil(per_request);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, usize)>();
    // A short lead so the first intended times are not already past when
    // the scheduler thread starts.
    let start = Instant::now() + Duration::from_millis(5);
    let end = start + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let scheduler = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("loadgen-schedule".into())
            .spawn(move || {
                for i in 0..requests {
                    let intended =
                        start + Duration::from_secs_f64((i * per_request) as f64 / rate_per_s);
                    if intended > end || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    // At most `per_request`, which came from a usize.
                    let n = (planned - i * per_request).min(per_request) as usize;
                    if tx.send((intended, n)).is_err() {
                        break;
                    }
                }
            })
    };
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut in_flight = JoinSet::new();
    while let Some((intended, n)) = rx.recv().await {
        // The semaphore is never closed, so acquiring cannot fail.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        let pool = pool.clone();
        in_flight.spawn(async move {
            let _permit = permit;
            match pool.take().await {
                Ok(mut conn) => {
                    if shared.submit(&mut conn, n, intended).await.is_ok() {
                        pool.give_back(conn);
                    }
                }
                Err(e) => shared.lose(intended, n, &e.to_string()),
            }
        });
        while in_flight.try_join_next().is_some() {}
    }
    stop.store(true, Ordering::Relaxed);
    if let Ok(handle) = scheduler {
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    while in_flight.join_next().await.is_some() {}
}

/// The progress bar, redrawn from the shared counters.
struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(enabled: bool, planned: u64, shared: Arc<Shared>) -> Self {
        if !enabled {
            return Self {
                bar: ProgressBar::hidden(),
                ticker: None,
            };
        }
        let bar = ProgressBar::new(planned);
        // The template is a constant that indicatif accepts.
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} finished  {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        let ticker = {
            let bar = bar.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    let (accepted, errors) = {
                        let s = shared.stats();
                        (s.accepted, s.errors + s.rejected.values().sum::<u64>())
                    };
                    let (_, finished) = shared.tracker.progress();
                    let done = if shared.observed { finished } else { accepted };
                    let secs = started.elapsed().as_secs_f64().max(1e-3);
                    bar.set_position(done);
                    bar.set_message(format!(
                        "accepted {accepted} ({:.0}/s), errors {errors}",
                        accepted as f64 / secs
                    ));
                }
            })
        };
        Self {
            bar,
            ticker: Some(ticker),
        }
    }

    fn stop(self) {
        if let Some(t) = self.ticker {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_split_the_count_exactly() {
        let remaining = AtomicU64::new(250);
        let mut got = Vec::new();
        loop {
            let n = claim(&remaining, 100);
            if n == 0 {
                break;
            }
            got.push(n);
        }
        assert_eq!(got, vec![100, 100, 50]);
        assert_eq!(claim(&remaining, 100), 0);
    }
}
