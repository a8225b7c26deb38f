//! The one runner of every fetch attempt: whole chunks (a demand read's miss, a
//! prefetch, a fill, a block index page) and byte ranges of a chunk's stored object
//! (its table, its blocks: [`crate::partial`]). What is asked and how the answer is
//! checked is a [`Want`]; the runner makes passes over the plan
//! ([`crate::planner::SourceHealth::plan`], healthy sources first), each attempt within
//! the source deadline and, for a demand read, all of them within the read's budget
//! ([`ReadBudget`](super::ReadBudget)); a read hedges a node that has not answered
//! within the hedge delay ([`crate::planner::Hedging`]) by starting the next source
//! beside it.
//!
//! Health is kept per source, and per node within the peers: bytes that fail their
//! check demote the source that sent them, or, for the peers, only the node that sent
//! them ([`Source::distrust`]); the peers are then asked again at once (they pass the
//! liar over and ask the next owner), so one lying node costs a read one round trip,
//! not a copy from the store.

use std::future::Future;
use std::time::{Duration, Instant};

use super::{ChunkCache, ChunkRef, FetchError, PASS_BACKOFF};
use crate::source::{Source, SourceError};

/// A peer source that sent bytes failing their check is asked again at once, up to
/// this many times per pass: each time it passes over the node that lied and asks the
/// next owner ([`crate::peers::OWNERS_TRIED`] are asked to fetch a chunk).
const RETRIES_AFTER_A_LIE: usize = crate::peers::OWNERS_TRIED;

/// What an attempt at one source brought.
pub(crate) enum Answer<T> {
    /// The bytes passed their check; `node` sent them when the source is several nodes.
    Verified { value: T, node: Option<String> },
    /// The bytes are not what was asked for (counted and logged by the [`Want`]).
    Corrupt { node: Option<String> },
}

/// What a fetch asks of each source and how it checks the answer.
pub(crate) trait Want: Sync {
    /// What a verified answer gives.
    type Output: Send;
    /// Passes over the sources (a second pass rides out a source that restarts).
    const PASSES: usize;
    /// Whether an answer that fails its check ends the fetch (a block that is not its
    /// block index entry: the caller then fetches the whole chunk, which verifies
    /// against its digest), rather than trying the next source.
    const STOP_ON_CORRUPT: bool;
    /// Whether `source` can serve it at all.
    fn asks(&self, source: &Source) -> bool;
    /// One attempt at `source` within `deadline`, its answer checked.
    fn attempt(
        &self,
        cache: &ChunkCache,
        chunk: &ChunkRef,
        source: &Source,
        deadline: Duration,
    ) -> impl Future<Output = Result<Answer<Self::Output>, SourceError>> + Send;
}

/// One fetch's run over its sources.
pub(crate) struct Run<'a, W> {
    pub want: &'a W,
    pub chunk: &'a ChunkRef,
    pub sources: &'a [Source],
    /// When a demand read's budget ends; `None` for background work (each attempt
    /// still has the source deadline).
    pub budget_ends: Option<Instant>,
    /// How long a read waits for a node before it hedges; `None` for fills.
    pub hedge_after: Option<Duration>,
}

impl ChunkCache {
    /// Runs `run`'s attempts until one answer passes its check.
    pub(crate) async fn run<W: Want>(&self, run: &Run<'_, W>) -> Result<W::Output, FetchError> {
        let mut errors = Vec::new();
        for pass in 0..W::PASSES {
            if pass > 0 {
                tokio::time::sleep(PASS_BACKOFF).await;
            }
            match self.pass(run, &mut errors).await {
                Pass::Delivered(value) => return Ok(value),
                Pass::Exhausted => {}
                Pass::Spent => return Err(self.deadline_error(run.chunk)),
                Pass::Stop => break,
            }
        }
        if !run.sources.iter().any(|s| run.want.asks(s)) {
            errors.push("no sources configured".into());
        }
        Err(FetchError::Exhausted {
            template: run.chunk.template.clone(),
            index: run.chunk.index,
            digest: run.chunk.digest,
            errors,
        })
    }

    pub(crate) fn deadline_error(&self, chunk: &ChunkRef) -> FetchError {
        FetchError::Deadline {
            template: chunk.template.clone(),
            index: chunk.index,
            digest: chunk.digest,
            budget: self.read_budget,
        }
    }

