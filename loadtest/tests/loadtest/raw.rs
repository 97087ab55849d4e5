//! The raw pipeline moves every message and leaves nothing behind.

use std::time::Duration;

use claudecluster_loadtest::raw::{self, RawConfig};
use claudecluster_testkit::services;

use crate::helpers::unique_name;

/// A small run; `like_tasks` turns on the task stream's features (acks
/// confirmed, message ids, republish).
fn config(name: &str, like_tasks: bool) -> RawConfig {
    RawConfig {
        nats_url: services::nats_url(),
        redis_url: services::redis_url(),
        name: name.to_owned(),
        count: 3_000,
        window: 64,
        batch: 50,
        consumers: 2,
        double_ack: like_tasks,
        msg_ids: like_tasks,
        republish: like_tasks,
        max_duration: Duration::from_secs(60),
        watch: Vec::new(),
    }
}

async fn assert_nothing_left(name: &str) {
    let nats = async_nats::connect(services::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    assert!(
        js.get_stream(name).await.is_err(),
        "stream {name} should have been deleted"
    );
    let mut redis = redis::Client::open(services::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(format!("{name}:*"))
        .arg("COUNT")
        .arg(100_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(keys.is_empty(), "keys left behind: {}", keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_published_written_and_acked() {
    let name = unique_name("CCRAWTEST");
    let report = raw::run(&config(&name, false)).await.unwrap();
    assert_eq!(report.published, 3_000);
    assert_eq!(report.consumed, 3_000);
    assert!(report.message_bytes > 0 && report.value_bytes > report.message_bytes);
    assert_nothing_left(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_acks_message_ids_and_republish_move_every_message_too() {
    let name = unique_name("CCRAWTEST");
    let report = raw::run(&config(&name, true)).await.unwrap();
    assert_eq!(report.consumed, 3_000);
    assert!(report.double_ack && report.msg_ids && report.republish);
    assert_nothing_left(&name).await;
}

#[tokio::test]
async fn a_stream_with_messages_is_not_drained() {
    let name = unique_name("CCRAWTEST");
    let js = async_nats::jetstream::new(async_nats::connect(services::nats_url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.x")],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        raw::wait_drained(
            &services::nats_url(),
            std::slice::from_ref(&name),
            Duration::ZERO
        )
        .await
        .unwrap(),
        0
    );
    js.publish(format!("{name}.x"), "one".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let left = raw::wait_drained(
        &services::nats_url(),
        std::slice::from_ref(&name),
        Duration::ZERO,
    )
    .await
    .unwrap();
    raw::cleanup(&services::nats_url(), &services::redis_url(), &[name], &[])
        .await
        .unwrap();
    assert_eq!(left, 1);
}

#[tokio::test]
async fn cleanup_of_missing_streams_and_keys_is_fine() {
    let name = unique_name("CCRAWTEST");
    let cleaned = raw::cleanup(
        &services::nats_url(),
        &services::redis_url(),
        std::slice::from_ref(&name),
        &[format!("{name}:")],
    )
    .await
    .unwrap();
    assert_eq!(cleaned, raw::Cleaned::default());
    assert!(
        raw::cleanup(
            &services::nats_url(),
            &services::redis_url(),
            &[],
            &[String::new()]
        )
        .await
        .is_err(),
        "an empty prefix must be refused"
    );
}
