//! The raw pipeline beneath ClaudeCluster, measured on its own: the most a
//! job system built on NATS JetStream and Redis could do on this machine.
//!
//! Per message, exactly the work a worker cannot avoid: a JetStream publish
//! confirmed by the server, a pull delivery, one Redis `SET` of a
//! task-record-sized value, and an ack. Publishing and consuming run at the
//! same time on separate connections, as an intake and a worker would. It is
//! written to be as fast as those clients allow (publishes pipelined with a
//! bounded window of unconfirmed acks, deliveries taken in batches, the Redis
//! writes of a batch sent as one pipeline) so the ratio to it is honest.
//!
//! Payloads are a real [`TaskMessage`] and a real finished [`TaskRecord`],
//! so message and value sizes match the system's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use claudecluster_engine::task::{
    Attempt, SCHEMA_VERSION, TaskMessage, TaskRecord, TaskResult, TaskState,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::cpu::{CpuUse, CpuWatch};

mod admin;

pub use admin::{Cleaned, cleanup, wait_drained};

/// Settings of one raw run.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// NATS server.
    pub nats_url: String,
    /// Redis server.
    pub redis_url: String,
    /// Unique name of this run: the stream, its subject, the consumer and
    /// the Redis key prefix derive from it.
    pub name: String,
    /// Messages to push through.
    pub count: u64,
    /// Publishes awaiting their confirmation at most.
    pub window: usize,
    /// Deliveries per pull and Redis writes per pipeline.
    pub batch: usize,
    /// Concurrent pull loops on the one durable consumer.
    pub consumers: usize,
    /// Wait for the server to confirm each ack (`AckAck`), as a worker that
    /// must not lose an ack does, instead of fire-and-forget acks.
    pub double_ack: bool,
    /// Give each publish a `Nats-Msg-Id`, so the stream tracks it in its
    /// duplicate window, as the intake's publishes are.
    pub msg_ids: bool,
    /// Have the stream republish the headers of each stored message (an
    /// announcement per message), to measure what that costs the server.
    pub republish: bool,
    /// Give up after this long.
    pub max_duration: Duration,
    /// Processes (`NAME=PID`, typically the NATS and Redis servers) whose
    /// CPU time to report per message.
    pub watch: Vec<String>,
}

/// What a raw run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawReport {
    /// When the run started.
    pub started_at: DateTime<Utc>,
    /// Messages planned.
    pub count: u64,
    /// Messages published and confirmed.
    pub published: u64,
    /// Messages consumed, written and acked.
    pub consumed: u64,
    /// Publish window.
    pub window: usize,
    /// Pull and pipeline batch.
    pub batch: usize,
    /// Pull loops.
    pub consumers: usize,
    /// Whether acks were confirmed.
    pub double_ack: bool,
    /// Whether publishes carried a `Nats-Msg-Id`.
    #[serde(default)]
    pub msg_ids: bool,
    /// Whether the stream republished each stored message's headers.
    #[serde(default)]
    pub republish: bool,
    /// Bytes of each message.
    pub message_bytes: usize,
    /// Bytes of each Redis value.
    pub value_bytes: usize,
    /// Seconds until the last publish was confirmed.
    pub publish_secs: f64,
    /// Confirmed publishes per second (while consuming ran too).
    pub publish_per_s: f64,
    /// Seconds until the last message was acked.
    pub end_to_end_secs: f64,
    /// Messages through the whole pipeline per second: the raw limit.
    pub end_to_end_per_s: f64,
    /// CPU the watched processes and this program used, per message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu: Vec<CpuUse>,
    /// The share of the machine's CPU time its host took during the run
    /// (steal), in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_percent: Option<f64>,
}

