//! The intake's Prometheus metrics. The recorder is the process-wide one of
//! `claudecluster_engine::telemetry`, so an all-in-one process exposes the
//! intake's and the workers' metrics on the same `/metrics`.
//!
//! - `claudecluster_tasks_total{status}`: `queued` (accepted), `rejected`
//!   (invalid), `duplicate` (idempotent replay); workers add final states.
//! - `claudecluster_publish_latency_seconds`: time to a broker confirmation.
//! - `claudecluster_queue_depth`: tasks waiting, refreshed at each scrape.
//! - `claudecluster_http_requests_total{method,route,status}` and
//!   `claudecluster_http_request_duration_seconds{route}`: `route` is the
//!   matched route template (`/tasks/{id}`), never the raw path, so the
//!   number of series stays bounded.

use std::sync::Once;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};

/// Tasks by status.
pub const TASKS_TOTAL: &str = "claudecluster_tasks_total";
/// Publish confirmation latency.
pub const PUBLISH_LATENCY: &str = "claudecluster_publish_latency_seconds";
/// Tasks waiting on the queue.
pub const QUEUE_DEPTH: &str = "claudecluster_queue_depth";
/// HTTP requests by method, route and status.
pub const HTTP_REQUESTS: &str = "claudecluster_http_requests_total";
/// HTTP request duration by route.
pub const HTTP_DURATION: &str = "claudecluster_http_request_duration_seconds";
/// Task run time (recorded by the workers).
pub const TASK_DURATION: &str = "claudecluster_task_duration_seconds";

static DESCRIBE: Once = Once::new();

/// Installs the process-wide recorder and describes the intake's metrics.
/// Cheap after the first call.
pub fn install() {
    claudecluster_engine::telemetry::prometheus();
    DESCRIBE.call_once(|| {
        describe_counter!(
            TASKS_TOTAL,
            "Tasks by status (intake: queued, rejected, duplicate; workers: final states)."
        );
        describe_histogram!(
            PUBLISH_LATENCY,
            Unit::Seconds,
            "Time from publishing a task to the broker's confirmation."
        );
        describe_gauge!(
            QUEUE_DEPTH,
            "Tasks waiting to be delivered, over all priority bands."
        );
        describe_counter!(
            HTTP_REQUESTS,
            "HTTP requests by method, route template and status."
        );
        describe_histogram!(
            HTTP_DURATION,
            Unit::Seconds,
            "HTTP request duration by route template."
        );
        describe_histogram!(
            TASK_DURATION,
            Unit::Seconds,
            "Task execution duration, by final status and worker."
        );
        // Registering the histograms makes their families appear on the
        // first scrape, before anything is recorded.
        let _ = metrics::histogram!(TASK_DURATION);
        let _ = metrics::histogram!(PUBLISH_LATENCY);
        gauge!(QUEUE_DEPTH).set(0.0);
    });
}

/// Counts accepted tasks.
pub fn tasks_queued(n: u64) {
    if n > 0 {
        counter!(TASKS_TOTAL, "status" => "queued").increment(n);
    }
}

/// Counts rejected (invalid) submissions.
pub fn tasks_rejected(n: u64) {
    if n > 0 {
        counter!(TASKS_TOTAL, "status" => "rejected").increment(n);
    }
}

/// Counts idempotent replays.
pub fn tasks_duplicate(n: u64) {
    if n > 0 {
        counter!(TASKS_TOTAL, "status" => "duplicate").increment(n);
    }
}

/// Records one publish (or one pipelined batch publish).
pub fn publish_latency(elapsed: Duration) {
    metrics::histogram!(PUBLISH_LATENCY).record(elapsed.as_secs_f64());
}

/// Sets the queue depth gauge.
pub fn queue_depth(depth: u64) {
    gauge!(QUEUE_DEPTH).set(depth as f64);
}

/// Records one HTTP request; `route` is a route template or `unmatched`.
pub fn http_request(method: &'static str, route: &'static str, status: u16, elapsed: Duration) {
    let status = status_label(status);
    counter!(HTTP_REQUESTS, "method" => method, "route" => route, "status" => status).increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route).record(elapsed.as_secs_f64());
}

/// The method label; unusual methods share one label so a client cannot grow
/// the number of series.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn status_label(status: u16) -> &'static str {
    // The statuses the intake answers with; the rest are grouped by class.
    const EXACT: [(u16, &str); 13] = [
        (200, "200"),
        (202, "202"),
        (204, "204"),
        (400, "400"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (409, "409"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (500, "500"),
        (503, "503"),
    ];
    if let Some((_, label)) = EXACT.iter().find(|(code, _)| *code == status) {
        return label;
    }
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
