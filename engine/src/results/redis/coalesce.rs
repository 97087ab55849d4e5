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
//! Plain commands ([`Coalescer::command`]: the look a worker takes at each
//! delivery before it runs it) ride in the same pipelines.
//!
//! Each call fails or succeeds on its own. Calls of a script that takes
//! rows ([`Coalescer::row`]: a worker's starts and ends) go further: the
//! rows queued together for the same script and shared arguments become one
//! script call, since every call costs Redis a fixed overhead on top of
//! the work of its rows (`loadtest/redis-scripts.py`). A script Redis does not know (a restarted
//! server) is loaded once, and the calls that needed it are sent again
//! together.

use std::sync::Arc;

use ::redis::{
    Cmd, ErrorKind, RedisError, RedisResult, Script, ScriptInvocation, ServerErrorKind, Value,
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::connections::Connections;
use super::reply;
use crate::results::StoreError;

/// Queued calls and rows taken into one pipeline at most.
const MAX_BATCH: usize = 256;

/// Pipelines on the wire at once.
const IN_FLIGHT: usize = 2;

type Answer = oneshot::Sender<Result<Value, StoreError>>;

/// A script call or a plain command on its way to Redis.
struct Call {
    request: Request,
    reply: Reply,
}

/// What a [`Call`] sends.
enum Request {
    Script(ScriptInvocation<'static>),
    /// Taken out (left empty) once in a pipeline: a command is never sent
    /// again, unlike a script the server did not know.
    Command(Cmd),
}

/// Who waits for a call's reply.
enum Reply {
    /// One caller, for the whole reply.
    One(Answer),
    /// One caller per row, each for its element of the reply's array.
    Rows(Vec<Answer>),
}

impl Reply {
    fn send(self, result: Result<Value, StoreError>) {
        match self {
            Reply::One(answer) => {
                let _ = answer.send(result);
            }
            Reply::Rows(answers) => match result {
                Ok(Value::Array(items)) if items.len() == answers.len() => {
                    for (answer, item) in answers.into_iter().zip(items) {
                        let _ = answer.send(match item {
                            Value::ServerError(e) => Err(reply::redis_error(RedisError::from(e))),
                            item => Ok(item),
                        });
                    }
                }
                other => {
                    let e = other.err().unwrap_or_else(|| {
                        StoreError::Other(format!(
                            "expected an array of {} rows in the reply",
                            answers.len()
                        ))
                    });
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            },
        }
    }
}

/// One row of a script that takes rows: `KEYS[k]` and its arguments, after
/// the arguments all rows of the call share.
struct Row {
    script: &'static Script,
    shared: Vec<Vec<u8>>,
    key: String,
    args: Vec<Vec<u8>>,
    reply: Answer,
}

/// What callers queue.
enum Queued {
    Call(Call),
    Row(Row),
}

/// The queue of calls; its sender task stops when this is dropped.
pub(super) struct Coalescer {
    calls: mpsc::UnboundedSender<Queued>,
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
        self.queue(Queued::Call(Call {
            request: Request::Script(invocation),
            reply: Reply::One(reply),
        }))?;
        Self::answer(answer).await
    }

    /// Runs one plain command, together with whatever else is queued.
    pub async fn command(&self, cmd: Cmd) -> Result<Value, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue(Queued::Call(Call {
            request: Request::Command(cmd),
            reply: Reply::One(reply),
        }))?;
        Self::answer(answer).await
    }

    /// Runs one row of `script`, a script that takes rows (`rows` in
    /// `prelude.lua`), and returns its element of the reply. Rows queued
    /// together with the same `shared` arguments go in one call.
    pub async fn row(
        &self,
        script: &'static Script,
        shared: Vec<Vec<u8>>,
        key: String,
        args: Vec<Vec<u8>>,
    ) -> Result<Value, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue(Queued::Row(Row {
            script,
            shared,
            key,
            args,
            reply,
        }))?;
        Self::answer(answer).await
    }

    fn queue(&self, queued: Queued) -> Result<(), StoreError> {
        self.calls
            .send(queued)
            .map_err(|_| StoreError::Unavailable("the store is shutting down".into()))
    }

    async fn answer(
        answer: oneshot::Receiver<Result<Value, StoreError>>,
    ) -> Result<Value, StoreError> {
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the call was dropped".into()))?
    }
}

