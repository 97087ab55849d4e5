//! Script calls made at the same time by many callers, sent to Redis
//! together.
//!
//! A worker runs hundreds of tasks at once, and each makes its own script
//! calls (start an attempt, end it). Sent one by one, every call cost the
//! worker a socket write and a thread wake-up, and Redis a read: a profile of
//! a busy worker put a quarter of its CPU in system calls, with two `writev`
//! per task. Here calls queue up while earlier ones are on the wire, and
//! whatever has queued goes out as one pipeline, in one write. Nobody waits
//! for a batch to fill: a call made while nothing is queued goes at once,
//! and at most [`IN_FLIGHT`] pipelines are on the wire, so batches grow with
//! the load and only with it.
//!
//! Each call still runs as its own script in Redis, and fails or succeeds on
//! its own. A script Redis does not know (a restarted server) is loaded
//! once, and the calls that needed it are sent again together.

use std::sync::Arc;

use ::redis::{ErrorKind, RedisResult, ScriptInvocation, ServerErrorKind, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::connections::Connections;
use super::reply;
use crate::results::StoreError;

/// Calls per pipeline at most.
const MAX_BATCH: usize = 256;

/// Pipelines on the wire at once.
const IN_FLIGHT: usize = 2;

struct Call {
    invocation: ScriptInvocation<'static>,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

/// The queue of calls; its sender task stops when this is dropped.
pub(super) struct Coalescer {
    calls: mpsc::UnboundedSender<Call>,
}

impl Coalescer {
    /// Starts the task that sends queued calls over `connections`. Must be
    /// called within a Tokio runtime.
    pub fn start(connections: Arc<Connections>) -> Self {
        let (calls, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_queued(queue, connections));
        Self { calls }
    }

    /// Runs one script call, together with whatever else is queued.
    pub async fn eval(&self, invocation: ScriptInvocation<'static>) -> Result<Value, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.calls
            .send(Call { invocation, reply })
            .map_err(|_| StoreError::Unavailable("the store is shutting down".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the call was dropped".into()))?
    }
}

/// Takes what has queued, up to [`MAX_BATCH`], whenever fewer than
/// [`IN_FLIGHT`] pipelines are out, until every sender is gone.
async fn send_queued(mut queue: mpsc::UnboundedReceiver<Call>, connections: Arc<Connections>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::new();
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let connections = connections.clone();
        tokio::spawn(async move {
            send(batch, &connections).await;
            drop(permit);
        });
    }
}

/// How many scripts one batch may load before its calls give up on
/// NOSCRIPT (a server flushing its scripts over and over).
const MAX_LOADS: usize = 16;

/// Sends one batch and hands each caller its reply. Calls whose script the
/// server does not know (a fresh or restarted server) are sent again after
/// their script is loaded, together, one load per distinct script.
async fn send(batch: Vec<Call>, connections: &Connections) {
    let mut conn = connections.get();
    let mut pending = batch;
    for loads in 0..=MAX_LOADS {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for call in &pending {
            pipe.invoke_script(&call.invocation);
        }
        let results: Vec<RedisResult<Value>> = match pipe.query_async(&mut conn).await {
            Ok(results) => results,
            Err(e) => return fail(pending, &reply::redis_error(e)),
        };
        let mut results = results.into_iter();
        let mut unknown = Vec::new();
        for call in pending {
            match results.next() {
                Some(Err(e))
                    if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && loads < MAX_LOADS =>
                {
                    unknown.push(call);
                }
                Some(result) => {
                    let _ = call.reply.send(result.map_err(reply::redis_error));
                }
                None => {
                    let _ = call
                        .reply
                        .send(Err(StoreError::Other("missing reply in a pipeline".into())));
                }
            }
        }
        let Some(first) = unknown.first() else {
            return;
        };
        if let Err(e) = first.invocation.load_async(&mut conn).await {
            return fail(unknown, &reply::redis_error(e));
        }
        pending = unknown;
    }
}

/// Answers every call with `e`.
fn fail(calls: Vec<Call>, e: &StoreError) {
    for call in calls {
        let _ = call.reply.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use ::redis::Script;
    use claudecluster_testkit::services;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_each_get_their_own_reply() {
        let connections = Arc::new(Connections::new(&services::redis_url(), 1).unwrap());
        let calls = Coalescer::start(connections);
        // A script this Redis has never seen: the first pipeline meets
        // NOSCRIPT and its calls are sent again.
        let body = format!(
            "-- {}\nif ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end\nreturn ARGV[1]",
            uuid::Uuid::new_v4()
        );
        let echo: &'static Script = Box::leak(Box::new(Script::new(&body)));
        let asked: Vec<String> = (0..300)
            .map(|i| {
                if i % 50 == 7 {
                    "fail".to_owned()
                } else {
                    i.to_string()
                }
            })
            .collect();
        let replies = futures::future::join_all(asked.iter().map(|arg| {
            let mut invocation = echo.prepare_invoke();
            invocation.arg(arg);
            calls.eval(invocation)
        }))
        .await;
        for (arg, reply) in asked.iter().zip(replies) {
            if arg == "fail" {
                assert!(
                    matches!(&reply, Err(StoreError::Other(m)) if m.contains("to fail")),
                    "{reply:?}"
                );
            } else {
                assert_eq!(reply.unwrap(), Value::BulkString(arg.clone().into_bytes()));
            }
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_every_queued_call() {
        let connections = Arc::new(Connections::new("redis://127.0.0.1:1", 1).unwrap());
        let calls = Coalescer::start(connections);
        let echo: &'static Script = Box::leak(Box::new(Script::new("return 1")));
        let replies =
            futures::future::join_all((0..5).map(|_| calls.eval(echo.prepare_invoke()))).await;
        for reply in replies {
            assert!(
                matches!(reply, Err(StoreError::Unavailable(_))),
                "{reply:?}"
            );
        }
    }
}
