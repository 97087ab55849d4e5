//! Where the test services are, and unique names so tests can share them.
//!
//! The test command (`scripts/test`) makes sure NATS and Redis are running
//! and exports `CC_TEST_NATS_URL` and `CC_TEST_REDIS_URL` when they are not
//! on their standard ports.

/// The NATS server tests use.
pub fn nats_url() -> String {
    std::env::var("CC_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The Redis server tests use.
pub fn redis_url() -> String {
    std::env::var("CC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A short unique token for stream, subject, consumer and key names.
pub fn unique(label: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{label}{}", &id[..12])
}
