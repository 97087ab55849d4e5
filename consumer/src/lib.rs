//! ClaudeCluster workers: pull tasks from the broker under a concurrency
//! limit, run each with an [`executor::Executor`], keep the lease while it
//! runs, and record the outcome in the result store before acknowledging.
//!
//! - [`WorkerPool`] ([`pool`]): the pull loop, concurrency, heartbeats and
//!   graceful shutdown; `delivery` and `attempt` handle one message each,
//!   and `lease` keeps a running task's lease and watches it for a cancel.
//! - [`executor`]: `echo`, `command` and `claude`, over [`process`], which
//!   runs programs in their own process group under resource limits
//!   (applied through the [`launcher`]).
//! - [`Application`] ([`app`]): the pool plus `/health`, `/ready` and
//!   `/metrics`, as the `claudecluster-consumer` binary runs it.

pub mod app;
mod attempt;
mod delivery;
pub mod executor;
pub mod launcher;
mod lease;
mod metric;
pub mod pool;
pub mod process;
pub mod retry;
pub mod workdir;

pub use app::Application;
pub use pool::{PoolStatus, WorkerPool};
