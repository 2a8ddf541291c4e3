"""Drives the registration bot with matrix-nio, a second Matrix client implementation.

Used by tests/bot.rs: logs in, makes an unencrypted room, invites the bot, waits for it to join,
sends one command and prints the bot's answer as JSON ({"body": ..., "msgtype": ...}).
Exit 1 with a message on stderr when anything fails or times out.

usage: bot_nio.py HOMESERVER_URL USER PASSWORD BOT_MXID COMMAND
"""

import asyncio
import json
import sys
import time

from nio import (
    AsyncClient,
    JoinedMembersResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomMessageNotice,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)


def fail(msg):
    print(f"bot_nio: {msg}", file=sys.stderr)
    sys.exit(1)


async def main(hs, user, password, bot, command):
    client = AsyncClient(hs, user)
    try:
        r = await client.login(password, device_name="nio test")
        if not isinstance(r, LoginResponse):
            fail(f"login: {r}")
        r = await client.room_create(invite=[bot], name="nio and the bot")
        if not isinstance(r, RoomCreateResponse):
            fail(f"createRoom: {r}")
        room = r.room_id

        deadline = time.monotonic() + 60
        while True:
            m = await client.joined_members(room)
            if isinstance(m, JoinedMembersResponse) and any(x.user_id == bot for x in m.members):
                break
            if time.monotonic() > deadline:
                fail(f"{bot} did not join {room} within 60s")
            await asyncio.sleep(0.2)

        s = await client.sync(timeout=0)
        if not isinstance(s, SyncResponse):
            fail(f"sync: {s}")
        r = await client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": command})
        if not isinstance(r, RoomSendResponse):
            fail(f"send: {r}")

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = await client.sync(timeout=5000, since=client.next_batch)
            if not isinstance(s, SyncResponse):
                continue
            joined = s.rooms.join.get(room)
            for ev in joined.timeline.events if joined else []:
                if ev.sender == bot and isinstance(ev, (RoomMessageNotice, RoomMessageText)):
                    kind = "m.notice" if isinstance(ev, RoomMessageNotice) else "m.text"
                    print(json.dumps({"body": ev.body, "msgtype": kind}))
                    return
        fail(f"no answer from {bot} within 60s")
    finally:
        await client.close()


if __name__ == "__main__":
    if len(sys.argv) != 6:
        fail(__doc__)
    asyncio.run(main(*sys.argv[1:]))
