"""A yardstick, not a product: the naive trio + h11 relay anyone would write first.

bench/compare.py runs it on the same workloads and the same core as the gateway,
so the gateway is read against the simplest pass-through in the same language
and libraries (what its features and its tuning cost or save), not only
against no proxy at all. One upstream connection per client connection, opened
at its first request and kept for its keep-alive requests; the request body
read whole; the response relayed event by event (streams stay streams, h11
frames them again); no body parsing, no keys, no limits, no logs. An upstream
failure closes the client's connection. Standalone: trio and h11 only.
Prints ``listening on http://HOST:PORT`` like ``serve``.
"""

from __future__ import annotations

import argparse
import functools
import urllib.parse
from typing import Any

import h11
import trio

# Hop-by-hop headers (RFC 9110 7.6.1), which end at each hop; Content-Length is end-to-end.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade"})
GONE = (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    """The next h11 event of ``conn``, reading ``stream`` when h11 needs more bytes."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(65536))
    return event


async def send(conn: h11.Connection, stream: trio.SocketStream, event: Any) -> None:
    if data := conn.send(event):
        await stream.send_all(data)


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name not in HOP_BY_HOP]


class Relay:
    def __init__(self, upstream: str) -> None:
        url = urllib.parse.urlsplit(upstream)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.netloc = url.netloc.encode()

    async def serve_client(self, client_stream: trio.SocketStream) -> None:
        try:
            async with client_stream:
                await self.relay(client_stream)
        except GONE:
            pass  # either side went away: the client's connection closes with it

    async def relay(self, client_stream: trio.SocketStream) -> None:
        client = h11.Connection(h11.SERVER)
        upstream: h11.Connection | None = None
        upstream_stream: trio.SocketStream | None = None
        try:
            while isinstance(request := await next_event(client, client_stream), h11.Request):
                body = bytearray()
                while isinstance(event := await next_event(client, client_stream), h11.Data):
                    body += event.data
                if upstream is None or upstream.our_state is not h11.IDLE:
                    if upstream_stream is not None:
                        await upstream_stream.aclose()  # the previous one cannot be reused
                    upstream_stream = await trio.open_tcp_stream(self.host, self.port)
                    upstream = h11.Connection(h11.CLIENT)
                headers = [(n, v) for n, v in end_to_end(request.headers)
                           if n not in (b"host", b"content-length")]
                await send(upstream, upstream_stream, h11.Request(
                    method=request.method, target=request.target, headers=[
                        (b"host", self.netloc), *headers,
                        (b"content-length", str(len(body)).encode())]))
                await send(upstream, upstream_stream, h11.Data(data=bytes(body)))
                await send(upstream, upstream_stream, h11.EndOfMessage())
                while isinstance(response := await next_event(upstream, upstream_stream),
                                 h11.InformationalResponse):
                    pass
                await send(client, client_stream, h11.Response(
                    status_code=response.status_code, reason=response.reason,
                    headers=end_to_end(response.headers)))
                while isinstance(event := await next_event(upstream, upstream_stream), h11.Data):
                    await send(client, client_stream, event)
                await send(client, client_stream, h11.EndOfMessage())
                if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                    return  # the client asked to close, or its request had no clear end
                client.start_next_cycle()
                if upstream.our_state is h11.DONE and upstream.their_state is h11.DONE:
                    upstream.start_next_cycle()
        finally:
            if upstream_stream is not None:
                await upstream_stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free one)")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the backend")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    relay = Relay(args.upstream)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, relay.serve_client, int(port), host=host))
            bound_host, bound_port = listeners[0].socket.getsockname()[:2]
            print(f"listening on http://{bound_host}:{bound_port}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
