#!/usr/bin/env python3
"""Load half of packaging/bench/workers (not a test): a mixed Matrix client load through the
front door, on work Synapse cannot answer from a cache.

  matrix_load.py setup --base URL --ca PEM --users N --rooms R --password-dir DIR --out F
      Logs in users bench0..bench<N-1> (made beforehand with `homelab-matrix user add`, their
      passwords in DIR/<name>), makes R rooms of four members each, and writes their access
      tokens and rooms to F (JSON).
  matrix_load.py run --base URL --ca PEM --state F --secs S --warmup W
                     [--senders 8 --readers 4 --whoami 4]
      Every user long-polls /sync (incremental, timeout 30 s: woken by the messages sent into
      their rooms); SENDERS tasks send messages as fast as they are answered (PUT .../send, a
      random user into one of their rooms); READERS tasks page /messages backwards (limit 20)
      in a random room; WHOAMI tasks ask /account/whoami. After W seconds of warm-up it counts
      S seconds and prints one JSON line: completed requests per second of each kind, their p99
      in ms, errors, and the generator's own CPU seconds.

Each task keeps one HTTP/1.1 keep-alive connection over TLS (stdlib asyncio + ssl: the load
generator stays a small share of the CPU next to Synapse; it prints that share).
"""

import argparse
import asyncio
import json
import os
import random
import ssl
import sys
import time
import urllib.parse


class Conn:
    """One keep-alive HTTP/1.1 connection to the front door."""

    def __init__(self, base, ctx):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port or 443
        self.ctx = ctx
        self.r = self.w = None

    async def request(self, method, path, token=None, body=None):
        for attempt in (0, 1):
            if self.w is None:
                self.r, self.w = await asyncio.open_connection(
                    self.host, self.port, ssl=self.ctx, server_hostname=self.host
                )
            data = b"" if body is None else json.dumps(body).encode()
            head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(data)}\r\n"
            if token:
                head += f"Authorization: Bearer {token}\r\n"
            if body is not None:
                head += "Content-Type: application/json\r\n"
            try:
                self.w.write(head.encode() + b"\r\n" + data)
                await self.w.drain()
                return await self._response()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                self.close()
                if attempt:
                    raise
        raise ConnectionError("unreachable")

    async def _response(self):
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.r.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.r.readexactly(int(hdrs.get("content-length", "0")))
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return status, (json.loads(body) if body else None)

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


def context(ca):
    ctx = ssl.create_default_context(cafile=ca)
    return ctx


