//! The daemon's start-up sequence, in one place: [`open_disk`] and [`restore`] take its
//! steps in order, each calling into the owner of that part of the node's state
//! ([`NodeState`]), with [`Step::reached`] between them. [`super::run`] builds the
//! owners in between and serves after. A SIGKILL may land between any two steps; the
//! next start must then find:
//! - the node id unchanged (its key is made once, written crash-safe, never replaced);
//! - no commit intent lost: every `originated/<id>` record is settled against the store
//!   only after the saved manifests it names are known ([`Step::TemplatesRestored`]
//!   before [`Step::CommitsResumed`]), so an upload cut off by a crash resumes;
//! - no replica READY without its chunks: a READY or DISTRIBUTING phase read back from
//!   `state.db` goes through a fill again, which fetches what is missing and hashes
//!   and fsyncs what is local before the replica is READY ([`Step::FillsRestored`]).
//!
//! The durability rule of a commit is: local intent, then publish, then upload. A
//! commit writes its intent (`originated/<id>`, beside its saved manifest) before the
//! manifest goes to the store, and the intent goes only once the upload made the
//! template DURABLE. The restore keeps that order: manifests are known, then each
//! intent's local chunks are claimed (before any fill or client can evict them) and
//! settled against the store: published, its upload resumes; never published, it goes.
//!
//! `tests/startup_kills.rs` kills the daemon at each step (and at random moments) and
//! checks those three. It names a step through [`KILL_AT_STEP_ENV`]; nothing else sets
//! that variable.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use lazyblk_cache::ChunkStore;

use crate::daemon::attach::Attachments;
use crate::daemon::fill::FillScheduler;
use crate::daemon::node::Node;
use crate::daemon::node_state::NodeState;

/// Names a step at which the daemon SIGKILLs itself: a fault-injection hook for the
/// start-up kill test (an unset or unknown name does nothing).
pub const KILL_AT_STEP_ENV: &str = "LAZYBLK_KILL_AT_STARTUP_STEP";

/// Steps 1 and 2: opens what is on the node's disk, the chunk cache (`cache_size`
/// bytes at most) and then the node's state, both under `dir`.
pub fn open_disk(dir: &Path, cache_size: u64) -> anyhow::Result<(ChunkStore, Arc<NodeState>)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating cache directory {}", dir.display()))?;
    let chunks = ChunkStore::open(dir, cache_size)
        .with_context(|| format!("opening the chunk cache at {}", dir.display()))?;
    Step::CacheOpened.reached();
    let state = NodeState::open(dir)
        .with_context(|| format!("opening the node's state under {}", dir.display()))?;
    Step::NodeIdentity.reached();
    Ok((chunks, Arc::new(state)))
}

/// What [`restore`] brought back, for the daemon's ready line.
pub struct Restored {
    /// Templates whose saved manifests were found.
    pub templates: usize,
    /// Sandboxes reopened.
    pub sandboxes: usize,
}

/// Steps 3 to 8: brings back what earlier runs left, in the order of the rule above,
/// over owners built on `node`'s state (none of them reads its state when built).
/// `bind_listeners` binds the NBD listener (after the fills are restored, before the
/// kernel devices that connect to it); its value is returned.
pub async fn restore<L>(
    node: &Node,
    fill: &Arc<FillScheduler>,
    attachments: &Attachments,
    bind_listeners: impl Future<Output = anyhow::Result<L>>,
) -> anyhow::Result<(Restored, L)> {
    let state = &node.state;
    // The manifests first: every later step names templates by them.
    let templates = node.templates.restore(state.manifests().list());
    Step::TemplatesRestored.reached();
    let sandboxes = node.sandboxes.restore().await;
    Step::SandboxesRestored.reached();
    // Local intent, then publish, then upload: each intent's chunks claimed now, its
    // publication asked of the store in the background, its upload resumed after.
    node.commits.resume(state.intents().list());
    Step::CommitsResumed.reached();
    // READY and DISTRIBUTING replicas fill again, verifying what is local.
    let phases = state.phases().all().unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot read the replicas' phases; starting fresh");
        Vec::new()
    });
    fill.restore(phases);
    Step::FillsRestored.reached();
    let listeners = bind_listeners.await?;
    Step::ListenersBound.reached();
    attachments.restore().await;
    Step::DevicesRestored.reached();
    Ok((
        Restored {
            templates,
            sandboxes,
        },
        listeners,
    ))
}

/// A point of the start-up sequence, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The chunk cache is open (its index rebuilt from the files on disk; partial
    /// writes, left as temporary files, dropped).
    CacheOpened,
    /// The node's key and id are loaded (made and written once, on the first start)
    /// and the commit intents' directory is open.
    NodeIdentity,
    /// The saved manifests (`manifests/`) are known again.
    TemplatesRestored,
    /// The sandboxes' overlays are open again.
    SandboxesRestored,
    /// Every commit intent is claimed (its chunks pinned) and handed to the settle
    /// task: published ones resume their upload, unpublished ones go.
    CommitsResumed,
    /// The phases in `state.db` are read back; READY and DISTRIBUTING replicas fill
    /// again (verifying what is local) before they are READY.
    FillsRestored,
    /// The NBD listener is bound.
    ListenersBound,
    /// The kernel devices of the last run are reconnected.
    DevicesRestored,
    /// The HTTP API, NBD, membership and the background tasks run.
    Serving,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 9] = [
        Step::CacheOpened,
        Step::NodeIdentity,
        Step::TemplatesRestored,
        Step::SandboxesRestored,
        Step::CommitsResumed,
        Step::FillsRestored,
        Step::ListenersBound,
        Step::DevicesRestored,
        Step::Serving,
    ];

    /// The step's name, as [`KILL_AT_STEP_ENV`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Step::CacheOpened => "cache-opened",
            Step::NodeIdentity => "node-identity",
            Step::TemplatesRestored => "templates-restored",
            Step::SandboxesRestored => "sandboxes-restored",
            Step::CommitsResumed => "commits-resumed",
            Step::FillsRestored => "fills-restored",
            Step::ListenersBound => "listeners-bound",
            Step::DevicesRestored => "devices-restored",
            Step::Serving => "serving",
        }
    }

    /// Marks the step reached: logged, and the kill of the test hook when it names
    /// this step.
    pub fn reached(self) {
        tracing::debug!(step = self.name(), "start-up step reached");
        static KILL_AT: OnceLock<Option<String>> = OnceLock::new();
        let kill_at = KILL_AT.get_or_init(|| {
            let name = std::env::var(KILL_AT_STEP_ENV).ok()?;
            if !Step::ALL.iter().any(|s| s.name() == name) {
                let names: Vec<_> = Step::ALL.iter().map(|s| s.name()).collect();
                tracing::warn!("{KILL_AT_STEP_ENV}={name:?} names no step (they are {names:?})");
            }
            Some(name)
        });
        if kill_at.as_deref() == Some(self.name()) {
            tracing::warn!(
                step = self.name(),
                "{KILL_AT_STEP_ENV}: killing this daemon"
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_are_distinct() {
        let mut names: Vec<_> = Step::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Step::ALL.len());
    }
}
