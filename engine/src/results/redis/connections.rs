//! A fixed ring of multiplexed Redis connections, each reconnecting on its
//! own, handed out round-robin.
//!
//! A multiplexed connection already pipelines every concurrent request sent
//! through it, so a "pool" here only spreads load over a few sockets; there
//! is nothing to check out or return. (A check-out pool that pings each
//! connection before lending it, as deadpool-redis does, measured seven
//! times slower here than sending the command straight away.) The
//! connections open on first use, so a store can be built before Redis is
//! up, and a dropped connection is re-established by its
//! [`ConnectionManager`] while the failed call reports
//! [`StoreError::Unavailable`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::reply;
use crate::results::StoreError;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take. Generous: a pipelined batch of creates is
/// one "command" from the client's point of view.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection attempts behind one failed call; kept low so that calls
/// during an outage fail within seconds (callers back off themselves).
const RECONNECT_RETRIES: usize = 2;
/// Most connections, whatever the configured pool size.
const MAX_CONNECTIONS: usize = 64;

/// The ring.
pub(super) struct Connections {
    ring: Vec<ConnectionManager>,
    next: AtomicUsize,
}

impl Connections {
    /// `size` lazily opened connections to `url`. Must be called within a
    /// Tokio runtime (each connection runs a small task).
    ///
    /// # Errors
    /// [`StoreError::Other`] when the URL is not a Redis URL.
    pub fn new(url: &str, size: usize) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url)
            .map_err(|e| StoreError::Other(format!("invalid Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let ring = (0..size.clamp(1, MAX_CONNECTIONS))
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(reply::redis_error)?;
        Ok(Self {
            ring,
            next: AtomicUsize::new(0),
        })
    }

    /// The next connection (a cheap handle onto the shared socket).
    pub fn get(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.ring.len();
        self.ring[i].clone()
    }
}
