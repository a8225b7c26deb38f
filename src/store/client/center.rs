//! Membership and the template center over the store's HTTP API: leases (heartbeat,
//! leave), the live nodes, wishes, the fleet's view of a template, the label policy.

use super::{StoreClient, StoreError, HEARTBEAT_TIMEOUT, METADATA_TIMEOUT};
use crate::store::center::{Placement, Wish};
use crate::store::center_wire::{FleetLine, Policy, PolicyBody, WishBody, WishRemoved};
use reqwest::RequestBuilder;

impl StoreClient {
    /// Renews this node's lease, signed with its key; the answer is the live nodes.
    pub async fn heartbeat(
        &self,
        key: &crate::identity::NodeKey,
        beat: &crate::store::nodes::Heartbeat,
    ) -> Result<crate::store::center::HeartbeatAnswer, StoreError> {
        let what = "a heartbeat";
        let body = serde_json::to_vec(beat).unwrap_or_default();
        let request = self.lease_request(key, reqwest::Method::PUT, body, what)?;
        // Any refusal passes to the next server: one whose clock is off refuses every
        // signed lease (401), one still settling answers 503, and the others may not.
        let bytes = self
            .send_passing(request, HEARTBEAT_TIMEOUT, what, |_| true)
            .await?
            .2;
        self.decode(&bytes, what)
    }

    /// Ends this node's lease (at a clean shutdown).
    pub async fn leave(&self, key: &crate::identity::NodeKey) -> Result<(), StoreError> {
        let what = "leaving the membership";
        let request = self.lease_request(key, reqwest::Method::DELETE, Vec::new(), what)?;
        self.send(request, HEARTBEAT_TIMEOUT, what)
            .await
            .map(|_| ())
    }

    /// A request on this node's lease, signed with its key and carrying the member token.
    fn lease_request(
        &self,
        key: &crate::identity::NodeKey,
        method: reqwest::Method,
        body: Vec<u8>,
        what: &str,
    ) -> Result<RequestBuilder, StoreError> {
        if self.direct.is_some() {
            return Err(StoreError::NeedsServer {
                what: what.into(),
                url: self.url.clone(),
            });
        }
        let path = format!("/v1/nodes/{}", key.id());
        let mut request = self
            .http
            .request(method.clone(), self.endpoint(&path))
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in key.sign(method.as_str(), &path, &body) {
            request = request.header(name, value);
        }
        if let Some(token) = self.member_token.as_ref().or(self.write_token.as_ref()) {
            request = request.bearer_auth(token);
        }
        Ok(request.body(body))
    }

    /// The live nodes.
    pub async fn nodes(&self) -> Result<Vec<crate::store::nodes::NodeEntry>, StoreError> {
        let what = "the node list";
        let request = self.http.get(self.endpoint("/v1/nodes"));
        let bytes = self.send(request, METADATA_TIMEOUT, what).await?.1;
        self.decode(&bytes, what)
    }

    /// Records where a template should be READY (the last word wins).
    pub async fn put_wish(&self, id: &str, placement: Placement) -> Result<Wish, StoreError> {
        let what = format!("the wish for {id}");
        let body = WishBody { placement };
        let request = self.write(self.http.put(self.endpoint(&format!("/v1/wishes/{id}"))));
        self.json_call(request.json(&body), &what).await
    }

    /// Asks the nodes where the template FAILED to retry it.
    pub async fn redo_wish(&self, id: &str) -> Result<Wish, StoreError> {
        let what = format!("retrying the wish for {id}");
        let path = format!("/v1/wishes/{id}/redo");
        let request = self.write(self.http.post(self.endpoint(&path)));
        self.json_call(request, &what).await
    }

    /// Removes a template's wish; the nodes unpin it.
    pub async fn remove_wish(&self, id: &str) -> Result<WishRemoved, StoreError> {
        let what = format!("removing the wish for {id}");
        let path = format!("/v1/wishes/{id}");
        let request = self.write(self.http.delete(self.endpoint(&path)));
        self.json_call(request, &what).await
    }

    /// The template's replica on every live node.
    pub async fn fleet(&self, id: &str) -> Result<Vec<FleetLine>, StoreError> {
        let what = format!("the fleet's view of {id}");
        let request = self.http.get(self.endpoint(&format!("/v1/fleet/{id}")));
        self.json_call(request, &what).await
    }

    /// Sets (`Some`) or removes (`None`) a label's minimum; `key` is already one
    /// path segment. The answer is the whole policy.
    pub async fn set_policy(
        &self,
        key_segment: &str,
        minimum: Option<String>,
    ) -> Result<Policy, StoreError> {
        let what = "the label policy";
        let path = format!("/v1/policy/{key_segment}");
        let request = self.write(self.http.put(self.endpoint(&path)));
        self.json_call(request.json(&PolicyBody { minimum }), what)
            .await
    }

    /// The label policy.
    pub async fn policy(&self) -> Result<Policy, StoreError> {
        let request = self.http.get(self.endpoint("/v1/policy"));
        self.json_call(request, "the label policy").await
    }

    /// Sends a request to a store server (not an object store read directly) and
    /// parses its answer.
    async fn json_call<T: serde::de::DeserializeOwned>(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> Result<T, StoreError> {
        if self.direct.is_some() {
            return Err(StoreError::NeedsServer {
                what: what.into(),
                url: self.url.clone(),
            });
        }
        let bytes = self.send(request, METADATA_TIMEOUT, what).await?.1;
        self.decode(&bytes, what)
    }
}
