//! The daemon's start-up sequence, step by step, in the order [`super::run`] takes it,
//! and the rule each step keeps. A SIGKILL may land between any two of them; the next
//! start must then find:
//! - the node id unchanged (its key is made once, written crash-safe, never replaced);
//! - no commit intent lost: every `originated/<id>` record is settled against the store
//!   only after the saved manifests it names are known ([`Step::TemplatesRestored`]
//!   before [`Step::CommitsResumed`]), so an upload cut off by a crash resumes;
//! - no replica READY without its chunks: a READY or DISTRIBUTING phase read back from
//!   `state.db` goes through a fill again, which fetches what is missing and hashes
//!   and fsyncs what is local before the replica is READY ([`Step::FillsRestored`]).
//!
//! `tests/startup_kills.rs` kills the daemon at each step (and at random moments) and
//! checks those three. It names a step through [`KILL_AT_STEP_ENV`]; nothing else sets
//! that variable.

use std::sync::OnceLock;

/// Names a step at which the daemon SIGKILLs itself: a fault-injection hook for the
/// start-up kill test (an unset or unknown name does nothing).
pub const KILL_AT_STEP_ENV: &str = "LAZYBLK_KILL_AT_STARTUP_STEP";

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