impl RawReport {
    /// Lines for a person.
    pub fn table(&self) -> String {
        let mut out = format!(
            "raw pipeline (JetStream publish+ack -> pull+ack -> Redis SET): {} of {} messages\n  \
             publish      {:>10.0} msg/s over {:.2} s (window {})\n  \
             end to end   {:>10.0} msg/s over {:.2} s (batch {}, {} pull loops, {} acks)\n  \
             sizes        message {} B, Redis value {} B\n",
            self.consumed,
            self.count,
            self.publish_per_s,
            self.publish_secs,
            self.window,
            self.end_to_end_per_s,
            self.end_to_end_secs,
            self.batch,
            self.consumers,
            if self.double_ack {
                "confirmed"
            } else {
                "plain"
            },
            self.message_bytes,
            self.value_bytes,
        );
        if self.msg_ids || self.republish {
            out.push_str(&format!(
                "  stream       message ids {}, republish {}\n",
                if self.msg_ids { "on" } else { "off" },
                if self.republish { "on" } else { "off" },
            ));
        }
        if !self.cpu.is_empty() {
            out.push_str(&format!(
                "  cpu          µs per message: {}\n",
                cpu_line(&self.cpu)
            ));
        }
        if let Some(steal) = self.steal_percent {
            out.push_str(&format!("  machine      {}\n", steal_line(steal)));
        }
        out
    }
}

