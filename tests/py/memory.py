"""A Python agent sharing a session's memory with Rust agents, through nats-py's KV API.

Run by tests/interop.rs:  python tests/py/memory.py nats://127.0.0.1:PORT <session_id>
Reads <sid>.notes from the flotilla-memory bucket, appends to it with a revision-checked
update, then shows that a stale revision conflicts. Prints one JSON line.
"""

import asyncio
import json
import sys

import nats
from nats.js.errors import KeyWrongLastSequenceError


async def main(url, sid):
    nc = await nats.connect(url, name="python-memory")
    kv = await nc.jetstream().key_value("flotilla-memory")
    key = f"{sid}.notes"
    entry = await kv.get(key)
    before = json.loads(entry.value)
    after = before + ["python"]
    new_revision = await kv.update(key, json.dumps(after).encode(), last=entry.revision)
    stale_conflict = False
    try:
        await kv.update(key, json.dumps(before + ["stale"]).encode(), last=entry.revision)
    except KeyWrongLastSequenceError:
        stale_conflict = True
    await nc.close()
    print(json.dumps({"read": before, "read_revision": entry.revision, "new_revision": new_revision, "stale_conflict": stale_conflict}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
