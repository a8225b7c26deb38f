//! How [`StoreClient`] sends a request: to the server that answered last, passing
//! over one that is unreachable or answers 502 to 504; the store's `{"error"}` message
//! kept (without control characters) in [`StoreError::Http`].

use std::time::Duration;

use bytes::Bytes;
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

use super::{StoreClient, StoreError, METADATA_TIMEOUT};
use crate::http_server::ErrorAnswer;
use crate::printable::printable;

impl StoreClient {
    pub(super) fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub(super) fn write(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.write_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// A GET whose 404 means "none".
    pub(super) async fn fetch_optional(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> Result<Option<Bytes>, StoreError> {
        match self.send(request, METADATA_TIMEOUT, what).await {
            Ok((_, bytes)) => Ok(Some(bytes)),
            Err(StoreError::Http { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends a request; a non-success status becomes [`StoreError::Http`] with the
    /// store's `{"error"}` message.
    pub(super) async fn send(
        &self,
        request: RequestBuilder,
        timeout: Duration,
        what: &str,
    ) -> Result<(StatusCode, Bytes), StoreError> {
        let (status, _, body) = self.send_with_headers(request, timeout, what).await?;
        Ok((status, body))
    }

    /// [`StoreClient::send`], with the answer's headers; passes over a server that is
    /// unreachable or answers 502 to 504 for the next one.
    pub(super) async fn send_with_headers(
        &self,
        request: RequestBuilder,
        timeout: Duration,
        what: &str,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), StoreError> {
        self.send_passing(request, timeout, what, |e| {
            matches!(
                e,
                StoreError::Unreachable { .. }
                    | StoreError::Http {
                        status: 502..=504,
                        ..
                    }
            )
        })
        .await
    }

    /// Sends a request to the server that answered last, and to the next ones while
    /// `passes` says another server may answer better.
    pub(super) async fn send_passing(
        &self,
        request: RequestBuilder,
        timeout: Duration,
        what: &str,
        passes: fn(&StoreError) -> bool,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), StoreError> {
        let request = request
            .timeout(timeout)
            .build()
            .map_err(|e| StoreError::Unreachable {
                url: self.url.clone(),
                detail: error_chain(&e),
            })?;
        let first = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = None;
        for step in 0..self.urls.len() {
            let index = (first + step) % self.urls.len();
            let result = self.send_to(&request, &self.urls[index], what).await;
            match result {
                Err(e) if self.urls.len() > 1 && passes(&e) => {
                    tracing::debug!(error = %e, "store server passed over");
                    last = Some(Err(e));
                }
                result => {
                    if result.is_ok() && index != first {
                        tracing::info!(store = %self.urls[index], "store server answered in place of {}", self.urls[first % self.urls.len()]);
                        self.current
                            .store(index, std::sync::atomic::Ordering::Relaxed);
                    }
                    return result;
                }
            }
        }
        last.unwrap_or_else(|| {
            Err(StoreError::Unreachable {
                url: self.url.clone(),
                detail: "no store server".into(),
            })
        })
    }

    /// Sends `request` (built on the first server's URL) to the server at `base`.
    async fn send_to(
        &self,
        request: &reqwest::Request,
        base: &str,
        what: &str,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), StoreError> {
        let unreachable = |e: reqwest::Error| StoreError::Unreachable {
            url: base.to_string(),
            detail: error_chain(&e),
        };
        let Some(mut request) = request.try_clone() else {
            return Err(StoreError::Unreachable {
                url: base.to_string(),
                detail: format!("{what}: a streamed body cannot be sent again"),
            });
        };
        let path = request
            .url()
            .as_str()
            .strip_prefix(self.url.as_str())
            .unwrap_or("")
            .to_string();
        *request.url_mut() =
            reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| StoreError::Unreachable {
                url: base.to_string(),
                detail: e.to_string(),
            })?;
        let response = self.http.execute(request).await.map_err(unreachable)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return Ok((status, headers, body));
        }
        // The store's message may quote a node's lease (a delete refused for its
        // users): kept without control characters wherever it is shown.
        let detail = printable(&ErrorAnswer::message_of(&body)).into_owned();
        Err(StoreError::Http {
            url: base.to_string(),
            status: status.as_u16(),
            what: what.to_string(),
            detail,
        })
    }

    pub(super) fn decode<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
        what: &str,
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.malformed(what, e))
    }

    pub(super) fn malformed(&self, what: &str, e: serde_json::Error) -> StoreError {
        StoreError::Malformed {
            url: self.url.clone(),
            what: what.to_string(),
            detail: e.to_string(),
        }
    }
}

/// An error with its causes, `outer: inner: innermost` (reqwest's own message hides
/// "connection refused" in its sources).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
