//! Idempotent start-up setup of the streams and consumers.
//!
//! Whichever process starts first creates what is missing; every process
//! then converges what exists towards the definitions. Racing processes both
//! succeed (creating an identical stream or consumer is a no-op for the
//! server, and a lost race falls back to the "exists" path). Resources an
//! operator created beforehand are used as they are when they cannot be
//! updated: only settings we manage are compared, the difference is logged,
//! and setup fails only when the difference would break delivery (a stream
//! without our subjects, a consumer filtering another band).

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{self, PullConsumer, pull};
use async_nats::jetstream::stream::{self, Stream};
use async_nats::jetstream::{self, context::ConsumerInfoErrorKind, context::GetStreamErrorKind};

use crate::broker::BrokerError;

/// Attempts at the get-or-create loop before giving up on a resource that
/// keeps appearing and disappearing.
const ATTEMPTS: usize = 3;

/// Stream settings we own; everything else (byte limits, say) stays as the
/// operator left it.
fn stream_differences(current: &stream::Config, desired: &stream::Config) -> Vec<&'static str> {
    let mut diffs = Vec::new();
    let mut current_subjects = current.subjects.clone();
    let mut desired_subjects = desired.subjects.clone();
    current_subjects.sort();
    desired_subjects.sort();
    if current_subjects != desired_subjects {
        diffs.push("subjects");
    }
    if current.retention != desired.retention {
        diffs.push("retention");
    }
    if current.storage != desired.storage {
        diffs.push("storage");
    }
    if current.num_replicas != desired.num_replicas {
        diffs.push("num_replicas");
    }
    if current.duplicate_window != desired.duplicate_window {
        diffs.push("duplicate_window");
    }
    if current.max_message_size != desired.max_message_size {
        diffs.push("max_msg_size");
    }
    if current.discard != desired.discard {
        diffs.push("discard");
    }
    if current.max_age != desired.max_age {
        diffs.push("max_age");
    }
    if current.allow_direct != desired.allow_direct {
        diffs.push("allow_direct");
    }
    if current.republish != desired.republish {
        diffs.push("republish");
    }
    diffs
}

/// `current` with the settings we own taken from `desired`.
fn merged_stream(current: &stream::Config, desired: &stream::Config) -> stream::Config {
    stream::Config {
        subjects: desired.subjects.clone(),
        retention: desired.retention,
        storage: desired.storage,
        num_replicas: desired.num_replicas,
        duplicate_window: desired.duplicate_window,
        max_message_size: desired.max_message_size,
        discard: desired.discard,
        max_age: desired.max_age,
        allow_direct: desired.allow_direct,
        republish: desired.republish.clone(),
        ..current.clone()
    }
}

/// Creates the stream, or brings an existing one in line.
///
/// # Errors
/// [`BrokerError::Setup`] when the stream cannot be created, or exists
/// without all of our subjects and cannot be fixed.
pub(super) async fn ensure_stream(
    js: &jetstream::Context,
    desired: &stream::Config,
) -> Result<Stream, BrokerError> {
    let name = desired.name.as_str();
    for _ in 0..ATTEMPTS {
        match js.get_stream(name).await {
            Ok(stream) => return converge_stream(js, stream, desired).await,
            Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref je) if je.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                match js.create_stream(desired.clone()).await {
                    Ok(stream) => {
                        tracing::info!(stream = name, "created stream");
                        return Ok(stream);
                    }
                    // Another process created it first, with other settings
                    // (same settings succeed): go round and converge.
                    Err(e) => {
                        tracing::debug!(stream = name, error = %e, "stream creation lost a race")
                    }
                }
            }
            Err(e) => {
                return Err(BrokerError::Setup(format!(
                    "cannot look up stream {name}: {e}"
                )));
            }
        }
    }
    Err(BrokerError::Setup(format!(
        "stream {name} could neither be found nor created"
    )))
}

async fn converge_stream(
    js: &jetstream::Context,
    stream: Stream,
    desired: &stream::Config,
) -> Result<Stream, BrokerError> {
    let name = desired.name.as_str();
    let current = stream.cached_info().config.clone();
    let diffs = stream_differences(&current, desired);
    if diffs.is_empty() {
        return Ok(stream);
    }
    match js.update_stream(merged_stream(&current, desired)).await {
        Ok(_) => {
            tracing::info!(stream = name, changed = ?diffs, "updated stream to its definition");
            js.get_stream(name)
                .await
                .map_err(|e| BrokerError::Setup(format!("cannot look up stream {name}: {e}")))
        }
        Err(e) => {
            let missing: Vec<&String> = desired
                .subjects
                .iter()
                .filter(|s| !current.subjects.contains(s))
                .collect();
            if !missing.is_empty() {
                return Err(BrokerError::Setup(format!(
                    "stream {name} does not carry subjects {missing:?} and cannot be updated: {e}"
                )));
            }
            tracing::warn!(
                stream = name,
                differs = ?diffs,
                error = %e,
                "stream differs from its definition and cannot be updated; using it as it is"
            );
            Ok(stream)
        }
    }
}

