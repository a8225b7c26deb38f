//! One fetch's attempts at a chunk's sources: passes over the plan, healthy sources
//! first, each attempt within the source deadline and a demand read's all within its
//! budget; a read hedges a node that has not answered within the hedge delay
//! ([`crate::planner::Hedging`]) by starting the next source beside it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ChunkCache, ChunkRef, FetchError, Verified, FETCH_PASSES, PASS_BACKOFF};
use crate::planner::Priority;
use crate::source::{Source, SourceError};

impl ChunkCache {
    pub(super) async fn fetch_verified(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &[Source],
        priority: Priority,
    ) -> Result<Verified, FetchError> {
        // A demand read's attempts share one budget; background work has none (each
        // attempt still has the source deadline).
        let budget_ends = (priority == Priority::Demand).then(|| Instant::now() + self.read_budget);
        // Reads hedge a slow node; fills wait it out (see `crate::planner`).
        let hedge_after = (priority != Priority::Fill)
            .then(|| self.hedging.delay(budget_ends.map(|_| self.read_budget)));
        let mut errors = Vec::new();
        for pass in 0..FETCH_PASSES {
            if pass > 0 {
                tokio::time::sleep(PASS_BACKOFF).await;
            }
            let plan = Plan {
                chunk,
                sources,
                priority,
                budget_ends,
                hedge_after,
            };
            match self.fetch_pass(&plan, &mut errors).await {
                Pass::Delivered(bytes) => return Ok(bytes),
                Pass::Exhausted => {}
                Pass::Stop => break,
            }
        }
        if sources.is_empty() {
            errors.push("no sources configured".into());
        }
        Err(FetchError::Exhausted {
            template: chunk.template.clone(),
            index: chunk.index,
            digest: chunk.digest,
            errors,
        })
    }

    /// One pass over the sources, healthy first: the next source starts when the last
    /// one failed, or beside a node that has not answered within the hedge delay.
    async fn fetch_pass(self: &Arc<Self>, plan: &Plan<'_>, errors: &mut Vec<String>) -> Pass {
        let order = self.health_of_sources.plan(plan.sources);
        let mut attempts = futures::stream::FuturesUnordered::new();
        // The attempts under way: their place in `order` and when they started.
        let mut running: Vec<(usize, Instant)> = Vec::new();
        let mut next = 0;
        loop {
            let hedge_at = match plan.hedge_after {
                Some(after) if next < order.len() && !running.is_empty() => running
                    .iter()
                    .all(|(i, _)| order[*i].is_node())
                    .then(|| running.iter().map(|(_, at)| *at).max())
                    .flatten()
                    .map(|last| last + after),
                _ => None,
            };
            let start_next = if running.is_empty() {
                true
            } else {
                tokio::select! {
                    Some((i, took, result)) = futures::StreamExt::next(&mut attempts) => {
                        running.retain(|(r, _)| *r != i);
                        match self.settle(plan, order[i], took, result, errors) {
                            Settled::Delivered(bytes) => {
                                self.give_up_on(&order, &running);
                                return Pass::Delivered(bytes);
                            }
                            Settled::Stop => return Pass::Stop,
                            Settled::Next => {}
                        }
                        running.is_empty()
                    }
                    () = sleep_until(hedge_at), if hedge_at.is_some() => {
                        tracing::debug!(template = %plan.chunk.template, chunk = plan.chunk.index,
                            slow = order[running[0].0].name(), next = order[next].name(),
                            "a node has not answered; hedging to the next source");
                        true
                    }
                    // Not reached: every running attempt is in `attempts`.
                    else => {
                        running.clear();
                        true
                    }
                }
            };
            if !start_next {
                continue;
            }
            let Some(source) = order.get(next) else {
                if running.is_empty() {
                    return Pass::Exhausted;
                }
                continue;
            };
            let deadline = match plan.budget_ends {
                Some(end) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        errors.push(format!(
                            "the read's budget of {:?} is spent",
                            self.read_budget
                        ));
                        return Pass::Stop;
                    }
                    left.min(self.deadline)
                }
                None => self.deadline,
            };
            attempts.push(self.attempt(plan, next, source, deadline));
            running.push((next, Instant::now()));
            next += 1;
        }
    }

    /// One source's attempt: its place in the pass, how long it took, its outcome.
    async fn attempt(
        &self,
        plan: &Plan<'_>,
        index: usize,
        source: &Source,
        deadline: Duration,
    ) -> (usize, Duration, Result<Option<Verified>, SourceError>) {
        let started = Instant::now();
        let result = self
            .fetch_from(plan.chunk, source, plan.priority, deadline)
            .await;
        (index, started.elapsed(), result)
    }

    /// What an attempt's outcome means for the pass.
    fn settle(
        &self,
        plan: &Plan<'_>,
        source: &Source,
        took: Duration,
        result: Result<Option<Verified>, SourceError>,
        errors: &mut Vec<String>,
    ) -> Settled {
        let chunk = plan.chunk;
        match result {
            Ok(Some(bytes)) => {
                self.health_of_sources.succeeded(source.name());
                if source.is_node() {
                    self.hedging.observe(took);
                }
                Settled::Delivered(bytes)
            }
            Ok(None) => {
                self.health_of_sources.failed(source.name());
                errors.push(format!("{}: digest mismatch", source.name()));
                Settled::Next
            }
            Err(e) if e.is_skip() => Settled::Next,
            Err(e) => {
                // The peers keep a health per peer of their own: one dead owner must not
                // demote every other.
                if !source.has_own_health() {
                    self.health_of_sources.failed(source.name());
                }
                self.observer.source_failed(chunk, source.name(), &e);
                tracing::warn!(template = %chunk.template, chunk = chunk.index,
                    source = source.name(), error = %e, "chunk fetch failed");
                let transient = e.is_transient();
                errors.push(e.to_string());
                if !transient && plan.sources.len() == 1 {
                    Settled::Stop
                } else {
                    Settled::Next
                }
            }
        }
    }

    /// The attempts still under way when another source answered are dropped: an
    /// origin among them that had run for the shortest hedge delay counts as failed in
    /// the planner's health (peers count their own, see `crate::peers`).
    fn give_up_on(&self, order: &[&Source], running: &[(usize, Instant)]) {
        for (i, started) in running {
            let source = order[*i];
            if !source.has_own_health()
                && source.is_node()
                && started.elapsed() >= crate::planner::HEDGE_DELAY_MIN
            {
                self.health_of_sources.failed(source.name());
            }
        }
    }
}

/// What one fetch of a chunk asks of its passes over the sources.
struct Plan<'a> {
    chunk: &'a ChunkRef,
    sources: &'a [Source],
    priority: Priority,
    /// When a demand read's budget ends.
    budget_ends: Option<Instant>,
    /// How long a read waits for a node before it hedges; `None` for fills.
    hedge_after: Option<Duration>,
}

/// How a pass over the sources ended.
enum Pass {
    Delivered(Verified),
    /// Every source failed; another pass may follow.
    Exhausted,
    /// No further pass: the budget is spent, or the only source refused for good.
    Stop,
}

/// What one attempt's outcome means for its pass.
enum Settled {
    Delivered(Verified),
    Next,
    Stop,
}

/// Sleeps until `at`; for ever when there is none (a disabled `select!` branch).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
