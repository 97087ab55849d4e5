//! Chooses and connects the broker and result-store backends from settings,
//! and hands them out as trait objects so the rest of the program does not
//! care which ones run.
//!
//! [`connect_networked`] is the production path (NATS JetStream + Redis);
//! the embedded backends are opened by `crate::embedded`. [`testing`] holds
//! the helpers tests in every crate use to isolate themselves on the shared
//! NATS and Redis and to clean up after themselves.

pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::jetstream::JetStreamBroker;
use crate::broker::{BrokerError, DeadLetterStore, TaskConsumer, TaskPublisher};
use crate::config::Settings;
use crate::results::ResultStore;
use crate::results::StoreError;
use crate::results::redis::RedisStore;

/// Connection attempts at start-up before giving up (a pod may start before
/// NATS or Redis is ready).
const CONNECT_ATTEMPTS: u32 = 6;
/// First pause between attempts; it doubles up to [`MAX_CONNECT_BACKOFF`].
const FIRST_CONNECT_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause between attempts.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// How long one NATS connection attempt may take.
const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connected backends of one process.
#[derive(Clone)]
pub struct Backends {
    /// Publishes tasks (used by the intake).
    pub publisher: Arc<dyn TaskPublisher>,
    /// Delivers tasks (used by the workers).
    pub consumer: Arc<dyn TaskConsumer>,
    /// Task state.
    pub store: Arc<dyn ResultStore>,
    /// The dead letters.
    pub dead_letters: Arc<dyn DeadLetterStore>,
    /// A short description for logs and `/health`, e.g.
    /// `nats://127.0.0.1:4222 + redis://127.0.0.1:6379`.
    pub description: String,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// Why the backends could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// NATS did not accept a connection, even after retrying.
    #[error("cannot connect to NATS at {url} after {attempts} attempts: {reason}")]
    Nats {
        /// The server URL, without credentials.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        reason: String,
    },
    /// The streams and consumers could not be set up.
    #[error("cannot set up JetStream at {url}: {source}")]
    Setup {
        /// The server URL, without credentials.
        url: String,
        /// What failed.
        #[source]
        source: BrokerError,
    },
    /// Redis did not answer, even after retrying, or the URL is invalid.
    #[error("cannot connect to Redis at {url} after {attempts} attempts: {source}")]
    Redis {
        /// The server URL, without credentials.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: StoreError,
    },
    /// A cleanup helper refused to run against names that are not a
    /// test's own (the defaults, or an empty key prefix).
    #[error("refusing to delete {0}: not a test's unique name")]
    Refused(String),
}

/// Connects NATS (`settings.nats_url()`) and Redis (`settings.redis_url()`),
/// sets up the streams and consumers, and returns the backends.
/// Unreachable servers are retried a few times with backoff before giving
/// up.
///
/// # Errors
/// A [`BackendError`] naming the server (without credentials) and the last
/// failure.
pub async fn connect_networked(settings: &Settings) -> Result<Backends, BackendError> {
    let nats_url = settings.nats_url();
    let redis_url = settings.redis_url();
    let safe_nats = redact_url(nats_url);
    let safe_redis = redact_url(redis_url);

    let broker = retry("NATS", &safe_nats, || async {
        let client = connect_nats(nats_url)
            .await
            .map_err(|reason| BackendError::Nats {
                url: safe_nats.clone(),
                attempts: CONNECT_ATTEMPTS,
                reason,
            })?;
        JetStreamBroker::setup(client, &settings.nats)
            .await
            .map_err(|source| BackendError::Setup {
                url: safe_nats.clone(),
                source,
            })
    })
    .await?;
    let broker = Arc::new(broker);

    let store = retry("Redis", &safe_redis, || async {
        RedisStore::connect(redis_url, &settings.redis)
            .await
            .map_err(|source| BackendError::Redis {
                url: safe_redis.clone(),
                attempts: CONNECT_ATTEMPTS,
                source,
            })
    })
    .await?;

    Ok(Backends {
        publisher: broker.clone(),
        consumer: broker.clone(),
        dead_letters: broker,
        store: Arc::new(store),
        description: format!("{safe_nats} + {safe_redis}"),
    })
}

/// Opens a NATS connection that reconnects on its own forever and logs its
/// connection changes.
///
/// # Errors
/// The reason the first connection failed.
pub(crate) async fn connect_nats(url: &str) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::new()
        .name("claudecluster")
        .connection_timeout(NATS_CONNECT_TIMEOUT)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting");
                }
                other => tracing::warn!(event = %other, "NATS connection event"),
            }
        })
        .connect(url)
        .await
        .map_err(|e| e.to_string())
}

/// Runs `attempt` until it succeeds or [`CONNECT_ATTEMPTS`] have failed,
/// pausing with exponential backoff in between.
async fn retry<T, F, Fut>(what: &str, url: &str, mut attempt: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let mut pause = FIRST_CONNECT_BACKOFF;
    let mut tries = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if tries >= CONNECT_ATTEMPTS => return Err(e),
            Err(e) => {
                tracing::warn!(
                    service = what,
                    url,
                    attempt = tries,
                    retry_in = ?pause,
                    error = %e,
                    "backend not ready; retrying"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_CONNECT_BACKOFF);
                tries += 1;
            }
        }
    }
}

/// A server URL (or comma-separated list) fit for logs: any password or
/// token in it is replaced by `***`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let Some((scheme, rest)) = one.split_once("://") else {
                return one.to_owned();
            };
            let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            let Some((userinfo, host)) = authority.rsplit_once('@') else {
                return one.to_owned();
            };
            let userinfo = match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***"),
                // A lone token is a secret too.
                None => "***".to_owned(),
            };
            format!("{scheme}://{userinfo}@{host}{path}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact_url("redis://:s3cret@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            redact_url("nats://app:pw@a:4222,nats://tok@b:4222"),
            "nats://app:***@a:4222,nats://***@b:4222"
        );
        assert_eq!(redact_url("localhost:4222"), "localhost:4222");
    }
}