fn consumer_differences(current: &consumer::Config, desired: &pull::Config) -> Vec<&'static str> {
    let mut diffs = Vec::new();
    if current.filter_subject != desired.filter_subject {
        diffs.push("filter_subject");
    }
    if current.ack_policy != desired.ack_policy {
        diffs.push("ack_policy");
    }
    if current.ack_wait != desired.ack_wait {
        diffs.push("ack_wait");
    }
    if current.max_deliver != desired.max_deliver {
        diffs.push("max_deliver");
    }
    if current.max_ack_pending != desired.max_ack_pending {
        diffs.push("max_ack_pending");
    }
    if current.max_waiting != desired.max_waiting {
        diffs.push("max_waiting");
    }
    diffs
}

/// Creates a band's durable consumer, or brings an existing one in line.
///
/// # Errors
/// [`BrokerError::Setup`] when it cannot be created, or exists filtering
/// another subject or without explicit acks and cannot be fixed.
pub(super) async fn ensure_consumer(
    stream: &Stream,
    desired: &pull::Config,
) -> Result<PullConsumer, BrokerError> {
    let name = desired.durable_name.clone().unwrap_or_default();
    for _ in 0..ATTEMPTS {
        match stream.consumer_info(&name).await {
            Ok(info) => return converge_consumer(stream, &info.config, desired).await,
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                match stream.create_consumer(desired.clone()).await {
                    Ok(consumer) => {
                        tracing::info!(consumer = %name, "created consumer");
                        return Ok(consumer);
                    }
                    Err(e) => {
                        tracing::debug!(consumer = %name, error = %e, "consumer creation lost a race")
                    }
                }
            }
            Err(e) => {
                return Err(BrokerError::Setup(format!(
                    "cannot look up consumer {name}: {e}"
                )));
            }
        }
    }
    Err(BrokerError::Setup(format!(
        "consumer {name} could neither be found nor created"
    )))
}

async fn converge_consumer(
    stream: &Stream,
    current: &consumer::Config,
    desired: &pull::Config,
) -> Result<PullConsumer, BrokerError> {
    let name = desired.durable_name.clone().unwrap_or_default();
    let existing = || async {
        stream
            .get_consumer::<pull::Config>(&name)
            .await
            .map_err(|e| BrokerError::Setup(format!("cannot open consumer {name}: {e}")))
    };
    let diffs = consumer_differences(current, desired);
    if diffs.is_empty() {
        return existing().await;
    }
    match stream.create_consumer(desired.clone()).await {
        Ok(updated) => {
            tracing::info!(consumer = %name, changed = ?diffs, "updated consumer to its definition");
            Ok(updated)
        }
        Err(e) => {
            if diffs.contains(&"filter_subject") || diffs.contains(&"ack_policy") {
                return Err(BrokerError::Setup(format!(
                    "consumer {name} has filter {:?} and ack policy {:?} (expected {:?}, {:?}) and cannot be updated: {e}",
                    current.filter_subject,
                    current.ack_policy,
                    desired.filter_subject,
                    desired.ack_policy
                )));
            }
            tracing::warn!(
                consumer = %name,
                differs = ?diffs,
                error = %e,
                "consumer differs from its definition and cannot be updated; using it as it is"
            );
            existing().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_owned_stream_settings_are_compared_and_merged() {
        let desired = stream::Config {
            name: "S".into(),
            subjects: vec!["a.high".into(), "a.low".into()],
            duplicate_window: Duration::from_secs(120),
            max_message_size: 1 << 20,
            ..Default::default()
        };
        let operator = stream::Config {
            subjects: vec!["a.low".into(), "a.high".into()],
            max_bytes: 1 << 30,
            ..desired.clone()
        };
        assert!(stream_differences(&operator, &desired).is_empty());

        let old = stream::Config {
            duplicate_window: Duration::from_secs(60),
            ..operator.clone()
        };
        assert_eq!(stream_differences(&old, &desired), ["duplicate_window"]);
        let merged = merged_stream(&old, &desired);
        assert_eq!(merged.duplicate_window, Duration::from_secs(120));
        assert_eq!(merged.max_bytes, 1 << 30, "the operator's limit is kept");
    }
}
