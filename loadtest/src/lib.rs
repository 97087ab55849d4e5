//! Load generation and benchmarking for ClaudeCluster.
//!
//! - `claudecluster-loadgen` ([`cli`], [`drive`]) submits tasks to a running
//!   intake over HTTP in a closed loop (as fast as possible) or an open loop
//!   (a fixed rate, latency from the intended send time), follows them to
//!   their final state ([`observe`]) and reports throughput and HDR latency
//!   percentiles ([`report`], [`stats`]).
//! - `claudecluster-rawbench` ([`raw`]) measures the pipeline underneath
//!   ClaudeCluster on its own (JetStream publish and pull with acks plus one
//!   Redis write per message), the ceiling the system is compared with.
//! - [`summary`] puts one benchmark run's figures side by side with the
//!   targets; [`rss`] and [`cpu`] read the memory and CPU time of the
//!   processes under test.
//!
//! Every tool refuses non-loopback targets unless told otherwise
//! ([`target`]).

pub mod api;
pub mod cli;
pub mod cpu;
pub mod drive;
pub mod http;
pub mod observe;
pub mod raw;
pub mod report;
pub mod rss;
pub mod stats;
pub mod summary;
pub mod target;
