//! Taking tasks off the queue, highest band first, never more than the
//! worker has permits for.
//!
//! Each pull is a no-wait fetch of exactly the remaining permits, so a busy
//! worker never holds messages it cannot start (they stay available to other
//! workers). When every band is empty the worker does not poll in a loop and
//! does not park a long pull on one band (a high-priority arrival would then
//! wait behind it): it subscribes to `<subject_prefix>.>` on core NATS, which
//! also sees JetStream publishes, checks the bands once more (closing the
//! race with a publish that happened just before), and sleeps until a publish
//! or a second passes.
//!
//! Dropping a `next_batch` future (shutdown) loses nothing for good: messages
//! already pulled but not handed out are unacknowledged, and JetStream
//! delivers them again after `ack_wait`.

use std::time::Duration;

use async_nats::StatusCode;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind as JsAckKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tracing::instrument;

use super::{JetStreamBroker, Lane, unavailable};
use crate::broker::{AckKind, Acker, BrokerError, Delivery, PriorityBand, TaskConsumer};
use crate::task::TaskId;

/// Longest sleep when all bands are empty; bounds the cost of a missed
/// wake-up.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// A no-wait pull is answered at once; this only catches a server that went
/// away mid-pull.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Acknowledges one JetStream delivery.
struct JetStreamAcker(jetstream::message::Acker);

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(&self, kind: AckKind) -> Result<(), BrokerError> {
        let result = match kind {
            // Acks and terms are confirmed by the server (double ack) so the
            // caller knows the message will not come back.
            AckKind::Ack => self.0.double_ack_with(JsAckKind::Ack).await,
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
    async fn take_available(&self, max: usize) -> Result<Vec<Delivery>, PullError> {
        let mut out = Vec::new();
        for lane in &self.lanes {
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
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| PullError::Other(unavailable("cannot subscribe for a pull", e)))?;
        let request = BatchConfig {
            batch: want,
            no_wait: true,
            ..BatchConfig::default()
        };
        lane.consumer
            .request_batch(request, inbox.into())
            .await
            .map_err(|e| PullError::Other(unavailable("cannot send a pull request", e)))?;

        let started = out.len();
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
                    // Nobody serves this consumer: it or its stream is gone.
                    Some(StatusCode::NO_RESPONDERS) => {
                        return Err(PullError::Missing(BrokerError::Unavailable(format!(
                            "the consumer of the {} band does not exist",
                            lane.band.as_str()
                        ))));
                    }
                    // No (more) messages.
                    Some(StatusCode::NOT_FOUND | StatusCode::TIMEOUT) => break,
                    // The band has max_ack_pending messages out, or the
                    // request was cut short: nothing more from it now.
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
        let collected = tokio::time::timeout(FETCH_TIMEOUT, collect).await;
        match collected {
            Ok(result) => result,
            Err(_) if out.len() > started => Ok(()),
            Err(_) => Err(PullError::Other(BrokerError::Unavailable(format!(
                "no answer to a pull request within {FETCH_TIMEOUT:?}"
            )))),
        }
    }

    /// [`Self::take_available`]; a missing consumer is recreated (at most
    /// every couple of seconds) and the error still goes back, so the
    /// caller backs off and tries again.
    async fn pull_or_repair(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        match self.take_available(max).await {
            Ok(batch) => Ok(batch),
            Err(PullError::Missing(e)) => {
                if let Err(repair) = self.repair().await {
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
        loop {
            let batch = self.pull_or_repair(max).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            let mut wake = self
                .client
                .subscribe(format!("{}.>", self.settings.subject_prefix))
                .await
                .map_err(|e| unavailable("cannot subscribe for arrivals", e))?;
            // The subscription is registered before this pull reaches the
            // server (same connection, in order), so a task stored after
            // this check also wakes us.
            let batch = self.pull_or_repair(max).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            // A wake-up may come before the stream has stored the message;
            // the next round's empty pull then simply loops.
            let _ = tokio::time::timeout(IDLE_WAIT, wake.next()).await;
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
