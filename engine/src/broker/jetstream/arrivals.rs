//! Which bands have had tasks published to them since they were last
//! pulled, so an idle worker sleeps until there is work and then pulls only
//! where the work is.
//!
//! The task stream republishes the headers of every message it stores to
//! `<subject_prefix>.stored.<band>` (`republish` in
//! `broker-config/nats/stream-tasks.json`). Announcements come after the
//! message is stored, so the pull they trigger finds it, and they are
//! outside the stream's subjects, so while the stream is missing a publish
//! still gets "no responders" and the publisher repairs the stream.
//!
//! Each band is either *listened to* or *busy*:
//!
//! - A listened band has a subscription to its announcements, and a
//!   background task marks it dirty on each one. It is pulled only when
//!   dirty. This is the state of a band that the worker keeps finding empty:
//!   an idle worker costs nothing, and the subscription survives idle
//!   periods, so going idle and waking again costs no subscribe and
//!   unsubscribe.
//! - A band whose pulls have come back with work for [`BUSY_AFTER`], with no
//!   wait for work in between, stops listening: it is pulled on every pass
//!   anyway (so the worker does not wait while it is busy), and its
//!   announcements (one message per stored task and worker) would only cost
//!   the server and the worker. The first pull that finds it empty makes it
//!   listened again; the band is then pulled once more, because a task
//!   stored before the server took the subscription would not be announced.
//!
//! What nobody announces (a redelivery after a nak or an expired lease, a
//! store missed while disconnected, a stream created without `republish`) is
//! found by a full pass over every band at least once per
//! [`FULL_PASS_EVERY`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{BrokerError, PriorityBand};

use super::unavailable;

/// The longest a band goes without a pull while its worker waits for work.
pub(super) const FULL_PASS_EVERY: Duration = Duration::from_secs(1);

/// How long a band's pulls must keep finding work, with no wait for work in
/// between, before it stops listening to its announcements.
pub(super) const BUSY_AFTER: Duration = Duration::from_millis(100);

/// One band as [`Arrivals`] sees it.
struct Band {
    band: PriorityBand,
    /// Where the stream announces the band's stored tasks.
    subject: String,
    /// Announced since its last pull, or marked for another pull.
    dirty: AtomicBool,
    /// The band's state; the guard stops its announcement watcher.
    state: Mutex<BandState>,
}

#[derive(Default)]
struct BandState {
    /// Present while the band is listened to.
    listening: Option<DropGuard>,
    /// Since when every pull of the band has found work.
    busy_since: Option<Instant>,
}

/// The dirty bands of one broker, kept current by background tasks.
pub(super) struct Arrivals {
    client: async_nats::Client,
    /// In pull order.
    bands: Vec<Band>,
    notify: Notify,
    /// When the next full pass is due.
    next_full_pass: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Arrivals {
    /// Starts listening to every band's announcements: `subjects` holds each
    /// band's announcement subject, in pull order. Every band starts dirty:
    /// nothing is known yet.
    ///
    /// # Errors
    /// When a subscription cannot be made.
    pub(super) async fn start(
        client: async_nats::Client,
        subjects: Vec<(PriorityBand, String)>,
    ) -> Result<Arc<Self>, BrokerError> {
        let arrivals = Arc::new(Self {
            client,
            bands: subjects
                .into_iter()
                .map(|(band, subject)| Band {
                    band,
                    subject,
                    dirty: AtomicBool::new(true),
                    state: Mutex::default(),
                })
                .collect(),
            notify: Notify::new(),
            next_full_pass: Mutex::new(Instant::now() + FULL_PASS_EVERY),
        });
        for index in 0..arrivals.bands.len() {
            arrivals.listen(index).await?;
        }
        Ok(arrivals)
    }

    /// Subscribes to band `index`'s announcements, unless that is done.
    async fn listen(self: &Arc<Self>, index: usize) -> Result<(), BrokerError> {
        let band = &self.bands[index];
        if lock(&band.state).listening.is_some() {
            return Ok(());
        }
        let subscriber = self
            .client
            .subscribe(band.subject.clone())
            .await
            .map_err(|e| unavailable("cannot subscribe for arrivals", e))?;
        let stop = CancellationToken::new();
        let mut state = lock(&band.state);
        if state.listening.is_some() {
            return Ok(()); // another pull got there first; this one is dropped
        }
        state.listening = Some(stop.clone().drop_guard());
        drop(state);
        tokio::spawn(watch(subscriber, Arc::downgrade(self), index, stop));
        Ok(())
    }

    fn next_full_pass(&self) -> MutexGuard<'_, Instant> {
        lock(&self.next_full_pass)
    }

