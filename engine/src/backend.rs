//! Chooses and connects the broker and result-store backends from settings,
//! and hands them out as trait objects so the rest of the program does not
//! care which ones run.

use std::sync::Arc;

use crate::broker::{DeadLetterStore, TaskConsumer, TaskPublisher};
use crate::results::ResultStore;

/// The connected backends of one process.
#[derive(Clone)]
pub struct Backends {
    /// Publishes tasks (used by the intake).
    pub publisher: Arc<dyn TaskPublisher>,
    /// Delivers tasks (used by the workers).
    pub consumer: Arc<dyn TaskConsumer>,
    /// Task state.
    pub store: Arc<dyn ResultStore>,
    /// The dead letters.
    pub dead_letters: Arc<dyn DeadLetterStore>,
    /// A short description for logs and `/health`, e.g.
    /// `nats://127.0.0.1:4222 + redis://127.0.0.1:6379`.
    pub description: String,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}
