//! Latency histograms (HDR, microsecond resolution) and their summaries.
//!
//! An HDR histogram keeps every percentile to three significant digits in a
//! fixed few kilobytes, so recording costs a few nanoseconds and nothing is
//! sampled away, not even the maximum.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Longest latency recorded exactly; longer ones are clamped to it.
const MAX_TRACKED: Duration = Duration::from_secs(3600);

/// Latencies of one kind (submit, queue wait, end to end).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    inner: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram from 1 µs to one hour, three significant digits.
    pub fn new() -> Self {
        let high = u64::try_from(MAX_TRACKED.as_micros()).unwrap_or(u64::MAX);
        // The bounds are constants that satisfy hdrhistogram's rules
        // (low >= 1, high >= 2 * low, sigfig <= 5), so this cannot fail.
        let inner = Histogram::new_with_bounds(1, high, 3).expect("valid histogram bounds");
        Self { inner }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, self.inner.high());
        self.inner.saturating_record(micros);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Both have the same bounds, so adding cannot go out of range.
        let _ = self.inner.add(&other.inner);
    }

    /// Values recorded.
    pub fn len(&self) -> u64 {
        self.inner.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The percentiles reports show.
    pub fn summary(&self) -> LatencySummary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if self.inner.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.inner.len(),
            mean_ms: self.inner.mean() / 1000.0,
            p50_ms: ms(self.inner.value_at_quantile(0.50)),
            p90_ms: ms(self.inner.value_at_quantile(0.90)),
            p99_ms: ms(self.inner.value_at_quantile(0.99)),
            p999_ms: ms(self.inner.value_at_quantile(0.999)),
            max_ms: ms(self.inner.max()),
        }
    }
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest value.
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_recorded_values() {
        let mut h = LatencyHistogram::new();
        for micros in 1..=1000u64 {
            h.record(Duration::from_micros(micros));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 1.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(10 * 3600));
        assert_eq!(h.len(), 2);
        assert!(h.summary().max_ms >= 3_599_000.0);
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(3));
        a.merge(&b);
        assert_eq!(a.len(), 2);
        assert!(LatencyHistogram::new().is_empty());
        assert_eq!(LatencyHistogram::new().summary(), LatencySummary::default());
    }
}
