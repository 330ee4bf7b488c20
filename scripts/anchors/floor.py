"""The Python HTTP floor: a raw ASGI app on the transformer's own server stack (uvicorn with httptools and
uvloop, one process), answering every request with one fixed JSON body. Nothing a Python server does per
request can cost less; the benchmark reports the transformer's cost against it.

    python -m scripts.anchors.floor --port 8070 --body-bytes 420

``--loop asyncio`` runs it on Python's own event loop instead of uvloop: the overload benchmark compares the two
under 1,024 connections, where uvloop leaves some connections unanswered for seconds (benchmarks/overload.md).
"""

from __future__ import annotations

import argparse
import sys


def app_answering(body: bytes):
    """An ASGI app that reads the request body and answers ``body`` (application/json) to any request."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:  # the body is read, as any server that answers it would
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def fixed_body(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (at least 12), shaped like an answer."""
    head, tail = b'{"predictions":"', b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.anchors.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the loopback port to listen on")
    parser.add_argument("--body-bytes", type=int, default=420, help="size of the fixed answer (the transformer's "
                                                                    "one-row answer is about this)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the event loop (the transformer's is uvloop)")
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(app_answering(fixed_body(args.body_bytes)), host="127.0.0.1", port=args.port, loop=args.loop,
                http="httptools", log_level="warning", access_log=False, lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
