//! Binding and serving: [`Application`] owns the listener and the router
//! until it is told to stop.

use anyhow::Context;
use axum::Router;
use claudecluster_engine::backend::Backends;
use claudecluster_engine::config::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::routes::router;
use crate::state::AppState;

/// The intake, bound to its port and ready to serve.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    port: u16,
    router: Router,
    state: AppState,
    /// Ends the MCP calls that block (`wait_for_task`) when the intake stops.
    stopping: CancellationToken,
}

impl Application {
    /// Binds `server.host:server.port` (port 0 picks a free one) and builds
    /// the API and the MCP endpoint (`/mcp`) over `backends`.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn build(settings: Settings, backends: Backends) -> anyhow::Result<Self> {
        Self::build_with(settings, backends, |_| Router::new()).await
    }

    /// [`Self::build`] plus extra routes, built from the shared state and
    /// merged next to the API and the MCP endpoint. The MCP and extra routes
    /// are not under the API's request timeout and load shedding, since
    /// long-lived streams live there; they must not define a fallback.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn build_with(
        settings: Settings,
        backends: Backends,
        extra: impl FnOnce(&AppState) -> Router,
    ) -> anyhow::Result<Self> {
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("failed to bind the intake to {addr}"))?;
        let port = listener
            .local_addr()
            .context("failed to read the bound address")?
            .port();
        let state = AppState::new(settings, backends);
        let stopping = CancellationToken::new();
        let router = extra(&state)
            .merge(crate::mcp::router(&state, stopping.clone()))
            .merge(router(state.clone()));
        Ok(Self {
            listener,
            port,
            router,
            state,
            stopping,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shared state (settings, backends, the task service).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets
    /// requests in progress finish.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(
            port = self.port,
            backends = %self.state.backends().description,
            "intake listening"
        );
        let stopping = self.stopping;
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                // Blocking MCP waits answer now instead of holding the
                // graceful shutdown open for minutes.
                stopping.cancel();
            })
            .await
            .context("the intake's HTTP server failed")?;
        tracing::info!("intake stopped");
        Ok(())
    }
}
