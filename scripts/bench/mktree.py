#!/usr/bin/python3
"""Writes the benchmark's root file system tree: a deterministic mix that looks like
a sandbox image's root (many small text files, MiB-size binaries of random bytes,
compressible data) so that chunking, zero chunks and lazy reads see realistic data.

    mktree.py DIR [TOTAL_MIB]      # default ~600 MiB

Shares of TOTAL_MIB: 12 % small text files (docs, configs, sources), 55 % binaries
(random bytes: incompressible, like .so files and models), 33 % compressible data
(logs, CSV, padded records). The same seed gives the same paths and sizes.
"""
import os
import random
import sys

SEED = 6
MIB = 1 << 20


def words_pool(rng, size):
    """Text of lowercase words and punctuation, for slicing into text files."""
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 11)))
             for _ in range(4000)]
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 14)))
        line += rng.choice([".\n", ",\n", ";\n", "\n", " {\n", "}\n"])
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def small_text(rng, root, budget):
    """Docs and configs: 200 B to 32 KiB each, log-uniform, in many directories."""
    pool = words_pool(rng, 4 * MIB)
    n, i = 0, 0
    while n < budget:
        size = int(2 ** rng.uniform(7.6, 15))
        off = rng.randrange(0, len(pool) - size)
        top = rng.choice(["usr/share/doc", "usr/lib/python3/dist-packages", "etc", "usr/include"])
        path = f"{root}/{top}/pkg{i // 40:04d}/file{i:05d}.{rng.choice(['txt', 'py', 'conf', 'h', 'md'])}"
        write(path, pool[off:off + size])
        n += size
        i += 1
    return i


def binaries(rng, root, budget):
    """Shared libraries and blobs: 256 KiB to 12 MiB of random bytes."""
    n, i = 0, 0
    while n < budget:
        size = min(int(2 ** rng.uniform(18, 23.6)) // 4096 * 4096 + rng.randrange(4096), budget - n + 1)
        write(f"{root}/usr/lib/x86_64-linux-gnu/lib{i:03d}.so.{rng.randint(0, 9)}", rng.randbytes(size))
        n += size
        i += 1
    return i


def compressible(rng, root, budget):
    """Logs, CSV tables and zero-padded record files: repetitive, compress well."""
    n, i = 0, 0
    while n < budget:
        size = min(int(2 ** rng.uniform(16, 24)), budget - n + 1)
        kind = i % 3
        if kind == 0:
            line = b"2026-11-22T10:00:00Z host%03d service[%05d]: request ok path=/api/v1/items status=200\n"
            unit = b"".join(line % (j % 7, j) for j in range(512))
        elif kind == 1:
            unit = b"".join(b"%d,%d,%s,%0.3f\n" % (j, j * 7 % 1000, b"item", j / 3) for j in range(1024))
        else:
            unit = rng.randbytes(512) + bytes(3584)  # a record, then padding
        data = (unit * (size // len(unit) + 1))[:size]
        ext = ["log", "csv", "dat"][kind]
        write(f"{root}/var/lib/app/data{i:03d}.{ext}", data)
        n += size
        i += 1
    return i


def main():
    root = sys.argv[1]
    total = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    rng = random.Random(SEED)
    counts = (small_text(rng, root, total * MIB * 12 // 100),
              binaries(rng, root, total * MIB * 55 // 100),
              compressible(rng, root, total * MIB * 33 // 100))
    print("tree: %d small text files, %d binaries, %d compressible files" % counts)


if __name__ == "__main__":
    main()
