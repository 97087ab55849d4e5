//! How tasks travel from the intake to the workers.
//!
//! Two small traits hide the broker: [`TaskPublisher`] for the intake and
//! [`TaskConsumer`] for the workers. Each delivery carries an [`Acker`] that
//! maps the typed [`AckKind`] onto the broker's own acknowledgements.
//!
//! Implementations: [`jetstream`] (NATS JetStream, the default in production)
//! and [`embedded`] (a durable queue in a local database file, for the
//! all-in-one `claudecluster serve`).
//!
//! Priority: every broker keeps one lane per [`PriorityBand`]; a worker always
//! takes from the highest non-empty band first, so a priority-10 task submitted
//! behind a backlog of priority-1 tasks starts before that backlog drains.

pub mod embedded;
pub mod jetstream;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::task::{TaskId, TaskMessage};

/// Header (JetStream) or property carrying the reason a message was
/// dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "ClaudeCluster-Dead-Letter-Reason";

/// Longest dead-letter reason kept, in bytes (it travels as a header line).
pub(crate) const MAX_REASON_BYTES: usize = 1024;

/// A dead-letter reason as every backend keeps it: one line (control
/// characters become spaces), at most [`MAX_REASON_BYTES`], and
/// `unspecified` when empty, so operators see the same text on either
/// backend.
pub(crate) fn one_line_reason(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    if out.trim().is_empty() {
        "unspecified".into()
    } else {
        out
    }
}

/// The three lanes tasks travel in. Bands rather than ten lanes keep the
/// number of empty polls per pull small while still letting urgent work
/// overtake a backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PriorityBand {
    /// Priorities 1 to 3.
    Low,
    /// Priorities 4 to 7 (the default, 5, is here).
    Normal,
    /// Priorities 8 to 10.
    High,
}

impl PriorityBand {
    /// Bands in the order workers take from them.
    pub const PULL_ORDER: [PriorityBand; 3] =
        [PriorityBand::High, PriorityBand::Normal, PriorityBand::Low];

    /// The band of a task priority (1 to 10).
    pub fn of(priority: u8) -> Self {
        match priority {
            0..=3 => PriorityBand::Low,
            4..=7 => PriorityBand::Normal,
            _ => PriorityBand::High,
        }
    }

    /// Lower-case name used in subjects, consumer names and queue names.
    pub fn as_str(self) -> &'static str {
        match self {
            PriorityBand::Low => "low",
            PriorityBand::Normal => "normal",
            PriorityBand::High => "high",
        }
    }
}

/// What a worker tells the broker about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Done: remove the message.
    Ack,
    /// Not done: deliver again, after the delay if one is given.
    Nak(Option<Duration>),
    /// Still working: extend the lease.
    Progress,
    /// Never deliver again (the caller has dead-lettered it).
    Term,
}

/// Errors from a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached or the connection dropped.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker did not confirm a publish in time, or refused it.
    #[error("publish not confirmed: {0}")]
    NotConfirmed(String),
    /// Setting up streams, consumers or queues failed.
    #[error("broker setup failed: {0}")]
    Setup(String),
    /// Anything else the broker reported.
    #[error("broker error: {0}")]
    Other(String),
}

