#!/usr/bin/env bash
# Crash trials: SIGKILL of the daemon at randomized moments, then a restart and checks.
#   scripts/crash-trials.sh [N]     N trials per scenario (default 20)
# Scenario "commit" (tests/trust.rs): a daemon is killed at a randomized moment of a
# commit of a 9 MiB change (before the request arrives, while chunks are built, between
# the local intent and the publish, during the upload), restarted over the same cache
# at a new address; the template must be either never published, or published, DURABLE
# and byte-exact through a fresh node. Prints a table of trials and outcomes.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
log="$(mktemp)"
LAZYBLK_CRASH_TRIALS="$n" cargo test --test trust commits_killed_at_random_moments -- --nocapture >"$log" 2>&1 || {
  tail -40 "$log"; echo "crash-trials: FAILED (log: $log)"; exit 1; }
line="$(grep 'commit crash trials:' "$log")"
published="$(sed -E 's/.* ([0-9]+) published.*/\1/' <<<"$line")"
never="$(sed -E 's/.* ([0-9]+) never published.*/\1/' <<<"$line")"
printf '%-10s %7s %12s %10s %15s %7s\n' scenario trials "kill points" published "never published" losses
printf '%-10s %7s %12s %10s %15s %7s\n' commit "$n" "$n" "$published" "$never" 0
rm -f "$log"
