//! The one handle on the database file, shared by the embedded queue and the
//! embedded result store.
//!
//! redb allows one write transaction at a time and a durable commit costs an
//! fsync, so every write goes through a single writer thread that commits
//! whatever has queued up while the previous fsync ran in one transaction
//! (group commit): under load many callers share one fsync, and each caller
//! still gets its answer only after its change is on disk. Reads run on the
//! blocking pool against redb's snapshots and never wait for the writer.
//!
//! A write is a closure over the open [`Tables`]. It may be run twice: when
//! any operation of a group fails, the group's transaction is aborted and
//! each operation is retried alone, so one bad operation cannot take its
//! neighbours down with it, and an operation's changes are never committed
//! half-done.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction};
use tokio::sync::oneshot;

use super::tables::{self, Tables};

/// Most operations committed in one transaction; bounds how long one
/// transaction holds its pages and how long the last caller of a group waits.
const MAX_GROUP: usize = 512;

/// How often the writer removes expired records, heartbeats and duplicate
/// markers.
const PURGE_INTERVAL: Duration = Duration::from_secs(30);

/// Pause between purge batches while a backlog of expired entries remains,
/// so queued writes get the writer in between.
const PURGE_BACKLOG_PAUSE: Duration = Duration::from_millis(50);

/// Most expired entries of each kind removed in one purge transaction, so a
/// purge never stalls the writes queued behind it for long.
const PURGE_BATCH: usize = 2_000;

/// Errors from the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// redb reported an error (I/O, corruption, a full disk).
    #[error("database error: {0}")]
    Storage(#[from] redb::Error),
    /// The writer thread has stopped; nothing can be written any more.
    #[error("the database writer has stopped")]
    WriterStopped,
    /// An operation panicked; its transaction was aborted.
    #[error("a database operation panicked")]
    Panicked,
    /// A read on the blocking pool could not run to completion.
    #[error("a database read did not complete: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One write queued for the writer thread.
trait WriteOp: Send {
    /// Applies the operation inside the open transaction.
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), redb::Error>;
    /// Reports the outcome once the transaction is committed or abandoned.
    fn finish(self: Box<Self>, outcome: Result<(), DbError>);
}

/// A closure with the slot for its answer and the caller waiting for it.
struct FnOp<F, T> {
    f: F,
    out: Option<T>,
    reply: oneshot::Sender<Result<T, DbError>>,
}

impl<F, T> WriteOp for FnOp<F, T>
where
    F: FnMut(&mut Tables<'_>) -> Result<T, redb::Error> + Send,
    T: Send,
{
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), redb::Error> {
        self.out = Some((self.f)(tables)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), DbError>) {
        let FnOp { out, reply, .. } = *self;
        let answer = outcome.and_then(|()| out.ok_or(DbError::Panicked));
        // The caller may have stopped waiting (its future was dropped); the
        // change is committed either way.
        let _ = reply.send(answer);
    }
}

/// A write nobody waits for; a failure is logged.
struct DetachedOp<F> {
    what: &'static str,
    f: F,
}

impl<F> WriteOp for DetachedOp<F>
where
    F: FnMut(&mut Tables<'_>) -> Result<(), redb::Error> + Send,
{
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), redb::Error> {
        (self.f)(tables)
    }

    fn finish(self: Box<Self>, outcome: Result<(), DbError>) {
        if let Err(e) = outcome {
            tracing::warn!(error = %e, what = self.what, "a background write failed");
        }
    }
}

enum Job {
    Write(Box<dyn WriteOp>),
    Ping(oneshot::Sender<()>),
}

/// A shared handle on the open database. Cloning is cheap; the file is
/// closed (and the writer thread joined) when the last clone is dropped.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

