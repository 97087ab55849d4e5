//! Checks that only make sense for NATS JetStream and Redis: idempotent
//! setup against existing and racing definitions, the layout and TTL of
//! Redis keys, headers on the stream, and errors when a server is away.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use chrono::Utc;
use claudecluster_engine::backend;
use claudecluster_engine::broker::jetstream::JetStreamBroker;
use claudecluster_engine::broker::jetstream::definitions::Definitions;
use claudecluster_engine::broker::{BrokerError, PriorityBand, TaskConsumer, TaskPublisher};
use claudecluster_engine::results::redis::RedisStore;
use claudecluster_engine::results::{
    AttemptEnd, EndOutcome, ResultStore, StartOutcome, StoreError,
};
use claudecluster_engine::task::{TaskId, TaskRecord, TaskState, TraceContext};
use claudecluster_testkit::services;
use claudecluster_testkit::wait::eventually;

use crate::harness::{Cleanup, Fixture, message, networked_settings, record, take, within};
use crate::proxy::{Proxy, host_port};

async fn nats() -> async_nats::Client {
    async_nats::connect(services::nats_url())
        .await
        .expect("connect to the test NATS")
}

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(services::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis")
}

async fn ttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test]
async fn racing_setups_both_succeed_and_converge() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let (a, b) = tokio::join!(
        async { JetStreamBroker::setup(nats().await, &settings.nats).await },
        async { JetStreamBroker::setup(nats().await, &settings.nats).await },
    );
    let result = a.and(b);
    // A changed lease is applied to the existing consumers on the next start.
    let mut longer = settings.nats.clone();
    longer.ack_wait_ms = 7_000;
    let again = JetStreamBroker::setup(nats().await, &longer).await;
    let js = jetstream::new(nats().await);
    let info = js
        .get_stream(&settings.nats.stream)
        .await
        .unwrap()
        .consumer_info(format!("{}-high", settings.nats.consumer_prefix))
        .await
        .unwrap();
    result.expect("both racing setups succeed");
    again.expect("setup over existing resources");
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
}

#[tokio::test]
async fn setup_keeps_an_operators_stream_limits() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let definitions = Definitions::from_settings(&settings.nats).unwrap();
    let js = jetstream::new(nats().await);
    // The operator created the stream first, with a byte limit of their own
    // and an older duplicate window.
    let operator = stream::Config {
        max_bytes: 64 * 1024 * 1024,
        duplicate_window: Duration::from_secs(30),
        ..definitions.tasks.clone()
    };
    js.create_stream(operator).await.expect("operator's stream");
    let setup = JetStreamBroker::setup(nats().await, &settings.nats).await;
    let config = js
        .get_stream(&settings.nats.stream)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    setup.expect("setup over the operator's stream");
    assert_eq!(config.max_bytes, 64 * 1024 * 1024, "their limit stays");
    assert_eq!(
        config.duplicate_window, definitions.tasks.duplicate_window,
        "our window is applied"
    );
}

