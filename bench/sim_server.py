"""Run only the simulated Ollama (for bench/compare.py): prints ``ready HOST:PORT``."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ollama_proxy.http.server import HttpServer  # noqa: E402
from ollama_proxy.sim.server import SERVER_SETTINGS, Simulator  # noqa: E402

# All the load comes from one address, 1,000 streams at once (and the relays' idle pooled
# connections besides): the server's default caps, 256 connections an address and 1,024 in
# all, refused most of compare.py's 1,000 streams.
SETTINGS = dataclasses.replace(SERVER_SETTINGS, max_connections=8192, max_connections_per_ip=8192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    args = parser.parse_args()

    async def run() -> None:
        sim = Simulator(tokens_per_s=args.tokens_per_s, max_records=1000)
        async with trio.open_nursery() as nursery:
            server = HttpServer(sim.handle, SETTINGS)
            host, port = await nursery.start(server.serve, args.host, args.port)
            print(f"ready {host}:{port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
