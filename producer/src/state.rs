//! The state every request handler shares: settings, backends (through the
//! [`TaskService`]), the start time and the load-shedding limiter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use claudecluster_engine::backend::Backends;
use claudecluster_engine::config::Settings;
use tokio::sync::Semaphore;

use crate::service::TaskService;

/// Shared, cheaply cloned state of the intake (one `Arc` inside).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    service: TaskService,
    started: Instant,
    started_at: DateTime<Utc>,
    limiter: Arc<Semaphore>,
}

impl AppState {
    /// Builds the state from loaded settings and connected backends, and
    /// installs the metrics recorder.
    pub fn new(settings: Settings, backends: Backends) -> Self {
        crate::metrics::install();
        let settings = Arc::new(settings);
        // A limit of 0 would refuse every request; treat it as 1.
        let limit = settings.server.max_concurrent_requests.max(1);
        Self {
            inner: Arc::new(Inner {
                service: TaskService::new(Arc::clone(&settings), backends),
                settings,
                started: Instant::now(),
                started_at: Utc::now(),
                limiter: Arc::new(Semaphore::new(limit)),
            }),
        }
    }

    /// The settings the intake runs with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The settings, shared.
    pub fn settings_arc(&self) -> Arc<Settings> {
        Arc::clone(&self.inner.settings)
    }

    /// The operations behind the endpoints (also for the MCP server).
    pub fn service(&self) -> &TaskService {
        &self.inner.service
    }

    /// The connected backends.
    pub fn backends(&self) -> &Backends {
        self.inner.service.backends()
    }

    /// Time since the state was built.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// When the state was built.
    pub fn started_at(&self) -> DateTime<Utc> {
        self.inner.started_at
    }

    /// Admission control for `server.max_concurrent_requests`.
    pub(crate) fn limiter(&self) -> &Arc<Semaphore> {
        &self.inner.limiter
    }

    /// `server.request_timeout_ms`.
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.settings.server.request_timeout_ms)
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("backends", self.backends())
            .field("uptime", &self.uptime())
            .finish_non_exhaustive()
    }
}
