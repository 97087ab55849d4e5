//! ClaudeCluster workers: pull tasks from the broker under a concurrency
//! limit, run each with an [`executor::Executor`], keep the lease while it
//! runs, and record the outcome in the result store before acknowledging.

pub mod executor;
pub mod process;
