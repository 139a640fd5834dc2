"""Run only the simulated Ollama (for bench/compare.py): prints ``ready HOST:PORT``."""

from __future__ import annotations

import argparse
import pathlib
import sys

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ollama_proxy.sim.server import Simulator, run_simulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    args = parser.parse_args()

    async def run() -> None:
        sim = Simulator(tokens_per_s=args.tokens_per_s, max_records=1000)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(run_simulator, sim, args.host, args.port)
            print(f"ready {host}:{port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
