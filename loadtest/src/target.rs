//! Where load may be sent. A load generator pointed at the wrong URL is a
//! denial-of-service tool, so every URL the tools connect to (the intake,
//! Redis, NATS) must name a loopback host unless the user says
//! `--allow-remote`.

use std::net::IpAddr;

use http::Uri;

/// Why a URL was refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL could not be parsed or has no host.
    #[error("invalid URL {url:?}: {reason}")]
    Invalid {
        /// The URL as given.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The host is not a loopback address and remote targets were not
    /// allowed.
    #[error(
        "refusing to send load to non-loopback host {host:?} in {url:?}; pass --allow-remote if you own that system"
    )]
    NotLoopback {
        /// The URL as given.
        url: String,
        /// Its host.
        host: String,
    },
}

/// Checks that `url` names a loopback host (`localhost`, `127.0.0.0/8`,
/// `::1`), or any host when `allow_remote` is set.
///
/// # Errors
/// [`TargetError::Invalid`] when the URL has no host,
/// [`TargetError::NotLoopback`] when it names another host and
/// `allow_remote` is false.
pub fn check_target(url: &str, allow_remote: bool) -> Result<(), TargetError> {
    let host = host_of(url)?;
    if allow_remote || is_loopback_host(&host) {
        Ok(())
    } else {
        Err(TargetError::NotLoopback {
            url: url.to_owned(),
            host,
        })
    }
}

/// The host part of a URL (`http://`, `redis://`, `nats://`, ...), without
/// IPv6 brackets.
fn host_of(url: &str) -> Result<String, TargetError> {
    let invalid = |reason: &str| TargetError::Invalid {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    let host = uri.host().ok_or_else(|| invalid("no host"))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned())
}

/// Whether a host name or address is on this machine's loopback interface.
fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks every server of a comma-separated list such as NATS accepts
/// (`nats://a:4222,nats://b:4222`).
///
/// # Errors
/// The first [`TargetError`] of any listed server.
pub fn check_targets(urls: &str, allow_remote: bool) -> Result<(), TargetError> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .try_for_each(|u| check_target(u, allow_remote))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_pass() {
        for url in [
            "http://127.0.0.1:3000",
            "http://localhost:3000/",
            "http://127.1.2.3",
            "http://[::1]:8080",
            "redis://127.0.0.1:6379/0",
            "redis://user:secret@localhost:6379",
            "nats://127.0.0.1:4222",
        ] {
            check_target(url, false).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn remote_hosts_are_refused_unless_allowed() {
        for url in [
            "http://10.0.0.5:3000",
            "http://example.com",
            "redis://192.168.1.2:6379",
            "http://[2001:db8::1]:80",
        ] {
            assert!(
                matches!(
                    check_target(url, false),
                    Err(TargetError::NotLoopback { .. })
                ),
                "{url} should be refused"
            );
            check_target(url, true).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn a_url_without_host_is_invalid() {
        assert!(matches!(
            check_target("/tasks", true),
            Err(TargetError::Invalid { .. })
        ));
    }

    #[test]
    fn every_server_of_a_list_is_checked() {
        assert!(check_targets("nats://127.0.0.1:4222,nats://127.0.0.1:4223", false).is_ok());
        assert!(check_targets("nats://127.0.0.1:4222,nats://10.1.1.1:4222", false).is_err());
    }
}
