//! Waiting in tests for states that have no event to await (a record
//! removed by a background task, a client noticing a dropped connection).

use std::future::Future;
use std::time::Duration;

/// How long [`eventually`] waits before it fails the test.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `check` until it returns a value, and returns that; fails the test
/// when `what` has not happened within [`PATIENCE`].
///
/// # Panics
/// When the wait runs out.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