/// Turns what has queued into calls: rows of the same script with the same
/// shared arguments become one call, in the order they queued.
fn calls(queued: Vec<Queued>) -> Vec<Call> {
    let mut calls = Vec::with_capacity(queued.len());
    // Each group's rows; its first row holds the script and the shared
    // arguments for all of them.
    let mut groups: Vec<Vec<Row>> = Vec::new();
    for item in queued {
        match item {
            Queued::Call(call) => calls.push(call),
            Queued::Row(row) => {
                let group = groups.iter_mut().find(|group| {
                    std::ptr::eq(group[0].script, row.script) && group[0].shared == row.shared
                });
                match group {
                    Some(group) => group.push(row),
                    None => groups.push(vec![row]),
                }
            }
        }
    }
    for rows in groups {
        let mut invocation = rows[0].script.prepare_invoke();
        for row in &rows {
            invocation.key(&row.key);
        }
        for arg in &rows[0].shared {
            invocation.arg(&arg[..]);
        }
        let mut answers = Vec::with_capacity(rows.len());
        for row in rows {
            for arg in &row.args {
                invocation.arg(&arg[..]);
            }
            answers.push(row.reply);
        }
        calls.push(Call {
            request: Request::Script(invocation),
            reply: Reply::Rows(answers),
        });
    }
    calls
}

/// Takes what has queued, up to [`MAX_BATCH`], whenever fewer than
/// [`IN_FLIGHT`] pipelines are out, until every sender is gone.
async fn send_queued(mut queue: mpsc::UnboundedReceiver<Queued>, connections: Arc<Connections>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut queued = Vec::new();
        if queue.recv_many(&mut queued, MAX_BATCH).await == 0 {
            return;
        }
        let connections = connections.clone();
        tokio::spawn(async move {
            send(calls(queued), &connections).await;
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
        for call in &mut pending {
            match &mut call.request {
                Request::Script(invocation) => {
                    pipe.invoke_script(invocation);
                }
                Request::Command(cmd) => {
                    pipe.add_command(std::mem::take(cmd));
                }
            }
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
                Some(result) => call.reply.send(result.map_err(reply::redis_error)),
                None => call
                    .reply
                    .send(Err(StoreError::Other("missing reply in a pipeline".into()))),
            }
        }
        let Some(Request::Script(first)) = unknown.first().map(|call| &call.request) else {
            return;
        };
        if let Err(e) = first.load_async(&mut conn).await {
            return fail(unknown, &reply::redis_error(e));
        }
        pending = unknown;
    }
}

