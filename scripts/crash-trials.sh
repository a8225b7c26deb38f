#!/usr/bin/env bash
# Crash trials: SIGKILL of the daemon at randomized moments, then a restart and checks.
#   scripts/crash-trials.sh [N]     N trials per scenario (default 20)
# Scenarios (each a test; the suite runs them with N = 20):
#   overlay  mixed WRITE / FUA WRITE / TRIM / FLUSH traffic on a sandbox, killed at a
#            random moment: every write acknowledged by FLUSH or sent with FUA reads back
#            (or a later write of the same block does) after the restart.
#   commit   a commit of a 9 MiB change, killed before, during or after each step (every
#            other trial holds the upload back, so kills land between publish and upload):
#            the template is never published, or published, DURABLE and byte-exact
#            through a fresh node.
#   fill     a fill of a 32 MiB template, killed mid-way: no replica is READY without
#            every chunk, and the template reads back right.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
log="$(mktemp)"
run() {
  LAZYBLK_CRASH_TRIALS="$n" cargo test --quiet --test "$1" "$2" -- --nocapture >>"$log" 2>&1 || {
    tail -40 "$log"; echo "crash-trials: $2 FAILED (log: $log)"; exit 1; }
}
run crash_trials overlay_writes_acknowledged_as_durable_survive_sigkill
run trust commits_killed_at_random_moments_publish_all_or_nothing
run crash_trials fills_killed_at_random_moments
printf '%-9s %7s %12s %28s %7s\n' scenario trials "kill points" "checked" losses
grep -h 'crash trials:' "$log" | while read -r line; do
  scenario="${line%% crash trials:*}"
  detail="${line#*kill points, }"
  [ "$scenario" = commit ] && detail="${line#*trials, }"
  printf '%-9s %7s %12s %28s %7s\n' "$scenario" "$n" "$n" "${detail%, 0 losses}" 0
done
rm -f "$log"
