#!/usr/bin/env python3
"""Reads the request log of scripts/bench/delay_proxy.py (DELAY_PROXY_LOG): per boot
("# boot MODE RUN" lines split it), what a latency-bound workload waited on.

    requests.py REQUESTS_LOG

Prints, per section: requests (whole chunks, byte ranges, other), bytes asked for in
ranges, the time any request was in flight (the network's share of the wall time when
requests are serial), the mean number in flight over that time, and how the ranged
requests relate to earlier ones of the same chunk: "next" (starts where an earlier
range of that chunk ended: a sequential reader one round trip at a time), "same chunk"
(another part of a chunk already asked for), "new chunk".
"""
import re
import sys
from collections import defaultdict


def report(name, rows):
    if not rows:
        return
    kinds = defaultdict(int)
    range_bytes = 0
    ends = defaultdict(set)  # chunk path -> ends of earlier ranges
    seen = set()
    relation = defaultdict(int)
    sizes = []
    for start, end, conn, method, path, rng in rows:
        if "/chunks/" not in path:
            kinds["other " + method] += 1
            continue
        m = re.match(r"bytes=(\d+)-(\d+)", rng)
        if not m:
            kinds["whole chunk"] += 1
            seen.add(path)
            continue
        kinds["range"] += 1
        a, b = int(m.group(1)), int(m.group(2)) + 1
        range_bytes += b - a
        sizes.append(b - a)
        if a in ends[path]:
            relation["next"] += 1
        elif path in seen:
            relation["same chunk"] += 1
        else:
            relation["new chunk"] += 1
        ends[path].add(b)
        seen.add(path)
    # Time with at least one request in flight, and the mean number in flight then.
    events = sorted([(s, 1) for s, *_ in rows] + [(e, -1) for _, e, *_ in rows])
    busy = area = 0.0
    depth, last = 0, None
    for t, d in events:
        if last is not None and depth > 0:
            busy += t - last
            area += depth * (t - last)
        depth += d
        last = t
    span = max(e for _, e, *_ in rows) - min(s for s, *_ in rows)
    print(f"== {name}: {len(rows)} requests over {span:.2f} s")
    print("   " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))
    if sizes:
        sizes.sort()
        print(f"   ranges: {range_bytes / 1e6:.1f} MB, median {sizes[len(sizes) // 2] // 1024} KiB, "
              + ", ".join(f"{k}: {v}" for k, v in sorted(relation.items())))
    print(f"   in flight: {busy:.2f} s with at least one, {area / busy if busy else 0:.2f} on average then")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: requests.py REQUESTS_LOG")
    name, rows = "before the first boot", []
    for line in open(sys.argv[1]):
        if line.startswith("# "):
            report(name, rows)
            name, rows = line[2:].strip(), []
            continue
        f = line.split()
        if len(f) == 6:
            rows.append((float(f[0]), float(f[1]), f[2], f[3], f[4], f[5]))
    report(name, rows)


if __name__ == "__main__":
    main()
