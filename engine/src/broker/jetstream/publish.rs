//! Publishing tasks: one subject per band, the task id as `Nats-Msg-Id` so a
//! retried submit is stored once, and every publish confirmed by a PubAck.
//! Batches are pipelined: all messages go out, then the acks are awaited
//! together (awaiting each ack before the next publish is an order of
//! magnitude slower).

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::message::PublishMessage;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tracing::instrument;

use super::{HEALTH_TIMEOUT, JetStreamBroker, TASK_ID_HEADER, header_safe, unavailable};
use crate::broker::{BrokerError, PriorityBand, TaskPublisher};
use crate::task::TaskMessage;

/// Publishes in flight at once within one batch. Each holds one of the
/// context's ack permits until its ack arrives, so concurrent batches never
/// wait on each other's acks.
const PIPELINE_WINDOW: usize = 512;

impl JetStreamBroker {
    /// The subject and message (body and headers) for a task.
    /// `message_id` is the `Nats-Msg-Id` (the task id, except for replays).
    fn outbound(
        &self,
        msg: &TaskMessage,
        message_id: Option<&str>,
    ) -> Result<(String, PublishMessage), BrokerError> {
        let body = serde_json::to_vec(msg)
            .map_err(|e| BrokerError::Other(format!("cannot encode task {}: {e}", msg.id)))?;
        let id = msg.id.to_string();
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, message_id.unwrap_or(id.as_str()));
        headers.insert(TASK_ID_HEADER, id.as_str());
        if let Some(trace) = &msg.trace {
            if let Some(tp) = trace.traceparent.as_deref().filter(|v| header_safe(v)) {
                headers.insert("traceparent", tp);
            }
            if let Some(ts) = trace.tracestate.as_deref().filter(|v| header_safe(v)) {
                headers.insert("tracestate", ts);
            }
        }
        let subject = self.lane(PriorityBand::of(msg.priority)).subject.clone();
        Ok((
            subject,
            PublishMessage::build()
                .payload(Bytes::from(body))
                .headers(headers),
        ))
    }

    /// The publishes of `msgs`, made as the stream is polled. (A named
    /// lifetime: a closure inside the `async_trait` method itself would
    /// have to be general over every lifetime, which it is not.)
    fn publishes<'a>(
        &'a self,
        msgs: &'a [TaskMessage],
    ) -> impl futures::Stream<Item = impl Future<Output = Result<(), BrokerError>> + 'a> + 'a {
        futures::stream::iter(msgs.iter().map(|msg| self.publish_confirmed(msg, None)))
    }

    /// Publishes one task and waits for the stream to confirm it.
    async fn publish_confirmed(
        &self,
        msg: &TaskMessage,
        message_id: Option<&str>,
    ) -> Result<(), BrokerError> {
        let ack = self
            .publish_repairing(|| self.outbound(msg, message_id))
            .await?;
        if ack.duplicate {
            tracing::debug!(task_id = %msg.id, "publish was a duplicate; stored once");
        }
        Ok(())
    }
}

#[async_trait]
impl TaskPublisher for JetStreamBroker {
    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn publish(&self, msg: &TaskMessage) -> Result<(), BrokerError> {
        self.publish_confirmed(msg, None).await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %msg.id))]
    async fn republish(&self, msg: &TaskMessage, replay_id: &str) -> Result<(), BrokerError> {
        self.publish_confirmed(msg, Some(replay_id)).await
    }

    #[instrument(level = "debug", skip_all, fields(count = msgs.len()))]
    async fn publish_batch(&self, msgs: &[TaskMessage]) -> Vec<Result<(), BrokerError>> {
        // `buffered` keeps PIPELINE_WINDOW publishes in flight, in order,
        // creating each as room frees up (collected first, a batch's
        // futures took one 150 KB block).
        self.publishes(msgs)
            .buffered(PIPELINE_WINDOW)
            .collect()
            .await
    }

    async fn health(&self) -> Result<(), BrokerError> {
        use async_nats::connection::State;
        match self.client.connection_state() {
            State::Connected => {}
            other => {
                return Err(BrokerError::Unavailable(format!(
                    "NATS connection is {other:?}"
                )));
            }
        }
        // The account info request proves JetStream answers; its body is
        // only checked for an error, since its shape varies by server
        // version.
        let request = self.client.request("$JS.API.INFO", Bytes::new());
        match tokio::time::timeout(HEALTH_TIMEOUT, request).await {
            Ok(Ok(reply)) => match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
                Ok(body) if body.get("error").is_none() => Ok(()),
                Ok(body) => Err(BrokerError::Unavailable(format!(
                    "JetStream answers with an error: {}",
                    body["error"]
                ))),
                Err(e) => Err(unavailable("JetStream answers gibberish", e)),
            },
            Ok(Err(e)) => Err(unavailable("JetStream does not answer", e)),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "JetStream did not answer within {HEALTH_TIMEOUT:?}"
            ))),
        }
    }

    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        let infos = futures::future::try_join_all(self.lanes.iter().map(|lane| async move {
            let name = &lane.consumer.cached_info().name;
            self.tasks
                .consumer_info(name)
                .await
                .map_err(|e| unavailable("cannot read consumer state", e))
        }))
        .await?;
        Ok(infos.iter().map(|info| info.num_pending).sum())
    }
}
