//! A worker's plain acks, sent in bursts by one task.
//!
//! Tasks finish in groups: a store reply carries the ends of many at once.
//! Were each to publish its ack itself, the client's connection task, woken
//! by every publish, would run right after it and write each ack to the
//! socket on its own: a system call per ack in the worker, and a read and
//! a wake-up per ack in the server. Queued here instead, the acks of tasks
//! finishing together go out in one loop, which the connection task then
//! writes at once.
//!
//! An ack still in the queue when the process dies is lost like one lost on
//! the wire: the message comes back after its lease, and the store answers
//! the redelivery with "already final".

use async_nats::Subject;
use tokio::sync::mpsc;

/// The payload of a plain ack.
const ACK: &[u8] = b"+ACK";

/// The most acks sent between two looks at the queue.
const BURST: usize = 1024;

/// Queues plain acks for the sending task; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct AckSender(mpsc::UnboundedSender<Subject>);

impl AckSender {
    /// Starts the sending task on `client`; it ends once every sender is
    /// gone.
    pub(super) fn start(client: async_nats::Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send(client, rx));
        Self(tx)
    }

    /// Queues a plain ack to the delivery whose reply subject is `reply`.
    ///
    /// # Errors
    /// When the sending task has stopped (the runtime is shutting down).
    pub(super) fn ack(&self, reply: Subject) -> Result<(), Subject> {
        self.0.send(reply).map_err(|e| e.0)
    }
}

async fn send(client: async_nats::Client, mut queue: mpsc::UnboundedReceiver<Subject>) {
    let mut burst = Vec::with_capacity(BURST);
    while queue.recv_many(&mut burst, BURST).await > 0 {
        // The first ack of a group woke this task: let the rest of the
        // group, ready to run, queue theirs before the burst leaves.
        tokio::task::yield_now().await;
        while burst.len() < BURST {
            match queue.try_recv() {
                Ok(reply) => burst.push(reply),
                Err(_) => break,
            }
        }
        for reply in burst.drain(..) {
            if let Err(e) = client.publish(reply, ACK.into()).await {
                tracing::debug!(error = %e, "cannot send an ack");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use claudecluster_testkit::wait::eventually;
    use futures::StreamExt;

    use super::super::test_queue::Queue;
    use super::*;

    #[tokio::test]
    async fn queued_acks_reach_the_server() {
        let queue = Queue::new().await;
        for _ in 0..50 {
            queue.publish("task").await;
        }
        let mut messages = queue
            .consumer
            .fetch()
            .max_messages(50)
            .messages()
            .await
            .unwrap();
        let sender = AckSender::start(queue.client.clone());
        let mut acked = 0;
        while let Some(message) = messages.next().await {
            sender.ack(message.unwrap().reply.clone().unwrap()).unwrap();
            acked += 1;
        }
        assert_eq!(acked, 50);

        // Acked, so the work queue lets go of every message.
        eventually("every ack to arrive", || async {
            (queue.stored().await == 0).then_some(())
        })
        .await;
    }
}
