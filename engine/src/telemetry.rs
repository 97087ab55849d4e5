//! Logging: readable lines in development, JSON in production
//! (`LOG_FORMAT`), filtered by `LOG_LEVEL` (a level or any tracing filter
//! directive). Spans carry `task_id` so one task's lines can be followed
//! across the intake and the workers.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Safe to call more than once: later calls
/// are ignored (tests start several apps in one process).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|e| {
        eprintln!(
            "LOG_LEVEL {:?} is not a valid filter ({e}); using \"info\"",
            settings.level
        );
        EnvFilter::new("info")
    });
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().compact().with_writer(std::io::stderr))
            .try_init(),
    };
    // Err only means a subscriber is already installed.
    let _ = result;
}

/// Buckets of `claudecluster_task_duration_seconds`, from the deployment
/// guide.
pub const TASK_DURATION_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0];

/// Buckets for sub-second latencies (publish, store round trips).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Buckets of `claudecluster_http_request_duration_seconds`: sub-millisecond
/// submits up to the request timeout's range.
pub const HTTP_DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. The intake
/// and the workers share it when they run in one process.
pub fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("claudecluster_task_duration_seconds".into()),
                TASK_DURATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("latency_seconds".into()), LATENCY_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("claudecluster_http_request_duration_seconds".into()),
                    HTTP_DURATION_BUCKETS,
                )
            })
            // Bucket lists are non-empty constants, so this cannot fail.
            .expect("valid histogram buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (a test harness); the
        // handle still renders this one's metrics only if it is installed,
        // so report it.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        handle
    })
}