/// Publishes task messages (the intake side).
#[async_trait]
pub trait TaskPublisher: Send + Sync + 'static {
    /// Publishes one task and waits until the broker has durably stored it.
    /// Publishing the same task id twice within the broker's duplicate window
    /// stores it once.
    ///
    /// # Errors
    /// [`BrokerError::NotConfirmed`] when the broker did not confirm.
    async fn publish(&self, msg: &TaskMessage) -> Result<(), BrokerError>;

    /// Publishes a task again for a replay from the dead letters, under the
    /// broker message id `replay_id` instead of the task id, so the duplicate
    /// window of the first publish does not drop it. The default publishes
    /// normally, for publishers without a duplicate window.
    ///
    /// # Errors
    /// [`BrokerError::NotConfirmed`] when the broker did not confirm.
    async fn republish(&self, msg: &TaskMessage, replay_id: &str) -> Result<(), BrokerError> {
        let _ = replay_id;
        self.publish(msg).await
    }

    /// Publishes many tasks, pipelined: all are sent, then all confirmations
    /// are awaited together. The result has one entry per message, in order.
    async fn publish_batch(&self, msgs: &[TaskMessage]) -> Vec<Result<(), BrokerError>>;

    /// Checks that the broker is reachable.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] with the reason.
    async fn health(&self) -> Result<(), BrokerError>;

    /// Tasks waiting to be delivered, over all bands.
    ///
    /// # Errors
    /// When the broker cannot be asked.
    async fn queue_depth(&self) -> Result<u64, BrokerError>;
}

/// Acknowledges one delivery.
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// Sends the acknowledgement. `Term` waits for the broker's confirmation
    /// where the broker offers one; `Ack` need not, because the worker has
    /// written the final record first and a redelivery of a finished task is
    /// answered from the store without running it again.
    ///
    /// # Errors
    /// When the broker could not be told; the delivery will then come back
    /// after its lease expires.
    async fn ack(&self, kind: AckKind) -> Result<(), BrokerError>;
}

/// One message handed to a worker.
pub struct Delivery {
    /// The raw message body, to be parsed and validated by the worker (it may
    /// come from any publisher).
    pub payload: Bytes,
    /// How many times this message has been delivered, 1 for the first.
    pub delivery_count: u32,
    /// The band it came from.
    pub band: PriorityBand,
    /// Acknowledges this delivery.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("bytes", &self.payload.len())
            .field("delivery_count", &self.delivery_count)
            .field("band", &self.band)
            .finish_non_exhaustive()
    }
}

/// A message on the dead-letter stream or queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Position in the dead-letter stream; the id used to replay or discard.
    pub seq: u64,
    /// The task id, when the message could be parsed far enough to find it.
    pub task_id: Option<TaskId>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The original message body.
    pub payload: Bytes,
    /// When it was dead-lettered.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Takes task messages off the queue (the worker side).
#[async_trait]
pub trait TaskConsumer: Send + Sync + 'static {
    /// Waits until at least one message is available and returns up to `max`
    /// of them, highest priority band first. The caller holds `max` permits
    /// of its concurrency limit, so the broker never hands it more messages
    /// than it can start.
    ///
    /// # Errors
    /// When the broker is unreachable; the caller backs off and tries again.
    async fn next_batch(&self, max: usize) -> Result<Vec<Delivery>, BrokerError>;

    /// Puts a message that cannot be processed on the dead-letter stream with
    /// its reason. The caller then `Term`s the delivery.
    ///
    /// # Errors
    /// When the dead-letter stream could not be written; the caller must not
    /// `Term` the delivery then.
    async fn dead_letter(
        &self,
        task_id: Option<TaskId>,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), BrokerError>;
}

/// The dead-letter stream or queue, for operators: list, inspect, discard.
/// Replaying is publishing the payload again with [`TaskPublisher`] and then
/// deleting the dead letter.
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Dead letters with `seq` greater than `after`, oldest first, at most
    /// `limit`; only those of `task_id` when given.
    ///
    /// # Errors
    /// When the broker is unreachable.
    async fn list(
        &self,
        after: Option<u64>,
        limit: usize,
        task_id: Option<TaskId>,
    ) -> Result<Vec<DeadLetter>, BrokerError>;

    /// One dead letter by its sequence number.
    ///
    /// # Errors
    /// When the broker is unreachable.
    async fn get(&self, seq: u64) -> Result<Option<DeadLetter>, BrokerError>;

    /// Removes a dead letter; `false` when there was none with that number.
    ///
    /// # Errors
    /// When the broker is unreachable.
    async fn delete(&self, seq: u64) -> Result<bool, BrokerError>;
}
