//! The store's HTTP API (DESIGN.md section 7): routes, bearer tokens, JSON errors, the
//! store's Prometheus counters, and the template center's routes.
//!
//! # Layout
//! - [`state`]: the state every handler shares, the error answer, input checks.
//! - [`auth`]: bearer tokens and request counting, on every route.
//! - [`templates`]: templates, manifests, traces, gc; [`chunks`]: chunks and scrub.
//! - [`center`]: wishes, fleet status, policy; [`leases`]: node leases;
//!   [`deletes`]: guarded deletes and the tombstones gc honours.
//! - [`counters`]: the counters and gauges; [`metrics`]: `/metrics`.

mod auth;
mod center;
mod chunks;
mod counters;
mod deletes;
mod leases;
mod metrics;
mod state;
mod templates;

use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;

use center::*;
use chunks::*;
use deletes::*;
use leases::*;
use state::ApiError;
pub use state::{AppState, Tokens};
use templates::*;

/// The store's routes, with token checks and request counting on every one.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/templates", get(list_templates))
        .route(
            "/v1/templates/{id}",
            get(get_template).delete(delete_template),
        )
        .route(
            "/v1/templates/{id}/manifest",
            get(get_manifest).put(put_manifest),
        )
        .route("/v1/templates/{id}/trace", get(get_trace).put(put_trace))
        .route("/v1/gc", post(gc))
        .route("/v1/scrub", post(scrub))
        .route("/v1/nodes", get(list_nodes))
        .route(
            "/v1/nodes/{node}",
            axum::routing::put(renew_node).delete(leave_node),
        )
        .route("/v1/wishes", get(list_wishes))
        .route(
            "/v1/wishes/{id}",
            axum::routing::put(put_wish).delete(delete_wish),
        )
        .route("/v1/wishes/{id}/redo", post(redo_wish))
        .route("/v1/fleet/{id}", get(fleet_status))
        .route("/v1/policy", get(get_policy))
        .route("/v1/policy/{key}", axum::routing::put(put_policy))
        .route("/v1/chunks/missing", post(missing))
        .route(
            "/v1/chunks/{digest}",
            get(get_chunk).head(head_chunk).put(put_chunk),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route".into(),
            )
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::count_requests,
        ))
        .with_state(state)
}
