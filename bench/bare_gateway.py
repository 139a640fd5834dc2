"""The relay alone, for bench/compare.py: no keys, no ledger, no limits, no access log.

What the features cost is the gateway with them against this, in the same
run. Prints ``listening on http://HOST:PORT`` like ``serve``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ollama_proxy.api.record import RequestRecord  # noqa: E402
from ollama_proxy.app import make_backend, server_settings  # noqa: E402
from ollama_proxy.backends.registry import BackendSet  # noqa: E402
from ollama_proxy.backends.router import Router  # noqa: E402
from ollama_proxy.backends.settings import RoutingSettings  # noqa: E402
from ollama_proxy.config import load_config  # noqa: E402
from ollama_proxy.dispatch import DispatchTable, proxied_rows  # noqa: E402
from ollama_proxy.http.server import HttpServer, Request  # noqa: E402
from ollama_proxy.proxy.metering import Metering  # noqa: E402
from ollama_proxy.proxy.relay import ProxyHandler  # noqa: E402
from ollama_proxy.store.accounts import KeyEntry  # noqa: E402

ANYONE = KeyEntry(prefix="op-bench", hash=b"", user="bench", role="admin", suspended=False,
                  expires_at=None, user_limits={})


class NoKeys:
    """Every caller is the same admin: no key is looked up or checked."""

    def identify(self, request: Request) -> KeyEntry:
        return ANYONE


class NoLedger:
    """Records go nowhere."""

    async def record(self, record: RequestRecord) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = load_config(None, env={}, listen=args.listen, upstream_urls=[args.upstream])
    routing = RoutingSettings()
    router = Router(BackendSet([make_backend(u, routing) for u in config.upstreams], routing))
    handler = ProxyHandler(router, NoKeys(), Metering(NoLedger()))  # type: ignore[arg-type]
    server = HttpServer(DispatchTable(proxied_rows(handler.handle)).handle,
                        server_settings(config.server))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve, config.server.host, config.server.port)
            print(f"listening on http://{host}:{port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
