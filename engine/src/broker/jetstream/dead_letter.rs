//! The dead-letter stream: messages a worker could not process, stored on
//! `<dead_letter_subject_prefix>.<task id>` (or `.unparsed` when the body
//! was not a task) with the reason in a header, kept for 14 days. Operators
//! list, inspect and delete them by stream sequence; listing walks the
//! stream with "next message on subject from sequence" lookups, so a task's
//! dead letters are found without reading the others.

use async_nats::HeaderMap;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{DeleteMessageErrorKind, RawMessageErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use tracing::instrument;

use super::{DEAD_LETTERED_AT_HEADER, JetStreamBroker, TASK_ID_HEADER, unavailable};
use crate::broker::{
    BrokerError, DEAD_LETTER_REASON_HEADER, DeadLetter, DeadLetterStore, one_line_reason,
};
use crate::task::TaskId;

impl JetStreamBroker {
    fn dead_letter_filter(&self, task_id: Option<TaskId>) -> String {
        let prefix = &self.settings.dead_letter_subject_prefix;
        match task_id {
            Some(id) => format!("{prefix}.{id}"),
            None => format!("{prefix}.>"),
        }
    }

    /// Stores a message on the dead-letter stream and waits for the stream
    /// to confirm it.
    pub(super) async fn publish_dead_letter(
        &self,
        task_id: Option<TaskId>,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let subject = format!(
            "{}.{}",
            self.settings.dead_letter_subject_prefix,
            task_id.map_or_else(|| "unparsed".to_owned(), |id| id.to_string())
        );
        let mut headers = HeaderMap::new();
        headers.insert(DEAD_LETTER_REASON_HEADER, one_line_reason(reason).as_str());
        headers.insert(
            DEAD_LETTERED_AT_HEADER,
            Utc::now()
                .to_rfc3339_opts(SecondsFormat::Millis, true)
                .as_str(),
        );
        if let Some(id) = task_id {
            headers.insert(TASK_ID_HEADER, id.to_string().as_str());
        }
        let message = PublishMessage::build()
            .payload(payload.clone())
            .headers(headers);
        self.publish_repairing(|| Ok((subject.clone(), message.clone())))
            .await
            .map(drop)
    }
}

fn to_dead_letter(message: StreamMessage) -> DeadLetter {
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    let task_id = header(TASK_ID_HEADER).and_then(|v| v.parse().ok());
    let reason = header(DEAD_LETTER_REASON_HEADER).unwrap_or_else(|| "unspecified".into());
    let at = header(DEAD_LETTERED_AT_HEADER)
        .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| {
            // Stored without our header (published by another tool): the
            // stream's own receive time.
            let nanos = message.time.unix_timestamp_nanos();
            DateTime::from_timestamp_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
        });
    DeadLetter {
        seq: message.sequence,
        task_id,
        reason,
        payload: message.payload,
        at,
    }
}

#[async_trait]
impl DeadLetterStore for JetStreamBroker {
    #[instrument(level = "debug", skip_all, fields(after, limit, task_id = ?task_id))]
    async fn list(
        &self,
        after: Option<u64>,
        limit: usize,
        task_id: Option<TaskId>,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let filter = self.dead_letter_filter(task_id);
        let mut seq = after.map_or(1, |a| a.saturating_add(1));
        let mut out = Vec::new();
        while out.len() < limit {
            let found = self
                .dead_letters
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(filter.clone())
                .send()
                .await;
            match found {
                Ok(message) => {
                    seq = message.sequence.saturating_add(1);
                    out.push(to_dead_letter(message));
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(unavailable("cannot read the dead letters", e)),
            }
        }
        Ok(out)
    }

    #[instrument(level = "debug", skip_all, fields(seq))]
    async fn get(&self, seq: u64) -> Result<Option<DeadLetter>, BrokerError> {
        match self
            .dead_letters
            .raw_message_builder()
            .sequence(seq)
            .send()
            .await
        {
            Ok(message) => Ok(Some(to_dead_letter(message))),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("cannot read the dead letters", e)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(seq))]
    async fn delete(&self, seq: u64) -> Result<bool, BrokerError> {
        match self.dead_letters.delete_message(seq).await {
            Ok(deleted) => Ok(deleted),
            // Servers differ in the code they give a missing sequence
            // (10037, 10043, or a generic 10057 on 2.9): look instead of
            // guessing.
            Err(e) if matches!(e.kind(), DeleteMessageErrorKind::JetStream(_)) => {
                if self.get(seq).await?.is_none() {
                    Ok(false)
                } else {
                    Err(unavailable("cannot delete the dead letter", e))
                }
            }
            Err(e) => Err(unavailable("cannot delete the dead letter", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_become_one_bounded_header_line() {
        assert_eq!(one_line_reason("bad\r\njson"), "bad  json");
        assert_eq!(one_line_reason(" \n"), "unspecified");
        let long = "é".repeat(2000);
        let cut = one_line_reason(&long);
        assert!(cut.len() <= crate::broker::MAX_REASON_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