async def setup(a):
    ctx = context(a.ca)
    c = Conn(a.base, ctx)
    tokens, ids = [], []
    for i in range(a.users):
        name = f"bench{i}"
        with open(os.path.join(a.password_dir, name)) as f:
            pw = f.read().strip()
        st, v = await c.request(
            "POST",
            "/_matrix/client/v3/login",
            body={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": pw},
        )
        assert st == 200, (st, v)
        tokens.append(v["access_token"])
        ids.append(v["user_id"])
    rooms = []  # [room_id, [member indexes]]
    for r in range(a.rooms):
        members = [(r * 2 + k) % a.users for k in range(4)]
        owner = members[0]
        st, v = await c.request(
            "POST",
            "/_matrix/client/v3/createRoom",
            tokens[owner],
            {"preset": "private_chat", "invite": [ids[m] for m in members[1:]]},
        )
        assert st == 200, (st, v)
        room = v["room_id"]
        for m in members[1:]:
            st, v = await c.request("POST", f"/_matrix/client/v3/join/{urllib.parse.quote(room)}", tokens[m], {})
            assert st == 200, (st, v)
        rooms.append([room, members])
    # Some history for /messages to page through.
    for room, members in rooms:
        for k in range(30):
            st, v = await c.request(
                "PUT",
                f"/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/send/m.room.message/seed{k}",
                tokens[members[k % 4]],
                {"msgtype": "m.text", "body": f"history {k}"},
            )
            assert st == 200, (st, v)
    c.close()
    with open(a.out, "w") as f:
        json.dump({"tokens": tokens, "rooms": rooms}, f)


class Stats:
    def __init__(self):
        self.lat = {}
        self.errors = {}
        self.window = None  # (start, end)

    def record(self, kind, t0, t1, ok):
        w = self.window
        if w is None or not (w[0] <= t1 < w[1]):
            return
        if ok:
            self.lat.setdefault(kind, []).append(t1 - t0)
        else:
            self.errors[kind] = self.errors.get(kind, 0) + 1


async def run(a):
    with open(a.state) as f:
        st = json.load(f)
    tokens, rooms = st["tokens"], st["rooms"]
    rooms_of = {}
    for room, members in rooms:
        for m in members:
            rooms_of.setdefault(m, []).append(room)
    ctx = context(a.ca)
    stats = Stats()
    stop = asyncio.Event()
    q = urllib.parse.quote

    async def timed(kind, conn, *args):
        t0 = time.monotonic()
        try:
            status, v = await conn.request(*args)
            ok = status == 200
        except Exception:
            status, v, ok = 0, None, False
        stats.record(kind, t0, time.monotonic(), ok)
        return status, v

    async def syncer(i):
        c = Conn(a.base, ctx)
        filt = q(json.dumps({"room": {"timeline": {"limit": 10}}, "presence": {"not_types": ["*"]}}))
        _, v = await timed("sync-initial", c, "GET", f"/_matrix/client/v3/sync?timeout=0&filter={filt}", tokens[i])
        since = (v or {}).get("next_batch")
        while not stop.is_set():
            path = f"/_matrix/client/v3/sync?timeout=30000&filter={filt}"
            if since:
                path += f"&since={q(since)}"
            status, v = await timed("sync", c, "GET", path, tokens[i])
            if status == 200:
                since = v.get("next_batch", since)
            else:
                await asyncio.sleep(0.5)
        c.close()

    async def sender(k):
        c = Conn(a.base, ctx)
        n = 0
        users = [u for u in rooms_of]
        while not stop.is_set():
            u = random.choice(users)
            room = random.choice(rooms_of[u])
            n += 1
            await timed(
                "send",
                c,
                "PUT",
                f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/b{os.getpid()}-{k}-{n}",
                tokens[u],
                {"msgtype": "m.text", "body": f"load {k} {n}"},
            )
        c.close()

    async def reader(k):
        c = Conn(a.base, ctx)
        while not stop.is_set():
            room, members = random.choice(rooms)
            await timed(
                "messages",
                c,
                "GET",
                f"/_matrix/client/v3/rooms/{q(room)}/messages?dir=b&limit=20",
                tokens[random.choice(members)],
            )
        c.close()

    async def whoami(k):
        c = Conn(a.base, ctx)
        while not stop.is_set():
            await timed("whoami", c, "GET", "/_matrix/client/v3/account/whoami", tokens[random.randrange(len(tokens))])
        c.close()

    cpu0 = time.process_time()
    tasks = [asyncio.create_task(syncer(i)) for i in range(len(tokens))]
    tasks += [asyncio.create_task(sender(k)) for k in range(a.senders)]
    tasks += [asyncio.create_task(reader(k)) for k in range(a.readers)]
    tasks += [asyncio.create_task(whoami(k)) for k in range(a.whoami)]
    await asyncio.sleep(a.warmup)
    t = time.monotonic()
    stats.window = (t, t + a.secs)
    cpu1 = time.process_time()
    await asyncio.sleep(a.secs)
    cpu2 = time.process_time()
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    def p99(xs):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000, 1) if xs else None

    kinds = ["send", "messages", "whoami", "sync"]
    out = {
        "per_sec": {k: round(len(stats.lat.get(k, [])) / a.secs, 1) for k in kinds},
        "p99_ms": {k: p99(stats.lat.get(k, [])) for k in kinds},
        "errors": stats.errors,
        "gen_cpu_share": round((cpu2 - cpu1) / a.secs, 3),
        "setup_cpu": round(cpu1 - cpu0, 2),
    }
    # Requests answered at once (not the long-polls, whose time is the wait for a message).
    mixed = [x for k in ("send", "messages", "whoami") for x in stats.lat.get(k, [])]
    out["per_sec"]["mixed"] = round(len(mixed) / a.secs, 1)
    out["p99_ms"]["mixed"] = p99(mixed)
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    r = sub.add_parser("run")
    for x in (s, r):
        x.add_argument("--base", required=True)
        x.add_argument("--ca", required=True)
    s.add_argument("--users", type=int, default=16)
    s.add_argument("--rooms", type=int, default=8)
    s.add_argument("--password-dir", required=True)
    s.add_argument("--out", required=True)
    r.add_argument("--state", required=True)
    r.add_argument("--secs", type=float, default=30)
    r.add_argument("--warmup", type=float, default=10)
    r.add_argument("--senders", type=int, default=8)
    r.add_argument("--readers", type=int, default=4)
    r.add_argument("--whoami", type=int, default=4)
    a = p.parse_args()
    asyncio.run(setup(a) if a.cmd == "setup" else run(a))


if __name__ == "__main__":
    sys.exit(main())