/// Answers every call with `e`.
fn fail(calls: Vec<Call>, e: &StoreError) {
    for call in calls {
        call.reply.send(Err(e.clone()));
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_queued_together_share_a_call_and_keep_their_own_replies() {
        let connections = Arc::new(Connections::new(&services::redis_url(), 1).unwrap());
        let calls = Coalescer::start(connections);
        // Each row answers with the number of rows in its call, the shared
        // argument and its own. Rows asked to fail raise a Lua error or make
        // redis.call fail.
        let body = format!(
            "-- {}\n{}\nlocal function echo(key, arg)\n\
             if arg == 'lua' then error('asked to fail') end\n\
             if arg == 'call' then return redis.call('INCRBY', key, 'x') end\n\
             return {{#KEYS, ARGV[1], arg}}\nend\nreturn rows(echo, 1, 1)",
            uuid::Uuid::new_v4(),
            super::super::scripts::PRELUDE,
        );
        let echo: &'static Script = Box::leak(Box::new(Script::new(&body)));
        let key = format!("cc-test:{}", uuid::Uuid::new_v4());
        let asked: Vec<(String, String)> = (0..300)
            .map(|i| {
                let shared = if i % 3 == 0 { "a" } else { "b" };
                let arg = match i % 50 {
                    7 => "lua".to_owned(),
                    8 => "call".to_owned(),
                    _ => i.to_string(),
                };
                (shared.to_owned(), arg)
            })
            .collect();
        let replies = futures::future::join_all(asked.iter().map(|(shared, arg)| {
            calls.row(
                echo,
                vec![shared.clone().into_bytes()],
                key.clone(),
                vec![arg.clone().into_bytes()],
            )
        }))
        .await;
        let mut largest_call = 0;
        for ((shared, arg), reply) in asked.iter().zip(replies) {
            match arg.as_str() {
                "lua" => assert!(
                    matches!(&reply, Err(StoreError::Other(m)) if m.contains("asked to fail")),
                    "{reply:?}"
                ),
                "call" => assert!(
                    matches!(&reply, Err(StoreError::Other(m)) if m.contains("not an integer")),
                    "{reply:?}"
                ),
                _ => {
                    let Value::Array(items) = reply.unwrap() else {
                        panic!("not an array")
                    };
                    let [Value::Int(rows), own_shared, own_arg] = &items[..] else {
                        panic!("unexpected row reply {items:?}")
                    };
                    assert_eq!(own_shared, &Value::BulkString(shared.clone().into_bytes()));
                    assert_eq!(own_arg, &Value::BulkString(arg.clone().into_bytes()));
                    largest_call = largest_call.max(*rows);
                }
            }
        }
        assert!(largest_call > 1, "every row went in a call of its own");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_ride_with_script_calls_and_are_sent_once() {
        let connections = Arc::new(Connections::new(&services::redis_url(), 1).unwrap());
        let calls = Coalescer::start(connections.clone());
        // A script this Redis has never seen: its calls are sent again after
        // NOSCRIPT, and the commands in the same pipelines must not be.
        let body = format!("-- {}\nreturn ARGV[1]", uuid::Uuid::new_v4());
        let echo: &'static Script = Box::leak(Box::new(Script::new(&body)));
        let counter = format!("cc-test:{}", uuid::Uuid::new_v4());
        let text = format!("cc-test:{}", uuid::Uuid::new_v4());
        let mut conn = connections.get();
        let () = ::redis::cmd("SET")
            .arg(&text)
            .arg("not a number")
            .query_async(&mut conn)
            .await
            .unwrap();

        let replies = futures::future::join_all((0..300).map(|i| {
            let calls = &calls;
            let (counter, text) = (&counter, &text);
            async move {
                match i % 3 {
                    0 => {
                        let mut invocation = echo.prepare_invoke();
                        invocation.arg(i);
                        (i, calls.eval(invocation).await)
                    }
                    1 => {
                        let mut cmd = ::redis::cmd("INCR");
                        cmd.arg(counter);
                        (i, calls.command(cmd).await)
                    }
                    _ => {
                        let mut cmd = ::redis::cmd("INCR");
                        cmd.arg(text);
                        (i, calls.command(cmd).await)
                    }
                }
            }
        }))
        .await;
        let mut counts = Vec::new();
        for (i, reply) in replies {
            match i % 3 {
                0 => assert_eq!(
                    reply.unwrap(),
                    Value::BulkString(i.to_string().into_bytes())
                ),
                1 => match reply.unwrap() {
                    Value::Int(n) => counts.push(n),
                    other => panic!("INCR answered {other:?}"),
                },
                _ => assert!(
                    matches!(&reply, Err(StoreError::Other(m)) if m.contains("not an integer")),
                    "{reply:?}"
                ),
            }
        }
        counts.sort_unstable();
        assert_eq!(
            counts,
            (1..=100).collect::<Vec<i64>>(),
            "a command ran twice"
        );

        let () = ::redis::cmd("DEL")
            .arg(&counter)
            .arg(&text)
            .query_async(&mut conn)
            .await
            .unwrap();
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
