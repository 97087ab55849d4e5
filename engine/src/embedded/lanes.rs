//! The in-memory view of the embedded queue: which messages are ready in
//! which band, which are leased to a worker until when, and which wait for a
//! nak delay to pass.
//!
//! The database is the record of what is queued; this view is rebuilt from
//! it at start-up (with every lease considered expired, since the process
//! that held it is gone) and kept in step by the queue after each commit.
//! Keeping it in memory lets a worker take the next message without reading
//! the whole queue, and lets a lease expire without a write.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::broker::PriorityBand;

/// One message the view knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Its band.
    pub band: PriorityBand,
    /// Deliveries so far.
    pub deliveries: u32,
    status: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Deliverable now.
    Ready,
    /// Deliverable from the given time (a nak with a delay).
    Waiting(Instant),
    /// Held by a worker until the given time; `token` names the delivery.
    Leased { until: Instant, token: u64 },
}

/// A message just handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// Its sequence number.
    pub seq: u64,
    /// Its band.
    pub band: PriorityBand,
    /// Deliveries including this one.
    pub deliveries: u32,
    /// Names this delivery: a stale delivery (whose lease expired and whose
    /// message went to someone else) cannot extend or release the new one.
    pub token: u64,
}

/// The queue's state in memory.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    ready: [BTreeSet<u64>; 3],
    entries: HashMap<u64, Entry>,
    timers: BTreeSet<(Instant, u64)>,
    leased: usize,
    next_token: u64,
}

/// The lane index of a band.
fn lane(band: PriorityBand) -> usize {
    match band {
        PriorityBand::High => 0,
        PriorityBand::Normal => 1,
        PriorityBand::Low => 2,
    }
}

impl Lanes {
    /// Adds a message, deliverable from `visible_at` (now when `None`).
    pub(crate) fn insert(
        &mut self,
        seq: u64,
        band: PriorityBand,
        deliveries: u32,
        visible_at: Option<Instant>,
    ) {
        let status = visible_at.map_or(Status::Ready, Status::Waiting);
        let entry = Entry {
            band,
            deliveries,
            status,
        };
        if let Some(old) = self.entries.insert(seq, entry) {
            self.unlink(seq, old);
        }
        self.link(seq, entry);
    }

    /// Makes every message whose lease or delay has passed deliverable.
    pub(crate) fn promote_due(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.timers.first() {
            if at > now {
                break;
            }
            self.set_status(seq, Status::Ready);
        }
    }

    /// Leases up to `max` ready messages, highest band first and oldest
    /// first within a band, until `now + lease`.
    pub(crate) fn take(&mut self, max: usize, now: Instant, lease: Duration) -> Vec<Lease> {
        self.promote_due(now);
        let until = now + lease;
        let mut taken = Vec::new();
        for band in PriorityBand::PULL_ORDER {
            while taken.len() < max {
                let Some(&seq) = self.ready[lane(band)].first() else {
                    break;
                };
                self.next_token += 1;
                let token = self.next_token;
                self.set_status(seq, Status::Leased { until, token });
                let deliveries = self.entries.get_mut(&seq).map_or(1, |entry| {
                    entry.deliveries = entry.deliveries.saturating_add(1);
                    entry.deliveries
                });
                taken.push(Lease {
                    seq,
                    band,
                    deliveries,
                    token,
                });
            }
        }
        taken
    }

