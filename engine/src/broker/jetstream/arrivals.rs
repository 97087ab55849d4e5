//! Everything the server sends a worker's bands: the deliveries of its
//! pulls, and of its *watches*, which tell it that a band has work without
//! polling: a pull of one message parked on the server, per band that was
//! last found empty.
//!
//! A watch is a pull request without `no_wait`: the server holds it until a
//! message comes for the band (new, or back after a nak or an expired
//! lease), and delivers that message straight to the worker. So an idle
//! worker costs nothing until work arrives, and the work arrives with the
//! news of it, without a second round trip to fetch it. Each band's watches
//! answer to an inbox of their own, and its no-wait pulls to another; a
//! background task reads each:
//!
//! - A delivery is *held* for the next [`Arrivals::take_held`] and wakes the
//!   waiting worker. When the delivery says more messages are pending, the
//!   band is marked dirty, so the next pass pulls the rest in one batch.
//! - A band has at most one pull open, and each delivery to its pull inbox
//!   counts toward it until it has what it asked for or the server ends it
//!   (`404` or `408` once the band runs dry, a status for a gone consumer).
//!   One at a time because a delivery does not say which pull it answers
//!   (its subject is the task's), and a server may serve two open pulls of
//!   one consumer in turns (NATS 2.9 does): counting each delivery toward
//!   the older pull would close it early and leave the newer one open in
//!   the worker's books after the server had finished it, and the worker
//!   would pull nothing more until [`Arrivals::take_silent`] gave up on it.
//!   [`Arrivals::outstanding`] is what open pulls may still bring, which
//!   the worker does not pull again.
//! - The server ends an unfulfilled watch after [`WATCH_EXPIRES`] with a
//!   status; the worker is woken to park a new one.
//! - A watch the server refuses (the consumer's `max_waiting` is reached)
//!   or ends for another reason (the consumer was deleted) marks the band
//!   dirty, and the band is not watched again for [`FULL_PASS_EVERY`]:
//!   parking at once would be refused again, in a loop.
//!
//! A band is watched when it is neither dirty, nor watched already, nor
//! waiting for an open pull: after each pass, and before the worker waits,
//! and only while the worker has a free permit. A band that keeps bringing
//! more is dirty and pulled on every pass instead.
//!
//! Watches on three bands can bring more messages than the worker has free
//! permits, and pulls may fill the worker after a watch was parked: such a
//! delivery is held until the next pass (the worker calls for one as soon as
//! a permit frees up). It is handed back to the queue (nak) only if no pass
//! takes it within the hold time, half the lease and at most [`MAX_HOLD`]:
//! long enough that a task is not passed from one full worker to the next
//! (each hand-back counts a delivery against the consumer's
//! `max_deliver`), short enough that an idle worker elsewhere gets it soon.
//! The same goes for what a forgotten pull (one the server left unanswered
//! for a while) brings late.
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
    /// The band's pull inbox: pull `n` answers to `<pull_prefix>.<n>`.
    pull_prefix: String,
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
    /// Deliveries to watches and pulls not handed out yet, oldest first,
    /// with when they came.
    held: VecDeque<(Instant, async_nats::Message)>,
    /// The number of the last pull sent.
    pulls_sent: u64,
    /// The pull sent and not finished: every delivery to the pull inbox
    /// counts toward it.
    pull: Option<OpenPull>,
    /// The server said nobody serves the band's consumer.
    missing: bool,
}

