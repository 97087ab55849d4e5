//! Operations on the dead letters: list, replay, discard.
//!
//! A replay reopens the task's record (`queued`, result and error cleared,
//! attempt history kept), publishes the original message again and then
//! deletes the dead letter. It publishes under a message id of its own
//! (`<task id>.replay.<seq>`, see [`TaskPublisher::republish`]): the broker's
//! duplicate window remembers the task id of the first publish and would
//! otherwise drop a replay made soon after it.
//!
//! [`TaskPublisher::republish`]: claudecluster_engine::broker::TaskPublisher::republish

use chrono::{DateTime, Utc};
use claudecluster_engine::broker::DeadLetter;
use claudecluster_engine::task::TaskMessage;
use claudecluster_engine::{TaskId, TaskRecord};
use serde::Serialize;
use serde_json::Value;

use super::{ServiceError, TaskService};

/// A dead letter as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterView {
    /// Its sequence number: the id to replay or delete it by.
    pub seq: u64,
    /// The task id, when the payload was readable far enough.
    pub task_id: Option<TaskId>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The original message: JSON when it parses, else the text (invalid
    /// UTF-8 replaced).
    pub payload: Value,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(dl: DeadLetter) -> Self {
        let payload = serde_json::from_slice(&dl.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&dl.payload).into_owned()));
        Self {
            seq: dl.seq,
            task_id: dl.task_id,
            reason: dl.reason,
            at: dl.at,
            payload,
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replayed {
    /// The reopened, `queued` record.
    pub task: TaskRecord,
    /// The dead letter that was replayed.
    pub seq: u64,
    /// Whether the dead letter was deleted; when false (the delete failed
    /// after the publish) it is still listed and should be deleted by hand,
    /// not replayed again.
    pub dead_letter_removed: bool,
}

impl TaskService {
    /// Dead letters after `after`, oldest first, at most `limit` (clamped to
    /// 1..=[`super::MAX_PAGE`]), only `task_id`'s when given.
    ///
    /// # Errors
    /// A broker failure.
    pub async fn dead_letters(
        &self,
        after: Option<u64>,
        limit: usize,
        task_id: Option<TaskId>,
    ) -> Result<Vec<DeadLetterView>, ServiceError> {
        let limit = limit.clamp(1, super::MAX_PAGE);
        let letters = self
            .backends
            .dead_letters
            .list(after, limit, task_id)
            .await?;
        Ok(letters.into_iter().map(DeadLetterView::from).collect())
    }

    /// Puts a dead-lettered task back on the queue (see the module docs).
    ///
    /// # Errors
    /// [`ServiceError::DeadLetterNotFound`], [`ServiceError::Unreplayable`]
    /// when the payload is not a valid task message,
    /// [`ServiceError::Publish`] when the queue did not confirm (the dead
    /// letter is kept, so the replay can simply be retried), or a backend
    /// failure.
    #[tracing::instrument(skip_all, fields(seq = seq, task_id))]
    pub async fn replay_dead_letter(&self, seq: u64) -> Result<Replayed, ServiceError> {
        let dl = self
            .backends
            .dead_letters
            .get(seq)
            .await?
            .ok_or(ServiceError::DeadLetterNotFound(seq))?;
        let unreplayable = |reason: String| ServiceError::Unreplayable { seq, reason };
        let msg: TaskMessage = serde_json::from_slice(&dl.payload)
            .map_err(|e| unreplayable(format!("the payload is not a task message ({e})")))?;
        msg.validate(&self.settings.tasks)
            .map_err(|e| unreplayable(format!("the task message is invalid ({e})")))?;
        tracing::Span::current().record("task_id", tracing::field::display(msg.id));

        let now = Utc::now();
        let this = self.clone();
        super::detached(async move { this.reenqueue(seq, msg, now).await }).await
    }

    /// Reopens, publishes, and deletes the dead letter.
    async fn reenqueue(
        &self,
        seq: u64,
        msg: TaskMessage,
        now: DateTime<Utc>,
    ) -> Result<Replayed, ServiceError> {
        let task = self.backends.store.reopen(&msg, now).await?;
        let replay_id = format!("{}.replay.{seq}", msg.id);
        self.backends
            .publisher
            .republish(&msg, &replay_id)
            .await
            .map_err(ServiceError::Publish)?;
        let dead_letter_removed = match self.backends.dead_letters.delete(seq).await {
            Ok(removed) => removed,
            Err(e) => {
                tracing::error!(error = %e, "replayed, but the dead letter could not be deleted");
                false
            }
        };
        tracing::info!("dead letter replayed");
        Ok(Replayed {
            task,
            seq,
            dead_letter_removed,
        })
    }

    /// Discards a dead letter.
    ///
    /// # Errors
    /// [`ServiceError::DeadLetterNotFound`], or a broker failure.
    pub async fn delete_dead_letter(&self, seq: u64) -> Result<(), ServiceError> {
        if self.backends.dead_letters.delete(seq).await? {
            Ok(())
        } else {
            Err(ServiceError::DeadLetterNotFound(seq))
        }
    }
}