    /// The earliest time a lease or a delay ends.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|&(at, _)| at)
    }

    /// Messages not held by a worker: ready or waiting out a delay.
    pub(crate) fn waiting(&self) -> usize {
        self.entries.len() - self.leased
    }

    /// Whether delivery `token` still holds `seq`.
    pub(crate) fn holds(&self, seq: u64, token: u64) -> bool {
        matches!(
            self.entries.get(&seq),
            Some(Entry { status: Status::Leased { token: t, .. }, .. }) if *t == token
        )
    }

    /// Extends the lease of delivery `token` to `until`; `false` when it no
    /// longer holds the message.
    pub(crate) fn extend(&mut self, seq: u64, token: u64, until: Instant) -> bool {
        if !self.holds(seq, token) {
            return false;
        }
        self.set_status(seq, Status::Leased { until, token });
        true
    }

    /// Gives the message of delivery `token` back, deliverable from
    /// `visible_at` (now when `None`); `false` when it no longer holds it.
    pub(crate) fn release(&mut self, seq: u64, token: u64, visible_at: Option<Instant>) -> bool {
        if !self.holds(seq, token) {
            return false;
        }
        self.set_status(seq, visible_at.map_or(Status::Ready, Status::Waiting));
        true
    }

    /// Forgets a message (acked or terminated), returning it so a failed
    /// write can [`Self::restore`] it.
    pub(crate) fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        self.unlink(seq, entry);
        Some(entry)
    }

    /// Puts back a message taken out by [`Self::remove`].
    pub(crate) fn restore(&mut self, seq: u64, entry: Entry) {
        if let Some(old) = self.entries.insert(seq, entry) {
            self.unlink(seq, old);
        }
        self.link(seq, entry);
    }

    fn set_status(&mut self, seq: u64, status: Status) {
        let Some(entry) = self.entries.get(&seq).copied() else {
            return;
        };
        self.unlink(seq, entry);
        let entry = Entry { status, ..entry };
        self.entries.insert(seq, entry);
        self.link(seq, entry);
    }

    /// Removes `seq` from the ready set or timer set `entry` puts it in.
    fn unlink(&mut self, seq: u64, entry: Entry) {
        match entry.status {
            Status::Ready => {
                self.ready[lane(entry.band)].remove(&seq);
            }
            Status::Waiting(at) => {
                self.timers.remove(&(at, seq));
            }
            Status::Leased { until, .. } => {
                self.timers.remove(&(until, seq));
                self.leased -= 1;
            }
        }
    }

    /// Adds `seq` to the ready set or timer set `entry` calls for.
    fn link(&mut self, seq: u64, entry: Entry) {
        match entry.status {
            Status::Ready => {
                self.ready[lane(entry.band)].insert(seq);
            }
            Status::Waiting(at) => {
                self.timers.insert((at, seq));
            }
            Status::Leased { until, .. } => {
                self.timers.insert((until, seq));
                self.leased += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    fn seqs(leases: &[Lease]) -> Vec<u64> {
        leases.iter().map(|l| l.seq).collect()
    }

    #[test]
    fn takes_highest_band_first_then_oldest() {
        let mut lanes = Lanes::default();
        lanes.insert(1, PriorityBand::Low, 0, None);
        lanes.insert(2, PriorityBand::Normal, 0, None);
        lanes.insert(3, PriorityBand::High, 0, None);
        lanes.insert(4, PriorityBand::Normal, 0, None);
        let now = Instant::now();
        assert_eq!(seqs(&lanes.take(3, now, LEASE)), [3, 2, 4]);
        assert_eq!(seqs(&lanes.take(3, now, LEASE)), [1]);
        assert!(lanes.take(3, now, LEASE).is_empty());
        assert_eq!(lanes.waiting(), 0);
    }

    #[test]
    fn an_expired_lease_comes_back_with_a_higher_count() {
        let mut lanes = Lanes::default();
        lanes.insert(7, PriorityBand::Normal, 0, None);
        let now = Instant::now();
        let first = lanes.take(1, now, LEASE)[0];
        assert_eq!(first.deliveries, 1);
        assert!(lanes.take(1, now + LEASE / 2, LEASE).is_empty());
        assert_eq!(lanes.next_deadline(), Some(now + LEASE));
        let second = lanes.take(1, now + LEASE, LEASE)[0];
        assert_eq!((second.seq, second.deliveries), (7, 2));
        // The first delivery lost its lease: it can neither extend nor
        // release the second.
        assert!(!lanes.extend(7, first.token, now + LEASE * 3));
        assert!(!lanes.release(7, first.token, None));
        assert!(lanes.holds(7, second.token));
    }

    #[test]
    fn progress_extends_and_nak_delays() {
        let mut lanes = Lanes::default();
        lanes.insert(1, PriorityBand::High, 0, None);
        let now = Instant::now();
        let lease = lanes.take(1, now, LEASE)[0];
        assert!(lanes.extend(1, lease.token, now + LEASE * 2));
        assert!(lanes.take(1, now + LEASE, LEASE).is_empty());
        let later = now + Duration::from_secs(5);
        assert!(lanes.release(1, lease.token, Some(later)));
        assert_eq!(lanes.waiting(), 1);
        assert!(lanes.take(1, now, LEASE).is_empty());
        assert_eq!(seqs(&lanes.take(1, later, LEASE)), [1]);
    }

    #[test]
    fn remove_and_restore_round_trip() {
        let mut lanes = Lanes::default();
        lanes.insert(1, PriorityBand::Low, 4, None);
        let now = Instant::now();
        let lease = lanes.take(1, now, LEASE)[0];
        let entry = lanes.remove(1).unwrap();
        assert_eq!(lanes.next_deadline(), None);
        assert_eq!(lanes.remove(1), None);
        lanes.restore(1, entry);
        assert!(lanes.holds(1, lease.token));
        assert_eq!(lanes.next_deadline(), Some(now + LEASE));
        assert_eq!(lanes.waiting(), 0);
    }
}
