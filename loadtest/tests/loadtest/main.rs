//! Integration tests of the load tools against the real NATS and Redis
//! (`CC_TEST_NATS_URL`, `CC_TEST_REDIS_URL`): a small raw-pipeline run and
//! its cleanup, and the load generator driving an in-process intake and
//! worker pool. They check outcomes (every message through, every task
//! succeeded, nothing left behind), never timings.

mod helpers;
mod loadgen;
mod raw;
