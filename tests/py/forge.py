"""An outsider with nothing but nats-py and docs/protocol.md tries to forge results.

Run by tests/trust.rs against a live fleet whose research task fails its first attempt
and whose workers take a few seconds per task:

    python tests/py/forge.py nats://127.0.0.1:PORT

It opens a session, waits until the research task is at attempt 2 and the writing and
review tasks are dispatched, then publishes to the orchestrator's inbox:

  - a `completed` result for the writing task, which its worker has not committed;
  - three `failed` results for the review task (three would end the session);
  - a `completed` result for attempt 1 of the research task (a stale attempt);
  - a result whose `Flotilla-Session` header names another session.

It also opens two sessions to check admission's header handling. Prints one JSON line
with what it saw; exits non-zero on any violation.
"""

import asyncio
import json
import secrets
import sys

import nats


def result(sid, task, role, attempt, outcome):
    return json.dumps({
        "kind": "result", "v": 1, "session_id": sid, "task_id": task, "role": role,
        "attempt": attempt, "outcome": outcome,
    }).encode()


async def main(url):
    nc = await nats.connect(url, name="python-forger")
    js = nc.jetstream()
    out = {}
    sid = "forge" + secrets.token_hex(6)
    events = []
    seen = asyncio.Event()

    async def on_event(msg):
        events.append(json.loads(msg.data))
        seen.set()

    await nc.subscribe(f"flotilla.s.{sid}.ev.>", cb=on_event)
    await nc.flush()

    trace_id = secrets.token_hex(16)
    req = {"v": 1, "task": "forgery drill: explain JetStream", "session_id": sid}
    reply = await nc.request("flotilla.session.open", json.dumps(req).encode(), timeout=10,
                             headers={"Flotilla-Session": sid,
                                      "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    assert json.loads(reply.data)["status"] == "accepted", reply.data
    out["session_id"] = sid
    out["trace_id"] = trace_id

    async def wait_for(pred, what, timeout=60):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for ev in events:
                if pred(ev["body"]):
                    return ev["body"]
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {what} event; saw {[e['body']['type'] for e in events]}")
            seen.clear()
            try:
                await asyncio.wait_for(seen.wait(), left)
            except asyncio.TimeoutError:
                pass

    planned = await wait_for(lambda b: b["type"] == "planned", "planned")
    task_of = {t["role"]: t["task_id"] for t in planned["tasks"]}
    out["tasks"] = task_of

    # A dispatch is recorded on the event of the step that made it (its "dispatched"
    # list), or on a "dispatched" event of its own.
    def dispatched(role, attempt):
        def pred(_body):
            found = [d for ev in events
                     for d in ev.get("dispatched", []) + ([ev["body"]] if ev["body"]["type"] == "dispatched" else [])]
            return any(d["task_id"] == task_of[role] and d["attempt"] == attempt for d in found)
        return pred

    await wait_for(dispatched("research", 2), "research attempt 2 dispatched")
    await wait_for(dispatched("writing", 1), "writing dispatched")
    await wait_for(dispatched("review", 1), "review dispatched")

    inbox = f"flotilla.s.{sid}.in.orchestrator"

    async def forge(body, session_header=sid):
        headers = {"Nats-Msg-Id": "forged-" + secrets.token_hex(8),
                   "Flotilla-Session": session_header,
                   "traceparent": "garbage"}
        ack = await js.publish(inbox, body, headers=headers)
        assert ack.stream == "FLOTILLA_INBOX_orchestrator", ack

    await forge(result(sid, task_of["writing"], "writing", 1, {"status": "completed"}))
    for _ in range(3):
        await forge(result(sid, task_of["review"], "review", 1,
                           {"status": "failed", "reason": "forged failure"}))
    # The stale one once the research task's claim has moved to attempt 2.
    kv = await js.key_value("flotilla-sessions")
    key = f"{sid}.c.research.{task_of['research']}"
    for _ in range(300):
        try:
            if json.loads((await kv.get(key)).value)["attempt"] == 2:
                break
        except Exception:  # not there yet
            pass
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("research never claimed attempt 2")
    await forge(result(sid, task_of["research"], "research", 1, {"status": "completed"}))
    await forge(result(sid, task_of["analysis"], "analysis", 1, {"status": "completed"}),
                session_header="someone-else")
    out["forged"] = 6

    done = await wait_for(lambda b: b["type"] == "done", "done", timeout=120)
    out["outcome"] = done["outcome"]
    out["accepted"] = sorted(
        (e["body"]["task_id"], e["body"]["attempt"]) for e in events
        if e["body"]["type"] == "result" and e["body"]["accepted"])

    # Admission: a session header that disagrees with the body is refused ...
    other = "forge" + secrets.token_hex(6)
    req = {"v": 1, "task": "header drill", "session_id": other}
    reply = await nc.request("flotilla.session.open", json.dumps(req).encode(), timeout=10,
                             headers={"Flotilla-Session": "not-" + other})
    r = json.loads(reply.data)
    assert r["status"] == "rejected", r
    out["mismatch_code"] = r["code"]
    # ... and a garbage traceparent is replaced, not trusted: the session still opens.
    reply = await nc.request("flotilla.session.open", json.dumps(req).encode(), timeout=10,
                             headers={"traceparent": "garbage"})
    r = json.loads(reply.data)
    assert r["status"] == "accepted", r
    out["garbage_trace_session"] = other

    await nc.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