/// `name 12, name 34` for tables.
pub fn cpu_line(cpu: &[CpuUse]) -> String {
    cpu.iter()
        .map(|c| format!("{} {:.1}", c.name, c.us_per_task))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How much of a run's CPU time the host took, for tables.
pub fn steal_line(steal_percent: f64) -> String {
    format!("{steal_percent:.1} % of CPU time taken by the host (steal)")
}

/// Errors of the raw benchmark.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// NATS could not be reached or refused an operation.
    #[error("NATS: {0}")]
    Nats(String),
    /// Redis could not be reached or refused a command.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Cleaning up a run's keys failed or was refused.
    #[error(transparent)]
    Cleanup(#[from] claudecluster_engine::backend::BackendError),
    /// A setting is out of range.
    #[error("invalid settings: {0}")]
    Invalid(&'static str),
    /// A process to watch is not given as `NAME=PID`.
    #[error(transparent)]
    Watch(#[from] crate::rss::RssError),
}

fn nats_err(e: impl std::fmt::Display) -> RawError {
    RawError::Nats(e.to_string())
}

/// Names derived from the run name.
struct Names {
    stream: String,
    subject: String,
    consumer: String,
    key_prefix: String,
}

impl Names {
    fn of(name: &str) -> Self {
        Self {
            stream: name.to_owned(),
            subject: format!("{name}.tasks"),
            consumer: format!("{name}-workers"),
            key_prefix: format!("{name}:"),
        }
    }
}

/// Runs the raw pipeline once, then deletes its stream and keys whether or
/// not the run succeeded.
///
/// # Errors
/// [`RawError`] when a service is unreachable or refuses the setup.
pub async fn run(config: &RawConfig) -> Result<RawReport, RawError> {
    if config.count == 0 || config.window == 0 || config.batch == 0 || config.consumers == 0 {
        return Err(RawError::Invalid(
            "count, window, batch and consumers must be at least 1",
        ));
    }
    let names = Names::of(&config.name);
    let result = measure(config, &names).await;
    let cleaned = cleanup(
        &config.nats_url,
        &config.redis_url,
        std::slice::from_ref(&names.stream),
        std::slice::from_ref(&names.key_prefix),
    )
    .await;
    let report = result?;
    cleaned?;
    Ok(report)
}

async fn measure(config: &RawConfig, names: &Names) -> Result<RawReport, RawError> {
    let (message, value) = payloads();
    // Separate connections for the two sides, as the intake and the worker
    // are separate processes.
    let publisher = jetstream::new(
        async_nats::connect(&config.nats_url)
            .await
            .map_err(nats_err)?,
    );
    let subscriber = jetstream::new(
        async_nats::connect(&config.nats_url)
            .await
            .map_err(nats_err)?,
    );
    let stream = subscriber
        .create_stream(stream::Config {
            name: names.stream.clone(),
            subjects: vec![names.subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            republish: config.republish.then(|| stream::Republish {
                source: names.subject.clone(),
                destination: format!("{}.stored", names.subject),
                headers_only: true,
            }),
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let pull: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(names.consumer.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let redis = redis::Client::open(config.redis_url.as_str())?;

    let consumed = Arc::new(AtomicU64::new(0));
    let all_consumed = Arc::new(Notify::new());
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..config.consumers {
        let conn = redis.get_multiplexed_async_connection().await?;
        let messages = pull
            .stream()
            .max_messages_per_batch(config.batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(nats_err)?;
        loops.spawn(consume(
            messages,
            conn,
            ConsumeCtx {
                key_prefix: names.key_prefix.clone(),
                value: value.clone(),
                batch: config.batch,
                double_ack: config.double_ack,
                target: config.count,
                consumed: consumed.clone(),
                all_consumed: all_consumed.clone(),
            },
        ));
    }

    let cpu = CpuWatch::start(&config.watch, "rawbench")?;
    let started_at = Utc::now();
    let start = Instant::now();
    let deadline = start + config.max_duration;
    let subject = async_nats::Subject::from(names.subject.as_str());
    let publishing = publish(
        &publisher,
        subject,
        message.clone(),
        config.count,
        config.window,
        config.msg_ids,
    );
    let (published, publish_done) = match tokio::time::timeout_at(deadline.into(), publishing).await
    {
        Ok(result) => result?,
        Err(_) => (0, Instant::now()),
    };
    let finished = async {
        loop {
            let notified = all_consumed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a notification sent in
            // between is not lost.
            notified.as_mut().enable();
            if consumed.load(Ordering::Acquire) >= config.count {
                break;
            }
            notified.await;
        }
    };
    let _ = tokio::time::timeout_at(deadline.into(), finished).await;
    let end = Instant::now();
    loops.abort_all();
    let mut failure = None;
    while let Some(joined) = loops.join_next().await {
        if let Ok(Err(e)) = joined {
            failure.get_or_insert(e);
        }
    }
    let consumed = consumed.load(Ordering::Acquire).min(config.count);
    if consumed < config.count
        && let Some(e) = failure
    {
        return Err(e);
    }
    let publish_secs = publish_done.saturating_duration_since(start).as_secs_f64();
    let end_to_end_secs = end.saturating_duration_since(start).as_secs_f64();
    Ok(RawReport {
        started_at,
        count: config.count,
        published,
        consumed,
        window: config.window,
        batch: config.batch,
        consumers: config.consumers,
        double_ack: config.double_ack,
        msg_ids: config.msg_ids,
        republish: config.republish,
        message_bytes: message.len(),
        value_bytes: value.len(),
        publish_secs,
        publish_per_s: published as f64 / publish_secs.max(1e-9),
        end_to_end_secs,
        end_to_end_per_s: consumed as f64 / end_to_end_secs.max(1e-9),
        cpu: cpu.finish(consumed),
        steal_percent: cpu.steal_percent(),
    })
}

/// Publishes `count` messages keeping at most `window` unconfirmed; returns
/// how many were confirmed and when the last confirmation came.
async fn publish(
    js: &jetstream::Context,
    subject: async_nats::Subject,
    payload: Bytes,
    count: u64,
    window: usize,
    msg_ids: bool,
) -> Result<(u64, Instant), RawError> {
    let mut unconfirmed = VecDeque::with_capacity(window);
    let mut confirmed = 0;
    let run = uuid::Uuid::new_v4().simple().to_string();
    for n in 0..count {
        let ack = if msg_ids {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("{run}-{n}").as_str(),
            );
            js.publish_with_headers(subject.clone(), headers, payload.clone())
                .await
        } else {
            js.publish(subject.clone(), payload.clone()).await
        }
        .map_err(nats_err)?;
        unconfirmed.push_back(ack);
        if unconfirmed.len() >= window
            && let Some(oldest) = unconfirmed.pop_front()
        {
            oldest.await.map_err(nats_err)?;
            confirmed += 1;
        }
    }
    while let Some(ack) = unconfirmed.pop_front() {
        ack.await.map_err(nats_err)?;
        confirmed += 1;
    }
    Ok((confirmed, Instant::now()))
}

struct ConsumeCtx {
    key_prefix: String,
    value: Bytes,
    batch: usize,
    double_ack: bool,
    target: u64,
    consumed: Arc<AtomicU64>,
    all_consumed: Arc<Notify>,
}

/// One pull loop. A reader keeps taking deliveries off the pull stream (so
/// the next pull request goes out while the previous batch is still being
/// written) and hands them over a bounded channel; the writer takes what has
/// arrived, up to a batch, writes one key per message in a single Redis
/// pipeline, then acks them all.
async fn consume(
    messages: consumer::pull::Stream,
    mut redis: redis::aio::MultiplexedConnection,
    ctx: ConsumeCtx,
) -> Result<(), RawError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(ctx.batch * 2);
    let reader = async move {
        let mut messages = messages;
        while let Some(message) = messages.next().await {
            if tx.send(message.map_err(nats_err)?).await.is_err() {
                break;
            }
        }
        Ok::<(), RawError>(())
    };
    let writer = async {
        let mut batch = Vec::with_capacity(ctx.batch);
        while rx.recv_many(&mut batch, ctx.batch).await > 0 {
            let mut pipe = redis::pipe();
            for message in &batch {
                let seq = message.info().map_err(nats_err)?.stream_sequence;
                pipe.cmd("SET")
                    .arg(format!("{}{seq}", ctx.key_prefix))
                    .arg(ctx.value.as_ref())
                    .arg("EX")
                    .arg(3600)
                    .ignore();
            }
            pipe.query_async::<()>(&mut redis).await?;
            if ctx.double_ack {
                futures::future::try_join_all(batch.iter().map(|m| m.double_ack()))
                    .await
                    .map_err(nats_err)?;
            } else {
                for message in &batch {
                    message.ack().await.map_err(nats_err)?;
                }
            }
            let n = batch.len() as u64;
            if ctx.consumed.fetch_add(n, Ordering::AcqRel) + n >= ctx.target {
                ctx.all_consumed.notify_waiters();
            }
            batch.clear();
        }
        Ok::<(), RawError>(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// A task message and a finished task record like the system moves.
fn payloads() -> (Bytes, Bytes) {
    let now = Utc::now();
    let msg = TaskMessage {
        schema_version: SCHEMA_VERSION,
        id: uuid::Uuid::now_v7(),
        prompt: "benchmark".into(),
        priority: 5,
        timeout_ms: None,
        max_attempts: 3,
        metadata: serde_json::Map::new(),
        idempotency_key: None,
        created_at: now,
        trace: None,
    };
    let mut record = TaskRecord::queued(&msg, now);
    record.state = TaskState::Succeeded;
    record.started_at = Some(now);
    record.finished_at = Some(now);
    record.attempts = 1;
    record.worker_id = Some("worker-benchmark-1".into());
    record.attempt_history.push(Attempt {
        number: 1,
        worker_id: "worker-benchmark-1".into(),
        started_at: now,
        finished_at: Some(now),
        outcome: Some(TaskState::Succeeded),
        error: None,
    });
    record.result = Some(TaskResult {
        output: msg.prompt.clone(),
        executor: "echo".into(),
        duration_ms: 0,
        ..TaskResult::default()
    });
    // Plain data with string keys always serializes.
    let message = serde_json::to_vec(&msg).unwrap_or_default();
    let value = serde_json::to_vec(&record).unwrap_or_default();
    (Bytes::from(message), Bytes::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_real_documents() {
        let (message, value) = payloads();
        let msg: TaskMessage = serde_json::from_slice(&message).unwrap();
        assert_eq!(msg.prompt, "benchmark");
        let record: TaskRecord = serde_json::from_slice(&value).unwrap();
        assert_eq!(record.state, TaskState::Succeeded);
        assert!(value.len() > message.len());
    }
}
