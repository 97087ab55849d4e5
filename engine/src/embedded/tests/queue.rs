//! The queue: priority, leases, acknowledgements, duplicates, dead letters.

use std::time::Duration;

use bytes::Bytes;

use super::{open, prompt_of, settings, task};
use crate::broker::{AckKind, PriorityBand};

const LONG_LEASE_MS: u64 = 60_000;

#[tokio::test]
async fn highest_band_first_and_fifo_within_a_band() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    for (prompt, priority) in [("low-1", 1), ("normal-1", 5), ("low-2", 3), ("high-1", 10)] {
        b.publisher.publish(&task(prompt, priority)).await.unwrap();
    }
    let batch = vec![task("normal-2", 7), task("high-2", 8)];
    assert!(
        b.publisher
            .publish_batch(&batch)
            .await
            .iter()
            .all(Result::is_ok)
    );
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 6);

    let first = b.consumer.next_batch(3).await.unwrap();
    let prompts: Vec<String> = first.iter().map(|d| prompt_of(&d.payload)).collect();
    assert_eq!(prompts, ["high-1", "high-2", "normal-1"]);
    assert_eq!(first[0].band, PriorityBand::High);
    assert!(first.iter().all(|d| d.delivery_count == 1));

    let rest = b.consumer.next_batch(10).await.unwrap();
    let prompts: Vec<String> = rest.iter().map(|d| prompt_of(&d.payload)).collect();
    assert_eq!(prompts, ["normal-2", "low-1", "low-2"]);
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
}

#[tokio::test]
async fn a_waiting_worker_wakes_on_publish() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    let consumer = b.consumer.clone();
    let waiting = tokio::spawn(async move { consumer.next_batch(5).await });
    tokio::task::yield_now().await;
    b.publisher.publish(&task("wake up", 5)).await.unwrap();
    let batch = waiting.await.unwrap().unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(prompt_of(&batch[0].payload), "wake up");
}

#[tokio::test]
async fn ack_and_term_remove_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    b.publisher.publish(&task("a", 5)).await.unwrap();
    b.publisher.publish(&task("b", 5)).await.unwrap();
    let batch = b.consumer.next_batch(2).await.unwrap();
    batch[0].acker.ack(AckKind::Ack).await.unwrap();
    batch[1].acker.ack(AckKind::Term).await.unwrap();
    // Acknowledging twice is harmless.
    batch[0].acker.ack(AckKind::Ack).await.unwrap();
    drop(batch);
    drop(b);

    // Nothing comes back after a restart either.
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
}

#[tokio::test]
async fn an_expired_lease_is_delivered_again_with_a_higher_count() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(100));
    b.publisher.publish(&task("slow", 5)).await.unwrap();
    let first = b.consumer.next_batch(1).await.unwrap().remove(0);
    assert_eq!(first.delivery_count, 1);
    // Not acknowledged: the lease runs out and the message comes back.
    let second = b.consumer.next_batch(1).await.unwrap().remove(0);
    assert_eq!(second.delivery_count, 2);
    assert_eq!(prompt_of(&second.payload), "slow");

    // The first delivery lost its lease: its nak does not release the
    // second one's message...
    first.acker.ack(AckKind::Nak(None)).await.unwrap();
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
    // ...but its ack still means the work is done.
    first.acker.ack(AckKind::Ack).await.unwrap();
    second.acker.ack(AckKind::Ack).await.unwrap();
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn progress_extends_the_lease() {
    let lease = Duration::from_secs(30);
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(30_000));
    b.publisher.publish(&task("long", 5)).await.unwrap();
    let first = b.consumer.next_batch(1).await.unwrap().remove(0);

    tokio::time::advance(lease / 2).await;
    first.acker.ack(AckKind::Progress).await.unwrap();
    // Past the original deadline, inside the extended one: still leased.
    tokio::time::advance(lease * 3 / 4).await;
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
    let early = tokio::time::timeout(lease / 8, b.consumer.next_batch(1)).await;
    assert!(
        early.is_err(),
        "delivered again while the lease was extended"
    );

    // Without further progress the extended lease runs out too.
    let again = b.consumer.next_batch(1).await.unwrap().remove(0);
    assert_eq!(again.delivery_count, 2);
}

