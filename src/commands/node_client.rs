//! The typed client of one node daemon's HTTP API. Requests and answers are the
//! daemon's own types (`crate::daemon::api` and the services behind it), so a field
//! renamed in the daemon fails this crate's build instead of printing zeros.

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::args::NodeArg;
use crate::daemon::api::{
    AttachBody, CommitBody, CreateOverlay, EvictOutcome, ReplicaStatus, ResizeBody,
};
use crate::daemon::attach::AttachmentStatus;
use crate::daemon::commit::CommitOutcome;
use crate::daemon::health::ScrubProgress;
use crate::daemon::resize::ResizeOutcome;
use crate::daemon::sandboxes::SandboxStatus;
use crate::http_server::ErrorAnswer;
use crate::printable::printable;

/// A client of one daemon's HTTP API.
pub struct NodeClient {
    base: String,
    http: reqwest::Client,
    /// Sent as a bearer token (the daemon checks it on changing requests).
    token: Option<String>,
}

/// A request's body, when it has one.
const NO_BODY: Option<&()> = None;

impl NodeClient {
    /// The client of the daemon `node` names; fails only when its token file cannot
    /// be read.
    pub fn new(node: &NodeArg) -> anyhow::Result<NodeClient> {
        Ok(NodeClient {
            base: node.node.trim_end_matches('/').to_string(),
            http: crate::http_client::http_client(),
            token: node.token.resolve()?,
        })
    }

    /// Every replica the node knows.
    pub async fn replicas(&self) -> anyhow::Result<Vec<ReplicaStatus>> {
        self.call(reqwest::Method::GET, "/v1/templates", NO_BODY)
            .await
    }

    /// One replica (the daemon learns the template from its store if it must).
    pub async fn replica(&self, id: &str) -> anyhow::Result<ReplicaStatus> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/templates/{id}"),
            NO_BODY,
        )
        .await
    }

    /// Starts (or with `redo`, restarts a FAILED) fill of a replica.
    pub async fn warm(&self, id: &str, redo: bool) -> anyhow::Result<ReplicaStatus> {
        let query = if redo { "?redo=true" } else { "" };
        let path = format!("/v1/templates/{id}/warm{query}");
        self.call(reqwest::Method::POST, &path, NO_BODY).await
    }

    /// Drops a replica's local chunks.
    pub async fn evict(&self, id: &str, force: bool) -> anyhow::Result<EvictOutcome> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("/v1/templates/{id}/evict{query}");
        self.call(reqwest::Method::POST, &path, NO_BODY).await
    }

    /// Grows a template into a new one.
    pub async fn resize(&self, id: &str, body: &ResizeBody) -> anyhow::Result<ResizeOutcome> {
        let path = format!("/v1/templates/{id}/resize");
        self.call(reqwest::Method::POST, &path, Some(body)).await
    }

    pub async fn create_overlay(&self, body: &CreateOverlay) -> anyhow::Result<SandboxStatus> {
        self.call(reqwest::Method::POST, "/v1/overlays", Some(body))
            .await
    }

    pub async fn overlays(&self) -> anyhow::Result<Vec<SandboxStatus>> {
        self.call(reqwest::Method::GET, "/v1/overlays", NO_BODY)
            .await
    }

    /// Deletes a sandbox's overlay (the daemon answers 204, no body).
    pub async fn delete_overlay(&self, sandbox: &str, force: bool) -> anyhow::Result<()> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("/v1/overlays/{sandbox}{query}");
        self.send(reqwest::Method::DELETE, &path, NO_BODY).await?;
        Ok(())
    }

    pub async fn commit(&self, sandbox: &str, body: &CommitBody) -> anyhow::Result<CommitOutcome> {
        let path = format!("/v1/overlays/{sandbox}/commit");
        self.call(reqwest::Method::POST, &path, Some(body)).await
    }

    pub async fn attach(&self, body: &AttachBody) -> anyhow::Result<AttachmentStatus> {
        self.call(reqwest::Method::POST, "/v1/attachments", Some(body))
            .await
    }

    pub async fn attachments(&self) -> anyhow::Result<Vec<AttachmentStatus>> {
        self.call(reqwest::Method::GET, "/v1/attachments", NO_BODY)
            .await
    }

    /// Detaches `name` (`nbdN`).
    pub async fn detach(&self, name: &str, force: bool) -> anyhow::Result<AttachmentStatus> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("/v1/attachments/{name}{query}");
        self.call(reqwest::Method::DELETE, &path, NO_BODY).await
    }

    /// Starts the node's scrub unless one runs.
    pub async fn start_scrub(&self) -> anyhow::Result<ScrubProgress> {
        self.call(reqwest::Method::POST, "/v1/scrub", NO_BODY).await
    }

    pub async fn scrub_progress(&self) -> anyhow::Result<ScrubProgress> {
        self.call(reqwest::Method::GET, "/v1/scrub", NO_BODY).await
    }

    /// Sends a request and parses the answer as `T`.
    async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let text = self.send(method, path, body).await?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "the daemon at {} answered {path} with what this lazyblk cannot read (another version?): {}",
                self.base,
                printable(&text.chars().take(200).collect::<String>())
            )
        })
    }

    /// Sends a request and returns the answer's body, or an error carrying the
    /// daemon's own message.
    async fn send<B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| {
            format!(
                "daemon at {} unreachable (is `lazyblk daemon` running? pass --node URL)",
                self.base
            )
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(Refused {
                status: status.as_u16(),
                message: printable(&ErrorAnswer::message_of(text.as_bytes())).into_owned(),
            }
            .into());
        }
        Ok(text)
    }
}

/// The daemon answered a request with an error status: its own message (the
/// [`ErrorAnswer`] it sent), shown without control characters.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// The HTTP status of the answer (404 unknown, 409 in use, 503 no driver...).
    pub status: u16,
    pub message: String,
}
