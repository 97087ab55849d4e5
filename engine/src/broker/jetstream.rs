//! The NATS JetStream broker, the default in production (written for the
//! 2.9 server: no per-message TTL, no priority groups).
//!
//! Layout (definitions in `broker-config/nats/`, see [`definitions`]):
//! - one work-queue stream of tasks with a subject per [`PriorityBand`],
//!   `<subject_prefix>.high|normal|low`, deduplicating on the task id
//!   (`Nats-Msg-Id`) within the duplicate window;
//! - one durable pull consumer per band, shared by every worker process,
//!   with explicit acks and `max_ack_pending` as the cluster-wide bound;
//! - a dead-letter stream `<dead_letter_subject_prefix>.<task id>` kept for
//!   14 days.
//!
//! Priority is enforced by the puller: a worker always empties what the
//! high band has before asking the normal band, and so on (see
//! [`TaskConsumer::next_batch`] in `consume`). A 2.11+ server could use
//! priority groups instead; a 2.12+ server could delay retries with message
//! schedules rather than `Nak` delays.
//!
//! One [`JetStreamBroker`] implements [`TaskPublisher`], [`TaskConsumer`] and
//! [`DeadLetterStore`] over one connection; async-nats reconnects on its
//! own, and calls made while it is away fail with
//! [`BrokerError::Unavailable`] so that callers back off.
//!
//! [`TaskPublisher`]: crate::broker::TaskPublisher
//! [`TaskConsumer`]: crate::broker::TaskConsumer
//! [`TaskConsumer::next_batch`]: crate::broker::TaskConsumer::next_batch
//! [`DeadLetterStore`]: crate::broker::DeadLetterStore

mod acks;
mod arrivals;
mod consume;
mod dead_letter;
pub mod definitions;
mod publish;
mod setup;
#[cfg(test)]
mod test_queue;

use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, consumer::PullConsumer, stream::Stream};

use self::definitions::Definitions;
use crate::broker::{BrokerError, PriorityBand};
use crate::config::NatsSettings;

/// Header carrying the task id on task and dead-letter messages, so tools
/// can find a task without parsing the body.
pub const TASK_ID_HEADER: &str = "ClaudeCluster-Task-Id";

/// Header carrying the time a message was dead-lettered (RFC 3339).
pub const DEAD_LETTERED_AT_HEADER: &str = "ClaudeCluster-Dead-Lettered-At";

/// How long `health` waits for JetStream to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// One band's subject and durable consumer.
#[derive(Debug)]
struct Lane {
    band: PriorityBand,
    subject: String,
    consumer: PullConsumer,
}

/// Tasks on NATS JetStream.
pub struct JetStreamBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
    /// In [`PriorityBand::PULL_ORDER`].
    lanes: Vec<Lane>,
    tasks: Stream,
    dead_letters: Stream,
    definitions: Definitions,
    /// When the last repair of missing resources started; held across the
    /// repair so concurrent callers wait for one repair instead of each
    /// running one.
    last_repair: tokio::sync::Mutex<Option<Instant>>,
    /// Which bands may hold work; started by the first pull, so a broker
    /// that only publishes (the intake) never watches arrivals.
    arrivals: tokio::sync::OnceCell<std::sync::Arc<arrivals::Arrivals>>,
    /// Sends the plain acks of the deliveries it hands out; started with
    /// the first of them.
    acks: std::sync::OnceLock<acks::AckSender>,
}

/// Why a publish was not confirmed.
enum PublishFailure {
    /// No stream takes the subject (it was deleted, or the server lost its
    /// state): worth recreating it.
    NoStream,
    /// Anything else.
    Other(String),
}

impl From<PublishFailure> for BrokerError {
    fn from(f: PublishFailure) -> Self {
        match f {
            PublishFailure::NoStream => {
                BrokerError::NotConfirmed("no stream takes this subject".into())
            }
            PublishFailure::Other(reason) => BrokerError::NotConfirmed(reason),
        }
    }
}

impl std::fmt::Debug for JetStreamBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBroker")
            .field("stream", &self.settings.stream)
            .field("subject_prefix", &self.settings.subject_prefix)
            .finish_non_exhaustive()
    }
}

