//! Byte ranges as a set of disjoint, merged intervals: what a boot trace covers, what a
//! replay will fetch, and the runs it fetches them in.

use std::collections::BTreeMap;

/// Disjoint half-open byte intervals `[start, end)`, adjacent ones merged.
#[derive(Clone, Debug, Default)]
pub struct RangeSet {
    /// start -> end.
    spans: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The set covering `ranges` (`[offset, length]`).
    pub fn of(ranges: &[[u64; 2]]) -> RangeSet {
        let mut set = RangeSet::default();
        for &[offset, len] in ranges {
            set.insert(offset, offset.saturating_add(len));
        }
        set
    }

    /// Adds `[start, end)`; returns the pieces of it that were not covered, in order.
    pub fn insert(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if start >= end {
            return Vec::new();
        }
        let mut new = Vec::new();
        let mut merged = (start, end);
        let mut at = start;
        // The span that starts before `start` and may reach into it.
        let before = self
            .spans
            .range(..=start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        let mut overlapping: Vec<(u64, u64)> =
            before.into_iter().filter(|&(_, e)| e >= start).collect();
        overlapping.extend(
            self.spans
                .range(start..=end)
                .map(|(&s, &e)| (s, e))
                .filter(|&(s, _)| Some(s) != before.map(|b| b.0)),
        );
        for (s, e) in overlapping {
            if s > at {
                new.push((at, s.min(end)));
            }
            at = at.max(e);
            merged = (merged.0.min(s), merged.1.max(e));
            self.spans.remove(&s);
        }
        if at < end {
            new.push((at, end));
        }
        self.spans.insert(merged.0, merged.1);
        new
    }

    /// Whether any byte of `[start, end)` is covered.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        if let Some((_, &e)) = self.spans.range(..=start).next_back() {
            if e > start {
                return true;
            }
        }
        self.spans.range(start..end).next().is_some()
    }

    /// Number of disjoint spans.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether nothing is covered.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// Turns a trace's ranges (in first-read order) into the runs a replay fetches: chunk by
/// chunk in the order the boot first reached each chunk (a boot reads its kernel before
/// its services, and verified blocks are kept in a bounded memory, so the earliest reads
/// come first), and within a chunk its ranges sorted and merged across gaps of up to
/// `gap` bytes, each run at most `max_run` bytes and never across a chunk's end. A chunk
/// whose ranges cover `whole_share` of it or more is one run from its first range to its
/// last (it is fetched whole, as a read of that size would be).
pub fn plan_runs(
    ranges: &[[u64; 2]],
    chunk_size: u64,
    gap: u64,
    max_run: u64,
    whole_share: u64,
) -> Vec<(u64, u64)> {
    let chunk_size = chunk_size.max(1);
    let max_run = max_run.max(1);
    let mut order: Vec<u64> = Vec::new();
    let mut per_chunk: BTreeMap<u64, RangeSet> = BTreeMap::new();
    for &[offset, len] in ranges {
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let chunk = at / chunk_size;
            let chunk_end = ((chunk + 1) * chunk_size).min(end);
            per_chunk
                .entry(chunk)
                .or_insert_with(|| {
                    order.push(chunk);
                    RangeSet::default()
                })
                .insert(at, chunk_end);
            at = chunk_end;
        }
    }
    let mut runs = Vec::new();
    for chunk in order {
        let Some(set) = per_chunk.get(&chunk) else {
            continue;
        };
        let spans: Vec<(u64, u64)> = set.spans.iter().map(|(&s, &e)| (s, e)).collect();
        let covered: u64 = spans.iter().map(|(s, e)| e - s).sum();
        let merged: Vec<(u64, u64)> = match (spans.first(), spans.last()) {
            (Some(&(first, _)), Some(&(_, last)))
                if whole_share > 0 && covered >= chunk_size / whole_share =>
            {
                vec![(first, last)]
            }
            _ => {
                let mut merged: Vec<(u64, u64)> = Vec::new();
                for (s, e) in spans {
                    match merged.last_mut() {
                        Some(last) if s.saturating_sub(last.1) <= gap => last.1 = e,
                        _ => merged.push((s, e)),
                    }
                }
                merged
            }
        };
        for (s, e) in merged {
            let mut at = s;
            while at < e {
                let take = (e - at).min(max_run);
                runs.push((at, take));
                at += take;
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_report_only_what_was_new_and_merge() {
        let mut set = RangeSet::default();
        assert_eq!(set.insert(10, 20), vec![(10, 20)]);
        assert_eq!(set.insert(30, 40), vec![(30, 40)]);
        assert_eq!(set.insert(15, 35), vec![(20, 30)]);
        assert_eq!(set.len(), 1);
        assert_eq!(set.insert(12, 18), vec![]);
        assert_eq!(set.insert(40, 50), vec![(40, 50)]);
        assert_eq!(set.len(), 1, "adjacent spans merge");
        assert!(set.overlaps(49, 60));
        assert!(!set.overlaps(50, 60));
        assert!(!set.overlaps(0, 10));
        assert_eq!(set.insert(0, 100), vec![(0, 10), (50, 100)]);
    }

    #[test]
    fn runs_follow_the_boots_chunk_order_sorted_and_merged_within_a_chunk() {
        const C: u64 = 1 << 20;
        let ranges = [
            [5 * C + 8192, 4096],
            [2 * C + 4096, 4096],
            [5 * C, 4096],
            [2 * C, 4096],
            [5 * C + 900_000, 4096],
        ];
        let runs = plan_runs(&ranges, C, 8192, 1 << 20, 4);
        assert_eq!(
            runs,
            vec![(5 * C, 12288), (5 * C + 900_000, 4096), (2 * C, 8192)]
        );
    }

    #[test]
    fn a_dense_chunk_is_one_run_and_runs_are_capped_and_split_at_chunk_ends() {
        const C: u64 = 1 << 20;
        let ranges = [[0, 300_000], [C - 4096, 8192]];
        let runs = plan_runs(&ranges, C, 0, 1 << 30, 4);
        assert_eq!(runs, vec![(0, C), (C, 4096)]);
        let capped = plan_runs(&[[0, 3 * 65536]], C, 0, 65536, 0);
        assert_eq!(capped, vec![(0, 65536), (65536, 65536), (131072, 65536)]);
    }
}
