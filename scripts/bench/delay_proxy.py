#!/usr/bin/env python3
"""A TCP proxy that adds a fixed delay to every request, for the network profiles.

This machine's kernel shapes rate (htb, tbf) but has no netem, so a link's latency is
added here: each time a client starts a request (its first bytes on a connection, or
its first bytes after the server has answered), those bytes are held for DELAY_MS
before they go on. HTTP/1.1 clients send one request at a time per connection, so
every request to the store costs one DELAY_MS more, as a store DELAY_MS away would.

    delay_proxy.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT DELAY_MS

Counts nothing and keeps nothing: bytes are copied as they come, in 256 KiB reads.
"""
import asyncio
import sys

READ = 256 * 1024


async def pipe(reader, writer, turn, mine, delay):
    """Copies reader to writer; a read that starts a new turn of this side waits."""
    try:
        while True:
            data = await reader.read(READ)
            if not data:
                break
            if delay and turn[0] != mine:
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
    turn = [None]
    await asyncio.gather(
        pipe(client_r, server_w, turn, "c", delay),
        pipe(server_r, client_w, turn, "s", 0),
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