impl JetStreamBroker {
    /// Sets up (idempotently) the streams and consumers named by `settings`
    /// on a connected client, and returns the broker.
    ///
    /// # Errors
    /// [`BrokerError::Setup`] when a stream or consumer cannot be created
    /// or is unusable as it exists.
    pub async fn setup(
        client: async_nats::Client,
        settings: &NatsSettings,
    ) -> Result<Self, BrokerError> {
        let definitions = Definitions::from_settings(settings)?;
        let js = jetstream::ContextBuilder::new()
            // Bounds publish acks, double acks and API calls alike.
            .timeout(Duration::from_millis(settings.publish_timeout_ms.max(1)))
            .build(client.clone());

        let tasks = setup::ensure_stream(&js, &definitions.tasks).await?;
        let dead_letters = setup::ensure_stream(&js, &definitions.dead_letters).await?;
        let mut lanes = Vec::with_capacity(definitions.consumers.len());
        for (band, config) in &definitions.consumers {
            let consumer = setup::ensure_consumer(&tasks, config).await?;
            lanes.push(Lane {
                band: *band,
                subject: config.filter_subject.clone(),
                consumer,
            });
        }
        Ok(Self {
            client,
            js,
            settings: settings.clone(),
            lanes,
            tasks,
            dead_letters,
            definitions,
            last_repair: tokio::sync::Mutex::new(None),
            arrivals: tokio::sync::OnceCell::new(),
            acks: std::sync::OnceLock::new(),
        })
    }

    /// Recreates the streams and consumers when they have gone missing (a
    /// server that restarted without its storage, a stream deleted by
    /// mistake), unless a repair has started since the caller saw them
    /// missing at `noticed`: one repair serves every call that failed before
    /// it, so a batch of failed publishes costs one repair, not one each.
    ///
    /// # Errors
    /// When they cannot be recreated.
    async fn repair(&self, noticed: Instant) -> Result<(), BrokerError> {
        let mut last = self.last_repair.lock().await;
        if last.is_some_and(|started| started > noticed) {
            return Ok(());
        }
        *last = Some(Instant::now());
        tracing::warn!(stream = %self.settings.stream, "JetStream resources missing; recreating them");
        let tasks = setup::ensure_stream(&self.js, &self.definitions.tasks).await?;
        setup::ensure_stream(&self.js, &self.definitions.dead_letters).await?;
        for (_, config) in &self.definitions.consumers {
            setup::ensure_consumer(&tasks, config).await?;
        }
        Ok(())
    }

    /// Publishes and waits for the stream's confirmation, within the
    /// publish timeout.
    async fn send_confirmed(
        &self,
        subject: String,
        message: PublishMessage,
    ) -> Result<PublishAck, PublishFailure> {
        let failure = |e: async_nats::jetstream::context::PublishError| match e.kind() {
            PublishErrorKind::StreamNotFound => PublishFailure::NoStream,
            _ => PublishFailure::Other(e.to_string()),
        };
        // While the client is reconnecting it would queue the message and
        // send it once it is back: after the caller has been told the
        // publish failed and has, say, removed the task's record. Fail at
        // once instead, so "not confirmed" almost always means "not sent".
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishFailure::Other("not connected to NATS".into()));
        }
        let timeout = Duration::from_millis(self.settings.publish_timeout_ms.max(1));
        let confirmed = async {
            // Boxed: inline, async-nats's send made every publish's future
            // larger than the allocator's per-thread cache serves (1 KiB),
            // and a batch allocates one per task.
            let ack = Box::pin(self.js.send_publish(subject, message))
                .await
                .map_err(failure)?;
            ack.await.map_err(failure)
        };
        tokio::time::timeout(timeout, confirmed)
            .await
            .unwrap_or_else(|_| {
                Err(PublishFailure::Other(format!(
                    "no confirmation within {timeout:?}"
                )))
            })
    }

    /// [`Self::send_confirmed`] of what `outbound` builds, recreating a
    /// missing stream and trying once more. The message is built again for
    /// the second try rather than kept: copying its headers for a try that
    /// almost never comes cost every publish.
    async fn publish_repairing(
        &self,
        outbound: impl Fn() -> Result<(String, PublishMessage), BrokerError>,
    ) -> Result<PublishAck, BrokerError> {
        let (subject, message) = outbound()?;
        match self.send_confirmed(subject, message).await {
            // Boxed: the repair future is large, and every publish of a
            // batch would otherwise carry (and move) room for it.
            Err(PublishFailure::NoStream) => {
                Box::pin(async {
                    self.repair(Instant::now()).await?;
                    let (subject, message) = outbound()?;
                    Ok(self.send_confirmed(subject, message).await?)
                })
                .await
            }
            other => Ok(other?),
        }
    }

    /// The settings this broker was set up with.
    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    fn lane(&self, band: PriorityBand) -> &Lane {
        // Setup builds one lane per band in PULL_ORDER, so the lookup always
        // succeeds; indexing by position keeps it allocation-free.
        let i = PriorityBand::PULL_ORDER
            .iter()
            .position(|b| *b == band)
            .unwrap_or(0);
        &self.lanes[i]
    }
}

/// A header value may not contain line breaks (they would end the header
/// block); trace context and reasons come from outside, so they are checked
/// or cleaned before use.
fn header_safe(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 1024
        && value.chars().all(|c| c.is_ascii_graphic() || c == ' ')
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("{what}: {e}"))
}
