//! A fetch's blocking work (decoding, hashing, writing), run at the fetch's priority:
//! a fill's on the low-priority threads, which yield the CPU while readers are active.

use std::time::Duration;

use crate::planner::Priority;

/// Runs blocking work (hashing, writing) at `priority`: fills on the low-priority
/// threads, the rest on tokio's blocking pool.
pub(super) async fn run_at<T, F>(
    priority: Priority,
    readers_active: bool,
    f: F,
) -> Result<T, String>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match priority {
        Priority::Demand | Priority::Prefetch => tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| e.to_string()),
        Priority::Fill => crate::background::run(readers_active, f).await,
    }
}

/// Reads within this long make a fill's blocking work yield the CPU (SCHED_IDLE).
pub(super) const READERS_ACTIVE: Duration = Duration::from_millis(50);
