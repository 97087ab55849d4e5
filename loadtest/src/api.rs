//! How tasks are submitted: the request each [`SubmitApi`] sends and how its
//! answer is read.
//!
//! Bodies are built once per run and shared as [`Bytes`], so the generator
//! spends no time serializing while it measures. A new way to submit (the
//! MCP `submit_task` tool over `/mcp`) is one more variant here: its path,
//! its body and how to find the task ids in its answer; the drivers do not
//! change.

use bytes::Bytes;
use claudecluster_engine::TaskId;
use claudecluster_engine::task::NewTask;
use http::StatusCode;
use serde::Deserialize;

/// The way tasks are sent to the intake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitApi {
    /// `POST /tasks`, one task per request.
    Single,
    /// `POST /tasks/batch` with `size` tasks per request.
    Batch {
        /// Tasks per request (the last request of a run may carry fewer).
        size: usize,
    },
}

impl SubmitApi {
    /// Tasks per request.
    pub fn tasks_per_request(self) -> usize {
        match self {
            SubmitApi::Single => 1,
            SubmitApi::Batch { size } => size.max(1),
        }
    }

    /// The API path requests go to.
    pub fn path(self) -> &'static str {
        match self {
            SubmitApi::Single => "/tasks",
            SubmitApi::Batch { .. } => "/tasks/batch",
        }
    }

    /// A short name for reports: `single` or `batch:<size>`.
    pub fn label(self) -> String {
        match self {
            SubmitApi::Single => "single".into(),
            SubmitApi::Batch { size } => format!("batch:{size}"),
        }
    }

    /// The request body carrying `n` copies of `task`.
    ///
    /// # Errors
    /// When the task cannot be serialized (it always can: it is plain data).
    pub fn body(self, task: &NewTask, n: usize) -> Result<Bytes, serde_json::Error> {
        let json = match self {
            SubmitApi::Single => serde_json::to_vec(task)?,
            SubmitApi::Batch { .. } => {
                #[derive(serde::Serialize)]
                struct Batch<'a> {
                    tasks: Vec<&'a NewTask>,
                }
                serde_json::to_vec(&Batch {
                    tasks: vec![task; n],
                })?
            }
        };
        Ok(Bytes::from(json))
    }

    /// Reads the intake's answer to one request.
    pub fn parse(self, status: StatusCode, body: &[u8], sent: usize) -> SubmitOutcome {
        if status != StatusCode::ACCEPTED && status != StatusCode::OK {
            return SubmitOutcome::Rejected {
                status: status.as_u16(),
                tasks: sent,
            };
        }
        let parsed = match self {
            SubmitApi::Single => serde_json::from_slice::<Accepted>(body).map(|a| vec![a.id]),
            SubmitApi::Batch { .. } => serde_json::from_slice::<BatchAccepted>(body)
                .map(|b| b.tasks.into_iter().map(|a| a.id).collect()),
        };
        match parsed {
            Ok(ids) if ids.len() == sent => SubmitOutcome::Accepted(ids),
            Ok(ids) => {
                SubmitOutcome::Malformed(format!("{} tasks sent, {} ids returned", sent, ids.len()))
            }
            Err(e) => SubmitOutcome::Malformed(e.to_string()),
        }
    }
}

/// What one submit request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// The intake took the tasks; their ids, in order.
    Accepted(Vec<TaskId>),
    /// The intake answered with another status (503 when it sheds load).
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Tasks the request carried.
        tasks: usize,
    },
    /// A success status with a body that could not be read.
    Malformed(String),
}

/// The only field of a task record the generator needs.
#[derive(Deserialize)]
struct Accepted {
    id: TaskId,
}

#[derive(Deserialize)]
struct BatchAccepted {
    tasks: Vec<Accepted>,
}

/// The fields of `GET /tasks/{id}` the HTTP observer needs.
#[derive(Debug, Deserialize)]
pub struct RecordView {
    /// Wire name of the state.
    pub state: String,
    /// When the current or last attempt started.
    #[serde(default)]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> NewTask {
        NewTask {
            prompt: "hello".into(),
            priority: Some(5),
            ..NewTask::default()
        }
    }

    #[test]
    fn single_body_is_the_task() {
        let body = SubmitApi::Single.body(&task(), 1).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["prompt"], "hello");
        assert_eq!(v["priority"], 5);
    }

    #[test]
    fn batch_body_carries_n_tasks() {
        let api = SubmitApi::Batch { size: 3 };
        let body = api.body(&task(), 3).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["tasks"].as_array().unwrap().len(), 3);
        assert_eq!(api.path(), "/tasks/batch");
        assert_eq!(api.label(), "batch:3");
    }

    #[test]
    fn answers_are_read() {
        let id = uuid::Uuid::now_v7();
        let one = format!(r#"{{"id":"{id}","state":"queued","extra":1}}"#);
        assert_eq!(
            SubmitApi::Single.parse(StatusCode::ACCEPTED, one.as_bytes(), 1),
            SubmitOutcome::Accepted(vec![id])
        );
        let many = format!(r#"{{"tasks":[{{"id":"{id}"}},{{"id":"{id}"}}]}}"#);
        assert_eq!(
            SubmitApi::Batch { size: 2 }.parse(StatusCode::ACCEPTED, many.as_bytes(), 2),
            SubmitOutcome::Accepted(vec![id, id])
        );
        assert!(matches!(
            SubmitApi::Batch { size: 3 }.parse(StatusCode::ACCEPTED, many.as_bytes(), 3),
            SubmitOutcome::Malformed(_)
        ));
        assert_eq!(
            SubmitApi::Single.parse(StatusCode::SERVICE_UNAVAILABLE, b"{}", 1),
            SubmitOutcome::Rejected {
                status: 503,
                tasks: 1
            }
        );
    }
}
