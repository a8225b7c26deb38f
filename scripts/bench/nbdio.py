#!/usr/bin/python3
"""NBD probes for scripts/bench.sh, through libnbd's Python binding (python3-libnbd).

    nbdio.py firstbyte URI            # ms from connect to the first 4 KiB read's answer
    nbdio.py write URI OFFSET LEN     # writes LEN bytes of random data at OFFSET, flushes
"""
import os
import sys
import time

import nbd

# Requests of 1 MiB: under every server's maximum request size, and large enough that
# the write is bounded by the server, not by round trips.
WRITE_REQUEST = 1 << 20


def first_byte(uri):
    start = time.monotonic()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, 0)
    took = time.monotonic() - start
    h.shutdown()
    print("%.3f" % (took * 1000))


def write(uri, offset, length):
    h = nbd.NBD()
    h.connect_uri(uri)
    end = offset + length
    while offset < end:
        n = min(WRITE_REQUEST, end - offset)
        h.pwrite(os.urandom(n), offset)
        offset += n
    h.flush()
    h.shutdown()


def main():
    cmd = sys.argv[1]
    if cmd == "firstbyte":
        first_byte(sys.argv[2])
    elif cmd == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: nbdio.py firstbyte URI | write URI OFFSET LEN")


if __name__ == "__main__":
    main()
