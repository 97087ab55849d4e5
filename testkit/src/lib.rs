//! Test support shared by the crates' integration tests and the end-to-end
//! suite: where the services are ([`services`]), a stand-in for the model
//! API that the real Claude Code CLI can talk to ([`model_api`]), polling
//! for states that have no event to await ([`wait`]), and the allocator
//! limit that the futures' size guards check against.

pub mod model_api;
pub mod services;
pub mod wait;

/// The largest block glibc's per-thread cache serves (1032 bytes). A larger
/// allocation takes the allocator's slow path, which also consolidates its
/// free lists; futures made for every task or every pull are kept under it
/// (`loadtest/README.md`, changes 23 and 24), and size guards assert so.
pub const ALLOCATOR_THREAD_CACHE_MAX: usize = 1032;
