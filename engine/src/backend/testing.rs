//! Helpers for tests that run against the shared NATS and Redis: settings
//! with names no other test uses, and cleanup of everything those names
//! created. Not behind `cfg(test)` because the integration tests of every
//! crate use them.
//!
//! The cleanup functions refuse to touch the default names or an empty key
//! prefix, so a test pointed at a real deployment cannot wipe it.

use async_nats::jetstream::{self, ErrorCode, context::DeleteStreamErrorKind};

use super::{BackendError, connect_nats, redact_url};
use crate::config::{NatsSettings, RedisSettings, Settings};

/// Settings whose streams, subjects, consumers and Redis key prefix are
/// unique to one test, on the given servers. `label` (letters and digits)
/// makes the names easy to recognise in `nats stream ls` or `redis-cli`.
pub fn isolated_settings(label: &str, nats_url: &str, redis_url: &str) -> Settings {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let id = format!("{label}{}", &token[..12]);
    let mut s = Settings::default();
    s.nats.url = Some(nats_url.to_owned());
    s.nats.stream = format!("CCTEST_{id}");
    s.nats.subject_prefix = format!("cctest.{id}.tasks");
    s.nats.consumer_prefix = format!("cctest-{id}");
    s.nats.dead_letter_stream = format!("CCTEST_DL_{id}");
    s.nats.dead_letter_subject_prefix = format!("cctest.{id}.dead");
    s.redis.url = Some(redis_url.to_owned());
    s.redis.key_prefix = format!("cctest:{id}:");
    s
}

/// Removes what a test's settings created in NATS and Redis; failures are
/// printed, not raised, so cleanup never masks the test's own outcome.
pub async fn cleanup(settings: &Settings) {
    if let Err(e) = delete_nats_resources(settings.nats_url(), &settings.nats).await {
        eprintln!("test cleanup: {e}");
    }
    if let Err(e) = delete_redis_keys(settings.redis_url(), &settings.redis.key_prefix).await {
        eprintln!("test cleanup: {e}");
    }
}

/// [`cleanup`] from synchronous code such as a `Drop` impl inside a test's
/// runtime.
pub fn cleanup_blocking(settings: &Settings) {
    let settings = settings.clone();
    block_on_own_thread(async move { cleanup(&settings).await });
}

/// Runs `work` on a thread of its own, with a runtime of its own, and waits
/// for it: async cleanup from a `Drop` impl inside a test's runtime, where
/// blocking on that runtime is not allowed.
pub fn block_on_own_thread(work: impl Future<Output = ()> + Send + 'static) {
    let worker = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(work),
            Err(e) => eprintln!("test cleanup: cannot start a runtime: {e}"),
        }
    });
    if worker.join().is_err() {
        eprintln!("test cleanup: the cleanup thread panicked");
    }
}

/// Deletes a test's task stream (with its consumers) and dead-letter
/// stream. Streams that do not exist are fine.
///
/// # Errors
/// [`BackendError::Refused`] for the default names; [`BackendError::Nats`]
/// when NATS cannot be reached or refuses.
pub async fn delete_nats_resources(url: &str, nats: &NatsSettings) -> Result<(), BackendError> {
    let defaults = NatsSettings::default();
    if nats.stream == defaults.stream || nats.dead_letter_stream == defaults.dead_letter_stream {
        return Err(BackendError::Refused(format!(
            "streams {} and {}",
            nats.stream, nats.dead_letter_stream
        )));
    }
    let failed = |reason: String| BackendError::Nats {
        url: redact_url(url),
        attempts: 1,
        reason,
    };
    let client = connect_nats(url).await.map_err(failed)?;
    let js = jetstream::new(client);
    for name in [&nats.stream, &nats.dead_letter_stream] {
        match js.delete_stream(name).await {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), DeleteStreamErrorKind::JetStream(ref je) if je.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {}
            Err(e) => return Err(failed(format!("cannot delete stream {name}: {e}"))),
        }
    }
    Ok(())
}

/// Deletes every Redis key that starts with `prefix`, returning how many
/// there were.
///
/// # Errors
/// [`BackendError::Refused`] for an empty or the default prefix;
/// [`BackendError::Redis`] when Redis cannot be reached.
pub async fn delete_redis_keys(url: &str, prefix: &str) -> Result<u64, BackendError> {
    if prefix.is_empty() || prefix == RedisSettings::default().key_prefix {
        return Err(BackendError::Refused(format!("key prefix {prefix:?}")));
    }
    let failed = |e: redis::RedisError| BackendError::Redis {
        url: redact_url(url),
        attempts: 1,
        source: crate::results::StoreError::Unavailable(e.to_string()),
    };
    let client = redis::Client::open(url).map_err(failed)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(failed)?;
    let pattern = format!("{}*", escape_glob(prefix));
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            // Large steps: the test server is shared, and SCAN walks every
            // key on it, not only ours.
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(failed)?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Escapes the characters `SCAN MATCH` treats as a pattern.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_settings_share_nothing() {
        let a = isolated_settings("x", "nats://n:4222", "redis://r:6379");
        let b = isolated_settings("x", "nats://n:4222", "redis://r:6379");
        assert_ne!(a.nats.stream, b.nats.stream);
        assert_ne!(a.nats.subject_prefix, b.nats.subject_prefix);
        assert_ne!(a.nats.consumer_prefix, b.nats.consumer_prefix);
        assert_ne!(a.redis.key_prefix, b.redis.key_prefix);
        assert_eq!(a.nats_url(), "nats://n:4222");
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[tokio::test]
    async fn cleanup_refuses_the_default_names() {
        let defaults = Settings::default();
        assert!(matches!(
            delete_nats_resources("nats://127.0.0.1:1", &defaults.nats).await,
            Err(BackendError::Refused(_))
        ));
        assert!(matches!(
            delete_redis_keys("redis://127.0.0.1:1", "").await,
            Err(BackendError::Refused(_))
        ));
    }
}
