//! Taking tasks off the queue, highest band first, never more than the
//! worker has permits for.
//!
//! Each pull is a no-wait fetch of exactly the remaining permits, so a busy
//! worker holds no more messages than it can start (they stay available to
//! other workers). A worker pulls only the bands that [`Arrivals`] says may
//! hold work (a watch brought a message and more are pending, the last pull
//! filled its batch, or a full pass is due). With none, it does not poll in
//! a loop: each band has a one-message watch parked on the server, and the
//! worker sleeps until one brings a task. Watches on every band at once mean
//! a high-priority arrival never waits behind a long pull on another band.
//!
//! Each band keeps one reply inbox for all its pulls ([`Inbox`]): a pull is
//! then a single request on the wire, not a subscribe, a request and an
//! unsubscribe.
//!
//! Dropping a `next_batch` future (shutdown) loses nothing for good: messages
//! already pulled but not handed out are unacknowledged, and JetStream
//! delivers them again after `ack_wait`.

use std::time::{Duration, Instant};

use async_nats::StatusCode;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind as JsAckKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tracing::instrument;

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
/// worker moves on to the next band and the parked request is handed to
/// [`rescue`].
const SILENCE: Duration = Duration::from_secs(1);

/// How long [`rescue`] keeps listening for deliveries to an abandoned pull.
const RESCUE_WINDOW: Duration = Duration::from_secs(300);

/// Why a pull failed.
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

/// A band's reply inbox: one wildcard subscription that every pull of the
/// band reuses, each pull answering to `<inbox>.<n>` with its own `n`.
/// Subscribing and unsubscribing around every pull made the server rebuild
/// its subscription cache each time, which slowed every publish on the
/// server. Status replies (`404`, `408`, ...) come on the exact reply subject,
/// so a late status of an earlier pull is told apart and skipped; deliveries
/// carry their stream subject instead, and any that arrive are this band's.
pub(super) struct Inbox {
    prefix: String,
    replies: async_nats::Subscriber,
    /// The number of the last pull sent.
    sent: u64,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("prefix", &self.prefix)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

/// A band's inbox taken out of its lane for one pull. Put back when the
/// server has finished with the pull; dropped before that (a silent band,
/// or the caller's future dropped at shutdown), it hands the inbox to
/// [`rescue`], so messages still on their way are given back at once
/// instead of sitting out their lease in a dead inbox, and the band's next
/// pull opens a fresh inbox.
struct Pull<'a> {
    inbox: Option<Inbox>,
    slot: &'a std::sync::Mutex<Option<Inbox>>,
    finished: bool,
    js: jetstream::Context,
}

impl Drop for Pull<'_> {
    fn drop(&mut self) {
        let Some(inbox) = self.inbox.take() else {
            return;
        };
        if self.finished {
            let mut slot = self
                .slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Another pull of the same band may have opened its own inbox
            // meanwhile; one is enough, and this one is then dropped.
            if slot.is_none() {
                *slot = Some(inbox);
            }
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(rescue(inbox.replies, self.js.clone()));
        }
    }
}

/// Naks every message that arrives on an abandoned pull's inbox, until the
/// server ends the request or [`RESCUE_WINDOW`] passes.
async fn rescue(mut replies: async_nats::Subscriber, js: jetstream::Context) {
    let deadline = tokio::time::Instant::now() + RESCUE_WINDOW;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
        match message.status {
            None | Some(StatusCode::OK) => {
                let message = jetstream::Message {
                    message,
                    context: js.clone(),
                };
                if let Err(e) = message.ack_with(JsAckKind::Nak(None)).await {
                    tracing::debug!(error = %e, "cannot hand back a late delivery");
                }
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {}
            Some(_) => return,
        }
    }
}

/// Acknowledges one JetStream delivery.
struct JetStreamAcker(jetstream::message::Acker);

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(&self, kind: AckKind) -> Result<(), BrokerError> {
        let result = match kind {
            // Plain acks: the worker writes the final record before it acks,
            // so an ack lost on the way costs one redelivery that the store
            // answers with "already final", never a second run. Waiting for
            // the server's confirmation would hold the task's permit for
            // another round trip on every task.
            // Terms stay confirmed: they are rare, and a lost one would put
            // a second copy of a poison message on the dead-letter stream.
            AckKind::Ack => self.0.ack_with(JsAckKind::Ack).await,
            AckKind::Term => self.0.double_ack_with(JsAckKind::Term).await,
            AckKind::Nak(delay) => self.0.ack_with(JsAckKind::Nak(delay)).await,
            AckKind::Progress => self.0.ack_with(JsAckKind::Progress).await,
        };
        result.map_err(|e| unavailable("acknowledgement not delivered", e))
    }
}

impl JetStreamBroker {
    /// Pulls what is available now, band by band, up to `max`.
    ///
    /// # Errors
    /// When the first pull fails; a later failure returns what was already
    /// pulled (those messages are leased to this worker and must be handed
    /// out).
    async fn take_available(
        &self,
        max: usize,
        bands: impl Fn(PriorityBand) -> bool,
    ) -> Result<Vec<Delivery>, PullError> {
        let mut out = Vec::new();
        for lane in self.lanes.iter().filter(|lane| bands(lane.band)) {
            let want = max - out.len();
            if want == 0 {
                break;
            }
            if let Err(e) = self.fetch(lane, want, &mut out).await {
                if out.is_empty() {
                    return Err(e);
                }
                tracing::warn!(band = lane.band.as_str(), error = %BrokerError::from(e), "pull failed; handing out what was pulled");
                break;
            }
        }
        Ok(out)
    }