struct DbInner {
    database: Arc<Database>,
    sender: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for DbInner {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop; joining it means the
        // file is closed when the last handle is gone, so the same file can
        // be opened again right away.
        drop(self.sender.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the embedded database writer thread panicked");
        }
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Starts the writer thread for an open database, after creating every
    /// table so reads never find one missing.
    ///
    /// # Errors
    /// When the tables cannot be created or the thread cannot be started.
    pub(crate) fn start(database: Database, path: &Path) -> Result<Self, DbError> {
        let txn = database.begin_write().map_err(redb::Error::from)?;
        tables::create_all(&txn)?;
        txn.commit().map_err(redb::Error::from)?;

        let database = Arc::new(database);
        let (sender, receiver) = mpsc::channel();
        let for_writer = Arc::clone(&database);
        let writer = std::thread::Builder::new()
            .name("claudecluster-redb-writer".into())
            .spawn(move || writer_loop(&for_writer, &receiver))
            .map_err(redb::Error::Io)?;
        Ok(Self {
            inner: Arc::new(DbInner {
                database,
                sender: Some(sender),
                writer: Some(writer),
                path: path.to_path_buf(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in a write transaction and returns its answer once the
    /// transaction is durably committed. `f` must be repeatable: it may run
    /// again in a fresh transaction when its group is retried.
    ///
    /// # Errors
    /// [`DbError`] when the transaction could not be committed.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnMut(&mut Tables<'_>) -> Result<T, redb::Error> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = FnOp {
            f,
            out: None,
            reply,
        };
        self.send(Job::Write(Box::new(op)))?;
        answer.await.map_err(|_| DbError::WriterStopped)?
    }

    /// Queues `f` to run in a write transaction without waiting for it, for
    /// bookkeeping whose loss in a crash is harmless. Writes are applied in
    /// the order they are queued, so a later awaited write of the same rows
    /// lands after it; a failure is logged as `what`.
    pub(crate) fn write_detached<F>(&self, what: &'static str, f: F)
    where
        F: FnMut(&mut Tables<'_>) -> Result<(), redb::Error> + Send + 'static,
    {
        if self
            .send(Job::Write(Box::new(DetachedOp { what, f })))
            .is_err()
        {
            tracing::warn!(what, "the database writer has stopped; write dropped");
        }
    }

    /// Runs `f` on a read snapshot, on the blocking pool.
    ///
    /// # Errors
    /// [`DbError`] when the snapshot could not be read.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnOnce(&ReadTransaction) -> Result<T, redb::Error> + Send + 'static,
        T: Send + 'static,
    {
        // The closure holds a handle, so the file stays open until it ends.
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            let txn = redb::ReadableDatabase::begin_read(db.inner.database.as_ref())
                .map_err(redb::Error::from)?;
            Ok(f(&txn)?)
        })
        .await?
    }

    /// Reads synchronously; for start-up, before any async caller exists.
    ///
    /// # Errors
    /// [`DbError`] when the snapshot could not be read.
    pub(crate) fn read_now<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, DbError> {
        let txn = redb::ReadableDatabase::begin_read(self.inner.database.as_ref())
            .map_err(redb::Error::from)?;
        Ok(f(&txn)?)
    }

    /// Checks that the writer thread is alive and answering.
    ///
    /// # Errors
    /// [`DbError::WriterStopped`] when it is not.
    pub(crate) async fn ping(&self) -> Result<(), DbError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Ping(reply))?;
        answer.await.map_err(|_| DbError::WriterStopped)
    }

    fn send(&self, job: Job) -> Result<(), DbError> {
        self.inner
            .sender
            .as_ref()
            .ok_or(DbError::WriterStopped)?
            .send(job)
            .map_err(|_| DbError::WriterStopped)
    }
}

/// The writer thread: waits for jobs, commits them in groups, purges expired
/// entries now and then, and ends when every handle is gone.
fn writer_loop(db: &Database, receiver: &mpsc::Receiver<Job>) {
    let mut group: Vec<Box<dyn WriteOp>> = Vec::with_capacity(MAX_GROUP);
    let mut next_purge = Instant::now();
    loop {
        if Instant::now() >= next_purge {
            let pause = if purge(db) {
                PURGE_BACKLOG_PAUSE
            } else {
                PURGE_INTERVAL
            };
            next_purge = Instant::now() + pause;
        }
        let wait = next_purge.saturating_duration_since(Instant::now());
        let first = match receiver.recv_timeout(wait) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Write(op) => group.push(op),
                Job::Ping(reply) => {
                    let _ = reply.send(());
                }
            }
            if group.len() < MAX_GROUP {
                next = receiver.try_recv().ok();
            }
        }
        if !group.is_empty() {
            commit_group(db, &mut group);
        }
    }
}

/// Commits `group` in one transaction; when that fails, commits each
/// operation alone so only the failing ones report an error.
fn commit_group(db: &Database, group: &mut Vec<Box<dyn WriteOp>>) {
    match run_guarded(db, group) {
        Ok(()) => {
            for op in group.drain(..) {
                op.finish(Ok(()));
            }
        }
        Err(e) if group.len() == 1 => {
            if let Some(op) = group.pop() {
                op.finish(Err(e));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, ops = group.len(), "group commit failed; retrying each operation alone");
            for mut op in group.drain(..) {
                let outcome = run_guarded(db, std::slice::from_mut(&mut op));
                op.finish(outcome);
            }
        }
    }
}

/// One transaction over `ops`, with a panic in an operation turned into an
/// error (the transaction is then dropped, which aborts it).
fn run_guarded(db: &Database, ops: &mut [Box<dyn WriteOp>]) -> Result<(), DbError> {
    match catch_unwind(AssertUnwindSafe(|| run_transaction(db, ops))) {
        Ok(result) => result.map_err(DbError::from),
        Err(_) => Err(DbError::Panicked),
    }
}

fn run_transaction(db: &Database, ops: &mut [Box<dyn WriteOp>]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut tables = Tables::open(&txn)?;
        for op in ops.iter_mut() {
            op.apply(&mut tables)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Removes a batch of expired task records, worker heartbeats and duplicate
/// markers; `true` when more are due, so the next batch comes soon rather
/// than one purge interval later.
fn purge(db: &Database) -> bool {
    let now = tables::now_ms();
    let result = (|| -> Result<tables::Purged, redb::Error> {
        let txn = db.begin_write()?;
        let purged = {
            let mut tables = Tables::open(&txn)?;
            tables::purge_expired(&mut tables, now, PURGE_BATCH)?
        };
        txn.commit()?;
        Ok(purged)
    })();
    match result {
        Ok(purged) => {
            if purged.removed > 0 {
                tracing::debug!(removed = purged.removed, "purged expired entries");
            }
            purged.more
        }
        Err(e) => {
            tracing::warn!(error = %e, "purging expired entries failed; will retry");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued operation and the receiver of its answer.
    fn op<F>(f: F) -> (Box<dyn WriteOp>, oneshot::Receiver<Result<u64, DbError>>)
    where
        F: FnMut(&mut Tables<'_>) -> Result<u64, redb::Error> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = FnOp {
            f,
            out: None,
            reply,
        };
        (Box::new(op), answer)
    }

    fn counter(db: &Database, name: &str) -> u64 {
        let txn = redb::ReadableDatabase::begin_read(db).unwrap();
        let meta = txn.open_table(tables::META).unwrap();
        redb::ReadableTable::get(&meta, name)
            .unwrap()
            .map_or(0, |v| v.value())
    }

    #[test]
    fn a_failing_or_panicking_operation_does_not_sink_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        tables::create_all(&txn).unwrap();
        txn.commit().unwrap();

        let (good, good_answer) = op(|t| t.next_seq("good"));
        // Writes, then fails: its write must not be committed.
        let (bad, bad_answer) = op(|t| {
            t.next_seq("bad")?;
            Err(redb::Error::Corrupted("simulated".into()))
        });
        let (panics, panic_answer) = op(|t| {
            t.next_seq("panics")?;
            panic!("simulated panic in an operation");
        });
        let (after, after_answer) = op(|t| t.next_seq("good"));
        let mut group = vec![good, bad, panics, after];
        commit_group(&db, &mut group);

        assert_eq!(good_answer.blocking_recv().unwrap().unwrap(), 1);
        assert_eq!(after_answer.blocking_recv().unwrap().unwrap(), 2);
        assert!(matches!(
            bad_answer.blocking_recv().unwrap(),
            Err(DbError::Storage(_))
        ));
        assert!(matches!(
            panic_answer.blocking_recv().unwrap(),
            Err(DbError::Panicked)
        ));
        assert_eq!(counter(&db, "good"), 2);
        assert_eq!(counter(&db, "bad"), 0);
        assert_eq!(counter(&db, "panics"), 0);
    }
}