#[tokio::test]
async fn setup_fails_clearly_when_a_stream_cannot_carry_our_subjects() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let js = jetstream::new(nats().await);
    // An operator's stream on other subjects that cannot be updated
    // (sealed): setup must say so rather than run without a queue.
    js.create_stream(stream::Config {
        name: settings.nats.stream.clone(),
        subjects: vec![format!("{}.other", settings.nats.subject_prefix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut sealed = js
        .get_stream(&settings.nats.stream)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    sealed.sealed = true;
    js.update_stream(sealed).await.expect("seal the stream");
    let setup = JetStreamBroker::setup(nats().await, &settings.nats).await;
    match setup {
        Err(BrokerError::Setup(reason)) => assert!(reason.contains("subjects"), "{reason}"),
        other => panic!("expected a setup error, got {other:?}"),
    }
}

#[tokio::test]
async fn task_messages_carry_id_and_trace_headers() {
    let fixture = Fixture::networked().await;
    let mut msg = message(5);
    msg.trace = Some(TraceContext {
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        tracestate: Some("bad\r\nheader".into()),
    });
    fixture.backends.publisher.publish(&msg).await.unwrap();
    let js = jetstream::new(nats().await);
    let stored = js
        .get_stream(&fixture.settings.nats.stream)
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    let header = |name: &str| stored.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        stored.subject.as_str(),
        format!("{}.normal", fixture.settings.nats.subject_prefix)
    );
    assert_eq!(header("Nats-Msg-Id"), Some(msg.id.to_string()));
    assert_eq!(header("ClaudeCluster-Task-Id"), Some(msg.id.to_string()));
    assert_eq!(
        header("traceparent").as_deref(),
        msg.trace.as_ref().and_then(|t| t.traceparent.as_deref())
    );
    assert_eq!(
        header("tracestate"),
        None,
        "an unsafe header value is dropped"
    );
    let batch = take(fixture.backends.consumer.as_ref(), 1, 1).await;
    crate::harness::ack_all(&batch).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn records_and_keys_expire_and_writes_refresh_them() {
    let mut settings = networked_settings();
    settings.redis.result_ttl_secs = 3600;
    let _cleanup = Cleanup(settings.clone());
    let store = RedisStore::connect(&services::redis_url(), &settings.redis)
        .await
        .unwrap();
    let prefix = settings.redis.key_prefix.clone();
    let mut r = record();
    r.idempotency_key = Some("ttl-key".into());
    store.create(&r).await.unwrap();
    // Without a key the record is written by plain commands, not the script.
    let plain = record();
    store.create(&plain).await.unwrap();

    let mut conn = redis_conn().await;
    let task_key = format!("{prefix}task:{}", r.id);
    let task_ttl = ttl(&mut conn, &task_key).await;
    let plain_ttl = ttl(&mut conn, &format!("{prefix}task:{}", plain.id)).await;
    let idem_ttl = ttl(&mut conn, &format!("{prefix}idem:ttl-key")).await;
    // Shorten the record's TTL by hand; the next transition restores it.
    let _: () = redis::cmd("EXPIRE")
        .arg(&task_key)
        .arg(100)
        .query_async(&mut conn)
        .await
        .unwrap();
    store
        .start_attempt(&r.to_message(), "w1", Utc::now())
        .await
        .unwrap();
    let refreshed = ttl(&mut conn, &task_key).await;
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&task_key)
        .query_async(&mut conn)
        .await
        .unwrap();

    assert!((3000..=3600).contains(&task_ttl), "task TTL {task_ttl}");
    assert!((3000..=3600).contains(&plain_ttl), "task TTL {plain_ttl}");
    assert!(
        (3000..=3600).contains(&idem_ttl),
        "idempotency key TTL {idem_ttl}"
    );
    assert!(refreshed > 100, "a write refreshes the TTL ({refreshed})");
    for f in [
        "message",
        "state",
        "attempts",
        "updated_at",
        "attempt:1",
        "worker_id",
    ] {
        assert!(fields.iter().any(|x| x == f), "field {f} in {fields:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_and_ends_each_get_their_own_outcome() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let store = RedisStore::connect(&services::redis_url(), &settings.redis)
        .await
        .unwrap();
    let records: Vec<_> = (0..40).map(|_| record()).collect();
    assert!(store.create_many(&records).await.iter().all(Result::is_ok));
    // One task's key no longer holds a hash: its writes fail, and the
    // starts sent in the same call as it must not fail with it.
    let broken = records[17].id;
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}task:{broken}", settings.redis.key_prefix))
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();

    let messages: Vec<_> = records.iter().map(TaskRecord::to_message).collect();
    let starts = futures::future::join_all(
        messages
            .iter()
            .map(|m| store.start_attempt(m, "w1", Utc::now())),
    )
    .await;
    for (r, started) in records.iter().zip(&starts) {
        if r.id == broken {
            assert!(
                matches!(started, Err(StoreError::Other(m)) if m.contains("WRONGTYPE")),
                "{started:?}"
            );
        } else {
            assert_eq!(
                started.as_ref().unwrap(),
                &StartOutcome::Started { attempt: 1 }
            );
        }
    }
    let done = AttemptEnd {
        state: TaskState::Succeeded,
        result: None,
        error: None,
        at: Utc::now(),
    };
    let ends = futures::future::join_all(
        records
            .iter()
            .filter(|r| r.id != broken)
            .map(|r| store.end_attempt(r.id, 1, &done)),
    )
    .await;
    assert!(
        ends.iter().all(|e| matches!(e, Ok(EndOutcome::Written))),
        "{ends:?}"
    );
    for r in records.iter().filter(|r| r.id != broken) {
        let stored = store.get(r.id).await.unwrap().unwrap();
        assert_eq!(stored.state, TaskState::Succeeded);
        assert_eq!(stored.attempts, 1);
    }
}

/// A subscription to the events of task `id`.
async fn events_of(
    settings: &claudecluster_engine::config::Settings,
    id: TaskId,
) -> redis::aio::PubSub {
    let client = redis::Client::open(services::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}events:{id}", settings.redis.key_prefix))
        .await
        .unwrap();
    pubsub
}

/// The states of the next `n` events of task `id`.
async fn next_states(pubsub: &mut redis::aio::PubSub, id: TaskId, n: usize) -> Vec<String> {
    let mut events = pubsub.on_message();
    let mut states = Vec::new();
    for _ in 0..n {
        let msg = within("an event", futures::StreamExt::next(&mut events))
            .await
            .unwrap();
        let payload: serde_json::Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
        assert_eq!(payload["id"], id.to_string());
        states.push(payload["state"].as_str().unwrap().to_owned());
    }
    states
}

#[tokio::test]
async fn transitions_publish_events() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let store = RedisStore::connect(&services::redis_url(), &settings.redis)
        .await
        .unwrap();
    let r = record();
    let mut pubsub = events_of(&settings, r.id).await;
    store.create(&r).await.unwrap();
    store
        .start_attempt(&r.to_message(), "w1", Utc::now())
        .await
        .unwrap();
    assert_eq!(
        next_states(&mut pubsub, r.id, 2).await,
        ["queued", "running"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstarted_attempt_publishes_running_then_its_end() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let store = RedisStore::connect(&services::redis_url(), &settings.redis)
        .await
        .unwrap();
    let r = record();
    store.create(&r).await.unwrap();
    let mut pubsub = events_of(&settings, r.id).await;
    let end = AttemptEnd {
        state: TaskState::Succeeded,
        result: None,
        error: None,
        at: Utc::now(),
    };
    store
        .record_unstarted_attempt(&r.to_message(), "w1", Utc::now(), &end)
        .await
        .unwrap();
    assert_eq!(
        next_states(&mut pubsub, r.id, 2).await,
        ["running", "succeeded"]
    );
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let store = RedisStore::new("redis://127.0.0.1:1", &settings.redis).unwrap();
    assert!(matches!(
        store.health().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.get(uuid::Uuid::now_v7()).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        RedisStore::new("not a url", &settings.redis),
        Err(StoreError::Other(_))
    ));
}

#[tokio::test]
async fn a_publisher_recreates_a_deleted_stream() {
    let fixture = Fixture::networked().await;
    // The stream disappears under a running intake (a server that lost its
    // storage, an operator's mistake): the next publish recreates it.
    let js = jetstream::new(nats().await);
    js.delete_stream(&fixture.settings.nats.stream)
        .await
        .unwrap();
    let msg = message(5);
    fixture
        .backends
        .publisher
        .publish(&msg)
        .await
        .expect("publish after repair");
    let batch = take(fixture.backends.consumer.as_ref(), 1, 1).await;
    assert_eq!(crate::harness::id_of(&batch[0]), msg.id);
    crate::harness::ack_all(&batch).await;

    // A whole batch arriving at a missing stream: one repair, every
    // message stored.
    js.delete_stream(&fixture.settings.nats.stream)
        .await
        .unwrap();
    let msgs: Vec<_> = (0..50).map(|_| message(5)).collect();
    let results = fixture.backends.publisher.publish_batch(&msgs).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let batch = take(fixture.backends.consumer.as_ref(), 50, 50).await;
    crate::harness::distinct_ids(&batch);
    crate::harness::ack_all(&batch).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_worker_reports_and_recreates_deleted_consumers() {
    let fixture = Fixture::networked().await;
    let js = jetstream::new(nats().await);
    js.delete_stream(&fixture.settings.nats.stream)
        .await
        .unwrap();
    let pulled = crate::harness::within("a pull", fixture.backends.consumer.next_batch(1)).await;
    assert!(
        matches!(pulled, Err(BrokerError::Unavailable(_))),
        "{pulled:?}"
    );
    // The failed pull recreated stream and consumers: work flows again.
    let msg = message(9);
    fixture.backends.publisher.publish(&msg).await.unwrap();
    let batch = take(fixture.backends.consumer.as_ref(), 1, 1).await;
    assert_eq!(crate::harness::id_of(&batch[0]), msg.id);
    crate::harness::ack_all(&batch).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_saturated_band_does_not_block_the_others() {
    let mut settings = networked_settings();
    settings.nats.max_ack_pending = 3;
    // Held tasks must not come back while the test holds them (the short
    // default lease is about as long as a silent pull takes).
    settings.nats.ack_wait_ms = 60_000;
    let _cleanup = Cleanup(settings.clone());
    let b = backend::connect_networked(&settings).await.unwrap();
    let urgent: Vec<_> = (0..5).map(|_| message(10)).collect();
    for r in b.publisher.publish_batch(&urgent).await {
        r.unwrap();
    }
    let normal = message(5);
    b.publisher.publish(&normal).await.unwrap();

    // Three high tasks out: the high band is at its limit, and a 2.9 server
    // does not answer pulls on it. The worker must still get the normal one.
    let held = take(b.consumer.as_ref(), 3, 3).await;
    assert!(held.iter().all(|d| d.band == PriorityBand::High));
    let next = take(b.consumer.as_ref(), 1, 1).await;
    assert_eq!(crate::harness::id_of(&next[0]), normal.id);

    // Once the held ones are done, the rest of the high band flows, including
    // anything the abandoned pull was sent meanwhile (handed back at once).
    crate::harness::ack_all(&held).await;
    crate::harness::ack_all(&next).await;
    let rest = take(b.consumer.as_ref(), 2, 2).await;
    let mut ids: std::collections::HashSet<_> = held.iter().map(crate::harness::id_of).collect();
    ids.extend(rest.iter().map(crate::harness::id_of));
    assert_eq!(ids, urgent.iter().map(|m| m.id).collect());
    crate::harness::ack_all(&rest).await;
}

/// `url` with its server replaced by the proxy's.
fn through(proxy: &Proxy, url: &str) -> String {
    url.replacen(&host_port(url), &format!("127.0.0.1:{}", proxy.port()), 1)
}

#[tokio::test]
async fn a_nats_outage_is_reported_and_survived() {
    let fixture = Fixture::networked().await;
    let nats_url = services::nats_url();
    let proxy = Proxy::start(&host_port(&nats_url)).await;
    let client = async_nats::connect(through(&proxy, &nats_url))
        .await
        .unwrap();
    let broker = JetStreamBroker::setup(client, &fixture.settings.nats)
        .await
        .unwrap();
    broker.health().await.expect("healthy while connected");

    proxy.cut();
    eventually("health to report the outage", || async {
        broker.health().await.is_err().then_some(())
    })
    .await;
    let pulled = within("a pull during the outage", broker.next_batch(1)).await;
    assert!(
        matches!(pulled, Err(BrokerError::Unavailable(_))),
        "{pulled:?}"
    );

    // The server comes back; a worker that keeps calling (backing off on
    // errors) gets the work published meanwhile.
    proxy.restore();
    let msg = message(5);
    fixture.backends.publisher.publish(&msg).await.unwrap();
    let batch = within("a delivery after the outage", async {
        loop {
            match broker.next_batch(1).await {
                Ok(batch) if !batch.is_empty() => return batch,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert_eq!(crate::harness::id_of(&batch[0]), msg.id);
    broker.health().await.expect("healthy again");
    crate::harness::ack_all(&batch).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_redis_outage_is_unavailable_then_recovers() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let redis_url = services::redis_url();
    let proxy = Proxy::start(&host_port(&redis_url)).await;
    let store = RedisStore::connect(&through(&proxy, &redis_url), &settings.redis)
        .await
        .unwrap();
    let r = record();
    store.create(&r).await.unwrap();

    proxy.cut();
    let during = store.get(r.id).await;
    assert!(
        matches!(during, Err(StoreError::Unavailable(_))),
        "{during:?}"
    );
    assert!(matches!(
        store.health().await,
        Err(StoreError::Unavailable(_))
    ));

    proxy.restore();
    eventually("the store to reconnect", || async {
        matches!(store.get(r.id).await, Ok(Some(_))).then_some(())
    })
    .await;
}

/// Pulls parked on each band's consumer, high, normal, low.
async fn parked_pulls(settings: &claudecluster_engine::config::Settings) -> [usize; 3] {
    let js = jetstream::new(nats().await);
    let stream = js.get_stream(&settings.nats.stream).await.unwrap();
    let mut parked = [0; 3];
    for (n, band) in parked.iter_mut().zip(["high", "normal", "low"]) {
        *n = stream
            .consumer_info(format!("{}-{band}", settings.nats.consumer_prefix))
            .await
            .unwrap()
            .num_waiting;
    }
    parked
}

#[tokio::test]
async fn an_idle_worker_parks_a_pull_on_every_band_and_gets_its_task_from_it() {
    // Without parked pulls, an idle worker would only find a new task on
    // its once-a-second full pass.
    let fixture = Fixture::networked().await;
    let consumer = fixture.backends.consumer.clone();
    let waiting = tokio::spawn(async move { consumer.next_batch(5).await });
    eventually("a pull parked on every band", || async {
        (parked_pulls(&fixture.settings).await == [1, 1, 1]).then_some(())
    })
    .await;

    let task = message(9);
    fixture.backends.publisher.publish(&task).await.unwrap();
    let batch = within("the parked pull", waiting).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(crate::harness::id_of(&batch[0]), task.id);
    assert_eq!(batch[0].delivery_count, 1);
    crate::harness::ack_all(&batch).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_full_worker_parks_no_pulls() {
    // A pull parked by a worker without a free permit could only bring a
    // task for it to hold; the worker parks it again once it has room.
    let fixture = Fixture::networked().await;
    let idle = || {
        let consumer = fixture.backends.consumer.clone();
        tokio::spawn(async move { consumer.next_batch(1).await })
    };

    // An idle worker with one free permit watches every band.
    let first = idle();
    eventually("a pull parked on every band", || async {
        (parked_pulls(&fixture.settings).await == [1, 1, 1]).then_some(())
    })
    .await;
    // The high band's pull brings a task, which fills the worker: that band
    // is not watched again until the worker has room.
    let task = message(9);
    fixture.backends.publisher.publish(&task).await.unwrap();
    let batch = within("the parked pull", first).await.unwrap().unwrap();
    assert_eq!(crate::harness::id_of(&batch[0]), task.id);
    assert_eq!(
        parked_pulls(&fixture.settings).await,
        [0, 1, 1],
        "normal and low stay watched, high is not"
    );
    crate::harness::ack_all(&batch).await;

    let second = idle();
    eventually("high watched again", || async {
        (parked_pulls(&fixture.settings).await == [1, 1, 1]).then_some(())
    })
    .await;
    second.abort();
    fixture.cleanup().await;
}

#[tokio::test]
async fn setup_takes_a_task_stream_that_still_announces() {
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let definitions = Definitions::from_settings(&settings.nats).unwrap();
    let js = jetstream::new(nats().await);
    // A stream that republishes each stored message's headers, as earlier
    // definitions had it. A 2.9 server cannot remove that by an update, so
    // setup keeps the stream as it is (with a warning), and work flows.
    let announcing = stream::Config {
        republish: Some(stream::Republish {
            source: format!("{}.>", settings.nats.subject_prefix),
            destination: format!("{}.stored.>", settings.nats.subject_prefix),
            headers_only: true,
        }),
        ..definitions.tasks.clone()
    };
    js.create_stream(announcing)
        .await
        .expect("announcing stream");
    let broker = JetStreamBroker::setup(nats().await, &settings.nats)
        .await
        .expect("setup over the announcing stream");
    let task = message(5);
    broker.publish(&task).await.unwrap();
    let batch = take(&broker, 1, 4).await;
    assert_eq!(crate::harness::id_of(&batch[0]), task.id);
    crate::harness::ack_all(&batch).await;
}

/// A worker calls `next_batch` whenever it has room, and the intake makes
/// one publish future per task of a batch; `async_trait` allocates each
/// call's future. They must stay within glibc's per-thread cache
/// ([`ALLOCATOR_THREAD_CACHE_MAX`]). Rare branches (repairs, the first
/// start) and async-nats's send are boxed for this.
#[tokio::test]
async fn the_brokers_per_call_futures_fit_the_allocators_thread_cache() {
    use claudecluster_engine::broker::{TaskConsumer, TaskPublisher};
    use claudecluster_testkit::ALLOCATOR_THREAD_CACHE_MAX;
    let settings = networked_settings();
    let _cleanup = Cleanup(settings.clone());
    let broker = JetStreamBroker::setup(nats().await, &settings.nats)
        .await
        .unwrap();
    let msg = message(5);
    let pull = broker.next_batch(1);
    let publish = broker.publish(&msg);
    let sizes = [
        ("next_batch", std::mem::size_of_val(&*pull)),
        ("publish", std::mem::size_of_val(&*publish)),
    ];
    assert!(
        sizes
            .iter()
            .all(|(_, size)| *size <= ALLOCATOR_THREAD_CACHE_MAX),
        "futures over {ALLOCATOR_THREAD_CACHE_MAX} bytes: {sizes:?}"
    );
}
