//! Taking tasks off the queue, highest band first, never more than the
//! worker has permits for.
//!
//! A pull is a no-wait fetch of the worker's free permits less what its
//! open pulls still bring, so a busy worker holds no more messages than it
//! can start (the rest stay available to other workers). A worker pulls
//! only the bands that [`Arrivals`] says may hold work (a delivery said more
//! are pending, or a full pass is due). With none, it does not poll in a
//! loop: each band has a one-message watch parked on the server, and the
//! worker sleeps until one brings a task. Watches on every band at once mean
//! a high-priority arrival never waits behind a long pull on another band.
//!
//! Pulls are answered into [`Arrivals`] too, and `next_batch` hands out
//! what has come so far instead of waiting for a whole pull: a task starts
//! as soon as its message is in. A worker that waited for each pull to
//! finish spent most of its time doing so, with permits free and work
//! queued. A band has one pull open at a time ([`Arrivals`] says why); the
//! next goes out as soon as it ends, which a no-wait pull does within a
//! round trip.
//!
//! Dropping a `next_batch` future (shutdown) loses nothing for good: what
//! was pulled and not handed out is held, handed back after the hold time,
//! or, once the broker is gone, redelivered after `ack_wait`.

use std::time::{Duration, Instant};

use async_nats::Subject;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind as JsAckKind};
use async_trait::async_trait;
use bytes::Bytes;
use tracing::instrument;

use super::acks::AckSender;
use super::arrivals::Arrivals;
use super::{JetStreamBroker, Lane, unavailable};
use crate::broker::{AckKind, Acker, BrokerError, Delivery, PriorityBand, TaskConsumer};
use crate::task::TaskId;

/// How long a pull may go unanswered. A no-wait pull is answered at once
/// (messages, then `404`/`408` when the band runs dry), except when the band
/// already has `max_ack_pending` messages out: a 2.9 server then parks the
/// request without a word. (An expiry on the request would bound that, but
/// a 2.9 server then also holds pulls on empty bands until the expiry,
/// which costs far more.) Silence past this means "band saturated": the
/// pull is forgotten, so the room it was counted against goes to the other
/// bands, and whatever it brings later is held like any delivery.
const SILENCE: Duration = Duration::from_secs(1);

/// The fewest messages worth a pull of its own while another band's pull
/// is still coming in: each request costs the server about as much as a
/// delivery, and the open pull's deliveries bring the worker back soon.
const TOP_UP_MIN: usize = 16;

/// Why pulling failed.
enum PullError {
    /// Nobody serves the band's consumer: it or the stream is gone.
    Missing(BrokerError),
    /// Anything else (connection trouble, mostly).
    Other(BrokerError),
}

impl From<PullError> for BrokerError {
    fn from(e: PullError) -> Self {
        match e {
            PullError::Missing(e) | PullError::Other(e) => e,
        }
    }
}

/// Acknowledges one JetStream delivery.
struct JetStreamAcker {
    acker: jetstream::message::Acker,
    /// Where plain acks go ([`AckSender`]), with the delivery's reply
    /// subject; `None` for a message without one.
    plain: Option<(AckSender, Subject)>,
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(&self, kind: AckKind) -> Result<(), BrokerError> {
        let result = match kind {
            // Plain acks: the worker writes the final record before it acks,
            // so an ack lost on the way costs one redelivery that the store
            // answers with "already final", never a second run. Waiting for
            // the server's confirmation would hold the task's permit for
            // another round trip on every task.
            AckKind::Ack => match &self.plain {
                Some((sender, reply)) if sender.ack(reply.clone()).is_ok() => Ok(()),
                _ => self.acker.ack_with(JsAckKind::Ack).await,
            },
            // Terms stay confirmed: they are rare, and a lost one would put
            // a second copy of a poison message on the dead-letter stream.
            AckKind::Term => self.acker.double_ack_with(JsAckKind::Term).await,
            AckKind::Nak(delay) => self.acker.ack_with(JsAckKind::Nak(delay)).await,
            AckKind::Progress => self.acker.ack_with(JsAckKind::Progress).await,
        };
        result.map_err(|e| unavailable("acknowledgement not delivered", e))
    }
}

impl JetStreamBroker {
    /// Sends a pull for the room the worker has beyond what open pulls still
    /// bring, to the first band that is due; the other due bands stay due,
    /// and are pulled once that pull comes back short. One band per pass
    /// keeps the order of the bands: a band is pulled only when every band
    /// before it had less than the worker could take. So when the first
    /// due band still has a pull open, nothing is sent: its end decides.
    async fn pull_due(&self, arrivals: &Arrivals, room: usize) -> Result<(), PullError> {
        let outstanding = arrivals.outstanding();
        let Some(free) = room.checked_sub(outstanding).filter(|free| *free > 0) else {
            return Ok(());
        };
        if outstanding > 0 && free < TOP_UP_MIN {
            return Ok(());
        }
        let due = arrivals.take_due();
        let Some((&first, rest)) = due.split_first() else {
            return Ok(());
        };
        arrivals.mark(rest);
        // Boxed, only when a pull goes out: held inline, it grew every
        // `next_batch` future past the allocator's per-thread cache.
        let sent = Box::pin(arrivals.pull(first, free)).await;
        if !matches!(sent, Ok(true)) {
            // Still open, or not sent: the band stays due.
            arrivals.mark(&[first]);
        }
        sent.map(drop).map_err(PullError::Other)
    }

