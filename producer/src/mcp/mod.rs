//! The MCP intake: agents submit and follow tasks with MCP tool calls.
//!
//! [`McpServer`] exposes the intake's operations as six tools
//! (`submit_task`, `submit_tasks`, `get_task`, `wait_for_task`,
//! `cancel_task`, `list_tasks`). Each tool is a thin adapter over the same
//! [`TaskService`](crate::service::TaskService) the HTTP API calls, so both
//! validate alike and name the same fields in their errors.
//!
//! [`router`] serves it over the Streamable HTTP transport at [`PATH`] on the
//! intake's port. The transport runs stateless: no session is created and
//! nothing about a client is kept in this process between requests, so any
//! replica behind a plain load balancer can answer any request. Progress
//! notifications travel on the response stream of the request they belong
//! to, and closing that stream cancels the request.
//!
//! - [`tools`]: the catalogue, with schemas taken from the wire contract.
//! - [`args`]: argument parsing, reusing the HTTP API's JSON parser.
//! - [`envelope`]: JSON-RPC errors for malformed messages.
//! - [`reply`]: tool results and MCP-shaped errors.
//! - [`wait`]: `wait_for_task`'s polling loop with progress and cancellation.
//! - [`metrics`]: the tool-call metrics.

pub mod args;
pub mod envelope;
pub mod metrics;
pub mod reply;
pub mod server;
pub mod tools;
pub mod wait;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Router;
use claudecluster_engine::config::ServerSettings;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

pub use server::McpServer;

/// Where the MCP endpoint is mounted on the intake's port.
pub const PATH: &str = "/mcp";

/// Host names every intake accepts on the MCP endpoint, whatever the
/// configuration says: a client on the same machine must always work.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The MCP Streamable HTTP service of the intake with `state`.
///
/// `stopping` ends the calls that wait (`wait_for_task` answers with the
/// task as it is) so a graceful shutdown does not hang on them.
pub fn service(
    state: &AppState,
    stopping: CancellationToken,
) -> StreamableHttpService<McpServer, NeverSessionManager> {
    let server = McpServer::new(state.service().clone(), state.settings_arc(), stopping);
    StreamableHttpService::new(
        // A clone is one reference count: the server has no per-client state.
        move || Ok(server.clone()),
        Arc::new(NeverSessionManager::default()),
        http_config(&state.settings().server),
    )
}

/// A router with the MCP service at [`PATH`], behind the envelope check,
/// to merge next to the API.
pub fn router(state: &AppState, stopping: CancellationToken) -> Router {
    let limit = state.settings().server.max_body_bytes;
    Router::new()
        .nest_service(PATH, service(state, stopping))
        .layer(axum::middleware::from_fn_with_state(limit, envelope::guard))
}

/// The transport configuration: stateless, JSON-RPC answers on a
/// server-sent event stream (so long waits get keep-alive comments through
/// proxies), the intake's body limit, and the DNS rebinding protection.
///
/// The `Host` header must name a loopback host or one of
/// `server.allowed_hosts` (`ALLOWED_HOSTS`), with any port unless the entry
/// gives one; `*` turns the check off. A browser's `Origin`, when present,
/// must be one of those hosts too, over http or https, so a web page served
/// from elsewhere cannot drive the endpoint through a visitor's browser.
pub fn http_config(server: &ServerSettings) -> StreamableHttpServerConfig {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(false)
        .with_max_request_body_bytes(server.max_body_bytes);
    if server.allowed_hosts.iter().any(|h| h.trim() == "*") {
        return config.disable_allowed_hosts().disable_allowed_origins();
    }
    let hosts: Vec<String> = LOOPBACK_HOSTS
        .iter()
        .map(|h| (*h).to_owned())
        .chain(
            server
                .allowed_hosts
                .iter()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty()),
        )
        .collect();
    let origins: Vec<String> = hosts.iter().flat_map(|h| origins_of(h)).collect();
    config
        .with_allowed_hosts(hosts)
        .with_allowed_origins(origins)
}

/// The browser origins that belong to an allowed host entry: `host` or
/// `host:port`, over http and https; any port unless the entry names one.
fn origins_of(entry: &str) -> [String; 2] {
    // A bare IPv6 address has colons but no port; origins bracket it.
    let authority = if entry.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{entry}]:*")
    } else if entry
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    {
        entry.to_owned()
    } else {
        format!("{entry}:*")
    };
    [
        format!("http://{authority}"),
        format!("https://{authority}"),
    ]
}
