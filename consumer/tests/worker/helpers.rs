//! A test world on the shared NATS and Redis: names no other test uses,
//! task submission as the intake does it, raw publishing as another system
//! would, worker pools to start and stop, and waiting for what a user would
//! see (a final record, a dead letter, a heartbeat).

use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use claudecluster_consumer::executor::{self, Executor};
use claudecluster_consumer::{PoolStatus, WorkerPool, launcher};
use claudecluster_engine::backend::{self, Backends, testing};
use claudecluster_engine::broker::{DeadLetter, PriorityBand};
use claudecluster_engine::config::{ExecutorKind, ResourceLimits, Settings};
use claudecluster_engine::task::{NewTask, TaskId, TaskMessage, TaskRecord};
use claudecluster_testkit::services;
pub use claudecluster_testkit::wait::eventually;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One test's streams, consumers and keys, removed on drop.
pub struct World {
    pub settings: Settings,
    pub backends: Backends,
    nats: async_nats::jetstream::Context,
}

impl World {
    /// A world whose settings `tweak` adjusts (before anything connects).
    pub async fn new(label: &str, tweak: impl FnOnce(&mut Settings)) -> World {
        // The test harness cannot launch tasks under limits; the worker
        // binary built for these tests can.
        launcher::set_program(env!("CARGO_BIN_EXE_claudecluster-consumer"));
        let mut settings =
            testing::isolated_settings(label, &services::nats_url(), &services::redis_url());
        settings.worker.concurrency = 4;
        settings.worker.shutdown_grace_ms = 5_000;
        settings.worker.heartbeat_interval_ms = 200;
        settings.worker.retry_base_delay_ms = 20;
        settings.worker.retry_max_delay_ms = 100;
        settings.worker.limits = ResourceLimits {
            max_memory_mb: None,
            max_cpu_cores: None,
            disk_quota_mb: None,
        };
        let work = std::env::temp_dir().join("cc-worker-tests");
        settings.worker.work_dir = Some(work);
        tweak(&mut settings);
        let backends = backend::connect_networked(&settings)
            .await
            .expect("NATS and Redis must be running for the worker tests");
        let client = async_nats::connect(settings.nats_url()).await.unwrap();
        World {
            nats: async_nats::jetstream::new(client),
            settings,
            backends,
        }
    }

    /// Submits a task the way the intake does: record first, then publish.
    pub async fn submit(&self, task: NewTask) -> TaskMessage {
        let msg = task.into_message(&self.settings.tasks, Utc::now()).unwrap();
        self.backends
            .store
            .create(&TaskRecord::queued(&msg, Utc::now()))
            .await
            .unwrap();
        self.backends.publisher.publish(&msg).await.unwrap();
        msg
    }

    /// Submits a task with just a prompt.
    pub async fn submit_prompt(&self, prompt: &str) -> TaskMessage {
        self.submit(NewTask {
            prompt: prompt.into(),
            ..NewTask::default()
        })
        .await
    }

    /// Publishes raw bytes on the normal band, as another system might.
    pub async fn publish_raw(&self, payload: impl Into<Bytes>) {
        let subject = format!(
            "{}.{}",
            self.settings.nats.subject_prefix,
            PriorityBand::Normal.as_str()
        );
        self.nats
            .publish(subject, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The record of `id`, once it is final.
    pub async fn final_record(&self, id: TaskId) -> TaskRecord {
        eventually(&format!("task {id} to finish"), || async {
            self.backends
                .store
                .get(id)
                .await
                .unwrap()
                .filter(|r| r.state.is_final())
        })
        .await
    }

    /// The record of `id` now.
    pub async fn record(&self, id: TaskId) -> TaskRecord {
        self.backends.store.get(id).await.unwrap().unwrap()
    }

    /// The dead letters, once there are at least `n`.
    pub async fn dead_letters(&self, n: usize) -> Vec<DeadLetter> {
        eventually(&format!("{n} dead letters"), || async {
            let all = self
                .backends
                .dead_letters
                .list(None, 1000, None)
                .await
                .unwrap();
            (all.len() >= n).then_some(all)
        })
        .await
    }

    /// Settings for the command executor running `argv`.
    pub fn command_settings(&self, argv: &[&str]) -> Settings {
        let mut s = self.settings.clone();
        s.worker.executor = Some(ExecutorKind::Command);
        s.worker.command = argv.iter().map(|a| a.to_string()).collect();
        s
    }

    /// Starts a pool with `settings` (this world's, or derived from them).
    pub fn start_pool(&self, settings: Settings) -> RunningPool {
        let executor: Arc<dyn Executor> = executor::from_settings(&settings).unwrap();
        let pool = WorkerPool::new(Arc::new(settings), self.backends.clone(), executor);
        let status = pool.status();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(pool.run(shutdown.clone()));
        RunningPool {
            status,
            shutdown,
            handle: Some(handle),
        }
    }

    /// Starts a pool with this world's settings (the echo executor).
    pub fn start_echo_pool(&self) -> RunningPool {
        self.start_pool(self.settings.clone())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        testing::cleanup_blocking(&self.settings);
    }
}

/// A pool running in the background.
pub struct RunningPool {
    pub status: PoolStatus,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningPool {
    /// Signals shutdown and waits for the pool to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for RunningPool {
    fn drop(&mut self) {
        // A failed test must not leave a pool pulling from a deleted stream.
        self.shutdown.cancel();
    }
}

/// A directory for files the test and its commands share.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
