//! Bearer tokens on the store's routes: writes need the write token, chunk reads the
//! read token (or the write token), when they are set; and per-route request counts.
//! A refused request is answered at once, its body unread, and its connection closed
//! (the server lingers briefly so the client reads the 401): waiting for the body let
//! clients without a token hold connections for as long as they trickled bytes.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use axum::http::{header, HeaderValue};

use super::counters::HttpLabels;
use super::state::AppState;

pub(super) async fn authorize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let checked = state
        .tokens
        .check(request.method(), request.uri().path(), request.headers());
    match checked {
        Ok(()) => next.run(request).await,
        Err(e) => {
            let mut response = e.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

pub(super) async fn count_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    let labels = HttpLabels {
        route,
        status: response.status().as_u16(),
    };
    state.metrics.http_requests.get_or_create(&labels).inc();
    response
}
