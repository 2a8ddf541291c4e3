#!/usr/bin/env python3
"""Scale half of packaging/bench/front-door (not a test): idle long-polls and slowloris.

  held.py upstream PORT
      An upstream that answers /_matrix/client/versions at once and holds every .../sync for
      HOLD seconds (an idle long-poll: Synapse waiting for events), then answers 200.
  held.py hold --port P --host H --pid PID --h1 N --h2 N --streams S --slowloris N
      Against the front door on 127.0.0.1:P (TLS, SNI H): opens N HTTP/1.1 connections with one
      /sync each, then N/S HTTP/2 connections with S /sync streams each, then N slowloris
      connections (TLS done, half a request head, silence). After each phase it prints the
      server's RSS growth per held connection or stream, and how long a new client waits for
      /_matrix/client/versions. Source addresses are spread over 127.0.x.y so that the
      per-address limits (256 connections, 256 long-polls) count like real clients.

Needs the h2 package (the homelab-matrix-nio test venv has it).
"""

import argparse
import asyncio
import ssl
import sys
import time

HOLD = 120
PER_ADDR = 200  # connections per source address, under the front door's 256


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def upstream(port):
    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                if b"/sync" in line:
                    await asyncio.sleep(HOLD)
                body = b'{"versions":["v1.1"]}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


class Sources:
    """127.0.<block>.<n> addresses, PER_ADDR connections each."""

    def __init__(self, block):
        self.block, self.used = block, 0

    def next(self, per=PER_ADDR):
        i = self.used // per
        self.used += 1
        return (f"127.0.{self.block}.{1 + i}", 0)


def tls(alpn):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    return ctx


async def h1_poll(args, src, ctx, i):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", args.port, ssl=ctx, server_hostname=args.host, local_addr=src
    )
    writer.write(
        f"GET /_matrix/client/v3/sync?since=s{i}&timeout=60000 HTTP/1.1\r\nHost: {args.host}\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def h2_polls(args, src, ctx, base):
    import h2.config
    import h2.connection

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", args.port, ssl=ctx, server_hostname=args.host, local_addr=src
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for s in range(args.streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", args.host),
                (":path", f"/_matrix/client/v3/sync?since=s{base + s}&timeout=60000"),
            ],
            end_stream=True,
        )
    writer.write(conn.data_to_send())
    await writer.drain()

    async def pump():  # answers SETTINGS and PINGs, as a real client does
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                conn.receive_data(data)
                out = conn.data_to_send()
                if out:
                    writer.write(out)
        except Exception:
            return

    return writer, asyncio.get_running_loop().create_task(pump())


async def slowloris(args, src, ctx):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", args.port, ssl=ctx, server_hostname=args.host, local_addr=src
    )
    writer.write(f"GET /_matrix/client/versions HTTP/1.1\r\nHost: {args.host}\r\n".encode())
    await writer.drain()
    return writer


async def versions_wait(args):
    """Seconds a new client (new address, new TLS connection) waits for /versions."""
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", args.port, ssl=tls("http/1.1"), server_hostname=args.host,
            local_addr=("127.0.250.1", 0),
        ),
        30,
    )
    writer.write(
        f"GET /_matrix/client/versions HTTP/1.1\r\nHost: {args.host}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 30)
    dt = time.monotonic() - t0
    writer.close()
    return dt, line.decode().strip()


async def gather_in_batches(coros, batch=200):
    out = []
    for i in range(0, len(coros), batch):
        out += await asyncio.gather(*coros[i : i + batch], return_exceptions=True)
    return out


def report(what, n, before, after, wait):
    per = (after - before) / n if n else 0
    print(
        f"{what:<34} {n:>6} held  RSS {before / 1024:7.1f} -> {after / 1024:7.1f} MiB"
        f"  (+{(after - before) / 1024:6.1f} MiB, {per:5.1f} KiB each)"
        f"  new client /versions: {wait[0] * 1000:7.1f} ms ({wait[1]})",
        flush=True,
    )


async def hold(args):
    keep = []
    base = rss_kib(args.pid)
    print(f"server pid {args.pid}: RSS before {base / 1024:.1f} MiB", flush=True)
    # HTTP/1.1: one long-poll per connection.
    ctx1 = tls("http/1.1")
    src = Sources(1)
    made = await gather_in_batches([h1_poll(args, src.next(), ctx1, i) for i in range(args.h1)])
    errs = [m for m in made if isinstance(m, BaseException)]
    keep += [m for m in made if not isinstance(m, BaseException)]
    await asyncio.sleep(args.settle)
    after1 = rss_kib(args.pid)
    report("h1.1 long-polls (1 per conn)", args.h1 - len(errs), base, after1, await versions_wait(args))
    if errs:
        print(f"  {len(errs)} h1 connections failed: {errs[0]!r}", flush=True)
    # HTTP/2: `streams` long-polls per connection, as many streams in all as h2 asks.
    ctx2 = tls("h2")
    src = Sources(2)
    conns = args.h2 // args.streams
    made = await gather_in_batches(
        [h2_polls(args, src.next(per=max(1, 250 // args.streams)), ctx2, c * args.streams) for c in range(conns)]
    )
    errs = [m for m in made if isinstance(m, BaseException)]
    keep += [m for m in made if not isinstance(m, BaseException)]
    await asyncio.sleep(args.settle)
    after2 = rss_kib(args.pid)
    report(
        f"h2 long-polls ({args.streams} per conn)", (conns - len(errs)) * args.streams, after1, after2,
        await versions_wait(args),
    )
    if errs:
        print(f"  {len(errs)} h2 connections failed: {errs[0]!r}", flush=True)
    total = args.h1 + conns * args.streams
    print(
        f"{'all long-polls':<34} {total:>6} held  +{(after2 - base) / 1024:.1f} MiB over the idle server"
        f" ({(after2 - base) / max(total, 1):.1f} KiB each)",
        flush=True,
    )
    # Slowloris, all at once.
    src = Sources(3)
    t0 = time.monotonic()
    made = await asyncio.gather(
        *[slowloris(args, src.next(), ctx1) for _ in range(args.slowloris)], return_exceptions=True
    )
    opened = time.monotonic() - t0
    errs = [m for m in made if isinstance(m, BaseException)]
    keep += [m for m in made if not isinstance(m, BaseException)]
    after3 = rss_kib(args.pid)
    report(f"slowloris (opened in {opened:.1f} s)", args.slowloris - len(errs), after2, after3, await versions_wait(args))
    if errs:
        print(f"  {len(errs)} slowloris connections failed: {errs[0]!r}", flush=True)
    print(f"peak: RSS {rss_kib(args.pid) / 1024:.1f} MiB", flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upstream")
    u.add_argument("port", type=int)
    h = sub.add_parser("hold")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--host", required=True)
    h.add_argument("--pid", type=int, required=True)
    h.add_argument("--h1", type=int, default=2500)
    h.add_argument("--h2", type=int, default=2500)
    h.add_argument("--streams", type=int, default=50)
    h.add_argument("--slowloris", type=int, default=1000)
    h.add_argument("--settle", type=float, default=3.0)
    a = p.parse_args()
    if a.cmd == "upstream":
        asyncio.run(upstream(a.port))
    else:
        asyncio.run(hold(a))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
