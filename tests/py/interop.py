"""A Python client of Flotilla, using only nats-py and the documented wire protocol.

Run by tests/interop.rs against a live fleet:  python tests/py/interop.py nats://127.0.0.1:PORT
Prints one JSON line with what it observed; exits non-zero on any violation.
"""

import asyncio
import base64
import hashlib
import json
import secrets
import sys

import nats

# Ed25519 verification, the reference code of RFC 8032 section 6 (slow, and enough to
# check a few signatures without a crypto package).
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def _add(a, b):
    x = (a[1] - a[0]) * (b[1] - b[0]) % P
    y = (a[1] + a[0]) * (b[1] + b[0]) % P
    c = 2 * a[3] * b[3] * D % P
    d = 2 * a[2] * b[2] % P
    e, f, g, h = y - x, d - c, d + c, y + x
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(s, pt):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, pt)
        pt = _add(pt, pt)
        s >>= 1
    return q


def _x(y, sign):
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    if (x & 1) != sign:
        x = P - x
    return x


def _point(b):
    y = int.from_bytes(b, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _x(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


_GY = 4 * pow(5, P - 2, P) % P
_G = (_x(_GY, 0), _GY, 1, _x(_GY, 0) * _GY % P)


def ed25519_verify(public, msg, sig):
    a, r = _point(public), _point(sig[:32])
    s = int.from_bytes(sig[32:], "little")
    if a is None or r is None or s >= L:
        return False
    h = int.from_bytes(hashlib.sha512(sig[:32] + public + msg).digest(), "little") % L
    lhs, rhs = _mul(s, _G), _add(r, _mul(h, a))
    return (lhs[0] * rhs[2] - rhs[0] * lhs[2]) % P == 0 and (lhs[1] * rhs[2] - rhs[1] * lhs[2]) % P == 0


def nkey_public(key):
    """The 32-byte Ed25519 key of an nkey: base32 of a prefix byte, the key, a CRC-16."""
    raw = base64.b32decode(key + "=" * (-len(key) % 8))
    return raw[1:33]


async def check_signed_tasks(js, tasks):
    """Checks each task message's batch signature as docs/protocol.md section 6 says:
    its digest is in Flotilla-Signed-Batch, the signer is registered, the signature
    checks out. Returns how many were checked; a tampered copy must fail."""
    kv = await js.key_value("flotilla-sessions")
    checked = 0
    for msg in tasks:
        h = msg.headers or {}
        batch, signer, sig = h.get("Flotilla-Signed-Batch"), h.get("Flotilla-Signer"), h.get("Flotilla-Signature")
        assert batch and signer and sig, h
        digest = lambda subject, data: hashlib.sha256(subject.encode() + b"\n" + data).digest()[:16].hex()
        assert digest(msg.subject, msg.data) in batch.split(","), (msg.subject, batch)
        assert digest(msg.subject, msg.data + b" ") not in batch.split(",")
        reg = json.loads((await kv.get(f"signer.{signer}")).value)
        assert reg["public_key"] == signer, reg
        signed = b"flotilla-batch-v1\n" + batch.encode()
        assert ed25519_verify(nkey_public(signer), signed, bytes.fromhex(sig)), "bad signature"
        assert not ed25519_verify(nkey_public(signer), signed + b",00", bytes.fromhex(sig))
        checked += 1
    return checked


async def open_and_wait(nc, js, durable):
    """Opens a session (request/reply, or the durable submit queue) and returns its done event."""
    sid = ("pyq" if durable else "py") + secrets.token_hex(8)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def on_done(msg):
        if not done.done():
            done.set_result(msg)

    tasks = []

    async def on_inbox(msg):
        if json.loads(msg.data).get("kind") == "task":
            tasks.append(msg)

    # Subscribe before opening, so the done event cannot be missed; and to the
    # session's worker inboxes, to see the task messages as published.
    await nc.subscribe(f"flotilla.s.{sid}.ev.done", cb=on_done)
    await nc.subscribe(f"flotilla.s.{sid}.in.*", cb=on_inbox)
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
    body["_tasks"] = [t for t in tasks if not t.subject.endswith(".in.orchestrator")]
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
    out["signed_tasks"] = await check_signed_tasks(js, body.pop("_tasks"))

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
    qbody.pop("_tasks")

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
