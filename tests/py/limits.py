"""A Python caller of the fleet rate limiter, from docs/protocol.md section 11 alone:
ask flotilla.limits.acquire for a permit, settle it, and see a refusal.

Usage: python limits.py <nats-url> <model>
Prints one JSON line: {"granted": ..., "settled": ..., "refused": ...}.
"""

import asyncio
import json
import sys

import nats


async def main(url: str, model: str) -> None:
    nc = await nats.connect(url)
    out = {}
    for _ in range(100):  # the leader may still be starting
        try:
            msg = await nc.request(
                "flotilla.limits.acquire",
                json.dumps({"v": 1, "model": model, "tokens": 120}).encode(),
                timeout=1,
            )
            break
        except Exception:  # no responders yet
            await asyncio.sleep(0.1)
    reply = json.loads(msg.data)
    assert reply["status"] == "granted", reply
    out["granted"] = reply["permit"]
    settle = {
        "v": 1,
        "model": model,
        "permit": reply["permit"],
        "granted_ms": reply["granted_ms"],
        "reserved": 120,
        "used": 80,
    }
    ack = await nc.request("flotilla.limits.settle", json.dumps(settle).encode(), timeout=2)
    out["settled"] = json.loads(ack.data)["v"] == 1
    too_big = await nc.request(
        "flotilla.limits.acquire",
        json.dumps({"v": 1, "model": model, "tokens": 10_000_000}).encode(),
        timeout=2,
    )
    out["refused"] = json.loads(too_big.data)
    # Requests the leader cannot read are answered with their error code.
    bad = {}
    for name, subject, body in [
        ("acquire_garbage", "flotilla.limits.acquire", b"\x00not json"),
        ("acquire_v2", "flotilla.limits.acquire", json.dumps({"v": 2, "model": model, "tokens": 1}).encode()),
        ("acquire_unknown_field", "flotilla.limits.acquire",
         json.dumps({"v": 1, "model": model, "tokens": 1, "urgent": True}).encode()),
        ("settle_garbage", "flotilla.limits.settle", b"{"),
    ]:
        r = json.loads((await nc.request(subject, body, timeout=2)).data)
        assert r["status"] == "error" and r["v"] == 1 and r["message"], r
        bad[name] = r["code"]
    out["bad"] = bad
    print(json.dumps(out))
    await nc.close()


asyncio.run(main(sys.argv[1], sys.argv[2]))
