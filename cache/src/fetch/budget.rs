//! The budget of one demand read: every attempt the read makes (its block index page,
//! its chunk's table and blocks, the whole chunk) ends by one instant, `--read-deadline`
//! after the read began, so a guest gets EIO from us before the kernel NBD client's own
//! timeout (30 s) declares the device dead.

use std::future::Future;
use std::time::{Duration, Instant};

use super::ChunkCache;

/// When a demand read must be answered by (see the module header). Copied into every
/// step of the read; a fetch shared with other readers keeps its own budget, and each
/// reader stops waiting for it at the end of its own.
#[derive(Clone, Copy, Debug)]
pub struct ReadBudget {
    started: Instant,
    total: Duration,
}

impl ReadBudget {
    /// A budget of `total` starting now.
    pub fn starting_now(total: Duration) -> ReadBudget {
        ReadBudget {
            started: Instant::now(),
            total,
        }
    }

    /// When the read must be answered by.
    pub fn ends(&self) -> Instant {
        self.started + self.total
    }

    /// The whole budget (`--read-deadline`).
    pub fn total(&self) -> Duration {
        self.total
    }

    /// How long the read has taken so far.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What is left of it.
    pub fn left(&self) -> Duration {
        self.ends().saturating_duration_since(Instant::now())
    }

    /// `work`'s output if it ends within the budget; `None` if the budget ends first
    /// (or has already ended: then `work` is not started).
    pub async fn bound<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        if self.left().is_zero() {
            return None;
        }
        tokio::time::timeout_at(self.ends().into(), work).await.ok()
    }
}

impl ChunkCache {
    /// The budget of a demand read starting now (`--read-deadline`).
    pub fn read_budget(&self) -> ReadBudget {
        ReadBudget::starting_now(self.read_budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_past_the_budget_is_cut_off_and_a_spent_budget_starts_nothing() {
        let budget = ReadBudget::starting_now(Duration::from_millis(50));
        assert_eq!(budget.bound(async { 7 }).await, Some(7));
        let slow = budget.bound(tokio::time::sleep(Duration::from_secs(30)));
        assert_eq!(slow.await, None, "cut off at the budget's end");
        assert!(budget.left().is_zero());
        let mut started = false;
        let spent = budget.bound(async {
            started = true;
        });
        assert_eq!(spent.await, None);
        assert!(!started, "a spent budget starts no work");
    }
}
