"""A Flotilla tool written in Python with nats-py's `nats.micro`, no Flotilla code.

Run by tests/tools.rs:  python tests/py/tool.py nats://127.0.0.1:PORT
Serves the tool `py-upper` (service `flotilla-tool-py-upper`, endpoint
`flotilla.tool.py-upper`): it uppercases `arguments.text`. Prints `ready` once the
endpoint is subscribed, serves until stdin closes, then prints one JSON line with
what it saw.
"""

import asyncio
import json
import sys

import nats
import nats.micro

PREFIX = "flotilla"
TOOL = "py-upper"


async def main(url):
    nc = await nats.connect(url, name="python-tool")
    seen = {"calls": 0, "tools": [], "sessions": []}

    async def handle(req):
        seen["calls"] += 1
        try:
            call = json.loads(req.data)
            if call.get("v") != 1:
                raise ValueError(f"unsupported protocol version {call.get('v')}")
            text = call["arguments"]["text"]
            if not isinstance(text, str):
                raise ValueError("arguments.text must be a string")
            seen["tools"].append(call["tool"])
            seen["sessions"].append(call["session_id"])
            reply = {"status": "ok", "v": 1, "result": {"text": text.upper()}}
        except (ValueError, KeyError, TypeError) as e:
            # Bad arguments never succeed: not retryable.
            reply = {"status": "error", "v": 1, "message": str(e), "retryable": False}
        await req.respond(json.dumps(reply).encode())

    svc = await nats.micro.add_service(
        nc,
        name=f"{PREFIX}-tool-{TOOL}",
        version="0.1.0",
        description="uppercases arguments.text",
    )
    await svc.add_endpoint(name=TOOL, subject=f"{PREFIX}.tool.{TOOL}", handler=handle)
    await nc.flush()
    print("ready", flush=True)
    # Serve until the test closes stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await svc.stop()
    await nc.close()
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
