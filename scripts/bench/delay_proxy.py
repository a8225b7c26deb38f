#!/usr/bin/env python3
"""A TCP proxy that adds a fixed delay to every request, for the network profiles.

This machine's kernel shapes rate (htb, tbf) but has no netem, so a link's latency is
added here: each time a client starts a request (its first bytes on a connection, or
its first bytes after the server has answered), those bytes are held for DELAY_MS
before they go on. HTTP/1.1 clients send one request at a time per connection, so
every request to the store costs one DELAY_MS more, as a store DELAY_MS away would.

    delay_proxy.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT DELAY_MS

Bytes are copied as they come, in 256 KiB reads. With DELAY_PROXY_LOG=FILE set, each
request is also written to FILE as one line, "START END CONN METHOD PATH RANGE" (times
in seconds since the proxy started, from the request's first byte to the answer's
first byte; RANGE is the Range header or "-"): the profile of a latency-bound workload,
whose cost is which requests wait on which (read it with scripts/bench/requests.py).
"""
import asyncio
import os
import sys
import time

LOG = open(os.environ["DELAY_PROXY_LOG"], "a", buffering=1) if os.environ.get("DELAY_PROXY_LOG") else None
T0 = time.monotonic()
CONNS = [0]


def request_line(data):
    """The method, path and Range header of the request whose first bytes are `data`."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1", "replace").split("\r\n")
    parts = head[0].split(" ")
    method, path = (parts[0], parts[1]) if len(parts) > 1 else ("?", "?")
    rng = "-"
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "range":
            rng = value.strip().replace(" ", "")
    return method, path, rng

READ = 256 * 1024


async def pipe(reader, writer, turn, mine, delay, pending):
    """Copies reader to writer; a read that starts a new turn of this side waits."""
    try:
        while True:
            data = await reader.read(READ)
            if not data:
                break
            new_turn = turn[0] != mine
            if LOG and new_turn:
                now = time.monotonic() - T0
                if mine == "c":
                    pending.append((now,) + request_line(data))
                elif pending:
                    start, method, path, rng = pending.pop(0)
                    LOG.write(f"{start:.4f} {now:.4f} {turn[1]} {method} {path} {rng}\n")
            if delay and new_turn:
                turn[0] = mine
                await asyncio.sleep(delay)
            turn[0] = mine
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def handle(client_r, client_w, upstream, delay):
    host, port = upstream
    try:
        server_r, server_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    # Whose bytes went last: "c" (a request) or "s" (an answer). None: a new
    # connection, whose first request waits too.
    # The second item numbers the connection, for the request log.
    CONNS[0] += 1
    turn = [None, CONNS[0]]
    pending = []
    await asyncio.gather(
        pipe(client_r, server_w, turn, "c", delay, pending),
        pipe(server_r, client_w, turn, "s", 0, pending),
    )


def addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main():
    if len(sys.argv) != 4:
        sys.exit("usage: delay_proxy.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT DELAY_MS")
    listen, upstream, delay = addr(sys.argv[1]), addr(sys.argv[2]), int(sys.argv[3]) / 1000
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, upstream, delay), listen[0], listen[1], backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
