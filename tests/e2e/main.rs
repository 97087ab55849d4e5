//! End-to-end tests: the real intake and workers, driven over HTTP, on NATS
//! JetStream + Redis and on the embedded backends (the same cases, run on
//! both), with the real Claude Code CLI where a test needs Claude.

mod api;
mod cancel;
mod chaos;
mod claude;
mod crash;
mod direct_publish;
mod fleet;
mod lease;
mod mcp;
mod restart;
mod servers;

/// Declares `#[tokio::test]`s running each listed `async fn(BackendKind)` case
/// once per backend, in modules `networked` and `embedded`.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod networked {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(claudecluster_tests::BackendKind::Networked).await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(claudecluster_tests::BackendKind::Embedded).await;
                }
            )*
        }
    };
}
