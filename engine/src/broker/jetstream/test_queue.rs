//! A work-queue stream with one pull consumer on the shared NATS, for the
//! tests of the worker's side of the broker; deleted when dropped.

use async_nats::jetstream::{self, consumer, consumer::PullConsumer, stream};
use claudecluster_testkit::services;

use crate::backend::testing;

/// A work-queue stream with one pull consumer, named uniquely.
pub(super) struct Queue {
    pub(super) js: jetstream::Context,
    pub(super) client: async_nats::Client,
    pub(super) name: String,
    pub(super) consumer: PullConsumer,
}

impl Queue {
    pub(super) async fn new() -> Self {
        Self::with_limits(512, -1).await
    }

    /// At most `max_waiting` pulls parked on the consumer.
    pub(super) async fn with_max_waiting(max_waiting: i64) -> Self {
        Self::with_limits(max_waiting, -1).await
    }

    /// At most `max_waiting` pulls parked on the consumer, and at most
    /// `max_ack_pending` messages out (-1: no limit).
    pub(super) async fn with_limits(max_waiting: i64, max_ack_pending: i64) -> Self {
        let client = async_nats::connect(services::nats_url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let name = services::unique("CCQUEUE").replace(['.', '-', ':'], "_");
        let stream = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{name}.tasks")],
                retention: stream::RetentionPolicy::WorkQueue,
                ..Default::default()
            })
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some("workers".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_waiting,
                max_ack_pending,
                ..Default::default()
            })
            .await
            .unwrap();
        Self {
            js,
            client,
            name,
            consumer,
        }
    }

    pub(super) async fn publish(&self, body: &'static str) {
        self.js
            .publish(format!("{}.tasks", self.name), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Pull requests parked on the consumer.
    pub(super) async fn parked(&mut self) -> usize {
        self.consumer.info().await.unwrap().num_waiting
    }

    /// Messages stored and not yet acknowledged.
    pub(super) async fn stored(&self) -> u64 {
        self.js
            .get_stream(&self.name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    }
}

/// The stream goes with the queue, also when a test fails.
impl Drop for Queue {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        testing::block_on_own_thread(async move {
            let deleted = async {
                let client = async_nats::connect(services::nats_url()).await?;
                jetstream::new(client).delete_stream(&name).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            if let Err(e) = deleted.await {
                eprintln!("test cleanup: cannot delete stream {name}: {e}");
            }
        });
    }
}
