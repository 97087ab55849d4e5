//! The worker process: the [`WorkerPool`] plus a small HTTP server on the
//! worker's port for probes and scraping:
//!
//! - `GET /health`: the process is alive (`{"status":"healthy",…}`).
//! - `GET /ready`: 200 when the broker and the store answer, 503 with the
//!   reason when one does not or the worker is stopping.
//! - `GET /metrics`: Prometheus text.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use claudecluster_engine::backend::Backends;
use claudecluster_engine::broker::TaskPublisher;
use claudecluster_engine::config::Settings;
use claudecluster_engine::results::ResultStore;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::executor;
use crate::pool::{PoolStatus, WorkerPool};

/// How long `/ready` waits for the broker and the store.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A built worker: pool and HTTP listener, ready to run.
pub struct Application {
    pool: WorkerPool,
    listener: tokio::net::TcpListener,
    state: AppState,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("pool", &self.pool)
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// What the HTTP handlers need.
#[derive(Clone)]
struct AppState {
    status: PoolStatus,
    broker: Arc<dyn TaskPublisher>,
    store: Arc<dyn ResultStore>,
    stopping: CancellationToken,
    started: Instant,
}

impl Application {
    /// Builds the executor from `settings`, the pool on `backends`, and
    /// binds `server.host`:`worker.port`.
    ///
    /// # Errors
    /// An executor configuration error, or a port that cannot be bound.
    pub async fn build(settings: Settings, backends: Backends) -> anyhow::Result<Application> {
        let addr = format!("{}:{}", settings.server.host, settings.worker.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("failed to bind the worker's HTTP port {addr}"))?;
        let executor =
            executor::from_settings(&settings).context("failed to set up the executor")?;
        let broker = backends.publisher.clone();
        let store = backends.store.clone();
        let pool = WorkerPool::new(Arc::new(settings), backends, executor);
        let state = AppState {
            status: pool.status(),
            broker,
            store,
            stopping: CancellationToken::new(),
            started: Instant::now(),
        };
        Ok(Application {
            pool,
            listener,
            state,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map_or(0, |a: SocketAddr| a.port())
    }

    /// The pool's live status.
    pub fn status(&self) -> PoolStatus {
        self.pool.status()
    }

    /// Runs the pool and the HTTP server until `shutdown`, then stops both
    /// gracefully.
    ///
    /// # Errors
    /// When the HTTP server fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            pool,
            listener,
            state,
        } = self;
        tracing::info!(addr = ?listener.local_addr().ok(), "worker HTTP server listening");
        let stopping = state.stopping.clone();
        let server_stop = shutdown.clone();
        let server = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { server_stop.cancelled().await });
        let workers = async {
            // Report not-ready at once, before the drain starts.
            let mark = async {
                shutdown.cancelled().await;
                stopping.cancel();
            };
            let (res, ()) = tokio::join!(pool.run(shutdown.clone()), mark);
            res
        };
        let (served, worked) = tokio::join!(server.into_future(), workers);
        served.context("the worker's HTTP server failed")?;
        worked
    }
}

/// The worker's routes.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "healthy",
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "uptime": state.started.elapsed().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
        "worker_id": state.status.worker_id(),
    }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": reason })),
        )
            .into_response()
    };
    if state.stopping.is_cancelled() {
        return not_ready("the worker is shutting down".into());
    }
    let checks = async { tokio::join!(state.broker.health(), state.store.health()) };
    match tokio::time::timeout(READY_TIMEOUT, checks).await {
        Err(_) => not_ready("the broker or the store did not answer in time".into()),
        Ok((Err(e), _)) => not_ready(format!("broker: {e}")),
        Ok((_, Err(e))) => not_ready(format!("store: {e}")),
        Ok((Ok(()), Ok(()))) => Json(json!({
            "status": "ready",
            "worker_id": state.status.worker_id(),
            "in_flight": state.status.in_flight(),
        }))
        .into_response(),
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        claudecluster_engine::telemetry::prometheus().render(),
    )
        .into_response()
}
