//! The ClaudeCluster intake: a stateless HTTP API that validates tasks,
//! records them as `queued` and publishes them to the task queue, and lets
//! clients poll, list and cancel them.
//!
//! - [`service`]: the operations, transport-independent (the MCP server
//!   calls them too).
//! - [`routes`]: the HTTP adapters, with [`router`] building the API.
//! - [`error`]: [`ApiError`], the one JSON error format.
//! - [`extract`]: the JSON body and parameter parsing behind it.
//! - [`state`], [`startup`]: [`AppState`] and [`Application`].
//! - [`metrics`]: the intake's Prometheus metrics.
//! - [`mcp`]: the MCP server at `/mcp` (Streamable HTTP, stateless).

pub mod error;
pub mod extract;
pub mod mcp;
pub mod metrics;
pub mod routes;
pub mod service;
pub mod startup;
pub mod state;

pub use error::{ApiError, ErrorResponse};
pub use routes::router;
pub use service::TaskService;
pub use startup::Application;
pub use state::AppState;