    /// One pass over the sources, healthy first: the next source starts when the last
    /// one failed, or beside a node that has not answered within the hedge delay.
    async fn pass<W: Want>(&self, run: &Run<'_, W>, errors: &mut Vec<String>) -> Pass<W::Output> {
        let mut order: Vec<&Source> = self
            .health_of_sources
            .plan(run.sources)
            .into_iter()
            .filter(|s| run.want.asks(s))
            .collect();
        let mut retries = RETRIES_AFTER_A_LIE;
        let mut attempts = futures::stream::FuturesUnordered::new();
        // The attempts under way: their place in `order` and when they started.
        let mut running: Vec<(usize, Instant)> = Vec::new();
        let mut next = 0;
        loop {
            let hedge_at = match run.hedge_after {
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
                        let source: &Source = order[i];
                        match self.settle(run, source, took, result, errors) {
                            Settled::Delivered(value) => {
                                self.give_up_on(&order, &running);
                                return Pass::Delivered(value);
                            }
                            Settled::Stop => return Pass::Stop,
                            Settled::Again if retries > 0 => {
                                // Asked again next, past the node that lied; the
                                // attempts under way keep their places (all before).
                                retries -= 1;
                                order.insert(next, source);
                            }
                            Settled::Again | Settled::Next => {}
                        }
                        running.is_empty()
                    }
                    () = sleep_until(hedge_at), if hedge_at.is_some() => {
                        tracing::debug!(template = %run.chunk.template, chunk = run.chunk.index,
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
            let Some(source) = order.get(next).copied() else {
                if running.is_empty() {
                    return Pass::Exhausted;
                }
                continue;
            };
            let deadline = match run.budget_ends {
                Some(end) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        errors.push(format!(
                            "the read's budget of {:?} is spent",
                            self.read_budget
                        ));
                        return Pass::Spent;
                    }
                    left.min(self.deadline)
                }
                None => self.deadline,
            };
            let index = next;
            attempts.push(async move {
                let started = Instant::now();
                let result = run.want.attempt(self, run.chunk, source, deadline).await;
                (index, started.elapsed(), result)
            });
            running.push((next, Instant::now()));
            next += 1;
        }
    }

    /// What an attempt's outcome means for the pass, and for the source's health.
    fn settle<W: Want>(
        &self,
        run: &Run<'_, W>,
        source: &Source,
        took: Duration,
        result: Result<Answer<W::Output>, SourceError>,
        errors: &mut Vec<String>,
    ) -> Settled<W::Output> {
        let chunk = run.chunk;
        match result {
            Ok(Answer::Verified { value, node }) => {
                self.health_of_sources.succeeded(source.name());
                if let Some(node) = &node {
                    source.vouch(node);
                }
                if source.is_node() {
                    self.hedging.observe(took);
                }
                Settled::Delivered(value)
            }
            Ok(Answer::Corrupt { node }) => {
                errors.push(match &node {
                    Some(node) => {
                        format!("{} (node {node}): bytes are not the chunk", source.name())
                    }
                    None => format!("{}: bytes are not the chunk", source.name()),
                });
                match node {
                    // One node of the peers lied: that node alone is passed over, and
                    // the peers are asked again (the next owner answers).
                    Some(node) => {
                        source.distrust(&node);
                        if W::STOP_ON_CORRUPT {
                            Settled::Stop
                        } else {
                            Settled::Again
                        }
                    }
                    None => {
                        self.health_of_sources.failed(source.name());
                        if W::STOP_ON_CORRUPT {
                            Settled::Stop
                        } else {
                            Settled::Next
                        }
                    }
                }
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
                if !transient && run.sources.len() == 1 {
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

/// How a pass over the sources ended.
enum Pass<T> {
    Delivered(T),
    /// Every source failed; another pass may follow.
    Exhausted,
    /// The read's budget is spent.
    Spent,
    /// No further pass: the only source refused for good, or an answer failed its
    /// check where that ends the fetch.
    Stop,
}

/// What one attempt's outcome means for its pass.
enum Settled<T> {
    Delivered(T),
    Next,
    /// Ask the same source again (a node of it lied; it asks the next one).
    Again,
    Stop,
}

/// Sleeps until `at`; for ever when there is none (a disabled `select!` branch).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
