//! [`McpServer`]: the MCP handler. It lists the tools and runs a call by
//! parsing its arguments and calling the [`TaskService`], exactly as the
//! HTTP handlers do.

use std::sync::Arc;

use claudecluster_engine::config::Settings;
use claudecluster_engine::task::NewTask;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::args::{self, ListTasks, SubmitTasks, TaskRef, WaitFor};
use super::metrics::{self, Outcome};
use super::reply::{self, REPLAYED_META, Reply, ToolError};
use super::tools::{self, ToolName};
use super::wait::{self, PeerProgress, Waited};
use crate::error::ApiError;
use crate::extract::Object;
use crate::service::TaskService;

/// The intake's MCP server. Cloning is cheap (one `Arc`); the transport
/// clones it for every request, and nothing in it belongs to one client.
#[derive(Clone)]
pub struct McpServer {
    inner: Arc<Inner>,
}

struct Inner {
    service: TaskService,
    tools: Vec<Tool>,
    stopping: CancellationToken,
    /// Bounds the `wait_for_task` calls blocking at once in this process,
    /// like `server.max_concurrent_requests` bounds the HTTP API.
    waits: Arc<Semaphore>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

impl McpServer {
    /// A server over `service` with the limits of `settings`; `stopping`
    /// ends blocking waits at shutdown.
    pub fn new(service: TaskService, settings: Arc<Settings>, stopping: CancellationToken) -> Self {
        metrics::describe();
        Self {
            inner: Arc::new(Inner {
                service,
                tools: tools::catalogue(&settings.tasks),
                stopping,
                waits: Arc::new(Semaphore::new(
                    settings.server.max_concurrent_requests.max(1),
                )),
            }),
        }
    }

    /// The tool definitions.
    pub fn tools(&self) -> &[Tool] {
        &self.inner.tools
    }

    /// Runs tool `tool` with `arguments` for the request of `context`.
    ///
    /// # Errors
    /// A [`ToolError`] the caller turns into an `isError` result.
    pub async fn run(
        &self,
        tool: ToolName,
        arguments: Option<rmcp::model::JsonObject>,
        context: &RequestContext<RoleServer>,
    ) -> Result<Reply, ToolError> {
        let service = &self.inner.service;
        match tool {
            ToolName::SubmitTask => {
                let mut task: NewTask =
                    args::parse(arguments).inspect_err(|_| crate::metrics::tasks_rejected(1))?;
                if task.trace.is_none() {
                    task.trace = args::trace_context(&context.meta);
                }
                let submitted = service.submit(task).await?;
                let reply = Reply::of(&submitted.record);
                Ok(if submitted.replayed {
                    reply.with_meta(REPLAYED_META, json!(true))
                } else {
                    reply
                })
            }
            ToolName::SubmitTasks => {
                let SubmitTasks { tasks } =
                    args::parse(arguments).inspect_err(|_| crate::metrics::tasks_rejected(1))?;
                let trace = args::trace_context(&context.meta);
                let tasks = tasks
                    .into_iter()
                    .map(|Object(mut task)| {
                        if task.trace.is_none() {
                            task.trace.clone_from(&trace);
                        }
                        task
                    })
                    .collect();
                let submitted = service.submit_batch(tasks).await?;
                let tasks: Vec<_> = submitted.into_iter().map(|s| s.record).collect();
                Ok(Reply::of(&json!({ "tasks": tasks })))
            }
            ToolName::GetTask => {
                let id = args::parse::<TaskRef>(arguments)?.id()?;
                Ok(Reply::of(&service.get(id).await?))
            }
            ToolName::CancelTask => {
                let id = args::parse::<TaskRef>(arguments)?.id()?;
                Ok(Reply::of(&service.cancel(id).await?))
            }
            ToolName::ListTasks => {
                let list: ListTasks = args::parse(arguments)?;
                let page = service
                    .list(list.state, list.cursor(), list.limit()?)
                    .await?;
                Ok(Reply::of(&json!({
                    "tasks": page.tasks,
                    "next_cursor": page.next_cursor,
                })))
            }
            ToolName::WaitForTask => {
                let wait: WaitFor = args::parse(arguments)?;
                let (id, max_wait) = (wait.id()?, wait.max_wait()?);
                let Ok(_permit) = Arc::clone(&self.inner.waits).try_acquire_owned() else {
                    return Err(ApiError::Overloaded.into());
                };
                let _in_progress = metrics::wait_started();
                let progress = context.meta.get_progress_token().map(|token| PeerProgress {
                    peer: context.peer.clone(),
                    token,
                });
                match wait::wait_for(
                    service,
                    id,
                    max_wait,
                    &progress,
                    &context.ct,
                    &self.inner.stopping,
                )
                .await?
                {
                    Waited::Finished(record) | Waited::NotYet(record) => Ok(Reply::of(&record)),
                    Waited::Cancelled => Err(ToolError::Cancelled),
                }
            }
        }
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        let mut config = ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions(tools::INSTRUCTIONS);
        config.server_info = Implementation::new("claudecluster", env!("CARGO_PKG_VERSION"))
            .with_title("ClaudeCluster");
        config
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.inner.tools.clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.inner.tools.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let Some(tool) = ToolName::parse(&request.name) else {
            metrics::tool_call(None, Outcome::Rejected);
            let known: Vec<&str> = ToolName::ALL.iter().map(|t| t.as_str()).collect();
            // The one protocol error: the call cannot be routed (MCP asks
            // for invalid params here).
            return Err(ErrorData::invalid_params(
                format!(
                    "unknown tool `{}`; this server has {}",
                    request.name,
                    known.join(", ")
                ),
                None,
            ));
        };
        let (result, outcome) = reply::result(self.run(tool, request.arguments, &context).await);
        metrics::tool_call(Some(tool), outcome);
        Ok(result.into())
    }
}
