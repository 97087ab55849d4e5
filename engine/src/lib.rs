//! The domain of ClaudeCluster, shared by the intake (`producer`), the workers
//! (`consumer`) and the all-in-one `claudecluster` command.
//!
//! - [`task`]: the task message on the queue and the task record in the store,
//!   with the validation rules of the public wire contract (`schemas/`).
//! - [`broker`]: how tasks travel (NATS JetStream, or the embedded queue).
//! - [`results`]: where task state lives (Redis, or the embedded store).
//! - [`config`]: layered settings (defaults, YAML file, environment).
//! - [`telemetry`] and [`shutdown`]: logging and the one shutdown recipe.

pub mod backend;
pub mod broker;
pub mod config;
pub mod embedded;
pub mod results;
pub mod runtime;
pub mod shutdown;
pub mod task;
pub mod telemetry;

pub use task::{TaskId, TaskMessage, TaskRecord, TaskState};
