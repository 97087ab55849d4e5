//! Delays between tries: the task retry backoff (exponential with full
//! jitter, so tasks that failed together do not come back together) and the
//! short capped backoff of the worker's own calls to the broker and store.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// The delay before retry number `attempt` (the attempt that just failed,
/// 1 for the first): uniform in `[0, min(max, base × 2^(attempt-1))]`.
pub fn task_backoff(attempt: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let ceiling = exponential(attempt, base, max);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.random_range(0..=millis))
}

/// `min(max, base × 2^(attempt-1))`, without overflow.
fn exponential(attempt: u32, base: Duration, max: Duration) -> Duration {
    let shift = attempt.saturating_sub(1).min(31);
    base.checked_mul(1u32 << shift).map_or(max, |d| d.min(max))
}

/// Capped doubling delays for reconnecting: 100 ms, 200 ms, … up to 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            first,
            max,
        }
    }

    /// The worker's default for broker and store calls.
    pub fn service() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The next delay; each call doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// How often [`retry`] tries a store or broker call before giving up.
pub const SERVICE_TRIES: u32 = 5;

/// Runs `op` until it succeeds, at most [`SERVICE_TRIES`] times, sleeping a
/// [`Backoff::service`] delay between tries. Returns the last error.
///
/// # Errors
/// The last error when every try failed.
pub async fn retry<T, E, F, Fut>(what: &str, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::service();
    let mut tries = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if tries >= SERVICE_TRIES => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, tries, ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                tries += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use rand::SeedableRng;

    use super::*;

    const BASE: Duration = Duration::from_millis(1000);
    const MAX: Duration = Duration::from_millis(60_000);

    #[test]
    fn exponential_ceiling_doubles_and_caps() {
        let ceilings: Vec<u64> = (1..=8)
            .map(|a| exponential(a, BASE, MAX).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(exponential(0, BASE, MAX), BASE);
        assert_eq!(exponential(u32::MAX, BASE, MAX), MAX);
    }

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..=10 {
            let ceiling = exponential(attempt, BASE, MAX);
            let samples: Vec<Duration> = (0..500)
                .map(|_| task_backoff(attempt, BASE, MAX, &mut rng))
                .collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter: delays land in both halves of the range.
            assert!(samples.iter().any(|d| *d < ceiling / 2));
            assert!(samples.iter().any(|d| *d > ceiling / 2));
        }
    }

    #[test]
    fn service_backoff_doubles_caps_and_resets() {
        let mut b = Backoff::service();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_sleeps_between_tries_and_gives_up() {
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let res: Result<(), &str> = retry("test op", || {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err("down") }
        })
        .await;
        assert_eq!(res, Err("down"));
        assert_eq!(calls.load(Ordering::Relaxed), SERVICE_TRIES);
        // Paused time advances exactly by the sleeps: 100+200+400+800 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_returns_the_first_success() {
        let calls = AtomicU32::new(0);
        let res: Result<u32, &str> = retry("test op", || {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move { if n < 2 { Err("down") } else { Ok(n) } }
        })
        .await;
        assert_eq!(res, Ok(2));
    }
}
