//! A ClaudeCluster (intake and worker pool, `echo` executor) running inside
//! the test process on unique stream names and a unique key prefix, removed
//! again when the handle is dropped.

use claudecluster_engine::backend::{self, testing};
use claudecluster_engine::config::{ExecutorKind, Settings};
use claudecluster_testkit::services;
use tokio_util::sync::CancellationToken;

/// A running intake and worker pool.
pub struct TestSystem {
    /// The intake's base URL.
    pub url: String,
    /// The settings both run with (names unique to this test).
    pub settings: Settings,
    shutdown: CancellationToken,
    running: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for task in &self.running {
            task.abort();
        }
        testing::cleanup_blocking(&self.settings);
    }
}

/// Starts an intake on a free loopback port and a worker pool of
/// `concurrency`, sharing one set of backends.
pub async fn spawn_system(concurrency: usize) -> TestSystem {
    let mut settings =
        testing::isolated_settings("loadgen", &services::nats_url(), &services::redis_url());
    settings.server.host = "127.0.0.1".into();
    settings.server.port = 0;
    settings.worker.port = 0;
    settings.worker.executor = Some(ExecutorKind::Echo);
    settings.worker.concurrency = concurrency;
    let backends = backend::connect_networked(&settings)
        .await
        .expect("NATS and Redis are reachable");
    let intake = claudecluster_producer::Application::build(settings.clone(), backends.clone())
        .await
        .expect("the intake builds");
    let url = format!("http://127.0.0.1:{}", intake.port());
    let workers = claudecluster_consumer::Application::build(settings.clone(), backends)
        .await
        .expect("the worker pool builds");
    let shutdown = CancellationToken::new();
    let running = vec![
        tokio::spawn(intake.run_until_stopped(shutdown.clone())),
        tokio::spawn(workers.run_until_stopped(shutdown.clone())),
    ];
    TestSystem {
        url,
        settings,
        shutdown,
        running,
    }
}

/// A unique name for a raw run's stream and key prefix.
pub fn unique_name(label: &str) -> String {
    services::unique(label)
}
