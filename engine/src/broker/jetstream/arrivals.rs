//! Which bands have had tasks published to them since they were last
//! pulled, so an idle worker sleeps until there is work and then pulls only
//! where the work is.
//!
//! The task stream republishes the headers of every message it stores to
//! `<subject_prefix>.stored.<band>` (`republish` in
//! `broker-config/nats/stream-tasks.json`). A background task subscribes
//! there and marks the band of each announcement dirty. Announcements come
//! after the message is stored, so the pull they trigger finds it, and they
//! are outside the stream's subjects, so while the stream is missing a
//! publish still gets "no responders" and the publisher repairs the stream.
//! The subscription lives as long as the broker once the first pull starts
//! it: a worker that goes idle and wakes up again costs no subscribe and
//! unsubscribe, and a worker never pulls a band it knows to be empty. What
//! nobody announces (a redelivery after a nak or an expired lease, a store
//! missed while disconnected, a stream created without `republish`) is found
//! by a full pass over every band at least once per [`FULL_PASS_EVERY`].
//!
//! Every worker process receives every announcement (headers only, about a
//! hundred bytes), busy or not: one more message per task and worker for the
//! server to send.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::PriorityBand;

/// The longest a band goes without a pull while its worker waits for work.
pub(super) const FULL_PASS_EVERY: Duration = Duration::from_secs(1);

/// One band as [`Arrivals`] sees it.
struct Band {
    band: PriorityBand,
    /// Where the stream announces the band's stored tasks.
    subject: String,
    /// Announced since its last pull.
    dirty: AtomicBool,
}

/// The dirty bands of one broker, kept current by a background task.
pub(super) struct Arrivals {
    /// In pull order.
    bands: Vec<Band>,
    notify: Notify,
    /// When the next full pass is due.
    next_full_pass: Mutex<Instant>,
    /// Stops the background task when the broker goes.
    _stop: DropGuard,
}

impl Arrivals {
    /// Starts watching `subjects`, each band's announcement subject in pull
    /// order, through `subscriber`. Every band starts dirty: nothing is known yet.
    pub(super) fn start(
        subscriber: async_nats::Subscriber,
        subjects: Vec<(PriorityBand, String)>,
    ) -> std::sync::Arc<Self> {
        let stop = CancellationToken::new();
        let arrivals = std::sync::Arc::new(Self {
            bands: subjects
                .into_iter()
                .map(|(band, subject)| Band {
                    band,
                    subject,
                    dirty: AtomicBool::new(true),
                })
                .collect(),
            notify: Notify::new(),
            next_full_pass: Mutex::new(Instant::now() + FULL_PASS_EVERY),
            _stop: stop.clone().drop_guard(),
        });
        let weak = std::sync::Arc::downgrade(&arrivals);
        tokio::spawn(watch(subscriber, weak, stop));
        arrivals
    }

    fn next_full_pass(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.next_full_pass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The bands to pull now, in pull order, each marked clean: the dirty
    /// ones, or every band when a full pass is due.
    pub(super) fn take_due(&self) -> Vec<PriorityBand> {
        let now = Instant::now();
        let full = {
            let mut next = self.next_full_pass();
            let due = now >= *next;
            if due {
                *next = now + FULL_PASS_EVERY;
            }
            due
        };
        self.bands
            .iter()
            // Cleared even on a full pass: the pull about to go out covers
            // every store announced so far.
            .filter(|b| b.dirty.swap(false, Ordering::AcqRel) | full)
            .map(|b| b.band)
            .collect()
    }

    /// Marks bands dirty again (a pull that filled its batch may have left
    /// more behind).
    pub(super) fn mark(&self, bands: &[PriorityBand]) {
        for b in self.bands.iter().filter(|b| bands.contains(&b.band)) {
            b.dirty.store(true, Ordering::Release);
        }
    }

    /// Waits until a band is announced or the next full pass is due.
    pub(super) async fn wait(&self) {
        let deadline = *self.next_full_pass();
        let _ = tokio::time::timeout_at(deadline, self.notify.notified()).await;
    }
}

/// Marks the band of every announcement dirty until `stop`, or until the
/// broker is gone.
async fn watch(
    mut subscriber: async_nats::Subscriber,
    arrivals: std::sync::Weak<Arrivals>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = subscriber.next() => message,
        };
        let Some(message) = message else {
            return; // the client closed
        };
        let Some(arrivals) = arrivals.upgrade() else {
            return;
        };
        if let Some(b) = arrivals
            .bands
            .iter()
            .find(|b| b.subject == message.subject.as_str())
        {
            b.dirty.store(true, Ordering::Release);
            arrivals.notify.notify_one();
        }
    }
}
