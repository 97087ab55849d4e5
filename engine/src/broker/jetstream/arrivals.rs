//! How a worker learns that a band has work without polling it: a *watch*,
//! a pull of one message parked on the server, per band that was last
//! found empty.
//!
//! A watch is a pull request without `no_wait`: the server holds it until a
//! message comes for the band (new, or back after a nak or an expired
//! lease), and delivers that message straight to the worker. So an idle
//! worker costs nothing until work arrives, and the work arrives with the
//! news of it, without a second round trip to fetch it. Each band's watches
//! answer to an inbox of their own, which a background task reads:
//!
//! - A delivery is *held* for the next [`Arrivals::take_held`] and wakes the
//!   waiting worker. When the delivery says more messages are pending, the
//!   band is marked dirty, so the next pass pulls the rest in one batch.
//! - The server ends an unfulfilled watch after [`WATCH_EXPIRES`] with a
//!   status; the worker is woken to park a new one.
//! - A watch the server refuses (the consumer's `max_waiting` is reached)
//!   or ends for another reason (the consumer was deleted) marks the band
//!   dirty, and the band is not watched again for [`FULL_PASS_EVERY`]:
//!   parking at once would be refused again, in a loop.
//!
//! A band is watched when it is neither dirty nor watched already: after
//! each pass (a band whose pull came back short is empty now), and before
//! the worker waits, and only while the worker has a free permit. A band
//! that keeps filling its pulls is marked dirty by the caller and pulled on
//! every pass instead.
//!
//! Watches on three bands can bring more messages than the worker has free
//! permits, and pulls may fill the worker after a watch was parked: such a
//! delivery is held until the next pass (the worker calls for one as soon as
//! a permit frees up). It is handed back to the queue (nak) only if no pass
//! takes it within the hold time, half the lease and at most [`MAX_HOLD`]:
//! long enough that a task is not passed from one full worker to the next
//! (each hand-back counts a delivery against the consumer's
//! `max_deliver`), short enough that an idle worker elsewhere gets it soon.
//!
//! Why not have the stream announce each stored message (`republish`) and
//! pull on the announcement: with message ids on the stream, announcing
//! costs the server about as much CPU per task as storing it
//! (`claudecluster-rawbench --msg-ids --republish`), and each wake-up would
//! take a second round trip for the pull.
//!
//! A watch the server forgot (a restart) is given up [`WATCH_LOST_AFTER`]
//! after it was parked; until then, and for anything else missed, a full
//! pass over every band at least once per [`FULL_PASS_EVERY`] finds it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_nats::StatusCode;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{BrokerError, PriorityBand};

use super::unavailable;

/// The longest a band goes without a pull while its worker waits for work.
pub(super) const FULL_PASS_EVERY: Duration = Duration::from_secs(1);

/// How long the server keeps a watch parked.
pub(super) const WATCH_EXPIRES: Duration = Duration::from_secs(20);

/// How long after its expiry a watch that neither delivered nor ended is
/// taken as lost.
const WATCH_LOST_AFTER: Duration = Duration::from_secs(5);

/// The longest a delivery to a watch waits for a pass to take it before it
/// is handed back to the queue.
pub(super) const MAX_HOLD: Duration = Duration::from_secs(5);

/// One band as [`Arrivals`] sees it.
struct Band {
    band: PriorityBand,
    consumer: PullConsumer,
    /// The band's watch inbox: watch `n` answers to `<prefix>.<n>`.
    prefix: String,
    /// May hold work: pull it on the next pass.
    dirty: AtomicBool,
    state: Mutex<BandState>,
}

#[derive(Default)]
struct BandState {
    /// The number of the last watch sent.
    sent: u64,
    /// The watch parked now, and when it was sent.
    parked: Option<(u64, Instant)>,
    /// No watch before this: the server refused or ended the last one
    /// (too many waiting pulls, a consumer deleted), and parking again at
    /// once would only be refused again, in a loop.
    refused_until: Option<Instant>,
    /// Deliveries to watches not handed out yet, oldest first, with when
    /// they came.
    held: VecDeque<(Instant, async_nats::Message)>,
}

