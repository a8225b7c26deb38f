//! The template center's request and response bodies (`/v1/wishes`, `/v1/fleet`,
//! `/v1/policy`): the store server answers with them and `lazyblk` parses them, so a
//! field renamed on one side fails the build of the other.

use serde::{Deserialize, Serialize};

use super::center::Placement;

/// Body of `PUT /v1/wishes/{id}`: where the template should be READY.
#[derive(Serialize, Deserialize)]
pub struct WishBody {
    pub placement: Placement,
}

/// What `DELETE /v1/wishes/{id}` answers.
#[derive(Serialize, Deserialize)]
pub struct WishRemoved {
    pub template: String,
    /// False when there was no wish for the template.
    pub removed: bool,
}

/// One node's line in `status ID --fleet` (`GET /v1/fleet/{id}`).
#[derive(Serialize, Deserialize)]
pub struct FleetLine {
    pub node: String,
    pub url: String,
    /// The node's replica phase as its lease reports it (PENDING when it has none).
    pub phase: String,
    pub local_chunks: usize,
    pub stored_chunks: usize,
    pub last_error: Option<String>,
    pub users: Vec<String>,
    /// The center asks this node to keep the template READY.
    pub wanted: bool,
}

/// Body of `PUT /v1/policy/{key}`.
#[derive(Serialize, Deserialize)]
pub struct PolicyBody {
    /// `>=VERSION`, or null to remove the rule.
    pub minimum: Option<String>,
}

/// The label policy: each key's minimum (`GET /v1/policy`, and the answer to a change).
pub type Policy = std::collections::BTreeMap<String, String>;