/// A pull the server has not finished answering.
#[derive(Debug, Clone, Copy)]
struct OpenPull {
    n: u64,
    want: usize,
    got: usize,
    /// When it was sent or last brought a message.
    heard: Instant,
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
        for (index, (band, consumer)) in lanes.into_iter().enumerate() {
            let prefix = client.new_inbox();
            let pull_prefix = client.new_inbox();
            for (kind, prefix) in [(Kind::Watch, &prefix), (Kind::Pull, &pull_prefix)] {
                let inbox = client
                    .subscribe(format!("{prefix}.*"))
                    .await
                    .map_err(|e| unavailable("cannot subscribe for arrivals", e))?;
                inboxes.push((index, kind, inbox));
            }
            bands.push(Band {
                band,
                consumer,
                prefix,
                pull_prefix,
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
        for (index, kind, inbox) in inboxes {
            tokio::spawn(read_inbox(
                inbox,
                Arc::downgrade(&arrivals),
                index,
                kind,
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
                // A band with a pull still coming in is not known to be
                // empty: the pull's end tells.
                if state.pull.is_some() {
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
            // Boxed, only when a watch goes out: held inline, the request
            // grew every `next_batch` future past the allocator's
            // per-thread cache.
            if let Err(e) = Box::pin(b.consumer.request_batch(watch, reply.into())).await {
                lock(&b.state).parked = None;
                b.dirty.store(true, Ordering::Release);
                result = Err(unavailable("cannot park a watch", e));
            }
        }
        result
    }

    /// Parks the watches, then waits until a watch or pull delivers or
    /// ends, a pull has been silent for `silence`, or the next full pass is
    /// due.
    pub(super) async fn wait(&self, silence: Duration) {
        if let Err(e) = self.watch_idle().await {
            tracing::warn!(error = %e, "cannot watch for arrivals");
        }
        let mut deadline = *lock(&self.next_full_pass);
        for b in &self.bands {
            let state = lock(&b.state);
            if let Some(pull) = state.pull {
                deadline = deadline.min(pull.heard + silence);
            }
        }
        let _ = tokio::time::timeout_at(deadline, self.notify.notified()).await;
    }

    /// Sends a no-wait pull of up to `want` messages on `band`, unless the
    /// band has a pull open already: then nothing is sent, and `false` says
    /// so. Its deliveries are held like a watch's, as they come.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub(super) async fn pull(&self, band: PriorityBand, want: usize) -> Result<bool, BrokerError> {
        let Some(b) = self.bands.iter().find(|b| b.band == band) else {
            return Ok(false);
        };
        let (n, reply) = {
            let mut state = lock(&b.state);
            if state.pull.is_some() {
                return Ok(false);
            }
            state.pulls_sent += 1;
            let n = state.pulls_sent;
            state.pull = Some(OpenPull {
                n,
                want,
                got: 0,
                heard: Instant::now(),
            });
            (n, format!("{}.{n}", b.pull_prefix))
        };
        let request = BatchConfig {
            batch: want,
            no_wait: true,
            ..BatchConfig::default()
        };
        if let Err(e) = b.consumer.request_batch(request, reply.into()).await {
            let mut state = lock(&b.state);
            if state.pull.is_some_and(|p| p.n == n) {
                state.pull = None;
            }
            return Err(unavailable("cannot send a pull request", e));
        }
        Ok(true)
    }

    /// Messages that open pulls may still bring, over every band.
    pub(super) fn outstanding(&self) -> usize {
        self.bands
            .iter()
            .filter_map(|b| lock(&b.state).pull.map(|p| p.want - p.got))
            .sum()
    }

    /// Forgets every open pull (the connection went, and the server drops
    /// a lost connection's pulls).
    pub(super) fn forget_pulls(&self) {
        for b in &self.bands {
            lock(&b.state).pull = None;
        }
    }

    /// The bands whose consumer the server said is gone, since last asked.
    pub(super) fn take_missing(&self) -> Vec<PriorityBand> {
        self.bands
            .iter()
            .filter(|b| std::mem::take(&mut lock(&b.state).missing))
            .map(|b| b.band)
            .collect()
    }

    /// The bands whose open pull the server has not answered for
    /// `silence`. Those pulls are forgotten: what they still bring is held
    /// like any other delivery (and counts toward the band's next pull),
    /// and the band is pulled afresh when due.
    pub(super) fn take_silent(&self, silence: Duration) -> Vec<PriorityBand> {
        let now = Instant::now();
        self.bands
            .iter()
            .filter(|b| {
                let mut state = lock(&b.state);
                let silent = state
                    .pull
                    .is_some_and(|pull| now.duration_since(pull.heard) >= silence);
                if silent {
                    state.pull = None;
                }
                silent
            })
            .map(|b| b.band)
            .collect()
    }

    /// Holds a delivery to band `b` for the next pass, after `arrived` has
    /// noted it in the band's state, and wakes the worker. A delivery that
    /// says more messages are pending marks the band dirty: it is pulled on
    /// the next pass, if the worker has room beyond what open pulls still
    /// bring.
    fn hold(
        &self,
        b: &Band,
        message: async_nats::Message,
        arrived: impl FnOnce(&mut BandState, Instant),
    ) {
        let delivery = jetstream::Message {
            message,
            context: self.js.clone(),
        };
        let more = delivery.info().is_ok_and(|info| info.pending > 0);
        let now = Instant::now();
        let mut state = lock(&b.state);
        arrived(&mut state, now);
        state.held.push_back((now, delivery.message));
        drop(state);
        if more {
            b.dirty.store(true, Ordering::Release);
        }
        self.notify.notify_one();
    }

    /// Takes one message from band `index`'s watch inbox.
    fn watched(&self, index: usize, message: async_nats::Message) {
        let b = &self.bands[index];
        match message.status {
            None | Some(StatusCode::OK) => {
                self.hold(b, message, |state, _| {
                    // A watch brings one message: whichever was parked is
                    // done. (Were two parked, the other one's delivery is
                    // simply held too.)
                    state.parked = None;
                });
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {}
            Some(status) => {
                let mut state = lock(&b.state);
                let current = state
                    .parked
                    .is_some_and(|(n, _)| reply_number(&b.prefix, &message.subject) == Some(n));
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

    /// Takes one message from band `index`'s pull inbox.
    fn pulled(&self, index: usize, message: async_nats::Message) {
        let b = &self.bands[index];
        match message.status {
            None | Some(StatusCode::OK) => {
                self.hold(b, message, |state, now| {
                    if let Some(pull) = &mut state.pull {
                        pull.got += 1;
                        pull.heard = now;
                        if pull.got >= pull.want {
                            state.pull = None;
                        }
                    }
                });
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {}
            Some(status) => {
                let n = reply_number(&b.pull_prefix, &message.subject);
                let mut state = lock(&b.state);
                if state.pull.is_none_or(|p| Some(p.n) != n) {
                    return; // the end of a pull already finished or forgotten
                }
                state.pull = None;
                match status {
                    // No (more) messages. The band was empty after the
                    // pull's last delivery, whatever it said was pending.
                    StatusCode::NOT_FOUND | StatusCode::TIMEOUT => {
                        b.dirty.store(false, Ordering::Release);
                    }
                    // Nobody serves this consumer: it or its stream is gone.
                    StatusCode::NO_RESPONDERS => state.missing = true,
                    // Cut short (limits, leadership change): nothing more
                    // from this band now.
                    StatusCode::REQUEST_TERMINATED => tracing::debug!(
                        band = b.band.as_str(),
                        reason = ?message.description,
                        "pull ended early"
                    ),
                    status => tracing::warn!(
                        band = b.band.as_str(),
                        %status,
                        reason = ?message.description,
                        "unexpected status to a pull request"
                    ),
                }
                drop(state);
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

/// The `n` of a reply subject `<prefix>.<n>`: which watch or pull a
/// status answers.
fn reply_number(prefix: &str, subject: &async_nats::Subject) -> Option<u64> {
    subject
        .as_str()
        .strip_prefix(prefix)?
        .strip_prefix('.')?
        .parse()
        .ok()
}

/// Which of a band's two inboxes a reader serves.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Watch,
    Pull,
}

/// Reads one of band `index`'s inboxes until `stop` (the broker went) or
/// the client closes, handing back what is held too long.
async fn read_inbox(
    mut inbox: async_nats::Subscriber,
    arrivals: Weak<Arrivals>,
    index: usize,
    kind: Kind,
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
        match kind {
            Kind::Watch => arrivals.watched(index, message),
            Kind::Pull => arrivals.pulled(index, message),
        }
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
    use super::super::test_queue::Queue;
    use super::*;

    /// A short hold, so the hand-back test is quick.
    const HOLD: Duration = Duration::from_millis(300);

    /// Starts watching the test queue's consumer as the normal band.
    async fn arrivals(queue: &Queue) -> Arc<Arrivals> {
        arrivals_with(queue, WATCH_EXPIRES, HOLD).await
    }

    async fn arrivals_with(
        queue: &Queue,
        watch_expires: Duration,
        hold: Duration,
    ) -> Arc<Arrivals> {
        Arrivals::start_with(
            &queue.client,
            queue.js.clone(),
            vec![(PriorityBand::Normal, queue.consumer.clone())],
            watch_expires,
            hold,
        )
        .await
        .unwrap()
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
        let arrivals = arrivals(&queue).await;
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
    }

    /// Takes held deliveries until there are `n`.
    async fn held(arrivals: &Arrivals, n: usize) -> Vec<(PriorityBand, async_nats::Message)> {
        let mut held = Vec::new();
        loop {
            held.extend(arrivals.take_held(n - held.len()));
            if held.len() == n {
                return held;
            }
            reported(arrivals).await;
        }
    }

    fn bodies(held: &[(PriorityBand, async_nats::Message)]) -> Vec<&[u8]> {
        held.iter().map(|(_, m)| m.payload.as_ref()).collect()
    }

    #[tokio::test]
    async fn a_pull_counts_until_answered_and_its_end_says_the_band_is_empty() {
        let queue = Queue::new().await;
        let arrivals = arrivals(&queue).await;
        let normal = [PriorityBand::Normal];
        for body in ["a", "b", "c", "d", "e"] {
            queue.publish(body).await;
        }
        arrivals.take_due();

        // Counted from the moment it is sent, so the worker does not pull
        // the same room twice; each delivery counts toward it.
        assert!(arrivals.pull(PriorityBand::Normal, 3).await.unwrap());
        assert_eq!(arrivals.outstanding(), 3);
        let first = held(&arrivals, 3).await;
        assert_eq!(bodies(&first), [b"a", b"b", b"c"]);
        assert_eq!(arrivals.outstanding(), 0);
        assert_eq!(arrivals.take_due(), normal, "two more are pending");

        // A pull for more than is left brings the rest, then ends with "no
        // messages": the band is known empty, though a delivery said more
        // were pending.
        assert!(arrivals.pull(PriorityBand::Normal, 5).await.unwrap());
        let rest = held(&arrivals, 2).await;
        assert_eq!(bodies(&rest), [b"d", b"e"]);
        claudecluster_testkit::wait::eventually("the pull's end", || async {
            (arrivals.outstanding() == 0).then_some(())
        })
        .await;
        assert!(arrivals.take_due().is_empty());
        ack(&queue, first).await;
        ack(&queue, rest).await;
    }

    #[tokio::test]
    async fn a_band_has_one_pull_open_at_a_time() {
        // One message out at a time: the first pull gets one of its three
        // and stays open.
        let queue = Queue::with_limits(512, 1).await;
        let arrivals = arrivals(&queue).await;
        for body in ["a", "b", "c"] {
            queue.publish(body).await;
        }
        arrivals.take_due();
        assert!(arrivals.pull(PriorityBand::Normal, 3).await.unwrap());
        let first = held(&arrivals, 1).await;
        assert_eq!(arrivals.outstanding(), 2);

        // A second pull would be served in turns with the first, and the
        // deliveries could not be told apart: it is not sent.
        assert!(!arrivals.pull(PriorityBand::Normal, 3).await.unwrap());
        assert_eq!(arrivals.outstanding(), 2);

        // The open pull brings the rest as room frees up, and is done.
        ack(&queue, first).await;
        let second = held(&arrivals, 1).await;
        assert_eq!(bodies(&second), [b"b"]);
        ack(&queue, second).await;
        let third = held(&arrivals, 1).await;
        assert_eq!(bodies(&third), [b"c"]);
        assert_eq!(arrivals.outstanding(), 0);
        assert!(arrivals.pull(PriorityBand::Normal, 3).await.unwrap());
        ack(&queue, third).await;
    }

    #[tokio::test]
    async fn an_unanswered_pull_is_forgotten_and_what_it_brings_later_is_held() {
        // One message out at a time: a second pull is parked, unanswered.
        let queue = Queue::with_limits(512, 1).await;
        let arrivals = arrivals(&queue).await;
        queue.publish("first").await;
        queue.publish("second").await;
        arrivals.take_due();
        assert!(arrivals.pull(PriorityBand::Normal, 1).await.unwrap());
        let first = held(&arrivals, 1).await;
        assert!(arrivals.pull(PriorityBand::Normal, 1).await.unwrap());
        assert_eq!(arrivals.outstanding(), 1);

        // Silent past the limit: forgotten, so its room goes elsewhere.
        let silence = Duration::from_millis(200);
        assert!(arrivals.take_silent(silence).is_empty(), "not silent yet");
        tokio::time::sleep(silence).await;
        assert_eq!(arrivals.take_silent(silence), [PriorityBand::Normal]);
        assert_eq!(arrivals.outstanding(), 0);

        // Once the first is done, the server answers the forgotten pull:
        // its delivery is held for the worker, as a first delivery.
        ack(&queue, first).await;
        let second = held(&arrivals, 1).await;
        assert_eq!(bodies(&second), [b"second"]);
        let info = jetstream::Message {
            message: second[0].1.clone(),
            context: queue.js.clone(),
        };
        assert_eq!(info.info().unwrap().delivered, 1);
        ack(&queue, second).await;
    }

    #[tokio::test]
    async fn a_delivery_nobody_takes_goes_back_to_the_queue() {
        let mut queue = Queue::new().await;
        let arrivals = arrivals(&queue).await;
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
    }

    #[tokio::test]
    async fn dirty_bands_are_not_watched() {
        let mut queue = Queue::new().await;
        let arrivals = arrivals(&queue).await;
        // Still dirty: pulled on the next pass, so no watch.
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 0);
        arrivals.take_due();
        arrivals.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 1);
    }

    #[tokio::test]
    async fn an_expired_watch_wakes_the_worker_to_park_another() {
        let mut queue = Queue::new().await;
        let arrivals = arrivals_with(&queue, Duration::from_millis(300), HOLD).await;
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
    }

    #[tokio::test]
    async fn a_refused_watch_is_not_parked_again_at_once() {
        // Room for one waiting pull on the consumer, taken by another worker.
        let mut queue = Queue::with_max_waiting(1).await;
        let other = arrivals(&queue).await;
        other.take_due();
        other.watch_idle().await.unwrap();
        queue.client.flush().await.unwrap();
        assert_eq!(queue.parked().await, 1);

        // This worker's watch is refused: the band is pulled (it may be the
        // consumer that is gone), and not watched again within the pause.
        let arrivals = arrivals(&queue).await;
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
    }
}
