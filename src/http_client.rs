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

/// A client with [`CONNECT_TIMEOUT`].
pub fn http_client() -> reqwest::Client {
    let builder = || reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
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