/// The watches of one broker's bands, and the deliveries they brought.
pub(super) struct Arrivals {
    js: jetstream::Context,
    /// In pull order.
    bands: Vec<Band>,
    notify: Notify,
    /// When the next full pass is due.
    next_full_pass: Mutex<Instant>,
    /// How long the server keeps a watch ([`WATCH_EXPIRES`]).
    watch_expires: Duration,
    /// How long a delivery is held before it is handed back.
    hold: Duration,
    /// Stops the inbox readers when the broker goes.
    _stop: DropGuard,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Arrivals {
    /// Opens a watch inbox for every band (`lanes`, in pull order). Every
    /// band starts dirty: nothing is known yet, and the first pass parks
    /// the watches. `lease` is the consumers' ack wait.
    ///
    /// # Errors
    /// When an inbox cannot be subscribed to.
    pub(super) async fn start(
        client: &async_nats::Client,
        js: jetstream::Context,
        lanes: Vec<(PriorityBand, PullConsumer)>,
        lease: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        Self::start_with(client, js, lanes, WATCH_EXPIRES, (lease / 2).min(MAX_HOLD)).await
    }

    async fn start_with(
        client: &async_nats::Client,
        js: jetstream::Context,
        lanes: Vec<(PriorityBand, PullConsumer)>,
        watch_expires: Duration,
        hold: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        let stop = CancellationToken::new();
        let mut bands = Vec::with_capacity(lanes.len());
        let mut inboxes = Vec::with_capacity(lanes.len());
        for (band, consumer) in lanes {
            let prefix = client.new_inbox();
            let inbox = client
                .subscribe(format!("{prefix}.*"))
                .await
                .map_err(|e| unavailable("cannot subscribe for watches", e))?;
            inboxes.push(inbox);
            bands.push(Band {
                band,
                consumer,
                prefix,
                dirty: AtomicBool::new(true),
                state: Mutex::default(),
            });
        }
        let arrivals = Arc::new(Self {
            js,
            bands,
            notify: Notify::new(),
            next_full_pass: Mutex::new(Instant::now() + FULL_PASS_EVERY),
            watch_expires,
            hold,
            _stop: stop.clone().drop_guard(),
        });
        for (index, inbox) in inboxes.into_iter().enumerate() {
            tokio::spawn(read_inbox(
                inbox,
                Arc::downgrade(&arrivals),
                index,
                stop.clone(),
            ));
        }
        Ok(arrivals)
    }

    /// Up to `max` held deliveries, highest band first.
    pub(super) fn take_held(&self, max: usize) -> Vec<(PriorityBand, async_nats::Message)> {
        let mut out = Vec::new();
        for b in &self.bands {
            if out.len() >= max {
                break;
            }
            let mut state = lock(&b.state);
            while out.len() < max {
                let Some((_, message)) = state.held.pop_front() else {
                    break;
                };
                out.push((b.band, message));
            }
        }
        out
    }

    /// The bands to pull now, in pull order, each marked clean: the dirty
    /// ones, or every band when a full pass is due.
    pub(super) fn take_due(&self) -> Vec<PriorityBand> {
        let now = Instant::now();
        let full = {
            let mut next = lock(&self.next_full_pass);
            let due = now >= *next;
            if due {
                *next = now + FULL_PASS_EVERY;
            }
            due
        };
        self.bands
            .iter()
            // Cleared even on a full pass: the pull about to go out covers
            // everything known so far.
            .filter(|b| b.dirty.swap(false, Ordering::AcqRel) | full)
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

    /// Parks a watch on every band that is neither dirty nor watched.
    ///
    /// # Errors
    /// When a watch cannot be sent; the band is marked dirty, so the next
    /// pass pulls it (and reports the trouble).
    pub(super) async fn watch_idle(&self) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut result = Ok(());
        for b in &self.bands {
            if b.dirty.load(Ordering::Acquire) {
                continue;
            }
            let reply = {
                let mut state = lock(&b.state);
                match state.parked {
                    Some((_, since))
                        if now.duration_since(since) < self.watch_expires + WATCH_LOST_AFTER =>
                    {
                        continue;
                    }
                    _ => {}
                }
                if state.refused_until.is_some_and(|until| now < until) {
                    continue;
                }
                state.sent += 1;
                state.parked = Some((state.sent, now));
                format!("{}.{}", b.prefix, state.sent)
            };
            let watch = BatchConfig {
                batch: 1,
                expires: Some(self.watch_expires),
                ..BatchConfig::default()
            };
            if let Err(e) = b.consumer.request_batch(watch, reply.into()).await {
                lock(&b.state).parked = None;
                b.dirty.store(true, Ordering::Release);
                result = Err(unavailable("cannot park a watch", e));
            }
        }
        result
    }

    /// Parks the watches, then waits until a watch delivers or expires, or
    /// the next full pass is due.
    pub(super) async fn wait(&self) {
        if let Err(e) = self.watch_idle().await {
            tracing::warn!(error = %e, "cannot watch for arrivals");
        }
        let deadline = *lock(&self.next_full_pass);
        let _ = tokio::time::timeout_at(deadline, self.notify.notified()).await;
    }

    /// Takes one message from band `index`'s watch inbox.
    fn received(&self, index: usize, message: async_nats::Message) {
        let b = &self.bands[index];
        match message.status {
            None | Some(StatusCode::OK) => {
                let delivery = jetstream::Message {
                    message,
                    context: self.js.clone(),
                };
                let more = delivery.info().is_ok_and(|info| info.pending > 0);
                let mut state = lock(&b.state);
                // A watch brings one message: whichever was parked is done.
                // (Were two parked, the other one's delivery is simply held
                // too.)
                state.parked = None;
                state.held.push_back((Instant::now(), delivery.message));
                drop(state);
                if more {
                    b.dirty.store(true, Ordering::Release);
                }
                self.notify.notify_one();
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {}
            Some(status) => {
                let mut state = lock(&b.state);
                let current = state
                    .parked
                    .is_some_and(|(n, _)| message.subject.as_str() == format!("{}.{n}", b.prefix));
                if !current {
                    return; // the end of a watch already given up
                }
                state.parked = None;
                if status != StatusCode::TIMEOUT {
                    // The full pass still covers the band meanwhile.
                    state.refused_until = Some(Instant::now() + FULL_PASS_EVERY);
                }
                drop(state);
                if status != StatusCode::TIMEOUT {
                    // The consumer went away, or the server refused the
                    // watch (too many waiting pulls): a pull finds out
                    // which, and repairs.
                    tracing::debug!(
                        band = b.band.as_str(),
                        %status,
                        reason = ?message.description,
                        "watch ended"
                    );
                    b.dirty.store(true, Ordering::Release);
                }
                // Woken, the worker parks a new watch or pulls.
                self.notify.notify_one();
            }
        }
    }

    /// When band `index`'s oldest held delivery is due to be handed back.
    fn hold_deadline(&self, index: usize) -> Option<Instant> {
        lock(&self.bands[index].state)
            .held
            .front()
            .map(|(at, _)| *at + self.hold)
    }

    /// Hands back band `index`'s deliveries held for the hold time or longer.
    async fn hand_back_stale(&self, index: usize) {
        let now = Instant::now();
        let stale: Vec<async_nats::Message> = {
            let mut state = lock(&self.bands[index].state);
            let mut stale = Vec::new();
            while state
                .held
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) >= self.hold)
            {
                if let Some((_, message)) = state.held.pop_front() {
                    stale.push(message);
                }
            }
            stale
        };
        for message in stale {
            tracing::debug!(
                band = self.bands[index].band.as_str(),
                "no room for a watched delivery; handing it back"
            );
            let message = jetstream::Message {
                message,
                context: self.js.clone(),
            };
            if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
                tracing::debug!(error = %e, "cannot hand back a watched delivery");
            }
        }
    }
}

