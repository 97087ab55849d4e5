//! Key names, all under the configured prefix so deployments and tests can
//! share one Redis, and the list cursor format.

use crate::results::StoreError;
use crate::task::{TaskId, TaskState};

/// The key names of one store.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix itself; scripts derive the keys a transition touches from
    /// it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash of one task.
    pub fn task(&self, id: TaskId) -> String {
        self.task_named(&id.to_string())
    }

    /// The hash of one task, from the id as an index stores it.
    pub fn task_named(&self, id: &str) -> String {
        format!("{}task:{id}", self.prefix)
    }

    /// The index to list the tasks of one state from (`None`: all tasks): a
    /// ZSET scored by `created_at` in milliseconds. Only the states of
    /// [`has_own_index`] have one of their own; the others are read from the
    /// index of all tasks and filtered.
    pub fn index(&self, state: Option<TaskState>) -> String {
        match state {
            Some(s) if has_own_index(s) => format!("{}index:{}", self.prefix, s.as_str()),
            _ => format!("{}index", self.prefix),
        }
    }

    /// The channel a task's state changes are published on.
    pub fn events(&self, id: &str) -> String {
        format!("{}events:{id}", self.prefix)
    }

    /// Worker id to `WorkerInfo` JSON.
    pub fn workers(&self) -> String {
        format!("{}workers", self.prefix)
    }

    /// Worker id scored by the time its heartbeat expires.
    pub fn workers_expiry(&self) -> String {
        format!("{}workers:expiry", self.prefix)
    }
}

/// Whether the tasks in `state` have an index of their own: the rare
/// outcomes an operator looks for among many successes. The scripts write
/// these indexes (`has_own_index` in `scripts/prelude.lua`, checked against this
/// by a test).
pub fn has_own_index(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Failed | TaskState::TimedOut | TaskState::Cancelled | TaskState::DeadLettered
    )
}

/// A position in a listing: the index score and id of the last task shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cursor {
    pub score: i64,
    pub id: String,
}

impl Cursor {
    /// Parses a cursor issued by [`Cursor::encode`].
    ///
    /// # Errors
    /// [`StoreError::Other`] for anything else.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        let bad = || StoreError::Other(format!("invalid list cursor {s:?}"));
        let (score, id) = s.split_once(':').ok_or_else(bad)?;
        let score = score.parse().map_err(|_| bad())?;
        let id: TaskId = id.parse().map_err(|_| bad())?;
        Ok(Self {
            score,
            id: id.to_string(),
        })
    }

    /// The opaque string handed to clients.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.score, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_index_the_states_the_listing_reads() {
        let prelude = include_str!("scripts/prelude.lua");
        let start = prelude
            .find("local function has_own_index(state)")
            .expect("has_own_index in prelude.lua");
        let body = &prelude[start..start + prelude[start..].find("\nend").unwrap()];
        for state in TaskState::ALL {
            assert_eq!(
                body.contains(&format!("'{}'", state.as_str())),
                has_own_index(state),
                "{state} in has_own_index of prelude.lua and of keys.rs"
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            score: 1_700_000_000_123,
            id: uuid::Uuid::now_v7().to_string(),
        };
        assert_eq!(Cursor::parse(&c.encode()).unwrap(), c);
        for bad in ["", "12", "x:y", "12:not-a-uuid"] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
    }
}