    /// One no-wait pull of up to `want` messages from a band.
    async fn fetch(
        &self,
        lane: &Lane,
        want: usize,
        out: &mut Vec<Delivery>,
    ) -> Result<(), PullError> {
        // Checked first so an outage fails fast instead of after `SILENCE`.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PullError::Other(BrokerError::Unavailable(
                "not connected to NATS".into(),
            )));
        }
        let kept = lane
            .inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let inbox = match kept {
            Some(inbox) => inbox,
            None => {
                let prefix = self.client.new_inbox();
                let replies = self
                    .client
                    .subscribe(format!("{prefix}.*"))
                    .await
                    .map_err(|e| PullError::Other(unavailable("cannot subscribe for pulls", e)))?;
                Inbox {
                    prefix,
                    replies,
                    sent: 0,
                }
            }
        };
        let mut pull = Pull {
            inbox: Some(inbox),
            slot: &lane.inbox,
            finished: false,
            js: self.js.clone(),
        };
        let Some(inbox) = pull.inbox.as_mut() else {
            return Ok(());
        };
        inbox.sent += 1;
        let reply = format!("{}.{}", inbox.prefix, inbox.sent);
        let request = BatchConfig {
            batch: want,
            no_wait: true,
            ..BatchConfig::default()
        };
        lane.consumer
            .request_batch(request, reply.clone().into())
            .await
            .map_err(|e| PullError::Other(unavailable("cannot send a pull request", e)))?;

        let started = out.len();
        let replies = &mut inbox.replies;
        let collect = async {
            while out.len() - started < want {
                let Some(message) = replies.next().await else {
                    return Err(PullError::Other(BrokerError::Unavailable(
                        "connection closed during a pull".into(),
                    )));
                };
                match message.status {
                    None | Some(StatusCode::OK) => out.push(self.delivery(message, lane.band)),
                    Some(StatusCode::IDLE_HEARTBEAT) => {}
                    // The late end of an earlier pull of this band.
                    Some(_) if message.subject.as_str() != reply => {}
                    // Nobody serves this consumer: it or its stream is gone.
                    Some(StatusCode::NO_RESPONDERS) => {
                        return Err(PullError::Missing(BrokerError::Unavailable(format!(
                            "the consumer of the {} band does not exist",
                            lane.band.as_str()
                        ))));
                    }
                    // No (more) messages.
                    Some(StatusCode::NOT_FOUND | StatusCode::TIMEOUT) => break,
                    // The request was cut short (limits, leadership change):
                    // nothing more from this band now.
                    Some(StatusCode::REQUEST_TERMINATED) => {
                        tracing::debug!(
                            band = lane.band.as_str(),
                            reason = ?message.description,
                            "pull ended early"
                        );
                        break;
                    }
                    Some(status) => {
                        tracing::warn!(
                            band = lane.band.as_str(),
                            %status,
                            reason = ?message.description,
                            "unexpected status to a pull request"
                        );
                        break;
                    }
                }
            }
            Ok(())
        };
        let collected = tokio::time::timeout(SILENCE, collect).await;
        match collected {
            Ok(result) => {
                // The server has finished with the request: the inbox can
                // serve the next one.
                pull.finished = result.is_ok();
                result
            }
            // Silence: the band is saturated, or its consumer is gone (a
            // 2.9 server ignores pulls for a missing consumer). `pull` is
            // dropped on return and rescues whatever the parked request
            // still brings.
            Err(_) if out.len() > started => Ok(()),
            Err(_) => self.explain_silence(lane).await,
        }
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

    /// [`Self::take_available`]; a missing consumer is recreated and the
    /// error still goes back, so the caller backs off and tries again.
    async fn pull_or_repair(
        &self,
        max: usize,
        bands: impl Fn(PriorityBand) -> bool,
    ) -> Result<Vec<Delivery>, BrokerError> {
        match self.take_available(max, bands).await {
            Ok(pulled) => Ok(pulled),
            Err(PullError::Missing(e)) => {
                if let Err(repair) = self.repair(Instant::now()).await {
                    tracing::warn!(error = %repair, "cannot recreate JetStream resources");
                }
                Err(e)
            }
            Err(PullError::Other(e)) => Err(e),
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
        let (message, acker) = message.split();
        Delivery {
            payload: message.payload,
            delivery_count,
            band,
            acker: Box::new(JetStreamAcker(acker)),
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
                Arrivals::start(&self.client, self.js.clone(), lanes, lease).await
            })
            .await?;
        loop {
            // What the watches brought first: it is leased already.
            let mut batch: Vec<Delivery> = arrivals
                .take_held(max)
                .into_iter()
                .map(|(band, message)| self.delivery(message, band))
                .collect();
            let due = arrivals.take_due();
            let room = max - batch.len();
            if room == 0 {
                arrivals.mark(&due);
            } else if !due.is_empty() {
                match self.pull_or_repair(room, |band| due.contains(&band)).await {
                    Ok(pulled) => {
                        if pulled.len() >= room {
                            // A full batch may have left more behind.
                            arrivals.mark(&due);
                        }
                        batch.extend(pulled);
                    }
                    Err(e) => {
                        arrivals.mark(&due);
                        if batch.is_empty() {
                            return Err(e);
                        }
                        tracing::warn!(error = %e, "pull failed; handing out what the watches brought");
                    }
                }
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
            arrivals.wait().await;
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