#[tokio::test(start_paused = true)]
async fn nak_with_a_delay_holds_the_message_back() {
    let delay = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    b.publisher.publish(&task("retry me", 5)).await.unwrap();
    let first = b.consumer.next_batch(1).await.unwrap().remove(0);
    first.acker.ack(AckKind::Nak(Some(delay))).await.unwrap();
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 1);

    let early = tokio::time::timeout(delay / 2, b.consumer.next_batch(1)).await;
    assert!(early.is_err(), "delivered before the nak delay passed");
    let second = b.consumer.next_batch(1).await.unwrap().remove(0);
    assert_eq!(second.delivery_count, 2);

    // A nak without a delay gives it back at once (no timer to wait for:
    // the paused clock stands still).
    second.acker.ack(AckKind::Nak(None)).await.unwrap();
    let before = tokio::time::Instant::now();
    let third = b.consumer.next_batch(1).await.unwrap();
    assert_eq!(third[0].delivery_count, 3);
    assert_eq!(tokio::time::Instant::now(), before);
}

#[tokio::test]
async fn duplicates_within_the_window_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    let msg = task("once", 5);
    b.publisher.publish(&msg).await.unwrap();
    b.publisher.publish(&msg).await.unwrap();
    let other = task("other", 5);
    let results = b
        .publisher
        .publish_batch(&[msg.clone(), other.clone(), other])
        .await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 2);

    // Acked, then published again within the window: still a duplicate,
    // and the window survives a restart.
    let batch = b.consumer.next_batch(10).await.unwrap();
    for d in &batch {
        d.acker.ack(AckKind::Ack).await.unwrap();
    }
    drop(batch);
    drop(b);
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    b.publisher.publish(&msg).await.unwrap();
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
}

#[tokio::test]
async fn without_a_window_every_publish_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(LONG_LEASE_MS);
    s.nats.duplicate_window_ms = 0;
    let b = open(dir.path(), &s);
    let msg = task("twice", 5);
    b.publisher.publish(&msg).await.unwrap();
    b.publisher.publish(&msg).await.unwrap();
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 2);
}

#[tokio::test]
async fn dead_letters_list_get_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    let (one, two) = (task("one", 5), task("two", 5));
    b.consumer
        .dead_letter(
            Some(one.id),
            &Bytes::from_static(b"first"),
            "max_deliveries",
        )
        .await
        .unwrap();
    b.consumer
        .dead_letter(
            None,
            &Bytes::from_static(b"\xff not json"),
            "invalid_message",
        )
        .await
        .unwrap();
    b.consumer
        .dead_letter(Some(two.id), &Bytes::from_static(b"third"), "failed")
        .await
        .unwrap();

    let all = b.dead_letters.list(None, 10, None).await.unwrap();
    let seqs: Vec<u64> = all.iter().map(|d| d.seq).collect();
    assert_eq!(seqs.len(), 3);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(all[1].task_id, None);
    assert_eq!(all[1].reason, "invalid_message");
    assert_eq!(&all[1].payload[..], b"\xff not json");

    let after_first = b.dead_letters.list(Some(seqs[0]), 1, None).await.unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].seq, seqs[1]);
    let of_two = b.dead_letters.list(None, 10, Some(two.id)).await.unwrap();
    assert_eq!(of_two.len(), 1);
    assert_eq!(&of_two[0].payload[..], b"third");

    let got = b.dead_letters.get(seqs[0]).await.unwrap().unwrap();
    assert_eq!(got.task_id, Some(one.id));
    assert!(b.dead_letters.delete(seqs[2]).await.unwrap());
    assert!(!b.dead_letters.delete(seqs[2]).await.unwrap());
    assert!(b.dead_letters.get(seqs[2]).await.unwrap().is_none());

    // Numbers are never reused, even for the deleted last one and across a
    // restart.
    drop(b);
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    b.consumer
        .dead_letter(None, &Bytes::from_static(b"later"), "failed")
        .await
        .unwrap();
    let last = b.dead_letters.list(Some(seqs[1]), 10, None).await.unwrap();
    assert_eq!(last.len(), 1);
    assert!(last[0].seq > seqs[2]);
}

#[tokio::test]
async fn health_and_zero_sized_batches() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), &settings(LONG_LEASE_MS));
    b.publisher.health().await.unwrap();
    b.store.health().await.unwrap();
    b.publisher.publish(&task("kept", 5)).await.unwrap();
    assert!(b.consumer.next_batch(0).await.unwrap().is_empty());
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 1);
}
