//! Test support shared by the crates' integration tests and the end-to-end
//! suite: where the services are ([`services`]), a stand-in for the model
//! API that the real Claude Code CLI can talk to ([`model_api`]), and
//! polling for states that have no event to await ([`wait`]).

pub mod model_api;
pub mod services;
pub mod wait;
