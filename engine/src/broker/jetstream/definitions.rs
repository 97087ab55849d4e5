//! The stream and consumer definitions, read from `broker-config/nats/`
//! (the files an operator applies with `nats stream add --config` and
//! `nats consumer add --config`) and adjusted to this process's
//! [`NatsSettings`]: names, subjects and limits.

use std::time::Duration;

use async_nats::jetstream::{consumer::pull, stream};

use crate::broker::{BrokerError, PriorityBand};
use crate::config::NatsSettings;

const TASK_STREAM: &str = include_str!("../../../../broker-config/nats/stream-tasks.json");
const DEAD_LETTER_STREAM: &str =
    include_str!("../../../../broker-config/nats/stream-dead-letters.json");
const CONSUMER_HIGH: &str = include_str!("../../../../broker-config/nats/consumer-high.json");
const CONSUMER_NORMAL: &str = include_str!("../../../../broker-config/nats/consumer-normal.json");
const CONSUMER_LOW: &str = include_str!("../../../../broker-config/nats/consumer-low.json");

/// The subject of one band's tasks: `<subject_prefix>.<band>`.
pub fn band_subject(settings: &NatsSettings, band: PriorityBand) -> String {
    format!("{}.{}", settings.subject_prefix, band.as_str())
}

/// The durable consumer of one band: `<consumer_prefix>-<band>`.
pub fn consumer_name(settings: &NatsSettings, band: PriorityBand) -> String {
    format!("{}-{}", settings.consumer_prefix, band.as_str())
}

/// Everything the JetStream backend creates.
#[derive(Debug, Clone)]
pub struct Definitions {
    /// The work-queue stream of tasks.
    pub tasks: stream::Config,
    /// The dead-letter stream.
    pub dead_letters: stream::Config,
    /// One durable pull consumer per band, in [`PriorityBand::PULL_ORDER`].
    pub consumers: Vec<(PriorityBand, pull::Config)>,
}

