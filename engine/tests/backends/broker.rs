//! Broker cases: publishing, priority, leases and acknowledgements, dead
//! letters.

use std::time::Duration;

use bytes::Bytes;
use claudecluster_engine::backend::Backends;
use claudecluster_engine::broker::{AckKind, PriorityBand};
use claudecluster_engine::task::TaskMessage;

use crate::harness::{ACK_WAIT, ack_all, distinct_ids, id_of, message, take, within};

pub async fn publish_consume_ack_round_trip(b: &Backends) {
    let msg = message(5);
    b.publisher.publish(&msg).await.expect("publish");
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 1);

    let batch = take(b.consumer.as_ref(), 1, 10).await;
    assert_eq!(batch.len(), 1);
    let d = &batch[0];
    let body: TaskMessage = serde_json::from_slice(&d.payload).unwrap();
    assert_eq!(body, msg);
    assert_eq!(d.delivery_count, 1);
    assert_eq!(d.band, PriorityBand::Normal);
    d.acker.ack(AckKind::Ack).await.expect("ack");
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);

    // The acked task is gone: the next pull gets the next task, not it.
    let next = message(5);
    b.publisher.publish(&next).await.unwrap();
    let batch = take(b.consumer.as_ref(), 1, 10).await;
    assert_eq!(id_of(&batch[0]), next.id);
    ack_all(&batch).await;
}

pub async fn high_priority_overtakes_a_low_backlog(b: &Backends) {
    let backlog: Vec<TaskMessage> = (0..1000).map(|_| message(1)).collect();
    for r in b.publisher.publish_batch(&backlog).await {
        r.expect("publish the backlog");
    }
    let normal = message(5);
    b.publisher.publish(&normal).await.unwrap();
    let urgent = message(10);
    b.publisher.publish(&urgent).await.unwrap();

    let first = take(b.consumer.as_ref(), 1, 1).await;
    assert_eq!(id_of(&first[0]), urgent.id, "the high band comes first");
    assert_eq!(first[0].band, PriorityBand::High);
    let second = take(b.consumer.as_ref(), 1, 1).await;
    assert_eq!(id_of(&second[0]), normal.id, "then the normal band");
    let rest = take(b.consumer.as_ref(), 5, 5).await;
    assert!(rest.iter().all(|d| d.band == PriorityBand::Low));
    ack_all(&first).await;
    ack_all(&second).await;
    ack_all(&rest).await;
}

pub async fn nak_with_delay_redelivers(b: &Backends) {
    let msg = message(5);
    b.publisher.publish(&msg).await.unwrap();
    let first = take(b.consumer.as_ref(), 1, 1).await;
    first[0]
        .acker
        .ack(AckKind::Nak(Some(Duration::from_millis(100))))
        .await
        .expect("nak");

    let again = take(b.consumer.as_ref(), 1, 1).await;
    assert_eq!(id_of(&again[0]), msg.id);
    assert_eq!(again[0].delivery_count, 2);
    ack_all(&again).await;
}

pub async fn progress_keeps_the_lease(b: &Backends) {
    let held = message(5);
    b.publisher.publish(&held).await.unwrap();
    let first = take(b.consumer.as_ref(), 1, 1).await;

    // Report progress four times per lease for three leases, while another
    // pull waits: it must not get the held task back.
    let keep_alive = async {
        let mut tick = tokio::time::interval(ACK_WAIT / 4);
        for _ in 0..12 {
            tick.tick().await;
            first[0]
                .acker
                .ack(AckKind::Progress)
                .await
                .expect("progress");
        }
    };
    tokio::select! {
        () = keep_alive => {}
        stolen = b.consumer.next_batch(1) => {
            panic!("the held task was delivered again: {:?}", stolen.map(|v| v.iter().map(id_of).collect::<Vec<_>>()));
        }
    }
    let other = message(5);
    b.publisher.publish(&other).await.unwrap();
    let next = take(b.consumer.as_ref(), 1, 1).await;
    assert_eq!(id_of(&next[0]), other.id);
    ack_all(&first).await;
    ack_all(&next).await;
}

pub async fn unacked_message_comes_back_after_the_lease(b: &Backends) {
    let msg = message(5);
    b.publisher.publish(&msg).await.unwrap();
    let first = take(b.consumer.as_ref(), 1, 1).await;
    // No ack: the lease runs out and the task is delivered again.
    let again = take(b.consumer.as_ref(), 1, 1).await;
    assert_eq!(id_of(&again[0]), msg.id);
    assert_eq!(again[0].delivery_count, 2);
    drop(first);
    ack_all(&again).await;
}

