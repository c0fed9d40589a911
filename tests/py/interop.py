"""A Python client of Flotilla, using only nats-py and the documented wire protocol.

Run by tests/interop.rs against a live fleet:  python tests/py/interop.py nats://127.0.0.1:PORT
Prints one JSON line with what it observed; exits non-zero on any violation.
"""

import asyncio
import json
import secrets
import sys

import nats


async def open_and_wait(nc, js, durable):
    """Opens a session (request/reply, or the durable submit queue) and returns its done event."""
    sid = ("pyq" if durable else "py") + secrets.token_hex(8)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def on_done(msg):
        if not done.done():
            done.set_result(msg)

    # Subscribe before opening, so the done event cannot be missed.
    await nc.subscribe(f"flotilla.s.{sid}.ev.done", cb=on_done)
    await nc.flush()
    req = {"v": 1, "task": f"python interop ({'queue' if durable else 'request'}): explain JetStream", "session_id": sid}
    if durable:
        ack = await js.publish("flotilla.submit", json.dumps(req).encode(), headers={"Nats-Msg-Id": f"{sid}.submit"})
        assert ack.stream == "FLOTILLA_SUBMIT", ack
    else:
        reply = await nc.request("flotilla.session.open", json.dumps(req).encode(), timeout=10)
        r = json.loads(reply.data)
        assert r == {"status": "accepted", "v": 1, "session_id": sid}, r
    msg = await asyncio.wait_for(done, 120)
    assert msg.headers and msg.headers.get("Flotilla-Session") == sid, msg.headers
    tp = msg.headers.get("traceparent", "")
    assert tp.startswith("00-") and len(tp) == 55, tp
    ev = json.loads(msg.data)
    assert ev["v"] == 1 and ev["session_id"] == sid, ev
    body = ev["body"]
    assert body["type"] == "done" and body["outcome"] == "completed", body
    return sid, body


async def main(url):
    nc = await nats.connect(url, name="python-interop")
    js = nc.jetstream()
    out = {}

    # Service discovery through the NATS micro protocol.
    ping = await nc.request("$SRV.PING.flotilla-admission", b"", timeout=5)
    info = json.loads(ping.data)
    assert info["name"] == "flotilla-admission", info
    out["service"] = info["name"]

    sid, body = await open_and_wait(nc, js, durable=False)
    out["session_id"] = sid
    out["roles"] = sorted(s["role"] for s in body["answer"]["sections"])
    out["artifacts"] = sum(len(s["output"]["artifacts"]) for s in body["answer"]["sections"])

    # The session record, read straight from KV.
    kv = await js.key_value("flotilla-sessions")
    entry = await kv.get(sid)
    record = json.loads(entry.value)
    assert record["status"] == "completed", record["status"]
    out["record_status"] = record["status"]

    # The durable submit queue.
    qsid, qbody = await open_and_wait(nc, js, durable=True)
    out["queued_session_id"] = qsid
    out["queued_roles"] = sorted(s["role"] for s in qbody["answer"]["sections"])

    # Bad input gets a typed error reply.
    bad = await nc.request("flotilla.session.open", b"{nope", timeout=10)
    err = json.loads(bad.data)
    assert err["status"] == "rejected" and err["code"] == "malformed", err
    assert bad.headers and bad.headers.get("Nats-Service-Error-Code") == "400", bad.headers
    out["malformed_code"] = err["code"]

    await nc.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