    /// The bands to pull now, in pull order, each marked clean: the dirty
    /// ones and the busy ones (nobody announces their tasks), or every band
    /// when a full pass is due.
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
            .filter(|b| {
                b.dirty.swap(false, Ordering::AcqRel) | full | lock(&b.state).listening.is_none()
            })
            .map(|b| b.band)
            .collect()
    }

    /// Marks bands dirty again (a pull that filled its batch may have left
    /// more behind, a failed pull must be tried again).
    pub(super) fn mark(&self, bands: &[PriorityBand]) {
        for b in self.bands.iter().filter(|b| bands.contains(&b.band)) {
            b.dirty.store(true, Ordering::Release);
        }
    }

    /// Takes note of what a pull of `band` brought: a band that keeps
    /// bringing work stops listening, an empty one listens again (and is
    /// pulled once more, see the module documentation).
    ///
    /// # Errors
    /// When the subscription of a band that came back empty cannot be made;
    /// the band stays busy, so it is still pulled on every pass.
    pub(super) async fn pulled(
        self: &Arc<Self>,
        band: PriorityBand,
        got: usize,
    ) -> Result<(), BrokerError> {
        let Some(index) = self.bands.iter().position(|b| b.band == band) else {
            return Ok(());
        };
        let b = &self.bands[index];
        let listening = {
            let mut state = lock(&b.state);
            if got > 0 {
                let now = Instant::now();
                let since = *state.busy_since.get_or_insert(now);
                if now.duration_since(since) >= BUSY_AFTER && state.listening.is_some() {
                    tracing::debug!(
                        band = band.as_str(),
                        "band busy; not listening to its announcements"
                    );
                    state.listening = None;
                }
                return Ok(());
            }
            state.busy_since = None;
            state.listening.is_some()
        };
        if !listening {
            self.listen(index).await?;
            tracing::debug!(
                band = band.as_str(),
                "band empty; listening to its announcements"
            );
            b.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Waits until a band is announced or the next full pass is due.
    ///
    /// A worker that waits has found nothing to pull: whatever busy time its
    /// bands had ends here. (A worker that takes each task as it is announced
    /// never pulls a band empty, but it waits between tasks, and must keep
    /// listening.)
    pub(super) async fn wait(&self) {
        for b in &self.bands {
            lock(&b.state).busy_since = None;
        }
        let deadline = *self.next_full_pass();
        let _ = tokio::time::timeout_at(deadline, self.notify.notified()).await;
    }
}

/// Marks band `index` dirty on every announcement until `stop` (the band
/// stopped listening), or until the broker is gone.
async fn watch(
    mut subscriber: async_nats::Subscriber,
    arrivals: Weak<Arrivals>,
    index: usize,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = subscriber.next() => message,
        };
        if message.is_none() {
            return; // the client closed
        }
        let Some(arrivals) = arrivals.upgrade() else {
            return;
        };
        arrivals.bands[index].dirty.store(true, Ordering::Release);
        arrivals.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use claudecluster_testkit::services;

    use super::*;

    fn listening(arrivals: &Arrivals) -> bool {
        lock(&arrivals.bands[0].state).listening.is_some()
    }

    /// Messages the client has received so far.
    fn received(client: &async_nats::Client) -> u64 {
        client
            .statistics()
            .in_messages
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn announce(publisher: &async_nats::Client, subject: &str, arrivals: &Arrivals) {
        publisher
            .publish(subject.to_owned(), bytes::Bytes::new())
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), arrivals.wait())
            .await
            .expect("the announcement wakes the waiter");
    }

    #[tokio::test]
    async fn a_busy_band_stops_listening_until_a_pull_finds_it_empty() {
        let worker = async_nats::connect(services::nats_url()).await.unwrap();
        let publisher = async_nats::connect(services::nats_url()).await.unwrap();
        let subject = services::unique("arrivals.stored.");
        let arrivals = Arrivals::start(
            worker.clone(),
            vec![(PriorityBand::Normal, subject.clone())],
        )
        .await
        .unwrap();
        let normal = [PriorityBand::Normal];

        // Listened to: pulled only when announced.
        assert_eq!(arrivals.take_due(), normal, "every band starts dirty");
        assert!(arrivals.take_due().is_empty());
        worker.flush().await.unwrap(); // the subscription is in place
        announce(&publisher, &subject, &arrivals).await;
        assert_eq!(arrivals.take_due(), normal);
        assert!(arrivals.take_due().is_empty());

        // Pulls that keep finding work for BUSY_AFTER: no more listening,
        // and the band is due on every pass.
        arrivals.pulled(PriorityBand::Normal, 8).await.unwrap();
        assert!(listening(&arrivals), "busy, but not for long yet");
        tokio::time::sleep(BUSY_AFTER + Duration::from_millis(20)).await;
        arrivals.pulled(PriorityBand::Normal, 8).await.unwrap();
        assert!(!listening(&arrivals));
        assert_eq!(arrivals.take_due(), normal);
        assert_eq!(arrivals.take_due(), normal);
        // The server no longer sends the announcements.
        worker.flush().await.unwrap();
        let before = received(&worker);
        for _ in 0..10 {
            publisher
                .publish(subject.clone(), bytes::Bytes::new())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        worker.flush().await.unwrap();
        assert_eq!(received(&worker), before, "announcements of a busy band");

        // The first empty pull listens again, and asks for one more pull
        // for what was stored before the subscription took.
        arrivals.pulled(PriorityBand::Normal, 0).await.unwrap();
        assert!(listening(&arrivals));
        assert_eq!(arrivals.take_due(), normal);
        assert!(arrivals.take_due().is_empty());
        worker.flush().await.unwrap();
        announce(&publisher, &subject, &arrivals).await;
        assert_eq!(arrivals.take_due(), normal);

        // A wait for work in between starts the busy time again: a worker
        // that is woken for each task never pulls the band empty.
        arrivals.pulled(PriorityBand::Normal, 1).await.unwrap();
        tokio::time::sleep(BUSY_AFTER + Duration::from_millis(20)).await;
        let _ = tokio::time::timeout(Duration::from_millis(10), arrivals.wait()).await;
        arrivals.pulled(PriorityBand::Normal, 1).await.unwrap();
        assert!(listening(&arrivals));

        // So does a single empty pull.
        arrivals.pulled(PriorityBand::Normal, 8).await.unwrap();
        tokio::time::sleep(BUSY_AFTER + Duration::from_millis(20)).await;
        arrivals.pulled(PriorityBand::Normal, 0).await.unwrap();
        arrivals.pulled(PriorityBand::Normal, 8).await.unwrap();
        assert!(listening(&arrivals));
    }
}