pub async fn term_is_final(b: &Backends) {
    let doomed = message(5);
    b.publisher.publish(&doomed).await.unwrap();
    let first = take(b.consumer.as_ref(), 1, 1).await;
    first[0].acker.ack(AckKind::Term).await.expect("term");
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);

    // Past the lease the termed task still does not come back; the next
    // task does.
    tokio::time::sleep(ACK_WAIT * 2).await;
    let other = message(5);
    b.publisher.publish(&other).await.unwrap();
    let next = take(b.consumer.as_ref(), 1, 10).await;
    assert_eq!(next.len(), 1);
    assert_eq!(id_of(&next[0]), other.id);
    ack_all(&next).await;
}

pub async fn duplicate_publish_is_stored_once(b: &Backends) {
    let msg = message(5);
    b.publisher.publish(&msg).await.unwrap();
    b.publisher
        .publish(&msg)
        .await
        .expect("a repeated publish succeeds");
    let results = b.publisher.publish_batch(&[msg.clone(), msg.clone()]).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 1);
    let batch = take(b.consumer.as_ref(), 1, 10).await;
    assert_eq!(batch.len(), 1);
    ack_all(&batch).await;
}

pub async fn batch_publish_delivers_everything_once(b: &Backends) {
    let msgs: Vec<TaskMessage> = (0..300).map(|i| message(1 + (i % 10) as u8)).collect();
    let results = b.publisher.publish_batch(&msgs).await;
    assert_eq!(results.len(), msgs.len());
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 300);

    let deliveries = take(b.consumer.as_ref(), 300, 64).await;
    let ids = distinct_ids(&deliveries);
    assert!(msgs.iter().all(|m| ids.contains(&m.id)));
    ack_all(&deliveries).await;
    assert_eq!(b.publisher.queue_depth().await.unwrap(), 0);
}

pub async fn next_batch_never_exceeds_max(b: &Backends) {
    let msgs: Vec<TaskMessage> = (0..30).map(|i| message([2, 5, 9][i % 3])).collect();
    for r in b.publisher.publish_batch(&msgs).await {
        r.unwrap();
    }
    let mut taken = Vec::new();
    for max in [1, 4, 7, 30] {
        let batch = within("next_batch", b.consumer.next_batch(max))
            .await
            .unwrap();
        assert!(
            !batch.is_empty() && batch.len() <= max,
            "{} for max {max}",
            batch.len()
        );
        taken.extend(batch);
    }
    assert!(
        within("max 0", b.consumer.next_batch(0))
            .await
            .unwrap()
            .is_empty()
    );
    let rest = 30 - taken.len();
    taken.extend(take(b.consumer.as_ref(), rest, 30).await);
    distinct_ids(&taken);
    ack_all(&taken).await;
}

pub async fn idle_consumer_wakes_for_a_new_task(b: &Backends) {
    let consumer = b.consumer.clone();
    let waiting = tokio::spawn(async move { consumer.next_batch(5).await });
    // Give the pull a moment to go idle first; the assertion does not depend
    // on it, only the path exercised does.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let msg = message(9);
    b.publisher.publish(&msg).await.unwrap();
    let batch = within("the idle consumer", waiting).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(id_of(&batch[0]), msg.id);
    ack_all(&batch).await;
}

pub async fn dead_letters_list_get_delete(b: &Backends) {
    let task = message(5);
    let body = Bytes::from(serde_json::to_vec(&task).unwrap());
    b.consumer
        .dead_letter(Some(task.id), &body, "exit 3\nafter 3 attempts")
        .await
        .expect("dead-letter a task");
    let junk = Bytes::from_static(b"{not json");
    b.consumer
        .dead_letter(None, &junk, "unparseable")
        .await
        .expect("dead-letter junk");

    let all = b.dead_letters.list(None, 10, None).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all[0].seq < all[1].seq, "oldest first");
    assert_eq!(all[0].task_id, Some(task.id));
    assert_eq!(all[0].payload, body);
    assert!(all[0].reason.contains("exit 3") && all[0].reason.contains("after 3 attempts"));
    assert!(!all[0].reason.contains('\n'));
    assert_eq!(all[1].task_id, None);
    assert_eq!(all[1].payload, junk);
    assert_eq!(all[1].reason, "unparseable");

    let mine = b.dead_letters.list(None, 10, Some(task.id)).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].seq, all[0].seq);
    let after_first = b
        .dead_letters
        .list(Some(all[0].seq), 10, None)
        .await
        .unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].seq, all[1].seq);
    assert_eq!(b.dead_letters.list(None, 1, None).await.unwrap().len(), 1);

    let got = b
        .dead_letters
        .get(all[0].seq)
        .await
        .unwrap()
        .expect("get by seq");
    assert_eq!(got.payload, body);
    assert_eq!(got.at, all[0].at);
    assert!(b.dead_letters.delete(all[0].seq).await.unwrap());
    assert!(b.dead_letters.get(all[0].seq).await.unwrap().is_none());
    assert!(!b.dead_letters.delete(all[0].seq).await.unwrap());
    assert!(
        b.dead_letters
            .get(all[1].seq + 1000)
            .await
            .unwrap()
            .is_none()
    );
    let left = b.dead_letters.list(None, 10, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, all[1].seq);
}
