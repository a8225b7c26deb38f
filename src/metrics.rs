//! Prometheus exposition shared by the store and the daemon: encode a registry and
//! answer `GET /metrics` with it. Each server defines its own counters.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format that `prometheus-client` writes;
/// Prometheus scrapers accept it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an error here would come from a broken
    // metric's own encoder, and a partial page is better than none.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!("encoding metrics: {e}");
    }
    out
}

/// The `GET /metrics` answer for `registry`.
pub fn response(registry: &Registry) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        encode(registry),
    )
        .into_response()
}