/// Reads band `index`'s watch inbox until `stop` (the broker went) or the
/// client closes, handing back what is held too long.
async fn read_inbox(
    mut inbox: async_nats::Subscriber,
    arrivals: Weak<Arrivals>,
    index: usize,
    stop: CancellationToken,
) {
    loop {
        let deadline = arrivals.upgrade().and_then(|a| a.hold_deadline(index));
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = inbox.next() => message,
            () = sleep_until(deadline) => {
                if let Some(arrivals) = arrivals.upgrade() {
                    arrivals.hand_back_stale(index).await;
                }
                continue;
            }
        };
        let Some(message) = message else {
            return; // the client closed
        };
        let Some(arrivals) = arrivals.upgrade() else {
            return;
        };
        arrivals.received(index, message);
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::{consumer, stream};
    use claudecluster_testkit::services;

    use super::*;

    /// A short hold, so the hand-back test is quick.
    const HOLD: Duration = Duration::from_millis(300);

    /// A work-queue stream with one pull consumer, named uniquely.
    struct Queue {
        js: jetstream::Context,
        client: async_nats::Client,
        name: String,
        consumer: PullConsumer,
    }

    impl Queue {
        async fn new() -> Self {
            Self::with_max_waiting(512).await
        }

        /// At most `max_waiting` pulls parked on the consumer.
        async fn with_max_waiting(max_waiting: i64) -> Self {
            let client = async_nats::connect(services::nats_url()).await.unwrap();
            let js = jetstream::new(client.clone());
            let name = services::unique("CCARRIVALS").replace(['.', '-', ':'], "_");
            let stream = js
                .create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{name}.tasks")],
                    retention: stream::RetentionPolicy::WorkQueue,
                    ..Default::default()
                })
                .await
                .unwrap();
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some("workers".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_waiting,
                    ..Default::default()
                })
                .await
                .unwrap();
            Self {
                js,
                client,
                name,
                consumer,
            }
        }

        async fn publish(&self, body: &'static str) {
            self.js
                .publish(format!("{}.tasks", self.name), body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }

        async fn arrivals(&self) -> Arc<Arrivals> {
            self.arrivals_with(WATCH_EXPIRES, HOLD).await
        }

        async fn arrivals_with(&self, watch_expires: Duration, hold: Duration) -> Arc<Arrivals> {
            Arrivals::start_with(
                &self.client,
                self.js.clone(),
                vec![(PriorityBand::Normal, self.consumer.clone())],
                watch_expires,
                hold,
            )
            .await
            .unwrap()
        }

        /// Pull requests parked on the consumer.
        async fn parked(&mut self) -> usize {
            self.consumer.info().await.unwrap().num_waiting
        }

        async fn delete(self) {
            self.js.delete_stream(&self.name).await.unwrap();
        }
    }

    async fn ack(queue: &Queue, held: Vec<(PriorityBand, async_nats::Message)>) {
        for (_, message) in held {
            jetstream::Message {
                message,
                context: queue.js.clone(),
            }
            .ack()
            .await
            .unwrap();
        }
    }

    /// Waits until the watch inbox reports something: a delivery, or the end
    /// of a watch. (Not through `wait`, which would park another watch.)
    async fn reported(arrivals: &Arrivals) {
        tokio::time::timeout(Duration::from_secs(5), arrivals.notify.notified())
            .await
            .expect("the watch inbox reported nothing");
    }

    #[tokio::test]
    async fn a_watch_brings_the_next_message_and_says_when_more_wait() {
        let mut queue = Queue::new().await;
        let arrivals = queue.arrivals().await;
        let normal = [PriorityBand::Normal];

        assert_eq!(arrivals.take_due(), normal, "every band starts dirty");
        assert!(arrivals.take_due().is_empty());
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 1);
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 1, "one watch per band");

        // The next message comes with the watch, and nothing more is due.
        queue.publish("first").await;
        reported(&arrivals).await;
        let held = arrivals.take_held(8);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].1.payload.as_ref(), b"first");
        assert!(arrivals.take_due().is_empty(), "nothing else pending");
        ack(&queue, held).await;

        // With two waiting, the watch brings one and marks the band dirty:
        // the next pass pulls the rest.
        queue.publish("second").await;
        queue.publish("third").await;
        arrivals.watch_idle().await.unwrap();
        reported(&arrivals).await;
        let held = arrivals.take_held(8);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].1.payload.as_ref(), b"second");
        assert_eq!(arrivals.take_due(), normal);
        ack(&queue, held).await;
        queue.delete().await;
    }

    #[tokio::test]
    async fn a_delivery_nobody_takes_goes_back_to_the_queue() {
        let mut queue = Queue::new().await;
        let arrivals = queue.arrivals().await;
        arrivals.take_due();
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        queue.publish("unwanted").await;
        reported(&arrivals).await;

        // Nobody takes it: after the hold time it is handed back, and another
        // pull gets it as a second delivery.
        let mut again = queue
            .consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let message = again.next().await.unwrap().unwrap();
        assert_eq!(message.payload.as_ref(), b"unwanted");
        assert_eq!(message.info().unwrap().delivered, 2);
        message.ack().await.unwrap();
        assert!(arrivals.take_held(8).is_empty(), "handed back, not held");
        assert_eq!(queue.parked().await, 0);
        queue.delete().await;
    }

    #[tokio::test]
    async fn dirty_bands_are_not_watched() {
        let mut queue = Queue::new().await;
        let arrivals = queue.arrivals().await;
        // Still dirty: pulled on the next pass, so no watch.
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 0);
        arrivals.take_due();
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 1);
        queue.delete().await;
    }

    #[tokio::test]
    async fn an_expired_watch_wakes_the_worker_to_park_another() {
        let mut queue = Queue::new().await;
        let arrivals = queue.arrivals_with(Duration::from_millis(300), HOLD).await;
        arrivals.take_due();
        // The watch expires: its end wakes the worker (only the watch inbox
        // notifies), and the next wait parks a new one.
        arrivals.watch_idle().await.unwrap();
        reported(&arrivals).await;
        assert!(lock(&arrivals.bands[0].state).parked.is_none());
        assert!(arrivals.take_due().is_empty(), "an expiry is not work");
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 1);
        queue.publish("late").await;
        reported(&arrivals).await;
        ack(&queue, arrivals.take_held(1)).await;
        queue.delete().await;
    }

    #[tokio::test]
    async fn a_refused_watch_is_not_parked_again_at_once() {
        // Room for one waiting pull on the consumer, taken by another worker.
        let mut queue = Queue::with_max_waiting(1).await;
        let other = queue.arrivals().await;
        other.take_due();
        other.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 1);

        // This worker's watch is refused: the band is pulled (it may be the
        // consumer that is gone), and not watched again within the pause.
        let arrivals = queue.arrivals().await;
        arrivals.take_due();
        arrivals.watch_idle().await.unwrap();
        reported(&arrivals).await;
        assert_eq!(arrivals.take_due(), [PriorityBand::Normal]);
        arrivals.watch_idle().await.unwrap();
        assert!(
            lock(&arrivals.bands[0].state).parked.is_none(),
            "parked again at once"
        );
        drop(other);
        queue.delete().await;
    }
}
