"""The relay alone, for bench/compare.py: no keys, no ledger, no limits, no usage log.

What the features cost is the gateway with them against this, in the same
run. Prints ``listening on http://HOST:PORT`` like ``serve``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ollama_proxy.app import make_backend, server_settings  # noqa: E402
from ollama_proxy.backends.registry import BackendSet  # noqa: E402
from ollama_proxy.config import load_config  # noqa: E402
from ollama_proxy.dispatch import DispatchTable, proxied_rows  # noqa: E402
from ollama_proxy.proxy.relay import Relay  # noqa: E402
from ollama_proxy.http.server import HttpServer  # noqa: E402
from ollama_proxy.api.record import RequestRecord  # noqa: E402


class NoSink:
    """Usage goes nowhere."""

    async def record(self, record: RequestRecord) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = load_config(None, env={}, listen=args.listen, upstream_urls=[args.upstream])
    router = BackendSet([make_backend(u) for u in config.upstreams])
    server = HttpServer(DispatchTable(proxied_rows(Relay(router, NoSink()).handle)).handle,
                        server_settings(config.server))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve, config.server.host, config.server.port)
            print(f"listening on http://{host}:{port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
