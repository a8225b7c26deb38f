//! The HTTP client every command and the daemon use to reach stores and daemons.
//!
//! TLS comes along with the object-storage backend; its verifier wants the system's CA
//! certificates, and a machine without them (a minimal guest, a scratch container) would
//! otherwise have no client at all. There the client is built with no roots: plain HTTP
//! works, HTTPS fails with a verification error that says why.

use std::time::Duration;

/// How long a connection attempt may take: long enough for a loaded peer, short enough
/// that an unreachable one is reported at once.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle keep-alive connection is kept for the next request: half the idle
/// time lazyblk's HTTP servers allow ([`crate::http_server::IDLE_TIMEOUT`]), so a
/// request is never sent on a connection the server is closing for idleness (the
/// client would get a reset or an unanswered close instead of an answer).
pub const POOL_IDLE_TIMEOUT: Duration =
    Duration::from_secs(crate::http_server::IDLE_TIMEOUT.as_secs() / 2);

/// A client with [`CONNECT_TIMEOUT`] and [`POOL_IDLE_TIMEOUT`].
pub fn http_client() -> reqwest::Client {
    let builder = || {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
    };
    match builder().build() {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!(error = %e, "no usable CA certificates; HTTPS peers will fail verification");
            builder()
                .tls_certs_only(Vec::new())
                .build()
                .unwrap_or_default()
        }
    }
}
