//! Behaviour of the embedded backends through their traits, as the intake
//! and the workers use them: the queue ([`queue`]), the store ([`store`]),
//! and what survives a restart or a SIGKILL ([`durability`]).

mod durability;
mod queue;
mod store;

use std::path::Path;

use chrono::Utc;

use crate::backend::Backends;
use crate::config::Settings;
use crate::task::{NewTask, TaskLimits, TaskMessage};

/// Settings with a lease of `ack_wait_ms`.
fn settings(ack_wait_ms: u64) -> Settings {
    let mut settings = Settings::default();
    settings.nats.ack_wait_ms = ack_wait_ms;
    settings
}

/// Opens the backends on `dir/claudecluster.redb`.
fn open(dir: &Path, settings: &Settings) -> Backends {
    let mut settings = settings.clone();
    settings.embedded.data_dir = Some(dir.to_path_buf());
    super::open_embedded(&settings).expect("open embedded backends")
}

/// A valid task message with `prompt` and `priority`.
fn task(prompt: &str, priority: u8) -> TaskMessage {
    NewTask {
        prompt: prompt.to_owned(),
        priority: Some(priority),
        ..NewTask::default()
    }
    .into_message(&TaskLimits::default(), Utc::now())
    .expect("valid task")
}

/// The prompt inside a delivered payload.
fn prompt_of(payload: &[u8]) -> String {
    serde_json::from_slice::<TaskMessage>(payload)
        .expect("payload is a task message")
        .prompt
}