    /// What the open pulls' answers (or silence) say about the bands:
    /// an error for a band whose consumer is gone.
    async fn check_pulls(&self, arrivals: &Arrivals) -> Result<(), PullError> {
        if let Some(band) = arrivals.take_missing().first() {
            return Err(PullError::Missing(BrokerError::Unavailable(format!(
                "the consumer of the {} band does not exist",
                band.as_str()
            ))));
        }
        for band in arrivals.take_silent(SILENCE) {
            // Boxed: rare, and large enough to grow `next_batch`'s future.
            Box::pin(self.explain_silence(self.lane(band))).await?;
        }
        Ok(())
    }

    /// Tells a saturated band (fine: move on) from a missing consumer
    /// (repair) after a pull went unanswered.
    async fn explain_silence(&self, lane: &Lane) -> Result<(), PullError> {
        let name = &lane.consumer.cached_info().name;
        match self.tasks.consumer_info(name).await {
            Ok(info) => {
                tracing::debug!(
                    band = lane.band.as_str(),
                    ack_pending = info.num_ack_pending,
                    max_ack_pending = info.config.max_ack_pending,
                    "pull went unanswered; band saturated"
                );
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                ) =>
            {
                Err(PullError::Missing(BrokerError::Unavailable(format!(
                    "the consumer of the {} band does not exist",
                    lane.band.as_str()
                ))))
            }
            Err(e) => Err(PullError::Other(unavailable(
                "a pull went unanswered and the consumer cannot be read",
                e,
            ))),
        }
    }

    /// A pull error for the caller; a missing consumer is recreated first,
    /// and the error still goes back, so the caller backs off and tries
    /// again.
    async fn repair_after(&self, e: PullError) -> BrokerError {
        match e {
            PullError::Missing(e) => {
                if let Err(repair) = self.repair(Instant::now()).await {
                    tracing::warn!(error = %repair, "cannot recreate JetStream resources");
                }
                e
            }
            PullError::Other(e) => e,
        }
    }

    fn delivery(&self, message: async_nats::Message, band: PriorityBand) -> Delivery {
        let message = jetstream::Message {
            message,
            context: self.js.clone(),
        };
        // The reply subject of a pulled message always carries the delivery
        // info; a foreign message without it counts as a first delivery.
        let delivery_count = message
            .info()
            .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let plain = message.reply.clone().map(|reply| {
            let sender = self
                .acks
                .get_or_init(|| AckSender::start(self.client.clone()));
            (sender.clone(), reply)
        });
        let (message, acker) = message.split();
        Delivery {
            payload: message.payload,
            delivery_count,
            band,
            acker: Box::new(JetStreamAcker { acker, plain }),
        }
    }
}

#[async_trait]
impl TaskConsumer for JetStreamBroker {
    #[instrument(level = "debug", skip_all, fields(max))]
    async fn next_batch(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let arrivals = self
            .arrivals
            .get_or_try_init(|| async {
                let lanes = self
                    .lanes
                    .iter()
                    .map(|lane| (lane.band, lane.consumer.clone()))
                    .collect();
                let lease = Duration::from_millis(self.settings.ack_wait_ms.max(1));
                // Boxed: held inline, this one-off start added 4 KB to
                // every call's future, which `async_trait` allocates anew.
                Box::pin(Arrivals::start(&self.client, self.js.clone(), lanes, lease)).await
            })
            .await?;
        loop {
            // What the watches and earlier pulls brought first: it is leased
            // already.
            let batch: Vec<Delivery> = arrivals
                .take_held(max)
                .into_iter()
                .map(|(band, message)| self.delivery(message, band))
                .collect();
            // Checked first so an outage fails fast instead of after
            // `SILENCE`. The server drops a lost connection's pulls.
            if self.client.connection_state() != async_nats::connection::State::Connected {
                arrivals.forget_pulls();
                if batch.is_empty() {
                    return Err(BrokerError::Unavailable("not connected to NATS".into()));
                }
                return Ok(batch);
            }
            let pulled = match self.check_pulls(arrivals).await {
                Ok(()) => self.pull_due(arrivals, max - batch.len()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = pulled {
                // Boxed: rare, and held inline it made every call's future
                // 11 KB.
                let e = Box::pin(self.repair_after(e)).await;
                if batch.is_empty() {
                    return Err(e);
                }
                tracing::warn!(error = %e, "pull failed; handing out what came before");
            }
            if !batch.is_empty() {
                // Bands this pass found empty are watched from now on, if
                // the worker still has room: a full worker would only hold
                // what a watch brings.
                if batch.len() < max
                    && let Err(e) = arrivals.watch_idle().await
                {
                    tracing::warn!(error = %e, "cannot watch for arrivals");
                }
                return Ok(batch);
            }
            arrivals.wait(SILENCE).await;
        }
    }

    #[instrument(level = "debug", skip_all, fields(task_id = ?task_id))]
    async fn dead_letter(
        &self,
        task_id: Option<TaskId>,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), BrokerError> {
        self.publish_dead_letter(task_id, payload, reason).await
    }
}
