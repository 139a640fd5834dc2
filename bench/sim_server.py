"""Run only the simulated Ollama (for bench/compare.py): prints ``ready HOST:PORT``.

With ``--trace FILE`` each generation or embedding request, once answered, adds a line of
JSON to FILE: ``start`` and ``end`` (``time.monotonic()``, the clock every process on the
machine shares: when the head arrived and when the last byte was written), ``tag`` (the
first word of the prompt: who sent it), ``outcome`` and ``status``; compare.py's fairness
workload reads who held the backend's slots when."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, TextIO

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ollama_proxy.http.messages import Request  # noqa: E402
from ollama_proxy.http.responder import Responder  # noqa: E402
from ollama_proxy.http.server import Handler, HttpServer  # noqa: E402
from ollama_proxy.sim.server import (  # noqa: E402
    METERED_PATHS,
    SERVER_SETTINGS,
    SimRecord,
    Simulator,
)

# All the load comes from one address, 1,000 streams at once (and the relays' idle pooled
# connections besides): the server's default caps, 256 connections an address and 1,024 in
# all, refused most of compare.py's 1,000 streams.
SETTINGS = dataclasses.replace(SERVER_SETTINGS, max_connections=8192, max_connections_per_ip=8192)


def tag(record: SimRecord) -> str:
    """The first word of the request's prompt (its last message's), or ''."""
    body: Any = record.body
    text: Any = None
    if isinstance(body, dict):
        messages = body.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            text = messages[-1].get("content")
        else:
            text = body.get("prompt")
    words = text.split() if isinstance(text, str) else []
    return words[0] if words else ""


def traced(sim: Simulator, out: TextIO) -> Handler:
    """``sim.handle`` that writes a line to ``out`` for each metered request answered
    (``sim`` must keep every record: the request's is found by its index)."""

    async def handle(request: Request, responder: Responder) -> None:
        index, start = len(sim.records), time.monotonic()  # handle appends its record at once
        try:
            await sim.handle(request, responder)
        finally:
            record = sim.records[index]
            if record.path in METERED_PATHS:
                out.write(json.dumps({"start": start, "end": time.monotonic(), "tag": tag(record),
                                      "outcome": record.outcome, "status": record.status}) + "\n")
                out.flush()

    return handle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    parser.add_argument("--trace", metavar="FILE",
                        help="append a JSON line per generation answered (keeps every record)")
    args = parser.parse_args()
    trace = None if args.trace is None else open(args.trace, "a", encoding="utf-8")

    async def run() -> None:
        sim = Simulator(tokens_per_s=args.tokens_per_s,
                        max_records=None if trace else 1000)
        handler = sim.handle if trace is None else traced(sim, trace)
        async with trio.open_nursery() as nursery:
            server = HttpServer(handler, SETTINGS)
            host, port = await nursery.start(server.serve, args.host, args.port)
            print(f"ready {host}:{port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