impl Definitions {
    /// The definitions from `broker-config/nats/`, with the names and limits
    /// of `settings`.
    ///
    /// # Errors
    /// [`BrokerError::Setup`] when an embedded file does not parse (caught by
    /// this module's tests) or a setting is out of range.
    pub fn from_settings(settings: &NatsSettings) -> Result<Self, BrokerError> {
        let mut tasks: stream::Config = parse("stream-tasks.json", TASK_STREAM)?;
        tasks.name.clone_from(&settings.stream);
        tasks.subjects = PriorityBand::PULL_ORDER
            .iter()
            .map(|band| band_subject(settings, *band))
            .collect();
        tasks.duplicate_window = Duration::from_millis(settings.duplicate_window_ms);
        tasks.num_replicas = settings.replicas.max(1);
        // The stream announces nothing. Workers learn of new tasks from pulls
        // parked on the server (see `arrivals`); announcing each stored
        // message that carries a message id would cost the server about as
        // much as storing it. (A 2.9 server cannot remove `republish` from an
        // existing stream: setup then warns and keeps the stream as it is.)
        tasks.republish = None;

        let mut dead_letters: stream::Config =
            parse("stream-dead-letters.json", DEAD_LETTER_STREAM)?;
        dead_letters.name.clone_from(&settings.dead_letter_stream);
        dead_letters.subjects = vec![format!("{}.>", settings.dead_letter_subject_prefix)];
        dead_letters.num_replicas = settings.replicas.max(1);

        let mut consumers = Vec::with_capacity(3);
        for band in PriorityBand::PULL_ORDER {
            let (file, text) = match band {
                PriorityBand::High => ("consumer-high.json", CONSUMER_HIGH),
                PriorityBand::Normal => ("consumer-normal.json", CONSUMER_NORMAL),
                PriorityBand::Low => ("consumer-low.json", CONSUMER_LOW),
            };
            let mut config: pull::Config = parse(file, text)?;
            config.durable_name = Some(consumer_name(settings, band));
            config.filter_subject = band_subject(settings, band);
            config.ack_wait = Duration::from_millis(settings.ack_wait_ms);
            config.max_deliver = settings.max_deliver;
            config.max_ack_pending = settings.max_ack_pending;
            consumers.push((band, config));
        }
        Ok(Self {
            tasks,
            dead_letters,
            consumers,
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, BrokerError> {
    serde_json::from_str(text)
        .map_err(|e| BrokerError::Setup(format!("broker-config/nats/{file} does not parse: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::consumer::AckPolicy;
    use async_nats::jetstream::stream::{RetentionPolicy, StorageType};

    #[test]
    fn the_files_parse_and_take_the_settings() {
        let settings = NatsSettings {
            stream: "T1".into(),
            subject_prefix: "t1.tasks".into(),
            consumer_prefix: "t1-workers".into(),
            dead_letter_stream: "D1".into(),
            dead_letter_subject_prefix: "t1.dead".into(),
            ack_wait_ms: 1500,
            max_deliver: 7,
            max_ack_pending: 99,
            duplicate_window_ms: 60_000,
            ..NatsSettings::default()
        };
        let d = Definitions::from_settings(&settings).unwrap();
        assert_eq!(d.tasks.name, "T1");
        assert_eq!(
            d.tasks.subjects,
            ["t1.tasks.high", "t1.tasks.normal", "t1.tasks.low"]
        );
        assert_eq!(d.tasks.republish, None, "no announcements of stored tasks");
        assert_eq!(d.tasks.retention, RetentionPolicy::WorkQueue);
        assert_eq!(d.tasks.storage, StorageType::File);
        assert!(d.tasks.max_message_size >= 1024 * 1024);
        assert_eq!(d.tasks.duplicate_window, Duration::from_secs(60));
        assert_eq!(d.dead_letters.name, "D1");
        assert_eq!(d.dead_letters.subjects, ["t1.dead.>"]);
        assert_eq!(d.dead_letters.retention, RetentionPolicy::Limits);
        assert_eq!(d.dead_letters.max_age, Duration::from_secs(14 * 24 * 3600));
        let bands: Vec<_> = d.consumers.iter().map(|(b, _)| *b).collect();
        assert_eq!(bands, PriorityBand::PULL_ORDER);
        let (_, high) = &d.consumers[0];
        assert_eq!(high.durable_name.as_deref(), Some("t1-workers-high"));
        assert_eq!(high.filter_subject, "t1.tasks.high");
        assert_eq!(high.ack_policy, AckPolicy::Explicit);
        assert_eq!(high.ack_wait, Duration::from_millis(1500));
        assert_eq!(high.max_deliver, 7);
        assert_eq!(high.max_ack_pending, 99);
    }

    #[test]
    fn the_files_name_the_default_resources() {
        // The files double as the operator's copy: their own names must be the
        // defaults, so applying them by hand matches what the processes use.
        let defaults = NatsSettings::default();
        let tasks: stream::Config = parse("t", TASK_STREAM).unwrap();
        assert_eq!(tasks.name, defaults.stream);
        let from_settings = Definitions::from_settings(&defaults).unwrap();
        assert_eq!(tasks.subjects, from_settings.tasks.subjects);
        assert_eq!(tasks.duplicate_window, from_settings.tasks.duplicate_window);
        assert_eq!(tasks.republish, from_settings.tasks.republish);
        let dead: stream::Config = parse("d", DEAD_LETTER_STREAM).unwrap();
        assert_eq!(dead.name, defaults.dead_letter_stream);
        assert_eq!(dead.subjects, from_settings.dead_letters.subjects);
        for (band, config) in &from_settings.consumers {
            let file_config: pull::Config = parse(
                "c",
                match band {
                    PriorityBand::High => CONSUMER_HIGH,
                    PriorityBand::Normal => CONSUMER_NORMAL,
                    PriorityBand::Low => CONSUMER_LOW,
                },
            )
            .unwrap();
            assert_eq!(file_config.durable_name, config.durable_name);
            assert_eq!(file_config.filter_subject, config.filter_subject);
            assert_eq!(file_config.ack_wait, config.ack_wait);
            assert_eq!(file_config.max_deliver, config.max_deliver);
            assert_eq!(file_config.max_ack_pending, config.max_ack_pending);
        }
    }
}
