//! Housekeeping around benchmark runs: deleting the streams and keys a run
//! created, and waiting for a work queue to empty between steps.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::Serialize;

use super::{RawError, nats_err};

/// What [`cleanup`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Cleaned {
    /// Streams deleted.
    pub streams: usize,
    /// Redis keys deleted.
    pub keys: u64,
}

/// Deletes JetStream streams (those that exist) and every Redis key under
/// the given prefixes. Used after each raw run and by the benchmark script
/// after the system's own run.
///
/// # Errors
/// [`RawError`] when a service is unreachable or refuses a deletion.
pub async fn cleanup(
    nats_url: &str,
    redis_url: &str,
    streams: &[String],
    key_prefixes: &[String],
) -> Result<Cleaned, RawError> {
    let mut cleaned = Cleaned::default();
    if !streams.is_empty() {
        let js = jetstream::new(async_nats::connect(nats_url).await.map_err(nats_err)?);
        for name in streams {
            match js.delete_stream(name).await {
                Ok(_) => cleaned.streams += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(nats_err(e)),
            }
        }
    }
    for prefix in key_prefixes {
        // Refuses an empty prefix, which would match every key on the server.
        cleaned.keys +=
            claudecluster_engine::backend::testing::delete_redis_keys(redis_url, prefix).await?;
    }
    Ok(cleaned)
}

/// Waits until the work-queue streams hold no messages (every task taken
/// and acknowledged) or `timeout` passes; returns the messages left.
///
/// # Errors
/// [`RawError::Nats`] when NATS cannot be reached or a stream read.
pub async fn wait_drained(
    nats_url: &str,
    streams: &[String],
    timeout: Duration,
) -> Result<u64, RawError> {
    let js = jetstream::new(async_nats::connect(nats_url).await.map_err(nats_err)?);
    let deadline = Instant::now() + timeout;
    loop {
        let mut left = 0;
        for name in streams {
            let mut stream = js.get_stream(name).await.map_err(nats_err)?;
            left += stream.info().await.map_err(nats_err)?.state.messages;
        }
        if left == 0 || Instant::now() >= deadline {
            return Ok(left);
        }
        // Polling is fine here: this runs between benchmark steps, where a
        // tenth of a second is nothing, and a stream has no "empty" event.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_not_found(e: &jetstream::context::DeleteStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::DeleteStreamErrorKind::JetStream(err)
            if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}
